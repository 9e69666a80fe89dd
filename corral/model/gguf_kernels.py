"""Run a Llama on CPU straight from a GGUF file's quantized blocks, memory-mapped, never dense.

Decode is memory-bound: a 1B model's fp32 weights are ~5 GB per token, its Q4_K_M blocks ~0.8
GB. `load_gguf_model` memory-maps the file and builds the model on views of it: every matmul
(and the embedding lookup) reads the blocks in place through `csrc/gguf_gemm.c` (compiled on
first use with the system C compiler, loaded with ctypes, which releases the GIL). Fused layers
(q|k|v, gate|up) and the rotary row order are tables of row offsets into the mapping, not
copies, so the resident memory is the file plus the KV cache plus small buffers.

Two kinds of arithmetic, chosen per model (`math`, default from $CORRAL_GGUF_MATH, else
"int8"):

- "int8" (Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K, as llama.cpp does it): each activation row is
  quantized once per matmul to 8-bit blocks (per 32 values for the 32-value types, per 256 with
  16/32-value sums for the K-quants) and dotted against the weight blocks in exact int32, the
  block scales applied in fp32; steps of every size (decode and prefill) run this kernel:
  decode-sized steps in tiles of 4 weight rows (each row's block unpacked once in registers,
  the 4 rows reduced together), larger steps (from 10 tokens, 24 for K-quants) on x86 in
  transposed tiles of 16 rows (AVX-512 VNNI) or 8. On x86, Q4_0/Q4_1/Q8_0/Q4_K matmul
  weights are repacked once at load into such tiles (`repack`), which every step size then
  reads in place, and Q5_K/Q6_K blocks are interleaved 4 rows at a time (one read stream per
  decode tile); the file pages they came from are dropped. The activations' rounding changes the
  numbers: logits differ from the dequantized fp32 reference by ~1e-2 of their spread (tests
  bound it). All SIMD variants (x86 and aarch64) and the portable build give bit-identical
  results.
- "fp32" (the exact rebuild, and F32/F16/BF16 weights in either mode): steps of at most
  `max_rows` tokens dequantize 4 weight rows at a time into L1 and dot fp32 activations
  against them; larger steps dequantize panels of rows for torch's GEMM. Each weight is rebuilt
  exactly as gguf's numpy dequantizer (and transformers, which uses it) does, so logits differ
  from transformers' dequantized model only by the order of the sums.

The kernels are compiled per instruction set (x86: AVX-512+VNNI, AVX-512, AVX2+AVX-VNNI,
AVX2+FMA+F16C and a portable build; aarch64: NEON with sdot, plain NEON; -march=native
elsewhere) and the variant is picked at run time from the CPU's flags.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from corral.errors import CorralError
from corral.model import cbuild
from corral.model.cbuild import find_compiler  # a module attribute: tests replace it

# ggml type id -> (name, values per block, bytes per block); the types the kernel reads
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
TYPE_IDS = {name: tid for tid, (name, _, _) in TYPES.items()}
# names of the ggml types we do not run, for the error message
OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K",
               16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
               21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}

# -ffp-contract=off: weights rebuilt with the same separate roundings as gguf's numpy
COMMON_CFLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off"]
VARIANT_CFLAGS = {
    "avx512vnni": ["-march=x86-64-v4", "-mavx512vnni", "-mtune=native"],
    "avx512": ["-march=x86-64-v4", "-mtune=native"],
    "avxvnni": ["-march=x86-64-v3", "-mavxvnni", "-mtune=native"],  # Alder Lake+, Zen 5 laptops
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    "portable": ["-march=x86-64", "-mtune=generic"],  # SSE2 only: software fp16
    "neondot": ["-march=armv8.2-a+dotprod"],  # aarch64 with sdot (Apple M*, Graviton 2+)
    "neon": ["-march=armv8-a"],  # aarch64 baseline: smull + sadalp
    "native": ["-march=native"],  # other architectures: plain C
}
# Largest step (tokens) for the tile kernel; larger steps dequantize panels for torch's GEMM.
# Measured on SmolLM2's Q4_1 gate_up (576 -> 3072, 2-core Zen4): the tile kernel is ahead of
# panels at every step size up to 1024 rows (32 rows: 3.9 vs 21.9 ms; 512: 48.6 vs 63.4 ms).
DEFAULT_MAX_ROWS = 512
PANEL_BYTES = 2 << 20  # fp32 panel buffer for large steps (fits L2/L3 beside the activations)
MATH_MODES = ("int8", "fp32")
# types with an integer (int8-activation) kernel, and their activation block size
INT_BLOCK = {2: 32, 3: 32, 8: 32, 12: 256, 13: 256, 14: 256}

_libs: dict[str, ctypes.CDLL | None] = {}


# ---- the compiled library --------------------------------------------------------------------

def cpu_variants() -> list[str]:
    """The variants this CPU runs, fastest first."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["neondot", "neon"] if "asimddp" in _cpu_flags("Features") else ["neon"]
    if machine not in ("x86_64", "amd64"):
        return ["native"]
    flags = _cpu_flags("flags")
    out = []
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"} <= flags:
        if "avx512_vnni" in flags:
            out.append("avx512vnni")
        out.append("avx512")
    if {"avx2", "fma", "f16c"} <= flags:
        if "avx_vnni" in flags:
            out.append("avxvnni")
        out.append("avx2")
    return [*out, "portable"]


