"""The NBD port's transmission phase: one connection's request loop, after the handshake
(nbd/server.py) has opened an export -- READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
BLOCK_STATUS (base:allocation and qemu:dirty-bitmap), DISC -- and the replies.

Reads run in parallel, everything else in order (docs/network.md, "Requests in
flight"). A READ of up to INLINE_MAX is first tried on the daemon's trio loop from the
page cache only (Pool.read_cached: preadv2 RWF_NOWAIT), as the FUSE handlers read: at
queue depth 1 a cached read costs no thread hand-off. One that would wait for the disk,
or a larger one, goes to a worker thread (Pool.read_unlocked: the preads outside the
pool lock; a store that says `blocking_io`, RBD or a remote array, reads every time in
a thread) and its reply goes out when it is done, by its cookie, while the loop goes
on with the next requests: READ_THREADS threads for the whole server, at most
MAX_READS_IN_FLIGHT reads and MAX_READ_BYTES_IN_FLIGHT bytes of them per connection
and MAX_BUFFERED_BYTES of them and of WRITE payloads over all connections
(MemoryBudget); at a limit the loop stops taking requests off the socket until a read
is answered or a write done. Replies never interleave: each is sent whole under the
connection's send lock.

WRITE, TRIM, WRITE_ZEROES, FLUSH and BLOCK_STATUS are done by the loop itself, one at a
time in request order, as before: a write is in the array before its reply, so a FLUSH
covers every write replied to before it (reads in flight change nothing). Writes, trims
and zeroes pass the WriteBarrier exactly like FUSE writes: while the coordinator holds a
volume (flush & hold) they wait -- and with them the connection's later requests -- so
a snapshot set is one instant across FUSE and NBD writers; reads in flight never hold a
hold up. FLUSH and FUA wait for the disk in a worker thread, like the mount's fsync.
DISC answers the reads in flight before the connection closes (proto.md); a client
gone, a protocol error or the daemon stopping cancel them (a thread's pread is not
interrupted: it ends, its reply is dropped).

Nothing is held across an await but a write's barrier registration and a reply's send
lock, both released in `finally`: a client vanishing mid-request only ends its own
connection's tasks.

A plain-text connection's requests are read by a thread of its own (nbd/plainthread.py),
which answers the cached READs at queue depth 1 itself and hands every other request to
_one_request here; TLS connections are served by _requests on the loop.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import trio

from blockstore.errors import StoreError
from fuse_mount.barrier import WriteBarrier
from fuse_mount.errors import errno_for

from . import plainthread
from . import protocol as p
from .connection import Closed, Conn
from .exports import Export, NbdStore

log = logging.getLogger(__name__)
# a read of (key, offset, length); a cached one says None where it would wait for the disk
Reader = Callable[[str, int, int], "bytes | bytearray"]
CachedReader = Callable[[str, int, int], "bytes | bytearray | None"]

MAX_REQUEST = 32 << 20        # largest READ/WRITE payload (proto.md's usual maximum)
MAX_STATUS_RANGE = 1 << 30    # BLOCK_STATUS answers at most this much per request
MAX_ZERO_PIECE = 32 << 20     # TRIM / WRITE_ZEROES are done in pieces of this much
# reads that wait for the disk (docs/network.md, "Requests in flight"): worker threads
# for the whole server (a disk's queue, not the 2 cores: a pread holds no GIL), and per
# connection the reads and bytes in flight (memory: replies wait whole in memory)
READ_THREADS = 8
# larger reads go to a thread without trying the page cache first: their copy costs more
# than the hand-off, and a RWF_NOWAIT try before the real read of the same range upsets
# the kernel's sequential readahead (docs/network.md, "Requests in flight")
INLINE_MAX = 256 << 10
MAX_READS_IN_FLIGHT = 16
MAX_READ_BYTES_IN_FLIGHT = 64 << 20
# and for the whole server: the bytes of every connection's reads in flight and WRITE
# payloads being received or written (64 connections at their own limits would hold
# 4 GiB of replies and 2 GiB of payloads: authenticated clients could run the daemon
# out of memory); a connection at this limit waits for room (MemoryBudget); at least
# MAX_REQUEST, so that any one request fits
MAX_BUFFERED_BYTES = 256 << 20
# A WRITE's payload must have arrived PAYLOAD_GRACE seconds plus its length at
# PAYLOAD_MIN_RATE after its header, or the connection ends: its buffer is in that budget
# from before it is received, so a client that sends a header and withholds the payload
# would otherwise hold up to 32 MiB of every connection's budget for as long as it likes
# (eight such clients: all of it). A slow link still gets 42 s for a 32 MiB WRITE.
PAYLOAD_GRACE = 10.0
PAYLOAD_MIN_RATE = 1 << 20   # bytes per second
# a plain-text connection's requests are read in a thread of its own (nbd/plainthread.py;
# docs/network.md); SHADOWPLEX_NBD_PLAIN_THREAD=0: on the trio loop like TLS (measuring)
PLAIN_THREAD = os.environ.get("SHADOWPLEX_NBD_PLAIN_THREAD", "1") != "0"
# command flags each command may carry (proto.md: others are EINVAL)
_FLAGS = {p.CMD_READ: p.CMD_FLAG_DF, p.CMD_WRITE: p.CMD_FLAG_FUA, p.CMD_FLUSH: 0,
          p.CMD_TRIM: p.CMD_FLAG_FUA, p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
          p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE, p.CMD_DISC: 0}
_RANGED = frozenset({p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES,
                     p.CMD_BLOCK_STATUS})
_WRITING = frozenset({p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES})
# the client went away while we answered: end the connection quietly
_GONE = (Closed, trio.BrokenResourceError, trio.ClosedResourceError)
DIRTY_BITMAP = "qemu:dirty-bitmap:"   # + a snapshot id: the chunks changed since it
STATE_DIRTY = 1               # qemu:dirty-bitmap's one flag (QEMU's docs/interop/nbd.txt)


@dataclass
class Served:
    """What one connection has opened (set by GO / EXPORT_NAME), and the state of the
    array and the masking when it was last known to be what the host may still open:
    a request after a change of either checks again that the export still names the
    same LUN (naa) for this host, else the connection is closed (a volume deleted and
    created again under its name, or no longer presented to the host)."""

    export: Export
    size: int
    contexts: tuple[tuple[int, str], ...] = ()   # (id, name) SET_META_CONTEXT selected
    seen: tuple[int, int] = (0, 0)   # (store generation, masking changes)
    # a snapshot export's changed extents since each FROM, computed once (both ends are
    # frozen); a volume's are asked for at every BLOCK_STATUS (it changes meanwhile)
    dirty: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    flight: InFlight = field(default_factory=lambda: InFlight())


class MemoryBudget:
    """The bytes of request data in memory over every connection of a server:
    MAX_BUFFERED_BYTES. A READ done in a thread takes its length when admitted and
    gives it back once its reply is sent (the reply waits whole in memory); a WRITE
    takes its length before its payload is received and gives it back once the write
    is done.

    take(n) waits until n more fit, first come first served (a large request is never
    passed over for ever by small ones); one is always let in when nothing is taken. A
    request waiting here holds none of it (its connection's reads already in threads
    keep theirs until answered; a WRITE's payload must arrive in time: PAYLOAD_GRACE),
    and what is taken is given back by the task that took it, in a `finally`: also
    when it ends otherwise (an error reply, the client gone, the connection or the
    daemon cancelled) -- so the budget never leaks, and a waiter never waits on another
    waiter, only on replies being sent and writes being done (docs/network.md,
    "Requests in flight")."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._turn = trio.Lock()   # trio's locks are fair: the waiters' queue, in order
        self._room: trio.Event | None = None

    async def take(self, n: int) -> None:
        if not self._turn.locked() and self.used + n <= self.limit:
            self.used += n   # (the usual case: no scheduler pass)
            return
        async with self._turn:   # cancelled while waiting: nothing was taken
            while self.used and self.used + n > self.limit:
                if self._room is None:
                    self._room = trio.Event()
                await self._room.wait()
            self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        if self._room is not None:
            self._room.set()
            self._room = None


class InFlight:
    """One connection's reads in worker threads (how many, how many bytes) and the
    nursery they run in; `budget`: the server's, shared by every connection. (Replies
    are kept whole by the connection: Conn.send.)"""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self.budget: MemoryBudget | None = None
        self.count = 0
        self.bytes = 0
        self._room: trio.Event | None = None
        self.ended: Exception | None = None   # why the connection ends (a task saw it)

    async def admit(self, n: int) -> None:
        """Wait until one more read of n bytes may be in flight: room in this
        connection's limits, then in the server's budget (only this connection's loop
        admits its reads, and done() only makes room: the first wait still holds)."""
        while self.count >= MAX_READS_IN_FLIGHT or \
                (self.count and self.bytes + n > MAX_READ_BYTES_IN_FLIGHT):
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
        if self.budget is not None:
            await self.budget.take(n)
        self.count += 1
        self.bytes += n

    def done(self, n: int) -> None:
        self.count -= 1
        self.bytes -= n
        if self.budget is not None:
            self.budget.give(n)
        if self._room is not None:
            self._room.set()
            self._room = None


class Refused(Exception):
    """A request answered with an error (the connection goes on)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestLoop:
    """The transmission phase, a part of NbdServer (which provides these members)."""

    store: NbdStore
    barrier: WriteBarrier
    changed: Callable[[str], Awaitable[None]] | None

    def _state(self) -> tuple[int, int]:
        raise NotImplementedError

    def _lookup(self, c: Conn, name: str) -> Export | None:
        raise NotImplementedError

    _read_threads: trio.CapacityLimiter | None = None
    _memory_budget: MemoryBudget | None = None

    async def _transmission(self, c: Conn, s: Served) -> None:
        """The connection's requests until it ends; its reads in flight run in a
        nursery of their own. How it ends is raised after the nursery (not inside an
        exception group): Closed, a protocol error, a broken stream."""
        if self._read_threads is None:
            self._read_threads = trio.CapacityLimiter(READ_THREADS)
        if self._memory_budget is None:
            self._memory_budget = MemoryBudget(MAX_BUFFERED_BYTES)
        f = s.flight
        f.budget = self._memory_budget
        async with trio.open_nursery() as n:
            f.nursery = n
            try:
                inline, threaded = self._readers()
                # (a store with read_cached: the thread never calls a plain store.read,
                # which only the trio thread may)
                if PLAIN_THREAD and not c.tls and inline is not None \
                        and hasattr(self.store, "read_cached"):
                    await plainthread.run(self, c, s, inline, threaded)
                else:
                    await self._requests(c, s)
            except Exception as e:   # noqa: BLE001 - raised below, outside the nursery
                f.ended = f.ended or e
                n.cancel_scope.cancel()   # the reads in flight are not answered
        if f.ended is not None:
            raise f.ended
        raise Closed(f"{c.peer}: disconnect")   # DISC, once the reads in flight answered

    def _readers(self) -> tuple[CachedReader | None, Reader]:
        """How reads are done (see the module's docstring): inline from the page cache,
        else (None) in a thread; or always inline / always in a thread."""
        store = self.store
        if getattr(store, "blocking_io", False):
            return None, store.read
        if hasattr(store, "read_cached") and hasattr(store, "read_unlocked"):
            return store.read_cached, store.read_unlocked
        return store.read, store.read

    async def _requests(self, c: Conn, s: Served) -> None:
        inline, threaded = self._readers()
        one = self._one_request
        while await one(c, s, inline, threaded) != p.CMD_DISC:
            pass

    async def _one_request(self, c: Conn, s: Served, inline: CachedReader | None,
                           threaded: Reader) -> int:
        """Receive and serve one request; its command (CMD_DISC: the connection ends)."""
        magic, flags, cmd, cookie, offset, length = cast(
            "tuple[int, int, int, int, int, int]",
            p.REQUEST.unpack(await c.recv_request(p.REQUEST.size)))
        if magic != p.REQUEST_MAGIC:
            raise p.ProtocolError(f"bad request magic {magic:#x}")
        # the hot path (a 4 KiB read at QD1 costs ~30 us here in all, so a few checks
        # and a coroutine less count): a READ that needs none of _command's refusals
        if cmd == p.CMD_READ and not flags & ~p.CMD_FLAG_DF and length <= MAX_REQUEST \
                and offset + length <= s.size and s.seen == self._state():
            try:
                data = None if inline is None or length > INLINE_MAX else \
                    inline(s.export.key, offset, length)
                if data is not None and s.seen != self._state():
                    # the array changed meanwhile (a worker thread deleted the volume
                    # and made another of its name?): the read is the checked path's
                    data = None
                if data is None:
                    await self._read_later(c, s, threaded, cookie, offset, length)
                else:
                    await self._reply_read(c, s, cookie, offset, length, data)
            except _GONE:
                raise
            except Exception as ex:   # noqa: BLE001 - mapped to an errno, as below
                r = self._refusal(c, s, cmd, ex)
                await self._error(c, s, cookie, r.code, r.message)
            return cmd
        payload: bytes | memoryview = b""
        budget = None
        if cmd == p.CMD_WRITE:
            if length > MAX_REQUEST:   # cannot skip that much safely: disconnect
                raise p.ProtocolError(f"WRITE of {length} bytes")
            # its buffer is in the server's budget from before it is received until
            # the write is done (MemoryBudget)
            budget = s.flight.budget
            if budget is not None:
                await budget.take(length)
        try:
            if cmd == p.CMD_WRITE:
                allowed = PAYLOAD_GRACE + length / PAYLOAD_MIN_RATE
                with trio.move_on_after(allowed) as waited:
                    payload = await c.recv_payload(length)
                if waited.cancelled_caught:
                    raise p.ProtocolError(f"WRITE payload of {length} bytes not "
                                          f"received within {allowed:.0f} s")
            if cmd == p.CMD_DISC:
                return cmd
            try:
                await self._command(c, s, cmd, flags, cookie, offset, length, payload,
                                    inline, threaded)
            except Refused as r:
                await self._error(c, s, cookie, r.code, r.message)
        finally:
            if budget is not None:
                payload = b""
                budget.give(length)
        return cmd

    async def _error(self, c: Conn, s: Served, cookie: int, code: int, message: str
                     ) -> None:
        if c.structured:
            await c.send(p.structured_error(cookie, code, message))
        else:
            await c.send(p.simple_reply(cookie, code))

    async def _command(self, c: Conn, s: Served, cmd: int, flags: int, cookie: int,
                       offset: int, length: int, payload: bytes | memoryview,
                       inline: CachedReader | None = None, threaded: Reader | None = None
                       ) -> None:
        if s.seen != self._state():
            self._still_may_open(c, s)
        e = s.export
        name = p.CMD_NAMES.get(cmd, str(cmd))
        if cmd not in _FLAGS:
            raise Refused(p.EINVAL, f"command {name} is not supported")
        if flags & ~_FLAGS[cmd]:
            raise Refused(p.EINVAL, f"{name} with flags {flags:#x} it does not take")
        if cmd in _RANGED:
            if cmd == p.CMD_READ and length > MAX_REQUEST:
                raise Refused(p.EINVAL, f"{name} of {length} bytes (max {MAX_REQUEST})")
            if offset + length > s.size:
                s.size = int(self.store.lun_size(e.key))   # grown since?
                if offset + length > s.size:
                    raise Refused(p.ENOSPC if cmd == p.CMD_WRITE else p.EINVAL,
                                   f"{name} past the end ({offset}+{length} > {s.size})")
        writing = cmd in _WRITING
        if writing and e.read_only:
            raise Refused(p.EPERM, f"{e.name} is read-only")
        try:
            if cmd == p.CMD_READ:
                data = None if inline is None or length > INLINE_MAX else \
                    inline(e.key, offset, length)
                if data is None:
                    assert threaded is not None
                    await self._read_later(c, s, threaded, cookie, offset, length)
                else:
                    await self._reply_read(c, s, cookie, offset, length, data)
                return
            if cmd == p.CMD_BLOCK_STATUS:
                await self._block_status(c, s, flags, cookie, offset, length)
                return
            if writing:
                await self._write(c, s, cmd, flags, offset, length, payload)
            elif cmd == p.CMD_FLUSH and not e.snapshot:
                await trio.to_thread.run_sync(self.store.flush, e.key)
        except (Refused, *_GONE):
            raise
        except Exception as ex:   # noqa: BLE001 - mapped to an errno
            raise self._refusal(c, s, cmd, ex) from None
        await c.send(p.simple_reply(cookie) if not c.structured else
                     p.structured_header(cookie, p.REPLY_TYPE_NONE, 0, True))

    def _refusal(self, c: Conn, s: Served, cmd: int, ex: Exception) -> Refused:
        """The error reply for a command the array failed (the errno mapping point,
        fuse_mount/errors); EIO is logged as an error, the rest (EPERM, ENOSPC, ...)
        as information."""
        code = errno_for(ex, writing=cmd in _WRITING)
        log.log(logging.ERROR if code == errno.EIO else logging.INFO,
                "nbd: %s %s of %s: %s", c.peer, p.CMD_NAMES.get(cmd, str(cmd)),
                s.export.name, ex)
        return Refused(p.ERRNO_TO_WIRE.get(code, p.EIO), str(ex))

    def _recheck(self, c: Conn, s: Served) -> None:
        """After an await, before using the export's name again (the array reads and
        writes by name): Closed if it now names another LUN."""
        if s.seen != self._state():
            self._still_may_open(c, s)

    def _still_may_open(self, c: Conn, s: Served) -> None:
        """The array or the masking changed since this connection last looked: close it
        unless its export still names the same LUN for its host."""
        now = self._state()
        e = self._lookup(c, s.export.name)
        if e is None or e.naa != s.export.naa or e.key != s.export.key:
            log.warning("nbd: %s (host %s): %s is gone or no longer presented to it; "
                        "disconnected", c.peer, c.host, s.export.name)
            raise Closed(f"{c.peer}: {s.export.name} changed")
        s.seen = now

    async def _read_later(self, c: Conn, s: Served, threaded: Reader, cookie: int,
                          offset: int, length: int) -> None:
        """Start a read in a worker thread (once the connection may have one more in
        flight); its reply goes out when it is done."""
        f = s.flight
        assert f.nursery is not None
        await f.admit(length)
        f.nursery.start_soon(self._read_in_thread, c, s, threaded, cookie, offset, length)

    async def _read_in_thread(self, c: Conn, s: Served, threaded: Reader, cookie: int,
                              offset: int, length: int) -> None:
        f = s.flight
        try:
            try:
                data = await trio.to_thread.run_sync(threaded, s.export.key, offset, length,
                                                     limiter=self._read_threads)
            except Exception as ex:   # noqa: BLE001 - mapped to an errno, as inline
                await trio.lowlevel.checkpoint_if_cancelled()
                r = self._refusal(c, s, p.CMD_READ, ex)
                await self._error(c, s, cookie, r.code, r.message)
                return
            # the connection ended while the thread read (its pread is not interrupted)
            await trio.lowlevel.checkpoint_if_cancelled()
            # the array changed while the thread read: if the export's name now names
            # another LUN (deleted and created again), that read was by name of the new
            # one -- never answered: the connection ends (Closed)
            self._recheck(c, s)
            await self._reply_read(c, s, cookie, offset, length, data)
        except _GONE as e:   # the client went away: the connection ends
            f.ended = f.ended or e
            assert f.nursery is not None
            f.nursery.cancel_scope.cancel()
        finally:
            f.done(length)

    async def _reply_read(self, c: Conn, s: Served, cookie: int, offset: int, length: int,
                          data: bytes | bytearray) -> None:
        if len(data) < length:   # shrunk meanwhile (a revert): zeros, as past a file's end
            data += bytes(length - len(data))
        # (whole, also from a read's own task: Conn.send)
        await c.send(p.read_reply_head(c.structured, cookie, offset, length), data)

    async def _write(self, c: Conn, s: Served, cmd: int, flags: int, offset: int,
                     length: int, payload: bytes | memoryview) -> None:
        key = s.export.key
        barrier = self.barrier
        if barrier.holding(key) is not None:
            await barrier.wait_writable(key)   # (a hold: up to 10 s)
            self._recheck(c, s)
        barrier.begin_write(key)
        try:
            if cmd == p.CMD_WRITE:
                self.store.write(key, offset, payload)
            else:
                # in pieces, the loop going on between them: a 4 GiB TRIM of a volume
                # with a snapshot must not stall every other request for seconds, nor
                # hold all its chunks at once
                zeros = bytes(min(length, MAX_ZERO_PIECE)) \
                    if cmd == p.CMD_WRITE_ZEROES and flags & p.CMD_FLAG_NO_HOLE else None
                for pos in range(offset, offset + length, MAX_ZERO_PIECE):
                    n = min(MAX_ZERO_PIECE, offset + length - pos)
                    if zeros is not None:
                        self.store.write(key, pos, memoryview(zeros)[:n])
                    else:   # TRIM, or zeroes that may be holes: a discard reads as zeros
                        self.store.discard(key, pos, n)
                    await trio.sleep(0)
                    self._recheck(c, s)
        finally:
            barrier.end_write(key)
        if self.changed is not None:
            await self.changed(key)
        if flags & p.CMD_FLAG_FUA:
            await trio.to_thread.run_sync(self.store.flush, key)

    async def _block_status(self, c: Conn, s: Served, flags: int, cookie: int,
                            offset: int, length: int) -> None:
        """One BLOCK_STATUS chunk per selected context (proto.md), the last one DONE."""
        if not (c.structured and s.contexts):
            raise Refused(p.EINVAL, "BLOCK_STATUS needs a metadata context (SET_META_"
                                     "CONTEXT base:allocation or qemu:dirty-bitmap:ID)")
        if length == 0:
            raise Refused(p.EINVAL, "BLOCK_STATUS of 0 bytes")
        end = min(offset + length, offset + MAX_STATUS_RANGE, s.size)
        chunks = []
        for cid, name in s.contexts:
            if name == p.BASE_ALLOCATION:
                extents = self._allocation(s, offset, end)
            else:
                extents = self._dirty(s, name[len(DIRTY_BITMAP):], offset, end)
            if flags & p.CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            chunks.append(struct.pack(">I", cid) + b"".join(
                struct.pack(">II", n, f) for n, f in extents))
        await c.send(b"".join(
            p.structured_header(cookie, p.REPLY_TYPE_BLOCK_STATUS, len(body),
                                i == len(chunks) - 1) + body
            for i, body in enumerate(chunks)))

    def _allocation(self, s: Served, offset: int, end: int) -> list[tuple[int, int]]:
        """base:allocation descriptors (length, flags) covering [offset, end)."""
        runs = self.store.allocation(s.export.key, offset, end - offset)
        extents: list[tuple[int, int]] = []   # (length, flags)
        pos = offset
        for o, n in runs:
            if o > pos:
                extents.append((o - pos, p.STATE_HOLE | p.STATE_ZERO))
            extents.append((o + n - max(o, pos), 0))
            pos = o + n
        if pos < end:
            extents.append((end - pos, p.STATE_HOLE | p.STATE_ZERO))
        return extents

    def _dirty(self, s: Served, from_id: str, offset: int, end: int
               ) -> list[tuple[int, int]]:
        """qemu:dirty-bitmap descriptors covering [offset, end): STATE_DIRTY where a chunk
        changed since FROM (up to the export's snapshot, or now for a volume)."""
        runs = s.dirty.get(from_id)
        if runs is None:
            try:
                runs = self.store.changed_extents(from_id, s.export.key
                                                  if s.export.snapshot else None)
            except StoreError as e:   # FROM deleted (or invalidated) since the SET
                raise Refused(p.EINVAL, f"{DIRTY_BITMAP}{from_id}: {e}") from None
            if s.export.snapshot:
                s.dirty[from_id] = runs
        i = max(0, bisect.bisect_right(runs, (offset,)) - 1)
        extents: list[tuple[int, int]] = []
        pos = offset
        for o, n in runs[i:]:
            if o >= end:
                break
            if o + n <= pos:
                continue
            if o > pos:
                extents.append((o - pos, 0))
            stop = min(o + n, end)
            extents.append((stop - max(o, pos), STATE_DIRTY))
            pos = stop
        if pos < end:
            extents.append((end - pos, 0))
        return extents

