"""Requests in flight on the NBD port (nbd/transmission.py, docs/network.md "Requests in
flight"): a READ the page cache does not hold runs in a worker thread and is answered
when it is done, by its cookie, while the connection's other requests go on; writes,
FLUSH and the write barrier keep their order. The server runs in-process over a real
pool on the test's file system; "cold" data is evicted from the page cache (fsync +
POSIX_FADV_DONTNEED), and the cold reads are larger than INLINE_MAX, so that they go to
worker threads whatever the kernel's readahead has brought in meanwhile (a RWF_NOWAIT
try of evicted data may find it read already on a busy machine; Pool.read_cached's
misses are tests/test_blockstore_threadreads.py's); the threads are held inside their
pread (the pool's fault-injection hook) so that what is in flight is known, not timed."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from support import evict
from test_nbd_wire import OPEN, Client, Running

from blockstore import Pool
from nbd import protocol as p
from nbd import transmission

MiB = 1 << 20
PIECE = 64 << 10
COLD = 8                       # reads of evicted data held in their threads
COLD_LEN = transmission.INLINE_MAX + PIECE   # (always read in a thread)
CACHED = 64 - COLD             # reads of cached data sent behind them


class Gate:
    """Holds every Pool.read_unlocked of `pool` inside its pread until opened; counts
    the threads it holds (so a test waits for them, instead of sleeping)."""

    def __init__(self, pool: Pool) -> None:
        self.open = threading.Event()
        self.held = threading.Semaphore(0)
        self.local = threading.local()
        real_read, real_io = pool.read_unlocked, pool.faults.io

        def read_unlocked(key: str, offset: int, length: int) -> bytes:
            self.local.gated = True
            try:
                return real_read(key, offset, length)
            finally:
                self.local.gated = False

        def io(role: str, op: str) -> None:
            if op == "read" and getattr(self.local, "gated", False):
                self.held.release()
                assert self.open.wait(20), "the gate was never opened"
            real_io(role, op)

        pool.read_unlocked = read_unlocked   # type: ignore[method-assign]
        pool.faults.io = io                  # type: ignore[method-assign]

    def wait_held(self, n: int) -> None:
        for _ in range(n):
            assert self.held.acquire(timeout=10), "a read did not reach its thread"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Running]:
    """volumes/db: 16 MiB of random data, flushed and evicted except its last MiB
    (read back into the page cache); the reads of the test are held (srv.gate)."""
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 16 * MiB)
    data = os.urandom(16 * MiB)
    pool.write("db", 0, data)
    pool.flush("db")
    evict(pool.path)
    assert pool.read("db", 15 * MiB, MiB) == data[15 * MiB:]   # cached again
    r = Running(pool)
    r.data = data            # type: ignore[attr-defined]
    r.gate = Gate(pool)      # type: ignore[attr-defined]
    try:
        yield r
    finally:
        r.gate.open.set()    # type: ignore[attr-defined]
        while OPEN:
            OPEN.pop().close()
        r.stop()
        assert pins(pool) == 0
        assert pool.check() == []
        pool.close()


def pins(pool: Pool) -> int:
    return sum(v.file._pins + (v.diff.data._pins if v.diff else 0)
               for v in pool._volumes.values())


def cold(i: int) -> int:
    return i * MiB             # evicted (1 MiB apart: beyond the kernel's readahead)


def cached(i: int) -> int:
    return 15 * MiB + (i % 16) * PIECE


def read_reply(c: Client, structured: bool, length: int | dict[int, int]
               ) -> tuple[int, bytes]:
    """(cookie, data) of one successful READ reply; length: its length, or the lengths
    by cookie (replies come in any order)."""
    if structured:
        _magic, flags, rtype, cookie, n = p.STRUCTURED_REPLY.unpack(c.recv(20))
        want = length if isinstance(length, int) else length[cookie]
        assert (rtype, n, flags & p.REPLY_FLAG_DONE) == (p.REPLY_TYPE_OFFSET_DATA,
                                                          8 + want, p.REPLY_FLAG_DONE)
        c.recv(8)
    else:
        error, cookie = c.simple()
        assert error == 0
        want = length if isinstance(length, int) else length[cookie]
    return cookie, c.recv(want)


def until(what: object, timeout: float = 10.0) -> None:
    for _ in range(int(timeout * 20)):
        if what():   # type: ignore[operator]
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"not reached in {timeout} s: {what}")


@pytest.mark.parametrize("structured", [False, True])
def test_64_reads_sent_at_once_are_answered_as_they_complete_by_cookie(
        srv: Running, structured: bool) -> None:
    """The first COLD reads wait for the disk in worker threads; the CACHED reads sent
    after them are answered meanwhile (out of order), every reply whole, matched by its
    cookie and right. Served one at a time, the replies would come in request order."""
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    c = Client(srv.port)
    c.go("volumes/db", structured=structured)
    want, lengths = {}, {}
    batch = b""
    for i in range(64):
        off, n = (cold(i), COLD_LEN) if i < COLD else (cached(i), PIECE)
        want[1000 + i], lengths[1000 + i] = data[off:off + n], n
        batch += p.request(p.CMD_READ, 1000 + i, off, n)
    c.s.sendall(batch)
    gate.wait_held(COLD)
    first = [read_reply(c, structured, lengths) for _ in range(CACHED)]
    assert {cookie for cookie, _ in first} == {1000 + i for i in range(COLD, 64)}
    assert all(got == want[cookie] for cookie, got in first)
    gate.open.set()
    rest = [read_reply(c, structured, lengths) for _ in range(COLD)]
    assert {cookie for cookie, _ in rest} == {1000 + i for i in range(COLD)}
    assert all(got == want[cookie] for cookie, got in rest)
    c.request(p.CMD_DISC, 0, 0)
    assert c.closed()


def test_writes_and_flush_go_on_in_order_while_reads_are_in_flight(srv: Running) -> None:
    """With reads held in their threads, WRITEs and the FLUSH after them are answered;
    the FLUSH covers every write replied to before it: on a volume with a snapshot the
    writes are held in memory (copy-before-write) until a flush drains them into the
    image file, and after the FLUSH's reply the file holds them. The snapshot still
    reads as before the writes, through the threads too."""
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    s = pool.prepare_snapshot("db")
    pool.commit_snapshots([s.id])
    evict(pool.path)
    c = Client(srv.port)
    c.go("volumes/db")
    batch = b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN) for i in range(COLD))
    new = os.urandom(4 * PIECE)
    batch += b"".join(p.request(p.CMD_WRITE, 100 + i, cold(i) + MiB // 2, PIECE)
                      + new[i * PIECE:(i + 1) * PIECE] for i in range(4))
    batch += p.request(p.CMD_FLUSH, 200, 0, 0)
    c.s.sendall(batch)
    gate.wait_held(COLD)
    assert [c.simple() for _ in range(5)] == [(0, 100), (0, 101), (0, 102), (0, 103),
                                              (0, 200)]
    image = pool._volumes["db"].file.path
    fd = os.open(image, os.O_RDONLY)
    try:
        for i in range(4):
            assert os.pread(fd, PIECE, cold(i) + MiB // 2) == new[i * PIECE:(i + 1) * PIECE]
    finally:
        os.close(fd)
    gate.open.set()
    rest = [read_reply(c, False, COLD_LEN) for _ in range(COLD)]
    assert sorted(cookie for cookie, _ in rest) == list(range(1, COLD + 1))
    assert all(got == data[cold(k - 1):cold(k - 1) + COLD_LEN] for k, got in rest)
    c.close()
    # the snapshot's reads through the threads: its old data (slots and origin)
    evict(pool.path)
    c = Client(srv.port)
    c.go(".shadow/" + s.id)
    c.s.sendall(b"".join(p.request(p.CMD_READ, 300 + i, cold(i) + MiB // 2 - PIECE,
                                   2 * PIECE) for i in range(4)))
    got = dict(read_reply(c, False, 2 * PIECE) for _ in range(4))
    assert got == {300 + i: data[cold(i) + MiB // 2 - PIECE:cold(i) + MiB // 2 + PIECE]
                   for i in range(4)}
    c.close()


def test_a_client_gone_with_reads_in_threads_leaves_nothing_behind(
        srv: Running, caplog: pytest.LogCaptureFixture) -> None:
    """A client that resets its connection while its reads wait in threads: the threads
    end, their replies are dropped, no file stays pinned, the pool lock is free, nothing
    is logged above DEBUG, and the server goes on serving."""
    caplog.set_level(logging.DEBUG)
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    gate = srv.gate   # type: ignore[attr-defined]
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN)
                         for i in range(COLD)))
    gate.wait_held(COLD)
    assert pins(pool) > 0
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
    c.close()
    threading.Event().wait(0.3)   # the loop has seen the reset; the threads still read
    assert srv.connections() == 1
    gate.open.set()
    until(lambda: srv.connections() == 0)
    assert pins(pool) == 0
    assert pool._lock.acquire(timeout=5)
    pool._lock.release()
    c = Client(srv.port)
    c.go("volumes/db")
    c.request(p.CMD_READ, cached(0), PIECE, cookie=9)
    assert read_reply(c, False, PIECE) == (9, srv.data[cached(0):cached(0) + PIECE])  # type: ignore[attr-defined]
    c.close()
    until(lambda: srv.connections() == 0)
    loud = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG
            and r.name.startswith("nbd") and "opened" not in r.getMessage()]
    assert not loud, loud


def test_disc_answers_the_reads_in_flight_first(srv: Running) -> None:
    """proto.md: on NBD_CMD_DISC the server finishes the requests in flight, then
    closes."""
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN) for i in range(3))
                + p.request(p.CMD_DISC, 9, 0, 0))
    gate.wait_held(3)
    gate.open.set()
    got = dict(read_reply(c, False, COLD_LEN) for _ in range(3))
    assert got == {1 + i: data[cold(i):cold(i) + COLD_LEN] for i in range(3)}
    assert c.closed()


def test_stopping_the_server_waits_for_reads_in_threads(srv: Running) -> None:
    """The daemon stopping cancels the connections; a read in a thread is not abandoned
    (its file stays pinned until its pread ends), so stop() returns once the threads
    are done -- bounded by one pread -- with nothing pinned and no error."""
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    gate = srv.gate   # type: ignore[attr-defined]
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN)
                         for i in range(4)))
    gate.wait_held(4)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive()   # waiting for the threads' preads
    gate.open.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert pins(pool) == 0
    assert not srv.errors
    assert c.closed()


def test_the_write_barrier_with_reads_in_flight(srv: Running) -> None:
    """Flush & hold while reads wait in threads: the hold does not wait for them; a
    WRITE sent during the hold waits (and the connection's requests after it); a
    snapshot committed during the hold does not see the write; after the release the
    write is answered and the volume has it; the reads are answered right."""
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    token = srv._token
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN)
                         for i in range(4)))
    gate.wait_held(4)
    barrier = srv.server.barrier
    hold = trio.from_thread.run(barrier.hold, ["db"], trio_token=token)
    new = os.urandom(PIECE)
    at = cold(5)
    c.s.sendall(p.request(p.CMD_WRITE, 50, at, PIECE) + new
                + p.request(p.CMD_READ, 51, cached(1), PIECE))
    assert c.silent(0.5)
    s = pool.prepare_snapshot("db")
    pool.commit_snapshots([s.id])
    assert trio.from_thread.run_sync(barrier.release, hold, trio_token=token)
    assert c.simple() == (0, 50)
    assert read_reply(c, False, PIECE) == (51, data[cached(1):cached(1) + PIECE])
    assert pool.read(s.id, at, PIECE) == data[at:at + PIECE]
    assert pool.read("db", at, PIECE) == new
    gate.open.set()
    got = dict(read_reply(c, False, COLD_LEN) for _ in range(4))
    assert got == {1 + i: data[cold(i):cold(i) + COLD_LEN] for i in range(4)}
    c.close()



def test_a_large_read_goes_to_a_thread_even_when_cached(srv: Running) -> None:
    """A READ larger than INLINE_MAX is not tried from the page cache first (a RWF_NOWAIT
    try before the real read upsets the kernel's sequential readahead): it is read in a
    thread although cached; a small cached one is answered inline meanwhile."""
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    big = transmission.INLINE_MAX * 2
    at = 16 * MiB - big   # in the cached last MiB
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(p.request(p.CMD_READ, 1, at, big) + p.request(p.CMD_READ, 2, at, PIECE))
    gate.wait_held(1)
    assert read_reply(c, False, PIECE) == (2, data[at:at + PIECE])
    gate.open.set()
    assert read_reply(c, False, big) == (1, data[at:at + big])
    c.close()


def test_a_read_never_answers_with_a_lun_created_again_under_its_name(
        srv: Running) -> None:
    """Review of 2026-12-06: a READ waits in its thread; meanwhile its volume is deleted
    and another created under the same name. The thread's read finds its plan stale and
    reads again by name -- the new LUN, which the connection never opened (it may not
    even be presented to its host). Never answered: the connection ends instead."""
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    gate = srv.gate   # type: ignore[attr-defined]
    c = Client(srv.port)
    c.go("volumes/db")
    c.request(p.CMD_READ, cold(0), COLD_LEN, cookie=1)
    gate.wait_held(1)
    pool.delete_volume("db")
    pool.create_volume("db", 16 * MiB)
    pool.write("db", 0, b"\x55" * COLD_LEN)   # what a wrong answer would carry
    gate.open.set()
    c.s.settimeout(10)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while more := c.s.recv(1 << 20):
            got += more
    assert b"\x55" * 4096 not in got
    assert len(got) < 16   # not even a reply header: the connection just ended
    until(lambda: srv.connections() == 0)


def test_a_held_write_never_lands_in_a_lun_created_again_under_its_name(
        srv: Running) -> None:
    """The same for a WRITE waiting at the write barrier (a hold lasts up to 10 s): the
    volume deleted and created again meanwhile, the write would go by name into the new
    one. The connection ends instead, and the new volume is untouched."""
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    token = srv._token
    c = Client(srv.port)
    c.go("volumes/db")
    barrier = srv.server.barrier
    hold = trio.from_thread.run(barrier.hold, ["db"], trio_token=token)
    c.s.sendall(p.request(p.CMD_WRITE, 50, 0, PIECE) + b"\x77" * PIECE)
    threading.Event().wait(0.3)   # the WRITE waits at the barrier
    pool.delete_volume("db")
    pool.create_volume("db", 16 * MiB)
    assert trio.from_thread.run_sync(barrier.release, hold, trio_token=token)
    c.s.settimeout(10)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while more := c.s.recv(1 << 16):
            got += more
    assert got == b""                      # no reply: the connection ended
    assert pool.read("db", 0, PIECE) == bytes(PIECE)
    until(lambda: srv.connections() == 0)


def test_the_reads_of_every_connection_share_one_budget(
        srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of 2026-12-06: replies in flight were bounded per connection only (64 MiB
    each, 64 connections: 4 GiB from authenticated clients). With the server's budget
    at four reads, three of one connection and three of another reach their threads
    four at a time: the second connection's loop waits for room (and its cached read
    behind them with it), holding none of the budget; once replies are sent the rest
    go, every reply right, and the whole budget is back."""
    monkeypatch.setattr(transmission, "MAX_BUFFERED_BYTES", 4 * COLD_LEN)
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    a, b = Client(srv.port), Client(srv.port)
    a.go("volumes/db")
    b.go("volumes/db")
    a.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN) for i in range(3)))
    gate.wait_held(3)
    b.s.sendall(b"".join(p.request(p.CMD_READ, 11 + i, cold(3 + i), COLD_LEN)
                         for i in range(3)) + p.request(p.CMD_READ, 14, cached(0), PIECE))
    gate.wait_held(1)
    assert not gate.held.acquire(timeout=0.5), "a fifth read went past the budget"
    budget = srv.server._memory_budget
    assert budget is not None and budget.used == 4 * COLD_LEN
    assert b.silent(0.3)   # b's loop waits: its cached read too
    gate.open.set()
    got_a = dict(read_reply(a, False, COLD_LEN) for _ in range(3))
    assert got_a == {1 + i: data[cold(i):cold(i) + COLD_LEN] for i in range(3)}
    lengths = {11: COLD_LEN, 12: COLD_LEN, 13: COLD_LEN, 14: PIECE}
    got_b = dict(read_reply(b, False, lengths) for _ in range(4))
    assert got_b == {**{11 + i: data[cold(3 + i):cold(3 + i) + COLD_LEN] for i in range(3)},
                     14: data[cached(0):cached(0) + PIECE]}
    until(lambda: budget.used == 0)
    a.close()
    b.close()


