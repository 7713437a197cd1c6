"""The NBD port's TLS byte stream (nbd/connection.py: an ssl.SSLObject over memory BIOs
on the socket), record by record, with a TLS client in the test that says exactly the
records and TCP segments a case wants (an SSLObject of its own, client certificate from
`shadowplex pki`): requests split over many records and segments, several requests in
one record, a client closing mid-record, alerts and a corrupted record, a KeyUpdate, a
32 MiB write, a big read into a small window, TLS 1.2 and a refused renegotiation, a
daemon stopping while a client is mid-request, pipelined requests and the loop's other
tasks. The server runs in-process (its own trio loop in a thread, tests/nbd_thread.py)
over a real pool; no kernel needed."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from nbd_thread import NbdThread

from blockstore import Pool
from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import Presentation
from nbd import connection, pki, tls
from nbd import protocol as p
from nbd import server as nbd_server
from nbd.server import NbdServer
from provider import daemon

MiB = 1 << 20
T = 10.0   # every socket operation's time limit


class Running(NbdThread):
    def __init__(self, pool: Pool, certs: Path) -> None:
        self.pool = pool
        presentation = Presentation("here")
        presentation.update("here", {"db": frozenset({"hostA"})}, ())
        super().__init__(NbdServer(pool, WriteBarrier(pool), presentation,
                                   tls.server_context(certs), daemon._peer_host))

    def settled(self) -> bool:
        """Every connection ended (within 5 s)."""
        for _ in range(50):
            if self.connections() == 0:
                return True
            time.sleep(0.1)
        return False


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    pki.init(base / "array", ["localhost", "127.0.0.1"])
    pki.issue_host("hostA", base / "hostA", base / "array")
    # hostA's name on a certificate of another CA (the client trusts the array's CA)
    pki.init(base / "other", ["localhost"])
    pki.issue_host("hostA", base / "other-host", base / "other")
    (base / "forged").mkdir()
    for name, src in (("ca-cert.pem", "array"), ("client-cert.pem", "other-host"),
                      ("client-key.pem", "other-host")):
        (base / "forged" / name).write_bytes((base / src / name).read_bytes())
    os.chmod(base / "forged" / "client-key.pem", 0o600)
    return base


@pytest.fixture
def srv(tmp_path: Path, certs: Path, caplog: pytest.LogCaptureFixture
        ) -> Iterator[Running]:
    caplog.set_level(logging.DEBUG, "nbd")
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 40 * MiB)
    pool.write("db", 0, b"\xaa" * MiB)
    r = Running(pool, certs / "array")
    try:
        yield r
    finally:
        r.stop()
        for c in OPEN:
            c.close()
        OPEN.clear()
        assert pool.check() == []
        pool.close()
    # whatever a client did to its own connection, the server had nothing to warn about
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


OPEN: list[socket.socket] = []


class TlsClient:
    """The NBD handshake in plain text up to STARTTLS, then TLS through an SSLObject of
    the test's own: `records` makes one TLS record per piece, `segments` sends bytes in
    TCP segments of a chosen size."""

    def __init__(self, port: int, certs: Path, rcvbuf: int = 0, tls12: bool = False
                 ) -> None:
        self.s = socket.socket()
        OPEN.append(self.s)
        if rcvbuf:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.settimeout(T)
        self.s.connect(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        magic, opt, _ = p.SERVER_GREETING.unpack(self.raw_recv(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
                       + p.option(p.OPT_STARTTLS))
        assert p.OPTION_REPLY.unpack(self.raw_recv(20))[2] == p.REP_ACK
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = tls.client_context(certs)
        if tls12:   # and free to try a renegotiation (our client context refuses them)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.options &= ~ssl.OP_NO_RENEGOTIATION
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="127.0.0.1")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.s.sendall(self.out.read())
                self._more()
        self.s.sendall(self.out.read())

    def raw_recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.s.recv(n - len(out))
            if not more:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += more
        return out

    def _more(self) -> None:
        data = self.s.recv(1 << 20)
        if not data:
            raise EOFError("the server closed the connection")
        self.inc.write(data)

    def records(self, *pieces: bytes) -> bytes:
        """The ciphertext of one record per piece (OpenSSL cuts a piece over 16 KiB)."""
        for x in pieces:
            self.obj.write(x)
        return self.out.read()

    def send(self, *pieces: bytes) -> None:
        self.s.sendall(self.records(*pieces))

    def segments(self, data: bytes, size: int, pause: float = 0.0) -> None:
        for at in range(0, len(data), size):
            self.s.sendall(data[at:at + size])
            if pause:
                time.sleep(pause)

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                more = self.obj.read(n - len(out))
            except ssl.SSLWantReadError:
                self._more()
                continue
            if not more:
                raise EOFError("close_notify")
            out += more
        return bytes(out)

    def go(self, name: str = "volumes/db") -> None:
        self.send(p.option(p.OPT_GO, p.go_data(name, [])))
        while True:
            _, _, rtype, length = p.OPTION_REPLY.unpack(self.recv(20))
            self.recv(length)
            if rtype == p.REP_ACK:
                return
            assert rtype == p.REP_INFO, hex(rtype)

    def simple(self) -> tuple[int, int]:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, cookie

    def closed(self) -> bool:
        """The server ended the connection within T (EOF, or a reset)."""
        try:
            while self.s.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        return True


def req(cmd: int, offset: int, length: int, cookie: int = 7) -> bytes:
    return p.request(cmd, cookie, offset, length)


def _works(srv: Running, certs: Path) -> None:
    """A well-behaved TLS client still gets served (after whatever a test did)."""
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    c.send(req(p.CMD_READ, 0, 4096))
    assert c.simple() == (0, 7) and c.recv(4096) == b"\xaa" * 4096
    c.send(req(p.CMD_DISC, 0, 0))
    assert c.closed()


def test_a_request_split_over_many_records_and_segments(srv: Running, certs: Path) -> None:
    """Records cut anywhere (1-7 bytes of a header, 1000 of a payload) and sent in TCP
    segments that end inside a record's header and body, with pauses: the server reads
    what is there and decrypts whole records only."""
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    data = os.urandom(65536 + 123)
    head = req(p.CMD_WRITE, 5000, len(data), cookie=3)
    pieces = [head[0:1], head[1:7], head[7:14], head[14:21], head[21:28]]
    pieces += [data[i:i + 1000] for i in range(0, len(data), 1000)]
    wire = c.records(*pieces)
    c.segments(wire[:300], 3, pause=0.002)    # record headers and bodies cut in three
    c.segments(wire[300:], 4099, pause=0.001)
    assert c.simple() == (0, 3)
    assert srv.pool.read("db", 5000, len(data)) == data
    wire = c.records(*[x.to_bytes(1, "big") for x in req(p.CMD_READ, 5000, 16, 4)])
    c.segments(wire, 5, pause=0.001)          # 28 records of one byte each
    assert c.simple() == (0, 4) and c.recv(16) == data[:16]


def test_several_requests_in_one_record(srv: Running, certs: Path) -> None:
    """One record with three requests; then (after a wait, so the connection is idle)
    a record whose start is a WRITE's payload and whose end is the next request: that
    request is already decrypted in the TLS session and must be served without waiting
    for the socket, which has nothing more (the client waits for the replies)."""
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    c.send(req(p.CMD_READ, 0, 8, cookie=1) + req(p.CMD_WRITE, MiB, 5, cookie=2) + b"hello"
           + req(p.CMD_READ, MiB, 5, cookie=3))
    assert c.simple() == (0, 1) and c.recv(8) == b"\xaa" * 8
    assert c.simple() == (0, 2)
    assert c.simple() == (0, 3) and c.recv(5) == b"hello"
    data = os.urandom(40000)   # records of 16384, 16384, 7232 + the next request
    time.sleep(0.1)
    c.send(req(p.CMD_WRITE, 2 * MiB, len(data), cookie=4))
    time.sleep(0.1)            # the server has the WRITE's header, waits for its payload
    c.send(data + req(p.CMD_READ, 2 * MiB, 40000, cookie=5))
    assert c.simple() == (0, 4)
    assert c.simple() == (0, 5) and c.recv(40000) == data


def test_a_client_closing_mid_record_changes_nothing(srv: Running, certs: Path) -> None:
    for how in ("fin", "rst"):
        c = TlsClient(srv.port, certs / "hostA")
        c.go()
        wire = c.records(req(p.CMD_WRITE, 0, 65536) + b"\x01" * 65536)
        c.s.sendall(wire[:len(wire) // 2 + 7])   # up to the middle of a record
        time.sleep(0.1)
        if how == "rst":
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.s.close()
        assert srv.settled()
    assert srv.pool.read("db", 0, 65536) == b"\xaa" * 65536   # nothing half-written
    _works(srv, certs)


def test_close_notify_ends_the_connection(srv: Running, certs: Path) -> None:
    """The client's close_notify alert (its socket left open): the server closes."""
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    with pytest.raises(ssl.SSLWantReadError):
        c.obj.unwrap()   # sends close_notify, would wait for the server's
    c.s.sendall(c.out.read())
    assert c.closed()
    assert srv.settled()


