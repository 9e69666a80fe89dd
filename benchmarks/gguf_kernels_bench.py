"""Microbenchmark of the GGUF matmul kernels: int8-activation path vs the fp32-dequant path vs
torch's fp32 GEMM on the dense weight, per type and shape, for one forced SIMD variant; with
`--against OLD.c`, also the int8 path of another version of csrc/gguf_gemm.c built with the same
flags (a before/after in one run) and the ratio new/old.

    python benchmarks/gguf_kernels_bench.py --variant avx2 --threads 2
    python benchmarks/gguf_kernels_bench.py --variant avx512vnni --types Q4_K,Q8_0 --shapes smollm2
    python benchmarks/gguf_kernels_bench.py --cpu-time --threads 1   # per-core CPU time (busy host)
    git show main:corral/model/csrc/gguf_gemm.c > /tmp/old.c
    python benchmarks/gguf_kernels_bench.py --cpu-time --threads 1 --against /tmp/old.c --no-torch

Decode: one token (`--decode-rows` tokens), ms per matmul and GB/s of weight bytes read;
`--cold MB` cycles through copies of the weight totalling MB so they come from DRAM, not from
the cache, as a real model's do. Prefill: `--prefill` tokens (512), GFLOP/s. Each figure is the
best of `--reps` runs; `--cpu-time` reports the thread's CPU time instead of wall time (use with
--threads 1 on a shared machine). Prints the host load (`/proc/loadavg`) with the figures and
ends with one JSON line. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import subprocess
import sys
import tempfile
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
    "llama1b_head": [("lm_head", 2048, 128256)],  # Q6_K in Q4_K_M files: ~215 MB
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


def build_other(src: str, variant: str) -> ctypes.CDLL:
    """Another gguf_gemm.c built with the variant's flags (only gguf_gemm_int is called)."""
    out = os.path.join(tempfile.mkdtemp(prefix="gguf_bench_"), "other.so")
    cmd = [gk.find_compiler() or "gcc", *gk.COMMON_CFLAGS, *gk.VARIANT_CFLAGS[variant],
           "-o", out, src]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(out)
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.gguf_gemm_int.argtypes = [i32, p, i32, i32, p, p, i32, p, i32, i32]
    lib.gguf_gemm_int.restype = i32
    return lib