def _cpu_flags(key: str) -> set[str]:
    """The CPU's feature names: /proc/cpuinfo's `key` line (Linux); on macOS, Apple Silicon's
    sysctl FEAT_DotProd as "asimddp"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"],
                                 capture_output=True, text=True, timeout=5, check=False).stdout
        except OSError:
            return set()
        return {"asimddp"} if out.strip() == "1" else set()
    return set()


def build_library(variant: str, cache_dir: Path | None = None) -> Path | None:
    """Compile csrc/gguf_gemm.c for one variant once into the cache; None on failure."""
    path, why = cbuild.build("gguf_gemm", find_compiler(), COMMON_CFLAGS + VARIANT_CFLAGS[variant],
                             cache_dir)
    if path is None:
        _warn(why)
    return path


def load_library(variant: str | None = None) -> ctypes.CDLL | None:
    """The kernel library for `variant` (default: $CORRAL_GGUF_VARIANT, else the CPU's
    fastest), built on first call and cached per process; None if it cannot be built."""
    if variant is None:
        variant = os.environ.get("CORRAL_GGUF_VARIANT", "").strip() or cpu_variants()[0]
        if variant not in cpu_variants():
            raise CorralError(f"CORRAL_GGUF_VARIANT={variant!r}: this CPU runs "
                              f"{', '.join(cpu_variants())}")
    if variant in _libs:
        return _libs[variant]
    _libs[variant] = None
    path = build_library(variant)
    if path is None:
        return None
    lib, why = cbuild.load(path)
    if lib is None:
        _warn(why)
        return None
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.gguf_gemm.argtypes = [i32, p, i32, i32, p, p, i32, p, i32, i32]
    lib.gguf_gemm.restype = i32
    lib.gguf_gemm_int.argtypes = [i32, p, i32, i32, p, p, i32, p, i32, i32]
    lib.gguf_gemm_int.restype = i32
    lib.gguf_dequant_rows.argtypes = [i32, p, p, i32, i32, p, i32]
    lib.gguf_dequant_rows.restype = i32
    lib.gguf_quantize_rows.argtypes = [i32, i32, p, i32, i32, p, i32]
    lib.gguf_quantize_rows.restype = i32
    lib.gguf_repack_bytes.argtypes = [i32, i32, i32]
    lib.gguf_repack_bytes.restype = ctypes.c_size_t
    lib.gguf_repack.argtypes = [i32, p, p, i32, i32, p, i32]
    lib.gguf_repack.restype = i32
    lib.gguf_isa.argtypes = []
    lib.gguf_isa.restype = ctypes.c_char_p
    _libs[variant] = lib
    return lib


def default_math() -> str:
    """The arithmetic of quantized matmuls: $CORRAL_GGUF_MATH ("int8" or "fp32"), else "int8"."""
    math = os.environ.get("CORRAL_GGUF_MATH", "int8").strip().lower() or "int8"
    if math not in MATH_MODES:
        raise CorralError(f"CORRAL_GGUF_MATH={math!r}: expected one of {', '.join(MATH_MODES)}")
    return math


def _warn(reason: str) -> None:
    print(f"corral: GGUF kernels unavailable ({reason}); using dense fp32 weights",
          file=sys.stderr, flush=True)


# ---- weights: rows of blocks, addressed by offset --------------------------------------------

@dataclass
class PackedWeight:
    """N rows of one ggml type, each `k` values, at byte `offsets` from the start of `base`
    (a uint8 array that owns or maps the memory: a GGUF mmap, or blocks quantized at load)."""

    type_id: int
    base: np.ndarray
    offsets: np.ndarray  # int64 [n]
    n: int
    k: int

    @property
    def kind(self) -> str:
        return TYPES[self.type_id][0].lower()

    @classmethod
    def from_rows(cls, kind: str, rows: np.ndarray | torch.Tensor) -> PackedWeight:
        """Contiguous uint8 rows [n, row bytes] of type `kind` ("q8_0", "Q4_K", ...)."""
        tid = TYPE_IDS[kind.upper()]
        arr = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        arr = np.ascontiguousarray(arr)
        n, row_bytes = arr.shape
        _, per_block, block_bytes = TYPES[tid]
        offsets = np.arange(n, dtype=np.int64) * row_bytes
        return cls(tid, arr, offsets, n, row_bytes // block_bytes * per_block)

    def __post_init__(self) -> None:
        # raw addresses for the ctypes calls, taken once (numpy's .ctypes costs ~1 us a call)
        self.base_ptr = self.base.ctypes.data
        self.offsets_ptr = self.offsets.ctypes.data
        block = INT_BLOCK.get(self.type_id)
        self.int_ok = block is not None and self.k % block == 0
        # what the integer kernel reads: these rows, or their repacked tiles (`repack`)
        self.int_type, self.int_base_ptr = self.type_id, self.base_ptr
        self.repacked: np.ndarray | None = None

    def drop_rows(self) -> None:
        """Free the rows once `repack` gave the integer kernel its tiles (weights quantized at
        load, whose rows nothing else reads): only the integer path runs this weight after."""
        if self.repacked is None:
            raise CorralError("drop_rows: this weight has no repacked tiles")
        self.base, self.base_ptr = np.empty(0, dtype=np.uint8), 0

    def rows(self) -> int:
        """The rows' address for the fp32 kernel and dequantize_rows (an error once dropped)."""
        if not self.base_ptr:
            raise CorralError("this weight's rows were freed after repacking at load: it runs "
                              "on the int8 kernels only (gguf math int8)")
        return self.base_ptr

    def int_path(self) -> bool:
        """Whether the integer kernel runs this weight (its type has one and K fits its blocks)."""
        return self.int_ok

    @property
    def nbytes(self) -> int:
        _, per_block, block_bytes = TYPES[self.type_id]
        return self.n * self.k // per_block * block_bytes