def test_a_corrupted_record_is_refused_with_an_alert_and_writes_nothing(
        srv: Running, certs: Path) -> None:
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    wire = bytearray(c.records(req(p.CMD_WRITE, 0, 4096) + b"\x02" * 4096))
    wire[100] ^= 1   # inside the record's ciphertext: its tag no longer matches
    c.s.sendall(wire)
    with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
        c.recv(16)   # the server's alert says why
    assert c.closed()
    assert srv.settled()
    assert srv.pool.read("db", 0, 4096) == b"\xaa" * 4096
    _works(srv, certs)


def test_a_certificate_of_another_ca_gets_an_alert_naming_it(srv: Running,
                                                            certs: Path) -> None:
    """TLS 1.3: the client's handshake is over before the server has checked its
    certificate; the server's refusal reaches it as an alert on its first read (not as a
    bare close)."""
    c = TlsClient(srv.port, certs / "forged")
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
        c.recv(1)
    assert srv.settled()


def _ssl_pointer(obj: ssl.SSLObject, version: int = 0x0304) -> int:
    """The SSL* under an SSLObject (CPython's PySSLSocket: the object header, the
    socket's weak reference, then SSL *ssl), checked by asking OpenSSL its version."""
    ptr = ctypes.c_void_p.from_address(id(obj._sslobj) + object.__basicsize__ + 8).value
    assert ptr is not None and _libssl().SSL_version(ctypes.c_void_p(ptr)) == version
    return ptr


