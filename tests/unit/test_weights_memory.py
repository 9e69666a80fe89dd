"""Quantized weights stay quantized in memory and on disk, measured in a fresh process:

- a .gguf (Q4_K_M-like type mix, Q8_0 embeddings) loads memory-mapped: peak RSS grows by less
  than file size x 1.3 + KV cache over the imports' baseline, and the cache folder gets only the
  config and tokenizer (no dense safetensors copy);
- an HF safetensors folder with `--quantize q8_0` / `q4_0`: once loaded, resident memory is
  the packed weights, not the dense fp32 copy they were made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.model import gguf_kernels as gk

# Runs in the child: the baseline is taken after the imports, with VmHWM reset to the current
# RSS. (Loading runs no meta-device op: the first one would import torch._dynamo, ~90 MB.)
PRELUDE = """
import json, sys, time, torch, transformers
import corral.engine.core as c, corral.loading, corral.model.llama, transformers.modeling_rope_utils
from corral import SamplingParams
from corral.engine.config import EngineConfig
from transformers import PreTrainedTokenizerFast, LlamaConfig
def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key))
    return int(line.split()[1]) * 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
def kv_bytes(core):
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
               for k, v in core.runner.kv_cache)
def generate(core, n=3):
    core.add_request("r", list(range(100, 120)), SamplingParams(max_tokens=n, ignore_eos=True))
    while core.has_work():
        core.step()
"""

SLACK = 64 * 2**20  # tokenizer (~50 MiB for SmolLM2's), small buffers


def run_child(code: str, env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {}),
           "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def tree_bytes(root: Path, skip: str = "kernels") -> dict[str, int]:
    """Size of every file under root (relative path -> bytes), the kernel builds left out."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] != skip}


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """~40 MB: a Q4_K_M-like mix (Q4_K, Q6_K for attn_v/ffn_down/output) with Q8_0
    embeddings; dense fp32 it would be ~6x that."""
    from corral.model.gguf_write import write_llama_gguf

    def types(name: str) -> str:
        if "attn_v" in name or "ffn_down" in name or name == "output.weight":
            return "Q6_K"
        return "Q8_0" if "token_embd" in name else "Q4_K"

    path = tmp_path_factory.mktemp("mem") / "mixed.gguf"
    return write_llama_gguf(path, hidden=512, intermediate=2048, layers=6, heads=8, kv_heads=4,
                            types=types, tie=False, seed=4)


@pytest.fixture()
def fresh_cache(tmp_path):
    """An empty CORRAL_CACHE_DIR that shares the already-built kernel library."""
    from corral.loading import cache_root
    from corral.model import gguf_kernels as gk

    assert gk.load_library() is not None, "the GGUF kernel library did not build"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernels").symlink_to(cache_root() / "kernels", target_is_directory=True)
    return cache


def test_gguf_load_rss_and_cache_stay_small(mixed_file, fresh_cache):
    res = run_child(f"""
path = {str(mixed_file)!r}
t0 = time.perf_counter()
src = corral.loading.resolve_source(path, weights=False)  # config + tokenizer metadata
t1 = time.perf_counter()
reset_peak()
base = status("VmHWM")
core = c.EngineCore(EngineConfig(model=path, max_model_len=128, kv_cache_memory_gb=0.02))
t2 = time.perf_counter()
generate(core)
print(json.dumps({{"base": base, "peak": status("VmHWM"), "kv": kv_bytes(core),
                  "meta_s": t1 - t0, "load_s": t2 - t1, "weights": core.info["weights"],
                  "dynamo": "torch._dynamo" in sys.modules}}))
""", {"CORRAL_CACHE_DIR": str(fresh_cache)})
    size = mixed_file.stat().st_size
    assert "memory-mapped" in res["weights"] and "no dense copy" in res["weights"]
    assert not res["dynamo"]  # a meta-device op at load: ~1 s and ~90 MB
    grown = res["peak"] - res["base"]
    assert grown > 0.8 * size  # every weight page was read (the file is resident) ...
    assert grown < size * 1.3 + res["kv"] + SLACK, (grown / 2**20, size / 2**20)  # ... once
    files = tree_bytes(fresh_cache)
    assert files, "no metadata cached"
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".gguf"))], files
    assert all(f.startswith("gguf-meta/") for f in files), files
    assert "config.json" in {Path(f).name for f in files}
    assert sum(files.values()) < 16 * 2**20, files  # SmolLM2's tokenizer.json is ~2 MB


