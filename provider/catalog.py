"""The coordinator's own state on disk: POOL/provider.sqlite (sqlite3, WAL).

The block store knows LUNs (volumes, snapshots, their set id and attributes); what only
the coordinator knows lives here, so that `list` and `show` answer the same after a
restart:

    sets    one row per snapshot set that reached DoSnapshotSet: context, requested
            attributes, VSS state, requester host/client, number of volumes, lifetime
    mounts  snapshots exposed with --mount: mountpoint, loop device, filesystem type
    presentation  LUN masking: the hosts each LUN is presented to (no row: the daemon's
            own host, i.e. the root of the mount)
    imports transportable sets imported on another host (which host, from which origin)
    exports transportable sets exported, with what end_backup needs once the importing
            host deleted the set (its record, volumes, snapshot ids); kept until the
            origin host's end_backup, at most MAX_EXPORTS (the oldest go first)
    labels  a snapshot's name and description (snapshot create --name/--description;
            provider/snapshot_refs.py); a row whose snapshot is gone is dead weight only
            (ids are never reused) and is pruned when labels are next written

A set row is written when DoSnapshotSet starts (state PROCESSING_PREPARE) and updated at
CREATED, so a daemon killed mid-creation finds the unfinished set at the next start and
removes it (no trace). Auto-release sets found at start are deleted too: the session that
owned them is gone.

Synchronous, small writes; called from the trio thread (WAL + synchronous=NORMAL keeps a
commit well under a millisecond on this kind of disk).

The write-through cache. ProviderCatalog also holds the tables in memory, one dict each
(``records``, ``mounted``, ``presented``, ``imported``, ``exported``), loaded by load()
at the coordinator's start. Every write method changes the row first and its dict after
the row's transaction committed: memory never holds what the catalog lacks, and nobody
else keeps a copy that must be kept in step by hand. The coordinator and the modules it
delegates to (masking, exposure, transport, views, reconciliation) read the dicts and
write only through these methods; all of them on the trio thread (no lock: the dicts are
never changed from a worker thread). The methods named after a table (sets(), mounts(),
presentations(), imports(), exports()) read the rows from disk, as another process would.

One exception: a set's row is written when its creation starts (begin_set), but
``records`` holds only sets that were CREATED (put_set): a set in creation is the
coordinator's (its ``_sets``) until then. Rows of sets that never reached CREATED are
found by load() after a crash, and the reconciliation at start removes them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

from blockstore.catalog import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS sets (
    set_id TEXT PRIMARY KEY,
    context INTEGER NOT NULL,          -- VSS_CTX_* value
    attributes INTEGER NOT NULL,       -- requested attribute mask (context | options)
    state INTEGER NOT NULL,            -- VSS_SS_* value
    created REAL NOT NULL,
    originating_machine TEXT NOT NULL,
    client TEXT NOT NULL,
    snapshots_count INTEGER NOT NULL,
    auto_release INTEGER NOT NULL,
    backup_complete INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS mounts (
    snapshot_id TEXT PRIMARY KEY,
    mountpoint TEXT NOT NULL UNIQUE,
    dev TEXT NOT NULL,
    fstype TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS presentation (
    lun TEXT NOT NULL,                 -- volume name or snapshot id
    host TEXT NOT NULL,                -- a host the LUN is presented to
    PRIMARY KEY (lun, host)
);
CREATE TABLE IF NOT EXISTS imports (
    set_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,                -- the importing host
    origin TEXT NOT NULL,              -- the host that created (and exported) the set
    imported REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS exports (
    set_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,              -- the set's row of `sets`, as a JSON object
    volumes TEXT NOT NULL,             -- JSON list of origin volume names
    snapshots TEXT NOT NULL,           -- JSON list of snapshot ids
    exported REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id TEXT PRIMARY KEY,
    volume TEXT NOT NULL,              -- the snapshot's origin volume (names are per volume)
    name TEXT,
    description TEXT
);
"""
MAX_EXPORTS = 1024


@dataclass
class SetRecord:
    set_id: str
    context: int
    attributes: int
    state: int
    created: float
    originating_machine: str
    client: str
    snapshots_count: int
    auto_release: bool
    backup_complete: bool = False


@dataclass(frozen=True)
class ExportRecord:
    """An exported set: what end_backup on the origin host needs after the set is gone."""

    record: SetRecord
    volumes: tuple[str, ...]
    snapshots: tuple[str, ...]
    exported: float


@dataclass(frozen=True)
class Label:
    """A snapshot's name and description (either may be None)."""

    volume: str
    name: str | None
    description: str | None


