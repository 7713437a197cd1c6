"""The mount's kernel page cache (docs/concurrency.md "Kernel cache"): buffered writes are
write-through (no writeback cache: the write barrier sees every write before write(2)
returns), the kernel keeps what was written or read (keep_cache), every open file of a
volume sees the same pages, and a getattr after a write drops the file's cached pages
(FUSE auto_inval_data: the write changed the mtime our getattr reports).

A real mount in this process (harness.InProcMount) over a Pool the test also holds, so
that what the engine has can be read right after a write(2) returns. Buffered reads are
compared with O_DIRECT reads (the daemon's answer, never the page cache); what the kernel
caches is read with mincore(2) on a mapping of an fd opened beforehand (no stat, no
lookup: those would revalidate the attributes, which is what one test is about).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from harness import InProcMount
from support import direct_read

from blockstore import Pool
from tools.bench.caches import fd_resident

pytestmark = pytest.mark.kernel

MiB = 1 << 20
PAGE = mmap.PAGESIZE


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    m = tmp_path / "mnt"
    m.mkdir()
    return m


def _direct_write(path: Path, off: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        os.close(fd)
        buf.close()


def test_buffered_writes_are_write_through_and_coherent_across_open_files(
        tmp_path: Path, mnt: Path) -> None:
    """What one open file writes -- buffered or O_DIRECT, whole pages, a partial page, a
    run across a page boundary -- is in the engine when write(2) returns, and every other
    open file reads it, buffered (the shared page cache, filled before the writes) and
    O_DIRECT alike."""
    size = 8 * MiB
    old = bytes(range(256)) * (size // 256)
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", size)
        pool.write("v", 0, old)
        with InProcMount(pool, mnt):
            path = mnt / "volumes" / "v.img"
            reader = os.open(path, os.O_RDONLY)
            writer = os.open(path, os.O_RDWR)
            try:
                for _ in range(3):   # a getattr past the 1 s attr timeout may drop pages
                    assert os.pread(reader, size, 0) == old
                    if fd_resident(reader, size) == size:
                        break
                assert fd_resident(reader, size) == size         # all of it cached now
                expected = bytearray(old)
                for off, data in ((MiB, os.urandom(MiB)), (3 * MiB + 100, b"\x22" * 5000),
                                  (5 * MiB + PAGE - 1, b"\x33\x34")):
                    assert os.pwrite(writer, data, off) == len(data)
                    # write-through: the daemon had it before write(2) returned
                    assert pool.read("v", off, len(data)) == data
                    expected[off:off + len(data)] = data
                assert os.pread(reader, size, 0) == expected   # another open file
                assert os.pread(writer, size, 0) == expected
                assert direct_read(path, 0, size) == expected
                # an O_DIRECT write through a third open file: the others read it too
                data = b"\x44" * MiB
                _direct_write(path, 6 * MiB, data)
                expected[6 * MiB:7 * MiB] = data
                assert os.pread(reader, size, 0) == expected
                assert os.pread(writer, size, 0) == expected
            finally:
                os.close(reader)
                os.close(writer)
    finally:
        pool.close()


def test_written_pages_stay_cached_until_a_getattr_sees_the_new_mtime(
        tmp_path: Path, mnt: Path) -> None:
    """A buffered write leaves its pages in the mount's page cache (the next writes and
    reads of them need no new pages); the next getattr sees the mtime the write set and
    the kernel drops every cached page of the file (auto_inval_data). Without a write in
    between, a getattr drops nothing (keep_cache)."""
    size = 4 * MiB
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", size)
        with InProcMount(pool, mnt):
            path = mnt / "volumes" / "v.img"
            fd = os.open(path, os.O_RDWR)
            try:
                assert fd_resident(fd, size) == 0
                os.pwrite(fd, b"\x55" * (2 * MiB), 0)
                assert fd_resident(fd, size) >= 2 * MiB           # kept after the write
                os.stat(path)                                   # a getattr: new mtime
                assert fd_resident(fd, size) == 0
                assert os.pread(fd, 2 * MiB, 0) == b"\x55" * (2 * MiB)
                cached = fd_resident(fd, size)
                assert cached >= 2 * MiB
                os.stat(path)                                   # no write since: kept
                assert fd_resident(fd, size) >= cached    # (read-ahead may add)
            finally:
                os.close(fd)
    finally:
        pool.close()


F_GETPIPE_SZ = 1032


def _pipe_sizes() -> list[int]:
    """The sizes of this process's pipes (F_GETPIPE_SZ)."""
    import fcntl
    import stat as st
    sizes = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if st.S_ISFIFO(os.fstat(fd).st_mode):
                sizes.append(fcntl.fcntl(fd, F_GETPIPE_SZ))
        except OSError:
            continue   # the listing's own fd, closed meanwhile
    return sizes


def test_requests_are_spliced_into_a_pipe_that_holds_a_whole_request(
        tmp_path: Path, mnt: Path) -> None:
    """The mount raises fs.pipe-max-size (session.allow_splice) so that libfuse can grow
    its pipe to a whole 1 MiB request and splice requests instead of reading them (one
    copy of a buffered write's data fewer). Started from the kernel's default limit, put
    back afterwards; what was written through the spliced path reads back."""
    from fuse_mount.session import PIPE_MAX_SIZE, SPLICE_PIPE_BYTES
    with open(PIPE_MAX_SIZE) as f:
        saved = f.read()
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        with open(PIPE_MAX_SIZE, "w") as f:
            f.write(f"{MiB}\n")
        pool.create_volume("v", 4 * MiB)
        with InProcMount(pool, mnt):
            path = mnt / "volumes" / "v.img"
            data = os.urandom(2 * MiB)
            fd = os.open(path, os.O_RDWR)
            try:
                assert os.pwrite(fd, data, MiB) == len(data)
            finally:
                os.close(fd)
            assert pool.read("v", MiB, len(data)) == data
            assert direct_read(path, MiB, len(data)) == data
            with open(PIPE_MAX_SIZE) as f:
                assert int(f.read()) >= SPLICE_PIPE_BYTES
            assert max(_pipe_sizes(), default=0) >= MiB + PAGE   # libfuse's, grown
    finally:
        with open(PIPE_MAX_SIZE, "w") as f:
            f.write(saved)
        pool.close()
