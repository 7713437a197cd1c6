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
   committed is on the volume before the filesystem freeze and the snapshot.

``thaw`` = ROLLBACK (nothing was changed) and close.

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

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import Component, FileSpec, UsageType, Writer, WriterError, WriterMetadata
from .mounts import VolumeMount, find_volume_mounts, mount_of_path

log = logging.getLogger(__name__)

#: Suffixes of the files that belong to a database.
SIDE_FILES = ("-wal", "-shm", "-journal")
WAL_ATTEMPTS = 5


@dataclass
class _Held:
    path: str
    conn: sqlite3.Connection
    journal_mode: str
    wal_empty: bool


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
                    self._held.append(self._freeze_db(path, deadline, timeout))
            except BaseException:
                for e in self._release():
                    log.error("rolling back the freeze: %s", e)
                raise

    @staticmethod
    def _busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    def _freeze_db(self, path: str, deadline: float, timeout: float) -> _Held:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WriterError(f"no time left to freeze database {path}", timed_out=True)
        uri = Path(path).as_uri() + "?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=remaining, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
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
            _fsync(path)
            if os.path.exists(path + "-wal"):
                _fsync(path + "-wal")
            _fsync(os.path.dirname(path), directory=True)
        except (sqlite3.Error, OSError) as e:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            if isinstance(e, sqlite3.Error) and _is_busy(e):
                raise WriterError(f"database {path} stayed locked by another connection "
                                  f"while {step} (within {timeout:.3g} s)",
                                  timed_out=True) from e
            raise WriterError(f"database {path}: {step} failed: {e}") from e
        log.info("froze database %s (journal_mode=%s)", path, mode)
        return _Held(path, conn, mode, wal_empty)

    def _release(self) -> list[str]:
        """ROLLBACK and close every held connection (reverse order); returns the errors.
        Caller holds _lock."""
        held, self._held = self._held, []
        errors = []
        for h in reversed(held):
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
        return errors

    def thaw(self) -> None:
        with self._lock:
            errors = self._release()
        if errors:
            raise WriterError("; ".join(errors))

    def abort(self) -> None:
        self.thaw()
