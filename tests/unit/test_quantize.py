"""Opt-in Q8_0 / Q4_0 at load (`quantization=`): packing equal to gguf's quantizer, the kernel's
weights equal to gguf's dequantize, no dense copy kept, decode on the kernel with logits close
to the dense engine's, and the refused combinations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize
from transformers import AutoTokenizer

from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.errors import CorralError
from corral.model import gguf_kernels as gk
from corral.model.quantize import quantize_q4_0, quantize_q8_0
from tests.conftest import save_tiny_model, tiny_config

Q8_0 = GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def lib():
    lib = gk.load_library()
    if lib is None:
        pytest.fail("the GGUF kernel library did not build (gcc is expected on this machine)")
    return lib


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Random fp32 weights with the edge cases: an all-zero block, a block whose max sits at
    +/-127 * d exactly, ties at .5 after scaling, and a tiny block (subnormal fp16 scale)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0
    if k >= 64:
        w[0, 32:64] = torch.arange(-16, 16) * 0.5  # d = 8/127: q = +/-127 and ties at .5
    w[-1, -32:] *= 1e-6
    return w


@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (33, 96), (64, 576)])
def test_packing_equals_gguf_quantizer(lib, n, k):
    w = weights(n, k, seed=n + k)
    packed = quantize_q8_0(w)
    ref = quantize(w.numpy(), Q8_0)  # [n, k/32 * 34] uint8
    assert packed.kind == "q8_0" and (packed.n, packed.k) == (n, k)
    assert packed.base.dtype == np.uint8
    assert np.array_equal(packed.base, ref)  # byte for byte
    # the kernel reads those bytes as gguf's dequantize does, bit for bit
    deq = torch.from_numpy(dequantize(ref, Q8_0).reshape(n, k).astype(np.float32))
    assert torch.equal(gk.gguf_dequantize(lib, packed), deq)
    # Q8_0 error: d/2 from rounding q (d = block max / 127), plus |q| <= 127 times the fp16
    # rounding of d (relative 2^-11, or absolute 2^-25 in fp16's subnormal range)
    d = w.reshape(n, -1, 32).abs().amax(-1, keepdim=True) / 127
    err = (w.reshape(n, -1, 32) - deq.reshape(n, -1, 32)).abs()
    assert (err <= d * (0.5 + 127 * 2**-11) + 127 * 2**-25).all()


@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (33, 96)])
def test_q4_0_packing_equals_gguf_quantizer(lib, n, k):
    w = weights(n, k, seed=n + k)
    packed = quantize_q4_0(w)
    ref = quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    assert packed.kind == "q4_0" and (packed.n, packed.k) == (n, k)
    assert np.array_equal(packed.base, ref)  # byte for byte
    deq = dequantize(ref, GGMLQuantizationType.Q4_0).reshape(n, k).astype(np.float32)
    assert torch.equal(gk.gguf_dequantize(lib, packed), torch.from_numpy(deq))


def test_k_not_multiple_of_32_raises():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.randn(4, 48))


@pytest.fixture(scope="module")
def q_model_dir(tmp_path_factory, default_folder):
    """A tiny random Llama with hidden/intermediate sizes multiple of 32 and a tied lm_head."""
    path = tmp_path_factory.mktemp("tiny-q8")
    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                      tie_word_embeddings=True)
    save_tiny_model(path, cfg, seed=3)
    AutoTokenizer.from_pretrained(default_folder).save_pretrained(path)
    return path


def greedy_with_logits(core: EngineCore, prompt: list[int], n: int,
                       ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens for `prompt` and the logits [vocab] the engine sampled each one from."""
    seen: list[torch.Tensor] = []
    compute = core.model.compute_logits
    core.model.compute_logits = lambda h: seen.append(compute(h)) or seen[-1]
    try:
        core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=n,
                                                     ignore_eos=True))
        tokens: list[int] = []
        while core.has_work():
            for out in core.step():
                if out.finished:
                    tokens = out.outputs[0].token_ids
    finally:
        del core.model.compute_logits
    return tokens, [lg[-1] for lg in seen]


