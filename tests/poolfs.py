"""Pools on real filesystems (issue 14): the engine preserves chunks by reference
(FICLONERANGE) where the pool's filesystem shares extents -- XFS with reflink=1, btrfs --
and copies them elsewhere, so the crash, power-cut and model suites must run on those
filesystems too, not only wherever pytest's tmp_path happens to be.

A suite opts in per test with ``on_filesystems(...)``, which parametrizes the fixture
``pool_fs`` (tests/conftest.py): "tmp" is the suite's usual place (pool_fs is None), each
other value is a fresh filesystem of that type on a loop device, made once per module and
unmounted and detached at its end, also after a failure or Ctrl-C. ``pool_tmp`` is the
tmp_path of such a test: a fresh directory on that filesystem (or tmp_path itself).

On XFS the engine clones only writes covering at least CLONE_MIN_RUN (256 KiB) of whole
chunks, a performance policy (small clones fragment the origin). The suites' volumes are
smaller than that (16-32 chunks of 4 KiB), so on XFS they would test the copy path only:
while pool_fs is on a loop filesystem, CLONE_EVERY_CHUNK lowers it to one chunk, as btrfs
has it. The policy itself is tested with its real value (test_reflink.py).

The loop devices' backing files are sparse and live on /dev/shm when it has room: the
filesystem code under test is the real one, only its syncs reach RAM instead of a disk
(the power-cut emulation needs no real syncs, and a disk would make every fdatasync of
these suites a device flush).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import MKFS, mounted_fs, run_cmd

from fuse_mount import loopdev

MiB = 1 << 20
# sparse: only what mkfs and the tests write takes room (XFS's log: 64 MiB). mkfs.xfs
# refuses filesystems under 300 MiB, btrfs wants about 110 MiB, and the engine's default
# diff-area limit keeps 10 % of the filesystem free; the suites' pools are a few MiB each.
SIZE = 512 * MiB
SHM = "/dev/shm"
# (target, value) for MonkeyPatch.setattr: Pool.open then sets clone_min_chunks to 1
CLONE_EVERY_CHUNK = ("blockstore.pool.CLONE_MIN_RUN", 1)


def fs_param(fstype: str) -> object:
    """One loop filesystem as a parameter of pool_fs: a kernel test (root, loop devices)."""
    return pytest.param(fstype, marks=pytest.mark.kernel, id=fstype)


def on_filesystems(*fstypes: str, tmp: bool = True) -> pytest.MarkDecorator:
    """Run the test with its pools in the usual place ("tmp", unless tmp=False) and on a
    loop-mounted filesystem of each of `fstypes` (keys of support.MKFS)."""
    params = (["tmp"] if tmp else []) + [fs_param(f) for f in fstypes]
    return pytest.mark.parametrize("pool_fs", params, indirect=True)


def missing_tools(fstype: str) -> list[str]:
    """Why a `fstype` filesystem cannot be made here, beyond conftest.kernel_missing()."""
    tool = MKFS[fstype][0]
    return [] if shutil.which(tool) else [f"{tool} not found on PATH"]


def _backing_dir(fallback: Path) -> str:
    """/dev/shm if it can hold two whole backing files (nothing else may fill it up
    because of us), else `fallback` (a disk: slower syncs, same filesystem code)."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return str(fallback)
    room = st.f_bavail * st.f_frsize
    return SHM if os.access(SHM, os.W_OK) and room > 2 * SIZE else str(fallback)


