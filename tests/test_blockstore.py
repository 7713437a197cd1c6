"""The block store engine: pure logic on real files (no kernel parts needed, except for
the crash tests' runs with their pools on loop-mounted filesystems: tests/poolfs.py)."""

import errno
import json
import logging
import os
import shutil
import subprocess

import pytest
import xxhash
from poolfs import on_filesystems

from blockstore import Faults, Pool, errors
from blockstore import format as fmt
from blockstore.format import FORMAT_VERSION

CS = 4096
MiB = 1 << 20
# the crash tests run with their pools in tmp_path and on XFS (reflink), btrfs and ext4
# loop filesystems (issue 14: preservation by reference must keep the crash ordering)
ON_FS = on_filesystems("xfs", "btrfs", "ext4")


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    yield p
    if not p._closed:
        assert p.check() == []
        p.close()


def snap(pool, vol, kind="differential"):
    s = pool.prepare_snapshot(vol, kind)
    if kind == "plex":
        while True:
            done, total = pool.plex_sync_step(s.id)
            if done >= total:
                break
    pool.commit_snapshots([s.id])
    return s.id


def reopen(pool, faults=None):
    pool.abandon()
    return Pool.open(pool.path, faults=faults)


# -- pool ---------------------------------------------------------------------------------
def test_create_open_and_lock(tmp_path):
    p = Pool.create(str(tmp_path / "p"))
    assert p.chunk_size == 64 * 1024
    with pytest.raises(errors.PoolLocked, match=str(os.getpid())):
        Pool.open(str(tmp_path / "p"))
    p.close()
    Pool.open(str(tmp_path / "p")).close()


@pytest.mark.parametrize("cs", [0, 1000, 2048, 3 * 4096, 2 << 20, True])
def test_bad_chunk_size(tmp_path, cs):
    with pytest.raises(errors.FormatError, match="chunk size"):
        Pool.create(str(tmp_path / "p"), chunk_size=cs)
    assert not (tmp_path / "p").exists()


def test_not_a_pool_and_newer_format(tmp_path):
    with pytest.raises(errors.NotFound):
        Pool.open(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.FormatError, match="not a shadowplex pool"):
        Pool.open(str(tmp_path / "empty"))
    Pool.create(str(tmp_path / "p")).close()
    pj = tmp_path / "p" / "pool.json"
    pj.write_text(pj.read_text().replace(f'"version": {FORMAT_VERSION}', '"version": 99'))
    with pytest.raises(errors.FormatError, match="newer"):
        Pool.open(str(tmp_path / "p"))


def test_create_refuses_non_empty_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep me")
    with pytest.raises(errors.Exists):
        Pool.create(str(tmp_path / "d"))
    assert (tmp_path / "d" / "x").read_text() == "keep me"


# -- volumes -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65, "sp ace", "ü", None])
def test_bad_names(pool, name):
    with pytest.raises(errors.InvalidName):
        pool.create_volume(name, MiB)
    assert pool.list_volumes() == []


@pytest.mark.parametrize("size", [0, -512, 511, 1000, 1.5, "1M"])
def test_bad_sizes(pool, size):
    with pytest.raises(errors.InvalidSize):
        pool.create_volume("v", size)
    assert pool.list_volumes() == []


def test_volume_lifecycle(pool):
    v = pool.create_volume("v-1.x_y", MiB)
    assert len(v.naa) == 32 and v.naa.startswith("6")
    with pytest.raises(errors.Exists):
        pool.create_volume("v-1.x_y", MiB)
    img = pool.image_path("v-1.x_y")
    assert os.stat(img).st_size == MiB and os.stat(img).st_blocks == 0   # sparse raw
    pool.write("v-1.x_y", 1000, b"hello")
    assert pool.read("v-1.x_y", 998, 9) == b"\0\0hello\0\0"
    assert pool.read("v-1.x_y", MiB - 2, 10) == b"\0\0"       # short at the end
    assert pool.read("v-1.x_y", MiB, 10) == b""
    with pytest.raises(errors.OutOfRange):
        pool.write("v-1.x_y", MiB - 2, b"abc")
    with pytest.raises(errors.OutOfRange):
        pool.write("v-1.x_y", -1, b"a")
    pool.resize_volume("v-1.x_y", 2 * MiB)
    assert pool.volume("v-1.x_y").size == 2 * MiB
    with pytest.raises(errors.InvalidSize):
        pool.resize_volume("v-1.x_y", MiB)
    pool.discard("v-1.x_y", 0, CS)
    assert pool.read("v-1.x_y", 1000, 5) == bytes(5)
    pool.flush("v-1.x_y")
    pool.delete_volume("v-1.x_y")
    assert not os.path.exists(img)
    with pytest.raises(errors.NotFound):
        pool.read("v-1.x_y", 0, 1)


def test_naa_never_reused_and_header_travels(pool):
    a = pool.create_volume("a", MiB).naa
    pool.delete_volume("a")
    b = pool.create_volume("a", MiB)
    assert b.naa != a
    issued = {r[0] for r in pool.catalog.db.execute("SELECT naa FROM naa_issued")}
    assert {a, b.naa} <= issued
    with open(pool.image_path("a")[:-4] + ".hdr") as f:
        hdr = json.load(f)
    assert hdr["naa"] == b.naa and hdr["size"] == MiB and hdr["shadow"] is False


