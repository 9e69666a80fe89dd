"""Single-stream latency: one request at a time, Corral vs transformers.generate, same run.

    python benchmarks/latency.py                 # SmolLM2 on CPU
    python benchmarks/latency.py --model random:llama3-8b --device cuda

Reports decode tokens/s (one stream), time-to-first-token and inter-token latency percentiles
for both, the ratio, the hardware, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    Workload,
    corral_run,
    hardware,
    hf_generate_static,
    load_hf,
    make_workload,
    percentiles,
)


def summarize(runs: list[dict]) -> dict:
    itl = [r["itl_s"]["mean"] for r in runs]
    ttft = [r["ttft_s"]["p50"] for r in runs]
    mean_itl = sum(itl) / len(itl)
    return {"decode_tokens_per_s": 1 / mean_itl, "ttft_s": percentiles(ttft),
            "itl_s": percentiles([r["itl_s"]["p50"] for r in runs]),
            "itl_p99_s": max(r["itl_s"]["p99"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-gguf-kernels", action="store_true",
                    help="decode on the dense fp32 weights of a .gguf model")
    ap.add_argument("--quantize", choices=["q8_0"], default=None,
                    help="CPU fp32 HF model: decode on Q8_0 weights quantized at load")
    args = ap.parse_args()

    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore
    from corral.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    t = time.perf_counter()
    core = EngineCore(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                   max_model_len=args.prompt_len + args.output_len + 16,
                                   gguf_kernels=not args.no_gguf_kernels,
                                   quantization=args.quantize))
    load_s = time.perf_counter() - t
    vocab = core.model_config.vocab_size
    work = make_workload(args.num_requests, (args.prompt_len,) * 2, (args.output_len,) * 2, vocab,
                         args.seed)
    singles = [Workload([p], [o]) for p, o in zip(work.prompts, work.output_lens)]
    corral_run(core, make_workload(1, (8, 8), (4, 4), vocab, 99))  # warm-up
    ours = summarize([corral_run(core, w) for w in singles])
    print(f"model {args.model} {core.info['dtype']} on {device}; corral load {load_s:.1f}s; "
          f"{args.num_requests} requests one at a time, prompt {args.prompt_len}, "
          f"output {args.output_len}; quantize {args.quantize}; weights: {core.info['weights']}")
    print(f"corral:       {ours['decode_tokens_per_s']:7.1f} tok/s single stream  "
          f"TTFT p50 {ours['ttft_s']['p50'] * 1e3:.0f}ms  ITL p50 "
          f"{ours['itl_s']['p50'] * 1e3:.1f}ms p99 {ours['itl_p99_s'] * 1e3:.1f}ms")
    result = {"bench": "latency", "model": args.model, "device": str(device),
              "dtype": core.info["dtype"], "quantize": args.quantize,
              "weights": core.info["weights"], "corral": ours, "hardware": hardware()}
    del core
    if not args.skip_hf:
        hf = load_hf(args.model, resolve_dtype(args.dtype, device), device)
        hf_generate_static(hf, make_workload(1, (8, 8), (4, 4), vocab, 99), 1, device)
        base = summarize([hf_generate_static(hf, w, 1, device, timed=True) for w in singles])
        ratio = ours["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"transformers: {base['decode_tokens_per_s']:7.1f} tok/s single stream  "
              f"TTFT p50 {base['ttft_s']['p50'] * 1e3:.0f}ms  ITL p50 "
              f"{base['itl_s']['p50'] * 1e3:.1f}ms p99 {base['itl_p99_s'] * 1e3:.1f}ms")
        print(f"ratio corral / transformers (single-stream decode): {ratio:.2f}x")
        result.update(transformers=base, ratio=ratio)
    print(json.dumps(result))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
