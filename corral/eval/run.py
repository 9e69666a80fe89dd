"""The eval runner: ask what is missing, score, judge, then write answers/summary/reports.

answers.jsonl is keyed by question id and appended after every batch, so an interrupted run
loses at most one batch; re-running into the same folder asks only the questions without an
answer (failed ones included) and judges only the answers without a verdict.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from corral.errors import CorralError
from corral.eval import report, score
from corral.eval.backends import Backend, Reply
from corral.eval.data import Question
from corral.eval.judge import judge_answers
from corral.sampling_params import SamplingParams

ANSWERS = "answers.jsonl"
RUN_INFO = "run.json"


def read_answers(out_dir: Path) -> dict[str, dict]:
    """Records already in answers.jsonl, by id (a later line wins; a torn last line is
    ignored, as an interrupted write may leave one)."""
    path = out_dir / ANSWERS
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                records[str(rec["id"])] = rec
    return records


def _append(out_dir: Path, records: list[dict]) -> None:
    with open(out_dir / ANSWERS, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def _rewrite(out_dir: Path, records: list[dict]) -> None:
    tmp = out_dir / (ANSWERS + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")
    tmp.replace(out_dir / ANSWERS)


def conversation(q: Question, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q.question}]


def choice_context(q: Question) -> tuple[str, list[str]]:
    """A plain completion prompt and one continuation per choice (lm-eval's MMLU style), the
    same for local models and endpoints so their scores compare."""
    if q.language == "zh":
        return f"问题：{q.question}\n答案：", list(q.choices or [])
    return f"Question: {q.question}\nAnswer:", [" " + c for c in q.choices or []]


def _base(q: Question) -> dict:
    rec = {"id": q.id, "category": q.category, "language": q.language, "question": q.question}
    if q.reference is not None:
        rec["reference"] = q.reference
    if q.choices:
        rec["choices"], rec["answer_index"] = q.choices, q.answer
    return rec


def score_reply(q: Question, reply: Reply) -> dict:
    """The record of one open question: its answer, timing and per-answer scores."""
    rec = _base(q) | {"answer": reply.text, "finish_reason": reply.finish_reason,
                      "completion_tokens": reply.completion_tokens,
                      "seconds": round(reply.seconds, 3), "error": reply.error}
    if reply.error:
        return rec
    rec |= {"answer_language": score.detect_language(reply.text),
            "language_adherent": score.language_adherent(reply.text, q.language),
            "empty": score.is_empty(reply.text),
            "truncated": score.is_truncated(reply.finish_reason),
            "stopped": score.is_stopped(reply.finish_reason),
            "turn_marker": score.turn_marker(reply.text),
            "refusal": score.is_refusal(reply.text),
            "answer_chars": len(reply.text.strip())}
    if q.reference:
        rec["correct"] = score.reference_match(reply.text, q.reference)
    return rec


def rescore(q: Question, rec: dict) -> dict:
    """Recompute an open answer's scores from its stored text (scoring is cheap and the
    scorer may have improved since the answer was recorded); judge fields are kept."""
    if rec.get("error") or q.is_choice:
        return rec
    reply = Reply(text=rec.get("answer") or "", finish_reason=rec.get("finish_reason"),
                  completion_tokens=rec.get("completion_tokens"), seconds=rec.get("seconds", 0.0))
    return rec | score_reply(q, reply)


def score_choice(backend: Backend, q: Question) -> dict:
    """The record of one multiple-choice question, scored by log-likelihood."""
    t0 = time.perf_counter()
    context, conts = choice_context(q)
    try:
        scores = backend.continuation_logprobs(context, conts)
    except CorralError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded on the question, retried on resume
        return _base(q) | {"answer": "", "error": f"{type(e).__name__}: {e}".splitlines()[0],
                           "seconds": round(time.perf_counter() - t0, 3)}
    best, best_norm = score.choice_prediction(scores)
    rec = _base(q) | {"answer": q.choices[best], "error": None,
                      "seconds": round(time.perf_counter() - t0, 3),
                      "choice_logprobs": [round(s, 4) for s, _ in scores],
                      "choice_tokens": [n for _, n in scores],
                      "prediction": best, "prediction_norm": best_norm}
    if q.answer is not None:
        rec["correct"] = best == q.answer
        rec["correct_norm"] = best_norm == q.answer
    return rec


def _check_same_run(out_dir: Path, info: dict) -> None:
    path = out_dir / RUN_INFO
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model", "questions"):
            if old.get(key) != info.get(key):
                raise CorralError(f"{out_dir} holds a run with {key}={old.get(key)!r}, not "
                                  f"{info.get(key)!r}; pick another --output to start afresh")
    path.write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")


def ask(backend: Backend, todo: list[Question], out_dir: Path, params: SamplingParams,
        system: str | None, batch_size: int) -> int:
    """Answer `todo`, appending records batch by batch; returns how many failed."""
    failed = 0
    with tqdm(total=len(todo), desc="answering", unit="q", dynamic_ncols=True) as bar:
        for q in (q for q in todo if q.is_choice):
            rec = score_choice(backend, q)
            failed += bool(rec["error"])
            _append(out_dir, [rec])
            bar.update(1)
        open_qs = [q for q in todo if not q.is_choice]
        for i in range(0, len(open_qs), batch_size):
            chunk = open_qs[i:i + batch_size]
            replies = backend.chat([conversation(q, system) for q in chunk], params, bar.update)
            recs = [score_reply(q, r) for q, r in zip(chunk, replies)]
            failed += sum(bool(r["error"]) for r in recs)
            _append(out_dir, recs)
    return failed


def judge(judge_backend: Backend, records: list[dict], out_dir: Path, max_tokens: int,
          batch_size: int) -> None:
    """Add judge_score / judge_rationale to answered open questions not yet judged."""
    todo = [r for r in records if not r.get("error") and "choices" not in r
            and r.get("judge_score") is None and not r.get("judge_rationale")]
    with tqdm(total=len(todo), desc="judging", unit="q", dynamic_ncols=True) as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            items = [(r["question"], r["answer"], r.get("reference")) for r in chunk]
            for rec, v in zip(chunk, judge_answers(judge_backend, items, max_tokens, bar.update)):
                rec |= {"judge_score": v.score, "judge_rationale": v.rationale,
                        "judge_error": v.error}
            _append(out_dir, chunk)


def run_eval(backend: Backend, questions: list[Question], out_dir: Path,
             params: SamplingParams, *, questions_spec: str = "", system: str | None = None,
             judge_backend: Backend | None = None, judge_max_tokens: int = 512,
             batch_size: int = 32) -> dict:
    """Run (or resume) an eval into `out_dir`; returns the summary written there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"model": backend.name, "questions": questions_spec, "system": system,
            "sampling": asdict(params),
            "judge": judge_backend.name if judge_backend else None}
    _check_same_run(out_dir, info)
    t0 = time.perf_counter()
    existing = read_answers(out_dir)
    todo = [q for q in questions if q.id not in existing or existing[q.id].get("error")]
    print(f"{len(questions) - len(todo)} of {len(questions)} questions already answered; "
          f"asking {len(todo)}")
    failed = ask(backend, todo, out_dir, params, system, batch_size) if todo else 0
    records = read_answers(out_dir)
    ordered = [rescore(q, records[q.id]) for q in questions if q.id in records]
    if judge_backend is not None:
        judge(judge_backend, ordered, out_dir, judge_max_tokens, batch_size)
    # Keep records of questions outside this run (e.g. an earlier, larger --limit) at the end.
    ids = {q.id for q in questions}
    _rewrite(out_dir, ordered + [r for k, r in records.items() if k not in ids])
    summary = report.summarize(ordered, info | {"elapsed_s": round(time.perf_counter() - t0, 1),
                                                "failed": failed})
    report.write_reports(out_dir, summary, ordered)
    return summary
