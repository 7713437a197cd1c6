"""The plain-text thread (nbd/plainthread.py, docs/network.md "The plain-text thread"): a
plain-text connection's requests are read by a thread of its own, which answers the
cached READs at queue depth 1 and hands everything else to the trio loop. Here: that it
does, that requests mixed and pipelined keep their order and their data, the write
barrier, a client gone mid-request, and the server stopping -- in-process and `serve`
by SIGTERM -- with clients in the middle of requests: nothing locked, no thread left."""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import require_kernel
from harness import start_daemon
from test_nbd import nbd_port
from test_nbd_inflight import read_reply, until
from test_nbd_wire import OPEN, Client, Running

from blockstore import Pool
from nbd import protocol as p
from nbd import transmission

MiB = 1 << 20
PEER = "nbd 127.0.0.1:"   # the connection threads' names (plainthread.run)


def plain_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(PEER)]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Running]:
    """volumes/db: 8 MiB of random data (in the page cache: just written)."""
    if not transmission.PLAIN_THREAD:
        pytest.skip("SHADOWPLEX_NBD_PLAIN_THREAD=0")
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 8 * MiB)
    data = bytearray(os.urandom(8 * MiB))
    pool.write("db", 0, bytes(data))
    r = Running(pool)
    r.data = data   # type: ignore[attr-defined]
    try:
        yield r
    finally:
        while OPEN:
            OPEN.pop().close()
        r.stop()
        assert plain_threads() == []
        assert pool.check() == []
        pool.close()


def who_reads(pool: Pool) -> list[str]:
    """The names of the threads that call pool.read_cached from now on, in order."""
    readers: list[str] = []
    real = pool.read_cached

    def read_cached(key: str, offset: int, length: int) -> bytes | bytearray | None:
        readers.append(threading.current_thread().name)
        return real(key, offset, length)

    pool.read_cached = read_cached   # type: ignore[method-assign]
    return readers


def test_reads_at_queue_depth_1_are_answered_by_the_connections_own_thread(
        srv: Running) -> None:
    """One thread per plain connection while it is open; a cached READ alone on the
    socket is read by it (not by the trio loop's thread), right, simple or structured;
    the thread ends with the connection."""
    data = srv.data   # type: ignore[attr-defined]
    readers = who_reads(srv.pool)
    for structured in (False, True):
        c = Client(srv.port)
        c.go("volumes/db", structured=structured)
        until(lambda: len(plain_threads()) == 1)
        for i, (at, n) in enumerate(((0, 4096), (5 * MiB + 17, 999), (MiB, 256 << 10))):
            c.request(p.CMD_READ, at, n, cookie=i)
            assert read_reply(c, structured, n) == (i, data[at:at + n])
        c.request(p.CMD_DISC, 0, 0)
        assert c.closed()
        c.close()
        until(lambda: plain_threads() == [])
    assert len(readers) == 6 and all(r.startswith(PEER) for r in readers), readers


def test_after_a_write_the_loop_keeps_the_connection_until_reads_come_alone(
        srv: Running) -> None:
    """A WRITE is handed to the trio loop, which keeps the connection (a stream of writes
    costs one hand-off): the READs right after it are the loop's, until BACK_AFTER came
    alone; the next ones are the thread's again."""
    from nbd.plainthread import BACK_AFTER
    readers = who_reads(srv.pool)
    c = Client(srv.port)
    c.go("volumes/db")
    new = os.urandom(4096)
    for i in range(3):
        c.request(p.CMD_WRITE, i * 4096, 4096, new, cookie=i)
        assert c.simple() == (0, i)
    for i in range(BACK_AFTER + 3):
        c.request(p.CMD_READ, 8192, 4096, cookie=10 + i)
        assert read_reply(c, False, 4096) == (10 + i, new)
    on_thread = [r.startswith(PEER) for r in readers]
    assert on_thread == [False] * BACK_AFTER + [True] * 3, readers
    c.close()


