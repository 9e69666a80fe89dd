"""Prefill attention runs on SDPA's fused (flash) kernel, not its math fallback.

SDPA picks a fused kernel for 4-d inputs only; 3-d ones silently take the math path, which
materializes every score and was 4-9x slower for a 512-token prompt on CPU. Restricting SDPA to
the flash backend makes a math fallback an error, so these tests fail if it comes back."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from corral.model.attention import AttentionMetadata, paged_attention
from tests.unit.test_cpu_attention import random_case


def reference(q, k_cache, v_cache, tables, qlens, ctx, scale):
    """Float64 causal attention per sequence, from the blocks by hand."""
    nh, hd = q.shape[1], q.shape[2]
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    outs, first = [], 0
    for i, (ql, n) in enumerate(zip(qlens, ctx)):
        slots = [int(tables[i, p // bs]) * bs + p % bs for p in range(n)]
        k = k_cache.reshape(-1, nkv, hd)[slots].double().repeat_interleave(nh // nkv, dim=1)
        v = v_cache.reshape(-1, nkv, hd)[slots].double().repeat_interleave(nh // nkv, dim=1)
        qs = q[first:first + ql].double()
        scores = torch.einsum("qhd,thd->hqt", qs, k) * scale
        pos = torch.arange(n - ql, n)[:, None]
        scores = scores.masked_fill(torch.arange(n)[None, :] > pos, float("-inf"))
        outs.append(torch.einsum("hqt,thd->qhd", scores.softmax(-1), v))
        first += ql
    return torch.cat(outs)


@pytest.mark.parametrize("qlens,ctx", [
    ([40], [40]),                # one fresh prompt: causal SDPA on the step's own K/V
    ([5, 3, 7], [5, 9, 12]),     # chunks packed into one masked call, two continuing a prefix
])
@pytest.mark.parametrize("nh,nkv", [(4, 2), (3, 3)])
def test_prefill_runs_on_the_flash_kernel(qlens, ctx, nh, nkv):
    hd, bs, scale = 16, 4, 0.3
    _, k_cache, v_cache, tables, _ = random_case(nh, nkv, hd, bs, ctx, seed=len(qlens) * 10 + nh)
    q = torch.randn(sum(qlens), nh, hd, generator=torch.Generator().manual_seed(nh))
    # this step's own K/V: the last qlen positions of each sequence, as already written
    slots = torch.tensor([int(tables[i, p // bs]) * bs + p % bs
                          for i, (ql, n) in enumerate(zip(qlens, ctx)) for p in range(n - ql, n)])
    k = k_cache.reshape(-1, nkv, hd)[slots]
    v = v_cache.reshape(-1, nkv, hd)[slots]
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             context_lens=torch.tensor(ctx), query_lens=qlens,
                             context_lens_host=ctx, num_decodes=0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    ref = reference(q, k_cache, v_cache, tables, qlens, ctx, scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
