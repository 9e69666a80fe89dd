"""`corral eval` (run or resume an eval) and `corral eval compare RUN_A RUN_B`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from corral.errors import CorralError

DESCRIPTION = """Ask a question set to a local model (--model) or an OpenAI-compatible endpoint
(--endpoint) and score the answers: language adherence, empty/truncated/refusal rates, length,
accuracy (references or multiple choice by log-likelihood) and, with --judge, an LLM-as-judge
1-10 score. Writes answers.jsonl, summary.json, report.md and report.html into --output;
re-running into the same folder asks only what is missing.

Compare two runs (before/after tuning): corral eval compare RUN_A RUN_B [--output DIR]

Perplexity of a text file, chunked as llama.cpp's llama-perplexity does (non-overlapping
chunks of --context tokens, BOS first where the tokenizer adds one, the second half of each
chunk scored): corral eval --perplexity FILE --model MODEL [--context 512] [--chunks N]
[--json OUT]"""


def register(subparsers) -> None:
    """Add `eval` (with its `compare` form) to the `corral` parser."""
    from corral.cli_args import add_model_args, add_sampling_args

    p = subparsers.add_parser("eval", help="evaluate a model or endpoint on a question set",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare", nargs="*", metavar="compare RUN_A RUN_B",
                   help="compare two run folders instead of running an eval")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); "
                        "--model then names the served model (default: the first listed)")
    p.add_argument("--api-key", default=None, help="endpoint key (default $OPENAI_API_KEY)")
    p.add_argument("--questions", default="builtin:chat-zh-en", metavar="FILE|builtin:NAME",
                   help="JSONL question set (built-in: chat-zh-en, choice-mini)")
    p.add_argument("--output", type=Path, default=None, metavar="DIR",
                   help="run folder (required for a run; compare: default RUN_B/compare)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N questions")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt for each question")
    p.add_argument("--judge", default=None, metavar="MODEL|URL",
                   help="grade answers 1-10 with this local model or endpoint (MT-Bench prompt)")
    p.add_argument("--judge-model", default=None, metavar="NAME",
                   help="model name to request from a judge endpoint")
    p.add_argument("--judge-max-tokens", type=int, default=512, metavar="N",
                   help="most tokens for a judge's verdict (default 512)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="requests in flight against an endpoint (default 8)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="questions per batch (saved after each; default 32)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--perplexity", type=Path, default=None, metavar="FILE",
                   help="compute the model's perplexity on this UTF-8 text file instead")
    g.add_argument("--context", type=int, default=512, metavar="N",
                   help="tokens per chunk (llama-perplexity's -c; default 512)")
    g.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="score only the first N chunks (llama-perplexity's --chunks)")
    g.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write the result as JSON to this file ('-': stdout)")
    add_model_args(p)
    add_sampling_args(p)
    # Evals should be reproducible: greedy unless asked otherwise.
    p.set_defaults(func=cmd_eval, temperature=0.0)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.compare:
        return cmd_compare(args)
    if args.perplexity is not None:
        return cmd_perplexity(args)
    from corral.cli_args import engine_kwargs_from_args, sampling_params_from_args
    from corral.eval.backends import open_backend
    from corral.eval.data import load_questions
    from corral.eval.run import run_eval

    if args.output is None:
        raise CorralError("--output DIR is required")
    for flag in ("limit", "concurrency", "batch_size", "judge_max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CorralError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    questions = load_questions(args.questions, args.limit)
    params = sampling_params_from_args(args)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if args.endpoint:
        if args.lora:
            raise CorralError("--lora applies to a local model; with --endpoint pick the "
                              "server's adapter with --model NAME")
        served = args.model if args.model != "default" else None
        backend = open_backend(args.endpoint, endpoint=True, api_key=api_key,
                               endpoint_model=served, concurrency=args.concurrency)
    else:
        kwargs = engine_kwargs_from_args(args)
        backend = open_backend(kwargs.pop("model"), endpoint=False, engine_kwargs=kwargs)
    judge = None
    if args.judge:
        if not args.endpoint and args.judge == args.model and not args.lora:
            judge = backend  # one model in memory, not two (under --lora: the base judges)
        else:
            is_url = args.judge.startswith(("http://", "https://"))
            judge = open_backend(args.judge, endpoint=is_url, api_key=api_key,
                                 endpoint_model=args.judge_model, concurrency=args.concurrency,
                                 engine_kwargs={"dtype": args.dtype, "device": args.device})
    summary = run_eval(backend, questions, args.output, params, questions_spec=args.questions,
                       system=args.system, judge_backend=judge,
                       judge_max_tokens=args.judge_max_tokens, batch_size=args.batch_size)
    print_summary(summary)
    print(f"wrote {args.output}/answers.jsonl, summary.json, report.md, report.html")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    import json
    import sys

    from corral.cli_args import engine_kwargs_from_args
    from corral.engine.llm import LLM
    from corral.eval.perplexity import perplexity

    if args.context < 4:
        raise CorralError(f"--context must be at least 4, got {args.context}")
    if args.chunks is not None and args.chunks < 1:
        raise CorralError(f"--chunks must be at least 1, got {args.chunks}")
    try:
        text = args.perplexity.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorralError(f"cannot read {args.perplexity}: {e}") from None
    kwargs = engine_kwargs_from_args(args)
    if kwargs.get("max_model_len") is None:
        kwargs["max_model_len"] = args.context + 1  # a chunk plus the one token generate adds
    llm = LLM(**kwargs)
    log = sys.stderr if args.json is not None and str(args.json) == "-" else sys.stdout
    print(f"perplexity: {args.perplexity}, n_ctx={args.context}, model {args.model} "
          f"({llm.info.get('weights', '')})", file=log, flush=True)
    res = perplexity(llm, text, n_ctx=args.context, max_chunks=args.chunks,
                     batch=max(1, 2048 // args.context),
                     progress=lambda s: print(s, end="", file=log, flush=True))
    print(file=log)
    print(f"{res.chunks} chunks, {res.scored_tokens} tokens scored of {res.text_tokens}, "
          f"{res.seconds:.1f} s", file=log)
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.stderr:.5f}", file=log, flush=True)
    if args.json is not None:
        out = json.dumps({"file": str(args.perplexity), "model": args.model, **res.to_dict()})
        if str(args.json) == "-":
            print(out)
        else:
            args.json.write_text(out + "\n")
    return 0


def print_summary(summary: dict) -> None:
    from corral.eval.report import fmt

    keys = ["language_adherence", "stop_rate", "accuracy", "judge_score", "refusal_rate",
            "truncated_rate"]
    groups = {"overall": summary["overall"]} | summary["categories"]
    keys = [k for k in keys if any(g.get(k) is not None for g in groups.values())]
    print(f"{'category':<24}{'n':>4}" + "".join(f"{k:>20}" for k in keys))
    for name, g in groups.items():
        print(f"{name:<24}{g['n']:>4}" + "".join(f"{fmt(g.get(k), k):>20}" for k in keys))
    for line in summary.get("warnings", []):
        print(line)


def cmd_compare(args: argparse.Namespace) -> int:
    from corral.eval.compare import compare_runs

    if len(args.compare) != 3 or args.compare[0] != "compare":
        raise CorralError("usage: corral eval compare RUN_A RUN_B [--output DIR] "
                          f"(got unexpected arguments: {' '.join(args.compare)})")
    run_a, run_b = Path(args.compare[1]), Path(args.compare[2])
    out = args.output or run_b / "compare"
    cmp = compare_runs(run_a, run_b, out)
    from corral.eval.report import fmt

    keys = [("language_adherence", "adherence"), ("stop_rate", "stop rate")]
    print(f"{'category':<24}" + "".join(f"{f'{label} A':>14}{f'{label} B':>14}{'delta':>10}"
                                        for _, label in keys))
    for name, g in cmp["groups"].items():
        cells = []
        for key, _ in keys:
            m = g.get(key, {})
            d = m.get("delta")
            cells.append(f"{fmt(m.get('a'), key):>14}{fmt(m.get('b'), key):>14}"
                         f"{'' if d is None else f'{d:+.2f}':>10}")
        print(f"{name:<24}" + "".join(cells))
    print(f"wrote {out}/compare.json, compare.md, compare.html")
    return 0
