"""Compact in-memory chunk maps: bitmaps and per-epoch exception tables.

Sizes for 1 TiB at 64 KiB chunks (16.8 M chunks): a Bitmap is 2 MiB; an EpochTable
costs 12 bytes per preserved chunk (plus a small unsorted write buffer). No dict of
every chunk, ever.
"""

from __future__ import annotations

import mmap
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator


def consecutive_runs(items: list[int]) -> Iterator[tuple[int, int]]:
    """(i, j): index ranges items[i:j] of consecutive integers, in order (one system call
    per run instead of per chunk or slot)."""
    i, n = 0, len(items)
    while i < n:
        j = i + 1
        while j < n and items[j] == items[j - 1] + 1:
            j += 1
        yield i, j
        i = j


class Bitmap:
    """One bit per chunk in an anonymous mmap: zeroed lazily by the kernel, so creating
    one is O(1) in volume size (what makes snapshot commit flat in volume size)."""

    __slots__ = ("nbits", "_m")

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self._m = mmap.mmap(-1, max(1, (nbits + 7) // 8))

    def test(self, i: int) -> bool:
        return bool(self._m[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> None:
        self._m[i >> 3] |= 1 << (i & 7)

    def grown(self, nbits: int) -> Bitmap:
        new = Bitmap(max(nbits, self.nbits))
        n = len(self._m)
        new._m[:n] = self._m[:n]
        return new

    def close(self) -> None:
        self._m.close()


class EpochTable:
    """chunk -> slot for the chunks preserved while one epoch was the newest.

    Sorted parallel arrays plus an unsorted buffer merged when it reaches 1/8 of the
    sorted part (amortised O(1) inserts, O(log n) lookups).
    """

    __slots__ = ("keys", "vals", "pending")

    def __init__(self) -> None:
        self.keys = array("Q")
        self.vals = array("I")
        self.pending: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys) + len(self.pending)

    def get(self, chunk: int) -> int | None:
        v = self.pending.get(chunk)
        if v is not None:
            return v
        keys = self.keys
        i = bisect_left(keys, chunk)
        if i < len(keys) and keys[i] == chunk:
            return self.vals[i]
        return None

    def add(self, chunk: int, slot: int) -> None:
        self.pending[chunk] = slot
        if len(self.pending) >= max(1024, len(self.keys) >> 3):
            self._merge()

    def add_many(self, pairs: Iterable[tuple[int, int]]) -> None:
        """add() of each (chunk, slot) pair."""
        self.pending.update(pairs)
        if len(self.pending) >= max(1024, len(self.keys) >> 3):
            self._merge()

    def _merge(self) -> None:
        pending = sorted(self.pending.items())
        self.pending = {}
        if not self.keys or pending[0][0] > self.keys[-1]:
            # all past the sorted part (a sequential stream of first writes): appended,
            # without sorting the whole table again (2-3 % of such a stream's time)
            self.keys.extend([k for k, _ in pending])
            self.vals.extend([v for _, v in pending])
            return
        merged = sorted([*zip(self.keys, self.vals), *pending])
        self.keys = array("Q", [k for k, _ in merged])
        self.vals = array("I", [v for _, v in merged])

    def items(self) -> list[tuple[int, int]]:
        return [*zip(self.keys, self.vals), *self.pending.items()]

    def sorted_chunks(self) -> array:
        """Every chunk of the table, ascending (the pending buffer merged first: the
        caller holds the pool lock, as for add()). The table's own array: read it, do
        not keep it past the lock."""
        if self.pending:
            self._merge()
        return self.keys
