"""Helpers shared by the test suites (tests/harness.py runs the daemon itself): commands,
the CLI as a subprocess, loop devices and filesystems on volume images, threads."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_mount import loopdev

ROOT = Path(__file__).resolve().parent.parent
# what a test subprocess runs with: this worktree's code (not an installed copy)
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

def digest(path: str | Path) -> int:
    """xxh3 of a whole file (images, snapshots, backups restored), read 4 MiB at a time."""
    import xxhash
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.intdigest()


def run_cmd(*cmd: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """Run a command (text output captured); with check, a failure names its stderr."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res


def write_synced(path: str | Path, data: bytes, offset: int = 0) -> None:
    """Write ``data`` into an existing file (a served image) at ``offset``, fsync'ed."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_head(path: str | Path, n: int) -> bytes:
    """The first ``n`` bytes of a file."""
    with open(path, "rb") as f:
        return f.read(n)


def evict(path: str) -> None:
    """Every file below ``path`` written back and dropped from the page cache (the
    bench's own eviction: tools/bench/caches.py)."""
    from tools.bench.caches import files_under, sync_file
    for f in files_under([path]):
        sync_file(f, evict=True)


def direct_read(path: str | Path, off: int, n: int) -> bytes:
    """[off, off + n) read with O_DIRECT into a page-aligned (mmap) buffer: what the FUSE
    daemon answers, not the page cache; as many bytes as the read returned."""
    buf = mmap.mmap(-1, n)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)
        buf.close()


def mkfs_ext4(image: str) -> None:
    """Put an empty ext4 filesystem on a volume image (through a loop device, detached
    again)."""
    dev = loopdev.attach(image, read_only=False)
    try:
        run_cmd("mkfs.ext4", "-q", "-F", dev)
    finally:
        loopdev.detach(dev)


def mounted(path: str) -> bool:
    """From mountinfo, not os.path.ismount: a stat on a FUSE mount whose INIT is not
    answered yet would block this process."""
    return any(mp == path for mp, _, _ in loopdev.mountinfo())


def start_thread(fn: Callable[[], object], errors: list[BaseException],
                 name: str) -> threading.Thread:
    """fn() in a daemon thread named `name`; what it raises goes to `errors` (for the
    test to assert on), never lost in the thread."""
    def run() -> None:
        try:
            fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            errors.append(e)
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def assert_usage_errors(module: str, *argsets: list[str]) -> None:
    """`python -m module ARGS` exits 2 with one line on stderr and no traceback, for each
    set of bad arguments (the bench tools' argument checks)."""
    for args in argsets:
        res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, check=False,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, args


def spx(*args: str, socket: str | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    """`shadowplex [--socket SOCKET] args...` as a subprocess, output captured."""
    argv = [sys.executable, "-m", "tools.cli"]
    if socket is not None:
        argv += ["--socket", socket]
    return subprocess.run([*argv, *args], cwd=str(ROOT), env=ENV, capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_line_error(res: subprocess.CompletedProcess[str], rc: int, fragment: str) -> str:
    """The failure contract: exit status rc, nothing on stdout, ONE line on stderr that
    says what was wrong, no traceback."""
    assert res.returncode == rc, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("shadowplex"), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]

# a fresh filesystem of each type a test puts on a loop device (tests/poolfs.py: pools on
# XFS with reflinks, btrfs, ext4 -- issue 14); -q: quiet, -f/-F: overwrite what is there
MKFS = {
    "ext4": ("mkfs.ext4", "-q", "-F"),
    "xfs": ("mkfs.xfs", "-q", "-f", "-m", "reflink=1"),
    "btrfs": ("mkfs.btrfs", "-q", "-f"),
}


@contextlib.contextmanager
def mounted_fs(image: str | Path, target: Path, fstype: str = "ext4", mkfs: bool = True,
               options: str | None = None, read_only: bool = False) -> Iterator[str]:
    """A loop device on `image` with a fresh `fstype` filesystem (MKFS; mkfs=False: the
    one it holds), mounted read-write at `target` (with mount `options`; read_only: a
    read-only loop device, give options "ro,..."); unmounted and detached again however
    the block ends."""
    dev = loopdev.attach(image, read_only=read_only)
    try:
        if mkfs:
            run_cmd(*MKFS[fstype], dev)
        target.mkdir(parents=True, exist_ok=True)
        run_cmd("mount", *(["-o", options] if options else []), dev, str(target))
        try:
            yield dev
        finally:
            unmount_busy(target)
    finally:
        loopdev.detach(dev)


def mounted_ext4(image: str, target: Path) -> contextlib.AbstractContextManager[str]:
    """A loop device on `image` with a fresh ext4, mounted read-write at `target`."""
    return mounted_fs(image, target, "ext4")


def unmount_busy(target: Path | str) -> None:
    """Unmount `target`, also when a failed or interrupted test left files open there
    (a Pool that was never closed: its images, diff areas and lock file are raw
    descriptors, which no garbage collection closes; pytest also keeps the last failure's
    frames, sys.last_traceback, and with them the catalog's sqlite connection and its
    mmap). umount would fail with EBUSY and the loop device stay attached until this
    process exits. So: drop pytest's record of the failure, collect, point this process's
    descriptors still open below `target` at /dev/null (the test that owned them is over;
    closing them would let a later close() by their owner hit a reused number), and
    unmount again -- lazily as a last resort."""
    if run_cmd("umount", str(target), check=False).returncode == 0:
        return
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        with contextlib.suppress(AttributeError):   # as pytest_runtest_call does
            delattr(sys, name)
    frame = sys._getframe()
    while frame is not None:    # after Ctrl-C: pytest's wrap_session dropped its excinfo,
        _ = frame.f_locals      # but the locals snapshot its report took still holds it;
        frame = frame.f_back    # reading f_locals refreshes that snapshot
    gc.collect()
    root = os.path.realpath(target).rstrip("/") + "/"
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
                    os.dup2(null, int(fd), inheritable=False)
    finally:
        os.close(null)
    loopdev.unmount_ladder(target, loopdev.ANY_UNMOUNT)


def detach_loops_under(mnt: Path | str) -> None:
    """Unmount and detach every loop device whose back-file is under `mnt`."""
    for dev, _ in loopdev.loops_under(mnt):
        for mp, _fs, source in loopdev.mountinfo():
            if source == dev:
                subprocess.run(["umount", mp], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
