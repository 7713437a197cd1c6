"""The copy of `shadowplex backup` (tools/backup.py): extents of a snapshot read over the
array's NBD port and written to the image, STREAMS blocks in flight.

Why several in flight: one block at a time leaves every party idle in turn -- the
array's server reads its pool file (from disk when cold) while we and the image's
writer wait, then we write the block (qemu-nbd: a qcow2 cluster allocation and a page
cache copy) while the server waits. With STREAMS workers, each with its own connection
to the array (an NbdPool) and, for a qcow2, to qemu-nbd (`--shared`), the server reads
the next blocks while the previous ones are written. Our client is one request at a
time per connection by design (nbd/client.py says why), so streams are connections.

Each worker copies one piece of at most BLOCK bytes: for an incremental backup it asks
the piece's allocation first (BLOCK_STATUS base:allocation: a hole is zeroed, not read),
then reads the data, writes it (all-zero blocks: skipped in a full backup, which starts
as zeros; zeroed in an incremental, so the base's old data does not show through). The
main thread hands out pieces, keeps at most 2 x STREAMS of them queued (memory: that
many BLOCKs) and adds up the statistics and the progress as pieces complete. A failure
in any worker stops the copy: the pieces not started are cancelled, the ones running
end with their request, and the error is raised to the caller (which removes the
image).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from nbd import protocol as p

from .output import Progress

BLOCK = 4 << 20              # bytes per read/write request
ZEROS = bytes(BLOCK)
STREAMS = 4                  # blocks in flight: connections to the array (and qemu-nbd)


class Source(Protocol):
    """What the copy reads: nbd.client.NbdClient or nbd.pool.NbdPool."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int]]: ...


class Target(Protocol):
    """What the copy writes (tools/backup.py: RawTarget, Qcow2Target); thread-safe."""

    def write(self, offset: int, data: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0      # data written to the target
    bytes_zeroed: int = 0       # ranges the target was told read as zeros (incremental)
    extents: int = 0            # extents copied (changed extents, or allocated runs)
    started: float = field(default_factory=time.monotonic)

    def add(self, other: Stats) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.bytes_zeroed += other.bytes_zeroed


def pieces(extents: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Each extent cut into pieces of at most BLOCK bytes, in order."""
    for off, length in extents:
        for at in range(off, off + length, BLOCK):
            yield at, min(BLOCK, off + length - at)


def copy_piece(src: Source, target: Target, offset: int, length: int, incremental: bool
               ) -> Stats:
    """One piece: holes (asked only for an incremental: a full backup's pieces are
    allocated runs already) and data, as the module docstring says."""
    got = Stats()
    status = src.block_status(offset, length) if incremental else [(offset, length, 0)]
    for pos, n, flags in status:
        if flags & p.STATE_HOLE:
            if incremental:
                target.zero(pos, n)
                got.bytes_zeroed += n
            continue
        data = src.pread(pos, n)
        got.bytes_read += n
        if data == (ZEROS if n == BLOCK else bytes(n)):
            if incremental:
                target.zero(pos, n)
                got.bytes_zeroed += n
        else:
            target.write(pos, data)
            got.bytes_written += n
    return got


def copy_extents(src: Source, target: Target, extents: list[tuple[int, int]],
                 incremental: bool, stats: Stats, progress: Progress,
                 streams: int = STREAMS) -> None:
    """Copy each (offset, length) of ``extents`` from src to target, ``streams`` pieces
    at a time (src and target must take that many callers at once)."""
    stats.extents += len(extents)
    queued: deque[tuple[int, Future[Stats]]] = deque()

    def done_one() -> None:
        n, fut = queued.popleft()
        stats.add(fut.result())
        progress.advance(n)

    pool = ThreadPoolExecutor(max(1, streams), thread_name_prefix="backup-copy")
    try:
        for off, n in pieces(extents):
            queued.append((n, pool.submit(copy_piece, src, target, off, n, incremental)))
            while len(queued) >= 2 * streams or (queued and queued[0][1].done()):
                done_one()
        while queued:
            done_one()
    finally:
        # a failure (or Ctrl-C): nothing new starts; the running pieces end with their
        # request (each is at most one BLOCK) before the caller aborts the target
        pool.shutdown(wait=True, cancel_futures=True)


def allocated(src: Source) -> list[tuple[int, int]]:
    """The data extents of the whole export (base:allocation)."""
    return [(o, n) for o, n, f in src.block_status(0, src.size) if not f & p.STATE_HOLE] \
        if src.size else []