# -- differential snapshots ----------------------------------------------------------------
def test_differential_point_in_time(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"A" * (3 * CS))
    s1 = snap(pool, "v")
    pool.write("v", CS, b"B" * CS)
    s2 = snap(pool, "v")
    pool.write("v", CS + 10, b"C" * 10)
    pool.write("v", 0, b"D" * CS)
    assert pool.read(s1, 0, 3 * CS) == b"A" * (3 * CS)
    assert pool.read(s2, 0, 3 * CS) == b"A" * CS + b"B" * CS + b"A" * CS
    with pytest.raises(errors.ReadOnly):
        pool.write(s1, 0, b"x")
    with pytest.raises(errors.ReadOnly):
        pool.discard(s1, 0, CS)


def test_one_copy_per_chunk_whatever_the_number_of_snapshots(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, os.urandom(MiB))
    ids = [snap(pool, "v") for _ in range(64)]
    pool.write("v", 0, b"x" * (8 * CS))
    da = pool._volumes["v"].diff
    assert da.entries() == 8 and da.used_bytes() == 8 * CS
    pool.write("v", 0, b"y" * (8 * CS))     # re-write: nothing more to preserve
    assert da.entries() == 8
    assert len({pool.read(i, 0, 8 * CS) for i in ids}) == 1


def test_sixty_four_snapshots_each_see_their_instant(pool):
    pool.create_volume("v", 256 * 1024)
    ids = []
    for i in range(70):
        pool.write("v", (i % 16) * CS, bytes([i]) * CS)
        ids.append((snap(pool, "v"), pool.read("v", 0, 64 * CS)))
    pool.write("v", 0, b"z" * (64 * CS))
    for sid, content in ids:
        assert xxhash.xxh3_64(pool.read(sid, 0, 64 * CS)).digest() == \
            xxhash.xxh3_64(content).digest()
    pool = reopen(pool)
    for sid, content in ids:
        assert pool.read(sid, 0, 64 * CS) == content
    assert pool.check() == []
    pool.close()


def test_holes_stay_holes_in_diff_area(pool):
    pool.create_volume("v", MiB)
    s = snap(pool, "v")
    pool.write("v", 0, b"x" * (16 * CS))
    assert pool.read(s, 0, 16 * CS) == bytes(16 * CS)
    assert os.stat(pool._volumes["v"].diff.data_path).st_blocks == 0


def test_delete_reclaims_and_keeps_other_snapshots(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * (4 * CS))
    b = snap(pool, "v")
    pool.write("v", 0, b"3" * (4 * CS))
    da = pool._volumes["v"].diff
    assert da.used_bytes() == 8 * CS
    pool.delete_snapshot(b)
    assert da.used_bytes() == 4 * CS and pool.read(a, 0, 4 * CS) == b"1" * (4 * CS)
    pool.delete_snapshot(a)
    assert da.used_bytes() == 0 and os.path.getsize(da.data_path) == 0
    with pytest.raises(errors.NotFound):
        pool.read(a, 0, 1)


def test_latest_deleted_epochs_stay_monotonic(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * CS)
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * CS)
    b = snap(pool, "v")
    pool.delete_snapshot(b)
    pool.write("v", 0, b"3" * CS)
    assert pool.read(a, 0, CS) == b"1" * CS


def test_grow_with_snapshot(pool):
    pool.create_volume("v", MiB)
    pool.write("v", MiB - CS, b"e" * CS)
    s = snap(pool, "v")
    pool.resize_volume("v", 2 * MiB)
    pool.write("v", MiB - CS, b"f" * (2 * CS))
    assert pool.lun_size(s) == MiB
    assert pool.read(s, MiB - CS, 3 * CS) == b"e" * CS


# -- plex ----------------------------------------------------------------------------------
def test_plex_sync_mirrors_writes_and_splits_at_commit(pool):
    pool.create_volume("v", 4 * MiB)
    pool.write("v", 0, b"a" * MiB)
    pool.write("v", 3 * MiB, b"b" * CS)
    s = pool.prepare_snapshot("v", "plex")
    with pytest.raises(errors.InvalidState, match="not in sync"):
        pool.commit_snapshots([s.id])
    done, total = pool.plex_sync_step(s.id, max_bytes=CS)
    assert 0 < done < total == MiB + CS
    pool.write("v", 3 * MiB, b"c" * CS)       # mirrored while syncing
    while done < total:
        done, total = pool.plex_sync_step(s.id, max_bytes=64 * 1024)
    pool.commit_snapshots([s.id])
    pool.write("v", 0, b"d" * CS)             # after the split: not mirrored
    assert pool.read(s.id, 0, CS) == b"a" * CS
    assert pool.read(s.id, 3 * MiB, CS) == b"c" * CS
    img = pool._img(pool.snapshot(s.id).file_id)
    assert os.stat(img).st_blocks * 512 <= MiB + 4 * CS     # holes stayed holes
    with pytest.raises(errors.Unsupported):
        pool.promote(s.id)


def test_abort_leaves_no_trace(pool):
    pool.create_volume("v", MiB)
    before = sorted(os.listdir(os.path.join(pool.path, "luns")))
    for kind in ("plex", "differential"):
        s = pool.prepare_snapshot("v", kind)
        pool.abort_snapshot(s.id)
    assert pool.list_snapshots() == []
    assert sorted(os.listdir(os.path.join(pool.path, "luns"))) == before


