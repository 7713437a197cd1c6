"""The engine's model: what a pool holds, in memory. The public records (VolumeInfo,
SnapshotInfo), their internal twins (_Volume, _Snapshot, with the files and maps), the
held-write batch, the kinds and states, and the engine's constants."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from .fileio import DataFile

if TYPE_CHECKING:
    from .diffarea import DiffArea, SyncBatch

# progress(done, total) of a long operation, in bytes (chunk-granular ones count whole
# chunks): called between steps, where raising (errors.Cancelled) stops it
Progress = Callable[[int, int], None] | None

MAX_SNAPSHOTS_PER_VOLUME = 512   # VSS's limit per volume
MAX_CHUNKS = 1 << 32             # per volume (see Volumes._check_chunks)
RESERVE_MAX = 256 << 20          # default diff-area limit: free space minus this reserve
COPY_PIECE = 1 << 20             # unit of plex sync / promote copies
# Grouped syncs: origin writes to freshly preserved chunks wait in memory (at most this
# many bytes per volume, this many seconds) until one data+map sync pair covers them all.
WRITEBACK_BYTES = 32 << 20
WRITEBACK_AGE = 0.1
SPACE_RECHECK = 0.5              # seconds a free-space reading is trusted (default limit)...
SPACE_MARGIN = 64 << 20          # ...unless less than this much room is left
# Preserve by reference (reflink) on a file system that overwrites in place (xfs) only
# what a write covers whole in a run of at least this many bytes -- or in a sequential
# stream (the write starts where the previous one ended: a loop device splits a stream
# into requests of 128 KiB): a clone makes the origin's next write of the chunk allocate
# new blocks, so random 64 KiB writes would fragment the origin for nothing (measured:
# 3,221 extents instead of 1, no gain; issue 14). btrfs allocates on every overwrite
# anyway: there every whole chunk is cloned.
CLONE_MIN_RUN = 256 << 10
META_RESERVE = 1 << 20           # POOL/reserve: room kept for metadata on a full fs


class Kind(StrEnum):
    """A snapshot's kind (stored in the catalog by value)."""
    DIFFERENTIAL = "differential"   # copy-before-write into the origin's diff area
    PLEX = "plex"                   # full copy, synced while preparing
    FULL = "full"                   # full copy made from a differential (promote)


class State(StrEnum):
    """A snapshot's state (stored in the catalog by value)."""
    PREPARING = "preparing"
    COMMITTED = "committed"
    INVALID = "invalid"             # its preserved data was lost: reads fail


DIFFERENTIAL, PLEX, FULL = Kind.DIFFERENTIAL, Kind.PLEX, Kind.FULL
PREPARING, COMMITTED, INVALID = State.PREPARING, State.COMMITTED, State.INVALID


@dataclass(frozen=True)
class Capabilities:
    """What an array can do, for the provider to decide what to offer (AreLunsSupported,
    the automagic kind) instead of trying and failing. A record of the Array interface
    (provider/array.py), like VolumeInfo and SnapshotInfo."""

    plex: bool                      # full-copy snapshots synced while preparing
    promote: bool                   # a differential snapshot made a full copy in place
    split: bool                     # a snapshot turned into a new, independent volume
    revert: bool                    # a volume made equal to one of its snapshots
    reflink: bool                   # chunks preserved by reference (issue 14)
    changed_blocks: bool            # changed-block maps between snapshots (issue 17)
    max_snapshots_per_volume: int


@dataclass(frozen=True)
class VolumeInfo:
    id: int
    name: str
    naa: str
    size: int
    created: float
    read_only: bool
    mtime: float
    snapshots: int
    diff_bytes: int


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    set_id: str | None
    volume: str
    origin_naa: str
    naa: str
    size: int
    kind: Kind
    state: State
    created: float
    attributes: int
    exposed_name: str | None
    sync_done: int
    sync_total: int
    epoch: int | None
    file_id: int
    # a committed differential's diff-area bytes (blockstore/accounting.py): held only
    # for it (what deleting it frees, zfs `used`) and shared with other snapshots; None
    # for other kinds and states, and where a backend cannot tell cheaply (Ceph)
    used: int | None = None
    shared: int | None = None


@dataclass(eq=False)
class _Volume:
    id: int
    name: str
    naa: str
    size: int
    created: float
    flags: int
    epoch: int
    diff_limit: int | None
    file: DataFile
    mtime: float = 0.0
    diff: DiffArea | None = None
    mirrors: list[_Snapshot] = field(default_factory=list)   # plexes being synced
    snaps: list[_Snapshot] = field(default_factory=list)
    live_epochs: list[int] = field(default_factory=list)     # committed differential
    held: Held = field(default_factory=lambda: Held())   # writes waiting for their syncs
    stream_end: int = -1    # where the last write or discard ended (a sequential stream
                            # continues there: DataPath._clones)


# A held chunk's content: a bytearray (read from the file, then written into), or a
# read-only view of the write that replaced the chunk whole (cloned chunks: no copy);
# Held.writable() turns the latter into a bytearray when a later write lands in it.
HeldBuffer = bytearray | memoryview