@dataclass(frozen=True)
class MountRecord:
    snapshot_id: str
    mountpoint: str
    dev: str
    fstype: str


class ProviderCatalog:
    FILENAME = "provider.sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        # before WAL is entered, as the engine's catalog (blockstore/catalog.py): the
        # WAL index then lives in the heap, not in an mmap'ed -shm file, which on a full
        # btrfs -- the pool's own file system filled by its diff areas -- ended the
        # daemon with SIGBUS at a store to a page needing a new block (a write(2) fails
        # with ENOSPC instead: SQLITE_FULL). The daemon is the one process of the pool
        # (its flock); no other connection can read the database while it is open.
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        # the write-through cache (see the module docstring); load() fills it
        self.records: dict[str, SetRecord] = {}
        self.mounted: dict[str, MountRecord] = {}
        self.presented: dict[str, frozenset[str]] = {}   # LUN masking: lun -> hosts
        self.imported: dict[str, tuple[str, str]] = {}   # set id -> (host, origin)
        # exported sets: what end_backup needs once the importing host deleted them
        self.exported: dict[str, ExportRecord] = {}
        self.labels: dict[str, Label] = {}               # snapshot id -> its label

    def load(self) -> None:
        """Every table into memory (the coordinator's start)."""
        self.records = self.sets()
        self.mounted = self.mounts()
        self.presented = dict(self.presentations())
        self.imported = self.imports()
        self.exported = self.exports()
        self.labels = self.label_rows()

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db)

    # ------------------------------------------------------------------ sets
    def begin_set(self, r: SetRecord) -> None:
        """The row of a set whose creation starts (not cached: see the docstring)."""
        self._write_set(r)

    def put_set(self, r: SetRecord) -> None:
        """A CREATED set (or one adopted at start)."""
        self._write_set(r)
        self.records[r.set_id] = r

    def _write_set(self, r: SetRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO sets (set_id, context, attributes, state, created, "
                "originating_machine, client, snapshots_count, auto_release, backup_complete)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (r.set_id, r.context, r.attributes, r.state, r.created,
                 r.originating_machine, r.client, r.snapshots_count, int(r.auto_release),
                 int(r.backup_complete)))

    def set_backup_complete(self, set_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sets SET backup_complete=1 WHERE set_id=?", (set_id,))
        rec = self.records.get(set_id)
        if rec is not None:
            rec.backup_complete = True

    def delete_set(self, set_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sets WHERE set_id=?", (set_id,))
        self.records.pop(set_id, None)

    def sets(self) -> dict[str, SetRecord]:
        rows = self.db.execute("SELECT * FROM sets ORDER BY created").fetchall()
        return {r["set_id"]: SetRecord(
            r["set_id"], r["context"], r["attributes"], r["state"], r["created"],
            r["originating_machine"], r["client"], r["snapshots_count"],
            bool(r["auto_release"]), bool(r["backup_complete"])) for r in rows}

    # ------------------------------------------------------------------ mounts
    def put_mount(self, m: MountRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO mounts VALUES (?,?,?,?)",
                       (m.snapshot_id, m.mountpoint, m.dev, m.fstype))
        self.mounted[m.snapshot_id] = m

    def delete_mount(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM mounts WHERE snapshot_id=?", (snapshot_id,))
        self.mounted.pop(snapshot_id, None)

    def mounts(self) -> dict[str, MountRecord]:
        rows = self.db.execute("SELECT * FROM mounts").fetchall()
        return {r["snapshot_id"]: MountRecord(r["snapshot_id"], r["mountpoint"], r["dev"],
                                              r["fstype"]) for r in rows}

    # ------------------------------------------------------------------ LUN masking
    def set_presentation(self, lun: str, hosts: Iterable[str] | None) -> None:
        """Present ``lun`` to exactly ``hosts`` (None: back to the default, local host)."""
        hs = frozenset(hosts or ())
        with self._tx() as db:
            db.execute("DELETE FROM presentation WHERE lun=?", (lun,))
            for h in sorted(hs):
                db.execute("INSERT INTO presentation VALUES (?,?)", (lun, h))
        self._cache_presentation(lun, hs)

    def _cache_presentation(self, lun: str, hosts: frozenset[str] | None) -> None:
        if hosts:
            self.presented[lun] = hosts
        else:
            self.presented.pop(lun, None)

    def presentations(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for r in self.db.execute("SELECT lun, host FROM presentation").fetchall():
            out.setdefault(r["lun"], set()).add(r["host"])
        return {k: frozenset(v) for k, v in out.items()}

    # ------------------------------------------------------------------ imports
    def record_import(self, set_id: str, host: str, origin: str, when: float,
                      luns: Sequence[str], present_to: Iterable[str] | None) -> None:
        """One transaction: the set is imported by ``host`` and its LUNs are presented
        to exactly ``present_to`` (None: no row, the daemon's own host)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO imports VALUES (?,?,?,?)",
                       (set_id, host, origin, when))
            for lun in luns:
                db.execute("DELETE FROM presentation WHERE lun=?", (lun,))
                for h in sorted(set(present_to or ())):
                    db.execute("INSERT INTO presentation VALUES (?,?)", (lun, h))
        self.imported[set_id] = (host, origin)
        for lun in luns:
            self._cache_presentation(lun, frozenset(present_to or ()))

    def undo_import(self, set_id: str, previous: dict[str, frozenset[str] | None],
                    rows: bool = True) -> None:
        """One transaction: forget the import of ``set_id`` and give each LUN back the
        hosts it had (None: no row, the daemon's host). rows=False: record_import wrote
        no row, only memory is given back. Memory is given back also when the rows could
        not be (an error here is logged by the caller; what the rows still say is what
        the next start finds)."""
        try:
            if rows:
                with self._tx() as db:
                    db.execute("DELETE FROM imports WHERE set_id=?", (set_id,))
                    for lun, hosts in previous.items():
                        db.execute("DELETE FROM presentation WHERE lun=?", (lun,))
                        for h in sorted(hosts or ()):
                            db.execute("INSERT INTO presentation VALUES (?,?)", (lun, h))
        finally:
            self.imported.pop(set_id, None)
            for lun, hosts in previous.items():
                self._cache_presentation(lun, hosts)

    def delete_import(self, set_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM imports WHERE set_id=?", (set_id,))
        self.imported.pop(set_id, None)

    def imports(self) -> dict[str, tuple[str, str]]:
        """set id -> (importing host, origin host)."""
        rows = self.db.execute("SELECT * FROM imports").fetchall()
        return {r["set_id"]: (r["host"], r["origin"]) for r in rows}

    # ------------------------------------------------------------------ exports
    def put_export(self, e: ExportRecord) -> None:
        """Remember an exported set (replacing an earlier export of it); only the newest
        MAX_EXPORTS are kept."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO exports VALUES (?,?,?,?,?)",
                       (e.record.set_id, json.dumps(asdict(e.record)),
                        json.dumps(list(e.volumes)), json.dumps(list(e.snapshots)),
                        e.exported))
            db.execute("DELETE FROM exports WHERE set_id NOT IN (SELECT set_id FROM exports "
                       "ORDER BY exported DESC, set_id LIMIT ?)", (MAX_EXPORTS,))
        self.exported = self.exports()   # the newest MAX_EXPORTS

    def delete_export(self, set_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM exports WHERE set_id=?", (set_id,))
        self.exported.pop(set_id, None)

    def exports(self) -> dict[str, ExportRecord]:
        out = {}
        for r in self.db.execute("SELECT * FROM exports ORDER BY exported").fetchall():
            try:
                rec = SetRecord(**json.loads(r["record"]))
                vols = tuple(str(v) for v in json.loads(r["volumes"]))
                snaps = tuple(str(x) for x in json.loads(r["snapshots"]))
            except (ValueError, TypeError):   # a damaged row: what it served is lost
                continue
            out[r["set_id"]] = ExportRecord(rec, vols, snaps, r["exported"])
        return out


    # ------------------------------------------------------------------ labels
    def put_labels(self, labels: dict[str, Label], alive: Iterable[str]) -> None:
        """One transaction: these snapshots' labels, and the rows of snapshots no longer
        ``alive`` (every snapshot id the pool has) gone."""
        keep = set(alive) | set(labels)
        dead = [i for i in self.labels if i not in keep]
        with self._tx() as db:
            for i in dead:
                db.execute("DELETE FROM labels WHERE snapshot_id=?", (i,))
            for i, lab in labels.items():
                db.execute("INSERT OR REPLACE INTO labels VALUES (?,?,?,?)",
                           (i, lab.volume, lab.name, lab.description))
        for i in dead:
            self.labels.pop(i, None)
        self.labels.update(labels)

    def label_rows(self) -> dict[str, Label]:
        rows = self.db.execute("SELECT * FROM labels").fetchall()
        return {r["snapshot_id"]: Label(r["volume"], r["name"], r["description"])
                for r in rows}
