"""The array engine: a pool of volumes and their snapshots.

Plain synchronous Python, thread-safe through one re-entrant lock per pool (the FUSE
handlers call it from the trio thread; plex sync, promote, revert and scrub run in
worker threads and take the lock per step). The lock guards bookkeeping, not the disk:
syncs and long reads run outside it (cut under the lock, I/O outside, finish under it),
so that the trio thread never waits behind another thread's I/O. docs/concurrency.md
says what each lock guards and what runs where; docs/format.md describes the files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import xxhash

from . import format as fmt
from .catalog import Catalog
from .chunkmap import consecutive_runs
from .diffarea import DiffArea, SyncBatch
from .errors import (
    Busy,
    Cancelled,
    Exists,
    InvalidSize,
    InvalidState,
    NoSpace,
    NotFound,
    OutOfRange,
    PoolLocked,
    ReadOnly,
    SnapshotInvalid,
    StoreError,
    Unsupported,
)
from .fileio import DataFile, Faults, data_extents, fsync_dir
from .names import check_guid, check_name, check_size

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None] | None

MAX_SNAPSHOTS_PER_VOLUME = 512   # VSS's limit per volume
MAX_CHUNKS = 1 << 32             # per volume (see _check_chunks)
RESERVE_MAX = 256 << 20          # default diff-area limit: free space minus this reserve
COPY_PIECE = 1 << 20             # unit of plex sync / promote copies
# Grouped syncs: origin writes to freshly preserved chunks wait in memory (at most this
# many bytes per volume, this many seconds) until one data+map sync pair covers them all.
WRITEBACK_BYTES = 32 << 20
WRITEBACK_AGE = 0.1
SPACE_RECHECK = 0.5              # seconds a free-space reading is trusted (default limit)...
SPACE_MARGIN = 64 << 20          # ...unless less than this much room is left
META_RESERVE = 1 << 20           # POOL/reserve: room kept for metadata on a full fs
DIFFERENTIAL, PLEX, FULL = "differential", "plex", "full"
PREPARING, COMMITTED, INVALID = "preparing", "committed", "invalid"


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
    kind: str
    state: str
    created: float
    attributes: int
    exposed_name: str | None
    sync_done: int
    sync_total: int
    epoch: int | None
    file_id: int


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
    # chunk -> its new full content, for chunks whose preservation is not durable yet:
    # they may not reach the origin file before DiffArea.harden() (invariant 2)
    pending: dict[int, bytearray] = field(default_factory=dict)
    # chunk -> (lo, hi): the part of its pending buffer that differs from the origin file
    # (the rest is the old content it was read from): only that part is written back
    pending_dirty: dict[int, tuple[int, int]] = field(default_factory=dict)
    pending_since: float = 0.0
    batch: _Batch | None = None   # the batch of its held chunks queued or syncing
    # preservations a failed sync lost, whose snapshots are not marked invalid yet
    lost: list[tuple[list[tuple[int, int]], OSError]] = field(default_factory=list)


@dataclass(eq=False)
class _Batch:
    """Held chunks of one volume and the diff-area entries that must be durable before
    they may reach the origin file (Pool.writeback)."""

    volume: _Volume
    sync: SyncBatch | None
    held: list[tuple[int, bytearray]]    # (chunk, its buffer at the cut)
    cut_at: float
    synced: threading.Event = field(default_factory=threading.Event)
    error: OSError | None = None
    crashed: BaseException | None = None
    done: bool = False


@dataclass(eq=False)
class _Snapshot:
    id: int
    snap_id: str
    set_id: str | None
    naa: str
    origin: _Volume
    kind: str
    epoch: int | None
    state: str
    size: int
    created: float
    attributes: int
    exposed_name: str | None
    sealed: bool
    file: DataFile | None = None
    sync_cursor: int = 0
    sync_done: int = 0
    sync_total: int = 0


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _no_return(progress: Progress) -> None:
    """Tell a progress callback that the operation is past its last cancellation point
    (it completes now, whatever the callback raises later): the optional attribute
    ``point_of_no_return`` of the callback, called without arguments."""
    hook = getattr(progress, "point_of_no_return", None)
    if hook is not None:
        hook()


def _mark_dirty(v: _Volume, chunk: int, lo: int, hi: int) -> None:
    """Widen the dirty part of a pending chunk to cover [lo, hi) (chunk-relative)."""
    old = v.pending_dirty.get(chunk)
    v.pending_dirty[chunk] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))


def _locked(method: Callable[Concatenate[Pool, _P], _R]) -> Callable[Concatenate[Pool, _P], _R]:
    @functools.wraps(method)
    def wrapper(self: Pool, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Pool:
    """An open pool. Create with Pool.create(), open with Pool.open(); close() at the end.

    Methods with a leading underscore expect the pool lock held (those that mutate state
    assert it) unless their docstring says "WITHOUT the lock"."""

    # set by open(), from pool.json and the catalog file
    chunk_size: int
    pool_id: str
    catalog: Catalog

    def __init__(self, path: str, _faults: Faults | None = None) -> None:
        self.path = os.path.abspath(path)
        self.faults = _faults or Faults()
        self._lock = threading.RLock()
        # batches the data path cut for the writeback thread, and its wake-up call
        self._queued: list[_Batch] = []
        self._promoting: set[str] = set()   # snapshot ids a promote is copying now
        self._wake = threading.Event()
        # True once a thread calls writeback() periodically (the daemon): the data path
        # then leaves the age bound of held writes to it and never syncs for it inline
        self.background_writeback = False
        self._lock_fd = -1
        self.generation = 0
        self.problems: list[str] = []   # found while opening; check() reports them
        self._reverting: dict[int, _Snapshot] = {}   # volume id -> revert target
        self._space: tuple[float, int] = (-math.inf, 0)  # (when, free - reserve) read
        self._space_taken = 0             # diff-area bytes preserved since that reading
        self.last_io = 0.0                # time.monotonic() of the last read or write
        self._volumes: dict[str, _Volume] = {}
        self._snaps: dict[str, _Snapshot] = {}
        self._closed = True

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, chunk_size: int = fmt.DEFAULT_CHUNK,
               faults: Faults | None = None) -> Pool:
        fmt.check_chunk_size(chunk_size)
        path = os.path.abspath(path)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise Exists(f"{path} exists and is not a directory")
            if os.listdir(path):
                raise Exists(f"{path} is not empty; a pool needs a new or empty directory")
        else:
            os.makedirs(path, mode=0o700)
        for sub in ("luns", "diff"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        Catalog(os.path.join(path, "catalog.sqlite")).close()
        # pool.json last: a directory without it is not (yet) a pool.
        fmt.write_pool_file(path, chunk_size, fmt.new_pool_id())
        return cls.open(path, faults=faults)

    @classmethod
    def open(cls, path: str, faults: Faults | None = None) -> Pool:
        pool = cls(path, faults)
        if not os.path.isdir(pool.path):
            raise NotFound(f"no pool at {pool.path} (not a directory); "
                           "create one with 'shadowplex pool init'")
        meta = fmt.read_pool_file(pool.path)
        pool.chunk_size = meta["chunk_size"]
        pool.pool_id = meta["pool_id"]
        pool._take_lock()
        try:
            pool.catalog = Catalog(os.path.join(pool.path, "catalog.sqlite"))
            pool._closed = False
            pool._load()
            pool._keep_reserve()
        except BaseException:
            pool._release_files()
            raise
        return pool

    def _take_lock(self) -> None:
        fn = os.path.join(self.path, "lock")
        fd = os.open(fn, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PoolLocked(f"pool {self.path} is in use by process {holder}; "
                             "stop that shadowplex serve first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for v in self._volumes.values():
                self._writeback(v)
                v.file.sync()
                for s in v.mirrors:
                    if s.file:
                        s.file.sync()
            self._release_files()

    def _release_files(self) -> None:
        for v in self._volumes.values():
            v.file.close()
            if v.diff:
                v.diff.close()
            for s in v.snaps:
                if s.file:
                    s.file.close()
        self._volumes.clear()
        self._snaps.clear()
        if not self._closed:
            self.catalog.close()
        self._closed = True
        if self._lock_fd >= 0:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = -1

    def abandon(self) -> None:
        """Drop every file descriptor WITHOUT flushing: what a kill -9 leaves (tests)."""
        with self._lock:
            for v in self._volumes.values():   # a kill -9 loses what is not synced yet
                b = v.batch
                if b is not None:
                    if b not in self._queued:
                        b.synced.wait()   # the writeback thread is using the files
                    b.done = True
                    v.batch = None
            self._queued.clear()
            self._release_files()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the lock ---------------------------------------------------------------------------
    def _owned(self) -> bool:
        """Whether this thread holds the pool lock (for assertions in private mutators)."""
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def _pin(self, files: Iterable[DataFile | None]) -> list[DataFile]:
        """(Lock held.) Keep these files open for I/O that runs without the lock: a
        concurrent delete or close defers its close() to _unpin."""
        assert self._owned(), "pool lock not held"
        pinned = [f for f in files if f is not None]
        for f in pinned:
            f.pin()
        return pinned

    def _unpin(self, files: list[DataFile]) -> None:
        with self._lock:
            for f in files:
                f.unpin()

    # -- paths ------------------------------------------------------------------------------
    def _img(self, file_id: int) -> str:
        return os.path.join(self.path, "luns", f"{file_id}.img")

    def _hdr(self, file_id: int) -> str:
        return os.path.join(self.path, "luns", f"{file_id}.hdr")

    def _sum(self, file_id: int) -> str:
        return os.path.join(self.path, "luns", f"{file_id}.sum")

    def image_path(self, key: str) -> str | None:
        """Path of the raw image holding a volume's (or full copy's) data, for tools."""
        with self._lock:
            lun = self._lun(key)
            if isinstance(lun, _Volume):
                return self._img(lun.id)
            return self._img(lun.id) if lun.file else None

    def _nchunks(self, size: int) -> int:
        return (size + self.chunk_size - 1) // self.chunk_size

    # -- loading and recovery ---------------------------------------------------------------
    def _load(self) -> None:
        """Rebuild the in-memory state from the catalog; finish or undo interrupted work."""
        known: set[str] = set()
        for row in self.catalog.volumes():
            img = self._img(row["id"])
            try:
                f = DataFile(img, "origin", self.faults)
            except FileNotFoundError:
                self.problems.append(f"volume {row['name']}: image {img} is missing")
                continue
            if f.size() != row["size"]:
                # A crash inside _set_volume_size (a grow, or revert's final shrink) between
                # sizing the image and recording the size. The catalog is the authority and
                # sizing the image to it is safe in both directions:
                # * image longer (a grow not recorded): nothing was ever written past the
                #   recorded size (writes past it are refused, and the grow had not
                #   returned), so the cut drops only a hole.
                # * image shorter (a shrink not recorded): revert discards the tail through
                #   copy-before-write and hardens the diff area before it cuts the image, so
                #   the tail held zeros and every snapshot that needs its old content reads
                #   it from the diff area. Extending again makes a hole: the same zeros.
                log.warning("volume %s: image is %d bytes, catalog says %d (interrupted "
                            "resize); sizing the image to the catalog", row["name"],
                            f.size(), row["size"])
                f.truncate(row["size"])
                f.sync()
            v = _Volume(row["id"], row["name"], row["naa"], row["size"], row["created"],
                        row["flags"], row["epoch"], row["diff_limit"], f, mtime=row["created"])
            self._volumes[v.name] = v
            known.update({f"{v.id}.img", f"{v.id}.hdr"})
        by_id = {v.id: v for v in self._volumes.values()}
        for row in self.catalog.snapshots():
            origin = by_id.get(row["origin_id"])
            if origin is None:
                self.problems.append(f"snapshot {row['snap_id']}: origin volume is missing")
                continue
            s = _Snapshot(row["id"], row["snap_id"], row["set_id"], row["naa"], origin,
                          row["kind"], row["epoch"], row["state"], row["size"],
                          row["created"], row["attributes"], row["exposed_name"],
                          bool(row["sealed"]))
            if s.state == PREPARING:
                log.warning("snapshot %s was being prepared when the pool was last closed; "
                            "aborting it", s.snap_id)
                with self.catalog.transaction() as db:
                    db.execute("DELETE FROM snapshots WHERE id=?", (s.id,))
                continue
            if s.kind in (PLEX, FULL):
                try:
                    s.file = DataFile(self._img(s.id), "plex", self.faults, read_only=True)
                except FileNotFoundError:
                    self.problems.append(f"snapshot {s.snap_id}: image {self._img(s.id)} "
                                         "is missing; marked invalid")
                    self._set_state(s, INVALID)
                known.update({f"{s.id}.img", f"{s.id}.sum"})
            origin.snaps.append(s)
            self._snaps[s.snap_id] = s
            known.add(f"{s.id}.hdr")
        self._remove_orphans(known)
        for v in self._volumes.values():
            self._refresh_live(v)
            if v.live_epochs or os.path.exists(os.path.join(self.path, "diff", f"{v.id}.map")):
                self._open_diff(v)
                if v.diff:
                    v.diff.gc(v.live_epochs)   # entries of snapshots deleted before a crash
            self._write_header(v)
            for s in v.snaps:
                self._write_header(s)
        self._resume_reverts()   # last: it needs every volume, snapshot and diff area

    def _remove_orphans(self, known: set[str]) -> None:
        """Files of LUNs whose catalog rows were never committed or already deleted."""
        ids = {str(v.id) for v in self._volumes.values()}
        for sub, keep in (("luns", known), ("diff", None)):
            d = os.path.join(self.path, sub)
            for fn in os.listdir(d):
                stem = fn.split(".", 1)[0]
                orphan = fn not in keep if keep is not None else stem not in ids
                if orphan or fn.endswith((".tmp", ".partial")):
                    log.warning("removing leftover %s/%s (interrupted operation)", sub, fn)
                    os.unlink(os.path.join(d, fn))

    def _open_diff(self, v: _Volume) -> None:
        if v.diff is None:
            # Sized for the largest LUN reading through it: after a shrinking revert a
            # snapshot may be larger than its origin, and its tail chunks are preserved.
            size = max([v.size, *(s.size for s in v.snaps)])
            v.diff = DiffArea(os.path.join(self.path, "diff"), v.id, self.chunk_size,
                              self._nchunks(size), self.faults, v.epoch)

    def _refresh_live(self, v: _Volume) -> None:
        v.live_epochs = sorted(s.epoch for s in v.snaps if s.kind == DIFFERENTIAL
                               and s.state == COMMITTED and s.epoch is not None)

    def _header_fields(self, lun: _Volume | _Snapshot) -> dict:
        if isinstance(lun, _Volume):
            return dict(kind="volume", naa=lun.naa, name=lun.name, size=lun.size,
                        created=lun.created, read_only=bool(lun.flags & fmt.FLAG_READ_ONLY),
                        hidden=False, shadow=False, origin_naa=None)
        # no creation time: it is the commit instant, and commit writes no header
        return dict(kind="snapshot", naa=lun.naa, name=None, size=lun.size,
                    read_only=True, hidden=True, shadow=True,
                    origin_naa=lun.origin.naa, snapshot_id=lun.snap_id, set_id=lun.set_id,
                    snapshot_kind=lun.kind, pool_id=self.pool_id)

    def _write_header(self, lun: _Volume | _Snapshot) -> None:
        """The LUN header carries the identity that travels with the LUN (invariant 7)."""
        path = self._hdr(lun.id)
        want = fmt.header_doc(**self._header_fields(lun))
        try:
            with open(path, "rb") as f:
                if f.read() == want:
                    return
        except FileNotFoundError:
            pass
        fmt.write_header(path, **self._header_fields(lun))

    # -- lookups ------------------------------------------------------------------------------
    def _vol(self, name: str) -> _Volume:
        v = self._volumes.get(name)
        if v is None:
            if name in self._snaps:
                raise ReadOnly(f"{name} is a snapshot; snapshots are read-only")
            raise NotFound(f"no volume named {name!r} in pool {self.path}")
        return v

    def _snap(self, snap_id: str) -> _Snapshot:
        s = self._snaps.get(snap_id)
        if s is None:
            s = self._snaps.get(check_guid(snap_id))
            if s is None:
                raise NotFound(f"no snapshot {snap_id} in pool {self.path}")
        return s

    def _lun(self, key: str) -> _Volume | _Snapshot:
        v = self._volumes.get(key)
        if v is not None:
            return v
        s = self._snaps.get(key)
        if s is not None:
            return s
        try:
            return self._snap(key)
        except NotFound:
            raise NotFound(f"no volume or snapshot {key!r} in pool {self.path}") from None

    def _vinfo(self, v: _Volume) -> VolumeInfo:
        return VolumeInfo(v.id, v.name, v.naa, v.size, v.created,
                          bool(v.flags & fmt.FLAG_READ_ONLY), v.mtime,
                          sum(1 for s in v.snaps if s.state != PREPARING),
                          v.diff.used_bytes() if v.diff else 0)

    def _sinfo(self, s: _Snapshot) -> SnapshotInfo:
        return SnapshotInfo(s.snap_id, s.set_id, s.origin.name, s.origin.naa, s.naa, s.size,
                            s.kind, s.state, s.created, s.attributes, s.exposed_name,
                            s.sync_done, s.sync_total, s.epoch, s.id)

    @_locked
    def list_volumes(self) -> list[VolumeInfo]:
        return [self._vinfo(v) for v in sorted(self._volumes.values(), key=lambda v: v.name)]

    @_locked
    def volume(self, name: str) -> VolumeInfo:
        return self._vinfo(self._vol(name))

    @_locked
    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        vols = [self._vol(volume)] if volume is not None else list(self._volumes.values())
        snaps = [s for v in vols for s in v.snaps]
        return [self._sinfo(s) for s in sorted(snaps, key=lambda s: (s.created, s.id))]

    @_locked
    def snapshot(self, snap_id: str) -> SnapshotInfo:
        return self._sinfo(self._snap(snap_id))

    @_locked
    def diff_entries(self, name: str) -> int:
        """Entries in a volume's diff area (preserved chunks, all-zero ones included):
        what its in-memory chunk maps hold."""
        da = self._vol(name).diff
        return da.entries() if da is not None else 0

    @_locked
    def lun_size(self, key: str) -> int:
        return self._lun(key).size

    def statfs(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _room(self) -> int:
        """Free space the diff areas and plexes may take: free minus the reserve
        (min(RESERVE_MAX, 10 % of the file system)); one statvfs."""
        total, free = self.statfs()
        return free - min(RESERVE_MAX, total // 10)

    # -- volumes ------------------------------------------------------------------------------
    @_locked
    def create_volume(self, name: str, size: int) -> VolumeInfo:
        check_name(name)
        check_size(size)
        self._check_chunks(size)
        if name in self._volumes:
            raise Exists(f"a volume named {name!r} already exists")
        now = time.time()
        with self.catalog.transaction() as db:
            fid = self.catalog.next_file_id(db)
            naa = self.catalog.issue_naa(db, fmt.new_naa)
            f = DataFile(self._img(fid), "origin", self.faults, create=True)
            try:
                self._size_image(f, size)
                f.sync()
                v = _Volume(fid, name, naa, size, now, 0, 0, None, f, mtime=now)
                self._write_header(v)
                fsync_dir(os.path.join(self.path, "luns"))
                db.execute("INSERT INTO volumes (id, name, naa, size, created) "
                           "VALUES (?, ?, ?, ?, ?)", (fid, name, naa, size, now))
            except BaseException:
                self._discard_new_lun(fid, f)
                raise
        self._volumes[name] = v
        self.generation += 1
        return self._vinfo(v)

    def resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        self.flush(name)   # outside the lock: the locked resize's syncs then have little to do
        with self._lock:
            return self._resize_volume(name, new_size)

    def _resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        v = self._vol(name)
        check_size(new_size, "new size")
        self._check_chunks(new_size)
        if new_size < v.size:
            raise InvalidSize(f"volume {name} is {v.size} bytes; shrinking to {new_size} "
                              "is not supported (it would destroy data)")
        if v.mirrors or any(s.state == PREPARING for s in v.snaps):
            raise Busy(f"volume {name} has a snapshot being prepared; resize after it")
        if v.id in self._reverting:
            raise Busy(f"volume {name} is being reverted; resize after it")
        if new_size == v.size:
            return self._vinfo(v)
        self._set_volume_size(v, new_size)
        return self._vinfo(v)

    def _set_volume_size(self, v: _Volume, size: int) -> None:
        """Image first, then the catalog. A crash between the two leaves them disagreeing;
        _load sizes the image to the catalog (the comment there says why that is safe)."""
        assert self._owned(), "pool lock not held"
        self._writeback(v)
        self._size_image(v.file, size)
        v.file.sync()
        self.faults.point("resize.image_sized")
        with self.catalog.transaction() as db:
            db.execute("UPDATE volumes SET size=? WHERE id=?", (size, v.id))
        self.faults.point("resize.recorded")
        v.size = size
        if v.diff and self._nchunks(size) > v.diff.nchunks:
            v.diff.grow(self._nchunks(size))
        self._write_header(v)
        self.generation += 1

    def _check_chunks(self, size: int) -> None:
        """A volume has at most MAX_CHUNKS chunks (256 TiB at 64 KiB): its diff area keeps
        two bitmaps of one bit per chunk in memory (512 MiB each at the limit) and numbers
        its slots in 32 bits. Larger sizes failed later, in a snapshot's prepare."""
        if self._nchunks(size) > MAX_CHUNKS:
            raise InvalidSize(f"size {size} is more than {MAX_CHUNKS} chunks of "
                              f"{self.chunk_size} bytes, the largest volume of this pool "
                              f"({MAX_CHUNKS * self.chunk_size} bytes)")

    def _discard_new_lun(self, fid: int, f: DataFile | None) -> None:
        """A LUN's creation failed inside its catalog transaction, which rolls back, so
        its file id is issued again: none of its files may stay behind (else the next
        create fails on them)."""
        if f is not None:
            f.close()
        for p in (self._img(fid), self._hdr(fid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    @staticmethod
    def _size_image(f: DataFile, size: int) -> None:
        try:
            f.truncate(size)
        except OSError as e:
            if e.errno == errno.EFBIG:   # e.g. ext4: 16 TiB per file at 4 KiB blocks
                raise InvalidSize(f"size {size} is larger than a file of the pool's file "
                                  "system can be") from None
            raise

    @_locked
    def set_diff_limit(self, name: str, limit: int | None) -> None:
        """Per-origin diff-area limit in bytes (None: free space minus a reserve)."""
        v = self._vol(name)
        if limit is not None and (not isinstance(limit, int) or limit < self.chunk_size):
            raise InvalidSize(f"diff-area limit {limit!r} must be at least one chunk "
                              f"({self.chunk_size} bytes)")
        with self.catalog.transaction() as db:
            db.execute("UPDATE volumes SET diff_limit=? WHERE id=?", (limit, v.id))
        v.diff_limit = limit

    @_locked
    def delete_volume(self, name: str) -> None:
        v = self._vol(name)
        if v.snaps:
            raise Busy(f"volume {name} has {len(v.snaps)} snapshot(s); delete or split "
                       "them first")
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM volumes WHERE id=?", (v.id,))
        self._settle(v)
        del self._volumes[name]
        v.file.close()
        if v.diff:
            v.diff.close()
        for p in (self._img(v.id), self._hdr(v.id),
                  os.path.join(self.path, "diff", f"{v.id}.data"),
                  os.path.join(self.path, "diff", f"{v.id}.map")):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.generation += 1

    # -- the data path -------------------------------------------------------------------------
    def read(self, key: str, offset: int, length: int) -> bytes:
        self.last_io = time.monotonic()
        with self._lock:   # (inline rather than @_locked: this is the hot path)
            lun = self._volumes.get(key) or self._lun(key)
            if offset < 0 or length < 0:
                raise OutOfRange(f"invalid read at offset {offset} length {length}")
            end = min(offset + length, lun.size)
            if offset >= end:
                return b""
            if isinstance(lun, _Volume):
                return self._read_origin(lun, offset, end - offset)
            return self._read_snapshot(lun, offset, end)

    def _read_origin(self, v: _Volume, offset: int, length: int) -> bytes:
        data = v.file.pread(length, offset)
        if len(data) < length:   # origin shorter than a snapshot after a shrinking revert
            data += bytes(length - len(data))
        if not v.pending:
            return data   # the bytes os.pread made: no copy
        cs, end = self.chunk_size, offset + length
        held = [c for c in range(offset // cs, (end - 1) // cs + 1) if c in v.pending]
        if not held:
            return data
        out = bytearray(data)
        for c in held:
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            out[lo - offset:hi - offset] = v.pending[c][lo - c * cs:hi - c * cs]
        return bytes(out)

    def _read_snapshot(self, s: _Snapshot, offset: int, end: int) -> bytes:
        assert self._owned(), "pool lock not held"
        if s.state == INVALID:
            raise SnapshotInvalid(f"snapshot {s.snap_id} is invalid (its preserved data was "
                                  "lost); delete it")
        if s.state == PREPARING:
            raise InvalidState(f"snapshot {s.snap_id} is still being prepared")
        if s.file is not None:
            data = s.file.pread(end - offset, offset)
            return data + bytes(end - offset - len(data))
        v, cs = s.origin, self.chunk_size
        da, epoch = v.diff, s.epoch
        assert da is not None and epoch is not None
        parts = []
        pos = offset
        while pos < end:
            c = pos // cs
            slot = da.lookup(c, epoch)
            if slot is None:
                run_end = min((c + 1) * cs, end)
                while run_end < end and da.lookup(run_end // cs, epoch) is None:
                    run_end = min(run_end + cs, end)
                parts.append(self._read_origin(v, pos, run_end - pos))
                pos = run_end
            else:
                cend = min((c + 1) * cs, end)
                parts.append(da.read_slot(slot)[pos - c * cs:cend - c * cs])
                pos = cend
        return b"".join(parts)

    def _check_write(self, name: str, offset: int, length: int) -> _Volume:
        v = self._vol(name)
        if v.flags & fmt.FLAG_READ_ONLY:
            raise ReadOnly(f"volume {name} is read-only")
        if offset < 0 or length < 0 or offset + length > v.size:
            raise OutOfRange(f"I/O at offset {offset} length {length} is outside volume "
                             f"{name} (size {v.size})")
        return v

    @_locked
    def write(self, name: str, offset: int, data: bytes | memoryview) -> int:
        self.last_io = time.monotonic()
        n = len(data)
        v = self._check_write(name, offset, n)
        if n == 0:
            return 0
        if v.live_epochs:
            self._copy_before_write(v, offset // self.chunk_size,
                                    (offset + n - 1) // self.chunk_size)
        if v.pending:
            view = memoryview(data)
            for lo, hi, buf, base in self._pieces(v, offset, n):
                if buf is None:
                    v.file.pwrite(view[lo - offset:hi - offset], lo)
                else:
                    buf[lo - base:hi - base] = view[lo - offset:hi - offset]
                    _mark_dirty(v, base // self.chunk_size, lo - base, hi - base)
        else:
            v.file.pwrite(data, offset)
        for s in list(v.mirrors):
            self._mirror(s, lambda f: f.pwrite(data, offset))
        v.mtime = time.time()
        self._maybe_writeback(v)
        return n

    @_locked
    def discard(self, name: str, offset: int, length: int) -> None:
        v = self._check_write(name, offset, length)
        if length == 0:
            return
        if v.live_epochs:
            self._copy_before_write(v, offset // self.chunk_size,
                                    (offset + length - 1) // self.chunk_size)
        for lo, hi, buf, base in self._pieces(v, offset, length):
            if buf is None:
                v.file.punch(lo, hi - lo)
            else:
                buf[lo - base:hi - base] = bytes(hi - lo)
                _mark_dirty(v, base // self.chunk_size, lo - base, hi - base)
        for s in list(v.mirrors):
            self._mirror(s, lambda f: f.punch(offset, length))
        v.mtime = time.time()
        self._maybe_writeback(v)

    def _pieces(self, v: _Volume, offset: int, length: int
                ) -> Iterator[tuple[int, int, bytearray | None, int]]:
        """Split [offset, offset+length) into (lo, hi, pending buffer or None, chunk start):
        runs of chunks with no pending buffer come out merged."""
        cs, end = self.chunk_size, offset + length
        run = offset
        pos = offset
        while pos < end:
            c = pos // cs
            cend = min((c + 1) * cs, end)
            buf = v.pending.get(c)
            if buf is not None:
                if run < pos:
                    yield run, pos, None, 0
                yield pos, cend, buf, c * cs
                run = cend
            pos = cend
        if run < end:
            yield run, end, None, 0

    def _maybe_writeback(self, v: _Volume) -> None:
        assert self._owned(), "pool lock not held"
        if not v.pending:
            return
        held = len(v.pending) * self.chunk_size
        if v.batch is not None:   # a batch is queued or syncing: wait for it only when
            if held >= 2 * WRITEBACK_BYTES:   # the memory bound is reached (back-pressure)
                self._writeback(v)
        elif self.background_writeback:
            # cut the batch here (no I/O) and hand it to the writeback thread: waiting for
            # that thread to get the lock between two back-to-back writes could take long
            if self._batch_due(v, time.monotonic(), WRITEBACK_AGE):
                self._queued.append(self._cut(v))
                self._wake.set()
        elif held >= WRITEBACK_BYTES or time.monotonic() - v.pending_since >= WRITEBACK_AGE:
            self._writeback(v)

    def _batch_due(self, v: _Volume, now: float, max_age: float) -> bool:
        """Whether a background batch of v should be cut: it holds half the memory
        bound, or its oldest held write is max_age old."""
        return (len(v.pending) * self.chunk_size >= WRITEBACK_BYTES // 2
                or now - v.pending_since >= max_age)

    @staticmethod
    def _held(v: _Volume) -> list[tuple[int, bytearray]]:
        """(chunk, buffer) of everything v holds, in chunk order (for _write_out)."""
        return [(c, v.pending[c]) for c in sorted(v.pending)]

    def _cut(self, v: _Volume) -> _Batch:
        """A batch of everything v holds now (lock held; no I/O)."""
        assert self._owned(), "pool lock not held"
        b = _Batch(v, v.diff.cut() if v.diff is not None else None, self._held(v),
                   time.monotonic())
        v.batch = b
        return b

    def _settle(self, v: _Volume) -> None:
        """Finish v's batch, if it has one, before anything that syncs, reclaims or closes
        its files. The pool lock is NOT released meanwhile (so every locked operation
        stays atomic): a batch still queued is synced here; one the writeback thread is
        syncing is waited for -- that sync needs no lock -- and then finished here."""
        assert self._owned(), "pool lock not held"
        b = v.batch
        if b is None:
            return
        if b in self._queued:
            self._queued.remove(b)
            self._sync(b)
        else:
            b.synced.wait()
        self._finish(b)
        if b.crashed is not None:   # SimulatedCrash (tests): the caller's step crashed
            raise b.crashed

    def _writeback(self, v: _Volume) -> None:
        """Harden the diff area (one sync pair), then let the held chunks reach the origin.
        If the diff area cannot be made durable, the snapshots that needed those chunks
        become invalid first; the origin write itself never fails (invariant 5)."""
        assert self._owned(), "pool lock not held"
        self._harden(v)
        if v.pending:
            self._write_out(v, self._held(v))

    def _drain(self, v: _Volume) -> None:
        """_writeback(v) with its syncs WITHOUT the pool lock (call it without the lock):
        whatever v held or had preserved when called is durable, and written out to the
        origin, when it returns. The lock is taken only to cut the batch (DiffArea.cut)
        and to finish it (_write_out, in memory and the page cache); a batch the
        writeback thread is syncing is waited for first, then v's own batch is cut. A
        thread holding the lock (_settle) may finish our batch meanwhile: _finish runs
        once per batch."""
        while True:
            with self._lock:
                if self._volumes.get(v.name) is not v:
                    return   # deleted meanwhile: its delete settled every batch
                b = v.batch
                cut_here = b is None   # a batch of everything held up to this call
                if b is None:
                    if not v.pending and not (v.diff is not None and v.diff.unsynced):
                        return
                    b = self._cut(v)
                    sync_here = True
                else:   # queued by the data path: ours to sync; else the thread syncs it
                    sync_here = b in self._queued
                    if sync_here:
                        self._queued.remove(b)
            if sync_here:
                self._sync(b)
            else:
                b.synced.wait()   # the writeback thread's sync: needs no lock
            with self._lock:
                self._finish(b)
                if b.crashed is not None:   # SimulatedCrash (tests)
                    raise b.crashed
            if cut_here:
                return

    def _reclaim(self, v: _Volume) -> None:
        """DiffArea.gc of v with its map writes and sync WITHOUT the pool lock (call it
        without the lock). Entries whose records are not durable yet are left for a
        later gc; so are all of them if the map cannot be written (logged: garbage
        entries cost space, never correctness, and open() reclaims them)."""
        with contextlib.suppress(OSError):
            self._drain(v)   # most records durable first: fewer entries left behind
        with self._lock:
            da = v.diff
            if self._volumes.get(v.name) is not v or da is None:
                return
            busy = set(da.unsynced)
            if v.batch is not None and v.batch.sync is not None:
                busy.update(v.batch.sync.slots)
            doomed = da.gc_plan(v.live_epochs, busy)
            if not doomed:
                return
            pinned = self._pin([da.map])
        cleared = False
        try:
            da.gc_clear(doomed)
            cleared = True
        except OSError as e:
            log.warning("volume %s: reclaiming %d diff-area entries failed (%s); they are "
                        "reclaimed later", v.name, len(doomed), e)
        finally:   # (a SimulatedCrash punches nothing: the records may not be durable)
            with self._lock:
                for f in pinned:
                    f.unpin()
                if cleared and v.diff is da and self._volumes.get(v.name) is v:
                    da.gc_finish(doomed)
                else:
                    da.gc_abort(doomed)

    def _reserve_path(self) -> str:
        return os.path.join(self.path, "reserve")

    def _keep_reserve(self) -> None:
        """(Re)fill POOL/reserve: META_RESERVE bytes fallocated, given back when the
        filesystem is full so that a delete (catalog row, map records) can still be
        recorded. Best effort: no room now means try again after the next delete."""
        try:
            fd = os.open(self._reserve_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, META_RESERVE)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _when_full(self, fn: Callable[[], _R]) -> _R:
        """fn(); if it fails because the filesystem is full (ENOSPC, SQLITE_FULL), give
        back the reserve and run it once more (fn must be all or nothing: a catalog
        transaction, rolled back on failure)."""
        try:
            return fn()
        except (OSError, sqlite3.OperationalError) as e:
            full = (getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                    or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT))
            try:
                had = full and os.stat(self._reserve_path()).st_blocks > 0
            except OSError:
                had = False
            if not had:
                raise
            log.warning("pool filesystem full (%s): using its metadata reserve", e)
            os.truncate(self._reserve_path(), 0)
            return fn()

    def _harden(self, v: _Volume, keep_going: bool = False) -> None:
        """Every preservation of v durable, or the snapshots that needed a lost one
        invalid (what a delete and its GC need; the first half of _writeback). The batch
        in flight is finished, held chunks are NOT written out here. keep_going (a
        delete): a chunk of that batch that cannot be written out (ENOSPC on a full pool)
        stays held, logged, for the next flush to retry and report -- it must not stop
        the delete, which gives the space back."""
        assert self._owned(), "pool lock not held"
        try:
            self._settle(v)
        except OSError as e:
            if not keep_going:
                raise
            log.warning("volume %s: held writes not written back (%s); they stay held",
                        v.name, e)
        if v.diff is not None and v.diff.unsynced:
            try:
                v.diff.harden()
            except OSError as e:
                v.lost.append((v.diff.drop_unsynced(), e))
        self._resolve_lost(v)

    def _resolve_lost(self, v: _Volume) -> None:
        """Invalidate (durably) the snapshots that needed preservations a failed sync
        lost, BEFORE any held chunk may reach the origin. If the catalog fails too, the
        losses stay recorded and the chunks held: the next writeback tries again."""
        assert self._owned(), "pool lock not held"
        while v.lost:
            lost, err = v.lost[0]
            self._invalidate_needing(v, lost, err)
            v.lost.pop(0)

    def _write_out(self, v: _Volume, held: list[tuple[int, bytearray]]) -> None:
        """Write these held chunks (sorted; their preservations durable) to the origin
        file -- only the part of each that changed -- and stop holding them. A chunk
        whose buffer is no longer the one given was preserved again since (its new
        preservation is not durable yet): it stays held. A chunk stops being held only
        once its write succeeded (an EIO leaves the rest held, for the next flush)."""
        assert self._owned(), "pool lock not held"
        cs = self.chunk_size
        zero = bytes(cs)
        run: list[memoryview] = []     # whole dirty chunks, consecutive: one pwritev
        run_chunks: list[int] = []
        run_start = -1
        done: list[int] = []
        pending, dirty = v.pending, v.pending_dirty
        try:
            for c, buf0 in held:
                if pending.get(c) is not buf0:
                    continue
                buf = memoryview(buf0)[:min(cs, v.size - c * cs)]
                lo, hi = dirty.get(c, (0, 0))
                hi = min(hi, len(buf))
                whole = lo == 0 and hi == len(buf)
                if run and (not whole or c * cs != run_start + len(run) * cs):
                    v.file.pwritev(run, run_start)
                    done += run_chunks
                    run, run_chunks = [], []
                if lo >= hi:                   # preserved, never changed: origin is right
                    done.append(c)
                elif buf == zero[:len(buf)]:   # a discard landed here: keep the hole
                    v.file.punch(c * cs, len(buf))
                    done.append(c)
                elif whole:
                    if not run:
                        run_start = c * cs
                    run.append(buf)
                    run_chunks.append(c)
                else:                          # e.g. one 4 KiB write: write 4 KiB, not 64
                    v.file.pwrite(buf[lo:hi], c * cs + lo)
                    done.append(c)
            if run:
                v.file.pwritev(run, run_start)
                done += run_chunks
        finally:
            for c in done:
                del pending[c]
                dirty.pop(c, None)

    def writeback(self, max_age: float = WRITEBACK_AGE) -> None:
        """Push held writes older than max_age (or, of a volume, more than half the
        WRITEBACK_BYTES bound) to the origins: the daemon's writeback thread (then set
        background_writeback, so that the data path leaves the age bound to it, cuts
        batches for it and syncs inline only at the memory bound).

        The pool lock is held to cut the batches (DiffArea.cut) and, after ALL their syncs,
        to write out the chunks each covers; the syncs themselves (sync_batch) run WITHOUT
        the lock, so reads, writes into held chunks and new preservations (for the next
        batch) go on while the disk syncs, and whoever needs a batch finished can wait
        for its sync holding the lock (_settle). One batch per volume at a time (v.batch).
        An origin write that fails here leaves its chunks held (logged); the next flush
        reports it."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return
            for v in self._volumes.values():
                if v.pending and v.batch is None and self._batch_due(v, now, max_age):
                    self._queued.append(self._cut(v))   # queued at once: never orphaned
            jobs, self._queued = self._queued, []   # with those the data path cut
        for b in jobs:          # every sync first: a waiter may hold the lock meanwhile
            self._sync(b)
        crash: BaseException | None = None
        with self._lock:
            for b in jobs:
                try:
                    self._finish(b)
                except Exception as e:   # noqa: BLE001 - one volume's trouble, not all
                    log.error("writing held chunks back to volume %s: %s (they stay held)",
                              b.volume.name, e)
                crash = crash or b.crashed
        if crash is not None:
            raise crash

    def wait_and_writeback(self, timeout: float) -> None:
        """The writeback thread's step: sleep until the data path queues a batch or
        `timeout` passes, then writeback()."""
        self._wake.wait(timeout)
        self._wake.clear()
        self.writeback()

    def _sync(self, b: _Batch) -> None:
        """A batch's durable part; needs no pool lock. Never raises: the outcome is
        recorded in the batch for _finish."""
        try:
            if b.sync is not None:
                assert b.volume.diff is not None
                b.volume.diff.sync_batch(b.sync)
        except OSError as e:
            b.error = e
        except BaseException as e:   # SimulatedCrash (tests): nothing more happens
            b.crashed = e
        finally:
            b.synced.set()

    def _finish(self, b: _Batch) -> None:
        """(Lock held, the batch synced.) Once per batch, by whoever comes first."""
        assert self._owned(), "pool lock not held"
        if b.done:
            return
        b.done = True
        v, da = b.volume, b.volume.diff
        try:
            if b.crashed is not None:
                if b.sync is not None and da is not None:
                    da.unsynced[:0] = b.sync.slots   # not durable: for drop or a retry
                return
            if b.error is not None and b.sync is not None and da is not None:
                # Linux reports a failed writeback once: what was preserved while that
                # sync ran may be lost too, so those entries go with the batch
                v.lost.append((da.drop_batch(b.sync) + da.drop_unsynced(), b.error))
            self._resolve_lost(v)
            self._write_out(v, b.held)
            if v.pending:   # preserved while the batch synced: the next batch's
                v.pending_since = b.cut_at
        finally:
            v.batch = None

    def _mirror(self, s: _Snapshot, op: Callable[[DataFile], None]) -> None:
        """A failing plex target fails the plex, never the origin write (invariant 5)."""
        assert s.file is not None
        try:
            op(s.file)
        except OSError as e:
            self._fail_plex(s, e)

    def _fail_plex(self, s: _Snapshot, err: OSError) -> None:
        assert self._owned(), "pool lock not held"
        # Out of the mirror list while still PREPARING = failed: sync and commit refuse
        # it, abort removes it.
        log.warning("plex %s of %s failed (%s); the plex is invalid", s.snap_id,
                    s.origin.name, err)
        if s in s.origin.mirrors:
            s.origin.mirrors.remove(s)

    def flush(self, name: str) -> None:
        """fsync of a volume: every write to it that returned before this call is durable
        in the origin and in the plexes being synced. Runs WITHOUT the pool lock around
        its syncs (only the bookkeeping takes it), so reads and writes of every volume
        go on meanwhile; writes that land during the flush are not covered by it."""
        with self._lock:
            v = self._vol(name)
        self._drain(v)
        with self._lock:
            if self._volumes.get(name) is not v:
                raise NotFound(f"volume {name} was deleted")
            mirrors = [(s, s.file) for s in v.mirrors if s.file is not None]
            files = self._pin([v.file] + [f for _, f in mirrors])
        failed: list[tuple[_Snapshot, OSError]] = []
        try:
            v.file.sync()
            for plex, f in mirrors:
                try:
                    f.sync()
                except OSError as e:   # fails the plex, never the origin (invariant 5)
                    failed.append((plex, e))
        finally:
            with self._lock:
                for f in files:
                    f.unpin()
                for plex, err in failed:
                    self._fail_plex(plex, err)

    def _copy_before_write(self, v: _Volume, first: int, last: int) -> None:
        """Preserve, durably, the old content of chunks first..last that a live
        differential snapshot still needs (invariant 2), with one sync pair per call."""
        assert self._owned(), "pool lock not held"
        da = v.diff
        assert da is not None
        while v.live_epochs:
            need = self._chunks_needing_copy(v, first, last)
            if not need:
                return
            items = self._read_chunks(v, need)
            new_bytes = sum(1 for _, old in items if old != da.zero_chunk) * self.chunk_size
            if new_bytes and self._over_limit(v, new_bytes):
                self._overflow(v, "diff-area limit reached")
                continue
            try:
                da.preserve(items, v.epoch)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._overflow(v, f"diff area full ({e.strerror})")
                    continue
                self._invalidate_needing(v, [(c, v.epoch) for c in need], e)
                return
            if not v.pending:
                v.pending_since = time.monotonic()
            for c, old in items:
                v.pending[c] = old   # a fresh bytearray from _read_chunks: no copy
            return

    def _chunks_needing_copy(self, v: _Volume, first: int, last: int) -> list[int]:
        da = v.diff
        assert da is not None
        newest_live = v.live_epochs[-1]
        latest = newest_live == v.epoch
        need = []
        for c in range(first, last + 1):
            if da.cowed_latest.test(c):
                continue
            if latest or newest_live > da.last_epoch(c):
                need.append(c)
            else:
                da.cowed_latest.set(c)   # no live snapshot needs it until the next commit
        return need

    def _read_chunks(self, v: _Volume, chunks: list[int]) -> list[tuple[int, bytearray]]:
        """Full-chunk old contents, one pread per run of consecutive chunks. Each content
        is a fresh bytearray that nothing else references: once preserved it becomes the
        chunk's pending buffer as is (one copy per chunk, not two)."""
        cs = self.chunk_size
        out = []
        for i, j in consecutive_runs(chunks):
            bufs = [bytearray(cs) for _ in range(j - i)]
            v.file.preadv(bufs, chunks[i] * cs)   # straight into them: no bytes in between
            for c, buf in zip(chunks[i:j], bufs):
                held = v.pending.get(c)
                if held is not None:   # its newest content is held, not in the file yet
                    buf[:] = held
                out.append((c, buf))
        return out

    def _over_limit(self, v: _Volume, new_bytes: int) -> bool:
        assert v.diff is not None
        used = v.diff.used_bytes()
        if v.diff_limit is not None:
            return used + new_bytes > v.diff_limit
        # statvfs per preservation batch was 7% of a 4 KiB first-write workload: trust a
        # reading for SPACE_RECHECK s, minus what we took since (other writers may take
        # more: then the write fails ENOSPC and _copy_before_write overflows as well);
        # near the limit, read it every time.
        now = time.monotonic()
        when, room = self._space
        room -= self._space_taken
        if now - when > SPACE_RECHECK or room - new_bytes < SPACE_MARGIN:
            room = self._room()
            self._space, self._space_taken = (now, room), 0
        if new_bytes > room:
            return True
        self._space_taken += new_bytes
        return False

    def _overflow(self, v: _Volume, why: str) -> None:
        """VSS behaviour: delete the oldest snapshot of this origin; the write goes on."""
        candidates = [s for s in v.snaps if s.kind == DIFFERENTIAL and s.state == COMMITTED]
        target = self._reverting.get(v.id)
        if target in candidates and len(candidates) > 1:
            candidates.remove(target)   # spare a revert's source while others can go
        oldest = min(candidates, key=lambda s: s.epoch or 0)
        log.warning("%s for volume %s: deleting its oldest snapshot %s", why, v.name,
                    oldest.snap_id)
        self._delete_snapshot(oldest)

    def _invalidate_needing(self, v: _Volume, lost: list[tuple[int, int]],
                            err: OSError) -> None:
        """The diff area failed (EIO): every snapshot that needed a lost (chunk, epoch)
        preservation -- epochs in (chunk's last durable preservation, epoch] -- becomes
        invalid, durably, before the origin is overwritten. Never served wrong."""
        assert v.diff is not None
        ranges = [(v.diff.last_epoch(c), upto) for c, upto in lost]
        victims = [s for s in v.snaps
                   if s.kind == DIFFERENTIAL and s.state in (COMMITTED, INVALID)
                   and any(lo < (s.epoch or 0) <= hi for lo, hi in ranges)]
        for s in victims:   # in memory first: reads refuse at once, even if the catalog
            if s.state == COMMITTED:   # write below fails (then it is retried)
                log.error("diff area of %s failed (%s): snapshot %s is now invalid",
                          v.name, err, s.snap_id)
                s.state = INVALID
                self.generation += 1
        self._refresh_live(v)
        for s in victims:   # idempotent: a retry rewrites the ones already invalid
            self._set_state(s, INVALID)

    def _set_state(self, s: _Snapshot, state: str) -> None:
        assert self._owned(), "pool lock not held"
        def record() -> None:
            with self.catalog.transaction() as db:
                db.execute("UPDATE snapshots SET state=? WHERE id=?", (state, s.id))

        self._when_full(record)
        s.state = state
        self.generation += 1

    # -- snapshots -------------------------------------------------------------------------------
    @_locked
    def prepare_snapshot(self, volume: str, kind: str = DIFFERENTIAL,
                         snapshot_id: str | None = None, set_id: str | None = None,
                         attributes: int = 0) -> SnapshotInfo:
        v = self._vol(volume)
        if kind not in (DIFFERENTIAL, PLEX):
            raise Unsupported(f"unknown snapshot kind {kind!r}: use differential or plex")
        snap_id = check_guid(snapshot_id) if snapshot_id else str(uuid.uuid4())
        if snap_id in self._snaps:
            raise Exists(f"a snapshot with id {snap_id} already exists")
        if set_id is not None:
            set_id = check_guid(set_id, "snapshot set id")
        if len(v.snaps) >= MAX_SNAPSHOTS_PER_VOLUME:
            raise NoSpace(f"volume {volume} has {len(v.snaps)} snapshots, the maximum; "
                          "delete some first")
        if kind == PLEX:
            need = sum(n for _, n in v.file.extents())
            room = self._room()
            if need > room:
                raise NoSpace(f"a plex of {volume} needs {need} bytes; the pool has "
                              f"{max(0, room)} available")
        now = time.time()
        with self.catalog.transaction() as db:
            fid = self.catalog.next_file_id(db)
            naa = self.catalog.issue_naa(db, fmt.new_naa)
            s = _Snapshot(fid, snap_id, set_id, naa, v, kind, None, PREPARING, v.size, now,
                          attributes, None, False)
            try:
                if kind == PLEX:
                    s.file = DataFile(self._img(fid), "plex", self.faults, create=True)
                    self._size_image(s.file, v.size)
                    s.sync_total = sum(n for _, n in v.file.extents())
                else:
                    self._open_diff(v)
                self._write_header(s)
                db.execute("INSERT INTO snapshots (id, snap_id, set_id, naa, origin_id, "
                           "kind, state, size, created, attributes) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (fid, snap_id, set_id, naa, v.id, kind, PREPARING, v.size, now,
                            attributes))
            except BaseException:
                self._discard_new_lun(fid, s.file)
                raise
        v.snaps.append(s)
        self._snaps[snap_id] = s
        if kind == PLEX:
            v.mirrors.append(s)   # from now on origin writes go to both
        return self._sinfo(s)

    def plex_sync_step(self, snap_id: str, max_bytes: int = 8 << 20) -> tuple[int, int]:
        """Copy up to max_bytes more of the origin's allocated extents into the plex.
        Returns (done, total); done == total when the plex is in sync."""
        with self._lock:
            origin = self._snap(snap_id).origin
        self._drain(origin)   # the step's writeback (below) then has little to sync
        with self._lock:
            s = self._snap(snap_id)
            if s.kind != PLEX or s.state == COMMITTED:
                return s.sync_total, s.sync_total
            if s.state != PREPARING or s not in s.origin.mirrors:
                raise SnapshotInvalid(f"plex {s.snap_id} failed while syncing; abort it")
            v = s.origin
            assert s.file is not None
            self._writeback(v)   # the copy reads the origin file
            budget = max_bytes
            cursor = s.sync_cursor
            try:
                for off, n in data_extents(v.file.fd, cursor, v.size):
                    take = min(n, budget)
                    self._copy_range(v.file, s.file, off, take)
                    # a crash while syncing: open aborts the preparing plex, drops its image
                    self.faults.point("plex.copied")
                    s.sync_done += take
                    budget -= take
                    cursor = off + take
                    if budget == 0:
                        break
                else:
                    cursor = v.size
            except OSError as e:
                self._fail_plex(s, e)
                raise SnapshotInvalid(f"plex {s.snap_id} failed while syncing: {e}") from e
            s.sync_cursor = cursor
            if cursor >= v.size:
                s.sync_total = s.sync_done = max(s.sync_done, s.sync_total)
            else:
                s.sync_total = max(s.sync_total, s.sync_done + 1)
            return s.sync_done, s.sync_total

    def _copy_range(self, src: DataFile, dst: DataFile, off: int, n: int) -> None:
        dst.faults.io(dst.role, "write")
        end = off + n
        while off < end:
            done = os.copy_file_range(src.fd, dst.fd, min(COPY_PIECE * 8, end - off), off, off)
            if done == 0:
                break
            off += done
        dst.dirty = True

    def commit_snapshots(self, snap_ids: Iterable[str]) -> None:
        """Commit a snapshot set: one durable catalog transaction for all of them; no I/O
        to origin volumes; in memory, each origin starts a new epoch (O(1)). The syncs
        that make the instant durable (held writes, plex files) run first WITHOUT the
        pool lock; under it they are repeated, as no-ops unless written since."""
        ids = list(snap_ids)
        self._presync(ids)
        with self._lock:
            self._commit(ids)

    def _presync(self, snap_ids: list[str]) -> None:
        """(WITHOUT the lock.) The bulk of a commit's syncs. Errors are left for the
        locked commit to meet again and report."""
        with self._lock:
            snaps = [s for s in map(self._snaps.get, snap_ids)
                     if s is not None and s.state == PREPARING]
        for s in snaps:
            self._drain(s.origin)
        with self._lock:
            plexes = self._pin(s.file for s in snaps if s.kind == PLEX)
        try:
            for f in plexes:
                with contextlib.suppress(OSError):
                    f.sync()
        finally:
            self._unpin(plexes)

    def _commit(self, snap_ids: list[str]) -> None:
        snaps = [self._snap(i) for i in snap_ids]
        origins = [s.origin for s in snaps]
        if len(set(map(id, origins))) != len(origins):
            raise InvalidState("a snapshot set holds at most one snapshot per volume")
        for s in snaps:
            if s.state != PREPARING:
                raise InvalidState(f"snapshot {s.snap_id} is {s.state}, not being prepared")
            if s.kind == PLEX and (s.sync_cursor < s.origin.size or s not in s.origin.mirrors):
                raise InvalidState(f"plex {s.snap_id} is not in sync yet "
                                   f"({s.sync_done}/{s.sync_total} bytes)")
        for s in snaps:
            # Normally a no-op: the coordinator's flush & hold already flushed the origin.
            self._writeback(s.origin)
            if s.kind == PLEX:
                assert s.file is not None
                s.file.sync()      # the plex holds everything written before the instant
        self.faults.point("commit.before_record")
        now = time.time()
        with self.catalog.transaction() as db:
            for s in snaps:
                epoch = s.origin.epoch + 1 if s.kind == DIFFERENTIAL else None
                if epoch is not None:
                    db.execute("UPDATE volumes SET epoch=? WHERE id=?", (epoch, s.origin.id))
                db.execute("UPDATE snapshots SET state=?, epoch=?, created=? WHERE id=?",
                           (COMMITTED, epoch, now, s.id))
        self.faults.point("commit.after_record")
        for s in snaps:
            v = s.origin
            s.state, s.created = COMMITTED, now
            if s.kind == DIFFERENTIAL:
                v.epoch += 1
                s.epoch = v.epoch
                assert v.diff is not None
                v.diff.new_epoch(v.epoch)
                self._refresh_live(v)
            else:
                v.mirrors.remove(s)
                assert s.file is not None
                s.file.close()
                s.file = DataFile(self._img(s.id), "plex", self.faults, read_only=True)
        self.generation += 1

    @_locked
    def abort_snapshot(self, snap_id: str) -> None:
        s = self._snap(snap_id)
        if s.state != PREPARING:
            raise InvalidState(f"snapshot {s.snap_id} is already committed; delete it instead")
        self._delete_snapshot(s)

    def delete_snapshot(self, snap_id: str) -> None:
        with self._lock:
            v = self._snap(snap_id).origin
        with contextlib.suppress(OSError):   # the bulk of _harden's syncs, without the
            self._drain(v)                    # lock; errors are met again below
        with self._lock:
            s = self._snap(snap_id)
            self._not_reverting_to(s)
            self._delete_snapshot(s, reclaim=False)
        if s.kind == DIFFERENTIAL:
            self._reclaim(v)

    def _not_reverting_to(self, s: _Snapshot) -> None:
        if self._reverting.get(s.origin.id) is s:
            raise Busy(f"volume {s.origin.name} is being reverted to snapshot {s.snap_id}; "
                       "wait for the revert to finish")

    def _delete_snapshot(self, s: _Snapshot, reclaim: bool = True) -> None:
        """reclaim=False: the caller reclaims the diff area afterwards, without the lock
        (_reclaim); a crash before that leaves garbage entries that open() reclaims."""
        assert self._owned(), "pool lock not held"
        v = s.origin
        self._harden(v, keep_going=True)   # GC needs every map record on disk

        def record() -> None:
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM snapshots WHERE id=?", (s.id,))

        self._when_full(record)
        self.faults.point("delete.after_record")
        v.snaps.remove(s)
        del self._snaps[s.snap_id]
        if s in v.mirrors:
            v.mirrors.remove(s)
        if s.file:
            s.file.close()
        for p in (self._img(s.id), self._sum(s.id), self._hdr(s.id)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if s.kind == DIFFERENTIAL:
            self._refresh_live(v)
            if v.diff and reclaim:
                v.diff.gc(v.live_epochs)
        self._keep_reserve()   # space came back: hold the reserve again
        self.generation += 1

    @_locked
    def set_exposed(self, snap_id: str, name: str | None) -> SnapshotInfo:
        s = self._snap(snap_id)
        if name is not None:
            check_name(name, "exposure")
            if s.state != COMMITTED:
                raise InvalidState(f"snapshot {s.snap_id} is {s.state}; only committed "
                                   "snapshots can be exposed")
            other = next((o for o in self._snaps.values()
                          if o.exposed_name == name and o is not s), None)
            if other:
                raise Exists(f"exposure name {name!r} is taken by snapshot {other.snap_id}")
        with self.catalog.transaction() as db:
            db.execute("UPDATE snapshots SET exposed_name=? WHERE id=?", (name, s.id))
        s.exposed_name = name
        self.generation += 1
        return self._sinfo(s)

    def _readable(self, s: _Snapshot) -> None:
        # Long operations (revert, promote, seal) re-check between steps: another thread
        # (or a diff-area overflow) may have deleted the snapshot meanwhile.
        if self._snaps.get(s.snap_id) is not s:
            raise NotFound(f"snapshot {s.snap_id} was deleted")
        if s.state != COMMITTED:
            raise SnapshotInvalid(f"snapshot {s.snap_id} is {s.state}; it cannot be used")

    def _snapshot_chunks(self, s: _Snapshot) -> list[int]:
        """Chunks where snapshot `s` may hold data: allocated in its own image or origin,
        or preserved in the diff area. Everything else reads as zeros."""
        assert self._owned(), "pool lock not held"
        cs = self.chunk_size
        limit = self._nchunks(s.size)
        if s.file is None:
            self._writeback(s.origin)   # extents are read from the origin file
        chunks: set[int] = set()
        src = s.file if s.file is not None else s.origin.file
        for off, n in data_extents(src.fd, 0, s.size):
            chunks.update(range(off // cs, min(limit, (off + n + cs - 1) // cs)))
        if s.file is None and s.origin.diff is not None and s.epoch is not None:
            chunks.update(c for c in s.origin.diff.chunks_since(s.epoch) if c < limit)
        return sorted(chunks)

    def promote(self, snap_id: str, progress: Progress = None) -> SnapshotInfo:
        """Differential -> full copy. Afterwards independent of the origin and diff area.

        progress(done, total) is called after every chunk copied and once more when the
        copy is durable, before it is committed: a progress that raises (Cancelled) there
        stops the promote with nothing changed (the partial files are removed). Once
        the commit has begun it no longer calls progress: the promote completes (and
        says so first through progress.point_of_no_return(), if the callback has it)."""
        with self._lock:
            origin = self._snap(snap_id).origin
        self._drain(origin)   # held writes synced outside the lock, before the chunk list
        with self._lock:
            s = self._snap(snap_id)
            self._readable(s)
            if s.kind != DIFFERENTIAL:
                raise Unsupported(f"snapshot {s.snap_id} is already a full copy ({s.kind})")
            if s.snap_id in self._promoting:
                raise Busy(f"snapshot {s.snap_id} is being promoted already")
            chunks = self._snapshot_chunks(s)
            tmp = self._img(s.id) + ".partial"
            sums_tmp = self._sum(s.id) + ".partial"
            out = DataFile(tmp, "plex", self.faults, create=True)
            try:
                sums = DataFile(sums_tmp, "plex", self.faults, create=True)
            except BaseException:
                out.close()
                os.unlink(tmp)
                raise
            self._promoting.add(s.snap_id)
        try:
            out.truncate(s.size)
            # Sealed as it is copied: every chunk passes through memory anyway, so the
            # checksums cost no extra read (a plex, copied in the kernel, is sealed later).
            self._copy_chunks(s, chunks, out, progress, sums)
            sums.truncate(self._nchunks(s.size) * 8)
            out.sync()
            sums.sync()
            if progress:   # the last moment a cancellation leaves nothing changed
                progress(len(chunks), len(chunks))
                _no_return(progress)
            self.faults.point("promote.copied")
            with self._lock:
                self._readable(s)
                # Until the catalog says full these two are orphans of a differential
                # snapshot: a crash before the transaction leaves them to _remove_orphans.
                os.replace(sums_tmp, self._sum(s.id))
                os.replace(tmp, self._img(s.id))
                fsync_dir(os.path.join(self.path, "luns"))
                with self.catalog.transaction() as db:
                    db.execute("UPDATE snapshots SET kind=?, sealed=1 WHERE id=?",
                               (FULL, s.id))
                s.kind, s.sealed = FULL, True
                s.file = DataFile(self._img(s.id), "plex", self.faults, read_only=True)
                self._write_header(s)
                self._refresh_live(s.origin)
                self.generation += 1
                info = self._sinfo(s)
            self._reclaim(s.origin)   # what only this snapshot needed
            return info
        finally:
            self._promoting.discard(s.snap_id)
            out.close()
            sums.close()
            for p in (tmp, sums_tmp):
                if os.path.exists(p):
                    os.unlink(p)

    def _copy_chunks(self, s: _Snapshot, chunks: list[int], out: DataFile,
                     progress: Progress, sums: DataFile | None = None) -> None:
        """Copy these chunks of snapshot s into out (holes stay holes); with sums, also
        write each chunk's checksum in the .sum layout (see _chunk_sums). progress after
        every chunk: it is where a cancellation stops the copy (at most one chunk late)."""
        cs = self.chunk_size
        zero = bytes(cs)
        for i, c in enumerate(chunks):
            with self._lock:
                self._readable(s)
                data = self._read_snapshot(s, c * cs, min((c + 1) * cs, s.size))
            if data != zero[:len(data)]:
                out.pwrite(data, c * cs)
                if sums is not None:
                    digest = xxhash.xxh3_64_intdigest(data) or 1
                    sums.pwrite(digest.to_bytes(8, "little"), c * 8)
            if progress:
                progress(i + 1, len(chunks))

    def split(self, snap_id: str, new_name: str, progress: Progress = None) -> VolumeInfo:
        """Break a snapshot off as an independent read-write volume with a new naa id.
        A plex or full copy is converted in place (O(1)); a differential is promoted.

        All or nothing for a cancellation: progress is called only by the promote step,
        whose cancellation leaves the snapshot as it was (differential, not split); once
        the promote is committed the split completes without calling progress again
        (a cancelled split must not leave a promoted-but-not-split snapshot behind)."""
        check_name(new_name)
        with self._lock:
            s = self._snap(snap_id)
            self._readable(s)
            self._not_reverting_to(s)
            if new_name in self._volumes:
                raise Exists(f"a volume named {new_name!r} already exists")
        if s.kind == DIFFERENTIAL:
            # A crash after this leaves a full snapshot, not split: the same content.
            self.promote(snap_id, progress)
            self.faults.point("split.promoted")
        with self._lock:
            self._readable(s)
            self._not_reverting_to(s)
            if new_name in self._volumes:
                raise Exists(f"a volume named {new_name!r} already exists")
            now = time.time()
            # One transaction turns the snapshot row into a volume row with the same file
            # id: after a crash the split either happened or not. The files need no
            # change (_load rewrites the header and removes the stale .sum).
            with self.catalog.transaction() as db:
                naa = self.catalog.issue_naa(db, fmt.new_naa)
                db.execute("DELETE FROM snapshots WHERE id=?", (s.id,))
                db.execute("INSERT INTO volumes (id, name, naa, size, created) "
                           "VALUES (?, ?, ?, ?, ?)", (s.id, new_name, naa, s.size, now))
            self.faults.point("split.recorded")
            s.origin.snaps.remove(s)
            del self._snaps[s.snap_id]
            assert s.file is not None
            s.file.close()
            for p in (self._sum(s.id),):
                if os.path.exists(p):
                    os.unlink(p)
            v = _Volume(s.id, new_name, naa, s.size, now, 0, 0, None,
                        DataFile(self._img(s.id), "origin", self.faults), mtime=now)
            self._volumes[new_name] = v
            self._write_header(v)
            self.generation += 1
            return self._vinfo(v)

    def revert(self, volume: str, snap_id: str, progress: Progress = None) -> None:
        """Make the volume's content (and size) equal to the snapshot's. Reverting writes
        go through copy-before-write, so every other snapshot stays valid.

        Crash-safe by rolling forward: a catalog record (meta key 'revert.<volume id>')
        is written before the volume changes and removed once the result is flushed; a
        pool opened with the record present finishes the revert first (_load). So after
        a crash the revert has either not started or completed.

        A cancellation is treated the same way: once the record is written the revert
        rolls forward (progress.point_of_no_return() is called then, if the callback
        has it). A Cancelled raised by progress is ignored (logged once) and the revert
        completes; a half-reverted volume is of no use to anyone. (To cancel before it
        starts, check before calling revert.)"""
        with self._lock:
            v = self._vol(volume)
            s = self._snap(snap_id)
            if s.origin is not v:
                raise InvalidState(f"snapshot {s.snap_id} is of volume {s.origin.name}, "
                                   f"not {volume}")
            self._readable(s)
            if v.mirrors:
                raise Busy(f"volume {volume} has a plex being synced; revert after it")
            if v.id in self._reverting:
                raise Busy(f"volume {volume} is already being reverted to snapshot "
                           f"{self._reverting[v.id].snap_id}")
            with self.catalog.transaction() as db:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           (f"revert.{v.id}", str(s.id)))
            self._reverting[v.id] = s
        _no_return(progress)   # recorded: it completes, also after a crash
        try:
            self.faults.point("revert.recorded")
            self._revert(v, s, progress)
        except Exception:
            # An ordinary failure is reported to the caller, who may write to the volume
            # again: a later open must not resume this revert over those writes.
            self._end_revert(v)
            raise

    def _revert(self, v: _Volume, s: _Snapshot, progress: Progress) -> None:
        """The revert proper; idempotent, so an interrupted one can simply run again."""
        self._drain(v)   # held writes synced outside the lock, before the chunk list
        with self._lock:
            if v.size < s.size:
                self._set_volume_size(v, s.size)
            chunks = self._snapshot_chunks(s)
            if s.file is not None:   # full copy: also chunks allocated only in the origin
                self._writeback(v)   # (held chunks are not in the file's extents yet)
                cs = self.chunk_size
                extra = {c for off, n in v.file.extents(0, s.size)
                         for c in range(off // cs, (off + n + cs - 1) // cs)}
                chunks = sorted(set(chunks) | extra)
        cs = self.chunk_size
        told = False
        for i, c in enumerate(chunks):
            with self._lock:
                self._readable(s)
                start, end = c * cs, min((c + 1) * cs, s.size)
                want = self._read_snapshot(s, start, end)
                if self._read_origin(v, start, end - start) != want:
                    if want.count(0) == len(want):
                        self.discard(v.name, start, end - start)
                    else:
                        self.write(v.name, start, want)
            if progress and (i % 64 == 0 or i == len(chunks) - 1):
                try:
                    progress(i + 1, len(chunks))
                except Cancelled:   # rolls forward (see revert()): say so once
                    if not told:
                        log.info("volume %s: its revert to snapshot %s was cancelled "
                                 "after it started: it continues (a revert rolls forward)",
                                 v.name, s.snap_id)
                    told = True
        with self._lock:
            self.faults.point("revert.copied")
            if v.size > s.size:   # the tail goes through copy-before-write, then shrink
                self.discard(v.name, s.size, v.size - s.size)
                self._set_volume_size(v, s.size)
        self.flush(v.name)   # its syncs run without the lock (writes are held anyway)
        # the record goes only once the reverted content is durable
        self.faults.point("revert.flushed")
        self._end_revert(v)

    @_locked
    def _end_revert(self, v: _Volume) -> None:
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM meta WHERE key=?", (f"revert.{v.id}",))
        self._reverting.pop(v.id, None)

    def _resume_reverts(self) -> None:
        """Finish the reverts a crash interrupted (their catalog records are still there).

        One that cannot finish (its snapshot gone or invalid) ends as a revert failing in
        a live pool does: logged as an error, the record dropped, the volume keeping what
        was reverted so far. The pool itself is consistent, so check() does not report
        it; whoever started the revert (the coordinator) sees it did not complete."""
        for key, value in self.catalog.meta_items("revert."):
            vid, fid = int(key.split(".", 1)[1]), int(value)
            v = next((x for x in self._volumes.values() if x.id == vid), None)
            s = next((x for x in self._snaps.values() if x.id == fid), None)
            if v is None or s is None or s.origin is not v or s.state != COMMITTED:
                log.error("volume %s: its revert to snapshot %s was interrupted and cannot "
                          "be finished (the snapshot is gone or invalid); the volume may "
                          "hold a partly reverted content", v.name if v else vid,
                          s.snap_id if s else fid)
                with self.catalog.transaction() as db:
                    db.execute("DELETE FROM meta WHERE key=?", (key,))
                continue
            log.warning("volume %s: finishing its revert to snapshot %s, interrupted when "
                        "the pool was last open", v.name, s.snap_id)
            self._reverting[v.id] = s
            try:
                self._revert(v, s, None)
            except (StoreError, OSError) as e:
                log.error("volume %s: finishing its interrupted revert to snapshot %s "
                          "failed (%s); the volume may hold a partly reverted content",
                          v.name, s.snap_id, e)
                self._end_revert(v)

    # -- integrity (blockstore/integrity.py) ----------------------------------------------------
    def seal(self, snap_id: str, progress: Progress = None) -> None:
        """Record an xxh3 per chunk of a full copy (plex or promoted): luns/<id>.sum."""
        from . import integrity
        integrity.seal(self, snap_id, progress)

    def check(self, progress: Progress = None) -> list[str]:
        """Verify catalog, headers, images, maps and every checksum. [] means clean."""
        from . import integrity
        return integrity.check(self, progress)

    def scrub(self, progress: Progress = None) -> list[str]:
        """check() plus a read of every byte of every LUN; seals unsealed full copies."""
        from . import integrity
        return integrity.scrub(self, progress)
