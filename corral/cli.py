"""`corral` entry point. Each subcommand lives with its feature and only parses, then delegates.

A feature module exposes `register(subparsers)`, which adds its subparser(s) and sets
`func=handler` on them. Modules are imported lazily so `corral --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from corral.errors import CorralError

# (module, subcommands it registers) — the module is imported only when needed.
COMMANDS: list[tuple[str, tuple[str, ...]]] = [
    ("corral.run.cli", ("generate", "chat", "prompt", "models")),
    ("corral.server.cli", ("serve",)),
    ("corral.tune.cli", ("tune", "merge")),
    ("corral.eval.cli", ("eval",)),
    ("corral.ui.cli", ("ui",)),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Run, serve, tune and evaluate Llama-family chat models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, names in COMMANDS:
        if only is not None and only not in names:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Start-up (torch, transformers, the model) leaves ~0.5M objects alive for the whole run,
    # and with the default thresholds the cyclic GC scans them all in ~6 full collections on
    # the way: ~0.5 s of a ~3.8 s `corral serve` start (SmolLM2, 2-core Zen 4). A full
    # collection now waits for 100 younger ones instead of 10; cyclic garbage is still
    # collected, a little later.
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)
    # Import only the module owning the requested subcommand (fast --help, fewer imports).
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {n for _, names in COMMANDS for n in names}
    parser = build_parser(first if first in known else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except CorralError as e:
        print(f"corral {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
