"""Opt-in Q8_0 / Q4_0 weights for CPU inference of any fp32 Llama (`EngineConfig.quantization`).

CPU decode is memory-bound: each token reads every weight. Quantizing the decoder's Linear
weights, the lm_head and the embedding (tied or not) to ggml's blocks lets every step run the
kernels of `gguf_kernels.py` on 3.8x (Q8_0) or 7x (Q4_0) fewer bytes. The dense fp32 weights are
dropped once packed: decode and prefill both read the blocks. Numerics change: greedy output
may differ from the fp32 model's (the weights are rounded, and with math="int8", the default,
the activations too, as in llama.cpp).

  Q8_0, per 32 weights: fp16 d = max|w| / 127, int8 q = round(w / d)
  Q4_0, per 32 weights: fp16 d = w_absmax_signed / -8, q = clamp(trunc(w / d + 8.5), 0, 15)
both byte for byte as ggml's reference quantizers (and `gguf.quants.quantize`). The kernel
library's C quantizer (`gguf_quantize_rows`: fp32, fp16 or bf16 rows in, ~1 ns a weight) packs
when the library is built; the torch functions below are the reference (tests hold the C bytes
to them) and the path without a compiler.
"""

from __future__ import annotations

import ctypes
import os
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from corral.errors import CorralError
from corral.model import gguf_kernels as gk

