"""The block store engine: pure logic on real files (no kernel parts needed)."""

import errno
import os

import pytest
import xxhash

from blockstore import Faults, Pool, errors
from blockstore.format import FORMAT_VERSION

CS = 4096
MiB = 1 << 20


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
    import json
    hdr = json.load(open(pool.image_path("a")[:-4] + ".hdr"))
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


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_copy_before_write(tmp_path, point):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
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


@pytest.mark.parametrize("point,committed", [("commit.before_record", False),
                                             ("commit.after_record", True)])
def test_crash_around_commit(tmp_path, point, committed):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
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


@pytest.mark.parametrize("point", ["gc.map_written", "gc.map_synced", "delete.after_record"])
def test_crash_during_delete(tmp_path, point):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
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


def test_crash_during_promote(tmp_path):
    faults = Faults()
    pool = Pool.create(str(tmp_path / "p"), chunk_size=CS, faults=faults)
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


def test_scrub_seals_full_copies_and_finds_rot(pool):
    pool.create_volume("v", MiB)
    pool.write("v", 0, os.urandom(8 * CS))
    p = snap(pool, "v", "plex")
    assert pool.scrub() == []
    assert pool.snapshot(p).file_id and pool._snaps[p].sealed
    img = pool._img(pool.snapshot(p).file_id)
    with open(img, "r+b") as f:          # bit rot in chunk 3 of the plex
        f.seek(3 * CS + 7)
        f.write(b"\xff")
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
