"""One NBD connection's byte stream as the server reads and writes it: trio's stream
(plain TCP, then maybe TLS).

Moved out of nbd/server.py as it was (the split along its seams).
"""

from __future__ import annotations

import trio

RECEIVE_SIZE = 65536   # bytes asked of the kernel at once (pipelined requests come along)
# small reads in one send: on loopback each send(2) also delivers to the reader and wakes
# it, so two of them (header, data) cost more than copying the data once (4K random
# reads at QD1: ~40 % of the request's time was the second send); big ones in two (the
# copy would cost more than the second call)
JOIN_UP_TO = 256 << 10


class Closed(Exception):
    """The peer closed the connection (or must be disconnected): stop quietly."""


class Conn:
    """One client connection: its stream, what has been received but not consumed, and
    the state the handshake negotiated."""

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.buf = bytearray()
        self.host: str | None = None
        self.tls = False
        self.structured = False
        # (export name, the contexts selected for it: (id, name)) by SET_META_CONTEXT
        self.meta: tuple[str, tuple[tuple[int, str], ...]] | None = None

    def start_tls(self, stream: trio.SSLStream) -> None:
        """From now on the connection is `stream` (TLS over the plain one)."""
        self.stream, self.tls = stream, True

    async def recv_exactly(self, n: int) -> bytes:
        buf = self.buf
        if len(buf) >= n:
            out = bytes(buf[:n])
            del buf[:n]
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

    async def _receive(self, size: int) -> bytes:
        data = await self.stream.receive_some(size)
        if not data:
            raise Closed(f"{self.peer}: connection closed")
        return data

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send parts in order: a reply's header and its payload."""
        if len(parts) == 1:
            await self.stream.send_all(parts[0])
        elif sum(len(x) for x in parts) <= JOIN_UP_TO:
            await self.stream.send_all(b"".join(parts))
        else:   # a big payload: not copied to join a small header
            for x in parts:
                await self.stream.send_all(x)
