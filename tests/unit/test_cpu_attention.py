"""The C paged decode kernel (corral/model/cpu_attention.py) against a float64 reference and the
PyTorch decode path; the engine with it on and off; the fallback when no compiler works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corral import SamplingParams
from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore
from corral.model import attention, cpu_attention
from corral.model.attention import AttentionMetadata, build_decode_mask


@pytest.fixture(scope="module")
def lib():
    lib = cpu_attention.load_library()
    if lib is None:
        pytest.fail("the decode attention library did not build (gcc is expected here)")
    return lib


@pytest.fixture
def no_kernel(monkeypatch):
    """The PyTorch decode path, as on a machine without a compiler."""
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention, "_lib_tried", True)


def random_case(nh: int, nkv: int, hd: int, bs: int, ctx: list[int], seed: int):
    """q, caches with blocks scattered at random, block tables wider than needed (padded with
    block 0, as the runner pads them), context lens."""
    gen = torch.Generator().manual_seed(seed)
    width = (max(ctx) + bs - 1) // bs + 2
    nb = len(ctx) * width + 3
    k_cache = torch.randn(nb, bs, nkv, hd, generator=gen)
    v_cache = torch.randn(nb, bs, nkv, hd, generator=gen)
    ids = torch.randperm(nb, generator=gen)
    tables = torch.zeros(len(ctx), width, dtype=torch.long)
    used = 0
    for i, n in enumerate(ctx):
        nblk = (n + bs - 1) // bs
        tables[i, :nblk] = ids[used:used + nblk]
        used += nblk
    q = torch.randn(len(ctx), nh, hd, generator=gen) * 2  # sharper softmax than unit scale
    return q, k_cache, v_cache, tables, torch.tensor(ctx)


def reference(q, k_cache, v_cache, tables, ctx, scale):
    """Float64 softmax(q k^T * scale) v per sequence, from the blocks by hand."""
    b, nh, hd = q.shape
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, nh, hd, dtype=torch.float64)
    for i in range(b):
        n = int(ctx[i])
        slots = [int(tables[i, p // bs]) * bs + p % bs for p in range(n)]
        k = k_cache.reshape(-1, nkv, hd)[slots].double().repeat_interleave(nh // nkv, dim=1)
        v = v_cache.reshape(-1, nkv, hd)[slots].double().repeat_interleave(nh // nkv, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), k) * scale
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


def torch_decode(q, k_cache, v_cache, tables, ctx, scale):
    """The engine's PyTorch decode path (gather + SDPA with the additive mask)."""
    b = q.shape[0]
    meta = AttentionMetadata(torch.zeros(b, dtype=torch.long), tables, ctx, [1] * b,
                             ctx.tolist(), num_decodes=b,
                             decode_mask=build_decode_mask(ctx, int(ctx.max()), torch.float32))
    return attention._decode_attention(q, k_cache, v_cache, meta, scale)


CONTEXTS = {16: [1, 15, 16, 17, 32, 33, 300], 5: [1, 4, 5, 6, 11, 97]}


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (9, 3), (8, 2), (6, 1)])
@pytest.mark.parametrize("hd", [64, 32, 128, 40])
@pytest.mark.parametrize("bs", [16, 5])
def test_kernel_matches_reference_and_torch_path(lib, monkeypatch, nh, nkv, hd, bs, kv_dtype):
    """fp16 caches: the reference and the PyTorch path read the same fp16 values."""
    ctx = CONTEXTS[bs]
    q, kc, vc, tables, ctx_t = random_case(nh, nkv, hd, bs, ctx, seed=nh * 1000 + hd + bs)
    kc, vc = kc.to(kv_dtype), vc.to(kv_dtype)
    scale = hd ** -0.5
    out = cpu_attention.paged_decode(q, kc, vc, tables, ctx_t, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, kc, vc, tables, ctx_t, scale),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_attention, "_lib", None)  # the PyTorch path in _decode_attention
    torch.testing.assert_close(out, torch_decode(q, kc, vc, tables, ctx_t, scale),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_attention, "_lib", lib)
    # 7 or 6 sequences: on 2 threads a task is one kv head, on 1 thread all of a sequence's
    # (4 sequences a thread); either way each head's sums run in the same order
    for threads in (1, 3):
        assert torch.equal(cpu_attention.paged_decode(q, kc, vc, tables, ctx_t, scale,
                                                      num_threads=threads), out)


def special_values_case(kv_dtype: torch.dtype):
    """One key per sequence, so each output row is its value row exactly (softmax of one score
    is 1): fp16 subnormals, the smallest normal, the largest finite, signed zeros, inf, NaN."""
    specials = torch.tensor([2.0 ** -24, -(2.0 ** -24), 3 * 2.0 ** -20, 2.0 ** -14, 65504.0,
                             -65504.0, -0.0, 0.0, float("inf"), float("-inf"), float("nan"),
                             1 / 3, -2.5, 1e-3, 7.0, -1e4])
    q, kc, vc, tables, _ = random_case(4, 2, 64, 16, [1, 1, 1, 1], seed=9)
    vc = torch.randn(vc.shape, generator=torch.Generator().manual_seed(1))
    for i in range(4):  # the value row each sequence reads: specials at every lane position
        vc[int(tables[i, 0]), 0] = specials.roll(5 * i).repeat(8)[:128].view(2, 64)
    ctx = torch.ones(4, dtype=torch.long)
    expect = torch.stack([vc[int(tables[i, 0]), 0] for i in range(4)]).to(kv_dtype)
    expect = expect.float().repeat_interleave(2, dim=0).view(4, 4, 64)  # 2 query heads a kv head
    return q, kc.to(kv_dtype), vc.to(kv_dtype), tables, ctx, expect


