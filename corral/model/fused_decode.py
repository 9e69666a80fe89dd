"""The whole decoder stack of a decode step in one C call (csrc/decode_step.c), on packed weights.

A decode step of a small quantized model spends as long around its matmul kernels as in them:
~120 ctypes calls, each with its own OpenMP fork/join, and ~300 small torch ops (norms, rope,
SiLU, adds). When every linear of the model runs on packed blocks (a .gguf file, or
`--quantize q8_0|q4_0`), `attach` builds a `FusedDecoder` once at load: per layer, the
addresses of the norm weights and of each matmul's parts (types, row-offset tables) packed
into a ctypes struct array. A step of B sequences with one new token each then runs
RMSNorm -> qkv -> RoPE -> paged KV write -> paged attention -> o_proj + residual -> RMSNorm ->
gate|up -> SiLU * up -> down + residual for every layer, and the final norm, in one OpenMP
region (see the C file). The embedding lookup and RoPE's cos/sin rows stay in Python (every
rope type, dynamic NTK included, comes from the model's own `Rotary`), and so does the LM head.

Prefill and mixed steps run here too: a chunk of n tokens is n rows with the same block table
and contexts growing by one, and all rows' k/v reach the cache before any row attends. Anything
else runs the per-module Python path (`FusedDecoder.applies`): prefill chunks attending to more
than MAX_PREFILL_CONTEXT keys or of a model without GQA, rows under a LoRA adapter, a non-fp32
or non-CPU batch, fp32 math above `max_rows`.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from corral.model import cbuild
from corral.model import gguf_kernels as gk
from corral.model.lora import LoRALinear

MAX_PARTS = 4  # parts of one fused matmul (q|k|v: 3 when their types differ)
# Prefill chunks run in the fused step while their context is at most this long: each token
# attends as a decode row, re-reading its prefix, where SDPA's flash kernel tiles queries. Measured
# (2 threads, Sapphire Rapids, prompt tok/s fused vs layer path): SmolLM2 Q4_1 64 tokens 1050 vs
# 795, 256: 1112 vs 1050, 1024: 768 vs 840; Llama-1B-shape Q4_K_M 512: 204 vs 168, 1024: 171
# vs 160, 2048: 130 vs 150. Models without GQA (Llama 2 7B/13B) keep their prefills on the layer
# path: with one query head per kv head each row's k/v read serves one head (Llama-2-7B shape
# Q4_K_M, 512 tokens: 24.3 tok/s fused vs 27.1).
MAX_PREFILL_CONTEXT = 768

_libs: dict[str, ctypes.CDLL | None] = {}


class _Part(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("n", ctypes.c_int), ("use_int", ctypes.c_int),
                ("base", ctypes.c_void_p), ("offsets", ctypes.c_void_p)]


class _Mat(ctypes.Structure):
    _fields_ = [("nparts", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("forms", ctypes.c_int), ("parts", _Part * MAX_PARTS)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("qkv", _Mat), ("o", _Mat), ("gate_up", _Mat), ("down", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("n_layers", ctypes.c_int), ("D", ctypes.c_int), ("nh", ctypes.c_int),
                ("nkv", ctypes.c_int), ("hd", ctypes.c_int), ("inter", ctypes.c_int),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def load_library(variant: str) -> ctypes.CDLL | None:
    """decode_step.c built with the flags of gguf_gemm's `variant` (it includes gguf_gemm.c and
    paged_attention.c), once per process; None if it cannot be built."""
    if variant in _libs:
        return _libs[variant]
    _libs[variant] = None
    path, why = cbuild.build("decode_step", gk.find_compiler(),
                             gk.COMMON_CFLAGS + gk.VARIANT_CFLAGS[variant],
                             deps=("gguf_gemm", "paged_attention"))
    lib = None
    if path is not None:
        lib, why = cbuild.load(path)
    if lib is None:
        print(f"corral: fused C decode step unavailable ({why}); decoding layer by layer",
              file=sys.stderr, flush=True)
        return None
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.decode_step.argtypes = [p, p, p, p, p, p, i32, i32, p, p, ctypes.c_int64, p, i32, p, i32,
                                i32]
    lib.decode_step.restype = i32
    _libs[variant] = lib
    return lib


def _variant_of(lib: ctypes.CDLL) -> str | None:
    return next((v for v, candidate in gk._libs.items() if candidate is lib), None)


def _packed(module) -> gk.PackedLinear | None:
    """The PackedLinear a decoder linear runs on (under a LoRA wrapper too), if it has one."""
    if isinstance(module, LoRALinear):
        module = module.base
    fast = getattr(module, "fast", None) if isinstance(module, gk.GGUFLinear) else None
    return fast if isinstance(fast, gk.PackedLinear) and fast.bias is None else None


def _mat(lin: gk.PackedLinear, keep: list) -> _Mat:
    if len(lin.parts) > MAX_PARTS:
        raise ValueError("too many parts")
    m = _Mat(nparts=len(lin.parts), n=sum(p.n for p in lin.parts), k=lin.parts[0].k, forms=0)
    for i, w in enumerate(lin.parts):
        use_int = lin.math == "int8" and w.int_ok
        if use_int:
            m.forms |= 1 if gk.INT_BLOCK[w.type_id] == 32 else 2
        m.parts[i] = (_Part(w.int_type, w.n, 1, w.int_base_ptr, w.offsets_ptr) if use_int
                      else _Part(w.type_id, w.n, 0, w.rows(), w.offsets_ptr))
        keep.append(w)  # the struct holds raw addresses into these arrays
    return m


class FusedDecoder:
    """Runs a step of `model` (decodes, short prefill chunks) in one C call. `steps` counts the
    steps it ran (tests use it to tell a silent fallback from the fast path)."""

    def __init__(self, model, lib: ctypes.CDLL, linears: list[list[gk.PackedLinear]]):
        cfg = model.config
        layers = model.model.layers
        self.lib = lib
        self.steps = 0
        # fp32-math layers run the tile kernel up to max_rows rows only (panels above)
        self.max_rows = min((lin.max_rows for ls in linears for lin in ls if not lin.all_int),
                            default=None)
        self._keep: list = []
        self._layers = (_Layer * len(layers))()
        for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(layers, linears)):
            an, fn = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            self._keep += [an, fn]
            self._layers[i] = _Layer(an.data_ptr(), fn.data_ptr(), _mat(qkv, self._keep),
                                     _mat(o, self._keep), _mat(gate_up, self._keep),
                                     _mat(down, self._keep))
        attn = layers[0].self_attn
        final = model.model.norm.weight
        self._keep.append(final)
        self._spec = _Model(ctypes.addressof(self._layers), final.data_ptr(), len(layers),
                            cfg.hidden_size, attn.nh, attn.nkv, attn.hd, layers[0].mlp.inter,
                            float(cfg.rms_norm_eps), float(attn.scale))
        self._spec_ptr = ctypes.addressof(self._spec)
        self._attn0 = attn  # where a LoRA wrapper would sit (LoRAManager wraps every layer)
        self.gqa = attn.nh > attn.nkv  # prefill chunks run here only then (MAX_PREFILL_CONTEXT)
        self._kv: tuple | None = None  # (the cache list, its k/v pointer arrays, block size)

    def applies(self, x: torch.Tensor, meta) -> bool:
        """An fp32 step on the CPU without LoRA rows, within the kernels' row limit, whose
        prefill chunks (if any: GQA models only) attend to at most MAX_PREFILL_CONTEXT keys."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        nd = meta.num_decodes
        if nd != len(meta.query_lens) and (
                not self.gqa or max(meta.context_lens_host[nd:]) > MAX_PREFILL_CONTEXT):
            return False  # per-row attention re-reads a long context per row: SDPA's flash wins
        if self.max_rows is not None and x.shape[0] > self.max_rows:
            return False  # the fp32 path runs dequantized panels there
        qkv = self._attn0.qkv_proj  # LoRA rows: this step's deltas live in the wrappers
        lora = isinstance(qkv, LoRALinear) and (qkv.step.groups or qkv.step.stacked is not None)
        return not lora

    def _cache_pointers(self, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]):
        if self._kv is None or self._kv[0] is not kv_cache:
            k0 = kv_cache[0][0]
            if k0.dtype not in (torch.float32, torch.float16) or not all(
                    k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == k0.dtype
                    for k, v in kv_cache):
                raise ValueError("the fused decode step needs contiguous fp32 or fp16 KV caches")
            n = len(kv_cache)
            kp = (ctypes.c_void_p * n)(*[k.data_ptr() for k, _ in kv_cache])
            vp = (ctypes.c_void_p * n)(*[v.data_ptr() for _, v in kv_cache])
            self._kv = (kv_cache, kp, vp, int(k0.dtype == torch.float16), k0.shape[1])
        return self._kv[1:]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta,
                 kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [B, D] (the embeddings; updated in place), cos/sin [B, hd] -> normed hidden [B, D]."""
        kp, vp, f16, bs = self._cache_pointers(kv_cache)
        b = x.shape[0]
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        tables, ctx = meta.block_tables, meta.context_lens
        multi = meta.num_decodes != len(meta.query_lens)
        if multi:  # a prefill chunk of n tokens: n rows, the same table, contexts growing by 1
            tables, ctx = _per_row(tables, meta.query_lens, meta.context_lens_host)
        if tables.stride(-1) != 1:
            tables = tables.contiguous()
        slots, ctx = meta.slot_mapping.contiguous(), ctx.contiguous()
        out = torch.empty_like(x)
        rc = self.lib.decode_step(self._spec_ptr, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                  kp, vp, f16, bs, slots.data_ptr(), tables.data_ptr(),
                                  tables.stride(0), ctx.data_ptr(), b, out.data_ptr(),
                                  torch.get_num_threads(), int(multi))
        if rc:
            raise MemoryError("fused decode step: no memory for its buffers")
        self.steps += 1
        return out


def _per_row(tables: torch.Tensor, query_lens: list[int],
             context_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence block tables and lengths -> one table row and context length per token:
    token j of a chunk of n tokens ending at context c attends to c - n + j + 1 keys."""
    qlen = torch.tensor(query_lens)
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), qlen)
    first = torch.cumsum(qlen, 0) - qlen
    ctx = torch.tensor(context_lens)[seq] - qlen[seq] + torch.arange(len(seq)) - first[seq] + 1
    return tables.index_select(0, seq), ctx


def attach(model) -> FusedDecoder | None:
    """Give `model` a FusedDecoder (`model.fused_decode`) when every decoder linear runs on
    packed weights without a bias, on one kernel library; returns it, or None (unchanged)."""
    linears = []
    for layer in model.model.layers:
        mods = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                layer.mlp.down_proj)
        packed = [_packed(mod) for mod in mods]
        if any(p is None or len(p.parts) > MAX_PARTS for p in packed):
            return None
        linears.append(packed)
    norms = [n.weight for layer in model.model.layers
             for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
               for w in [*norms, model.model.norm.weight]):
        return None
    libs = {id(p.lib) for ls in linears for p in ls}
    variant = _variant_of(linears[0][0].lib) if len(libs) == 1 else None
    if variant is None:
        return None
    lib = load_library(variant)
    if lib is None:
        return None
    model.fused_decode = FusedDecoder(model, lib, linears)
    return model.fused_decode
