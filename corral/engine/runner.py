"""Turns a scheduled batch into tensors, runs the model, returns the logits the sampler needs.

Owns the KV-cache tensors: per layer, K and V of shape [num_blocks + 1, block_size, n_kv, hd]
(the extra block is never handed out: padded rows of CUDA-graph decode batches write there), in
the KV dtype (the model's, or fp16 under an fp32 CPU model: EngineConfig.kv_cache_dtype).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from corral.engine.cuda_graphs import DecodeGraphs
from corral.engine.inputs import BlockTables, Staging
from corral.engine.sampler import batch_top_logprobs
from corral.engine.scheduler import ScheduledBatch
from corral.model.attention import AttentionMetadata, build_decode_mask, decode_needs_mask
from corral.model.llama import LlamaForCausalLM, head_dim_of
from corral.outputs import Logprobs


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return (2 * config.num_hidden_layers * block_size * config.num_key_value_heads
            * head_dim_of(config) * elem)


@dataclass
class StepLogits:
    sample_rows: list[int]  # indices into batch.seqs that get a new token this step
    logits: torch.Tensor  # [len(sample_rows), V] fp32
    # batch row -> logprobs of the prompt tokens this chunk predicts (positions first+1..)
    prompt_logprobs: dict[int, list[Logprobs]]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, kv_dtype: torch.dtype | None = None):
        cfg = model.config
        if device.type == "cuda":
            # cuda:N with N != 0: Triton launches and graph capture use the current device
            torch.cuda.set_device(device)
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.dynamic_rope = (cfg.rope_parameters or {}).get("rope_type") == "dynamic"
        self.pad_block = num_blocks  # past the BlockManager's ids 0..num_blocks-1
        shape = (num_blocks + 1, block_size, cfg.num_key_value_heads, head_dim_of(cfg))
        kv_dtype = kv_dtype or dtype
        self.kv_cache = [(torch.zeros(shape, dtype=kv_dtype, device=device),
                          torch.zeros(shape, dtype=kv_dtype, device=device))
                         for _ in range(cfg.num_hidden_layers)]
        self.graphs: DecodeGraphs | None = None
        self.lora = None  # model.lora.LoRAManager when adapters are enabled
        self.tables = BlockTables(self.pad_block)
        self.staging = Staging(device)
        self.prompt_logprobs_chunk = 512  # positions per full-vocab logits slice

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Record the pure-decode forward at padded batch sizes up to max_num_seqs (CUDA graphs
        on CUDA; elsewhere the same padded path runs eagerly, which the CPU tests check)."""
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.pad_block, self.block_size,
                                   max_num_seqs, max_model_len, self.dtype, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        seqs, ns = batch.seqs, batch.num_new_tokens
        # rows under a LoRA adapter run eagerly (the graphs hold base-only decode)
        with_lora = self.lora is not None and self.lora.set_step(batch)
        if self.graphs is not None and not with_lora and self.graphs.fits(batch):
            tables, _ = self.tables.gather(seqs)
            hidden = self.graphs.run(batch, tables, self.staging)
            return StepLogits(list(range(len(seqs))), self.model.compute_logits(hidden), {})
        bs, b = self.block_size, len(seqs)
        starts = [s.num_computed_tokens for s in seqs]
        ctx_lens = [p + n for p, n in zip(starts, ns)]
        t = sum(ns)
        tables, width = self.tables.gather(seqs)
        st = np.array(starts, dtype=np.int64)
        if t == b:  # pure decode: one token per row
            ids = [s.token_ids[p] for s, p in zip(seqs, starts)]
            row_of = np.arange(b)
            pos = st
        else:
            ids = list(itertools.chain.from_iterable(
                s.token_ids[p:p + n] for s, p, n in zip(seqs, starts, ns)))
            n_arr = np.array(ns, dtype=np.int64)
            row_of = np.repeat(np.arange(b), n_arr)
            first = np.cumsum(n_arr) - n_arr  # flat index of each row's first new token
            pos = st[row_of] + np.arange(t) - first[row_of]
        slots = tables[row_of, pos // bs] * bs + pos % bs
        ctx = st + np.array(ns, dtype=np.int64)
        parts = [np.array(ids, dtype=np.int64), pos, slots, ctx, tables.reshape(-1)]
        if self.dynamic_rope:
            parts.append(ctx[row_of])
        flat = self.staging.to_device(np.concatenate(parts))
        d_ids, d_pos, d_slots = (flat[i * t:(i + 1) * t] for i in range(3))
        d_ctx = flat[3 * t:3 * t + b]
        d_tables = flat[3 * t + b:3 * t + b + b * width].view(b, width)
        d_rope = flat[3 * t + b + b * width:] if self.dynamic_rope else None
        num_decodes = ns.count(1)
        decode_mask = None
        if num_decodes and decode_needs_mask(self.device, self.dtype):
            decode_mask = build_decode_mask(torch.from_numpy(ctx[:num_decodes]),
                                            max(ctx_lens[:num_decodes]), self.dtype).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=d_slots, block_tables=d_tables, context_lens=d_ctx,
            query_lens=list(ns), context_lens_host=ctx_lens,
            num_decodes=num_decodes, decode_mask=decode_mask,
        )
        hidden = self.model(d_ids, d_pos, meta, self.kv_cache, d_rope)
        ends = list(itertools.accumulate(ns))
        sample_rows = [r for r, (s, c) in enumerate(zip(seqs, ctx_lens)) if c == s.num_tokens]
        if len(sample_rows) == b:
            last = hidden if t == b else hidden[[e - 1 for e in ends]]
        else:
            last = hidden[[ends[r] - 1 for r in sample_rows]]
        logits = self.model.compute_logits(last) if sample_rows else hidden.new_zeros(0)
        prompt_logprobs = {}
        for row in [r for r, s in enumerate(seqs) if s.wants_prompt_logprobs]:
            seq, start = seqs[row], starts[row]
            # logits at position p predict token p+1 (prompt tokens 1..)
            stop = min(ctx_lens[row], seq.num_prompt_tokens - 1)
            if stop > start:
                a = ends[row] - ns[row]
                prompt_logprobs[row] = self._prompt_logprobs(
                    hidden[a:a + stop - start], seq.token_ids[start + 1:stop + 1],
                    seq.params.prompt_logprobs)
        return StepLogits(sample_rows, logits, prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], n: int) -> list[Logprobs]:
        """Per position, the logprob of the next prompt token and the n most likely, computed
        `prompt_logprobs_chunk` positions at a time: an 8k-token prompt never holds full-vocab
        fp32 logits for the whole chunk (8k x 128k x 4 bytes = 4 GiB)."""
        out: list[Logprobs] = []
        step = self.prompt_logprobs_chunk
        for i in range(0, len(targets), step):
            lp = torch.log_softmax(self.model.compute_logits(hidden[i:i + step]), dim=-1)
            out += batch_top_logprobs(lp, targets[i:i + step], [n] * lp.shape[0])
        return out


