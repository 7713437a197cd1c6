"""The coordinator in-process: a real Pool in tmp_path, a real WriteBarrier, trio.run.

The whole VSS sequence with fake writers, an abort injected at every state (error and
cancellation), the hold timeout, two requesters, lifetimes across sessions and restarts,
bad input, and a multi-volume set under concurrent writes proving one instant.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from provider_env import Env, FakeWriter, assert_no_trace, disk_state, wait_until

from blockstore import errors as bse
from provider.coordinator import Coordinator, SnapshotSet
from provider.vss import Attr, SnapshotState, VssError
from provider.writers import WriterError

SS = SnapshotState

# Every state DoSnapshotSet passes through, in order, before CREATED.
DO_STATES = [SS.PROCESSING_PREPARE, SS.PREPARED, SS.PROCESSING_PRECOMMIT, SS.PRECOMMITTED,
             SS.PROCESSING_COMMIT, SS.COMMITTED, SS.PROCESSING_POSTCOMMIT, SS.POSTCOMMITTED,
             SS.PROCESSING_PREFINALCOMMIT, SS.PREFINALCOMMITTED,
             SS.PROCESSING_POSTFINALCOMMIT]


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.close()


# --------------------------------------------------------------------------- happy path
def test_full_sequence_with_writers(tmp_path: Path) -> None:
    w1, w2 = FakeWriter("w1"), FakeWriter("w2")
    env = Env(tmp_path, writers=(w1, w2))
    seen: list[SnapshotState] = []

    async def fn(c: Coordinator) -> Any:
        c.state_hook = lambda s, st: seen.append(st)
        sess = c.open_session("backup-host", "test")
        set_id = c.start_snapshot_set(sess, "backup")
        sid_a = c.add_to_snapshot_set(sess, "a", set_id)
        sid_b = c.add_to_snapshot_set(sess, "b")          # the session's current set
        assert c.status()["volumes_in_use"] == {"a": f"snapshot set {set_id}",
                                                "b": f"snapshot set {set_id}"}
        snaps = await c.do_snapshot_set(sess, set_id)
        assert {s["snapshot_id"] for s in snaps} == {sid_a, sid_b}
        assert c.status()["volumes_in_use"] == {}
        res = await c.end_backup(sess)
        return set_id, snaps, res, c.snapshot_list()

    set_id, snaps, res, listed = env.run(fn)
    try:
        assert seen == DO_STATES + [SS.CREATED]
        for s in snaps:
            assert s["status"] == "CREATED"
            assert s["snapshot_set_id"] == set_id
            assert s["snapshots_count"] == 2
            assert s["originating_machine"] == "backup-host"
            assert s["kind"] == "differential"
            assert s["attributes"] & Attr.DIFFERENTIAL and s["attributes"] & \
                Attr.HARDWARE_ASSISTED
            assert s["context"] == "backup"
            assert s["device_object"].endswith(f".shadow/{s['snapshot_id']}.img")
        for w in (w1, w2):
            assert w.events() == ["freeze", "thaw", "backup_complete"]
        assert res["writers_notified"] == ["w1", "w2"]
        assert len(listed) == 2
        # auto-release (backup): the session ended with stop() -> deleted
        assert env.pool.list_snapshots() == []
    finally:
        env.close()


def test_snapshot_content_is_the_instant(env: Env) -> None:
    async def fn(c: Coordinator) -> Any:
        sess = c.open_session()
        env.pool.write("a", 0, b"before")
        res = await c.create(sess, ["a"], "app-rollback")
        env.pool.write("a", 0, b"after!")
        sid = res["snapshots"][0]["snapshot_id"]
        return sid, env.pool.read(sid, 0, 6), env.pool.read("a", 0, 6)

    sid, snap, live = env.run(fn)
    assert (snap, live) == (b"before", b"after!")
    assert env.pool.snapshot(sid).state == "committed"


def test_no_writers_for_file_share_and_nas_contexts(tmp_path: Path) -> None:
    w = FakeWriter()
    env = Env(tmp_path, writers=(w,))
    try:
        async def fn(c: Coordinator) -> None:
            sess = c.open_session()
            await c.create(sess, ["a"], "file-share-backup")
            await c.create(sess, ["b"], "nas-rollback")
        env.run(fn)
        assert w.calls == []
    finally:
        env.close()


@pytest.mark.parametrize("policy,ask,expect", [
    ("differential", None, "differential"),
    ("plex", None, "plex"),
    ("differential", "plex", "plex"),
    ("plex", "differential", "differential"),
])
def test_automagic_kind(tmp_path: Path, policy: str, ask: str | None, expect: str) -> None:
    env = Env(tmp_path, config={"default_kind": policy})
    try:
        async def fn(c: Coordinator) -> Any:
            return await c.create(c.open_session(), ["a", "b"], "nas-rollback", kind=ask)
        res = env.run(fn)
        bit = Attr.PLEX if expect == "plex" else Attr.DIFFERENTIAL
        other = Attr.DIFFERENTIAL if expect == "plex" else Attr.PLEX
        for s in res["snapshots"]:
            assert s["kind"] == expect
            assert s["attributes"] & bit and not s["attributes"] & other
            assert env.pool.read(s["snapshot_id"], 0, 4) == s["volume"].encode() * 4
    finally:
        env.close()


def test_plex_progress_is_reported(env: Env) -> None:
    events: list[tuple[int, int, str]] = []

    async def fn(c: Coordinator) -> Any:
        return await c.create(c.open_session(), ["a"], "nas-rollback", kind="plex",
                              progress=lambda d, t, w: events.append((d, t, w)))
    env.run(fn)
    assert events and events[-1][0] == events[-1][1] > 0
    assert {w for _, _, w in events} == {"plex sync"}


# --------------------------------------------------------------------------- aborts
@pytest.mark.parametrize("kind", ["differential", "plex"])
@pytest.mark.parametrize("state", DO_STATES, ids=[s.name for s in DO_STATES])
def test_abort_at_every_state_leaves_no_trace(tmp_path: Path, state: SnapshotState,
                                              kind: str) -> None:
    w = FakeWriter()
    env = Env(tmp_path, writers=(w,))
    before = disk_state(env.pool)
    try:
        async def fn(c: Coordinator) -> Any:
            async def hook(s: SnapshotSet, st: SnapshotState) -> None:
                # origin writes at every step: after the commit they copy-before-write
                env.pool.write("a", 0, b"W" * 200000)
                env.pool.write("b", 65536 * 3, b"W" * 70000)
                if st == state:
                    raise VssError("VSS_E_UNEXPECTED_PROVIDER_ERROR", f"injected at {st.name}")
            c.state_hook = hook
            sess = c.open_session()
            with pytest.raises(VssError) as ei:
                await c.create(sess, ["a", "b"], "backup", kind=kind)
            assert ei.value.name == "VSS_E_UNEXPECTED_PROVIDER_ERROR"
            assert "injected" in ei.value.message
            assert_no_trace(env, before, (w,))
            c.state_hook = None
            # the slot is free again and the volumes can be snapshotted
            res = await c.create(sess, ["a", "b"], "nas-rollback", kind=kind)
            return res
        res = env.run(fn)
        assert len(res["snapshots"]) == 2
        frozen_at = DO_STATES.index(SS.PROCESSING_PRECOMMIT)   # freeze follows its entry
        after_thaw = DO_STATES.index(SS.POSTCOMMITTED)
        i = DO_STATES.index(state)
        # (the second set is nas-rollback: no writers)
        if i <= frozen_at:
            assert w.events() == []
        elif i < after_thaw:
            assert w.events() == ["freeze", "abort"]
        else:
            assert w.events() == ["freeze", "thaw", "abort"]
    finally:
        env.close()


@pytest.mark.parametrize("state", DO_STATES, ids=[s.name for s in DO_STATES])
def test_cancellation_at_every_state_leaves_no_trace(env: Env, state: SnapshotState) -> None:
    """What a requester disconnecting mid-way does (the control server cancels set.do)."""
    w = FakeWriter()
    env.writers = [w]
    before = disk_state(env.pool)

    async def fn(c: Coordinator) -> None:
        sess = c.open_session()
        with trio.CancelScope() as scope:
            def hook(s: SnapshotSet, st: SnapshotState) -> None:
                if st == state:
                    scope.cancel()
            c.state_hook = hook
            await c.create(sess, ["a", "b"], "backup", kind="plex")
        assert scope.cancelled_caught
        assert_no_trace(env, before, (w,))

    env.run(fn)


def test_abort_before_do(env: Env) -> None:
    before = disk_state(env.pool)

    async def fn(c: Coordinator) -> None:
        sess = c.open_session()
        sid = c.start_snapshot_set(sess, "app-rollback")
        c.add_to_snapshot_set(sess, "a")
        await c.abort_snapshot_set(sess, sid)
        assert_no_trace(env, before)
        with pytest.raises(VssError) as ei:
            await c.do_snapshot_set(sess, sid)
        assert ei.value.name == "VSS_E_OBJECT_NOT_FOUND"
    env.run(fn)


def test_writer_freeze_failure_aborts_and_thaws_everyone(tmp_path: Path) -> None:
    good, bad = FakeWriter("good"), FakeWriter("bad", fail="freeze")
    env = Env(tmp_path, writers=(good, bad))
    before = disk_state(env.pool)
    try:
        async def fn(c: Coordinator) -> None:
            with pytest.raises(VssError) as ei:
                await c.create(c.open_session(), ["a"], "backup")
            assert ei.value.name == "VSS_E_WRITERERROR_NONRETRYABLE"
            assert "writer bad failed to freeze" in ei.value.message
            assert_no_trace(env, before, (good, bad))
        env.run(fn)
        assert good.events() == ["freeze", "thaw", "abort"]    # rolled back, then aborted
        assert bad.events()[0] == "freeze" and "abort" in bad.events()
    finally:
        env.close()


def test_writer_named_error_passes_through(tmp_path: Path) -> None:
    w = FakeWriter("w", fail="freeze", error=WriterError("busy, retry", retryable=True))
    env = Env(tmp_path, writers=(w,))
    try:
        async def fn(c: Coordinator) -> None:
            with pytest.raises(VssError) as ei:
                await c.create(c.open_session(), ["a"], "backup")
            assert ei.value.name == "VSS_E_WRITERERROR_RETRYABLE"
        env.run(fn)
    finally:
        env.close()


def test_writer_not_responding(tmp_path: Path) -> None:
    w = FakeWriter("slow", hang="freeze")
    env = Env(tmp_path, writers=(w,), config={"freeze_timeout": 0.3, "writer_timeout": 0.3})
    before = disk_state(env.pool)
    try:
        async def fn(c: Coordinator) -> None:
            with pytest.raises(VssError) as ei:
                await c.create(c.open_session(), ["a"], "backup")
            assert ei.value.name == "VSS_E_WRITER_NOT_RESPONDING"
            assert_no_trace(env, before)
            # the abort waits behind the hung freeze and undoes it once it returns
            w.release.set()
            wait_until(lambda: "abort" in w.events() and not w.frozen)
        env.run(fn)
    finally:
        env.close()


def test_thaw_failure_discards_the_set(tmp_path: Path) -> None:
    w = FakeWriter("w", fail="thaw")
    env = Env(tmp_path, writers=(w,))
    before = disk_state(env.pool)
    try:
        async def fn(c: Coordinator) -> None:
            with pytest.raises(VssError) as ei:
                await c.create(c.open_session(), ["a", "b"], "backup")
            assert ei.value.name == "VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT"
            assert_no_trace(env, before, (w,))
        env.run(fn)
        assert w.events() == ["freeze", "thaw", "abort"]
    finally:
        env.close()


def test_hold_timeout(tmp_path: Path) -> None:
    """A write in flight that never completes: the hold cannot be taken in time."""
    w = FakeWriter()
    env = Env(tmp_path, writers=(w,), config={"hold_deadline": 0.3})
    before = disk_state(env.pool)
    try:
        async def fn(c: Coordinator) -> None:
            c.barrier.begin_write("b")            # stuck in flight
            t0 = trio.current_time()
            with pytest.raises(VssError) as ei:
                await c.create(c.open_session(), ["a", "b"], "backup", kind="plex")
            assert ei.value.name == "VSS_E_HOLD_WRITES_TIMEOUT"
            assert trio.current_time() - t0 < 5
            assert_no_trace(env, before, (w,))
            assert c.barrier.holds == [] and not c.barrier.is_held("a")
            c.barrier.end_write("b")
            await c.create(c.open_session(), ["a", "b"], "backup")   # works again
        env.run(fn)
        assert w.events()[:2] == ["freeze", "abort"]
    finally:
        env.close()


def test_hold_expiring_during_commit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit itself outlasts the hold: the committed set is removed again."""
    env.config["hold_deadline"] = 0.2
    before = disk_state(env.pool)

    async def fn(c: Coordinator) -> None:
        real = c.hardware.CommitSnapshots

        def slow_commit(set_id: str) -> None:
            real(set_id)
            import time
            time.sleep(0.5)
        monkeypatch.setattr(c.hardware, "CommitSnapshots", slow_commit)
        with pytest.raises(VssError) as ei:
            await c.create(c.open_session(), ["a", "b"], "backup")
        assert ei.value.name == "VSS_E_HOLD_WRITES_TIMEOUT"
        assert_no_trace(env, before)
    env.run(fn)


