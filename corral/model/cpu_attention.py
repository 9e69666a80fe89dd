"""Paged decode attention on the CPU in C (csrc/paged_attention.c), straight from block tables.

The PyTorch decode path gathers every sequence's blocks into a padded tensor and runs SDPA with
a mask: on SmolLM2 at batch 32 that is ~50 ms of a ~150 ms step for ~0.5 GFLOP of math. The
kernel reads each K/V row once, in place, for all the query heads of its group, with an online
softmax in fp32; one task per (sequence, kv head) over torch's OpenMP threads.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from corral.model import cbuild
from corral.model.cbuild import find_compiler  # a module attribute: tests replace it

CFLAGS = [*cbuild.BASE_CFLAGS]

_lib: ctypes.CDLL | None = None
_lib_tried = False


def load_library() -> ctypes.CDLL | None:
    """The kernel library (built on first call, then cached per process); None if unavailable."""
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    _lib_tried = True
    path, why = cbuild.build("paged_attention", find_compiler(), CFLAGS)
    lib = None
    if path is not None:
        lib, why = cbuild.load(path)
    if lib is None:
        print(f"corral: C decode attention unavailable ({why}); using PyTorch attention",
              file=sys.stderr, flush=True)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.paged_decode.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, ctypes.c_float,
                                 i32, i32]
    lib.paged_decode.restype = None
    _lib = lib
    return lib


KV_DTYPES = (torch.float32, torch.float16)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel can run this decode: fp32 queries on the CPU, a contiguous fp32 or fp16
    cache, no autograd."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype in KV_DTYPES
            and k_cache.is_contiguous() and not (torch.is_grad_enabled() and q.requires_grad)
            and load_library() is not None)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                 num_threads: int | None = None) -> torch.Tensor:
    """One query token per sequence. q [B, nh, hd] fp32; caches [num_blocks, bs, nkv, hd] fp32
    or fp16;
    block_tables [B, >= ceil(ctx / bs)] int64; context_lens [B] int64 -> [B, nh, hd]."""
    lib = load_library()
    assert lib is not None, "call supports() first"
    b, nh, hd = q.shape
    _, bs, nkv, _ = k_cache.shape
    assert nh % nkv == 0 and k_cache.shape == v_cache.shape and k_cache.shape[-1] == hd
    assert v_cache.is_contiguous() and v_cache.dtype == k_cache.dtype and block_tables.shape[0] >= b
    q = q.contiguous()
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    tables = tables.to(torch.int64)
    ctx = context_lens[:b].to(torch.int64).contiguous()
    out = torch.empty_like(q)
    lib.paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                     tables.stride(0), ctx.data_ptr(), out.data_ptr(), b, nh, nkv, hd, bs, scale,
                     int(k_cache.dtype == torch.float16), num_threads or torch.get_num_threads())
    return out
