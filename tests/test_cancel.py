"""Cancellation tells the truth (issue 12 #5), below the kernel: the block store's long
operations stopped by a raising progress callback, and the control API's ``cancel``
request and disconnects over a real socket (coordinator + server in a thread).

What each operation leaves when cancelled: promote and split nothing (all or nothing),
revert rolls forward once started, scrub/check change nothing. The kernel-level tests
(the CLI interrupted with SIGINT, the page cache afterwards) are in test_cancel_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from provider_env import Env, Raw, ServerThread, wait_until

from blockstore import Pool
from blockstore import errors as bse
from provider.vss import Attr, Context

CS = 65536
CHUNKS = 48


def _pool(tmp_path: Path) -> tuple[Pool, str, bytes, bytes]:
    """A volume whose differential snapshot holds `old`, the volume `new`."""
    pool = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    pool.create_volume("v", CHUNKS * CS)
    old = b"".join(bytes([i + 1]) * CS for i in range(CHUNKS))
    new = b"".join(bytes([200 - i]) * CS for i in range(CHUNKS))
    pool.write("v", 0, old)
    # persistent (app-rollback): a coordinator started over the pool adopts it
    s = pool.prepare_snapshot("v", attributes=int(Context.APP_ROLLBACK)
                              | int(Attr.DIFFERENTIAL))
    pool.commit_snapshots([s.id])
    pool.write("v", 0, new)
    pool.flush("v")
    return pool, s.id, old, new


def _cancel_at(n: int, seen: list[tuple[int, int]] | None = None
               ) -> Callable[[int, int], None]:
    """A progress callback that raises Cancelled at its n-th call (1-based)."""
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if seen is not None:
            seen.append((done, total))
        if calls >= n:
            raise bse.Cancelled("cancelled by the test")
    return progress


def _luns(pool: Pool) -> list[str]:
    return sorted(os.listdir(os.path.join(pool.path, "luns")))


# --------------------------------------------------------------------------- block store
@pytest.mark.parametrize("at", [1, 2, CHUNKS // 2, CHUNKS, CHUNKS + 1])
def test_promote_cancelled_at_any_step_changes_nothing(tmp_path: Path, at: int) -> None:
    """Every progress call of a promote, up to the last one (after the copy is durable,
    before its commit), is a cancellation point that leaves the snapshot as it was."""
    pool, sid, old, _ = _pool(tmp_path)
    luns = _luns(pool)
    with pytest.raises(bse.Cancelled):
        pool.promote(sid, _cancel_at(at))
    s = pool.snapshot(sid)
    assert s.kind == "differential"
    assert _luns(pool) == luns   # no .partial files left
    assert pool.read(sid, 0, CHUNKS * CS) == old
    assert pool.check() == []
    pool.promote(sid)            # and it can be promoted afterwards
    assert pool.snapshot(sid).kind == "full"
    assert pool.read(sid, 0, CHUNKS * CS) == old
    pool.close()


class _Recorder:
    """A progress callback that records the snapshot's kind at each call, and when the
    store says it is past its point of no return."""

    def __init__(self, pool: Pool, sid: str) -> None:
        self.pool, self.sid = pool, sid
        self.kinds: list[str] = []
        self.no_return_at: int | None = None

    def __call__(self, done: int, total: int) -> None:
        assert self.no_return_at is None, "progress called past the point of no return"
        self.kinds.append(self.pool.snapshot(self.sid).kind)

    def point_of_no_return(self) -> None:
        self.no_return_at = len(self.kinds)


def test_promote_calls_progress_per_chunk_and_last_before_its_commit(tmp_path: Path) -> None:
    pool, sid, _, _ = _pool(tmp_path)
    rec = _Recorder(pool, sid)
    pool.promote(sid, rec)
    assert len(rec.kinds) == CHUNKS + 1
    assert set(rec.kinds) == {"differential"}   # never called once committed
    assert rec.no_return_at == CHUNKS + 1        # said once, after the last call
    pool.close()


def test_revert_says_its_point_of_no_return_before_it_changes_the_volume(
        tmp_path: Path) -> None:
    pool, sid, _, new = _pool(tmp_path)
    seen: list[bytes] = []

    def progress(done: int, total: int) -> None:
        pass

    def no_return() -> None:
        seen.append(pool.read("v", 0, CHUNKS * CS))
    progress.point_of_no_return = no_return  # type: ignore[attr-defined]
    pool.revert("v", sid, progress)
    assert seen == [new]
    pool.close()


@pytest.mark.parametrize("at", [1, CHUNKS // 2, CHUNKS + 1])
def test_split_cancelled_during_its_promote_changes_nothing(tmp_path: Path, at: int) -> None:
    pool, sid, old, _ = _pool(tmp_path)
    luns = _luns(pool)
    with pytest.raises(bse.Cancelled):
        pool.split(sid, "n", _cancel_at(at))
    assert [v.name for v in pool.list_volumes()] == ["v"]
    assert pool.snapshot(sid).kind == "differential"
    assert _luns(pool) == luns
    assert pool.check() == []
    pool.close()


def test_split_never_calls_progress_after_its_promote_committed(tmp_path: Path) -> None:
    """A cancellation after the promote step must not leave a promoted-but-not-split
    snapshot: the split then completes without calling progress again."""
    pool, sid, old, _ = _pool(tmp_path)
    rec = _Recorder(pool, sid)
    v = pool.split(sid, "n", rec)
    assert set(rec.kinds) == {"differential"} and len(rec.kinds) == CHUNKS + 1
    assert rec.no_return_at == CHUNKS + 1
    assert v.name == "n" and pool.read("n", 0, CHUNKS * CS) == old
    assert pool.check() == []
    pool.close()


@pytest.mark.parametrize("at", [1, 2])
def test_revert_cancelled_after_it_started_rolls_forward(tmp_path: Path, at: int,
                                                         caplog: Any) -> None:
    pool, sid, old, _ = _pool(tmp_path)
    caplog.set_level("INFO", logger="blockstore")
    pool.revert("v", sid, _cancel_at(at))   # no exception: it completed
    assert pool.read("v", 0, CHUNKS * CS) == old
    assert "rolls forward" in caplog.text
    assert pool.check() == []
    pool.close()
    pool = Pool.open(str(tmp_path / "pool"))   # no revert record left to resume
    assert pool.read("v", 0, CHUNKS * CS) == old
    pool.close()


# --------------------------------------------------------------------------- control API
class Gate:
    """Wraps a Pool method so that its progress callback waits, at its first call,
    until the test opens the gate (a long operation caught in the middle)."""

    def __init__(self, pool: Pool, method: str) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.calls = 0
        orig = getattr(pool, method)

        def wrapped(*args: Any, **kw: Any) -> Any:
            *rest, progress = args   # (check, scrub: their volume and tally by keyword)
            assert progress is not None

            def slow(done: int, total: int) -> None:
                self.calls += 1
                self.entered.set()
                assert self.open.wait(20)
                progress(done, total)
            if hasattr(progress, "point_of_no_return"):
                slow.point_of_no_return = progress.point_of_no_return  # type: ignore
            return orig(*rest, slow, **kw)
        setattr(pool, method, wrapped)


@contextlib.contextmanager
def _served(tmp_path: Path, sockdir: str
            ) -> Iterator[tuple[Env, ServerThread, str, bytes, bytes]]:
    """A control server over _pool's pool: (env, server, snapshot id, old, new content);
    stopped and closed at the end."""
    (tmp_path / "env").mkdir()
    env = Env(tmp_path / "env", volumes=())   # its coordinator, over our pool
    env.pool.close()
    env.pool, sid, old, new = _pool(tmp_path)
    env.path = env.pool.path
    srv = ServerThread(env, os.path.join(sockdir, "ctl.sock")).start()
    try:
        yield env, srv, sid, old, new
    finally:
        srv.stop()
        env.close()


def _hello(srv: ServerThread) -> Raw:
    r = Raw(srv.socket_path)
    # the array's own host: the administrator (another host may name only the
    # snapshots presented to it or made by its requester: provider/access.py)
    assert r.req(1, "hello", {"host": socket.gethostname()})["ok"]
    return r


def _send(r: Raw, rid: Any, op: str, args: dict[str, Any]) -> None:
    r.send(json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n")


def _reply(r: Raw, rid: Any) -> dict[str, Any]:
    """The next message for ``rid`` that is not a progress event."""
    while True:
        msg = r.recv()
        if msg.get("id") == rid and "progress" not in msg:
            return msg


def test_cancel_request_stops_a_promote_with_nothing_changed(tmp_path: Path,
                                                             sockdir: str) -> None:
    with _served(tmp_path, sockdir) as (env, srv, sid, old, _):
        gate = Gate(env.pool, "promote")
        r = _hello(srv)
        _send(r, 2, "promote", {"snapshot_id": sid})
        assert gate.entered.wait(20)
        st = srv.call(lambda: srv.coord.status())  # type: ignore[union-attr]
        assert [(o["op"], o["target"], o["state"]) for o in st["operations"]] == [
            ("promote", sid, "running")]
        _send(r, 3, "cancel", {"request": 2})
        ans = _reply(r, 3)   # answered at once, while request 2 still runs
        assert ans["ok"] and ans["result"] == {"request": 2, "state": "cancelling"}
        gate.open.set()
        rep = _reply(r, 2)
        assert not rep["ok"] and rep["error"]["name"] == "E_ABORT"
        assert "nothing changed" in rep["error"]["message"]
        assert "still differential" in rep["error"]["message"]
        assert gate.calls == 1   # stopped at the first step after the cancel
        assert env.pool.snapshot(sid).kind == "differential"
        assert srv.call(lambda: srv.coord.status()["operations"]) == []  # type: ignore
        # the connection goes on
        assert r.req(4, "snapshot.show", {"snapshot_id": sid})["ok"]
        r.close()
    pool = Pool.open(env.path)
    assert pool.check() == [] and pool.read(sid, 0, CHUNKS * CS) == old
    pool.close()


def test_cancel_request_stops_a_scrub(tmp_path: Path, sockdir: str) -> None:
    with _served(tmp_path, sockdir) as (env, srv, _, _, _):
        gate = Gate(env.pool, "scrub")
        r = _hello(srv)
        _send(r, 2, "scrub", {})
        assert gate.entered.wait(20)
        _send(r, 3, "cancel", {"request": 2})
        assert _reply(r, 3)["result"]["state"] == "cancelling"
        gate.open.set()
        rep = _reply(r, 2)
        assert rep["error"]["name"] == "E_ABORT", rep
        assert "nothing changed" in rep["error"]["message"]
        assert gate.calls == 1
        assert srv.call(lambda: srv.coord.status()["operations"]) == []  # type: ignore
        r.close()


def test_cancel_of_a_started_revert_says_it_rolls_forward(tmp_path: Path,
                                                          sockdir: str) -> None:
    with _served(tmp_path, sockdir) as (env, srv, sid, old, _):
        gate = Gate(env.pool, "revert")
        r = _hello(srv)
        _send(r, 2, "revert", {"snapshot_id": sid})
        assert gate.entered.wait(20)
        _send(r, 3, "cancel", {"request": 2})
        assert _reply(r, 3)["result"] == {"request": 2, "state": "rolling-forward"}
        st = srv.call(lambda: srv.coord.status())  # type: ignore[union-attr]
        assert st["operations"][0]["state"] == "rolling-forward"
        gate.open.set()
        rep = _reply(r, 2)
        assert rep["ok"], rep   # the truth: it completed
        assert env.pool.read("v", 0, CHUNKS * CS) == old
        r.close()


def test_cancel_before_a_revert_starts_changes_nothing(tmp_path: Path, sockdir: str) -> None:
    """Cancelled while it waits for the volume's writes to be held: nothing changed."""
    with _served(tmp_path, sockdir) as (env, srv, sid, _, new):
        coord = srv.coord
        assert coord is not None
        entered, go = threading.Event(), trio.Event()
        real_hold = coord.barrier.hold

        async def slow_hold(*a: Any, **kw: Any) -> Any:
            entered.set()
            await go.wait()
            return await real_hold(*a, **kw)
        srv.call(lambda: setattr(coord.barrier, "hold", slow_hold))
        r = _hello(srv)
        _send(r, 2, "revert", {"snapshot_id": sid})
        assert entered.wait(20)
        _send(r, 3, "cancel", {"request": 2})
        assert _reply(r, 3)["result"]["state"] == "cancelling"
        srv.call(go.set)
        rep = _reply(r, 2)
        assert rep["error"]["name"] == "E_ABORT", rep
        assert "had not started" in rep["error"]["message"]
        assert env.pool.read("v", 0, CHUNKS * CS) == new
        assert srv.call(lambda: (coord.barrier.holds, coord._marks)) == ([], {})
        r.close()


