"""`corral eval` end to end on the real default model (SmolLM2): the CLI's outputs and resume,
log-likelihood choice scoring against transformers, and a local model as judge."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from corral.eval.backends import LocalBackend
from corral.eval.data import load_questions
from corral.eval.judge import parse_rating
from corral.eval.run import choice_context, read_answers, run_eval
from corral.eval.score import detect_language
from corral.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CORRAL = [sys.executable, "-m", "corral.cli"]


def test_cli_eval_outputs_and_resume(tmp_path, default_folder):
    out = tmp_path / "run"
    cmd = [*CORRAL, "eval", "--model", "default", "--questions", "builtin:chat-zh-en",
           "--limit", "8", "--max-new-tokens", "12", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "0 of 8 questions already answered; asking 8" in proc.stdout
    assert "answering" in proc.stderr  # the progress bar
    for name in ("answers.jsonl", "summary.json", "report.md", "report.html"):
        assert (out / name).is_file(), name

    recs = list(read_answers(out).values())
    assert len(recs) == 8 and all(r["error"] is None for r in recs)
    for r in recs:
        assert 0 < r["completion_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
        # The stored scores are those of the stored answer (nothing made up on the way).
        assert r["answer_language"] == detect_language(r["answer"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["categories"]) == 8  # the first 8 questions span all categories
    judged = [r["language_adherent"] for r in recs if r["language_adherent"] is not None]
    assert summary["overall"]["language_adherence"] == round(sum(judged) / len(judged), 4)
    page = (out / "report.html").read_text()
    assert len(re.findall(r"data:image/png;base64,", page)) >= 3

    # Resume: everything is answered, so nothing is asked (and the model is not even loaded).
    before = (out / "answers.jsonl").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "8 of 8 questions already answered; asking 0" in proc.stdout
    assert (out / "answers.jsonl").read_text() == before


@pytest.fixture(scope="module")
def smol():
    from corral import LLM

    return LocalBackend(LLM(model="default"), "default")


def test_choice_loglikelihood_matches_transformers(smol, default_folder):
    from transformers import AutoModelForCausalLM

    q = load_questions("builtin:choice-mini")[0]
    assert q.question == "What is the capital of France?" and q.choices[q.answer] == "Paris"
    context, conts = choice_context(q)
    ours = smol.continuation_logprobs(context, conts)

    tok = smol.llm.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    ctx = tok.encode(context)
    for (total, n), cont in zip(ours, conts):
        ids = tok.encode(context + cont)
        assert ids[: len(ctx)] == ctx
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        # Token i is predicted by position i - 1.
        ref = sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))
        assert n == len(ids) - len(ctx)
        assert abs(total - ref) < 2e-3, (cont, total, ref)
    assert max(range(4), key=lambda i: ours[i][0]) == 0  # Paris


def test_local_model_as_judge(smol, tmp_path):
    qs = [q for q in load_questions("builtin:chat-zh-en") if q.id == "gk-en-1"]
    run_eval(smol, qs, tmp_path, SamplingParams(temperature=0, max_tokens=8),
             questions_spec="builtin:chat-zh-en", judge_backend=smol, judge_max_tokens=24)
    recs = read_answers(tmp_path)
    assert set(recs) == {"gk-en-1"}
    for r in recs.values():
        assert r["judge_rationale"], r  # the judge answered
        assert r["judge_score"] == parse_rating(r["judge_rationale"])
        if r["judge_score"] is None:
            assert r["judge_error"] == "judge gave no [[rating]]"
        else:
            assert 1 <= r["judge_score"] <= 10 and r["judge_error"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["info"]["judge"] == "default"
    assert summary["overall"]["judge_n"] == sum(r["judge_score"] is not None
                                                for r in recs.values())
