"""Pool.read_cached (the page cache only, RWF_NOWAIT) and Pool.read_unlocked (the preads
without the pool lock, blockstore/threadreads.py): the same bytes as Pool.read, for
volumes with held writes and differential snapshots, cached and evicted; a read in a
thread holds no lock while it waits for the disk; and a write, or a delete, landing
between the plan and the pread never makes a snapshot read return anything but the
snapshot's content."""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import evict
from test_faults_real import tiny_tmpfs

from blockstore import Pool
from blockstore.errors import NotFound

MiB = 1 << 20
CS = 64 << 10


def misses(pool: Pool, key: str, offset: int) -> bool:
    """read_cached of evicted data says None. (The RWF_NOWAIT try starts the kernel's
    readahead; on a busy machine a preempted try may find the read done already: a few
    tries, each after an eviction.)"""
    for _ in range(5):
        evict(pool.path)
        if pool.read_cached(key, offset, 4096) is None:
            return True
    return False


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    """db: 4 MiB of random data; snapshot (pool.snap) then every other chunk of its
    first 2 MiB rewritten (preserved slots; the new data held, not flushed)."""
    pl = Pool.create(str(tmp_path / "pool"))
    pl.create_volume("db", 4 * MiB)
    pl.write("db", 0, os.urandom(4 * MiB))
    pl.flush("db")
    s = pl.prepare_snapshot("db")
    pl.commit_snapshots([s.id])
    pl.snap = s.id   # type: ignore[attr-defined]
    pl.old = pl.read(s.id, 0, 4 * MiB)   # type: ignore[attr-defined]
    for c in range(0, 2 * MiB // CS, 2):
        pl.write("db", c * CS + 100, os.urandom(CS // 2))
    try:
        yield pl
    finally:
        assert all(v.file._pins == 0 for v in pl._volumes.values())
        assert pl.check() == []
        pl.close()


RANGES = [(0, 4096), (100, CS), (CS - 7, 3 * CS + 11), (0, 4 * MiB), (3 * MiB, MiB),
          (4 * MiB - 5, 5), (4 * MiB, 10)]


def test_cached_and_unlocked_reads_read_what_read_reads(pool: Pool) -> None:
    rng = random.Random(7)
    ranges = RANGES + [(rng.randrange(4 * MiB), rng.randrange(1, 300_000)) for _ in range(20)]
    for key in ("db", pool.snap):   # type: ignore[attr-defined]
        for off, n in ranges:
            want = pool.read(key, off, n)
            assert pool.read_cached(key, off, n) == want, (key, off, n)
            assert pool.read_unlocked(key, off, n) == want, (key, off, n)
    pool.flush("db")   # the held writes into the file, then out of the page cache
    assert misses(pool, "db", MiB)
    assert misses(pool, pool.snap, 3 * MiB)   # type: ignore[attr-defined]
    evict(pool.path)
    for key in ("db", pool.snap):   # type: ignore[attr-defined]
        for off, n in ranges:
            assert pool.read_unlocked(key, off, n) == pool.read(key, off, n), (key, off, n)
    snap = pool.snap   # type: ignore[attr-defined]
    assert pool.read_unlocked(snap, 0, 4 * MiB) == pool.old   # type: ignore[attr-defined]


class Paused:
    """Runs read_unlocked(key, off, n) in a thread, held inside its first pread."""

    def __init__(self, pool: Pool, key: str, off: int, n: int) -> None:
        self.open = threading.Event()
        self.inside = threading.Event()
        self.result: bytes | BaseException | None = None
        real = pool.faults.io
        me: list[threading.Thread] = []

        def io(role: str, op: str) -> None:
            if me and threading.current_thread() is me[0] and not self.inside.is_set():
                self.inside.set()
                assert self.open.wait(20)
            real(role, op)

        def run() -> None:
            try:
                self.result = pool.read_unlocked(key, off, n)
            except BaseException as e:   # noqa: BLE001 - the test looks at it
                self.result = e

        pool.faults.io = io   # type: ignore[method-assign]
        t = threading.Thread(target=run)
        me.append(t)
        t.start()
        self.thread = t
        assert self.inside.wait(10), "the read never reached its pread"

    def finish(self) -> bytes | BaseException | None:
        self.open.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result


def test_a_read_waiting_for_the_disk_holds_no_lock(pool: Pool) -> None:
    """While a thread's read_unlocked is in its pread, the pool lock is free: reads and
    writes of the trio thread go on (with read(), they waited for that pread)."""
    pool.create_volume("other", MiB)
    r = Paused(pool, "db", 3 * MiB, MiB)
    try:
        done: list[bool] = []
        t = threading.Thread(target=lambda: done.append(
            pool.read("other", 0, 4096) == bytes(4096)
            and pool.write("other", 0, b"x" * 4096) == 4096))
        t.start()
        t.join(5)
        assert done == [True]
    finally:
        got = r.finish()
    assert got == pool.read("db", 3 * MiB, MiB)


@pytest.mark.parametrize("change", ["write", "delete"])
def test_a_change_between_the_plan_and_the_pread_never_shows(
        pool: Pool, change: str) -> None:
    """A snapshot read planned to come from the origin (the chunk not preserved yet) and
    paused in its pread while the origin chunk is overwritten and written into the image
    file (its old content preserved in the diff area meanwhile): the read returns the
    snapshot's content, not the new data. A snapshot deleted meanwhile: NotFound, not
    bytes from slots that may be reused."""
    snap = pool.snap   # type: ignore[attr-defined]
    old = pool.old     # type: ignore[attr-defined]
    off = 3 * MiB   # never written since the snapshot: read from the origin
    r = Paused(pool, snap, off, 2 * CS)
    check: Callable[[object], bool]
    try:
        if change == "write":
            pool.write("db", off, os.urandom(2 * CS))
            pool.flush("db")   # the held write reaches the image file
            check = lambda got: got == old[off:off + 2 * CS]
        else:
            pool.delete_snapshot(snap)
            check = lambda got: isinstance(got, NotFound)
    finally:
        got = r.finish()
    assert check(got), got


class Steps:
    """Runs read_unlocked(key, off, n) in a thread held at each of its preads (the role
    read is recorded) until the test lets it go on; after free() it is held no more."""

    def __init__(self, pool: Pool, key: str, off: int, n: int) -> None:
        self.at = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.free_ = threading.Event()
        self.roles: list[str] = []
        self.result: bytes | BaseException | None = None
        real = pool.faults.io

        def run() -> None:
            try:
                self.result = pool.read_unlocked(key, off, n)
            except BaseException as e:   # noqa: BLE001 - the test looks at it
                self.result = e

        self.thread = threading.Thread(target=run)

        def io(role: str, op: str) -> None:
            if threading.current_thread() is self.thread:
                self.roles.append(role)
                if not self.free_.is_set():
                    self.at.release()
                    assert self.go.acquire(timeout=20), "never let go"
            real(role, op)

        pool.faults.io = io   # type: ignore[method-assign]
        self.thread.start()

    def held(self) -> None:
        assert self.at.acquire(timeout=10), "the read did not reach its next pread"

    def resume(self) -> None:
        self.go.release()

    def finish(self) -> bytes | BaseException | None:
        self.free_.set()
        self.go.release()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result


def lock_is_free(pool: Pool) -> bool:
    """A read and a write of volume "other" done by another thread within 5 s."""
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(
        pool.read("other", 0, 4096) == bytes(4096)
        and pool.write("other", 0, b"x" * 4096) == 4096))
    t.start()
    t.join(5)
    return done == [True]


def test_a_chunk_preserved_during_the_read_is_read_again_alone_without_the_lock(
        pool: Pool) -> None:
    """Review of 2026-12-06: a snapshot read from the origin, paused in its pread while
    one of its chunks is overwritten (the old content preserved) and the new data
    reaches the image file. The read sees the chunk preserved since its plan and reads
    that chunk again -- only it, from its slot, without the pool lock (paused in that
    pread, another volume's read and write go on; they waited for the whole range read
    again under the lock before) -- and returns the snapshot's content."""
    pool.create_volume("other", MiB)
    snap, old = pool.snap, pool.old   # type: ignore[attr-defined]
    off, n = 3 * MiB, 8 * CS          # never written since the snapshot: the origin
    s = Steps(pool, snap, off, n)
    try:
        s.held()
        pool.write("db", off + 2 * CS + 10, os.urandom(CS))   # chunks 2 and 3
        pool.flush("db")
        s.resume()
        s.held()                      # its next pread: the slots of chunks 2 and 3
        assert lock_is_free(pool)
    finally:
        got = s.finish()
    assert got == old[off:off + n]
    assert s.roles == ["origin", "diff", "diff"]


def test_chunks_preserved_round_after_round_end_in_a_read_under_the_lock(
        pool: Pool) -> None:
    """A chunk preserved anew during each re-read: after PATCH_ROUNDS rounds the read
    is done under the lock, and still returns the snapshot's content."""
    from blockstore import threadreads
    snap, old = pool.snap, pool.old   # type: ignore[attr-defined]
    off, n = 3 * MiB, 8 * CS
    s = Steps(pool, snap, off, n)
    try:
        for k in range(threadreads.PATCH_ROUNDS + 1):
            s.held()
            pool.write("db", off + k * CS, os.urandom(CS))   # chunk k, preserved
            pool.flush("db")
            s.resume()
    finally:
        got = s.finish()
    assert got == old[off:off + n]
    rounds = threadreads.PATCH_ROUNDS
    assert s.roles[:1 + rounds] == ["origin"] + ["diff"] * rounds
    assert "origin" in s.roles[1 + rounds:]   # the whole range again (under the lock)


def test_a_file_system_without_rwf_nowait_is_read_in_threads(tmp_path: Path) -> None:
    """Review of 2026-12-06: on a file system that answers RWF_NOWAIT with EOPNOTSUPP
    (tmpfs here; FUSE file systems too, where a read may wait on anything), read_cached
    read the data anyway -- blocking, on the trio thread. It now says None (read in a
    thread), and the file remembers it: the flag is not tried again."""
    with tiny_tmpfs(tmp_path, 64 * MiB) as fs:
        probe = fs / "probe"
        probe.write_bytes(b"x" * 4096)
        fd = os.open(probe, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
            assert e.value.errno == errno.EOPNOTSUPP   # (what this test relies on)
        finally:
            os.close(fd)
        pl = Pool.create(str(fs / "pool"))
        try:
            pl.create_volume("db", MiB)
            data = os.urandom(MiB)
            pl.write("db", 0, data)
            pl.flush("db")
            s = pl.prepare_snapshot("db")
            pl.commit_snapshots([s.id])
            pl.write("db", 0, os.urandom(CS))   # chunk 0 preserved: a diff-area slot
            for key, want in (("db", None), (s.id, data)):
                assert pl.read_cached(key, 0, 2 * CS) is None   # (in memory, all of it)
                got = pl.read_unlocked(key, 0, 2 * CS)
                assert got == pl.read(key, 0, 2 * CS)
                assert want is None or got == want[:2 * CS]
            v = pl._volumes["db"]
            assert v.file.nowait is False
            assert v.diff is not None and v.diff.data.nowait is False
            v.file.faults.arm_error("origin", "read", errno.EIO)   # not even tried again
            try:
                assert pl.read_cached("db", 0, 4096) is None
            finally:
                v.file.faults.disarm()
            assert pl.check() == []
        finally:
            pl.close()
