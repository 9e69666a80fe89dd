"""CUDA graphs for pure-decode steps: the model forward recorded once per padded batch size,
then replayed with each step's inputs copied into the same static buffers.

A decode step launches a few kernels per layer for very little work each, so on a GPU it is
mostly launch overhead; replaying a recorded graph pays one launch. A graph replays fixed
kernels on fixed addresses and shapes, which shapes everything here:

- inputs live in static buffers sized for the largest batch; a step of B sequences replays the
  graph of the smallest captured size >= B (1, 2, 4, 8, 16, 24, ...), the extra rows padded;
- a padded row decodes token 0 at position 0 with context 1 in the runner's spare KV block (one
  past those the BlockManager hands out), so it never reads or writes a real sequence's cache;
- block tables are as wide as max_model_len allows, and nothing inside the graph reads a host
  value that changes per step: the Triton kernel's grid comes from that fixed width (each
  sequence splits its own blocks on the device), the PyTorch path masks the full width, and
  dynamic-NTK RoPE gets its per-token length as `positions + 1` on the device.

Prefill chunks and batches over the largest size run eagerly. `capture` is the only
CUDA-specific piece: elsewhere it keeps the callable and "replay" runs it again on the same
buffers, so the CPU tests check the padding and buffer logic, though not the recording itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from corral.engine.inputs import Staging
from corral.engine.scheduler import ScheduledBatch
from corral.model.attention import AttentionMetadata, build_decode_mask, decode_needs_mask


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture (vLLM's ladder): 1, 2, 4, multiples of 8, max_num_seqs."""
    ladder = [1, 2, 4, *range(8, max_num_seqs, 8)]
    return [s for s in ladder if s < max_num_seqs] + [max_num_seqs]


def capture(fn: Callable[[], torch.Tensor], device: torch.device,
            pool=None) -> Callable[[], torch.Tensor]:
    """Record fn as a CUDA graph; returns replay() -> fn's output tensor, rewritten in place by
    every replay (of this graph or, through the shared pool, another). Off CUDA: returns fn."""
    if device.type != "cuda":
        return fn
    # warm up outside the recording (Triton compiles, cuBLAS picks algorithms), on a side
    # stream as PyTorch's CUDA-graph notes recommend
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class DecodeGraphs:
    """Static decode buffers plus one replayable forward per padded batch size."""

    def __init__(self, model, kv_cache: list[tuple[torch.Tensor, torch.Tensor]], pad_block: int,
                 block_size: int, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
                 device: torch.device):
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.block_size = block_size
        self.pad_block = pad_block
        self.max_blocks = (max_model_len + block_size - 1) // block_size
        n = self.sizes[-1]
        # rows: input ids, positions, slots, context lens; every row starts as padding
        self.pad_row = [0, 0, pad_block * block_size, 1]
        self.vectors = torch.tensor(self.pad_row, device=device)[:, None].repeat(1, n)
        self.tables = torch.full((n, self.max_blocks), pad_block, dtype=torch.long, device=device)
        self.num_replays = 0
        dynamic_rope = (model.config.rope_parameters or {}).get("rope_type") == "dynamic"
        with_mask = decode_needs_mask(device, dtype)  # the kernels bound by context_lens
        width = self.max_blocks * block_size

        def forward_fn(b: int) -> Callable[[], torch.Tensor]:
            ids, pos, slots, ctx = (self.vectors[i, :b] for i in range(4))

            def forward() -> torch.Tensor:
                mask = build_decode_mask(ctx, width, dtype) if with_mask else None
                # context_lens_host stays empty: only prefill chunks read it, and host values
                # would be stale in a replay anyway
                meta = AttentionMetadata(slots, self.tables[:b], ctx, query_lens=[1] * b,
                                         context_lens_host=[], num_decodes=b, decode_mask=mask)
                # a decode's dynamic-NTK length is its context length: position + 1
                return model(ids, pos, meta, kv_cache, pos + 1 if dynamic_rope else None)

            return forward

        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.graphs = {}
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its pool
                self.graphs[b] = capture(forward_fn(b), device, pool)

    def fits(self, batch: ScheduledBatch) -> bool:
        """A pure decode step: every row is its sequence's last token (so its logits are
        sampled, and no prompt logprobs are left to compute), within the captured sizes."""
        return 0 < len(batch.seqs) <= self.sizes[-1] and all(
            n == 1 and s.num_computed_tokens + 1 == s.num_tokens
            and len(s.block_table) <= self.max_blocks
            for s, n in zip(batch.seqs, batch.num_new_tokens))

    def run(self, batch: ScheduledBatch, tables: np.ndarray, staging: Staging) -> torch.Tensor:
        """Copy the step into the static buffers, replay, return hidden states [B, D] (a view
        of the graph's output: valid until the next replay). tables: the rows' block tables
        [B, width] (host, from the runner's BlockTables); staging sends them in one copy."""
        b = len(batch.seqs)
        size = next(s for s in self.sizes if s >= b)
        bs = self.block_size
        pos = np.fromiter((s.num_computed_tokens for s in batch.seqs), dtype=np.int64, count=b)
        vec = np.empty((4, size), dtype=np.int64)
        vec[:] = np.array(self.pad_row, dtype=np.int64)[:, None]
        vec[0, :b] = [s.token_ids[p] for s, p in zip(batch.seqs, pos.tolist())]
        vec[1, :b] = pos
        vec[2, :b] = tables[np.arange(b), pos // bs] * bs + pos % bs
        vec[3, :b] = pos + 1
        # only the widest table's columns are copied; later columns keep older block ids,
        # which lie past every row's context: the kernel never reads them, the mask hides them
        width = tables.shape[1]
        padded = np.full((size, width), self.pad_block, dtype=np.int64)
        padded[:b] = tables
        flat = staging.to_device(np.concatenate([vec.reshape(-1), padded.reshape(-1)]))
        self.vectors[:, :size].copy_(flat[:4 * size].view(4, size))
        self.tables[:size, :width].copy_(flat[4 * size:].view(size, width))
        self.num_replays += 1
        return self.graphs[size]()[:b]
