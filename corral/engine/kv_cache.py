"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

A full block is identified by a hash of (parent block's hash, its token ids), so two sequences
whose prompts share a prefix share that prefix's blocks. Freed blocks keep their hash and stay
findable until they are reused (least recently freed first), so a request that repeats a system
prompt after another finished still hits the cache. Only the block ids live here; the tensors
live in the runner.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from corral.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up / found in the prefix cache
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    @staticmethod
    def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    @staticmethod
    def root_hash(seq: Sequence) -> int | None:
        """The first block's parent: the adapter's id, so K/V computed under one LoRA adapter
        (or the base) is never reused under another."""
        return None if seq.lora is None else hash(("lora", seq.lora.id))

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest cached prefix; returns how many
        tokens they cover. At least one token is always left to compute (its logits are needed)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = self.root_hash(seq)
        hits = 0
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.block_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            parent = h
            hits += 1
        seq.num_hashed_blocks = hits
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += min(hits * bs, seq.num_prompt_tokens)
        return hits * bs

    def can_allocate(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need + reserve <= len(self.free)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        """Make the block table cover `num_new_tokens` more tokens; False (nothing changed) when
        fewer than that many blocks (plus `reserve`) are free."""
        if not self.can_allocate(seq, num_new_tokens, reserve):
            return False
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        start = seq.num_hashed_blocks  # incremental: only the blocks completed since last time
        if full <= start:
            return
        parent = self.blocks[seq.block_table[start - 1]].hash if start else self.root_hash(seq)
        for i in range(start, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash = self.block_hash(parent, tokens)
                block.token_ids = tokens
                self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash
        seq.num_hashed_blocks = full

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks reaching zero become free (tail first, so
        the shared prefix stays cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # uncached: reuse first
                else:
                    self.free[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
