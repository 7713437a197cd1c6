"""The Array interface (provider/array.py) holds as a seam (issue 13 #1).

Every test here runs over the embedded pool (blockstore.Pool in tmp_path), over an
in-memory fake (tests/fake_array.py) that shares no code with the pool, and over Ceph RBD
(rbdarray.RbdArray on conftest's one-node cluster; a test of what its capabilities say
it cannot do -- plex, promote -- is skipped there, by that name). The
first half pins down the interface's semantics (both backends answer the same); the
second runs the provider layer -- the hardware provider's VSS sequence, the
coordinator's sets, aborts at every state, exposure, revert/promote/split, restart
-- over each backend, through nothing but the interface; and the in-process provider
suites (coordinator, transport, control protocol, cancellation) run whole over the
fake (SHADOWPLEX_TEST_ARRAY=fake, tests/provider_env.py). A static test keeps it so:
only the composition root (daemon.py) names the concrete Pool.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_array import FakeArray

from blockstore import Pool
from blockstore import errors as bse
from blockstore.model import Capabilities
from fuse_mount.barrier import WriteBarrier
from provider.array import Array
from provider.coordinator import Coordinator, SnapshotSet
from provider.hardware import HardwareProvider
from provider.vss import Attr, SnapshotState, VssError

ROOT = Path(__file__).resolve().parent.parent
CS = 65536
MiB = 1 << 20


@pytest.fixture(params=["pool", "fake", "rbd"])
def array(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Array]:
    a: Any
    if request.param == "pool":
        a = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    elif request.param == "rbd":
        ceph = request.getfixturevalue("ceph")    # the session's cluster, on first use
        from rbdarray import RbdArray
        a = RbdArray(ceph.pool, ceph.conf, str(tmp_path), object_size=CS)
    else:
        (tmp_path / "fake").mkdir()
        a = FakeArray(str(tmp_path / "fake"))
    try:
        a.create_volume("a", 4 * MiB)
        a.create_volume("b", 4 * MiB)
        a.write("a", 0, b"a" * 3 * CS)
        a.write("b", CS, b"b" * CS)
        yield a
    finally:
        if request.param != "fake":
            a.close()
        if request.param == "rbd":
            from ceph_cluster import wipe
            wipe(ceph.conf, ceph.pool)


def needs(array: Array, *what: str) -> None:
    """Skip unless the array's capabilities include every one of `what`."""
    lacking = [w for w in what if not getattr(array.capabilities, w)]
    if lacking:
        pytest.skip(f"{type(array).__name__} does not offer {', '.join(lacking)} "
                    "(its capabilities say so)")


def guid() -> str:
    return str(uuid.uuid4())


def snap(array: Array, *volumes: str, kind: str = "differential") -> list[str]:
    """A committed snapshot set of ``volumes`` (plexes synced first); the ids."""
    set_id = guid()
    ids = [array.prepare_snapshot(v, kind, guid(), set_id).id for v in volumes]
    if kind == "plex":
        for sid in ids:
            while True:
                done, total = array.plex_sync_step(sid, CS)
                if done >= total:
                    break
    array.commit_snapshots(ids)
    return ids


# ============================================================== the interface itself
def test_volumes(array: Array) -> None:
    g = array.generation
    v = array.create_volume("c", MiB)
    assert array.generation != g
    assert (v.name, v.size, v.read_only) == ("c", MiB, False) and v.naa
    assert [x.name for x in array.list_volumes()] == ["a", "b", "c"]
    assert len({x.naa for x in array.list_volumes()}) == 3
    assert array.resize_volume("c", 2 * MiB).size == 2 * MiB == array.lun_size("c")
    for call, err in ((lambda: array.create_volume("c", MiB), bse.Exists),
                      (lambda: array.create_volume("-x", MiB), bse.InvalidName),
                      (lambda: array.create_volume("d", 1000), bse.InvalidSize),
                      (lambda: array.resize_volume("c", MiB), bse.InvalidSize),
                      (lambda: array.volume("nosuch"), bse.NotFound),
                      (lambda: array.delete_volume("nosuch"), bse.NotFound)):
        with pytest.raises(err):
            call()
    array.delete_volume("c")
    assert [x.name for x in array.list_volumes()] == ["a", "b"]
    assert isinstance(array.capabilities, Capabilities)
    assert array.capabilities.max_snapshots_per_volume > 0
    total, free = array.statfs()
    assert 0 <= array.available_bytes() <= free <= total


