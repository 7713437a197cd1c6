"""Power-cut emulation for tests: what the disk would hold if every write the store made
since its last sync were lost (docs/reliability.md, "Power cut").

A PowerCut attached to a pool's Faults (Faults(powercut=...)) records, per inode, an undo
log of every DataFile write, punch and truncate since that file's last sync, and per
directory its listing as of its last fsync_dir; cut() rewinds the files. Off by default:
DataFile then pays one `is not None` test per call.
"""

from __future__ import annotations

import fnmatch
import os
import random
import shutil
import threading

from .fileio import _RECORDERS, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _libc

# -- --------------------------------------------------------------------


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
