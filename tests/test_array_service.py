"""The array's side of a host's set creation (provider/array_service.py HostSets),
in-process over a real pool: what stays when a host goes away holding the slot.

Before its commit a host's set is nothing yet: its snapshots go. After the commit the
instant has happened and the host may have told its requester so (a release lost with
the network): the set stays, with the array's row, and the slot is free."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from provider_env import Env

from provider.coordinator import Coordinator
from provider.vss import VssError


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.close()


async def _host_set(c: Coordinator, commit: bool) -> tuple[Any, str, str]:
    host = c.open_session("hostB", "host daemon")
    c.masking.present(["a"], {"hostB"})
    set_id, sid = str(uuid.uuid4()), str(uuid.uuid4())
    c.host_sets.claim(host, set_id, 30.0, 0, 0)
    await c.host_sets.prepare(host, "a", "differential", sid, set_id, 0)
    if commit:
        await c.host_sets.commit(host, [sid])
    return host, set_id, sid


@pytest.mark.parametrize("how", ["session", "lease"])
def test_a_host_gone_before_its_commit_leaves_nothing(env: Env, how: str) -> None:
    async def fn(c: Coordinator) -> Any:
        host, set_id, sid = await _host_set(c, commit=False)
        local = c.open_session(None, "array requester")
        with pytest.raises(VssError) as e:
            c.start_snapshot_set(local, "app-rollback")
        assert e.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS" and "hostB" in str(e.value)
        if how == "session":
            await c.close_session(host)
        else:
            c.host_sets.holder.expires = 0.0   # type: ignore[union-attr]
            await c.host_sets.expire()
        c.start_snapshot_set(local, "app-rollback")    # the slot is free
        return [s.id for s in c.pool.list_snapshots()], set_id in c.catalog.records
    snaps, row = env.run(fn)
    assert snaps == [] and not row


@pytest.mark.parametrize("how", ["session", "lease"])
def test_a_host_gone_after_its_commit_keeps_the_set(env: Env, how: str) -> None:
    async def fn(c: Coordinator) -> Any:
        host, set_id, sid = await _host_set(c, commit=True)
        if how == "session":
            await c.close_session(host)
        else:
            c.host_sets.holder.expires = 0.0   # type: ignore[union-attr]
            await c.host_sets.expire()
        local = c.open_session(None, "array requester")
        c.start_snapshot_set(local, "app-rollback")    # the slot is free
        rec = c.catalog.records.get(set_id)
        return sid, [s.id for s in c.pool.list_snapshots()], rec
    sid, snaps, rec = env.run(fn)
    assert snaps == [sid]
    assert rec is not None and rec.originating_machine == "hostB" and not rec.auto_release


def test_a_host_that_aborts_after_its_commit_removes_its_set(env: Env) -> None:
    async def fn(c: Coordinator) -> Any:
        host, set_id, sid = await _host_set(c, commit=True)
        await c.host_sets.drop_snapshot(host, sid)       # e.g. a writer failed to thaw
        await c.host_sets.release(host, set_id, created=False)
        return [s.id for s in c.pool.list_snapshots()], set_id in c.catalog.records
    assert env.run(fn) == ([], False)