@dataclass(eq=False)
class _Batch:
    """Held chunks of one volume and the diff-area entries that must be durable before
    they may reach the origin file (Pool.writeback)."""

    volume: _Volume
    sync: SyncBatch | None
    held: list[tuple[int, HeldBuffer]]   # (chunk, its buffer at the cut)
    cut_at: float
    synced: threading.Event = field(default_factory=threading.Event)
    error: OSError | None = None
    crashed: BaseException | None = None
    done: bool = False
    # the writeback thread's write-out WITHOUT the pool lock (heldwrites._write_out_unlocked):
    # set when it started; `written` is set when its I/O is over, with `out` = (the chunks
    # and buffers it wrote, the chunks done, the error that stopped it or None)
    written: threading.Event | None = None
    out: tuple[list[tuple[int, HeldBuffer, int, int, int]], list[int],
               BaseException | None] | None = None


@dataclass(eq=False)
class Held:
    """One volume's held writes (blockstore/heldwrites.py runs their syncs): chunks whose
    preservation in the diff area is not durable yet, so their new content may not reach
    the origin file before DiffArea.harden() (invariant 2). The pool lock guards it, like
    everything of the volume; the batch's sync alone runs without the lock."""

    # chunk -> its new full content (reads and writes of the chunk use this buffer)
    chunks: dict[int, HeldBuffer] = field(default_factory=dict)
    # chunk -> (lo, hi): the part of its buffer that differs from the origin file (the
    # rest is the old content it was read from): only that part is written back
    dirty: dict[int, tuple[int, int]] = field(default_factory=dict)
    since: float = 0.0             # time.monotonic() of the oldest held write
    batch: _Batch | None = None    # the batch of its held chunks queued or syncing
    # preservations a failed sync lost, whose snapshots are not marked invalid yet
    lost: list[tuple[list[tuple[int, int]], OSError]] = field(default_factory=list)
    # chunks whose buffers the writeback thread is copying to the origin file without the
    # pool lock: a write into one gets a new buffer (writable), never changes that one
    writing: frozenset[int] = frozenset()

    def hold(self, items: list[tuple[int, HeldBuffer]], now: float) -> None:
        """Hold these (chunk, content) buffers: a fresh bytearray from _read_chunks, or
        a read-only view of an immutable write (no copy); new writes land in them."""
        if not self.chunks:
            self.since = now
        for c, buf in items:
            self.chunks[c] = buf

    def writable(self, chunk: int) -> bytearray:
        """The held buffer of `chunk`, made a bytearray if it was a read-only view. The
        batch being synced gets the new buffer too: a batch finds the chunks it covers
        by identity (_write_out, _drain), and this is the same content, only mutable.
        A chunk being written out without the lock (`writing`) gets a copy that the
        batch does NOT get: the file receives the buffer as it was, and the chunk stays
        held with the new one (its identity changed) for the next batch."""
        buf = self.chunks[chunk]
        if chunk in self.writing:
            new = self.chunks[chunk] = bytearray(buf)
            return new
        if isinstance(buf, bytearray):
            return buf
        new = self.chunks[chunk] = bytearray(buf)
        b = self.batch
        if b is not None:
            i = bisect_left(b.held, chunk, key=lambda item: item[0])
            if i < len(b.held) and b.held[i][0] == chunk and b.held[i][1] is buf:
                b.held[i] = (chunk, new)
        return new

    def mark_dirty(self, chunk: int, lo: int, hi: int) -> None:
        """Widen the dirty part of a held chunk to cover [lo, hi) (chunk-relative)."""
        old = self.dirty.get(chunk)
        self.dirty[chunk] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def in_order(self) -> list[tuple[int, HeldBuffer]]:
        """(chunk, buffer) of everything held, in chunk order (for a batch)."""
        return [(c, self.chunks[c]) for c in sorted(self.chunks)]

    def overlay(self, data: bytes | bytearray, offset: int, cs: int) -> bytes | bytearray:
        """``data`` read from the origin file at ``offset``, with the held chunks' newer
        content laid over it (the bytes unchanged, without a copy, if none overlaps)."""
        end = offset + len(data)
        over = [c for c in range(offset // cs, (end - 1) // cs + 1) if c in self.chunks]
        if not over:
            return data
        out = bytearray(data)
        for c in over:
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            out[lo - offset:hi - offset] = self.chunks[c][lo - c * cs:hi - c * cs]
        return bytes(out)

    def release(self, done: list[int]) -> None:
        """These chunks reached the origin file: no longer held."""
        for c in done:
            del self.chunks[c]
            self.dirty.pop(c, None)


@dataclass(eq=False)
class _Snapshot:
    id: int
    snap_id: str
    set_id: str | None
    naa: str
    origin: _Volume
    kind: Kind
    epoch: int | None
    state: State
    size: int
    created: float
    attributes: int
    exposed_name: str | None
    sealed: bool
    file: DataFile | None = None
    sync_cursor: int = 0
    sync_done: int = 0
    sync_total: int = 0


@dataclass
class Tally:
    """What a check or scrub read, filled in as it goes (the caller's to give): the LUNs
    it covered, the chunks it verified against their checksums and the bytes it read to
    verify them (a scrub: also every allocated byte of each LUN)."""
    luns: int = 0
    chunks: int = 0
    bytes: int = 0


def _no_return(progress: Progress) -> None:
    """Tell a progress callback that the operation is past its last cancellation point
    (it completes now, whatever the callback raises later): the optional attribute
    ``point_of_no_return`` of the callback, called without arguments."""
    hook = getattr(progress, "point_of_no_return", None)
    if hook is not None:
        hook()

