"""Seals: the digests of a diff area's slots preserved by reference (diff/<id>.sum).

A slot preserved by reference -- a clone of the origin's blocks, or an in-kernel copy --
never had its data in memory, so its map record carries no digest (UNSUMMED: not
verified). A seal (blockstore/integrity.py) reads such slots later, outside the write
path, and records their digests here, one SEAL_RECORD_SIZE record per slot; from then on
the slot reads as verified (DATA). Derived data: a seal lost by a crash is simply done
again, and a record counts only while its check matches the slot's current entry, so a
torn record or one left from a slot freed since leaves the slot unsealed, never wrongly
verified (docs/format.md).

Functions of a DiffArea's state, split from diffarea.py (the slot states are its own).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .fileio import DataFile, fsync_dir
from .format import SEAL_RECORD_SIZE, pack_seal_record, unpack_seal_record

if TYPE_CHECKING:
    from .diffarea import DiffArea

Sealed = list[tuple[int, int, int, int]]   # (slot, epoch, chunk, digest)


def load(da: DiffArea) -> None:
    """Apply the digests recorded for UNSUMMED slots (at load, after the map)."""
    from .diffarea import DATA, UNSUMMED
    if not os.path.exists(da.sum_path):
        return
    da.sums = DataFile(da.sum_path, "map", da.faults)
    raw = da.sums.pread(da.sums.size(), 0)
    for slot in range(min(len(da.state), len(raw) // SEAL_RECORD_SIZE)):
        if da.state[slot] != UNSUMMED:
            continue
        digest = unpack_seal_record(raw[slot * SEAL_RECORD_SIZE:(slot + 1) * SEAL_RECORD_SIZE],
                                    slot, da.epoch[slot], da.chunk[slot])
        if digest is not None:
            da.state[slot] = DATA
            da.digest[slot] = digest


def plan(da: DiffArea, busy: set[int] | frozenset[int] = frozenset()
         ) -> list[tuple[int, int, int]]:
    """(slot, epoch, chunk) of every UNSUMMED slot whose record is durable (not unsynced,
    not `busy` in a batch being synced, not being reclaimed): what a seal may read and
    record now. Opens (creates) the seal file. (Pool lock held.)"""
    from .diffarea import UNSUMMED
    unsynced = set(da.unsynced)
    todo = [(s, da.epoch[s], da.chunk[s]) for s, st in enumerate(da.state)
            if st == UNSUMMED and s not in busy and s not in da.reclaiming
            and s not in unsynced]
    if todo and da.sums is None:
        new = not os.path.exists(da.sum_path)
        da.sums = DataFile(da.sum_path, "map", da.faults, create=new)
        if new:
            fsync_dir(os.path.dirname(da.sum_path))
    return todo


def write(da: DiffArea, sealed: Sealed) -> None:
    """Record the seals durably. Touches only the seal file: runs without the pool
    lock. (A seal lost by a crash is simply done again.)"""
    assert da.sums is not None
    for slot, epoch, chunk, digest in sealed:
        da.sums.pwrite(pack_seal_record(slot, epoch, chunk, digest), slot * SEAL_RECORD_SIZE)
    da.sums.sync()


def finish(da: DiffArea, sealed: Sealed) -> None:
    """The recorded digests apply from now on, to the slots still holding the entry they
    were computed for. (Pool lock held.)"""
    from .diffarea import DATA, UNSUMMED
    for slot, epoch, chunk, digest in sealed:
        if (slot < len(da.state) and da.state[slot] == UNSUMMED
                and da.epoch[slot] == epoch and da.chunk[slot] == chunk):
            da.state[slot] = DATA
            da.digest[slot] = digest
