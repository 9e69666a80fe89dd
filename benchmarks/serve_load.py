"""Load test for `corral serve`: K concurrent streaming clients over loopback.

Runs the same workload in one run: offline through `LLM.generate` (the baselines: the engine's
default batch limit, and capped at K sequences like the clients), then through the real server
with K streaming `/v1/completions` clients. Prints requests/s, output
tokens/s, TTFT and inter-token latency p50/p99, failures, the served/offline throughput ratio,
and ends with one JSON line of those figures.

    python benchmarks/serve_load.py --concurrency 32 --requests 128 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time

import httpx


def prompts(n: int, token_ids: bool = False) -> list[str] | list[list[int]]:
    """Short story prompts; `token_ids`: 24-token id lists instead, ids 3..252 so any vocabulary
    takes them (random:NAME models have no tokenizer; the completions API takes token ids)."""
    if token_ids:
        return [[3 + (i * 31 + j * 7) % 250 for j in range(24)] for i in range(n)]
    topics = ["the sea", "a robot", "mountains", "a city at night", "an old library",
              "the first snow", "a lost key", "a long train ride"]
    return [f"Story {i}: write a short story about {topics[i % len(topics)]}." for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def offline(args, work: list[str], max_num_seqs: int | None = None) -> float:
    """Output tokens/s of the same workload through LLM.generate (the engine's default batch
    limit, or `max_num_seqs`)."""
    from corral import LLM, SamplingParams

    llm = LLM(model=args.model, **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}))
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    llm.generate(work[:2], params, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(work, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    del llm
    gc.collect()
    return tokens / elapsed


async def one(http: httpx.AsyncClient, url: str, prompt: str | list[int], args, stats: dict) -> None:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last, tokens = None, 0
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                stats["failed"] += 1
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"] or not chunk["choices"][0]["text"]:
                    continue
                now = time.perf_counter()
                if last is None:
                    stats["ttft"].append(now - start)
                else:
                    stats["itl"].append(now - last)
                last = now
        stats["tokens"] += tokens
        stats["ok"] += 1
    except httpx.HTTPError:
        stats["failed"] += 1


async def served(args, work: list[str], url: str) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0, "ok": 0, "failed": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for p in work:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one(http, url, work[0], args, {"ttft": [], "itl": [], "tokens": 0, "ok": 0,
                                             "failed": 0})  # warm-up

        async def worker():
            while not queue.empty():
                await one(http, url, queue.get_nowait(), args, stats)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        stats["elapsed"] = time.perf_counter() - t
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--token-prompts", action="store_true",
                    help="send token-id prompts (automatic for random:NAME models)")
    args = ap.parse_args()
    work = prompts(args.requests, token_ids=args.token_prompts or args.model.startswith("random:"))

    base = offline(args, work)
    print(f"offline LLM.generate: {base:.1f} output tok/s (engine defaults)")
    # The clients keep at most `concurrency` requests in flight, so the server's batches can't be
    # larger; the offline engine capped the same way isolates the serving overhead.
    same = offline(args, work, max_num_seqs=args.concurrency)
    print(f"offline LLM.generate, at most {args.concurrency} sequences: {same:.1f} output tok/s")
    if args.url:
        s = asyncio.run(served(args, work, args.url))
    else:
        from corral.server.launch import ServerProcess

        server_args = ["--model", args.model, "--max-concurrent-requests",
                       str(max(64, args.concurrency))]
        with ServerProcess(server_args) as srv:
            s = asyncio.run(served(args, work, srv.url))
    tok_s = s["tokens"] / s["elapsed"]
    result = {
        "concurrency": args.concurrency, "requests": args.requests,
        "max_tokens": args.max_tokens, "failed": s["failed"],
        "requests_per_s": round(s["ok"] / s["elapsed"], 3),
        "output_tokens_per_s": round(tok_s, 1),
        "ttft_p50_ms": round(pct(s["ttft"], 0.5) * 1000, 1),
        "ttft_p99_ms": round(pct(s["ttft"], 0.99) * 1000, 1),
        "itl_p50_ms": round(pct(s["itl"], 0.5) * 1000, 1),
        "itl_p99_ms": round(pct(s["itl"], 0.99) * 1000, 1),
        "offline_tokens_per_s": round(base, 1),
        "served_vs_offline": round(tok_s / base, 3),
        "offline_same_concurrency_tokens_per_s": round(same, 1),
        "served_vs_offline_same_concurrency": round(tok_s / same, 3),
    }
    print(f"served ({args.concurrency} streams): {result['requests_per_s']} req/s, "
          f"{result['output_tokens_per_s']} output tok/s, failed {s['failed']}")
    print(f"TTFT p50/p99: {result['ttft_p50_ms']}/{result['ttft_p99_ms']} ms; "
          f"ITL p50/p99: {result['itl_p50_ms']}/{result['itl_p99_ms']} ms "
          f"(mean {statistics.fmean(s['itl']) * 1000 if s['itl'] else float('nan'):.1f} ms)")
    print(f"served / offline throughput: {result['served_vs_offline']:.3f} (engine defaults), "
          f"{result['served_vs_offline_same_concurrency']:.3f} (same concurrency)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
