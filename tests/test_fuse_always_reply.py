"""Every FUSE request is answered, whatever its handling raises (the patched pyfuse3:
fuse_mount/patches/pyfuse3-3.5.0-always-reply.patch; docs/architecture.md "Every request
is answered").

Released pyfuse3 3.5.0 answers only a FUSEError. Any other exception -- a MemoryError
copying a write's bytes out of the splice pipe before the handler runs, a handler's bug,
a reply of the wrong type -- left the request unanswered and ended the session loop: the
caller lost the whole mount (ECONNABORTED), and every other user with it (ENOTCONN).

Real parts: the serve daemon (or an in-process mount), the kernel's FUSE driver, callers
in subprocesses (bounded: a caller that gets no answer is reported, and the connection is
aborted (/sys/fs/fuse/connections/N/abort) so that it ends).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from harness import InProcMount
from harness import fuse_daemon as daemon

from blockstore import Pool
from fuse_mount.operations import ShadowOperations
from fuse_mount.view import EXPOSED_INO

pytestmark = pytest.mark.kernel

MiB = 1 << 20
ANSWER_TIMEOUT = 15.0   # seconds a caller may wait for its answer (a busy machine)

# One request from a fresh process: an O_DIRECT pwrite of 1 MiB (one FUSE WRITE), a pread
# a statvfs or a listdir; prints "ok N" or "errno E".
CALLER = r"""
import mmap, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "statvfs":
        os.statvfs(path)
        print("ok 0")
    elif op == "listdir":
        print("ok", len(os.listdir(path)))
    elif op == "write":
        buf = mmap.mmap(-1, 1 << 20)          # page-aligned, as O_DIRECT wants
        buf.write(bytes([int(sys.argv[4])]) * (1 << 20))
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        print("ok", os.pwrite(fd, buf, int(sys.argv[3])))
    else:
        fd = os.open(path, os.O_RDONLY)
        print("ok", len(os.pread(fd, 4096, int(sys.argv[3]))))
except OSError as e:
    print("errno", e.errno)
"""


def fuse_connection(mnt: Path) -> int:
    """The mount's FUSE connection number (the minor of its device); read while the mount
    answers."""
    return os.minor(os.stat(mnt).st_dev)


def abort_connection(conn: int) -> None:
    """`echo 1 > /sys/fs/fuse/connections/N/abort`, in a mount namespace of its own that
    mounts fusectl there if the host has not: the host's mounts stay as they are."""
    script = ('mountpoint -q /sys/fs/fuse/connections || '
              'mount -t fusectl fusectl /sys/fs/fuse/connections && '
              'echo 1 > "/sys/fs/fuse/connections/$0/abort"')
    subprocess.run(["unshare", "-m", "sh", "-c", script, str(conn)], capture_output=True,
                   timeout=30, check=False)


