"""Pools on real filesystems (issue 14): the engine preserves chunks by reference
(FICLONERANGE) where the pool's filesystem shares extents -- XFS with reflink=1, btrfs --
and copies them elsewhere, so the crash, power-cut and model suites must run on those
filesystems too, not only wherever pytest's tmp_path happens to be.

A suite opts in per test with ``on_filesystems(...)``, which parametrizes the fixture
``pool_fs`` (tests/conftest.py): "tmp" is the suite's usual place (pool_fs is None), each
other value is a fresh filesystem of that type on a loop device, made once per module and
unmounted and detached at its end, also after a failure or Ctrl-C. ``pool_tmp`` is the
tmp_path of such a test: a fresh directory on that filesystem (or tmp_path itself).

The loop devices' backing files are sparse and live on /dev/shm when it has room: the
filesystem code under test is the real one, only its syncs reach RAM instead of a disk
(the power-cut emulation needs no real syncs, and a disk would make every fdatasync of
these suites a device flush).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MKFS, mounted_fs

MiB = 1 << 20
# sparse: only what mkfs and the tests write takes room (XFS's log: 64 MiB). mkfs.xfs
# refuses filesystems under 300 MiB, btrfs wants about 110 MiB, and the engine's default
# diff-area limit keeps 10 % of the filesystem free; the suites' pools are a few MiB each.
SIZE = 512 * MiB
SHM = "/dev/shm"


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
