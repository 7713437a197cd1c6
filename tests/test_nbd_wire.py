"""The NBD port's handling of the wire, byte by byte, with a raw socket: each refusal of
proto.md's rules (bad magic, oversized lengths, requests past the end, unknown options and
commands, read-only exports, half-closed and silent connections) is one error reply or a
closed connection -- never a crash, a stuck task or a change to the data -- and a fuzzer
throws random handshakes and request streams at it. The server runs in-process (its own
trio loop in a thread) over a real pool; no kernel needed."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_thread import NbdThread

from blockstore import Pool
from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import Presentation
from nbd import protocol as p
from nbd import server as nbd_server
from nbd.server import NbdServer

MiB = 1 << 20


class Running(NbdThread):
    """The server over `pool`, plain text, every connection the host "here"."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        super().__init__(NbdServer(pool, WriteBarrier(pool), Presentation("here"), None,
                                   lambda _c: ""))


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Running]:
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 4 * MiB)
    pool.write("db", 0, b"\xaa" * MiB)
    s = pool.prepare_snapshot("db")
    pool.commit_snapshots([s.id])
    r = Running(pool)
    r.snap = s.id   # type: ignore[attr-defined]
    try:
        yield r
    finally:
        r.stop()
        assert pool.check() == []
        pool.close()


OPEN: list[socket.socket] = []   # every test socket, closed after each test


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


class Client:
    """A raw NBD client: just enough to say exactly the bytes a test wants."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        """rcvbuf: a small receive buffer (set before connecting: a small window)."""
        self.s = socket.socket()
        OPEN.append(self.s)
        if rcvbuf:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.settimeout(10)
        self.s.connect(("127.0.0.1", port))
        magic, opt, flags = p.SERVER_GREETING.unpack(self.recv(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        assert flags & p.FLAG_FIXED_NEWSTYLE

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.s.recv(n - len(out))
            if not more:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += more
        return out

    def silent(self, seconds: float) -> bool:
        """Nothing comes from the server for `seconds` (a reply waits): peeked, nothing
        consumed; the socket's timeout back to 10 s."""
        self.s.settimeout(seconds)
        try:
            self.s.recv(1, socket.MSG_PEEK)
            return False
        except TimeoutError:
            return True
        finally:
            self.s.settimeout(10)

    def closed(self) -> bool:
        """The server closed the connection (EOF within the timeout)."""
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def option(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(p.option(opt, data))

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = p.OPTION_REPLY.unpack(self.recv(20))
        assert magic == p.REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def go(self, name: str, structured: bool = False) -> int:
        """Negotiate and enter transmission; returns the transmission flags."""
        self.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        if structured:
            self.option(p.OPT_STRUCTURED_REPLY)
            assert self.reply()[1] == p.REP_ACK
        self.option(p.OPT_GO, p.go_data(name, []))
        flags = -1
        while True:
            _, rtype, data = self.reply()
            if rtype == p.REP_INFO and struct.unpack_from(">H", data)[0] == p.INFO_EXPORT:
                flags = struct.unpack_from(">H", data, 10)[0]
            elif rtype == p.REP_ACK:
                return flags
            else:
                raise AssertionError(f"GO {name}: reply {rtype:#x} {data!r}")

    def request(self, cmd: int, offset: int, length: int, data: bytes = b"",
                flags: int = 0, cookie: int = 7) -> None:
        self.s.sendall(p.request(cmd, cookie, offset, length, flags) + data)

    def simple(self) -> tuple[int, int]:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, cookie

    def close(self) -> None:
        self.s.close()


def _works(srv: Running) -> None:
    """A well-behaved client still gets served (after whatever a test did)."""
    c = Client(srv.port)
    c.go("volumes/db")
    c.request(p.CMD_READ, 0, 4096)
    assert c.simple() == (0, 7)
    assert c.recv(4096) == b"\xaa" * 4096
    c.request(p.CMD_DISC, 0, 0)
    assert c.closed()
    c.close()


# -------------------------------------------------------------------------- handshake
def test_a_client_without_fixed_newstyle_is_disconnected(srv: Running) -> None:
    c = Client(srv.port)
    c.s.sendall(p.CLIENT_FLAGS.pack(0))
    assert c.closed()
    _works(srv)


def test_bad_option_magic_and_oversized_option_data_close_the_connection(srv: Running
                                                                         ) -> None:
    c = Client(srv.port)
    c.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE))
    c.s.sendall(struct.pack(">QII", 0x1234, p.OPT_LIST, 0))
    assert c.closed()
    c = Client(srv.port)
    c.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE))
    c.s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, 1 << 30))   # 1 GiB "name"
    assert c.closed()
    _works(srv)


