"""Revert on RBD (rbdarray/revert.py, rbdarray/objectmap.py) against the real one-node
cluster (conftest's ``ceph``): the changed objects read from the object maps are
librbd's own answer; a revert makes the volume the snapshot byte for byte (xxh3),
holes, discarded and never-written ranges and the size included, without
rollback_to_snap and with a plan the size of the changes on a 64 GiB volume; a revert
record left by a crash keeps the volume from being served and is finished when the pool
opens. The kill -9 of a daemon in the middle of a revert: tests/test_rbd_failures.py."""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import xxhash

from blockstore import errors as bse
from rbdarray import RbdArray, objectmap
from rbdarray.records import REVERT_KEY, rbd_snap_name, round_out

CS = 65536
MiB = 1 << 20
GiB = 1 << 30


def snap(a: RbdArray, volume: str) -> str:
    sid = str(uuid.uuid4())
    a.prepare_snapshot(volume, "differential", sid, str(uuid.uuid4()))
    a.commit_snapshots([sid])
    return sid


def digest(a: RbdArray, key: str) -> str:
    return xxhash.xxh3_128_hexdigest(a.read(key, 0, a.lun_size(key)))


def librbd_changed(a: RbdArray, volume: str, sid: str) -> list[int]:
    """librbd's answer: diff_iterate from the snapshot, fast-diff, whole objects."""
    image = a._vols[volume].lun.image
    out: set[int] = set()
    image.diff_iterate(0, image.size(), rbd_snap_name(sid),
                       lambda o, n, _e: out.update(range(o // CS, -(-(o + n) // CS))),
                       whole_object=True)
    return sorted(out)


def ours_changed(a: RbdArray, volume: str, sid: str) -> list[int] | None:
    image = a._vols[volume].lun.image
    return objectmap.changed_objects(a._io, image, a._rbd, a._snaps[sid].rbd_id,
                                     image.size())


def test_the_object_maps_say_what_librbd_says(arr: RbdArray) -> None:
    """Writes, discards and growth over three snapshots, at random: for each snapshot
    the objects changed since it, from our reading of the maps, equal librbd's
    diff_iterate (a wrong bit order, header or rule fails this)."""
    rnd = random.Random(18)
    arr.create_volume("t", 16 * MiB)
    sids = []
    for _ in range(3):
        for _ in range(rnd.randrange(5, 25)):
            size = arr.lun_size("t")
            off = rnd.randrange(0, size - 3 * CS)
            if rnd.random() < 0.25:
                arr.discard("t", off - off % CS, CS * rnd.randrange(1, 3))
            else:
                arr.write("t", off, os.urandom(rnd.randrange(1, 2 * CS)))
        sids.append(snap(arr, "t"))
        if rnd.random() < 0.5:
            arr.resize_volume("t", arr.lun_size("t") + 2 * MiB)
    for _ in range(10):
        arr.write("t", rnd.randrange(0, arr.lun_size("t") - CS), os.urandom(100))
    arr.flush("t")
    for sid in sids:
        mine = ours_changed(arr, "t", sid)
        assert mine is not None and mine == librbd_changed(arr, "t", sid), sid
        assert mine          # something changed since each of them
    # changed_extents (snapshot diff, backups) between any two of them and to the head
    for i, older in enumerate(sids):
        for newer in [*sids[i + 1:], None]:
            image = arr._lun(newer or "t")[0].image
            size = image.size()
            want_runs = round_out(arr._extents(image, 0, size, rbd_snap_name(older)),
                                  CS, size)
            assert arr.changed_extents(older, newer) == want_runs, (older, newer)
    # and what exists where (allocated_bytes, split's copy): the head and each snapshot
    for key in ("t", *sids):
        lun, is_snap = arr._lun(key)
        image, size = lun.image, lun.image.size()
        want: set[int] = set()
        image.diff_iterate(0, size, None, lambda o, n, _e, w=want: w.update(
            range(o // CS, -(-(o + n) // CS))), whole_object=True)
        rbd_id = arr._snaps[key].rbd_id if is_snap else None
        got = objectmap.allocated_objects(arr._io, image, arr._rbd, rbd_id, size)
        assert got is not None and got == sorted(want), key
        assert arr.allocated_bytes(key) == sum(
            n for _, n in arr._extents(image, 0, size, None))


def test_revert_is_the_snapshot_byte_for_byte(arr: RbdArray,
                                              caplog: pytest.LogCaptureFixture) -> None:
    arr.create_volume("v", 8 * MiB)
    arr.write("v", 0, os.urandom(MiB))
    arr.write("v", 3 * MiB + 100, os.urandom(5000))          # a partial object
    arr.discard("v", 512 * 1024, 2 * CS)                     # a hole inside the data
    sid = snap(arr, "v")
    want = digest(arr, sid)
    arr.write("v", 0, os.urandom(256 * 1024))                # overwritten
    arr.write("v", 2 * MiB + 7, os.urandom(100 * 1024))      # where it never had data
    arr.discard("v", 3 * MiB, CS)                            # its partial object dropped
    arr.resize_volume("v", 12 * MiB)
    arr.write("v", 10 * MiB, os.urandom(CS))                 # past its end
    later = snap(arr, "v")                                   # a snapshot in between
    later_digest = digest(arr, later)
    arr.write("v", 512 * 1024 + 10, os.urandom(1000))        # into the snapshot's hole
    with caplog.at_level(logging.INFO, logger="rbdarray.revert"):
        arr.revert("v", sid)
    assert "rollback_to_snap" not in caplog.text             # the maps were used
    assert arr.lun_size("v") == 8 * MiB
    assert digest(arr, "v") == want
    assert arr.read("v", 512 * 1024, 2 * CS) == bytes(2 * CS)
    # never written in the snapshot: a hole again, not zeros written
    assert arr.allocation("v", 2 * MiB, MiB) == []
    assert digest(arr, later) == later_digest                # other snapshots unchanged
    assert ours_changed(arr, "v", sid) == librbd_changed(arr, "v", sid)
    assert REVERT_KEY not in dict(arr._vols["v"].lun.image.metadata_list())
    arr.write("v", 0, b"after")                              # served again
    assert arr.read("v", 0, 5) == b"after"


def test_revert_sees_writes_still_in_librbds_cache(ceph: Any, tmp_path: Path) -> None:
    """With librbd's cache in writeback, an acknowledged write lives in our client until
    a flush, and the object map does not know it yet: the revert flushes before it
    reads the maps (without, the cached write misses the copy back and lands after)."""
    from ceph_cluster import wipe
    a = RbdArray(ceph.pool, ceph.conf, str(tmp_path), conf={
        "rbd_cache": "true", "rbd_cache_policy": "writeback",
        "rbd_cache_writethrough_until_flush": "false"})
    try:
        a.create_volume("w", 4 * MiB)
        a.write("w", 0, os.urandom(MiB))
        sid = snap(a, "w")
        want = digest(a, sid)
        a.write("w", 2 * MiB, os.urandom(CS))          # acknowledged, cached, no flush
        a.revert("w", sid)
        a.flush("w")
        assert digest(a, "w") == want
    finally:
        a.close()
        wipe(ceph.conf, ceph.pool)


def test_the_plan_is_the_changes_not_the_volume(arr: RbdArray) -> None:
    """64 GiB (a million objects, 256 KiB of map): the objects to copy back are the
    16 written after the snapshot, found without visiting the others."""
    arr.create_volume("big", 64 * GiB)
    arr.write("big", 40 * GiB, os.urandom(MiB))
    sid = snap(arr, "big")
    arr.write("big", 10 * GiB, os.urandom(MiB))
    arr.flush("big")
    first = 10 * GiB // CS
    assert ours_changed(arr, "big", sid) == list(range(first, first + 16))
    arr.revert("big", sid)
    assert arr.allocation("big", 0, 64 * GiB) == [(40 * GiB, MiB)]


def test_a_left_revert_record_blocks_io_and_is_finished_at_open(arr: RbdArray,
                                                                ceph: Any) -> None:
    """What a crash in the middle of a revert leaves (the record on the image, the
    content not yet the snapshot's): once the daemon sees it the volume is not served
    (Busy), and opening the pool finishes the revert before anything is served."""
    arr.create_volume("v", 4 * MiB)
    arr.write("v", 0, os.urandom(2 * MiB))
    sid = snap(arr, "v")
    want = digest(arr, sid)
    arr.write("v", MiB, os.urandom(2 * MiB))
    arr.flush("v")
    image = arr._vols["v"].lun.image
    image.metadata_set(REVERT_KEY, json.dumps({"snapshot": sid, "started": 0}))
    assert arr._refresh()                        # the follower's scan sees the record
    with pytest.raises(bse.Busy, match="being reverted"):
        arr.read("v", 0, 1)
    path = arr.path
    arr.close()
    b = RbdArray(ceph.pool, ceph.conf, path)
    try:
        assert digest(b, "v") == want
        assert REVERT_KEY not in dict(b._vols["v"].lun.image.metadata_list())
        # a record whose snapshot is gone cannot be finished: dropped, volume served
        b._vols["v"].lun.image.metadata_set(
            REVERT_KEY, json.dumps({"snapshot": str(uuid.uuid4()), "started": 0}))
        b.close()
        b = RbdArray(ceph.pool, ceph.conf, path)
        assert digest(b, "v") == want
        assert REVERT_KEY not in dict(b._vols["v"].lun.image.metadata_list())
    finally:
        b.close()


def test_the_record_goes_while_io_is_still_held(arr: RbdArray,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Review B, defect 1: once I/O flows again after a revert a crash must not find the
    record, or the next open would revert acknowledged writes. So the record is removed
    while the volume's gate is still closed (exclusive)."""
    arr.create_volume("v", 4 * MiB)
    arr.write("v", 0, os.urandom(MiB))
    sid = snap(arr, "v")
    arr.write("v", 0, os.urandom(MiB))
    gate = arr._vols["v"].lun.gate
    seen: list[bool] = []
    unrecord = RbdArray._unrecord

    def spy(self: RbdArray, v: Any) -> None:
        seen.append(gate._exclusive)
        unrecord(self, v)

    monkeypatch.setattr(RbdArray, "_unrecord", spy)
    arr.revert("v", sid)
    assert seen == [True]
    assert REVERT_KEY not in dict(arr._vols["v"].lun.image.metadata_list())


def test_another_hosts_revert_record_is_left_to_it(arr: RbdArray, ceph: Any) -> None:
    """Review B, defect 2: a daemon opening the pool finishes only the reverts its own
    host started; another host's record (that host may be copying back right now) stays,
    and the volume stays refused here until that host removes it. The snapshot it names
    cannot be deleted meanwhile."""
    arr.create_volume("v", 4 * MiB)
    arr.write("v", 0, os.urandom(2 * MiB))
    sid = snap(arr, "v")
    arr.write("v", MiB, os.urandom(2 * MiB))
    arr.flush("v")
    before = digest(arr, "v")
    record = json.dumps({"snapshot": sid, "started": 0, "host": "some-other-host"})
    arr._vols["v"].lun.image.metadata_set(REVERT_KEY, record)
    path = arr.path
    arr.close()
    b = RbdArray(ceph.pool, ceph.conf, path)
    try:
        meta = dict(b._vols["v"].lun.image.metadata_list())
        assert meta.get(REVERT_KEY) == record          # not finished, not dropped
        with pytest.raises(bse.Busy, match="being reverted"):
            b.read("v", 0, 1)
        with pytest.raises(bse.Busy, match="being reverted to"):
            b.delete_snapshot(sid)
        b._vols["v"].lun.image.metadata_remove(REVERT_KEY)   # that host is done
        assert b._refresh()
        assert digest(b, "v") == before                # nothing copied back here
    finally:
        b.close()


def test_read_async_never_asks_librbd_for_the_size(arr: RbdArray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Review B, defect 3: read_async runs on the mount's trio thread; image.size() may
    refresh the image's header over the network, so its bound is the size known here
    (kept by scans, create, resize, revert)."""
    import threading
    arr.create_volume("v", 4 * MiB)
    data = os.urandom(MiB)
    arr.write("v", 0, data)
    arr.resize_volume("v", 8 * MiB)
    image = arr._vols["v"].lun.image

    class NoSize:
        def __getattr__(self, name: str) -> Any:
            if name == "size":
                raise AssertionError("image.size() called by read_async")
            return getattr(image, name)

    arr._vols["v"].lun.image = NoSize()
    try:
        got: list[Any] = []
        ended = threading.Event()

        def done(d: bytes | None, e: BaseException | None) -> None:
            got.append((d, e))
            ended.set()

        def started(offset: int) -> bool:
            # it may decline while a background thread (the follower, an allocation
            # recount) holds the catalog's lock for a moment: try again, as a caller
            # would fall back to a thread
            for _ in range(200):
                if arr.read_async("v", offset, 4096, done):
                    return True
                time.sleep(0.01)
            return False

        assert started(6 * MiB)                               # past the old size
        assert ended.wait(30)
        assert got == [(bytes(4096), None)]
        ended.clear()
        assert started(0)
        assert ended.wait(30) and got[-1] == (data[:4096], None)
        assert not arr.read_async("v", 8 * MiB - 4096, 8192, done)   # past the end
    finally:
        arr._vols["v"].lun.image = image


def test_an_image_being_migrated_is_never_answered_from_its_own_maps(arr: RbdArray) -> None:
    """Review of the session's diff: a live migration's destination (`rbd migration
    prepare`) reads what is not copied yet through its source, which neither
    parent_info() nor the header's parent_get names: its migrating feature bit makes
    the object maps answer nothing (librbd's exact path instead)."""
    import rbd

    from rbdarray.array import _feature_bits
    io = arr._io
    rbd.RBD().create(io, "msrc", 4 * MiB, order=16, old_format=False,
                     features=_feature_bits(rbd))
    with rbd.Image(io, "msrc") as im:
        im.write(os.urandom(2 * MiB), 0)
    rbd.RBD().migration_prepare(io, "msrc", io, "mdst", features=_feature_bits(rbd),
                                order=16)
    try:
        with rbd.Image(io, "mdst") as im:
            assert im.features() & rbd.RBD_FEATURE_MIGRATING
            assert objectmap.allocated_objects(io, im, rbd, None, 4 * MiB) is None
    finally:
        rbd.RBD().migration_abort(io, "mdst")
        rbd.RBD().remove(io, "msrc")


def test_a_clone_is_never_answered_from_its_own_maps(arr: RbdArray,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Review of 2026-12-06: objectmap.py assumed no clone parent. A volume that is a
    clone not flattened (a v2 clone made elsewhere, given our record): what it reads
    from its parent is absent from its own object maps. Its allocation and the split of
    its snapshot (both missed the parent's data) and a revert after its head was shrunk
    (`rbd resize --allow-shrink`: the parent overlap shrinks with it) are librbd's
    exact answers, the parent's data included; so is a diff once the head is flattened
    while a snapshot still reads through the parent (no deep-flatten); a volume of ours
    keeps using the maps. (The fixture's wipe removes the images, clones first.)"""
    import rbd

    from rbdarray.array import _feature_bits
    from rbdarray.records import VOLUME_KEY, VolumeRecord
    io = arr._io
    parent = os.urandom(2 * MiB)
    rbd.RBD().create(io, "par", 4 * MiB, order=16, old_format=False,
                     features=_feature_bits(rbd))
    with rbd.Image(io, "par") as im:
        im.write(parent, 0)
        im.create_snap("base")
    rbd.RBD().clone(io, "par", "base", io, "kid", features=_feature_bits(rbd), order=16)
    with rbd.Image(io, "kid") as im:
        assert im.parent_info()[1] == "par"   # (a clone, not flattened)
        im.metadata_set(VOLUME_KEY, VolumeRecord(arr._naa(), time.time()).dump())
    assert arr._refresh()
    arr.write("kid", 100, os.urandom(1000))           # a copy-up of object 0
    arr.write("kid", 3 * MiB, os.urandom(CS))         # past the parent's data
    sid = snap(arr, "kid")
    want = digest(arr, sid)
    assert arr.read(sid, MiB, MiB) == parent[MiB:]    # (the parent's, through librbd)
    image = arr._vols["kid"].lun.image
    assert objectmap.allocated_objects(io, image, arr._rbd, None, 4 * MiB) is None
    assert ours_changed(arr, "kid", sid) is None
    assert arr.allocated_bytes(sid) >= 2 * MiB        # the parent's objects count
    arr.split(sid, "copy")                            # a copy of what it reads
    assert digest(arr, "copy") == want
    sid = snap(arr, "kid")
    assert digest(arr, sid) == want
    arr.write("kid", 0, os.urandom(CS))
    image.resize(MiB)                                 # shrunk elsewhere
    with caplog.at_level(logging.INFO, logger="rbdarray.revert"):
        arr.revert("kid", sid)
    assert "rollback_to_snap" in caplog.text          # not from the maps
    assert arr.lun_size("kid") == 4 * MiB
    assert digest(arr, "kid") == want
    image.flatten()          # deep-flatten: its snapshots too, no parent any more
    with pytest.raises(rbd.ImageNotFound):
        image.parent_info()
    assert ours_changed(arr, "kid", sid) == librbd_changed(arr, "kid", sid)
    # without deep-flatten a flattened head's snapshot still reads through the parent:
    # the head's parent_info() says none, the header's parent_get still names it
    rbd.RBD().clone(io, "par", "base", io, "kid2", order=16,
                    features=_feature_bits(rbd) & ~rbd.RBD_FEATURE_DEEP_FLATTEN)
    with rbd.Image(io, "kid2") as im:
        im.write(os.urandom(CS), 0)
        im.create_snap("s")
        im.flatten()
        with pytest.raises(rbd.ImageNotFound):
            im.parent_info()
        first = next(int(s["id"]) for s in im.list_snaps())
        assert objectmap._has_parent(io, im, rbd, im.id()) is True
        assert objectmap.changed_objects(io, im, rbd, first, 4 * MiB) is None
    arr.create_volume("ours", MiB)                    # no parent: the maps
    assert ours_changed(arr, "ours", snap(arr, "ours")) == []
    ours = arr._vols["ours"].lun.image
    assert objectmap._has_parent(io, ours, rbd, ours.id()) is False
