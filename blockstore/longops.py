"""The long operations, run in worker threads chunk by chunk with the lock per step:
promote (differential -> full copy), split (a snapshot becomes a volume), revert (a
volume becomes its snapshot again; rolls forward after a crash or a cancellation).
"""

from __future__ import annotations

import logging
import os
import time

import xxhash

from . import format as fmt
from .core import _locked
from .errors import (
    Busy,
    Cancelled,
    Exists,
    InvalidState,
    StoreError,
    Unsupported,
)
from .fileio import DataFile, data_extents, fsync_dir
from .model import (
    COMMITTED,
    DIFFERENTIAL,
    FULL,
    Progress,
    SnapshotInfo,
    VolumeInfo,
    _no_return,
    _Snapshot,
    _Volume,
)
from .names import check_name
from .snapshots import Snapshots

log = logging.getLogger(__name__)


class LongOps(Snapshots):
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

        progress(done, total) (bytes of whole chunks) is called after every chunk copied
        and once more when the copy is durable, before it is committed: a progress that
        raises (Cancelled) there stops the promote with nothing changed (the partial
        files are removed). Once the commit has begun it no longer calls progress: the
        promote completes (and says so first through progress.point_of_no_return(), if
        the callback has it)."""
        self._drain_origin(snap_id)   # before the chunk list, held writes out
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
                nbytes = len(chunks) * self.chunk_size
                progress(nbytes, nbytes)
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
                self._changed()
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
                progress((i + 1) * cs, len(chunks) * cs)

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
            self._changed()
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
                    progress((i + 1) * cs, len(chunks) * cs)
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
