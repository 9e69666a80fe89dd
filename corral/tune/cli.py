"""`corral tune` (flags or --config tune.yaml; flags win) and `corral merge`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from corral.cli_args import CHAT_FORMAT_HELP, add_chat_format_arg, add_device_arg, add_dtype_arg
from corral.errors import CorralError

S = argparse.SUPPRESS  # flags not given stay absent, so yaml values are not overridden


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="LoRA / QLoRA / full supervised fine-tuning on a chat dataset",
        description="Fine-tune a model on CSV/JSON/JSONL/Parquet/saved-dataset/hub data. Loss "
                    "is on assistant answers (plus their end token) unless --train-on-prompt.")
    p.add_argument("--config", default=None, help="tune.yaml with any of these settings "
                   "(keys as flag names); flags given on the command line win")
    g = p.add_argument_group("data")
    g.add_argument("--model", default=S, help="base model: alias, HF folder, .gguf, hub id "
                   "(default: default)")
    g.add_argument("--data", default=S, help="CSV, JSON, JSONL, Parquet, saved dataset folder "
                   "or hub id")
    g.add_argument("--output", default=S, help="folder for checkpoints, logs and the adapter")
    g.add_argument("--data-format", default=S,
                   help="auto (default), text, messages (also ShareGPT), alpaca, "
                        "prompt-completion")
    add_chat_format_arg(g, default=S, help=CHAT_FORMAT_HELP + "; data already rendered as "
                        "Llama2-Chinese Human/Assistant text always uses human-assistant")
    g.add_argument("--val-data", default=S, help="separate validation data")
    g.add_argument("--val-split", type=float, default=S,
                   help="held-out fraction (<1) or count (>=1) for eval loss (default 0.05)")
    g.add_argument("--train-on-prompt", action="store_true", default=S,
                   help="also put loss on prompts (default: assistant answers only)")
    g.add_argument("--packing", action="store_true", default=S,
                   help="pack samples into --max-seq-len rows (no attention across samples)")
    g.add_argument("--max-seq-len", type=int, default=S, help="tokens per sample (default 1024)")
    m = p.add_argument_group("method")
    m.add_argument("--full", action="store_true", default=S, help="full fine-tuning (no LoRA)")
    m.add_argument("--lora-r", type=int, default=S, help="LoRA rank (default 16)")
    m.add_argument("--lora-alpha", type=int, default=S, help="LoRA alpha (default 32)")
    m.add_argument("--lora-dropout", type=float, default=S, help="LoRA dropout (default 0.05)")
    m.add_argument("--target-modules", default=S,
                   help="comma-separated module names, or all-linear (default)")
    m.add_argument("--load-in-4bit", action="store_true", default=S,
                   help="QLoRA: NF4 4-bit base via bitsandbytes (CUDA only)")
    m.add_argument("--gradient-checkpointing", action="store_true", default=S,
                   help="trade compute for activation memory")
    add_dtype_arg(m, default=S)
    add_device_arg(m, default=S)
    t = p.add_argument_group("schedule")
    t.add_argument("--learning-rate", "--lr", type=float, default=S,
                   help="default 2e-4 (LoRA) / 2e-5 (full)")
    t.add_argument("--lr-scheduler", default=S, help="cosine (default), linear, constant, ...")
    t.add_argument("--warmup", type=float, default=S,
                   help="warm-up: fraction of steps (<1) or steps (>=1); default 0.03")
    t.add_argument("--weight-decay", type=float, default=S)
    t.add_argument("--epochs", type=float, default=S, help="default 1")
    t.add_argument("--max-steps", type=int, default=S, help="stop after N optimizer steps")
    t.add_argument("--batch-size", type=int, default=S, help="per device (default 4)")
    t.add_argument("--grad-accum", "--gradient-accumulation-steps", type=int, default=S,
                   dest="grad_accum", help="micro-batches per optimizer step (default 1)")
    t.add_argument("--eval-steps", type=int, default=S, help="default: --save-steps")
    t.add_argument("--save-steps", type=int, default=S, help="checkpoint every N (default 100)")
    t.add_argument("--save-total-limit", type=int, default=S, help="checkpoints kept (3)")
    t.add_argument("--logging-steps", type=int, default=S, help="default 10")
    t.add_argument("--resume", action="store_true", default=S,
                   help="continue from the last checkpoint in --output")
    t.add_argument("--seed", type=int, default=S, help="default 42")
    t.add_argument("--no-progress", action="store_false", dest="progress", default=S,
                   help="no progress bar")
    d = p.add_argument_group("multi-process (DDP; docs/scale.md)")
    d.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes on this machine, started through `accelerate "
                        "launch` (one per GPU on CUDA, gloo on CPU); the effective batch is "
                        "batch-size x processes x grad-accum (default 1: this process alone)")
    p.set_defaults(func=run_tune)

    mp = subparsers.add_parser(
        "merge", help="merge a LoRA adapter into its full-precision base",
        description="Write one safetensors folder (config, tokenizer, chat template) that "
                    "transformers and Corral load. 4-bit (QLoRA) adapters merge into the "
                    "full-precision base.")
    mp.add_argument("--base", default=None, help="base model (default: the one the adapter's "
                    "corral_tune.json names)")
    mp.add_argument("--adapter", required=True, help="adapter folder from corral tune")
    mp.add_argument("--output", required=True, help="folder for the merged model")
    add_dtype_arg(mp, help="dtype of the merged weights (auto: the base's)")
    mp.set_defaults(func=run_merge)


def load_yaml(path: str) -> dict:
    """tune.yaml -> settings dict (dashes in keys become underscores)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise CorralError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CorralError(f"{p.name}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CorralError(f"{p.name}: expected a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_from_args(args: argparse.Namespace):
    """TuneConfig from yaml (if any) overridden by the flags actually given."""
    from corral.tune.sft import TuneConfig

    known = {f.name for f in fields(TuneConfig)}
    settings = load_yaml(args.config) if args.config else {}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise CorralError(f"{Path(args.config).name}: unknown settings: {', '.join(unknown)}")
    settings.update({k: v for k, v in vars(args).items() if k in known})
    tm = settings.get("target_modules")
    if isinstance(tm, str) and tm != "all-linear":
        settings["target_modules"] = [x.strip() for x in tm.split(",") if x.strip()]
    return TuneConfig(**settings)


def run_tune(args: argparse.Namespace) -> int:
    from corral.tune.sft import is_main_process, train

    cfg = config_from_args(args)
    if args.num_processes < 1:
        raise CorralError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return launch_processes(cfg, args.num_processes)
    summary = train(cfg)
    if not is_main_process():
        return 0
    keys = ("method", "global_step", "train_loss", "eval_loss_before", "eval_loss_after",
            "tokens_per_s", "num_processes", "effective_batch_size")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"adapter saved to {summary['config']['output']}" if summary["method"] != "full"
          else f"model saved to {summary['config']['output']}")
    return 0