def test_writes_wait_during_the_hold(env: Env) -> None:
    """A FUSE-style write (barrier-aware) issued while the set is held lands after the
    instant: the snapshot does not see it, the volume does."""
    async def fn(c: Coordinator) -> Any:
        landed = trio.Event()

        async def fuse_write() -> None:
            await c.barrier.wait_writable("a")
            c.barrier.begin_write("a")
            try:
                env.pool.write("a", 0, b"late")
            finally:
                c.barrier.end_write("a")
            landed.set()

        async def hook(s: SnapshotSet, st: SnapshotState) -> None:
            if st == SS.COMMITTED:
                assert landed.is_set() is False
        nursery_started = trio.Event()

        async def start_write_when_held(n: trio.Nursery) -> None:
            while not c.barrier.is_held("a"):
                await trio.sleep(0)
            n.start_soon(fuse_write)
            nursery_started.set()
        c.state_hook = hook
        async with trio.open_nursery() as n:
            n.start_soon(start_write_when_held, n)
            res = await c.create(c.open_session(), ["a"], "nas-rollback")
        sid = res["snapshots"][0]["snapshot_id"]
        return env.pool.read(sid, 0, 4), env.pool.read("a", 0, 4)

    snap, live = env.run(fn)
    assert snap == b"aaaa" and live == b"late"