def test_cancel_of_a_queued_request_and_of_one_answered(tmp_path: Path, sockdir: str) -> None:
    with _served(tmp_path, sockdir) as (env, srv, sid, _, _):
        gate = Gate(env.pool, "promote")
        r = _hello(srv)
        _send(r, 2, "promote", {"snapshot_id": sid})
        assert gate.entered.wait(20)
        _send(r, 3, "volume.delete", {"name": "v"})        # queued behind the promote
        _send(r, 4, "cancel", {"request": 3})
        assert _reply(r, 4)["result"] == {"request": 3, "state": "cancelled"}
        _send(r, 5, "cancel", {"request": 99})             # nothing of that id runs
        assert _reply(r, 5)["result"] == {"request": 99, "state": "done"}
        _send(r, 6, "cancel", {})
        assert _reply(r, 6)["error"]["name"] == "E_INVALIDARG"
        gate.open.set()
        assert _reply(r, 2)["ok"]                           # the promote completed
        rep = _reply(r, 3)
        assert rep["error"]["name"] == "E_ABORT"
        assert "before it started" in rep["error"]["message"]
        assert [v.name for v in env.pool.list_volumes()] == ["v"]
        r.close()


def test_disconnect_stops_a_promote_and_the_server_goes_on(tmp_path: Path,
                                                           sockdir: str) -> None:
    with _served(tmp_path, sockdir) as (env, srv, sid, _, _):
        gate = Gate(env.pool, "promote")
        r = _hello(srv)
        _send(r, 2, "promote", {"snapshot_id": sid})
        assert gate.entered.wait(20)
        r.close()   # the requester dies mid-way
        coord = srv.coord
        assert coord is not None
        wait_until(lambda: srv.call(lambda: coord.longops.jobs.list()[0]["state"]) == "cancelling")
        gate.open.set()
        wait_until(lambda: srv.call(lambda: coord.status()["operations"]) == [])
        assert env.pool.snapshot(sid).kind == "differential"
        r = _hello(srv)
        _send(r, 2, "promote", {"snapshot_id": sid})
        assert _reply(r, 2)["ok"]
        assert env.pool.snapshot(sid).kind == "full"
        r.close()


