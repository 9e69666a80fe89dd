"""Microbenchmark of the GGUF matmul kernels: int8-activation path vs the fp32-dequant path vs
torch's fp32 GEMM on the dense weight, per type and shape, for one forced SIMD variant.

    python benchmarks/gguf_kernels_bench.py --variant avx2 --threads 2
    python benchmarks/gguf_kernels_bench.py --variant avx512vnni --types Q4_K,Q8_0 --shapes smollm2
    python benchmarks/gguf_kernels_bench.py --cpu-time --threads 1   # per-core CPU time (busy host)

Decode: one token, ms per matmul and GB/s of weight bytes read. Prefill: `--prefill` tokens
(512), GFLOP/s. Each figure is the best of `--reps` runs; `--cpu-time` reports the thread's CPU
time instead of wall time (use with --threads 1 on a shared machine). Prints the host load
(`/proc/loadavg`) with the figures and ends with one JSON line. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hardware

from corral.model import gguf_kernels as gk

SHAPES = {  # name -> [(label, K, N)]
    "smollm2": [("qkv", 576, 1536), ("gate_up", 576, 3072), ("down", 1536, 576),
                ("lm_head", 576, 49152)],
    "llama1b": [("qkv", 2048, 3072), ("gate_up", 2048, 16384), ("down", 8192, 2048)],
}
TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_rows(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """Random valid rows of a block type with small fp16 scales (as tests/unit does)."""
    rng = np.random.default_rng(seed)
    _, per_block, block_bytes = gk.TYPES[gk.TYPE_IDS[kind]]
    raw = rng.integers(0, 256, (n, k // per_block, block_bytes), dtype=np.uint8)
    at = 208 if kind == "Q6_K" else 0
    raw[:, :, at:at + 2] = rng.normal(0, 0.01, (n, k // per_block, 1)).astype(np.float16) \
        .view(np.uint8)
    if kind in ("Q4_1", "Q4_K", "Q5_K"):
        raw[:, :, 2:4] = rng.normal(0, 0.01, (n, k // per_block, 1)).astype(np.float16) \
            .view(np.uint8)
    return raw.reshape(n, -1)


def best(fn, reps: int, cpu: bool) -> float:
    clock = time.thread_time if cpu else time.perf_counter
    fn()  # warm: pages, caches, the library's first call
    out = float("inf")
    for _ in range(reps):
        t = clock()
        fn()
        out = min(out, clock() - t)
    return out


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default=None, help="avx512vnni|avx512|avx2|portable|native "
                                                    "(default: the CPU's fastest)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default="smollm2,llama1b")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--no-fp32-path", action="store_true", help="skip the old fp32-dequant path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variant = args.variant or gk.cpu_variants()[0]
    if variant not in gk.cpu_variants():
        sys.exit(f"variant {variant} does not run on this CPU ({gk.cpu_variants()})")
    lib = gk.load_library(variant)
    if lib is None:
        sys.exit(f"the {variant} kernels did not build")
    nt = args.threads
    print(f"variant {lib.gguf_isa().decode()}, {nt} threads, {hardware()['cpu']}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, load {loadavg()}", flush=True)
    print(f"{'type':5} {'shape':13} | decode ms: int8  fp32  torch | GB/s int8 | "
          f"prefill {args.prefill} GFLOP/s: int8  fp32  torch")
    rows = []
    g = torch.Generator().manual_seed(0)
    for kind in args.types.split(","):
        for shape in args.shapes.split(","):
            for label, k, n in SHAPES[shape]:
                if k % gk.TYPES[gk.TYPE_IDS[kind]][1]:
                    continue  # rows must hold whole blocks (llama.cpp picks another type)
                w = gk.PackedWeight.from_rows(kind, random_rows(kind, n, k, seed=k + n))
                dense = gk.gguf_dequantize(lib, w)
                x1 = torch.randn(1, k, generator=g)
                xp = torch.randn(args.prefill, k, generator=g)
                flops = 2 * args.prefill * n * k
                res = {"type": kind, "shape": f"{shape}.{label}", "k": k, "n": n,
                       "weight_mb": w.nbytes / 1e6}
                paths = {"int8": lambda x, w=w: gk.gguf_matmul(lib, x, w, nt, math="int8"),
                         "torch": lambda x, d=dense: torch.nn.functional.linear(x, d)}
                if not args.no_fp32_path:
                    paths["fp32"] = lambda x, w=w: gk.gguf_matmul(lib, x, w, nt, math="fp32")
                for name, fn in paths.items():
                    res[f"decode_ms_{name}"] = 1e3 * best(lambda f=fn, x=x1: f(x), 4 * args.reps,
                                                          args.cpu_time)
                    big_reps = max(1, args.reps // 2)
                    res[f"prefill_gflops_{name}"] = flops / best(lambda f=fn, x=xp: f(x), big_reps,
                                                                 args.cpu_time) / 1e9
                res["decode_gbs_int8"] = w.nbytes / res["decode_ms_int8"] / 1e6
                rows.append(res)

                def f(key: str, fmt: str = "6.2f", res=res) -> str:
                    return format(res[key], fmt) if key in res else "     -"
                print(f"{kind:5} {res['shape']:13} |          {f('decode_ms_int8')} "
                      f"{f('decode_ms_fp32')} {f('decode_ms_torch')} | {f('decode_gbs_int8', '5.1f')}"
                      f"     |                    {f('prefill_gflops_int8', '6.1f')} "
                      f"{f('prefill_gflops_fp32', '6.1f')} {f('prefill_gflops_torch', '6.1f')}",
                      flush=True)
    print(json.dumps({"variant": variant, "threads": nt, "cpu_time": args.cpu_time,
                      "load_end": loadavg(), "hardware": hardware(), "rows": rows}))


if __name__ == "__main__":
    main()