QUANTIZATIONS = ("q8_0", "q4_0")


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), computed as gguf's numpy quantizer does."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def _blocks(weight: torch.Tensor, kind: str) -> torch.Tensor:
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"{kind.upper()} needs K a multiple of 32, got {k}")
    return weight.detach().to(torch.float32).reshape(n, k // 32, 32)


def quantize_q8_0(weight: torch.Tensor) -> gk.PackedWeight:
    """fp32 [n, k] (k a multiple of 32) -> Q8_0 rows: d computed and used in fp32, stored fp16."""
    n = weight.shape[0]
    blocks = _blocks(weight, "q8_0")
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # [n, nb, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(blocks * inv).to(torch.int8)  # |w * inv| <= 127 (+ rounding), never clamps
    data = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return gk.PackedWeight.from_rows("q8_0", data.reshape(n, -1).contiguous())


def quantize_q4_0(weight: torch.Tensor) -> gk.PackedWeight:
    """fp32 [n, k] -> Q4_0 rows, as gguf's numpy quantizer: d = (the signed value of largest
    magnitude) / -8 in fp32, q = trunc(w / d + 8.5) clipped to [0, 15], low nibbles first."""
    n = weight.shape[0]
    blocks = _blocks(weight, "q4_0")
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    d = blocks.gather(-1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    data = torch.cat([d.to(torch.float16).view(torch.uint8), qs], dim=-1)
    return gk.PackedWeight.from_rows("q4_0", data.reshape(n, -1).contiguous())


QUANTIZERS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0}
CHUNK_BYTES = 1 << 20  # fp32 rows quantized at a time: the quantizers make ~6 temporaries
READ_BYTES = 4 << 20  # file bytes read per C quantizer call (the only buffer it needs)
# the row types the C quantizer reads (ggml type ids), by torch dtype and safetensors dtype
SRC_TYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
FILE_TYPE_IDS = {"F32": 0, "F16": 1, "BF16": 30}


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one packed row of `k` values (k a multiple of 32)."""
    _, per_block, block_bytes = gk.TYPES[gk.TYPE_IDS[kind.upper()]]
    return k // per_block * block_bytes


def quantize_c(lib: ctypes.CDLL, src: int, src_type: int, n: int, k: int, kind: str, out: int,
               num_threads: int | None = None) -> None:
    """The library's quantizer: `n` rows of `k` values of ggml type `src_type` (F32 0, F16 1,
    BF16 30) at address `src` -> packed `kind` rows at address `out`; the same bytes as
    `QUANTIZERS[kind]` on the rows as fp32."""
    rc = lib.gguf_quantize_rows(gk.TYPE_IDS[kind.upper()], src_type, src, n, k, out,
                                num_threads or torch.get_num_threads())
    if rc:
        raise ValueError(f"{kind.upper()} quantizer: rows of type {src_type}, K={k} unsupported")


def pack(weight: torch.Tensor, kind: str, lib: ctypes.CDLL | None = None) -> gk.PackedWeight:
    """`weight` [n, k] packed as `kind`: by the C quantizer in one call when `lib` is given,
    else `QUANTIZERS[kind](weight)` over chunks of rows (each row's blocks are independent, so
    the result is the same): its full-size temporaries would otherwise be several times the
    weight, e.g. ~10 GB for Llama 3's 128k x 4096 embedding."""
    n, k = weight.shape
    if lib is not None:
        if k % 32:
            raise ValueError(f"{kind.upper()} needs K a multiple of 32, got {k}")
        w = weight.detach()
        w = (w if w.dtype in SRC_TYPE_IDS else w.float()).contiguous()
        out = np.empty((n, row_bytes(kind, k)), np.uint8)
        quantize_c(lib, w.data_ptr(), SRC_TYPE_IDS[w.dtype], n, k, kind, out.ctypes.data)
        return gk.PackedWeight.from_rows(kind, out)
    rows = max(1, CHUNK_BYTES // (4 * k))
    if n <= rows:
        return QUANTIZERS[kind](weight)
    chunks = [QUANTIZERS[kind](weight[r:r + rows]).base for r in range(0, n, rows)]
    return gk.PackedWeight.from_rows(kind, np.concatenate(chunks))


def attach_quantized(model, kind: str = "q8_0", max_rows: int = gk.DEFAULT_MAX_ROWS,
                     math: str | None = None) -> str:
    """Quantize `model`'s decoder Linear weights, its lm_head and its embedding to `kind` for
    the kernels, one layer at a time, dropping each dense weight once packed. `math`: "int8" (activations
    quantized too, integer dot products) or "fp32"; default `gk.default_math()`.

    Matmuls whose K is not a multiple of 32 stay dense. Returns a one-line description of the
    weight path, for `info["weights"]`.
    """
    math = math or gk.default_math()
    lib = gk.load_library()
    if lib is None:
        return f"dense fp32 ({kind.upper()} kernels unavailable)"
    names = [f"model.layers.{i}.{part}" for i in range(len(model.model.layers))
             for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                          "mlp.down_proj")]
    n = 0
    for name in [*names, "lm_head"]:
        w = gk.lm_head_weight(model) if name == "lm_head" else model.get_submodule(name).weight
        if w.shape[1] % 32:
            continue
        # packed and installed one at a time: peak memory stays the dense model + one layer
        n += len(gk.install_packed(model, {name: pack(w, kind, lib)}, lib, max_rows,
                                   math=math))
    total = 4 * len(model.model.layers) + 1
    dense_note = f"; {total - n} with K not a multiple of 32 stay dense" if n < total else ""
    embed = model.model.embed_tokens
    if isinstance(embed, nn.Embedding) and embed.weight.shape[1] % 32 == 0:
        # an untied embedding (a tied one reads the lm_head's rows already): packed too, as
        # llama.cpp keeps token_embd quantized, so no dense view of the weights file stays
        model.model.embed_tokens = gk.GGUFEmbedding(pack(embed.weight, kind, lib), lib)
    elif isinstance(embed, nn.Embedding):
        dense_note += "; the embedding stays dense"
    return (f"{kind.upper()} (quantized at load, no dense copy) {lib.gguf_isa().decode()} "
            f"kernels for {n}/{total} matmuls{dense_note}{gk.attach_fused(model)}")


def attach_q8_0(model, max_rows: int = gk.DEFAULT_MAX_ROWS) -> str:
    """`attach_quantized(model, "q8_0")` (the name earlier callers use)."""
    return attach_quantized(model, "q8_0", max_rows)


