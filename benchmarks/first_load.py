"""First load of a GGUF: process start -> engine ready, with Corral's metadata cache dropped.

    python benchmarks/first_load.py FILE.gguf [FILE.gguf ...] [--runs 3] [--threads 1]

Per file, fresh processes (the cache dropped before each): wall and CPU time from process
start to a ready EngineCore (imports included: what a user waits for), the same with the cache
kept (a later start), and peak RSS after a 16-token prefill + 4 decode steps (every weight page
read) beside the file size, the KV cache and the bare `python -c "import torch"` process.
Baseline in the same run: the metadata step as transformers does it for this file
(`LlamaConfig.get_config_dict` + `AutoTokenizer.from_pretrained` with gguf_file=, CPU time in
one process) against Corral's (`corral.gguf_metadata`: read once, same tables and converter).
Medians over --runs. Timings on a shared machine are noisy: compare CPU times, and the load
average printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, sys, time
c0 = time.process_time()
from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
core = EngineCore(EngineConfig(model=sys.argv[1], max_model_len=1024, num_kv_blocks=64))
ready_wall = time.time() - float(sys.argv[2])
ready_cpu = time.process_time()  # the process's CPU time since it started
core.add_request("r", list(range(100, 116)), SamplingParams(max_tokens=4, ignore_eos=True,
                                                             detokenize=False))
while core.has_work():
    core.step()
peak = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in core.runner.kv_cache)
print(json.dumps({"ready_wall_s": ready_wall, "ready_cpu_s": ready_cpu, "peak_rss": peak, "kv": kv}))
"""

META_TRANSFORMERS = r"""
import sys, time
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig
import transformers.integrations.gguf.gguf_tokenizer_mapping  # imports outside the timing
p = Path(sys.argv[1])
c = time.process_time()
LlamaConfig.get_config_dict(p.parent, gguf_file=p.name)
AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
print(time.process_time() - c)
"""

META_CORRAL = r"""
import sys, time
from pathlib import Path
from transformers import LlamaConfig, TokenizersBackend
import transformers.integrations.gguf.gguf_tokenizer_mapping  # imports outside the timing
from corral import gguf_metadata as gm
p = Path(sys.argv[1])
c = time.process_time()
meta, names = gm.read_metadata(p)
LlamaConfig.from_dict(gm.config_dict(meta, names, p.name))
gm.build_tokenizer(meta, str(p.parent))
print(time.process_time() - c)
"""

BARE_TORCH = r"""
import torch
print(next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")))
"""


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run(code: str, *args: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="corral-first-load-"))
    kernels = Path(os.environ.get("CORRAL_CACHE_DIR") or Path.home() / ".cache" / "corral")
    if (kernels / "kernels").is_dir():  # share the built kernel library
        (cache / "kernels").symlink_to(kernels / "kernels", target_is_directory=True)
    env = {**os.environ, "CORRAL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bare = int(run(BARE_TORCH, env=env))
    results = {}
    try:
        for path in args.files:
            first, later = [], []
            for _ in range(args.runs):
                shutil.rmtree(cache / "gguf-meta", ignore_errors=True)
                first.append(json.loads(run(PROBE, str(path), repr(time.time()), env=env)))
                later.append(json.loads(run(PROBE, str(path), repr(time.time()), env=env)))
            hf = [float(run(META_TRANSFORMERS, str(path), env=env)) for _ in range(args.runs)]
            ours = [float(run(META_CORRAL, str(path), env=env)) for _ in range(args.runs)]
            r = {"size": path.stat().st_size, "first_wall_s": med(first, "ready_wall_s"),
                 "first_cpu_s": med(first, "ready_cpu_s"),
                 "later_wall_s": med(later, "ready_wall_s"), "later_cpu_s": med(later, "ready_cpu_s"), "peak_rss": med(first, "peak_rss"),
                 "kv": first[0]["kv"], "bare_torch_rss": bare,
                 "meta_transformers_cpu_s": statistics.median(hf),
                 "meta_corral_cpu_s": statistics.median(ours)}
            r["meta_speedup"] = r["meta_transformers_cpu_s"] / r["meta_corral_cpu_s"]
            results[path.name] = r
            gib = 2**30
            print(f"{path.name} ({r['size'] / gib:.2f} GiB): first load {r['first_wall_s']:.2f} s "
                  f"wall / {r['first_cpu_s']:.2f} s CPU (process start -> ready), later "
                  f"{r['later_wall_s']:.2f} s / {r['later_cpu_s']:.2f} s CPU; metadata step "
                  f"{r['meta_corral_cpu_s']:.2f} s CPU vs transformers' "
                  f"{r['meta_transformers_cpu_s']:.2f} s ({r['meta_speedup']:.1f}x); peak RSS "
                  f"{r['peak_rss'] / gib:.2f} GiB = file {r['size'] / gib:.2f} + KV "
                  f"{r['kv'] / gib:.2f} + {(r['peak_rss'] - r['size'] - r['kv']) / gib:.2f} "
                  f"(bare `import torch` process: {bare / gib:.2f})", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({"benchmark": "first_load", "threads": args.threads, "runs": args.runs,
                      "load_avg": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()
