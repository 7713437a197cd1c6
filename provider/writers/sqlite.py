"""SQLiteWriter: application-consistent snapshots of SQLite databases.

For each database that lives on a filesystem mounted from one of the set's volumes
(found with :mod:`provider.writers.mounts`), ``freeze``:

1. opens its own connection (``mode=rw``: never creates a database);
2. in WAL mode, runs ``PRAGMA wal_checkpoint(TRUNCATE)``: every committed transaction is
   copied into the main database file and the WAL is emptied, so the database file alone
   is complete (a backup of just ``app.db`` restores fine, nothing to recover);
3. ``BEGIN IMMEDIATE``: takes the write lock and keeps it until thaw. Other writers wait
   (their busy timeout) or get SQLITE_BUSY; readers go on. In WAL mode, if a writer
   slipped in between the checkpoint and the lock (the WAL is not empty), it releases the
   lock and tries again (5 attempts within the deadline); if the WAL still is not empty
   (e.g. a long reader pins it), the snapshot is still consistent, since the WAL is
   on the same volume and no transaction can be half-written while we hold the lock;
4. fsyncs the database file, its ``-wal`` if present and the directory, so everything
   committed is on the volume before the filesystem freeze and the snapshot. The database
   file is fsync'ed through an fd opened before the connection and closed after it:
   closing any fd of a file drops every POSIX lock the process holds on it, and with it
   the write lock of a rollback-journal database.

``thaw`` = ROLLBACK (nothing was changed) and close.

Where: each database is frozen by a helper process of its own (``freeze_database`` run
by ``python -m``-style child), which holds the connection and the lock until thaw. The
databases live on filesystems stacked on the daemon's own volumes: a checkpoint or an
fsync there is I/O through the daemon's FUSE mount, and a daemon thread waiting for it in
the kernel when the daemon is killed -9 would never exit (zombie daemon, hung mount; the
same as FIFREEZE, see fsfreeze.py). A helper stuck so does not keep the daemon alive, and
its lock goes with it when it dies (SQLite locks are the process's fcntl locks).

Why BEGIN IMMEDIATE, in rollback-journal modes too (DELETE, TRUNCATE, PERSIST), and not
BEGIN EXCLUSIVE: IMMEDIATE takes the RESERVED lock. Only one connection can hold RESERVED,
and a writer needs it before changing anything (then PENDING and EXCLUSIVE to write the
file), so while we hold it the database file does not change and no journal can become
hot. Taking our SHARED lock first rolls back any hot journal a crashed writer left behind,
so the file on disk is the last committed state. EXCLUSIVE would in addition wait for every
current reader to finish and shut out new readers for the whole freeze: nothing gained
for the on-disk state (readers do not write), only availability lost and a risk of timing
out behind a long read. (In WAL mode EXCLUSIVE is the same as IMMEDIATE anyway.)

Order: this writer must freeze before the filesystem freeze (its checkpoint and fsync
write), which ``freeze_order`` 50 < 90 ensures in a :class:`~provider.writers.WriterSet`.
A database opened with ``locking_mode=EXCLUSIVE`` by its application cannot be frozen:
the freeze times out (VSS_E_WRITERERROR_TIMEOUT).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import audit
from .base import Component, FileSpec, UsageType, Writer, WriterError, WriterMetadata
from .mounts import VolumeMount, find_volume_mounts, mount_of_path

log = logging.getLogger(__name__)

#: Suffixes of the files that belong to a database.
SIDE_FILES = ("-wal", "-shm", "-journal")
WAL_ATTEMPTS = 5
HELPER_MARGIN = 5.0   # s a freeze helper may take beyond the freeze's own deadline
THAW_WAIT = 10.0      # s a thaw waits for a helper to roll back and exit


@dataclass
class _Held:
    path: str
    conn: sqlite3.Connection | None   # in the process holding the freeze
    journal_mode: str
    wal_empty: bool
    helper: subprocess.Popen[str] | None = None   # the daemon's side: the helper holds it
    db_fd: int = -1   # with conn: closed only after it (see _freeze_db)


def _fsync(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _is_busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(e).lower()
    return "locked" in text or "busy" in text


class SQLiteWriter(Writer):
    """Quiesces the SQLite databases ``db_paths`` that live on the snapshotted volumes."""

    usage_type = UsageType.VSS_UT_USERDATA
    freeze_order = 50

    def __init__(self, db_paths: Iterable[str | os.PathLike[str]], *,
                 name: str = "sqlite", own_mount: str | os.PathLike[str] | None = None
                 ) -> None:
        self.db_paths = [os.path.abspath(p) for p in db_paths]
        # the daemon's (realpath'ed) FUSE mount: volume paths below it are compared as
        # text, never resolved -- a stat there is a request to the daemon itself
        # (provider/writers/mounts.py)
        self.own_mount = os.path.abspath(own_mount) if own_mount is not None else None
        super().__init__(name, ",".join(self.db_paths))
        self._lock = threading.Lock()
        self._held: list[_Held] = []

    # ------------------------------------------------------------------ discovery
    def databases_on(self, volumes: Sequence[str]) -> list[tuple[str, VolumeMount]]:
        """The existing databases on a writable filesystem of these volume images."""
        vms = find_volume_mounts(volumes, lexical_under=self.own_mount)
        out = []
        for p in self.db_paths:
            if not os.path.isfile(p):
                continue
            vm = mount_of_path(p, vms)
            if vm is not None and "ro" not in vm.mount.super_options:
                out.append((p, vm))
        return out

    def involved(self, volumes: Sequence[str]) -> bool:
        """Asked once per freeze (WriterSet.freeze_all): a configured database that does
        not exist is skipped, and the audit log says so (a typo in sqlite_databases,
        or a filesystem not mounted, would otherwise go unnoticed)."""
        for p in self.db_paths:
            if not os.path.isfile(p):
                audit.audit("writer.skip", writer=self.name, database=p, reason="missing")
        return bool(self.databases_on(volumes))

    @property
    def frozen_databases(self) -> list[str]:
        with self._lock:
            return [h.path for h in self._held]

    def identify(self) -> WriterMetadata:
        vms = find_volume_mounts(None, lexical_under=self.own_mount)
        comps = []
        for p in self.db_paths:
            d, base = os.path.split(p)
            vm = mount_of_path(p, vms)
            comps.append(Component(
                name=base, logical_path=d, component_type="database",
                files=[FileSpec(d, base)] + [FileSpec(d, base + s) for s in SIDE_FILES],
                volumes=[vm.volume] if vm is not None else []))
        return self._metadata(comps)

    # ------------------------------------------------------------------ events
    def freeze(self, volumes: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._held:
                raise WriterError("already frozen (" + ", ".join(
                    h.path for h in self._held) + "): thaw first")
            try:
                for path, _vm in self.databases_on(volumes):
                    self._held.append(self._freeze_in_helper(path, deadline, timeout))
            except BaseException:
                for e in self._release():
                    log.error("rolling back the freeze: %s", e)
                raise

    @staticmethod
    def _busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    def _freeze_in_helper(self, path: str, deadline: float, timeout: float) -> _Held:
        """_freeze_db in a helper process that holds the freeze until _release (see the
        module docstring). Waiting for its answer is an interruptible pipe read."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WriterError(f"no time left to freeze database {path}", timed_out=True)
        helper = subprocess.Popen(
            [sys.executable, "-I", "-c", _HELPER, path, repr(remaining), repr(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)   # stderr: our log
        line = _answer(helper, remaining + HELPER_MARGIN)
        try:
            msg = json.loads(line) if line else None
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or "error" in msg or "mode" not in msg:
            _end(helper)
            if isinstance(msg, dict) and "error" in msg:
                raise WriterError(str(msg["error"]), timed_out=bool(msg.get("timed_out")))
            raise WriterError(f"database {path}: the freeze helper gave no answer within "
                              f"{remaining + HELPER_MARGIN:.3g} s", timed_out=line is None)
        log.info("froze database %s (journal_mode=%s, helper pid %d)", path, msg["mode"],
                 helper.pid)
        return _Held(path, None, str(msg["mode"]), bool(msg["wal_empty"]), helper)

    def _freeze_db(self, path: str, deadline: float, timeout: float) -> _Held:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WriterError(f"no time left to freeze database {path}", timed_out=True)
        uri = Path(path).as_uri() + "?mode=rw"
        # The fd the database file is fsync'ed through is opened now and closed only
        # after the connection: closing ANY fd of a file drops every POSIX lock this
        # process holds on it -- an open+fsync+close after BEGIN IMMEDIATE silently
        # released the write lock of a rollback-journal database (other processes then
        # wrote during the freeze; found when the freeze moved to a helper process).
        try:
            db_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise WriterError(f"cannot open database {path}: {e.strerror}") from e
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=remaining, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            os.close(db_fd)
            raise WriterError(f"cannot open database {path}: {e}") from e
        step = "reading its journal mode"
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            wal = mode == "wal"
            wal_empty = True
            for attempt in range(1, WAL_ATTEMPTS + 1):
                if wal:
                    step = "checkpointing its WAL"
                    # at most half of the time left: the lock below needs time too
                    self._busy_timeout(conn, (deadline - time.monotonic()) / 2)
                    busy, frames, done = conn.execute(
                        "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    if busy:
                        log.warning("%s: WAL checkpoint incomplete (%s of %s frames): "
                                    "readers or writers kept it busy", path, done, frames)
                step = "taking the write lock (BEGIN IMMEDIATE)"
                self._busy_timeout(conn, deadline - time.monotonic())
                conn.execute("BEGIN IMMEDIATE")
                wal_empty = not wal or _size(path + "-wal") == 0
                if wal_empty or attempt == WAL_ATTEMPTS or time.monotonic() >= deadline:
                    break
                conn.execute("ROLLBACK")  # a writer slipped in: checkpoint once more
            if not wal_empty:
                log.warning("%s: frozen with a non-empty WAL (%d bytes); the snapshot is "
                            "consistent but needs the -wal file", path, _size(path + "-wal"))
            step = "syncing it to disk"
            os.fsync(db_fd)
            if os.path.exists(path + "-wal"):   # WAL locks live in -shm, not here
                _fsync(path + "-wal")
            _fsync(os.path.dirname(path), directory=True)
        except (sqlite3.Error, OSError) as e:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            os.close(db_fd)
            if isinstance(e, sqlite3.Error) and _is_busy(e):
                raise WriterError(f"database {path} stayed locked by another connection "
                                  f"while {step} (within {timeout:.3g} s)",
                                  timed_out=True) from e
            raise WriterError(f"database {path}: {step} failed: {e}") from e
        log.info("froze database %s (journal_mode=%s)", path, mode)
        return _Held(path, conn, mode, wal_empty, db_fd=db_fd)

    def _release(self) -> list[str]:
        """ROLLBACK and close every held connection (reverse order); returns the errors.
        Caller holds _lock."""
        held, self._held = self._held, []
        errors = []
        for h in reversed(held):
            errors += _release_held(h)
        return errors

    def thaw(self) -> None:
        with self._lock:
            errors = self._release()
        if errors:
            raise WriterError("; ".join(errors))

    def abort(self) -> None:
        self.thaw()


def _release_held(h: _Held) -> list[str]:
    """ROLLBACK and close one frozen database (in the process holding it), or tell its
    helper to; returns the errors."""
    if h.helper is not None:
        return _thaw_helper(h)
    assert h.conn is not None
    errors = []
    try:
        if h.conn.in_transaction:
            h.conn.execute("ROLLBACK")
        log.info("thawed database %s", h.path)
    except sqlite3.Error as e:
        errors.append(f"releasing database {h.path}: {e}")
    finally:
        try:
            h.conn.close()
        except sqlite3.Error as e:
            errors.append(f"closing database {h.path}: {e}")
        if h.db_fd >= 0:
            os.close(h.db_fd)
            h.db_fd = -1
    return errors


def _thaw_helper(h: _Held) -> list[str]:
    helper = h.helper
    assert helper is not None and helper.stdin is not None
    try:
        helper.stdin.write("thaw\n")
        helper.stdin.flush()
    except OSError:   # it is gone already: its lock went with it
        pass
    line = _answer(helper, THAW_WAIT)
    errors: list[str] = []
    try:
        errors = [str(e) for e in json.loads(line)["errors"]] if line else [
            f"releasing database {h.path}: its freeze helper did not answer (killed)"]
    except (ValueError, KeyError, TypeError):
        errors = [f"releasing database {h.path}: its freeze helper answered {line!r}"]
    _end(helper)
    if not errors:
        log.info("thawed database %s", h.path)
    return errors


def _answer(helper: subprocess.Popen[str], timeout: float) -> str | None:
    """The helper's next line within timeout (None: none came, or it exited)."""
    assert helper.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(helper.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, timeout)):
            return None
    return helper.stdout.readline() or None


def _end(helper: subprocess.Popen[str]) -> None:
    """Close the pipes and reap the helper; kill it if it does not exit at once. (Killed
    in the middle of a freeze, it leaves no lock behind: it was the process's.)"""
    for f in (helper.stdin, helper.stdout):
        try:
            if f is not None:
                f.close()
        except OSError:
            pass
    try:
        helper.wait(2)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


def helper_main(argv: Sequence[str]) -> int:
    """The freeze helper (a child of the daemon): freeze one database, answer one JSON
    line, hold the freeze until a line (or EOF: the daemon went away) comes on stdin, then
    roll back, answer the errors and exit."""
    path, remaining, timeout = argv[0], float(argv[1]), float(argv[2])
    try:
        h = SQLiteWriter([path])._freeze_db(path, time.monotonic() + remaining, timeout)
    except WriterError as e:
        print(json.dumps({"error": str(e), "timed_out": e.timed_out}), flush=True)
        return 1
    print(json.dumps({"mode": h.journal_mode, "wal_empty": h.wal_empty}), flush=True)
    sys.stdin.readline()
    errors = _release_held(h)
    with contextlib.suppress(OSError):   # the daemon is gone: nobody to tell
        print(json.dumps({"errors": errors}), flush=True)
    return 0


_HELPER = ("import sys\n"
           "from provider.writers.sqlite import helper_main\n"
           "sys.exit(helper_main(sys.argv[1:]))\n")