def test_pipelined_and_single_requests_mixed_keep_their_order(srv: Running) -> None:
    """Batches of 1-8 requests (WRITE, READ, FLUSH, WRITE_ZEROES, TRIM, a header split
    over two sends), each batch sent at once, then its replies: every READ answers the
    data of every request before it (the thread answers a READ only when nothing is
    queued behind it, and hands the rest to the loop, which keeps their order), and the
    volume ends as the model says."""
    pool: Pool = srv.pool
    model = srv.data   # type: ignore[attr-defined]
    rnd = random.Random(15)
    c = Client(srv.port)
    c.go("volumes/db", structured=True)
    cookie = 0
    kinds = (p.CMD_READ, p.CMD_READ, p.CMD_WRITE, p.CMD_WRITE, p.CMD_FLUSH,
             p.CMD_WRITE_ZEROES, p.CMD_TRIM)
    for _ in range(120):
        batch: list[bytes] = []
        expect: dict[int, bytes | None] = {}
        reads: list[range] = []   # (a READ still in flight may see a later write:
        for _ in range(rnd.choice((1, 1, 1, 2, 3, 8))):   # not one of its range here)
            cookie += 1
            at = rnd.randrange(0, 2 * MiB, 512)
            n = rnd.choice((512, 4096, 65536))
            kind = rnd.choice(kinds)
            if kind == p.CMD_FLUSH:
                at = n = 0
            elif kind != p.CMD_READ and any(r.start < at + n and at < r.stop
                                            for r in reads):
                kind = p.CMD_READ
            if kind == p.CMD_READ:
                batch.append(p.request(kind, cookie, at, n))
                expect[cookie] = bytes(model[at:at + n])
                reads.append(range(at, at + n))
                continue
            new = rnd.randbytes(n) if kind == p.CMD_WRITE else bytes(n)
            batch.append(p.request(kind, cookie, at, n)
                         + (new if kind == p.CMD_WRITE else b""))
            model[at:at + n] = new
            expect[cookie] = None
        wire = b"".join(batch)
        if rnd.random() < 0.2:   # a header's first half alone, the rest a moment later
            c.s.sendall(wire[:13])
            time.sleep(0.01)
            wire = wire[13:]
        c.s.sendall(wire)
        while expect:   # (replies by cookie: reads in worker threads come when done)
            _magic, flags, rtype, got, length = p.STRUCTURED_REPLY.unpack(c.recv(20))
            assert got in expect and flags & p.REPLY_FLAG_DONE
            want = expect.pop(got)
            if want is None:
                assert (rtype, length) == (p.REPLY_TYPE_NONE, 0)
            else:
                assert rtype == p.REPLY_TYPE_OFFSET_DATA
                c.recv(8)
                assert c.recv(length - 8) == want, f"READ {got}"
    c.close()
    until(lambda: srv.connections() == 0)
    assert pool.read("db", 0, 2 * MiB) == bytes(model[:2 * MiB])


def test_writes_during_a_hold_wait_and_the_reads_behind_them_too(srv: Running) -> None:
    """Flush & hold of db: a WRITE (alone on the socket) waits for the release, and so
    does a READ of the same range sent after it -- the thread does not read on while
    the loop holds the write -- and a snapshot committed during the hold has the old
    data; after the release the WRITE is answered, then the READ with the new data."""
    pool: Pool = srv.pool
    data = srv.data   # type: ignore[attr-defined]
    token = srv._token
    barrier = srv.server.barrier
    c = Client(srv.port)
    c.go("volumes/db")
    hold = trio.from_thread.run(barrier.hold, ["db"], trio_token=token)
    new = os.urandom(4096)
    at = 3 * MiB
    c.request(p.CMD_WRITE, at, 4096, new, cookie=1)
    time.sleep(0.2)
    c.request(p.CMD_READ, at, 4096, cookie=2)
    assert c.silent(0.5)
    s = pool.prepare_snapshot("db")
    pool.commit_snapshots([s.id])
    assert trio.from_thread.run_sync(barrier.release, hold, trio_token=token)
    assert c.simple() == (0, 1)
    assert c.simple() == (0, 2) and c.recv(4096) == new
    assert pool.read(s.id, at, 4096) == data[at:at + 4096]
    c.close()


def ended(c: Client) -> bool:
    """The server ended the connection: EOF (or a reset) after whatever it had sent."""
    try:
        while c.s.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


