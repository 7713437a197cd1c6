"""pyfuse3 Operations over a blockstore.Pool: what the host sees under the mount.

    MOUNT/                      root (0755)
    MOUNT/volumes/<name>.img    every volume, read-write (0644; 0444 if the volume is
                                read-only), size = volume size
    MOUNT/exposed/<name>.img    snapshots with an exposure name, read-only (0444)
    MOUNT/.shadow/              (0711) readdir returns NOTHING; lookup of the exact name
    MOUNT/.shadow/<id>.img      works for every committed snapshot (its device path), 0444
    MOUNT/hosts/<host>/         another host's view, same layout (volumes/, exposed/,
                                .shadow/): LUN masking, see `presented` / `_mask()`; the
                                root shows only the LUNs presented to `local_host`

Inode numbers are stable across daemon restarts: 1 root, 2 volumes/, 3 exposed/,
4 .shadow/, volumes 1000 + VolumeInfo.id, snapshots (1 << 62) | xxh64(snapshot id) in a
62-bit space (a collision inside one run is resolved by probing, deterministically in
snapshot-creation order). An exposed snapshot has the same inode under exposed/ and
.shadow/ (one LUN, one page cache). mtimes are stable too: a snapshot's is its creation
time; a volume's is the pool's recorded last-write time (VolumeInfo.mtime, else its
creation time), then the time of each write through this daemon (kept in memory).

The tree is cached and rebuilt when pool.generation changes (LUNs appear/disappear/rename/
expose); entries that vanished are invalidated in the kernel right away, new ones are
visible at once (lookups never cache negative answers). Sizes are re-read from the pool on
getattr (attr_timeout 1 s), so a resize is seen within a second.

Data path (S3QL pattern: thin async handlers, synchronous pool calls inline, no thread
hop): read -> pool.read, write -> pool.write (after the write barrier, see barrier.py),
fsync -> pool.flush, which runs in a worker thread because it waits for the disk (the
only handler that leaves the trio thread). flush (close(2)) is a no-op: durability is
fsync's job, as for a block device. Writes that straddle the end of a volume are shortened
to the end; writes at or past the end fail ENOSPC (what a block device does).

Snapshots are read-only at every layer: open O_WRONLY/O_RDWR -> EROFS, write -> EROFS,
setattr (truncate, chmod, utimes) -> EROFS, fallocate -> EROFS. Volume sizes change only
through the API: truncate -> EPERM; creating/removing/renaming names -> EPERM (EROFS under
exposed/ and .shadow/).

Kernel cache options chosen:
  * keep_cache=True on every open (snapshots never change; volumes are written only
    through us with write-through caching; after a revert the caller must invalidate,
    see `invalidate_lun()`), direct_io off (the page cache serves re-reads).
  * no writeback cache: every write(2) reaches `write()` before it returns, so the write
    barrier sees all of them and the kernel holds no dirty image pages.
  * no max_read/max_write options: libfuse 3.14 already negotiates max_pages with the
    kernel (>= 4.20) for 1 MiB requests (bufsize = 256 pages) and always sets big_writes,
    so fio --bs=1M --direct=1 arrives here as 1 MiB reads and writes. Buffered reads are
    limited by the mount's readahead (128 KiB by default, /sys/class/bdi/0:N/read_ahead_kb).
  * xattrs are not implemented: the kernel then stops asking (no per-write
    security.capability round trip).

fallocate (discard): released pyfuse3 3.5.0 registers no fallocate handler with libfuse,
so the kernel would answer every fallocate(2) on the mount with EOPNOTSUPP. `make venv`
therefore installs pyfuse3 3.5.0 built with fuse_mount/patches/pyfuse3-3.5.0-fallocate.patch
(version 3.5.0+shadowplex.<hash>), which forwards it to `fallocate()` below:
  * volumes: PUNCH_HOLE|KEEP_SIZE -> pool.discard (the range reads as zeros; snapshots
    taken before keep their data: discard preserves chunks like a write). A loop device
    on a volume image therefore supports discard: blkdiscard, fstrim, mount -o discard.
  * any other mode (0 = allocate, ZERO_RANGE, COLLAPSE...) -> EOPNOTSUPP: a volume is a
    fixed-size LUN and space is thin-provisioned, there is nothing to preallocate.
  * snapshots -> EROFS here; in practice the VFS refuses first: a snapshot can only be
    opened O_RDONLY and fallocate(2) on a read-only fd fails EBADF before reaching us.
  * held like a write by the write barrier (flush & hold for a commit).
With an unpatched pyfuse3 the kernel answers EOPNOTSUPP and this handler never runs
(`fuse_mount/patches/build-pyfuse3.sh --check .venv/bin/python` tells which one is in).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio
import xxhash

from .barrier import WriteBarrier
from .errors import fuse_errors, to_fuse_error

log = logging.getLogger(__name__)

ROOT_INO = pyfuse3.ROOT_INODE  # 1
VOLUMES_INO = 2
EXPOSED_INO = 3
SHADOW_INO = 4
HOSTS_INO = 5          # MOUNT/hosts/: one directory per other host (LUN masking)
VOLUME_INO_BASE = 1000
HOST_INO_BASE = 1 << 61  # host views: base + 4 * n + (0 root, 1 volumes, 2 exposed, 3 .shadow)
SNAP_INO_BIT = 1 << 62
SNAP_INO_MASK = SNAP_INO_BIT - 1

IMG = ".img"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

DIR_NAMES = {VOLUMES_INO: b"volumes", EXPOSED_INO: b"exposed", SHADOW_INO: b".shadow",
             HOSTS_INO: b"hosts"}
VIEW_KINDS = (VOLUMES_INO, EXPOSED_INO, SHADOW_INO)  # a host view's subdirectories
DIR_MODES = {
    ROOT_INO: stat.S_IFDIR | 0o755,
    VOLUMES_INO: stat.S_IFDIR | 0o755,
    EXPOSED_INO: stat.S_IFDIR | 0o755,
    SHADOW_INO: stat.S_IFDIR | 0o711,  # traversable, not listable
    HOSTS_INO: stat.S_IFDIR | 0o755,
}
LUN_TIMEOUT = 1.0     # entry/attr cache for LUNs (sizes and names may change via the API)
DIR_TIMEOUT = 300.0   # the fixed directories never change


def snapshot_inode(snapshot_id: str) -> int:
    """The preferred (stable) inode number of a snapshot."""
    h = xxhash.xxh64_intdigest(snapshot_id.encode()) & SNAP_INO_MASK
    return SNAP_INO_BIT | (h or 1)


@dataclass
class Lun:
    ino: int
    key: str                 # pool key: volume name or snapshot id
    snapshot: bool
    size: int
    created_ns: int          # also the mtime until we see a write
    read_only: bool
    info: Any = None         # VolumeInfo / SnapshotInfo


@dataclass
class Tree:
    generation: int
    volumes: dict[bytes, Lun] = field(default_factory=dict)    # b"name.img" -> Lun
    exposed: dict[bytes, Lun] = field(default_factory=dict)    # b"name.img" -> Lun
    shadow: dict[bytes, Lun] = field(default_factory=dict)     # b"<id>.img" -> Lun
    by_ino: dict[int, Lun] = field(default_factory=dict)
    dir_mtime_ns: dict[int, int] = field(default_factory=dict)
    # other hosts' views (LUN masking): MOUNT/hosts/<host>/{volumes,exposed,.shadow}
    hosts: dict[bytes, int] = field(default_factory=dict)          # host -> its root ino
    host_dirs: dict[int, int] = field(default_factory=dict)        # view dir ino -> kind
    views: dict[int, dict[bytes, Lun]] = field(default_factory=dict)  # view dir -> LUNs

    def is_dir(self, ino: int) -> bool:
        return ino in DIR_MODES or ino in self.host_dirs

    def kind(self, ino: int) -> int:
        """ROOT/VOLUMES/EXPOSED/SHADOW_INO (or HOSTS_INO) for any directory inode."""
        return self.host_dirs.get(ino, ino)

    def children(self, ino: int) -> dict[bytes, Lun] | None:
        if ino in self.views:
            return self.views[ino]
        if ino == VOLUMES_INO:
            return self.volumes
        if ino == EXPOSED_INO:
            return self.exposed
        if ino == SHADOW_INO:
            return self.shadow
        return None


@dataclass
class Handle:
    ino: int
    lun: Lun
    writable: bool


class ShadowOperations(pyfuse3.Operations):
    """The FUSE file system. All handlers run on the trio thread of the FUSE session."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # see the module docstring: the barrier relies on it
    enable_acl = False

    def __init__(self, pool: Any, barrier: WriteBarrier | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.barrier = barrier if barrier is not None else WriteBarrier(pool)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.blksize = max(4096, int(getattr(pool, "chunk_size", 65536)))
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._snap_ino: dict[str, int] = {}     # snapshot id -> inode (this run)
        self._ino_owner: dict[int, str] = {}    # inode -> snapshot id
        self._write_mtime_ns: dict[int, int] = {}  # volume inode -> last write time
        self._started_ns = time.time_ns()
        self.mounted = False                    # set by init() once the kernel connects
        # LUN masking (the coordinator sets these, then calls refresh()): the hosts each
        # LUN (volume name / snapshot id) is presented to; a LUN not in ``presented`` is
        # presented to ``local_host`` only. The root shows local_host's view; every other
        # host in ``known_hosts`` or ``presented`` gets MOUNT/hosts/<host>/.
        self.local_host = socket.gethostname()
        self.presented: dict[str, frozenset[str]] = {}
        self.known_hosts: set[str] = set()
        self._host_ino: dict[str, int] = {}     # host -> its view's base inode (this run)
        self._tree = self._build(self.pool.generation)
        # called after queuing kernel notifications: the session loop stops polling a
        # moment so that pyfuse3's notification thread gets the GIL (see session.py)
        self.notifying: Any = lambda: None
        # entries whose invalidation was queued (asynchronously) by _refresh: refresh_now
        # makes sure of them before it returns
        self._queued_entries: list[tuple[int, bytes]] = []

    # ------------------------------------------------------------------ tree

    def _assign_snapshot_ino(self, sid: str) -> int:
        ino = self._snap_ino.get(sid)
        if ino is not None:
            return ino
        ino = snapshot_inode(sid)
        while ino in self._ino_owner:  # collision in 62 bits: probe
            ino = SNAP_INO_BIT | (((ino & SNAP_INO_MASK) + 1) & SNAP_INO_MASK or 1)
        self._snap_ino[sid] = ino
        self._ino_owner[ino] = sid
        return ino

    def _build(self, generation: int) -> Tree:
        t = Tree(generation)
        for v in self.pool.list_volumes():
            lun = Lun(
                ino=VOLUME_INO_BASE + int(v.id), key=v.name, snapshot=False, size=int(v.size),
                created_ns=int(float(getattr(v, "mtime", None) or v.created) * 1e9),
                read_only=bool(getattr(v, "read_only", False)), info=v,
            )
            t.volumes[os.fsencode(v.name) + b".img"] = lun
            t.by_ino[lun.ino] = lun
        snaps = [s for s in self.pool.list_snapshots() if s.state in ("committed", "invalid")]
        snaps.sort(key=lambda s: (s.created, s.id))
        for s in snaps:
            lun = Lun(
                ino=self._assign_snapshot_ino(s.id), key=s.id, snapshot=True, size=int(s.size),
                created_ns=int(s.created * 1e9), read_only=True, info=s,
            )
            t.shadow[os.fsencode(s.id) + b".img"] = lun
            if s.exposed_name:
                t.exposed[os.fsencode(s.exposed_name) + b".img"] = lun
            t.by_ino[lun.ino] = lun
        self._mask(t)
        try:
            pool_mtime = int(os.stat(self.pool.path).st_mtime_ns)
        except (OSError, AttributeError, TypeError):
            pool_mtime = self._started_ns
        for ino in (VOLUMES_INO, EXPOSED_INO, SHADOW_INO):
            kids = t.children(ino) or {}
            t.dir_mtime_ns[ino] = max((lun.created_ns for lun in kids.values()), default=pool_mtime)
        t.dir_mtime_ns[ROOT_INO] = max(t.dir_mtime_ns.values())
        return t

    def hosts_of(self, key: str) -> frozenset[str]:
        """The hosts a LUN is presented to."""
        return self.presented.get(key) or frozenset((self.local_host,))

    def _mask(self, t: Tree) -> None:
        """Split the full tree into the local view (the root) and the other hosts' views."""
        full = {VOLUMES_INO: t.volumes, EXPOSED_INO: t.exposed, SHADOW_INO: t.shadow}
        others = set(self.known_hosts)
        for hs in self.presented.values():
            others |= hs
        others.discard(self.local_host)
        for host in sorted(others):
            base = self._host_ino.get(host)
            if base is None:
                base = self._host_ino[host] = HOST_INO_BASE + 4 * len(self._host_ino)
            t.hosts[os.fsencode(host)] = base
            t.host_dirs[base] = ROOT_INO
            for i, kind in enumerate(VIEW_KINDS, 1):
                t.host_dirs[base + i] = kind
                t.views[base + i] = {n: lun for n, lun in full[kind].items()
                                     if host in self.hosts_of(lun.key)}
        if self.presented:
            local = self.local_host
            t.volumes, t.exposed, t.shadow = ({n: lun for n, lun in d.items()
                                               if local in self.hosts_of(lun.key)}
                                              for d in (t.volumes, t.exposed, t.shadow))

    def tree(self) -> Tree:
        """The current tree, rebuilt if the pool's generation moved."""
        gen = self.pool.generation
        t = self._tree
        if gen != t.generation:
            t = self._refresh(gen)
        return t

    def refresh(self) -> None:
        """Rebuild now (the control API may call this after changing LUNs)."""
        self._refresh(self.pool.generation)

    def _refresh(self, gen: int) -> Tree:
        old = self._tree
        new = self._build(gen)
        self._tree = new
        # Re-point open handles (a renamed volume keeps its inode and its open files).
        orphaned: dict[tuple[bool, str], int] = {}
        for h in self._handles.values():
            lun = new.by_ino.get(h.ino)
            if lun is not None:
                h.lun = lun
            elif h.ino in old.by_ino:   # gone in this rebuild, while open
                k = (h.lun.snapshot, h.lun.key)
                orphaned[k] = orphaned.get(k, 0) + 1
        for (snap, key), n in orphaned.items():
            # The control API refuses to delete a snapshot in use; this is what it cannot
            # refuse (a diff-area overflow deleting the oldest, an auto-release set ending)
            log.error("%s %s was deleted while %d file(s) had it open (a loop device, a "
                      "reader): their reads fail from now on (EIO)",
                      "snapshot" if snap else "volume", key, n)
        if self.mounted:
            queued = False
            for dino in (VOLUMES_INO, EXPOSED_INO, SHADOW_INO, *old.views):
                before, after = old.children(dino) or {}, new.children(dino) or {}
                for name, lun in before.items():
                    if name not in after or after[name].ino != lun.ino:
                        pyfuse3.invalidate_entry_async(dino, name, ignore_enoent=True)
                        self._queued_entries.append((dino, name))
                        queued = True
            if queued:
                del self._queued_entries[:-1024]   # only the latest matter to refresh_now
                self.notifying()
        log.debug("tree rebuilt at generation %s: %d volumes, %d snapshots, %d exposed",
                  gen, len(new.volumes), len(new.shadow), len(new.exposed))
        return new

    async def refresh_now(self) -> None:
        """refresh(), and by the time this returns the kernel has dropped its cached
        entries of names that vanished or now name another LUN (refresh() only queues
        that, and a lookup within the 1 s entry timeout would still find the old LUN).
        Call it from the trio loop, never from a handler, after a change of names
        (expose, unexpose, split...) and before reporting it."""
        self.tree()   # rebuilds if the pool's generation moved, queuing invalidations
        entries, self._queued_entries = self._queued_entries, []
        if not self.mounted:
            return
        for dino, name in entries:   # again, synchronously: a duplicate is harmless
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, dino, name)
            except OSError as e:
                if e.errno != errno.ENOENT:  # the kernel does not know it: fine
                    log.warning("invalidating the entry %r: %s", name, e)

    async def invalidate_lun(self, key: str, attr_only: bool = False) -> None:
        """Drop the kernel's cached pages and attributes of a LUN whose content changed
        behind the data path (revert...), or only its attributes (a resize). Returns
        once the kernel has dropped them. Call from the trio loop, never from a
        handler (it waits for pages locked by requests in flight)."""
        t = self.tree()
        for lun in t.by_ino.values():
            if lun.key == key and self.mounted:
                try:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, lun.ino,
                                                  attr_only)
                except OSError as e:
                    if e.errno != errno.ENOENT:  # the kernel never looked it up: fine
                        log.warning("invalidating %s: %s", key, e)

    # ------------------------------------------------------------------ attributes

    def _dir_attr(self, ino: int, t: Tree) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = DIR_MODES[t.kind(ino)]
        a.st_nlink = 6 if ino == ROOT_INO else 2
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = 0
        a.st_blksize = 4096
        ns = t.dir_mtime_ns.get(ino, self._started_ns)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.entry_timeout = DIR_TIMEOUT
        a.attr_timeout = LUN_TIMEOUT
        return a

    def _lun_attr(self, lun: Lun, size: int | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = lun.ino
        a.st_mode = stat.S_IFREG | (0o444 if lun.read_only else 0o644)
        a.st_nlink = 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = lun.size if size is None else size
        a.st_blksize = self.blksize
        a.st_blocks = (a.st_size + 511) // 512
        mtime = self._write_mtime_ns.get(lun.ino, lun.created_ns)
        a.st_mtime_ns = a.st_ctime_ns = mtime
        a.st_atime_ns = mtime
        a.entry_timeout = LUN_TIMEOUT
        a.attr_timeout = LUN_TIMEOUT
        return a

    def _attr(self, ino: int, t: Tree, fresh_size: bool = False) -> pyfuse3.EntryAttributes:
        if t.is_dir(ino):
            return self._dir_attr(ino, t)
        lun = t.by_ino.get(ino)
        if lun is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if fresh_size:
            lun.size = int(self.pool.lun_size(lun.key))
        return self._lun_attr(lun)

    # ------------------------------------------------------------------ lifecycle

    def init(self) -> None:
        self.mounted = True
        log.info("FUSE connection initialised")

    async def forget(self, inode_list: Any) -> None:
        return None  # inodes are derived from catalog ids; nothing to free

    # ------------------------------------------------------------------ namespace

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        t = self.tree()
        if name == b".":
            return self._attr(parent_inode, t)
        if name == b"..":
            return self._attr(ROOT_INO, t)
        if parent_inode == ROOT_INO:
            for ino, n in DIR_NAMES.items():
                if n == name:
                    return self._dir_attr(ino, t)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode == HOSTS_INO:
            base = t.hosts.get(name)
            if base is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(base, t)
        if t.host_dirs.get(parent_inode) == ROOT_INO:   # MOUNT/hosts/<host>/
            for i, kind in enumerate(VIEW_KINDS, 1):
                if DIR_NAMES[kind] == name:
                    return self._dir_attr(parent_inode + i, t)
            raise pyfuse3.FUSEError(errno.ENOENT)
        kids = t.children(parent_inode)
        if kids is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR if parent_inode in t.by_ino else errno.ENOENT)
        lun = kids.get(name)
        if lun is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(lun.ino, t, fresh_size=True)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attr(inode, self.tree(), fresh_size=True)

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        t = self.tree()
        if t.is_dir(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        lun = t.by_ino.get(inode)
        if lun is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        wants = (fields.update_size, fields.update_mode, fields.update_uid, fields.update_gid,
                 fields.update_atime, fields.update_mtime, getattr(fields, "update_ctime", False))
        if lun.snapshot:
            if any(wants):
                raise pyfuse3.FUSEError(errno.EROFS)
            return self._lun_attr(lun)
        if fields.update_size:
            current = int(self.pool.lun_size(lun.key))
            if attr.st_size != current:
                # Volume sizes change only through the API (resize_volume, grow only).
                raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mtime:
            if lun.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            self._write_mtime_ns[inode] = int(attr.st_mtime_ns)
        return self._attr(inode, t, fresh_size=True)

    def _refuse_namespace(self, parent_inode: int) -> None:
        if self._tree.kind(parent_inode) in (EXPOSED_INO, SHADOW_INO):
            raise pyfuse3.FUSEError(errno.EROFS)
        raise pyfuse3.FUSEError(errno.EPERM)  # LUNs are created/removed through the API

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> Any:
        self._refuse_namespace(parent_inode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        self._refuse_namespace(parent_inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        self._refuse_namespace(parent_inode)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._refuse_namespace(parent_inode)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._refuse_namespace(parent_inode)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self._refuse_namespace(parent_inode)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self._refuse_namespace(new_parent_inode)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._refuse_namespace(parent_inode_old)

    # ------------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        t = self.tree()
        if not t.is_dir(inode):
            raise pyfuse3.FUSEError(errno.ENOTDIR if inode in t.by_ino else errno.ENOENT)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # Entries are ordered by inode and next_id is the inode: robust against LUNs
        # appearing or disappearing between calls (nothing skipped or repeated).
        t = self.tree()
        if fh == ROOT_INO:
            entries = [(ino, n, self._dir_attr(ino, t)) for ino, n in sorted(DIR_NAMES.items())]
        elif fh == HOSTS_INO:
            entries = [(b, n, self._dir_attr(b, t)) for n, b in sorted(t.hosts.items(),
                                                                       key=lambda kv: kv[1])]
        elif t.host_dirs.get(fh) == ROOT_INO:
            entries = [(fh + i, DIR_NAMES[k], self._dir_attr(fh + i, t))
                       for i, k in enumerate(VIEW_KINDS, 1)]
        elif t.kind(fh) == SHADOW_INO:
            entries = []  # hidden: device paths are found by exact name only
        else:
            kids = t.children(fh) or {}
            entries = [
                (lun.ino, n, self._lun_attr(lun))
                for n, lun in sorted(kids.items(), key=lambda kv: kv[1].ino)
            ]
        for ino, name, attr in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, attr, ino):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @fuse_errors
    async def statfs(self, ctx: Any = None) -> Any:
        total, free = self.pool.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.blksize
        s.f_frsize = 4096
        s.f_blocks = int(total) // 4096
        s.f_bfree = int(free) // 4096
        s.f_bavail = int(free) // 4096
        t = self._tree
        s.f_files = len(t.by_ino) + len(DIR_MODES)
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ files

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        t = self.tree()
        if t.is_dir(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        lun = t.by_ino.get(inode)
        if lun is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and lun.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(inode, lun, writable)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if self.pool.generation != self._tree.generation:
            self.tree()  # re-points h.lun after a rename
        return h

    # read and write are the hot path: no decorator layer (the same mapping as
    # @fuse_errors, inline), the handle lookup inlined, and the pool's data is returned
    # as is (pyfuse3 replies straight from the bytes object os.pread made).

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            h = self._handles.get(fh)
            if h is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            if self.pool.generation != self._tree.generation:
                self.tree()  # re-points h.lun after a rename
            data: bytes = self.pool.read(h.lun.key, off, size)
            return data
        except pyfuse3.FUSEError:
            raise
        except Exception as e:  # noqa: BLE001 - the errno mapping point (errors.py)
            raise to_fuse_error(e, "read") from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            h = self._handles.get(fh)
            if h is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            if self.pool.generation != self._tree.generation:
                self.tree()  # re-points h.lun after a rename
            lun = h.lun
            if lun.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if not h.writable:
                raise pyfuse3.FUSEError(errno.EBADF)
            end = off + len(buf)
            if end > lun.size:
                lun.size = int(self.pool.lun_size(lun.key))  # grown since?
                if off >= lun.size:
                    raise pyfuse3.FUSEError(errno.ENOSPC)
                if end > lun.size:  # a block device writes up to its end: short write
                    buf = buf[: lun.size - off]
            name = lun.key
            barrier = self.barrier
            if barrier.holding(name) is not None:
                await barrier.wait_writable(name)
            barrier.begin_write(name)
            try:
                n = self.pool.write(name, off, buf)
            finally:
                barrier.end_write(name)
            self._write_mtime_ns[h.ino] = time.time_ns()
            return len(buf) if n is None else int(n)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:  # noqa: BLE001 - the errno mapping point (errors.py)
            raise to_fuse_error(e, "write", writing=True) from None

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.lun.snapshot:
            return
        # pool.flush waits for the disk: run it off the trio thread so reads keep flowing.
        await trio.to_thread.run_sync(self.pool.flush, h.lun.key)

    async def flush(self, fh: int) -> None:
        # close(2): cheap on purpose; durability is fsync's job (as for a block device).
        return None

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors(writing=True)
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on an open LUN (needs the patched pyfuse3; see the module docstring).

        Only PUNCH_HOLE|KEEP_SIZE is supported, on volumes: pool.discard after the write
        barrier, like a write (the kernel has already written back and dropped the
        range's cached pages before forwarding a punch).
        """
        h = self._handle(fh)
        if h.lun.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        name = h.lun.key
        # KEEP_SIZE: a punch past the end is legal and does nothing there (as on a file)
        size = int(self.pool.lun_size(name))
        length = min(length, size - off)
        if length <= 0:
            return
        if self.barrier.holding(name) is not None:
            await self.barrier.wait_writable(name)
        self.barrier.begin_write(name)
        try:
            self.pool.discard(name, off, length)
        finally:
            self.barrier.end_write(name)
        self._write_mtime_ns[h.ino] = time.time_ns()

    # ------------------------------------------------------------------ helpers for others

    def open_handles(self, key: str | None = None) -> int:
        """How many FUSE file handles are open (on one LUN, if key is given)."""
        if key is None:
            return len(self._handles)
        return sum(1 for h in self._handles.values() if h.lun.key == key)