# -- revert / promote / split ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["differential", "plex"])
def test_revert_keeps_other_snapshots(pool, kind):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v", kind)
    pool.write("v", CS, b"2" * (4 * CS))
    b = snap(pool, "v")
    pool.write("v", 2 * CS, b"3" * CS)
    pool.revert("v", a)
    assert pool.read("v", 0, 6 * CS) == b"1" * (4 * CS) + bytes(2 * CS)
    assert pool.read(b, 0, 6 * CS) == b"1" * CS + b"2" * (4 * CS) + bytes(CS)
    assert pool.read(a, 0, 4 * CS) == b"1" * (4 * CS)


def test_revert_restores_size(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"k" * CS)
    a = snap(pool, "v")
    pool.resize_volume("v", 2 * MiB)
    pool.write("v", MiB, b"t" * CS)
    b = snap(pool, "v")
    pool.revert("v", a)
    assert pool.volume("v").size == MiB
    assert pool.read(b, MiB, CS) == b"t" * CS


def test_promote_then_independent(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"p" * (2 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"q" * CS)
    pool.promote(a)
    assert pool.snapshot(a).kind == "full"
    assert pool._volumes["v"].diff.used_bytes() == 0
    pool.write("v", CS, b"r" * CS)
    assert pool.read(a, 0, 2 * CS) == b"p" * (2 * CS)
    pool.seal(a)
    assert pool.check() == []


def test_split_differential_and_plex(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"s" * CS)
    a, b = snap(pool, "v"), snap(pool, "v", "plex")
    old_naa = pool.snapshot(a).naa
    va = pool.split(a, "va")
    pool.split(b, "vb")
    assert va.naa != old_naa and va.naa != pool.volume("v").naa
    pool.write("va", 0, b"t" * 10)
    assert pool.read("va", 0, 12) == b"t" * 10 + b"ss"
    assert pool.read("vb", 0, 2) == b"ss" and pool.read("v", 0, 2) == b"ss"
    assert pool.list_snapshots() == []
    with pytest.raises(errors.Exists):
        pool.split(snap(pool, "v"), "va")


def test_bad_snapshot_operations_change_nothing(pool):
    pool.create_volume("v", MiB)
    pool.create_volume("w", MiB)
    a = snap(pool, "v")
    for call, exc in [
        (lambda: pool.read("1234", 0, 1), errors.NotFound),
        (lambda: pool.delete_snapshot("not-a-guid"), errors.NotFound),
        (lambda: pool.revert("w", a), errors.InvalidState),
        (lambda: pool.prepare_snapshot("v", "mirror"), errors.Unsupported),
        (lambda: pool.delete_volume("v"), errors.Busy),
        (lambda: pool.set_exposed(a, "../x"), errors.InvalidName),
        (lambda: pool.commit_snapshots([a]), errors.InvalidState),
    ]:
        with pytest.raises(exc):
            call()
    assert [s.id for s in pool.list_snapshots()] == [a]


# -- overflow, faults --------------------------------------------------------------------------
def test_overflow_deletes_oldest_and_write_succeeds(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * (16 * CS))
    snap(pool, "v")
    pool.write("v", 0, b"n" * (4 * CS))
    b = snap(pool, "v")
    pool.set_diff_limit("v", 6 * CS)
    pool.write("v", 4 * CS, b"m" * (4 * CS))    # needs 8 chunks with a alive: a goes
    assert [s.id for s in pool.list_snapshots()] == [b]
    assert pool.read("v", 4 * CS, 4) == b"mmmm"
    assert pool.read(b, 4 * CS, 4) == b"oooo"


def test_enospc_on_diff_area_deletes_oldest(tmp_path):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * CS)
    snap(pool, "v")
    faults.arm_error("diff", "write", errno.ENOSPC, count=1)
    pool.write("v", 0, b"n" * CS)
    assert pool.list_snapshots() == [] and pool.read("v", 0, 1) == b"n"
    pool.close()


def test_eio_on_diff_area_invalidates_never_serves_wrong(tmp_path):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * CS)
    a = snap(pool, "v")
    faults.arm_error("diff", "sync", errno.EIO, count=1)
    pool.write("v", 0, b"n" * CS)
    assert pool.read(a, 0, CS) == b"o" * CS    # held in memory until the group sync
    pool.flush("v")                            # the sync fails: a is invalid, v is fine
    assert pool.read("v", 0, 1) == b"n"
    with pytest.raises(errors.SnapshotInvalid):
        pool.read(a, 0, CS)
    pool = reopen(pool)
    with pytest.raises(errors.SnapshotInvalid):
        pool.read(a, 0, CS)
    pool.close()


def test_corrupt_diff_slot_is_detected(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * CS)
    a = snap(pool, "v")
    pool.write("v", 0, b"n" * CS)
    pool.flush("v")
    pool.seal_preserved()   # a chunk preserved by reference (xfs, btrfs) is verified once sealed
    with open(pool._volumes["v"].diff.data_path, "r+b") as f:
        f.write(b"X")
    with pytest.raises(errors.CorruptData):
        pool.read(a, 0, CS)
    assert any("checksum" in p for p in pool.check())
    pool.delete_snapshot(a)