def _libssl() -> ctypes.CDLL:
    name = ctypes.util.find_library("ssl")   # the one the ssl module loaded (libssl.so.3)
    assert name is not None
    return ctypes.CDLL(name)


def test_a_key_update_and_the_session_goes_on(srv: Running, certs: Path) -> None:
    """TLS 1.3 KeyUpdate (what GnuTLS sends by itself after enough records) with
    "update_requested", alone in what the server reads: a record without application
    data (the server decrypts nothing, reads on) -- then requests under the new keys,
    and replies under the server's new keys (OpenSSL sends its own KeyUpdate before
    its next record)."""
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    c.send(req(p.CMD_READ, 0, 8, cookie=1))
    assert c.simple() == (0, 1) and c.recv(8) == b"\xaa" * 8
    assert _libssl().SSL_key_update(ctypes.c_void_p(_ssl_pointer(c.obj)), 1) == 1
    c.obj.do_handshake()       # sends the KeyUpdate (no application data)
    c.s.sendall(c.out.read())
    time.sleep(0.1)            # the server has read it and waits again
    data = os.urandom(100000)
    c.send(req(p.CMD_WRITE, MiB, len(data), cookie=2) + data
           + req(p.CMD_READ, MiB, len(data), cookie=3))
    assert c.simple() == (0, 2)
    assert c.simple() == (0, 3) and c.recv(len(data)) == data


def test_a_tls_1_2_renegotiation_is_refused_with_an_alert(srv: Running,
                                                           certs: Path) -> None:
    """TLS 1.2 (allowed for older GnuTLS peers) serves the same; a renegotiation the
    client starts is refused (OP_NO_RENEGOTIATION) with a warning alert, which must
    reach the client while it waits for the server's answer -- OpenSSL writes it while
    reading, and the server sends what OpenSSL wrote before it waits again."""
    c = TlsClient(srv.port, certs / "hostA", tls12=True)
    assert c.obj.version() == "TLSv1.2"
    c.go()
    data = os.urandom(50000)
    c.send(req(p.CMD_WRITE, MiB, len(data), cookie=1) + data
           + req(p.CMD_READ, MiB, len(data), cookie=2))
    assert c.simple() == (0, 1)
    assert c.simple() == (0, 2) and c.recv(len(data)) == data
    assert _libssl().SSL_renegotiate(ctypes.c_void_p(_ssl_pointer(c.obj, 0x0303))) == 1
    with pytest.raises(ssl.SSLError, match="NO_RENEGOTIATION"):
        while True:
            try:
                c.obj.do_handshake()   # a new ClientHello
            except ssl.SSLWantReadError:
                c.s.sendall(c.out.read())
                c._more()              # a timeout here if the alert is not sent
    c.s.sendall(c.out.read())          # (the client's fatal alert: the session is over)
    assert c.closed()
    assert srv.settled()
    _works(srv, certs)


