"""Attention over a paged KV cache, in plain PyTorch (CPU and any CUDA GPU).

The engine runs a flat batch of T new tokens from B sequences, laid out sequence after sequence.
Each sequence owns a block table: its KV lives in fixed-size blocks of the shared cache.

    cache (per layer):  [num_blocks, block_size, n_kv_heads, head_dim]
    seq 0 blocks: [7, 2, 9]   seq 1 blocks: [4]        (block_tables, padded with 0)
    token t of seq s goes to slot  block_tables[s][p // bs] * bs + p % bs   (slot_mapping)

Decode sequences (one new token each) come first in the batch and are batched together: on CUDA
the Triton kernel (triton_attention.py), on the CPU in fp32 a C kernel (cpu_attention.py), both
reading the blocks in place; otherwise gather each one's blocks, one batched matmul per head
group. Prefill chunks follow: consecutive chunks are packed into one attention call with a
block-diagonal causal mask offset by the tokens already in the cache (chunked prefill,
prefix-cache hits); a lone chunk with nothing cached runs plain causal attention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from corral.model import cpu_attention


@dataclass
class AttentionMetadata:
    """Where a step's tokens come from and where their K/V go. Built by the engine's runner."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot per new token
    block_tables: torch.Tensor  # [B, max_blocks] int64 (rows padded with 0)
    context_lens: torch.Tensor  # [B] int64: tokens in cache after this step (incl. new)
    query_lens: list[int]  # [B] new tokens per sequence (host copy)
    context_lens_host: list[int]  # [B] host copy of context_lens
    # The first `num_decodes` sequences have one new token each; decode_mask [Bd, 1, 1, S]
    # (additive) hides the padded slots of their gathered context; None where the decode kernel
    # bounds by context_lens (see decode_needs_mask).
    num_decodes: int = 0
    decode_mask: torch.Tensor | None = None


def build_decode_mask(context_lens: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, max_len]: 0 where slot < context_len, -inf past it."""
    idx = torch.arange(max_len, device=context_lens.device)
    hide = idx[None, :] >= context_lens[:, None]
    mask = torch.zeros(hide.shape, dtype=dtype, device=context_lens.device)
    return mask.masked_fill_(hide, float("-inf"))[:, None, None, :]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values ([T, n_kv, hd]) at their cache slots."""
    nb, bs, nkv, hd = k_cache.shape
    k_cache.view(nb * bs, nkv, hd).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, nkv, hd).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal GQA attention for a flat batch. q: [T, nh, hd]; k, v: [T, nkv, hd] (this step's,
    already written to the cache). Returns [T, nh, hd]. Keys and values are used as the cache
    holds them (rounded to an fp16 cache too), whichever path reads them."""
    nd = meta.num_decodes
    if nd == len(meta.query_lens):
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    qls, ctxs = meta.query_lens[nd:], meta.context_lens_host[nd:]
    firsts = [nd]
    for ql in qls:
        firsts.append(firsts[-1] + ql)
    if k_cache.dtype != k.dtype:  # as an fp16 cache holds them
        k, v = k.to(k_cache.dtype).to(k.dtype), v.to(v_cache.dtype).to(v.dtype)
    area = PACK_AREA.get(q.device.type, PACK_AREA["cuda"])
    for g in pack_groups(qls, ctxs, area):
        a, b = firsts[g.start], firsts[g.stop]
        i = nd + g.start
        if len(g) == 1 and ctxs[g.start] == qls[g.start]:
            # nothing cached before this chunk: the fresh K/V directly, causal (flash on CUDA)
            out[a:b] = _prefill_one(q[a:b], k[a:b], v[a:b], 0, scale)
        else:
            out[a:b] = _prefill_packed(q[a:b], k_cache, v_cache,
                                       meta.block_tables[i:nd + g.stop],
                                       qls[g.start:g.stop], ctxs[g.start:g.stop], scale)
    return out


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, nkv, hd] cache, [B, n] block ids -> [B, n * bs, nkv, hd] contiguous.
    index_select on whole blocks is ~5x faster on CPU than advanced indexing `cache[tables]`."""
    nb, bs, nkv, hd = cache.shape
    b, n = tables.shape
    rows = cache.view(nb, bs * nkv * hd).index_select(0, tables.reshape(-1))
    return rows.view(b, n * bs, nkv, hd)


