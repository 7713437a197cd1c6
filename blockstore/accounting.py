"""Space accounting of a diff area: per snapshot, the bytes held only for it and the bytes
it shares with other snapshots (issue 19 #3, like `zfs list -o used` of a snapshot).

An entry (chunk c, epoch E) serves the live snapshots whose epochs lie in (P, E], P being
the epoch of the previous entry of c (0: none; docs/format.md, the reclaim rule). An
entry serving exactly one live snapshot is *held only* for it: deleting that snapshot
frees it; one serving several is *shared* by them.

Walking every entry under the pool lock for a listing is O(diff area), so the diff area
keeps counters instead: ``spans[(P, E)]`` = the number of its entries with data (ZERO
entries hold no bytes) preserved at epoch E whose previous entry of the chunk had epoch
P when they were preserved. They change at preserve (+1), gc and a dropped batch (-1,
the freed slot's own span, kept per slot in ``DiffArea.prev``) and are rebuilt from the
map when the pool is opened (recount): derived data, never stored, never trusted over
the maps, and `check` compares them with a recount.

Why a P recorded at preservation stays right after the previous entry of c is reclaimed:
an entry is reclaimed only when no live snapshot lies in its own span, and no epoch
ever comes back into a span (new snapshots get epochs newer than every entry), so the
live snapshots in (P, E] and in (the older P', E] are the same ones. Counters are
therefore compared by the live snapshots they serve (``by_snapshots``), not by key.

The figures themselves (``Figures``) are kept too: a new entry updates them in
O(log snapshots), a new snapshot in O(1), so a listing costs O(snapshots). They are made
again from the spans -- O(spans x log snapshots), spans being the distinct (P, E) pairs:
a few per snapshot in practice, at most (epochs with entries)^2 / 2 -- at the first
listing after the pool's open, a delete or a reclaim.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .diffarea import DiffArea

Spans = Counter[tuple[int, int]]


def recount(da: DiffArea) -> tuple[array, Spans]:
    """(prev epoch per slot, spans) from the in-memory map alone: every entry, in epoch
    order, against the newest earlier entry of its chunk. O(entries). (Pool lock held.)"""
    from .diffarea import HAS_DATA
    prev = array("I", bytes(4 * len(da.state)))
    spans: Spans = Counter()
    last: dict[int, int] = {}
    for e in da.epochs:
        for c, s in da.tables[e].items():
            p = last.get(c, 0)
            prev[s] = p
            last[c] = e
            if da.state[s] in HAS_DATA:
                spans[(p, e)] += 1
    return prev, spans


def count(da: DiffArea, slot: int, chunk: int, epoch: int, has_data: bool) -> None:
    """A new entry, before it is in the tables (so the chunk's newest entry is its
    previous one: one bitmap test for a chunk never preserved before). The figures'
    memo, if any, takes it in at once (O(log snapshots)): a listing during writes
    recomputes nothing."""
    prev = da.last_epoch(chunk)
    if slot >= len(da.prev):
        da.prev.extend(array("I", bytes(4 * (slot + 1 - len(da.prev)))))
    da.prev[slot] = prev
    if has_data:
        da.spans[(prev, epoch)] += 1
        if da.space_memo is not None:
            da.space_memo.add(prev, epoch, 1)


def count_new(da: DiffArea, lo: int, hi: int, epoch: int) -> None:
    """count() of the data entries of slots [lo, hi) at once, for chunks that have no
    entry yet (their previous epoch: 0)."""
    if hi > len(da.prev):
        da.prev.extend(array("I", bytes(4 * (hi - len(da.prev)))))
    da.prev[lo:hi] = array("I", bytes(4 * (hi - lo)))
    da.spans[(0, epoch)] += hi - lo
    if da.space_memo is not None:
        da.space_memo.add(0, epoch, hi - lo)


def uncount(da: DiffArea, slot: int, has_data: bool) -> None:
    """An entry being freed (has_data: it was not a ZERO entry). The figures' memo goes:
    a reclaim follows a delete, which changed the live snapshots anyway."""
    da.space_memo = None
    if has_data:
        key = (da.prev[slot], da.epoch[slot])
        n = da.spans[key] - 1
        if n > 0:
            da.spans[key] = n
        else:
            del da.spans[key]


def by_snapshots(spans: Spans, live: list[int]) -> Counter[tuple[int, int]]:
    """The counters by what they serve: (index of the first live epoch served, index past
    the last) -> entries; entries serving none (garbage a gc has not reclaimed yet) are
    left out. Two counters describing the same diff area compare equal this way."""
    out: Counter[tuple[int, int]] = Counter()
    for (p, e), n in spans.items():
        lo, hi = bisect_right(live, p), bisect_right(live, e)
        if hi > lo and n:
            out[(lo, hi)] += n
    return out


class Figures:
    """Per live snapshot (sorted epochs ``live``), the entries held only for it and, as
    differences along ``live``, the entries it reads: snapshot_bytes' result in a form
    a new entry updates in O(log snapshots) (add) and a new snapshot extends in O(1)."""

    def __init__(self, spans: Spans, live: list[int]) -> None:
        self.live = list(live)
        self.only = [0] * len(live)
        self.edge = [0] * (len(live) + 1)
        self.made: dict[int, tuple[int, int]] | None = None   # result(), until a change
        for (lo, hi), n in by_snapshots(spans, live).items():
            self._put(lo, hi, n)

    def _put(self, lo: int, hi: int, n: int) -> None:
        self.made = None
        if hi - lo == 1:
            self.only[lo] += n
        self.edge[lo] += n
        self.edge[hi] -= n

    def add(self, prev: int, epoch: int, n: int) -> None:
        lo, hi = bisect_right(self.live, prev), bisect_right(self.live, epoch)
        if hi > lo:
            self._put(lo, hi, n)

    def follow(self, epoch: int) -> None:
        """A snapshot was committed: its epoch is newer than every entry, so none serves
        it yet (DiffArea.new_epoch tells, before any entry of that epoch is counted)."""
        self.made = None
        self.live.append(epoch)
        self.only.append(0)
        self.edge.append(0)

    def result(self, chunk_size: int) -> dict[int, tuple[int, int]]:
        """epoch -> (bytes held only for it, bytes shared), made once per change (a
        listing asks once per snapshot)."""
        if self.made is None:
            out = {}
            served = 0
            for i, e in enumerate(self.live):
                served += self.edge[i]
                out[e] = (self.only[i] * chunk_size, (served - self.only[i]) * chunk_size)
            self.made = out
        return self.made


def snapshot_bytes(spans: Spans, live: list[int], chunk_size: int
                   ) -> dict[int, tuple[int, int]]:
    """epoch -> (bytes held only for it, bytes it shares with other live snapshots), for
    every live epoch (sorted ``live``). O(spans x log snapshots)."""
    return Figures(spans, live).result(chunk_size)


def space_of(da: DiffArea, live: list[int]) -> dict[int, tuple[int, int]]:
    """snapshot_bytes of the diff area. Its Figures are kept (DiffArea.space_memo):
    new entries and new snapshots update them, so a listing costs O(snapshots); only
    the first one after a delete or a reclaim (or at open) walks the spans. (Pool lock
    held.)"""
    memo = da.space_memo
    if memo is None or memo.live != live:   # a delete or an invalidation since
        memo = da.space_memo = Figures(da.spans, live)
    return memo.result(da.chunk_size)


def check(da: DiffArea, live: list[int], what: str) -> list[str]:
    """The counters against a recount from the map (Pool.check)."""
    _, spans = recount(da)
    if da.spans.total() != spans.total() or +da.spans != da.spans:
        # each data entry counted once: a freed one left in would only cost memory (its
        # span serves no live snapshot), but the counters must not grow without end
        return [f"{what}: space counters hold {da.spans.total()} entries, the diff map "
                f"{spans.total()}"]
    kept, want = by_snapshots(da.spans, live), by_snapshots(spans, live)
    if kept == want:
        return []
    bad = sorted(k for k in kept.keys() | want.keys() if kept[k] != want[k])
    return [f"{what}: space counters disagree with the diff map for {len(bad)} span(s) "
            f"(kept {[kept[k] for k in bad[:4]]}, map {[want[k] for k in bad[:4]]}); "
            "they are rebuilt when the pool is opened"]