# --------------------------------------------------------------------------- requesters
def test_one_set_at_a_time(env: Env) -> None:
    async def fn(c: Coordinator) -> None:
        s1, s2 = c.open_session("h1"), c.open_session("h2")
        gate = trio.Event()
        entered = trio.Event()

        async def hook(s: SnapshotSet, st: SnapshotState) -> None:
            if st == SS.PROCESSING_PRECOMMIT:
                entered.set()
                await gate.wait()

        c.state_hook = hook
        async with trio.open_nursery() as n:
            n.start_soon(c.create, s1, ["a"], "nas-rollback")
            await entered.wait()
            for call in (lambda: c.start_snapshot_set(s2, "backup"),):
                with pytest.raises(VssError) as ei:
                    call()
                assert ei.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
                assert "h1" in ei.value.message
            with pytest.raises(VssError) as ei:
                await c.create(s2, ["b"], "backup")
            assert ei.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
            # the volume of the set in progress is marked
            with pytest.raises(VssError) as ei:
                await c.volume_delete("a")
            assert ei.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
            assert c.status()["creating"]["state"] == "PROCESSING_PRECOMMIT"
            gate.set()
        c.state_hook = None
        await c.create(s2, ["b"], "backup")
    env.run(fn)


def test_other_session_cannot_touch_a_set(env: Env) -> None:
    async def fn(c: Coordinator) -> None:
        s1, s2 = c.open_session(), c.open_session()
        set_id = c.start_snapshot_set(s1)
        for f in (lambda: c.add_to_snapshot_set(s2, "a", set_id),):
            with pytest.raises(VssError) as ei:
                f()
            assert ei.value.name == "VSS_E_BAD_STATE"
        with pytest.raises(VssError) as ei:
            await c.do_snapshot_set(s2, set_id)
        assert ei.value.name == "VSS_E_BAD_STATE"
        await c.close_session(s1)     # its set in creation is aborted
        c.start_snapshot_set(s2)
    env.run(fn)


