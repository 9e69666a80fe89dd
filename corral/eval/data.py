"""Question sets: JSONL files (ours under questions/, or the user's) -> list[Question].

One question per line: {"id", "question", "category", "language", optional "reference"
(a string or list of acceptable strings), optional "choices" + "answer" (index or choice text)}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError

BUILTIN_DIR = Path(__file__).parent / "questions"

# The eight categories of the Llama2-Chinese evaluation (English names; charts use these).
CATEGORIES = ["general_knowledge", "language_understanding", "creative_writing",
              "logical_reasoning", "coding", "work_skills", "tool_use", "personality"]


@dataclass
class Question:
    id: str
    question: str
    category: str = "general"
    language: str = "en"
    reference: str | list[str] | None = None
    choices: list[str] | None = None
    answer: int | None = None  # index into choices

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def resolve_questions_path(spec: str) -> Path:
    """`builtin:NAME` -> our file; anything else is a path to a JSONL file."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise CorralError(f"no built-in question set {name!r} "
                              f"(have: {', '.join(builtin_sets())})")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CorralError(f"question file not found: {spec}")
    return path


def parse_question(row: dict, where: str) -> Question:
    """One JSON object -> Question; raises CorralError naming the line on bad input."""
    if not isinstance(row, dict):
        raise CorralError(f"{where}: expected a JSON object")
    for key in ("id", "question"):
        if key not in row or row[key] in ("", None):
            raise CorralError(f"{where}: missing {key!r}")
    choices = row.get("choices")
    answer = row.get("answer")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2:
            raise CorralError(f"{where}: 'choices' must be a list of at least 2 strings")
        choices = [str(c) for c in choices]
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        elif isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
            answer = ord(answer.upper()) - ord("A")  # "B" -> 1
        if answer is not None and not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise CorralError(f"{where}: 'answer' must be a choice index, letter or text")
    return Question(id=str(row["id"]), question=str(row["question"]),
                    category=str(row.get("category") or "general"),
                    language=str(row.get("language") or "en"),
                    reference=row.get("reference"), choices=choices, answer=answer)


def load_questions(spec: str, limit: int | None = None) -> list[Question]:
    """Read a question set (`builtin:NAME` or a JSONL path); `limit` keeps the first N."""
    path = resolve_questions_path(spec)
    questions: list[Question] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorralError(f"{path.name}:{n}: not valid JSON ({e.msg})") from None
        q = parse_question(row, f"{path.name}:{n}")
        if q.id in seen:
            raise CorralError(f"{path.name}:{n}: duplicate id {q.id!r}")
        seen.add(q.id)
        questions.append(q)
    if not questions:
        raise CorralError(f"{path.name}: no questions")
    return questions[:limit] if limit else questions
