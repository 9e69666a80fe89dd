"""Host time per decode step: what the engine spends outside the model forward.

    python benchmarks/step_overhead.py                    # tiny random Llama, batch 1/16/64/256
    python benchmarks/step_overhead.py --batches 64 --steps 50
    python benchmarks/step_overhead.py --vocab 49152 --sampling random --cpu-time

For each batch size, B requests decode together (all past their prompt); each timed step is split
into the model forward (the decoder stack plus the LM head, wrapped with a timer) and everything
else: scheduling, input building, sampling, detokenization, building the outputs. A tiny model
makes the forward cheap, so the host part is what a GPU would wait on. `--vocab` gives the tiny
model a real vocabulary (SmolLM2's 49,152, Llama 3's 128,256) so the costs that grow with it
show. `--cpu-time` times this thread's CPU time (with the default one thread, all the work runs
on it), which a busy shared machine blurs less than wall time. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hardware, percentiles


def tiny_model(folder: str, vocab: int = 256) -> str:
    """A tiny random Llama (the tests' config, `vocab` tokens) with SmolLM2's tokenizer (ids
    past its 49,152 decode to nothing), saved to `folder`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from corral.loading import resolve_source

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_source("default").folder).save_pretrained(folder)
    return folder


class ForwardTimer:
    """Wraps the model's forward and LM head, summing their wall time (synchronized on CUDA)."""

    def __init__(self, model, device: torch.device, clock=time.perf_counter):
        self.total = 0.0
        self.device = device
        self.clock = clock
        for name in ("forward", "compute_logits"):
            setattr(model, name, self._wrap(getattr(model, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            self._sync()
            t = self.clock()
            out = fn(*args, **kwargs)
            self._sync()
            self.total += self.clock() - t
            return out
        return timed

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(core, timer: ForwardTimer, batch: int, steps: int, params, clock) -> dict:
    for i in range(batch):
        core.add_request(f"r{batch}-{i}", [10 + (i * 7 + j) % 200 for j in range(8)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens
              for r in core.requests.values() for s in r.seqs):
        core.step()
    for _ in range(3):  # warm up the decode path at this batch size
        core.step()
    step_s, fwd_s = [], []
    for _ in range(steps):
        f0 = timer.total
        t = clock()
        outs = core.step()
        if core.device.type == "cuda":
            torch.cuda.synchronize(core.device)
        step_s.append(clock() - t)
        fwd_s.append(timer.total - f0)
        assert len(outs) == batch, "every request should decode each timed step"
    for rid in list(core.requests):
        core.abort(rid)
    host = [a - b for a, b in zip(step_s, fwd_s)]
    return {"batch": batch, "step_ms": percentiles([s * 1e3 for s in step_s]),
            "forward_ms": percentiles([s * 1e3 for s in fwd_s]),
            "host_ms": percentiles([s * 1e3 for s in host])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: a tiny random Llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    ap.add_argument("--sampling", choices=["greedy", "random"], default="greedy",
                    help="random: temperature 0.8, top-p 0.9, top-k 50, a seed per request")
    ap.add_argument("--vocab", type=int, default=256,
                    help="the tiny model's vocabulary (49152: SmolLM2's, 128256: Llama 3's)")
    ap.add_argument("--no-detokenize", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="this thread's CPU time instead of wall time (use with --threads 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: host timings not blurred by a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter

    from corral import SamplingParams
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(tmp, args.vocab)
        core = EngineCore(EngineConfig(model=model, device=args.device, max_model_len=1024,
                                       max_num_seqs=max(batches),
                                       max_num_batched_tokens=max(2048, 8 * max(batches)),
                                       num_kv_blocks=max(batches) * 8 + 8))
        timer = ForwardTimer(core.runner.model if core.runner.graphs is None else core.model,
                             core.device, clock)
        extra = ({"temperature": 0.8, "top_p": 0.9, "top_k": 50} if args.sampling == "random"
                 else {"temperature": 0.0})
        steps_needed = args.steps + 8
        rows = []
        for b in batches:
            params = SamplingParams(max_tokens=steps_needed, ignore_eos=True,
                                    detokenize=not args.no_detokenize,
                                    seed=1 if args.sampling == "random" else None, **extra)
            rows.append(measure(core, timer, b, args.steps, params, clock))
            r = rows[-1]
            print(f"batch {b:4d}: step {r['step_ms']['p50']:7.3f} ms  forward "
                  f"{r['forward_ms']['p50']:7.3f} ms  host {r['host_ms']['p50']:7.3f} ms "
                  f"(p50; host mean {r['host_ms']['mean']:.3f} ms)", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    vocab = core.model_config.vocab_size
    print(f"{args.sampling} sampling, vocab {vocab}, {torch.get_num_threads()} thread(s), "
          f"{'CPU' if args.cpu_time else 'wall'} time, load average {load}")
    print(json.dumps({"benchmark": "step_overhead", "device": args.device,
                      "sampling": args.sampling, "vocab": vocab, "cpu_time": args.cpu_time,
                      "load": load, "hardware": hardware(), "rows": rows}))


if __name__ == "__main__":
    main()