def test_write_payloads_count_in_the_same_budget(
        srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """WRITE payloads share the budget (64 connections x 32 MiB payloads were outside
    any bound): with the budget full of reads held in their threads, another
    connection's WRITE is neither received nor done until a read is answered; then it
    is, the volume has it, and the budget is whole again."""
    monkeypatch.setattr(transmission, "MAX_BUFFERED_BYTES", 2 * COLD_LEN)
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    data, gate = srv.data, srv.gate   # type: ignore[attr-defined]
    a, b = Client(srv.port), Client(srv.port)
    a.go("volumes/db")
    b.go("volumes/db")
    a.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN) for i in range(2)))
    gate.wait_held(2)
    at, new = cold(5), os.urandom(PIECE)
    b.request(p.CMD_WRITE, at, PIECE, new, cookie=5)
    assert b.silent(0.5)
    assert pool.read("db", at, PIECE) == data[at:at + PIECE]   # not written yet
    gate.open.set()
    got = dict(read_reply(a, False, COLD_LEN) for _ in range(2))
    assert got == {1 + i: data[cold(i):cold(i) + COLD_LEN] for i in range(2)}
    assert b.simple() == (0, 5)
    assert pool.read("db", at, PIECE) == new
    budget = srv.server._memory_budget
    assert budget is not None
    until(lambda: budget.used == 0)
    a.close()
    b.close()