def test_engine_decodes_on_q8_0_kernel(lib, q_model_dir, monkeypatch):
    """Decode runs on the kernel; logits stay close to the dense engine's; greedy tokens agree.

    Why the tolerance: Q8_0 rounds each weight to within d/2, d = (block max)/127; for Gaussian
    weights that is an error of ~d/sqrt(12) ~ 0.5% of the weights' std, so each matmul's output
    moves by ~0.5% of its std (errors of independent weights add in quadrature). Through 2
    layers and the lm_head the logits moved by ~1.0% of their std (rms over the vocabulary,
    measured) and 4.2% at worst over 256 logits; the bounds (2% rms, 8% max) leave 2x room
    without hiding a wrong kernel (a wrong layout or scale moves logits by ~100% of their std).
    """
    calls = []
    matmul = gk.gguf_matmul
    monkeypatch.setattr(gk, "gguf_matmul",
                        lambda *a, **k: calls.append(sum(p.n for p in a[2])) or matmul(*a, **k))
    dense = EngineCore(EngineConfig(model=str(q_model_dir), max_model_len=256))
    quant = EngineCore(EngineConfig(model=str(q_model_dir), max_model_len=256,
                                    quantization="q8_0"))
    assert dense.info["weights"] == "dense float32"
    assert quant.info["weights"].startswith("Q8_0 (quantized at load, no dense copy)")
    assert quant.info["weights"].endswith("kernels for 9/9 matmuls, fused C decode step")
    assert quant.model.packed_lm_head is not None  # tied: quantized from embed_tokens
    assert isinstance(quant.model.model.embed_tokens, gk.GGUFEmbedding)  # reads the same blocks
    assert sum(p.numel() for p in quant.model.parameters()) < 2000  # norms only: no dense copy
    assert not calls

    n = 32
    prompt = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    want, want_logits = greedy_with_logits(dense, prompt, n)
    assert not calls  # the dense engine never takes the kernel
    got, got_logits = greedy_with_logits(quant, prompt, n)
    # the 20-token prefill and the 31 one-token decodes run their 8 decoder matmuls in the
    # fused C step (model/fused_decode.py; the tile kernel for steps up to DEFAULT_MAX_ROWS
    # tokens, the panel path has its own tests), the lm_head here
    assert gk.DEFAULT_MAX_ROWS >= len(prompt)
    assert calls == [256] * n and quant.model.fused_decode.steps == n
    assert len(got) == len(want) == n
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)
    # logits on identical inputs: the prefill and every decode step before the first difference
    for i in range(same + 1 if same < n else n):
        diff, scale = got_logits[i] - want_logits[i], want_logits[i].std()
        assert diff.pow(2).mean().sqrt() < 0.02 * scale, i
        assert diff.abs().max() < 0.08 * scale, i
    agree = sum(a == b for a, b in zip(got, want)) / n
    assert same >= 8 and agree >= 0.75, (same, agree, got, want)

def test_engine_quantizes_while_reading(lib, q_model_dir, monkeypatch):
    """`--quantize` never builds the dense model first (for a bf16 8B checkpoint that copy is
    32 GB): the engine packs the folder while reading it."""
    from corral.model.llama import LlamaForCausalLM

    def dense_load(*args, **kwargs):
        raise AssertionError("the dense model was built")

    monkeypatch.setattr(LlamaForCausalLM, "from_folder", dense_load)
    core = EngineCore(EngineConfig(model=str(q_model_dir), max_model_len=256,
                                   quantization="q8_0"))
    assert core.info["weights"].startswith("Q8_0 (quantized at load, no dense copy)")
    core.add_request("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while core.has_work():
        core.step()



@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_long_prefill_runs_on_packed_weights(lib, q_model_dir, kind):
    quant = EngineCore(EngineConfig(model=str(q_model_dir), max_model_len=256,
                                    quantization=kind))
    layer = quant.model.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, gk.GGUFLinear) and layer.weight is None  # no dense copy
    x = torch.randn(65, 128)
    deq = gk.gguf_dequantize(lib, layer.fast.packed)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, deq))  # panels
    assert torch.equal(layer(x[:3]), gk.gguf_matmul(lib, x[:3], layer.fast.parts))


