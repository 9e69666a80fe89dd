"""`corral generate | chat | prompt | models`. Their shared model and sampling flags are in
corral.cli_args. Handlers only parse and delegate; heavy imports happen inside them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

# The shared flags live in corral.cli_args; imported here too for older callers.
from corral.cli_args import (  # noqa: F401
    DTYPES,
    add_chat_format_arg,
    add_kernel_args,
    add_lora_args,
    add_model_args,
    add_sampling_args,
    check_chat_format,
    engine_kwargs_from_args,
    kernel_kwargs_from_args,
    lora_kwargs_from_args,
    parse_lora_specs,
    sampling_params_from_args,
)
from corral.errors import CorralError


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
    g = p.add_argument_group("structured output (one of)")
    g.add_argument("--json-schema", type=Path, default=None, metavar="FILE.json",
                   help="the answer is JSON matching this JSON schema")
    g.add_argument("--regex", default=None, help="the answer matches this regular expression")
    g.add_argument("--grammar", type=Path, default=None, metavar="FILE",
                   help="the answer follows this EBNF grammar (xgrammar/GBNF, root ::= ...)")
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
    add_chat_format_arg(p)
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
    structured = structured_from_args(args)
    if structured is not None:
        params = replace(params, structured=structured)
    engine = open_engine(args)
    try:
        if structured is not None:
            try:
                engine.core.compile_structured(params)
            except ValueError as e:
                raise CorralError(str(e)) from None
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


def structured_from_args(args: argparse.Namespace):
    """The StructuredOutput of --json-schema / --regex / --grammar, or None."""
    from corral.engine.structured import StructuredOutput, StructuredOutputError

    given = [f for f in ("json_schema", "regex", "grammar") if getattr(args, f, None)]
    if not given:
        return None
    if len(given) > 1:
        raise CorralError("give only one of --json-schema, --regex, --grammar")
    kind = given[0]
    value = getattr(args, kind)
    if kind != "regex":
        try:
            value = value.read_text()
        except OSError as e:
            raise CorralError(f"--{kind.replace('_', '-')} {value}: {e.strerror}") from None
    if kind == "json_schema":
        try:
            value = json.loads(value)
        except ValueError as e:
            raise CorralError(f"--json-schema {args.json_schema}: not valid JSON ({e})") from None
    try:
        return StructuredOutput(**{kind: value}, param=f"--{kind.replace('_', '-')}")
    except StructuredOutputError as e:
        raise CorralError(str(e)) from None


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
    check_chat_format(args.chat_format)
    from corral.chat import uses_specials

    builtin = args.chat_format and args.chat_format.strip().lower() not in ("auto", "template")
    tokenizer = None
    # chatml/llama3 render without any model files; llama2/human-assistant need the tokenizer
    # (their <s>/</s> become its own BOS/EOS when it has none)
    if args.ids or not builtin or uses_specials(args.chat_format):
        from corral.loading import load_tokenizer, resolve_source

        # a .gguf's tokenizer comes from its metadata: no dense copy just to render a prompt
        tokenizer = load_tokenizer(resolve_source(args.model, weights=False))
    fmt = get_chat_format(args.chat_format, tokenizer)
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
