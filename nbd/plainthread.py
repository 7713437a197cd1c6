"""A plain-text connection's transmission phase read by a thread of its own (issue 15:
plain 4K randread at queue depth 1; docs/network.md, "The plain-text thread").

Why: at QD1 what was left of a request's time on the trio loop was the wait itself --
trio's wait_readable (an epoll_ctl to re-arm, the loop's epoll_wait, one scheduler pass)
before the read(2). A thread blocked in poll(2) on the socket is woken by the kernel
directly, and holds no GIL while it sleeps.

What the thread does: it waits in poll(2), reads request headers into the connection's
buffer (Conn.buf) and answers a READ itself when that READ is alone in the buffer
(nothing pipelined behind it), needs none of the loop's refusals, and the page cache
holds its data (Pool.read_cached: preadv2 RWF_NOWAIT): the reply is one writev(2),
under Conn.wire. Anything else it hands to the trio loop and waits (trio.from_thread.run
of serve_batch, the header still in the buffer): writes and their barrier, FLUSH, TRIM,
WRITE_ZEROES, BLOCK_STATUS, a READ that must wait for the disk (a worker thread, as
before), a changed array or masking, errors, DISC, pipelined requests -- each with its
one implementation (RequestLoop._one_request), in request order. The loop then keeps
the connection, serving it as it serves a TLS one, until BACK_AFTER READs in a row came
alone: a stream of writes or a pipelining client (nbdcopy) costs one hand-off, not one
per request. The loop and the thread never read the socket at the same time.

Who writes to the socket: the thread (its READ replies) and trio tasks (every other
reply, the replies of reads done in worker threads); Conn.wire, a threading.Lock, keeps
replies whole. The thread holds it for one writev; if the socket takes only part of the
reply (the client does not read), trio sends the rest (Conn.send_tail) while the thread
holds the lock and waits. A trio sender never blocks the loop on it (Conn.send).

How it ends: DISC, EOF, a socket or protocol error end the thread; what it raises is
the connection's end, as for the trio loop (RequestLoop._transmission). When the
connection's task is cancelled (the daemon stops) the waker task shuts the socket down
(SHUT_RDWR), which wakes the thread's poll with an EOF, and a hand-off in progress is
cancelled with the task (trio runs it in that task's context). The connection's stream
is closed only after the thread has returned.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from typing import TYPE_CHECKING

import trio

from . import protocol as p
from .connection import RECEIVE_SIZE, Closed, Conn

if TYPE_CHECKING:
    from .transmission import CachedReader, Reader, RequestLoop, Served

# a connection handed to the trio loop comes back to its thread after this many READs in
# a row with nothing behind them (a client at queue depth 1 again)
BACK_AFTER = 4


async def run(loop: RequestLoop, c: Conn, s: Served, inline: CachedReader,
              threaded: Reader) -> None:
    """The connection's requests, read by a thread of its own (_serve), until it ends;
    runs in the connection's task, inside the nursery of its reads in flight."""
    from .transmission import INLINE_MAX
    c.wire = threading.Lock()
    ended = trio.Event()

    async def waker() -> None:
        try:
            await ended.wait()
        finally:   # cancelled (the daemon stops): wake the thread out of its poll
            if not ended.is_set():
                with contextlib.suppress(OSError):
                    c.stream.socket.shutdown(socket.SHUT_RDWR)

    f = s.flight
    assert f.nursery is not None
    f.nursery.start_soon(waker)
    try:   # (never abandoned when cancelled: the waker makes it return)
        await trio.to_thread.run_sync(_serve, loop, c, s, inline, threaded, INLINE_MAX,
                                      limiter=trio.CapacityLimiter(1),
                                      thread_name=f"nbd {c.peer}")
    finally:
        ended.set()


async def serve_batch(loop: RequestLoop, c: Conn, s: Served, inline: CachedReader,
                      threaded: Reader) -> bool:
    """On the trio loop, for the thread: serve the request whose header is buffered and
    the ones after it, as the loop always did, until BACK_AFTER READs in a row came
    alone (nothing behind them in the buffer): then the connection is the thread's
    again. A stream of writes, and a client that pipelines (nbdcopy), stay on the loop:
    one hand-off, not one per request; True after DISC."""
    alone = 0
    while True:
        cmd = await loop._one_request(c, s, inline, threaded)
        if cmd == p.CMD_DISC:
            return True
        if c.buf or cmd != p.CMD_READ:
            alone = 0
            continue
        alone += 1
        if alone >= BACK_AFTER:
            return False


def _serve(loop: RequestLoop, c: Conn, s: Served, inline: CachedReader, threaded: Reader,
          inline_max: int) -> None:
    """The connection's requests until it ends (in a thread: trio.to_thread.run_sync);
    returns after DISC, raises Closed or the loop's exception otherwise."""
    fd, buf, wire = c.fd, c.buf, c.wire
    assert wire is not None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    size, unpack_from = p.REQUEST.size, p.REQUEST.unpack_from
    state, from_trio = loop._state, trio.from_thread.run
    key, structured, head_of = s.export.key, c.structured, p.read_reply_head
    while True:
        while len(buf) < size:
            # wait first: at QD1 the next request is hardly ever there yet, and a read
            # that fails costs more (EAGAIN and its exception) than a poll that does not
            poller.poll()   # (the GIL is free; shutdown(2) wakes it too)
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as e:   # reset by the peer, ...
                raise Closed(f"{c.peer}: {e.strerror}") from None
            if not data:
                raise Closed(f"{c.peer}: connection closed")
            buf += data
        magic, flags, cmd, cookie, offset, length = unpack_from(buf)
        # (the loop's hot-path checks; a READ failing any of them is the loop's)
        if cmd == p.CMD_READ and len(buf) == size and magic == p.REQUEST_MAGIC \
                and not flags & ~p.CMD_FLAG_DF and length <= inline_max \
                and offset + length <= s.size and s.seen == state():
            try:
                got = inline(key, offset, length)
            except Exception:   # noqa: BLE001 - the loop tries again and answers why
                got = None
            if got is not None and s.seen != state():
                got = None   # changed meanwhile (the name another LUN's?): the loop's
            if got is not None:
                del buf[:size]
                if len(got) < length:   # shrunk meanwhile: zeros (as _reply_read)
                    got += bytes(length - len(got))
                head = head_of(structured, cookie, offset, length)
                with wire:
                    try:
                        sent = os.writev(fd, (head, got))
                    except BlockingIOError:
                        sent = 0
                    except OSError as e:   # EPIPE, ECONNRESET: the peer is gone
                        raise Closed(f"{c.peer}: {e.strerror}") from None
                    if sent < len(head) + len(got):
                        from_trio(c.send_tail, sent, head, got)
                continue
        # anything else, or requests pipelined behind this one: the trio loop's
        if from_trio(serve_batch, loop, c, s, inline, threaded):
            return