def _prefill_packed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                    scale: float) -> torch.Tensor:
    """Prefill chunks of several sequences in one attention call (varlen through a packed layout).

    q: [Tq, nh, hd], the chunks' queries one after another; block_tables [P, w] and the host
    lengths describe the same P sequences. Each sequence's keys (its cached prefix followed by
    this chunk, already written to the cache) are gathered into one packed [Tk, nkv, hd]; a
    block-diagonal causal mask lets query i of sequence s see keys 0..offset_s+i of s only:

        keys ->   s0 s0 s0 | s1 s1
        q s0      x  .  .  | .  .        (s0 had 1 token cached: its 2 queries see 2, 3 keys)
        q s0      x  x  x  | .  .
        q s1      .  .  .  | x  .
        q s1      .  .  .  | x  x
    """
    dev = q.device
    nb, bs, nkv, hd = k_cache.shape
    nh = q.shape[1]
    p = len(query_lens)
    qlen = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    # keys: flat cache slot of every position 0..ctx-1 of every sequence
    k_row = torch.repeat_interleave(torch.arange(p), ctx)
    k_first = torch.cumsum(ctx, 0) - ctx
    k_pos = torch.arange(int(ctx.sum())) - k_first[k_row]
    k_row_d, k_pos_d = k_row.to(dev), k_pos.to(dev)
    slots = block_tables[k_row_d, k_pos_d // bs] * bs + k_pos_d % bs
    ks = k_cache.view(nb * bs, nkv, hd).index_select(0, slots).to(q.dtype)
    vs = v_cache.view(nb * bs, nkv, hd).index_select(0, slots).to(q.dtype)
    # queries: their sequence and absolute position
    q_row = torch.repeat_interleave(torch.arange(p), qlen)
    q_first = torch.cumsum(qlen, 0) - qlen
    q_pos = (ctx - qlen)[q_row] + torch.arange(int(qlen.sum())) - q_first[q_row]
    allowed = (q_row[:, None] == k_row[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    gqa = nh != nkv
    if gqa and dev.type == "cuda":
        # expanded heads keep SDPA on its memory-efficient masked kernel (with enable_gqa it
        # can fall back to the math path, which materializes [nh, Tq, Tk] scores)
        ks, vs = ks.repeat_interleave(nh // nkv, dim=1), vs.repeat_interleave(nh // nkv, dim=1)
        gqa = False
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                       vs.transpose(0, 1)[None], attn_mask=allowed.to(dev),
                                       scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def pack_groups(query_lens: list[int], context_lens: list[int], max_area: int) -> list[range]:
    """Split prefill chunks into runs of consecutive sequences attended together: a run grows
    while its packed score matrix (total queries x total keys) stays under `max_area` or at most
    twice the work of attending them one by one (the block-diagonal mask wastes the rest)."""
    groups, start, tq, tk, useful = [], 0, 0, 0, 0
    for i, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        ntq, ntk, nuse = tq + ql, tk + cl, useful + ql * cl
        if i > start and ntq * ntk > max(max_area, 2 * nuse):
            groups.append(range(start, i))
            start, ntq, ntk, nuse = i, ql, cl, ql * cl
        tq, tk, useful = ntq, ntk, nuse
    groups.append(range(start, len(query_lens)))
    return groups


# Packed score matrices up to this many elements run as one call: on CUDA the launches saved
# outweigh the masked-out work; on the CPU the masked work is real time, so pack only small runs.
PACK_AREA = {"cuda": 1 << 24, "cpu": 1 << 14}


def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
                 scale: float) -> torch.Tensor:
    """One sequence: q [Lq, nh, hd] at positions offset..offset+Lq-1 over k/v [Lk, nkv, hd]."""
    lq, nh, _ = q.shape
    lk, nkv, _ = k.shape
    # (1, heads, L, hd): SDPA's fused kernels (flash on CPU and CUDA) take 4-d inputs only; 3-d
    # ones run the math path, which materializes the scores (4-9x slower for a 512-token prompt)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if offset == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                           enable_gqa=nh != nkv)
    else:
        # query i sees keys 0..offset+i
        rows = torch.arange(lq, device=q.device)[:, None] + offset
        allowed = torch.arange(lk, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale,
                                           enable_gqa=nh != nkv)
    return o[0].transpose(0, 1)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The first Bd sequences have one new token each: batch them. q: [Bd, nh, hd]."""
    # --- CUDA: the Triton paged-decode kernel (corral/model/triton_attention.py) ---
    if decode_uses_triton(q.device):
        b = q.shape[0]
        return _triton_decode()(q, k_cache, v_cache, meta.block_tables[:b],
                                meta.context_lens[:b], scale)
    # --- end CUDA dispatch ---
    b, nh, hd = q.shape
    if cpu_attention.supports(q, k_cache):
        return cpu_attention.paged_decode(q, k_cache, v_cache, meta.block_tables[:b],
                                          meta.context_lens[:b], scale)
    # the PyTorch path (bf16/fp16 CPU, CUDA without triton)
    nkv = k_cache.shape[2]
    mask = meta.decode_mask  # [B, 1, 1, S]
    if mask is None:
        ctx = meta.context_lens[:b]
        mask = build_decode_mask(ctx, int(ctx.max()), q.dtype)
    s = mask.shape[-1]
    nblk = (s + k_cache.shape[1] - 1) // k_cache.shape[1]
    bt = meta.block_tables[:b, :nblk]
    ks = gather_blocks(k_cache, bt)[:, :s].transpose(1, 2)  # [B, nkv, S, hd] (a view)
    vs = gather_blocks(v_cache, bt)[:, :s].transpose(1, 2)
    if ks.dtype != q.dtype:  # an fp16 cache under fp32 queries (the C kernel unavailable)
        ks, vs = ks.to(q.dtype), vs.to(q.dtype)
    if q.dtype == torch.float32:
        # SDPA reads the strided view directly (a contiguous copy would cost as much again
        # as the gather); measured 1.7x faster than the matmuls below on CPU in fp32
        o = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, scale=scale,
                                           enable_gqa=nh != nkv)  # [B, nh, 1, hd]
        return o[:, :, 0]
    # bf16/fp16: CPU SDPA is 3x slower than two batched matmuls here; softmax in fp32
    qg = q.view(b, nkv, nh // nkv, hd)  # the heads of a group share one KV head
    scores = torch.matmul(qg, ks.transpose(-1, -2)).float().mul_(scale).add_(mask)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [B, nkv, g, S]
    return torch.matmul(probs, vs).view(b, nh, hd)


def decode_needs_mask(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode on `device` with `dtype` queries reads AttentionMetadata.decode_mask
    (the Triton and C kernels bound each sequence by context_lens instead)."""
    if decode_uses_triton(device):
        return False
    return not (device.type == "cpu" and dtype == torch.float32
                and cpu_attention.load_library() is not None)


def decode_uses_triton(device: torch.device) -> bool:
    """Whether decode attention on `device` runs the Triton kernel (which ignores decode_mask)."""
    return device.type == "cuda" and _triton_decode() is not None


@functools.cache
def _triton_decode():
    """The Triton decode kernel, or None where triton is not installed (imported on first use:
    CPU runs never import triton)."""
    try:
        from corral.model.triton_attention import paged_decode_attention
    except ImportError:
        return None
    return paged_decode_attention
