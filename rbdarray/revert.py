"""Revert on RBD (a mixin: rbdarray/array.py has the rest): a volume made equal to one of
its snapshots, at a cost that follows what changed since the snapshot, not the volume's
size, and crash-safe by rolling forward.

How: the size set back to the snapshot's; the objects that may differ found from the
object maps (rbdarray/objectmap.py: a few ms for 64 GiB); each run of them read from
the snapshot and written to the head through librbd, or zeroed (write_zeroes: whole
objects deallocated) where the snapshot reads as zeros; then a flush. librbd's
`rollback_to_snap` does the same on the OSDs without moving data, but it visits every
object of the image (~0.2 us each, plus a RADOS op per object that exists in the head
or the snapshot, changed or not): by volume size (docs/ceph.md "Performance"). It is
still what runs when the maps cannot be trusted (objectmap.py's cases).

Crash safety (the embedded pool's rule, blockstore/longops.py): the image's metadata
``spx.revert`` = {"snapshot", "started", "host"} is written before the volume changes
and removed once the reverted content is flushed, while the gate is still closed (so no
acknowledged write can come before the record's removal and be reverted by a resume).
While it is there the volume is not served -- here the revert holds its gate (I/O
waits); in another daemon (a host it is also presented to, or this one after a restart)
I/O fails Busy -- and a daemon opening the pool finishes every revert that its own host
started (the record's "host") of a volume presented to it before it serves anything
(kill -9, power loss, an OSD restart that outlived us). Another host's record is left
alone: only that host finishes or drops it (two daemons copying back at once would lose
writes), so a volume whose reverting host never comes back stays refused (Busy): the
limit of not holding a lease for a revert (docs/ceph.md). A record without "host" (an
older daemon's) is finished by whichever host opens the pool, as before.
Every step is idempotent: the size, then what differs now, so a revert done twice or
half-done and redone ends the same. An ordinary failure (an error the caller sees)
drops the record, as on the pool: the caller may write to the volume again, and a
later open must not revert over those writes. Once the record is written the revert
rolls forward: a cancellation through `progress` is logged and ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blockstore import errors as bse
from blockstore.model import COMMITTED

from .errors import translated
from .objectmap import changed_objects
from .records import REVERT_KEY, Lun, Snap, Vol, object_runs, rbd_snap_name

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None
COPY_STEP = 4 << 20      # bytes per read/write of the copy back (64 objects of 64 KiB)
COPY_WORKERS = 4         # pieces in flight (each a read from the snapshot, then a write)


class Reverts:
    """What revert needs of the array (RbdArray sets these)."""

    pool: str
    _lock: threading.RLock
    _vols: dict[str, Vol]
    host: str
    _snaps: dict[str, Snap]
    _reverting: set[str]
    _io: Any
    _rbd: Any

    if TYPE_CHECKING:   # RbdArray's (declared only: no stub may shadow it)
        def _vol(self, name: str) -> Vol: ...
        def _committed(self, snap_id: str) -> Snap: ...
        def _lun(self, key: str) -> tuple[Lun, bool]: ...
        def _changed(self) -> None: ...
        def _alloc_changed(self, name: str) -> None: ...
        def _mutation(self) -> contextlib.AbstractContextManager[None]: ...

    def revert(self, volume: str, snap_id: str, progress: Progress = None) -> None:
        """Make ``volume``'s content and size its snapshot's (the module docstring).
        Cancelled through ``progress`` before the record is written: nothing changed;
        after: it completes."""
        with self._lock:
            v = self._vol(volume)
            s = self._committed(snap_id)
            if s.volume != volume:
                raise bse.InvalidState(f"snapshot {s.id} is of volume {s.volume}, "
                                       f"not {volume}")
            if volume in self._reverting:
                raise bse.Busy(f"volume {volume} is already being reverted")
            self._reverting.add(volume)
        try:
            if progress is not None:
                progress(0, s.size)     # the last point where a cancellation undoes it
            try:
                self._record(v, s.id)
            except Exception:   # it may have been written (a lost reply): not resumed
                with contextlib.suppress(Exception):
                    self._unrecord(v)
                raise
            point_of_no_return = getattr(progress, "point_of_no_return", None)
            if point_of_no_return is not None:
                point_of_no_return()
            try:
                self._revert(v, s, progress)
            except Exception:
                # reported: the caller may write again, a later open must not resume it
                with contextlib.suppress(Exception):
                    self._unrecord(v)
                raise
        finally:
            with self._lock:
                self._reverting.discard(volume)
        if progress is not None:
            with contextlib.suppress(bse.Cancelled):
                progress(s.size, s.size)

    def _record(self, v: Vol, snap_id: str) -> None:
        with self._mutation(), translated(f"recording the revert of {v.name}"):
            v.lun.image.metadata_set(REVERT_KEY, json.dumps(
                {"snapshot": snap_id, "started": time.time(), "host": self.host},
                sort_keys=True))
            v.reverting = snap_id

    def _revert_owner(self, v: Vol) -> str | None:
        """The host named in ``v``'s revert record (None: no record any more, or one
        written before records named their host)."""
        with contextlib.suppress(Exception):
            rec = json.loads(v.lun.image.metadata_get(REVERT_KEY))
            host = rec.get("host") if isinstance(rec, dict) else None
            return host if isinstance(host, str) else None
        return None

    def _unrecord(self, v: Vol) -> None:
        with self._mutation(), translated(f"ending the revert of {v.name}"):
            with contextlib.suppress(KeyError, self._rbd.ImageNotFound):
                v.lun.image.metadata_remove(REVERT_KEY)
            v.reverting = None

    def _revert(self, v: Vol, s: Snap, progress: Progress) -> None:
        """The revert proper, under the volume's gate (its I/O waits); idempotent."""
        with v.lun.gate.exclusive(), translated(f"reverting {v.name} to snapshot {s.id}"):
            image = v.lun.image
            # writes librbd's cache still holds (writeback policy) are not in the object
            # map yet: out to the OSDs first, or the copy back would miss them
            image.flush()
            if image.size() != s.size:
                image.resize(s.size)    # a shrink removes the objects past the end
            v.size = s.size
            objects = changed_objects(self._io, image, self._rbd, s.rbd_id, s.size)
            if objects is None:
                log.info("volume %s: reverting to snapshot %s with rollback_to_snap (the "
                         "object maps cannot be used)", v.name, s.id)
                image.rollback_to_snap(rbd_snap_name(s.id))
            else:
                self._copy_back(v, s, image, objects, progress)
            image.flush()
            # done: the record goes while the gate is still closed -- once I/O flows
            # again, a crash must not find the record and revert acknowledged writes
            self._unrecord(v)
        with self._lock:
            v.mtime = time.time()
            self._changed()
        self._alloc_changed(v.name)

    def _copy_back(self, v: Vol, s: Snap, image: Any, objects: list[int],
                   progress: Progress) -> None:
        """The runs of ``objects``, COPY_STEP bytes at a time, COPY_WORKERS at once
        (librbd's Image is thread-safe and the binding releases the GIL): read from the
        snapshot, written to the head, or zeroed where the snapshot reads as zeros."""
        unit = 1 << int(image.stat()["order"])
        pieces = [(o, min(COPY_STEP, off + n - o)) for off, n in object_runs(objects, unit, s.size)
                  for o in range(off, off + n, COPY_STEP)]
        total, done, told = max(1, sum(k for _, k in pieces)), 0, False
        with self._snapshot_image(s) as src:
            def one(piece: tuple[int, int]) -> int:
                o, k = piece
                data = src.read(o, k)
                if data.count(0) == len(data):
                    image.write_zeroes(o, k)
                else:
                    image.write(data, o)
                return k

            pool = ThreadPoolExecutor(COPY_WORKERS, thread_name_prefix="rbd-revert")
            try:
                for k in pool.map(one, pieces):     # in order; the first error raised
                    done += k
                    if progress is None:
                        continue
                    try:
                        progress(done, total)
                    except bse.Cancelled:   # rolls forward (the module docstring)
                        if not told:
                            log.info("volume %s: its revert to snapshot %s was cancelled "
                                     "after it started: it continues", v.name, s.id)
                        told = True
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    @contextlib.contextmanager
    def _snapshot_image(self, s: Snap) -> Iterator[Any]:
        lun, _ = self._lun(s.id)
        with lun.gate.shared():
            yield lun.image

    def _resume_reverts(self) -> None:
        """Finish the reverts a crash interrupted (their records are on the images) of
        the volumes presented here; run when the array opens, before anything is
        served. One that cannot finish -- its snapshot gone or not presented here --
        is logged as an error and its record dropped (the volume keeps what was
        reverted so far, as on the pool); one that fails keeps its record: the volume
        stays refused (Busy) until the next open tries again."""
        with self._lock:
            todo = [(v, v.reverting) for v in self._vols.values() if v.reverting]
        for v, sid in todo:
            owner = self._revert_owner(v)
            if owner is not None and owner != self.host:
                # another daemon's revert, running or interrupted: only it may finish
                # or drop it (two copying at once would lose writes); until then the
                # volume is refused here (Busy)
                log.warning("volume %s: a revert to snapshot %s started by host %s is "
                            "recorded on it; it is not served here until that host "
                            "finishes it", v.name, sid, owner)
                continue
            with self._lock:
                s = self._snaps.get(str(sid).lower())
            if s is None or s.volume != v.name or s.state != COMMITTED:
                log.error("volume %s: its revert to snapshot %s was interrupted and cannot "
                          "be finished (the snapshot is gone, or not presented to this "
                          "host); the volume may hold a partly reverted content",
                          v.name, sid)
                with contextlib.suppress(Exception):
                    self._unrecord(v)
                continue
            log.warning("volume %s: finishing its revert to snapshot %s, interrupted "
                        "when the pool was last open", v.name, sid)
            with self._lock:
                self._reverting.add(v.name)
            try:
                self._revert(v, s, None)
            except Exception as e:   # noqa: BLE001 - logged; the volume stays refused
                log.error("volume %s: finishing its interrupted revert to snapshot %s "
                          "failed (%s); it is not served until the next open",
                          v.name, sid, e)
            finally:
                with self._lock:
                    self._reverting.discard(v.name)
