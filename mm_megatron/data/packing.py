"""Sequence packing: fit variable-length samples into rows of a fixed capacity.

What this file does: best-fit-decreasing bin packing (the greedy knapsack used by LLaMA-Factory
and others) over sample lengths (`greedy_knapsack`), and `KnapsackBatcher`, which grows one
micro batch of `num_rows` rows from a stream of samples and reports when the next sample no
longer fits. The loader measures lengths in EXPANDED tokens (`batch.expanded_length`), so a row
never exceeds `max_seq_len` after the model inserts the image embeddings.

Everything is deterministic: ties go to the lower index, rows list their samples in arrival
order, and rows are ordered by their first sample.

What it does not do: build tensors (`collate.py`) or attention masks (the model uses `seq_lens`).
"""

from __future__ import annotations

from collections.abc import Sequence


def greedy_knapsack(
    lengths: Sequence[int], capacity: int, max_rows: int | None = None
) -> list[list[int]] | None:
    """Pack items into rows of `capacity` with best-fit decreasing.

    Longest items go first; each goes to the fullest row it still fits in (the lowest-numbered
    one on ties), or opens a new row.

    Args:
        lengths: Length of each item; every one must be <= capacity.
        capacity: Row capacity.
        max_rows: Most rows allowed; None for no limit.

    Returns:
        Rows of item indices (ascending within a row, rows ordered by first index), or None
        when `max_rows` rows are not enough.
    """
    for i, n in enumerate(lengths):
        if n > capacity or n < 0:
            raise ValueError(f"item {i} has length {n}, capacity is {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        best = -1
        for r, space in enumerate(free):
            if space >= n and (best < 0 or space < free[best]):
                best = r
        if best < 0:
            if max_rows is not None and len(rows) >= max_rows:
                return None
            rows.append([])
            free.append(capacity)
            best = len(rows) - 1
        rows[best].append(i)
        free[best] -= n
    rows = [sorted(row) for row in rows]
    rows.sort(key=lambda row: row[0])
    return rows


class KnapsackBatcher:
    """Collects items for one micro batch of `num_rows` packed rows.

    `try_add` first places the new item best-fit into the current rows; when that fails it
    repacks all items (best-fit decreasing). If even that needs more than `num_rows` rows, the
    item is refused and the batch is complete. The items of a batch are therefore always a
    contiguous run of the stream, which keeps the loader resumable from one sample position.
    """

    def __init__(self, capacity: int, num_rows: int):
        """Args:
        capacity: Row capacity (max_seq_len in expanded tokens).
        num_rows: Rows per micro batch.
        """
        if capacity < 1 or num_rows < 1:
            raise ValueError(f"capacity={capacity} and num_rows={num_rows} must be >= 1")
        self.capacity = capacity
        self.num_rows = num_rows
        self.lengths: list[int] = []
        self._rows: list[list[int]] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def try_add(self, length: int) -> bool:
        """Add an item of `length` if the batch can still hold it; return whether it was added."""
        if length > self.capacity:
            raise ValueError(f"item of length {length} exceeds the capacity {self.capacity}")
        index = len(self.lengths)
        best = -1
        for r, space in enumerate(self._free):
            if space >= length and (best < 0 or space < self._free[best]):
                best = r
        if best >= 0 or len(self._rows) < self.num_rows:
            if best < 0:
                self._rows.append([])
                self._free.append(self.capacity)
                best = len(self._rows) - 1
            self._rows[best].append(index)
            self._free[best] -= length
            self.lengths.append(length)
            return True
        rows = greedy_knapsack([*self.lengths, length], self.capacity, self.num_rows)
        if rows is None:
            return False
        self.lengths.append(length)
        self._rows = rows
        self._free = [self.capacity - sum(self.lengths[i] for i in row) for row in rows]
        return True

    def rows(self) -> list[list[int]]:
        """Item indices per row (ascending in a row, rows ordered by first item)."""
        rows = [sorted(row) for row in self._rows if row]
        rows.sort(key=lambda row: row[0])
        return rows

    def reset(self) -> None:
        """Start an empty batch."""
        self.lengths, self._rows, self._free = [], [], []
