"""pyfuse3 Operations over a LunStore: the protocol adapter of the mount.

What the mount shows -- the tree (volumes/, exposed/, .shadow/, hosts/<host>/), inode
numbers, sizes and mtimes, LUN masking -- is view.py's (pure, no pyfuse3). This module
translates: a FUSE request becomes a view lookup (its `Stat` an EntryAttributes, its
`ViewError` an errno, see errors.py) or an array call, and it owns what only the FUSE
protocol has: open file handles, the kernel's caches (which entries and pages it must
forget when the tree is rebuilt or a LUN changes behind it), the write barrier.

The view's tree is rebuilt when the store's generation moves (LUNs appear/disappear/
rename/expose) or the presentation changes (presentation.py: the coordinator's update()
calls refresh()); entries that vanished are invalidated in the kernel right away, new
ones are visible at once (lookups never cache negative answers). Sizes are re-read from
the store on getattr (attr_timeout 1 s), so a resize is seen within a second.

Data path (S3QL pattern: thin async handlers, synchronous pool calls inline, no thread
hop): read -> pool.read, write -> pool.write (after the write barrier, see barrier.py),
fsync -> pool.flush, which runs in a worker thread because it waits for the disk (the
only handler that leaves the trio thread). A store whose I/O waits on the network
(``blocking_io``) has its reads, writes and discards run in worker threads, or its reads
started by its ``read_async`` and the request's task parked until the store's callback
reschedules it (lunstore.py). flush (close(2)) is a no-op: durability is
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
    barrier sees all of them and the kernel holds no dirty image pages. A buffered write
    is write-through: the kernel copies it into the mount's page cache, then sends it as
    one WRITE (the writer pays that copy, ~150 us per MiB here: docs/performance.md
    "Buffered seq writes").
  * FUSE_CAP_AUTO_INVAL_DATA (libfuse's default): when a getattr answers another mtime
    than the kernel has cached, it drops every cached page of the file. `write()` sets
    the volume's mtime, so the first getattr after a write drops the file's pages (what
    was written stays cached until then); keep_cache only spares them at open.
  * never FOPEN_DIRECT_IO for writable opens (it would spare the writer that copy): the
    kernel drops the range's cached pages before sending such a write, not after, so a
    buffered read through another open file meanwhile would cache the old data again.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import outcome
import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
)

from .barrier import WriteBarrier
from .errors import fuse_errors, to_fuse_error
from .lunstore import LunStore
from .notices import KernelNotices
from .presentation import Presentation
from .view import ROOT_INO, Lun, MountView, Stat, Tree

log = logging.getLogger(__name__)

assert ROOT_INO == pyfuse3.ROOT_INODE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass
class Handle:
    ino: InodeT
    lun: Lun
    writable: bool


def _entry(st: Stat, uid: int, gid: int) -> EntryAttributes:
    """The view's attributes as pyfuse3 replies them."""
    a = EntryAttributes()
    a.st_ino = st.ino
    a.st_mode = st.mode
    a.st_nlink = st.nlink
    a.st_uid, a.st_gid = uid, gid
    a.st_size = st.size
    a.st_blksize = st.blksize
    a.st_blocks = st.blocks
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = st.mtime_ns
    a.entry_timeout = st.entry_timeout
    a.attr_timeout = st.attr_timeout
    return a