def pack_file_rows(entries: list, kind: str, lib: ctypes.CDLL | None = None) -> gk.PackedWeight:
    """The rows of one or more 2-D safetensors entries (`loading.safetensors_index`), stacked,
    packed as `kind` a few rows at a time (blocks never cross rows, so this equals packing the
    whole stacked matrix), so no fp32 copy of the tensor is ever whole: Llama 3's embedding
    would be 2 GB. With `lib`, the file's bytes are read into one reused buffer and the C
    quantizer widens and packs them; without, torch converts to fp32 and `QUANTIZERS` packs."""
    from corral.loading import read_tensor

    k = entries[0][2][1]
    if k % 32 or any(e[2][1] != k for e in entries):
        raise ValueError(f"{kind.upper()} needs one K, a multiple of 32: {[e[2] for e in entries]}")
    out = np.empty((sum(e[2][0] for e in entries), row_bytes(kind, k)), np.uint8)
    if lib is not None:
        _pack_file_rows_c(entries, kind, lib, out)
        return gk.PackedWeight.from_rows(kind, out)
    step = max(1, CHUNK_BYTES // (4 * k))
    row = 0
    for entry in entries:
        n = entry[2][0]
        for r in range(0, n, step):
            rows = read_tensor(entry, (r, min(r + step, n))).float()
            out[row:row + len(rows)] = QUANTIZERS[kind](rows).base
            row += len(rows)
    return gk.PackedWeight.from_rows(kind, out)


def _pack_file_rows_c(entries: list, kind: str, lib: ctypes.CDLL, out: np.ndarray) -> None:
    """`pack_file_rows` on the C quantizer: chunks of up to READ_BYTES of rows, each read with a
    plain `pread` (no mapping, as `read_tensor`) into a reused buffer and packed straight into
    its rows of `out` by one C thread. torch.get_num_threads() workers take chunks in turn: the
    reads run in parallel too, and no worker waits on another's chunk (OpenMP's barriers after
    every chunk cost more than the chunk on a busy machine)."""
    k, out_row = entries[0][2][1], out.shape[1]
    jobs = []  # (file, source type, file offset, rows, bytes, first row of out)
    row = 0
    for path, dtype, (n, _), start, end in entries:
        if dtype not in FILE_TYPE_IDS:
            raise CorralError(f"{path}: weights of dtype {dtype} (Corral reads F32, F16, BF16)")
        in_row = (end - start) // n
        step = max(1, READ_BYTES // in_row)
        jobs += [(path, FILE_TYPE_IDS[dtype], start + r * in_row, min(step, n - r),
                  min(step, n - r) * in_row, row + r) for r in range(0, n, step)]
        row += n
    buffers: queue.SimpleQueue = queue.SimpleQueue()  # one per worker, reused
    files: dict = {}

    def run(job: tuple) -> None:
        path, tid, offset, m, size, first = job
        try:
            buf = buffers.get_nowait()
        except queue.Empty:
            buf = None
        if buf is None or len(buf) < size:
            buf = np.empty(max(READ_BYTES, size), np.uint8)
        try:
            view, got = memoryview(buf), 0
            while got < size:  # pread may return less than asked
                r = os.preadv(files[path], [view[got:size]], offset + got)
                if r <= 0:
                    raise CorralError(f"{path}: truncated weights file")
                got += r
            quantize_c(lib, buf.ctypes.data, tid, m, k, kind, out.ctypes.data + first * out_row, 1)
        finally:
            buffers.put(buf)

    try:
        for path in {j[0] for j in jobs}:
            files[path] = os.open(path, os.O_RDONLY)
        workers = min(torch.get_num_threads(), len(jobs))
        if workers <= 1:
            for job in jobs:
                run(job)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, jobs))  # re-raises a worker's error
    finally:
        for fd in files.values():
            os.close(fd)