@contextlib.contextmanager
def loop_filesystem(fstype: str, parent: Path) -> Iterator[Path]:
    """A fresh `fstype` filesystem on a loop device over a sparse file, mounted at
    parent/<fstype>. Unmounted, detached and its backing file removed however the block
    ends (support.mounted_fs; the mount point under pytest's basetemp also lets the
    session's leak guard attribute it to this run)."""
    fd, image = tempfile.mkstemp(prefix=f"spx-{fstype}-", suffix=".img",
                                 dir=_backing_dir(parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.truncate(SIZE)
        mnt = parent / fstype
        with mounted_fs(image, mnt, fstype):
            yield mnt
    finally:
        os.unlink(image)   # a loop device still busy keeps it until it goes


def backing_image(mnt: Path) -> str:
    """The file behind the loop device mounted at `mnt`."""
    dev = next(src for mp, _, src in loopdev.mountinfo() if mp == str(mnt))
    image = loopdev.backing_file(dev)
    assert image is not None, f"{dev} (mounted at {mnt}) is not a loop device"
    return image.removesuffix(loopdev.DELETED)


def fill(fs: Path, name: str = "filler", leave: int = 0) -> Path:
    """A file on FS (a loop filesystem that is to fill up) written and synced until
    ENOSPC, smaller pieces to the last 4 KiB, then cut by LEAVE bytes (that much room
    again); then syncfs, as the kernel's periodic writeback would do within 30 s."""
    path = fs / name
    with open(path, "ab", buffering=0) as f:
        piece = MiB
        while piece >= 4096:
            try:
                f.write(bytes(piece))
                os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                piece //= 16
        if leave:
            f.truncate(f.tell() - leave)
    syncfs(fs)
    return path


def syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem PATH is on."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert libc.syncfs(fd) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


@contextlib.contextmanager
def crash_image(mnt: Path, fstype: str, parent: Path) -> Iterator[Path]:
    """What a crash now would leave of the loop filesystem mounted at `mnt`: a copy of
    its backing file as it is (whatever the filesystem has sent to the device, nothing
    it still holds in memory: dirty pages, log records not yet written), mounted at
    parent/<fstype>-crash, which replays the filesystem's log as after a power cut.
    (The device keeps every write it received, flushed or not: a kind disk.)"""
    copy = backing_image(mnt) + ".crash"
    run_cmd("cp", "--sparse=always", backing_image(mnt), copy)
    try:
        target = parent / f"{fstype}-crash"
        # XFS refuses a second filesystem with the same UUID unless told
        with mounted_fs(copy, target, fstype, mkfs=False,
                        options="nouuid" if fstype == "xfs" else None):
            yield target
    finally:
        os.unlink(copy)


# -- FIEMAP: which blocks back a file (linux/fiemap.h) ----------------------------------------
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1               # write dirty pages back first: no delalloc extents
FIEMAP_EXTENT_SHARED = 0x2000        # the blocks are shared with another file (reflink)
_FIEMAP_HEAD = struct.Struct("=QQIIII")        # start, length, flags, mapped, count, -
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")   # logical, physical, length, -, -, flags, -
_FIEMAP_LAST = 0x1


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)


def extents(path: str | Path, start: int = 0, length: int = 1 << 62) -> list[Extent]:
    """The extents backing [start, start+length) of a file (FS_IOC_FIEMAP, synced)."""
    out: list[Extent] = []
    batch = 256
    with open(path, "rb") as f:
        while True:
            buf = bytearray(_FIEMAP_HEAD.size + batch * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, length, FIEMAP_FLAG_SYNC, 0, batch, 0)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            for i in range(mapped):
                lg, ph, ln, _, _, fl, _, _, _ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                out.append(Extent(lg, ph, ln, fl))
            if mapped < batch or out[-1].flags & _FIEMAP_LAST:
                return out
            end = out[-1].logical + out[-1].length
            length -= end - start
            start = end


def physical(path: str | Path, offset: int, length: int) -> list[tuple[int, int]]:
    """Where the bytes [offset, offset+length) of a file are on the device: (physical
    address, length) runs, in file order (a hole is left out)."""
    runs = []
    for e in extents(path, offset, length):
        lo, hi = max(offset, e.logical), min(offset + length, e.logical + e.length)
        if lo < hi:
            runs.append((e.physical + lo - e.logical, hi - lo))
    return runs