def profiled_kv_budget(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                       utilization: float, max_tokens: int, max_num_seqs: int,
                       max_model_len: int, block_size: int) -> float:
    """CUDA: bytes left for KV blocks after a profiled worst-case step.

    Runs one dummy prefill of the largest chunk a step can hold (its own throwaway cache) and
    the LM head + sampler-sized logits for `max_num_seqs` rows, and reads the allocator's peak
    above what was allocated before. The budget is `utilization` of the card, less what is in
    use now (weights, other processes) and less that activation peak."""
    torch.cuda.set_device(device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _dummy_step(model, device, dtype, min(max_tokens, max_model_len - 1), max_num_seqs, block_size)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total * utilization - (total - free) - peak


@torch.inference_mode()
def _dummy_step(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, tokens: int,
                rows: int, block_size: int) -> None:
    """One sequence prefilling `tokens` tokens, then logits and a softmax for `rows` rows."""
    cfg = model.config
    nblk = (tokens + block_size - 1) // block_size
    shape = (nblk + 1, block_size, cfg.num_key_value_heads, head_dim_of(cfg))
    cache = [(torch.zeros(shape, dtype=dtype, device=device),
              torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_hidden_layers)]
    table = torch.arange(nblk, device=device)[None]
    meta = AttentionMetadata(slot_mapping=torch.arange(tokens, device=device), block_tables=table,
                             context_lens=torch.tensor([tokens], device=device),
                             query_lens=[tokens], context_lens_host=[tokens])
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    pos = torch.arange(tokens, device=device)
    dynamic = (cfg.rope_parameters or {}).get("rope_type") == "dynamic"
    hidden = model(ids, pos, meta, cache, pos + 1 if dynamic else None)
    rows_h = hidden[-1:].expand(rows, -1).contiguous()
    model.compute_logits(rows_h).softmax(dim=-1)
