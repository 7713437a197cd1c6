"""What the mount shows, without FUSE: the tree, inode numbers, attributes, host masking.

    MOUNT/                      root (0755)
    MOUNT/volumes/<name>.img    every volume, read-write (0644; 0444 if the volume is
                                read-only), size = volume size
    MOUNT/exposed/<name>.img    snapshots with an exposure name, read-only (0444)
    MOUNT/.shadow/              (0711) readdir returns NOTHING; lookup of the exact name
    MOUNT/.shadow/<id>.img      works for every committed snapshot (its device path), 0444
    MOUNT/hosts/<host>/         another host's view, same layout (volumes/, exposed/,
                                .shadow/): LUN masking, see presentation.py and
                                `MountView._mask()`; the root shows only the LUNs
                                presented to the local host

Inode numbers are stable across daemon restarts: 1 root, 2 volumes/, 3 exposed/,
4 .shadow/, 5 hosts/, volumes 1000 + VolumeInfo.id, snapshots (1 << 62) | xxh64(snapshot
id) in a 62-bit space (a collision inside one run is resolved by probing,
deterministically in snapshot-creation order), host views (1 << 61) + 4 * n in the
order hosts first appear in this run. An exposed snapshot has the same inode under
exposed/ and .shadow/ (one LUN, one page cache). mtimes are stable too: a snapshot's is
its creation time; a volume's is the pool's recorded last-write time (VolumeInfo.mtime,
else its creation time), then the time of each write through this daemon (kept in
memory, `MountView.write_mtime_ns`).

The tree is rebuilt (`MountView.rebuild`) when the store's generation moves (LUNs
appear/disappear/rename/expose) or the presentation changes; the protocol adapter
(operations.py) decides when, re-points its open handles and invalidates in the kernel
the entries `vanished()` lists. Sizes are re-read from the store on every getattr.

This module is the FUSE-free half of the mount (borg's vfs.py to its fuse.py): it imports
neither pyfuse3 nor trio, answers in `Stat` values and `ViewError(errno)`, and is
unit-tested without a kernel (tests/test_fuse_view.py).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field

import xxhash

from blockstore.errors import StoreError
from blockstore.model import COMMITTED, DIFFERENTIAL, INVALID, SnapshotInfo, VolumeInfo

from .lunstore import LunStore
from .presentation import Presentation

ROOT_INO = 1           # pyfuse3.ROOT_INODE (operations.py checks they agree)
VOLUMES_INO = 2
EXPOSED_INO = 3
SHADOW_INO = 4
HOSTS_INO = 5          # MOUNT/hosts/: one directory per other host (LUN masking)
VOLUME_INO_BASE = 1000
HOST_INO_BASE = 1 << 61  # host views: base + 4 * n + (0 root, 1 volumes, 2 exposed, 3 .shadow)
SNAP_INO_BIT = 1 << 62
SNAP_INO_MASK = SNAP_INO_BIT - 1

IMG = ".img"

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


class ViewError(Exception):
    """A request the view refuses, with the errno to answer (errors.py maps it)."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.errno = code


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
    info: VolumeInfo | SnapshotInfo | None = None


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

    def lun(self, ino: int) -> Lun:
        """The LUN of a file inode (ENOENT if it is none, e.g. deleted)."""
        lun = self.by_ino.get(ino)
        if lun is None:
            raise ViewError(errno.ENOENT)
        return lun


@dataclass(slots=True)
class Stat:
    """One entry's attributes (atime = ctime = mtime; uid/gid are the view's)."""

    ino: int
    mode: int
    nlink: int
    size: int
    blksize: int
    blocks: int
    mtime_ns: int
    entry_timeout: float
    attr_timeout: float


