"""Our NBD client (nbd/client.py, nbd/pool.py) against our server (in-process over a real
pool, tests/nbd_thread.py: compared with the pool itself), with TLS and LUN masking,
against servers nobody here wrote (nbdkit memory, qemu-nbd on a raw file), from racing
threads, and against a hostile server (a socket in the test saying exactly the bytes
a case wants): a clean error every time, within a time limit, never a hang."""

from __future__ import annotations

import errno
import os
import random
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbd_thread import NbdThread
from support import need

from blockstore import Pool
from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import Presentation
from nbd import pki, tls
from nbd import protocol as p
from nbd.client import HandshakeError, NbdClient, NbdProtocolError, NbdTimeout, NoSuchExport
from nbd.pool import NbdPool
from nbd.server import NbdServer
from provider import daemon

MiB = 1 << 20
T = 10.0   # every connect's time limit


class Array(NbdThread):
    """Our server over `pool` on 127.0.0.1; volume `other` is hostB's (LUN masking)."""

    def __init__(self, pool: Pool, tls_dir: Path | None = None) -> None:
        self.pool = pool
        presentation = Presentation("here")
        presentation.update("here", {"other": frozenset({"hostB"}),
                                     "a": frozenset({"hostA"})}, ())
        super().__init__(NbdServer(
            pool, WriteBarrier(pool), presentation,
            tls.server_context(tls_dir) if tls_dir else None,
            daemon._peer_host if tls_dir else (lambda _c: "")))

    def connect(self, export: str = "volumes/db", **kw: object) -> NbdClient:
        kw.setdefault("tls", None)
        kw.setdefault("timeout", T)
        return NbdClient.connect("127.0.0.1", self.port, export, **kw)  # type: ignore[arg-type]


def _pool(base: Path) -> tuple[Pool, str]:
    pool = Pool.create(str(base / "pool"))
    pool.create_volume("db", 64 * MiB)
    pool.write("db", MiB, os.urandom(2 * MiB))
    pool.write("db", 40 * MiB, os.urandom(MiB))
    s = pool.prepare_snapshot("db")
    pool.commit_snapshots([s.id])
    for name in ("other", "a"):
        pool.create_volume(name, MiB)
    return pool, s.id


@pytest.fixture
def array(tmp_path: Path) -> Iterator[tuple[Array, str]]:
    pool, snap = _pool(tmp_path)
    a = Array(pool)
    try:
        yield a, snap
    finally:
        a.stop()
        assert pool.check() == []
        pool.close()


def _expected_status(pool: Pool, key: str, offset: int, length: int
                     ) -> list[tuple[int, int, int]]:
    """The pool's allocation as base:allocation extents (merged as the client merges)."""
    out: list[tuple[int, int, int]] = []

    def add(o: int, n: int, f: int) -> None:
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        elif n:
            out.append((o, n, f))
    pos = offset
    for o, n in pool.allocation(key, offset, length):
        add(pos, o - pos, p.STATE_HOLE | p.STATE_ZERO)
        add(max(o, pos), o + n - max(o, pos), 0)
        pos = o + n
    add(pos, offset + length - pos, p.STATE_HOLE | p.STATE_ZERO)
    return out