def _mid_request_clients(port: int) -> list[Client]:
    """Four plain connections stopped in four places: idle after GO (the thread in
    poll), half a request header, a WRITE's header and half its payload (the loop
    waiting for the rest), a 256 KiB READ whose reply the client does not read (a
    4 KiB receive window: the thread holds the wire lock while trio waits to send)."""
    out = []
    for i in range(4):
        c = Client(port, rcvbuf=4096 if i == 3 else 0)
        c.go("volumes/db")
        out.append(c)
    out[1].s.sendall(p.request(p.CMD_READ, 1, 0, 4096)[:10])
    out[2].s.sendall(p.request(p.CMD_WRITE, 2, 0, 65536) + bytes(30000))
    out[3].request(p.CMD_READ, 0, 256 << 10, cookie=3)
    return out


def test_stopping_the_server_with_clients_mid_request_ends_every_thread(
        srv: Running) -> None:
    """The daemon stopping (its nursery cancelled) ends every connection at once,
    wherever it is: stop() returns, no connection thread is left, no error."""
    clients = _mid_request_clients(srv.port)
    until(lambda: len(plain_threads()) == 4)
    time.sleep(0.3)   # each one where it stops
    t0 = time.monotonic()
    srv.stop()   # (asserts it stopped within 10 s, without errors)
    assert time.monotonic() - t0 < 10
    assert plain_threads() == []
    for c in clients:
        assert ended(c)


def test_clients_gone_mid_request_leave_nothing_locked(
        srv: Running, caplog: pytest.LogCaptureFixture) -> None:
    """The same four connections reset by their clients: each ends quietly, its thread
    with it; the pool lock is free, the write payload's budget given back, and the
    server serves the next client (whose reads the thread answers: the wire lock of the
    others is theirs only)."""
    caplog.set_level(logging.DEBUG, "nbd")
    pool: Pool = srv.pool
    clients = _mid_request_clients(srv.port)
    until(lambda: len(plain_threads()) == 4)
    time.sleep(0.3)
    for c in clients:
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    until(lambda: srv.connections() == 0 and plain_threads() == [])
    assert pool._lock.acquire(timeout=5)
    pool._lock.release()
    budget = srv.server._memory_budget
    assert budget is not None and budget.used == 0
    c = Client(srv.port)
    c.go("volumes/db")
    for i in range(3):
        c.request(p.CMD_READ, i * MiB, 256 << 10, cookie=i)
        assert read_reply(c, False, 256 << 10) == (i, srv.data[i * MiB:i * MiB + (256 << 10)])  # type: ignore[attr-defined]
    c.close()
    loud = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG
            and "opened" not in r.getMessage()]
    assert not loud, loud


@pytest.mark.kernel
def test_sigterm_of_serve_with_plain_clients_mid_request_exits_cleanly(
        tmp_path: Path, sockdir: str) -> None:
    """`serve` with the NBD port in plain text and four clients stopped mid-request
    (each served by its thread: /proc/PID/task/*/comm): SIGTERM stops it as without
    them (exit 0, not killed), every client sees its connection end, and no thread
    error is logged."""
    if not transmission.PLAIN_THREAD:
        pytest.skip("SHADOWPLEX_NBD_PLAIN_THREAD=0")
    require_kernel()
    d = start_daemon(tmp_path, sockdir, {"db": 8 * MiB},
                     config={"nbd_listen": "127.0.0.1:0", "nbd_insecure": True})
    try:
        port = nbd_port(d)
        clients = _mid_request_clients(port)

        def comms() -> list[str]:
            out = []
            for t in os.listdir(f"/proc/{d.proc.pid}/task"):
                try:
                    with open(f"/proc/{d.proc.pid}/task/{t}/comm") as f:
                        out.append(f.read().strip())
                except OSError:   # the thread ended meanwhile
                    pass
            return out

        until(lambda: sum(n.startswith(PEER[:15]) for n in comms()) == 4)
    finally:
        rc = d.stop(timeout=10)
    assert rc == 0, d.log_text()
    for c in clients:
        assert ended(c)
    assert "Traceback" not in d.log_text(), d.log_text()
