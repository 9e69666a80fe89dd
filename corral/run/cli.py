"""`corral generate | chat | prompt | models`, plus the model and sampling flags other
subcommands share. Handlers only parse and delegate; heavy imports happen inside them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from corral.errors import CorralError
from corral.sampling_params import SamplingParams

DTYPES = ("auto", "float32", "bfloat16", "float16")


# --- shared flags ---------------------------------------------------------------------------

def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags; `sampling_params_from_args` turns them into SamplingParams."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate (default 256)")
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
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_format_arg(g)
    g.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR|JSON",
                   help='stretch the context, e.g. yarn:4 or \'{"rope_type": "linear", '
                        '"factor": 2}\'')
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length in tokens (default: the model's)")
    add_kernel_args(g)


def add_kernel_args(group) -> None:
    """Which weight/kernel paths the engine uses (shared by `corral serve`)."""
    group.add_argument("--no-gguf-kernels", action="store_true",
                       help="CPU: dequantize the .gguf once into a dense fp32 copy (cached "
                            "on disk) instead of running its memory-mapped blocks")
    group.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None,
                       help="CPU fp32 HF model: run on Q8_0/Q4_0 weights made at load (faster, "
                            "less memory, numerics change; no dense copy kept)")
    group.add_argument("--no-cuda-graphs", action="store_true",
                       help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")


def kernel_kwargs_from_args(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments for the `add_kernel_args` flags that were given."""
    kw = {}
    if args.no_cuda_graphs:
        kw["cuda_graphs"] = False
    if args.no_gguf_kernels:
        kw["gguf_kernels"] = False
    if args.quantize:
        kw["quantization"] = args.quantize
    return kw


def add_format_arg(parser) -> None:
    parser.add_argument("--format", default=None, metavar="NAME",
                        help="chat format: auto (the tokenizer's template), template, llama2, "
                             "llama3, chatml, human-assistant (alias llama2-chinese)")


def check_format_name(name: str | None) -> None:
    """Reject an unknown --format before any model is loaded."""
    if name and name.strip().lower() not in ("auto", "template"):
        from corral.chat import get_chat_format

        get_chat_format(name, None)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Keyword arguments for `LLM(...)` / `AsyncLLM(...)` from `add_model_args` flags."""
    check_format_name(args.format)
    if args.max_model_len is not None and args.max_model_len < 1:
        raise CorralError(f"--max-model-len must be positive, got {args.max_model_len}")
    rope = None
    if args.rope_scaling:
        from corral.loading import parse_rope_scaling

        rope = parse_rope_scaling(args.rope_scaling)
    return {"model": args.model, "dtype": args.dtype, "device": args.device,
            "chat_format": args.format, "max_model_len": args.max_model_len,
            "rope_scaling": rope, **kernel_kwargs_from_args(args)}


class AppendTurn(argparse.Action):
    """--system/--user/--assistant append (role, text) to one list, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        turns = list(getattr(namespace, self.dest, None) or [])
        turns.append({"role": option_string.lstrip("-"), "content": values})
        setattr(namespace, self.dest, turns)


# --- registration ---------------------------------------------------------------------------

def register(subparsers) -> None:
    """Add generate, chat, prompt and models to the `corral` parser."""
    p = subparsers.add_parser("generate", help="answer one prompt, streaming to stdout",
                              description="Answer PROMPT (in the model's chat format unless "
                                          "--raw), streaming the text to stdout.")
    p.add_argument("prompt", help='the prompt text, or "-" to read it from stdin')
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt text as is, without the chat format")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print model info and a stats line (tokens, tok/s, TTFT) to stderr")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="chat in the terminal",
                              description="A terminal chat. /system TEXT sets the system "
                                          "prompt, /reset forgets the conversation, /exit (or "
                                          "Ctrl-D) leaves; Ctrl-C stops the current answer.")
    p.add_argument("--system", default=None, help="initial system prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="stats line after each answer")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("prompt", help="show the exact prompt text (and ids) for a chat",
                              description="Print the exact text Corral sends for a "
                                          "conversation given by --system/--user/--assistant "
                                          "(in order) and/or --messages FILE.json. Needs only "
                                          "the tokenizer, not the weights.")
    for role in ("system", "user", "assistant"):
        p.add_argument(f"--{role}", dest="turns", action=AppendTurn, metavar="TEXT",
                       help=f"a {role} turn (repeatable; order is kept)")
    p.add_argument("--messages", type=Path, default=None, metavar="FILE.json",
                   help="a JSON list of {role, content}; --system/--user/... turns follow it")
    p.add_argument("--ids", action="store_true", help="also print the token ids (JSON line)")
    p.add_argument("--no-generation-prompt", action="store_true",
                   help="leave out the assistant header at the end (how tuning renders)")
    p.add_argument("--model", default="default", help="whose tokenizer/template to use")
    add_format_arg(p)
    p.set_defaults(func=cmd_prompt, turns=[])

    p = subparsers.add_parser("models", help="list aliases and known Llama families",
                              description="Aliases and known Llama families with weight "
                                          "memory per dtype and the smallest GPU that fits.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)


# --- handlers -------------------------------------------------------------------------------

def read_prompt(text: str) -> str:
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise CorralError("the prompt is empty")
    return text


def open_engine(args: argparse.Namespace):
    """An AsyncLLM from the model flags (imported here: loading torch is slow)."""
    kwargs = engine_kwargs_from_args(args)
    from corral import AsyncLLM

    start = time.perf_counter()
    engine = AsyncLLM(**kwargs)
    if getattr(args, "verbose", False):
        info = dict(engine.info, load_s=round(time.perf_counter() - start, 2))
        print(f"[{json.dumps(info, default=str)}]", file=sys.stderr, flush=True)
    return engine


def cmd_generate(args: argparse.Namespace) -> int:
    from corral.run.repl import stream_answer, write_stdout

    prompt = read_prompt(args.prompt)
    params = sampling_params_from_args(args)
    if args.raw and args.system:
        raise CorralError("--system has no effect with --raw")
    engine = open_engine(args)
    try:
        if args.raw:
            request: str | list[int] = prompt
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt})
            request = engine.encode_chat(messages)
            params = engine.chat_params(params)
        stats = asyncio.run(stream_answer(engine, request, params, write_stdout))
        write_stdout("\n")
        if args.verbose:
            print(stats.line(), file=sys.stderr, flush=True)
    finally:
        engine.shutdown()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from corral.run.repl import run_repl

    params = sampling_params_from_args(args)
    engine = open_engine(args)
    try:
        return run_repl(engine, params, system=args.system, verbose=args.verbose)
    finally:
        engine.shutdown()


