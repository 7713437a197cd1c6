"""RbdArray (rbdarray/, issue 18) against a real one-node Ceph cluster (conftest's
session fixture ``ceph``, tests/ceph_cluster.py): volumes and snapshots through their
life cycle, a snapshot keeps its data under overwrites, a set of three volumes committed
at one instant, what is stored on the images survives a restart of the array, changed
extents exactly as written, an interrupted commit is finished or undone on open, and
librbd's errors arrive as blockstore.errors. tests/test_array_contract.py runs the
interface's and the provider's own tests over it too (its ``rbd`` parameter)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from blockstore import Tally
from blockstore import errors as bse
from rbdarray import RbdArray
from rbdarray.errors import mapped
from rbdarray.records import SnapRecord, rbd_snap_name, snap_key

CS = 65536
MiB = 1 << 20


def reopen(a: RbdArray, ceph: Any) -> RbdArray:
    """A restart: the array closed and opened again from what is on the cluster."""
    path = a.path
    a.close()
    return RbdArray(ceph.pool, ceph.conf, path)


def guid() -> str:
    return str(uuid.uuid4())


def snap(a: RbdArray, *volumes: str) -> list[str]:
    set_id = guid()
    ids = [a.prepare_snapshot(v, "differential", guid(), set_id).id for v in volumes]
    a.commit_snapshots(ids)
    return ids


def test_identity(arr: RbdArray, ceph: Any) -> None:
    assert len(arr.pool_id) == 32 and int(arr.pool_id, 16) >= 0
    caps = arr.capabilities
    assert (caps.plex, caps.promote, caps.split, caps.revert, caps.changed_blocks) == \
        (False, False, True, True, True)
    assert arr.chunk_size == CS
    again = RbdArray(ceph.pool, ceph.conf, arr.path)
    try:
        assert again.pool_id == arr.pool_id          # stable: fsid + pool name
    finally:
        again.close()
    total, free = arr.statfs()
    assert total == 2 << 30 and 0 <= arr.available_bytes() <= free <= total   # the quota


def test_volume_and_snapshot_life_cycle(arr: RbdArray) -> None:
    g = arr.generation
    v = arr.create_volume("v", 4 * MiB)
    assert arr.generation != g and (v.name, v.size, v.read_only, v.snapshots) == \
        ("v", 4 * MiB, False, 0)
    assert arr.resize_volume("v", 8 * MiB).size == 8 * MiB == arr.lun_size("v")
    with pytest.raises(bse.InvalidSize):
        arr.resize_volume("v", 4 * MiB)
    arr.write("v", 0, b"old!" * 1024)
    arr.write("v", 5 * MiB, b"far" * 10)
    info = arr.prepare_snapshot("v", "differential", guid(), guid(), 7)
    assert info.state == "preparing" and info.attributes == 7
    with pytest.raises(bse.InvalidState):              # not readable before the commit
        arr.read(info.id, 0, 1)
    assert arr.volume("v").snapshots == 0
    arr.commit_snapshots([info.id])
    arr.write("v", 0, b"NEW!" * 2048)                   # overwrite after the snapshot
    arr.discard("v", 5 * MiB, 30)
    arr.flush("v")
    assert arr.read(info.id, 0, 8) == b"old!old!" and arr.read(info.id, 4096, 4) == bytes(4)
    assert arr.read(info.id, 5 * MiB, 6) == b"farfar"
    assert arr.read("v", 0, 4) == b"NEW!" and arr.read("v", 5 * MiB, 3) == bytes(3)
    s = arr.snapshot(info.id)
    assert (s.state, s.kind, s.volume, s.size) == ("committed", "differential", "v", 8 * MiB)
    assert s.naa != arr.volume("v").naa == s.origin_naa and arr.volume("v").snapshots == 1
    with pytest.raises(bse.ReadOnly):
        arr.write(info.id, 0, b"x")
    with pytest.raises(bse.InvalidState):
        arr.abort_snapshot(info.id)
    with pytest.raises(bse.Busy):
        arr.delete_volume("v")
    arr.delete_snapshot(info.id)
    with pytest.raises(bse.NotFound):
        arr.read(info.id, 0, 1)
    aborted = arr.prepare_snapshot("v", "differential", guid(), guid()).id
    arr.abort_snapshot(aborted)
    assert arr.list_snapshots() == [] and arr.check() == []
    arr.delete_volume("v")
    assert arr.list_volumes() == []


def test_a_set_is_one_instant(arr: RbdArray) -> None:
    """Writer threads keep writing numbered writes (one global order: write k goes to
    volume k % 3, its number as the content) while a set of the three volumes is
    committed. One instant C: every snapshot holds its volume's last write numbered <= C
    -- a commit that let a write through between two volumes' snapshots fails this."""
    names = ["x", "y", "z"]
    for n in names:
        arr.create_volume(n, 4 * MiB)
    history: dict[str, list[int]] = {n: [] for n in names}
    seq = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set() and seq[0] < 100000:
            with lock:
                seq[0] += 1
                k = seq[0]
                name = names[k % 3]
                arr.write(name, 0, k.to_bytes(8, "big"))
                history[name].append(k)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        while seq[0] < 30:
            stop.wait(0.001)
        ids = snap(arr, *names)
        before = seq[0]
        while seq[0] < before + 30:     # and the writers went on after it
            stop.wait(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    seen = {n: int.from_bytes(arr.read(i, 0, 8), "big") for n, i in zip(names, ids)}
    cut = max(seen.values())
    for n in names:
        assert seen[n] == max(k for k in history[n] if k <= cut), (n, seen, cut)
        assert history[n][-1] > seen[n]           # written after the instant too
    assert {s.set_id for s in arr.list_snapshots()} == {arr.snapshot(ids[0]).set_id}
    assert [arr.snapshot(i).volume for i in ids] == names


def test_state_on_the_images_survives_a_restart(arr: RbdArray, ceph: Any) -> None:
    arr.create_volume("a", 2 * MiB)
    arr.create_volume("b", MiB)
    naa = {v.name: v.naa for v in arr.list_volumes()}
    arr.write("a", CS, b"data")
    set_id = guid()
    sa = arr.prepare_snapshot("a", "differential", guid(), set_id, 0x20).id
    sb = arr.prepare_snapshot("b", "differential", guid(), set_id).id
    arr.commit_snapshots([sa, sb])
    arr.set_exposed(sa, "monday")
    before = {s.id: s for s in arr.list_snapshots()}
    pending = arr.prepare_snapshot("a", "differential", guid(), guid()).id
    arr2 = reopen(arr, ceph)
    try:
        assert {v.name: v.naa for v in arr2.list_volumes()} == naa
        after = {s.id: s for s in arr2.list_snapshots()}
        assert after == before                       # naa, set, attributes, exposure...
        assert after[sa].exposed_name == "monday" and after[sa].attributes == 0x20
        with pytest.raises(bse.NotFound):            # a prepared one does not survive
            arr2.snapshot(pending)
        assert arr2.read(sa, CS, 4) == b"data" and arr2.check() == []
    finally:
        arr2.close()


def test_interrupted_commit_is_finished_or_undone_on_open(arr: RbdArray, ceph: Any) -> None:
    """A crash inside commit_snapshots, replayed by hand on the images: records written,
    only some RBD snapshots made -> the set is removed; all made, none marked done ->
    the set is kept (and marked)."""
    for n in ("p", "q"):
        arr.create_volume(n, MiB)
    image = {n: arr._vols[n].lun.image for n in ("p", "q")}
    partial = {guid(): "p", guid(): "q"}
    whole = {guid(): "p", guid(): "q"}
    for members, made in ((partial, ["p"]), (whole, ["p", "q"])):
        for sid, vol in members.items():
            rec = SnapRecord(None, "6" + uuid.uuid4().hex[:31], "differential", 0, 1.0,
                             members=members)
            image[vol].metadata_set(snap_key(sid), rec.dump())
            if vol in made:
                image[vol].create_snap(rbd_snap_name(sid))
    arr2 = reopen(arr, ceph)
    try:
        assert {s.id for s in arr2.list_snapshots()} == set(whole)
        assert arr2.check() == []
        arr3 = reopen(arr2, ceph)
        arr2 = arr3
        assert {s.id for s in arr3.list_snapshots()} == set(whole)
    finally:
        arr2.close()


def test_changed_extents_exactly_as_written(arr: RbdArray) -> None:
    arr.create_volume("c", 16 * MiB)
    arr.write("c", 0, b"a" * 3 * CS)
    (s1,) = snap(arr, "c")
    assert arr.changed_extents(s1) == []
    writes = [(10, 5), (5 * CS + 100, CS), (4 * MiB - 10, 20), (15 * MiB, 3 * CS)]
    for o, n in writes:
        arr.write("c", o, b"w" * n)
    (s2,) = snap(arr, "c")
    arr.discard("c", 8 * MiB, 2 * CS)      # nothing was there: reads as before
    arr.write("c", 12 * MiB, b"late")
    want = [(0, CS), (5 * CS, 2 * CS), (4 * MiB - CS, 2 * CS), (15 * MiB, 3 * CS)]
    assert arr.changed_extents(s1, s2) == want
    assert arr.changed_extents(s2) == [(12 * MiB, CS)]
    assert arr.changed_extents(s1) == want[:3] + [(12 * MiB, CS), (15 * MiB, 3 * CS)]
    with pytest.raises(bse.InvalidState):
        arr.changed_extents(s2, s1)        # older
    arr.create_volume("d", MiB)
    (other,) = snap(arr, "d")
    with pytest.raises(bse.InvalidState):
        arr.changed_extents(s1, other)
    alloc = arr.allocation("c", 0, 16 * MiB)
    assert alloc[0] == (0, 3 * CS) and (12 * MiB, CS) in alloc, alloc
    assert arr.allocation(s1, 0, 16 * MiB) == [(0, 3 * CS)]
    assert arr.allocation("c", CS + 10, CS) == [(CS + 10, CS)]


def test_revert_and_split(arr: RbdArray) -> None:
    arr.create_volume("r", 2 * MiB)
    arr.write("r", 0, b"one")
    (sid,) = snap(arr, "r")
    arr.resize_volume("r", 4 * MiB)
    arr.write("r", 0, b"two")
    arr.write("r", MiB, b"new")           # where the snapshot has no data
    arr.write("r", 3 * MiB, b"tail")
    arr.revert("r", sid)
    assert arr.read("r", 0, 3) == b"one" and arr.lun_size("r") == 2 * MiB
    # a revert leaves a hole where the snapshot had one
    assert arr.read("r", MiB, 3) == bytes(3) and arr.allocation("r", 0, 2 * MiB) == \
        [(0, arr.chunk_size)]
    steps: list[tuple[int, int]] = []
    v = arr.split(sid, "r-copy", lambda d, t: steps.append((d, t)))
    assert v.name == "r-copy" and v.naa != arr.volume("r").naa and v.size == 2 * MiB
    assert steps and steps[-1][0] == steps[-1][1] > 1   # bytes: the allocated ones
    with pytest.raises(bse.NotFound):
        arr.snapshot(sid)
    arr.write("r-copy", 0, b"mine")
    assert arr.read("r", 0, 3) == b"one" and arr.read("r-copy", 0, 4) == b"mine"
    (sid2,) = snap(arr, "r")

    def cancel(done: int, total: int) -> None:
        raise bse.Cancelled("cancelled by the test")
    with pytest.raises(bse.Cancelled):
        arr.split(sid2, "r-copy2", cancel)
    assert [x.name for x in arr.list_volumes()] == ["r", "r-copy"]
    assert arr.snapshot(sid2).state == "committed" and arr.check() == []
    tally = Tally()   # one volume's check: it and its snapshot, nothing of r-copy
    assert arr.check(volume="r", tally=tally) == [] and tally.luns == 2
    with pytest.raises(bse.NotFound):
        arr.scrub(volume="nope")


def test_errors_are_blockstore_errors(arr: RbdArray, ceph: Any) -> None:
    import rados
    import rbd
    arr.create_volume("e", MiB)
    for call, err in ((lambda: arr.create_volume("e", MiB), bse.Exists),
                      (lambda: arr.create_volume("-e", MiB), bse.InvalidName),
                      (lambda: arr.create_volume("f", 1000), bse.InvalidSize),
                      (lambda: arr.volume("nosuch"), bse.NotFound),
                      (lambda: arr.read("nosuch", 0, 1), bse.NotFound),
                      (lambda: arr.write("e", MiB - 1, b"xx"), bse.OutOfRange),
                      (lambda: arr.read("e", -1, 1), bse.OutOfRange),
                      (lambda: arr.prepare_snapshot("e", "plex"), bse.Unsupported),
                      (lambda: arr.promote(guid()), bse.Unsupported),
                      (lambda: arr.plex_sync_step(guid()), bse.Unsupported),
                      (lambda: arr.delete_snapshot(guid()), bse.NotFound)):
        with pytest.raises(err):
            call()
    # an image of that name made behind our back: Exists, from librbd's own error
    with rados.Rados(conffile=ceph.conf) as c, c.open_ioctx(ceph.pool) as io:
        rbd.RBD().create(io, "foreign", MiB)
    assert "foreign" not in {v.name for v in arr.list_volumes()}   # not ours: not listed
    with pytest.raises(bse.Exists):
        arr.create_volume("foreign", MiB)
    assert isinstance(mapped(rbd.NoSpace("full", errno=28), "writing e"), bse.NoSpace)
    assert isinstance(mapped(rbd.ImageBusy("busy", errno=16), "x"), bse.Busy)
    assert isinstance(mapped(rbd.ReadOnlyImage("ro", errno=30), "x"), bse.ReadOnly)
    assert type(mapped(rbd.IOError("eio", errno=5), "x")) is bse.StoreError
    with pytest.raises(bse.StoreError, match="connecting to Ceph"):
        RbdArray(ceph.pool, str(Path(arr.path) / "no.conf"), arr.path)
    with pytest.raises(bse.NotFound, match="pool 'nosuchpool'"):
        RbdArray("nosuchpool", ceph.conf, arr.path)


def test_allocated_bytes_never_recounts_in_the_caller(arr: RbdArray) -> None:
    """allocated_bytes walks the whole object map (the mount asks on every getattr, on
    its trio thread): exact while nothing changed, else the last figure at once while a
    worker thread counts again; a revert or resize makes it recount too."""
    arr.create_volume("v", 8 * MiB)
    assert arr.allocated_bytes("v") == 0                 # the first count, in the caller
    arr.write("v", 0, b"x" * MiB)
    arr.flush("v")
    assert arr.allocated_bytes("v") == 0                 # stale: answered without counting

    def settles(want: int) -> None:
        end = time.monotonic() + 10
        while arr.allocated_bytes("v") != want:
            assert time.monotonic() < end, f"allocated_bytes never became {want}"
            time.sleep(0.02)
    settles(MiB)
    (sid,) = snap(arr, "v")
    arr.write("v", 4 * MiB, b"y" * CS)
    settles(MiB + CS)
    arr.revert("v", sid)                                 # no write: the generation moved
    assert arr.allocated_bytes("v") == MiB + CS          # the last figure, once more...
    settles(MiB)                                         # ...then the count after revert


def test_read_async_starts_at_once_or_declines(arr: RbdArray) -> None:
    """The FUSE mount's read path (datapath.read_async: librbd's aio_read, the callback
    from a Ceph thread): the data as read() gives it, the gate held until the callback;
    declined -- without waiting -- where read() in a worker thread must do it: a gate
    held by a commit or revert, a snapshot not opened yet, past the end, no such LUN."""
    arr.create_volume("a", 4 * MiB)
    data = os.urandom(MiB)
    arr.write("a", 0, data)
    got: list[tuple[bytes | None, BaseException | None]] = []
    ended = threading.Event()

    def done(d: bytes | None, e: BaseException | None) -> None:
        got.append((d, e))
        ended.set()

    assert arr.read_async("a", 4096, 8192, done)
    assert ended.wait(10) and got == [(data[4096:12288], None)]
    (sid,) = snap(arr, "a")
    assert not arr.read_async(sid, 0, 10, done)          # its image opens on a read()
    assert arr.read(sid, 0, 10) == data[:10]
    ended.clear()
    assert arr.read_async(sid, 0, 10, done)
    assert ended.wait(10) and got[-1] == (data[:10], None)
    assert not arr.read_async("a", 4 * MiB - 10, 20, done)   # read() clips at the end
    assert not arr.read_async("nosuch", 0, 1, done)
    gate = arr._vols["a"].lun.gate
    with gate.exclusive():                               # a commit, revert, resize
        t = time.monotonic()
        assert not arr.read_async("a", 0, 1, done)
        assert time.monotonic() - t < 1
    assert gate._shared == 0 and len(got) == 2           # every completion left the gate