# --------------------------------------------------------------------------- lifetimes
def test_auto_release_on_session_end_only(env: Env) -> None:
    async def fn(c: Coordinator) -> None:
        s1, s2 = c.open_session(), c.open_session()
        r1 = await c.create(s1, ["a"], "backup")
        r2 = await c.create(s1, ["b"], "file-share-backup")
        r3 = await c.create(s1, ["a", "b"], "app-rollback")
        r4 = await c.create(s2, ["b"], "backup")
        assert len(env.pool.list_snapshots()) == 5
        await c.close_session(s1)
        left = {s.id for s in env.pool.list_snapshots()}
        assert left == {x["snapshot_id"] for x in r3["snapshots"] + r4["snapshots"]}
        assert {s["set_id"] for s in c.set_list()} == {r3["set_id"], r4["set_id"]}
        del r1, r2
    env.run(fn)


def test_persistent_sets_survive_a_restart(env: Env) -> None:
    async def first(c: Coordinator) -> Any:
        sess = c.open_session("host-1", "job")
        keep = await c.create(sess, ["a", "b"], "app-rollback", kind="plex")
        nas = await c.create(sess, ["a"], "nas-rollback")
        gone = await c.create(sess, ["b"], "backup")
        # an unfinished set at "crash" time
        c.start_snapshot_set(sess, "nas-rollback")
        c.add_to_snapshot_set(sess, "a")
        return keep, nas, gone, c.snapshot_list()

    keep, nas, gone, listed_before = env.run(first, stop=False)   # daemon killed
    env.reopen()

    async def second(c: Coordinator) -> Any:
        return c.snapshot_list(), c.set_list()

    listed, sets = env.run(second)
    ids = {s["snapshot_id"] for s in listed}
    assert ids == {s["snapshot_id"] for s in keep["snapshots"] + nas["snapshots"]}
    before = {s["snapshot_id"]: s for s in listed_before}
    for s in listed:
        b = before[s["snapshot_id"]]
        for k in ("snapshot_set_id", "snapshots_count", "originating_machine",
                  "attributes", "status", "context", "kind", "creation_timestamp"):
            assert s[k] == b[k], k
    assert {s["set_id"]: s["context"] for s in sets} == {keep["set_id"]: "app-rollback",
                                                        nas["set_id"]: "nas-rollback"}
    assert env.pool.check() == []


