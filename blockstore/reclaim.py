"""Reclaim: freeing the diff-area entries no live differential snapshot can read (the
reclaim rule, docs/format.md), after a delete, promote or invalidation and at open.

Three steps, so that the pool can run the slow one without its lock (snapshots.py): plan
(memory only, pool lock held) marks the doomed slots as being reclaimed; clear zeroes
their map records and syncs the map, BEFORE any data is punched, so a durable record
never points at reclaimed data; finish punches the data and frees the slots in memory
(or abort leaves them in use for a later reclaim). gc() runs all three at once.

Functions of a DiffArea's state, split from diffarea.py as seals.py and accounting.py are.
"""

from __future__ import annotations

import logging
from bisect import bisect_left

from . import accounting
from .diffarea import _FREE_RECORD, FREE, HAS_DATA, DiffArea
from .format import MAP_RECORD_SIZE

log = logging.getLogger(__name__)


def gc(da: DiffArea, live_epochs: list[int]) -> int:
    """Free every entry no live differential snapshot can read. Returns slots freed.
    All three steps in one go: plan, clear the records (synced), finish."""
    assert not da.unsynced, "harden() before reclaiming"
    doomed = plan(da, live_epochs)
    if doomed:
        try:
            clear(da, doomed)
        except BaseException:
            abort(da, doomed)
            raise
        finish(da, doomed)
    return len(doomed)


def plan(da: DiffArea, live_epochs: list[int],
         busy: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The slots to free, now marked as being reclaimed until finish() or abort().

    Entry (c, E) serves snapshots with epoch in (previous entry of c, E]; it is needed
    iff one live epoch lies in that range (new epochs are newer than every entry, so
    a commit meanwhile changes nothing). Left out: `busy` slots, whose records are
    not durable yet (a record written later would bring a cleared one back), and
    slots another gc is reclaiming. (Pool lock held; memory only.)"""
    live = sorted(live_epochs)
    used = [s for s, st in enumerate(da.state) if st != FREE]
    used.sort(key=lambda s: (da.chunk[s], da.epoch[s]))
    doomed = []
    prev_chunk, prev_epoch = -1, 0
    for s in used:
        c, e = da.chunk[s], da.epoch[s]
        if c == prev_chunk and e == prev_epoch:   # serves nothing: reclaimed, but said
            log.warning("diff map %s: chunk %d has two entries of epoch %d; slot %d, "
                        "which no snapshot reads, is reclaimed", da.map_path, c, e, s)
        lo = prev_epoch + 1 if c == prev_chunk else 1
        i = bisect_left(live, lo)
        if not (i < len(live) and live[i] <= e) and s not in busy \
                and s not in da.reclaiming:
            doomed.append(s)
        prev_chunk, prev_epoch = c, e
    da.reclaiming.update(doomed)
    return doomed


def clear(da: DiffArea, doomed: list[int]) -> None:
    """Clear the doomed slots' records and sync the map, BEFORE their data is punched,
    so a durable record never points at reclaimed data. Touches only the map file,
    so the pool may run it without its lock (its in-memory maps still serve the
    doomed entries, which no live snapshot reads)."""
    for s in doomed:
        da.map.pwrite(_FREE_RECORD, s * MAP_RECORD_SIZE)
    da.faults.point("gc.map_written")
    da.map.sync()
    da.faults.point("gc.map_synced")


def abort(da: DiffArea, doomed: list[int]) -> None:
    """clear() failed: the slots stay in use (a later gc frees them)."""
    da.reclaiming.difference_update(doomed)


def finish(da: DiffArea, doomed: list[int]) -> None:
    """Punch the doomed slots' data and free them in memory. (Pool lock held.)"""
    da.reclaiming.difference_update(doomed)
    for s in doomed:
        accounting.uncount(da, s, da.state[s] in HAS_DATA)
        if da.state[s] in HAS_DATA:
            da.data.punch(s * da.chunk_size, da.chunk_size)
            da.data_slots -= 1
        da.state[s] = FREE
    _trim(da)
    da.free_hint = 0
    da._rebuild_tables()


def _trim(da: DiffArea) -> None:
    """Shrink both files past the last used slot (space back to the filesystem)."""
    last = len(da.state.rstrip(b"\x00"))
    if last < len(da.state):
        del da.state[last:]
        del da.epoch[last:]
        del da.chunk[last:]
        del da.digest[last:]
        del da.prev[last:]
        da.map.truncate(last * MAP_RECORD_SIZE)   # frees what was allocated ahead
        da.map_allocated = last * MAP_RECORD_SIZE
        da.data.truncate(last * da.chunk_size)
        # no sync: the records past `last` are durably free already (clear), so
        # a crash that undoes the truncation leaves free records, as before it
