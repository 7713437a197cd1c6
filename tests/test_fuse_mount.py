"""The data path for real: `python -m provider.daemon` as a subprocess over a real pool,
the kernel's FUSE and loop drivers, mkfs/mount/e2fsck on top.

Snapshots and volumes are created BEFORE the daemon starts by opening the pool directly
(the daemon owns the pool lock while it runs), except where the moment matters (kill -9
after a snapshot and writes): there the daemon runs with its control socket
(tests/harness.start_daemon) and the snapshot is taken through it. Changes while
mounted are also tested with an in-process mount (harness.InProcMount: run_mount on a
trio thread of this process) whose Pool object the test also holds.

fallocate/discard tests need the patched pyfuse3 that `make venv` builds
(fuse_mount/patches/); test_fuse_unit.py says so plainly when it is missing.

Every daemon, mount and loop device is cleaned up in `finally`, even on failure.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from harness import InProcMount, start_daemon
from harness import fuse_daemon as daemon

from blockstore import Pool
from fuse_mount import loopdev
from fuse_mount.session import (
    FSTYPE,
    MountState,
    force_unmount,
    mount_state,
)
from fuse_mount.view import LUN_TIMEOUT, VOLUME_INO_BASE, snapshot_inode
from provider.config import EXIT_CONFIG

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


@contextmanager
def loop(path: Path, read_only: bool = False) -> Iterator[str]:
    dev = loopdev.attach(path, read_only=read_only)
    try:
        yield dev
    finally:
        for mp, _fs, source in loopdev.mountinfo():
            if source == dev:
                subprocess.run(["umount", mp], capture_output=True, check=False)
        with suppress(loopdev.LoopError):
            loopdev.detach(dev)


@contextmanager
def mounted(dev: str, target: Path, opts: str = "") -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    cmd = ["mount", *(["-o", opts] if opts else []), dev, str(target)]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield target
    finally:
        res = subprocess.run(["umount", str(target)], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def run_ok(*cmd: str) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_pool(tmp: Path, volumes: dict[str, int]) -> Path:
    p = tmp / "pool"
    pool = Pool.create(str(p))
    try:
        for name, size in volumes.items():
            pool.create_volume(name, size)
    finally:
        pool.close()
    return p


def take_snapshot(pool_dir: Path, volume: str, exposed: str | None = None) -> str:
    pool = Pool.open(str(pool_dir))
    try:
        s = pool.prepare_snapshot(volume)
        pool.commit_snapshots([s.id])
        if exposed:
            pool.set_exposed(s.id, exposed)
        return s.id
    finally:
        pool.close()


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    m = tmp_path / "mnt"
    m.mkdir()
    return m


# --------------------------------------------------------------------------- listing


def test_volumes_listed_with_sizes_and_stable_inodes(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"alpha": 64 * MiB, "beta": 8 * MiB})
    with Pool.open(str(pool_dir)) as pool:
        ids = {v.name: v.id for v in pool.list_volumes()}
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        info = mount_state(mnt)
        assert info.state is MountState.MOUNTED and info.fstype == FSTYPE
        assert {"volumes", "exposed"} <= set(os.listdir(mnt))
        assert sorted(os.listdir(mnt / "volumes")) == ["alpha.img", "beta.img"]
        st = os.stat(mnt / "volumes" / "alpha.img")
        assert st.st_size == 64 * MiB and stat.S_IMODE(st.st_mode) == 0o644
        assert st.st_ino == VOLUME_INO_BASE + ids["alpha"]
        assert os.stat(mnt / "volumes" / "beta.img").st_size == 8 * MiB
        assert os.listdir(mnt / "exposed") == []
        sv = os.statvfs(mnt)
        assert sv.f_blocks > 0 and sv.f_bavail <= sv.f_blocks
        # plain file I/O through the mount
        fd = os.open(mnt / "volumes" / "beta.img", os.O_RDWR)
        try:
            os.pwrite(fd, b"hello shadowplex", 4096)
            os.fsync(fd)
            assert os.pread(fd, 16, 4096) == b"hello shadowplex"
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x", 8 * MiB)           # past the end of the LUN
            assert ei.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        # volume sizes and names change only through the API
        with pytest.raises(PermissionError):
            os.truncate(mnt / "volumes" / "beta.img", 0)
        with pytest.raises(PermissionError):
            (mnt / "volumes" / "new.img").write_bytes(b"")
    with Pool.open(str(pool_dir)) as pool:
        assert pool.read("beta", 4096, 16) == b"hello shadowplex"


def test_mkfs_ext4_through_loop_then_fsck_clean(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"v": 256 * MiB})
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        img = mnt / "volumes" / "v.img"
        with loop(img) as dev:
            run_ok("mkfs.ext4", "-q", dev)
            with mounted(dev, tmp_path / "fs") as fs:
                data = os.urandom(3 * MiB)
                with open(fs / "file1", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                (fs / "dir").mkdir()
                (fs / "dir" / "small").write_text("small file\n")
                os.sync()
            out = run_ok("e2fsck", "-fn", dev)
            assert "clean" in out or "files" in out
            with mounted(dev, tmp_path / "fs", "ro") as fs:
                assert (fs / "file1").read_bytes() == data
                assert (fs / "dir" / "small").read_text() == "small file\n"


# --------------------------------------------------------------------------- snapshots


def test_snapshot_is_read_only_and_hidden(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"v": 16 * MiB})
    with Pool.open(str(pool_dir)) as pool:
        pool.write("v", 0, b"OLD!" * 1024)
    sid = take_snapshot(pool_dir, "v")
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        shadow = mnt / ".shadow" / f"{sid}.img"
        assert os.listdir(mnt / ".shadow") == []          # hidden
        assert os.listdir(mnt / "exposed") == []
        st = os.stat(shadow)                               # exact name works
        assert st.st_size == 16 * MiB and stat.S_IMODE(st.st_mode) == 0o444
        assert st.st_ino == snapshot_inode(sid)
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / ".shadow" / "00000000-0000-0000-0000-000000000000.img")
        for flags in (os.O_RDWR, os.O_WRONLY):
            with pytest.raises(OSError) as ei:
                os.open(shadow, flags)
            assert ei.value.errno == errno.EROFS
        with pytest.raises(OSError) as ei:
            os.truncate(shadow, 0)
        assert ei.value.errno == errno.EROFS
        with pytest.raises(OSError) as ei:
            os.chmod(shadow, 0o644)
        assert ei.value.errno == errno.EROFS
        fd = os.open(shadow, os.O_RDONLY)
        try:
            # O_RDWR is refused above, so a read-only fd is all one can get: the VFS
            # refuses fallocate on it (EBADF) before the request reaches the daemon
            with pytest.raises(OSError) as ei:
                fallocate(fd, PUNCH, 0, 4096)
            assert ei.value.errno == errno.EBADF
            # new writes to the origin do not change the snapshot
            vfd = os.open(mnt / "volumes" / "v.img", os.O_RDWR)
            try:
                os.pwrite(vfd, b"NEW!" * 1024, 0)
                os.fsync(vfd)
                assert os.pread(vfd, 4, 0) == b"NEW!"
            finally:
                os.close(vfd)
            assert os.pread(fd, 8, 0) == b"OLD!OLD!"
        finally:
            os.close(fd)
        with pytest.raises(OSError) as ei:
            (mnt / "exposed" / "x.img").write_bytes(b"")
        assert ei.value.errno == errno.EROFS


PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) via libc (os.posix_fallocate is mode 0 only, and glibc emulates it by
    writing when the file system says EOPNOTSUPP, which would hide the answer)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def volume_image_blocks(pool_dir: Path) -> int:
    """st_blocks of the pool's only LUN image (the volume; differential snapshots have
    none): how much of the volume is really allocated on the pool's disk."""
    (img,) = (pool_dir / "luns").glob("*.img")
    return os.stat(img).st_blocks


