"""The store's own I/O layer: every byte the engine reads or writes goes through here.

Why a layer: it is where fault injection lives (named crash points raising SimulatedCrash,
injected EIO/ENOSPC per file role), where holes are found and punched, and where a power
cut is emulated (PowerCut: every write not yet synced is dropped; tests only, off by
default and free when off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import os
import random
import shutil
import threading
from collections.abc import Iterator

from .errors import SimulatedCrash

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class Faults:
    """Fault-injection plan shared by one Pool's files.

    arm_crash(point, after=n): the (n+1)-th time the engine passes `point`, raise
    SimulatedCrash. arm_error(role, op, err): I/O of that role ('origin', 'diff', 'map',
    'plex') and op ('read', 'write', 'sync', 'any') fails with OSError(err), `count`
    times (None: until disarmed).
    """

    def __init__(self, powercut: PowerCut | None = None) -> None:
        # power-cut recorder of this pool's files (tests); None: off, nothing recorded
        self.powercut = powercut
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
            if self._crash[name] <= 0:
                del self._crash[name]
                raise SimulatedCrash(name)
            self._crash[name] -= 1

    def io(self, role: str, op: str) -> None:
        for rule in self._errors:
            r_role, r_op, err, left = rule
            if r_role == role and r_op in (op, "any") and (left is None or left > 0):
                if left is not None:
                    rule[3] = left - 1
                raise OSError(err, f"injected {os.strerror(err)} on {role} {op}")


class DataFile:
    """An open file of the pool with a role (for fault injection)."""

    __slots__ = ("path", "fd", "role", "faults", "_dirty", "_log")

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
        if self._dirty:
            self.faults.io(self.role, "sync")
            # cleared BEFORE the sync: a write landing while fdatasync runs (from another
            # thread: Pool.writeback syncs without the pool lock) sets it again
            self._dirty = False
            mark = self._log.mark() if self._log is not None else 0
            try:
                os.fdatasync(self.fd)
            except BaseException:
                self._dirty = True
                raise
            if self._log is not None:
                self._log.synced(mark)

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

    def close(self) -> None:
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


# -- power cut (tests) --------------------------------------------------------------------

_RECORDERS: list[PowerCut] = []   # started recorders: fsync_dir and write_file_atomic tell them

# one recorded change of a file: (kind, offset, arg, old bytes, old size). kind "w" (pwrite,
# pwritev; arg: the data, kept only for the subset mode), "p" (punch; arg: length), "t"
# (ftruncate; arg: the new size, offset: where the cut tail starts)
_Op = tuple[str, int, object, bytes, int]


class PowerCutError(RuntimeError):
    """What a power cut would leave cannot be rebuilt (a write bypassed DataFile)."""


class _FileLog:
    """The changes of one inode since its last sync, oldest first."""

    __slots__ = ("ops", "new", "unlogged", "keep_data", "lock")

    def __init__(self, lock: threading.Lock, new: bool, keep_data: bool) -> None:
        self.ops: list[_Op] = []
        self.new = new              # created since the last sync: the base is an empty file
        self.unlogged = False       # changed by a write DataFile did not see
        self.keep_data = keep_data  # keep the written bytes (the subset mode replays them)
        self.lock = lock

    def before(self, fd: int, kind: str, offset: int, arg: int | bytes | memoryview,
               length: int) -> None:
        """Called just before a change: save what it overwrites."""
        old_size = os.fstat(fd).st_size
        if kind == "t":
            start = min(offset, old_size)
            old = os.pread(fd, old_size - start, start) if start < old_size else b""
            offset = start
        else:
            old = os.pread(fd, length, offset) if offset < old_size else b""
        kept: object = arg
        if not isinstance(arg, int):
            kept = bytes(arg) if self.keep_data else None
        with self.lock:
            self.ops.append((kind, offset, kept, old, old_size))

    def mark(self) -> int:
        with self.lock:
            return len(self.ops)

    def synced(self, mark: int) -> None:
        """fdatasync returned: the changes before `mark` are durable (later ones, made by
        another thread while it ran, may not be)."""
        with self.lock:
            del self.ops[:mark]
            self.new = self.unlogged = False

    def reset(self, new: bool) -> None:
        with self.lock:
            self.ops.clear()
            self.new = new
            self.unlogged = False


def _undo(fd: int, op: _Op) -> None:
    _kind, offset, _arg, old, old_size = op
    if os.fstat(fd).st_size < old_size:
        os.ftruncate(fd, old_size)
    if old:
        if old.count(0) == len(old):   # it was zeros (a hole, likely): keep it a hole
            if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               offset, len(old)) != 0:
                os.pwrite(fd, old, offset)
        else:
            os.pwrite(fd, old, offset)
    os.ftruncate(fd, old_size)


def _redo(fd: int, op: _Op) -> None:
    kind, offset, arg, _old, _old_size = op
    if kind == "w":
        assert isinstance(arg, bytes)
        os.pwrite(fd, arg, offset)
    elif kind == "p":
        assert isinstance(arg, int)
        _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, arg)
    else:
        assert isinstance(arg, int)
        os.ftruncate(fd, arg)


def _touched(op: _Op) -> tuple[int, int, int]:
    """(first byte, end byte, file size after) of one change."""
    kind, offset, arg, old, old_size = op
    if kind == "w":
        assert isinstance(arg, bytes)
        return offset, offset + len(arg), max(old_size, offset + len(arg))
    assert isinstance(arg, int)
    if kind == "p":
        return offset, min(offset + arg, old_size), old_size
    return min(arg, old_size), max(arg, old_size), arg


class PowerCut:
    """Emulates a power cut on the files of one pool: a volatile disk cache that loses
    every write not yet synced (tests only; off unless attached to Faults).

    Attach it before the pool is opened (``Faults(powercut=pc)``), then ``start(root)``
    at a moment when everything on disk counts as durable (after ``Pool.close()``, like a
    clean shutdown). From then on every DataFile change (pwrite, pwritev, punch,
    truncate) is logged per inode with the bytes and size it replaces, until that file's
    ``DataFile.sync()`` (fdatasync) makes it durable; and each directory under root has a
    durable listing, the one of its last ``fsync_dir`` (``write_file_atomic`` ends with
    one). ``cut()``, after ``Pool.abandon()``, leaves what the disk would hold:

    * mode "drop": every file exactly as at its last sync (a file created since and
      never synced is empty), every directory exactly as at its last fsync_dir: names
      created or renamed in since are gone, names unlinked or replaced since are back
      (inodes are kept alive by hard links under ``root + ".powercut"``);
    * mode "subset": what reordering disks may persist: each ``block``-byte block of a
      changed file holds one of the contents it had since the last sync (chosen at
      random, blocks independently: tearing at block granularity), the file size is one
      of its sizes since then, and each changed directory name independently keeps its
      new state or gets its durable one back.

    Then everything left counts as durable again (a new start). Not covered, because
    the layer does not see it: SQLite's own writes and fsyncs (the catalog is left as it
    is: under WAL and synchronous=FULL each committed transaction is durable when
    COMMIT returns, and a crash point never falls inside one); names matching
    ``untracked`` (the catalog and the lock file by default); directories created after
    start(); renames' atomicity in the subset mode (both names are chosen
    independently); writes that bypass DataFile on a file that is not new since its last
    sync (cut() raises PowerCutError: copy_file_range into a fresh plex is fine, it is
    emptied); and metadata a sync may persist as a side effect on a real journaling file
    system (e.g. ext4 commits a new file's directory entry with its fsync): this models
    the weakest POSIX promise, only fsync of a directory makes its entries durable.
    """

    def __init__(self, mode: str = "drop", seed: int = 0, block: int = 512,
                 untracked: tuple[str, ...] = ("catalog.sqlite*", "lock")) -> None:
        if mode not in ("drop", "subset"):
            raise ValueError(f"power-cut mode {mode!r}: 'drop' or 'subset'")
        self.mode = mode
        self.rng = random.Random(seed)
        self.block = block
        self.untracked = untracked
        self.root = ""
        self.backup = ""
        self._lock = threading.Lock()
        self._logs: dict[tuple[int, int], _FileLog] = {}
        self._durable: dict[str, dict[str, tuple[int, int]]] = {}  # dir -> name -> inode
        self.cuts = 0
        self.last: dict[str, int] = {}   # what the last cut() did (counts, for tests)

    # -- recording -------------------------------------------------------------------
    def track(self, fd: int, create: bool) -> _FileLog:
        """A DataFile was opened: its inode's log (a fresh one if the file is new)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            log = self._logs.get(key)
            if log is None:
                log = self._logs[key] = _FileLog(self._lock, create, self.mode == "subset")
                return log
        if create:
            log.reset(True)     # a reused inode number
        return log

    def forget(self, fd: int) -> None:
        """A file was created outside DataFile: drop a dead inode's log of that number."""
        st = os.fstat(fd)
        with self._lock:
            self._logs.pop((st.st_dev, st.st_ino), None)

    def start(self, root: str) -> None:
        """Everything under root counts as durable now; record from here on."""
        self.root = os.path.abspath(root)
        self.backup = self.root.rstrip("/") + ".powercut"
        os.makedirs(self.backup, exist_ok=True)
        self._durable = {}
        for d, _dirs, _files in os.walk(self.root):
            self._durable[d] = self._listing(d)
        self._keep_alive()
        with self._lock:
            logs = list(self._logs.values())
        for log in logs:
            log.reset(False)
        if self not in _RECORDERS:
            _RECORDERS.append(self)

    def stop(self) -> None:
        """Stop recording and remove the hard links."""
        if self in _RECORDERS:
            _RECORDERS.remove(self)
        if self.backup:
            shutil.rmtree(self.backup, ignore_errors=True)
        with self._lock:
            self._logs.clear()
        self._durable = {}

    def dir_synced(self, path: str) -> None:
        d = os.path.abspath(path)
        if d in self._durable:
            self._durable[d] = self._listing(d)
            self._keep_alive()

    def _listing(self, d: str) -> dict[str, tuple[int, int]]:
        out = {}
        with os.scandir(d) as it:
            for e in it:
                if e.is_file(follow_symlinks=False) and not any(
                        fnmatch.fnmatchcase(e.name, pat) for pat in self.untracked):
                    st = e.stat(follow_symlinks=False)
                    out[e.name] = (st.st_dev, st.st_ino)
        return out

    def _bpath(self, key: tuple[int, int]) -> str:
        return os.path.join(self.backup, f"{key[0]}-{key[1]}")

    def _keep_alive(self) -> None:
        """Hard-link every durably named inode, so an unlink cannot free it; drop the
        links of inodes no durable name holds any more."""
        want = {key: os.path.join(d, name) for d, names in self._durable.items()
                for name, key in names.items()}
        have = set(os.listdir(self.backup))
        for key, path in want.items():
            b = self._bpath(key)
            if os.path.basename(b) not in have:
                os.link(path, b)
        keep = {os.path.basename(self._bpath(k)) for k in want}
        for name in have - keep:
            os.unlink(os.path.join(self.backup, name))

    # -- the cut ---------------------------------------------------------------------
    def cut(self) -> dict[str, int]:
        """Leave on disk what a power cut at this instant would. Call it with the pool
        abandoned (Pool.abandon(): no file open). Returns counts of what it did."""
        if self not in _RECORDERS:
            raise PowerCutError("PowerCut.cut() before start()")
        subset = self.mode == "subset"
        done = dict(files=0, ops_dropped=0, ops_kept=0, names_dropped=0,
                    names_restored=0, emptied=0)
        for d, durable in self._durable.items():
            now = self._listing(d)
            for name, key in list(now.items()):
                if durable.get(name) != key and not (subset and self.rng.random() < 0.5):
                    os.unlink(os.path.join(d, name))
                    done["names_dropped"] += 1
                    del now[name]
            for name, key in durable.items():
                if name not in now and not (subset and self.rng.random() < 0.5):
                    os.link(self._bpath(key), os.path.join(d, name))
                    done["names_restored"] += 1
        with self._lock:
            logs = dict(self._logs)
        reachable = {key: os.path.join(d, name) for d in self._durable
                     for name, key in self._listing(d).items()}
        for key, log in logs.items():
            path = reachable.get(key)
            if path is None or not (log.ops or log.new or log.unlogged):
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                done["files"] += 1
                if log.unlogged and not log.new:
                    raise PowerCutError(f"{path} was written around DataFile since its "
                                        "last sync; a power cut cannot be emulated")
                if log.new and (log.unlogged or not subset):
                    os.ftruncate(fd, 0)
                    done["emptied"] += 1
                    done["ops_dropped"] += len(log.ops)
                elif subset:
                    kept = self._subset(fd, log.ops)
                    done["ops_kept"] += kept
                    done["ops_dropped"] += len(log.ops) - kept
                else:
                    for op in reversed(log.ops):
                        _undo(fd, op)
                    done["ops_dropped"] += len(log.ops)
            finally:
                os.close(fd)
        self.cuts += 1
        self.last = done
        with self._lock:
            self._logs.clear()   # the files are closed; a reopen tracks them anew
        self.start(self.root)    # after the reboot, what is on disk is durable
        return done

    def _subset(self, fd: int, ops: list[_Op]) -> int:
        """Each touched block gets one of its versions since the last sync, the size one
        of the sizes. Returns how many changes survive at least in part."""
        if not ops:
            return 0
        bs = self.block
        versions: dict[int, list[int]] = {}
        sizes = [ops[0][4]]
        for i, op in enumerate(ops, 1):
            lo, hi, size = _touched(op)
            sizes.append(size)
            for b in range(lo // bs, (hi + bs - 1) // bs):
                versions.setdefault(b, [0]).append(i)
        choice = {b: self.rng.choice(v) for b, v in versions.items()}
        size_at = self.rng.randrange(len(sizes))
        for op in reversed(ops):
            _undo(fd, op)
        content: dict[int, bytes] = {}
        for i in range(len(ops) + 1):
            if i:
                _redo(fd, ops[i - 1])
            for b, c in choice.items():
                if c == i:
                    data = os.pread(fd, bs, b * bs)
                    content[b] = data + bytes(bs - len(data))
        for b, data in content.items():
            os.pwrite(fd, data, b * bs)
        os.ftruncate(fd, sizes[size_at])
        return len({c for c in choice.values() if c} | ({size_at} if size_at else set()))
