"""RbdArray: the Array interface (provider/array.py) over a Ceph RBD pool, through
librbd in our own process (python3-rados / python3-rbd). The mapping and its limits are
in docs/ceph.md; what is stored on the images in rbdarray/records.py.

    volume (LUN)           an RBD image carrying the metadata key spx.volume
    differential snapshot  an RBD snapshot ``spx.<guid>`` + the metadata spx.snap.<guid>
    set at one instant     commit_snapshots: every image's writes held at our gate
                           (records.Gate) while its RBD snapshot is taken (see below)
    revert                 the changed objects copied back from the snapshot, found
                           from the object maps (revert.py: cost follows the changes)
    split                  a new image + the snapshot's allocated objects copied
                           (copying.py: cost follows the data, not the size), new naa
    changed blocks         diff_iterate (fast-diff finds the objects, then exact extents)
    plex, promote          not offered (capabilities say so)

Why not an RBD group snapshot for the instant: it is one (4 images in 85 ms here), but
pacific's librbd reaches group-namespace snapshots only by id -- reading them works
(set_snap_by_id), while diff_iterate, rollback_to_snap, clone and rename_snap look a
name up in the user namespace only (ImageNotFound, checked on 16.2.15), and removing the
group removes every image's snapshot of it. So changed blocks, revert and split need
user snapshots, and the instant is made here: a commit closes the gate of every volume
of the set (waits for the I/O in flight, holds new I/O), takes the RBD snapshots at
once (a thread each: the monitor allocates their ids in one paxos proposal, ~0.1 s with
paxos propose interval 0.1, whatever the number of volumes) and opens the gates. Every
write through this array is wholly before or wholly after the instant.

Several hosts on one pool (issue 18 item 2), each host's daemon an RbdArray named by
``host``: the catalog in memory follows the others (rbdarray/catalog.py, follow.py),
a LUN is served only by the hosts its record presents it to (hosts.py), one set is in
creation at a time across them (setlock.py).

Threads: every method may be called from any thread. librbd's Image and librados'
Ioctx are thread-safe for I/O (the bindings release the GIL); one Image per LUN stays
open, and a LUN's gate keeps it from being closed, resized or snapshotted under I/O.
``self._lock`` guards only the in-memory catalog (never held across librbd I/O but in
the short metadata updates of bookkeeping calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from blockstore import errors as bse
from blockstore.model import (
    COMMITTED,
    DIFFERENTIAL,
    PREPARING,
    Capabilities,
    Kind,
    SnapshotInfo,
    VolumeInfo,
)
from blockstore.names import check_guid, check_name, check_size

from .copying import copy_allocated
from .datapath import CONNECT_TIMEOUT, DataPath
from .errors import translated
from .follow import POLL, Follower
from .hosts import Hosts
from .integrity import Integrity
from .records import (
    VOLUME_KEY,
    Lun,
    Snap,
    SnapRecord,
    Vol,
    VolumeRecord,
    rbd_snap_name,
    sees,
    snap_key,
)
from .revert import Reverts
from .scan import ImageScan
from .setlock import SetLock

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None

CHUNK = 65536            # default object size of the images we create = chunk_size
MAX_SNAPSHOTS = 512      # per volume, VSS's limit
BUSY_WAIT = 3.0          # s an image removal retries while another client has it open
FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten")


def _rbd() -> tuple[Any, Any]:
    """The rados and rbd modules (Debian's python3-rados/-rbd, linked by `make ceph`)."""
    try:
        import rados
        import rbd
    except ImportError as e:
        raise bse.StoreError(f"the Ceph python modules are missing ({e}); run 'make ceph' "
                             "(installs python3-rados and python3-rbd and links them into "
                             "the venv)") from None
    return rados, rbd


class RbdArray(Hosts, Integrity, Reverts, DataPath):
    """Volumes and snapshots of one RBD pool. ``path``: a local directory for the
    provider's catalog (the interface's one local need)."""

    def __init__(self, pool: str, conffile: str, path: str, ceph_id: str | None = None,
                 conf: dict[str, str] | None = None, object_size: int = CHUNK,
                 host: str | None = None, poll: float = POLL) -> None:
        """`object_size`: of the images this array creates (a power of two, 4 KiB..32
        MiB), and the chunk size it reports: changed blocks and allocation maps come
        from the object maps, so they are exact to an object (docs/ceph.md). `host`:
        this host's name in the images' presentation (default: the hostname); the
        coordinator serves it as its own host. `poll`: seconds between two scans of
        the pool when no other host notifies (rbdarray/follow.py)."""
        if object_size < 4096 or object_size > 32 << 20 or object_size & (object_size - 1):
            raise bse.InvalidSize(f"invalid RBD object size {object_size}: a power of two "
                                  "from 4 KiB to 32 MiB")
        rados, rbd = self._rados, self._rbd = _rbd()
        self.chunk_size = object_size
        self._order = object_size.bit_length() - 1
        self.path = path
        self.pool = pool
        self.host = host or socket.gethostname()
        self.generation = 0
        self.last_io = 0.0
        self._lock = threading.RLock()
        self._vols: dict[str, Vol] = {}         # our images presented here (open)
        self._snaps: dict[str, Snap] = {}       # committed and presented here, or being
                                                # prepared here
        self._hidden: dict[str, ImageScan] = {}     # our images not presented here
        self._hidden_snaps: dict[str, tuple[ImageScan, SnapRecord]] = {}   # likewise
        self._epoch = 0          # local changes of the catalog so far (see _mutation)
        self._mutating = 0       # local changes under way
        self._token = ""         # digest of what this host sees (generation follows it)
        self._leftovers = False  # the last scan saw records a crash may have left
        self._follow: Follower | None = None
        self._alloc, self._alloc_writes, self._alloc_counting = {}, {}, set()
        self._reverting: set[str] = set()       # volumes this process is reverting
        with translated(f"connecting to Ceph with {conffile}"):
            self._cluster = rados.Rados(conffile=conffile, rados_id=ceph_id,
                                        conf=dict(conf or {}))
            self._cluster.connect(timeout=CONNECT_TIMEOUT)
        try:
            with translated(f"opening Ceph pool {pool!r}"):
                self._io = self._cluster.open_ioctx(pool)
            fsid = self._cluster.get_fsid()
            self.pool_id = hashlib.sha256(f"{fsid}/{pool}".encode()).hexdigest()[:32]
            self.capabilities = Capabilities(
                plex=False, promote=False, split=True, revert=True, reflink=False,
                changed_blocks=True, max_snapshots_per_volume=MAX_SNAPSHOTS)
            self._setlock = SetLock(self._io, self.host, pool)
            self._load()
            self._resume_reverts()     # before anything is served (rbdarray/revert.py)
            self._follow = Follower(self._io, self._refresh, poll)
            self._follow.wake()   # a change between the scan and the watch: seen now
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        follow, self._follow = getattr(self, "_follow", None), None
        if follow is not None:
            follow.close()
        lock = getattr(self, "_setlock", None)
        if lock is not None:
            lock.release()
        with self._lock:
            luns = [v.lun for v in self._vols.values()] + \
                   [s.lun for s in self._snaps.values() if s.lun is not None]
            self._vols.clear()
            self._snaps.clear()
        for lun in luns:
            with lun.gate.exclusive(), contextlib.suppress(Exception):
                lun.image.close()
        io, cluster = getattr(self, "_io", None), getattr(self, "_cluster", None)
        self._io = self._cluster = None
        if io is not None:
            with contextlib.suppress(Exception):
                io.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()

    # ------------------------------------------------------------------ helpers
    def _changed(self) -> None:
        self.generation += 1

    @staticmethod
    def _naa() -> str:
        return "6" + uuid.uuid4().hex[:31]

    def _vol(self, name: str) -> Vol:
        """A volume presented to this host (the record decides, also before the next
        refresh has moved it out of ``_vols``)."""
        v = self._vols.get(name)
        if v is None or not sees(v.rec, self.host):
            raise bse.NotFound(f"no volume {name!r} presented to host {self.host} in Ceph "
                               f"pool {self.pool}")
        return v

    def _snap(self, snap_id: str) -> Snap:
        s = self._snaps.get(str(snap_id).lower())
        if s is None or not sees(s.rec, self.host):
            raise bse.NotFound(f"no snapshot {snap_id} presented to host {self.host} in "
                               f"Ceph pool {self.pool}")
        return s

    def _committed(self, snap_id: str) -> Snap:
        s = self._snap(snap_id)
        if s.state != COMMITTED:
            raise bse.InvalidState(f"snapshot {s.id} is {s.state}; it cannot be used yet")
        return s

    def _lun(self, key: str) -> tuple[Lun, bool]:
        """The open Image of a volume or committed snapshot; (lun, is_snapshot)."""
        with self._lock:
            if key in self._vols:
                v = self._vol(key)
                if v.reverting and key not in self._reverting:
                    raise bse.Busy(f"volume {key} is being reverted to snapshot "
                                   f"{v.reverting} (or its revert was interrupted: the "
                                   "daemon it is presented to finishes it when it opens "
                                   "the pool)")
                return v.lun, False
            s = self._committed(key)
            if s.lun is None:
                with translated(f"opening snapshot {s.id}"):
                    s.lun = Lun(self._rbd.Image(self._io, s.volume,
                                                 snapshot=rbd_snap_name(s.id),
                                                 read_only=True))
            return s.lun, True

    def _forget(self, volume: str, snap_id: str) -> None:
        with translated(f"removing the record of snapshot {snap_id}"), \
                contextlib.suppress(self._rbd.ImageNotFound, KeyError), \
                self._image(volume) as image:
            image.metadata_remove(snap_key(snap_id))

    def _remove_rbd_snap(self, volume: str, snap_id: str) -> None:
        with translated(f"removing the RBD snapshot of {snap_id}"), \
                contextlib.suppress(self._rbd.ImageNotFound), self._image(volume) as image:
            image.remove_snap(rbd_snap_name(snap_id))

    def _origin_naa(self, volume: str) -> str:
        v = self._vols.get(volume) or self._hidden.get(volume)
        return v.rec.naa if v is not None else ""

    def _volume_info(self, v: Vol) -> VolumeInfo:
        snaps = sum(1 for s in self._snaps.values()
                    if s.volume == v.name and s.state != PREPARING)
        return VolumeInfo(v.id, v.name, v.rec.naa, v.lun.image.size(), v.rec.created,
                          v.rec.read_only, v.mtime, snaps, 0)

    def _snap_info(self, s: Snap) -> SnapshotInfo:
        return SnapshotInfo(s.id, s.rec.set, s.volume, self._origin_naa(s.volume),
                            s.rec.naa, s.size,
                            Kind(s.rec.kind), s.state, s.rec.created, s.rec.attributes,
                            s.rec.exposed, 0, 0, None, s.rbd_id)

    # ------------------------------------------------------------------ volumes
    def list_volumes(self) -> list[VolumeInfo]:
        with self._lock:
            return [self._volume_info(self._vols[n]) for n in sorted(self._vols)
                    if sees(self._vols[n].rec, self.host)]

    def volume(self, name: str) -> VolumeInfo:
        with self._lock:
            return self._volume_info(self._vol(name))

    def create_volume(self, name: str, size: int) -> VolumeInfo:
        check_name(name)
        check_size(size)
        rec = VolumeRecord(self._naa(), time.time(), hosts=[self.host])
        with self._mutation(), self._lock:
            if name in self._vols or name in self._hidden:
                raise bse.Exists(f"a volume named {name!r} already exists")
            return self._volume_info(self._create_image(name, size, rec))

    def _create_image(self, name: str, size: int, rec: VolumeRecord,
                      make: Callable[[], None] | None = None) -> Vol:
        """Create (or let `make` create) image `name`, put our record on it, open it."""
        with translated(f"creating volume {name}"):
            if make is None:
                self._rbd.RBD().create(self._io, name, size, order=self._order,
                                       old_format=False, features=_feature_bits(self._rbd))
            else:
                make()
            image = self._rbd.Image(self._io, name)
            try:
                image.metadata_set(VOLUME_KEY, rec.dump())
            except BaseException:
                image.close()
                with contextlib.suppress(Exception):
                    self._rbd.RBD().remove(self._io, name)
                raise
        v = self._vols[name] = Vol(int(image.id(), 16), name, rec, Lun(image), rec.created,
                                   size=int(image.size()))
        self._changed()
        return v

    def resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        check_size(new_size, "new size")
        with self._lock:
            v = self._vol(name)
        with self._mutation(), v.lun.gate.exclusive():
            if new_size < v.lun.image.size():
                raise bse.InvalidSize(f"shrinking volume {name} is not supported")
            with translated(f"resizing volume {name}"):
                v.lun.image.resize(new_size)
                v.size = new_size
        with self._lock:
            self._changed()
            return self._volume_info(v)

    def delete_volume(self, name: str) -> None:
        with self._mutation():
            with self._lock:
                v = self._vol(name)
                if any(s.volume == name for s in self._snaps.values()):
                    raise bse.Busy(f"volume {name} has snapshots; delete or split them "
                                   "first")
                others = [i for i, (sc, _) in self._hidden_snaps.items() if sc.name == name]
                if others:
                    raise bse.Busy(f"volume {name} has {len(others)} snapshot(s) presented "
                                   "to other hosts (imported there); delete them first")
                del self._vols[name]
                self._changed()
            with v.lun.gate.exclusive():
                with contextlib.suppress(Exception):
                    v.lun.image.close()
                self._remove_image(name)

    def _remove_image(self, name: str) -> None:
        """rbd remove; another host may have the image open for a moment (updating a
        snapshot record of it: ImageBusy, "image has watchers"): tried again for
        BUSY_WAIT s. (Scans open images read-only: no watch, never in the way.)"""
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                with translated(f"deleting volume {name}"):
                    self._rbd.RBD().remove(self._io, name)
                return
            except bse.Busy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # ------------------------------------------------------------------ snapshots
    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        with self._lock:
            if volume is not None:
                self._vol(volume)
            snaps = [s for s in self._snaps.values()
                     if volume in (None, s.volume) and sees(s.rec, self.host)]
            return [self._snap_info(s)
                    for s in sorted(snaps, key=lambda s: (s.rec.created, s.rbd_id))]

    def snapshot(self, snap_id: str) -> SnapshotInfo:
        with self._lock:
            return self._snap_info(self._snap(snap_id))

    def prepare_snapshot(self, volume: str, kind: str = DIFFERENTIAL,
                         snapshot_id: str | None = None, set_id: str | None = None,
                         attributes: int = 0) -> SnapshotInfo:
        """Validate and remember (in memory: nothing is on the image before the commit,
        and a prepared snapshot does not survive a restart, as in the pool)."""
        if kind != DIFFERENTIAL:
            raise bse.Unsupported(f"snapshot kind {kind!r} is not supported on Ceph RBD "
                                  "(differential only)")
        sid = check_guid(snapshot_id) if snapshot_id else str(uuid.uuid4())
        if set_id is not None:
            set_id = check_guid(set_id, "snapshot set id")
        with self._lock:
            v = self._vol(volume)
            if sid in self._snaps:
                raise bse.Exists(f"a snapshot with id {sid} already exists")
            if sum(1 for s in self._snaps.values() if s.volume == volume) + sum(
                    1 for sc, _ in self._hidden_snaps.values() if sc.name == volume
                    ) >= MAX_SNAPSHOTS:
                raise bse.NoSpace(f"volume {volume} has the maximum number of snapshots "
                                  f"({MAX_SNAPSHOTS})")
            rec = SnapRecord(set_id, self._naa(), DIFFERENTIAL, attributes, time.time(),
                             hosts=[self.host])
            s = self._snaps[sid] = Snap(sid, volume, rec, PREPARING,
                                         v.lun.image.size(), 0)
            return self._snap_info(s)

    def plex_sync_step(self, snap_id: str, max_bytes: int = 8 << 20) -> tuple[int, int]:
        raise bse.Unsupported("plexes are not supported on Ceph RBD")

    def commit_snapshots(self, snap_ids: Iterable[str]) -> None:
        """The instant (module docstring): records (done=false), then under every
        volume's closed gate the RBD snapshots, then done=true. A failure removes what
        was made; a crash is finished or undone by the next open or claim of the set
        lock (rbdarray/scan.py)."""
        with self._lock:
            snaps = [self._snap(i) for i in snap_ids]
            for s in snaps:
                if s.state != PREPARING:
                    raise bse.InvalidState(f"snapshot {s.id} is {s.state}, not preparing")
            members = {s.id: s.volume for s in snaps}
            vols = {s.volume: self._vol(s.volume) for s in snaps}
        with self._mutation(), self._setlock.holding("commit"):
            self._commit(snaps, members, vols)

    def _commit(self, snaps: list[Snap], members: dict[str, str], vols: dict[str, Vol]
                ) -> None:
        made: list[Snap] = []
        try:
            for s in snaps:
                s.rec.members, s.rec.done = members, False
                with translated(f"recording snapshot {s.id}"):
                    vols[s.volume].lun.image.metadata_set(snap_key(s.id), s.rec.dump())
            with contextlib.ExitStack() as gates:
                for name in sorted(vols):
                    gates.enter_context(vols[name].lun.gate.exclusive())
                self._create_snaps(snaps, vols, made)
            for s in snaps:
                s.rec.done = True
                with translated(f"committing snapshot {s.id}"):
                    image = vols[s.volume].lun.image
                    image.metadata_set(snap_key(s.id), s.rec.dump())
                    s.size = image.size()
                    s.rbd_id = int(image.snap_get_id(rbd_snap_name(s.id)))
        except BaseException:
            for s in snaps:
                with contextlib.suppress(Exception):
                    if s in made:
                        self._remove_rbd_snap(s.volume, s.id)
                    self._forget(s.volume, s.id)
            raise
        with self._lock:
            for s in snaps:
                s.state = COMMITTED
            self._changed()

    @staticmethod
    def _create_snaps(snaps: list[Snap], vols: dict[str, Vol], made: list[Snap]) -> None:
        """Every member's RBD snapshot at once, a thread each (the binding releases the
        GIL): each waits for the monitor to allocate a snapshot id, one paxos proposal
        (`paxos propose interval`), and the monitor puts the requests that arrive within
        one interval into one proposal -- a set of n volumes holds its writes about one
        interval instead of n. `made` gets the members that have theirs; the first
        failure is raised once every thread is done."""
        errors: list[BaseException] = []
        lock = threading.Lock()

        def one(s: Snap) -> None:
            try:
                with translated(f"committing snapshot {s.id} of {s.volume}"):
                    vols[s.volume].lun.image.create_snap(rbd_snap_name(s.id))
                with lock:
                    made.append(s)
            except BaseException as e:   # noqa: BLE001 - raised below, in the caller
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=one, args=(s,), name=f"snap-{s.volume}")
                   for s in snaps[1:]]
        for t in threads:
            t.start()
        one(snaps[0])
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def abort_snapshot(self, snap_id: str) -> None:
        with self._lock:
            s = self._snap(snap_id)
            if s.state != PREPARING:
                raise bse.InvalidState(f"snapshot {s.id} is already committed; delete it "
                                       "instead")
            del self._snaps[s.id]

    def delete_snapshot(self, snap_id: str) -> None:
        with self._lock:
            s = self._snap(snap_id)
            v = self._vols.get(s.volume)
            if v is not None and str(v.reverting or "").lower() == s.id.lower():
                # its volume's revert reads it (here or, recorded, on another host)
                raise bse.Busy(f"snapshot {s.id} is being reverted to: delete it after "
                               f"the revert of volume {s.volume}")
            if s.state == PREPARING:
                del self._snaps[s.id]
                self._changed()
                return
        with self._mutation():
            with self._lock:
                self._snaps.pop(s.id, None)
                self._changed()
            if s.lun is not None:
                with s.lun.gate.exclusive(), contextlib.suppress(Exception):
                    s.lun.image.close()
            self._remove_rbd_snap(s.volume, s.id)
            self._forget(s.volume, s.id)

    def promote(self, snap_id: str, progress: Progress = None) -> SnapshotInfo:
        raise bse.Unsupported("promote is not supported on Ceph RBD (split the snapshot "
                              "into a new volume instead)")

    def split(self, snap_id: str, new_name: str, progress: Progress = None) -> VolumeInfo:
        """A new image with the RBD snapshot's allocated data copied in (the copy), a
        new naa; then the snapshot is deleted. Cancelled (progress raised) before the
        end: the new image is removed, nothing changed."""
        check_name(new_name)
        with self._lock:
            s = self._committed(snap_id)
            if new_name in self._vols:
                raise bse.Exists(f"a volume named {new_name!r} already exists")
            origin = self._vols[s.volume]
        cancelled: list[BaseException] = []

        copied = [0]   # the copy's total: the snapshot's allocated bytes

        def step(done: int, total: int) -> int:   # bytes (copy_allocated's)
            copied[0] = total
            if progress is not None and not cancelled:
                try:
                    progress(done, total)
                except bse.Cancelled as e:
                    cancelled.append(e)
                    return -125      # -ECANCELED (the copy stops at the next step)
            return 0

        rec = VolumeRecord(self._naa(), time.time(),
                           origin={"volume": s.volume, "snapshot": s.id,
                                   "naa": s.rec.naa})
        step(0, 0)   # (nothing known yet: a cancellation point before anything is made)
        if cancelled:
            raise cancelled[0]

        rec.hosts = [self.host]
        with self._mutation(), self._lock:
            if new_name in self._vols or new_name in self._hidden:
                raise bse.Exists(f"a volume named {new_name!r} already exists")
            v = self._create_image(new_name, s.size, rec)
        try:
            with translated(f"copying snapshot {s.id} into {new_name}"), \
                    self._io_on(s.id) as (src, _):
                copy_allocated(src, v.lun.image, s.size,
                               lambda img, _o, n, _since: self._allocated_runs(
                                   img, s.rbd_id, n), step, cancelled)
            if cancelled:
                raise cancelled[0]
        except BaseException:
            with self._mutation():
                with self._lock:
                    self._vols.pop(new_name, None)
                    self._changed()
                with contextlib.suppress(Exception):
                    v.lun.image.close()
                with contextlib.suppress(Exception):
                    self._rbd.RBD().remove(self._io, new_name)
            raise
        point_of_no_return = getattr(progress, "point_of_no_return", None)
        if point_of_no_return is not None:
            point_of_no_return()
        step(copied[0], copied[0])
        self.delete_snapshot(s.id)
        log.info("snapshot %s of %s split into volume %s", s.id, origin.name, new_name)
        with self._lock:
            return self._volume_info(v)

    def set_exposed(self, snap_id: str, name: str | None) -> SnapshotInfo:
        with self._lock:
            s = self._snap(snap_id)
            if name is not None:
                check_name(name, "exposure")
                if s.state != COMMITTED:
                    raise bse.InvalidState(f"snapshot {s.id} is {s.state}; only committed "
                                           "snapshots can be exposed")
                if any(o.rec.exposed == name and o.id != s.id for o in self._snaps.values()):
                    raise bse.Exists(f"exposure name {name!r} is taken")
            taken = [i for i, (_, r) in self._hidden_snaps.items() if r.exposed == name]
            if name is not None and taken:
                raise bse.Exists(f"exposure name {name!r} is taken (by snapshot "
                                 f"{taken[0]} of another host)")
        rec = dataclasses.replace(s.rec, exposed=name)
        with self._mutation():
            with translated(f"recording the exposure of snapshot {s.id}"), \
                    self._image(s.volume) as image:
                image.metadata_set(snap_key(s.id), rec.dump())
            with self._lock:
                s.rec = rec
                self._changed()
                return self._snap_info(s)


def _feature_bits(rbd: Any) -> int:
    return int(rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK |
               rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF |
               rbd.RBD_FEATURE_DEEP_FLATTEN)