def test_engine_int8_math_on_q8_0(lib, q_model_dir):
    """gguf_math="int8" (activations quantized to 8 bits too): the logits stay close to the
    dense engine's. Q8_0 weights alone moved them ~1.0% rms / 4.2% max of their std (above);
    8-bit activations add an error of about the same size per matmul: measured 1.3% rms / 4.0%
    max over the prefill's logits; bounds 4% / 16% (a wrong kernel moves them ~100%)."""
    dense = EngineCore(EngineConfig(model=str(q_model_dir), max_model_len=256))
    quant = EngineCore(EngineConfig(model=str(q_model_dir), max_model_len=256,
                                    quantization="q8_0", gguf_math="int8"))
    layer = quant.model.model.layers[0].mlp.gate_up_proj
    assert layer.fast.math == "int8" and layer.fast.all_int
    prompt = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    _, want_logits = greedy_with_logits(dense, prompt, 2)
    _, got_logits = greedy_with_logits(quant, prompt, 2)
    diff, scale = got_logits[0] - want_logits[0], want_logits[0].std()
    print(f"int8 q8_0 logits: rms {diff.pow(2).mean().sqrt() / scale:.4f}, "
          f"max {diff.abs().max() / scale:.4f} of their std")
    assert diff.pow(2).mean().sqrt() < 0.04 * scale
    assert diff.abs().max() < 0.16 * scale
    x = torch.randn(65, 128)  # every step size on the integer kernel, no panels
    assert torch.equal(layer(x), gk.gguf_matmul(lib, x, layer.fast.parts, math="int8"))


def test_k_not_multiple_of_32_stays_dense(lib):
    """hidden 64 but intermediate 40: down_proj (K = 40) stays dense and the description says so."""
    from corral.model.llama import LlamaForCausalLM
    from corral.model.quantize import attach_q8_0

    model = LlamaForCausalLM.random(tiny_config(intermediate_size=40), torch.float32,
                                    torch.device("cpu"))
    isa = gk.load_library().gguf_isa().decode()
    assert attach_q8_0(model) == (f"Q8_0 (quantized at load, no dense copy) {isa} kernels for "
                                  "7/9 matmuls; 2 with K not a multiple of 32 stay dense")
    assert not isinstance(model.model.layers[0].mlp.down_proj, gk.GGUFLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, gk.GGUFLinear)
    assert model.packed_lm_head is not None  # untied lm_head, K = 64


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_untied_embedding_is_quantized_too(lib, kind):
    """Untied lm_head (Llama 2 7B, Llama 3 8B): the embedding is packed as well, no dense
    parameter but the norms stays, and a lookup returns the packed rows dequantized."""
    from corral.model.llama import LlamaForCausalLM
    from corral.model.quantize import QUANTIZERS, attach_quantized

    model = LlamaForCausalLM.random(tiny_config(), torch.float32, torch.device("cpu"))
    table = model.model.embed_tokens.weight.detach().clone()
    attach_quantized(model, kind)
    embed = model.model.embed_tokens
    assert isinstance(embed, gk.GGUFEmbedding) and embed.packed.kind == kind
    assert all(n.endswith("norm.weight") for n, _ in model.named_parameters())
    ids = torch.tensor([[0, 5, 255], [17, 17, 3]])
    want = gk.gguf_dequantize(lib, QUANTIZERS[kind](table))[ids]
    assert torch.equal(embed(ids), want)
    err = (want - table[ids]).abs().max() / table.abs().max()
    assert 0 < err < (0.01 if kind == "q8_0" else 0.1)  # rounded, and only by the quantizer


