"""Decode on CPU straight from a GGUF file's quantized blocks (Q4_1, Q8_0).

Decode is memory-bound: reading SmolLM2's dequantized fp32 weights moves ~540 MB per token,
its Q4_1/Q8_0 blocks ~96 MB. `attach_gguf_kernels` gives the model's Linear layers the packed
rows of the GGUF tensors; a layer then runs `csrc/gguf_gemm.c` (compiled on first use with the
system C compiler, loaded with ctypes, which releases the GIL) for steps of at most `max_rows`
tokens, and its dense fp32 weight (kept) for larger steps such as prefill.

The kernel rebuilds each weight exactly as the dense copy was made (fp32 d*q + m), so the
logits differ from the dense path only by the order of the sums.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from corral.model import cbuild
from corral.model.cbuild import find_compiler  # a module attribute: tests replace it

BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # per 32 weights
# -ffp-contract=off: weights rebuilt as d*q + m with two roundings, like gguf's numpy
CFLAGS = [*cbuild.BASE_CFLAGS, "-ffp-contract=off"]
# Largest step (tokens) that takes the kernel: on a 2-core Zen4 the kernels still beat the dense
# fp32 decode step at batch 64 (220 vs 291 ms); 64 is also the CPU default max_num_seqs.
DEFAULT_MAX_ROWS = 64

_lib: ctypes.CDLL | None = None
_lib_tried = False


@dataclass
class PackedWeight:
    """Rows of GGUF blocks for one [n, k] weight (fused layers: parts' rows concatenated)."""

    kind: str  # "q4_1" | "q8_0"
    data: torch.Tensor  # uint8 [n, k // 32 * BLOCK_BYTES[kind]]
    n: int
    k: int


# ---- the compiled library --------------------------------------------------------------------

def build_library(cache_dir: Path | None = None) -> Path | None:
    """Compile csrc/gguf_gemm.c once per source+flags+CPU into the cache; None on failure."""
    path, why = cbuild.build("gguf_gemm", find_compiler(), CFLAGS, cache_dir)
    if path is None:
        _warn(why)
    return path


def load_library() -> ctypes.CDLL | None:
    """The kernel library (built on first call, then cached per process); None if unavailable."""
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    _lib_tried = True
    path = build_library()
    if path is None:
        return None
    lib, why = cbuild.load(path)
    if lib is None:
        _warn(why)
        return None
    f32, u8, i32 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int
    for kind in BLOCK_BYTES:
        fn = getattr(lib, f"gguf_gemm_{kind}")
        fn.argtypes = [f32, i32, i32, u8, i32, f32, i32]
        fn.restype = None
        fn = getattr(lib, f"gguf_dequant_{kind}")
        fn.argtypes = [u8, i32, i32, f32]
        fn.restype = None
    _lib = lib
    return lib


def _warn(reason: str) -> None:
    print(f"corral: GGUF kernels unavailable ({reason}); using dense fp32 weights",
          file=sys.stderr, flush=True)


def gguf_matmul(lib: ctypes.CDLL, x: torch.Tensor, w: PackedWeight,
                num_threads: int | None = None) -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, N] fp32."""
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, w.n, dtype=torch.float32)
    getattr(lib, f"gguf_gemm_{w.kind}")(x.data_ptr(), m, w.k, w.data.data_ptr(), w.n,
                                         y.data_ptr(), num_threads or torch.get_num_threads())
    return y


def gguf_dequantize(lib: ctypes.CDLL, w: PackedWeight) -> torch.Tensor:
    """The kernel's own fp32 weights [N, K] (tests compare them with the dense copy)."""
    out = torch.empty(w.n, w.k, dtype=torch.float32)
    getattr(lib, f"gguf_dequant_{w.kind}")(w.data.data_ptr(), w.n, w.k, out.data_ptr())
    return out


# ---- the model side --------------------------------------------------------------------------

