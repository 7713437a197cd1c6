"""The pool catalog: an sqlite3 database in WAL mode with synchronous=FULL.

It is the authority for which LUNs exist and their state; LUN headers and diff-area maps
are reconciled against it when a pool is opened. Every multi-row change (a snapshot set
commit, a split) is one transaction, so it is atomic and durable when it returns.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS naa_issued (naa TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY,          -- file id: luns/<id>.img, diff/<id>.*
    name TEXT NOT NULL UNIQUE,
    naa TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    flags INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,  -- snapshots committed so far; never decreases
    diff_limit INTEGER                 -- diff-area byte limit; NULL: free space - reserve
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,            -- file id (shares the counter with volumes)
    snap_id TEXT NOT NULL UNIQUE,      -- GUID
    set_id TEXT,
    naa TEXT NOT NULL UNIQUE,
    origin_id INTEGER NOT NULL REFERENCES volumes(id),
    kind TEXT NOT NULL,                -- differential | plex | full
    epoch INTEGER,                     -- set at commit (differential reads need it)
    state TEXT NOT NULL,               -- preparing | committed | invalid
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    attributes INTEGER NOT NULL DEFAULT 0,
    exposed_name TEXT UNIQUE,
    sealed INTEGER NOT NULL DEFAULT 0  -- luns/<id>.sum is complete
);
"""


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit connection (isolation_level=None):
    BEGIN IMMEDIATE takes the write lock at once (no upgrade deadlock between two
    writers); any exception rolls it back. Also the provider catalog's."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Catalog:
    def __init__(self, path: str) -> None:
        # The pool lock makes this process the only writer; the engine's own lock
        # serialises threads, hence check_same_thread=False.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        # before WAL is entered: the WAL index then lives in this process's heap, not in
        # an mmap'ed -shm file -- on a full copy-on-write file system (btrfs) a store to
        # an mmap'ed page that needs a new block kills the process with SIGBUS, where a
        # write(2) fails ENOSPC (SQLITE_FULL). One process owns the pool anyway (flock);
        # the price: no other process can read the database while it is open.
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                            (str(SCHEMA_VERSION),))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('next_file_id', '1')")

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db)

    def next_file_id(self, db: sqlite3.Connection) -> int:
        """Allocate a file id inside an open transaction; ids are never reused."""
        value = int(db.execute("SELECT value FROM meta WHERE key='next_file_id'").fetchone()[0])
        db.execute("UPDATE meta SET value=? WHERE key='next_file_id'", (str(value + 1),))
        return value

    def issue_naa(self, db: sqlite3.Connection, make: Callable[[], str]) -> str:
        while True:
            naa: str = make()
            if db.execute("INSERT OR IGNORE INTO naa_issued VALUES (?)", (naa,)).rowcount:
                return naa

    def meta_items(self, prefix: str) -> list[tuple[str, str]]:
        """(key, value) of the meta rows whose key starts with prefix (e.g. 'revert.')."""
        rows = self.db.execute("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? "
                               "ORDER BY key", (len(prefix), prefix)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def volumes(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM volumes ORDER BY id").fetchall()

    def snapshots(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM snapshots ORDER BY id").fetchall()

    def integrity(self) -> list[str]:
        rows = self.db.execute("PRAGMA integrity_check").fetchall()
        return [] if [r[0] for r in rows] == ["ok"] else [f"catalog: {r[0]}" for r in rows]

    def close(self) -> None:
        self.db.close()
