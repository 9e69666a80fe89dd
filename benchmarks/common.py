"""Shared pieces of the benchmarks: the seeded workload, hardware line, transformers baseline."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  vocab: int, seed: int = 0) -> Workload:
    """Random token prompts (ids away from the special tokens at both ends of the vocab)."""
    rng = random.Random(seed)
    lo, hi = min(100, vocab // 4), max(vocab - 100, vocab // 2)
    prompts = [[rng.randrange(lo, hi) for _ in range(rng.randint(*prompt_range))]
               for _ in range(n)]
    outs = [rng.randint(*output_range) for _ in range(n)]
    return Workload(prompts, outs)


def hardware() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not xs:
        return {f"p{p}": float("nan") for p in ps}
    xs = sorted(xs)
    out = {}
    for p in ps:
        k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
        out[f"p{p}"] = xs[k]
    out["mean"] = statistics.fmean(xs)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_hf(model: str, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM for the same model (random weights for random:NAME)."""
    from transformers import AutoModelForCausalLM

    from corral.loading import load_config, resolve_source

    src = resolve_source(model)
    if src.folder is None:
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(load_config(src), dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(src.folder, dtype=dtype)
    return m.to(device).eval()


class _Timer:
    """A `streamer` for transformers.generate: records when each new token arrives."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self._first = True

    def put(self, value):
        if self._first:  # the prompt
            self._first = False
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate_static(hf, work: Workload, batch_size: int, device: torch.device,
                       pad_id: int = 0, timed: bool = False) -> dict:
    """Static batches, left padding, every request in a batch generates the batch's longest
    output (no early exit). Useful tokens = the requested output lengths."""
    t0 = time.perf_counter()
    ttft, itl = [], []
    for start in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[start:start + batch_size]
        outs = work.output_lens[start:start + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        n = max(outs)
        streamer = _Timer(device) if timed else None
        tb = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=pad_id, streamer=streamer)
        sync(device)
        if streamer is not None and streamer.times:
            ttft.append(streamer.times[0] - tb)
            itl.extend(b - a for a, b in zip(streamer.times, streamer.times[1:]))
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "useful_tokens_per_s": work.useful_tokens / elapsed,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl)}


def corral_run(core, work: Workload, loras: list | None = None) -> dict:
    """Submit the whole workload at once to the engine; per-request TTFT and inter-token gaps.
    `loras`: the LoRA adapter (name or None) of each request."""
    from corral import SamplingParams

    t0 = time.perf_counter()
    start_wall = time.time()
    for i, (p, n) in enumerate(zip(work.prompts, work.output_lens)):
        core.add_request(f"b{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                    detokenize=False),
                         lora=loras[i] if loras else None)
    last: dict[str, float] = {}
    ttft, itl = [], []
    while core.has_work():
        outs = core.step()
        sync(core.device)
        now = time.perf_counter()
        for out in outs:
            if not out.outputs[0].delta_token_ids:
                continue
            if out.request_id not in last:
                ttft.append(time.time() - start_wall)
            else:
                itl.append(now - last[out.request_id])
            last[out.request_id] = now
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "useful_tokens_per_s": work.useful_tokens / elapsed,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl)}