def test_unknown_and_malformed_options_get_an_error_reply_and_the_session_goes_on(
        srv: Running) -> None:
    c = Client(srv.port)
    c.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE))
    c.option(999)
    assert c.reply()[1] == p.REP_ERR_UNSUP
    c.option(p.OPT_GO, struct.pack(">I", 500) + b"volumes/db")      # length beyond data
    assert c.reply()[1] == p.REP_ERR_INVALID
    c.option(p.OPT_GO, struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0))
    assert c.reply()[1] == p.REP_ERR_INVALID                        # not UTF-8
    c.option(p.OPT_INFO, struct.pack(">I", 9) + b"volumes/x" + struct.pack(">H", 0))
    assert c.reply()[1] == p.REP_ERR_UNKNOWN
    c.option(p.OPT_SET_META_CONTEXT, struct.pack(">I", 10) + b"volumes/db"
             + struct.pack(">I", 0))
    assert c.reply()[1] == p.REP_ERR_INVALID                        # not structured
    c.option(p.OPT_STARTTLS)
    assert c.reply()[1] == p.REP_ERR_UNSUP                          # no TLS configured
    c.option(p.OPT_ABORT)
    assert c.reply()[1] == p.REP_ACK
    assert c.closed()
    _works(srv)


def test_a_silent_client_is_dropped_after_the_handshake_time_limit(
        srv: Running, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nbd")
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.5)
    c = Client(srv.port)   # says nothing after the greeting
    assert c.closed()
    c.close()
    _works(srv)
    said = [(r.levelno, r.getMessage()) for r in caplog.records
            if "handshake" in r.getMessage()]
    assert len(said) == 1 and said[0][0] == logging.WARNING, said
    assert "not finished in 0.5 s" in said[0][1]


def test_an_aborted_handshake_is_one_info_line_not_a_timeout(
        srv: Running, caplog: pytest.LogCaptureFixture) -> None:
    """NBD_OPT_ABORT (how nbdinfo --list ends) is routine: one INFO line saying so,
    never the time limit's warning."""
    caplog.set_level(logging.DEBUG, "nbd")
    c = Client(srv.port)
    c.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE))
    c.option(p.OPT_LIST)
    while c.reply()[1] != p.REP_ACK:
        pass
    c.option(p.OPT_ABORT)
    assert c.reply()[1] == p.REP_ACK
    assert c.closed()
    c.close()
    # (logged before the server closes its end: there once the client sees the close)
    said = [(r.levelno, r.getMessage()) for r in caplog.records
            if "handshake" in r.getMessage()]
    assert len(said) == 1 and said[0][0] == logging.INFO, said
    assert said[0][1].endswith("(host here): the client ended the handshake "
                               "(NBD_OPT_ABORT)"), said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_half_a_request_then_a_close_leaves_nothing_behind(srv: Running) -> None:
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 65536)[:20])
    c.s.close()
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 65536)
                + b"\x01" * 1000)   # a write whose payload never comes
    c.s.shutdown(socket.SHUT_WR)
    assert c.closed()
    c.close()
    _works(srv)
    assert srv.pool.read("db", 0, 65536) == b"\xaa" * 65536   # nothing half-written
    deadline = 50
    while srv.connections() and deadline:
        threading.Event().wait(0.1)
        deadline -= 1
    assert srv.connections() == 0


