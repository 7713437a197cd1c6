"""The store's own I/O layer: every byte the engine reads or writes goes through here.

Why a layer: it is where fault injection lives (named crash points raising SimulatedCrash,
injected EIO/ENOSPC per file role), where holes are found and punched, and where a power
cut is recorded (blockstore/powercut.py: every write not yet synced is dropped; tests
only, off by default and free when off).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import PoolLocked, SimulatedCrash

if TYPE_CHECKING:
    from .powercut import PowerCut

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                  ctypes.c_uint]
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SYNC_FILE_RANGE_WRITE = 0x2
# ioctl FICLONERANGE = _IOW(0x94, 13, struct file_clone_range {s64 src_fd; u64 src_offset,
# src_length, dest_offset}): the destination range shares the source's blocks (xfs with
# reflink=1, btrfs; ext4 answers EOPNOTSUPP, another file system EXDEV)
FICLONERANGE = 0x4020940D
_CLONE_RANGE = struct.Struct("<qQQQ")
# statfs(2) f_type of the file systems whose every overwrite allocates new blocks anyway
# (so sharing a chunk's blocks costs the origin no fragmentation it would not have had)
BTRFS_MAGIC = 0x9123683E


class Faults:
    """Fault-injection plan shared by one Pool's files.

    arm_crash(point, after=n): the (n+1)-th time the engine passes `point`, raise
    SimulatedCrash. arm_error(role, op, err): I/O of that role ('origin', 'diff', 'map',
    'plex') and op ('read', 'write', 'sync', 'any') fails with OSError(err), `count`
    times (None: until disarmed). Thread-safe: points and I/O are passed from several
    threads (the writeback thread, flushes and reclaims outside the pool lock), so
    which thread meets an armed crash or error depends on timing; a crash test that
    needs one operation to meet it stops the others first.
    """

    def __init__(self, powercut: PowerCut | None = None) -> None:
        # power-cut recorder of this pool's files (tests); None: off, nothing recorded
        self.powercut = powercut
        self._lock = threading.Lock()
        self._crash: dict[str, int] = {}
        self._errors: list[list] = []  # [role, op, errno, remaining or None]
        self.passed: list[str] = []    # crash points passed, in order (for tests)

    def arm_crash(self, point: str, after: int = 0) -> None:
        self._crash[point] = after

    def arm_error(self, role: str, op: str = "write", err: int = errno.EIO,
                  count: int | None = None) -> None:
        self._errors.append([role, op, err, count])

    def disarm(self) -> None:
        self._crash.clear()
        self._errors.clear()

    def point(self, name: str) -> None:
        self.passed.append(name)
        if name in self._crash:
            with self._lock:
                left = self._crash.get(name)
                if left is None:
                    return
                if left <= 0:
                    del self._crash[name]
                    raise SimulatedCrash(name)
                self._crash[name] = left - 1

    def io(self, role: str, op: str) -> None:
        if not self._errors:   # the hot path: nothing armed
            return
        with self._lock:
            for rule in self._errors:
                r_role, r_op, err, left = rule
                if r_role == role and r_op in (op, "any") and (left is None or left > 0):
                    if left is not None:
                        rule[3] = left - 1
                    raise OSError(err, f"injected {os.strerror(err)} on {role} {op}")


class NotCached(Exception):
    """A read with RWF_NOWAIT would have waited for the disk (DataFile.pread_cached)."""


class DataFile:
    """An open file of the pool with a role (for fault injection)."""

    __slots__ = ("path", "fd", "role", "faults", "_dirty", "_log", "_pins", "_close_pending",
                 "_sync_lock", "failed", "nowait")

    def __init__(self, path: str, role: str, faults: Faults, create: bool = False,
                 read_only: bool = False) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        self.role = role
        self.faults = faults
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        self._dirty = False
        # undo log of the writes since the last sync (PowerCut; None when it is off)
        pc = faults.powercut
        self._log = None if pc is None else pc.track(self.fd, create)
        # I/O running without the pool lock (Pool._pin): close() waits for the last unpin,
        # so that such I/O never lands on a reused descriptor number
        self._pins = 0
        self._close_pending = False
        # one sync at a time, so a second caller waits for the sync in flight instead of
        # taking its cleared dirty flag for durability; and a failed sync sticks (failed):
        # Linux reports a writeback error once, and the pages it concerned may be gone,
        # so no later sync may pass for covering what was written before it
        self._sync_lock = threading.Lock()
        self.failed: OSError | None = None
        # RWF_NOWAIT works on this file (pread_cached); False once its file system said
        # EOPNOTSUPP (tmpfs, FUSE...): it is not asked again
        self.nowait = True

    @property
    def dirty(self) -> bool:
        """Written since the last sync. Set from outside only by a write this class did
        not make (Pool._copy_range: copy_file_range), which a power cut cannot undo."""
        return self._dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        if value and self._log is not None:
            self._log.unlogged = True
        self._dirty = value

    def pread(self, length: int, offset: int) -> bytes:
        self.faults.io(self.role, "read")
        return os.pread(self.fd, length, offset)

    def pread_cached(self, length: int, offset: int) -> bytes | bytearray:
        """pread of what the page cache holds: NotCached where any of it would wait for
        the disk (preadv2 RWF_NOWAIT, Linux >= 4.14 for buffered reads). A file system
        that cannot tell (EOPNOTSUPP: tmpfs, FUSE) gets NotCached every time -- a read
        there may wait as long as any (a FUSE server, a network), so it goes where
        waiting is allowed (the caller's worker threads) -- and is not asked again
        (`nowait`; review of 2026-12-06: such reads were done blocking on the trio
        thread)."""
        if not self.nowait:
            raise NotCached
        self.faults.io(self.role, "read")
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            raise NotCached from None
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self.nowait = False
            raise NotCached from None
        if n < length:   # part of it cached, or the end of the file
            if offset + n < self.size():
                raise NotCached
            del buf[n:]
        return buf

    def preadv(self, buffers: list[bytearray], offset: int) -> None:
        """Fill consecutive buffers from offset (IOV_MAX per system call, no joining copy);
        past the end of the file they keep what they held (zeros when fresh)."""
        self.faults.io(self.role, "read")
        for i in range(0, len(buffers), IOV_MAX):
            group = buffers[i:i + IOV_MAX]
            total = sum(len(b) for b in group)
            done = os.preadv(self.fd, group, offset)
            if 0 < done < total:   # rare short read before EOF: the rest piecewise
                self._fill_from(group, done, offset + done)
            offset += total

    def _fill_from(self, group: list[bytearray], skip: int, offset: int) -> None:
        """Read into the buffers of `group` from byte `skip` of their concatenation on."""
        for b in group:
            if skip >= len(b):
                skip -= len(b)
                continue
            while skip < len(b):
                more = os.pread(self.fd, len(b) - skip, offset)
                if not more:
                    return   # end of file
                b[skip:skip + len(more)] = more
                skip += len(more)
                offset += len(more)
            skip = 0

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.faults.io(self.role, "write")
        if self._log is not None:
            self._log.before(self.fd, "w", offset, data, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        self._dirty = True

    def pwritev(self, buffers: list[memoryview], offset: int) -> None:
        """Consecutive buffers, IOV_MAX per system call (no joining copy)."""
        self.faults.io(self.role, "write")
        if self._log is not None:
            log = self._log
            log.before(self.fd, "w", offset, b"".join(buffers) if log.keep_data else b"",
                       sum(len(b) for b in buffers))
        for i in range(0, len(buffers), IOV_MAX):
            group = buffers[i:i + IOV_MAX]
            total = sum(len(b) for b in group)
            done = os.pwritev(self.fd, group, offset)
            if done < total:   # rare short write: finish the rest piecewise
                self.pwrite(b"".join(bytes(b) for b in group)[done:], offset + done)
            offset += total
        self._dirty = True

    def sync(self) -> None:
        """fdatasync if written since the last sync. Raises the failure of an earlier
        sync until its owner has accounted for what it lost (clear_failure())."""
        with self._sync_lock:
            if self.failed is not None:
                raise OSError(self.failed.errno, f"{self.path}: an earlier sync failed "
                              f"({self.failed.strerror}); what was written before it may "
                              "be lost")
            if not self._dirty:
                return
            # cleared BEFORE the sync: a write landing while fdatasync runs (from another
            # thread: syncs run without the pool lock) sets it again
            self._dirty = False
            mark = self._log.mark() if self._log is not None else 0
            try:
                self.faults.io(self.role, "sync")
                os.fdatasync(self.fd)
            except BaseException as e:
                self._dirty = True
                if isinstance(e, OSError):   # (not a SimulatedCrash: nothing happened)
                    self.failed = e
                raise
            if self._log is not None:
                self._log.synced(mark)

    def clear_failure(self) -> None:
        """The owner has given up (dropped, invalidated) everything written before the
        failed sync: later syncs may count again."""
        with self._sync_lock:
            self.failed = None

    def punch(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self.faults.io(self.role, "write")
        if self._log is not None:
            self._log.before(self.fd, "p", offset, length, length)
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"punch hole in {self.path}: {os.strerror(e)}")
        self._dirty = True

    def clone_from(self, src: DataFile, src_offset: int, offset: int, length: int) -> None:
        """Make [offset, offset+length) of this file share src's blocks at src_offset
        (FICLONERANGE): a copy by reference, no data moved. Offsets and length must be
        multiples of the file system's block size. Like a write, it is durable only after
        sync() (fdatasync covers the new extent mapping: it is what reads need). Raises
        OSError: EOPNOTSUPP (no reflink here), EXDEV (another file system), EINVAL."""
        self.faults.io(self.role, "write")
        src.faults.io(src.role, "read")
        if self._log is not None:   # the power-cut recorder sees a clone as the write of
            log = self._log         # the source's bytes (rewound like any unsynced write)
            log.before(self.fd, "w", offset,
                       os.pread(src.fd, length, src_offset) if log.keep_data else b"",
                       length)
        fcntl.ioctl(self.fd, FICLONERANGE,
                    _CLONE_RANGE.pack(src.fd, src_offset, length, offset))
        self._dirty = True

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing this range's dirty pages to the disk now, without waiting for
        them (sync_file_range WRITE): the next sync() has that much less left to do,
        and the disk works while the caller goes on. No durability of any kind: only
        sync() gives that (and reports the write errors; none are reported here)."""
        start_writeback(self.fd, offset, length)

    def drop_cache(self, offset: int, length: int) -> None:
        """Let the kernel drop these (clean) pages from its cache now."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def allocate(self, offset: int, length: int) -> None:
        """Allocate blocks for [offset, offset+length) without changing the size
        (fallocate KEEP_SIZE): a later write there needs no new space. A filesystem that
        cannot (EOPNOTSUPP) is left as it is; ENOSPC is raised."""
        if length <= 0:
            return
        self.faults.io(self.role, "write")
        if _libc.fallocate(self.fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            e = ctypes.get_errno()
            if e in (errno.EOPNOTSUPP, errno.ENOSYS):
                return
            raise OSError(e, f"allocate in {self.path}: {os.strerror(e)}")

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        self.faults.io(self.role, "write")
        if self._log is not None:
            self._log.before(self.fd, "t", size, size, 0)
        os.ftruncate(self.fd, size)
        self._dirty = True

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        return data_extents(self.fd, start, self.size() if end is None else end)

    def pin(self) -> None:
        """Keep the descriptor open until unpin(), even if close() is called meanwhile.
        Pin and unpin under the lock that guards close() (the pool lock)."""
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1
        if self._pins == 0 and self._close_pending:
            self._close_pending = False
            self.close()

    def close(self) -> None:
        if self._pins:
            self._close_pending = True   # the last unpin closes it
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the allocated ranges of fd within [start, end): holes stay holes."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def keep_freed_memory(limit: int = 256 << 20) -> None:
    """Let glibc keep up to `limit` freed heap bytes instead of returning them to the
    kernel at once (mallopt M_TRIM_THRESHOLD; process-wide, once). The data path holds
    chunk buffers of 4 KiB..1 MiB for a few ms and frees them in batches of up to 32
    MiB; with the default (dynamic) threshold the heap was trimmed after each batch and
    every new buffer paid page faults again: building the held buffers of a 1 MiB
    overwrite stream took 2.5-3.5x as long (cProfile, 512 MiB on xfs: 0.25-0.33 s vs
    0.09 s). Costs at most `limit` of resident memory the process already used once."""
    global _malloc_tuned
    if not _malloc_tuned:
        _malloc_tuned = True
        if hasattr(_libc, "mallopt"):
            _libc.mallopt(M_TRIM_THRESHOLD, limit)
            # setting one threshold stops glibc adapting the other: keep buffers up to
            # a FUSE request (1 MiB) and its copies on the heap, not mmap'ed per call
            _libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)


def reflink_probe(src_dir: str, dst_dir: str, block: int = 64 * 1024) -> bool:
    """Whether a file in dst_dir can share blocks with one in src_dir (FICLONERANGE of
    one block between two scratch files, removed again): the probe behind a pool's
    preserve mode. Any failure (EOPNOTSUPP on ext4, EXDEV across file systems, EINVAL
    for a block size above `block`) means no."""
    src = os.path.join(src_dir, ".reflink-probe.tmp")
    dst = os.path.join(dst_dir, ".reflink-probe-dst.tmp")
    fds: list[int] = []
    try:
        fds.append(os.open(src, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        fds.append(os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        os.pwrite(fds[0], b"\x5a" * block, 0)
        fcntl.ioctl(fds[1], FICLONERANGE, _CLONE_RANGE.pack(fds[0], 0, block, 0))
        return os.pread(fds[1], block, 0) == b"\x5a" * block
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
        for path in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def fs_type(path: str) -> int:
    """statfs(2) f_type of the file system holding path (0 if unknown)."""
    buf = ctypes.create_string_buffer(128)   # struct statfs: f_type is its first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little")


def is_zeros(buf: bytes | bytearray | memoryview, zero: bytes) -> bool:
    """buf == zero[:len(buf)] (zero: at least as long), fast for a memoryview too: its
    == compares item by item, ~110 us for 64 KiB of zeros against ~2 us for bytes."""
    n = len(buf)
    if n != len(zero):
        zero = zero[:n]
    if type(buf) is not memoryview:
        return buf == zero
    return buf[:64] == zero[:64] and buf.tobytes() == zero   # data: out at the first


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE): see
    DataFile.start_writeback."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for pc in _RECORDERS:   # empty unless a test started a PowerCut
        pc.dir_synced(path)


def write_file_atomic(path: str, data: bytes) -> None:
    """tmp + fsync + rename + fsync(dir): the file is either old or new after a crash."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for pc in _RECORDERS:   # a new inode: its number may be a dead file's
            pc.forget(fd)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


# started power-cut recorders (blockstore/powercut.py): fsync_dir and write_file_atomic
# tell them; empty unless a test started one
_RECORDERS: list[PowerCut] = []


def lock_directory(path: str, what: str) -> int:
    """Take DIR/lock (flock, exclusive, not waiting) and write this process's pid in it:
    the one daemon of a pool -- or of a host daemon's state directory. Returns the fd
    (closing it releases the lock; so does the process's death, kill -9 included).
    Raises PoolLocked naming the holder's pid."""
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PoolLocked(f"{what} {path} is in use by process {holder}; "
                         "stop that shadowplex serve first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