def test_falls_back_to_dense_without_a_compiler(monkeypatch, tmp_path, capsys):
    from corral.model.llama import LlamaForCausalLM
    from corral.model.quantize import attach_q8_0

    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))  # no cached library to find
    monkeypatch.setattr(gk, "find_compiler", lambda: None)
    monkeypatch.setattr(gk, "_libs", {})
    model = LlamaForCausalLM.random(tiny_config(), torch.float32, torch.device("cpu"))
    assert attach_q8_0(model) == "dense fp32 (Q8_0 kernels unavailable)"
    assert "GGUF kernels unavailable" in capsys.readouterr().err
    assert model.packed_lm_head is None
    assert not any(isinstance(mod, gk.GGUFLinear) for mod in model.modules())


@pytest.mark.parametrize("kw,msg", [
    ({"quantization": "q3_k"}, "unknown quantization 'q3_k'"),
    ({"quantization": "q8_0", "dtype": "bfloat16"}, "needs --device cpu and --dtype float32"),
])
def test_bad_combinations_are_refused(q_model_dir, kw, msg):
    with pytest.raises(CorralError, match=msg) as e:
        EngineCore(EngineConfig(model=str(q_model_dir), **kw))
    assert "\n" not in str(e.value)


def test_gguf_model_is_not_requantized():
    from corral.models import smollm2_gguf_path

    with pytest.raises(CorralError, match="already quantized") as e:
        EngineCore(EngineConfig(model=str(smollm2_gguf_path()), quantization="q8_0"))
    assert "\n" not in str(e.value)


def test_cli_flag(q_model_dir):
    import argparse

    from corral.run.cli import add_model_args, engine_kwargs_from_args
    from corral.server.cli import register

    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--model", str(q_model_dir), "--quantize", "q8_0"])
    assert engine_kwargs_from_args(args)["quantization"] == "q8_0"
    assert "quantization" not in engine_kwargs_from_args(p.parse_args([]))
    with pytest.raises(SystemExit):
        p.parse_args(["--quantize", "q3_k"])
    assert engine_kwargs_from_args(p.parse_args(["--quantize", "q4_0"]))["quantization"] == "q4_0"
    serve = argparse.ArgumentParser().add_subparsers()
    register(serve)
    sp = serve.choices["serve"]
    assert sp.parse_args(["--quantize", "q8_0"]).quantize == "q8_0"


def test_pack_in_row_chunks_equals_one_call(monkeypatch):
    """`pack` quantizes a few rows at a time (small temporaries): the same bytes."""
    from corral.model import quantize as q

    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(q, "CHUNK_BYTES", 5 * 4 * 64)  # 5 rows a chunk, the last one short
    for kind in q.QUANTIZERS:
        packed = q.pack(w, kind)
        assert packed.kind == kind and (packed.n, packed.k) == (37, 64)
        assert np.array_equal(packed.base, q.QUANTIZERS[kind](w).base)


def _bytes(p: gk.PackedWeight) -> np.ndarray:
    """What the kernels read of p: its repacked tiles if it has them, else its rows."""
    return p.repacked if p.repacked is not None else p.base[p.offsets[0]:]


