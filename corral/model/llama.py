"""Our Llama: the whole forward pass in one file, written for the engine's flat, paged batches.

Shapes: T = tokens in this step (all sequences concatenated), D = hidden size,
nh / nkv = query / key-value heads (GQA: nh is a multiple of nkv), hd = head dim.

Weights keep Hugging Face's names, except that q/k/v and gate/up are fused at load time into
`qkv_proj` and `gate_up_proj` (one matmul instead of three / two).
RoPE frequencies come from `transformers`' own rope functions (default, linear, dynamic NTK,
llama3, YaRN), so scaling matches the reference by construction.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from corral.errors import CorralError
from corral.model.attention import AttentionMetadata, paged_attention, write_kv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like the reference, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin per position. Static types use a table; dynamic NTK recomputes the base from the
    length of the sequence's current chunk, as `transformers` does for a growing sequence."""

    def __init__(self, config, max_len: int, device: torch.device | None = None):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = config.rope_parameters
        self.rope_type = params.get("rope_type", "default")
        self.head_dim = head_dim_of(config)
        self.config = config
        if self.rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float,
                                                    device=device) / self.head_dim))
            scaling = 1.0
        else:
            if self.rope_type not in ROPE_INIT_FUNCTIONS:
                raise CorralError(f"unsupported rope scaling type {self.rope_type!r}")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, device)
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        cos, sin = self._table(torch.arange(max_len, device=device), self.inv_freq)
        self.register_buffer("cos", cos, persistent=False)  # [max_len, hd]
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, positions: torch.Tensor, inv_freq: torch.Tensor):
        freqs = positions[:, None].float() * inv_freq  # inv_freq [hd/2] or [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def forward(self, positions: torch.Tensor, rope_lens: torch.Tensor | None = None):
        """cos, sin for each token: [T, hd]. rope_lens (dynamic NTK only): per token, the length
        its sequence reaches at the end of this chunk."""
        if self.rope_type != "dynamic" or rope_lens is None:
            return self.cos[positions], self.sin[positions]
        p = self.config.rope_parameters
        orig = self.config.max_position_embeddings
        seq_len = rope_lens.clamp(min=orig).double()
        dim = self.head_dim
        base = p["rope_theta"] * ((p["factor"] * seq_len / orig) - (p["factor"] - 1)) ** (
            dim / (dim - 2))
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv_freq = 1.0 / (base[:, None].float() ** exps[None, :])  # [T, hd/2]
        return self._table(positions, inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos/sin: [T, hd]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nh = config.num_attention_heads
        self.nkv = config.num_key_value_heads
        self.hd = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = nn.Linear(config.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hd, config.hidden_size, bias=bias)
        self.scale = 1.0 / math.sqrt(self.hd)

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = apply_rope(q.view(t, self.nh, self.hd), cos, sin)
        k = apply_rope(k.view(t, self.nkv, self.hd), cos, sin)
        v = v.view(t, self.nkv, self.hd)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, nh, hd]
        return self.o_proj(o.reshape(t, self.nh * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.inter = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = nn.Linear(self.inter, config.hidden_size, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        # built on the meta device and assigned real weights later: `_weight` skips the random
        # init, whose normal_ on meta imports torch._dynamo on first use (~1 s, ~100 MB RSS)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama decoder. `forward` runs a flat paged batch and returns hidden states; call
    `compute_logits` on the rows that need them (last token of each sequence, usually)."""

    def __init__(self, config, max_len: int | None = None):
        super().__init__()
        self.config = config
        self.max_len = max_len or context_length(config)
        self.model = LlamaModel(config)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the rope tables are built by the loaders, on the real device (from_folder, random,
        # gguf_kernels.load_gguf_model): a first meta-device arange would import torch._dynamo
        self.rotary: Rotary | None = None
        # optional logits matmul on packed GGUF weights (model.gguf_kernels.attach_gguf_kernels)
        self.packed_lm_head = None
        # optional whole-stack decode step in C on packed weights (model.fused_decode.attach)
        self.fused_decode = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
                rope_lens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, D]. kv_cache[l] = (k, v) blocks."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, rope_lens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.fused_decode is not None and self.fused_decode.applies(x, meta):
            return self.fused_decode(x, cos, sin, meta, kv_cache)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_cache):
            x = layer(x, cos, sin, meta, k_cache, v_cache)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] -> fp32 logits [N, vocab]."""
        if self.packed_lm_head is not None:
            return self.packed_lm_head(hidden).float()
        w = self.model.embed_tokens.weight if self.tie else self.lm_head.weight
        return F.linear(hidden, w).float()

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path, config, dtype: torch.dtype, device: torch.device,
                    max_len: int | None = None) -> LlamaForCausalLM:
        """Build on the meta device, then load HF-named safetensors weights (fusing q/k/v and
        gate/up) straight to `device`/`dtype`."""
        from corral.loading import iter_safetensors

        with torch.device("meta"):
            model = cls(config, max_len)
        state = _fuse_hf_weights(iter_safetensors(folder), config, model.tie)
        _assign(model, state, dtype, device, where=str(folder))
        return model

    @classmethod
    def random(cls, config, dtype: torch.dtype, device: torch.device, seed: int = 0,
               max_len: int | None = None) -> LlamaForCausalLM:
        """Random weights for benchmarks on real architectures (std 0.02 like HF's init)."""
        with torch.device("meta"):
            model = cls(config, max_len)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        state = {}
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                state[name] = torch.ones(p.shape)
            else:
                state[name] = torch.randn(p.shape, generator=gen, dtype=torch.bfloat16) * 0.02
        _assign(model, state, dtype, device, where="random init")
        return model


def _fuse_hf_weights(items, config, tie: bool) -> dict[str, torch.Tensor]:
    raw = {}
    for name, t in items:
        if "rotary_emb" in name:
            continue
        raw[name] = t
    if tie:
        raw.pop("lm_head.weight", None)
    out = {}
    for i in range(config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        m = f"model.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            parts = [raw.pop(f"{a}{p}_proj.{kind}", None) for p in ("q", "k", "v")]
            if all(p is not None for p in parts):
                out[f"{a}qkv_proj.{kind}"] = torch.cat(parts, 0)
            parts = [raw.pop(f"{m}{p}_proj.{kind}", None) for p in ("gate", "up")]
            if all(p is not None for p in parts):
                out[f"{m}gate_up_proj.{kind}"] = torch.cat(parts, 0)
    out.update(raw)
    return out


def _assign(model: nn.Module, state: dict[str, torch.Tensor], dtype, device, where: str) -> None:
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CorralError(f"{where}: weights missing for {len(missing)} parameters, e.g. "
                          f"{missing[0]} (is this a Llama-architecture checkpoint?)")
    for name, p in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(p.shape):
            raise CorralError(f"{where}: weight {name} has shape {tuple(t.shape)}, the config "
                              f"expects {tuple(p.shape)}")
        t = t.to(device=device, dtype=dtype)
        # small tensors (norms, biases) get their own memory: as views of a memory-mapped
        # safetensors file they would keep the whole mapping, and every page read from it,
        # alive after quantization at load has dropped the large weights
        state[name] = t.clone() if t.dim() == 1 else t
    extra = sorted(set(state) - set(expected))
    for name in extra:
        state.pop(name)
    model.load_state_dict(state, strict=True, assign=True)
    # buffers (rope tables) were built on meta: rebuild them on the real device
    model.rotary = Rotary(model.config, model.max_len, device=device)
    model.eval()


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def context_length(config) -> int:
    """Longest sequence the model serves: max_position_embeddings, stretched by factor for
    dynamic NTK (whose config keeps the original length, as transformers expects)."""
    n = int(config.max_position_embeddings)
    rp = getattr(config, "rope_parameters", None) or {}
    if rp.get("rope_type") == "dynamic":
        n = int(n * float(rp.get("factor", 1.0)))
    return n
