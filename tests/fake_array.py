"""An in-memory Array (provider/array.py): the second implementation of the interface,
for tests/test_array_contract.py to prove that the provider layer needs nothing of the
embedded pool but the interface.

Deliberately simple and obviously right rather than fast: a LUN's data is a dict of
chunk index -> bytes (absent: zeros); a differential snapshot is a copy of that dict
taken at the commit (bytes are immutable, so this is copy-on-write for free); a plex
"syncs" by counting bytes and takes its copy at the commit too (the same content a
synced mirror has at the instant). One lock makes every method atomic; the
``generation`` moves on every change of the LUN set, as the pool's does. Errors are
blockstore.errors, as the interface requires; names follow the engine's name rules
(blockstore.names, the one source of them).
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from blockstore import errors as bse
from blockstore.model import (
    COMMITTED,
    DIFFERENTIAL,
    FULL,
    PLEX,
    PREPARING,
    Capabilities,
    Kind,
    SnapshotInfo,
    VolumeInfo,
)
from blockstore.names import check_guid, check_name, check_size

Progress = Callable[[int, int], None] | None
T = TypeVar("T")
CAPACITY = 1 << 30


@dataclass(eq=False)
class _Lun:
    naa: str
    size: int
    data: dict[int, bytes] = field(default_factory=dict)


def _locked(fn: Callable[..., T]) -> Callable[..., T]:
    def wrapper(self: FakeArray, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return fn(self, *args, **kwargs)
    return wrapper


class FakeArray:
    """Volumes and snapshots in memory. ``path`` is a directory for the provider's
    catalog (the interface's one local need); the data never touches it."""

    chunk_size = 65536

    def __init__(self, path: str | None = None, capabilities: Capabilities | None = None
                 ) -> None:
        self.path = path or tempfile.mkdtemp(prefix="fake-array-")
        self.pool_id = uuid.uuid4().hex   # 32 hex digits, like the pool's
        self.capabilities = capabilities or Capabilities(
            plex=True, promote=True, split=True, revert=True, reflink=False,
            changed_blocks=True, max_snapshots_per_volume=512)
        self.generation = 0
        self.last_io = 0.0
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._vols: dict[str, tuple[VolumeInfo, _Lun]] = {}
        self._snaps: dict[str, tuple[SnapshotInfo, _Lun]] = {}

    def close(self) -> None:
        """Nothing to release (not part of the interface: the daemon that opened a
        backend closes it; tests close whatever Env made)."""

    # ------------------------------------------------------------------ helpers
    def _changed(self) -> None:
        self.generation += 1

    def _naa(self) -> str:
        return "6" + uuid.uuid4().hex[:31]

    def _vol(self, name: str) -> tuple[VolumeInfo, _Lun]:
        try:
            return self._vols[name]
        except KeyError:
            raise bse.NotFound(f"no volume {name!r} in {self.path}") from None

    def _snap(self, snap_id: str) -> tuple[SnapshotInfo, _Lun]:
        try:
            return self._snaps[str(snap_id).lower()]
        except KeyError:
            raise bse.NotFound(f"no snapshot {snap_id} in {self.path}") from None

    def _lun(self, key: str) -> _Lun:
        if key in self._vols:
            return self._vols[key][1]
        info, lun = self._snap(key)
        if info.state == PREPARING:
            raise bse.InvalidState(f"snapshot {info.id} is still being prepared")
        return lun

    def _used(self) -> int:
        luns = [lun for _, lun in self._vols.values()] + \
               [lun for _, lun in self._snaps.values()]
        return sum(len(b) for lun in luns for b in lun.data.values())

    def _set_volume(self, v: VolumeInfo, **changes: Any) -> VolumeInfo:
        v = replace(v, **changes)
        self._vols[v.name] = (v, self._vols[v.name][1])
        return v

    def _snapshots_of(self, name: str) -> int:
        return sum(1 for s, _ in self._snaps.values()
                   if s.volume == name and s.state != PREPARING)

    # ------------------------------------------------------------------ volumes
    @_locked
    def list_volumes(self) -> list[VolumeInfo]:
        return [self.volume(n) for n in sorted(self._vols)]

    @_locked
    def volume(self, name: str) -> VolumeInfo:
        return replace(self._vol(name)[0], snapshots=self._snapshots_of(name))

    @_locked
    def create_volume(self, name: str, size: int) -> VolumeInfo:
        check_name(name)
        check_size(size)
        if name in self._vols:
            raise bse.Exists(f"a volume named {name!r} already exists")
        now = time.time()
        v = VolumeInfo(next(self._ids), name, self._naa(), size, now, False, now, 0, 0)
        self._vols[name] = (v, _Lun(v.naa, size))
        self._changed()
        return v

    @_locked
    def resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        v, lun = self._vol(name)
        check_size(new_size, "new size")
        if new_size < v.size:
            raise bse.InvalidSize(f"shrinking volume {name} is not supported")
        lun.size = new_size
        self._changed()
        return self._set_volume(v, size=new_size)

    @_locked
    def delete_volume(self, name: str) -> None:
        self._vol(name)
        if any(s.volume == name for s, _ in self._snaps.values()):
            raise bse.Busy(f"volume {name} has snapshots; delete or split them first")
        del self._vols[name]
        self._changed()

    # ------------------------------------------------------------------ snapshots
    @_locked
    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        if volume is not None:
            self._vol(volume)
        snaps = [s for s, _ in self._snaps.values() if volume in (None, s.volume)]
        return sorted(snaps, key=lambda s: (s.created, s.file_id))

    @_locked
    def snapshot(self, snap_id: str) -> SnapshotInfo:
        return self._snap(snap_id)[0]

    @_locked
    def prepare_snapshot(self, volume: str, kind: str = DIFFERENTIAL,
                         snapshot_id: str | None = None, set_id: str | None = None,
                         attributes: int = 0) -> SnapshotInfo:
        v, lun = self._vol(volume)
        if kind not in (DIFFERENTIAL, PLEX) or (kind == PLEX and not self.capabilities.plex):
            raise bse.Unsupported(f"snapshot kind {kind!r} is not supported here")
        sid = check_guid(snapshot_id) if snapshot_id else str(uuid.uuid4())
        if sid in self._snaps:
            raise bse.Exists(f"a snapshot with id {sid} already exists")
        if set_id is not None:
            set_id = check_guid(set_id, "snapshot set id")
        if sum(1 for s, _ in self._snaps.values() if s.volume == volume) >= \
                self.capabilities.max_snapshots_per_volume:
            raise bse.NoSpace(f"volume {volume} has the maximum number of snapshots")
        total = len(lun.data) * self.chunk_size if kind == PLEX else 0
        info = SnapshotInfo(sid, set_id, volume, v.naa, self._naa(), lun.size, Kind(kind),
                            PREPARING, time.time(), attributes, None, 0, total, None,
                            next(self._ids))
        self._snaps[sid] = (info, _Lun(info.naa, lun.size))
        return info

    @_locked
    def plex_sync_step(self, snap_id: str, max_bytes: int = 8 << 20) -> tuple[int, int]:
        s, lun = self._snap(snap_id)
        total = max(s.sync_total, len(self._vol(s.volume)[1].data) * self.chunk_size)
        done = min(total, s.sync_done + max_bytes)
        self._snaps[s.id] = (replace(s, sync_done=done, sync_total=total), lun)
        return done, total

    @_locked
    def commit_snapshots(self, snap_ids: Iterable[str]) -> None:
        ids = [self._snap(i)[0].id for i in snap_ids]
        for sid in ids:   # all or nothing: check every one before changing any
            s = self._snaps[sid][0]
            if s.state != PREPARING:
                raise bse.InvalidState(f"snapshot {sid} is {s.state}, not preparing")
            if s.kind == PLEX and s.sync_done < s.sync_total:
                raise bse.InvalidState(f"plex {sid} is not in sync")
        for sid in ids:
            s, lun = self._snaps[sid]
            origin = self._vol(s.volume)[1]
            lun.data, lun.size = dict(origin.data), origin.size
            self._snaps[sid] = (replace(s, state=COMMITTED, size=origin.size), lun)
        self._changed()

    @_locked
    def abort_snapshot(self, snap_id: str) -> None:
        s, _ = self._snap(snap_id)
        if s.state != PREPARING:
            raise bse.InvalidState(f"snapshot {s.id} is already committed; delete it instead")
        del self._snaps[s.id]

    @_locked
    def delete_snapshot(self, snap_id: str) -> None:
        del self._snaps[self._snap(snap_id)[0].id]
        self._changed()

    def _committed(self, snap_id: str) -> tuple[SnapshotInfo, _Lun]:
        s, lun = self._snap(snap_id)
        if s.state != COMMITTED:
            raise bse.SnapshotInvalid(f"snapshot {s.id} is {s.state}; it cannot be used")
        return s, lun

    @staticmethod
    def _steps(progress: Progress, n: int) -> None:
        for i in range(1, n + 1):
            if progress is not None:
                progress(i, n)

    def promote(self, snap_id: str, progress: Progress = None) -> SnapshotInfo:
        with self._lock:
            s, lun = self._committed(snap_id)
            if s.kind != DIFFERENTIAL:
                raise bse.Unsupported(f"snapshot {s.id} is already a full copy ({s.kind})")
        self._steps(progress, 4)   # outside the lock, like a copy; may raise Cancelled
        with self._lock:
            s, lun = self._committed(snap_id)
            s = replace(s, kind=FULL)
            self._snaps[s.id] = (s, lun)
            self._changed()
            return s

    def split(self, snap_id: str, new_name: str, progress: Progress = None) -> VolumeInfo:
        check_name(new_name)
        with self._lock:
            s, lun = self._committed(snap_id)
            if new_name in self._vols:
                raise bse.Exists(f"a volume named {new_name!r} already exists")
        if s.kind == DIFFERENTIAL:
            self.promote(snap_id, progress)
        with self._lock:
            s, lun = self._committed(snap_id)
            if new_name in self._vols:
                raise bse.Exists(f"a volume named {new_name!r} already exists")
            del self._snaps[s.id]
            now = time.time()
            v = VolumeInfo(next(self._ids), new_name, self._naa(), s.size, now, False, now,
                           0, 0)
            self._vols[new_name] = (v, _Lun(v.naa, s.size, dict(lun.data)))
            self._changed()
            return v

    def revert(self, volume: str, snap_id: str, progress: Progress = None) -> None:
        with self._lock:
            v, origin = self._vol(volume)
            s, lun = self._committed(snap_id)
            if s.volume != volume:
                raise bse.InvalidState(f"snapshot {s.id} is of volume {s.volume}, "
                                       f"not {volume}")
            origin.data, origin.size = dict(lun.data), s.size
            self._set_volume(v, size=s.size, mtime=time.time())
            self._changed()
        self._steps(progress, 1)

    @_locked
    def set_exposed(self, snap_id: str, name: str | None) -> SnapshotInfo:
        s, lun = self._snap(snap_id)
        if name is not None:
            check_name(name, "exposure")
            if s.state != COMMITTED:
                raise bse.InvalidState(f"snapshot {s.id} is {s.state}; only committed "
                                       "snapshots can be exposed")
            if any(o.exposed_name == name and o.id != s.id for o, _ in self._snaps.values()):
                raise bse.Exists(f"exposure name {name!r} is taken")
        s = replace(s, exposed_name=name)
        self._snaps[s.id] = (s, lun)
        self._changed()
        return s

    # ------------------------------------------------------------------ data path
    @_locked
    def lun_size(self, key: str) -> int:
        return self._lun(key).size

    @_locked
    def read(self, key: str, offset: int, length: int) -> bytes:
        self.last_io = time.monotonic()
        lun = self._lun(key)
        if offset < 0 or length < 0:
            raise bse.OutOfRange(f"invalid read at offset {offset} length {length}")
        end = min(offset + length, lun.size)
        cs, out, pos = self.chunk_size, bytearray(), offset
        while pos < end:
            c = pos // cs
            stop = min(end, (c + 1) * cs)
            out += lun.data.get(c, bytes(cs))[pos - c * cs:stop - c * cs]
            pos = stop
        return bytes(out)

    def _writable(self, name: str, offset: int, length: int) -> _Lun:
        v, lun = self._vol(name)
        if v.read_only:
            raise bse.ReadOnly(f"volume {name} is read-only")
        if offset < 0 or length < 0 or offset + length > lun.size:
            raise bse.OutOfRange(f"I/O at offset {offset} length {length} is outside "
                                 f"volume {name} (size {lun.size})")
        return lun

    def _put(self, lun: _Lun, offset: int, data: bytes) -> None:
        cs, pos = self.chunk_size, 0
        while pos < len(data):
            c, lo = divmod(offset + pos, cs)
            n = min(cs - lo, len(data) - pos)
            old = bytearray(lun.data.get(c, bytes(cs)))
            old[lo:lo + n] = data[pos:pos + n]
            lun.data[c] = bytes(old)
            pos += n

    @_locked
    def write(self, name: str, offset: int, data: bytes | memoryview) -> int:
        self.last_io = time.monotonic()
        if self._used() + len(data) > CAPACITY:
            raise bse.NoSpace("the fake array is full")
        self._put(self._writable(name, offset, len(data)), offset, bytes(data))
        self._set_volume(self._vols[name][0], mtime=time.time())
        return len(data)

    @_locked
    def flush(self, name: str) -> None:
        self._vol(name)   # memory is as durable as this array gets

    @_locked
    def discard(self, name: str, offset: int, length: int) -> None:
        self._put(self._writable(name, offset, length), offset, bytes(length))

    @_locked
    def allocation(self, key: str, offset: int, length: int) -> list[tuple[int, int]]:
        lun = self._lun(key)
        if offset < 0 or length < 0:
            raise bse.OutOfRange(f"invalid range at offset {offset} length {length}")
        end, cs, runs = min(offset + length, lun.size), self.chunk_size, []
        for c in sorted(lun.data):   # a chunk of zeros written as data counts: allowed
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            if lo >= hi:
                continue
            if runs and runs[-1][0] + runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi - runs[-1][0])
            else:
                runs.append((lo, hi - lo))
        return runs

    @_locked
    def changed_extents(self, from_id: str, to_id: str | None = None
                        ) -> list[tuple[int, int]]:
        """The chunks whose content differs (a valid answer: every one of them was
        touched, and the interface allows a superset only of those touched). Snapshot
        order is creation order (file_id); the same refusals as the pool's."""
        if not self.capabilities.changed_blocks:
            raise bse.Unsupported("this array keeps no changed-block maps")
        a, old = self._committed(from_id)
        if a.kind != DIFFERENTIAL:
            raise bse.Unsupported(f"snapshot {a.id} is a full copy: no changes recorded")
        if to_id is None:
            new = self._vol(a.volume)[1]
        else:
            b, new = self._committed(to_id)
            if b.volume != a.volume:
                raise bse.InvalidState(f"snapshots {a.id} and {b.id} are of different "
                                       "volumes")
            if b.kind == PLEX:
                raise bse.Unsupported(f"snapshot {b.id} is a plex: not on the change record")
            if b.file_id < a.file_id:
                raise bse.InvalidState(f"snapshot {b.id} is older than {a.id}")
        cs = self.chunk_size
        changed = sorted(c for c in set(old.data) | set(new.data)
                         if c * cs < new.size and old.data.get(c) != new.data.get(c))
        runs: list[tuple[int, int]] = []
        for c in changed:
            hi = min((c + 1) * cs, new.size)
            if runs and runs[-1][0] + runs[-1][1] == c * cs:
                runs[-1] = (runs[-1][0], hi - runs[-1][0])
            else:
                runs.append((c * cs, hi - c * cs))
        return runs

    def image_path(self, key: str) -> str | None:
        return None

    # ------------------------------------------------------------------ space
    @_locked
    def statfs(self) -> tuple[int, int]:
        return CAPACITY, CAPACITY - self._used()

    def available_bytes(self) -> int:
        return self.statfs()[1]

    @_locked
    def allocated_bytes(self, key: str) -> int:
        return len(self._lun(key).data) * self.chunk_size

    # ------------------------------------------------------------------ integrity
    @_locked
    def check(self, progress: Progress = None, volume: str | None = None,
              tally: Any = None) -> list[str]:
        if volume is not None and volume not in self._vols:
            raise bse.NotFound(f"no volume named {volume!r}")
        if tally is not None:   # every LUN (of the volume): nothing more is read
            tally.luns += sum(1 for k in self._vols if volume in (None, k)) + sum(
                1 for s, _ in self._snaps.values() if volume in (None, s.volume))
        problems = [f"snapshot {s.id} of missing volume {s.volume}"
                    for s, _ in self._snaps.values() if s.volume not in self._vols]
        problems += [f"LUN {k} holds a chunk past its end"
                     for k, (_, lun) in [*self._vols.items(), *self._snaps.items()]
                     if any(c * self.chunk_size >= lun.size for c in lun.data)]
        self._steps(progress, 1)
        return problems

    def scrub(self, progress: Progress = None, volume: str | None = None,
              tally: Any = None) -> list[str]:
        return self.check(progress, volume, tally)