def ask(conn: int, *args: str) -> str:
    """Run CALLER with args; its output. A caller still waiting after ANSWER_TIMEOUT fails
    the test, after the connection is aborted (a request the daemon read and never
    answered waits uninterruptibly: only that, or the daemon's exit, ends it)."""
    p = subprocess.Popen([sys.executable, "-c", CALLER, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=ANSWER_TIMEOUT)
    except subprocess.TimeoutExpired:
        abort_connection(conn)
        p.kill()
        p.communicate(timeout=30)
        pytest.fail(f"{args[0]} on {args[1]} got no answer in {ANSWER_TIMEOUT:.0f} s")
    assert p.returncode == 0, err
    return out.strip()


def make_pool(tmp: Path, size: int) -> Path:
    p = tmp / "pool"
    with Pool.create(str(p)) as pool:
        pool.create_volume("v", size)
    return p


@contextmanager
def address_space_capped(pid: int) -> Iterator[None]:
    """The process may map nothing more than it has now (RLIMIT_AS = its VmSize): a new
    1 MiB block fails (malloc's brk and its mmap fallback), what is mapped keeps working.
    The soft limit only: the old one is put back on the way out."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            vmsize = int(line.split()[1]) * 1024
    old = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (vmsize, old[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, old)


@pytest.mark.daemon_log_expects(r"pyfuse3: fuse_write_buf\(\): MemoryError -> answered ENOMEM")
def test_a_write_whose_bytes_cannot_be_allocated_is_answered_enomem(tmp_path: Path) -> None:
    """The serve daemon cannot map another MiB: the 1 MiB WRITE's bytes cannot be copied
    out of libfuse's buffer (the splice pipe) before our handler runs. The writer gets
    ENOMEM at once, the daemon logs one line, and once memory is back the same write
    works: the mount was never lost. Unpatched: the writer got ECONNABORTED, the mount
    died."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pool_dir = make_pool(tmp_path, 8 * MiB)
    img = str(mnt / "volumes" / "v.img")
    with daemon(pool_dir, mnt, tmp_path / "d.log") as d:
        conn = fuse_connection(mnt)
        assert ask(conn, "read", img, "0") == "ok 4096"     # opened, read: all warm
        with address_space_capped(d.proc.pid):
            got = ask(conn, "write", img, str(MiB), "7")
        assert got == f"errno {errno.ENOMEM}", (
            f"{got}; unpatched pyfuse3 answers nothing and loses the mount "
            f"(ECONNABORTED {errno.ECONNABORTED})\n{d.log_text()}")
        assert ask(conn, "write", img, str(MiB), "9") == f"ok {MiB}"
        assert ask(conn, "statvfs", str(mnt)) == "ok 0"
        lines = [ln for ln in d.log_text().splitlines() if "fuse_write_buf()" in ln]
        assert len(lines) == 1 and " ERROR pyfuse3: " in lines[0], lines
    with Pool.open(str(pool_dir)) as pool:
        assert pool.read("v", MiB, MiB) == bytes([9]) * MiB
        assert pool.check() == []


BAD_READ_AT = 4 * MiB   # where _Buggy.read answers something that is not bytes


class _Buggy(ShadowOperations):
    """The real operations with two bugs of the kinds pyfuse3 used to leave unanswered: a
    handler raising something else than FUSEError (not through fuse_errors), and one
    returning what pyfuse3 cannot reply with (it fails after the handler returned)."""

    async def opendir(self, inode: Any, ctx: Any = None) -> Any:
        if inode == EXPOSED_INO:
            raise RuntimeError("a bug in opendir")
        return await super().opendir(inode, ctx)

    async def read(self, fh: Any, off: int, size: int) -> Any:
        if off >= BAD_READ_AT:
            return None
        return await super().read(fh, off, size)


def test_a_handler_raising_or_replying_wrong_is_answered_eio(tmp_path: Path,
                                                             caplog: Any) -> None:
    """opendir of exposed/ raising a RuntimeError, read returning None: each caller gets
    EIO, pyfuse3 logs one line each, and the mount goes on serving (other reads and
    directories, the same opendir again).
    Unpatched: the first one ended the session loop (ECONNABORTED, then ENOTCONN)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pool_dir = make_pool(tmp_path, 8 * MiB)
    img = str(mnt / "volumes" / "v.img")
    caplog.set_level(logging.ERROR, logger="pyfuse3")
    with Pool.open(str(pool_dir)) as pool:
        pool.write("v", 0, b"\x05" * 4096)
        with InProcMount(pool, mnt, _Buggy(pool)):
            conn = fuse_connection(mnt)
            exposed = str(mnt / "exposed")
            assert ask(conn, "listdir", exposed) == f"errno {errno.EIO}"
            assert ask(conn, "read", img, str(BAD_READ_AT)) == f"errno {errno.EIO}"
            assert ask(conn, "read", img, "0") == "ok 4096"
            assert ask(conn, "listdir", str(mnt / "volumes")) == "ok 1"
            assert ask(conn, "listdir", exposed) == f"errno {errno.EIO}"
            assert ask(conn, "statvfs", str(mnt)) == "ok 0"
    logged = [r.getMessage() for r in caplog.records if r.name == "pyfuse3"]
    assert logged.count("fuse_opendir(): RuntimeError: a bug in opendir -> answered EIO") == 2
    assert [m for m in logged if m.startswith("fuse_read(): TypeError")], logged
