"""Megatron-style tensor-parallel Llama: one shard of the weights per rank.

Each of the N ranks holds 1/N of every large matrix and runs the same forward on it:

    qkv_proj, gate_up_proj   column-parallel: rank r keeps its query/KV heads' rows and its
                             1/N of the MLP's intermediate rows; no communication
    o_proj, down_proj        row-parallel: the matching input columns; each rank's output is a
                             partial sum, completed by one all-reduce (RowParallelLinear)
    embed_tokens             vocab-parallel: rank r owns rows [r*Vs, (r+1)*Vs); tokens outside
                             embed to zero, one all-reduce gives everyone the full embedding
    lm_head (or tied embed)  vocab-parallel: each rank computes its Vs logits, gathered on rank 0

Norms and the rotary tables are replicated (small). The shard's own config (`shard_config`)
carries the per-rank head counts and sizes, so attention, the KV cache and the runner work on
the shard unchanged: rank r's cache holds only its KV heads.

Weights are read one tensor slice at a time (safetensors `get_slice`; random weights one
tensor at a time), so a rank never holds the whole model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from corral.errors import CorralError
from corral.model.llama import LlamaForCausalLM, _assign, _fuse_hf_weights, head_dim_of


@dataclass(frozen=True)
class Shard:
    """Which slice of the model this rank holds (sizes are the global model's)."""

    rank: int
    world: int
    num_heads: int  # query heads of the whole model
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def heads(self) -> int:  # per rank
        return self.num_heads // self.world

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads // self.world

    @property
    def inter(self) -> int:
        return self.intermediate // self.world

    @property
    def vocab_per_rank(self) -> int:  # the last rank's slice is padded with zero rows
        return math.ceil(self.vocab / self.world)

    def rows(self, size_per_rank: int) -> slice:
        return slice(self.rank * size_per_rank, (self.rank + 1) * size_per_rank)


def make_shard(config, rank: int, world: int) -> Shard:
    """The shard of `config` for `rank`; CorralError when the model does not split N ways."""
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    problems = [f"{what} ({n})" for what, n in (("attention heads", nh), ("KV heads", nkv),
                                                  ("MLP intermediate size", inter))
                if n % world]
    if problems:
        raise CorralError(f"--tensor-parallel-size {world} does not divide this model's "
                          f"{', '.join(problems)}; choose a size that divides the query heads "
                          f"{nh} and KV heads {nkv}")
    return Shard(rank, world, nh, nkv, head_dim_of(config), inter, config.vocab_size)


def shard_config(config, shard: Shard):
    """A copy of `config` with this rank's head counts and sizes (head_dim kept explicit)."""
    local = copy.deepcopy(config)
    local.head_dim = shard.head_dim
    local.num_attention_heads = shard.heads
    local.num_key_value_heads = shard.kv_heads
    local.intermediate_size = shard.inter
    local.vocab_size = shard.vocab_per_rank
    return local


class RowParallelLinear(nn.Linear):
    """A linear over this rank's input columns; the all-reduce completes the sum. The bias is
    loaded on rank 0 only (zeros elsewhere) so it is added once."""

    comm = None  # corral.engine.tp.Comm, set after construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(F.linear(x, self.weight, self.bias))


class VocabParallelEmbedding(nn.Embedding):
    """Rows [lo, lo + num_embeddings) of the embedding; other tokens embed to zero here and
    come from their owner through the all-reduce."""

    comm = None
    lo = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        x = x.masked_fill(outside[:, None], 0.0)
        return self.comm.all_reduce(x)


class TPLlamaForCausalLM(LlamaForCausalLM):
    """One rank's shard. On rank 0 `driver` (corral.engine.tp.TPDriver) sends each forward's
    inputs and each logits call's hidden rows to the other ranks first, so they run the same
    call on their shards in step."""

    def __init__(self, local_config, max_len: int | None, shard: Shard):
        super().__init__(local_config, max_len)
        self.shard = shard
        self.driver = None
        self.comm = None
        d = local_config.hidden_size
        self.model.embed_tokens = VocabParallelEmbedding(shard.vocab_per_rank, d)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj = RowParallelLinear(attn.o_proj.in_features, d,
                                            bias=attn.o_proj.bias is not None)
            mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, d,
                                              bias=mlp.down_proj.bias is not None)

    def attach(self, comm) -> None:
        """Give the parallel layers their communicator."""
        self.comm = comm
        self.model.embed_tokens.comm = comm
        self.model.embed_tokens.lo = self.shard.rank * self.shard.vocab_per_rank
        for layer in self.model.layers:
            layer.self_attn.o_proj.comm = comm
            layer.mlp.down_proj.comm = comm

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta, kv_cache, rope_lens=None):
        if self.driver is not None:
            self.driver.send_forward(input_ids, positions, meta, rope_lens)
        return super().forward(input_ids, positions, meta, kv_cache, rope_lens)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] -> fp32 logits [N, vocab] on rank 0; the other ranks get their own slice
        [N, vocab / world] back (the profiled CUDA step uses it like full logits)."""
        if self.driver is not None:
            self.driver.send_logits(hidden)
        local = super().compute_logits(hidden).contiguous()
        parts = self.comm.gather(local)
        if parts is None:
            return local
        return torch.cat(parts, dim=-1)[:, :self.shard.vocab]

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


# ---- loading -----------------------------------------------------------------------------

def load_tp_model(src, config, shard: Shard, dtype: torch.dtype, device: torch.device,
                  max_len: int, seed: int = 0) -> TPLlamaForCausalLM:
    """This rank's shard of the model in `src` (a ModelSource: a dense safetensors folder, or
    a random:NAME preset whose full random weights match LlamaForCausalLM.random's)."""
    local = shard_config(config, shard)
    with torch.device("meta"):
        model = TPLlamaForCausalLM(local, max_len, shard)
    if src.folder is None:
        state = _random_shard(config, shard, seed, model.tie)
        where = "random init"
    else:
        state = _fuse_hf_weights(_iter_shard_slices(src.folder, shard), local, model.tie)
        where = str(src.folder)
    _assign(model, state, dtype, device, where=where)
    return model


