"""A plain-text connection's transmission phase in a thread of its own (issue 15's plain
4K randread at QD1): the thread sleeps in poll(2) on the socket -- woken by the kernel
directly, no epoll re-arm and no pass of trio's scheduler, the GIL free while it sleeps --
reads the request headers, answers the READs the page cache holds itself
(Pool.read_cached, one writev), and hands every other request to the trio loop's
RequestLoop._one_request (trio.from_thread.run), waiting for it: writes and their
barrier, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, reads that wait for the disk, a changed
array or masking, DISC, errors -- one implementation of each, in request order, as before.

Who writes to the socket: the thread (its READ replies) and trio tasks (every other
reply, the replies of reads done in worker threads). Conn.wire, a threading.Lock, keeps
replies whole between them: the thread takes it around its writev; a trio sender takes
it without blocking the loop (Conn.send). A reply the socket does not take at once (the
client does not read) is finished by trio (Conn.send_tail) while the thread holds the
lock and waits.

How it ends (docs/network.md, "The plain-text thread"): DISC, the client closing (EOF),
an error of the socket or the protocol end the thread, whose return or exception is the
connection's as in the trio loop. When trio cancels the connection (the daemon
stopping), the waker task in the connection's nursery shuts the socket down
(SHUT_RDWR), which wakes the thread's poll (EOF); a hand-off in progress is cancelled
with the connection's task (trio runs it in that task's context).
"""

from __future__ import annotations

import os
import select
from typing import TYPE_CHECKING

import trio

from . import protocol as p
from .connection import RECEIVE_SIZE, Closed, Conn

if TYPE_CHECKING:
    from .transmission import CachedReader, Reader, RequestLoop, Served

_REQUEST = p.REQUEST
_SIMPLE = p.SIMPLE_REPLY


def serve(loop: RequestLoop, c: Conn, s: Served, inline: CachedReader,
          threaded: Reader, inline_max: int, data_chunk: object) -> None:
    """The connection's request loop, run in a thread (trio.to_thread.run_sync)."""
    from .transmission import _DATA_CHUNK
    fd = c.fd
    buf = c.buf
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    size = _REQUEST.size
    unpack_from = _REQUEST.unpack_from
    state = loop._state
    from_trio = trio.from_thread.run
    batch = loop._serve_batch
    wire = c.wire
    assert wire is not None
    key = s.export.key
    structured = c.structured
    while True:
        while len(buf) < size:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                poller.poll()   # the GIL is free; shutdown(2) wakes it too
                continue
            except OSError as e:
                raise Closed(f"{c.peer}: {e.strerror}") from None
            if not data:
                raise Closed(f"{c.peer}: connection closed")
            buf += data
        magic, flags, cmd, cookie, offset, length = unpack_from(buf)
        if cmd == p.CMD_READ and len(buf) == size and magic == p.REQUEST_MAGIC \
                and not flags & ~p.CMD_FLAG_DF and length <= inline_max \
                and offset + length <= s.size and s.seen == state():
            try:
                data = inline(key, offset, length)
            except Exception:   # noqa: BLE001 - trio's path answers it (errno mapping)
                data = None
            if data is not None:
                del buf[:size]
                if len(data) < length:
                    data += bytes(length - len(data))
                if structured:
                    head = _DATA_CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                            p.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length,
                                            offset)
                else:
                    head = _SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie)
                with wire:
                    try:
                        sent = os.writev(fd, (head, data))
                    except BlockingIOError:
                        sent = 0
                    except OSError as e:
                        raise Closed(f"{c.peer}: {e.strerror}") from None
                    if sent < len(head) + len(data):
                        from_trio(c.send_tail, sent, head, data)
                continue
        # everything else: the trio loop's one implementation, the header still in buf
        pipelined = len(buf) > size + (length if cmd == p.CMD_WRITE else 0)
        if from_trio(batch, c, s, inline, threaded, pipelined):
            return
