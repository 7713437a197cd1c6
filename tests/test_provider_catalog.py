"""provider/catalog.py's write-through cache: after every write method, the dicts in
memory are what the tables on disk hold (as a fresh load() reads them), and a write
whose transaction fails leaves the memory as it was."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from provider.catalog import ExportRecord, MountRecord, ProviderCatalog, SetRecord


def _cache(c: ProviderCatalog) -> tuple[Any, ...]:
    return (c.records, c.mounted, c.presented, c.imported, c.exported)


def _on_disk(c: ProviderCatalog) -> tuple[Any, ...]:
    """What the tables hold, read through c's own connection (the database is open in
    exclusive locking mode: no second connection can read it meanwhile)."""
    return (c.sets(), c.mounts(), dict(c.presentations()), c.imports(), c.exports())


def _rec(set_id: str, state: int = 12) -> SetRecord:
    return SetRecord(set_id, 0, 0x20, state, 1.0, "hostA", "cli", 2, False)


def test_every_write_goes_through_to_memory(tmp_path: Path) -> None:
    path = str(tmp_path / "provider.sqlite")
    c = ProviderCatalog(path)
    try:
        c.load()
        steps = [
            lambda: c.begin_set(_rec("s0", state=2)),   # a set in creation: row only
            lambda: c.put_set(_rec("s1")),
            lambda: c.set_backup_complete("s1"),
            lambda: c.put_mount(MountRecord("snap1", "/m/1", "/dev/loop9", "ext4")),
            lambda: c.set_presentation("vol", {"hostB", "hostC"}),
            lambda: c.record_import("s1", "hostB", "hostA", 2.0, ["snap1", "snap2"],
                                    frozenset({"hostB"})),
            lambda: c.put_export(ExportRecord(_rec("s1"), ("vol",), ("snap1",), 3.0)),
            lambda: c.undo_import("s1", {"snap1": None, "snap2": frozenset({"hostC"})}),
            lambda: c.set_presentation("vol", None),
            lambda: c.delete_mount("snap1"),
            lambda: c.delete_export("s1"),
            lambda: c.delete_set("s0"),
            lambda: c.delete_set("s1"),
        ]
        for i, step in enumerate(steps):
            step()
            assert not c.db.in_transaction, f"step {i} left its transaction open"
            disk = _on_disk(c)
            disk[0].pop("s0", None)   # a set in creation: not cached (see catalog.py)
            assert _cache(c) == disk, f"step {i}"
        assert c.records == {} and c.mounted == {} and c.exported == {}
        assert c.presented == {"snap2": frozenset({"hostC"})} and c.imported == {}
        last = _cache(c)
    finally:
        c.close()
    again = ProviderCatalog(path)   # and the next start reads the same
    try:
        again.load()
        assert _cache(again) == last
    finally:
        again.close()


def test_a_failed_write_leaves_memory_as_it_was(tmp_path: Path) -> None:
    c = ProviderCatalog(str(tmp_path / "provider.sqlite"))
    try:
        c.load()
        c.put_set(_rec("s1"))
        c.set_presentation("vol", {"hostB"})
        before = repr(_cache(c))
        c.db.execute("CREATE TRIGGER no_writes BEFORE INSERT ON presentation "
                     "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        with pytest.raises(sqlite3.Error):
            c.set_presentation("vol", {"hostC"})
        with pytest.raises(sqlite3.Error):
            c.record_import("s1", "hostC", "hostA", 2.0, ["snap1"], frozenset({"hostC"}))
        assert repr(_cache(c)) == before
    finally:
        c.close()