def test_data_path(array: Array) -> None:
    data = bytes(range(256)) * 600                     # crosses chunk boundaries
    assert array.write("a", CS - 100, data) == len(data)
    array.flush("a")
    assert array.read("a", CS - 100, len(data)) == data
    assert array.read("a", 4 * MiB - 10, 100) == bytes(10)   # short at the end
    assert array.read("a", 4 * MiB, 10) == b""
    with pytest.raises(bse.OutOfRange):
        array.write("a", 4 * MiB - 1, b"xx")
    array.discard("a", CS, CS)
    assert array.read("a", CS, CS) == bytes(CS)
    assert array.read("a", 0, 4) == b"aaaa"
    with pytest.raises(bse.NotFound):
        array.read("nosuch", 0, 1)
    assert array.allocated_bytes("a") >= 2 * CS


def _check_map(array: Array, key: str, written: list[tuple[int, int]]) -> None:
    """allocation() of the whole LUN: sorted, merged, inside the LUN; every byte outside
    it reads as zero; every range in ``written`` (known non-zero data) is inside it."""
    size = array.lun_size(key)
    runs = array.allocation(key, 0, size)
    assert runs == sorted(runs) and all(n > 0 for _, n in runs), runs
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:])), runs   # merged
    data = array.read(key, 0, size)
    pos = 0
    for o, n in [*runs, (size, 0)]:
        assert data[pos:o] == bytes(o - pos), (key, pos, o)
        pos = o + n
    for o, n in written:
        assert any(a <= o and o + n <= a + m for a, m in runs), (key, (o, n), runs)
    assert array.allocation(key, size, 100) == []
    inner = array.allocation(key, CS + 10, CS)   # a sub-range: clipped to it
    assert all(a >= CS + 10 and a + n <= 2 * CS + 10 for a, n in inner), inner


@pytest.mark.parametrize("kind", ["differential", "plex"])
def test_allocation_map(array: Array, kind: str) -> None:
    """Volumes and snapshots say where their data may be, through writes, discards and
    an overwrite after the snapshot (the snapshot keeps its map)."""
    if kind == "plex":
        needs(array, "plex")
    _check_map(array, "a", [(0, 3 * CS)])
    _check_map(array, "b", [(CS, CS)])
    array.write("a", 10 * CS + 5, b"x" * 100)
    (sid,) = snap(array, "a", kind=kind)
    array.write("a", 20 * CS, b"y" * CS)                 # after the snapshot
    array.write("a", 0, b"z" * 10)                       # preserved first
    array.discard("a", CS, CS)                           # the snapshot keeps it
    before = [(0, 3 * CS), (10 * CS + 5, 100)]
    _check_map(array, sid, before)
    _check_map(array, "a", [(0, 10), (2 * CS, CS), (10 * CS + 5, 100), (20 * CS, CS)])
    assert not any(a <= CS < a + n for a, n in array.allocation("a", CS, CS)) or \
        array.read("a", CS, CS) == bytes(CS)
    assert array.allocation(sid, 30 * CS, CS) == []      # never written anywhere
    array.flush("a")
    _check_map(array, sid, before)


