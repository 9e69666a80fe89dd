"""The real thing on CPU: ~30 LoRA steps of SmolLM2 on the example Human/Assistant CSV lower the
eval loss; `corral merge` then gives the same greedy tokens as base+adapter (PEFT), in
transformers and in Corral's engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [[{"role": "user", "content": "中国的首都是哪里？"}],
           [{"role": "user", "content": "What do bees make?"}]]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, default_folder):
    from corral.tune.sft import TuneConfig, train

    out = tmp_path_factory.mktemp("smollm2") / "adapter"
    cfg = TuneConfig(model="default", data="examples/data/bilingual_sft.csv", output=str(out),
                     max_steps=30, batch_size=1, learning_rate=1e-3, warmup=3, val_split=4,
                     max_seq_len=96, save_steps=1000, logging_steps=10, progress=False)
    return out, train(cfg)


def test_lora_run_lowers_eval_loss(tuned):
    _, summary = tuned
    assert summary["chat_format"] == "human-assistant" and summary["global_step"] == 30
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1, summary


def test_merged_greedy_equals_peft_and_corral(tuned, default_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, _ = tuned
    merged_dir = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "corral.cli", "merge", "--base", "default",
                           "--adapter", str(adapter), "--output", str(merged_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert "<s>Assistant: " in tok.chat_template  # the format it was tuned on travels along

    def greedy(model, messages, n: int = 8) -> list[int]:
        """Plain argmax decoding (no logits processors), like ignore_eos=True."""
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        new = []
        for _ in range(n):
            new.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
        return new

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(adapter)).eval()
        expected = [greedy(peft, p) for p in PROMPTS]
        del peft, base
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert [greedy(merged, p) for p in PROMPTS] == expected
        del merged

    from corral import LLM, SamplingParams

    llm = LLM(model=str(merged_dir), device="cpu", dtype="float32")
    outs = llm.chat(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                    use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == expected