def _packed_state(model) -> dict[str, np.ndarray]:
    """Every packed matmul's bytes, the embedding's and the norms, by name."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, gk.GGUFLinear):
            out[name] = np.concatenate([_bytes(p) for p in mod.fast.parts])
    out["lm_head"] = _bytes(model.packed_lm_head.parts[0])
    out["embed"] = model.model.embed_tokens.packed.base
    for name, p in model.named_parameters():
        out[name] = p.detach().numpy()
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("gmath", ["fp32", "int8"])
def test_load_quantized_equals_attach_quantized(lib, tmp_path, tie, dtype, kind, gmath):
    """Quantized while read (one layer at a time, no dense model) gives the very blocks that
    from_folder + attach_quantized give from the whole dense model. With int8 math on x86 SIMD
    builds the matmuls (not a tied head, whose rows the embedding reads) are repacked as they
    are read and their rows freed: the tiles equal those repacked from attach_quantized's
    blocks, and the fp32 kernel refuses the freed rows with a clear error."""
    from transformers import LlamaForCausalLM as HFLlama

    from corral.loading import ModelSource, load_config
    from corral.model.llama import LlamaForCausalLM
    from corral.model.quantize import attach_quantized, load_quantized

    cfg = tiny_config(tie_word_embeddings=tie, attention_bias=True)
    torch.manual_seed(4)
    HFLlama(cfg).to(dtype).save_pretrained(tmp_path)
    config = load_config(ModelSource("t", tmp_path))
    dense = LlamaForCausalLM.from_folder(tmp_path, config, torch.float32, torch.device("cpu"),
                                         max_len=64)
    want_desc = attach_quantized(dense, kind, math=gmath)
    model, desc = load_quantized(tmp_path, config, kind, max_len=64, math=gmath)
    layers = [m for m in model.modules() if isinstance(m, gk.GGUFLinear)]
    heads = [] if tie else [model.packed_lm_head]
    n_repacked = sum(p.repacked is not None for m in [*layers, *heads]
                     for p in (m.fast.parts if isinstance(m, gk.GGUFLinear) else m.parts))
    can_repack = lib.gguf_repack_bytes(gk.TYPE_IDS[kind.upper()], 64, 64) > 0
    assert n_repacked == (len(layers) + len(heads) if gmath == "int8" and can_repack else 0)
    if n_repacked:
        fused = ", fused C decode step" if want_desc.endswith(", fused C decode step") else ""
        assert desc == (want_desc.removesuffix(fused) + f", {n_repacked} repacked at load"
                        + fused)
        for m in [*(x for x in dense.modules() if isinstance(x, gk.GGUFLinear)),
                  *([] if tie else [dense.packed_lm_head])]:
            for p in (m.fast.parts if isinstance(m, gk.GGUFLinear) else m.parts):
                assert gk.repack(lib, p)
        freed = model.model.layers[0].self_attn.qkv_proj.fast.parts[0]
        assert freed.base.size == 0
        with pytest.raises(CorralError, match="freed after repacking"):
            gk.dequantize_rows(lib, freed)
        with pytest.raises(CorralError, match="freed after repacking"):
            gk.gguf_matmul(lib, torch.randn(2, freed.k), freed, math="fp32")
        x = torch.randn(5, freed.k)
        assert torch.equal(gk.gguf_matmul(lib, x, freed, math="int8"),
                           gk.gguf_matmul(lib, x, dense.model.layers[0].self_attn.qkv_proj
                                          .fast.parts[0], math="int8"))
    else:
        assert desc == want_desc
    want, got = _packed_state(dense), _packed_state(model)
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert all(n.endswith(("norm.weight", ".bias")) for n, _ in model.named_parameters())
    assert model.tie and model.packed_lm_head is not None
    ids = torch.tensor([3, 7, 255])
    assert torch.equal(model.model.embed_tokens(ids), dense.model.embed_tokens(ids))


# ---- the C quantizer (gguf_quantize_rows) against the torch reference and gguf.quants ----------

def edge_weights(seed: int, low: int = -30) -> torch.Tensor:
    """[64, 256] fp32: Gaussian rows at scales from 10^low to 1e4, and blocks of 32 that hit
    every branch of the quantizers: all zeros (+0 and -0), the largest magnitude negative or
    tied between +a and -a (the first one counts), quotients exactly at .5 (Q8_0 rounds away
    from zero) and exactly at Q4_0's integer steps and clamp edges (d a power of two, so every
    product is exact), fp16 scales at round-to-even midpoints (normal and subnormal), scales
    that overflow fp16 (d = inf) or underflow it, and scales whose reciprocal overflows fp32
    (blocks of ~1e-38 and fp32 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g)
    w *= 10.0 ** torch.randint(low, 5, (64, 1), generator=g)
    blocks = w.view(-1, 32)  # 512 blocks; the first ~100 are replaced below
    blocks[0] = 0
    blocks[1] = -0.0
    blocks[2, 5] = -3 * blocks[2].abs().max()  # negative largest magnitude
    blocks[3, 7], blocks[3, 20] = 5.0, -5.0  # tie: +5 first
    blocks[4, 7], blocks[4, 20] = -5.0, 5.0  # tie: -5 first
    e = 2.0 ** torch.arange(-20, 21, 8)  # d = e exactly: amax = 127 e (Q8_0), -8 e (Q4_0)
    ties = torch.tensor([127.0, -126.5, 0.5, -0.5, 1.5, -1.5, 2.5, 63.5, -63.5, 126.5]
                        + [i + 0.5 for i in range(-11, 11)])  # 32 quotients, ties at .5
    # Q4_0, the -8 first: t = x / d + 8.5 at 0.5, every integer step, 15.5 and 16 (clamped)
    steps = torch.tensor([-8.0, -7.9999995, -7.5, -0.5, 0.5, 6.4999995, 6.5, 7.0, 7.5]
                         + [i - 8.5 for i in range(1, 17)] + [i - 8.0 for i in range(1, 8)])
    assert len(ties) == len(steps) == 32
    for i, s in enumerate(e):
        blocks[5 + i] = ties * s
        blocks[11 + i] = steps * s
        blocks[17 + i] = -steps * s  # largest magnitude positive: d = -s
    # fp16 round-to-nearest-even of d: Q4_0's d = m / -8 exactly, so m = -8 v sets d = v, for
    # v at midpoints between fp16 neighbours (even and odd, normal and subnormal: ties go to
    # the even one), just above and below them, and at the ends of fp16's range
    vs = []
    for h in (1.0, 1 + 2**-10, 3.140625, 1000.0, 1000.5, 65504.0, 2.0**-14, 2.0**-20,
              17 * 2.0**-24, 2.0**-24, 0.0):
        mid = h + (2.0 ** (math.floor(math.log2(h)) - 11) if h >= 2**-14 else 2.0**-25)
        vs += [mid, mid * (1 + 2**-20), mid * (1 - 2**-20)]
    vs += [65519.0, 65520.0, 1e6, 3 * 2.0**-26, 1e-40]
    for i, v in enumerate(vs):
        b = blocks[23 + i]
        b.mul_(v / b.abs().max())
        b[i % 32] = -8 * v
    base = 23 + len(vs)
    blocks[base:base + 8] *= 1e-37  # 1/d overflows fp32 (Q8_0 below ~3.7e-37, Q4_0 ~2.4e-38)
    blocks[base + 8:base + 16] *= 1e-44  # fp32 subnormals
    blocks[base + 16:base + 24] *= 1e36  # d overflows fp16: stored inf
    return w