class ShadowOperations(pyfuse3.Operations):
    """The FUSE file system. All handlers run on the trio thread of the FUSE session.

    Implements presentation.LiveMount for the control plane (open_handles, refresh_now,
    invalidate_lun)."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # see the module docstring: the barrier relies on it
    enable_acl = False

    def __init__(self, pool: LunStore, barrier: WriteBarrier | None = None,
                 presentation: Presentation | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.barrier = barrier if barrier is not None else WriteBarrier(pool)
        # LUN masking: the coordinator update()s it, we rebuild (see presentation.py)
        self.presentation = presentation if presentation is not None else Presentation()
        self.view = MountView(pool, self.presentation)
        self.presentation.subscribe(self.refresh)
        # The hot path's copies of view state (one attribute lookup fewer per request):
        # the generation of the view's tree (set where the tree is rebuilt, _refresh) and
        # the view's own dict of write times.
        self._generation = self.view.tree.generation
        self._write_mtime_ns = self.view.write_mtime_ns
        # a store whose data path waits on the network (host mode's RemoteArray): its
        # reads, writes and discards run in worker threads, not on the trio thread
        self._blocking = bool(getattr(pool, "blocking_io", False))
        # ...unless it can start a read without blocking and call back when it ends
        # (RbdArray.read_async: librbd's aio_read): no worker thread per read
        self._read_async: Callable[..., bool] | None = getattr(pool, "read_async", None)
        # handlers waiting for such a store right now (the session loop does not poll
        # for the next request meanwhile: session.py "Polling")
        self.store_waits = 0
        self._handles: dict[FileHandleT, Handle] = {}
        self._next_fh = 1
        self.mounted = False                    # set by init() once the kernel connects
        # every kernel notification, and the session's close after them (notices.py)
        self.notices = KernelNotices()
        # (port, TLS?) of the daemon's NBD port once open, for host daemons (array.info)
        self.nbd_endpoint: tuple[int, bool] | None = None
        self.nbd_address: str | None = None   # the NBD port's first listening address
        # called after queuing kernel notifications: the session loop stops polling a
        # moment so that the notification thread gets the GIL (see session.py)
        self.notifying: Callable[[], None] = lambda: None
        # entries whose invalidation was queued (asynchronously) by _refresh: refresh_now
        # makes sure of them before it returns
        self._queued_entries: list[tuple[InodeT, FileNameT]] = []
        # LUN keys opened through the mount since their pages were last dropped: only
        # those can have pages in the kernel's cache (changed_elsewhere)
        self._maybe_cached: set[str] = set()

    # ------------------------------------------------------------------ tree

    def tree(self) -> Tree:
        """The current tree, rebuilt if the pool's generation moved."""
        gen = self.pool.generation
        if gen != self._generation:
            return self._refresh(gen)
        return self.view.tree

    def refresh(self) -> None:
        """Rebuild now (the presentation changed, or the control API changed LUNs)."""
        self._refresh(self.pool.generation)

    def _refresh(self, gen: int) -> Tree:
        old = self.view.tree
        new = self.view.rebuild(gen)
        self._generation = gen
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
            vanished = self.view.vanished(old, new)
            for dino, name in vanished:
                self.notices.queue(dino, name)
            if vanished:
                self._queued_entries += vanished
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
                await trio.to_thread.run_sync(self.notices.entry, dino, name)
            except OSError as e:
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
                    await trio.to_thread.run_sync(self.notices.inode, lun.ino, attr_only)
                except OSError as e:
                    log.warning("invalidating %s: %s", key, e)

    async def changed_elsewhere(self, key: str) -> None:
        """A LUN's content changed through another path than this mount (the NBD port):
        drop the kernel's cached pages of it if the mount may have any, so that a read
        through the mount after that write returns sees it (keep_cache would serve the
        old pages). Free when the LUN was never opened here since its last drop; while
        a mount handle is open on it, every such write pays one invalidation (a worker
        thread: it waits for pages locked by requests in flight)."""
        if key not in self._maybe_cached:
            return
        if not any(h.lun.key == key for h in self._handles.values()):
            self._maybe_cached.discard(key)   # nobody can cache it again without open()
        await self.invalidate_lun(key)

    def _attr(self, st: Stat) -> EntryAttributes:
        return _entry(st, self.view.uid, self.view.gid)

    # ------------------------------------------------------------------ lifecycle

    def init(self) -> None:
        self.mounted = True
        log.info("FUSE connection initialised")

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        return None  # inodes are derived from catalog ids; nothing to free

    # ------------------------------------------------------------------ namespace

    @fuse_errors
    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext | None = None) -> EntryAttributes:
        return self._attr(self.view.lookup(self.tree(), parent_inode, name))

    @fuse_errors
    async def getattr(self, inode: InodeT,
                      ctx: RequestContext | None = None) -> EntryAttributes:
        return self._attr(self.view.stat(inode, self.tree(), fresh_size=True))

    @fuse_errors
    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext | None) -> EntryAttributes:
        t = self.tree()
        if t.is_dir(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        lun = t.lun(inode)
        wants = (fields.update_size, fields.update_mode, fields.update_uid, fields.update_gid,
                 fields.update_atime, fields.update_mtime, getattr(fields, "update_ctime", False))
        if lun.snapshot:
            if any(wants):
                raise pyfuse3.FUSEError(errno.EROFS)
            return self._attr(self.view.lun_stat(lun))
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
        return self._attr(self.view.stat(inode, t, fresh_size=True))

    def _refuse_namespace(self, parent_inode: InodeT) -> NoReturn:
        raise pyfuse3.FUSEError(self.view.namespace_errno(parent_inode))

    # LUNs are created, removed and renamed through the API only: every namespace change
    # is refused (EPERM; EROFS under exposed/ and .shadow/)

    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext | None) -> EntryAttributes:
        self._refuse_namespace(parent_inode)

    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext | None) -> EntryAttributes:
        self._refuse_namespace(parent_inode)

    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: RequestContext | None) -> tuple[FileInfo, EntryAttributes]:
        self._refuse_namespace(parent_inode)

    async def unlink(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext | None) -> None:
        self._refuse_namespace(parent_inode)

    async def rmdir(self, parent_inode: InodeT, name: FileNameT,
                    ctx: RequestContext | None) -> None:
        self._refuse_namespace(parent_inode)

    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext | None) -> EntryAttributes:
        self._refuse_namespace(parent_inode)

    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext | None) -> EntryAttributes:
        self._refuse_namespace(new_parent_inode)

    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: RequestContext | None) -> None:
        self._refuse_namespace(parent_inode_old)

    # ------------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext | None = None) -> FileHandleT:
        self.view.opendir(self.tree(), inode)
        return inode   # a directory's handle is its inode

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        for ino, name, st in self.view.listing(self.tree(), fh):
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(st), ino):
                break

    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        return None

    @fuse_errors
    async def statfs(self, ctx: RequestContext | None = None) -> pyfuse3.StatvfsData:
        total, free = self.pool.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.view.blksize
        s.f_frsize = 4096
        s.f_blocks = int(total) // 4096
        s.f_bfree = int(free) // 4096
        s.f_bavail = int(free) // 4096
        s.f_files = self.view.file_count(self.view.tree)
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ files

    @fuse_errors
    async def open(self, inode: InodeT, flags: FlagT,
                   ctx: RequestContext | None = None) -> FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        lun = self.view.open_lun(self.tree(), inode, writable)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(inode, lun, writable)
        self._maybe_cached.add(lun.key)
        return FileInfo(fh=fh, keep_cache=True, direct_io=False)

    def _handle(self, fh: FileHandleT) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if self.pool.generation != self._generation:
            self.tree()  # re-points h.lun after a rename
        return h

    # read and write are the hot path: no decorator layer (the same mapping as
    # @fuse_errors, inline), the handle lookup inlined, and the pool's data is returned
    # as is (pyfuse3 replies straight from the bytes object os.pread made).

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        try:
            h = self._handles.get(fh)
            if h is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            if self.pool.generation != self._generation:
                self.tree()  # re-points h.lun after a rename
            if self._blocking:
                self.store_waits += 1
                try:
                    if self._read_async is not None:
                        data = await self._read_started(h.lun.key, off, size)
                        if data is not None:
                            return data
                    return await trio.to_thread.run_sync(self.pool.read, h.lun.key, off,
                                                         size)
                finally:
                    self.store_waits -= 1
            data = self.pool.read(h.lun.key, off, size)
            return data
        except pyfuse3.FUSEError:
            raise
        except Exception as e:  # noqa: BLE001 - the errno mapping point (errors.py)
            raise to_fuse_error(e, "read") from None

    async def _read_started(self, key: str, off: int, size: int) -> bytes | None:
        """The store's read_async, this task parked until its callback (a thread of the
        store's) reschedules it through the trio token; None if the store could not
        start the read without waiting (the caller reads in a worker thread then). The
        wait is not cancellable: the store's read owns the buffer until it ends, as a
        worker thread's read would."""
        assert self._read_async is not None
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def done(data: bytes | None, error: BaseException | None) -> None:
            result = outcome.Value(data) if error is None else outcome.Error(error)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        if not self._read_async(key, off, size, done):
            return None
        data: bytes = await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)
        return data

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        try:
            h = self._handles.get(fh)
            if h is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            if self.pool.generation != self._generation:
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
                if self._blocking:
                    self.store_waits += 1
                    try:
                        n = await trio.to_thread.run_sync(self.pool.write, name, off, buf)
                    finally:
                        self.store_waits -= 1
                else:
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
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        h = self._handle(fh)
        if h.lun.snapshot:
            return
        # pool.flush waits for the disk: run it off the trio thread so reads keep flowing.
        await trio.to_thread.run_sync(self.pool.flush, h.lun.key)

    async def flush(self, fh: FileHandleT) -> None:
        # close(2): cheap on purpose; durability is fsync's job (as for a block device).
        return None

    async def release(self, fh: FileHandleT) -> None:
        self._handles.pop(fh, None)

    @fuse_errors(writing=True)
    async def fallocate(self, fh: FileHandleT, mode: FlagT, off: int, length: int) -> None:
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
            if self._blocking:
                await trio.to_thread.run_sync(self.pool.discard, name, off, length)
            else:
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