class MountView:
    """The tree over a LunStore as a Presentation masks it, and the attributes of its
    entries. Single-threaded: used from the FUSE session's trio thread only."""

    def __init__(self, store: LunStore, presentation: Presentation | None = None) -> None:
        self.store = store
        self.presentation = presentation if presentation is not None else Presentation()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.blksize = max(4096, int(store.chunk_size))
        self.started_ns = time.time_ns()
        self.write_mtime_ns: dict[int, int] = {}   # volume inode -> last write time
        self._snap_ino: dict[str, int] = {}     # snapshot id -> inode (this run)
        self._ino_owner: dict[int, str] = {}    # inode -> snapshot id
        self._host_ino: dict[str, int] = {}     # host -> its view's base inode (this run)
        self.tree = self._build(store.generation)

    # ------------------------------------------------------------------ building

    def rebuild(self, generation: int) -> Tree:
        """Build the tree anew (store and presentation as they are now); the new tree."""
        self.tree = self._build(generation)
        return self.tree

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
        for v in self.store.list_volumes():
            lun = Lun(
                ino=VOLUME_INO_BASE + int(v.id), key=v.name, snapshot=False, size=int(v.size),
                created_ns=int(float(v.mtime or v.created) * 1e9),
                read_only=bool(v.read_only), info=v,
            )
            t.volumes[os.fsencode(v.name) + b".img"] = lun
            t.by_ino[lun.ino] = lun
        snaps = [s for s in self.store.list_snapshots() if s.state in (COMMITTED, INVALID)]
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
            pool_mtime = int(os.stat(self.store.path).st_mtime_ns)
        except OSError:   # a store whose path is not a local directory
            pool_mtime = self.started_ns
        for ino in (VOLUMES_INO, EXPOSED_INO, SHADOW_INO):
            kids = t.children(ino) or {}
            t.dir_mtime_ns[ino] = max((lun.created_ns for lun in kids.values()), default=pool_mtime)
        t.dir_mtime_ns[ROOT_INO] = max(t.dir_mtime_ns.values())
        return t

    def _mask(self, t: Tree) -> None:
        """Split the full tree into the local view (the root) and the other hosts' views."""
        p = self.presentation
        full = {VOLUMES_INO: t.volumes, EXPOSED_INO: t.exposed, SHADOW_INO: t.shadow}
        for host in p.other_hosts():
            base = self._host_ino.get(host)
            if base is None:
                base = self._host_ino[host] = HOST_INO_BASE + 4 * len(self._host_ino)
            t.hosts[os.fsencode(host)] = base
            t.host_dirs[base] = ROOT_INO
            for i, kind in enumerate(VIEW_KINDS, 1):
                t.host_dirs[base + i] = kind
                t.views[base + i] = {n: lun for n, lun in full[kind].items()
                                     if host in p.hosts_of(lun.key)}
        if p.presented:
            local = p.local_host
            t.volumes, t.exposed, t.shadow = ({n: lun for n, lun in d.items()
                                               if local in p.hosts_of(lun.key)}
                                              for d in (t.volumes, t.exposed, t.shadow))

    @staticmethod
    def vanished(old: Tree, new: Tree) -> list[tuple[int, bytes]]:
        """(directory inode, name) of the entries of ``old`` that are gone from ``new`` or
        name another LUN there: what the kernel must forget."""
        out = []
        for dino in (VOLUMES_INO, EXPOSED_INO, SHADOW_INO, *old.views):
            before, after = old.children(dino) or {}, new.children(dino) or {}
            for name, lun in before.items():
                if name not in after or after[name].ino != lun.ino:
                    out.append((dino, name))
        return out

    # ------------------------------------------------------------------ attributes

    def dir_stat(self, ino: int, t: Tree) -> Stat:
        ns = t.dir_mtime_ns.get(ino, self.started_ns)
        return Stat(ino=ino, mode=DIR_MODES[t.kind(ino)], nlink=6 if ino == ROOT_INO else 2,
                    size=0, blksize=4096, blocks=0, mtime_ns=ns,
                    entry_timeout=DIR_TIMEOUT, attr_timeout=LUN_TIMEOUT)

    def lun_stat(self, lun: Lun, allocated: int | None = None) -> Stat:
        """``allocated``: the LUN's real allocation in bytes (st_blocks, what `du` and
        `ls -s` show); None: its size (a differential snapshot's data is the origin's
        and the diff area's, not a file of its own)."""
        size = lun.size
        used = size if allocated is None else allocated
        return Stat(ino=lun.ino, mode=stat.S_IFREG | (0o444 if lun.read_only else 0o644),
                    nlink=1, size=size, blksize=self.blksize, blocks=(used + 511) // 512,
                    mtime_ns=self.write_mtime_ns.get(lun.ino, lun.created_ns),
                    entry_timeout=LUN_TIMEOUT, attr_timeout=LUN_TIMEOUT)

    def stat(self, ino: int, t: Tree, fresh_size: bool = False) -> Stat:
        """Any inode's attributes; fresh_size re-reads a LUN's size from the store."""
        if t.is_dir(ino):
            return self.dir_stat(ino, t)
        lun = t.lun(ino)
        if not fresh_size:
            return self.lun_stat(lun)
        lun.size = int(self.store.lun_size(lun.key))
        return self.lun_stat(lun, self._allocated(lun))

    def _allocated(self, lun: Lun) -> int | None:
        """A volume's or full copy's allocated bytes (one stat of its image: writes held
        in memory for copy-before-write count once written back, within 0.1 s); None for a
        differential snapshot, or when the store cannot say (it was deleted meanwhile:
        the size is shown, the next lookup finds it gone)."""
        if isinstance(lun.info, SnapshotInfo) and lun.info.kind == DIFFERENTIAL:
            return None
        try:
            return int(self.store.allocated_bytes(lun.key))
        except (StoreError, OSError):
            return None

    # ------------------------------------------------------------------ namespace

    def lookup(self, t: Tree, parent: int, name: bytes) -> Stat:
        """The entry ``name`` in directory ``parent`` (a LUN's size read fresh)."""
        if name == b".":
            return self.stat(parent, t)
        if name == b"..":
            return self.stat(ROOT_INO, t)
        if parent == ROOT_INO:
            for ino, n in DIR_NAMES.items():
                if n == name:
                    return self.dir_stat(ino, t)
            raise ViewError(errno.ENOENT)
        if parent == HOSTS_INO:
            base = t.hosts.get(name)
            if base is None:
                raise ViewError(errno.ENOENT)
            return self.dir_stat(base, t)
        if t.host_dirs.get(parent) == ROOT_INO:   # MOUNT/hosts/<host>/
            for i, kind in enumerate(VIEW_KINDS, 1):
                if DIR_NAMES[kind] == name:
                    return self.dir_stat(parent + i, t)
            raise ViewError(errno.ENOENT)
        kids = t.children(parent)
        if kids is None:
            raise ViewError(errno.ENOTDIR if parent in t.by_ino else errno.ENOENT)
        lun = kids.get(name)
        if lun is None:
            raise ViewError(errno.ENOENT)
        return self.stat(lun.ino, t, fresh_size=True)

    def listing(self, t: Tree, ino: int) -> list[tuple[int, bytes, Stat]]:
        """A directory's entries (inode, name, attributes), ordered by inode: readdir's
        next_id is the inode, robust against LUNs appearing or disappearing between
        calls (nothing skipped or repeated)."""
        if ino == ROOT_INO:
            return [(i, n, self.dir_stat(i, t)) for i, n in sorted(DIR_NAMES.items())]
        if ino == HOSTS_INO:
            return [(b, n, self.dir_stat(b, t))
                    for n, b in sorted(t.hosts.items(), key=lambda kv: kv[1])]
        if t.host_dirs.get(ino) == ROOT_INO:
            return [(ino + i, DIR_NAMES[k], self.dir_stat(ino + i, t))
                    for i, k in enumerate(VIEW_KINDS, 1)]
        if t.kind(ino) == SHADOW_INO:
            return []  # hidden: device paths are found by exact name only
        kids = t.children(ino) or {}
        return [(lun.ino, n, self.lun_stat(lun))
                for n, lun in sorted(kids.items(), key=lambda kv: kv[1].ino)]

    def opendir(self, t: Tree, ino: int) -> None:
        """Refuse to open what is not a directory."""
        if not t.is_dir(ino):
            raise ViewError(errno.ENOTDIR if ino in t.by_ino else errno.ENOENT)

    def open_lun(self, t: Tree, ino: int, writable: bool) -> Lun:
        """The LUN a file open reaches (EISDIR, ENOENT, EROFS for a write to a
        read-only one)."""
        if t.is_dir(ino):
            raise ViewError(errno.EISDIR)
        lun = t.lun(ino)
        if writable and lun.read_only:
            raise ViewError(errno.EROFS)
        return lun

    def namespace_errno(self, parent: int) -> int:
        """What creating, removing or renaming names in ``parent`` answers: LUNs come and
        go through the API only (EPERM), the snapshot directories are read-only (EROFS)."""
        if self.tree.kind(parent) in (EXPOSED_INO, SHADOW_INO):
            return errno.EROFS
        return errno.EPERM

    def file_count(self, t: Tree) -> int:
        """statfs' f_files."""
        return len(t.by_ino) + len(DIR_MODES)