def nonfinite_weights() -> torch.Tensor:
    """Blocks with NaN (canonical, negative, with a payload) and +-inf: what torch's casts make of
    them (a NaN max gives a NaN d, a NaN or infinite quotient q = 0, Q4_0 clamps +-inf)."""
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    bits = w.view(torch.int32)
    w[0, 3] = float("nan")
    w[0, 32] = float("inf")
    w[0, 70] = -float("inf")
    w[0, 100:110] = float("inf")
    w[1, :32] = float("-inf")
    bits[1, 40] = -65536  # 0xffff0000: a bf16 NaN widened
    bits[1, 64] = 0x7F800001  # signalling
    bits[1, 100] = 0x7FFFFFFF
    w[2, :32] = 0
    w[2, 31] = float("nan")
    w[3] *= 1e-42
    w[3, 40] = float("inf")
    return w


@pytest.fixture(scope="module")
def variant_libs():
    """Every kernel variant this CPU runs (the C quantizer is held to the same bytes in each)."""
    libs = {v: gk.load_library(v) for v in gk.cpu_variants()}
    missing = [v for v, lib in libs.items() if lib is None]
    if missing:
        pytest.fail(f"kernel variants {missing} did not build")
    return libs


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_c_quantizer_equals_torch_and_gguf(variant_libs, kind):
    """Byte for byte, in every variant, from fp32, bf16 and fp16 rows (widened exactly, as
    torch's .float()), on Gaussian rows and edge blocks."""
    from corral.model.quantize import QUANTIZERS, pack

    gtype = GGMLQuantizationType[kind.upper()]
    for seed in (0, 1):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = edge_weights(seed, -4 if dtype == torch.float16 else -30)  # fp16: ~6e-8 to 6e4
            x = w.to(dtype)
            want = QUANTIZERS[kind](x.float()).base
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                ref = quantize(x.float().numpy(), gtype)
            # gguf casts to uint8 before clipping, so an infinite Q4_0 quotient (1/d overflowed:
            # |w| < ~2.4e-38) gives 0 there and 15 or 0 in torch (and C): those blocks aside
            blk = x.float().numpy().reshape(-1, 32)
            amax = np.abs(blk).max(-1)
            with np.errstate(over="ignore", divide="ignore"):
                inv = np.float32(1) / (amax / np.float32(8))
            same = np.isfinite(inv) | (amax == 0) | (kind == "q8_0")
            assert same.mean() > 0.9
            assert np.array_equal(want.reshape(len(blk), -1)[same],
                                  ref.reshape(len(blk), -1)[same]), (seed, dtype)
            for variant, lib in variant_libs.items():
                got = pack(x, kind, lib)
                assert (got.kind, got.n, got.k) == (kind, *w.shape)
                bad = np.argwhere(got.base != want)
                assert len(bad) == 0, (variant, dtype, seed, bad[:5].tolist())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_c_quantizer_nonfinite_as_torch(variant_libs, kind):
    from corral.model.quantize import QUANTIZERS, pack

    w = nonfinite_weights()
    want = QUANTIZERS[kind](w).base
    assert want[0, :2].view(np.float16)[0] != want[0, :2].view(np.float16)[0]  # d is NaN
    for variant, lib in variant_libs.items():
        assert np.array_equal(pack(w, kind, lib).base, want), variant