def test_a_withheld_write_payload_ends_its_connection_and_frees_its_budget(
        srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a WRITE's header and only part of its payload held that much
    of every connection's budget for as long as it liked (eight such clients: all of
    it). Past PAYLOAD_GRACE + length / PAYLOAD_MIN_RATE its connection ends, nothing is
    written, the budget is whole again, and another client's WRITE that waited for room
    is done."""
    monkeypatch.setattr(transmission, "MAX_BUFFERED_BYTES", PIECE)
    monkeypatch.setattr(transmission, "PAYLOAD_GRACE", 1.0)
    monkeypatch.setattr(transmission, "PAYLOAD_MIN_RATE", 1 << 40)
    pool: Pool = srv.pool   # type: ignore[attr-defined]
    data = srv.data   # type: ignore[attr-defined]
    a, b = Client(srv.port), Client(srv.port)
    a.go("volumes/db")
    b.go("volumes/db")
    at, new = cold(3), os.urandom(PIECE)
    a.s.sendall(p.request(p.CMD_WRITE, 7, at, PIECE) + new[:PIECE // 2])   # and no more
    budget = srv.server._memory_budget
    assert budget is not None
    until(lambda: budget.used == PIECE)
    other = cold(4)
    b.request(p.CMD_WRITE, other, PIECE, new, cookie=8)   # waits for room
    a.s.settimeout(10)
    assert a.closed()   # past 1 s: the server ended the connection
    b.s.settimeout(10)
    assert b.simple() == (0, 8)
    assert pool.read("db", other, PIECE) == new
    assert pool.read("db", at, PIECE) == data[at:at + PIECE]   # the half payload: nothing
    until(lambda: budget.used == 0)
    a.close()
    b.close()


def test_connections_waiting_for_the_budget_when_the_daemon_stops_leave_it_whole(
        srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two connections wait for room behind a third's reads (held in their threads)
    when the server stops: the waiters are cancelled having taken nothing, the reads in
    threads give theirs back when they end unanswered -- the budget is whole again
    (a waiter that had counted itself in, or a read that never gave back, leaves it
    short for the daemon's whole life)."""
    monkeypatch.setattr(transmission, "MAX_BUFFERED_BYTES", 2 * COLD_LEN)
    gate = srv.gate   # type: ignore[attr-defined]
    a = Client(srv.port)
    a.go("volumes/db")
    a.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, cold(i), COLD_LEN) for i in range(2)))
    gate.wait_held(2)
    waiting = []
    for k in range(2):
        c = Client(srv.port)
        c.go("volumes/db")
        c.request(p.CMD_READ, cold(2 + k), COLD_LEN, cookie=20 + k)
        waiting.append(c)
    assert not gate.held.acquire(timeout=0.3)
    budget = srv.server._memory_budget
    assert budget is not None and budget.used == 2 * COLD_LEN
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive()   # the two reads in threads still run
    gate.open.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert budget.used == 0
    assert all(c.closed() for c in waiting)


