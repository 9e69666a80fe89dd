"""The flags several `corral` commands share, defined once: one name per flag (older spellings
kept as aliases), the same choices and help everywhere.

    generate, chat, eval   add_model_args (model, dtype, device, chat format, kernels...)
                           + add_sampling_args
    prompt                 add_chat_format_arg
    serve                  add_dtype_arg, add_device_arg, add_chat_format_arg, add_kernel_args,
                           add_parallel_args
    ui                     add_dtype_arg, add_device_arg, add_chat_format_arg
    tune                   add_dtype_arg, add_device_arg, add_chat_format_arg
"""

from __future__ import annotations

import argparse
from pathlib import Path

from corral.errors import CorralError
from corral.sampling_params import SamplingParams

DTYPES = ("auto", "float32", "bfloat16", "float16")
CHAT_FORMAT_HELP = ("chat format: auto (the tokenizer's template, or the built-in it copies), "
                    "template, llama2, llama3, chatml, human-assistant (alias llama2-chinese)")


def add_dtype_arg(group, default="auto", help: str | None = None) -> None:
    group.add_argument("--dtype", choices=DTYPES, default=default,
                       help=help or "weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")


def add_device_arg(group, default="auto") -> None:
    group.add_argument("--device", default=default, help="auto, cpu, cuda or cuda:N")


def add_chat_format_arg(group, default=None, help: str | None = None) -> None:
    """--chat-format NAME (the older --format still works) -> args.chat_format."""
    group.add_argument("--chat-format", "--format", dest="chat_format", default=default,
                       metavar="NAME", help=help or CHAT_FORMAT_HELP)


def check_chat_format(name) -> None:
    """Reject an unknown --chat-format before any model is loaded."""
    if isinstance(name, str) and name.strip().lower() not in ("auto", "template"):
        from corral.chat import get_chat_format

        get_chat_format(name, None)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags; `sampling_params_from_args` turns them into SamplingParams."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int,
                   default=256, metavar="N", help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="randomness; 0 = greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the K likeliest tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.9,
                   help="nucleus sampling mass (default 0.9; 1 = off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeating tokens (default 1 = off)")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable)")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from `add_sampling_args` flags; bad values raise CorralError."""
    try:
        return SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=list(args.stop))
    except ValueError as e:
        raise CorralError(str(e)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which model to load and how; `engine_kwargs_from_args` turns them into LLM kwargs."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="alias, HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    add_dtype_arg(g)
    add_device_arg(g)
    add_chat_format_arg(g)
    g.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR|JSON",
                   help='stretch the context, e.g. yarn:4 or \'{"rope_type": "linear", '
                        '"factor": 2}\'')
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length in tokens (default: the model's)")
    add_kernel_args(g)
    add_parallel_args(g)
    add_lora_args(g)


def add_kernel_args(group) -> None:
    """Which weight/kernel paths the engine uses (shared by `corral serve`)."""
    group.add_argument("--no-gguf-kernels", action="store_true",
                       help="CPU: dequantize the .gguf once into a dense fp32 copy (cached "
                            "on disk) instead of running its memory-mapped blocks")
    group.add_argument("--gguf-math", choices=["int8", "fp32"], default=None,
                       help="CPU quantized weights: int8 = activations quantized to 8 bits and "
                            "integer dot products (llama.cpp's arithmetic, fastest); fp32 = "
                            "weights rebuilt exactly, fp32 dot products (matches transformers "
                            "on the dequantized model). Default: $CORRAL_GGUF_MATH, else int8")
    group.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None,
                       help="CPU fp32 HF model: run on Q8_0/Q4_0 weights made at load (faster, "
                            "less memory, numerics change; no dense copy kept)")
    group.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16"], default=None,
                       help="KV cache values; auto (default): float16 for a CPU model on "
                            "int8 quantized matmuls (as llama.cpp: half the memory and "
                            "bandwidth per token), else the model's dtype")
    group.add_argument("--no-cuda-graphs", action="store_true",
                       help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")


def add_parallel_args(group) -> None:
    """--tensor-parallel-size (shared by `corral serve` and the model flags)."""
    group.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int,
                       default=None, metavar="N",
                       help="split the weights over N processes (one per GPU on CUDA; on the "
                            "CPU the cores are shared out); the heads must divide by N")


def parallel_kwargs_from_args(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments for `add_parallel_args`."""
    n = getattr(args, "tensor_parallel_size", None)
    if n is None:
        return {}
    if n < 1:
        raise CorralError(f"--tensor-parallel-size must be at least 1, got {n}")
    return {"tensor_parallel_size": n}


def add_lora_args(group, serving: bool = False) -> None:
    """LoRA adapters on the base model (shared by serve, generate, chat, eval and ui)."""
    group.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                       help="a PEFT LoRA adapter folder (as `corral tune` writes it) served on "
                            "the base; repeatable" + (
                                "; clients pick it with `model`=NAME" if serving else
                                "; the first one answers (PATH alone: named after its folder)"))
    group.add_argument("--max-loras", type=int, default=None,
                       help="adapters resident at once, least recently used evicted (default 4)")
    group.add_argument("--max-lora-rank", type=int, default=None,
                       help="largest adapter rank accepted (default 64)")
    if serving:
        group.add_argument("--enable-lora", action="store_true",
                           help="accept adapters loaded at run time (implied by --lora)")


def parse_lora_specs(specs: list[str]) -> dict[str, str]:
    """["zh=runs/zh", "runs/en"] -> {"zh": "runs/zh", "en": "runs/en"}; CorralError if bad."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise CorralError(f"--lora {spec!r}: expected NAME=PATH")
        if name in out:
            raise CorralError(f"--lora: the name {name!r} is given twice")
        out[name] = path
    return out


def lora_kwargs_from_args(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments for the `add_lora_args` flags that were given."""
    kw = {}
    loras = parse_lora_specs(getattr(args, "lora", None) or [])
    if loras:
        kw["lora_modules"] = loras
    if getattr(args, "enable_lora", False) or loras:
        kw["enable_lora"] = True
    for k in ("max_loras", "max_lora_rank"):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    return kw


def kernel_kwargs_from_args(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments for the `add_kernel_args` flags that were given."""
    kw = {}
    if args.no_cuda_graphs:
        kw["cuda_graphs"] = False
    if args.no_gguf_kernels:
        kw["gguf_kernels"] = False
    if args.quantize:
        kw["quantization"] = args.quantize
    if args.gguf_math:
        kw["gguf_math"] = args.gguf_math
    if getattr(args, "kv_cache_dtype", None):
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    return kw


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Keyword arguments for `LLM(...)` / `AsyncLLM(...)` from `add_model_args` flags."""
    check_chat_format(args.chat_format)
    if args.max_model_len is not None and args.max_model_len < 1:
        raise CorralError(f"--max-model-len must be positive, got {args.max_model_len}")
    rope = None
    if args.rope_scaling:
        from corral.loading import parse_rope_scaling

        rope = parse_rope_scaling(args.rope_scaling)
    kw = {"model": args.model, "dtype": args.dtype, "device": args.device,
          "chat_format": args.chat_format, "max_model_len": args.max_model_len,
          "rope_scaling": rope, **kernel_kwargs_from_args(args), **lora_kwargs_from_args(args),
          **parallel_kwargs_from_args(args)}
    if kw.get("lora_modules"):  # generate/chat/eval answer under the first adapter
        kw["default_lora"] = next(iter(kw["lora_modules"]))
    return kw
