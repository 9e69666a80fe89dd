"""Opt-in Q8_0 weights for CPU decode of any fp32 Llama (`EngineConfig.quantization="q8_0"`).

Single-stream CPU decode is memory-bound: each token reads every fp32 weight. Quantizing the
decoder's Linear weights and the lm_head to ggml's Q8_0 blocks (per 32 weights along K: an fp16
scale d = max|w| / 127 and 32 int8 q = round(w / d)) lets decode steps run the GGUF kernels of
`gguf_kernels.py` on ~3.8x fewer bytes. Steps above `max_rows` tokens (long prefills) keep the
dense fp32 weights, which stay in memory; steps up to `max_rows` (decode, short prefills) see the
Q8_0 weights. Numerics change: greedy output may differ from the fp32 model's.
"""

from __future__ import annotations

import torch

from corral.model import gguf_kernels as gk

QUANTIZATIONS = ("q8_0",)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), computed as gguf's numpy quantizer does."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def quantize_q8_0(weight: torch.Tensor) -> gk.PackedWeight:
    """fp32 [n, k] (k a multiple of 32) -> Q8_0 rows, byte for byte as ggml's reference
    quantizer (and `gguf.quants.quantize`): d computed and used in fp32, stored as fp16."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"Q8_0 needs K a multiple of 32, got {k}")
    blocks = weight.detach().to(torch.float32).reshape(n, k // 32, 32)  # [n, nb, 32]
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # [n, nb, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(blocks * inv).to(torch.int8)  # |w * inv| <= 127 (+ rounding), never clamps
    data = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)
    return gk.PackedWeight("q8_0", data.reshape(n, -1).contiguous(), n, k)


def attach_q8_0(model, max_rows: int = gk.DEFAULT_MAX_ROWS) -> str:
    """Quantize `model`'s decoder Linear weights and its lm_head to Q8_0 for the GGUF kernels.

    Matmuls whose K is not a multiple of 32 stay dense. Returns a one-line description of the
    weight path, for `info["weights"]`.
    """
    lib = gk.load_library()
    if lib is None:
        return "dense fp32 (Q8_0 kernels unavailable)"
    names = [f"model.layers.{i}.{part}" for i in range(len(model.model.layers))
             for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                          "mlp.down_proj")]
    weights = {name: model.get_submodule(name).weight for name in names}
    weights["lm_head"] = gk.lm_head_weight(model)
    packed = {name: quantize_q8_0(w) for name, w in weights.items() if w.shape[1] % 32 == 0}
    n = len(gk.install_packed(model, packed, lib, max_rows))
    total = 4 * len(model.model.layers) + 1
    dense_note = f"; {total - n} with K not a multiple of 32 stay dense" if n < total else ""
    return (f"Q8_0 (quantized at load) kernels for {n}/{total} matmuls "
            f"(steps <= {max_rows} tokens), dense fp32 above{dense_note}")
