"""Paged decode attention as a Triton kernel (the CUDA path; PyTorch in attention.py is the
reference and the CPU path).

One program per (sequence, KV head, split of the context). It walks that sequence's blocks
through its block table with an online softmax (flash-decoding), keeping all the query heads
of the KV head's GQA group together, so every K/V block is read from memory once per group
rather than once per query head:

    q rows   [BLOCK_H, hd]  = the group's g query heads (padded to >= 16 rows for tl.dot)
    per block:  s = q @ K_blk^T * scale        [BLOCK_H, block_size]   (masked past ctx)
                m, l, acc  <- online softmax update;  acc += p @ V_blk   [BLOCK_H, hd]

Long contexts with few (sequence, KV head) pairs are split over the context (split-K): each
split writes its normalized partial output and log-sum-exp, and a second small kernel merges
them. With one split the first kernel writes the final output directly. The number of splits
comes from shapes only, and each sequence divides its own blocks among them on the device, so
a launch depends on no host-side context length (CUDA graphs replay it for any lengths).

Arithmetic is fp32 throughout: K/V (fp32, bf16 or fp16) are upcast on load. fp32 caches use
exact ("ieee") dots; bf16/fp16 caches use TF32 tensor cores, which hold bf16/fp16 values
exactly (10 mantissa bits), so only the probabilities are rounded (to 10 bits, finer than the
bf16 most kernels use). Upcasting also keeps the kernel runnable under TRITON_INTERPRET=1,
whose numpy back end has no bf16 arithmetic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """One new query token per sequence over its paged K/V.

    q: [B, nh, hd]; k_cache, v_cache: [num_blocks, block_size, nkv, hd] (fp32/bf16/fp16; tiles
    are padded to powers of 2, so any head_dim and block_size work, 64/128 and 16 being the
    tuned ones); block_tables: [B, max_blocks] int; context_lens: [B] int (>= 1, tokens in
    cache incl. the new one). num_splits: context splits per sequence (None: chosen from the
    GPU's size). Returns [B, nh, hd] in q's dtype.
    """
    b, nh, hd = q.shape
    _, block_size, nkv, hd_cache = k_cache.shape
    if hd != hd_cache or nh % nkv:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    # the kernel indexes the last dim with stride 1
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous()
                           for t in (q, k_cache, v_cache))
    group = nh // nkv
    max_blocks = block_tables.shape[1]
    out = torch.empty_like(q)
    if b == 0:
        return out
    if num_splits is None:
        num_splits = _choose_splits(q.device, b * nkv, max_blocks)
    num_splits = max(1, min(num_splits, max_blocks))
    if num_splits == 1:
        part, lse = out, out  # write the final output; lse is not stored
        part_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        part = torch.empty(b, nh, num_splits, hd, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, nh, num_splits, dtype=torch.float32, device=q.device)
        part_strides = (part.stride(0), part.stride(1), part.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    _decode_split_kernel[(b, nkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, scale, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), *part_strides, *lse_strides,
        GROUP=group, BLOCK_H=_pad(group), HEAD_DIM=hd, HEAD_PAD=_pad(hd),
        BLOCK_SIZE=block_size, SLOTS_PAD=_pad(block_size), PRECISION=_dot_precision(k_cache),
        STORE_LSE=num_splits > 1, num_warps=4,
    )
    if num_splits > 1:
        _merge_splits_kernel[(b, nh)](
            part, lse, out, num_splits,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=hd, HEAD_PAD=_pad(hd),
            num_warps=4,
        )
    return out


def _choose_splits(device: torch.device, programs: int, max_blocks: int) -> int:
    """Split the context only when (sequence, KV head) pairs alone leave the GPU mostly idle,
    and keep >= 8 blocks (128 tokens at block size 16) per split so the merge stays cheap."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_blocks // 8))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pad(n: int) -> int:
    """Tile extent for a dimension of size n: a power of 2, >= 16 as tl.dot requires."""
    return max(16, triton.next_power_of_2(n))


def _dot_precision(cache: torch.Tensor) -> str:
    if cache.dtype == torch.float32:
        return "ieee"
    if cache.is_cuda and torch.cuda.get_device_capability(cache.device)[0] < 8:
        return "ieee"  # no TF32 tensor cores before Ampere
    return "tf32"


@triton.jit
def _decode_split_kernel(
    Q, K, V, BlockTables, ContextLens, Out, Lse, scale, num_splits,
    stride_qb, stride_qh,
    stride_kn, stride_ks, stride_kh,
    stride_vn, stride_vs, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_osplit,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SLOTS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(ContextLens + seq).to(tl.int32)  # int32 loop bounds, whatever the input
    num_blocks = tl.cdiv(ctx, BLOCK_SIZE)
    blocks_per_split = tl.cdiv(num_blocks, num_splits)  # this sequence's blocks, split evenly
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)

    rows = tl.arange(0, BLOCK_H)  # query heads of this KV head's group (padded)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_PAD)  # padded tiles (non-power-of-2 sizes) are masked
    dim_ok = dims < HEAD_DIM
    slots = tl.arange(0, SLOTS_PAD)
    kv_ok = (slots[:, None] < BLOCK_SIZE) & dim_ok[None, :]

    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of scores
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_H, HEAD_PAD], dtype=tl.float32)

    # every block in [first, last) holds >= 1 valid token, so m is finite after the first one
    for i in range(first, last):
        block = tl.load(BlockTables + seq * stride_btb + i).to(tl.int64)
        k = tl.load(K + block * stride_kn + slots[:, None] * stride_ks + kv_head * stride_kh
                    + dims[None, :], mask=kv_ok, other=0.0).to(tl.float32)  # [SLOTS, HEAD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_H, SLOTS]
        valid = (slots < BLOCK_SIZE) & (i * BLOCK_SIZE + slots < ctx)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(V + block * stride_vn + slots[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new

    # an empty split (past this sequence's context) leaves denom 0: output 0, lse -inf
    safe = tl.where(denom > 0, denom, 1.0)
    o = acc / safe[:, None]
    tl.store(Out + seq * stride_ob + heads[:, None] * stride_oh + split * stride_osplit
             + dims[None, :], o.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if STORE_LSE:
        lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
        tl.store(Lse + seq * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    Part, Lse, Out, num_splits,
    stride_pb, stride_ph, stride_psplit, stride_lb, stride_lh, stride_ob, stride_oh,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """Out[seq, head] = sum_s w_s * Part[seq, head, s] with w = softmax over splits of Lse."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    ok = splits < num_splits
    lse = tl.load(Lse + seq * stride_lb + head * stride_lh + splits, mask=ok,
                  other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 always holds tokens: the max is finite
    part = tl.load(Part + seq * stride_pb + head * stride_ph + splits[:, None] * stride_psplit
                   + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(Out + seq * stride_ob + head * stride_oh + dims, o.to(Out.dtype.element_ty),
             mask=dim_ok)
