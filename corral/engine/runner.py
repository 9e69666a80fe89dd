"""Turns a scheduled batch into tensors, runs the model, returns the logits the sampler needs.

Owns the KV-cache tensors: per layer, K and V of shape [num_blocks + 1, block_size, n_kv, hd]
(the extra block is never handed out: padded rows of CUDA-graph decode batches write there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corral.engine.cuda_graphs import DecodeGraphs
from corral.engine.scheduler import ScheduledBatch
from corral.model.attention import AttentionMetadata, build_decode_mask, decode_needs_mask
from corral.model.llama import LlamaForCausalLM, head_dim_of


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return (2 * config.num_hidden_layers * block_size * config.num_key_value_heads
            * head_dim_of(config) * elem)


@dataclass
class StepLogits:
    sample_rows: list[int]  # indices into batch.seqs that get a new token this step
    logits: torch.Tensor  # [len(sample_rows), V] fp32
    prompt_logits: dict[int, tuple[torch.Tensor, int]]  # batch row -> (logits [n, V], first pos)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.dynamic_rope = (cfg.rope_parameters or {}).get("rope_type") == "dynamic"
        self.pad_block = num_blocks  # past the BlockManager's ids 0..num_blocks-1
        shape = (num_blocks + 1, block_size, cfg.num_key_value_heads, head_dim_of(cfg))
        self.kv_cache = [(torch.zeros(shape, dtype=dtype, device=device),
                          torch.zeros(shape, dtype=dtype, device=device))
                         for _ in range(cfg.num_hidden_layers)]
        self.graphs: DecodeGraphs | None = None
        self.lora = None  # model.lora.LoRAManager when adapters are enabled

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Record the pure-decode forward at padded batch sizes up to max_num_seqs (CUDA graphs
        on CUDA; elsewhere the same padded path runs eagerly, which the CPU tests check)."""
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.pad_block, self.block_size,
                                   max_num_seqs, max_model_len, self.dtype, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        # rows under a LoRA adapter run eagerly (the graphs hold base-only decode)
        with_lora = self.lora is not None and self.lora.set_step(batch)
        if self.graphs is not None and not with_lora and self.graphs.fits(batch):
            hidden = self.graphs.run(batch)
            return StepLogits(list(range(len(batch.seqs))), self.model.compute_logits(hidden), {})
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        rope_lens: list[int] = []
        ctx_lens: list[int] = []
        sample_rows: list[int] = []
        logit_index: list[int] = []  # flat token index whose logits we need, per sampled row
        prompt_spans: dict[int, tuple[int, int, int]] = {}
        num_decodes = 0
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            flat0 = len(ids)
            ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            rope_lens.extend([end] * n)
            ctx_lens.append(end)
            if n == 1:
                num_decodes += 1
            if seq.wants_prompt_logprobs and start < seq.num_prompt_tokens:
                # logits at position p predict token p+1 (prompt tokens 1..)
                last = min(end, seq.num_prompt_tokens - 1)
                if last > start:
                    prompt_spans[row] = (flat0, flat0 + last - start, start + 1)
            if end == seq.num_tokens:
                sample_rows.append(row)
                logit_index.append(len(ids) - 1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table))
                               for s in batch.seqs], dtype=torch.long)
        dev = self.device
        ctx_t = torch.tensor(ctx_lens, dtype=torch.long)
        decode_mask = None
        if num_decodes and decode_needs_mask(dev, self.dtype):
            decode_mask = build_decode_mask(ctx_t[:num_decodes], max(ctx_lens[:num_decodes]),
                                            self.dtype).to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev),
            block_tables=tables.to(dev), context_lens=ctx_t.to(dev),
            query_lens=list(batch.num_new_tokens), context_lens_host=ctx_lens,
            num_decodes=num_decodes, decode_mask=decode_mask,
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long).to(dev), torch.tensor(pos, dtype=torch.long).to(dev),
            meta, self.kv_cache,
            torch.tensor(rope_lens).to(dev) if self.dynamic_rope else None,
        )
        logits = self.model.compute_logits(hidden[logit_index]) if logit_index else hidden.new_zeros(0)
        prompt_logits = {row: (self.model.compute_logits(hidden[a:b]), first)
                         for row, (a, b, first) in prompt_spans.items()}
        return StepLogits(sample_rows, logits, prompt_logits)
