"""Transport in-process (no kernel): a failed import undoes everything, end_backup on
the origin host after a daemon restart, documents of several MiB over the real control
socket. The kernel tests (the daemon, the mount, host views) are in test_transport.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from provider_env import Env, FakeWriter, ServerThread

from fuse_mount.presentation import Presentation
from provider import protocol
from provider.catalog import ProviderCatalog
from provider.client import Client, ControlError
from provider.coordinator import Coordinator
from provider.vss import VssError
from provider.writers import Component, FileSpec, WriterMetadata


class FakeMount:
    """The mount the coordinator pushes the LUN masking to (a LiveMount: its presentation,
    whose update() calls our refresh()); ``fail_refresh`` makes the next refresh() raise.
    ``presented`` is what the mount was last told."""

    def __init__(self) -> None:
        self.presentation = Presentation("")
        self.presentation.subscribe(self.refresh)
        self.fail_refresh = False
        self.refreshed: list[dict[str, frozenset[str]]] = []

    @property
    def presented(self) -> dict[str, frozenset[str]]:
        return dict(self.presentation.presented)

    def refresh(self) -> None:
        if self.fail_refresh:
            self.fail_refresh = False
            raise RuntimeError("refresh failed on purpose")
        self.refreshed.append(self.presented)

    def open_handles(self, key: str | None = None) -> int:
        return 0

    async def refresh_now(self) -> None:
        return None

    async def invalidate_lun(self, key: str, attr_only: bool = False) -> None:
        return None


def _db_rows(cat: ProviderCatalog) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(imports, presentation) rows as committed (through the catalog's own connection:
    it holds the database in exclusive locking mode, and no transaction is open)."""
    assert not cat.db.in_transaction
    return ([tuple(r) for r in cat.db.execute("SELECT set_id, host FROM imports")],
            sorted(tuple(r) for r in cat.db.execute("SELECT lun, host FROM presentation")))


STEPS = ["catalog", "import.recorded", "import.surfaced", "refresh", "reply"]


@pytest.mark.parametrize("step", STEPS)
def test_failed_import_leaves_nothing(tmp_path: Path, step: str) -> None:
    """A failure at each step of an import -- the catalog write, after it (the import
    and both LUNs presented to hostB: one transaction, and the catalog's cache with
    it), after the FUSE operations were told, in their refresh, while building the reply
    -- leaves nothing: no LUN presented to hostB (catalog cache, catalog on disk, FUSE
    operations), no import recorded, the lifetime still hostA's; and the same document
    then imports cleanly."""
    env = Env(tmp_path)   # volumes a and b: a set of two LUNs
    seen: dict[str, Any] = {}

    async def fn(c: Coordinator) -> None:
        ops = FakeMount()
        c.mount = ops
        sa, sb = c.open_session("hostA"), c.open_session("hostB")
        made = await c.create(sa, ["a", "b"], context="backup", attributes="transportable")
        set_id = made["set_id"]
        ids = [s["snapshot_id"] for s in made["snapshots"]]
        doc = (await c.export_set(set_id))["document"]
        before = (dict(c.catalog.presented), dict(ops.presented), _db_rows(c.catalog))
        assert before[0] == {i: frozenset({"hostA"}) for i in ids}

        def hook(name: str) -> None:
            if name == step:
                c.fault_hook = None
                seen["hosts"] = [c.hosts_of(i) for i in ids]
                raise RuntimeError(f"injected failure at {step}")
        c.fault_hook = hook
        if step == "catalog":
            def broken(*a: Any) -> None:
                raise sqlite3.OperationalError("disk I/O error")
            c.catalog.record_import = broken   # type: ignore[method-assign]
        elif step == "refresh":
            ops.fail_refresh = True
        elif step == "reply":
            real = c.views.prop_json
            calls = []

            def prop_json(s: Any) -> dict[str, Any]:
                calls.append(s.id)
                if len(calls) == 2:
                    seen["hosts"] = [c.hosts_of(i) for i in ids]
                    raise RuntimeError("injected failure building the reply")
                return real(s)
            c.views.prop_json = prop_json   # type: ignore[method-assign]

        with pytest.raises((RuntimeError, sqlite3.Error)):
            await c.import_set(sb, doc)

        if step in ("import.recorded", "import.surfaced", "reply"):
            assert seen["hosts"] == [frozenset({"hostB"})] * 2
        assert (dict(c.catalog.presented), dict(ops.presented), _db_rows(c.catalog)) == before
        assert c.catalog.imported == {} and c.catalog.imports() == {}
        for i in ids:
            s = c.views.prop_json(c.pool.snapshot(i))
            assert s["presented_to"] == ["hostA"] and s["imported_by"] is None
            assert "IMPORTED" not in s["attribute_names"]
        assert set_id in sa.sets and set_id not in sb.sets

        for obj, attr in ((c.catalog, "record_import"), (c.views, "prop_json")):
            if attr in vars(obj):   # the faults are gone: it imports
                delattr(obj, attr)
        res = await c.import_set(sb, doc)
        assert [s["snapshot_id"] for s in res["snapshots"]] == ids
        assert ops.presented == {i: frozenset({"hostB"}) for i in ids}
        assert set_id in sb.sets and set_id not in sa.sets
    try:
        env.run(fn)
    finally:
        env.close()