def copies(w: gk.PackedWeight, total_mb: float) -> list[gk.PackedWeight]:
    """Enough copies of w (distinct memory) to total `total_mb`, for DRAM-bound decode."""
    n = max(1, int(total_mb * 1e6 // w.nbytes))
    rows = np.ascontiguousarray(w.base).reshape(w.n, -1)
    big = np.concatenate([rows] * n)
    return [gk.PackedWeight.from_rows(w.kind, big[i * w.n:(i + 1) * w.n]) for i in range(n)]


def cols(res: dict, prefix: str, names: list[str], ratio: bool) -> str:
    """The row's figures for `prefix` ("decode_gbs", "prefill_gflops") per path, and new/old."""
    keys = [f"{prefix}_{n}" for n in names] + ([f"{prefix.split('_')[0]}_ratio"] if ratio else [])
    return " ".join(format(res[key], "6.2f" if key.endswith("ratio") else "6.1f")
                    if key in res else "     -" for key in keys)


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
    ap.add_argument("--variant", default=None, help="avx512vnni|avx512|avxvnni|avx2|portable|"
                                                    "neondot|neon|native (default: the CPU's fastest)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default="smollm2,llama1b", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode-rows", type=int, default=1, help="tokens per decode step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--cold", type=float, default=0, metavar="MB",
                    help="decode cycles through copies of the weight totalling MB (0: one copy)")
    ap.add_argument("--against", default=None, metavar="SRC.c",
                    help="also time the int8 path of this gguf_gemm.c (the baseline)")
    ap.add_argument("--no-fp32-path", action="store_true", help="skip the old fp32-dequant path")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's dense GEMM")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--repack", action="store_true",
                    help="also time the int8 path on the weights repacked as a model load does "
                         "(column rp; types the build does not repack show -)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variant = args.variant or gk.cpu_variants()[0]
    if variant not in gk.cpu_variants():
        sys.exit(f"variant {variant} does not run on this CPU ({gk.cpu_variants()})")
    lib = gk.load_library(variant)
    if lib is None:
        sys.exit(f"the {variant} kernels did not build")
    other = build_other(args.against, variant) if args.against else None
    nt = args.threads
    print(f"variant {lib.gguf_isa().decode()}, {nt} threads, {hardware()['cpu']}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, load {loadavg()}, decode "
          f"{args.decode_rows} token(s){f', cold {args.cold:.0f} MB' if args.cold else ''}",
          flush=True)
    names = ["int8"] + (["rp"] if args.repack else []) + (["old"] if other else []) + ([] if args.no_fp32_path else ["fp32"]) \
        + ([] if args.no_torch else ["torch"])
    print(f"{'type':5} {'shape':20} | decode GB/s: {' '.join(f'{n:>6}' for n in names)}"
          f"{'  ratio' if other else ''} | prefill {args.prefill} GFLOP/s: "
          f"{' '.join(f'{n:>6}' for n in names)}{'  ratio' if other else ''}")
    rows = []
    g = torch.Generator().manual_seed(0)
    for kind in args.types.split(","):
        for shape in args.shapes.split(","):
            for label, k, n in SHAPES[shape]:
                if k % gk.TYPES[gk.TYPE_IDS[kind]][1]:
                    continue  # rows must hold whole blocks (llama.cpp picks another type)
                w = gk.PackedWeight.from_rows(kind, random_rows(kind, n, k, seed=k + n))
                ws = copies(w, args.cold) if args.cold else [w]
                cycle = itertools.cycle(ws)
                x1 = torch.randn(args.decode_rows, k, generator=g)
                xp = torch.randn(args.prefill, k, generator=g)
                flops = 2 * args.prefill * n * k
                res = {"type": kind, "shape": f"{shape}.{label}", "k": k, "n": n,
                       "weight_mb": w.nbytes / 1e6}

                def old(x, w):
                    y = torch.empty(x.shape[0], w.n)
                    rc = other.gguf_gemm_int(w.type_id, x.data_ptr(), x.shape[0], w.k, w.base_ptr,
                                             w.offsets_ptr, w.n, y.data_ptr(), w.n, nt)
                    assert rc == 0
                    return y

                paths = {"int8": lambda x, w: gk.gguf_matmul(lib, x, w, nt, math="int8")}
                if args.repack:
                    rps = [gk.PackedWeight(c.type_id, c.base, c.offsets, c.n, c.k) for c in ws]
                    if all(gk.repack(lib, c, nt) for c in rps):
                        rp_cycle = itertools.cycle(rps)
                        paths["rp"] = lambda x, w, c=rp_cycle: gk.gguf_matmul(lib, x, next(c),
                                                                              nt, math="int8")
                if other:
                    paths["old"] = old
                if not args.no_fp32_path:
                    paths["fp32"] = lambda x, w: gk.gguf_matmul(lib, x, w, nt, math="fp32")
                if not args.no_torch:
                    dense = gk.gguf_dequantize(lib, w)
                    paths["torch"] = lambda x, w, d=dense: torch.nn.functional.linear(x, d)
                for name, fn in paths.items():
                    cyc = cycle if name != "torch" else itertools.repeat(w)
                    sec = best(lambda f=fn, c=cyc, x=x1: f(x, next(c)), 4 * args.reps,
                               args.cpu_time)
                    res[f"decode_gbs_{name}"] = w.nbytes / sec / 1e9
                    if not args.no_prefill:
                        sec = best(lambda f=fn, x=xp, w=w: f(x, w), max(1, args.reps // 2),
                                   args.cpu_time)
                        res[f"prefill_gflops_{name}"] = flops / sec / 1e9
                if other:
                    res["decode_ratio"] = res["decode_gbs_int8"] / res["decode_gbs_old"]
                    if not args.no_prefill:
                        res["prefill_ratio"] = res["prefill_gflops_int8"] / res["prefill_gflops_old"]
                rows.append(res)
                print(f"{kind:5} {res['shape']:20} | decode GB/s: "
                      f"{cols(res, 'decode_gbs', names, bool(other))} | prefill GFLOP/s: "
                      f"{cols(res, 'prefill_gflops', names, bool(other))}", flush=True)
    print(json.dumps({"variant": variant, "threads": nt, "cpu_time": args.cpu_time,
                      "decode_rows": args.decode_rows, "cold_mb": args.cold,
                      "against": args.against, "load_end": loadavg(), "hardware": hardware(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
