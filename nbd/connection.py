"""One NBD connection's byte stream as the server reads and writes it: the client's TCP
socket, in plain text or (after NBD_OPT_STARTTLS) TLS, driven by hand on the socket's
descriptor and going through trio only to wait.

Why by hand: each call of trio's SocketStream ends in a scheduler pass (receive_some and
send_all finish with a cancel-shielded checkpoint when the system call did not block),
and a pass costs an epoll_wait and the scheduler's bookkeeping. A 4 KiB read at queue
depth 1 made two of them besides the one that waits for the request: about a third of
our server's CPU time per request (docs/network.md, "Where the time goes"). trio's
SSLStream is worse for big requests: one pass per receive_some, which hands out one TLS
record (16 KiB of plaintext) at a time, and a socket read of at most 32 KiB per refill:
a 1 MiB WRITE took ~64 passes and ~32 reads, and was joined from its pieces.

So the server reads with read(2)/readv(2) and answers with one writev(2) on the socket's
descriptor (trio made it non-blocking). trio is used only to wait:
trio.lowlevel.wait_readable when nothing is there, the stream's send_all for what the
socket did not take at once (a big reply's tail). At queue depth 1 the next request
header is waited for at once (recv_request), after polling briefly (_polled).

TLS is an ssl.SSLObject over two ssl.MemoryBIOs, on the same descriptor (start_tls runs
the handshake that way too, so nothing read for the handshake is left in another
object): what the socket has is read into the incoming BIO (up to TLS_READ at once),
whole requests are decrypted out of it -- a WRITE's payload straight into the bytearray
handed to the array, record by record -- and a reply is encrypted into the outgoing BIO
and written with one write(2). What OpenSSL has to say by itself (a warning alert; its
answer to a KeyUpdate goes before its next record) leaves with the next reply, or before
the connection waits.

Fairness and cancellation: a client that keeps the socket readable (pipelining) would
never let the task yield; every YIELD_EVERY receives that did not wait take a scheduler
pass (a trio checkpoint), so the daemon's other tasks (the FUSE session, the control
socket) go on and a cancelled daemon stops within that many requests. Waiting for the
next request is a checkpoint anyway.
"""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import threading
import time
from socket import SHUT_RDWR
from typing import cast

import trio

YIELD_EVERY = 32       # receives without a wait between two scheduler passes
# polling for the next request while requests stream (_polled); 0: never
# (docs/network.md, "Where the time goes"; SHADOWPLEX_NBD_POLL_US, 0-1000, for measuring)


def _poll_ns(text: str, default_us: float = 50.0) -> int:
    try:
        us = float(text)
    except ValueError:   # not a number: the default (an environment knob, not an input)
        us = default_us
    return int(min(max(us, 0.0), 1000.0) * 1000)


POLL_NS = _poll_ns(os.environ.get("SHADOWPLEX_NBD_POLL_US", "50"))
POLL_RECENT_NS = 2_000_000
RECEIVE_SIZE = 65536   # bytes asked of the kernel at once (pipelined requests come along)
# a payload at least this much beyond what is buffered is read (or decrypted) straight
# into the bytearray it is handed over in, not joined from pieces
READ_INTO_FROM = 16384
# TLS: ciphertext read from the socket at once (one buffer per TLS connection, reused)
TLS_READ = 256 << 10
# TLS: a reply's header and payload are one record when they fit in one (a second record
# costs more than copying a small payload); a bigger payload is its own records
TLS_JOIN_UP_TO = 16384
# TLS: a reply is encrypted and sent in pieces of this much (a 32 MiB READ is not held
# twice over in the outgoing BIO and its copy)
TLS_SEND_PIECE = 1 << 20


class Closed(Exception):
    """The peer closed the connection (or must be disconnected): stop quietly."""