def test_cancel_of_a_set_being_created_aborts_it_and_says_so(tmp_path: Path,
                                                             sockdir: str) -> None:
    from provider.coordinator import SnapshotSet
    from provider.vss import SnapshotState

    with _served(tmp_path, sockdir) as (env, srv, _, _, _):
        entered = threading.Event()

        async def hook(s: SnapshotSet, st: SnapshotState) -> None:
            if st == SnapshotState.PRECOMMITTED:
                entered.set()
                await trio.sleep_forever()
        coord = srv.coord
        assert coord is not None
        before = [s.id for s in env.pool.list_snapshots()]
        srv.call(lambda: setattr(coord, "state_hook", hook))
        r = _hello(srv)
        _send(r, 2, "snapshot.create", {"volumes": ["v"], "context": "app-rollback"})
        assert entered.wait(20)
        _send(r, 3, "cancel", {"request": 2})
        assert _reply(r, 3)["result"]["state"] == "cancelling"
        rep = _reply(r, 2)
        assert rep["error"]["name"] == "E_ABORT"
        assert "aborted" in rep["error"]["message"]
        assert [s.id for s in env.pool.list_snapshots()] == before
        assert srv.call(lambda: coord._creating) is None
        r.close()


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_a_short_request_is_not_cancelled_and_completes(tmp_path: Path, sockdir: str,
                                                        how: str) -> None:
    """Not cancellable (volume.create, snapshot.delete, expose...): a cancel request
    says so and the reply follows; a requester that disconnects does not stop it
    half-way either (before: a delete of several snapshots stopped between two)."""
    with _served(tmp_path, sockdir) as (env, srv, _, _, _):
        coord = srv.coord
        assert coord is not None
        entered, go = threading.Event(), trio.Event()
        real = coord.volume_create

        async def slow(*a: Any) -> Any:
            entered.set()
            await go.wait()
            return await real(*a)
        srv.call(lambda: setattr(coord, "volume_create", slow))
        r = _hello(srv)
        _send(r, 2, "volume.create", {"name": "w", "size": "1M"})
        assert entered.wait(20)
        if how == "cancel":
            _send(r, 3, "cancel", {"request": 2})
            assert _reply(r, 3)["result"]["state"] == "not-cancellable"
            srv.call(go.set)
            assert _reply(r, 2)["ok"]
        else:
            r.close()
            time.sleep(0.3)   # the server notices the disconnect (it used to cancel)
            srv.call(go.set)
            wait_until(lambda: srv.call(lambda: not coord._sessions))
        assert "w" in [v.name for v in env.pool.list_volumes()]
        r.close()