# -------------------------------------------------------------------------- transmission
def test_requests_the_server_refuses_keep_the_connection(srv: Running) -> None:
    c = Client(srv.port)
    flags = c.go("volumes/db")
    assert flags & p.TF_HAS_FLAGS and not flags & p.TF_READ_ONLY
    c.request(p.CMD_READ, 4 * MiB - 10, 20)                   # past the end
    assert c.simple() == (p.EINVAL, 7)
    c.request(p.CMD_READ, 0, 64 * MiB)                        # beyond the maximum
    assert c.simple()[0] == p.EINVAL
    c.request(p.CMD_WRITE, 4 * MiB - 10, 20, b"x" * 20)       # write past the end
    assert c.simple()[0] == p.ENOSPC
    c.request(p.CMD_CACHE, 0, 4096)
    assert c.simple()[0] == p.EINVAL
    c.request(77, 0, 4096)                                    # no such command
    assert c.simple()[0] == p.EINVAL
    c.request(p.CMD_BLOCK_STATUS, 0, 4096)                    # no context negotiated
    assert c.simple()[0] == p.EINVAL
    c.request(p.CMD_WRITE, 2 * MiB, 8, b"12345678", cookie=99)
    assert c.simple() == (0, 99)
    assert srv.pool.read("db", 2 * MiB, 8) == b"12345678"
    c.request(p.CMD_FLUSH, 0, 0)
    assert c.simple() == (0, 7)
    c.request(p.CMD_WRITE, 0, 64 * MiB)                       # cannot be skipped: closed
    assert c.closed()
    _works(srv)


def test_a_snapshot_export_refuses_writes(srv: Running) -> None:
    c = Client(srv.port)
    flags = c.go(".shadow/" + srv.snap)   # type: ignore[attr-defined]
    assert flags & p.TF_READ_ONLY
    for cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
        c.request(cmd, 0, 8, b"x" * 8 if cmd == p.CMD_WRITE else b"")
        assert c.simple()[0] == p.EPERM
    c.request(p.CMD_READ, 0, 8)
    assert c.simple() == (0, 7) and c.recv(8) == b"\xaa" * 8
    assert srv.pool.read(srv.snap, 0, MiB) == b"\xaa" * MiB   # type: ignore[attr-defined]


def test_bad_request_magic_closes_the_connection(srv: Running) -> None:
    c = Client(srv.port)
    c.go("volumes/db")
    c.s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, p.CMD_READ, 1, 0, 512))
    assert c.closed()
    _works(srv)


def test_structured_replies_carry_reads_and_errors(srv: Running) -> None:
    c = Client(srv.port)
    c.go("volumes/db", structured=True)
    c.request(p.CMD_READ, 4096, 16)
    magic, flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack(c.recv(20))
    assert (magic, rtype, cookie, length) == (p.STRUCTURED_REPLY_MAGIC,
                                              p.REPLY_TYPE_OFFSET_DATA, 7, 24)
    assert flags & p.REPLY_FLAG_DONE
    assert c.recv(24) == struct.pack(">Q", 4096) + b"\xaa" * 16
    c.request(p.CMD_READ, 4 * MiB, 16)
    magic, flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack(c.recv(20))
    assert rtype == p.REPLY_TYPE_ERROR and flags & p.REPLY_FLAG_DONE
    error, msg_len = struct.unpack(">IH", c.recv(6))
    assert error == p.EINVAL and b"past the end" in c.recv(length - 6)


# -------------------------------------------------------------------------- fuzzing
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(handshake=st.binary(max_size=80), stream=st.binary(max_size=400),
       go=st.booleans())