@pytest.mark.parametrize("kind", ["differential", "plex"])
def test_snapshot_is_the_instant(array: Array, kind: str) -> None:
    if kind == "plex":
        needs(array, "plex")
    set_id, sa, sb = guid(), guid(), guid()
    info = array.prepare_snapshot("a", kind, sa, set_id, int(Attr.HARDWARE_ASSISTED))
    array.prepare_snapshot("b", kind, sb, set_id)
    assert info.state == "preparing" and info.id == sa and info.set_id == set_id
    with pytest.raises(bse.StoreError):               # not readable before the commit
        array.read(sa, 0, 1)
    if kind == "plex":
        for sid in (sa, sb):
            while array.plex_sync_step(sid, CS)[0] < array.snapshot(sid).sync_total:
                pass
    array.write("a", 0, b"1")                           # before the instant: in it
    array.commit_snapshots([sa, sb])
    array.write("a", 0, b"2" * (CS + 1))                # after: not in it
    array.write("b", CS, b"3")
    assert array.read(sa, 0, 2) == b"1a" and array.read(sa, CS, 1) == b"a"
    assert array.read(sb, CS, 2) == b"bb"
    assert array.read("a", 0, 1) == b"2"
    s = array.snapshot(sa)
    assert (s.state, s.kind, s.volume, s.size) == ("committed", kind, "a", 4 * MiB)
    assert s.naa and s.naa != array.volume("a").naa and s.origin_naa == array.volume("a").naa
    assert array.volume("a").snapshots == 1
    assert {x.id for x in array.list_snapshots("a")} == {sa}
    with pytest.raises(bse.StoreError):
        array.write(sa, 0, b"x")                        # a snapshot is read-only
    with pytest.raises(bse.InvalidState):
        array.abort_snapshot(sa)
    with pytest.raises(bse.Busy):
        array.delete_volume("a")
    array.delete_snapshot(sa)
    with pytest.raises(bse.NotFound):
        array.snapshot(sa)
    assert array.check() == []


def test_abort_and_all_or_nothing_commit(array: Array) -> None:
    (done,) = snap(array, "a")
    fresh = array.prepare_snapshot("b", "differential", guid(), guid()).id
    with pytest.raises(bse.StoreError):     # one of them is committed already
        array.commit_snapshots([fresh, done])
    assert array.snapshot(fresh).state == "preparing"
    array.abort_snapshot(fresh)
    assert [s.id for s in array.list_snapshots()] == [done]


def test_exposure_names(array: Array) -> None:
    s1, s2 = snap(array, "a", "b")
    g = array.generation
    assert array.set_exposed(s1, "monday").exposed_name == "monday"
    assert array.generation != g
    with pytest.raises(bse.Exists):
        array.set_exposed(s2, "monday")
    assert array.set_exposed(s1, None).exposed_name is None
    array.set_exposed(s2, "monday")


def test_promote_split_revert(array: Array) -> None:
    needs(array, "promote", "split", "revert")
    (sid,) = snap(array, "a")
    array.write("a", 0, b"after")
    p = array.promote(sid)
    assert (p.id, p.kind) == (sid, "full") and array.read(sid, 0, 3) == b"aaa"
    with pytest.raises(bse.Unsupported):
        array.promote(sid)
    array.revert("a", sid)
    assert array.read("a", 0, 5) == b"aaaaa"
    steps: list[tuple[int, int]] = []
    (sid2,) = snap(array, "b")
    v = array.split(sid2, "b-copy", lambda d, t: steps.append((d, t)))
    assert v.name == "b-copy" and v.naa != array.volume("b").naa and not v.read_only
    assert steps and steps[-1][0] == steps[-1][1]
    assert array.read("b-copy", CS, 2) == b"bb"
    with pytest.raises(bse.NotFound):
        array.snapshot(sid2)
    array.write("b-copy", 0, b"rw")
    assert array.check() == [] and array.scrub() == []


# ============================================================== the provider over it
def test_hardware_provider_sequence(array: Array) -> None:
    needs(array, "plex", "revert")
    hw = HardwareProvider(array, "/mnt/spx")
    assert hw.AreLunsSupported(["a", "b"], 0)
    assert not hw.AreLunsSupported(["a", "nosuch"], 0)
    lun = hw.FillInLunInfo("a")
    assert lun.naa == array.volume("a").naa and lun.device_path == "/mnt/spx/volumes/a.img"
    set_id, sa, sb = guid(), guid(), guid()
    hw.BeginPrepareSnapshot(set_id, sa, "a", int(Attr.PLEX))
    hw.BeginPrepareSnapshot(set_id, sb, "b", int(Attr.DIFFERENTIAL))
    seen: list[tuple[int, int]] = []
    hw.EndPrepareSnapshots(set_id, lambda d, t: seen.append((d, t)), timeout=30)
    assert seen and seen[-1][0] == seen[-1][1] > 0
    hw.PreCommitSnapshots(set_id)
    array.write("a", 0, b"before")
    hw.CommitSnapshots(set_id)
    array.write("a", 0, b"after!")
    hw.PostCommitSnapshots(set_id, 2)
    hw.PreFinalCommitSnapshots(set_id)
    hw.PostFinalCommitSnapshots(set_id)
    assert array.read(sa, 0, 6) == b"before" and array.read("a", 0, 6) == b"after!"
    want = int(Attr.PLEX | Attr.HARDWARE_ASSISTED)
    assert array.snapshot(sa).attributes & want == want
    targets = hw.GetTargetLuns([sa, sb])
    assert [t.snapshot_id for t in targets] == [sa, sb]
    assert hw.LocateLuns([targets[1].naa.upper()])[0].snapshot_id == sb
    hw.ResyncLuns(sa)
    assert array.read("a", 0, 6) == b"before"
    hw.OnLunEmpty(sb)
    assert [s.id for s in array.list_snapshots()] == [sa]