def test_plex_eio_fails_plex_not_origin(tmp_path):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    s = pool.prepare_snapshot("v", "plex")
    faults.arm_error("plex", "write", errno.EIO)
    pool.write("v", 0, b"w" * CS)
    assert pool.read("v", 0, 1) == b"w"
    with pytest.raises(errors.SnapshotInvalid):
        pool.plex_sync_step(s.id)
    pool.abort_snapshot(s.id)
    pool.close()


# -- crash safety ------------------------------------------------------------------------------
CRASH_POINTS = ["cow.data_written", "cow.data_synced", "cow.map_written", "cow.map_synced"]


@ON_FS
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_copy_before_write(pool_tmp, point):
    faults = Faults()
    pool = Pool.create(str(pool_tmp / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * (4 * CS))
    a = snap(pool, "v")
    faults.arm_crash(point)
    from blockstore.errors import SimulatedCrash
    with pytest.raises(SimulatedCrash):
        pool.write("v", 0, b"n" * (4 * CS))
        pool.flush("v")
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.read(a, 0, 4 * CS) == b"o" * (4 * CS)
    assert pool.read("v", 0, 4 * CS) == b"o" * (4 * CS)   # the write never happened
    pool.write("v", 0, b"n" * (4 * CS))
    assert pool.read(a, 0, 4 * CS) == b"o" * (4 * CS)
    pool.close()


@ON_FS
@pytest.mark.parametrize("point,committed", [("commit.before_record", False),
                                             ("commit.after_record", True)])
def test_crash_around_commit(pool_tmp, point, committed):
    faults = Faults()
    pool = Pool.create(str(pool_tmp / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.create_volume("w", MiB)
    pool.write("v", 0, b"1" * CS)
    pool.write("w", 0, b"1" * CS)
    ids = [pool.prepare_snapshot("v").id, pool.prepare_snapshot("w", "plex").id]
    while pool.plex_sync_step(ids[1])[0] < pool.plex_sync_step(ids[1])[1]:
        pass
    faults.arm_crash(point)
    from blockstore.errors import SimulatedCrash
    with pytest.raises(SimulatedCrash):
        pool.commit_snapshots(ids)
    pool = reopen(pool)
    assert pool.check() == []
    assert len(pool.list_snapshots()) == (2 if committed else 0)   # all or nothing
    if committed:
        pool.write("v", 0, b"2" * CS)
        pool.write("w", 0, b"2" * CS)
        assert [pool.read(i, 0, 1) for i in ids] == [b"1", b"1"]
    # volumes: img+hdr each; differential: hdr; plex: img+hdr
    assert len(os.listdir(os.path.join(pool.path, "luns"))) == (7 if committed else 4)
    pool.close()


@ON_FS
@pytest.mark.parametrize("point", ["gc.map_written", "gc.map_synced", "delete.after_record"])
def test_crash_during_delete(pool_tmp, point):
    faults = Faults()
    pool = Pool.create(str(pool_tmp / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * (4 * CS))
    b = snap(pool, "v")
    pool.write("v", 0, b"3" * (4 * CS))
    faults.arm_crash(point)
    from blockstore.errors import SimulatedCrash
    with pytest.raises(SimulatedCrash):
        pool.delete_snapshot(a)
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.read(b, 0, 4 * CS) == b"2" * (4 * CS)
    assert [s.id for s in pool.list_snapshots()] == [b]
    assert pool._volumes["v"].diff.used_bytes() == 4 * CS
    pool.close()


@ON_FS
def test_crash_during_promote(pool_tmp):
    faults = Faults()
    pool = Pool.create(str(pool_tmp / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * CS)
    faults.arm_crash("promote.copied")
    from blockstore.errors import SimulatedCrash
    with pytest.raises(SimulatedCrash):
        pool.promote(a)
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.snapshot(a).kind == "differential"
    assert pool.read(a, 0, 4 * CS) == b"1" * (4 * CS)
    pool.close()


def test_failed_create_leaves_nothing_and_strays_are_reported(tmp_path):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
    luns = os.path.join(pool.path, "luns")
    faults.arm_error("origin", "write", errno.EFBIG, count=1)   # sizing the image fails
    with pytest.raises(errors.InvalidSize, match="larger than a file"):
        pool.create_volume("big", MiB)
    assert os.listdir(luns) == [] and pool.list_volumes() == []
    pool.create_volume("v", MiB)    # the same file id again: no leftover in its way
    assert pool.check() == []
    with pytest.raises(errors.InvalidSize, match="chunks"):   # 2^32 chunks of 4 KiB + 1
        pool.create_volume("huge", ((1 << 32) + 1) * CS)
    files = sorted(os.listdir(luns))
    faults.arm_error("plex", "write", errno.ENOSPC, count=1)   # sizing the plex fails
    with pytest.raises(OSError):
        pool.prepare_snapshot("v", "plex")
    assert sorted(os.listdir(luns)) == files and pool.list_snapshots() == []
    pool.create_volume("w", MiB)    # the plex's file id again
    plex = pool.prepare_snapshot("v", "plex")
    pool.plex_sync_step(plex.id)
    pool.commit_snapshots([plex.id])
    assert pool.check() == []
    with open(os.path.join(luns, "999.img"), "wb"):
        pass
    assert pool.check() == ["luns/999.img belongs to no volume or snapshot"]
    pool = reopen(pool)             # opening removes it
    assert pool.check() == []
    pool.close()


def test_second_promote_of_a_snapshot_is_busy(pool):
    """A promote while another one copies the same snapshot is refused (Busy), changes
    nothing and leaks nothing; the first one completes."""
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * CS)
    fds_before = len(os.listdir("/proc/self/fd"))
    seen: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        if not seen:   # inside the first promote's copy: try a second one
            try:
                pool.promote(a)
            except errors.Busy as e:
                seen.append(e)
    info = pool.promote(a, progress)
    assert seen and "being promoted" in str(seen[0])
    assert info.kind == "full" and pool.read(a, 0, 4 * CS) == b"1" * (4 * CS)
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1   # the full copy's file
    assert not [f for f in os.listdir(os.path.join(pool.path, "luns"))
                if f.endswith(".partial")]
    assert pool.check() == []


def test_group_sync_larger_than_iov_max(pool):
    """More held chunks than one pwritev can take (IOV_MAX) still reach the origin."""
    pool.create_volume("v", 8 * MiB)
    pool.write("v", 0, b"a" * (8 * MiB))
    a = snap(pool, "v")
    for off in range(0, 8 * MiB, 64 * 1024):        # 2048 held 4 KiB chunks
        pool.write("v", off, b"b" * (64 * 1024))
    pool.flush("v")
    pool = reopen(pool)
    assert pool.read("v", 0, 8 * MiB) == b"b" * (8 * MiB)
    assert pool.read(a, 0, 8 * MiB) == b"a" * (8 * MiB)
    pool.close()


def test_a_scrub_cancelled_while_it_reads_a_lun_stops(pool):
    """A Cancelled raised by scrub's progress while it reads a LUN's bytes is the scrub's
    end, not a finding: it was caught with the read errors (Cancelled is a StoreError),
    so the scrub went on and answered 'completed' with "scrub cancelled" as a problem
    line (CI: test_cancel_e2e.py::test_interrupted_scrub_answers_and_stops, exit 1)."""
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"d" * MiB)
    pool.flush("v")
    seen = []

    def progress(done, total):
        seen.append(done)
        if done > 0:   # (check's phase reports 0: this is the LUN read)
            raise errors.Cancelled("scrub cancelled: the requester cancelled it")
    with pytest.raises(errors.Cancelled):
        pool.scrub(progress)
    assert [d for d in seen if d > 0], seen


def test_scrub_seals_full_copies_and_finds_rot(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, os.urandom(8 * CS))
    p = snap(pool, "v", "plex")
    assert pool.scrub() == []
    assert pool.snapshot(p).file_id and pool._snaps[p].sealed
    img = pool._img(pool.snapshot(p).file_id)
    with open(img, "r+b") as f:          # bit rot in chunk 3 of the plex
        f.seek(3 * CS + 7)
        old = f.read(1)
        f.seek(3 * CS + 7)
        f.write(bytes([old[0] ^ 0x01]))  # flip a bit (writing 0xff failed 1 run in 256)
    problems = pool.scrub()
    assert any("chunk 3 fails its checksum" in x for x in problems), problems
    pool.delete_snapshot(p)


def test_check_reports_damaged_header_and_open_repairs_it(pool):
    pool.create_volume("v", MiB)
    hdr = pool.image_path("v")[:-4] + ".hdr"
    with open(hdr, "w") as f:
        f.write('{"format": "shadowplex-lun", "naa": "6000", "size": 1}')
    assert any("header field(s)" in x and "naa" in x for x in pool.check())
    pool = reopen(pool)
    assert pool.check() == []
    pool.close()


def test_revert_to_invalid_snapshot_refused(tmp_path):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * CS)
    a = snap(pool, "v")
    faults.arm_error("diff", "sync", errno.EIO, count=1)
    pool.write("v", 0, b"n" * CS)
    pool.flush("v")
    with pytest.raises(errors.SnapshotInvalid):
        pool.revert("v", a)
    with pytest.raises(errors.SnapshotInvalid):
        pool.promote(a)
    assert pool.read("v", 0, CS) == b"n" * CS       # nothing changed
    pool.delete_snapshot(a)
    pool.close()


# -- crashes during resize, revert, split and plex sync ---------------------------------------
def crashing_pool(tmp_path):
    faults = Faults()
    return Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults), faults


def luns(pool):
    return sorted(os.listdir(os.path.join(pool.path, "luns")))


@ON_FS
@pytest.mark.parametrize("point,grown", [("resize.image_sized", False),
                                         ("resize.recorded", True)])
def test_crash_during_grow(pool_tmp, point, grown):
    """Image sized, catalog not (or both): open sizes the image to the catalog."""
    pool, faults = crashing_pool(pool_tmp)
    pool.create_volume("v", MiB)
    pool.write("v", MiB - CS, b"e" * CS)
    s = snap(pool, "v")
    pool.write("v", MiB - CS, b"f" * CS)   # held; the grow writes it back and syncs first
    faults.arm_crash(point)
    with pytest.raises(errors.SimulatedCrash):
        pool.resize_volume("v", 2 * MiB)
    pool = reopen(pool)
    assert pool.check() == []
    size = 2 * MiB if grown else MiB
    assert pool.volume("v").size == size == os.path.getsize(pool.image_path("v"))
    assert pool.read("v", MiB - CS, 2 * CS) == b"f" * CS + (bytes(CS) if grown else b"")
    assert pool.read(s, MiB - CS, CS) == b"e" * CS
    pool.write("v", size - CS, b"t" * CS)   # the volume works at its recovered size
    with pytest.raises(errors.OutOfRange):
        pool.write("v", size, b"x")
    assert pool.check() == []
    pool.close()


def revert_setup(tmp_path):
    """v: a at 1 MiB, grown to 2 MiB with data in the tail, b, more writes, all flushed."""
    pool, faults = crashing_pool(tmp_path)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v")
    pool.resize_volume("v", 2 * MiB)
    pool.write("v", CS, b"2" * (2 * CS))
    pool.write("v", MiB, b"t" * CS)        # in the tail the revert to a cuts off
    b = snap(pool, "v")
    pool.write("v", 0, b"3" * CS)
    pool.flush("v")
    return pool, faults, a, b


A_CONTENT = b"1" * (4 * CS) + bytes(MiB - 4 * CS)
B_HEAD = b"1" * CS + b"2" * (2 * CS) + b"1" * CS


@ON_FS
@pytest.mark.parametrize("point", ["revert.recorded", "cow.map_written", "revert.copied",
                                   "resize.image_sized", "resize.recorded", "revert.flushed"])
def test_crash_during_revert_is_finished_at_open(pool_tmp, point):
    pool, faults, a, b = revert_setup(pool_tmp)
    faults.arm_crash(point)
    with pytest.raises(errors.SimulatedCrash):
        pool.revert("v", a)
    pool = reopen(pool)                   # rolls the revert forward
    assert pool.check() == []
    assert pool.volume("v").size == MiB == os.path.getsize(pool.image_path("v"))
    assert pool.read("v", 0, 2 * MiB) == pool.read(a, 0, MiB) == A_CONTENT
    assert pool.read(b, 0, 4 * CS) == B_HEAD and pool.read(b, MiB, CS) == b"t" * CS
    assert pool.catalog.meta_items("revert.") == []
    pool.delete_snapshot(a)               # no longer a revert's source
    assert pool.check() == []
    pool.close()


@ON_FS
def test_crash_while_finishing_a_revert(pool_tmp):
    """Recovery itself crashes (inside the resumed revert): the next open finishes it."""
    pool, faults, a, b = revert_setup(pool_tmp)
    faults.arm_crash("revert.copied")
    with pytest.raises(errors.SimulatedCrash):
        pool.revert("v", a)
    pool.abandon()
    again = Faults()
    again.arm_crash("resize.image_sized")
    with pytest.raises(errors.SimulatedCrash):
        Pool.open(pool.path, faults=again)
    assert "revert.copied" in again.passed      # it really was inside the resumed revert
    pool = Pool.open(pool.path)
    assert pool.check() == []
    assert pool.read("v", 0, 2 * MiB) == A_CONTENT
    assert pool.read(b, 0, 4 * CS) == B_HEAD and pool.read(b, MiB, CS) == b"t" * CS
    pool.close()


@ON_FS
def test_interrupted_shrink_alone_is_safe(pool_tmp):
    """The image-shorter direction of open's size reconciliation, without the revert's
    roll-forward: the catalog keeps the old size, the tail reads zeros (what the revert
    had discarded) and the snapshot that needs the old tail reads it from the diff area."""
    pool, faults, a, b = revert_setup(pool_tmp)
    faults.arm_crash("resize.image_sized")
    with pytest.raises(errors.SimulatedCrash):
        pool.revert("v", a)
    assert os.path.getsize(pool.image_path("v")) == MiB
    pool.catalog.db.execute("DELETE FROM meta WHERE key LIKE 'revert.%'")   # no roll-forward
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.volume("v").size == 2 * MiB == os.path.getsize(pool.image_path("v"))
    assert pool.read("v", 0, 2 * MiB) == A_CONTENT + bytes(MiB)
    assert pool.read(b, 0, 4 * CS) == B_HEAD and pool.read(b, MiB, CS) == b"t" * CS
    pool.close()


def test_snapshot_larger_than_its_shrunk_origin_after_reopen(tmp_path):
    """After a shrinking revert b is larger than v; its tail is in the diff area, which
    open must size for b, not for v (it used to fail with an IndexError)."""
    pool, _faults, a, b = revert_setup(tmp_path)
    pool.revert("v", a)
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.read(b, MiB, CS) == b"t" * CS and pool.read(b, 0, 4 * CS) == B_HEAD
    pool.write("v", 0, b"4" * CS)
    assert pool.read(b, 0, 4 * CS) == B_HEAD
    pool.close()


def test_a_tail_no_lun_reads_is_preserved_once_across_a_reopen(tmp_path):
    """A shrinking revert to the newest snapshot preserves the tail it discards although
    no LUN reads it any more (the change log: blockstore/changes.py). Open must still
    see that entry: after a grow, the tail's next write preserved it a second time in
    the same epoch, and the space counters disagreed with the map."""
    pool = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    pool.create_volume("v", 16 * CS)
    a = snap(pool, "v")
    pool.resize_volume("v", 17 * CS)
    pool.write("v", 16 * CS, b"x" * CS)
    pool.revert("v", a)
    pool = reopen(pool)
    pool.resize_volume("v", 17 * CS)
    pool.write("v", 16 * CS, b"y" * CS)
    assert pool.check() == []
    assert pool.changed_extents(a) == [(16 * CS, CS)]
    pool.close()


def test_revert_source_is_protected_while_reverting(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (8 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * (8 * CS))
    steps = []

    def progress(done, total):   # runs between the revert's steps, without the pool lock
        for call in (lambda: pool.delete_snapshot(a), lambda: pool.split(a, "x"),
                     lambda: pool.resize_volume("v", 2 * MiB), lambda: pool.revert("v", a)):
            with pytest.raises(errors.Busy):
                call()
        steps.append(done)

    pool.revert("v", a, progress)
    assert steps and pool.read("v", 0, 8 * CS) == b"1" * (8 * CS)
    pool.delete_snapshot(a)      # afterwards it can go


def test_overflow_during_revert_spares_its_source(pool, caplog):
    """The revert's writes need room for the newer snapshot b; the oldest is a, the
    source: b goes instead (deleting a would fail the revert half-way)."""
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * (4 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * (4 * CS))
    b = snap(pool, "v")
    pool.set_diff_limit("v", 5 * CS)          # 4 used: no room for 4 more
    with caplog.at_level(logging.WARNING, logger="blockstore"):
        pool.revert("v", a)
    assert [s.id for s in pool.list_snapshots()] == [a]
    assert pool.read("v", 0, 4 * CS) == b"1" * (4 * CS)
    assert any(b in r.getMessage() and "diff-area limit" in r.getMessage()
               for r in caplog.records)


def test_failed_revert_is_not_resumed(tmp_path):
    """An ordinary error ends the revert (the caller hears of it and may write again):
    its record goes, so a later open does not revert over the newer writes."""
    pool, faults = crashing_pool(tmp_path)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"1" * CS)
    a = snap(pool, "v")
    pool.write("v", 0, b"2" * CS)
    pool.flush("v")
    faults.arm_error("origin", "write", errno.EIO, count=1)
    with pytest.raises(OSError):
        pool.revert("v", a)
    assert pool.catalog.meta_items("revert.") == []
    pool.write("v", 0, b"3" * CS)
    pool.flush("v")
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.read("v", 0, 1) == b"3" and pool.read(a, 0, 1) == b"1"
    pool.close()


@ON_FS
def test_crash_during_plex_sync_drops_the_plex(pool_tmp):
    pool, faults = crashing_pool(pool_tmp)
    pool.create_volume("v", 4 * MiB)
    pool.write("v", 0, b"a" * MiB)
    pool.write("v", 3 * MiB, b"b" * CS)
    pool.flush("v")
    before = luns(pool)
    s = pool.prepare_snapshot("v", "plex")
    faults.arm_crash("plex.copied", after=1)
    with pytest.raises(errors.SimulatedCrash):
        while True:
            done, total = pool.plex_sync_step(s.id, max_bytes=256 * 1024)
            if done >= total:
                break
    pool = reopen(pool)
    assert pool.check() == []
    assert pool.list_snapshots() == [] and luns(pool) == before
    assert pool.read("v", 0, MiB) == b"a" * MiB and pool.read("v", 3 * MiB, CS) == b"b" * CS
    pool.close()


@ON_FS
@pytest.mark.parametrize("kind,point,happened", [
    ("differential", "promote.copied", False),
    ("differential", "split.promoted", False),
    ("differential", "split.recorded", True),
    ("plex", "split.recorded", True)])
def test_crash_during_split_happened_or_not(pool_tmp, kind, point, happened):
    pool, faults = crashing_pool(pool_tmp)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"s" * (4 * CS))
    s = snap(pool, "v", kind)
    old_naa = pool.snapshot(s).naa
    pool.write("v", 0, b"o" * CS)
    pool.flush("v")
    faults.arm_crash(point)
    with pytest.raises(errors.SimulatedCrash):
        pool.split(s, "w")
    pool = reopen(pool)
    assert pool.check() == []
    names = [v.name for v in pool.list_volumes()]
    if happened:
        w = pool.volume("w")
        assert names == ["v", "w"] and pool.list_snapshots() == []
        assert w.naa not in (old_naa, pool.volume("v").naa)
        assert pool.read("w", 0, 4 * CS) == b"s" * (4 * CS)
        assert luns(pool) == sorted(f"{i}.{e}" for i in (1, w.id) for e in ("hdr", "img"))
        pool.write("w", 0, b"x")             # an independent read-write volume now
        assert pool.read("v", 0, CS) == b"o" * CS
    else:
        assert names == ["v"]
        assert pool.snapshot(s).kind == ("full" if point == "split.promoted" else kind)
        assert pool.read(s, 0, 4 * CS) == b"s" * (4 * CS)
        assert not [f for f in luns(pool) if f.endswith((".partial", ".tmp"))]
    assert pool.check() == []
    pool.close()