@pytest.fixture(scope="module")
def hf_folder(request, tmp_path_factory, default_folder):
    """A random fp32 HF Llama (~290-390 MB of safetensors: a dense copy must stand out from
    the tokenizer's ~50 MiB and allocator slack) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_model, tiny_config

    path = tmp_path_factory.mktemp("hf-quant")
    cfg = tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=49152,
                      max_position_embeddings=512, tie_word_embeddings=request.param)
    save_tiny_model(path, cfg, seed=1)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(path)
    return path


@pytest.mark.parametrize("hf_folder,kind,bits", [
    pytest.param(True, "q8_0", 8.5, id="tied-q8_0"),
    pytest.param(True, "q4_0", 4.5, id="tied-q4_0"),
    pytest.param(False, "q8_0", 8.5, id="untied-q8_0"),
], indirect=["hf_folder"])
def test_quantize_at_load_keeps_no_dense_copy(hf_folder, kind, bits):
    """Resident memory once loaded (VmRSS, not the peak: the dense weights are read to be
    packed, one layer at a time) grows by the packed weights + KV + the tokenizer."""
    res = run_child(f"""
base = status("VmRSS")
core = c.EngineCore(EngineConfig(model={str(hf_folder)!r}, max_model_len=128,
                                 kv_cache_memory_gb=0.02, quantization={kind!r}))
generate(core)
dense = {{n: p.numel() for n, p in core.model.named_parameters() if p.device.type != "meta"}}
print(json.dumps({{"base": base, "rss": status("VmRSS"), "kv": kv_bytes(core),
                  "dense": dense, "weights": core.info["weights"]}}))
""")
    dense = sum(f.stat().st_size for f in hf_folder.glob("*.safetensors"))
    packed = dense / 32 * bits  # fp32 -> bits per weight (the scale included)
    assert res["weights"].startswith(f"{kind.upper()} (quantized at load, no dense copy)")
    grown = res["rss"] - res["base"]
    # a resident dense copy would add the whole file (>= 290 MB) on top of the packed weights
    assert grown < packed * 1.3 + res["kv"] + SLACK, (grown / 2**20, packed / 2**20)
    assert max(res["dense"].values()) <= 512, res["dense"]  # norms only


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A random bf16 HF Llama (~170 MB: 330 MB as fp32), untied, as checkpoints ship."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    path = tmp_path_factory.mktemp("hf-bf16")
    cfg = tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("gmath", ["fp32", "int8"])
def test_quantize_while_read_peak_stays_near_packed(bf16_folder, gmath):
    """`load_quantized` never holds the dense model, nor one whole fp32 tensor: peak RSS grows
    by the packed Q8_0 weights (x1.3) + slack (read buffers, quantizer temporaries), far under
    the fp32 copy that building the dense model first needs (2x the bf16 files). With int8
    math the matmuls are repacked as they are read (x86 SIMD builds) and their rows freed:
    the same bound holds."""
    res = run_child(f"""
from pathlib import Path
from corral.model.quantize import load_quantized
folder = Path({str(bf16_folder)!r})
config = corral.loading.load_config(corral.loading.ModelSource("t", folder))
reset_peak()
base = status("VmHWM")
model, desc = load_quantized(folder, config, "q8_0", max_len=128, math={gmath!r})
print(json.dumps({{"base": base, "peak": status("VmHWM"), "desc": desc}}))
""")
    stored = sum(f.stat().st_size for f in bf16_folder.glob("*.safetensors"))
    packed = stored / 16 * 8.5  # bf16 -> 8.5 bits per weight
    grown = res["peak"] - res["base"]
    assert res["desc"].startswith("Q8_0 (quantized at load, no dense copy)")
    lib = gk.load_library()
    repacks = gmath == "int8" and lib is not None and lib.gguf_repack_bytes(8, 32, 32) > 0
    assert ("repacked at load" in res["desc"]) == repacks, res["desc"]
    assert packed * 1.3 + SLACK < 2 * stored  # the bound tells a dense fp32 copy apart
    assert grown < packed * 1.3 + SLACK, (grown / 2**20, packed / 2**20)
