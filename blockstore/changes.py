"""Changed-block maps (issue 17): which chunks of a volume changed between one of its
differential snapshots and a later one, or the live volume.

No new records: the diff area already is the change log. The copy rule (docs/format.md)
preserves a chunk at its first write after a commit while some live differential
snapshot needs it, in an entry whose epoch is the origin's epoch at that write. So,
while snapshot A (epoch a) lives:

* every write (or discard, or a revert's rewrite: they all go through copy-before-write)
  to chunk c after A's commit leaves an entry of c with an epoch >= a -- the write
  preserves c for A unless c already has such an entry;
* a write between A's and B's commits (epoch b) leaves one with an epoch in [a, b), as
  the origin's epoch was then in [a, b);
* the reclaim rule never drops the entry of c with the smallest epoch >= a: it serves
  snapshot epochs (previous entry of c, that epoch], which holds a. Deleting, promoting
  or invalidating snapshots between A and B, or after B, cannot lose the record; nor
  can a restart (durable records are reloaded, gc at open follows the same rule) or a
  kill -9 (an entry lost with its unsynced batch goes with the held write it guarded:
  the origin never got that write, so the chunk did not change).

Hence changed(A, B) = chunks with an entry of epoch in [a, b); changed(A, live) = those
of epoch >= a. The cost is O(those entries + snapshots), never O(volume size).

What "changed" means: *touched* since A -- written, discarded or rewritten by a revert,
even with the same bytes -- at chunk granularity. A superset of the chunks whose content
differs, exact for the chunks touched (a revert to A makes the live volume equal to A,
yet the chunks written since A and rewritten by the revert stay reported).

Sizes: a snapshot keeps the size its volume had at its commit; the volume may grow (or a
revert may shrink it) since. The extents cover the newer side (B, or the live volume)
only, clipped to its size: past A's end, a chunk never touched since A reads as zeros
(the image was holes there at A's commit, and a grow adds holes), so a backup that
extends its copy of A with zeros and applies the extents is exact. A revert's shrink
discards the tail through copy-before-write first, so it is recorded like any discard.

Refused, with one line each (never a wrong answer): A not a committed differential
snapshot (a plex or a promoted full copy has no place in the diff area: nothing records
changes since it; an invalid one lost preserved data), B older than A, A and B of
different volumes. B may be a promoted full copy (its epoch still marks its instant);
a plex has no epoch: refused. A snapshot split off as a volume is no snapshot any more.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .errors import InvalidState, NotFound, SnapshotInvalid, Unsupported
from .model import COMMITTED, DIFFERENTIAL, FULL, INVALID, PLEX, PREPARING

if TYPE_CHECKING:
    from .model import _Snapshot
    from .pool import Pool


# Results kept per volume (DiffArea.memo), each valid while the diff area's entries are
# unchanged (DiffArea.version): an NBD client walking qemu:dirty-bitmap of a live volume
# one extent per request (qemu's REQ_ONE) asks the same question thousands of times,
# ~3 ms each at 64 GiB / 1 GiB changed (busy machine; docs/network.md). Bounded: at most
# MEMO_ENTRIES results per volume, each of at most MEMO_MAX_EXTENTS extents (~10 MiB of
# tuples; a larger answer is recomputed each time).
MEMO_ENTRIES = 8
MEMO_MAX_EXTENTS = 100_000


def changed_extents(pool: Pool, from_id: str, to_id: str | None = None
                    ) -> list[tuple[int, int]]:
    """(offset, length) extents of the chunks touched between snapshot ``from_id`` and
    snapshot ``to_id`` (None: the live volume), sorted, merged, chunk-aligned except the
    last one, which ends at the newer side's size. See the module docstring. Repeated
    questions are answered from DiffArea.memo until the entries change."""
    with pool._lock:   # the maps change with every write: copy them in one go...
        a = _snapshot(pool, from_id, "FROM")
        _check_from(a)
        b = None if to_id is None else _snapshot(pool, to_id, "TO")
        if b is not None:
            _check_to(a, b)
            if b is a:
                return []
        v = a.origin
        da = v.diff
        assert a.epoch is not None and da is not None   # (a live differential)
        size = v.size if b is None else b.size
        key = (a.epoch, -1 if b is None or b.epoch is None else b.epoch, size)
        hit = da.memo.get(key)
        if hit is not None and hit[0] == da.version:
            return list(hit[1])
        version = da.version
        tables = da.chunks_between(a.epoch, None if b is None else b.epoch)
    # ...and merge them without the lock (the data path never waits for a large diff)
    out = extents(_union(tables), pool.chunk_size, size)
    if len(out) <= MEMO_MAX_EXTENTS:
        if len(da.memo) >= MEMO_ENTRIES:
            da.memo.clear()
        da.memo[key] = (version, out)   # (made at `version`: stale once it moves on)
    return list(out)


def _union(tables: list[array]) -> Iterator[int]:
    """Sorted chunk lists -> each chunk once, ascending."""
    last = -1
    for c in tables[0] if len(tables) == 1 else heapq.merge(*tables):
        if c != last:
            yield c
            last = c


def extents(chunks: Iterable[int], chunk_size: int, size: int) -> list[tuple[int, int]]:
    """Ascending chunk numbers -> merged (offset, length) runs, clipped to ``size``
    (chunks at or past it dropped, a last partial chunk cut at it)."""
    out: list[tuple[int, int]] = []
    limit = -(-size // chunk_size)
    start = prev = -2
    for c in chunks:
        if c >= limit:
            break   # ascending: every later one is past the end too
        if c != prev + 1:
            if start >= 0:
                out.append((start, prev + 1))
            start = c
        prev = c
    if start >= 0:
        out.append((start, prev + 1))
    return [(s * chunk_size, min(e * chunk_size, size) - s * chunk_size) for s, e in out]


def _snapshot(pool: Pool, key: str, role: str) -> _Snapshot:
    if not isinstance(key, str):
        raise NotFound(f"{role}: {key!r} is not a snapshot id")
    if key in pool._volumes:
        raise NotFound(f"{role}: {key} is a volume, not a snapshot; diff takes snapshot "
                       "ids (leave TO out to compare with the live volume)")
    return pool._snap(key)


def _check_from(a: _Snapshot) -> None:
    if a.state == PREPARING:
        raise InvalidState(f"snapshot {a.snap_id} is still being prepared")
    if a.state == INVALID:
        raise SnapshotInvalid(f"snapshot {a.snap_id} is invalid (its preserved data was "
                              "lost): the changes since it are unknown; back up in full")
    if a.kind == PLEX:
        raise Unsupported(f"snapshot {a.snap_id} is a plex (a full copy): the pool records "
                          "no changes since it; diff from a differential snapshot, or "
                          "back up in full")
    if a.kind == FULL:
        raise Unsupported(f"snapshot {a.snap_id} was promoted to a full copy: the pool "
                          "stopped recording changes since it; diff from a differential "
                          "snapshot, or back up in full")
    assert a.kind == DIFFERENTIAL and a.state == COMMITTED


def _check_to(a: _Snapshot, b: _Snapshot) -> None:
    if b.origin is not a.origin:
        raise InvalidState(f"snapshot {a.snap_id} is of volume {a.origin.name} and "
                           f"{b.snap_id} of volume {b.origin.name}: a diff compares "
                           "snapshots of one volume")
    if b.state == PREPARING:
        raise InvalidState(f"snapshot {b.snap_id} is still being prepared")
    if b.state == INVALID:
        raise SnapshotInvalid(f"snapshot {b.snap_id} is invalid (its preserved data was "
                              "lost): it cannot be backed up")
    if b.epoch is None:   # a plex: its commit is no epoch of the origin
        raise Unsupported(f"snapshot {b.snap_id} is a plex (a full copy): its instant is "
                          "not on the volume's change record; diff to a differential "
                          "snapshot or to the live volume")
    assert a.epoch is not None
    if b.epoch < a.epoch:
        raise InvalidState(f"snapshot {b.snap_id} is older than {a.snap_id}: give the "
                           "older snapshot first (diff FROM TO)")
