"""NbdPool: a few NbdClient connections to one export, for callers in several threads
(the host daemon's FUSE workers). nbd/client.py's docstring says why connections rather
than pipelining on one.

    pool = NbdPool(lambda: NbdClient.connect(host, port, "volumes/db", tls=ctx,
                                             timeout=10), size=2)
    pool.pread(0, 4096); pool.pwrite(data, 0); pool.flush(); pool.close()

Each command takes an idle connection (the most recently used: one thread keeps reusing
one warm connection), opening another while fewer than `size` are open, else waits for
one. The first is opened by the constructor, so a wrong export or certificate is an
error there, and `info` (size, flags, block sizes) is known from the start.

A connection that breaks (ConnectionError) is dropped; the command that saw it raises,
and a later command opens a new one (connect_fn may then raise NoSuchExport, if the
export is gone). Commands are not retried here: whether a write may be repeated is the
caller's call.

FLUSH: with CAN_MULTI_CONN (our server, nbdkit) one connection's FLUSH covers every
write any connection had answered; without it (qemu-nbd on a writable export) every
connection written since its last FLUSH is flushed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .client import ExportProperties, NbdClient


class NbdPool(ExportProperties):
    def __init__(self, connect_fn: Callable[[], NbdClient], size: int) -> None:
        if size < 1:
            raise ValueError("an NbdPool needs at least one connection")
        self._connect = connect_fn
        self._size = size
        self._cond = threading.Condition()
        first = connect_fn()
        self.info = first.info
        self._all: list[NbdClient] = [first]     # open, idle or in use
        self._idle: list[NbdClient] = [first]
        self._opening = 0
        self._closed = False

    @property
    def connections(self) -> int:
        return len(self._all)

    def _take(self) -> NbdClient:
        with self._cond:
            while True:
                if self._closed:
                    raise ConnectionError(f"NBD pool of {self.info.name} is closed")
                while self._idle:
                    c = self._idle.pop()
                    if not c.closed:
                        return c
                    self._all.remove(c)   # broken under a flush() of another thread
                if len(self._all) + self._opening < self._size:
                    self._opening += 1
                    break
                self._cond.wait()
        try:
            c = self._connect()   # outside the lock: a handshake takes a round trip or more
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._opening -= 1
            self._all.append(c)
        return c

    def _give(self, c: NbdClient) -> None:
        with self._cond:
            if c.closed:
                if c in self._all:
                    self._all.remove(c)
            elif self._closed:
                self._all.remove(c)
                c.close()
            else:
                self._idle.append(c)
            self._cond.notify()

    @contextmanager
    def _one(self) -> Iterator[NbdClient]:
        c = self._take()
        try:
            yield c
        finally:
            self._give(c)

    def pread(self, offset: int, length: int) -> bytes:
        with self._one() as c:
            return c.pread(offset, length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False
               ) -> int:
        with self._one() as c:
            return c.pwrite(data, offset, fua)

    def trim(self, offset: int, length: int) -> None:
        with self._one() as c:
            c.trim(offset, length)

    def zero(self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
             ) -> None:
        with self._one() as c:
            c.zero(offset, length, no_hole=no_hole, fua=fua)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        with self._one() as c:
            return c.block_status(offset, length)

    def flush(self) -> None:
        if self.can_multi_conn:
            with self._one() as c:
                c.flush()
            return
        # NbdClient is thread-safe: a connection in use by another thread is flushed
        # after its current request, which is what FLUSH promises (writes answered
        # before it)
        with self._cond:
            written = [c for c in self._all if c.dirty]
        for c in written:
            c.flush()

    def close(self) -> None:
        """Close the idle connections now, the busy ones when their command ends."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            for c in idle:
                self._all.remove(c)
            self._cond.notify_all()
        for c in idle:
            c.close()

    def __enter__(self) -> NbdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