def load_messages(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorralError(f"messages file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorralError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CorralError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise CorralError(f"{path} must hold a JSON list of {{role, content}} messages")
    return data


def cmd_prompt(args: argparse.Namespace) -> int:
    from corral.chat import encode_text, get_chat_format, validate_messages

    messages = (load_messages(args.messages) if args.messages else []) + list(args.turns)
    if not messages:
        raise CorralError("no conversation: give --user TEXT (and --system/--assistant) "
                          "or --messages FILE.json")
    validate_messages(messages)
    check_format_name(args.format)
    builtin = args.format and args.format.strip().lower() not in ("auto", "template")
    tokenizer = None
    if args.ids or not builtin:  # a built-in format renders without any model files
        from corral.loading import load_tokenizer, resolve_source

        tokenizer = load_tokenizer(resolve_source(args.model))
    fmt = get_chat_format(args.format, tokenizer)
    text = fmt.render(messages, add_generation_prompt=not args.no_generation_prompt)
    sys.stdout.write(text + "\n")
    if args.ids:
        if tokenizer is None:
            raise CorralError(f"{args.model} has no tokenizer, so there are no ids to show")
        print(json.dumps(encode_text(tokenizer, text)))
    return 0


def models_table() -> dict:
    """Aliases and known families as plain data (what --json prints)."""
    from corral.models import ALIASES, BYTES_PER_PARAM, KNOWN_FAMILIES, smallest_gpu, weight_gib

    aliases = {}
    for name, fn in ALIASES.items():
        try:
            aliases[name] = str(fn())
        except CorralError as e:
            aliases[name] = f"unavailable: {e}"
    families = []
    for f in KNOWN_FAMILIES:
        gib = {d: round(weight_gib(f.params_b, d), 2) for d in BYTES_PER_PARAM}
        families.append({"name": f.name, "hub_id": f.hub_id, "params_b": f.params_b,
                         "context": f.context, "chat_format": f.chat_format, "weights_gib": gib,
                         "smallest_gpu": {d: smallest_gpu(g) for d, g in gib.items()}})
    return {"aliases": aliases, "families": families}


def cmd_models(args: argparse.Namespace) -> int:
    data = models_table()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    aliases = Table(title="Aliases")
    aliases.add_column("alias")
    aliases.add_column("model file")
    for name, target in data["aliases"].items():
        aliases.add_row(name, target)
    console.print(aliases)
    dtypes = list(data["families"][0]["weights_gib"]) if data["families"] else []
    table = Table(title="Known Llama families (weights only; KV cache extra)")
    for col in ("model", "hub id"):
        table.add_column(col, no_wrap=True)
    for col in ("params", "context", "format"):
        table.add_column(col)
    for d in dtypes:
        table.add_column(f"{d} GiB", justify="right")
    table.add_column("GPU for bf16")
    table.add_column("GPU for int4")
    for f in data["families"]:
        table.add_row(f["name"], f["hub_id"], f"{f['params_b']:g}B", str(f["context"]),
                      f["chat_format"], *(f"{f['weights_gib'][d]:.2f}" for d in dtypes),
                      f["smallest_gpu"]["bf16"], f["smallest_gpu"]["int4"])
    console.print(table)
    return 0