def test_end_backup_on_the_origin_after_a_restart(tmp_path: Path) -> None:
    """The daemon remembers the sets it exported (catalog table exports): hostA's
    end_backup reaches its writers after hostB deleted the set AND the daemon
    restarted; the record goes once BackupComplete went out."""
    w = FakeWriter("w")
    env = Env(tmp_path, writers=(w,))
    state: dict[str, Any] = {}

    async def first(c: Coordinator) -> None:
        sa, sb = c.open_session("hostA"), c.open_session("hostB")
        made = await c.create(sa, ["a"], context="app-rollback", attributes="transportable")
        state["set_id"] = sid = made["set_id"]
        state["snapshot_id"] = made["snapshots"][0]["snapshot_id"]
        await c.import_set(sb, (await c.export_set(sid))["document"])
        assert (await c.snapshot_delete(set_id=sid))["count"] == 1
        assert sid in c.catalog.exports()

    async def second(c: Coordinator) -> None:
        sid = state["set_id"]
        assert c.snapshot_list() == [] and sid not in c.catalog.records
        sa = c.open_session("hostA")
        res = await c.end_backup(sa, sid)
        assert res == {"set_id": sid, "writers_notified": ["w"]}
        assert c.catalog.exports() == {}
        with pytest.raises(VssError) as ei:   # BackupComplete goes out once
            await c.end_backup(sa, sid)
        assert ei.value.name == "VSS_E_OBJECT_NOT_FOUND"

    try:
        env.run(first)
        env.reopen()
        w.calls.clear()
        env.run(second)
        assert ("backup_complete", state["set_id"]) in w.calls
    finally:
        env.close()


def test_export_records_are_bounded(tmp_path: Path) -> None:
    """The exports table keeps the newest MAX_EXPORTS rows."""
    from provider import catalog as cat
    from provider.catalog import ExportRecord, SetRecord
    db = ProviderCatalog(str(tmp_path / "p.sqlite"))
    try:
        old = cat.MAX_EXPORTS
        cat.MAX_EXPORTS = 3
        try:
            for i in range(5):
                rec = SetRecord(f"set-{i}", 0, 0x20, 12, float(i), "hostA", "", 1, False)
                db.put_export(ExportRecord(rec, ("v",), (f"snap-{i}",), float(i)))
        finally:
            cat.MAX_EXPORTS = old
        got = db.exports()
        assert sorted(got) == ["set-2", "set-3", "set-4"]
        assert got["set-4"].record.originating_machine == "hostA"
        assert got["set-4"].snapshots == ("snap-4",)
    finally:
        db.close()


class ManyFilesWriter(FakeWriter):
    """A writer whose metadata lists thousands of components with long file names."""

    def identify(self) -> WriterMetadata:
        comps = [Component(f"{'c' * 300}-{i:05d}", f"/srv/data/{i:05d}", "filegroup",
                           [FileSpec(f"/srv/data/{i:05d}/{'d' * 200}", f"{'f' * 100}.{j}")
                            for j in range(3)])
                 for i in range(3000)]
        return self._metadata(comps)


def test_documents_of_several_mib_over_the_socket(tmp_path: Path, sockdir: str) -> None:
    """Export replies and import requests carry documents over 1 MiB (the old line
    limit): the writer's WMD is MiBs, the BCD listing its components over 1 MiB, and
    hostB imports that BCD through the real control server."""
    env = Env(tmp_path, writers=(ManyFilesWriter("many"),))
    srv = ServerThread(env, os.path.join(sockdir, "ctl.sock")).start()
    try:
        with Client(srv.socket_path, host="hostA") as a, \
                Client(srv.socket_path, host="hostB") as b:
            made = a.snapshot_create(["a"], context="app-rollback",
                                     attributes="transportable")
            exp = a.export(made["set_id"])
            bcd = exp["document"]
            wmd = exp["writers"][0]["document"]
            assert len(bcd.encode()) > protocol.MAX_LINE
            assert len(wmd.encode()) > 4 * protocol.MAX_LINE
            assert len(json.dumps(exp)) > 5 * protocol.MAX_LINE
            imp = b.import_set(bcd)
            assert imp["host"] == "hostB" and imp["origin"] == "hostA"
            snap = a.snapshot_show(snapshot_id=made["snapshots"][0]["snapshot_id"])
            assert snap["imported_by"] == "hostB"
            with pytest.raises(ControlError) as ei:   # twice: refused, session goes on
                b.import_set(bcd)
            assert ei.value.name == "VSS_E_OBJECT_ALREADY_EXISTS"
            assert b.status()["sessions"] == 2
            for hosts in ("hostA", [1], None):   # volume.present: hosts is a list of names
                with pytest.raises(ControlError) as ei:
                    b.call("volume.present", {"name": "a", "hosts": hosts})
                assert ei.value.name == "E_INVALIDARG", ei.value
            assert b.volume_present("a", ["hostB"])["presented_to"] == ["hostB"]
    finally:
        srv.stop()
        env.close()