def accelerate_command(num_processes: int, port: int) -> list[str]:
    """`accelerate launch` for N local processes. Its multi-GPU launcher (torchrun) is also
    the one that starts several CPU processes: `--cpu` alone runs one process unless MPI is
    set up. On CPU the Trainer (use_cpu) then joins them over gloo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def launch_processes(cfg, num_processes: int) -> int:
    """Run this same tune job in `num_processes` processes: the settings go to them as a
    tune.yaml (flags and yaml already merged), so every process trains the same job."""
    import subprocess
    import tempfile
    from dataclasses import asdict

    import yaml

    from corral.server.launch import free_port
    from corral.tune.sft import checkpoint_to_resume

    cfg.check()  # the errors a process would meet first, said once, before launching
    checkpoint_to_resume(cfg)
    with tempfile.NamedTemporaryFile("w", prefix="corral-tune-", suffix=".yaml") as f:
        yaml.safe_dump(asdict(cfg), f, allow_unicode=True)
        f.flush()
        cmd = [*accelerate_command(num_processes, free_port()), "-m", "corral.cli", "tune",
               "--config", f.name]
        return subprocess.run(cmd, check=False).returncode


def run_merge(args: argparse.Namespace) -> int:
    from corral.tune.merge import merge

    out = merge(args.base, args.adapter, args.output, args.dtype)
    print(f"merged model saved to {out}")
    return 0