def test_persistent_snapshot_without_record_is_adopted(env: Env) -> None:
    attrs = int(Attr.PERSISTENT | Attr.NO_AUTO_RELEASE | Attr.DIFFERENTIAL)
    set_id = str(uuid.uuid4())
    info = env.pool.prepare_snapshot("a", "differential", None, set_id, attrs)
    env.pool.commit_snapshots([info.id])
    tmp = env.pool.prepare_snapshot("b", "differential", None, str(uuid.uuid4()), 0)
    env.pool.commit_snapshots([tmp.id])     # auto-release, no session: deleted at start

    async def fn(c: Coordinator) -> Any:
        return c.snapshot_list(), c.set_list()
    listed, sets = env.run(fn)
    assert [s["snapshot_id"] for s in listed] == [info.id]
    assert listed[0]["context"] == "app-rollback"
    assert [s["set_id"] for s in sets] == [set_id]


# --------------------------------------------------------------------------- bad input
BAD_CREATE = [
    (dict(volumes=["a"], context="client-accessible"), "VSS_E_UNSUPPORTED_CONTEXT"),
    (dict(volumes=["a"], context=0x1234), "VSS_E_UNSUPPORTED_CONTEXT"),
    (dict(volumes=["a"], context="nonsense"), "VSS_E_UNSUPPORTED_CONTEXT"),
    (dict(volumes=["a"], context="all"), "VSS_E_UNSUPPORTED_CONTEXT"),
    (dict(volumes=["a"], attributes=["differential", "plex"]),
     "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER"),
    (dict(volumes=["a"], attributes=int(Attr.PERSISTENT)), "VSS_E_UNSUPPORTED_CONTEXT"),
    (dict(volumes=["a"], attributes="bogus"), "VSS_E_UNSUPPORTED_CONTEXT"),
    (dict(volumes=["a", "nosuch"]), "VSS_E_OBJECT_NOT_FOUND"),
    (dict(volumes=["a", "/etc/passwd"]), "VSS_E_VOLUME_NOT_SUPPORTED"),
    (dict(volumes=["a", "b", "a"]), "VSS_E_OBJECT_ALREADY_EXISTS"),
    (dict(volumes=[f"v{i}" for i in range(65)]), "VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED"),
    (dict(volumes=[]), "E_INVALIDARG"),
    (dict(volumes=["a"], kind="mirror"), "E_INVALIDARG"),
]


