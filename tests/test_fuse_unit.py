"""fuse_mount without the kernel: errno mapping, the write barrier, and the handlers of
ShadowOperations called directly over a real Pool in a temporary directory."""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing

from blockstore import Pool
from blockstore import errors as bse
from fuse_mount import errors as ferr
from fuse_mount.barrier import WriteBarrier
from fuse_mount.operations import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ShadowOperations
from fuse_mount.presentation import Presentation
from fuse_mount.view import (
    EXPOSED_INO,
    HOSTS_INO,
    ROOT_INO,
    SHADOW_INO,
    SNAP_INO_BIT,
    VOLUME_INO_BASE,
    VOLUMES_INO,
    ViewError,
    snapshot_inode,
)

MiB = 1 << 20


# --------------------------------------------------------------------------- errno mapping


@pytest.mark.parametrize(
    ("exc", "writing", "code"),
    [
        (bse.NotFound("x"), False, errno.ENOENT),
        (bse.ReadOnly("x"), True, errno.EROFS),
        (bse.OutOfRange("x"), False, errno.EINVAL),
        (bse.OutOfRange("x"), True, errno.ENOSPC),
        (bse.SnapshotInvalid("x"), False, errno.EIO),
        (bse.CorruptData("x"), False, errno.EIO),
        (bse.NoSpace("x"), True, errno.ENOSPC),
        (bse.Busy("x"), False, errno.EBUSY),
        (bse.InvalidState("x"), False, errno.EBUSY),
        (bse.Unsupported("x"), False, errno.EOPNOTSUPP),
        (bse.FormatError("x"), False, errno.EIO),
        (OSError(errno.ENOSPC, "full"), True, errno.ENOSPC),
        (OSError(errno.EPERM, "odd"), False, errno.EIO),
        (ValueError("bug"), False, errno.EIO),
    ],
)
def test_errno_mapping(exc: BaseException, writing: bool, code: int) -> None:
    assert ferr.errno_for(exc, writing=writing) == code


def test_decorator_raises_only_fuse_errors(caplog: pytest.LogCaptureFixture) -> None:
    @ferr.fuse_errors
    async def boom() -> None:
        raise KeyError("a bug")

    @ferr.fuse_errors(writing=True)
    async def past_end() -> None:
        raise bse.OutOfRange("past the end")

    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(boom)
    assert ei.value.errno == errno.EIO
    assert "unexpected error" in caplog.text and "KeyError" in caplog.text  # traceback logged
    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(past_end)
    assert ei.value.errno == errno.ENOSPC

    with pytest.raises(pyfuse3.FUSEError) as ei, ferr.store_errors("ctx"):
        raise bse.Busy("busy")
    assert ei.value.errno == errno.EBUSY


def test_view_refusal_is_its_errno_and_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    @ferr.fuse_errors
    async def refused() -> None:
        raise ViewError(errno.ENOTDIR)

    assert ferr.errno_for(ViewError(errno.EROFS)) == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(refused)
    assert ei.value.errno == errno.ENOTDIR
    assert caplog.records == []   # an answer to the request, not an error of ours


def test_cancellation_is_not_mapped() -> None:
    @ferr.fuse_errors
    async def sleeper() -> None:
        await trio.sleep(10)

    async def main() -> None:
        with trio.move_on_after(0.01) as cs:
            await sleeper()
        assert cs.cancelled_caught

    trio.run(main)


# --------------------------------------------------------------------------- barrier


class FlushPool:
    def __init__(self) -> None:
        self.flushed: list[str] = []

    def flush(self, name: str) -> None:
        if name == "missing":
            raise bse.NotFound("no volume missing")
        self.flushed.append(name)


def test_barrier_holds_writes_not_reads_and_flushes() -> None:
    pool = FlushPool()

    async def main() -> None:
        b = WriteBarrier(pool)
        events: list[str] = []

        async def writer(name: str) -> None:
            await b.wait_writable(name)
            events.append(f"write {name}")

        h = await b.hold(["a", "b"], deadline=5)
        assert pool.flushed == ["a", "b"] and h.flushed and h.active
        assert b.is_held("a") and not b.is_held("c")
        async with trio.open_nursery() as n:
            n.start_soon(writer, "a")
            n.start_soon(writer, "c")
            await trio.sleep(0.2)
            assert events == ["write c"]          # a waits, c does not
            assert b.release(h) is True
        assert events == ["write c", "write a"]
        assert not b.is_held("a")

    trio.run(main)


