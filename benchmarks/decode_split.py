"""Where a decode step goes on a GGUF model, with the fused C decode step and layer by layer
(the baseline, same process, same requests): per part ms per step and the ratio.

    python benchmarks/decode_split.py                       # SmolLM2 GGUF, int8 math, 2 threads
    python benchmarks/decode_split.py --threads 1 --cpu-time
    python benchmarks/decode_split.py --batch 32            # 32 sequences decoding together
    python benchmarks/decode_split.py --no-fused            # the layer-by-layer path only
    python benchmarks/decode_split.py --math fp32 --model path/to/model.gguf

`--batch` requests (random `--prompt-len` prompts) are prefilled, then decode `--steps` tokens
each, once per path. Layer by layer, timers wrap the C kernel calls, the packed linear layers
(their Python included), attention (rotary, KV write, paged attention), the forward, the LM
head and the engine step; on the fused path, the one C call for all layers, the forward around
it (embedding, rope rows, the checks), the LM head and the engine. Prints ms per step per part
and the host load, and ends with one JSON line. Not part of `make test`. On a shared machine
run it with OMP_WAIT_POLICY=passive (README, the fused decode step): libgomp's idle threads
otherwise spin after every OpenMP region and take the cores the step needs.
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
        self.prefix = ""  # "head " while the LM head runs: its kernel calls are counted apart

    def wrap(self, name: str, fn, prefix: str | None = None):
        def timed(*args, **kwargs):
            key, outer = self.prefix + name, self.prefix
            if prefix is not None:
                self.prefix = prefix
            t = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[key] += self.clock() - t
                self.calls[key] += 1
                self.prefix = outer
        return timed

    def reset(self):
        self.total.clear()
        self.calls.clear()


def instrument(core, timers: Timers) -> None:
    """Wrap the kernel calls, the layers, attention, the forward and the LM head in timers."""
    from corral.model import fused_decode as fdm
    from corral.model import gguf_kernels as gk
    from corral.model import llama

    libs = {id(m.fast.lib): m.fast.lib for m in core.model.modules() if isinstance(m, gk.GGUFLinear)}
    for lib in libs.values():  # the C calls themselves
        for fn in ("gguf_gemm", "gguf_gemm_int", "gguf_dequant_rows"):
            setattr(lib, fn, timers.wrap("kernel", getattr(lib, fn)))
    for lib in fdm._libs.values():
        if lib is not None:
            lib.decode_step = timers.wrap("fused", lib.decode_step)
    gk.PackedLinear.__call__ = timers.wrap("linear", gk.PackedLinear.__call__)  # all layers
    for name in ("paged_attention", "write_kv", "apply_rope"):
        setattr(llama, name, timers.wrap("attention", getattr(llama, name)))
    core.model.forward = timers.wrap("forward", core.model.forward)
    core.model.compute_logits = timers.wrap("head", core.model.compute_logits, prefix="head ")


def run(core, timers: Timers, args, tag: str) -> dict:
    """Prefill `args.batch` requests, then time their decode steps; ms per step per part."""
    from corral import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = core.model_config.vocab_size
    # room for the tokens sequences prefilled early decode while later prompts prefill: every
    # timed step then holds the whole batch (stopping when the first one finished would time
    # shrinking batches)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 64, ignore_eos=True)
    for i in range(args.batch):
        prompt = torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist()
        core.add_request(f"{tag}{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in core.scheduler.running) \
            or core.scheduler.waiting:
        core.step()  # the prefills
    core.step()  # one warm decode step
    timers.reset()
    t0 = timers.clock()
    for _ in range(args.steps):
        assert len(core.scheduler.running) == args.batch, "a sequence finished early"
        t = timers.clock()
        core.step()
        timers.total["step"] += timers.clock() - t
    total = timers.clock() - t0
    steps = args.steps
    for i in range(args.batch):
        core.abort(f"{tag}{i}")
    while core.has_work():
        core.step()
    ms = {k: 1e3 * v / steps for k, v in timers.total.items()}
    head, fwd = ms.get("head", 0.0), ms.get("forward", 0.0)
    if "fused" in ms:
        split = {
            "fused C decode step (all layers, one call)": ms["fused"],
            "forward around it (embedding, rope rows, checks)": fwd - ms["fused"],
        }
    else:
        kernel, linear, attention = ms.get("kernel", 0.0), ms.get("linear", 0.0), \
            ms.get("attention", 0.0)
        split = {
            "matmul kernels (C)": kernel,
            "matmul Python (PackedLinear, ctypes)": linear - kernel,
            "attention (rope, KV write, paged attention)": attention,
            "rest of the forward (norms, SiLU, adds, embedding, modules)":
                fwd - linear - attention,
        }
    split["LM head (packed matmul + Python)"] = head
    split["engine outside the forward and head (schedule, sample, detokenize)"] = \
        ms["step"] - fwd - head
    return {"ms_per_step": ms["step"], "tok_s": steps * args.batch / total, "steps": steps,
            "split_ms": split,
            "calls_per_step": {k: v / steps for k, v in timers.calls.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--math", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-fused", action="store_true", help="only the layer-by-layer path")
    ap.add_argument("--cpu-time", action="store_true",
                    help="this thread's CPU time instead of wall time (with --threads 1 on a "
                         "shared machine: all the work then runs on this thread)")
    args = ap.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)

    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=args.model, gguf_math=args.math,
                                   max_model_len=args.prompt_len + args.steps + 72,
                                   max_num_seqs=max(args.batch, 1)))
    print(core.info["weights"], flush=True)
    fused = core.model.fused_decode
    if fused is None and not args.no_fused:
        sys.exit("this model has no fused decode step (see corral/model/fused_decode.py)")
    timers = Timers(clock)
    instrument(core, timers)
    results = {}
    for path in ([] if args.no_fused else ["fused"]) + ["layers"]:
        core.model.fused_decode = fused if path == "fused" else None
        results[path] = run(core, timers, args, path)
    if fused is not None and not args.no_fused:
        assert fused.steps > 0, "the fused path did not run"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.model} ({args.math}), batch {args.batch}, {args.threads} threads, "
          f"{hardware()['cpu']}, {'CPU' if args.cpu_time else 'wall'} time, load {load}")
    for path, r in results.items():
        name = "fused C decode step" if path == "fused" else "layer by layer (baseline)"
        print(f"{name}: {r['steps']} steps, {r['ms_per_step']:.2f} ms/step = "
              f"{r['tok_s']:.1f} tok/s")
        for k, v in r["split_ms"].items():
            print(f"  {k:66} {v:7.3f} ms  {100 * v / r['ms_per_step']:5.1f} %")
    ratio = None
    if "fused" in results:
        ratio = results["layers"]["ms_per_step"] / results["fused"]["ms_per_step"]
        print(f"speedup of the step: {ratio:.2f}x")
    print(json.dumps({"model": args.model, "math": args.math, "threads": args.threads,
                      "batch": args.batch, "cpu_time": args.cpu_time, "load": load,
                      "speedup": ratio, **results}))


if __name__ == "__main__":
    main()