@pytest.mark.parametrize("kwargs,name", BAD_CREATE, ids=[n + "-" + str(i) for i, (_, n)
                                                          in enumerate(BAD_CREATE)])
def test_bad_input_leaves_nothing(env: Env, kwargs: dict[str, Any], name: str) -> None:
    before = disk_state(env.pool)

    async def fn(c: Coordinator) -> None:
        with pytest.raises(VssError) as ei:
            await c.create(c.open_session(), **kwargs)
        assert ei.value.name == name, ei.value
        assert ei.value.message and "\n" not in ei.value.message
        assert_no_trace(env, before)
    env.run(fn)


def test_snapshot_of_a_snapshot_is_refused(env: Env) -> None:
    async def fn(c: Coordinator) -> None:
        sess = c.open_session()
        res = await c.create(sess, ["a"], "nas-rollback")
        with pytest.raises(VssError) as ei:
            await c.create(sess, [res["snapshots"][0]["snapshot_id"]], "nas-rollback")
        assert ei.value.name == "VSS_E_VOLUME_NOT_SUPPORTED"
    env.run(fn)


def test_sixty_four_volumes_then_one_more(tmp_path: Path) -> None:
    env = Env(tmp_path, volumes=tuple(f"v{i}" for i in range(65)), size=1 << 20)
    try:
        async def fn(c: Coordinator) -> None:
            sess = c.open_session()
            c.start_snapshot_set(sess, "nas-rollback")
            for i in range(64):
                c.add_to_snapshot_set(sess, f"v{i}")
            with pytest.raises(VssError) as ei:
                c.add_to_snapshot_set(sess, "v64")
            assert ei.value.name == "VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED"
            snaps = await c.do_snapshot_set(sess)
            assert len(snaps) == 64 and snaps[0]["snapshots_count"] == 64
        env.run(fn)
    finally:
        env.close()


def test_calls_out_of_order(env: Env) -> None:
    before = disk_state(env.pool)

    async def fn(c: Coordinator) -> None:
        sess = c.open_session()

        async def expect(name: str, coro_or_fn: Any) -> None:
            with pytest.raises(VssError) as ei:
                r = coro_or_fn()
                if hasattr(r, "__await__"):
                    await r
            assert ei.value.name == name, ei.value

        await expect("VSS_E_BAD_STATE", lambda: c.add_to_snapshot_set(sess, "a"))
        await expect("VSS_E_BAD_STATE", lambda: c.do_snapshot_set(sess))
        await expect("VSS_E_BAD_STATE", lambda: c.abort_snapshot_set(sess))
        await expect("VSS_E_BAD_STATE", lambda: c.end_backup(sess))
        set_id = c.start_snapshot_set(sess, "nas-rollback")
        await expect("VSS_E_BAD_STATE", lambda: c.do_snapshot_set(sess))       # empty set
        await expect("VSS_E_OBJECT_NOT_FOUND",
                     lambda: c.add_to_snapshot_set(sess, "a", str(uuid.uuid4())))
        await expect("E_INVALIDARG", lambda: c.add_to_snapshot_set(sess, "a", "not-a-guid"))
        c.add_to_snapshot_set(sess, "a")
        await c.do_snapshot_set(sess, set_id)
        await expect("VSS_E_BAD_STATE", lambda: c.add_to_snapshot_set(sess, "b", set_id))
        await expect("VSS_E_BAD_STATE", lambda: c.do_snapshot_set(sess, set_id))
        await c.snapshot_delete(set_id=set_id)
        assert_no_trace(env, before)
    env.run(fn)


