"""lm-eval's `local-completions` model against `corral serve` scores a multiple-choice task as
lm-eval's `hf` model does on the same weights (echo + logprobs on /v1/completions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow

TASK_DIR = Path(__file__).parent / "lm_eval_task"
REPO = Path(__file__).resolve().parents[2]


def _accuracy(model: str, model_args: str, **kw) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Only our task folder: indexing lm-eval's thousands of built-in tasks takes a minute.
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    out = simple_evaluate(model=model, model_args=model_args, tasks=["corral_mc_mini"],
                          task_manager=tasks, **kw)
    return out["results"]["corral_mc_mini"]["acc,none"]


def test_lm_eval_local_completions_matches_hf(default_folder, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    with ServerProcess(["--model", "default"]) as srv:
        served = _accuracy(
            "local-completions",
            f"model=default,base_url={srv.url}/v1/completions,tokenizer={default_folder},"
            "tokenizer_backend=huggingface,tokenized_requests=False,num_concurrent=4")
    hf = _accuracy("hf", f"pretrained={default_folder},dtype=float32", device="cpu",
                   batch_size=8)
    assert hf > 0.5  # the task is easy enough to tell a working model from noise
    assert abs(served - hf) <= 0.01, (served, hf)