# -------------------------------------------------------------------------- our server
def test_round_trips_match_the_pool(array: tuple[Array, str]) -> None:
    a, _ = array
    pool = a.pool
    with a.connect() as c:
        assert c.size == 64 * MiB and not c.read_only
        assert c.can_flush and c.can_fua and c.can_trim and c.can_write_zeroes
        assert c.can_multi_conn and c.can_block_status and c.info.structured
        assert c.info.min_block == 1 and c.info.max_payload == 32 * MiB
        # GO asked for the description: it names the LUN (host mode checks it)
        assert f"(naa {pool.volume('db').naa})" in c.info.description
        assert c.pread(MiB - 5, 2 * MiB + 10) == pool.read("db", MiB - 5, 2 * MiB + 10)
        assert c.pread(0, 0) == b""
        # above the 32 MiB maximum: split in two requests, one answer
        assert c.pread(8 * MiB, 40 * MiB) == pool.read("db", 8 * MiB, 40 * MiB)
        big = os.urandom(33 * MiB)
        assert c.pwrite(big, 20 * MiB + 3) == len(big)
        assert pool.read("db", 20 * MiB + 3, len(big)) == big
        c.pwrite(b"fua!", 7, fua=True)
        assert pool.read("db", 0, 11) == bytes(7) + b"fua!"
        c.zero(MiB, 8192)
        c.zero(MiB + 65536, 4096, no_hole=True)
        c.trim(2 * MiB, MiB)
        c.flush()
        assert pool.read("db", MiB, 8192) == bytes(8192)
        assert pool.read("db", MiB + 65536, 4096) == bytes(4096)
        assert pool.read("db", 2 * MiB, MiB) == bytes(MiB)   # our discard reads as zeros
        status = c.block_status(0, 64 * MiB)
        assert status == _expected_status(pool, "db", 0, 64 * MiB)
        assert sum(n for _, n, _ in status) == 64 * MiB
        assert c.block_status(MiB + 100, 100_000) == \
            _expected_status(pool, "db", MiB + 100, 100_000)
    assert c.closed
    with pytest.raises(ConnectionError, match="closed"):
        c.pread(0, 1)


