"""The snapshot life cycle: prepare (differential or plex), plex sync, the atomic commit
of a set, abort, delete and the reclaim of what only a deleted snapshot needed, exposure
names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable

from . import format as fmt
from . import reclaim
from .core import _locked
from .errors import (
    Busy,
    Exists,
    InvalidState,
    NoSpace,
    SnapshotInvalid,
    Unsupported,
)
from .fileio import DataFile, data_extents
from .model import (
    COMMITTED,
    COPY_PIECE,
    DIFFERENTIAL,
    MAX_SNAPSHOTS_PER_VOLUME,
    META_RESERVE,
    PLEX,
    PREPARING,
    Kind,
    SnapshotInfo,
    _Snapshot,
    _Volume,
)
from .names import check_guid, check_name
from .volumes import Volumes

log = logging.getLogger(__name__)


class Snapshots(Volumes):
    @_locked
    def prepare_snapshot(self, volume: str, kind: str = DIFFERENTIAL,
                         snapshot_id: str | None = None, set_id: str | None = None,
                         attributes: int = 0) -> SnapshotInfo:
        v = self._vol(volume)
        if kind not in (DIFFERENTIAL, PLEX):
            raise Unsupported(f"unknown snapshot kind {kind!r}: use differential or plex")
        kind = Kind(kind)
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
        # The overflow deletes the oldest snapshot when the filesystem fills up, and on a
        # full one only the reserve's room lets it record that: a snapshot made while the
        # reserve cannot be held would fail its origin's writes (EIO) instead.
        if not self._keep_reserve():
            raise NoSpace(f"the pool's filesystem is full: no room for the "
                          f"{META_RESERVE >> 20} MiB metadata reserve a snapshot needs "
                          "(to be deleted if its diff area fills the filesystem); free "
                          "space on it, e.g. 'snapshot delete', and retry")
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
        self._drain_origin(snap_id)   # the step's writeback (below) then has little to sync
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
        """(WITHOUT the lock.) The bulk of a commit's syncs. A held write that cannot be
        made durable is met again by the locked commit; a plex whose file fails its sync
        fails now (the failure sticks to the file: the commit's own sync raises it too)."""
        with self._lock:
            snaps = [s for s in map(self._snaps.get, snap_ids)
                     if s is not None and s.state == PREPARING]
        for s in snaps:
            with contextlib.suppress(OSError):
                self._drain(s.origin)
        with self._lock:
            plexes = [(s, s.file) for s in snaps if s.kind == PLEX and s.file is not None]
            pinned = self._pin(f for _, f in plexes)
        try:
            for s, f in plexes:
                try:
                    f.sync()
                except OSError as e:
                    with self._lock:
                        self._fail_plex(s, e)
                    raise
        finally:
            self._unpin(pinned)

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
        self._changed()

    @_locked
    def abort_snapshot(self, snap_id: str) -> None:
        s = self._snap(snap_id)
        if s.state != PREPARING:
            raise InvalidState(f"snapshot {s.snap_id} is already committed; delete it instead")
        self._delete_snapshot(s)

    def delete_snapshot(self, snap_id: str) -> None:
        with contextlib.suppress(OSError):   # the bulk of _harden's syncs, without the
            self._drain_origin(snap_id)       # lock; errors are met again below
        with self._lock:
            s = self._snap(snap_id)
            self._not_reverting_to(s)
            self._delete_snapshot(s, reclaim_now=False)
        if s.kind == DIFFERENTIAL:
            self._reclaim(s.origin)

    def _not_reverting_to(self, s: _Snapshot) -> None:
        if self._reverting.get(s.origin.id) is s:
            raise Busy(f"volume {s.origin.name} is being reverted to snapshot {s.snap_id}; "
                       "wait for the revert to finish")

    def _delete_snapshot(self, s: _Snapshot, reclaim_now: bool = True) -> None:
        """reclaim_now=False: the caller reclaims the diff area afterwards, without the lock
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if s.kind == DIFFERENTIAL:
            self._refresh_live(v)
            if v.diff and reclaim_now:
                reclaim.gc(v.diff, v.live_epochs)
        self._keep_reserve()   # space came back: hold the reserve again
        self._changed()

    def _reclaim(self, v: _Volume) -> None:
        """reclaim.gc of v with its map writes and sync WITHOUT the pool lock (call it
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
            if v.held.batch is not None and v.held.batch.sync is not None:
                busy.update(v.held.batch.sync.slots)
            doomed = reclaim.plan(da, v.live_epochs, busy)
            if not doomed:
                return
            pinned = self._pin([da.map])
        cleared = False
        try:
            reclaim.clear(da, doomed)
            cleared = True
        except OSError as e:
            log.warning("volume %s: reclaiming %d diff-area entries failed (%s); they are "
                        "reclaimed later", v.name, len(doomed), e)
        finally:   # (a SimulatedCrash punches nothing: the records may not be durable)
            with self._lock:
                self._release(pinned)
                if cleared and v.diff is da and self._volumes.get(v.name) is v:
                    reclaim.finish(da, doomed)
                else:
                    reclaim.abort(da, doomed)
                    if not cleared and v.held.batch is None:
                        # records written but not synced exist only in a batch in flight
                        # (whose sync then meets the failure and drops its entries):
                        # with none, the failed sync lost only the doomed records
                        da.map.clear_failure()

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
        self._changed()
        return self._sinfo(s)