def test_punch_hole_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) on MOUNT/volumes/v.img reaches pool.discard (needs
    the patched pyfuse3): the range reads zeros, exactly (unaligned edges keep their
    bytes), space comes back, a snapshot taken before keeps the old data; other modes are
    EOPNOTSUPP; a snapshot cannot be punched."""
    pool_dir = make_pool(tmp_path, {"v": 16 * MiB})
    old = os.urandom(4 * MiB)
    with Pool.open(str(pool_dir)) as pool:
        pool.write("v", 0, old)
        pool.flush("v")
    sid = take_snapshot(pool_dir, "v")
    # unaligned on both ends (chunks are 64 KiB): partial chunks must be zeroed in place
    off, length = MiB + 4096 + 512, 3 * 65536 + 1000
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        fd = os.open(mnt / "volumes" / "v.img", os.O_RDWR)
        try:
            fallocate(fd, PUNCH, off, length)
            os.fsync(fd)
            assert os.pread(fd, length, off) == bytes(length)
            assert os.pread(fd, 4096, off - 4096) == old[off - 4096:off]
            assert os.pread(fd, 4096, off + length) == old[off + length:off + length + 4096]
            # KEEP_SIZE past the end: clipped, the size is unchanged
            fallocate(fd, PUNCH, 16 * MiB - 4096, 1 * MiB)
            assert os.fstat(fd).st_size == 16 * MiB
            # mode 0 (preallocate) and ZERO_RANGE: a thin LUN has nothing to allocate
            for mode in (0, 0x10 | 0x01):
                with pytest.raises(OSError) as ei:
                    fallocate(fd, mode, 0, 4096)
                assert ei.value.errno == errno.EOPNOTSUPP, mode
            # the kernel dropped its cached pages of the punched range: a fresh open reads
            # what the store has, zeros
            with open(mnt / "volumes" / "v.img", "rb") as f:
                f.seek(off)
                assert f.read(length) == bytes(length)
        finally:
            os.close(fd)
        with open(mnt / ".shadow" / f"{sid}.img", "rb") as f:
            assert f.read(4 * MiB) == old                     # the snapshot kept it all
            # a snapshot opens read-only only (O_RDWR: EROFS), and the VFS refuses
            # fallocate on a read-only fd with EBADF before the daemon is asked
            with pytest.raises(OSError) as ei:
                fallocate(f.fileno(), PUNCH, 0, 4096)
            assert ei.value.errno == errno.EBADF
    with Pool.open(str(pool_dir)) as pool:
        expect = bytearray(old)
        expect[off:off + length] = bytes(length)
        assert pool.read("v", 0, 4 * MiB) == bytes(expect)
        assert pool.read(sid, 0, 4 * MiB) == old
        assert pool.check() == []
        # with no snapshot left, a punch of whole chunks frees the pool's disk space
        pool.delete_snapshot(sid)
        before = volume_image_blocks(pool_dir)
    with daemon(pool_dir, mnt, tmp_path / "d2.log"):
        fd = os.open(mnt / "volumes" / "v.img", os.O_RDWR)
        try:
            fallocate(fd, PUNCH, 2 * MiB, 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert before - volume_image_blocks(pool_dir) >= (2 * MiB) // 512
    with Pool.open(str(pool_dir)) as pool:
        assert pool.read("v", 2 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert pool.check() == []


def test_discard_through_a_loop_device(tmp_path: Path, mnt: Path) -> None:
    """A loop device on a volume image advertises discard (the kernel sees a fallocate
    that works): blkdiscard zeroes the range and frees it, fstrim on a mounted ext4
    returns deleted files' blocks to the pool. This is what VMs and filesystems on the
    volumes use to thin-provision."""
    pool_dir = make_pool(tmp_path, {"v": 64 * MiB})
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        img = mnt / "volumes" / "v.img"
        with loop(img) as dev:
            name = os.path.basename(dev)
            granularity = int(Path(f"/sys/block/{name}/queue/discard_granularity").read_text())
            assert int(Path(f"/sys/block/{name}/queue/discard_max_bytes").read_text()) > 0
            assert granularity > 0
            data = os.urandom(8 * MiB)
            with open(dev, "r+b", buffering=0) as f:
                f.write(data)
                os.fsync(f.fileno())
            allocated = volume_image_blocks(pool_dir)
            run_ok("blkdiscard", "--offset", str(2 * MiB), "--length", str(4 * MiB), dev)
            assert allocated - volume_image_blocks(pool_dir) >= (4 * MiB) // 512
            with open(img, "rb") as f:                 # through the mount, not the loop
                got = f.read(8 * MiB)
            assert got[2 * MiB:6 * MiB] == bytes(4 * MiB)
            assert got[:2 * MiB] == data[:2 * MiB] and got[6 * MiB:] == data[6 * MiB:]
            # ext4: nodiscard so mkfs leaves the blocks, then fstrim after deleting a file
            run_ok("mkfs.ext4", "-q", "-E", "nodiscard", dev)
            with mounted(dev, tmp_path / "fs") as fs:
                (fs / "big").write_bytes(os.urandom(16 * MiB))
                os.sync()
                full = volume_image_blocks(pool_dir)
                (fs / "big").unlink()
                os.sync()
                out = run_ok("fstrim", "-v", str(fs))
                assert "trimmed" in out
                assert full - volume_image_blocks(pool_dir) >= (16 * MiB) // 512, out
            run_ok("e2fsck", "-fn", dev)
    with Pool.open(str(pool_dir)) as pool:
        assert pool.check() == []


def test_exposed_listing(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"v": 8 * MiB})
    sid = take_snapshot(pool_dir, "v", exposed="monday")
    take_snapshot(pool_dir, "v")  # a second, not exposed
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        assert os.listdir(mnt / "exposed") == ["monday.img"]
        a, b = os.stat(mnt / "exposed" / "monday.img"), os.stat(mnt / ".shadow" / f"{sid}.img")
        assert a.st_ino == b.st_ino and stat.S_IMODE(a.st_mode) == 0o444
        with pytest.raises(OSError) as ei:
            os.open(mnt / "exposed" / "monday.img", os.O_RDWR)
        assert ei.value.errno == errno.EROFS


def test_differential_snapshot_keeps_old_filesystem(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"v": 128 * MiB})
    log = tmp_path / "d.log"
    old = os.urandom(2 * MiB)
    with daemon(pool_dir, mnt, log), loop(mnt / "volumes" / "v.img") as dev:
        run_ok("mkfs.ext4", "-q", dev)
        with mounted(dev, tmp_path / "fs") as fs:
            (fs / "keep").write_bytes(old)
            (fs / "doomed").write_text("to be deleted\n")
        run_ok("e2fsck", "-fn", dev)
    sid = take_snapshot(pool_dir, "v")                         # daemon stopped
    new = os.urandom(2 * MiB)
    with daemon(pool_dir, mnt, log):
        with loop(mnt / "volumes" / "v.img") as dev, mounted(dev, tmp_path / "fs") as fs:
            (fs / "keep").write_bytes(new)
            (fs / "doomed").unlink()
            (fs / "added").write_bytes(os.urandom(5 * MiB))
            os.sync()
        # the snapshot, through its hidden device path, read-only loop + ro,noload
        shadow = mnt / ".shadow" / f"{sid}.img"
        target = tmp_path / "snapfs"
        target.mkdir()
        rec = loopdev.expose_mount(shadow, target)
        try:
            assert rec.fstype == "ext4"
            assert md5(target / "keep") == hashlib.md5(old).hexdigest()
            assert (target / "doomed").read_text() == "to be deleted\n"
            assert not (target / "added").exists()
        finally:
            loopdev.unexpose_mount(rec)
        with loop(shadow, read_only=True) as sdev:
            run_ok("e2fsck", "-fn", sdev)
        with loop(mnt / "volumes" / "v.img", read_only=True) as vdev:
            run_ok("e2fsck", "-fn", vdev)
            with mounted(vdev, tmp_path / "fs", "ro,noload") as fs:
                assert md5(fs / "keep") == hashlib.md5(new).hexdigest()
    with Pool.open(str(pool_dir)) as pool:
        assert pool.check() == []


# --------------------------------------------------------------------------- lifecycle


def test_kill9_leaves_dead_mount_then_restart_works(tmp_path: Path, mnt: Path,
                                                     sockdir: str) -> None:
    """kill -9 of serve (with its control socket) after a snapshot and writes after it:
    the mount is left dead (ENOTCONN, never an empty directory), and the restarted daemon
    serves the snapshot's point-in-time content, every fsync'ed write, and a pool whose
    check() is clean. Invariant 1 (a snapshot never changes, whatever happens to the
    daemon) and the durability promise of fsync."""
    pool_dir = make_pool(tmp_path, {"v": 8 * MiB})
    old = os.urandom(1 * MiB)
    with Pool.open(str(pool_dir)) as pool:
        pool.write("v", 0, old)
        pool.flush("v")
    synced_a, synced_b = os.urandom(200_000), os.urandom(64 * 1024)
    unsynced = os.urandom(64 * 1024)
    # no writers: nothing is loop-mounted, and no hook directory of the host is read
    d = start_daemon(tmp_path, sockdir, {}, {"fsfreeze": False, "hooks_dir": None})
    killed = False
    try:
        try:
            with d.client() as c:    # persistent: survives the daemon, unlike "backup"
                sid = c.snapshot_create(["v"], context="app-rollback")[
                    "snapshots"][0]["snapshot_id"]
            fd = os.open(mnt / "volumes" / "v.img", os.O_RDWR)
            try:
                os.pwrite(fd, synced_a, 4096)        # over old data: copy-before-write
                os.pwrite(fd, synced_b, 5 * MiB)     # over a hole
                os.fsync(fd)
                # held in memory (or not) when the kill comes: must never tear anything
                os.pwrite(fd, unsynced, 2 * MiB)
            finally:
                os.close(fd)
            d.proc.kill()
            d.proc.wait(10)
            killed = True
        finally:
            if not killed:
                d.stop()
        assert mount_state(mnt).state is MountState.STALE     # never an empty dir
        with pytest.raises(OSError) as ei:
            os.listdir(mnt)
        assert ei.value.errno == errno.ENOTCONN
        expect = bytearray(old + bytes(7 * MiB))
        expect[4096:4096 + len(synced_a)] = synced_a
        expect[5 * MiB:5 * MiB + len(synced_b)] = synced_b
        with daemon(pool_dir, mnt, tmp_path / "d2.log") as d2:
            assert "dead mount" in d2.log_text()                   # the restart cleaned it
            with open(mnt / ".shadow" / f"{sid}.img", "rb") as f:
                assert f.read() == old + bytes(7 * MiB)
            with open(mnt / "volumes" / "v.img", "rb") as f:
                got = f.read()
            assert got[2 * MiB:2 * MiB + len(unsynced)] in (bytes(len(unsynced)), unsynced)
            got = got[:2 * MiB] + bytes(len(unsynced)) + got[2 * MiB + len(unsynced):]
            assert got == bytes(expect)
    finally:
        if mount_state(mnt).state is not MountState.NOT_MOUNTED:
            force_unmount(mnt)
    with Pool.open(str(pool_dir)) as pool:
        assert pool.check() == []
        assert [s.id for s in pool.list_snapshots()] == [sid]
        assert pool.read(sid, 0, 1 * MiB) == old


def _serve_fails(pool_dir: Path, mnt: Path, rc: int = EXIT_CONFIG) -> str:
    """serve fails: exit 78 (EX_CONFIG: systemd does not restart it) for a configuration
    error, 1 for another failure; one line, no traceback."""
    res = subprocess.run([sys.executable, "-m", "provider.daemon", "--pool", str(pool_dir),
                          "--mount", str(mnt)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == rc, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_serve_user_errors_one_line_nothing_mounted(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"v": 8 * MiB})
    # missing pool
    line = _serve_fails(tmp_path / "nopool", mnt)
    assert "nopool" in line
    assert mount_state(mnt).state is MountState.NOT_MOUNTED
    # mountpoint is a file
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in _serve_fails(pool_dir, f)
    # missing mountpoint
    assert "does not exist" in _serve_fails(pool_dir, tmp_path / "nodir")
    # busy mountpoint (something else mounted there)
    busy = tmp_path / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(busy)], check=True)
    try:
        assert "already a mountpoint" in _serve_fails(pool_dir, busy)
        assert mount_state(busy).fstype == "tmpfs"
    finally:
        subprocess.run(["umount", str(busy)], check=False)
    # pool in use by a running daemon
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        other = tmp_path / "other"
        other.mkdir()
        line = _serve_fails(pool_dir, other, 1)   # it may stop: a restart may work
        assert "in use" in line
        assert mount_state(other).state is MountState.NOT_MOUNTED
        # and the same mountpoint, already served
        assert "already a mountpoint" in _serve_fails(pool_dir, mnt)


def test_serve_refuses_a_foreign_directory_and_changes_nothing(tmp_path: Path,
                                                                mnt: Path) -> None:
    """--pool pointing at a directory that is not a pool (someone's data, or another
    tool's pool.json): one line naming it, exit 78, nothing written there, nothing
    mounted (no lock file, no catalog: serve never creates a pool)."""
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "report.txt").write_text("not a pool\n")
    cases = [None, '{"format": "zfs-pool", "version": 1}', "garbage{"]
    for pool_json in cases:
        if pool_json is not None:
            (foreign / "pool.json").write_text(pool_json)
        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in foreign.iterdir()}
        line = _serve_fails(foreign, mnt)
        assert str(foreign) in line, line
        assert "pool" in line, line
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in foreign.iterdir()}
        assert after == before, pool_json
        assert mount_state(mnt).state is MountState.NOT_MOUNTED
        assert os.listdir(mnt) == []


def test_statfs_reports_the_pool_filesystem(tmp_path: Path, mnt: Path) -> None:
    """statfs on the mount is the pool directory's filesystem (the space volumes and diff
    areas really draw on), so df on the mount tells an admin what is left."""
    pool_dir = make_pool(tmp_path, {"v": 64 * MiB})
    with daemon(pool_dir, mnt, tmp_path / "d.log"):
        for _ in range(3):   # free space may move between the two calls: retry
            ours, pools = os.statvfs(mnt), os.statvfs(pool_dir)
            if abs(ours.f_bavail * ours.f_frsize - pools.f_bavail * pools.f_frsize) < MiB:
                break
        assert ours.f_blocks * ours.f_frsize == pools.f_blocks * pools.f_frsize // 4096 * 4096
        assert abs(ours.f_bavail * ours.f_frsize - pools.f_bavail * pools.f_frsize) < MiB
        assert abs(ours.f_bfree * ours.f_frsize - pools.f_bavail * pools.f_frsize) < MiB
        assert ours.f_namemax == 255
        st = os.statvfs(mnt / "volumes" / "v.img")      # any path under the mount
        assert st.f_blocks == ours.f_blocks


@pytest.mark.daemon_log_expects(r"is busy .*NOT stopping")   # the refusal, on purpose
def test_sigterm_refuses_while_loop_attached(tmp_path: Path, mnt: Path) -> None:
    pool_dir = make_pool(tmp_path, {"v": 8 * MiB})
    with daemon(pool_dir, mnt, tmp_path / "d.log") as d:
        dev = loopdev.attach(mnt / "volumes" / "v.img", read_only=False)
        try:
            # past the kernel's attribute cache: a daemon that stats its own mount when it
            # refuses hangs then (issue 12; tests/test_shutdown.py covers the rest)
            time.sleep(LUN_TIMEOUT + 1.5)
            d.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while "is busy" not in d.log_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "is busy" in d.log_text() and dev in d.log_text()
            assert d.proc.poll() is None
            assert mount_state(mnt).state is MountState.MOUNTED
            assert os.listdir(mnt / "volumes") == ["v.img"]
        finally:
            loopdev.detach(dev)
    # the context manager's SIGTERM then stopped it with status 0


# --------------------------------------------------------------------------- in-process


def test_tree_follows_pool_changes_while_mounted(tmp_path: Path, mnt: Path) -> None:
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", 8 * MiB)
        with InProcMount(pool, mnt) as m:
            assert os.listdir(mnt / "volumes") == ["v.img"]
            pool.create_volume("w", 4 * MiB)
            assert sorted(os.listdir(mnt / "volumes")) == ["v.img", "w.img"]
            assert os.stat(mnt / "volumes" / "w.img").st_size == 4 * MiB
            s = pool.prepare_snapshot("v")
            assert not (mnt / ".shadow" / f"{s.id}.img").exists()   # preparing: invisible
            pool.commit_snapshots([s.id])
            assert (mnt / ".shadow" / f"{s.id}.img").exists()
            pool.set_exposed(s.id, "tuesday")
            assert os.listdir(mnt / "exposed") == ["tuesday.img"]
            pool.set_exposed(s.id, None)
            assert os.listdir(mnt / "exposed") == []
            # The listing rebuilt the tree and queued the kernel's forgetting of the old
            # name (KernelNotices.queue); within the 1 s entry timeout a lookup is
            # answered from the kernel's dentry cache until that lands. The control API
            # calls refresh_now() before it reports an unexpose (it waits for the
            # invalidations); a test that changes the pool behind the mount does the same.
            m.call(m.ops.refresh_now)
            assert not (mnt / "exposed" / "tuesday.img").exists()
            pool.delete_volume("w")
            assert os.listdir(mnt / "volumes") == ["v.img"]
            pool.resize_volume("v", 16 * MiB)
            time.sleep(1.2)                                          # attr_timeout
            assert os.stat(mnt / "volumes" / "v.img").st_size == 16 * MiB
    finally:
        pool.close()


def test_no_kernel_notification_after_the_session_closed(tmp_path: Path, mnt: Path,
                                                        caplog: Any) -> None:
    """pyfuse3.close() destroys libfuse's session; a notification sent after it failed
    with EINVAL (pyfuse3's own thread logged an ERROR with a traceback: CI caught one at
    a stop right after a volume's delete), one sent during it used freed memory. Every
    notification goes through KernelNotices (fuse_mount/notices.py), whose close() waits
    for the one in flight and drops those after it."""
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", MiB)
        with InProcMount(pool, mnt) as m:
            ops = m.ops
            assert os.listdir(mnt / "volumes") == ["v.img"]
            m.call(m.ops.refresh_now)
        # closed: what pyfuse3 itself does with a notification now
        with pytest.raises(OSError) as ei:
            pyfuse3.invalidate_entry(pyfuse3.ROOT_INODE, b"volumes")
        assert ei.value.errno == errno.EINVAL
        caplog.set_level(logging.WARNING)
        ops.notices.entry(pyfuse3.ROOT_INODE, b"volumes")   # dropped, no error
        ops.notices.inode(VOLUME_INO_BASE)
        ops.notices.queue(pyfuse3.ROOT_INODE, b"volumes")
        time.sleep(0.2)                                     # (the queue's thread ended)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        pool.close()


def test_write_barrier_holds_kernel_writes(tmp_path: Path, mnt: Path) -> None:
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", 8 * MiB)
        pool.create_volume("other", 8 * MiB)
        with InProcMount(pool, mnt) as m:
            barrier = m.ops.barrier
            hold = m.call(barrier.hold, ["v"], 10.0)
            assert hold.flushed
            done = threading.Event()

            def writer() -> None:
                fd = os.open(mnt / "volumes" / "v.img", os.O_RDWR)
                try:
                    os.pwrite(fd, b"held write", 0)
                finally:
                    os.close(fd)
                done.set()

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            assert not done.wait(0.5)                 # held: the write waits...
            assert pool.read("v", 0, 10) == bytes(10)  # ...the store has not seen it...
            with open(mnt / "volumes" / "v.img", "rb") as f:   # ...reads are not held
                f.seek(1 * MiB)
                assert f.read(4) == bytes(4)
            fd = os.open(mnt / "volumes" / "other.img", os.O_RDWR)
            try:
                os.pwrite(fd, b"not held", 0)          # other volumes are not held
            finally:
                os.close(fd)
            assert m.call(_release, barrier, hold) is True
            assert done.wait(10)                       # ...and completes, never fails
            t.join(10)
            assert pool.read("v", 0, 10) == b"held write"
            # a hold that outlives its deadline auto-releases and says so
            h2 = m.call(barrier.hold, ["v"], 0.3)
            time.sleep(0.6)
            fd = os.open(mnt / "volumes" / "v.img", os.O_RDWR)
            try:
                os.pwrite(fd, b"after expiry", 0)
            finally:
                os.close(fd)
            assert m.call(_release, barrier, h2) is False
    finally:
        pool.close()


async def _release(barrier: Any, hold: Any) -> bool:
    return bool(barrier.release(hold))


def test_serve_starts_services_and_stops_on_sigterm(tmp_path: Path, mnt: Path) -> None:
    """serve() in this process (main thread: trio's signal handling works) with an extra
    service, as the control socket / coordinator will be started."""
    from provider.daemon import serve

    pool_dir = make_pool(tmp_path, {"v": 8 * MiB})
    seen: dict[str, Any] = {}

    async def service(pool: Pool, barrier: Any, nursery: trio.Nursery, mount: Any) -> None:
        seen["volumes"] = await trio.to_thread.run_sync(os.listdir, mnt / "volumes")
        seen["ops"] = mount.open_handles() == 0 and mount.presentation is not None
        hold = await barrier.hold(["v"], 5.0)
        seen["released"] = barrier.release(hold)
        os.kill(os.getpid(), signal.SIGTERM)   # caught by the daemon's signal receiver

    try:
        assert serve(str(pool_dir), str(mnt), services=[service]) == 0
    finally:
        if mount_state(mnt).state is not MountState.NOT_MOUNTED:
            force_unmount(mnt)
    assert seen == {"volumes": ["v.img"], "ops": True, "released": True}
    assert mount_state(mnt).state is MountState.NOT_MOUNTED
    Pool.open(str(pool_dir)).close()   # the lock was released


def test_invalidate_lun_drops_stale_page_cache(tmp_path: Path, mnt: Path) -> None:
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", 4 * MiB)
        pool.write("v", 0, b"before" * 100)
        with InProcMount(pool, mnt) as m:
            path = mnt / "volumes" / "v.img"
            with open(path, "rb") as f:
                assert f.read(6) == b"before"          # now in the kernel's page cache
            pool.write("v", 0, b"after!" * 100)         # behind the data path (like revert)
            with open(path, "rb") as f:
                assert f.read(6) == b"before"          # keep_cache: still the cached page
            m.call(m.ops.invalidate_lun, "v")
            with open(path, "rb") as f:
                assert f.read(6) == b"after!"
    finally:
        pool.close()
