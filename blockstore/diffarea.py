"""The diff area of one origin volume: preserved chunks shared by all its snapshots.

A chunk preserved while epoch E was the newest snapshot epoch serves every snapshot
with epoch e such that no earlier preservation of that chunk has an epoch >= e:
snapshot e reads chunk c from the entry with the SMALLEST epoch >= e, else from the
origin. So one copy per chunk write serves any number of snapshots (invariant 3).

Durability order of a preservation batch (invariant 2): slot data -> fdatasync(data) ->
map records -> fdatasync(map); only then may the caller overwrite the origin. A durable
record therefore always describes durable data; a crash before the map sync leaves free
(zero or torn) records and an origin chunk not yet overwritten.
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from . import accounting, seals
from .chunkmap import Bitmap, EpochTable, consecutive_runs
from .errors import CorruptData
from .fileio import DataFile, Faults, fsync_dir, is_zeros
from .format import (
    MAP_FLAG_NOSUM,
    MAP_FLAG_ZERO,
    MAP_RECORD_SIZE,
    pack_map_record,
    unpack_map_record,
)

# slot states. UNSUMMED: data preserved by reference (a clone of the origin's blocks, or
# an in-kernel copy), whose digest was never in memory: not verified until sealed
FREE, DATA, ZERO, UNSUMMED = 0, 1, 2, 3
HAS_DATA = (DATA, UNSUMMED)
MAP_AHEAD = 64 * 1024   # map-file bytes allocated ahead of use (2048 records)
_FREE_RECORD = bytes(MAP_RECORD_SIZE)
_RECORD_FLAGS = {DATA: 0, ZERO: MAP_FLAG_ZERO, UNSUMMED: MAP_FLAG_NOSUM}
# Drop a batch's slot pages from the page cache once synced: a preserved chunk is read
# only by snapshot reads, and recycling those pages at once (instead of taking fresh
# ones) made a sequential copy-before-write stream x1.8 faster here (docs/performance.md)
DROP_SYNCED_PAGES = True
# Start the writeback of slot data once this much is written (sync_file_range WRITE), so
# that the batch's fdatasync finds it mostly on disk already (docs/performance.md)
WRITEBACK_START = 1 << 20
# A preserve() of at least this many chunks, all cloned into consecutive new slots and
# never preserved before, records them in bulk (_preserve_new_clones); fewer -- a random
# 4 KiB first write preserves one -- go through the per-chunk loop, cheaper for one
BULK_MIN = 4


@dataclass
class SyncBatch:
    """Preserved entries cut for one grouped sync: their slots and their map records,
    packed while the pool lock was held (runs of (map file offset, records))."""

    slots: list[int]
    runs: list[tuple[int, bytes]]


class DiffArea:
    def __init__(self, directory: str, file_id: int, chunk_size: int, nchunks: int,
                 faults: Faults, origin_epoch: int) -> None:
        self.chunk_size = chunk_size
        self.zero_chunk = bytes(chunk_size)
        self.data_path = os.path.join(directory, f"{file_id}.data")
        self.map_path = os.path.join(directory, f"{file_id}.map")
        self.sum_path = os.path.join(directory, f"{file_id}.sum")
        self.sums: DataFile | None = None   # the seal file, opened by the first seal
        exists = os.path.exists(self.map_path)
        self.data = DataFile(self.data_path, "diff", faults,
                             create=not os.path.exists(self.data_path))
        try:
            self.map = DataFile(self.map_path, "map", faults, create=not exists)
        except BaseException:
            self.data.close()
            raise
        try:
            self._setup(directory, exists, faults, nchunks, origin_epoch)
        except BaseException:
            self.data.close()
            self.map.close()
            raise

    def _setup(self, directory: str, exists: bool, faults: Faults, nchunks: int,
               origin_epoch: int) -> None:
        if not exists:
            fsync_dir(directory)   # the new names durable before any record is written
        self.faults = faults
        self.nchunks = nchunks
        # per slot: state, epoch, chunk, digest (the map file's content, in memory)
        self.state = bytearray()
        self.epoch = array("I")
        self.chunk = array("Q")
        self.digest = array("Q")
        self.free_hint = 0
        self.data_slots = 0
        self.tables: dict[int, EpochTable] = {}
        self.epochs: list[int] = []
        # bumped whenever the entries change (preserve, and every rebuild: a drop, a gc,
        # the load): what a memo of results derived from them is checked against
        self.version = 0
        # results derived from the entries, each stored with the version it was made at
        # (blockstore/changes.py: changed extents, asked once per BLOCK_STATUS request)
        self.memo: dict[tuple[int, ...], tuple[int, list[tuple[int, int]]]] = {}
        # space accounting (blockstore/accounting.py): per slot the epoch of its chunk's
        # previous entry when it was preserved, and data entries per (that, epoch);
        # derived from the map, rebuilt at load, kept at preserve, gc and drops
        self.prev = array("I")
        self.spans: accounting.Spans = Counter()
        self.space_memo: accounting.Figures | None = None
        self.any_entry = Bitmap(nchunks)
        self.cowed_latest = Bitmap(nchunks)
        self.origin_epoch = origin_epoch
        self.torn_records = 0
        self.unsynced: list[int] = []   # slots whose map records are not yet written
        self.reclaiming: set[int] = set()   # slots being reclaimed (reclaim.py: plan .. finish)
        self.map_allocated = 0          # map-file bytes known to have blocks (_reserve_map)
        self._waiting = 0               # slot bytes written, writeback not started (_written)
        self._waiting_span = (0, 0)     # the data-file range they lie in
        if exists:
            self._load()

    # -- loading -----------------------------------------------------------------------
    def _load(self) -> None:
        raw = self.map.pread(self.map.size(), 0)
        n = len(raw) // MAP_RECORD_SIZE
        self.state = bytearray(n)
        self.epoch = array("I", bytes(4 * n))
        self.chunk = array("Q", bytes(8 * n))
        self.digest = array("Q", bytes(8 * n))
        for slot in range(n):
            rec = raw[slot * MAP_RECORD_SIZE:(slot + 1) * MAP_RECORD_SIZE]
            fields = unpack_map_record(rec)
            if fields is None:
                if rec != _FREE_RECORD:
                    self.torn_records += 1
                continue
            flags, epoch, chunk, digest = fields
            state = ZERO if flags & MAP_FLAG_ZERO else \
                UNSUMMED if flags & MAP_FLAG_NOSUM else DATA
            self._set_slot(slot, state, epoch, chunk, digest)
        seals.load(self)
        self._rebuild_tables()
        self.prev, self.spans = accounting.recount(self)

    def _grow_slots(self, n: int) -> None:
        """The per-slot arrays cover at least n slots (new ones free)."""
        grow = n - len(self.state)
        if grow > 0:
            self.state.extend(bytes(grow))
            self.epoch.extend(array("I", bytes(4 * grow)))
            self.chunk.extend(array("Q", bytes(8 * grow)))
            self.digest.extend(array("Q", bytes(8 * grow)))

    def _set_slot(self, slot: int, state: int, epoch: int, chunk: int, digest: int) -> None:
        if slot >= len(self.state):
            self._grow_slots(slot + 1)
        self.state[slot] = state
        self.epoch[slot] = epoch
        self.chunk[slot] = chunk
        self.digest[slot] = digest
        if state in HAS_DATA:
            self.data_slots += 1

    def _rebuild_tables(self) -> None:
        self.version += 1
        by_epoch: dict[int, list[tuple[int, int]]] = {}
        for slot, st in enumerate(self.state):
            if st != FREE:
                by_epoch.setdefault(self.epoch[slot], []).append((self.chunk[slot], slot))
        self.tables = {}
        # the bitmaps cover every entry, also one past every LUN's end: a shrinking
        # revert preserves the tail it discards (the change log, changes.py), and after
        # a grow a write there must see that entry, or it preserves the chunk again in
        # the same epoch (a second key in one table: the space counters disagree)
        for items in by_epoch.values():
            items.sort()
        top = max((items[-1][0] + 1 for items in by_epoch.values()), default=0)
        self.nchunks = max(self.nchunks, top)
        self.any_entry.close()
        self.any_entry = Bitmap(self.nchunks)
        self.cowed_latest.close()
        self.cowed_latest = Bitmap(self.nchunks)
        for epoch, items in by_epoch.items():
            t = EpochTable()
            t.keys = array("Q", [c for c, _ in items])
            t.vals = array("I", [s for _, s in items])
            self.tables[epoch] = t
            for c, _ in items:
                self.any_entry.set(c)
                if epoch == self.origin_epoch:
                    self.cowed_latest.set(c)
        self.epochs = sorted(self.tables)

    # -- lookups -------------------------------------------------------------------------
    def lookup(self, chunk: int, epoch: int) -> int | None:
        """Slot that holds chunk `chunk` as snapshot `epoch` saw it, or None (origin)."""
        if not self.any_entry.test(chunk):
            return None
        epochs = self.epochs
        for i in range(bisect_left(epochs, epoch), len(epochs)):
            slot = self.tables[epochs[i]].get(chunk)
            if slot is not None:
                return slot
        return None

    def is_zero(self, slot: int) -> bool:
        """The slot preserves an all-zero chunk (no data stored for it)."""
        return self.state[slot] == ZERO

    def last_epoch(self, chunk: int) -> int:
        """Epoch of the newest preservation of `chunk` (0: never preserved)."""
        if self.any_entry.test(chunk):
            for epoch in reversed(self.epochs):
                if self.tables[epoch].get(chunk) is not None:
                    return epoch
        return 0

    def chunks_since(self, epoch: int) -> set[int]:
        """Every chunk preserved at or after `epoch`: where snapshot `epoch` differs."""
        out: set[int] = set()
        for e in self.epochs[bisect_left(self.epochs, epoch):]:
            out.update(c for c, _ in self.tables[e].items())
        return out

    def chunks_between(self, first: int, end: int | None = None) -> list[array]:
        """Per epoch in [first, end) (end None: no bound), a sorted copy of its chunks:
        those first written while that epoch was the newest (blockstore/changes.py
        merges them). A copy (memcpy of 8 bytes per entry) so that the merge can run
        without the pool lock; O(entries in those epochs)."""
        lo = bisect_left(self.epochs, first)
        hi = len(self.epochs) if end is None else bisect_left(self.epochs, end)
        return [array("Q", self.tables[e].sorted_chunks()) for e in self.epochs[lo:hi]]

    def read_slot(self, slot: int, cached: bool = False) -> bytes | bytearray:
        """A preserved chunk, checked against its digest. cached: only from the page
        cache (fileio.NotCached where it would wait for the disk)."""
        st = self.state[slot]
        if st == ZERO:
            return self.zero_chunk
        pos = slot * self.chunk_size
        data = self.data.pread_cached(self.chunk_size, pos) if cached else \
            self.data.pread(self.chunk_size, pos)
        return self.verified(slot, data, st, int(self.digest[slot]))

    def verified(self, slot: int, data: bytes | bytearray, st: int, digest: int
                 ) -> bytes | bytearray:
        """A slot's data as read, if it matches the state and digest the slot had when
        the read was planned (blockstore/threadreads.py reads without the lock)."""
        if st == UNSUMMED:   # no digest yet (see blockstore/seals.py): served as read
            return data + bytes(self.chunk_size - len(data))
        if len(data) != self.chunk_size or xxhash.xxh3_64_intdigest(data) != digest:
            raise CorruptData(f"diff area {self.data_path} slot {slot} (chunk "
                              f"{self.chunk[slot]}) failed its checksum")
        return data

    # -- preservation ------------------------------------------------------------------
    def _alloc_slots(self, n: int) -> list[int]:
        """n free slots, lowest first; nothing is marked until the batch is durable."""
        slots: list[int] = []
        pos = self.free_hint
        while len(slots) < n:
            s = self.state.find(FREE, pos)
            if s < 0:
                break
            slots.append(s)
            pos = s + 1
        end = len(self.state)
        while len(slots) < n:
            slots.append(end)
            end += 1
        return slots

    def preserve(self, items: Sequence[tuple[int, bytes | bytearray | memoryview | None]],
                 epoch: int,
                 source: DataFile | None = None) -> None:
        """Preserve the old contents of these chunks in slots mapped to `epoch`.

        items: (chunk index, its full old content) -- written to the slot, with its
        digest -- or (chunk index, None): the slot gets the chunk's blocks from `source`
        (the origin file) by reference (FICLONERANGE; the caller made sure the pool's
        file system shares blocks and the whole chunk lies inside source), and no
        digest until a seal (state UNSUMMED). Slot data goes out now (one system call
        per run of consecutive slots); the map records wait for harden(), which the
        caller must run before it overwrites those chunks in the origin. Raises OSError
        (ENOSPC, EIO) with nothing recorded.
        """
        cs = self.chunk_size
        zero_chunk = self.zero_chunk
        digest = xxhash.xxh3_64_intdigest
        batch = []
        copies: list[tuple[int, bytes | bytearray | memoryview]] = []
        clones: list[tuple[int, int]] = []
        slots = self._alloc_slots(len(items))
        if slots:
            self._reserve_map(slots[-1] + 1)
            # the arrays grown once per call, not once per slot: a stream of whole-chunk
            # first writes takes new slots at the end, 16 per 1 MiB write
            self._grow_slots(slots[-1] + 1)
        if len(items) >= BULK_MIN and source is not None \
                and slots[-1] - slots[0] == len(slots) - 1 \
                and all(old is None for _, old in items) \
                and not any(self.any_entry.test(c) for c, _ in items):
            self._preserve_new_clones(slots, [c for c, _ in items], epoch, source)
            return
        for slot, (chunk, old) in zip(slots, items, strict=True):
            if old is None:
                clones.append((slot, chunk))
                batch.append((slot, chunk, UNSUMMED, 0))
            elif is_zeros(old, zero_chunk):
                batch.append((slot, chunk, ZERO, 0))
            else:
                copies.append((slot, old))
                batch.append((slot, chunk, DATA, digest(old)))
        for i, j in consecutive_runs([slot for slot, _ in copies]):
            self.data.pwritev([old for _, old in copies[i:j]],  # type: ignore[misc]
                              copies[i][0] * cs)
        self._written([slot for slot, _ in copies])
        if clones:
            assert source is not None, "a clone needs its source"
            for i, j in _clone_runs(clones):
                self.data.clone_from(source, clones[i][1] * cs, clones[i][0] * cs,
                                     (j - i) * cs)
        table = self._table(epoch)
        if batch:
            self.version += 1
        for slot, chunk, state, sum64 in batch:
            accounting.count(self, slot, chunk, epoch, state in HAS_DATA)
            self._set_slot(slot, state, epoch, chunk, sum64)
            table.add(chunk, slot)
            self.any_entry.set(chunk)
            if epoch == self.origin_epoch:
                self.cowed_latest.set(chunk)
            self.unsynced.append(slot)
        if batch:
            self.free_hint = batch[-1][0] + 1

    def _table(self, epoch: int) -> EpochTable:
        table = self.tables.get(epoch)
        if table is None:
            table = self.tables[epoch] = EpochTable()
            self.epochs = sorted(self.tables)
        return table

    def _preserve_new_clones(self, slots: list[int], chunks: list[int], epoch: int,
                             source: DataFile) -> None:
        """preserve() of chunks that all are cloned into consecutive new slots and have
        no entry yet (a sequential first-write stream after a snapshot): the same
        records, bookkeeping per call instead of per chunk (the per-chunk loop was
        ~4-5 us per chunk on the FUSE thread, docs/performance.md)."""
        cs = self.chunk_size
        pairs = list(zip(slots, chunks))
        for i, j in _clone_runs(pairs):
            self.data.clone_from(source, chunks[i] * cs, slots[i] * cs, (j - i) * cs)
        table = self._table(epoch)
        self.version += 1
        n, lo, hi = len(slots), slots[0], slots[-1] + 1
        accounting.count_new(self, lo, hi, epoch)   # each chunk's previous epoch: none
        self.state[lo:hi] = bytes([UNSUMMED]) * n
        self.epoch[lo:hi] = array("I", [epoch]) * n
        self.chunk[lo:hi] = array("Q", chunks)
        self.digest[lo:hi] = array("Q", bytes(8 * n))
        self.data_slots += n
        table.add_many(zip(chunks, slots))   # the table maps chunk -> slot
        latest = epoch == self.origin_epoch
        for c in chunks:
            self.any_entry.set(c)
            if latest:
                self.cowed_latest.set(c)
        self.unsynced.extend(slots)
        self.free_hint = hi

    def _written(self, slots: list[int]) -> None:
        """Slot data was just written to these slots (sorted). Once WRITEBACK_START bytes
        are waiting, their writeback starts (no durability: that is still the batch's
        fdatasync), so the disk writes them while the data path copies the next ones."""
        if not slots:
            return
        cs = self.chunk_size
        lo, hi = slots[0] * cs, (slots[-1] + 1) * cs
        if self._waiting:
            lo, hi = min(lo, self._waiting_span[0]), max(hi, self._waiting_span[1])
        self._waiting += len(slots) * cs
        if self._waiting >= WRITEBACK_START:
            self.data.start_writeback(lo, hi - lo)
            self._waiting = 0
        else:
            self._waiting_span = (lo, hi)

    def _reserve_map(self, nslots: int) -> None:
        """Make sure the map file has blocks for the records of nslots slots BEFORE any
        data is written: a full filesystem then fails preserve() with ENOSPC (the
        overflow: the oldest snapshot goes), never the record writes at sync time, where
        an error means the preservations are lost and every snapshot needing them
        becomes invalid."""
        need = nslots * MAP_RECORD_SIZE
        if need <= self.map_allocated:
            return
        target = -(-need // MAP_AHEAD) * MAP_AHEAD
        self.map.allocate(self.map_allocated, target - self.map_allocated)
        self.map_allocated = target

    def cut(self) -> SyncBatch | None:
        """Take every preserved-but-unsynced entry as one batch for sync_batch(); later
        preservations go to the next batch. None if there is nothing to sync."""
        if not self.unsynced:
            return None
        slots = sorted(self.unsynced)
        self.unsynced = []
        runs = []
        for i, j in consecutive_runs(slots):
            # one pwrite per run of consecutive slots (a record per system call was 14 %
            # of a 4 KiB first-write workload)
            runs.append((slots[i] * MAP_RECORD_SIZE, b"".join(
                pack_map_record(_RECORD_FLAGS[self.state[s]],
                                self.epoch[s], self.chunk[s], self.digest[s])
                for s in slots[i:j])))
        return SyncBatch(slots, runs)

    def sync_batch(self, batch: SyncBatch) -> None:
        """Make a batch durable: data -> fdatasync -> records -> fdatasync(map): one sync
        pair for the whole group (invariant 2, grouped). Touches only the files and the
        batch, never the in-memory maps, so the pool may run it without its lock while
        the data path preserves more chunks (Pool.writeback). Raises OSError with the
        batch not durable (drop_batch() then)."""
        self.faults.point("cow.data_written")
        self.data.sync()
        self.faults.point("cow.data_synced")
        if DROP_SYNCED_PAGES:
            cs = self.chunk_size
            for i, j in consecutive_runs(batch.slots):
                self.data.drop_cache(batch.slots[i] * cs, (j - i) * cs)
        for offset, records in batch.runs:
            self.map.pwrite(records, offset)
        self.faults.point("cow.map_written")
        self.map.sync()
        self.faults.point("cow.map_synced")

    def harden(self) -> None:
        """cut() + sync_batch() in one go; on failure the batch stays unsynced (for
        drop_unsynced())."""
        batch = self.cut()
        if batch is None:
            return
        try:
            self.sync_batch(batch)
        except BaseException:
            self.unsynced[:0] = batch.slots
            raise

    def drop_unsynced(self) -> list[tuple[int, int]]:
        """harden() failed: forget the entries it could not make durable. Returns their
        (chunk, epoch) so the caller can invalidate the snapshots that needed them."""
        slots, self.unsynced = self.unsynced, []
        return self._drop(slots)

    def drop_batch(self, batch: SyncBatch) -> list[tuple[int, int]]:
        """sync_batch() failed: the same as drop_unsynced() for that batch."""
        return self._drop(batch.slots)

    def _drop(self, slots: list[int]) -> list[tuple[int, int]]:
        lost = [(self.chunk[s], self.epoch[s]) for s in slots]
        for s in slots:
            accounting.uncount(self, s, self.state[s] in HAS_DATA)
            if self.state[s] in HAS_DATA:
                self.data_slots -= 1
            self.state[s] = FREE
        self.free_hint = 0
        self._rebuild_tables()
        return lost

    # -- epochs, growth, reclaim ----------------------------------------------------------
    def new_epoch(self, epoch: int) -> None:
        """A snapshot was committed: nothing is preserved for it yet. O(1) (lazy mmap)."""
        self.origin_epoch = epoch
        if self.space_memo is not None:
            self.space_memo.follow(epoch)
        old = self.cowed_latest
        self.cowed_latest = Bitmap(self.nchunks)
        old.close()

    def grow(self, nchunks: int) -> None:
        self.nchunks = max(self.nchunks, nchunks)   # never below an entry (_rebuild_tables)
        self.any_entry = self.any_entry.grown(nchunks)
        self.cowed_latest = self.cowed_latest.grown(nchunks)

    def used_bytes(self) -> int:
        return self.data_slots * self.chunk_size

    def unsummed(self) -> int:
        return self.state.count(UNSUMMED)

    def forget_failure(self) -> None:
        """A failed sync of the data or map file is accounted for: every entry whose
        data or record it may have lost was dropped (drop_batch, drop_unsynced)."""
        self.data.clear_failure()
        self.map.clear_failure()

    def entries(self) -> int:
        return sum(1 for st in self.state if st != FREE)

    def close(self) -> None:
        self.data.close()
        self.map.close()
        if self.sums is not None:
            self.sums.close()
        self.any_entry.close()
        self.cowed_latest.close()


def _clone_runs(clones: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """[i, j) ranges of (slot, chunk) pairs where both go up by one: one clone each."""
    i = 0
    for j in range(1, len(clones) + 1):
        if j == len(clones) or clones[j][0] != clones[j - 1][0] + 1 \
                or clones[j][1] != clones[j - 1][1] + 1:
            yield i, j
            i = j