def test_plex_without_room(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    before = disk_state(env.pool)

    async def fn(c: Coordinator) -> None:
        monkeypatch.setattr(c.hardware, "available_bytes", lambda: 1000)
        assert not c.hardware.AreLunsSupported(["a"], int(Attr.PLEX))
        assert c.hardware.AreLunsSupported(["a"], 0)
        with pytest.raises(VssError) as ei:
            await c.create(c.open_session(), ["a"], "backup", kind="plex")
        assert ei.value.name == "VSS_E_INSUFFICIENT_STORAGE"
        assert_no_trace(env, before)
        # policy plex without room: automagic falls back to differential
        c.hardware.default_kind = "plex"
        res = await c.create(c.open_session(), ["a"], "nas-rollback")
        assert res["snapshots"][0]["kind"] == "differential"
    env.run(fn)


# --------------------------------------------------------------------------- queries etc.
def test_delete_selectors(env: Env) -> None:
    async def fn(c: Coordinator) -> None:
        sess = c.open_session()
        r1 = await c.create(sess, ["a", "b"], "nas-rollback")
        r2 = await c.create(sess, ["a"], "app-rollback")
        r3 = await c.create(sess, ["a", "b"], "app-rollback")
        oldest_a = r1["snapshots"][0]["snapshot_id"]
        res = await c.snapshot_delete(oldest="a")
        assert res["deleted"] == [oldest_a]
        res = await c.snapshot_delete(snapshot_id=r2["snapshots"][0]["snapshot_id"])
        assert res["count"] == 1
        assert r2["set_id"] not in {s["set_id"] for s in c.set_list()}
        res = await c.snapshot_delete(set_id=r3["set_id"])
        assert res["count"] == 2
        res = await c.snapshot_delete(all=True, context="app-rollback")
        assert res["count"] == 0
        res = await c.snapshot_delete(all=True)
        assert res["count"] == 1
        assert c.set_list() == [] and c.catalog.sets() == {}
        for kw in ({}, {"snapshot_id": oldest_a, "all": True}):
            with pytest.raises(VssError) as ei:
                await c.snapshot_delete(**kw)
            assert ei.value.name == "E_INVALIDARG"
        with pytest.raises(bse.NotFound):     # store errors get their VSS name on the wire
            await c.snapshot_delete(snapshot_id=oldest_a)
    env.run(fn)


def test_expose_by_name(env: Env) -> None:
    async def fn(c: Coordinator) -> None:
        sess = c.open_session()
        r = await c.create(sess, ["a"], "nas-rollback")
        sid = r["snapshots"][0]["snapshot_id"]
        p = await c.expose(sid, name="monday")
        assert p["exposed_name"] == "monday" and p["attributes"] & Attr.EXPOSED_LOCALLY
        assert env.pool.snapshot(sid).exposed_name == "monday"
        for kw, name in (({}, "E_INVALIDARG"), ({"mount": "relative/dir"}, "E_INVALIDARG"),
                         ({"mount": "/tmp/x"}, "VSS_E_NOT_SUPPORTED")):
            with pytest.raises(VssError) as ei:
                await c.expose(sid, **kw)
            assert ei.value.name == name
        p = await c.unexpose(sid)
        assert p["exposed_name"] is None and not p["attributes"] & Attr.EXPOSED_LOCALLY
        with pytest.raises(VssError) as ei:
            await c.unexpose(sid)
        assert ei.value.name == "VSS_E_BAD_STATE"
    env.run(fn)


def test_revert_promote_split_with_progress(env: Env) -> None:
    prog: list[str] = []

    async def fn(c: Coordinator) -> None:
        sess = c.open_session()
        env.pool.write("a", 0, b"one")
        r = await c.create(sess, ["a"], "nas-rollback")
        sid = r["snapshots"][0]["snapshot_id"]
        env.pool.write("a", 0, b"two")
        await c.revert(sid, progress=lambda d, t, w: prog.append(w))
        assert env.pool.read("a", 0, 3) == b"one"
        p = await c.promote(sid, progress=lambda d, t, w: prog.append(w))
        assert p["kind"] == "full"
        v = await c.split(sid, "a-copy", progress=lambda d, t, w: prog.append(w))
        assert v["name"] == "a-copy" and env.pool.read("a-copy", 0, 3) == b"one"
        assert c.set_list() == []
        chk = await c.check()
        assert chk["ok"] and chk["problems"] == [] and chk["volume"] is None
        scr = await c.scrub(progress=lambda d, t, w: prog.append(w))
        assert scr["ok"]
    env.run(fn)
    await_trio_callbacks = set(prog)
    assert {"revert", "promote", "scrub"} <= await_trio_callbacks


def test_writers_list_and_status(tmp_path: Path) -> None:
    env = Env(tmp_path, writers=(FakeWriter("w1"), FakeWriter("w2", fail="identify")))
    try:
        async def fn(c: Coordinator) -> Any:
            return await c.writers_list(), c.status()
        wl, st = env.run(fn)
        assert wl[0]["name"] == "w1" and wl[0]["components"]
        assert wl[0]["state"] == "VSS_WS_STABLE"
        assert wl[1]["name"] == "w2" and wl[1]["state"] == "VSS_WS_FAILED_AT_IDENTIFY"
        assert "on purpose" in wl[1]["last_error"]
        assert st["writers"] == ["w1", "w2"] and st["volumes"] == 2
    finally:
        env.close()


# --------------------------------------------------------------------------- one instant
def test_multi_volume_set_is_one_instant(env: Env) -> None:
    """A writer thread writes counter n to both volumes, a then b for odd n, b then a for
    even n. In every snapshot pair the counters are equal, or differ by one with the
    volume written first in that round ahead."""
    stop = threading.Event()
    rounds = [0]

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            data = n.to_bytes(8, "little")
            order = ("a", "b") if n % 2 else ("b", "a")
            for v in order:
                env.pool.write(v, 0, data)
            rounds[0] = n

    for v in ("a", "b"):
        env.pool.write(v, 0, bytes(8))

    async def fn(c: Coordinator) -> list[tuple[int, int]]:
        sess = c.open_session()
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        pairs = []
        try:
            for i in range(25):
                # the writer has written since the last snapshot (a loaded machine can
                # starve its thread): every snapshot races a writer that is running
                seen, end = rounds[0], trio.current_time() + 30
                while rounds[0] == seen and trio.current_time() < end:
                    await trio.sleep(0.001)
                kind = "plex" if i % 5 == 4 else "differential"
                r = await c.create(sess, ["a", "b"], "nas-rollback", kind=kind)
                by = {s["volume"]: s["snapshot_id"] for s in r["snapshots"]}
                va = int.from_bytes(env.pool.read(by["a"], 0, 8), "little")
                vb = int.from_bytes(env.pool.read(by["b"], 0, 8), "little")
                pairs.append((va, vb))
                await trio.sleep(0.002)
        finally:
            stop.set()
            t.join()
        return pairs

    pairs = env.run(fn)
    assert rounds[0] > 25
    mid_write = 0
    for va, vb in pairs:
        if va == vb:
            continue
        mid_write += 1
        n = max(va, vb)
        assert abs(va - vb) == 1, (va, vb)
        first = "a" if n % 2 else "b"
        ahead = "a" if va > vb else "b"
        assert ahead == first, (va, vb)
    assert len({p for p in pairs}) == len(pairs)   # the counter moved between sets


def test_sets_deleted_by_the_store_are_forgotten(env: Env) -> None:
    """Diff-area overflow deletes snapshots behind the coordinator's back (VSS
    behaviour): the set record goes, check stays clean."""
    async def fn(c: Coordinator) -> None:
        r = await c.create(c.open_session(), ["a"], "nas-rollback")
        env.pool.delete_snapshot(r["snapshots"][0]["snapshot_id"])   # as _overflow does
        assert c.set_list() == []
        assert (await c.check())["problems"] == []
        assert c.catalog.sets() == {}
    env.run(fn)
