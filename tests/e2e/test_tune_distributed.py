"""`corral tune --num-processes 2` (accelerate launch, DDP over gloo on CPU) trains the same
curve as one process whose batch is the union of the two, writes its outputs once, and resumes
from a checkpoint to the same losses. A tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = "examples/data/bilingual_sft.jsonl"
STEPS = 6
SETTINGS = {"data": DATA, "max_steps": STEPS, "save_steps": 3, "logging_steps": 1,
            "val_split": 0, "max_seq_len": 64, "learning_rate": 1e-2, "lora_dropout": 0.0,
            "seed": 3, "progress": False}


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        if k == "progress":
            out += [] if v else ["--no-progress"]
        else:
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


def two_processes(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Per device: batch 1 x accumulation 2, on 2 processes -> 4 examples per step."""
    cmd = [sys.executable, "-m", "corral.cli", "tune", "--model", str(model), "--output",
           str(out), *flags(SETTINGS), "--batch-size", "1", "--grad-accum", "2",
           "--num-processes", "2", *extra]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "tune_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def ddp_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    done = two_processes(tiny_folder, out)
    return out, done


def test_two_processes_match_one_with_the_union_batch(ddp_run, tiny_folder, tmp_path):
    from corral.tune.sft import TuneConfig, train

    out, done = ddp_run
    single = train(TuneConfig(model=str(tiny_folder), output=str(tmp_path / "one"),
                              batch_size=4, **SETTINGS))
    ddp, one = losses(out), losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:  # DDP averages the gradients of the two halves of each step's batch
        assert ddp[step] == pytest.approx(one[step], abs=1e-4), (step, ddp, one)
    assert len(set(one.values())) == STEPS  # the curve does move
    summary = json.loads((out / "corral_tune.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed"] == "MULTI_CPU"
    assert (summary["per_device_batch_size"], summary["grad_accum"],
            summary["effective_batch_size"]) == (1, 2, 4)
    assert single["effective_batch_size"] == 4 and single["num_processes"] == 1
    assert summary["train_loss"] == pytest.approx(single["train_loss"], abs=1e-4)
    # tokens counted over both processes: the same examples, so about the same count
    # (a batch of 1 has no padding; the single run's batches of 4 do)
    assert 0.5 * single["tokens_seen"] < summary["tokens_seen"] <= single["tokens_seen"]
    # written once: one summary line on stdout, one log line per step, one TensorBoard file
    assert done.stdout.count('"global_step"') == 1
    assert "2 process(es) x batch 1 x accumulation 2 = 4 examples" in done.stderr
    assert len((out / "tune_log.jsonl").read_text().splitlines()) == STEPS + 1
    assert len(list((out / "runs").rglob("events.out.tfevents.*"))) == 1
    ckpt = out / "checkpoint-3"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_in_two_processes_replays_the_same_steps(ddp_run, tiny_folder, tmp_path):
    """Back to checkpoint-3 (as if the job had died after it), then --resume: steps 4-6
    come out with the losses of the uninterrupted run."""
    full, _ = ddp_run
    out = tmp_path / "out"
    shutil.copytree(full / "checkpoint-3", out / "checkpoint-3")
    done = two_processes(tiny_folder, out, "--resume")
    summary = json.loads((out / "corral_tune.json").read_text())
    assert summary["start_step"] == 3 and summary["global_step"] == STEPS
    assert summary["resumed_from"].endswith("checkpoint-3")
    resumed, uninterrupted = losses(out), losses(full)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    assert done.stdout.count('"global_step"') == 1
