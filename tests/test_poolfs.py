"""The loop filesystems the crash, power-cut and model suites put their pools on
(tests/poolfs.py): each is really the filesystem it is named after (XFS with reflink
on, which the engine's preservation by reference needs), and it is unmounted and its
loop device detached however the test using it ends -- passed, failed with a pool still
open, or interrupted with Ctrl-C."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest
from poolfs import backing_image, loop_filesystem, on_filesystems
from support import MKFS, need

from blockstore import Pool
from fuse_mount import loopdev

pytest_plugins = ["pytester"]

FICLONE = 0x40049409          # _IOW(0x94, 9, int): the whole file as a shared extent
ROOT = Path(__file__).resolve().parent.parent


def _fstype(path: Path) -> str:
    """The type of the filesystem mounted at `path` exactly (mountinfo)."""
    types = [fs for mp, fs, _ in loopdev.mountinfo() if mp == str(path)]
    assert types, f"nothing is mounted at {path}"
    return types[-1]


def _clone(src: Path, dst: Path) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())


@on_filesystems("xfs", "btrfs", "ext4", tmp=False)
def test_pool_tmp_is_on_a_fresh_filesystem_of_its_type(pool_fs, pool_tmp, request):
    fstype = request.node.callspec.params["pool_fs"]
    assert pool_tmp.parent == pool_fs and _fstype(pool_fs) == fstype
    assert os.listdir(pool_tmp) == []
    # reflinks where the engine's preservation by reference expects them (a mkfs.xfs
    # without reflink=1 would quietly make every "xfs" run a run of the copy mode)
    (pool_tmp / "a").write_bytes(b"x" * 65536)
    if fstype == "ext4":
        with pytest.raises(OSError) as e:
            _clone(pool_tmp / "a", pool_tmp / "b")
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL), e.value
    else:
        _clone(pool_tmp / "a", pool_tmp / "b")
        assert (pool_tmp / "b").read_bytes() == b"x" * 65536
    # the engine's probe agrees, and (CLONE_EVERY_CHUNK) clones a single whole chunk
    pool = Pool.create(str(pool_tmp / "p"), chunk_size=4096)
    assert pool.preserve_mode == ("copy" if fstype == "ext4" else "reflink")
    pool.create_volume("v", 1 << 20)
    s = pool.prepare_snapshot("v", "differential")
    pool.commit_snapshots([s.id])
    pool.write("v", 0, b"y" * 4096)
    da = pool._volumes["v"].diff
    assert da is not None and da.unsummed() == (0 if fstype == "ext4" else 1)
    pool.close()
    pool = Pool.open(str(pool_tmp / "p"))
    assert pool.read("v", 0, 4096) == b"y" * 4096
    pool.close()


def _gone(image: str, mnt: Path, timeout: float = 10) -> None:
    """Nothing mounted at mnt, no loop device on image, image removed (a loop device
    whose detach the kernel deferred goes as soon as its last user does)."""
    deadline = time.monotonic() + timeout
    while loopdev.loops_backed_by(image, lexical=True):
        assert time.monotonic() < deadline, loopdev.loops_backed_by(image, lexical=True)
        time.sleep(0.05)
    assert not loopdev.mounted_at(mnt)
    assert not os.path.exists(image)


@pytest.mark.kernel
@pytest.mark.parametrize("exc", [AssertionError, KeyboardInterrupt])
@pytest.mark.parametrize("hold_a_file", [False, True])
def test_loop_filesystem_is_gone_after_a_failure(tmp_path, exc, hold_a_file):
    need(MKFS["xfs"][0])
    held = None
    with pytest.raises(exc), loop_filesystem("xfs", tmp_path) as mnt:
        image = backing_image(mnt)
        if hold_a_file:      # what a failed test's open pool does: umount says EBUSY
            held = open(mnt / "f", "wb")   # noqa: SIM115 - open past the block on purpose
        raise exc()
    assert not loopdev.mounted_at(mnt)     # lazily, if a file is still open there
    if held is not None:
        held.close()
    _gone(image, mnt)


# appended to the inner session's conftest: after everything is torn down (the runner's
# own sessionfinish tears the fixtures down; trylast runs after it), and while the
# session's process still lives -- at its exit the kernel would release it all anyway
_AFTER_TEARDOWN = """

@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    from fuse_mount import loopdev
    where = Path(__file__).parent / "where"
    mnt, image = where.read_text().split("\\n")
    left = [f"mount {mnt}"] if loopdev.mounted_at(mnt) else []
    left += loopdev.loops_backed_by(image, lexical=True)
    where.with_name("left").write_text(" ".join(left) or "nothing")
"""


@pytest.mark.kernel
@pytest.mark.parametrize("ending", ["assert False", "raise KeyboardInterrupt"])
def test_a_failed_test_leaves_no_loop_filesystem(pytester, monkeypatch, ending):
    """An inner session with the real conftest whose one test fails (or is interrupted)
    with a pool still open on a loop-mounted XFS -- kept alive by pytest's record of the
    failure for post-mortem debugging (sys.last_traceback) --: right after the session's
    teardown the filesystem is unmounted and its loop device detached."""
    need(MKFS["xfs"][0])
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text() + _AFTER_TEARDOWN)
    pytester.makepyfile(test_inner=f"""
        from pathlib import Path
        from blockstore import Pool
        from fuse_mount import loopdev
        from poolfs import on_filesystems

        @on_filesystems("xfs", tmp=False)
        def test_fails_with_the_pool_open(pool_fs, pool_tmp):
            pool = Pool.create(str(pool_tmp / "p"))
            pool.create_volume("v", 1 << 20)
            dev = next(src for mp, _, src in loopdev.mountinfo() if mp == str(pool_fs))
            Path(__file__).with_name("where").write_text(
                f"{{pool_fs}}\\n{{loopdev.backing_file(dev)}}")
            {ending}
    """)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                        "-W", "ignore::pytest.PytestUnknownMarkWarning")
    out = res.stdout.str()
    assert res.ret == (1 if ending.startswith("assert") else 2), out
    assert "tests leaked" not in out, out
    assert (pytester.path / "left").read_text() == "nothing", out