def test_barrier_waits_for_inflight_writes_before_flushing() -> None:
    pool = FlushPool()

    async def main() -> None:
        b = WriteBarrier(pool)
        b.begin_write("a")                       # a write in flight
        got: list[object] = []

        async def do_hold() -> None:
            got.append(await b.hold(["a"], deadline=5))

        async with trio.open_nursery() as n:
            n.start_soon(do_hold)
            await trio.sleep(0.1)
            assert got == [] and pool.flushed == []   # still draining
            b.end_write("a")
        assert pool.flushed == ["a"]
        assert b.release(["a"]) is True

    trio.run(main)


def test_barrier_deadline_expires_and_says_so() -> None:
    pool = FlushPool()

    async def main() -> None:
        b = WriteBarrier(pool)
        h = await b.hold(["a"], deadline=10)
        t0 = trio.current_time()
        await b.wait_writable("a")               # wakes at the deadline, not before
        assert trio.current_time() - t0 == pytest.approx(10, abs=0.5)
        assert h.expired and not h.active
        assert b.release(h) is False
        # release by names also reports the expiry
        await b.hold(["x"], deadline=1)
        await trio.sleep(2)
        assert not b.is_held("x")
        assert b.release(["x"]) is False

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_barrier_flush_error_drops_the_hold() -> None:
    pool = FlushPool()

    async def main() -> None:
        b = WriteBarrier(pool)
        with pytest.raises(bse.NotFound):
            await b.hold(["a", "missing"])
        assert not b.is_held("a") and b.holds == []

    trio.run(main)


# --------------------------------------------------------------------------- handlers


@pytest.fixture
def pool(tmp_path):  # type: ignore[no-untyped-def]
    p = Pool.create(str(tmp_path / "pool"))
    try:
        yield p
    finally:
        p.close()


def run(coro_fn, *args):  # type: ignore[no-untyped-def]
    return trio.run(coro_fn, *args)


