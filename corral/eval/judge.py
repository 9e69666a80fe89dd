"""LLM-as-judge: MT-Bench's single-answer grading prompt, a 1-10 rating and its rationale.

The judge is any Backend (a local model or an endpoint); it answers greedily.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.eval.backends import Backend
from corral.sampling_params import SamplingParams

# The prompts of MT-Bench (FastChat llm_judge, "single-v1" and "single-math-v1").
JUDGE_SYSTEM = "You are a helpful assistant."
JUDGE_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and "
    "level of detail of the response. Begin your evaluation by providing a short explanation. "
    "Be as objective as possible. After providing your explanation, you must rate the response "
    "on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: "
    "\"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n"
    "{answer}\n[The End of Assistant's Answer]"
)
JUDGE_PROMPT_REF = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider correctness and helpfulness. You will be given a reference answer and the "
    "assistant's answer. Begin your evaluation by comparing the assistant's answer with the "
    "reference answer. Identify and correct any mistakes. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    "following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n[The Start of Reference Answer]\n{reference}\n"
    "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_LOOSE = re.compile(r"[Rr]ating:?\s*\[?\s*(\d+(?:\.\d+)?)")


@dataclass
class Verdict:
    score: float | None  # 1-10, None when the judge gave no readable rating
    rationale: str
    error: str | None = None


def judge_messages(question: str, answer: str, reference: str | list[str] | None = None
                   ) -> list[dict]:
    """The conversation sent to the judge for one answer."""
    if reference:
        ref = reference if isinstance(reference, str) else " / ".join(reference)
        user = JUDGE_PROMPT_REF.format(question=question, answer=answer, reference=ref)
    else:
        user = JUDGE_PROMPT.format(question=question, answer=answer)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_rating(text: str) -> float | None:
    """The rating in "[[N]]" (MT-Bench's format), else "Rating: N"; None if absent or not
    within 1-10."""
    m = _RATING.search(text) or _RATING_LOOSE.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


def judge_answers(judge: Backend, items: list[tuple[str, str, str | list[str] | None]],
                  max_tokens: int = 512, progress=None) -> list[Verdict]:
    """Grade (question, answer, reference) triples; one Verdict each, in order."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    convs = [judge_messages(q, a, r) for q, a, r in items]
    verdicts = []
    for reply in judge.chat(convs, params, progress):
        if reply.error:
            verdicts.append(Verdict(None, "", reply.error))
            continue
        score = parse_rating(reply.text)
        verdicts.append(Verdict(score, reply.text.strip(),
                                None if score is not None else "judge gave no [[rating]]"))
    return verdicts
