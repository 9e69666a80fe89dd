"""Opt-in Q8_0 / Q4_0 weights for CPU inference of any fp32 Llama (`EngineConfig.quantization`).

CPU decode is memory-bound: each token reads every weight. Quantizing the decoder's Linear
weights and the lm_head (and a tied embedding) to ggml's blocks lets every step run the kernels
of `gguf_kernels.py` on 3.8x (Q8_0) or 7x (Q4_0) fewer bytes. The dense fp32 weights are
dropped once packed: decode and prefill both read the blocks. Numerics change: greedy output
may differ from the fp32 model's (the weights are rounded, and with math="int8", the default,
the activations too, as in llama.cpp).

  Q8_0, per 32 weights: fp16 d = max|w| / 127, int8 q = round(w / d)
  Q4_0, per 32 weights: fp16 d = w_absmax_signed / -8, q = clamp(trunc(w / d + 8.5), 0, 15)
both byte for byte as ggml's reference quantizers (and `gguf.quants.quantize`).
"""

from __future__ import annotations

import torch

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


def attach_quantized(model, kind: str = "q8_0", max_rows: int = gk.DEFAULT_MAX_ROWS,
                     math: str | None = None) -> str:
    """Quantize `model`'s decoder Linear weights and its lm_head to `kind` for the kernels,
    one layer at a time, dropping each dense weight once packed. `math`: "int8" (activations
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
        n += len(gk.install_packed(model, {name: QUANTIZERS[kind](w)}, lib, max_rows,
                                   math=math))
    total = 4 * len(model.model.layers) + 1
    dense_note = f"; {total - n} with K not a multiple of 32 stay dense" if n < total else ""
    return (f"{kind.upper()} (quantized at load, no dense copy) {lib.gguf_isa().decode()} "
            f"kernels for {n}/{total} matmuls{dense_note}{gk.attach_fused(model)}")


def attach_q8_0(model, max_rows: int = gk.DEFAULT_MAX_ROWS) -> str:
    """`attach_quantized(model, "q8_0")` (the name earlier callers use)."""
    return attach_quantized(model, "q8_0", max_rows)
