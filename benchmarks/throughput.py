"""Offline throughput: Corral's engine vs transformers.generate (static batches), same run.

    python benchmarks/throughput.py                       # SmolLM2 on CPU, 32 requests
    python benchmarks/throughput.py --model random:llama3-8b --device cuda   # CUDA defaults

Prints useful output tokens/s for both, the ratio, TTFT / inter-token latency percentiles, the
hardware, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Workload, corral_run, hardware, hf_generate_static, load_hf, make_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--hf-batch-size", type=int, help="static batch size for transformers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-num-requests", type=int,
                    help="run transformers on the workload's first N requests only (its tok/s "
                         "is compared; keeps a slow baseline inside a time budget)")
    args = ap.parse_args()

    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore
    from corral.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.num_requests or (256 if cuda else 32)
    plen = tuple(args.prompt_len or ((64, 1024) if cuda else (32, 256)))
    olen = tuple(args.output_len or ((64, 512) if cuda else (32, 128)))
    bsz = args.hf_batch_size or (64 if cuda else 32)

    t = time.perf_counter()
    core = EngineCore(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                   max_model_len=plen[1] + olen[1] + 16))
    load_s = time.perf_counter() - t
    work = make_workload(n, plen, olen, core.model_config.vocab_size, args.seed)
    print(f"workload: {n} requests, prompts {plen[0]}-{plen[1]}, outputs {olen[0]}-{olen[1]} "
          f"({work.useful_tokens} useful output tokens); model {args.model} "
          f"{core.info['dtype']} on {device}; corral load {load_s:.1f}s")
    corral_run(core, make_workload(2, (8, 16), (4, 4), core.model_config.vocab_size, 99))  # warm
    ours = corral_run(core, work)
    print(f"corral:       {ours['useful_tokens_per_s']:8.1f} useful tok/s  "
          f"({ours['seconds']:.1f}s)  TTFT p50 {ours['ttft_s']['p50']:.2f}s "
          f"p99 {ours['ttft_s']['p99']:.2f}s  ITL p50 {ours['itl_s']['p50'] * 1e3:.1f}ms "
          f"p99 {ours['itl_s']['p99'] * 1e3:.1f}ms")
    result = {"bench": "throughput", "model": args.model, "device": str(device),
              "dtype": core.info["dtype"], "requests": n, "prompt_len": plen, "output_len": olen,
              "corral": ours, "hardware": hardware()}
    del core
    if not args.skip_hf:
        hf = load_hf(args.model, resolve_dtype(args.dtype, device), device)
        hf_generate_static(hf, make_workload(2, (8, 16), (4, 4), hf.config.vocab_size, 99), 2,
                           device)  # warm-up
        sub = work
        if args.hf_num_requests and args.hf_num_requests < n:
            sub = Workload(work.prompts[:args.hf_num_requests],
                           work.output_lens[:args.hf_num_requests])
            print(f"transformers runs the first {args.hf_num_requests} of the {n} requests")
            result["hf_num_requests"] = args.hf_num_requests
        base = hf_generate_static(hf, sub, bsz, device, timed=True)
        ratio = ours["useful_tokens_per_s"] / base["useful_tokens_per_s"]
        print(f"transformers: {base['useful_tokens_per_s']:8.1f} useful tok/s  "
              f"({base['seconds']:.1f}s, static batches of {bsz}, left padding)  "
              f"TTFT p50 {base['ttft_s']['p50']:.2f}s  ITL p50 {base['itl_s']['p50'] * 1e3:.1f}ms")
        print(f"ratio corral / transformers: {ratio:.2f}x")
        result.update(transformers=base, hf_batch_size=bsz, ratio=ratio)
    print(json.dumps(result))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
