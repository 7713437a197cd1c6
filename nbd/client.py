"""Our NBD client: the data path of host mode (issue 16), where a host's daemon serves its
FUSE mount from LUNs of a remote array's NBD port. Synchronous and thread-safe; the
protocol's numbers and structures are nbd/protocol.py's, as for the server.

    c = NbdClient.connect("array.example", 10809, "volumes/db",
                          tls=nbd.tls.client_context(DIR), timeout=10)
    data = c.pread(0, 4096); c.pwrite(b"x" * 4096, 8192, fua=False); c.flush()
    c.close()

Handshake (nbd/handshake.py): fixed newstyle, STARTTLS when a TLS context is given
(never on in plain text if the server does not agree), STRUCTURED_REPLY,
SET_META_CONTEXT base:allocation, GO with NBD_INFO_BLOCK_SIZE; one deadline for all of
it (`timeout`).

Concurrency -- one request at a time per connection, NbdPool for more (nbd/pool.py):
each command takes the connection's lock, sends its request and reads its whole reply in
the calling thread. No reader thread, no hand-off: at queue depth 1 the caller is woken
by the kernel, not by another Python thread. Measured on this 2-core machine over
loopback against our server (NbdServer over a Pool of random data, in a process of its
own), plain text, 3 s per figure, medians of 5 interleaved runs (another session's
tests shared the cores: single runs varied by +-40 %):

                                    4 KiB random reads/s   1 MiB sequential MiB/s
    NbdClient, 1 thread                    11,500                  1,450
    NbdPool(2), 2 threads                  12,600                  1,480
    pipelined prototype, 1 thread           8,500                  1,440
    pipelined prototype, 2 threads         12,100                  1,480
    (2 threads sharing one NbdClient: 8,100 and 1,390, medians of 8 other runs)

The prototype (a sender lock, one reader thread dispatching replies by cookie to
waiting threads through an Event) pays a thread hand-off per reply: 26 % of the 4 KiB
rate at queue depth 1, the host daemon's common case, and it gains nothing at 2 threads
over two connections. Large reads are bound by copies and the server either way.
(The script and the prototype were throwaway: NbdClient.connect, then threads calling
pread for 3 s; the prototype reused the connection's socket after the handshake.)

Our server answers a connection's READs that wait for the disk in worker threads, in
parallel, and everything else in order on one trio loop (docs/network.md, "Requests in
flight"): a request pipelined on one connection saves the wait between a reply and the
next request, which a second connection saves as well. Two connections also keep one
slow request (a FLUSH behind the diff area's fdatasync) from holding up reads. The server
limits connections per host address (nbd.server.MAX_PER_PEER, 16): keep pools small.

Errors: a server's error reply is an OSError with its errno (NBD_EPERM -> EPERM, ...,
an unknown value -> EINVAL as proto.md asks; ESHUTDOWN arrives as BrokenPipeError, and
then we disconnect as proto.md requires). Anything that leaves the stream in an unknown
state -- EOF, a reset, a timeout, a reply that breaks the protocol -- closes the
connection and raises ConnectionError (NbdProtocolError, NbdTimeout); every later call
raises ConnectionError too. Hostile replies: every length is bounded by what was asked
before anything is read or allocated for it (a READ chunk by the request's length, a
BLOCK_STATUS chunk by proto.md's 2^20 descriptors, messages by 4096 bytes, option
replies by 64 KiB, the number of chunks and option replies too).
"""

from __future__ import annotations

import contextlib
import errno
import io
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

from . import protocol as p
from .handshake import (
    ExportInfo,
    ExportProperties,
    HandshakeError,
    NbdProtocolError,
    NbdTimeout,
    NoSuchExport,
    _Handshake,
)

__all__ = ["ExportInfo", "HandshakeError", "NbdClient", "NbdProtocolError", "NbdTimeout",
           "NoSuchExport"]

MAX_EFFECT = 1 << 30                  # TRIM / WRITE_ZEROES / BLOCK_STATUS per request
MAX_ERROR_CHUNKS = 64                 # error chunks in one structured reply
MAX_STATUS_CHUNK = 4 + p.BLOCK_DESCRIPTOR.size * p.MAX_STATUS_DESCRIPTORS
MAX_ERROR_CHUNK = p.ERROR_CHUNK_HEAD.size + p.MAX_NAME + 64   # message + a few fields
ONE_SEND = 256 << 10                  # a WRITE up to this size goes out in one send(2)
_R = TypeVar("_R")