# -- plex and full-copy checksums ------------------------------------------------------------
def test_check_finds_rot_in_sealed_copies(pool):
    """A promoted snapshot is sealed as it is copied; a plex once seal() (or scrub) ran.
    check() then verifies every chunk of both."""
    pool.create_volume("v", MiB)
    pool.write("v", 0, os.urandom(8 * CS))
    p = snap(pool, "v", "plex")
    d = snap(pool, "v")
    pool.write("v", 0, os.urandom(8 * CS))
    pool.promote(d)
    assert pool._snaps[d].sealed and not pool._snaps[p].sealed
    pool.seal(p)
    assert pool.check() == []
    for sid, chunk in ((p, 2), (d, 5)):
        with open(pool._img(pool.snapshot(sid).file_id), "r+b") as f:
            f.seek(chunk * CS + 100)
            f.write(b"\x00rot")
    problems = pool.check()
    assert f"snapshot {p} of v: chunk 2 fails its checksum" in problems, problems
    assert f"snapshot {d} of v: chunk 5 fails its checksum" in problems, problems
    pool.delete_snapshot(p)
    pool.delete_snapshot(d)


# -- the default diff-area limit, images for other tools ----------------------------------------
def test_default_diff_limit_is_free_space_minus_reserve(pool, monkeypatch, caplog):
    # A 100 MiB filesystem, so the reserve is min(256 MiB, 10 %) = 10 MiB, with room for
    # 4 chunks above it less what the diff area holds.
    def statfs():
        return 100 * MiB, 10 * MiB + 4 * CS - pool.volume("v").diff_bytes

    monkeypatch.setattr(pool, "statfs", statfs)
    pool.create_volume("v", MiB)
    pool.write("v", 0, b"o" * (8 * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"n" * (2 * CS))         # fits: a stays
    b = snap(pool, "v")
    assert [s.id for s in pool.list_snapshots()] == [a, b]
    with caplog.at_level(logging.WARNING, logger="blockstore"):
        pool.write("v", 2 * CS, b"m" * (3 * CS))    # 3 do not: a goes, its 2 come back
    assert [s.id for s in pool.list_snapshots()] == [b]
    assert pool.read("v", 2 * CS, 3 * CS) == b"m" * (3 * CS)
    assert pool.read(b, 0, 8 * CS) == b"n" * (2 * CS) + b"o" * (6 * CS)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and a in r.getMessage()]
    assert warned and "deleting its oldest snapshot" in warned[0].getMessage()


