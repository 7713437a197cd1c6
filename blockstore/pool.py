"""The array engine: a pool of volumes and their snapshots (the one Pool facade).

Plain synchronous Python, thread-safe through one re-entrant lock per pool (the FUSE
handlers call it from the trio thread; plex sync, promote, revert and scrub run in
worker threads and take the lock per step). The lock guards bookkeeping, not the disk:
syncs and long reads run outside it (cut under the lock, I/O outside, finish under it),
so that the trio thread never waits behind another thread's I/O. docs/concurrency.md
says what each lock guards and what runs where; docs/format.md describes the files;
core.py how Pool is layered. Here: creating, opening (recovery) and closing a pool, and
the integrity entry points (blockstore/integrity.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from . import changes, integrity, reclaim
from . import format as fmt
from .catalog import Catalog
from .errors import (
    Exists,
    FormatError,
    NotFound,
)
from .fileio import (
    BTRFS_MAGIC,
    DataFile,
    Faults,
    fs_type,
    lock_directory,
    reflink_probe,
)
from .longops import LongOps
from .model import (
    CLONE_MIN_RUN,
    FULL,
    INVALID,
    MAX_SNAPSHOTS_PER_VOLUME,
    PLEX,
    PREPARING,
    Capabilities,
    Kind,
    Progress,
    State,
    Tally,
    _Snapshot,
    _Volume,
)

log = logging.getLogger(__name__)


class Pool(LongOps):
    """An open pool. Create with Pool.create(), open with Pool.open(); close() at the end.

    The first implementation of the provider's Array interface (provider/array.py)."""

    capabilities = Capabilities(
        plex=True, promote=True, split=True, revert=True,
        reflink=False, changed_blocks=True,
        max_snapshots_per_volume=MAX_SNAPSHOTS_PER_VOLUME)

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
        pool._probe_preserve_mode()
        try:
            pool.catalog = Catalog(os.path.join(pool.path, "catalog.sqlite"))
            pool._closed = False
            pool._load()
            pool._keep_reserve()
        except BaseException:
            pool._release_files()
            raise
        return pool

    def _probe_preserve_mode(self) -> None:
        """Reflink preservation iff the images' file system shares blocks between luns/
        and diff/ at this chunk size (probed at every open: a pool copied to another
        file system keeps working, by copying)."""
        luns, diff = os.path.join(self.path, "luns"), os.path.join(self.path, "diff")
        if os.environ.get("SHADOWPLEX_PRESERVE") == "copy" or not reflink_probe(
                luns, diff, self.chunk_size):
            return
        self.preserve_mode = "reflink"
        self.clone_min_chunks = 1 if fs_type(diff) == BTRFS_MAGIC else \
            max(1, CLONE_MIN_RUN // self.chunk_size)
        self.capabilities = replace(Pool.capabilities, reflink=True)

    def _take_lock(self) -> None:
        self._lock_fd = lock_directory(self.path, "pool")

    def close(self) -> None:
        """Flush everything and release the pool. A volume that cannot be flushed (its
        file failed a sync: see DataFile.sync) is logged, and the pool released anyway;
        the error is raised at the end."""
        with self._lock:
            if self._closed:
                return
            self._wait_unpinned()
            failed: OSError | None = None
            for v in self._volumes.values():
                try:
                    self._writeback(v)
                    v.file.sync()
                    for s in v.mirrors:
                        if s.file:
                            s.file.sync()
                except OSError as e:
                    log.error("volume %s: not flushed at close: %s", v.name, e)
                    failed = failed or e
            self._release_files()
            if failed is not None:
                raise failed

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
            self._wait_unpinned()
            for v in self._volumes.values():   # a kill -9 loses what is not synced yet
                b = v.held.batch
                if b is not None:
                    if b not in self._queued:
                        b.synced.wait()   # the writeback thread is using the files
                    b.done = True
                    v.held.batch = None
            self._queued.clear()
            self._release_files()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            try:
                kind, state = Kind(row["kind"]), State(row["state"])
            except ValueError:
                raise FormatError(f"snapshot {row['snap_id']}: unknown kind {row['kind']!r} "
                                  f"or state {row['state']!r} in the catalog (written by a "
                                  "newer shadowplex?); nothing was changed") from None
            s = _Snapshot(row["id"], row["snap_id"], row["set_id"], row["naa"], origin,
                          kind, row["epoch"], state, row["size"],
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
                    reclaim.gc(v.diff, v.live_epochs)   # of snapshots deleted before a crash
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

    def changed_extents(self, from_id: str, to_id: str | None = None
                        ) -> list[tuple[int, int]]:
        """(offset, length) extents of the chunks touched since differential snapshot
        from_id, up to snapshot to_id or (None) the live volume: sorted, merged, clipped
        to the newer side's size; O(changed chunks + snapshots). blockstore/changes.py
        says what "touched" covers and what is refused."""
        return changes.changed_extents(self, from_id, to_id)

    def seal(self, snap_id: str, progress: Progress = None) -> None:
        """Record an xxh3 per chunk of a full copy (plex or promoted): luns/<id>.sum."""
        integrity.seal(self, snap_id, progress)

    def seal_preserved(self, limit: int | None = None) -> int:
        """Digest slots preserved by reference (see integrity.seal_preserved): the
        daemon's idle sealer and scrub call it. Returns how many were sealed."""
        return integrity.seal_preserved(self, limit)

    def check(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """Verify catalog, headers, images, maps and every checksum. [] means clean.
        ``volume``: only that volume and its snapshots (NotFound if there is none);
        ``tally`` receives what was read."""
        return integrity.check(self, progress, volume, tally)

    def scrub(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """check() plus a read of every allocated byte of every LUN (of ``volume`` and
        its snapshots); seals unsealed full copies."""
        return integrity.scrub(self, progress, volume, tally)