@dataclass
class PackedLinear:
    """y = x @ W^T + b: the kernel for steps of at most `max_rows` rows, the dense W above."""

    packed: PackedWeight
    lib: ctypes.CDLL
    max_rows: int
    weight: torch.Tensor  # the dense fp32 copy
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and x.shape[0] <= self.max_rows and x.dtype == torch.float32
                and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)):
            y = gguf_matmul(self.lib, x, self.packed)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class GGUFLinear(nn.Linear):
    """An nn.Linear (same Parameters, same state_dict) that runs through a PackedLinear."""

    def __init__(self, dense: nn.Linear, packed: PackedWeight, lib: ctypes.CDLL, max_rows: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.weight, self.bias = dense.weight, dense.bias
        self.fast = PackedLinear(packed, lib, max_rows, dense.weight, dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x)


GGML_TYPES = {3: "q4_1", 8: "q8_0"}  # the block types the kernel reads, by ggml type id
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_tensor_rows(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (block type, memory-mapped uint8 rows [n, row bytes]) for the file's block-typed
    2-D tensors. Reads only the header: gguf's GGUFReader also parses every tokenizer string
    (seconds for a 49k vocabulary)."""
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = memoryview(buf)
    if bytes(raw[:4]) != b"GGUF" or struct.unpack_from("<I", raw, 4)[0] < 2:
        raise ValueError("not a little-endian GGUF v2+ file")
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, pos)
    pos += 16
    alignment = 32

    def skip_string(p: int) -> int:
        return p + 8 + struct.unpack_from("<Q", raw, p)[0]

    def skip_value(p: int, vtype: int) -> int:
        if vtype == 8:
            return skip_string(p)
        if vtype == 9:
            itype, count = struct.unpack_from("<IQ", raw, p)
            p += 12
            if itype in _SCALAR_BYTES:
                return p + count * _SCALAR_BYTES[itype]
            for _ in range(count):
                p = skip_value(p, itype)
            return p
        return p + _SCALAR_BYTES[vtype]

    for _ in range(n_kv):
        end = skip_string(pos)
        key = bytes(raw[pos + 8:end]).decode()
        (vtype,) = struct.unpack_from("<I", raw, end)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", raw, end + 4)
        pos = skip_value(end + 4, vtype)
    infos = []
    for _ in range(n_tensors):
        end = skip_string(pos)
        name = bytes(raw[pos + 8:end]).decode()
        (n_dims,) = struct.unpack_from("<I", raw, end)
        dims = struct.unpack_from(f"<{n_dims}Q", raw, end + 4)
        ttype, offset = struct.unpack_from("<IQ", raw, end + 4 + 8 * n_dims)
        pos = end + 4 + 8 * n_dims + 12
        infos.append((name, dims, GGML_TYPES.get(ttype, "other"), offset))
    data_start = -(-pos // alignment) * alignment
    out = {}
    for name, dims, kind, offset in infos:
        if kind not in BLOCK_BYTES or len(dims) != 2:
            continue
        row_bytes = dims[0] // 32 * BLOCK_BYTES[kind]
        start = data_start + offset
        out[name] = (kind, buf[start:start + row_bytes * dims[1]].reshape(dims[1], row_bytes))
    return out


def read_gguf_weights(path: Path, config) -> dict[str, PackedWeight]:
    """Packed weights by our module name (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head).

    A module is left out when any of its parts is in a type the kernel lacks. attn_q/attn_k rows
    are put back in Hugging Face's rotary order, as transformers does when it dequantizes.
    """
    tensors = gguf_tensor_rows(path)
    nh, nkv = config.num_attention_heads, config.num_key_value_heads

    def rows(name: str, heads: int | None = None) -> tuple[str, np.ndarray] | None:
        kind, data = tensors.get(name, (None, None))
        if kind not in BLOCK_BYTES:
            return None
        if heads:  # ggml's interleaved rotary rows -> HF halves (reverse of the converter)
            half = data.shape[0] // heads // 2
            data = data.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(data.shape)
        return kind, data

    def fuse(*parts) -> PackedWeight | None:
        if any(p is None for p in parts) or len({k for k, _ in parts}) != 1:
            return None
        kind = parts[0][0]
        data = np.concatenate([d for _, d in parts], axis=0)
        k = data.shape[1] // BLOCK_BYTES[kind] * 32
        return PackedWeight(kind, torch.from_numpy(np.ascontiguousarray(data)), data.shape[0], k)

    out: dict[str, PackedWeight | None] = {}
    for i in range(config.num_hidden_layers):
        b, a, m = f"blk.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[a + "qkv_proj"] = fuse(rows(b + "attn_q.weight", nh), rows(b + "attn_k.weight", nkv),
                                   rows(b + "attn_v.weight"))
        out[a + "o_proj"] = fuse(rows(b + "attn_output.weight"))
        out[m + "gate_up_proj"] = fuse(rows(b + "ffn_gate.weight"), rows(b + "ffn_up.weight"))
        out[m + "down_proj"] = fuse(rows(b + "ffn_down.weight"))
    tie = bool(getattr(config, "tie_word_embeddings", False)) or "output.weight" not in tensors
    out["lm_head"] = fuse(rows("token_embd.weight" if tie else "output.weight"))
    return {name: w for name, w in out.items() if w is not None}


def attach_gguf_kernels(model, gguf_path: Path, max_rows: int = DEFAULT_MAX_ROWS) -> str:
    """Give `model`'s Linear layers (and its lm_head) the GGUF file's packed rows.

    Returns a one-line description of the weight path, for the load message.
    """
    lib = load_library()
    if lib is None:
        return "dense fp32 (GGUF kernels unavailable)"
    try:
        packed = read_gguf_weights(gguf_path, model.config)
    except (OSError, ValueError, KeyError, struct.error) as e:
        _warn(f"cannot read {gguf_path.name}: {e}")
        return "dense fp32 (GGUF kernels unavailable)"
    installed = install_packed(model, packed, lib, max_rows)
    kinds = {packed[name].kind for name in installed}
    n = len(installed)
    total = 4 * model.config.num_hidden_layers + 1
    return (f"GGUF {'/'.join(sorted(kinds))} kernels for {n}/{total} matmuls "
            f"(steps <= {max_rows} tokens), dense fp32 above")


def lm_head_weight(model) -> torch.Tensor:
    """The dense weight the logits matmul uses (the embedding when tied)."""
    return model.model.embed_tokens.weight if model.tie else model.lm_head.weight


def install_packed(model, packed: dict[str, PackedWeight], lib: ctypes.CDLL,
                   max_rows: int) -> list[str]:
    """Route the named Linear layers (and "lm_head") through their packed weights; a layer
    whose shape differs stays dense. Returns the names installed."""
    installed = []
    for name, w in packed.items():
        if name == "lm_head":
            weight = lm_head_weight(model)
            if tuple(weight.shape) != (w.n, w.k):
                continue
            # a plain attribute, not a module: the state_dict keeps its names
            model.packed_lm_head = PackedLinear(w, lib, max_rows, weight)
        else:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            dense = getattr(parent, attr)
            if tuple(dense.weight.shape) != (w.n, w.k):
                continue
            setattr(parent, attr, GGUFLinear(dense, w, lib, max_rows))
        installed.append(name)
    return installed
