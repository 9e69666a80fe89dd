"""Multi-LoRA throughput: the throughput workload spread over 4 adapters vs the base alone,
same engine, same run.

    python benchmarks/lora_throughput.py                     # SmolLM2 on CPU, 32 requests
    python benchmarks/lora_throughput.py --num-requests 16 --output-len 16 48   # reduced

The adapters are random PEFT folders (rank --rank on all seven projections) written to a
temporary folder and loaded through the same path as `corral serve --lora`. Prints useful
output tokens/s for both, the ratio (target >= 0.8x), the adapter memory per rank, and one
JSON line. Prefix caching is off, so every run computes the same prompts (the runs repeat
the same workload, and cache hits left by one run would flatter the next). On a shared
machine wall time swings with the other load; the process CPU seconds per useful token
(also printed, with the load average) is the steadier comparison. With the GGUF kernels on
2 cores, run it with OMP_WAIT_POLICY=PASSIVE too: torch's and the kernels' OpenMP pools
otherwise spin against each other, which costs the adapters' extra torch ops most (README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import corral_run, hardware, make_workload

PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, config, rank: int, seed: int) -> None:
    """A PEFT-format LoRA folder with random A/B (what `corral tune` writes, untrained)."""
    from safetensors.torch import save_file

    from corral.model.lora import _part_shape

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(config.num_hidden_layers):
        for part in PARTS:
            kind = "self_attn" if part in PARTS[:4] else "mlp"
            key = f"base_model.model.model.layers.{i}.{kind}.{part}"
            in_f, out_f = _part_shape(config, part)
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.02
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PARTS),
         "bias": "none", "task_type": "CAUSAL_LM"}))


def timed_run(core, work, loras=None) -> dict:
    """corral_run plus the process CPU seconds it took (all threads)."""
    c0 = time.process_time()
    r = corral_run(core, work, loras)
    r["cpu_s"] = time.process_time() - c0
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    ap.add_argument("--num-adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="alternating base/adapter runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore
    from corral.loading import load_config, resolve_device, resolve_source
    from corral.model.lora import bytes_per_rank

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.num_requests or (256 if cuda else 32)
    plen = tuple(args.prompt_len or ((64, 1024) if cuda else (32, 256)))
    olen = tuple(args.output_len or ((64, 512) if cuda else (32, 128)))
    config = load_config(resolve_source(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"lora{i}" for i in range(args.num_adapters)]
        for i, name in enumerate(names):
            write_adapter(Path(tmp) / name, config, args.rank, seed=100 + i)
        t = time.perf_counter()
        core = EngineCore(EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype,
            max_model_len=plen[1] + olen[1] + 16, max_loras=args.num_adapters,
            max_lora_rank=args.rank, enable_prefix_caching=False,
            lora_modules={nm: str(Path(tmp) / nm) for nm in names}))
        load_s = time.perf_counter() - t
    vocab = core.model_config.vocab_size
    work = make_workload(n, plen, olen, vocab, args.seed)
    print(f"workload: {n} requests, prompts {plen[0]}-{plen[1]}, outputs {olen[0]}-{olen[1]} "
          f"({work.useful_tokens} useful output tokens); model {args.model} {core.info['dtype']} "
          f"on {device}; {args.num_adapters} adapters of rank {args.rank}; load {load_s:.1f}s")
    warm = make_workload(len(names), (8, 16), (4, 4), vocab, 99)
    corral_run(core, warm, names)  # warm-up: every adapter resident, kernels touched
    corral_run(core, warm)
    # base-only and adapters alternate, so drift on a shared machine hits both alike
    spread = [names[i % len(names)] for i in range(n)]
    base_runs, lora_runs = [], []
    load = [os.getloadavg()[0]]
    for _ in range(max(1, args.repeats)):
        base_runs.append(timed_run(core, work))
        lora_runs.append(timed_run(core, work, spread))
        load.append(os.getloadavg()[0])
    base = max(base_runs, key=lambda r: r["useful_tokens_per_s"])
    lora = max(lora_runs, key=lambda r: r["useful_tokens_per_s"])
    ratio = lora["useful_tokens_per_s"] / base["useful_tokens_per_s"]
    cpu_ratio = (min(r["cpu_s"] for r in base_runs) / min(r["cpu_s"] for r in lora_runs))
    per_rank = bytes_per_rank(core.model_config, core.dtype)
    resident = [a for a in core.lora.adapters.values()]
    actual = sum(a.nbytes for a in resident) / len(resident) / args.rank
    for label, r in (("base only", base), (f"{args.num_adapters} adapters", lora)):
        print(f"{label:>11}: {r['useful_tokens_per_s']:8.1f} useful tok/s  ({r['seconds']:.1f}s)  "
              f"TTFT p50 {r['ttft_s']['p50']:.2f}s  ITL p50 {r['itl_s']['p50'] * 1e3:.1f}ms")
    print(f"ratio adapters / base: {ratio:.2f}x wall (target >= 0.8x), {cpu_ratio:.2f}x by "
          f"process CPU time; runs: base {[round(r['useful_tokens_per_s'], 1) for r in base_runs]}"
          f", adapters {[round(r['useful_tokens_per_s'], 1) for r in lora_runs]} tok/s; "
          f"1-min load average {' -> '.join(f'{x:.1f}' for x in load)} "
          f"on {os.cpu_count()} cores")
    print(f"adapter memory per rank: {per_rank / 2**20:.2f} MiB (A+B of all 7 projections), "
          f"{actual / 2**20:.2f} MiB as held (fused q/k/v and gate/up B block-diagonal); "
          f"rank {args.rank}: {actual * args.rank / 2**20:.1f} MiB per adapter")
    print(json.dumps({"bench": "lora_throughput", "model": args.model, "device": str(device),
                      "dtype": core.info["dtype"], "requests": n, "prompt_len": plen,
                      "output_len": olen, "adapters": args.num_adapters, "rank": args.rank,
                      "base": base, "lora": lora, "ratio": ratio,
                      "cpu_ratio": cpu_ratio, "load_avg": load,
                      "bytes_per_rank": per_rank, "held_bytes_per_rank": actual,
                      "hardware": hardware()}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