def test_qemu_img_sees_raw_images(tmp_path):
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed (make setup installs qemu-utils)")
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS)
    pool.create_volume("v", 3 * MiB)
    pool.write("v", MiB, b"q" * CS)
    p = snap(pool, "v", "plex")
    images = [pool.image_path("v"), pool.image_path(p)]
    assert pool.check() == []
    pool.close()
    for img in images:
        out = subprocess.run([qemu_img, "info", "--output=json", img], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        info = json.loads(out)
        assert info["format"] == "raw" and info["virtual-size"] == 3 * MiB, info


@ON_FS
def test_interrupted_revert_to_a_lost_snapshot_is_dropped(pool_tmp, caplog):
    """The revert's source became invalid (its diff area failed) before the roll-forward:
    open logs it, drops the record and leaves the volume as it was; the pool is clean."""
    pool, faults, a, b = revert_setup(pool_tmp)
    faults.arm_crash("revert.copied")
    with pytest.raises(errors.SimulatedCrash):
        pool.revert("v", a)
    pool.catalog.db.execute("UPDATE snapshots SET state='invalid' WHERE snap_id=?", (a,))
    with caplog.at_level(logging.ERROR, logger="blockstore"):
        pool = reopen(pool)
    assert any("cannot be finished" in r.getMessage() for r in caplog.records)
    assert pool.check() == []
    assert pool.catalog.meta_items("revert.") == []
    assert pool.volume("v").size == 2 * MiB          # the shrink never ran
    assert pool.read(b, 0, 4 * CS) == B_HEAD
    pool.delete_snapshot(a)
    pool.close()


def test_seal_records_bind_their_digest_to_one_map_record():
    """A seal record (diff/<id>.sum) applies only to the (slot, epoch, chunk) it was
    computed for: a torn one, or one left by a slot freed and reused, seals nothing."""
    rec = fmt.pack_seal_record(7, 3, 1234, 0xDEADBEEF)
    assert len(rec) == fmt.SEAL_RECORD_SIZE
    assert fmt.unpack_seal_record(rec, 7, 3, 1234) == 0xDEADBEEF
    assert fmt.unpack_seal_record(rec, 8, 3, 1234) is None      # another slot
    assert fmt.unpack_seal_record(rec, 7, 4, 1234) is None      # the slot reused later
    assert fmt.unpack_seal_record(rec, 7, 3, 1235) is None      # for another chunk
    torn = rec[:8] + bytes(8)
    assert fmt.unpack_seal_record(torn, 7, 3, 1234) is None
    assert fmt.unpack_seal_record(bytes(16), 0, 0, 0) is None   # never written
    flipped = bytes([rec[0] ^ 1]) + rec[1:]
    assert fmt.unpack_seal_record(flipped, 7, 3, 1234) is None


def test_an_epoch_table_merges_appended_and_interleaved_chunks():
    """EpochTable's merge: chunks past the sorted part are appended (a sequential
    stream), any other pending ones merged in order; every chunk finds its slot."""
    from blockstore.chunkmap import EpochTable
    t = EpochTable()
    want = {}
    for c in range(0, 6000, 2):                  # ascending: appended at each merge
        t.add(c, c + 7)
        want[c] = c + 7
    for c in range(5999, 0, -2):                 # odd ones, descending: merged
        t.add(c, c + 9)
        want[c] = c + 9
    assert list(t.sorted_chunks()) == sorted(want)
    assert all(t.get(c) == s for c, s in want.items()) and t.get(6001) is None
    assert len(t) == len(want)