class Conn:
    """One client connection: its stream, what has been received but not consumed, and
    the state the handshake negotiated."""

    def __init__(self, stream: trio.SocketStream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.buf = bytearray()   # plaintext received, not consumed yet
        self.fd = stream.socket.fileno()
        self._steps = 0
        self._waits = 0       # reads that found nothing and waited
        self._idle = False    # the last request header had to be waited for
        self._last = 0        # when the last request header came (perf_counter_ns)
        self._poller: select.poll | None = None
        # TLS (start_tls): the session and its BIOs, the buffer ciphertext is read into
        self.sslobj: ssl.SSLObject | None = None
        self._in = self._out = ssl.MemoryBIO()
        self._scratch = memoryview(bytearray())
        # only the holder writes to the socket (replies come from several tasks: reads
        # answered from worker threads); it also sends what OpenSSL wrote by itself
        # meanwhile (an alert, a KeyUpdate's answer) before letting go (send)
        self.sending = trio.Lock()
        # set while a thread serves the connection (nbd/plainthread.py): it writes
        # replies too; every reply is written whole under this lock
        self.wire: threading.Lock | None = None
        # the one worker thread a trio sender waits for the wire lock in (send)
        self._wire_waiter = trio.CapacityLimiter(1)
        self.host: str | None = None
        self.tls = False
        self.structured = False
        # (export name, the contexts selected for it: (id, name)) by SET_META_CONTEXT
        self.meta: tuple[str, tuple[tuple[int, str], ...]] | None = None

    # -- TLS ------------------------------------------------------------------------------
    async def start_tls(self, context: ssl.SSLContext) -> None:
        """The server's side of a TLS handshake on the socket; from now on every byte
        goes through it. Raises Closed (naming why) when the handshake fails: the alert
        OpenSSL made for the client (an unknown CA, say) is sent first."""
        assert not self.buf, "plaintext received before the TLS handshake"
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._scratch = memoryview(bytearray(TLS_READ))
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                try:
                    if self._out.pending:
                        await self._write(self._out.read())
                    await self._fill()
                except Closed as e:
                    raise Closed(f"{self.peer}: TLS handshake failed: {e}") from None
            except ssl.SSLError as e:
                self._say_goodbye()
                raise Closed(f"{self.peer}: TLS handshake failed: {e}") from None
        if self._out.pending:
            await self._write(self._out.read())
        self.sslobj, self.tls = obj, True

    def _say_goodbye(self) -> None:
        """Best effort, never waiting: send what OpenSSL left in the outgoing BIO (the
        alert that tells the client why)."""
        if self.sending.locked():   # not into the middle of another task's record
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, self._out.read())

    def _tls_pending(self) -> bool:
        """TLS bytes already off the socket: plaintext OpenSSL decrypted and holds, or
        ciphertext in the incoming BIO (a whole record, perhaps several requests)."""
        obj = self.sslobj
        return obj is not None and (self._in.pending > 0 or obj.pending() > 0)

    async def _fill(self) -> None:
        """Read what the socket has (waiting when it has nothing) into the incoming BIO.
        What OpenSSL has to send by itself (a warning alert) goes out before the wait:
        the peer may wait for it."""
        fd = self.fd
        try:
            n = os.readv(fd, (self._scratch,))
        except BlockingIOError:   # nothing there yet: wait (the usual case at QD1)
            if self._out.pending and not self.sending.locked():   # (else: the sender's)
                self.sending.acquire_nowait()
                try:
                    await self._write(self._out.read())
                finally:
                    self.sending.release()
            n = await self._wait_and_readv(fd, self._scratch)
        except OSError as e:   # reset by the peer, ...
            raise Closed(f"{self.peer}: {e.strerror}") from None
        else:
            await self._served_one()
        if not n:
            raise Closed(f"{self.peer}: connection closed")
        self._in.write(self._scratch[:n])

    def _tls_error(self, e: ssl.SSLError) -> Closed:
        """A record that does not decrypt, a fatal alert from the peer, ...: the
        connection ends (OpenSSL's alert to the peer, if it made one, is sent)."""
        self._say_goodbye()
        return Closed(f"{self.peer}: TLS: {e.reason or e}")

    # -- receiving ------------------------------------------------------------------------
    async def recv_request(self, n: int) -> bytes:
        """recv_exactly for a request header. A client at queue depth 1 sends its next
        request only after our reply, so it is almost never there yet: after a header
        that had to be waited for, wait for the next one at once instead of trying a
        read that fails (EAGAIN and its exception: ~10 us on the busy 2-core machine);
        once requests come pipelined (more than one in a read), try first again."""
        if self._idle and len(self.buf) < n and not self._tls_pending():
            if self._polled():
                await self._served_one()
            else:
                self._steps = 0
                await trio.lowlevel.wait_readable(self.fd)   # a checkpoint: cancellable
            self._last = time.perf_counter_ns()
            out = await self.recv_exactly(n)
            if len(self.buf) >= n or self._tls_pending():   # another came along: pipelined
                self._idle = False
            return out
        waits = self._waits
        out = await self.recv_exactly(n)
        self._idle = self._waits != waits
        return out

    async def _served_one(self) -> None:
        """Count a request or read served without waiting; every YIELD_EVERY of them,
        one scheduler pass (a pipelining client must not starve the daemon)."""
        self._steps += 1
        if self._steps >= YIELD_EVERY:
            self._steps = 0
            await trio.lowlevel.checkpoint()

    def _polled(self) -> bool:
        """Whether the next request came within POLL_NS, polling the socket while
        requests stream (the last came less than POLL_RECENT_NS ago) -- the FUSE
        session's polling (fuse_mount/session.py) for the same reason: at queue depth 1
        the next request follows our reply by a few tens of microseconds, and sleeping
        in epoll and being woken costs more than that here. Idle, it never spins."""
        if not POLL_NS:
            return False
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        poll = self._poller.poll
        now = time.perf_counter_ns()
        if now - self._last >= POLL_RECENT_NS:
            return False
        deadline = now + POLL_NS
        while time.perf_counter_ns() < deadline:
            if poll(0):
                return True
        return False

    async def recv_exactly(self, n: int) -> bytes:
        """The next n bytes of plaintext (a request header, an option's data)."""
        buf = self.buf
        if len(buf) >= n:
            out = bytes(buf[:n])
            del buf[:n]
            await self._served_one()
            return out
        while len(buf) < n:
            buf += await self._receive(RECEIVE_SIZE)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def recv_payload(self, n: int) -> bytes | memoryview:
        """A WRITE's n bytes. Beyond READ_INTO_FROM of them still to come, read (or
        decrypted) straight into one bytearray -- no piece is copied again to join them --
        and handed over as a memoryview of it."""
        have = len(self.buf)
        if n - have < READ_INTO_FROM:
            return await self.recv_exactly(n)
        view = memoryview(bytearray(n))
        view[:have] = self.buf
        self.buf.clear()
        while have < n:
            have += await self._receive_into(view[have:])
        return view

    async def _receive(self, size: int) -> bytes:
        """Some plaintext (at least one byte, at most size: one TLS record's at most)."""
        obj = self.sslobj
        if obj is not None:
            while True:
                if self._in.pending or obj.pending():
                    try:
                        data = obj.read(size)
                    except ssl.SSLWantReadError:   # a record's start only: read on
                        data = None
                    except ssl.SSLError as e:
                        raise self._tls_error(e) from None
                    if data is not None:
                        if not data:   # close_notify
                            raise Closed(f"{self.peer}: connection closed (TLS)")
                        await self._served_one()
                        return data
                await self._fill()
        fd = self.fd
        try:
            data = os.read(fd, size)
        except BlockingIOError:   # nothing there yet: wait (the usual case at QD1)
            data = await self._wait_and_read(fd, size)
        except OSError as e:   # reset by the peer, ...
            raise Closed(f"{self.peer}: {e.strerror}") from None
        else:
            await self._served_one()
        if not data:
            raise Closed(f"{self.peer}: connection closed")
        return data

    async def _receive_into(self, into: memoryview) -> int:
        """Some plaintext into `into` (at least one byte); how much."""
        obj = self.sslobj
        if obj is not None:
            while True:
                if self._in.pending or obj.pending():
                    try:   # (given a buffer, read returns a count: typeshed says bytes)
                        n = cast(int, obj.read(len(into), into))
                    except ssl.SSLWantReadError:
                        n = -1
                    except ssl.SSLError as e:
                        raise self._tls_error(e) from None
                    if n == 0:
                        raise Closed(f"{self.peer}: connection closed (TLS)")
                    if n > 0:   # (no yield per record: _fill counts the socket reads)
                        return n
                await self._fill()
        fd = self.fd
        try:
            n = os.readv(fd, (into,))
        except BlockingIOError:
            n = await self._wait_and_readv(fd, into)
        except OSError as e:
            raise Closed(f"{self.peer}: {e.strerror}") from None
        else:
            await self._served_one()
        if not n:
            raise Closed(f"{self.peer}: connection closed")
        return n

    async def _wait_and_read(self, fd: int, size: int) -> bytes:
        self._steps = 0
        self._waits += 1
        while True:
            await trio.lowlevel.wait_readable(fd)   # a checkpoint: cancellable
            try:
                return os.read(fd, size)
            except BlockingIOError:
                continue
            except OSError as e:
                raise Closed(f"{self.peer}: {e.strerror}") from None

    async def _wait_and_readv(self, fd: int, into: memoryview) -> int:
        self._steps = 0
        self._waits += 1
        while True:
            await trio.lowlevel.wait_readable(fd)   # a checkpoint: cancellable
            try:
                return os.readv(fd, (into,))
            except BlockingIOError:
                continue
            except OSError as e:
                raise Closed(f"{self.peer}: {e.strerror}") from None

    # -- sending --------------------------------------------------------------------------
    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send parts in order: a reply's header and its payload without joining them
        (in plain text; TLS joins them into one record when they fit in one). Whole:
        under the sending lock, which is let go only once what OpenSSL wrote by itself
        meanwhile is sent too (the receiving task leaves it to the holder: _fill)."""
        lock = self.sending
        try:
            lock.acquire_nowait()   # (the usual case: no scheduler pass)
        except trio.WouldBlock:
            await lock.acquire()
        try:
            wire = self.wire
            if wire is None:
                await self._send_locked(parts)
                while self._out.pending:
                    await self._write(self._out.read())
                return
            if not wire.acquire(blocking=False):
                # the thread holds it for one writev, or while trio sends the rest of
                # its reply to a client that does not read (for as long as that
                # client likes): wait in a worker thread of the connection's own, not
                # on the loop (polling it cost a scheduler pass per ms). Shielded: a
                # cancelled wait would leave the lock taken by nobody; the thread lets
                # go once its own send is cancelled with the connection.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(wire.acquire, limiter=self._wire_waiter)
            whole = False
            try:
                await self._write(*parts)
                whole = True
            finally:
                if not whole:
                    # cut mid-reply (cancelled, the peer gone): nothing may follow it
                    # on the wire, or the thread's next reply lands inside it (the
                    # client would take its bytes for the rest of this one)
                    with contextlib.suppress(OSError):
                        self.stream.socket.shutdown(SHUT_RDWR)
                wire.release()
        finally:
            lock.release()

    async def send_tail(self, sent: int, *parts: bytes | bytearray | memoryview) -> None:
        """The rest of a reply whose first `sent` bytes one writev took, through trio
        (which waits for room): _write's, and the thread's serving the connection (it
        holds the wire lock meanwhile)."""
        for x in parts:
            if sent >= len(x):
                sent -= len(x)
                continue
            await self.stream.send_all(memoryview(x)[sent:])
            sent = 0

    async def _send_locked(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        obj = self.sslobj
        if obj is None:
            await self._write(*parts)
            return
        try:
            if len(parts) > 1 and sum(len(x) for x in parts) <= TLS_JOIN_UP_TO:
                obj.write(b"".join(parts))
            else:
                for x in parts:
                    view = memoryview(x)
                    for at in range(0, len(view), TLS_SEND_PIECE):
                        obj.write(view[at:at + TLS_SEND_PIECE])
                        if len(view) - at > TLS_SEND_PIECE:   # more to come: this first
                            await self._write(self._out.read())
        except ssl.SSLError as e:
            raise self._tls_error(e) from None
        await self._write(self._out.read())

    async def _write(self, *parts: bytes | bytearray | memoryview) -> None:
        """One writev(2); what the socket did not take at once goes through trio (which
        waits for room). Replies may be sent by other tasks than the one receiving
        (send keeps them whole with the sending lock); meanwhile nothing else may be
        written: _fill leaves what OpenSSL wrote by itself in the outgoing BIO for the
        lock's holder."""
        try:
            sent = os.writev(self.fd, parts)
        except BlockingIOError:
            sent = 0
        except OSError as e:   # EPIPE, ECONNRESET: the peer is gone
            raise Closed(f"{self.peer}: {e.strerror}") from None
        await self.send_tail(sent, *parts)
