"""`--quantize` load time: `load_quantized` on an HF safetensors folder, per parameter.

    python benchmarks/quantize_load.py [--folder DIR] [--kinds q8_0,q4_0] [--threads 1,2]

Without --folder, a random bf16 Llama of ~250M parameters (hidden 1024, 12 layers, vocab 32000,
untied: ~500 MB) is saved to a temporary folder first. Per kind and thread count: CPU time and
wall time of the whole `load_quantized` (read, pack, build the model), in this process after
one warm-up load (imports and kernel builds outside the timing), median over --runs.
Baseline in the same run: the same load with the torch reference quantizer (`pack_file_rows`
without the library: what runs without a compiler, and what ran before the C quantizer), and
the ratio; then the quantizer alone (`pack` of an fp32 matrix in memory, C against torch). Timings on a shared machine are noisy (OpenMP and thread pools suffer most when
another job holds the cores): compare CPU times, and the load average printed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from corral.loading import ModelSource, load_config, safetensors_index
from corral.model import gguf_kernels as gk
from corral.model import quantize


def make_folder(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def timed_load(folder: Path, config, kind: str, runs: int) -> tuple[float, float]:
    """Median (CPU s, wall s) of `load_quantized` over `runs` loads."""
    cpu, wall = [], []
    for _ in range(runs):
        c, w = time.process_time(), time.perf_counter()
        model, _ = quantize.load_quantized(folder, config, kind, max_len=128)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
        del model
    return statistics.median(cpu), statistics.median(wall)


def quantizer_only(kind: str, runs: int) -> tuple[float, float]:
    """CPU s per parameter of packing an in-memory fp32 [4096, 4096] matrix: (C, torch)."""
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    lib = gk.load_library()
    out = []
    for how in (lib, None):
        times = []
        for _ in range(runs):
            c = time.process_time()
            quantize.pack(w, kind, how)
            times.append(time.process_time() - c)
        out.append(statistics.median(times) / w.numel())
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--kinds", default="q8_0,q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-runs", type=int, default=1)
    args = ap.parse_args()

    tmp = None
    folder = args.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="corral-quant-bench-")
        folder = Path(tmp.name)
        make_folder(folder)
    config = load_config(ModelSource("bench", folder))
    index = safetensors_index(folder)
    params = sum(torch.Size(e[2]).numel() for e in index.values())
    dtypes = sorted({e[1] for e in index.values()})
    if gk.load_library() is None:
        sys.exit("the kernel library did not build: nothing to compare")
    quantize.load_quantized(folder, config, "q8_0", max_len=128)  # warm-up: imports, builds

    c_pack = quantize.pack_file_rows

    def torch_pack(entries, kind, lib=None):  # the reference quantizer, as without a compiler
        return c_pack(entries, kind)

    print(f"{folder}: {params / 1e6:.0f}M parameters ({', '.join(dtypes)}), "
          f"isa {gk.load_library().gguf_isa().decode()}")
    print(f"{'kind':6} {'threads':>7} {'C cpu ns/param':>15} {'wall':>7} "
          f"{'torch cpu ns/param':>19} {'wall':>7} {'cpu ratio':>9} {'wall ratio':>10}")
    for kind in args.kinds.split(","):
        for nt in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(nt)
            cpu, wall = timed_load(folder, config, kind, args.runs)
            quantize.pack_file_rows = torch_pack
            try:
                base_cpu, base_wall = timed_load(folder, config, kind, args.baseline_runs)
            finally:
                quantize.pack_file_rows = c_pack
            ns = 1e9 / params
            print(f"{kind:6} {nt:>7} {cpu * ns:>15.2f} {wall * ns:>7.2f} {base_cpu * ns:>19.2f} "
                  f"{base_wall * ns:>7.2f} {base_cpu / cpu:>8.1f}x {base_wall / wall:>9.1f}x",
                  flush=True)
            c, t = quantizer_only(kind, args.runs)
            print(f"{'':14} quantizer alone (fp32 in memory): C {c * 1e9:.2f}, torch "
                  f"{t * 1e9:.2f} CPU ns/param, {t / c:.0f}x", flush=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs); C: median of {args.runs}, torch: of {args.baseline_runs}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
