"""The array's NBD port: the NBD protocol (fixed newstyle, structured replies, STARTTLS)
over the same array and write barrier as the FUSE mount.

One trio task per connection, on the daemon's trio loop (the FUSE session's): the
handlers are thin and call the array synchronously, exactly as the FUSE handlers do
(reads and writes land in the page cache and the held-write buffers; the store's lock
is held for bookkeeping only), and leave the loop only to wait for the disk (FLUSH and
FUA: a worker thread, like the mount's fsync). Writes, trims and zeroes pass the
WriteBarrier exactly like FUSE writes: while the coordinator holds a volume (flush &
hold) they wait, so a snapshot set is one instant across FUSE and NBD writers.

Requests of one connection are served in order, one at a time (replies in request
order, as simple replies are; clients may still pipeline: the socket buffers them).

Who may see what: a connection's host is its TLS client certificate's identity (the
`identify` callable given by the daemon: the certificate's CN); with `insecure` (plain
text, loopback only) it is the array's own host. LUN masking (exports.py) decides
which exports it may list and open; another host's LUNs are invisible: not listed, and
NBD_REP_ERR_UNKNOWN on GO/INFO as for a name that does not exist.

Cancellation: a connection task is cancelled only when the daemon stops (the nursery
is cancelled); a client vanishing mid-request only ends its own task. Nothing is held
across an await but a write's barrier registration, released in `finally`.

Hostile input: every length is checked before anything is read for it; a broken
handshake or request stream closes the connection (after an error reply where the
protocol has one); the handshake has a time limit (HANDSHAKE_TIMEOUT).
"""

from __future__ import annotations

import bisect
import errno
import logging
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from blockstore.errors import StoreError
from blockstore.model import COMMITTED, DIFFERENTIAL
from fuse_mount.barrier import WriteBarrier
from fuse_mount.errors import errno_for
from fuse_mount.presentation import Presentation

from . import protocol as p
from .exports import SHADOW, Export, NbdStore, exports_for

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0      # s from accept to the start of transmission
MAX_REQUEST = 32 << 20        # largest READ/WRITE payload (proto.md's usual maximum)
MAX_STATUS_RANGE = 1 << 30    # BLOCK_STATUS answers at most this much per request
MAX_CONNECTIONS = 64
MAX_PER_PEER = 16             # connections from one address (one host cannot take all)
MAX_ZERO_PIECE = 32 << 20     # TRIM / WRITE_ZEROES are done in pieces of this much
# command flags each command may carry (proto.md: others are EINVAL)
_FLAGS = {p.CMD_READ: p.CMD_FLAG_DF, p.CMD_WRITE: p.CMD_FLAG_FUA, p.CMD_FLUSH: 0,
          p.CMD_TRIM: p.CMD_FLAG_FUA, p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
          p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE, p.CMD_DISC: 0}
CONTEXT_ID = 1                # base:allocation's id; dirty bitmaps get 2, 3, ...
MAX_CONTEXTS = 16             # contexts one SET_META_CONTEXT may select (more: TOO_BIG)
DIRTY_BITMAP = "qemu:dirty-bitmap:"   # + a snapshot id: the chunks changed since it
STATE_DIRTY = 1               # qemu:dirty-bitmap's one flag (QEMU's docs/interop/nbd.txt)



class Closed(Exception):
    """The peer closed the connection (or must be disconnected): stop quietly."""


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


class _Conn:
    """One client connection: a byte stream (plain, then maybe TLS) and its state."""

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.buf = bytearray()
        self.host: str | None = None
        self.tls = False
        self.structured = False
        # (export name, the contexts selected for it: (id, name)) by SET_META_CONTEXT
        self.meta: tuple[str, tuple[tuple[int, str], ...]] | None = None

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
            data = await self.stream.receive_some(max(65536, n - have))
            if not data:
                raise Closed(f"{self.peer}: connection closed")
            parts.append(data)
            have += len(data)
        out = b"".join(parts)
        if have > n:   # the start of the next request
            buf += out[n:]
            out = out[:n]
        return out

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)