def test_c_quantizer_refuses_bad_shapes(lib):
    from corral.model.quantize import pack, quantize_c

    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.randn(4, 48), "q8_0", lib)
    out = np.zeros(34, np.uint8)
    x = torch.randn(32)
    with pytest.raises(ValueError, match="K=48 unsupported"):
        quantize_c(lib, x.data_ptr(), 0, 1, 48, "q8_0", out.ctypes.data)
    with pytest.raises(ValueError, match="rows of type 2"):
        quantize_c(lib, x.data_ptr(), 2, 1, 32, "q8_0", out.ctypes.data)
    assert not out.any()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_pack_file_rows_c_equals_torch_path(lib, tmp_path, monkeypatch, kind):
    """From a safetensors file (bf16, fp16 and fp32 entries stacked, as q|k|v): the C path (reads
    in chunks of a few rows by two workers) and the torch path (no library: what runs without a
    compiler) give the bytes of the torch quantizer on the whole stacked fp32 matrix."""
    from safetensors.torch import save_file

    from corral.loading import safetensors_index
    from corral.model import quantize as q

    w = edge_weights(2)
    parts = {"a": w[:40].bfloat16(), "b": w[40:45].half(), "c": w[45:].float()}
    save_file(parts, tmp_path / "model.safetensors")
    index = safetensors_index(tmp_path)
    entries = [index[name] for name in parts]
    want = q.QUANTIZERS[kind](torch.cat([p.float() for p in parts.values()])).base
    monkeypatch.setattr(q, "READ_BYTES", 3 * 256 * 2 + 10)  # 3 bf16 rows a chunk, 1 fp32 row
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = q.pack_file_rows(entries, kind, lib)
    finally:
        torch.set_num_threads(torch_threads)
    assert (got.kind, got.n, got.k) == (kind, 64, 256)
    assert np.array_equal(got.base, want)
    assert np.array_equal(q.pack_file_rows(entries, kind).base, want)  # the fallback