def _hf_slice(name: str, shard: Shard, shape: list[int]):
    """What of HF tensor `name` rank `shard.rank` keeps: (rows or columns, slice), ("all",)
    for a replicated tensor, ("rank0",) for a row-parallel bias."""
    hd = shard.head_dim
    leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
    kind = leaf[0] if len(leaf) == 2 else ""
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return ("rows", shard.rows(shard.vocab_per_rank))
    if kind == "q_proj":
        return ("rows", shard.rows(shard.heads * hd))
    if kind in ("k_proj", "v_proj"):
        return ("rows", shard.rows(shard.kv_heads * hd))
    if kind in ("gate_proj", "up_proj"):
        return ("rows", shard.rows(shard.inter))
    if kind in ("o_proj", "down_proj"):
        if leaf[1] == "bias":
            return ("rank0",)
        size = shard.heads * hd if kind == "o_proj" else shard.inter
        return ("cols", shard.rows(size))
    return ("all",)


def _take(how, get, shape: list[int], shard: Shard, vocab_rows: bool) -> torch.Tensor:
    """Read one rank's part through `get(index)` (a safetensors slice or a tensor)."""
    if how[0] == "all":
        return get[:]
    if how[0] == "rank0":
        t = get[:]
        return t if shard.rank == 0 else torch.zeros_like(t)
    sl = how[1]
    if how[0] == "cols":
        return get[:, sl]
    t = get[sl.start:min(sl.stop, shape[0])] if vocab_rows else get[sl]
    if vocab_rows and t.shape[0] < shard.vocab_per_rank:  # the padded tail of the vocab
        pad = t.new_zeros((shard.vocab_per_rank - t.shape[0], *t.shape[1:]))
        t = torch.cat([t, pad])
    return t


def _iter_shard_slices(folder: Path, shard: Shard):
    """(HF name, this rank's slice) for every tensor of the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CorralError(f"{folder} has no *.safetensors weights")
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = fh.get_slice(name)
                shape = list(sl.get_shape())
                how = _hf_slice(name, shard, shape)
                vocab = name.endswith(("embed_tokens.weight", "lm_head.weight"))
                yield name, _take(how, sl, shape, shard, vocab)


def _random_shard(config, shard: Shard, seed: int, tie: bool) -> dict[str, torch.Tensor]:
    """This rank's slice of LlamaForCausalLM.random's weights: the same generator draws every
    full tensor in the same order, one tensor at a time, and only the slice is kept."""
    with torch.device("meta"):
        full = LlamaForCausalLM(config, 8)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hd = shard.head_dim
    q, kv = shard.num_heads * hd, shard.num_kv_heads * hd
    out = {}
    for name, p in full.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            out[name] = torch.ones(p.shape)
            continue
        t = torch.randn(p.shape, generator=gen, dtype=torch.bfloat16) * 0.02
        if name.endswith("qkv_proj.weight"):
            parts = t.split([q, kv, kv])
            sizes = [shard.heads * hd, shard.kv_heads * hd, shard.kv_heads * hd]
            out[name] = torch.cat([x[shard.rows(s)] for x, s in zip(parts, sizes)]).clone()
        elif name.endswith("gate_up_proj.weight"):
            out[name] = torch.cat([x[shard.rows(shard.inter)] for x in t.split(
                shard.intermediate)]).clone()
        else:
            hf = name.replace("qkv_proj", "q_proj").replace("gate_up_proj", "gate_proj")
            how = _hf_slice(hf, shard, list(p.shape))
            vocab = name.endswith(("embed_tokens.weight", "lm_head.weight"))
            out[name] = _take(how, t, list(p.shape), shard, vocab).clone()
    return out