class NbdServer:
    def __init__(self, store: NbdStore, barrier: WriteBarrier, presentation: Presentation,
                 tls: ssl.SSLContext | None, identify: Callable[[dict], str],
                 changed: Callable[[str], Awaitable[None]] | None = None) -> None:
        """tls None: plain text, every connection is the array's own host (the daemon
        allows that on loopback addresses only). changed(key): awaited after every
        write to a LUN, before its reply -- the FUSE mount drops its cached pages of
        it (ShadowOperations.changed_elsewhere), so that both paths read the same."""
        self.changed = changed
        self.store = store
        self.barrier = barrier
        self.presentation = presentation
        self.tls = tls
        self.identify = identify
        self.connections = 0
        self.per_peer: dict[str, int] = {}   # open connections by peer address
        self.masking_changes = 0
        presentation.subscribe(self._masking_changed)

    def _masking_changed(self) -> None:
        self.masking_changes += 1

    def _state(self) -> tuple[int, int]:
        return (self.store.generation, self.masking_changes)

    # -- listening ----------------------------------------------------------------------
    async def serve(self, host: str, port: int,
                    task_status: trio.TaskStatus[list[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            addr, port = stream.socket.getpeername()[:2]
        except OSError:
            addr, port = "?", 0
        peer = f"{addr}:{port}"
        if self.connections >= MAX_CONNECTIONS or \
                self.per_peer.get(addr, 0) >= MAX_PER_PEER:
            log.warning("nbd: refusing %s: %d connections open (%d from it)", peer,
                        self.connections, self.per_peer.get(addr, 0))
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        self.per_peer[addr] = self.per_peer.get(addr, 0) + 1
        conn = _Conn(stream, peer)
        try:
            served = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                served = await self._handshake(conn)
            if served is None:
                log.info("nbd: %s: handshake not finished in %s s or aborted", peer,
                         HANDSHAKE_TIMEOUT)
                return
            log.info("nbd: %s (host %s) opened %s", peer, conn.host, served.export.name)
            await self._transmission(conn, served)
        except (Closed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("nbd: %s: %s", peer, e)
        except p.ProtocolError as e:
            log.warning("nbd: %s: protocol error: %s; disconnected", peer, e)
        finally:
            self.connections -= 1
            self.per_peer[addr] -= 1
            if not self.per_peer[addr]:
                del self.per_peer[addr]
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)

    # -- handshake ----------------------------------------------------------------------
    async def _handshake(self, c: _Conn) -> Served | None:
        await c.send(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT,
                                            p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (flags,) = p.CLIENT_FLAGS.unpack(await c.recv_exactly(4))
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise p.ProtocolError("client does not speak the fixed newstyle handshake")
        no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        if self.tls is None:
            c.host = self.presentation.local_host
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(await c.recv_exactly(16))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                raise p.ProtocolError(f"option {opt} with {length} bytes of data")
            data = await c.recv_exactly(length)
            if opt == p.OPT_ABORT:
                await self._reply(c, opt, p.REP_ACK)
                return None
            if opt == p.OPT_STARTTLS:
                await self._starttls(c, length)
                continue
            if self.tls is not None and not c.tls:
                if opt == p.OPT_EXPORT_NAME:   # no error reply exists for it
                    raise p.ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS")
                await self._reply(c, opt, p.REP_ERR_TLS_REQD,
                                  "this server requires TLS (NBD_OPT_STARTTLS)")
                continue
            if opt == p.OPT_EXPORT_NAME:
                return await self._export_name(c, data, no_zeroes)
            served = await self._option(c, opt, data)
            if served is not None:
                return served

    async def _reply(self, c: _Conn, opt: int, rtype: int, data: bytes | str = b"") -> None:
        await c.send(p.option_reply(opt, rtype, data.encode() if isinstance(data, str)
                                    else data))

    async def _starttls(self, c: _Conn, length: int) -> None:
        opt = p.OPT_STARTTLS
        if self.tls is None:
            await self._reply(c, opt, p.REP_ERR_UNSUP, "TLS is not configured here")
        elif c.tls:
            await self._reply(c, opt, p.REP_ERR_INVALID, "TLS is already on")
        elif length:
            await self._reply(c, opt, p.REP_ERR_INVALID, "STARTTLS takes no data")
        else:
            await self._reply(c, opt, p.REP_ACK)
            if c.buf:   # bytes sent before the TLS handshake belong to nobody
                raise p.ProtocolError("data after STARTTLS before the TLS handshake")
            tls = trio.SSLStream(c.stream, self.tls, server_side=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as e:
                raise Closed(f"{c.peer}: TLS handshake failed: {e.__cause__ or e}") from None
            cert = tls.getpeercert()
            if not cert:   # (CERT_REQUIRED makes this unreachable; refuse anyway)
                raise Closed(f"{c.peer}: no client certificate")
            c.stream, c.tls = tls, True
            try:
                c.host = self.identify(cert)
            except ValueError as e:   # no CN, two, or not a host name: this one only
                log.warning("nbd: %s: refused: %s", c.peer, e)
                raise Closed(f"{c.peer}: {e}") from None
            if c.host == self.presentation.local_host:
                # the array's own host sees every LUN nobody was presented: no remote
                # certificate may be it
                log.warning("nbd: %s: refused: its certificate names the array's own "
                            "host %s", c.peer, c.host)
                raise Closed(f"{c.peer}: the array's own host name")
            log.info("nbd: %s: TLS, host %s", c.peer, c.host)

    def _lookup(self, c: _Conn, name: str) -> Export | None:
        assert c.host is not None
        return exports_for(self.store, self.presentation, c.host).get(name)

    async def _option(self, c: _Conn, opt: int, data: bytes) -> Served | None:
        """One option other than ABORT/STARTTLS/EXPORT_NAME; a Served for GO."""
        try:
            if opt == p.OPT_LIST:
                if data:
                    raise p.ProtocolError("LIST takes no data")
                assert c.host is not None
                for e in exports_for(self.store, self.presentation, c.host).values():
                    if e.listed:
                        raw = e.name.encode()
                        await self._reply(c, opt, p.REP_SERVER, struct.pack(">I", len(raw))
                                          + raw + e.description.encode())
                await self._reply(c, opt, p.REP_ACK)
            elif opt == p.OPT_STRUCTURED_REPLY:
                if data:
                    raise p.ProtocolError("STRUCTURED_REPLY takes no data")
                c.structured = True
                await self._reply(c, opt, p.REP_ACK)
            elif opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                await self._meta_context(c, opt, data)
            elif opt in (p.OPT_INFO, p.OPT_GO):
                return await self._info(c, opt, data)
            else:
                await self._reply(c, opt, p.REP_ERR_UNSUP, f"option {opt} is not supported")
        except p.ProtocolError as e:   # a malformed option: an error reply, go on
            await self._reply(c, opt, p.REP_ERR_INVALID, str(e))
        return None

    async def _meta_context(self, c: _Conn, opt: int, data: bytes) -> None:
        """base:allocation, and qemu:dirty-bitmap:<FROM-id> (QEMU's namespace: FROM's
        changed-block map, docs/network.md). LIST answers the contexts a query names or
        (a namespace, "base:", "qemu:", "qemu:dirty-bitmap:", or no query) every one
        there; SET selects those named exactly. A name that is not available -- unknown,
        malformed, another volume's snapshot, one this host does not see, a newer one --
        is simply not selected (proto.md), and BLOCK_STATUS is refused without any."""
        name, rest = p.parse_names(data)
        queries = p.parse_meta_queries(rest)
        if opt == p.OPT_SET_META_CONTEXT and not c.structured:
            await self._reply(c, opt, p.REP_ERR_INVALID,
                              "SET_META_CONTEXT needs structured replies")
            return
        e = self._lookup(c, name)
        if e is None:
            await self._reply(c, opt, p.REP_ERR_UNKNOWN, f"no export {name!r}")
            return
        bitmaps = self._bitmaps(c, e)
        listing = opt == p.OPT_LIST_META_CONTEXT
        chosen: list[str] = []
        for q in queries if queries or not listing else ["base:", "qemu:"]:
            if q == p.BASE_ALLOCATION or (listing and q == "base:"):
                found = [p.BASE_ALLOCATION]
            elif listing and q in ("qemu:", DIRTY_BITMAP):
                found = bitmaps
            elif q.startswith(DIRTY_BITMAP) and q in bitmaps:
                found = [q]
            else:
                found = []
            chosen += [n for n in found if n not in chosen]
        if not listing and len(chosen) > MAX_CONTEXTS:
            await self._reply(c, opt, p.REP_ERR_TOO_BIG, f"{len(chosen)} metadata "
                              f"contexts asked for; at most {MAX_CONTEXTS} at a time")
            return
        selected: list[tuple[int, str]] = []
        next_id = CONTEXT_ID + 1
        for n in chosen:
            if n == p.BASE_ALLOCATION:
                cid = CONTEXT_ID
            elif listing:
                cid = 0   # proto.md: a LIST's context id is irrelevant
            else:
                cid, next_id = next_id, next_id + 1
            selected.append((cid, n))
            await self._reply(c, opt, p.REP_META_CONTEXT, struct.pack(">I", cid)
                              + n.encode())
        if not listing:
            c.meta = (name, tuple(selected))
        await self._reply(c, opt, p.REP_ACK)

    def _bitmaps(self, c: _Conn, e: Export) -> list[str]:
        """The qemu:dirty-bitmap contexts of export `e` for this connection's host: one
        per committed differential snapshot FROM of the same volume that the host sees,
        older than the export's snapshot (for a volume: every one). What they report is
        Pool.changed_extents(FROM, the export's snapshot or None)."""
        assert c.host is not None
        snaps = self.store.list_snapshots()
        if e.snapshot:
            to = next((s for s in snaps if s.id == e.key), None)
            if to is None or to.epoch is None or to.state != COMMITTED:
                return []   # a plex (no epoch) or an invalid one: no change record
            volume, before = to.volume, to.epoch
        else:
            volume, before = e.key, None
        seen = exports_for(self.store, self.presentation, c.host)
        return [DIRTY_BITMAP + s.id for s in snaps
                if s.volume == volume and s.kind == DIFFERENTIAL and s.state == COMMITTED
                and s.epoch is not None and (before is None or s.epoch < before)
                and SHADOW + s.id in seen]

    def _flags(self, e: Export) -> int:
        flags = p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_SEND_DF
        if e.read_only:
            flags |= p.TF_READ_ONLY
        else:
            flags |= p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES
        # every connection serves from the same array and page cache, and FLUSH covers
        # every write any connection had answered: safe to spread over connections
        return flags | p.TF_CAN_MULTI_CONN

    async def _info(self, c: _Conn, opt: int, data: bytes) -> Served | None:
        name, rest = p.parse_names(data)
        wanted = p.parse_info_requests(rest)
        e = self._lookup(c, name)
        if e is None:
            await self._reply(c, opt, p.REP_ERR_UNKNOWN,
                              f"no export {name!r} for host {c.host}" if name
                              else "no default export: give a name (nbdinfo --list)")
            return None
        try:
            size = int(self.store.lun_size(e.key))
        except Exception as ex:   # noqa: BLE001 - deleted meanwhile, or unreadable
            await self._reply(c, opt, p.REP_ERR_UNKNOWN, f"{name}: {ex}")
            return None
        await self._reply(c, opt, p.REP_INFO, p.info_export(size, self._flags(e)))
        if p.INFO_NAME in wanted:
            await self._reply(c, opt, p.REP_INFO, struct.pack(">H", p.INFO_NAME)
                              + name.encode())
        if p.INFO_DESCRIPTION in wanted:
            await self._reply(c, opt, p.REP_INFO, struct.pack(">H", p.INFO_DESCRIPTION)
                              + e.description.encode())
        if p.INFO_BLOCK_SIZE in wanted:
            await self._reply(c, opt, p.REP_INFO, p.info_block_size(
                1, max(4096, int(self.store.chunk_size)), MAX_REQUEST))
        await self._reply(c, opt, p.REP_ACK)
        if opt == p.OPT_INFO:
            return None
        contexts = c.meta[1] if c.meta is not None and c.meta[0] == name else ()
        return Served(e, size, contexts, self._state())

    async def _export_name(self, c: _Conn, data: bytes, no_zeroes: bool) -> Served:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise p.ProtocolError("export name is not UTF-8") from None
        e = self._lookup(c, name)
        if e is None:
            raise Closed(f"{c.peer}: EXPORT_NAME {name!r}: no such export for {c.host}")
        size = int(self.store.lun_size(e.key))
        await c.send(struct.pack(">QH", size, self._flags(e))
                     + (b"" if no_zeroes else bytes(124)))
        return Served(e, size, (), self._state())

    # -- transmission -------------------------------------------------------------------
    async def _transmission(self, c: _Conn, s: Served) -> None:
        while True:
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(
                await c.recv_exactly(p.REQUEST.size))
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolError(f"bad request magic {magic:#x}")
            payload = b""
            if cmd == p.CMD_WRITE:
                if length > MAX_REQUEST:   # cannot skip that much safely: disconnect
                    raise p.ProtocolError(f"WRITE of {length} bytes")
                payload = await c.recv_exactly(length)
            if cmd == p.CMD_DISC:
                raise Closed(f"{c.peer}: disconnect")
            try:
                await self._command(c, s, cmd, flags, cookie, offset, length, payload)
            except _Refused as r:
                await self._error(c, cookie, r.code, r.message)

    async def _error(self, c: _Conn, cookie: int, code: int, message: str) -> None:
        if c.structured:
            await c.send(p.structured_error(cookie, code, message))
        else:
            await c.send(p.simple_reply(cookie, code))

    async def _command(self, c: _Conn, s: Served, cmd: int, flags: int, cookie: int,
                       offset: int, length: int, payload: bytes) -> None:
        if s.seen != self._state():
            self._still_may_open(c, s)
        e = s.export
        name = p.CMD_NAMES.get(cmd, str(cmd))
        if cmd not in _FLAGS:
            raise _Refused(p.EINVAL, f"command {name} is not supported")
        if flags & ~_FLAGS[cmd]:
            raise _Refused(p.EINVAL, f"{name} with flags {flags:#x} it does not take")
        if cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES,
                   p.CMD_BLOCK_STATUS):
            if cmd == p.CMD_READ and length > MAX_REQUEST:
                raise _Refused(p.EINVAL, f"{name} of {length} bytes (max {MAX_REQUEST})")
            if offset + length > s.size:
                s.size = int(self.store.lun_size(e.key))   # grown since?
                if offset + length > s.size:
                    raise _Refused(p.ENOSPC if cmd == p.CMD_WRITE else p.EINVAL,
                                   f"{name} past the end ({offset}+{length} > {s.size})")
        writing = cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
        if writing and e.read_only:
            raise _Refused(p.EPERM, f"{e.name} is read-only")
        try:
            if cmd == p.CMD_READ:
                await self._read(c, s, cookie, offset, length)
                return
            if cmd == p.CMD_BLOCK_STATUS:
                await self._block_status(c, s, flags, cookie, offset, length)
                return
            if writing:
                await self._write(e, cmd, flags, offset, length, payload)
            elif cmd == p.CMD_FLUSH and not e.snapshot:
                await trio.to_thread.run_sync(self.store.flush, e.key)
        except _Refused:
            raise
        except Exception as ex:   # noqa: BLE001 - the errno mapping point (fuse_mount/errors)
            code = errno_for(ex, writing=writing)
            log.log(logging.ERROR if code == errno.EIO else logging.INFO,
                    "nbd: %s %s of %s: %s", c.peer, name, e.name, ex)
            raise _Refused(p.ERRNO_TO_WIRE.get(code, p.EIO), str(ex)) from None
        await c.send(p.simple_reply(cookie) if not c.structured else
                     p.structured_header(cookie, p.REPLY_TYPE_NONE, 0, True))

    def _still_may_open(self, c: _Conn, s: Served) -> None:
        """The array or the masking changed since this connection last looked: close it
        unless its export still names the same LUN for its host."""
        now = self._state()
        e = self._lookup(c, s.export.name)
        if e is None or e.naa != s.export.naa or e.key != s.export.key:
            log.warning("nbd: %s (host %s): %s is gone or no longer presented to it; "
                        "disconnected", c.peer, c.host, s.export.name)
            raise Closed(f"{c.peer}: {s.export.name} changed")
        s.seen = now

    async def _read(self, c: _Conn, s: Served, cookie: int, offset: int, length: int
                    ) -> None:
        data = self.store.read(s.export.key, offset, length)
        if len(data) < length:   # shrunk meanwhile (a revert): zeros, as past a file's end
            data += bytes(length - len(data))
        if c.structured:
            head = p.structured_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + length,
                                       True) + struct.pack(">Q", offset)
        else:
            head = p.simple_reply(cookie)
        # small reads in one send: on loopback each send(2) also delivers to the reader
        # and wakes it, so two of them (header, data) cost more than copying the data
        # once (4K random reads at QD1: ~40 % of the request's time was the second
        # send); big ones in two (the copy would cost more than the second call)
        if length <= 256 << 10:
            await c.send(head + data)
        else:
            await c.send(head)
            await c.send(data)

    async def _write(self, e: Export, cmd: int, flags: int, offset: int, length: int,
                     payload: bytes) -> None:
        key = e.key
        barrier = self.barrier
        if barrier.holding(key) is not None:
            await barrier.wait_writable(key)
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
        finally:
            barrier.end_write(key)
        if self.changed is not None:
            await self.changed(key)
        if flags & p.CMD_FLAG_FUA:
            await trio.to_thread.run_sync(self.store.flush, key)

    async def _block_status(self, c: _Conn, s: Served, flags: int, cookie: int,
                            offset: int, length: int) -> None:
        """One BLOCK_STATUS chunk per selected context (proto.md), the last one DONE."""
        if not (c.structured and s.contexts):
            raise _Refused(p.EINVAL, "BLOCK_STATUS needs a metadata context (SET_META_"
                                     "CONTEXT base:allocation or qemu:dirty-bitmap:ID)")
        if length == 0:
            raise _Refused(p.EINVAL, "BLOCK_STATUS of 0 bytes")
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
                raise _Refused(p.EINVAL, f"{DIRTY_BITMAP}{from_id}: {e}") from None
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


class _Refused(Exception):
    """A request answered with an error (the connection goes on)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