@pytest.mark.parametrize("stage", ["prepared", "synced", "committed"])
def test_hardware_abort_leaves_nothing(array: Array, stage: str) -> None:
    hw = HardwareProvider(array)
    set_id = guid()
    first = Attr.PLEX if array.capabilities.plex else Attr.DIFFERENTIAL
    hw.BeginPrepareSnapshot(set_id, guid(), "a", int(first))
    hw.BeginPrepareSnapshot(set_id, guid(), "b", int(Attr.DIFFERENTIAL))
    if stage != "prepared":
        hw.EndPrepareSnapshots(set_id, timeout=30)
    if stage == "committed":
        hw.PreCommitSnapshots(set_id)
        hw.CommitSnapshots(set_id)
    assert len(hw.AbortSnapshots(set_id)) == 2
    assert array.list_snapshots() == [] and array.check() == []
    assert hw.AbortSnapshots(set_id) == []


def test_capabilities_decide_what_is_offered(tmp_path: Path) -> None:
    """A backend without plex or revert: AreLunsSupported says no to a plex (and the
    automagic policy falls back to differential); revert is refused by name."""
    caps = Capabilities(plex=False, promote=True, split=True, revert=False,
                        reflink=False, changed_blocks=False, max_snapshots_per_volume=2)
    a = FakeArray(str(tmp_path), caps)
    a.create_volume("a", MiB)
    hw = HardwareProvider(a, default_kind="plex")
    assert not hw.AreLunsSupported(["a"], int(Attr.PLEX))
    assert hw.AreLunsSupported(["a"], 0)
    assert hw.choose_kind(0, ["a"]) == "differential"
    err = hw.why_not_supported(["a"], int(Attr.PLEX))
    assert err is not None and err.name == "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER"
    ids = [snap(a, "a")[0] for _ in range(2)]
    err = hw.why_not_supported(["a"], 0)
    assert err is not None and err.name == "VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED"
    with pytest.raises(VssError) as ei:
        hw.ResyncLuns(ids[0])
    assert ei.value.name == "VSS_E_NOT_SUPPORTED"
    assert a.read("a", 0, 1) == bytes(1)


def test_coordinator_refuses_what_the_array_cannot_do(tmp_path: Path) -> None:
    caps = Capabilities(plex=False, promote=False, split=False, revert=False,
                        reflink=False, changed_blocks=False, max_snapshots_per_volume=8)
    a = FakeArray(str(tmp_path), caps)
    a.create_volume("a", MiB)

    async def fn(c: Coordinator) -> None:
        r = await c.create(c.open_session(), ["a"], "app-rollback")
        sid = r["snapshots"][0]["snapshot_id"]
        assert r["snapshots"][0]["kind"] == "differential"
        for call in (c.revert(sid), c.promote(sid), c.split(sid, "b")):
            with pytest.raises(VssError) as ei:
                await call
            assert ei.value.name == "VSS_E_NOT_SUPPORTED", ei.value
        assert [v.name for v in a.list_volumes()] == ["a"]
        assert a.snapshot(sid).kind == "differential"

    run(a, fn, {"default_kind": "plex"})


def run(array: Array, fn: Callable[[Coordinator], Awaitable[Any]],
        config: dict[str, Any] | None = None) -> Any:
    async def main() -> Any:
        coord = Coordinator(array, WriteBarrier(array), None, [], dict(config or {}))
        await coord.start()
        try:
            return await fn(coord)
        finally:
            await coord.stop()
    return trio.run(main)


