"""The KV cache's dtype (EngineConfig.kv_cache_dtype, `--kv-cache-dtype`): "auto" keeps fp16 for a
CPU model whose matmuls take 8-bit activations (llama.cpp's default cache type) and the model's
own dtype otherwise; explicit choices, refusals, twice the blocks in the same memory, and the
engine's numbers on an fp16 cache (the fused step and the layer path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.errors import CorralError
from tests.unit.test_gguf_kernels import prompt_logprobs


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from corral.model.gguf_write import write_llama_gguf

    return write_llama_gguf(tmp_path_factory.mktemp("kvdtype") / "tiny.gguf", hidden=256,
                            intermediate=512, layers=2, heads=4, kv_heads=2, types="Q8_0",
                            seed=3, std=0.05)


def cache_dtype(core: EngineCore) -> torch.dtype:
    dtypes = {t.dtype for kv in core.runner.kv_cache for t in kv}
    assert len(dtypes) == 1
    (dtype,) = dtypes
    assert core.info["kv_cache_dtype"] == str(dtype).removeprefix("torch.")
    return dtype


def test_auto_follows_the_matmul_arithmetic(tiny_gguf, tiny_model_dir):
    def auto(**kw) -> torch.dtype:
        return cache_dtype(EngineCore(EngineConfig(max_model_len=128, **kw)))

    assert auto(model=str(tiny_gguf), gguf_math="int8") == torch.float16
    assert auto(model=str(tiny_gguf), gguf_math="fp32") == torch.float32  # the exact path
    assert auto(model=str(tiny_model_dir)) == torch.float32  # dense fp32: transformers' numbers
    assert auto(model=str(tiny_model_dir), quantization="q8_0", gguf_math="int8") == torch.float16
    assert auto(model=str(tiny_model_dir), quantization="q8_0", gguf_math="fp32") == torch.float32
    assert auto(model=str(tiny_model_dir), dtype="bfloat16") == torch.bfloat16
    # explicit: either way on an fp32 CPU model
    assert cache_dtype(EngineCore(EngineConfig(model=str(tiny_gguf), gguf_math="int8",
                                               kv_cache_dtype="float32"))) == torch.float32
    assert cache_dtype(EngineCore(EngineConfig(model=str(tiny_model_dir),
                                               kv_cache_dtype="float16"))) == torch.float16


def test_refusals(tiny_model_dir):
    with pytest.raises(CorralError, match="only an fp32 CPU model"):
        EngineCore(EngineConfig(model=str(tiny_model_dir), dtype="bfloat16",
                                kv_cache_dtype="float16"))
    with pytest.raises(CorralError, match="unknown KV cache dtype 'int8'"):
        EngineCore(EngineConfig(model=str(tiny_model_dir), kv_cache_dtype="int8"))


def test_fp16_holds_twice_the_blocks_in_the_same_memory(tiny_model_dir):
    # the tiny model: 2 layers x K,V x 16 slots x 2 kv heads x 16 values = 2048 a block
    gb = 64 * 2048 * 4 / 2**30  # 64 fp32 blocks
    blocks = {kv: EngineCore(EngineConfig(model=str(tiny_model_dir), kv_cache_memory_gb=gb,
                                          kv_cache_dtype=kv)).info["kv_blocks"]
              for kv in ("float32", "float16")}
    assert blocks == {"float32": 64, "float16": 128}


@pytest.mark.parametrize("kind", ["fused", "layers"])
def test_fp16_cache_scores_a_prompt_as_fp32_does(tiny_gguf, tiny_model_dir, kind):
    """The same prompt scored through an fp16 and an fp32 cache, in chunks of 16 tokens: the
    GGUF model (fp32 math) through the fused C step; the dense folder through the layer path
    (write_kv's cast, SDPA over the gathered fp16 keys for the chunks, the C decode kernel).
    Each token's log-probability within 0.01 (measured: at most 7e-4 fused, 8e-5 layers)."""
    model = str(tiny_gguf) if kind == "fused" else str(tiny_model_dir)
    ids = torch.randint(3, 250, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    got = {}
    for kv in ("float32", "float16"):
        core = EngineCore(EngineConfig(model=model, gguf_math="fp32", kv_cache_dtype=kv,
                                       max_model_len=256, max_num_batched_tokens=16))
        assert cache_dtype(core) == getattr(torch, kv)
        fused = core.model.fused_decode
        assert (fused is not None) == (kind == "fused")
        got[kv] = prompt_logprobs(core, ids)
        if fused is not None:
            assert fused.steps >= 120 // 16
    diff = np.abs(got["float16"] - got["float32"])
    assert diff.max() < 0.01, diff.max()
    assert diff.max() > 0  # the fp16 cache did round something
