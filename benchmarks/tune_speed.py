"""Training tokens/s and peak memory: `corral tune` vs a plain TRL SFTTrainer script, same run.

Both sides train the same model with the same data (examples/data/bilingual_sft.jsonl), LoRA
settings, sequence length, batch size, steps, learning rate, seed and gradient checkpointing
(on by default: TRL's SFTConfig default; --no-gradient-checkpointing turns it off on both); each runs in its own
fresh subprocess so peak memory is its own. Loss is on the answers on both sides (TRL: its
prompt-completion format, completion-only loss by default).

  tokens/s  = non-padding tokens the trainer consumed / wall time of trainer.train()
  memory    = CUDA: torch.cuda.max_memory_allocated(); CPU: the process's peak resident set
              size (getrusage ru_maxrss: imports, model, optimizer and activations together)

CPU: python benchmarks/tune_speed.py                      (SmolLM2-135M, the default model)
GPU: python benchmarks/tune_speed.py --model random:llama3-1b [--load-in-4bit needs weights]
Prints both sides, the ratios and the hardware, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "bilingual_sft.jsonl"


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_corral(a) -> dict:
    import tempfile

    from corral.tune.sft import TuneConfig, train

    with tempfile.TemporaryDirectory() as out:
        cfg = TuneConfig(model=a.model, data=str(a.data), output=out, max_steps=a.steps,
                         batch_size=a.batch_size, max_seq_len=a.max_seq_len, lora_r=a.lora_r,
                         lora_alpha=2 * a.lora_r, lora_dropout=0.0, learning_rate=2e-4,
                         warmup=0, val_split=0, save_steps=10**6, logging_steps=10**6,
                         load_in_4bit=a.load_in_4bit, seed=0, device=a.device, progress=False,
                         epochs=100, gradient_checkpointing=a.gradient_checkpointing)
        s = train(cfg)
    return {"tokens": s["tokens_seen"], "seconds": s["train_seconds"],
            "final_loss": s["train_loss"]}


def run_trl(a) -> dict:
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from corral.loading import load_config, load_tokenizer, resolve_dtype, resolve_source

    device = torch.device(a.device)
    src = resolve_source(a.model)
    tok = load_tokenizer(src) or load_tokenizer(resolve_source("default"))
    dtype = resolve_dtype("auto", device)
    kwargs: dict = {"dtype": dtype}
    if a.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    torch.manual_seed(0)
    if src.folder is None:
        model = AutoModelForCausalLM.from_config(load_config(src), dtype=dtype).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(src.folder, **kwargs)
    rows = [json.loads(line) for line in a.data.read_text().splitlines() if line.strip()]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                            for r in rows])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=a.max_seq_len, max_steps=a.steps,
                         num_train_epochs=100, per_device_train_batch_size=a.batch_size,
                         learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0,
                         report_to=[], save_strategy="no", logging_steps=10**6, seed=0,
                         bf16=device.type == "cuda", use_cpu=device.type == "cpu",
                         include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                         gradient_checkpointing=a.gradient_checkpointing)
        peft = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=peft)
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
    return {"tokens": trainer.state.num_input_tokens_seen, "seconds": round(seconds, 2),
            "final_loss": result.training_loss}


def child(a) -> None:
    figures = run_corral(a) if a.side == "corral" else run_trl(a)
    if a.device == "cuda":
        torch.cuda.synchronize()
    figures["tokens_per_s"] = figures["tokens"] / figures["seconds"]
    figures["peak_memory_mb"] = peak_memory_mb(a.device)
    print("RESULT " + json.dumps(figures))


def side(a, name: str) -> dict:
    cmd = [sys.executable, __file__, "--side", name, "--model", a.model, "--data", str(a.data),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-seq-len",
           str(a.max_seq_len), "--lora-r", str(a.lora_r), "--device", a.device]
    if a.load_in_4bit:
        cmd.append("--load-in-4bit")
    if not a.gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{name} side failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default (CPU) / random:llama3-1b (CUDA)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA on both sides (CUDA)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing",
                   action="store_false", help="turn TRL's default checkpointing off on both sides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", choices=["corral", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.model = a.model or ("random:llama3-1b" if a.device == "cuda" else "default")
    if a.side:
        return child(a)
    trl, corral = side(a, "trl"), side(a, "corral")  # TRL first: no warm cache favours Corral
    for name, f in (("TRL SFTTrainer", trl), ("corral tune", corral)):
        print(f"{name:15s} {f['tokens_per_s']:9.1f} tokens/s  peak {f['peak_memory_mb']:8.0f} MB"
              f"  ({f['tokens']} tokens in {f['seconds']:.1f} s, loss {f['final_loss']:.3f})")
    speed = corral["tokens_per_s"] / trl["tokens_per_s"]
    memory = corral["peak_memory_mb"] / trl["peak_memory_mb"]
    hw = hardware(a.device)
    print(f"corral/TRL: {speed:.2f}x tokens/s, {memory:.2f}x peak memory on {hw}")
    print(json.dumps({
        "benchmark": "tune_speed", "model": a.model, "device": a.device, "hardware": hw,
        "steps": a.steps, "batch_size": a.batch_size, "max_seq_len": a.max_seq_len,
        "lora_r": a.lora_r, "load_in_4bit": a.load_in_4bit,
        "gradient_checkpointing": a.gradient_checkpointing,
        "memory_measure": "cuda max_memory_allocated" if a.device == "cuda" else "peak RSS",
        "trl_tokens_per_s": round(trl["tokens_per_s"], 1),
        "corral_tokens_per_s": round(corral["tokens_per_s"], 1),
        "trl_peak_memory_mb": round(trl["peak_memory_mb"], 1),
        "corral_peak_memory_mb": round(corral["peak_memory_mb"], 1),
        "speed_ratio": round(speed, 3), "memory_ratio": round(memory, 3)}))


if __name__ == "__main__":
    main()
