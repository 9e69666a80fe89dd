"""The runner with a fake backend: outputs, failures recorded, resume, judge, compare, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.cli import main
from corral.eval.backends import Reply
from corral.eval.compare import compare_runs
from corral.eval.data import Question
from corral.eval.judge import parse_rating
from corral.eval.run import read_answers, run_eval
from corral.sampling_params import SamplingParams

QUESTIONS = [
    Question("q1", "中国的首都是哪座城市？", "general_knowledge", "zh", reference=["北京"]),
    Question("q2", "What is the capital of France?", "general_knowledge", "en", reference="Paris"),
    Question("q3", "写一首诗。", "creative_writing", "zh"),
    Question("q4", "Write a poem.", "creative_writing", "en"),
    Question("q5", "2+2?", "logical_reasoning", "en", choices=["3", "4", "5"], answer=1),
]
ZH = {"q1": "北京是中国的首都。", "q3": "春风吹绿了江南岸。"}
EN = {"q1": "The capital of China is Beijing.", "q2": "Paris.", "q3": "Spring wind.",
      "q4": "Roses are red."}


class FakeBackend:
    """Answers from a table; `fail` ids raise inside the backend (recorded as errors)."""

    def __init__(self, answers: dict[str, str], fail: set[str] = frozenset(), name="fake",
                 finish: str = "stop"):
        self.answers, self.fail, self.name, self.finish = answers, set(fail), name, finish
        self.asked: list[str] = []
        self.params: list[SamplingParams] = []

    def chat(self, conversations, params, progress=None):
        replies = []
        for conv in conversations:
            text = conv[-1]["content"]
            qid = next(q.id for q in QUESTIONS if q.question == text)
            self.asked.append(qid)
            self.params.append(params)
            if qid in self.fail:
                replies.append(Reply(error="RuntimeError: boom"))
            else:
                replies.append(Reply(text=self.answers.get(qid, EN.get(qid, "")),
                                     finish_reason=self.finish, completion_tokens=5,
                                     seconds=0.1))
            if progress:
                progress(1)
        return replies

    def continuation_logprobs(self, context, continuations):
        self.asked.append("q5")
        assert context == "Question: 2+2?\nAnswer:"
        assert continuations == [" 3", " 4", " 5"]
        return [(-2.0, 1), (-0.5, 1), (-3.0, 2)]


class FakeJudge:
    name = "judge"

    def __init__(self, verdict: str):
        self.verdict = verdict
        self.prompts: list[str] = []

    def chat(self, conversations, params, progress=None):
        assert params.temperature == 0.0
        self.prompts += [c[-1]["content"] for c in conversations]
        return [Reply(text=self.verdict, finish_reason="stop") for _ in conversations]


def run(backend, out: Path, judge=None, questions=QUESTIONS):
    return run_eval(backend, questions, out, SamplingParams(temperature=0, max_tokens=8),
                    questions_spec="test", judge_backend=judge)


def test_run_writes_all_outputs_and_scores(tmp_path):
    summary = run(FakeBackend(ZH), tmp_path)
    for name in ("answers.jsonl", "summary.json", "report.md", "report.html"):
        assert (tmp_path / name).is_file(), name
    recs = read_answers(tmp_path)
    assert list(recs) == ["q1", "q2", "q3", "q4", "q5"]
    assert recs["q1"]["answer_language"] == "zh" and recs["q1"]["language_adherent"] is True
    assert recs["q1"]["correct"] is True and recs["q2"]["correct"] is True
    assert recs["q5"]["prediction"] == 1 and recs["q5"]["correct"] is True
    # Length-normalized: -2.0, -0.5, -1.5 per token -> still index 1.
    assert recs["q5"]["prediction_norm"] == 1
    o = summary["overall"]
    assert o["n"] == 5 and o["errors"] == 0
    assert o["language_adherence"] == 1.0 and o["accuracy"] == 1.0
    assert summary["categories"]["creative_writing"]["language_adherence_zh"] == 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["overall"]["n"] == 5


def test_failure_is_recorded_and_resume_asks_only_what_is_missing(tmp_path):
    first = FakeBackend(EN, fail={"q3"})
    summary = run(first, tmp_path, questions=QUESTIONS[:4])
    assert sorted(first.asked) == ["q1", "q2", "q3", "q4"]
    assert read_answers(tmp_path)["q3"]["error"] == "RuntimeError: boom"
    assert summary["overall"]["errors"] == 1
    # English answers to Chinese questions: adherence 0 on zh, 1 on en.
    assert summary["languages"]["zh"]["language_adherence"] == 0.0
    assert summary["languages"]["en"]["language_adherence"] == 1.0

    second = FakeBackend(EN)
    summary = run(second, tmp_path)  # now with q5 too: asks the failed q3 and the new q5
    assert sorted(second.asked) == ["q3", "q5"]
    assert summary["overall"]["errors"] == 0 and summary["overall"]["n"] == 5

    third = FakeBackend(EN)
    run(third, tmp_path)
    assert third.asked == []
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 5  # rewritten once per id, in question order


def test_resume_refuses_a_different_model(tmp_path):
    from corral.errors import CorralError

    run(FakeBackend(EN), tmp_path)
    with pytest.raises(CorralError, match="another --output"):
        run(FakeBackend(EN, name="other"), tmp_path)


def test_judge_scores_and_rationale(tmp_path):
    judge = FakeJudge("The answer is correct and concise. Rating: [[8]]")
    summary = run(FakeBackend(ZH), tmp_path, judge=judge)
    recs = read_answers(tmp_path)
    assert recs["q2"]["judge_score"] == 8.0
    assert recs["q2"]["judge_rationale"].startswith("The answer is correct")
    assert "choices" in recs["q5"] and "judge_score" not in recs["q5"]  # choices not judged
    assert summary["overall"]["judge_score"] == 8.0 and summary["overall"]["judge_n"] == 4
    # MT-Bench prompt: the question and answer are in it; the reference prompt when given.
    assert "[Question]\nWhat is the capital of France?" in judge.prompts[1]
    assert "[The Start of Reference Answer]\nParis" in judge.prompts[1]
    assert "[The Start of Reference Answer]" not in judge.prompts[2]
    # A resumed run does not judge again.
    again = FakeJudge("Rating: [[2]]")
    run(FakeBackend(ZH), tmp_path, judge=again)
    assert again.prompts == []


def test_judge_without_rating_is_recorded(tmp_path):
    summary = run(FakeBackend(ZH), tmp_path, judge=FakeJudge("It is fine I guess."))
    rec = read_answers(tmp_path)["q1"]
    assert rec["judge_score"] is None and rec["judge_error"] == "judge gave no [[rating]]"
    assert summary["overall"]["judge_score"] is None


@pytest.mark.parametrize("text, value", [
    ("Good. Rating: [[7]]", 7.0), ("[[9.5]]", 9.5), ("Rating: 6", 6.0), ("Rating: [[11]]", None),
    ("no number here", None),
])
def test_parse_rating(text, value):
    assert parse_rating(text) == value


def test_compare_per_category_deltas(tmp_path):
    a, b = tmp_path / "before", tmp_path / "after"
    run(FakeBackend(EN), a)
    run(FakeBackend(ZH), b)
    cmp = compare_runs(a, b, tmp_path / "cmp")
    g = cmp["groups"]
    # Before: q1, q3 (zh) answered in English -> 2/4; after: all adherent -> 4/4.
    assert g["overall"]["language_adherence"] == {"a": 0.5, "b": 1.0, "delta": 0.5}
    assert g["creative_writing"]["language_adherence"]["delta"] == 0.5
    assert g["logical_reasoning"]["accuracy"]["delta"] == 0.0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| overall | 50% | 100% | +50 pts |" in md
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count("data:image/png;base64,") >= 2
    assert "春风吹绿了江南岸。" in page and "Spring wind." in page  # answers side by side


def test_runaway_answers_are_noticed(tmp_path, capsys):
    """A tuned model that never stops: stop rate, a warning and the turn-marker count say so,
    in summary.json, the reports, the CLI and compare (beside adherence)."""
    runaway = {k: v + "\n</s><s>Human: 下一个问题" for k, v in (EN | ZH).items()}
    a, b = tmp_path / "before", tmp_path / "after"
    run(FakeBackend(EN), a)
    summary = run(FakeBackend(runaway, finish="length"), b)
    o = summary["overall"]
    assert o["stop_rate"] == 0.0 and o["truncated_rate"] == 1.0 and o["turn_marker_answers"] == 4
    assert summary["categories"]["creative_writing"]["stop_rate"] == 0.0
    assert [w.split(":")[0] for w in summary["warnings"]] == ["warning", "warning"]
    assert "max_tokens" in summary["warnings"][0] and "4 of 5" in summary["warnings"][1]
    assert read_answers(b)["q1"]["turn_marker"] == "</s>"
    assert "max_tokens" in (b / "report.md").read_text()
    assert "max_tokens" in (b / "report.html").read_text()
    good = run(FakeBackend(ZH), tmp_path / "good")
    assert good["overall"]["stop_rate"] == 1.0 and good["warnings"] == []
    assert main(["eval", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "stop rate A" in out and "adherence A" in out and "-1.00" in out
    cmp = json.loads((b / "compare" / "compare.json").read_text())
    assert cmp["groups"]["overall"]["stop_rate"] == {"a": 1.0, "b": 0.0, "delta": -1.0}
    assert "Stop rate" in (b / "compare" / "compare.md").read_text()


def test_cli_compare_and_errors(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run(FakeBackend(EN), a)
    run(FakeBackend(ZH), b)
    assert main(["eval", "compare", str(a), str(b)]) == 0
    assert (b / "compare" / "compare.html").is_file()
    assert "+0.50" in capsys.readouterr().out
    assert main(["eval", "compare", str(a)]) == 1
    assert "usage: corral eval compare" in capsys.readouterr().err
    assert main(["eval", "compare", str(a), str(tmp_path / "nope")]) == 1
    assert "not an eval run" in capsys.readouterr().err
    assert main(["eval", "--questions", "builtin:chat-zh-en"]) == 1
    assert "--output DIR is required" in capsys.readouterr().err
    assert main(["eval", "--questions", "builtin:nope", "--output", str(tmp_path / "x")]) == 1
    assert "no built-in question set" in capsys.readouterr().err


def test_resume_rescores_stored_answers(tmp_path):
    run(FakeBackend(ZH), tmp_path, questions=QUESTIONS[:1])
    path = tmp_path / "answers.jsonl"
    stale = json.loads(path.read_text()) | {"answer_language": "en", "language_adherent": False,
                                             "judge_score": 6.0}
    path.write_text(json.dumps(stale, ensure_ascii=False) + "\n")
    again = FakeBackend(ZH)
    summary = run(again, tmp_path, questions=QUESTIONS[:1])
    rec = read_answers(tmp_path)["q1"]
    assert again.asked == []
    assert rec["answer_language"] == "zh" and rec["language_adherent"] is True
    assert rec["judge_score"] == 6.0  # kept
    assert summary["overall"]["language_adherence"] == 1.0
