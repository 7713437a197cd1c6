"""The array's NBD port: the NBD protocol (fixed newstyle, structured replies, STARTTLS)
over the same array and write barrier as the FUSE mount.

One trio task per connection, on the daemon's trio loop (the FUSE session's; a
plain-text connection's requests are read by a thread of its own, nbd/plainthread.py): this
module listens, counts connections and runs the handshake (options, STARTTLS, export
resolution and LUN masking); nbd/transmission.py serves the requests once an export is
open (the same barrier and array as the mount), nbd/connection.py is the byte stream
under both.

Who may see what: a connection's host is its TLS client certificate's identity (the
`identify` callable given by the daemon: the certificate's CN); with `insecure` (plain
text, loopback only) it is the array's own host. LUN masking (exports.py) decides
which exports it may list and open; another host's LUNs are invisible: not listed, and
NBD_REP_ERR_UNKNOWN on GO/INFO as for a name that does not exist.

Cancellation: a connection task is cancelled only when the daemon stops (the nursery
is cancelled); a client vanishing mid-request only ends its own task.

Hostile input: every length is checked before anything is read for it; a broken
handshake or request stream closes the connection (after an error reply where the
protocol has one); the handshake has a time limit (HANDSHAKE_TIMEOUT).
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Awaitable, Callable

import trio

from blockstore.model import COMMITTED, DIFFERENTIAL
from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import Presentation

from . import protocol as p
from .connection import Closed, Conn
from .exports import SHADOW, Export, NbdStore, exports_for
from .transmission import DIRTY_BITMAP, MAX_REQUEST, RequestLoop, Served

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0      # s from accept to the start of transmission
MAX_CONNECTIONS = 64
MAX_PER_PEER = 16             # connections from one address (one host cannot take all)
CONTEXT_ID = 1                # base:allocation's id; dirty bitmaps get 2, 3, ...
MAX_CONTEXTS = 16             # contexts one SET_META_CONTEXT may select (more: TOO_BIG)


class NbdServer(RequestLoop):
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
        conn = Conn(stream, peer)
        try:
            served = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as limit:
                served = await self._handshake(conn)
            who = f"{peer} (host {conn.host})" if conn.host else peer
            if limit.cancelled_caught:   # a slow or stuck client: worth a look
                log.warning("nbd: %s: handshake not finished in %g s; disconnected", who,
                            HANDSHAKE_TIMEOUT)
                return
            if served is None:   # NBD_OPT_ABORT: how nbdinfo --list ends, say
                log.info("nbd: %s: the client ended the handshake (NBD_OPT_ABORT)", who)
                return
            log.info("nbd: %s (host %s) opened %s", peer, conn.host, served.export.name)
            await self._transmission(conn, served)
        except (Closed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("nbd: %s: %s", peer, e)
        except p.ProtocolError as e:
            log.warning("nbd: %s: protocol error: %s; disconnected", peer, e)
        except Exception:   # a defect of ours ends this connection, not the daemon
            log.exception("nbd: %s: unexpected error; disconnected", peer)
        finally:
            self.connections -= 1
            self.per_peer[addr] -= 1
            if not self.per_peer[addr]:
                del self.per_peer[addr]
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)

    # -- handshake ----------------------------------------------------------------------
    async def _handshake(self, c: Conn) -> Served | None:
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

    async def _reply(self, c: Conn, opt: int, rtype: int, data: bytes | str = b"") -> None:
        await c.send(p.option_reply(opt, rtype, data.encode() if isinstance(data, str)
                                    else data))

    async def _starttls(self, c: Conn, length: int) -> None:
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
            await c.start_tls(self.tls)   # raises Closed naming why it failed
            assert c.sslobj is not None
            cert = c.sslobj.getpeercert()
            if not cert:   # (CERT_REQUIRED makes this unreachable; refuse anyway)
                raise Closed(f"{c.peer}: no client certificate")
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

    def _lookup(self, c: Conn, name: str) -> Export | None:
        assert c.host is not None
        return exports_for(self.store, self.presentation, c.host).get(name)

    async def _option(self, c: Conn, opt: int, data: bytes) -> Served | None:
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

    async def _meta_context(self, c: Conn, opt: int, data: bytes) -> None:
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

    def _bitmaps(self, c: Conn, e: Export) -> list[str]:
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

    async def _info(self, c: Conn, opt: int, data: bytes) -> Served | None:
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

    async def _export_name(self, c: Conn, data: bytes, no_zeroes: bool) -> Served:
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