def test_a_pool_without_rwf_nowait_serves_small_reads_from_threads(tmp_path: Path) -> None:
    """Review of 2026-12-06: on a file system that answers RWF_NOWAIT with EOPNOTSUPP
    (tmpfs), a small READ was read blocking on the daemon's trio loop. It now goes to a
    worker thread (held there by the gate: answered inline, it never would be), and is
    answered right."""
    from test_faults_real import tiny_tmpfs
    with tiny_tmpfs(tmp_path, 64 * MiB) as fs:
        pool = Pool.create(str(fs / "pool"))
        pool.create_volume("db", MiB)
        data = os.urandom(MiB)
        pool.write("db", 0, data)
        pool.flush("db")
        r = Running(pool)
        gate = Gate(pool)
        try:
            c = Client(r.port)
            c.go("volumes/db")
            c.s.sendall(b"".join(p.request(p.CMD_READ, 1 + i, i * PIECE, 4096)
                                 for i in range(2)))
            gate.wait_held(2)
            gate.open.set()
            got = dict(read_reply(c, False, 4096) for _ in range(2))
            assert got == {1 + i: data[i * PIECE:i * PIECE + 4096] for i in range(2)}
            c.close()
        finally:
            gate.open.set()
            while OPEN:
                OPEN.pop().close()
            r.stop()
            assert pins(pool) == 0
            assert pool.check() == []
            pool.close()