def test_a_snapshot_export_reads_as_the_snapshot_and_refuses_writes(
        array: tuple[Array, str]) -> None:
    a, snap = array
    before = a.pool.read(snap, 0, 64 * MiB)
    with a.connect() as vol:
        vol.pwrite(b"\x55" * MiB, MiB)   # the origin moves on; the snapshot must not
    with a.connect(".shadow/" + snap) as c:
        assert c.read_only and not c.can_trim and not c.can_write_zeroes
        assert c.pread(0, 64 * MiB) == before
        with pytest.raises(PermissionError) as e:
            c.pwrite(b"x" * 512, 0)
        assert e.value.errno == errno.EPERM and "read-only" in str(e.value)
        for call in (lambda: c.trim(0, 4096), lambda: c.zero(0, 4096)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EPERM
        assert c.block_status(0, 64 * MiB) == _expected_status(a.pool, snap, 0, 64 * MiB)
        assert c.pread(MiB, 16) == before[MiB:MiB + 16]   # the connection goes on
    assert a.pool.read(snap, 0, 64 * MiB) == before


def test_server_errors_are_oserrors_and_the_connection_goes_on(
        array: tuple[Array, str]) -> None:
    a, _ = array
    with a.connect() as c:
        with pytest.raises(OSError) as e:
            c.pread(64 * MiB - 10, 20)
        assert e.value.errno == errno.EINVAL and "past the end" in str(e.value)
        with pytest.raises(OSError) as e:
            c.pwrite(b"x" * 20, 64 * MiB - 10)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            c.pread(-1, 10)
        assert e.value.errno == errno.EINVAL
        assert c.pread(MiB, 8) == a.pool.read("db", MiB, 8)
        assert not c.closed


def test_an_export_the_host_may_not_see_is_a_clear_error(array: tuple[Array, str]) -> None:
    a, _ = array
    for name in ("volumes/other", "volumes/nope"):
        with pytest.raises(NoSuchExport, match=name) as e:
            a.connect(name)
        assert e.value.reply == p.REP_ERR_UNKNOWN and "cannot open export" in str(e.value)
    _wait(lambda: a.connections() == 0)


def test_a_pool_reconnects_after_the_lun_it_had_is_gone(array: tuple[Array, str]) -> None:
    """The server closes a connection whose LUN was deleted and made again: the pool's
    command sees ConnectionError, the next one opens a connection to the new LUN."""
    a, snap = array
    with NbdPool(a.connect, 2) as pool:
        assert pool.pread(MiB, 8) == a.pool.read("db", MiB, 8)
        a.pool.delete_snapshot(snap)
        a.pool.delete_volume("db")
        a.pool.create_volume("db", 64 * MiB)
        a.pool.write("db", 0, b"\xcc" * 4096)
        with pytest.raises(ConnectionError):
            pool.pread(0, 8)
        assert pool.pread(0, 8) == b"\xcc" * 8
        assert pool.connections == 1
    _wait(lambda: a.connections() == 0)


@pytest.mark.parametrize("shared", ["one client", "pool of 3"])
def test_racing_threads_on_disjoint_ranges(array: tuple[Array, str], shared: str) -> None:
    a, _ = array
    target: NbdClient | NbdPool = a.connect() if shared == "one client" \
        else NbdPool(a.connect, 3)
    region = 2 * MiB
    models = [bytearray(a.pool.read("db", i * region, region)) for i in range(8)]
    failures: list[BaseException] = []

    def work(i: int) -> None:
        rnd = random.Random(i)
        base, model = i * region, models[i]
        try:
            for _ in range(60):
                off = rnd.randrange(region - 1)
                n = rnd.randrange(1, min(region - off, 200_000) + 1)
                if rnd.random() < 0.5:
                    data = rnd.randbytes(n)
                    target.pwrite(data, base + off)
                    model[off:off + n] = data
                else:
                    assert target.pread(base + off, n) == model[off:off + n]
        except BaseException as e:   # noqa: BLE001 - reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        target.flush()
        for i, model in enumerate(models):
            assert target.pread(i * region, region) == model
            assert a.pool.read("db", i * region, region) == model
        if isinstance(target, NbdPool):
            assert 1 <= target.connections <= 3
    finally:
        target.close()


# -------------------------------------------------------------------------- TLS
@pytest.fixture
def tls_array(tmp_path: Path) -> Iterator[tuple[Array, Path]]:
    certs = tmp_path / "pki"
    pki.init(certs, ["localhost", "127.0.0.1"])
    for host in ("hostA", "hostB"):
        pki.issue_host(host, tmp_path / host, certs)
    pool, _ = _pool(tmp_path)
    a = Array(pool, certs)
    try:
        yield a, tmp_path
    finally:
        a.stop()
        pool.close()


def test_tls_with_a_client_certificate_sees_what_is_presented_to_it(
        tls_array: tuple[Array, Path]) -> None:
    a, base = tls_array
    ctx = tls.client_context(base / "hostA")
    with a.connect("volumes/a", tls=ctx) as c:
        assert c.info.tls and c.size == MiB
        c.pwrite(b"over tls" * 1000, 4096)
        c.flush()
        assert c.pread(4096, 8000) == a.pool.read("a", 4096, 8000) == b"over tls" * 1000
    with pytest.raises(NoSuchExport):   # hostB's LUN, and the array's own db
        a.connect("volumes/other", tls=ctx)
    with pytest.raises(NoSuchExport):
        a.connect("volumes/db", tls=ctx)
    with a.connect("volumes/other", tls=tls.client_context(base / "hostB")) as c:
        assert c.pread(0, 16) == bytes(16)


def test_plain_text_is_refused_when_tls_is_expected(tls_array: tuple[Array, Path],
                                                    tmp_path: Path) -> None:
    a, base = tls_array
    # a client without TLS at a TLS-only server: told to use TLS, nothing opened
    with pytest.raises(HandshakeError, match="requires TLS") as e:
        a.connect("volumes/a")
    assert e.value.reply == p.REP_ERR_TLS_REQD
    # a certificate of another CA: the TLS handshake fails, a clear error
    pki.init(tmp_path / "other-ca", ["localhost"])
    pki.issue_host("hostA", tmp_path / "forged", tmp_path / "other-ca")
    with pytest.raises(HandshakeError, match="TLS handshake failed"):
        a.connect("volumes/a", tls=tls.client_context(tmp_path / "forged"))
    # the server's name must be in its certificate
    with pytest.raises(HandshakeError, match="TLS handshake failed"):
        a.connect("volumes/a", tls=tls.client_context(base / "hostA"),
                  server_hostname="elsewhere.example")
    assert a.alive()


def test_a_server_that_will_not_do_tls_gets_nothing_in_plain_text() -> None:
    """STARTTLS refused: the client gives up; the server sees no further option (no
    export name, nothing) -- then EOF."""
    seen: list[int] = []

    def script(s: socket.socket) -> None:
        _greet(s)
        opt, _ = _option(s)
        seen.append(opt)
        s.sendall(p.option_reply(opt, p.REP_ERR_UNSUP, b"no TLS here"))
        assert s.recv(1) == b""   # the client closed without another word

    with _Hostile(script) as h, \
            pytest.raises(HandshakeError, match="not going on in plain text"):
        NbdClient.connect("127.0.0.1", h.port, "x",
                          tls=ssl.create_default_context(), timeout=T)
    assert seen == [p.OPT_STARTTLS] and h.errors == []


# -------------------------------------------------------------------------- interop
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["nbdkit", "qemu-nbd"])
def foreign(request: pytest.FixtureRequest, tmp_path: Path
            ) -> Iterator[Callable[[], NbdClient]]:
    """A server nobody here wrote, 64 MiB, on 127.0.0.1 and a free port; yields how to
    connect to it. Killed in the end, whatever happened."""
    tool = request.param
    need(tool)
    for _ in range(3):   # the port was free a moment ago; another process may take it
        port = _free_port()
        if tool == "nbdkit":
            argv = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1",
                    "-p", str(port), "memory", "64M"]
            export = ""
        else:
            image = tmp_path / "disk.raw"
            image.write_bytes(b"")
            os.truncate(image, 64 * MiB)
            argv = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x",
                    "disk", "-e", "8", "-t", str(image)]
            export = "disk"
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            end = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < end:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            if proc.poll() is None:
                yield lambda port=port, export=export: NbdClient.connect(
                    "127.0.0.1", port, export, tls=None, timeout=T)
                return
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            assert proc.stderr is not None
            proc.stderr.close()
    pytest.fail(f"{tool} did not start")