def fuse_errno(coro_fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(coro_fn, *args)
    return ei.value.errno


def fields(**kw: bool) -> SimpleNamespace:
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return SimpleNamespace(**{n: kw.get(n, False) for n in names})


def _snapshot(pool: Pool, volume: str) -> str:
    s = pool.prepare_snapshot(volume)
    pool.commit_snapshots([s.id])
    return s.id


def test_tree_inodes_and_lookup(pool: Pool) -> None:
    v = pool.create_volume("v", 4 * MiB)
    sid = _snapshot(pool, "v")
    ops = ShadowOperations(pool)
    attr = run(ops.lookup, VOLUMES_INO, b"v.img", None)
    assert attr.st_ino == VOLUME_INO_BASE + v.id
    assert attr.st_size == 4 * MiB
    assert stat.S_IMODE(attr.st_mode) == 0o644 and stat.S_ISREG(attr.st_mode)
    sattr = run(ops.lookup, SHADOW_INO, f"{sid}.img".encode(), None)
    assert sattr.st_ino == snapshot_inode(sid) and sattr.st_ino & SNAP_INO_BIT
    assert stat.S_IMODE(sattr.st_mode) == 0o444
    # stable across a new Operations object (= daemon restart)
    assert run(ShadowOperations(pool).lookup, SHADOW_INO, f"{sid}.img".encode(), None
               ).st_ino == sattr.st_ino
    assert fuse_errno(ops.lookup, SHADOW_INO, b"nope.img", None) == errno.ENOENT
    assert fuse_errno(ops.lookup, EXPOSED_INO, f"{sid}.img".encode(), None) == errno.ENOENT
    assert run(ops.lookup, ROOT_INO, b".shadow", None).st_ino == SHADOW_INO
    # exposure appears after the generation bump, same inode as the device path
    pool.set_exposed(sid, "monday")
    assert run(ops.lookup, EXPOSED_INO, b"monday.img", None).st_ino == sattr.st_ino
    pool.create_volume("w", MiB)
    assert run(ops.lookup, VOLUMES_INO, b"w.img", None).st_size == MiB


def test_read_write_and_snapshot_refusals(pool: Pool) -> None:
    pool.create_volume("v", 1 * MiB)
    pool.write("v", 0, b"A" * 4096)
    sid = _snapshot(pool, "v")
    ops = ShadowOperations(pool)
    vino = run(ops.lookup, VOLUMES_INO, b"v.img", None).st_ino
    sino = run(ops.lookup, SHADOW_INO, f"{sid}.img".encode(), None).st_ino

    fi = run(ops.open, vino, os.O_RDWR, None)
    assert fi.keep_cache and not fi.direct_io
    assert run(ops.write, fi.fh, 0, b"B" * 4096) == 4096
    assert run(ops.read, fi.fh, 0, 8) == b"B" * 8
    # past the end: ENOSPC; straddling: a short write up to the end
    assert fuse_errno(ops.write, fi.fh, MiB, b"x") == errno.ENOSPC
    assert run(ops.write, fi.fh, MiB - 10, b"y" * 100) == 10
    run(ops.fsync, fi.fh, False)
    # volume sizes change only through the API; snapshots refuse every setattr
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    assert fuse_errno(ops.setattr, vino, attr, fields(update_size=True), None, None
                      ) == errno.EPERM
    attr.st_size = MiB
    assert run(ops.setattr, vino, attr, fields(update_size=True), None, None).st_size == MiB
    attr.st_mtime_ns = 10**18
    assert run(ops.setattr, vino, attr, fields(update_mtime=True), None, None
               ).st_mtime_ns == 10**18
    assert fuse_errno(ops.setattr, vino, attr, fields(update_mode=True), None, None
                      ) == errno.EPERM
    for f in ("update_size", "update_mode", "update_mtime"):
        assert fuse_errno(ops.setattr, sino, attr, fields(**{f: True}), None, None
                          ) == errno.EROFS

    for flags in (os.O_RDWR, os.O_WRONLY):
        assert fuse_errno(ops.open, sino, flags, None) == errno.EROFS
    sfi = run(ops.open, sino, os.O_RDONLY, None)
    assert run(ops.read, sfi.fh, 0, 8) == b"A" * 8            # old content
    assert fuse_errno(ops.write, sfi.fh, 0, b"z") == errno.EROFS
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert fuse_errno(ops.fallocate, sfi.fh, mode, 0, 4096) == errno.EROFS

    # fallocate on the volume (the kernel path is in test_fuse_mount.py's punch-hole test)
    run(ops.fallocate, fi.fh, mode, 0, 65536)
    assert run(ops.read, fi.fh, 0, 8) == bytes(8)
    assert fuse_errno(ops.fallocate, fi.fh, 0, 0, 4096) == errno.EOPNOTSUPP
    # KEEP_SIZE past the end: clipped to the LUN (legal on a file), never OutOfRange
    size = pool.lun_size("v")
    pool.write("v", size - 8, b"E" * 8)
    run(ops.fallocate, fi.fh, mode, size - 4, 1 << 30)
    assert pool.read("v", size - 8, 8) == b"EEEE" + bytes(4)
    run(ops.fallocate, fi.fh, mode, size + 4096, 4096)        # wholly past: a no-op
    assert run(ops.read, sfi.fh, 0, 8) == b"A" * 8            # snapshot unchanged

    # namespace changes are refused
    assert fuse_errno(ops.create, VOLUMES_INO, b"new.img", 0o644, os.O_RDWR, None
                      ) == errno.EPERM
    assert fuse_errno(ops.unlink, EXPOSED_INO, b"x.img", None) == errno.EROFS
    run(ops.release, fi.fh)
    run(ops.release, sfi.fh)
    assert ops.open_handles() == 0


def test_renamed_or_deleted_lun_keeps_handles_sane(pool: Pool) -> None:
    pool.create_volume("v", MiB)
    ops = ShadowOperations(pool)
    ino = run(ops.lookup, VOLUMES_INO, b"v.img", None).st_ino
    fi = run(ops.open, ino, os.O_RDWR, None)
    run(ops.release, fi.fh)
    pool.delete_volume("v")
    assert fuse_errno(ops.getattr, ino, None) == errno.ENOENT
    assert fuse_errno(ops.read, fi.fh, 0, 1) == errno.EBADF


def test_lun_masking_host_views(pool: Pool) -> None:
    """The root is the local host's view; MOUNT/hosts/<host>/ the others' (same inodes);
    the presentation's update() rebuilds the operations' tree at once."""
    async def names(ops: ShadowOperations, ino: int) -> list[bytes]:
        got: list[bytes] = []
        orig = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = lambda tok, name, attr, nxt: got.append(name) or True
        try:
            await ops.readdir(ino, 0, None)
        finally:
            pyfuse3.readdir_reply = orig
        return got

    pool.create_volume("v", MiB)
    sid = _snapshot(pool, "v")
    pool.set_exposed(sid, "monday")
    presentation = Presentation("here")
    ops = ShadowOperations(pool, presentation=presentation)
    presentation.update("here", {sid: frozenset({"hostB"})}, {"hostA"})
    img = f"{sid}.img".encode()
    assert run(names, ops, ROOT_INO) == [b"volumes", b"exposed", b".shadow", b"hosts"]
    assert run(names, ops, HOSTS_INO) == [b"hostA", b"hostB"]
    assert fuse_errno(ops.lookup, SHADOW_INO, img, None) == errno.ENOENT
    assert fuse_errno(ops.lookup, EXPOSED_INO, b"monday.img", None) == errno.ENOENT
    hb = run(ops.lookup, HOSTS_INO, b"hostB", None).st_ino
    assert stat.S_ISDIR(run(ops.getattr, hb, None).st_mode)
    assert run(names, ops, hb) == [b"volumes", b"exposed", b".shadow"]
    shadow_b = run(ops.lookup, hb, b".shadow", None).st_ino
    assert stat.S_IMODE(run(ops.getattr, shadow_b, None).st_mode) == 0o711
    assert run(names, ops, shadow_b) == []                       # hidden
    assert run(ops.lookup, shadow_b, img, None).st_ino == snapshot_inode(sid)
    exposed_b = run(ops.lookup, hb, b"exposed", None).st_ino
    assert run(names, ops, exposed_b) == [b"monday.img"]
    volumes_b = run(ops.lookup, hb, b"volumes", None).st_ino
    assert run(names, ops, volumes_b) == []                      # volumes: local only
    assert run(names, ops, VOLUMES_INO) == [b"v.img"]
    ha = run(ops.lookup, HOSTS_INO, b"hostA", None).st_ino
    assert fuse_errno(ops.lookup, ha + 3, img, None) == errno.ENOENT
    assert fuse_errno(ops.mknod, shadow_b, b"x", 0, 0, None) == errno.EROFS
    assert fuse_errno(ops.open, hb, os.O_RDONLY, None) == errno.EISDIR
    # back to the default: the local view again, host dirs keep their inodes
    presentation.update("here", {}, {"hostA"})
    assert run(ops.lookup, SHADOW_INO, img, None).st_ino == snapshot_inode(sid)
    assert run(ops.lookup, HOSTS_INO, b"hostA", None).st_ino == ha


def test_pyfuse3_is_the_patched_build() -> None:
    """`make venv` installs pyfuse3 3.5.0 built with fuse_mount/patches/*.patch (fallocate,
    always-reply). Checked here without the kernel so an unpatched pyfuse3 (a plain
    `pip install`) fails with this message, not with an EOPNOTSUPP deep in a kernel test."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    version = importlib.metadata.version("pyfuse3")
    assert version.startswith("3.5.0+shadowplex."), (
        f"pyfuse3 {version} is not the patched build; run `make venv`")
    # the default handler says ENOSYS (the kernel then falls back to EOPNOTSUPP)...
    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(pyfuse3.Operations().fallocate, 1, 0, 0, 4096)
    assert ei.value.errno == errno.ENOSYS
    # ...and the build script's own check (version = hash of the patch in this tree, the
    # C handler compiled in) agrees: a patch edited without `make venv` fails here
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(["bash", str(root / "fuse_mount/patches/build-pyfuse3.sh"),
                          "--check", sys.executable], capture_output=True, text=True,
                         check=False, timeout=60)
    assert res.returncode == 0, res.stderr