def test_fp16_values_convert_exactly(lib):
    q, kc, vc, tables, ctx, expect = special_values_case(torch.float16)
    out = cpu_attention.paged_decode(q, kc, vc, tables, ctx, 0.125)
    torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)


def test_decode_branch_uses_kernel_for_fp32_only(lib, monkeypatch):
    """paged_attention's decode rows go through the kernel in fp32 (no mask needed) and through
    the PyTorch path in bf16."""
    q, kc, vc, tables, ctx = random_case(9, 3, 64, 16, [7, 40, 129], seed=1)
    calls = []
    kernel = cpu_attention.paged_decode
    monkeypatch.setattr(cpu_attention, "paged_decode",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    meta = AttentionMetadata(torch.zeros(3, dtype=torch.long), tables, ctx, [1, 1, 1],
                             ctx.tolist(), num_decodes=3, decode_mask=None)
    out = attention.paged_attention(q, None, None, kc, vc, meta, 0.125)
    assert calls == [1]
    torch.testing.assert_close(out.double(), reference(q, kc, vc, tables, ctx, 0.125),
                               rtol=1e-5, atol=1e-5)
    assert not attention.decode_needs_mask(torch.device("cpu"), torch.float32)
    assert attention.decode_needs_mask(torch.device("cpu"), torch.bfloat16)
    bf = attention.paged_attention(q.bfloat16(), None, None, kc.bfloat16(), vc.bfloat16(),
                                   meta, 0.125)  # no mask given: built from context_lens
    assert calls == [1] and bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), out, rtol=0.05, atol=0.05)


def greedy(folder: str, block_size: int) -> dict[str, list[int]]:
    """Greedy ids for prompts of different lengths, staggered, with chunked prefill: decode
    steps of 1..5 sequences next to prefill chunks."""
    from tests.unit.test_engine_parity import run_staggered

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 40, 17, 3, 70)]
    core = EngineCore(EngineConfig(model=folder, dtype="float32", block_size=block_size,
                                   num_kv_blocks=128, max_model_len=256,
                                   max_num_batched_tokens=48))
    return run_staggered(core, prompts, SamplingParams(temperature=0, max_tokens=40,
                                                       ignore_eos=True), every=1)


@pytest.mark.parametrize("block_size", [16, 5])
def test_engine_greedy_same_with_and_without_kernel(lib, tiny_model_dir, monkeypatch,
                                                    block_size):
    calls = []
    kernel = cpu_attention.paged_decode
    monkeypatch.setattr(cpu_attention, "paged_decode",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = greedy(str(tiny_model_dir), block_size)
    assert len(calls) >= 2 * 39  # each of the 2 layers in every step with decodes (>= 39)
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention, "_lib_tried", True)
    n = len(calls)
    ref = greedy(str(tiny_model_dir), block_size)
    assert len(calls) == n
    assert len(got) == 5 and got == ref


@pytest.mark.parametrize("compiler", [None, "/bin/false"])
def test_falls_back_to_torch_without_a_working_compiler(monkeypatch, tmp_path, capsys,
                                                        compiler):
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))  # no cached library to find
    monkeypatch.setattr(cpu_attention, "find_compiler", lambda: compiler)
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention, "_lib_tried", False)
    q, kc, vc, tables, ctx = random_case(4, 2, 32, 16, [3, 20], seed=2)
    assert attention.decode_needs_mask(torch.device("cpu"), torch.float32)
    assert "C decode attention unavailable" in capsys.readouterr().err
    assert not cpu_attention.supports(q, kc)
    meta = AttentionMetadata(torch.zeros(2, dtype=torch.long), tables, ctx, [1, 1],
                             ctx.tolist(), num_decodes=2,
                             decode_mask=build_decode_mask(ctx, 20, torch.float32))
    out = attention.paged_attention(q, None, None, kc, vc, meta, 0.2)
    torch.testing.assert_close(out.double(), reference(q, kc, vc, tables, ctx, 0.2),
                               rtol=1e-5, atol=1e-5)
    assert capsys.readouterr().err == ""  # warned once per process


@pytest.mark.parametrize("flags", [["-mno-avx512f"],
                                   ["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c"]],
                         ids=["avx2", "portable"])
def test_c_paths_without_avx512(monkeypatch, tmp_path, flags):
    """The AVX2+FMA+F16C loops (CPUs without AVX-512) and the plain C ones (software fp16
    conversion) give the same results as the reference, fp32 and fp16 caches alike."""
    if "avx2" not in Path("/proc/cpuinfo").read_text() and "-mno-avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "CFLAGS", [*cpu_attention.CFLAGS, *flags])
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention, "_lib_tried", False)
    assert cpu_attention.load_library() is not None
    for kv_dtype in (torch.float32, torch.float16):
        for nh, nkv, hd, bs in [(9, 3, 64, 16), (4, 4, 40, 5), (8, 2, 128, 16)]:
            q, kc, vc, tables, ctx = random_case(nh, nkv, hd, bs, CONTEXTS[bs], seed=hd)
            kc, vc = kc.to(kv_dtype), vc.to(kv_dtype)
            for threads in (1, 2):
                out = cpu_attention.paged_decode(q, kc, vc, tables, ctx, hd ** -0.5,
                                                 num_threads=threads)
                torch.testing.assert_close(out.double(),
                                           reference(q, kc, vc, tables, ctx, hd ** -0.5),
                                           rtol=1e-5, atol=1e-5)
    q, kc, vc, tables, ctx, expect = special_values_case(torch.float16)
    out = cpu_attention.paged_decode(q, kc, vc, tables, ctx, 0.125)
    torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)