def test_round_trips_with_a_server_nobody_here_wrote(
        foreign: Callable[[], NbdClient]) -> None:
    with foreign() as c:
        assert c.size == 64 * MiB and not c.read_only and c.info.structured
        assert c.pread(0, MiB) == bytes(MiB)
        data = os.urandom(3 * MiB)
        c.pwrite(data, 5 * MiB + 512)
        c.pwrite(b"fua" * 171, 512, fua=True)
        c.flush()
        assert c.pread(5 * MiB + 512, 3 * MiB) == data
        assert c.pread(0, 1024) == (bytes(512) + b"fua" * 171)[:1024]
        # more than 32 MiB at once: split, and the holes read as zeros
        whole = c.pread(0, 40 * MiB)
        assert whole[5 * MiB + 512:8 * MiB + 512] == data and whole[10 * MiB:] == \
            bytes(30 * MiB)
        c.zero(6 * MiB, MiB)
        assert c.pread(6 * MiB, MiB) == bytes(MiB)
        if c.can_trim:
            c.trim(7 * MiB, MiB)   # content undefined after: only the answer matters
        assert c.can_block_status
        status = c.block_status(0, 64 * MiB)
        assert status[0][0] == 0 and sum(n for _, n, _ in status) == 64 * MiB
        assert all(a + n == b for (a, n, _), (b, _, _) in zip(status, status[1:]))
        # written data is never reported as a hole, the untouched end always reads zero
        assert all(f & p.STATE_HOLE == 0 for o, n, f in status
                   if o < 5 * MiB + 512 + 100 and o + n > 5 * MiB + 512)
        assert all(f & p.STATE_ZERO for o, n, f in status if o >= 16 * MiB)
        with pytest.raises(OSError) as e:
            c.pread(64 * MiB, 512)
        assert e.value.errno == errno.EINVAL
        assert c.pread(5 * MiB + 512, 16) == data[:16]


def test_racing_threads_through_a_pool_against_a_foreign_server(
        foreign: Callable[[], NbdClient]) -> None:
    region = MiB
    models = [bytearray(region) for _ in range(8)]
    failures: list[BaseException] = []
    with NbdPool(foreign, 3) as pool:
        def work(i: int) -> None:
            rnd = random.Random(i)
            try:
                for _ in range(40):
                    off = rnd.randrange(region - 1)
                    n = rnd.randrange(1, min(region - off, 100_000) + 1)
                    data = rnd.randbytes(n)
                    pool.pwrite(data, i * region + off)
                    models[i][off:off + n] = data
                    assert pool.pread(i * region + off, n) == data
            except BaseException as e:   # noqa: BLE001 - reported by the main thread
                failures.append(e)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == []
        pool.flush()
        for i, model in enumerate(models):
            assert pool.pread(i * region, region) == model


