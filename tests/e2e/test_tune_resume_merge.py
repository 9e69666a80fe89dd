"""`corral tune` killed with SIGKILL resumes from its last checkpoint; `corral merge` output
equals base+adapter (PEFT) and loads in transformers, corral.loading and Corral's engine.
A tiny random Llama with SmolLM2's tokenizer keeps this fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PROMPTS = [[{"role": "user", "content": "中国的首都是哪里？"}],
           [{"role": "user", "content": "What do bees make?"}]]


def corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli", *args]


def tune_args(model: Path, out: Path) -> list[str]:
    return ["tune", "--model", str(model), "--data", "examples/data/bilingual_sft.jsonl",
            "--output", str(out), "--max-steps", "40", "--save-steps", "4", "--batch-size", "2",
            "--logging-steps", "1", "--val-split", "0", "--max-seq-len", "64",
            "--learning-rate", "1e-2", "--save-total-limit", "2", "--no-progress"]


def steps_logged(out: Path) -> list[int]:
    lines = (out / "tune_log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def resumed_run(tiny_folder, tmp_path_factory):
    """Start a run, SIGKILL it after its first complete checkpoint, then --resume it."""
    from corral.tune.sft import last_checkpoint

    out = tmp_path_factory.mktemp("run") / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(corral(*tune_args(tiny_folder, out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and last_checkpoint(out) is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(steps_logged(out))
    checkpoint = last_checkpoint(out)
    assert checkpoint is not None and not (out / "corral_tune.json").exists()
    done = subprocess.run(corral(*tune_args(tiny_folder, out), "--resume"), env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "corral_tune.json").read_text())
    return out, summary, int(checkpoint.name.split("-")[1]), killed_at


def test_sigkilled_run_resumes_from_its_last_checkpoint(resumed_run):
    out, summary, ckpt_step, killed_at = resumed_run
    assert 4 <= ckpt_step < 40
    assert summary["start_step"] == ckpt_step and summary["resumed_from"].endswith(
        f"checkpoint-{ckpt_step}")
    assert summary["global_step"] == 40
    steps = steps_logged(out)
    # the log holds the first session's steps 1..killed_at, then the resumed ones from ckpt+1
    assert steps == list(range(1, killed_at + 1)) + list(range(ckpt_step + 1, 41))


def test_without_resume_an_existing_run_is_not_overwritten(resumed_run, tiny_folder, capsys):
    from corral.cli import main

    assert main(tune_args(tiny_folder, resumed_run[0])) == 1
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume" in err and len(err.splitlines()) == 1


def greedy(model, tokenizer, messages, n: int = 8) -> list[int]:
    """Plain argmax decoding (no logits processors, EOS not special), like ignore_eos=True."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
    return new


def test_merged_model_equals_base_plus_adapter(resumed_run, tiny_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.loading import resolve_source
    from corral.tune.merge import merge

    adapter = resumed_run[0]
    merged_dir = merge(str(tiny_folder), str(adapter), str(tmp_path / "merged"))
    tok = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
        peft = PeftModel.from_pretrained(base, str(adapter)).eval()
        peft_logits = peft(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        merged_logits = merged(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)
    peft_tokens = [greedy(peft, tok, p) for p in PROMPTS]
    assert [greedy(merged, tok, p) for p in PROMPTS] == peft_tokens
    assert resolve_source(str(merged_dir)).folder == merged_dir
    # Corral's own engine on the merged folder gives the same greedy tokens
    from corral import LLM, SamplingParams

    llm = LLM(model=str(merged_dir), device="cpu", dtype="float32")
    outs = llm.chat(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                    use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == peft_tokens


def test_merge_errors_are_one_line(tmp_path, tiny_folder, capsys):
    from corral.cli import main

    args = ["merge", "--base", str(tiny_folder), "--adapter", str(tmp_path), "--output",
            str(tmp_path / "m")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not a LoRA adapter folder" in err and len(err.splitlines()) == 1
