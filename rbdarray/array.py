"""RbdArray: the Array interface (provider/array.py) over a Ceph RBD pool, through
librbd in our own process (python3-rados / python3-rbd). The mapping and its limits are
in docs/ceph.md; what is stored on the images in rbdarray/records.py.

    volume (LUN)           an RBD image carrying the metadata key spx.volume
    differential snapshot  an RBD snapshot ``spx.<guid>`` + the metadata spx.snap.<guid>
    set at one instant     commit_snapshots: every image's writes held at our gate
                           (records.Gate) while its RBD snapshot is taken (see below)
    revert                 rollback_to_snap;  split: clone v2 + flatten, new naa
    changed blocks         diff_iterate (fast-diff finds the objects, then exact extents)
    plex, promote          not offered (capabilities say so)

Why not an RBD group snapshot for the instant: it is one (4 images in 85 ms here), but
pacific's librbd reaches group-namespace snapshots only by id -- reading them works
(set_snap_by_id), while diff_iterate, rollback_to_snap, clone and rename_snap look a
name up in the user namespace only (ImageNotFound, checked on 16.2.15), and removing the
group removes every image's snapshot of it. So changed blocks, revert and split need
user snapshots, and the instant is made here: a commit closes the gate of every volume
of the set (waits for the I/O in flight, holds new I/O), takes the RBD snapshots one
after the other (~0.1 s each with paxos propose interval 0.1) and opens the gates. Every
write through this array is wholly before or wholly after the instant; it is the only
writer (it holds the images' exclusive lock while writing).

Threads: every method may be called from any thread. librbd's Image and librados'
Ioctx are thread-safe for I/O (the bindings release the GIL); one Image per LUN stays
open, and a LUN's gate keeps it from being closed, resized or snapshotted under I/O.
``self._lock`` guards only the in-memory catalog (never held across librbd I/O but in
the short metadata updates of bookkeeping calls).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
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
    Tally,
    VolumeInfo,
)
from blockstore.names import check_guid, check_name, check_size

from .datapath import CONNECT_TIMEOUT, DataPath
from .errors import translated
from .records import (
    SNAP_PREFIX,
    VOLUME_KEY,
    Lun,
    Snap,
    SnapRecord,
    Vol,
    VolumeRecord,
    rbd_snap_name,
    snap_key,
)

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None

CHUNK = 65536            # default object size of the images we create = chunk_size
MAX_SNAPSHOTS = 512      # per volume, VSS's limit
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


class RbdArray(DataPath):
    """Volumes and snapshots of one RBD pool. ``path``: a local directory for the
    provider's catalog (the interface's one local need)."""

    def __init__(self, pool: str, conffile: str, path: str, ceph_id: str | None = None,
                 conf: dict[str, str] | None = None, object_size: int = CHUNK) -> None:
        """`object_size`: of the images this array creates (a power of two, 4 KiB..32
        MiB), and the chunk size it reports: changed blocks and allocation maps come
        from the object maps, so they are exact to an object (docs/ceph.md)."""
        if object_size < 4096 or object_size > 32 << 20 or object_size & (object_size - 1):
            raise bse.InvalidSize(f"invalid RBD object size {object_size}: a power of two "
                                  "from 4 KiB to 32 MiB")
        rados, rbd = self._rados, self._rbd = _rbd()
        self.chunk_size = object_size
        self._order = object_size.bit_length() - 1
        self.path = path
        self.pool = pool
        self.generation = 0
        self.last_io = 0.0
        self._lock = threading.RLock()
        self._vols: dict[str, Vol] = {}
        self._snaps: dict[str, Snap] = {}
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
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ open / close
    def _load(self) -> None:
        """Our volumes (images with spx.volume) and their committed snapshots; finishes
        or undoes a commit a crash interrupted, drops records of deleted snapshots."""
        with translated(f"listing pool {self.pool}"):
            names = sorted(self._rbd.RBD().list(self._io))
        records: dict[str, tuple[str, SnapRecord]] = {}
        present: dict[str, dict[str, Any]] = {}    # snap id -> its RBD snapshot
        for name in names:
            with translated(f"opening image {name}"):
                try:
                    image = self._rbd.Image(self._io, name)
                except self._rbd.ImageNotFound:
                    continue                    # removed meanwhile
                meta = dict(image.metadata_list())
            if VOLUME_KEY not in meta:
                image.close()                   # not ours
                continue
            v = Vol(int(image.id(), 16), name, VolumeRecord.load(meta[VOLUME_KEY]),
                     Lun(image), 0.0)
            v.mtime = _ts(image.modify_timestamp()) or v.rec.created
            self._vols[name] = v
            for key, text in meta.items():
                if key.startswith(SNAP_PREFIX):
                    records[key[len(SNAP_PREFIX):]] = (name, SnapRecord.load(text))
            for s in image.list_snaps():
                sname = _text(s["name"])
                if sname.startswith("spx."):
                    present[sname[4:]] = dict(s, volume=name)
        for sid, (name, rec) in sorted(records.items()):
            if sid not in present:
                log.warning("snapshot %s of %s: its RBD snapshot is gone (a delete was "
                            "interrupted); removing its record", sid, name)
                self._forget(name, sid)
                continue
            if not rec.done:
                if all(m in present for m in rec.members):
                    rec.done = True
                    with translated(f"finishing the commit of snapshot {sid}"):
                        self._vols[name].lun.image.metadata_set(snap_key(sid), rec.dump())
                else:
                    log.warning("snapshot %s of %s: its set's commit was interrupted "
                                "before every volume had its snapshot; removing it", sid,
                                name)
                    self._remove_rbd_snap(name, sid)
                    self._forget(name, sid)
                    continue
            rs = present[sid]
            self._snaps[sid] = Snap(sid, name, rec, COMMITTED, int(rs["size"]),
                                     int(rs["id"]))

    def close(self) -> None:
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
        try:
            return self._vols[name]
        except KeyError:
            raise bse.NotFound(f"no volume {name!r} in Ceph pool {self.pool}") from None

    def _snap(self, snap_id: str) -> Snap:
        try:
            return self._snaps[str(snap_id).lower()]
        except KeyError:
            raise bse.NotFound(f"no snapshot {snap_id} in Ceph pool {self.pool}") from None

    def _committed(self, snap_id: str) -> Snap:
        s = self._snap(snap_id)
        if s.state != COMMITTED:
            raise bse.InvalidState(f"snapshot {s.id} is {s.state}; it cannot be used yet")
        return s

    def _lun(self, key: str) -> tuple[Lun, bool]:
        """The open Image of a volume or committed snapshot; (lun, is_snapshot)."""
        with self._lock:
            if key in self._vols:
                return self._vols[key].lun, False
            s = self._committed(key)
            if s.lun is None:
                with translated(f"opening snapshot {s.id}"):
                    s.lun = Lun(self._rbd.Image(self._io, s.volume,
                                                 snapshot=rbd_snap_name(s.id),
                                                 read_only=True))
            return s.lun, True

    def _forget(self, volume: str, snap_id: str) -> None:
        with translated(f"removing the record of snapshot {snap_id}"), \
                contextlib.suppress(self._rbd.ImageNotFound, KeyError):
            self._vols[volume].lun.image.metadata_remove(snap_key(snap_id))

    def _remove_rbd_snap(self, volume: str, snap_id: str) -> None:
        with translated(f"removing the RBD snapshot of {snap_id}"), \
                contextlib.suppress(self._rbd.ImageNotFound):
            self._vols[volume].lun.image.remove_snap(rbd_snap_name(snap_id))

    def _volume_info(self, v: Vol) -> VolumeInfo:
        snaps = sum(1 for s in self._snaps.values()
                    if s.volume == v.name and s.state != PREPARING)
        return VolumeInfo(v.id, v.name, v.rec.naa, v.lun.image.size(), v.rec.created,
                          v.rec.read_only, v.mtime, snaps, 0)

    def _snap_info(self, s: Snap) -> SnapshotInfo:
        origin = self._vols[s.volume].rec.naa if s.volume in self._vols else ""
        return SnapshotInfo(s.id, s.rec.set, s.volume, origin, s.rec.naa, s.size,
                            Kind(s.rec.kind), s.state, s.rec.created, s.rec.attributes,
                            s.rec.exposed, 0, 0, None, s.rbd_id)

    # ------------------------------------------------------------------ volumes
    def list_volumes(self) -> list[VolumeInfo]:
        with self._lock:
            return [self._volume_info(self._vols[n]) for n in sorted(self._vols)]

    def volume(self, name: str) -> VolumeInfo:
        with self._lock:
            return self._volume_info(self._vol(name))

    def create_volume(self, name: str, size: int) -> VolumeInfo:
        check_name(name)
        check_size(size)
        rec = VolumeRecord(self._naa(), time.time())
        with self._lock:
            if name in self._vols:
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
        v = self._vols[name] = Vol(int(image.id(), 16), name, rec, Lun(image), rec.created)
        self._changed()
        return v

    def resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        check_size(new_size, "new size")
        with self._lock:
            v = self._vol(name)
        with v.lun.gate.exclusive():
            if new_size < v.lun.image.size():
                raise bse.InvalidSize(f"shrinking volume {name} is not supported")
            with translated(f"resizing volume {name}"):
                v.lun.image.resize(new_size)
        with self._lock:
            self._changed()
            return self._volume_info(v)

    def delete_volume(self, name: str) -> None:
        with self._lock:
            v = self._vol(name)
            if any(s.volume == name for s in self._snaps.values()):
                raise bse.Busy(f"volume {name} has snapshots; delete or split them first")
            del self._vols[name]
            self._changed()
        with v.lun.gate.exclusive():
            with contextlib.suppress(Exception):
                v.lun.image.close()
            with translated(f"deleting volume {name}"):
                self._rbd.RBD().remove(self._io, name)

    # ------------------------------------------------------------------ snapshots
    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        with self._lock:
            if volume is not None:
                self._vol(volume)
            snaps = [s for s in self._snaps.values() if volume in (None, s.volume)]
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
            if sum(1 for s in self._snaps.values() if s.volume == volume) >= MAX_SNAPSHOTS:
                raise bse.NoSpace(f"volume {volume} has the maximum number of snapshots "
                                  f"({MAX_SNAPSHOTS})")
            rec = SnapRecord(set_id, self._naa(), DIFFERENTIAL, attributes, time.time())
            s = self._snaps[sid] = Snap(sid, volume, rec, PREPARING,
                                         v.lun.image.size(), 0)
            return self._snap_info(s)

    def plex_sync_step(self, snap_id: str, max_bytes: int = 8 << 20) -> tuple[int, int]:
        raise bse.Unsupported("plexes are not supported on Ceph RBD")

    def commit_snapshots(self, snap_ids: Iterable[str]) -> None:
        """The instant (module docstring): records (done=false), then under every
        volume's closed gate the RBD snapshots, then done=true. A failure removes what
        was made; a crash is finished or undone by the next open (records.py)."""
        with self._lock:
            snaps = [self._snap(i) for i in snap_ids]
            for s in snaps:
                if s.state != PREPARING:
                    raise bse.InvalidState(f"snapshot {s.id} is {s.state}, not preparing")
            members = {s.id: s.volume for s in snaps}
            vols = {s.volume: self._vol(s.volume) for s in snaps}
        made: list[Snap] = []
        try:
            for s in snaps:
                s.rec.members, s.rec.done = members, False
                with translated(f"recording snapshot {s.id}"):
                    vols[s.volume].lun.image.metadata_set(snap_key(s.id), s.rec.dump())
            with contextlib.ExitStack() as gates:
                for name in sorted(vols):
                    gates.enter_context(vols[name].lun.gate.exclusive())
                for s in snaps:
                    with translated(f"committing snapshot {s.id} of {s.volume}"):
                        vols[s.volume].lun.image.create_snap(rbd_snap_name(s.id))
                    made.append(s)
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
            del self._snaps[s.id]
            self._changed()
        if s.state == PREPARING:
            return
        if s.lun is not None:
            with s.lun.gate.exclusive(), contextlib.suppress(Exception):
                s.lun.image.close()
        self._remove_rbd_snap(s.volume, s.id)
        self._forget(s.volume, s.id)

    def promote(self, snap_id: str, progress: Progress = None) -> SnapshotInfo:
        raise bse.Unsupported("promote is not supported on Ceph RBD (split the snapshot "
                              "into a new volume instead)")

    def split(self, snap_id: str, new_name: str, progress: Progress = None) -> VolumeInfo:
        """Clone v2 of the RBD snapshot, flattened (the copy), a new naa; then the
        snapshot is deleted. Cancelled (progress raised) before the end: the clone is
        removed, nothing changed."""
        check_name(new_name)
        with self._lock:
            s = self._committed(snap_id)
            if new_name in self._vols:
                raise bse.Exists(f"a volume named {new_name!r} already exists")
            origin = self._vols[s.volume]
        cancelled: list[BaseException] = []

        def step(done: int, total: int) -> int:   # objects of the clone (bytes: below)
            if progress is not None and not cancelled:
                try:
                    progress(done * unit, total * unit)
                except bse.Cancelled as e:
                    cancelled.append(e)
                    return -125      # -ECANCELED: librbd stops the flatten
            return 0

        rec = VolumeRecord(self._naa(), time.time(),
                           origin={"volume": s.volume, "snapshot": s.id,
                                   "naa": s.rec.naa})
        unit = 1   # bytes per step: the size before the clone, an object's after it
        step(0, s.size)
        if cancelled:
            raise cancelled[0]

        def clone() -> None:
            self._rbd.RBD().clone(self._io, s.volume, rbd_snap_name(s.id), self._io,
                                  new_name, features=_feature_bits(self._rbd),
                                  order=self._order)
        with self._lock:
            if new_name in self._vols:
                raise bse.Exists(f"a volume named {new_name!r} already exists")
            v = self._create_image(new_name, s.size, rec, clone)
        try:
            with translated(f"reading {new_name}'s object size"):
                unit = int(v.lun.image.stat()["obj_size"])
            with translated(f"copying snapshot {s.id} into {new_name}"):
                v.lun.image.flatten(on_progress=step)
            if cancelled:
                raise cancelled[0]
        except BaseException:
            with self._lock:
                del self._vols[new_name]
                self._changed()
            with contextlib.suppress(Exception):
                v.lun.image.close()
            with contextlib.suppress(Exception):
                self._rbd.RBD().remove(self._io, new_name)
            raise
        point_of_no_return = getattr(progress, "point_of_no_return", None)
        if point_of_no_return is not None:
            point_of_no_return()
        unit = 1
        step(s.size, s.size)
        self.delete_snapshot(s.id)
        log.info("snapshot %s of %s split into volume %s", s.id, origin.name, new_name)
        with self._lock:
            return self._volume_info(v)

    def revert(self, volume: str, snap_id: str, progress: Progress = None) -> None:
        """rollback_to_snap (content and size); it runs to its end once started."""
        with self._lock:
            v = self._vol(volume)
            s = self._committed(snap_id)
            if s.volume != volume:
                raise bse.InvalidState(f"snapshot {s.id} is of volume {s.volume}, "
                                       f"not {volume}")
        if progress is not None:   # (bytes: rollback_to_snap reports nothing meanwhile)
            progress(0, s.size)
        with v.lun.gate.exclusive(), translated(f"reverting {volume} to snapshot {s.id}"):
            v.lun.image.rollback_to_snap(rbd_snap_name(s.id))
        with self._lock:
            v.mtime = time.time()
            self._changed()
        if progress is not None:
            progress(s.size, s.size)

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
            old, s.rec.exposed = s.rec.exposed, name
            try:
                with translated(f"recording the exposure of snapshot {s.id}"):
                    self._vols[s.volume].lun.image.metadata_set(snap_key(s.id),
                                                                s.rec.dump())
            except BaseException:
                s.rec.exposed = old
                raise
            self._changed()
            return self._snap_info(s)

    # ------------------------------------------------------------------ integrity
    def check(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """Every volume's image (or ``volume``'s) and every committed snapshot's RBD
        snapshot exist; no ``spx.*`` RBD snapshot without its record. It reads metadata,
        no data (progress: the volumes' sizes covered; ``tally``: the LUNs)."""
        problems: list[str] = []
        t = tally if tally is not None else Tally()
        with self._lock:
            vols = list(self._vols.values()) if volume is None else [self._vol(volume)]
            snaps = {s.id: s for s in self._snaps.values() if s.state == COMMITTED}
            sizes = [v.lun.image.size() for v in vols]
        done = 0
        for i, v in enumerate(vols):
            t.luns += 1 + sum(1 for s in snaps.values() if s.volume == v.name)
            try:
                with translated(f"checking {v.name}"):
                    rbd_snaps = {_text(x["name"]) for x in v.lun.image.list_snaps()}
                    meta = dict(v.lun.image.metadata_list())
            except bse.StoreError as e:
                problems.append(str(e))
                continue
            if VOLUME_KEY not in meta:
                problems.append(f"volume {v.name}: its image lost the {VOLUME_KEY} record")
            for sid, s in snaps.items():
                if s.volume == v.name and rbd_snap_name(sid) not in rbd_snaps:
                    problems.append(f"snapshot {sid} of {v.name}: its RBD snapshot is "
                                    "missing")
            for name in rbd_snaps:
                sid = name[4:]
                if name.startswith("spx.") and (sid not in snaps or
                                                snaps[sid].volume != v.name):
                    problems.append(f"volume {v.name}: RBD snapshot {name} has no record")
            done += sizes[i]
            if progress is not None:
                progress(done, sum(sizes))
        return problems

    def scrub(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """check (Ceph scrubs the data itself: `ceph osd deep-scrub`)."""
        return self.check(progress, volume, tally)


def _feature_bits(rbd: Any) -> int:
    return int(rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK |
               rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF |
               rbd.RBD_FEATURE_DEEP_FLATTEN)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ts(value: Any) -> float:
    try:
        return float(value.timestamp())
    except (AttributeError, ValueError, OSError):
        return 0.0
