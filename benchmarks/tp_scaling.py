"""Tensor-parallel scaling: tokens/s, memory per rank and the collectives' share of a step.

    python benchmarks/tp_scaling.py                          # random:llama-300m, TP 1, 2, 4
    python benchmarks/tp_scaling.py --tp 1 2 --requests 16 --output-len 64
    python benchmarks/tp_scaling.py --model random:llama3-8b --device cuda --tp 1 2 4 8

For each TP size N the same seeded workload (B prompts, greedy, fixed output lengths) runs
through LLM(..., tensor_parallel_size=N) after a warm-up. Reported per N:

- tok/s: generated tokens / wall time of the whole batch (prefill + decode);
- decode ms/step: wall time of the steps that only decode, per step;
- collectives %: rank 0's time inside data collectives (all-reduce after o_proj, down_proj
  and the embedding, the logits gather, the step-input broadcast) / wall time. It includes
  time rank 0 waits there for a slower rank, so imbalance and oversubscription show up in it;
- weights/rank MiB: each rank's parameter bytes (its shard; norms are replicated);
- RSS/rank MiB: each process's resident memory (weights, KV cache, torch itself).

On the CPU every rank gets cores / N torch threads (engine.tp.threads_per_rank): with fewer
cores than ranks the processes share cores and TP cannot be faster; the figures then measure
the overhead, not a speed-up. A last row runs TP 1 again with one thread: on a loaded machine
multi-threaded matmuls lose much more to contention than single-threaded ranks do, and that
row separates the effect from tensor parallelism itself. The machine's load average is printed with the results because
other processes' load changes them. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hardware, make_workload


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def run_one(args, n: int, work, threads: int | None = None) -> dict:
    """One TP size; `threads` (TP 1 only) pins torch's thread count for the run."""
    import torch

    from corral.engine.tp import threads_per_rank

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        row = _measure(args, n, work)
    finally:
        torch.set_num_threads(before)
    row["threads_per_rank"] = threads or (threads_per_rank(n) if n > 1 else before)
    return row


def _measure(args, n: int, work) -> dict:
    from corral import LLM, SamplingParams

    kw = {"tensor_parallel_size": n, "device": args.device, "dtype": args.dtype,
          "max_num_seqs": max(len(work.prompts), 1), "num_kv_blocks": args.kv_blocks}
    start = time.perf_counter()
    with LLM(args.model, **kw) as llm:
        load_s = time.perf_counter() - start
        core = llm.core
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate([work.prompts[0][:8]], warm, use_tqdm=False)
        comm = core.tp.comm if core.tp is not None else None
        c0 = comm.seconds if comm is not None else 0.0
        calls0 = comm.calls if comm is not None else 0
        for i, (p, m) in enumerate(zip(work.prompts, work.output_lens)):
            core.add_request(f"b{i}", p, SamplingParams(temperature=0, max_tokens=m,
                                                        ignore_eos=True))
        decode_times, generated = [], 0
        t0 = time.perf_counter()
        while core.has_work():
            s0 = time.perf_counter()
            pure_decode = all(s.num_computed_tokens >= s.num_prompt_tokens
                              for s in core.scheduler.running) and not core.scheduler.waiting
            outs = core.step()
            if pure_decode and core.scheduler.running:
                decode_times.append(time.perf_counter() - s0)
            generated += sum(len(o.outputs[0].delta_token_ids) for o in outs)
        wall = time.perf_counter() - t0
        coll = (comm.seconds - c0) if comm is not None else 0.0
        calls = (comm.calls - calls0) if comm is not None else 0
        pids = [os.getpid()] + ([p.pid for p in core.tp.procs] if core.tp is not None else [])
        if core.tp is not None:
            weights = core.tp.rank_param_bytes
        else:
            weights = [sum(p.numel() * p.element_size() for p in core.model.parameters())]
        rss = [rss_mib(p) for p in pids]
    return {"tp": n, "load_s": round(load_s, 1), "tokens": generated, "wall_s": round(wall, 2),
            "tok_s": round(generated / wall, 2),
            "decode_ms_step": round(1000 * sum(decode_times) / max(len(decode_times), 1), 1),
            "collective_share": round(coll / wall, 3), "collective_calls": calls,
            "weights_mib_per_rank": [round(b / 2**20, 1) for b in weights],
            "rss_mib_per_rank": [round(r, 1) for r in rss]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-300m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-blocks", type=int, default=256)
    args = ap.parse_args()
    from corral.loading import load_config, resolve_source

    vocab = load_config(resolve_source(args.model)).vocab_size
    work = make_workload(args.requests, (args.prompt_len, args.prompt_len),
                         (args.output_len, args.output_len), vocab, seed=0)
    load_before = load_average()
    rows = [run_one(args, n, work) for n in args.tp]
    if 1 in args.tp and args.device == "cpu" and rows[0]["threads_per_rank"] > 1:
        # the same cores, one thread: shows how much of a TP gain is thread contention
        rows.append(run_one(args, 1, work, threads=1))
    print(f"model {args.model}, {args.requests} requests x {args.prompt_len} prompt + "
          f"{args.output_len} output tokens, {args.device}; load average {load_before} before, "
          f"{load_average()} after")
    print(f"{'TP':>3} {'thr/rank':>8} {'tok/s':>8} {'decode ms/step':>15} {'collectives':>12} "
          f"{'weights/rank MiB':>17} {'RSS/rank MiB':>20}")
    base = rows[0]["tok_s"]
    for r in rows:
        w = r["weights_mib_per_rank"]
        print(f"{r['tp']:>3} {r['threads_per_rank']:>8} {r['tok_s']:>8.1f} "
              f"{r['decode_ms_step']:>15.1f} {100 * r['collective_share']:>11.1f}% "
              f"{max(w):>17.1f} {max(r['rss_mib_per_rank']):>20.1f}"
              f"   ({r['tok_s'] / base:.2f}x TP {rows[0]['tp']})")
    print(json.dumps({"bench": "tp_scaling", "model": args.model, "hardware": hardware(),
                      "load_average": [load_before, load_average()], "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