def load_quantized(folder, config, kind: str = "q8_0", max_len: int | None = None,
                   max_rows: int = gk.DEFAULT_MAX_ROWS, math: str | None = None):
    """(model, weight-path description) for an HF safetensors folder quantized to `kind` while
    it is read: every weight is read a few rows at a time with plain file reads (no mapping)
    and packed by the library's C quantizer (`pack_file_rows`). The peak is the packed model plus small buffers, never the
    dense model (`from_folder` + `attach_quantized` hold the whole fp32 copy first: 32 GB for
    a bf16 Llama 3 8B). Same blocks as `attach_quantized`. None when the kernel library
    cannot be built or the hidden size is not a multiple of 32 (the caller loads dense and
    `attach_quantized` packs what it can)."""
    from corral.loading import read_tensor, release_freed_memory, safetensors_index
    from corral.model.llama import LlamaForCausalLM, Rotary

    math = math or gk.default_math()
    lib = gk.load_library()
    if lib is None or config.hidden_size % 32:
        return None
    index = safetensors_index(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_len)

    def entries(*names: str) -> list:
        missing = [n for n in names if n not in index]
        if missing:
            raise CorralError(f"{folder}: weight {missing[0]} is missing (is this a Llama "
                              "checkpoint?)")
        return [index[n] for n in names]

    def small(name: str) -> nn.Parameter:  # norms, biases: fp32 in their own memory
        return nn.Parameter(torch.cat([read_tensor(e).float() for e in entries(name)]),
                            requires_grad=False)

    n_repacked = 0

    def repacked(w: gk.PackedWeight) -> gk.PackedWeight:
        """int8 math: w in the library's repacked tiles (x86 SIMD builds), its rows freed, so
        memory holds one form of each weight (while it is packed: both, one matrix at a time)."""
        nonlocal n_repacked
        if math == "int8" and gk.repack(lib, w):
            w.drop_rows()
            n_repacked += 1
        return w

    def linear(path: str, names: list[str]) -> bool:
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, attr)
        parts = entries(*names)
        shape = (sum(e[2][0] for e in parts), parts[0][2][1])
        if shape != tuple(dense.weight.shape):
            raise CorralError(f"{folder}: {path} is {shape}, the config expects "
                              f"{tuple(dense.weight.shape)}")
        bias = None
        if dense.bias is not None:
            biases = entries(*[n.replace(".weight", ".bias") for n in names])
            bias = torch.cat([read_tensor(e).float() for e in biases])
        if shape[1] % 32:  # no block layout: stays dense
            dense.weight = nn.Parameter(torch.cat([read_tensor(e).float() for e in parts]),
                                        requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias, requires_grad=False)
            return False
        packed = repacked(pack_file_rows(parts, kind, lib))
        setattr(parent, attr, gk.GGUFLinear(None, packed, lib, max_rows, bias, math))
        return True

    n = 0
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        n += linear(a + "qkv_proj", [f"{a}{x}_proj.weight" for x in "qkv"])
        n += linear(a + "o_proj", [a + "o_proj.weight"])
        n += linear(m + "gate_up_proj", [m + "gate_proj.weight", m + "up_proj.weight"])
        n += linear(m + "down_proj", [m + "down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            model.get_submodule(p + norm).weight = small(f"{p}{norm}.weight")
        release_freed_memory()  # glibc keeps the freed read buffers otherwise (~1 layer each)
    model.model.norm.weight = small("model.norm.weight")
    # tied: the embedding reads the head's blocks; untied: its own (llama.cpp keeps
    # token_embd quantized too)
    head = "model.embed_tokens.weight" if model.tie else "lm_head.weight"
    packed_head = pack_file_rows(entries(head), kind, lib)
    if not model.tie:  # a tied head's rows are the embedding's too: they stay rows
        packed_head = repacked(packed_head)
    release_freed_memory()
    model.packed_lm_head = gk.PackedLinear([packed_head], lib, max_rows, math=math)
    if model.tie:
        packed_embed = packed_head
    else:
        packed_embed = pack_file_rows(entries("model.embed_tokens.weight"), kind, lib)
        del model.lm_head
        model.tie = True  # no dense head: compute_logits takes packed_lm_head
    model.model.embed_tokens = gk.GGUFEmbedding(packed_embed, lib)
    release_freed_memory()  # the read buffers and quantizer temporaries
    model.rotary = Rotary(config, model.max_len, device=torch.device("cpu"))
    model.eval()
    total = 4 * config.num_hidden_layers + 1
    dense_note = f"; {total - n - 1} with K not a multiple of 32 stay dense" if n + 1 < total \
        else ""
    return model, (f"{kind.upper()} (quantized at load, no dense copy) "
                   f"{lib.gguf_isa().decode()} kernels for {n + 1}/{total} matmuls{dense_note}"
                   + (f", {n_repacked} repacked at load" if n_repacked else "")
                   + gk.attach_fused(model))