class _Answer(Exception):
    """A server's error reply, read to its end: the connection goes on; the caller gets
    `error`."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _server_error(value: int, what: str, message: str = "") -> _Answer:
    code = p.wire_errno(value)
    text = f"{what}: {message}" if message else what
    return _Answer(OSError(code, f"{errno.errorcode.get(code, code)} from the NBD "
                                 f"server: {text}"))


def _check_range(offset: int, length: int, align: int) -> None:
    if offset < 0 or length < 0 or offset + length > 1 << 63:
        raise OSError(errno.EINVAL, f"bad range {offset}+{length}")
    if align > 1 and (offset % align or length % align):
        raise OSError(errno.EINVAL, f"{offset}+{length} is not aligned to the export's "
                                    f"minimum block size {align}")


class NbdClient(ExportProperties):
    """One NBD connection to one export; commands from any thread, one at a time."""

    def __init__(self, sock: socket.socket, info: ExportInfo, where: str,
                 io_timeout: float | None) -> None:
        self.info = info
        self.where = where
        self.dirty = False        # written since the last FLUSH (NbdPool's flush uses it)
        self._sock = sock
        self._rfile = cast(io.BufferedReader, sock.makefile("rb", buffering=1 << 16))
        self._io_timeout = io_timeout
        self._lock = threading.Lock()
        self._cookie = 0
        self._closed: str | None = None   # why, once closed
        self._closing = False             # close() shut the socket under a request
        sock.settimeout(io_timeout)

    @classmethod
    def connect(cls, host: str, port: int, export: str, *, tls: ssl.SSLContext | None,
                timeout: float, io_timeout: float | None = 120.0,
                server_hostname: str | None = None, block_status: bool = True
                ) -> NbdClient:
        """Connect and open `export`. `timeout` bounds the whole handshake; `io_timeout`
        (None: none) bounds each reply later -- generous by default, as a FLUSH waits
        for the array's disks. `server_hostname`: the name the server's certificate must
        carry (default: `host`)."""
        where = f"{host}:{port}"
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as e:
            raise NbdTimeout(f"{where}: no TCP connection in {timeout} s") from e
        except ConnectionError:
            raise
        except OSError as e:
            raise ConnectionError(f"{where}: {e.strerror or e}") from e
        # requests are small and each waits for its reply: never let Nagle hold one
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls._open(sock, where, deadline, host, export, tls, timeout, io_timeout,
                         server_hostname, block_status)

    @classmethod
    def connect_unix(cls, path: str, export: str, *, timeout: float,
                     io_timeout: float | None = 120.0, block_status: bool = True
                     ) -> NbdClient:
        """The same over a Unix socket, plain text (qemu-nbd -k PATH, nbdkit -U PATH):
        `shadowplex backup` writes its qcow2 images through qemu-nbd this way."""
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError as e:
            sock.close()
            raise NbdTimeout(f"{path}: no connection in {timeout} s") from e
        except OSError as e:
            sock.close()
            raise ConnectionError(f"{path}: {e.strerror or e}") from e
        return cls._open(sock, path, deadline, "localhost", export, None, timeout,
                         io_timeout, None, block_status)

    @classmethod
    def _open(cls, sock: socket.socket, where: str, deadline: float, host: str,
              export: str, tls: ssl.SSLContext | None, timeout: float,
              io_timeout: float | None, server_hostname: str | None, block_status: bool
              ) -> NbdClient:
        h = _Handshake(sock, where, deadline)
        try:
            info = h.run(host, export, tls, server_hostname, block_status)
            return cls(h.sock, info, where, io_timeout)
        except BaseException as e:
            h.sock.close()
            if isinstance(e, TimeoutError) and not isinstance(e, NbdTimeout):
                raise NbdTimeout(f"{where}: the NBD handshake did not finish in "
                                 f"{timeout} s") from e
            if isinstance(e, OSError) and not isinstance(e, ConnectionError):
                raise ConnectionError(f"{where}: NBD handshake: {e}") from e
            raise

    # -- plumbing -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _call(self, fn: Callable[..., _R], *args: object) -> _R:
        """Run one exchange under the lock; anything but a clean reply closes the
        connection (its position in the stream is unknown)."""
        with self._lock:
            if self._closed is not None:
                raise ConnectionError(f"{self.where} {self.info.name}: connection closed "
                                      f"({self._closed})")
            try:
                return fn(*args)
            except _Answer as a:
                if a.error.errno == errno.ESHUTDOWN:   # proto.md: disconnect softly now
                    self._shut("the server is shutting down", soft=True)
                raise a.error from None
            except OSError as e:
                self._shut(str(e) or type(e).__name__)
                if self._closing:
                    raise ConnectionError(f"{self.where} {self.info.name}: closed by "
                                          "the client during the request") from e
                if isinstance(e, ConnectionError):
                    raise
                if isinstance(e, TimeoutError):
                    raise NbdTimeout(f"{self.where} {self.info.name}: no reply in "
                                     f"{self._io_timeout} s; connection closed") from e
                raise ConnectionError(f"{self.where} {self.info.name}: {e}") from e
            except BaseException as e:
                self._shut(f"{type(e).__name__}: {e}")
                raise

    def _shut(self, why: str, soft: bool = False) -> None:
        self._closed = why
        if soft:
            with contextlib.suppress(OSError):
                self._sock.sendall(p.request(p.CMD_DISC, 0, 0, 0))
        self._rfile.close()
        self._sock.close()

    def _recv(self, n: int) -> bytes:
        data = self._rfile.read(n)
        if len(data) != n:
            raise ConnectionError(f"{self.where}: the server closed the connection")
        return data

    def _recv_into(self, view: memoryview) -> None:
        while view:
            got = self._rfile.readinto(view)
            if not got:
                raise ConnectionError(f"{self.where}: the server closed the connection")
            view = view[got:]

    def _send(self, cmd: int, offset: int, length: int, flags: int = 0,
              payload: bytes | memoryview = b"") -> int:
        self._cookie += 1
        head = p.request(cmd, self._cookie, offset, length, flags)
        if len(payload) <= ONE_SEND:   # one send(2): on loopback every call wakes the reader
            self._sock.sendall(head + bytes(payload) if payload else head)
        else:
            self._sock.sendall(head)
            self._sock.sendall(payload)
        return self._cookie

    def _header(self, cookie: int) -> tuple[int, int, int] | int:
        """The next reply's header: (flags, type, length) of a structured chunk, or a
        simple reply's error value (an int)."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, got = p.SIMPLE_REPLY_REST.unpack(self._recv(p.SIMPLE_REPLY_REST.size))
            result: tuple[int, int, int] | int = error
        elif magic == p.STRUCTURED_REPLY_MAGIC and self.info.structured:
            flags, rtype, got, length = p.STRUCTURED_REPLY_REST.unpack(
                self._recv(p.STRUCTURED_REPLY_REST.size))
            result = (flags, rtype, length)
        else:
            raise NbdProtocolError(f"{self.where}: bad reply magic {magic:#x}")
        if got != cookie:   # one request at a time: any other cookie is unknown
            raise NbdProtocolError(f"{self.where}: reply for cookie {got}, expected {cookie}")
        return result

    def _error_chunk(self, rtype: int, length: int, what: str) -> _Answer:
        fixed = 8 if rtype == p.REPLY_TYPE_ERROR_OFFSET else 0
        head = p.ERROR_CHUNK_HEAD.size
        if not head + fixed <= length <= MAX_ERROR_CHUNK:
            raise NbdProtocolError(f"{self.where}: error chunk of {length} bytes")
        data = self._recv(length)
        value, mlen = p.ERROR_CHUNK_HEAD.unpack_from(data)
        if value == 0 or head + mlen + fixed > length:
            raise NbdProtocolError(f"{self.where}: malformed error chunk")
        return _server_error(value, what, data[head:head + mlen].decode(errors="replace"))

    def _chunks(self, cookie: int, what: str, on_chunk: Callable[[int, int], None]
                ) -> None:
        """Read one reply to its end; raise _Answer if it was an error. Structured:
        error chunks are collected (at most MAX_ERROR_CHUNKS), NONE ends it, every other
        chunk goes to on_chunk(type, length), which reads its payload or raises (and
        bounds how many there can be: each takes some of what was asked)."""
        error: _Answer | None = None
        errors = 0
        while True:
            h = self._header(cookie)
            if isinstance(h, int):   # a simple reply: the whole answer
                if h:
                    raise _server_error(h, what)
                return
            flags, rtype, length = h
            if rtype & 0x8000:   # proto.md: any type with bit 15 is an error chunk
                errors += 1
                if errors > MAX_ERROR_CHUNKS:
                    raise NbdProtocolError(f"{self.where}: endless error chunks")
                error = error or self._error_chunk(rtype, length, what)
            elif rtype == p.REPLY_TYPE_NONE:
                if length or not flags & p.REPLY_FLAG_DONE:
                    raise NbdProtocolError(f"{self.where}: bad NONE chunk")
            else:
                on_chunk(rtype, length)
            if flags & p.REPLY_FLAG_DONE:
                if error is not None:
                    raise error
                return

    @staticmethod
    def _no_content(rtype: int, _length: int) -> None:
        raise NbdProtocolError(f"unexpected reply chunk type {rtype} to a command without "
                               "data")

    def _simple_command(self, cmd: int, offset: int, length: int, flags: int = 0,
                        payload: bytes | memoryview = b"") -> None:
        cookie = self._send(cmd, offset, length, flags, payload)
        if cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            self.dirty = True
        self._chunks(cookie, f"{p.CMD_NAMES[cmd]} {offset}+{length} of {self.info.name}",
                     self._no_content)

    # -- commands -----------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (requests above the maximum payload are split)."""
        _check_range(offset, length, self.info.min_block)
        if not length:
            return b""
        step = self._step(self.info.max_payload)
        parts = [self._call(self._read, pos, min(step, offset + length - pos))
                 for pos in range(offset, offset + length, step)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _step(self, limit: int) -> int:
        return limit - limit % self.info.min_block

    def _read(self, offset: int, length: int) -> bytes:
        cookie = self._send(p.CMD_READ, offset, length)
        what = f"READ {offset}+{length} of {self.info.name}"
        if not self.info.structured:
            h = self._header(cookie)
            assert isinstance(h, int)   # structured chunks are refused by _header
            if h:
                raise _server_error(h, what)
            return self._recv(length)
        whole: list[bytes] = []
        buf: bytearray | None = None
        pieces: list[tuple[int, int]] = []   # (start, end) within the request
        room = [length]                       # bytes not yet claimed by any chunk

        def chunk(rtype: int, n: int) -> None:
            nonlocal buf
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                if not 9 <= n <= 8 + room[0]:
                    raise NbdProtocolError(f"{self.where}: data chunk of {n} bytes for "
                                           f"{room[0]} left of {what}")
                (start,) = struct.unpack(">Q", self._recv(8))
                size = n - 8
            elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
                if n != p.OFFSET_HOLE.size:
                    raise NbdProtocolError(f"{self.where}: hole chunk of {n} bytes")
                start, size = p.OFFSET_HOLE.unpack(self._recv(n))
            else:
                raise NbdProtocolError(f"{self.where}: chunk type {rtype} in a READ reply")
            rel = start - offset
            if size == 0 or rel < 0 or rel + size > length or size > room[0]:
                raise NbdProtocolError(f"{self.where}: chunk {start}+{size} outside {what}")
            room[0] -= size
            pieces.append((rel, rel + size))
            if rtype == p.REPLY_TYPE_OFFSET_HOLE:
                return   # the buffer is zeros already
            if size == length:   # the usual reply: one chunk, read without a copy
                whole.append(self._recv(size))
                return
            if buf is None:
                buf = bytearray(length)
            self._recv_into(memoryview(buf)[rel:rel + size])

        self._chunks(cookie, what, chunk)
        pieces.sort()
        if room[0] or any(a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
            raise NbdProtocolError(f"{self.where}: the reply to {what} does not cover it "
                                   "exactly once")
        return whole[0] if whole else bytes(buf if buf is not None else length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False
               ) -> int:
        """Write `data` at `offset`; fua: durable when it returns (FUA, or a FLUSH after
        if the server has no FUA). Returns len(data)."""
        view = memoryview(data).cast("B")
        _check_range(offset, len(view), self.info.min_block)
        step = self._step(self.info.max_payload)
        flags = p.CMD_FLAG_FUA if fua and self.can_fua else 0
        for pos in range(0, len(view), step):
            piece = view[pos:pos + step]
            self._call(self._simple_command, p.CMD_WRITE, offset + pos, len(piece), flags,
                       piece)
        if fua and not flags:
            self.flush()
        return len(view)

    def flush(self) -> None:
        """Every write answered before is durable (a no-op if the server has no FLUSH:
        proto.md's servers without SEND_FLUSH have no volatile cache to flush)."""
        if self.can_flush:
            self._call(self._flush)

    def _flush(self) -> None:
        self.dirty = False   # under the lock: a write answered later sets it again
        self._simple_command(p.CMD_FLUSH, 0, 0)

    def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: a hint; the range's content is undefined after (use zero() to
        read zeros). EPERM on a read-only export, EOPNOTSUPP without SEND_TRIM."""
        self._effect(p.CMD_TRIM, offset, length, 0, self.can_trim)

    def zero(self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
             ) -> None:
        """The range reads as zeros after (WRITE_ZEROES; no_hole: keep it allocated).
        A server without WRITE_ZEROES gets writes of zeros."""
        if not self.can_write_zeroes and not self.read_only:
            _check_range(offset, length, self.info.min_block)
            step = self._step(min(self.info.max_payload, 4 << 20))
            zeros = bytes(min(step, length))
            for pos in range(offset, offset + length, step):
                self.pwrite(memoryview(zeros)[:min(step, offset + length - pos)], pos)
            if fua:
                self.flush()
            return
        flags = (p.CMD_FLAG_NO_HOLE if no_hole else 0) | \
            (p.CMD_FLAG_FUA if fua and self.can_fua else 0)
        self._effect(p.CMD_WRITE_ZEROES, offset, length, flags, self.can_write_zeroes)
        if fua and not self.can_fua:
            self.flush()

    def _effect(self, cmd: int, offset: int, length: int, flags: int, allowed: bool
                ) -> None:
        _check_range(offset, length, self.info.min_block)
        if self.read_only:
            raise OSError(errno.EPERM, f"{self.info.name} is read-only")
        if not allowed:   # proto.md: the client MUST NOT send it then
            raise OSError(errno.EOPNOTSUPP, f"{self.where} does not support "
                                            f"{p.CMD_NAMES[cmd]}")
        step = self._step(MAX_EFFECT)
        for pos in range(offset, offset + length, step):
            self._call(self._simple_command, cmd, pos, min(step, offset + length - pos),
                       flags)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """base:allocation of [offset, offset+length): (offset, length, flags) extents,
        in order, covering the range exactly (flags: p.STATE_HOLE | p.STATE_ZERO).
        EOPNOTSUPP if the server did not agree to base:allocation."""
        _check_range(offset, length, 1)
        if self.info.status_context is None:
            raise OSError(errno.EOPNOTSUPP, f"{self.where}: no base:allocation context "
                                            f"for {self.info.name}")
        out: list[tuple[int, int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            for n, flags in self._call(self._status, pos, min(MAX_EFFECT, end - pos)):
                n = min(n, end - pos)   # the last extent may run past what was asked
                if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n, flags)
                else:
                    out.append((pos, n, flags))
                pos += n
        return out

    def _status(self, offset: int, length: int) -> list[tuple[int, int]]:
        cookie = self._send(p.CMD_BLOCK_STATUS, offset, length)
        what = f"BLOCK_STATUS {offset}+{length} of {self.info.name}"
        got: list[tuple[int, int]] = []

        def chunk(rtype: int, n: int) -> None:
            if rtype != p.REPLY_TYPE_BLOCK_STATUS or got or n < 12 or (n - 4) % 8 \
                    or n > MAX_STATUS_CHUNK:
                raise NbdProtocolError(f"{self.where}: bad chunk (type {rtype}, {n} "
                                       f"bytes) in the reply to {what}")
            data = self._recv(n)
            (context,) = struct.unpack_from(">I", data)
            if context != self.info.status_context:
                raise NbdProtocolError(f"{self.where}: status of unknown context {context}")
            got.extend(p.BLOCK_DESCRIPTOR.iter_unpack(memoryview(data)[4:]))
            if any(n == 0 for n, _ in got):
                raise NbdProtocolError(f"{self.where}: empty extent in the reply to {what}")

        self._chunks(cookie, what, chunk)
        if not got:
            raise NbdProtocolError(f"{self.where}: no status in the reply to {what}")
        return got

    def close(self) -> None:
        """NBD_CMD_DISC, then close. A thread waiting for a reply meanwhile gets a
        ConnectionError (its socket is shut down under it)."""
        if not self._lock.acquire(blocking=False):
            self._closing = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._lock.acquire()
        try:
            if self._closed is None:
                self._shut("closed by the client", soft=True)
        finally:
            self._lock.release()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
