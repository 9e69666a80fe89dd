"""`corral eval --endpoint` and lm-eval's `local-chat-completions` against the real
`corral serve` (SmolLM2) through the real `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from corral.eval.run import read_answers
from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow

CORRAL = [sys.executable, "-m", "corral.cli"]
QUESTIONS = [
    {"id": "open-en", "question": "What is the capital of France?", "category": "general_knowledge",
     "language": "en", "reference": "Paris"},
    {"id": "open-zh", "question": "你好！", "category": "personality", "language": "zh"},
    {"id": "mc", "question": "What is the capital of France?", "category": "general_knowledge",
     "language": "en", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "default"]) as srv:
        yield srv


def test_eval_against_endpoint(server, tmp_path, default_folder):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS))
    out = tmp_path / "run"
    proc = subprocess.run([*CORRAL, "eval", "--endpoint", server.url + "/v1", "--questions",
                           str(qfile), "--max-new-tokens", "8", "--concurrency", "2",
                           "--output", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    recs = read_answers(out)
    assert all(r["error"] is None for r in recs.values()), recs
    for qid in ("open-en", "open-zh"):
        assert recs[qid]["answer"] and 0 < recs[qid]["completion_tokens"] <= 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["info"]["model"] == f"default@{server.url}/v1"

    # Choices through /v1/completions echo+logprobs equal transformers' log-likelihoods.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_folder)
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    context = "Question: What is the capital of France?\nAnswer:"
    ctx = tok.encode(context)
    mc = recs["mc"]
    for choice, got, n in zip(mc["choices"], mc["choice_logprobs"], mc["choice_tokens"]):
        ids = tok.encode(context + " " + choice)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
        ref = sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))
        assert n == len(ids) - len(ctx) and abs(got - ref) < 2e-3, (choice, got, ref)
    assert mc["prediction"] == 0 and mc["correct"] is True


TASK = """\
task: corral_eval_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""


def test_lm_eval_local_chat_completions(server, tmp_path, monkeypatch):
    """The README recipe: lm-eval's `local-chat-completions` pointed at `corral serve` (here
    on a two-question local task, as there is no dataset hub offline)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "gen.jsonl"
    data.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n'
                    '{"question": "What is 2 + 2?", "answer": "4"}\n')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "corral_eval_gen.yaml").write_text(textwrap.dedent(
        TASK.format(data=data)))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(
        model="local-chat-completions",
        model_args=f"model=default,base_url={server.url}/v1/chat/completions,num_concurrent=2",
        tasks=["corral_eval_gen"], task_manager=tasks, apply_chat_template=True,
        log_samples=True)
    assert "exact_match,none" in out["results"]["corral_eval_gen"]
    responses = [s["resps"][0][0] for s in out["samples"]["corral_eval_gen"]]
    assert len(responses) == 2 and all(isinstance(r, str) and r.strip() for r in responses)