def test_random_bytes_never_crash_or_wedge_the_server(
        srv: Running, handshake: bytes, stream: bytes, go: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """Random option bytes, or random request bytes after a valid GO: the server answers
    or closes, the connection ends when the client goes, and a good client is served."""
    caplog.set_level(logging.WARNING, "nbd")
    c = Client(srv.port)
    try:
        if go:
            c.go("volumes/db")
            # keep the fuzz away from writes that could change the data: flip the
            # command field of anything that looks like a WRITE/TRIM/ZEROES request
            data = bytearray(stream)
            for i in range(0, len(data) - 27, 28):
                if data[i + 7] in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                    data[i + 7] = p.CMD_READ
            c.s.sendall(bytes(data))
        else:
            c.s.sendall(handshake + stream)
        c.s.shutdown(socket.SHUT_WR)
        c.s.settimeout(10)
        while c.s.recv(65536):   # everything it answers, until it closes
            pass
    except OSError:
        pass   # reset by the server: a closed connection
    finally:
        c.close()
    _works(srv)
    assert srv.pool.read("db", 0, MiB) == b"\xaa" * MiB
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_fuzzer_left_no_connection_open(tmp_path: Path) -> None:
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", MiB)
    r = Running(pool)
    try:
        for _ in range(20):
            c = Client(r.port)
            c.s.sendall(os.urandom(64))
            c.close()
        _works_volume_only(r)
        for _ in range(50):
            if r.connections() == 0:
                break
            threading.Event().wait(0.1)
        assert r.connections() == 0
    finally:
        r.stop()
        pool.close()


def _works_volume_only(r: Running) -> None:
    c = Client(r.port)
    c.go("volumes/db")
    c.request(p.CMD_READ, 0, 512)
    assert c.simple() == (0, 7)
    assert c.recv(512) == bytes(512)
    c.close()


# -------------------------------------------------------------------------- from review
def test_a_connection_stays_bound_to_the_lun_it_opened(srv: Running) -> None:
    """A volume deleted and created again under its name is another LUN (another naa):
    a connection that opened the old one is closed at its next request, never served
    the new one (which may be presented to another host)."""
    c = Client(srv.port)
    c.go("volumes/db")
    c.request(p.CMD_READ, 0, 8)
    assert c.simple() == (0, 7) and c.recv(8) == b"\xaa" * 8
    pool = srv.pool
    pool.delete_snapshot(srv.snap)   # type: ignore[attr-defined]
    pool.delete_volume("db")
    pool.create_volume("db", 4 * MiB)
    pool.write("db", 0, b"\xcc" * 4096)
    c.request(p.CMD_READ, 0, 8)
    assert c.closed()
    c2 = Client(srv.port)
    c2.go("volumes/db")   # a new connection opens the new LUN
    c2.request(p.CMD_READ, 0, 8)
    assert c2.simple() == (0, 7) and c2.recv(8) == b"\xcc" * 8


def test_flags_a_command_does_not_take_are_refused(srv: Running) -> None:
    c = Client(srv.port)
    c.go("volumes/db")
    c.request(p.CMD_READ, 0, 8, flags=p.CMD_FLAG_FAST_ZERO)
    assert c.simple()[0] == p.EINVAL
    c.request(p.CMD_FLUSH, 0, 0, flags=p.CMD_FLAG_FUA)
    assert c.simple()[0] == p.EINVAL
    c.request(p.CMD_WRITE, 2 * MiB, 4, b"abcd", flags=p.CMD_FLAG_FUA)
    assert c.simple() == (0, 7)


def test_a_big_trim_and_zeroes_are_done_in_pieces_and_right(srv: Running) -> None:
    """TRIM / WRITE_ZEROES larger than a piece (nbd.transmission.MAX_ZERO_PIECE) with a live
    snapshot: everything reads as zeros after, the snapshot keeps its data."""
    pool = srv.pool
    pool.resize_volume("db", 80 * MiB)
    pool.write("db", 40 * MiB, b"\x11" * MiB)
    c = Client(srv.port)
    c.go("volumes/db")
    c.request(p.CMD_TRIM, 0, 70 * MiB)
    assert c.simple() == (0, 7)
    c.request(p.CMD_WRITE_ZEROES, 70 * MiB, 10 * MiB, flags=p.CMD_FLAG_NO_HOLE)
    assert c.simple() == (0, 7)
    assert pool.read("db", 0, 80 * MiB) == bytes(80 * MiB)
    assert pool.read(srv.snap, 0, MiB) == b"\xaa" * MiB   # type: ignore[attr-defined]


def test_one_address_cannot_take_every_connection(srv: Running) -> None:
    held = [Client(srv.port) for _ in range(nbd_server.MAX_PER_PEER)]
    extra = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    OPEN.append(extra)
    assert extra.recv(18) == b""   # closed at once, not even greeted
    for c in held:
        c.close()
    for _ in range(50):
        if srv.connections() == 0:
            break
        threading.Event().wait(0.1)
    _works(srv)


# -------------------------------------------------------------------------- the fast path
# a client in a process of its own (no GIL shared with the server's thread) that opens
# volumes/db and pipelines READs of 8 bytes for ever (small replies: it drains them
# faster than the server makes them), draining the replies
FLOOD = """
import socket, struct, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def recv(n):
    b = b""
    while len(b) < n:
        b += s.recv(n - len(b))
    return b
recv(18)
s.sendall(struct.pack(">I", 3))
name = b"volumes/db"
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6 + len(name))
          + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while True:
    _, _, rtype, n = struct.unpack(">QIII", recv(20))
    recv(n)
    if rtype == 1:
        break
threading.Thread(target=lambda: [0 for _ in iter(lambda: s.recv(1 << 20), b"")],
                 daemon=True).start()
batch = struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 8) * 4000
print("flooding", flush=True)
while True:
    s.sendall(batch)
"""


def test_a_pipelining_client_neither_starves_others_nor_stops_the_daemon_stopping(
        srv: Running) -> None:
    """Plain TCP reads requests straight off the socket without a trio scheduler pass
    while they are there (nbd/connection.py); every YIELD_EVERY of them it yields. A
    client that never lets the socket run dry therefore cannot keep another connection
    from being served, nor the daemon from stopping (a cancelled task must reach a
    checkpoint)."""
    with subprocess.Popen([sys.executable, "-c", FLOOD, str(srv.port)],
                          stdout=subprocess.PIPE, text=True) as flood:
        try:
            assert flood.stdout is not None and flood.stdout.readline() == "flooding\n"
            threading.Event().wait(0.5)   # the server's receive buffer is full by now
            _works(srv)   # another connection: a handshake and a read meanwhile
            assert flood.poll() is None   # (the flood went on all along)
            srv.stop()    # and the loop stops although the flood's socket never runs dry
        finally:
            flood.kill()


def test_big_reads_the_socket_cannot_take_at_once_arrive_whole(srv: Running,
                                                               caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    """A reply larger than the socket takes at once (a client with a small receive
    window) is finished through trio, in order; a client that resets the connection
    mid-reply ends only its own connection, quietly."""
    caplog.set_level(logging.DEBUG, "nbd")
    data = os.urandom(3 * MiB)
    srv.pool.write("db", MiB, data)
    for structured in (False, True):
        c = Client(srv.port, rcvbuf=4096)
        c.go("volumes/db", structured=structured)
        c.request(p.CMD_READ, 0, 4 * MiB, cookie=5)
        c.request(p.CMD_READ, MiB, 16, cookie=6)   # queued behind the big one
        threading.Event().wait(0.3)   # the server is stuck in the middle of the reply
        if structured:
            magic, _flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack(c.recv(20))
            assert (rtype, cookie, length) == (p.REPLY_TYPE_OFFSET_DATA, 5, 8 + 4 * MiB)
            assert c.recv(8) == bytes(8)
        else:
            assert c.simple() == (0, 5)
        assert c.recv(4 * MiB) == b"\xaa" * MiB + data
        if structured:
            assert p.STRUCTURED_REPLY.unpack(c.recv(20))[3] == 6
            assert c.recv(8 + 16) == struct.pack(">Q", MiB) + data[:16]
        else:
            assert c.simple() == (0, 6) and c.recv(16) == data[:16]
        c.close()
    c = Client(srv.port, rcvbuf=4096)   # gone mid-reply: RST instead of FIN
    c.go("volumes/db")
    c.request(p.CMD_READ, 0, 4 * MiB)
    threading.Event().wait(0.2)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    _works(srv)
    for _ in range(50):
        if srv.connections() == 0:
            break
        threading.Event().wait(0.1)
    assert srv.connections() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