def _check(rc: int, w: PackedWeight) -> None:
    if rc == -3:
        raise MemoryError("GGUF kernel: no memory for the quantized activations")
    if rc != 0:
        raise CorralError(f"GGUF kernel: unsupported type id {w.type_id} (or K={w.k})")


def gguf_matmul(lib: ctypes.CDLL, x: torch.Tensor, parts: PackedWeight | list[PackedWeight],
                num_threads: int | None = None, math: str = "fp32") -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, N] fp32, W = the parts' rows in order: the fp32 tile kernel,
    or with math="int8" the integer kernel for the parts that have one."""
    if isinstance(parts, PackedWeight):
        parts = [parts]
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.shape[0]
    n = parts[0].n if len(parts) == 1 else sum(p.n for p in parts)
    y = torch.empty(m, n, dtype=torch.float32)
    nt = num_threads or torch.get_num_threads()
    xp, yp = x.data_ptr(), y.data_ptr()
    use_int = math == "int8"
    for w in parts:  # a decode step makes ~4 calls a layer: kept lean (ctypes is ~2 us a call)
        if use_int and w.int_ok:
            rc = lib.gguf_gemm_int(w.int_type, xp, m, w.k, w.int_base_ptr, w.offsets_ptr, w.n,
                                   yp, n, nt)
        else:
            rc = lib.gguf_gemm(w.type_id, xp, m, w.k, w.rows(), w.offsets_ptr, w.n, yp, n, nt)
        if rc:
            _check(rc, w)
        yp += 4 * w.n
    return y


def repack(lib: ctypes.CDLL, w: PackedWeight, num_threads: int | None = None) -> bool:
    """Give `w` the kernel library's repacked tiles for the integer path where the build has
    them (Q4_0/Q4_1/Q8_0/Q4_K on x86: rows interleaved so that no step re-arranges them),
    and drop the file pages it read from this process's memory (they stay in the page cache,
    and the original rows stay valid for anything else that reads them). Returns whether it
    repacked."""
    size = lib.gguf_repack_bytes(w.type_id, w.n, w.k) if w.int_ok else 0
    if not size:
        return False
    raw = np.empty(size + 64, dtype=np.uint8)
    at = -raw.ctypes.data % 64  # 64-byte aligned tiles
    buf = raw[at:at + size]
    rc = lib.gguf_repack(w.type_id, w.base_ptr, w.offsets_ptr, w.n, w.k, buf.ctypes.data,
                         num_threads or torch.get_num_threads())
    if rc < 0:
        return False
    w.repacked, w.int_type, w.int_base_ptr = buf, rc, buf.ctypes.data
    _release_pages(w)
    return True


def _release_pages(w: PackedWeight) -> None:
    """madvise(DONTNEED) the whole pages under w's rows in a file mapping (a read-only
    mapping: a later read faults them back in from the page cache)."""
    mm = getattr(w.base, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    _, per_block, block_bytes = TYPES[w.type_id]
    row = w.k // per_block * block_bytes
    page = mmap.PAGESIZE
    lo, hi = int(w.offsets.min()), int(w.offsets.max()) + row
    lo, hi = -(-lo // page) * page, hi // page * page  # only pages wholly inside
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass


def dequantize_rows(lib: ctypes.CDLL, w: PackedWeight, rows: np.ndarray | None = None,
                    out: torch.Tensor | None = None, num_threads: int | None = None) -> torch.Tensor:
    """fp32 weights of rows `rows` (default all) of w: [len(rows), K]."""
    offsets = w.offsets if rows is None else np.ascontiguousarray(w.offsets[rows])
    n = len(offsets)
    out = torch.empty(n, w.k, dtype=torch.float32) if out is None else out
    _check(lib.gguf_dequant_rows(w.type_id, w.rows(), offsets.ctypes.data, n, w.k,
                                 out.data_ptr(), num_threads or torch.get_num_threads()), w)
    return out


def gguf_dequantize(lib: ctypes.CDLL, w: PackedWeight) -> torch.Tensor:
    """The kernel's own fp32 weights [N, K] (tests compare them with gguf's dequantize)."""
    return dequantize_rows(lib, w)


def panel_matmul(lib: ctypes.CDLL, x: torch.Tensor, parts: list[PackedWeight]) -> torch.Tensor:
    """x @ W^T for large M: panels of W dequantized into one small buffer, then torch's GEMM."""
    x = x.contiguous()
    m, n = x.shape[0], sum(p.n for p in parts)
    y = torch.empty(m, n, dtype=torch.float32)
    col = 0
    for w in parts:
        rows = max(16, PANEL_BYTES // (4 * w.k))
        buf = torch.empty(min(rows, w.n), w.k, dtype=torch.float32)
        for r0 in range(0, w.n, rows):
            r1 = min(r0 + rows, w.n)
            panel = buf[: r1 - r0]
            _check(lib.gguf_dequant_rows(w.type_id, w.rows(),
                                         w.offsets[r0:].ctypes.data, r1 - r0, w.k,
                                         panel.data_ptr(), torch.get_num_threads()), w)
            y[:, col + r0: col + r1] = F.linear(x, panel)
        col += w.n
    return y


# ---- the model side --------------------------------------------------------------------------

@dataclass
class PackedLinear:
    """y = x @ W^T + b on packed parts. math="int8" with every part an integer-kernel type:
    that kernel at every step size. Otherwise the fp32 tile kernel for steps of at most
    `max_rows` rows, dequantized panels above; `weight`, when given, is a dense copy used above
    `max_rows` instead (kept only by callers that hold one anyway)."""

    parts: list[PackedWeight]
    lib: ctypes.CDLL
    max_rows: int
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    math: str = "fp32"

    def __post_init__(self) -> None:
        if self.math not in MATH_MODES:
            raise CorralError(f"GGUF math {self.math!r}: expected one of {', '.join(MATH_MODES)}")
        self.all_int = self.math == "int8" and all(p.int_path() for p in self.parts)

    @property
    def packed(self) -> PackedWeight:
        return self.parts[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.all_int or x2.shape[0] <= self.max_rows:
            y = gguf_matmul(self.lib, x2, self.parts, math=self.math)
        elif self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        else:
            y = panel_matmul(self.lib, x2, self.parts)
        if self.bias is not None:
            y = y + self.bias
        if not flat:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class GGUFLinear(nn.Linear):
    """An nn.Linear that runs through a PackedLinear. Built from a dense layer it keeps that
    layer's Parameters (state_dict unchanged); built from packed parts alone it has no dense
    weight at all."""

    def __init__(self, dense: nn.Linear | None, packed, lib: ctypes.CDLL, max_rows: int,
                 bias: torch.Tensor | None = None, math: str = "fp32"):
        nn.Module.__init__(self)
        parts = [packed] if isinstance(packed, PackedWeight) else list(packed)
        self.in_features, self.out_features = parts[0].k, sum(p.n for p in parts)
        if dense is not None:
            self.weight, self.bias = dense.weight, dense.bias
            self.fast = PackedLinear(parts, lib, max_rows, dense.weight, dense.bias, math)
        else:
            self.register_parameter("weight", None)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            self.fast = PackedLinear(parts, lib, max_rows, None, self.bias, math)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x)


def runs_int8(model: nn.Module) -> bool:
    """Whether some linear of `model` runs 8-bit activations on packed weights (int8 math)."""
    return any(isinstance(m, GGUFLinear) and m.fast.math == "int8" for m in model.modules())


class GGUFEmbedding(nn.Module):
    """Token embedding rows dequantized on lookup from packed rows."""

    def __init__(self, packed: PackedWeight, lib: ctypes.CDLL):
        super().__init__()
        self.packed, self.lib = packed, lib
        self.num_embeddings, self.embedding_dim = packed.n, packed.k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.packed.n):
            raise IndexError("token id out of the embedding's range")
        out = dequantize_rows(self.lib, self.packed, flat)
        return out.reshape(*ids.shape, self.packed.k)


