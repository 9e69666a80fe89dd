"""Host-side step inputs built without per-token Python work.

`BlockTables` keeps a host copy of every running sequence's block table in one numpy array and
only writes the entries that changed since the last step (a decode adds a block every
`block_size` tokens). `Staging` sends a step's int64 inputs to the device in one copy, from a
pinned buffer on CUDA so the copy is asynchronous.
"""

from __future__ import annotations

import numpy as np
import torch

from corral.engine.sequence import Sequence


class BlockTables:
    """Rows of block ids per sequence, padded with `pad_block`; grows as needed."""

    def __init__(self, pad_block: int, rows: int = 64, width: int = 16):
        self.pad = pad_block
        self.arr = np.full((rows, width), pad_block, dtype=np.int64)
        self.filled = [0] * rows  # valid entries per row
        self.row_of: dict[int, tuple[int, int]] = {}  # seq_id -> (row, num_preemptions)
        self.free = list(range(rows - 1, -1, -1))

    def gather(self, seqs: list[Sequence]) -> tuple[np.ndarray, int]:
        """[B, width] block tables of `seqs` (a copy) and that width (the longest table)."""
        idx = self.rows_for(seqs)
        width = max(len(s.block_table) for s in seqs)
        return self.arr[idx, :width], width

    def rows_for(self, seqs: list[Sequence]) -> list[int]:
        """Row index per sequence, with the rows brought up to date."""
        out = []
        arr, filled = self.arr, self.filled
        for s in seqs:
            got = self.row_of.get(s.seq_id)
            if got is None or got[1] != s.num_preemptions:  # new, or recomputed after preemption
                got = (self._take_row(seqs), s.num_preemptions)
                self.row_of[s.seq_id] = got
                arr = self.arr  # taking a row may have grown the array
            row, table = got[0], s.block_table
            n = len(table)
            f = filled[row]
            # tables only grow while a sequence runs; the last-entry check guards the rest
            if n != f or (n and arr[row, n - 1] != table[-1]):
                if n > arr.shape[1]:
                    self._widen(n)
                    arr = self.arr
                start = f if 0 < f < n and arr[row, f - 1] == table[f - 1] else 0
                arr[row, start:n] = table[start:n]
                arr[row, n:f] = self.pad
                filled[row] = n
            out.append(row)
        return out

    def _take_row(self, live: list[Sequence]) -> int:
        if not self.free:
            keep = {s.seq_id for s in live}
            for sid in [k for k in self.row_of if k not in keep]:
                row = self.row_of.pop(sid)[0]
                self.free.append(row)
            if not self.free:
                self._grow()
        row = self.free.pop()
        self.arr[row, :self.filled[row]] = self.pad
        self.filled[row] = 0
        return row

    def _grow(self) -> None:
        old = self.arr.shape[0]
        self.arr = np.concatenate([self.arr, np.full_like(self.arr, self.pad)])
        self.filled += [0] * old
        self.free = list(range(2 * old - 1, old - 1, -1))

    def _widen(self, need: int) -> None:
        width = max(need, 2 * self.arr.shape[1])
        extra = np.full((self.arr.shape[0], width - self.arr.shape[1]), self.pad, dtype=np.int64)
        self.arr = np.concatenate([self.arr, extra], axis=1)


class Staging:
    """One host->device copy per step for a flat int64 host array (pinned on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned: torch.Tensor | None = None

    def to_device(self, flat: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(flat)
        if self.device.type == "cpu":
            return host
        if self.device.type != "cuda":
            return host.to(self.device)
        n = host.numel()
        if self.pinned is None or self.pinned.numel() < n:
            self.pinned = torch.empty(max(n, 2 * (0 if self.pinned is None else self.pinned.numel())),
                                      dtype=torch.long).pin_memory()
        # safe to refill every step: the previous step's copy finished before its tokens were
        # read back to the host (the sampler's one transfer synchronizes the stream)
        buf = self.pinned[:n]
        buf.copy_(host)
        return buf.to(self.device, non_blocking=True)
