"""One NBD connection's byte stream as the server reads and writes it: trio's stream
(plain TCP, then maybe TLS), with a fast path for plain TCP.

Why the fast path: each call of trio's SocketStream ends in a scheduler pass
(receive_some and send_all finish with a cancel-shielded checkpoint when the system call
did not block), and a pass costs an epoll_wait and the scheduler's bookkeeping. A 4 KiB
read at queue depth 1 made two of them besides the one that waits for the request:
about a third of our server's CPU time per request (docs/network.md, "Where the time
goes").
On plain TCP the server therefore reads with read(2) and writes header and payload with
one writev(2) on the socket's descriptor (trio made it non-blocking), and goes through
trio only to wait: trio.lowlevel.wait_readable when nothing is there, the stream's
send_all for what the socket did not take at once (a big read's payload). At queue
depth 1 the next request header is waited for at once (recv_request). TLS goes through
trio's SSLStream as before (its record layer needs it).

Fairness and cancellation: a client that keeps the socket readable (pipelining) would
never let the task yield; every YIELD_EVERY receives that did not wait take a scheduler
pass (a trio checkpoint), so the daemon's other tasks (the FUSE session, the control
socket) go on and a cancelled daemon stops within that many requests. Waiting for the
next request is a checkpoint anyway.
"""

from __future__ import annotations

import os
import select
import time

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
# TLS: header and payload joined into one record up to this much (a second record costs
# more than copying a small payload); beyond it sent as they are
JOIN_TLS_UP_TO = 256 << 10


class Closed(Exception):
    """The peer closed the connection (or must be disconnected): stop quietly."""


class Conn:
    """One client connection: its stream, what has been received but not consumed, and
    the state the handshake negotiated."""

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.buf = bytearray()
        # the socket's descriptor while the stream is plain TCP (-1: go through trio)
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._steps = 0
        self._waits = 0       # reads that found nothing and waited
        self._idle = False    # the last request header had to be waited for
        self._last = 0        # when the last request header came (perf_counter_ns)
        self._poller: select.poll | None = None
        self.host: str | None = None
        self.tls = False
        self.structured = False
        # (export name, the contexts selected for it: (id, name)) by SET_META_CONTEXT
        self.meta: tuple[str, tuple[tuple[int, str], ...]] | None = None

    def start_tls(self, stream: trio.SSLStream) -> None:
        """From now on the connection is `stream` (TLS over the plain one)."""
        self.stream, self.tls, self.fd = stream, True, -1

    async def recv_request(self, n: int) -> bytes:
        """recv_exactly for a request header. A client at queue depth 1 sends its next
        request only after our reply, so it is almost never there yet: after a header
        that had to be waited for, wait for the next one at once instead of trying a
        read that fails (EAGAIN and its exception: ~10 us on the busy 2-core machine);
        once requests come pipelined (more than one in a read), try first again."""
        if self._idle and self.fd >= 0 and len(self.buf) < n:
            if self._polled():
                self._steps += 1
                if self._steps >= YIELD_EVERY:
                    self._steps = 0
                    await trio.lowlevel.checkpoint()
            else:
                self._steps = 0
                await trio.lowlevel.wait_readable(self.fd)   # a checkpoint: cancellable
            self._last = time.perf_counter_ns()
            out = await self.recv_exactly(n)
            if len(self.buf) >= n:   # another request came along: pipelined
                self._idle = False
            return out
        waits = self._waits
        out = await self.recv_exactly(n)
        self._idle = self._waits != waits
        return out

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
        buf = self.buf
        if len(buf) >= n:
            out = bytes(buf[:n])
            del buf[:n]
            self._steps += 1
            if self._steps >= YIELD_EVERY:
                self._steps = 0
                await trio.lowlevel.checkpoint()
            return out
        # a payload: its pieces joined once (no growing buffer copied and shifted again)
        parts: list[bytes | bytearray] = [bytes(buf)]
        have = len(buf)
        buf.clear()
        while have < n:
            data = await self._receive(max(RECEIVE_SIZE, n - have))
            parts.append(data)
            have += len(data)
        out = b"".join(parts)
        if have > n:   # the start of the next request
            buf += out[n:]
            out = out[:n]
        return out

    async def _receive(self, size: int) -> bytes | bytearray:
        fd = self.fd
        if fd < 0:
            data = await self.stream.receive_some(size)
        else:
            try:
                data = os.read(fd, size)
            except BlockingIOError:   # nothing there yet: wait (the usual case at QD1)
                data = await self._wait_and_read(fd, size)
            except OSError as e:   # reset by the peer, ...
                raise Closed(f"{self.peer}: {e.strerror}") from None
            else:
                self._steps += 1
                if self._steps >= YIELD_EVERY:
                    self._steps = 0
                    await trio.lowlevel.checkpoint()
        if not data:
            raise Closed(f"{self.peer}: connection closed")
        return data

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

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send parts in order: a reply's header and its payload without joining them."""
        fd = self.fd
        if fd < 0:
            if len(parts) == 1:
                await self.stream.send_all(parts[0])
            elif sum(len(x) for x in parts) <= JOIN_TLS_UP_TO:
                await self.stream.send_all(b"".join(parts))
            else:   # a big payload: not copied to join a small header
                for x in parts:
                    await self.stream.send_all(x)
            return
        try:
            sent = os.writev(fd, parts)
        except BlockingIOError:
            sent = 0
        except OSError as e:   # EPIPE, ECONNRESET: the peer is gone
            raise Closed(f"{self.peer}: {e.strerror}") from None
        for x in parts:   # what the socket did not take at once: trio waits for room
            if sent >= len(x):
                sent -= len(x)
                continue
            await self.stream.send_all(memoryview(x)[sent:])
            sent = 0