# ---- the file --------------------------------------------------------------------------------

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type_id: int
    start: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        if self.type_id in TYPES:
            return TYPES[self.type_id][0]
        return OTHER_TYPES.get(self.type_id, f"ggml type {self.type_id}")


def read_header(path: Path) -> tuple[np.memmap, dict[str, TensorInfo]]:
    """(the memory-mapped file, tensor infos by name). Reads only the header: gguf's GGUFReader
    also parses every tokenizer string (seconds for a large vocabulary)."""
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
            if itype == 8:  # a vocabulary or merges: a lean loop (~0.1 us a string)
                length = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    p += 8 + length(raw, p)[0]
                return p
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
        infos.append((name, tuple(dims), ttype, offset))
    data_start = -(-pos // alignment) * alignment
    return buf, {name: TensorInfo(name, dims, t, data_start + off) for name, dims, t, off in infos}


def packed_tensor(buf: np.memmap, info: TensorInfo, where: str,
                  heads: int | None = None) -> PackedWeight:
    """A 1-D or 2-D tensor of the file as a PackedWeight on the mapping (no copy).

    `heads`: put attn_q/attn_k rows back in Hugging Face's rotary order (ggml interleaves the
    two halves of each head), as transformers does when it dequantizes."""
    if info.type_id not in TYPES:
        raise CorralError(f"{where}: tensor {info.name} is {info.type_name}, a GGUF type Corral "
                          f"does not run (supported: {', '.join(n for n, _, _ in TYPES.values())})")
    _, per_block, block_bytes = TYPES[info.type_id]
    k = info.dims[0]
    n = int(np.prod(info.dims[1:])) if len(info.dims) > 1 else 1
    if k % per_block:
        raise CorralError(f"{where}: tensor {info.name} has rows of {k} values, not a multiple "
                          f"of its {info.type_name} block size {per_block}")
    row_bytes = k // per_block * block_bytes
    order = np.arange(n, dtype=np.int64)
    if heads:
        half = n // heads // 2
        order = order.reshape(heads, half, 2).swapaxes(1, 2).reshape(n)
    return PackedWeight(info.type_id, buf, info.start + order * row_bytes, n, k)


def read_gguf_weights(path: Path, config) -> dict[str, list[PackedWeight]]:
    """Packed parts by our module name (…qkv_proj, …o_proj, …gate_up_proj, …down_proj,
    lm_head, embed, and the norms as "…layernorm" / "norm"). Raises CorralError for a missing
    tensor or one in a type the kernel lacks."""
    buf, tensors = read_header(path)
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    where = Path(path).name

    def get(name: str, heads: int | None = None) -> PackedWeight:
        if name not in tensors:
            raise CorralError(f"{where}: tensor {name} is missing (is this a Llama GGUF?)")
        return packed_tensor(buf, tensors[name], where, heads)

    def merge(parts: list[PackedWeight]) -> list[PackedWeight]:
        """Adjacent parts of one type become one part (one kernel call)."""
        out = [parts[0]]
        for p in parts[1:]:
            last = out[-1]
            if p.type_id == last.type_id and p.k == last.k:
                out[-1] = PackedWeight(p.type_id, buf, np.concatenate([last.offsets, p.offsets]),
                                       last.n + p.n, p.k)
            else:
                out.append(p)
        return out

    out: dict[str, list[PackedWeight]] = {}
    for i in range(config.num_hidden_layers):
        b, a, m = f"blk.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[a + "qkv_proj"] = merge([get(b + "attn_q.weight", nh), get(b + "attn_k.weight", nkv),
                                     get(b + "attn_v.weight")])
        out[a + "o_proj"] = [get(b + "attn_output.weight")]
        out[m + "gate_up_proj"] = merge([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        out[m + "down_proj"] = [get(b + "ffn_down.weight")]
        out[f"model.layers.{i}.input_layernorm"] = [get(b + "attn_norm.weight")]
        out[f"model.layers.{i}.post_attention_layernorm"] = [get(b + "ffn_norm.weight")]
    out["embed"] = [get("token_embd.weight")]
    out["norm"] = [get("output_norm.weight")]
    tie = bool(getattr(config, "tie_word_embeddings", False)) or "output.weight" not in tensors
    out["lm_head"] = [get("token_embd.weight" if tie else "output.weight")]
    return out


def load_gguf_model(path: Path, config, lib: ctypes.CDLL, max_len: int | None = None,
                    max_rows: int = DEFAULT_MAX_ROWS, math: str | None = None):
    """A LlamaForCausalLM whose weights are views of the memory-mapped GGUF file: no dense
    copy. `math`: "int8" or "fp32" (default: `default_math()`). Returns (model, one-line
    description of the weight path)."""
    from corral.model.llama import LlamaForCausalLM, Rotary

    math = math or default_math()
    packed = read_gguf_weights(path, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_len)
    for name, parts in packed.items():
        if name.endswith(("layernorm", "norm")):
            norm = model.get_submodule(name if name != "norm" else "model.norm")
            w = dequantize_rows(lib, parts[0]).reshape(-1)
            if w.numel() != norm.weight.shape[0]:
                raise CorralError(f"{path.name}: {name} has {w.numel()} values, the config "
                                  f"expects {norm.weight.shape[0]}")
            norm.weight = nn.Parameter(w, requires_grad=False)
        elif name == "embed":
            model.model.embed_tokens = GGUFEmbedding(parts[0], lib)
        elif name == "lm_head":
            model.packed_lm_head = PackedLinear(parts, lib, max_rows, math=math)
        else:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            dense = getattr(parent, attr)
            layer = GGUFLinear(None, parts, lib, max_rows, math=math)
            if (layer.out_features, layer.in_features) != tuple(dense.weight.shape):
                raise CorralError(f"{path.name}: {name} is {layer.out_features}x"
                                  f"{layer.in_features}, the config expects "
                                  f"{tuple(dense.weight.shape)}")
            if dense.bias is not None:
                raise CorralError(f"{path.name}: {name} needs a bias, which GGUF Llamas lack")
            setattr(parent, attr, layer)
    tied = packed["lm_head"][0].offsets[0] == packed["embed"][0].offsets[0]
    n_repacked = 0
    if math == "int8":  # a tied head too: the embedding reads the file's rows (a few a step)
        n_repacked = sum(repack(lib, p) for name, parts in packed.items()
                         if name.endswith(("_proj", "lm_head")) for p in parts)
    if not model.tie:
        del model.lm_head  # the logits run on packed_lm_head
        model.tie = True  # no dense head: compute_logits takes packed_lm_head
    model.rotary = Rotary(config, model.max_len, device=torch.device("cpu"))
    model.eval()
    matmuls = [p for name, parts in packed.items()
               if name.endswith(("_proj", "lm_head")) for p in parts]
    kinds = sorted({p.kind for p in matmuls})
    size = sum(p.nbytes for ps in packed.values() for p in ps)
    model.n_params = sum(p.n * p.k for name, ps in packed.items() for p in ps
                         if not (tied and name == "lm_head"))
    isa = lib.gguf_isa().decode()
    desc = (f"GGUF {'/'.join(kinds)} memory-mapped ({size / 2**20:.0f} MiB, no dense copy), "
            f"{isa} kernels for all {len(matmuls)} matmul parts ({_math_desc(matmuls, math, max_rows)})"
            + (f", {n_repacked} repacked at load" if n_repacked else ""))
    return model, desc + attach_fused(model)


def attach_fused(model) -> str:
    """Attach the fused C decode step where it applies (model.fused_decode); a note for the
    weight-path description."""
    from corral.model import fused_decode

    return ", fused C decode step" if fused_decode.attach(model) is not None else ""


def _math_desc(parts: list[PackedWeight], math: str, max_rows: int) -> str:
    fp32 = f"fp32 tile kernel for steps <= {max_rows} tokens, dequantized panels above"
    n_int = sum(p.int_path() for p in parts) if math == "int8" else 0
    if n_int == 0:
        return fp32
    if n_int == len(parts):
        return "int8 activations x quantized blocks"
    return f"int8 activations for {n_int}, {fp32} for the rest"


# ---- dense models with packed weights (quantize.py) ------------------------------------------

def lm_head_weight(model) -> torch.Tensor:
    """The dense weight the logits matmul uses (the embedding when tied)."""
    return model.model.embed_tokens.weight if model.tie else model.lm_head.weight


def install_packed(model, packed: dict[str, PackedWeight], lib: ctypes.CDLL,
                   max_rows: int, keep_dense: bool = False, math: str = "fp32") -> list[str]:
    """Route the named Linear layers (and "lm_head") of a dense model through their packed
    weights; a layer whose shape differs stays dense. Without `keep_dense` the dense weights
    are dropped (their memory is freed); the tied embedding then reads the packed rows too.
    Returns the names installed."""
    installed = []
    for name, w in packed.items():
        if name == "lm_head":
            weight = lm_head_weight(model)
            if tuple(weight.shape) != (w.n, w.k):
                continue
            # a plain attribute, not a module: the state_dict keeps its names
            model.packed_lm_head = PackedLinear([w], lib, max_rows, weight if keep_dense else None,
                                                math=math)
            if not keep_dense:
                if model.tie:
                    model.model.embed_tokens = GGUFEmbedding(w, lib)
                else:
                    del model.lm_head
                    model.tie = True
        else:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            dense = getattr(parent, attr)
            if tuple(dense.weight.shape) != (w.n, w.k):
                continue
            if keep_dense:
                layer = GGUFLinear(dense, w, lib, max_rows, math=math)
            else:
                bias = None if dense.bias is None else dense.bias.detach()
                layer = GGUFLinear(None, w, lib, max_rows, bias, math)
            setattr(parent, attr, layer)
        installed.append(name)
    return installed