# -------------------------------------------------------------------------- hostile
class _Hostile:
    """A one-connection server on 127.0.0.1 running `script(sock)` in a thread."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.conn: socket.socket | None = None
        self.script = script
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.listener.settimeout(T)
            self.conn, _ = self.listener.accept()
            self.conn.settimeout(T)
            self.script(self.conn)
        except BaseException as e:   # noqa: BLE001 - looked at by the test if it cares
            self.errors.append(e)

    def __enter__(self) -> _Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(2)   # a script ends when the client has closed (EOF)
        if self.thread.is_alive() and self.conn is not None:
            self.conn.shutdown(socket.SHUT_RDWR)   # else wake it: recv returns at once
        self.thread.join(T)
        assert not self.thread.is_alive()
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = s.recv(n - len(out))
        if not more:
            raise EOFError
        out += more
    return out


def _greet(s: socket.socket) -> None:
    s.sendall(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT,
                                     p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
    _recv(s, 4)


def _option(s: socket.socket) -> tuple[int, bytes]:
    magic, opt, length = p.OPTION_HEADER.unpack(_recv(s, 16))
    assert magic == p.IHAVEOPT
    return opt, _recv(s, length)


def _to_transmission(s: socket.socket, go_replies: int = 1) -> None:
    """A well-behaved handshake (structured replies, base:allocation id 1, a 1 MiB
    export); go_replies > 1 repeats the INFO reply that many times before the ACK."""
    _greet(s)
    while True:
        opt, _ = _option(s)
        if opt == p.OPT_STRUCTURED_REPLY:
            s.sendall(p.option_reply(opt, p.REP_ACK))
        elif opt == p.OPT_SET_META_CONTEXT:
            s.sendall(p.option_reply(opt, p.REP_META_CONTEXT,
                                     struct.pack(">I", 1) + p.BASE_ALLOCATION.encode()))
            s.sendall(p.option_reply(opt, p.REP_ACK))
        elif opt == p.OPT_GO:
            info = p.option_reply(opt, p.REP_INFO, p.info_export(
                MiB, p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_TRIM))
            for _ in range(go_replies):
                s.sendall(info)
            s.sendall(p.option_reply(opt, p.REP_ACK))
            return


def _request(s: socket.socket) -> tuple[int, int, int, int]:
    _, _, cmd, cookie, offset, length = p.REQUEST.unpack(_recv(s, p.REQUEST.size))
    return cmd, cookie, offset, length


def _hostile_read(reply: Callable[[int, int, int], bytes]) -> Callable[[socket.socket], None]:
    """A script: handshake, then answer the first request with reply(cookie, offset,
    length), then wait for the client to go."""
    def script(s: socket.socket) -> None:
        _to_transmission(s)
        _, cookie, offset, length = _request(s)
        s.sendall(reply(cookie, offset, length))
        while s.recv(65536):
            pass
    return script


def _chunk(cookie: int, rtype: int, payload: bytes, done: bool = True,
           length: int | None = None) -> bytes:
    return p.structured_header(cookie, rtype, len(payload) if length is None else length,
                               done) + payload


HOSTILE_READS = {
    "bad reply magic": lambda ck, o, n: struct.pack(">IIQ", 0xDEADBEEF, 0, ck),
    "unknown cookie": lambda ck, o, n: _chunk(ck + 1000, p.REPLY_TYPE_OFFSET_DATA,
                                              struct.pack(">Q", o) + bytes(n)),
    "a 1 GiB data chunk for 4 KiB": lambda ck, o, n: _chunk(
        ck, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o), length=1 << 30),
    "data outside the request": lambda ck, o, n: _chunk(
        ck, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o + n) + bytes(n)),
    "overlapping chunks": lambda ck, o, n: _chunk(
        ck, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o) + bytes(n // 2), done=False)
        + _chunk(ck, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o) + bytes(n // 2)),
    "a gap and DONE": lambda ck, o, n: _chunk(
        ck, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o) + bytes(n // 2)),
    "an error message longer than its chunk": lambda ck, o, n: _chunk(
        ck, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.EIO, 4000) + b"x" * 10),
    "a simple reply to a structured READ": lambda ck, o, n: p.simple_reply(ck),
    "an unknown chunk type": lambda ck, o, n: _chunk(ck, 77, b""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_READS))
def test_a_hostile_read_reply_is_a_clean_error(case: str) -> None:
    with _Hostile(_hostile_read(HOSTILE_READS[case])) as h:
        c = NbdClient.connect("127.0.0.1", h.port, "x", tls=None, timeout=T, io_timeout=T)
        tracemalloc.start()
        start = time.monotonic()
        try:
            with pytest.raises(NbdProtocolError):
                c.pread(0, 4096)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert time.monotonic() - start < T / 2        # no waiting for a timeout
        assert peak < MiB                               # nothing sized by the server
        assert c.closed
        with pytest.raises(ConnectionError):
            c.pread(0, 4096)
        c.close()


def test_an_error_chunk_is_an_oserror_and_the_connection_goes_on() -> None:
    def script(s: socket.socket) -> None:
        _to_transmission(s)
        _, ck, _, _ = _request(s)
        s.sendall(_chunk(ck, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.EPERM, 4) + b"nope"))
        _, ck, _, _ = _request(s)   # an error value proto.md does not define
        s.sendall(p.simple_reply(ck, 9999))
        _, ck, o, n = _request(s)
        s.sendall(_chunk(ck, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE.pack(o, n)))
        _, ck, o, n = _request(s)
        s.sendall(_chunk(ck, p.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, n * 4, 0)))
        while s.recv(65536):
            pass

    with _Hostile(script) as h, NbdClient.connect("127.0.0.1", h.port, "x", tls=None,
                                                  timeout=T) as c:
        with pytest.raises(PermissionError, match="nope"):
            c.pread(0, 4096)
        with pytest.raises(OSError) as e:
            c.flush()
        assert e.value.errno == errno.EINVAL   # proto.md: unknown values are EINVAL
        assert c.pread(8192, 4096) == bytes(4096)   # a hole chunk
        # an extent past the request is cut to it
        assert c.block_status(0, 1000) == [(0, 1000, 0)]
    assert h.errors == []


@pytest.mark.parametrize("case", ["bad greeting", "oldstyle", "endless INFO"])
def test_a_hostile_handshake_is_a_clean_error(case: str) -> None:
    def script(s: socket.socket) -> None:
        if case == "bad greeting":
            s.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        elif case == "oldstyle":
            s.sendall(struct.pack(">QQ", p.NBDMAGIC, p.OLDSTYLE_MAGIC) + bytes(136))
        else:
            _to_transmission(s, go_replies=1000)
        s.recv(1)

    with _Hostile(script) as h:
        start = time.monotonic()
        with pytest.raises(NbdProtocolError):
            NbdClient.connect("127.0.0.1", h.port, "x", tls=None, timeout=T)
        assert time.monotonic() - start < T / 2


def test_silence_is_a_timeout_not_a_hang() -> None:
    """A server that greets nobody: connect gives up at its time limit; one that never
    answers a request: the request gives up at io_timeout and the connection closes."""
    with _Hostile(lambda s: s.recv(1)) as h:
        start = time.monotonic()
        with pytest.raises(NbdTimeout):
            NbdClient.connect("127.0.0.1", h.port, "x", tls=None, timeout=0.5)
        assert 0.4 < time.monotonic() - start < 3

    def mute(s: socket.socket) -> None:
        _to_transmission(s)
        _request(s)
        s.recv(1)

    with _Hostile(mute) as h:
        c = NbdClient.connect("127.0.0.1", h.port, "x", tls=None, timeout=T, io_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(NbdTimeout):
            c.pread(0, 4096)
        assert time.monotonic() - start < 3 and c.closed
        c.close()


def test_close_wakes_a_thread_waiting_for_a_reply() -> None:
    def mute(s: socket.socket) -> None:
        _to_transmission(s)
        _request(s)
        s.recv(1)

    with _Hostile(mute) as h:
        c = NbdClient.connect("127.0.0.1", h.port, "x", tls=None, timeout=T, io_timeout=60)
        got: list[BaseException] = []

        def reader() -> None:
            try:
                c.pread(0, 4096)
            except BaseException as e:   # noqa: BLE001 - looked at below
                got.append(e)

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)   # the reader is waiting in recv by now
        start = time.monotonic()
        c.close()
        t.join(5)
        assert not t.is_alive() and time.monotonic() - start < 5
        assert len(got) == 1 and isinstance(got[0], ConnectionError)
        assert "closed by the client" in str(got[0])


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)