def test_a_32_mib_write_and_a_4_mib_read_into_a_small_window(srv: Running,
                                                              certs: Path) -> None:
    """The largest WRITE (MAX_REQUEST) with a READ pipelined behind it in the same
    records; then a 4 MiB READ to a client with a small receive window: the reply's
    tail goes out as the client makes room."""
    c = TlsClient(srv.port, certs / "hostA", rcvbuf=4096)
    c.go()
    data = os.urandom(32 * MiB)
    c.send(req(p.CMD_WRITE, 4 * MiB, len(data), cookie=1) + data
           + req(p.CMD_READ, 4 * MiB - 8, 24, cookie=2))
    assert c.simple() == (0, 1)
    assert c.simple() == (0, 2) and c.recv(24) == b"\x00" * 8 + data[:16]
    assert srv.pool.read("db", 4 * MiB, len(data)) == data
    c.send(req(p.CMD_READ, 4 * MiB, 4 * MiB, cookie=3))
    time.sleep(0.3)   # the server's send is stuck on the full window
    assert c.simple() == (0, 3) and c.recv(4 * MiB) == data[:4 * MiB]


def test_the_daemon_stops_while_a_tls_client_is_mid_request(srv: Running,
                                                            certs: Path) -> None:
    c = TlsClient(srv.port, certs / "hostA")
    c.go()
    wire = c.records(req(p.CMD_WRITE, 0, MiB) + b"\x03" * MiB)
    c.s.sendall(wire[:len(wire) // 2])
    time.sleep(0.2)
    srv.stop()   # within its 10 s, the connection task cancelled at its wait
    assert c.closed()
    assert srv.pool.read("db", 0, MiB) == b"\xaa" * MiB


def test_a_tls_handshake_that_stalls_is_dropped_at_the_time_limit(
        srv: Running, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.5)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=T)
    OPEN.append(s)
    assert len(s.recv(18)) == 18
    s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE) + p.option(p.OPT_STARTTLS))
    assert len(s.recv(20)) == 20
    s.sendall(b"\x16\x03\x01\x02\x00\x01")   # the start of a ClientHello, no more
    assert s.recv(1) == b""
    assert srv.settled()
    said = [r for r in caplog.records if "not finished in 0.5 s" in r.getMessage()]
    assert len(said) == 1
    caplog.clear()   # (the fixture's check: that warning was this test's point)


def test_pipelined_tls_requests_let_the_loop_go_on_every_yield_every(certs: Path) -> None:
    """Requests decrypted out of what was read keep coming without the socket ever
    running dry: every YIELD_EVERY of them the connection takes a scheduler pass
    (nbd/connection.py), so the daemon's other tasks go on and a cancelled daemon stops.
    The connection alone in a trio loop, all the requests in its socket before it reads
    the first; a ticker task counts the passes it gets meanwhile."""
    n = 40 * connection.YIELD_EVERY
    a, b = socket.socketpair()

    def client() -> None:
        with tls.client_context(certs / "hostA").wrap_socket(
                b, server_hostname="127.0.0.1") as t:
            t.sendall(req(p.CMD_READ, 0, 8) * n)   # (stays readable after the close)

    async def main() -> int:
        c = connection.Conn(trio.SocketStream(trio.socket.from_stdlib_socket(a)), "pair")
        sender = threading.Thread(target=client)
        sender.start()
        await c.start_tls(tls.server_context(certs / "array"))
        await trio.to_thread.run_sync(sender.join)   # every request is in the socket
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)
            ticks = 0
            for _ in range(n):
                assert p.REQUEST.unpack(await c.recv_request(p.REQUEST.size))[5] == 8
            nursery.cancel_scope.cancel()
        return ticks

    try:
        ticks = trio.run(main)
    finally:
        a.close()
        b.close()
    assert n // connection.YIELD_EVERY - 2 <= ticks <= n // connection.YIELD_EVERY + 2, ticks
