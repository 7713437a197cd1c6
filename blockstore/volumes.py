"""Volumes (LUNs): create, resize, delete, the diff-area limit, and the listings."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from . import format as fmt
from .core import _locked
from .datapath import DataPath
from .errors import (
    Busy,
    Exists,
    InvalidSize,
)
from .fileio import DataFile, fsync_dir
from .model import (
    MAX_CHUNKS,
    PREPARING,
    SnapshotInfo,
    VolumeInfo,
    _Volume,
)
from .names import check_name, check_size

log = logging.getLogger(__name__)


class Volumes(DataPath):
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

    def image_path(self, key: str) -> str | None:
        """Path of the raw image holding a volume's (or full copy's) data, for tools."""
        with self._lock:
            lun = self._lun(key)
            if isinstance(lun, _Volume):
                return self._img(lun.id)
            return self._img(lun.id) if lun.file else None

    @_locked
    def allocated_bytes(self, key: str) -> int:
        """Bytes allocated in the image of a volume (or full copy): what a full copy of
        it needs. 0 for a differential snapshot, which has no image of its own. One
        fstat of the open image (the lock keeps it open meanwhile)."""
        f = self._lun(key).file
        return f.allocated_bytes() if f is not None else 0

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
        self._changed()
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
        self._changed()

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
                  os.path.join(self.path, "diff", f"{v.id}.map"),
                  os.path.join(self.path, "diff", f"{v.id}.sum")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self._changed()
