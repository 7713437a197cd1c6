"""The fast session loop (fuse_mount/session.py, "fast loop"): pyfuse3 driven through a
poll-first wait_readable and a non-yielding reader lock whose spare readers are woken only
when the active one blocks. These tests mount for real (in-process, so they can reach the
Pool) and check what the fast loop must never change: a handler that blocks does not stop
other requests, concurrent I/O stays correct, and the session ends cleanly."""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from support import direct_read

from blockstore import Pool
from fuse_mount.session import MountState, force_unmount, mount_state, run_mount, wait_mounted

pytestmark = pytest.mark.kernel

MiB = 1 << 20
TIMEOUT = 20.0


@contextmanager
def in_process_mount(pool: Pool, mnt: Path) -> Iterator[Any]:
    """run_mount on a trio loop in a thread of this process; yields the ShadowOperations."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        async def main() -> None:
            async with trio.open_nursery() as n:
                box["ops"] = await n.start(run_mount, pool, str(mnt))
                box["token"] = trio.lowlevel.current_trio_token()
                box["cancel"] = n.cancel_scope
                ready.set()

        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e
        finally:
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        ready.wait(TIMEOUT)
        if "error" in box:
            raise box["error"]
        wait_mounted(mnt, None, TIMEOUT)
        yield box["ops"]
    finally:
        if "cancel" in box and t.is_alive():
            trio.from_thread.run_sync(box["cancel"].cancel, trio_token=box["token"])
        t.join(TIMEOUT)
        if mount_state(mnt).state is not MountState.NOT_MOUNTED:
            force_unmount(mnt)
    assert not t.is_alive()
    assert "error" not in box, box.get("error")


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    m = tmp_path / "mnt"
    m.mkdir()
    return m


def test_blocked_handler_does_not_stop_other_requests(tmp_path: Path, mnt: Path) -> None:
    """fsync waits in a worker thread: the spare reader must take over /dev/fuse."""
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", 8 * MiB)
        pool.write("v", 4096, b"readable" * 512)
        gate, entered = threading.Event(), threading.Event()
        real_flush = pool.flush

        def slow_flush(name: str) -> None:
            entered.set()
            gate.wait(TIMEOUT)
            real_flush(name)

        pool.flush = slow_flush  # type: ignore[method-assign]
        with in_process_mount(pool, mnt):
            path = mnt / "volumes" / "v.img"
            done = threading.Event()

            def syncer() -> None:
                fd = os.open(path, os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                done.set()

            t = threading.Thread(target=syncer, daemon=True)
            t.start()
            try:
                assert entered.wait(TIMEOUT)           # fsync is blocked in the handler...
                for _ in range(50):                     # ...and requests keep being served
                    assert direct_read(path, 4096, 4096) == b"readable" * 512
                    os.statvfs(mnt)
                assert not done.is_set()
            finally:
                gate.set()
            assert done.wait(TIMEOUT)
            t.join(TIMEOUT)
    finally:
        pool.close()


def test_concurrent_io_with_a_snapshot_stays_exact(tmp_path: Path, mnt: Path) -> None:
    size = 16 * MiB
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", size)
        rng = random.Random(7)
        original = bytes(rng.getrandbits(8) for _ in range(256)) * (size // 256)
        pool.write("v", 0, original)
        snap = pool.prepare_snapshot("v")
        pool.commit_snapshots([snap.id])
        expected = bytearray(original)
        errors: list[BaseException] = []
        with in_process_mount(pool, mnt):
            path = mnt / "volumes" / "v.img"
            region = size // 4

            def worker(k: int) -> None:
                r = random.Random(k)
                buf = mmap.mmap(-1, MiB)
                fd = os.open(path, os.O_RDWR | os.O_DIRECT)
                try:
                    for i in range(60):
                        n = r.choice((4096, 65536, 3 * 4096, MiB))
                        off = k * region + r.randrange(0, (region - n) // 4096 + 1) * 4096
                        data = bytes([k * 16 + i % 16]) * n
                        buf[:n] = data
                        assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                        expected[off:off + n] = data
                        if i % 7 == 0:
                            os.fsync(fd)
                        if i % 3 == 0:
                            got = os.preadv(fd, [memoryview(buf)[:n]], off)
                            assert got == n and buf[:n] == data
                finally:
                    os.close(fd)
                    buf.close()

            def guarded(k: int) -> None:
                try:
                    worker(k)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    errors.append(e)

            threads = [threading.Thread(target=guarded, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            shadow = mnt / ".shadow" / f"{snap.id}.img"
            for off in range(0, size, 4 * MiB):
                assert direct_read(path, off, 4 * MiB) == bytes(expected[off:off + 4 * MiB])
                assert direct_read(shadow, off, 4 * MiB) == original[off:off + 4 * MiB]
        assert pool.read("v", 0, size) == bytes(expected)
        assert pool.read(snap.id, 0, size) == original
        assert pool.check() == []
    finally:
        pool.close()


def test_session_restores_pyfuse3_and_ends_on_external_unmount(tmp_path: Path,
                                                               mnt: Path) -> None:
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", MiB)
        before = pyfuse3.trio  # type: ignore[attr-defined]
        ended = threading.Event()

        def run() -> None:
            async def main() -> None:
                async with trio.open_nursery() as n:
                    await n.start(run_mount, pool, str(mnt))
                    assert pyfuse3.trio is not before  # type: ignore[attr-defined]
            trio.run(main)
            ended.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            wait_mounted(mnt, None, TIMEOUT)
            for _ in range(20):
                assert direct_read(mnt / "volumes" / "v.img", 0, 4096) == bytes(4096)
            assert force_unmount(mnt)                 # from outside: run_mount returns
            assert ended.wait(TIMEOUT)
        finally:
            if mount_state(mnt).state is not MountState.NOT_MOUNTED:
                force_unmount(mnt)
            t.join(TIMEOUT)
        assert pyfuse3.trio is before  # type: ignore[attr-defined]
    finally:
        pool.close()


def test_no_polling_while_a_handler_waits_for_the_store() -> None:
    """While a handler waits for a store on the network (ShadowOperations.store_waits,
    an RBD read) the kernel's next request comes only after that reply: wait_readable
    does not poll for it (the spin would burn CPU and hold the GIL the store's callback
    needs), and polls as before when nothing waits. Counted in poll(2) calls."""
    import time

    from fuse_mount.session import _FastLowlevel
    low = _FastLowlevel(poll_us=20_000)       # 20 ms of polling, when it polls
    r, w = os.pipe()                          # never readable: nothing queued
    polls: list[int] = []
    real = low._poll
    low._poll = lambda t: polls.append(t) or real(t)
    try:
        for waiting, spins in ((True, False), (False, True)):
            polls.clear()
            low.waiting = lambda w=waiting: w
            low._last = time.perf_counter_ns()    # a request just came
            low.wait_readable(r).close()          # (the epoll wait itself not awaited)
            assert (len(polls) > 1) is spins, (waiting, len(polls))
    finally:
        os.close(r)
        os.close(w)
