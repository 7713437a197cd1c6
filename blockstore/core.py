"""The pool's core: its state (PoolCore.__init__), the lock and its helpers (pins), paths,
lookups, headers, the space reserve, and the one place `generation` changes.

Pool is assembled from layers, each a class over the one below, each calling only
itself and what is below (the one exception is declared under TYPE_CHECKING here):

    Pool (pool.py: open/close, recovery, integrity)
      LongOps (longops.py: promote, split, revert)
        Snapshots (snapshots.py: prepare, plex sync, commit, delete, reclaim)
          Volumes (volumes.py: create, resize, delete, listings)
            DataPath (datapath.py: read, write, discard, flush, copy-before-write, space)
              HeldWrites (heldwrites.py: held writes and grouped syncs: the concurrency core)
                PoolCore (here)

docs/concurrency.md says what the lock guards and what runs outside it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from . import accounting
from . import format as fmt
from .catalog import Catalog
from .diffarea import DiffArea
from .errors import (
    NotFound,
    ReadOnly,
    SnapshotInvalid,
    disk_full,
)
from .fileio import DataFile, Faults
from .model import (
    COMMITTED,
    DIFFERENTIAL,
    META_RESERVE,
    PREPARING,
    RESERVE_MAX,
    SnapshotInfo,
    State,
    VolumeInfo,
    _Batch,
    _Snapshot,
    _Volume,
)
from .names import check_guid

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_S = TypeVar("_S", bound="PoolCore")


def _locked(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    @functools.wraps(method)
    def wrapper(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class PoolCore:
    """The state every layer of Pool works on. Methods with a leading underscore expect
    the pool lock held (those that mutate state assert it) unless their docstring says
    "WITHOUT the lock"."""

    # set by open(), from pool.json and the catalog file
    chunk_size: int
    pool_id: str
    catalog: Catalog

    if TYPE_CHECKING:   # called from below, defined above (snapshots.py)
        def _delete_snapshot(self, s: _Snapshot, reclaim_now: bool = True) -> None: ...

    def __init__(self, path: str, _faults: Faults | None = None) -> None:
        self.path = os.path.abspath(path)
        self.faults = _faults or Faults()
        self._lock = threading.RLock()
        # batches the data path cut for the writeback thread, and its wake-up call
        self._queued: list[_Batch] = []
        self._promoting: set[str] = set()   # snapshot ids a promote is copying now
        self._sealing: set[str] = set()     # snapshot ids a seal is hashing now
        # files pinned for I/O outside the lock (_pin): close() waits for none to be left
        self._pinned = 0
        self._unpinned = threading.Condition(self._lock)
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
        # how the diff areas preserve chunks: "copy" (read + write) or "reflink" (by
        # reference, whole chunks of writes of at least clone_min_chunks): Pool.open
        # probes the pool's file system (a pool moved elsewhere adapts)
        self.preserve_mode = "copy"
        self.clone_min_chunks: int | None = None
        # the data path's scratch buffer for the old content of chunks a write replaces
        # whole (datapath._read_whole; pool lock held)
        self._scratch = bytearray()
        self._volumes: dict[str, _Volume] = {}
        self._snaps: dict[str, _Snapshot] = {}
        self._closed = True

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
        self._pinned += len(pinned)
        return pinned

    def _unpin(self, files: list[DataFile]) -> None:
        with self._lock:
            self._release(files)

    def _release(self, files: list[DataFile]) -> None:
        """(Lock held.) _unpin's work."""
        for f in files:
            f.unpin()
        self._pinned -= len(files)
        if not self._pinned:
            self._unpinned.notify_all()

    def _wait_unpinned(self, timeout: float = 60.0) -> None:
        """(Lock held; released while waiting.) Until no I/O runs outside the lock on
        the pool's files: closing or releasing the pool before would let a late write
        (a reclaim's cleared records) land in a pool that another opener owns."""
        if not self._unpinned.wait_for(lambda: self._pinned == 0, timeout):
            log.error("pool %s: %d file(s) still in use by I/O outside the lock after "
                      "%g s; closing anyway", self.path, self._pinned, timeout)

    def _img(self, file_id: int) -> str:
        return os.path.join(self.path, "luns", f"{file_id}.img")

    def _hdr(self, file_id: int) -> str:
        return os.path.join(self.path, "luns", f"{file_id}.hdr")

    def _sum(self, file_id: int) -> str:
        return os.path.join(self.path, "luns", f"{file_id}.sum")

    def _nchunks(self, size: int) -> int:
        return (size + self.chunk_size - 1) // self.chunk_size

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
        used = shared = None
        v = s.origin
        if s.kind == DIFFERENTIAL and s.state == COMMITTED and v.diff is not None:
            got = accounting.space_of(v.diff, v.live_epochs).get(s.epoch or 0)
            if got is not None:
                used, shared = got
        return SnapshotInfo(s.snap_id, s.set_id, v.name, v.naa, s.naa, s.size,
                            s.kind, s.state, s.created, s.attributes, s.exposed_name,
                            s.sync_done, s.sync_total, s.epoch, s.id, used, shared)

    def _readable(self, s: _Snapshot) -> None:
        # Long operations (revert, promote, seal) re-check between steps: another thread
        # (or a diff-area overflow) may have deleted the snapshot meanwhile.
        if self._snaps.get(s.snap_id) is not s:
            raise NotFound(f"snapshot {s.snap_id} was deleted")
        if s.state != COMMITTED:
            raise SnapshotInvalid(f"snapshot {s.snap_id} is {s.state}; it cannot be used")

    def statfs(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def available_bytes(self) -> int:
        """Free space snapshots may take (what a full copy may use): ``_room()``, >= 0."""
        return max(0, self._room())

    def _room(self) -> int:
        """Free space the diff areas and plexes may take: free minus the reserve
        (min(RESERVE_MAX, 10 % of the file system)); one statvfs."""
        total, free = self.statfs()
        return free - min(RESERVE_MAX, total // 10)

    def _reserve_path(self) -> str:
        return os.path.join(self.path, "reserve")

    def _keep_reserve(self) -> bool:
        """(Re)fill POOL/reserve: META_RESERVE bytes fallocated, given back when the
        filesystem is full so that a delete (catalog row, map records) can still be
        recorded. Best effort: no room now means try again after the next delete or at
        the next snapshot's preparation. False only if the filesystem has no room for
        it (ENOSPC/EDQUOT); other failures (no fallocate) do not count."""
        try:
            fd = os.open(self._reserve_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            return not disk_full(e)
        try:
            if os.fstat(fd).st_blocks * 512 >= META_RESERVE:
                return True    # held already: no fallocate (a copy-on-write fs's is not free)
            os.posix_fallocate(fd, 0, META_RESERVE)
        except OSError as e:
            return not disk_full(e)
        finally:
            os.close(fd)
        return True

    def _when_full(self, fn: Callable[[], _R]) -> _R:
        """fn(); if it fails because the filesystem is full (ENOSPC, SQLITE_FULL), give
        back the reserve and run it once more (fn must be all or nothing: a catalog
        transaction, rolled back on failure)."""
        try:
            return fn()
        except (OSError, sqlite3.OperationalError) as e:
            full = disk_full(e)
            try:
                had = full and os.stat(self._reserve_path()).st_blocks > 0
            except OSError:
                had = False
            if not had:
                raise
            log.warning("pool filesystem full (%s): using its metadata reserve", e)
            os.truncate(self._reserve_path(), 0)
            return fn()

    def _set_state(self, s: _Snapshot, state: State) -> None:
        assert self._owned(), "pool lock not held"
        def record() -> None:
            with self.catalog.transaction() as db:
                db.execute("UPDATE snapshots SET state=? WHERE id=?", (state, s.id))

        self._when_full(record)
        s.state = state
        self._changed()


    def _changed(self) -> None:
        """LUNs appeared or vanished, or changed name, state or exposure: the FUSE view
        rebuilds its tree when it sees a new generation."""
        self.generation += 1
