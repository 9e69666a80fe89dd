"""Where a single-stream decode step goes on a GGUF model: matmul kernels, the Python around
them, attention, the rest of the forward, and the engine outside the forward.

    python benchmarks/decode_split.py                       # SmolLM2 GGUF, int8 math
    python benchmarks/decode_split.py --math fp32 --steps 64
    python benchmarks/decode_split.py --model path/to/model.gguf --threads 2

One request (a `--prompt-len` random prompt) decodes `--steps` tokens; timers wrap the C kernel
calls, the packed linear layers (their Python included), attention (rotary, KV write, paged
attention), the model forward and the engine step. Prints ms per step per part and the host
load, and ends with one JSON line. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hardware


class Timers:
    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.total = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += self.clock() - t
                self.calls[name] += 1
        return timed

    def reset(self):
        self.total.clear()
        self.calls.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--math", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cpu-time", action="store_true",
                    help="this thread's CPU time instead of wall time (with --threads 1 on a "
                         "shared machine: all the work then runs on this thread)")
    args = ap.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)

    from corral import SamplingParams
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore
    from corral.model import gguf_kernels as gk
    from corral.model import llama

    core = EngineCore(EngineConfig(model=args.model, max_model_len=args.prompt_len + args.steps + 8,
                                   gguf_math=args.math))
    print(core.info["weights"], flush=True)
    timers = Timers(clock)
    libs = {id(m.fast.lib): m.fast.lib for m in core.model.modules() if isinstance(m, gk.GGUFLinear)}
    for lib in libs.values():  # the C calls themselves
        for fn in ("gguf_gemm", "gguf_gemm_int", "gguf_dequant_rows"):
            setattr(lib, fn, timers.wrap("kernel", getattr(lib, fn)))
    gk.PackedLinear.__call__ = timers.wrap("linear", gk.PackedLinear.__call__)  # all layers
    for name in ("paged_attention", "write_kv", "apply_rope"):
        setattr(llama, name, timers.wrap("attention", getattr(llama, name)))
    core.model.forward = timers.wrap("forward", core.model.forward)

    g = torch.Generator().manual_seed(0)
    vocab = core.model_config.vocab_size
    prompt = torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist()
    core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=args.steps + 1,
                                                 ignore_eos=True))
    core.step()  # the prefill
    core.step()  # one warm decode step
    timers.reset()
    steps, t0 = 0, clock()
    while core.has_work():
        t = clock()
        core.step()
        timers.total["step"] += clock() - t
        steps += 1
    wall = clock() - t0
    ms = {k: 1e3 * v / steps for k, v in timers.total.items()}
    split = {
        "matmul kernels (C)": ms.get("kernel", 0.0),
        "matmul Python (PackedLinear, ctypes)": ms.get("linear", 0.0) - ms.get("kernel", 0.0),
        "attention (rope, KV write, paged attention)": ms.get("attention", 0.0),
        "rest of the forward (norms, SiLU, adds, embedding, modules)":
            ms.get("forward", 0.0) - ms.get("linear", 0.0) - ms.get("attention", 0.0),
        "engine outside the forward (schedule, sample, detokenize)":
            ms.get("step", 0.0) - ms.get("forward", 0.0),
    }
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.model} ({args.math}), {args.threads} threads, {hardware()['cpu']}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, load {load}")
    print(f"decode: {steps} steps, {ms['step']:.2f} ms/step = {steps / wall:.1f} tok/s")
    for k, v in split.items():
        print(f"  {k:62} {v:7.3f} ms  {100 * v / ms['step']:5.1f} %")
    print(json.dumps({"model": args.model, "math": args.math, "threads": args.threads,
                      "cpu_time": args.cpu_time,
                      "load": load, "ms_per_step": ms["step"], "tok_s": steps / wall,
                      "split_ms": split, "calls_per_step": {k: v / steps for k, v in
                                                            timers.calls.items()}}))


if __name__ == "__main__":
    main()
