"""The worker's copy of every running request's block table, one row per request in a growing numpy array.

Plans carry only the changes (`block_start`, `block_ids`: cut the table at block_start, append block_ids), so a
decoding request costs a dictionary lookup per step, and a step's table is one fancy-indexed copy of its rows.
"""

from __future__ import annotations

import numpy as np


class BlockTables:
    def __init__(self, rows: int = 64, cols: int = 16):
        self.table = np.zeros((rows, cols), dtype=np.int64)
        self.lens = np.zeros(rows, dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self.free_rows: list[int] = list(range(rows - 1, -1, -1))

    def update(self, req_id: str, block_start: int, block_ids: list[int]) -> int:
        """Apply one plan entry; returns the request's row."""
        row = self.row_of.get(req_id)
        if row is None:
            if block_start != 0:
                raise ValueError(f"request {req_id}: a table change from block {block_start} for a table this worker "
                                 "does not hold (plans must send a whole table first)")
            row = self._new_row(req_id)
        elif not block_ids and block_start == self.lens[row]:
            return row  # most decode steps: nothing new
        end = block_start + len(block_ids)
        if end > self.table.shape[1]:
            grown = np.zeros((self.table.shape[0], max(end, 2 * self.table.shape[1])), dtype=np.int64)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        old = int(self.lens[row])
        if end < old:
            self.table[row, end:old] = 0  # a cut table (a preempted request back with new blocks)
        self.table[row, block_start:end] = block_ids
        self.lens[row] = end
        return row

    def _new_row(self, req_id: str) -> int:
        if not self.free_rows:
            n = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self.free_rows = list(range(2 * n - 1, n - 1, -1))
        row = self.free_rows.pop()
        self.row_of[req_id] = row
        return row

    def drop(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.table[row, :self.lens[row]] = 0
            self.lens[row] = 0
            self.free_rows.append(row)

    def gather(self, rows: np.ndarray, num_cols: int) -> np.ndarray:
        """The tables of `rows`, `num_cols` wide (zero-padded; longer tables cut)."""
        if num_cols > self.table.shape[1]:
            out = np.zeros((len(rows), num_cols), dtype=np.int64)
            out[:, :self.table.shape[1]] = self.table[rows]
            return out
        return self.table[rows, :num_cols]

    def row_ids(self, req_id: str) -> list[int]:
        row = self.row_of[req_id]
        return self.table[row, :self.lens[row]].tolist()