DO_STATES = [SnapshotState.PROCESSING_PREPARE, SnapshotState.PRECOMMITTED,
             SnapshotState.COMMITTED, SnapshotState.PROCESSING_POSTFINALCOMMIT]


@pytest.mark.parametrize("state", DO_STATES, ids=[s.name for s in DO_STATES])
def test_coordinator_abort_leaves_nothing(array: Array, state: SnapshotState) -> None:
    async def fn(c: Coordinator) -> Any:
        def hook(s: SnapshotSet, st: SnapshotState) -> None:
            array.write("a", 0, b"W" * 2 * CS)
            if st == state:
                raise VssError("VSS_E_UNEXPECTED_PROVIDER_ERROR", f"injected at {st.name}")
        c.state_hook = hook
        sess = c.open_session()
        with pytest.raises(VssError, match="injected"):
            await c.create(sess, ["a", "b"], "app-rollback",
                           kind="plex" if array.capabilities.plex else "differential")
        assert array.list_snapshots() == [] and c.set_list() == []
        c.state_hook = None
        return await c.create(sess, ["a", "b"], "app-rollback")

    res = run(array, fn)
    assert len(res["snapshots"]) == 2 and array.check() == []


def test_coordinator_life_cycle(array: Array) -> None:
    """Create, expose, revert, promote, split, delete, check -- and a restart of the
    coordinator finds the persistent set again."""
    needs(array, "revert", "promote", "split")
    async def first(c: Coordinator) -> Any:
        sess = c.open_session()
        array.write("a", 0, b"one")
        r = await c.create(sess, ["a", "b"], "app-rollback")
        by = {s["volume"]: s["snapshot_id"] for s in r["snapshots"]}
        array.write("a", 0, b"two")
        assert array.read(by["a"], 0, 3) == b"one"
        p = await c.expose(by["a"], name="monday")
        assert p["exposed_name"] == "monday"
        await c.unexpose(by["a"])
        await c.revert(by["a"])
        assert array.read("a", 0, 3) == b"one"
        assert (await c.promote(by["a"]))["kind"] == "full"
        st = c.status()
        assert st["snapshots"] == 2 and st["pool_id"] == array.pool_id
        assert st["capabilities"]["plex"] is True
        assert st["capabilities"]["max_snapshots_per_volume"] == \
            array.capabilities.max_snapshots_per_volume
        return r["set_id"], by

    set_id, by = run(array, first)

    async def second(c: Coordinator) -> None:
        assert {s["set_id"] for s in c.set_list()} == {set_id}
        v = await c.split(by["a"], "a-copy")
        assert v["name"] == "a-copy" and array.read("a-copy", 0, 3) == b"one"
        assert (await c.snapshot_delete(set_id=set_id))["count"] == 1
        assert c.set_list() == [] and array.list_snapshots() == []
        assert (await c.check())["problems"] == []

    run(array, second)


# The provider suites that run the coordinator in process (tests/provider_env.Env), as a
# whole, over the fake: everything they assert of sets, aborts, lifetimes, transport,
# the control protocol and cancellation holds with an array that is not the pool.
FAKE_SUITES = ["tests/test_provider_coordinator.py", "tests/test_transport_unit.py",
               "tests/test_provider_control.py", "tests/test_cancel.py"]


def test_provider_suites_over_the_fake_array() -> None:
    env = dict(os.environ, SHADOWPLEX_TEST_ARRAY="fake", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *FAKE_SUITES], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
    assert int(summary.split()[0]) >= 100, summary   # the suites ran, not a collection


# ============================================================== the seam stays a seam
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "blockstore":
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("blockstore")}
    return names


def test_only_the_composition_root_names_the_pool() -> None:
    """provider/ and fuse_mount/ use the Array interface; the concrete Pool is chosen in
    one place (the daemon, which opens it). Records, errors and rules
    (blockstore.model, .errors, .names) are the interface's vocabulary and are fine."""
    allowed = {"provider/daemon.py",
               "provider/array.py"}   # its TYPE_CHECKING proof that a Pool is an Array
    bad = []
    for pkg in ("provider", "fuse_mount"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in allowed:
                continue
            pools = {n for n in _imports(path)
                     if n == "blockstore.Pool" or n.startswith("blockstore.pool")}
            if pools:
                bad.append(f"{rel}: {sorted(pools)}")
    assert bad == [], "\n".join(bad)
