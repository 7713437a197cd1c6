"""RbdArray's data path and space figures (a mixin: rbdarray/array.py has the rest).
I/O on a LUN runs under its gate, shared (records.Gate): librbd's Image is thread-safe
for I/O and the bindings release the GIL, so reads and writes of any threads run at
once; a commit, revert, resize, delete or close of that LUN waits for them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from blockstore import errors as bse
from blockstore.model import COMMITTED

from .errors import mapped, translated
from .objectmap import allocated_objects, changed_objects
from .records import (
    Lun,
    Snap,
    Vol,
    clip,
    merge,
    object_runs,
    rbd_snap_name,
    round_out,
    sees,
)

CONNECT_TIMEOUT = 30     # seconds
log = logging.getLogger(__name__)


class DataPath:
    """What the data path needs of the array (RbdArray sets these)."""

    # every read and write is a round trip to the OSDs: the FUSE mount runs them in
    # worker threads (fuse_mount/lunstore.py), never on its trio thread
    blocking_io = True

    pool: str
    host: str
    chunk_size: int
    last_io: float
    generation: int
    _lock: threading.RLock
    # allocated_bytes: LUN -> (bytes, (generation, writes) when counted); writes per LUN
    _alloc: dict[str, tuple[int, tuple[int, int]]]
    _alloc_writes: dict[str, int]
    _alloc_counting: set[str]
    _vols: dict[str, Vol]
    _snaps: dict[str, Snap]
    _io: Any
    _cluster: Any
    _rbd: Any

    def _lun(self, key: str) -> tuple[Lun, bool]:
        raise NotImplementedError

    def _vol(self, name: str) -> Vol:
        raise NotImplementedError

    def _committed(self, snap_id: str) -> Snap:
        raise NotImplementedError

    @contextlib.contextmanager
    def _io_on(self, key: str) -> Iterator[tuple[Any, bool]]:
        """A LUN's Image for I/O, under its gate (shared); a LUN closed meanwhile is
        looked up again."""
        while True:
            lun, is_snap = self._lun(key)
            with lun.gate.shared():
                with self._lock:
                    live = (self._vols.get(key) is not None and self._vols[key].lun is lun) \
                        or (key.lower() in self._snaps and
                            self._snaps[key.lower()].lun is lun)
                if not live:
                    if key not in self._vols and key.lower() not in self._snaps:
                        raise bse.NotFound(f"no LUN {key!r} in Ceph pool {self.pool}")
                    continue
                yield lun.image, is_snap
                return

    def lun_size(self, key: str) -> int:
        with self._io_on(key) as (image, _), translated(f"size of {key}"):
            return int(image.size())

    def read(self, key: str, offset: int, length: int) -> bytes:
        self.last_io = time.monotonic()
        if offset < 0 or length < 0:
            raise bse.OutOfRange(f"invalid read at offset {offset} length {length}")
        with self._io_on(key) as (image, _), translated(f"reading {key}"):
            end = min(offset + length, image.size())
            if end <= offset:
                return b""
            return bytes(image.read(offset, end - offset))

    def read_async(self, key: str, offset: int, length: int,
                   done: Callable[[bytes | None, BaseException | None], object]) -> bool:
        """Start a read with librbd's aio_read and return at once; ``done(data, None)``
        or ``done(None, error)`` is called from a Ceph thread when it ends. For the FUSE
        mount's trio thread: no worker thread per read (its hand-off cost ~90 us of CPU
        per 4 KiB read, docs/ceph.md "Where the time goes"). Never waits: False when the
        read cannot start at once -- the catalog's lock is taken, the LUN's gate is
        closed (a commit, revert, resize), a snapshot not opened yet, a LUN not
        presented here, a range past the end -- and the caller uses read() in a thread,
        which waits, answers or raises as usual. The gate is held shared from here
        until the completion."""
        if offset < 0 or length <= 0 or not self._lock.acquire(blocking=False):
            return False
        try:
            vol = self._vols.get(key)
            snap = None if vol is not None else self._snaps.get(key.lower())
            if vol is not None:
                lun = vol.lun if sees(vol.rec, self.host) and not vol.reverting else None
            elif snap is not None and snap.state == COMMITTED and sees(snap.rec, self.host):
                lun = snap.lun
            else:
                lun = None
        finally:
            self._lock.release()
        if lun is None or not lun.gate.try_shared():
            return False
        try:
            # closed while we looked (a delete, a refresh: the blocking path says so),
            # or past the end (read() clips)
            now = self._vols.get(key) if vol is not None else self._snaps.get(key.lower())
            # (the size as known here, never image.size(): that may refresh the image's
            # header over the network, on the mount's trio thread)
            size = snap.size if snap is not None else vol.size if vol is not None else -1
            if now is not (vol or snap) or size < 0 or offset + length > size:
                lun.gate.leave_shared()
                return False
            self.last_io = time.monotonic()
            gate = lun.gate

            def complete(comp: Any, data: bytes | None) -> None:
                gate.leave_shared()
                if data is not None:
                    done(data, None)
                    return
                code = -int(comp.get_return_value())
                done(None, mapped(OSError(code, os.strerror(code)), f"reading {key}"))

            lun.image.aio_read(offset, length, complete)
        except BaseException:
            lun.gate.leave_shared()
            raise
        return True

    def _writable(self, name: str) -> None:
        with self._lock:
            if name not in self._vols:
                if name.lower() in self._snaps:
                    raise bse.ReadOnly(f"snapshot {name} is read-only")
                self._vol(name)
            if self._vols[name].rec.read_only:
                raise bse.ReadOnly(f"volume {name} is read-only")

    def _bounds(self, name: str, image: Any, offset: int, length: int) -> None:
        size = image.size()
        if offset < 0 or length < 0 or offset + length > size:
            raise bse.OutOfRange(f"I/O at offset {offset} length {length} is outside "
                                 f"volume {name} (size {size})")

    def write(self, name: str, offset: int, data: bytes | memoryview) -> int:
        self.last_io = time.monotonic()
        self._writable(name)
        with self._io_on(name) as (image, _):
            self._bounds(name, image, offset, len(data))
            with translated(f"writing {name}"):
                n = image.write(bytes(data), offset)
        v = self._vols.get(name)
        if v is not None:
            v.mtime = time.time()
        self._alloc_changed(name)
        return int(n)

    def discard(self, name: str, offset: int, length: int) -> None:
        """write_zeroes: whole objects are deallocated, partial ones zeroed (a plain
        discard may skip partial objects: rbd_skip_partial_discard)."""
        self._writable(name)
        with self._io_on(name) as (image, _):
            self._bounds(name, image, offset, length)
            if length:
                with translated(f"discarding in {name}"):
                    image.write_zeroes(offset, length)
        self._alloc_changed(name)

    def flush(self, name: str) -> None:
        with self._io_on(name) as (image, _), translated(f"flushing {name}"):
            image.flush()

    @staticmethod
    def _extents(image: Any, offset: int, length: int, since: str | None
                 ) -> list[tuple[int, int]]:
        """diff_iterate with fast-diff (whole objects, from the object maps: no RADOS
        op per object). Objects are chunk-sized, so these are the chunks touched; the
        exact mode (whole_object=False) is avoided: it costs a RADOS op per object and
        reports an object's whole grown tail as changed anyway."""
        runs: list[tuple[int, int]] = []
        image.diff_iterate(offset, length, since,
                           lambda o, n, _exists: runs.append((o, n)), whole_object=True)
        return merge(runs)

    def _allocated_runs(self, image: Any, snap_rbd_id: int | None, size: int
                        ) -> list[tuple[int, int]]:
        """Where the head (``snap_rbd_id`` None) or an RBD snapshot of ``image`` has
        data, as runs of whole objects cut at ``size``: from its object map in one read
        (rbdarray/objectmap.py), else librbd's walk of every object (_extents)."""
        objects = allocated_objects(self._io, image, self._rbd, snap_rbd_id, size)
        if objects is None:
            return self._extents(image, 0, size, None) if size else []
        unit = 1 << int(image.stat()["order"])
        return object_runs(objects, unit, size)

    def allocation(self, key: str, offset: int, length: int) -> list[tuple[int, int]]:
        if offset < 0 or length < 0:
            raise bse.OutOfRange(f"invalid range at offset {offset} length {length}")
        with self._io_on(key) as (image, _), translated(f"allocation map of {key}"):
            end = min(offset + length, image.size())
            if end <= offset:
                return []
            return clip(self._extents(image, offset, end - offset, None), offset, end)

    def changed_extents(self, from_id: str, to_id: str | None = None
                        ) -> list[tuple[int, int]]:
        with self._lock:
            a = self._committed(from_id)
            if to_id is not None:
                b = self._committed(to_id)
                if b.volume != a.volume:
                    raise bse.InvalidState(f"snapshots {a.id} and {b.id} are of different "
                                           "volumes")
                if b.rbd_id < a.rbd_id:
                    raise bse.InvalidState(f"snapshot {b.id} is older than {a.id}")
        with self._io_on(to_id or a.volume) as (image, _), \
                translated(f"changes since snapshot {a.id}"):
            size = image.size()
            # from the object maps (rbdarray/objectmap.py: ms for 64 GiB), else librbd's
            # walk of every object (~1 us each)
            objects = changed_objects(self._io, image, self._rbd, a.rbd_id, size,
                                      None if to_id is None else b.rbd_id)
            if objects is not None:
                runs = object_runs(objects, 1 << int(image.stat()["order"]), size)
            else:
                runs = self._extents(image, 0, size, rbd_snap_name(a.id)) if size else []
            return round_out(runs, self.chunk_size, size)

    def image_path(self, key: str) -> str | None:
        return None

    # ------------------------------------------------------------------ space
    def statfs(self) -> tuple[int, int]:
        """(total, free): total is the pool's quota (max_bytes) if it has one, else the
        cluster's raw size; used is the pool's stored bytes. Without a ceph-mgr the
        cluster reports no usage (zeros): free is then the quota (docs/ceph.md)."""
        with translated(f"space of pool {self.pool}"):
            stats = self._io.get_stats()
            used = int(stats.get("num_bytes", 0))
            total = self._quota()
            if not total:
                total = int(self._cluster.get_cluster_stats().get("kb", 0)) * 1024
        total = max(total, used)
        return total, total - used

    def _quota(self) -> int:
        rc, out, _ = self._cluster.mon_command(
            json.dumps({"prefix": "osd pool get-quota", "pool": self.pool,
                        "format": "json"}), b"", timeout=CONNECT_TIMEOUT)
        if rc == 0:
            return int(json.loads(out).get("quota_max_bytes", 0))
        # without a mgr get-quota has "no stats": the osdmap has the quota too
        rc, out, _ = self._cluster.mon_command(
            json.dumps({"prefix": "osd pool ls", "detail": "detail", "format": "json"}),
            b"", timeout=CONNECT_TIMEOUT)
        if rc != 0:
            return 0
        for p in json.loads(out):
            if p.get("pool_name") == self.pool:
                return int(p.get("quota_max_bytes", 0))
        return 0

    def available_bytes(self) -> int:
        return self.statfs()[1]

    def allocated_bytes(self, key: str) -> int:
        """A LUN's allocated bytes (st_blocks of its file in the mount, `du`, listings).
        Counting them reads the LUN's object map (a few ms for 64 GiB; librbd's walk,
        where the map cannot be used, ~1 us per 64 KiB object: 0.5-1 s for 64 GiB), and
        the mount asks on every getattr on its trio thread: so the
        figure is kept per LUN and is exact while nothing changed it (no write, discard,
        revert, resize since it was counted); after a change the last figure is
        answered at once and a worker thread counts again (one at a time per LUN). Only a
        LUN's first count runs in the caller."""
        with self._lock:
            state = (self.generation, self._alloc_writes.get(key, 0))
            known = self._alloc.get(key)
            if known is not None:
                value, counted_at = known
                if counted_at != state and key not in self._alloc_counting:
                    self._alloc_counting.add(key)
                    threading.Thread(target=self._recount_allocated, args=(key,),
                                     name=f"rbd-alloc-{key[:16]}", daemon=True).start()
                return value
        self._count_allocated(key)
        with self._lock:
            return self._alloc[key][0]

    def _count_allocated(self, key: str) -> None:
        try:
            with self._lock:
                state = (self.generation, self._alloc_writes.get(key, 0))
            with self._io_on(key) as (image, is_snap), translated(f"allocation of {key}"):
                size = image.size()
                snap = self._snaps.get(key.lower()) if is_snap else None
                rbd_id = None if snap is None else snap.rbd_id
                value = sum(n for _, n in self._allocated_runs(image, rbd_id, size))
            with self._lock:
                self._alloc[key] = (value, state)
        finally:
            with self._lock:
                self._alloc_counting.discard(key)

    def _recount_allocated(self, key: str) -> None:
        try:
            self._count_allocated(key)
        except Exception as e:   # noqa: BLE001 - a LUN deleted meanwhile; the next asks again
            log.debug("counting the allocation of %s: %s", key, e)

    def _alloc_changed(self, name: str) -> None:
        """A write or discard changed what ``name`` may hold (allocated_bytes)."""
        with self._lock:
            self._alloc_writes[name] = self._alloc_writes.get(name, 0) + 1

