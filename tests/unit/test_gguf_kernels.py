"""GGUF decode kernels: exact weights, matmuls against a float64 reference, the fallback when no
compiler works, and greedy output equal to transformers' with the kernels on (SmolLM2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, dequantize

from corral.model import gguf_kernels as gk
from tests.conftest import tiny_config

GGML = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}


def random_blocks(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """[n, k/32 * block bytes] random blocks with realistic fp16 scales (some subnormal)."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    d = rng.normal(0, 0.01, (n, nb, 1)).astype(np.float16)
    d[0, 0, 0] = np.float16(3e-7)  # an fp16 subnormal scale
    parts = [d.view(np.uint8)]
    if kind == "q4_1":
        parts.append(rng.normal(0, 0.05, (n, nb, 1)).astype(np.float16).view(np.uint8))
        parts.append(rng.integers(0, 256, (n, nb, 16), dtype=np.uint8))
    else:
        parts.append(rng.integers(-128, 128, (n, nb, 32), dtype=np.int8).view(np.uint8))
    return np.concatenate(parts, axis=2).reshape(n, -1)


@pytest.fixture(scope="module")
def lib():
    lib = gk.load_library()
    if lib is None:
        pytest.fail("the GGUF kernel library did not build (gcc is expected on this machine)")
    return lib


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (3, 7, 64), (5, 33, 96), (1, 576, 576),
                                   (8, 64, 1536), (17, 12, 160), (32, 40, 576)])
def test_kernel_matches_reference(lib, kind, m, n, k):
    blocks = random_blocks(kind, n, k, seed=m * 1000 + n + k)
    w = gk.PackedWeight(kind, torch.from_numpy(blocks), n, k)
    ref_w = torch.from_numpy(dequantize(blocks, GGML[kind]).reshape(n, k).astype(np.float32))
    assert torch.equal(gk.gguf_dequantize(lib, w), ref_w)  # bit for bit, as gguf's numpy
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = gk.gguf_matmul(lib, x, w)
    assert y.shape == (m, n)
    ref = (x.double() @ ref_w.double().T).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(y, F.linear(x, ref_w), rtol=1e-5, atol=1e-5 * k ** 0.5)
    assert torch.equal(gk.gguf_matmul(lib, x, w, num_threads=1), y)  # threads split rows only


def test_packed_linear_uses_dense_above_max_rows(lib):
    blocks = random_blocks("q4_1", 16, 64, seed=1)
    w = gk.PackedWeight("q4_1", torch.from_numpy(blocks), 16, 64)
    dense = gk.gguf_dequantize(lib, w)
    bias = torch.randn(16)
    lin = gk.PackedLinear(w, lib, max_rows=2, weight=dense, bias=bias)
    x = torch.randn(3, 64)
    assert torch.equal(lin(x), F.linear(x, dense, bias))  # 3 rows > 2: dense path
    assert torch.equal(lin(x[:2]), gk.gguf_matmul(lib, x[:2], w) + bias)


def test_smollm2_packed_weights_equal_dense(lib, default_folder):
    """The kernel's weights, q/k rows un-permuted and fused, equal transformers' fp32 copy."""
    from safetensors import safe_open

    from corral.loading import ModelSource, load_config
    from corral.models import smollm2_gguf_path

    config = load_config(ModelSource("d", default_folder))
    packed = gk.read_gguf_weights(smollm2_gguf_path(), config)
    assert len(packed) == 4 * config.num_hidden_layers + 1
    with safe_open(default_folder / "model.safetensors", framework="pt") as f:
        def get(name):
            return f.get_tensor(name)

        for i in (0, config.num_hidden_layers - 1):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            expect = {
                a + "qkv_proj": torch.cat([get(a + f"{p}_proj.weight") for p in "qkv"]),
                a + "o_proj": get(a + "o_proj.weight"),
                m + "gate_up_proj": torch.cat([get(m + f"{p}_proj.weight") for p in ("gate", "up")]),
                m + "down_proj": get(m + "down_proj.weight"),
            }
            for name, dense in expect.items():
                assert packed[name].kind == "q4_1"
                assert torch.equal(gk.gguf_dequantize(lib, packed[name]), dense), name
        assert packed["lm_head"].kind == "q8_0"
        assert torch.equal(gk.gguf_dequantize(lib, packed["lm_head"]),
                           get("model.embed_tokens.weight"))


@pytest.mark.parametrize("compiler", [None, "/bin/false"])
def test_falls_back_to_dense_without_a_working_compiler(monkeypatch, tmp_path, capsys, compiler):
    from corral.model.llama import LlamaForCausalLM
    from corral.models import smollm2_gguf_path

    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))  # no cached library to find
    monkeypatch.setattr(gk, "find_compiler", lambda: compiler)
    monkeypatch.setattr(gk, "_lib", None)
    monkeypatch.setattr(gk, "_lib_tried", False)
    model = LlamaForCausalLM.random(tiny_config(), torch.float32, torch.device("cpu"))
    desc = gk.attach_gguf_kernels(model, smollm2_gguf_path())
    assert desc.startswith("dense")
    assert "GGUF kernels unavailable" in capsys.readouterr().err
    assert model.packed_lm_head is None
    assert not any(isinstance(mod, gk.GGUFLinear) for mod in model.modules())


def test_unreadable_gguf_falls_back_to_dense(lib, tmp_path, capsys):
    from corral.model.llama import LlamaForCausalLM

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))  # version 0
    model = LlamaForCausalLM.random(tiny_config(), torch.float32, torch.device("cpu"))
    assert gk.attach_gguf_kernels(model, bad).startswith("dense")
    assert "cannot read bad.gguf" in capsys.readouterr().err
    assert model.packed_lm_head is None


@pytest.mark.slow
def test_engine_greedy_with_kernels_matches_transformers(lib, default_folder, monkeypatch):
    """Decode steps of 1 and 3 sequences run on the kernels; greedy output equals transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral import SamplingParams
    from corral.engine.config import EngineConfig
    from corral.engine.core import EngineCore
    from tests.unit.test_engine_parity import run_staggered
    from tests.unit.test_model_parity import greedy_hf

    calls = []
    matmul = gk.gguf_matmul
    monkeypatch.setattr(gk, "gguf_matmul", lambda *a, **k: calls.append(1) or matmul(*a, **k))
    tok = AutoTokenizer.from_pretrained(default_folder)
    hf = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain photosynthesis in one sentence."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in questions]
    core = EngineCore(EngineConfig(model="default", max_model_len=512))
    assert core.info["weights"].startswith("GGUF q4_1/q8_0 kernels for 121/121")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    alone = run_staggered(core, prompts[:1], params)  # batch-1 decode
    together = run_staggered(core, prompts, params, every=1)  # decode batches of up to 3
    assert len(calls) > 64 * 121
    assert alone["r0"] == greedy_hf(hf, prompts[0], 64)
    for i, p in enumerate(prompts):
        assert together[f"r{i}"] == greedy_hf(hf, p, 64), f"prompt {i} differs"
