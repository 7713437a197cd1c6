"""The control socket server: the coordinator's API over a Unix socket (trio).

Wire format and error names: provider/protocol.py; ops: docs/provider.md.

Per connection (= one requester session) two tasks run: a reader that splits the byte
stream into lines and queues requests, and a worker that runs them one after the other.
The reader keeps reading while a request runs, so a client that disconnects in the
middle of set.do / snapshot.create is noticed at once: the request is cancelled (the
coordinator aborts the set: hold released, writers thawed, snapshots removed) and then the
session ends (its auto-release sets are deleted).

Cancellation (docs/provider.md, "Cancelling a request"): a ``cancel`` request names a
request of the same connection; the reader answers it at once, out of order, and the
cancelled request then gets its true final reply: its result if it completed anyway,
E_ABORT if it stopped with nothing changed. How a request is cancelled depends on its op:
the long operations in TOKEN_OPS get a jobs.CancelToken that their worker thread checks
between chunks (the coordinator decides what a cancellation leaves: promote, split,
scrub, check stop with nothing changed; a revert once started rolls forward); the set
creations in SCOPE_OPS are cancelled as trio code (the set is aborted); other requests
are short and complete (a deletion of several snapshots stopped half-way by a
disconnect would leave some deleted and no one told). A disconnect, or the daemon
stopping, cancels the running request the same way.

Bad input never ends the server: a line that is not JSON, not an object, too long (more
than protocol.MAX_LINE bytes, or MAX_DOCUMENT_LINE for import; beyond MAX_DOCUMENT_LINE
the rest of it is skipped unread), an unknown op or wrong arguments each get one error
reply (id null when the id is unknown) and the connection goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdsocket
import ssl
import stat
import tempfile
from collections.abc import Callable
from typing import Any

import trio

from . import audit, protocol, snapshot_refs
from .control_ops import HANDLERS, SCOPE_OPS, TOKEN_OPS, Args, _bad, _cancel_args
from .coordinator import Coordinator, Session
from .jobs import CancelToken
from .protocol import ProtocolError
from .vss import VssError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.1   # seconds between two progress events of one request
QUEUE = 16                # requests read ahead per connection

# --------------------------------------------------------------------------- connection
class _Progress:
    """Collects progress reports of one request; a pump task sends the latest one at most
    every PROGRESS_INTERVAL seconds, and a successful reply is preceded by the last one
    if the pump had not sent it (the requester's bar ends where the work did)."""

    def __init__(self) -> None:
        self.latest: tuple[int, int, str] | None = None
        self.sent: tuple[int, int, str] | None = None
        self.changed = trio.Event()

    def unsent(self) -> tuple[int, int, str] | None:
        return self.latest if self.latest != self.sent else None

    def report(self, done: int, total: int, what: str) -> None:
        self.latest = (done, total, what)
        self.changed.set()

    async def pump(self, conn: Connection, rid: Any) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            latest = self.latest
            if latest is not None:
                # shielded, and marked sent only once sent: the request's end cancels
                # this task, and a cancel at the send lock used to drop an event already
                # marked sent (the reply then went without its last progress: a
                # requester's bar never appeared) -- or could cut a line in two
                with trio.CancelScope(shield=True):
                    await conn.send(protocol.progress_event(rid, *latest))
                self.sent = latest
            await trio.sleep(PROGRESS_INTERVAL)


class _Running:
    """The request a connection's worker runs now, and how to cancel it."""

    def __init__(self, rid: Any, op: str, scope: trio.CancelScope) -> None:
        self.rid, self.op, self.scope = rid, op, scope
        self.token = CancelToken()
        self.explicit = False   # cancelled by a cancel request (which wants an answer)

    def cancel(self, reason: str, explicit: bool = False) -> str:
        """Cancel it; the state for the cancel request's reply."""
        self.token.cancel(reason)   # (also the reason logged for the other ops)
        if self.op in TOKEN_OPS:
            self.explicit |= explicit
            job = self.token.job
            return job.to_json()["state"] if job is not None else "cancelling"
        if self.op in SCOPE_OPS:
            self.explicit |= explicit
            self.scope.cancel()
            return "cancelling"
        # short, and not undoable half-way (a deletion of several snapshots, a mount):
        # it completes, also when its requester is gone
        return "not-cancellable"


class Connection:
    def __init__(self, server: ControlServer, stream: trio.abc.Stream,
                 remote_host: str | None = None) -> None:
        """remote_host: the host a TLS client certificate proved (the network control
        port); None for the local Unix socket, where hello names the host."""
        self.server = server
        self.coord = server.coord
        self.stream = stream
        self.remote_host = remote_host
        self._session: Session | None = None
        self._send_lock = trio.Lock()
        self._current: _Running | None = None
        self._queued: list[Any] = []      # ids of requests queued, not started yet
        self._doomed: list[Any] = []      # of those, the ones cancelled
        self.gone = False

    @property
    def token(self) -> CancelToken:
        """The running request's cancel token (for the TOKEN_OPS handlers)."""
        assert self._current is not None
        return self._current.token

    async def send(self, msg: dict[str, Any]) -> None:
        try:
            data = protocol.encode(msg, protocol.MAX_DOCUMENT_LINE)
        except ValueError as e:   # a result too big for one line, or not JSON-able
            log.error("cannot send the reply to request %r: %s", msg.get("id"), e)
            data = protocol.encode(protocol.reply_error(
                msg.get("id"), VssError("VSS_E_UNEXPECTED", f"the reply cannot be sent: {e}")))
        async with self._send_lock:
            if self.gone:
                return
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost()

    @property
    def session(self) -> Session:
        """The requester session (handlers run only after hello)."""
        assert self._session is not None
        return self._session

    def _lost(self, reason: str = "the requester disconnected") -> None:
        if not self.gone:
            self.gone = True
            if self._current is not None:
                self._current.cancel(reason)

    async def run(self) -> None:
        send_q, recv_q = trio.open_memory_channel[tuple[Any, str, dict[str, Any]]](QUEUE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, send_q)
                async with recv_q:
                    async for rid, op, args in recv_q:
                        self._queued.remove(rid)
                        if self.gone:
                            break
                        if rid in self._doomed:
                            self._doomed.remove(rid)
                            await self.send(protocol.reply_error(rid, VssError(
                                "E_ABORT", f"{protocol.shown(op)} cancelled before it "
                                "started: nothing changed")))
                            continue
                        await self._dispatch(rid, op, args)
                nursery.cancel_scope.cancel()
        finally:
            if self._session is not None:
                with trio.CancelScope(shield=True):
                    await self.coord.close_session(self._session)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _reader(self, send_q: trio.MemorySendChannel[Any]) -> None:
        # Lines up to MAX_DOCUMENT_LINE are read whole (import carries a document); which
        # ops may use more than MAX_LINE is checked once the line is parsed. ``scanned``:
        # how much of buf is known to hold no newline (no rescans of a long line).
        try:
            await self._read_lines(send_q)
        finally:
            # ended by EOF (_lost already ran) or cancelled: the daemon is stopping (the
            # running request is cancelled now, not once its worker thread returns)
            self._lost("the daemon is stopping")

    async def _read_lines(self, send_q: trio.MemorySendChannel[Any]) -> None:
        limit = protocol.MAX_DOCUMENT_LINE
        buf = bytearray()
        scanned = 0
        skipping = False
        async with send_q:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    self._lost()
                    return
                buf += data
                while True:
                    nl = buf.find(b"\n", scanned)
                    if nl < 0:
                        scanned = len(buf)
                        if len(buf) > limit and not skipping:
                            skipping = True
                            await self.send(protocol.reply_error(None, ProtocolError(
                                f"message longer than {limit} bytes: ignored")))
                        if skipping:
                            buf.clear()
                            scanned = 0
                        break
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    scanned = 0
                    if skipping:
                        skipping = False
                        continue
                    if not line.strip():
                        continue
                    req = await self._parse(line)
                    if req is None:
                        continue
                    if req[1] == "cancel" and self._session is not None:
                        await self._cancel_now(req[0], req[2])
                        continue
                    self._queued.append(req[0])
                    await send_q.send(req)

    async def _cancel_now(self, rid: Any, args: dict[str, Any]) -> None:
        """Answer a cancel request at once (the request it names runs or waits)."""
        try:
            target = _cancel_args(args)
        except VssError as e:
            await self.send(protocol.reply_error(rid, e))
            return
        cur = self._current
        if cur is not None and cur.rid == target:
            state = cur.cancel("the requester cancelled it", explicit=True)
            log.info("session %s: cancel of request %r (%s): %s", self.session.id, target,
                     cur.op, state)
        elif target in self._queued and self._queued.count(target) > \
                self._doomed.count(target):
            self._doomed.append(target)
            state = "cancelled"
        else:
            state = "done"   # answered already, or never sent
        await self.send(protocol.reply_ok(rid, {"request": target, "state": state}))

    async def _parse(self, line: bytes) -> tuple[Any, str, dict[str, Any]] | None:
        rid = None
        try:
            if len(line) > protocol.MAX_LINE:   # megabytes of JSON: not on the FUSE thread
                obj = await trio.to_thread.run_sync(protocol.decode, line)
            else:
                obj = protocol.decode(line)
            rid = obj.get("id") if isinstance(obj.get("id"), int | str) else None
            req = protocol.parse_request(obj)
            protocol.check_line_length(req[1], len(line) + 1)
            return req
        except VssError as e:
            await self.send(protocol.reply_error(rid, e))
            return None

    async def _dispatch(self, rid: Any, op: str, args: dict[str, Any]) -> None:
        if self._session is None:
            if op != "hello":
                await self.send(protocol.reply_error(rid, VssError(
                    "VSS_E_BAD_STATE", f"{op}: say hello first (op \"hello\" with host and "
                    "client)")))
                return
            try:
                x = Args("hello", args, ("host", "client", "protocol"))
                host = x.get("host", str)
                client = x.get("client", str)
                x.get("protocol", int)
                if self.remote_host is not None:   # the certificate says who it is
                    if host not in (None, self.remote_host):
                        raise VssError("E_ACCESSDENIED", f"hello: this connection is host "
                                       f"{self.remote_host} (its certificate); it cannot "
                                       f"speak for {host}")
                    host = self.remote_host
                self._session = self.coord.open_session(host, client)
            except VssError as e:
                await self.send(protocol.reply_error(rid, e))
                return
            st = self.coord.status()
            await self.send(protocol.reply_ok(rid, {
                "server": "shadowplex", "protocol": protocol.PROTOCOL_VERSION,
                "session": self.session.id, "host": self.session.host,
                "pool": st["pool"], "pool_id": st["pool_id"],
                "mount": st["mount"], "service_machine": st["service_machine"],
                "provider_id": st["provider_id"], "ops": list(protocol.OPS)}))
            return
        handler = HANDLERS.get(op)
        if handler is None:
            await self.send(protocol.reply_error(rid, _bad(
                f"unknown op {op!r}; known: {', '.join(protocol.OPS)}")))
            return
        progress = _Progress()
        reply: dict[str, Any] | None = None
        with trio.CancelScope() as scope:
            running = self._current = _Running(rid, op, scope)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(progress.pump, self, rid)
                    try:
                        remote = self.remote_host is not None
                        access = self.coord.access
                        # ids, id prefixes, VOLUME@NAME -> ids (provider/snapshot_refs)
                        args = snapshot_refs.resolve_args(
                            op, args, self.coord.views.refs,
                            *access.sees(self.session.host, remote))
                        access.check(self.session.host, remote, op, args)
                        # who asked, for the audit lines of what the handler changes
                        who = audit.REQUESTER.set(audit.of_session(self.session))
                        try:
                            result = access.filter(self.session.host, remote, op,
                                                   await handler(self, args,
                                                                 progress.report))
                        finally:
                            audit.REQUESTER.reset(who)
                        reply = protocol.reply_ok(rid, result)
                    except Exception as e:   # noqa: BLE001 - every failure becomes the request's error reply
                        reply = protocol.reply_error(rid, protocol.to_vss_error(e))
                    n.cancel_scope.cancel()
            finally:
                self._current = None
        # The truth, whatever cancelled what: a reply the handler produced says what
        # happened (completed, failed, or E_ABORT from a long operation that stopped);
        # a handler cancelled as trio code (SCOPE_OPS: the set was aborted) left nothing.
        if reply is None and scope.cancelled_caught:
            why = running.token.reason or "the requester disconnected"
            # a host daemon's long poll ends so whenever it stops: not worth a warning
            log.log(logging.INFO if op == "array.watch" else logging.WARNING,
                    "session %s: %s cancelled (%s): nothing changed", self.session.id,
                    op, why if running.explicit else "the requester disconnected")
            if not running.explicit:
                return
            reply = protocol.reply_error(rid, VssError(
                "E_ABORT", f"{op} cancelled: nothing changed"
                + (" (the snapshot set was aborted)" if op in SCOPE_OPS else "")))
        if reply is not None:
            last = progress.unsent()
            if reply.get("ok") and last is not None:
                await self.send(protocol.progress_event(rid, *last))
            await self.send(reply)


# --------------------------------------------------------------------------- server
TLS_HANDSHAKE_TIMEOUT = 30.0   # s for a network client's TLS handshake
MAX_NETWORK_CONNECTIONS = 64   # on the network control port, at a time
MAX_NETWORK_PER_PEER = 16      # of those, from one address

def _listening(path: str) -> bool:
    """True if something accepts connections on the Unix socket at path."""
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlServer:
    def __init__(self, coord: Coordinator, socket_path: str, mode: int = 0o600) -> None:
        self.coord = coord
        self.socket_path = os.path.abspath(socket_path)
        self.mode = mode
        self._ino: int | None = None
        self._sock: trio.socket.SocketType | None = None

    async def _bind(self) -> trio.socket.SocketType:
        """Bind the socket in a private directory with its final mode, then rename it
        into place: it never exists with looser permissions."""
        path = self.socket_path
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise VssError("E_INVALIDARG", f"control socket path {path} exists and is "
                               "not a socket; remove it or choose another --socket")
            if await trio.to_thread.run_sync(_listening, path):
                raise VssError("VSS_E_PROVIDER_IN_USE", f"another daemon listens on {path}")
            log.info("removing stale control socket %s", path)
            os.unlink(path)
        tmpdir = tempfile.mkdtemp(prefix=".sock-", dir=parent)
        tmp = os.path.join(tmpdir, "s")
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await sock.bind(tmp)
            os.chmod(tmp, self.mode)
            os.rename(tmp, path)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.rmdir(tmpdir)
        self._ino = os.lstat(path).st_ino
        return sock

    def _unlink(self) -> None:
        try:
            if self._ino is not None and os.lstat(self.socket_path).st_ino == self._ino:
                os.unlink(self.socket_path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("removing %s: %s", self.socket_path, e)

    async def _handle(self, stream: trio.abc.Stream, remote_host: str | None = None
                      ) -> None:
        try:
            await Connection(self, stream, remote_host).run()
        except Exception:
            log.exception("control connection failed")

    async def serve_tls(self, host: str, port: int, context: ssl.SSLContext,
                        identify: Callable[[dict], str],
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The control protocol on a TCP port behind TLS with client certificates (the
        network control port): each connection's host is its certificate's identity
        (identify: the CN); the handshake has TLS_HANDSHAKE_TIMEOUT s."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners)
        per_peer: dict[str, int] = {}

        async def handle(stream: trio.SocketStream) -> None:
            try:
                addr = str(stream.socket.getpeername()[0])
            except OSError:
                addr = "?"
            if sum(per_peer.values()) >= MAX_NETWORK_CONNECTIONS or \
                    per_peer.get(addr, 0) >= MAX_NETWORK_PER_PEER:
                log.warning("control port: refusing %s: too many connections", addr)
                await trio.aclose_forcefully(stream)
                return
            per_peer[addr] = per_peer.get(addr, 0) + 1
            try:
                await session(stream)
            finally:
                per_peer[addr] -= 1
                if not per_peer[addr]:
                    del per_peer[addr]

        async def session(stream: trio.SocketStream) -> None:
            tls = trio.SSLStream(stream, context, server_side=True)
            try:
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await tls.do_handshake()
                peer = identify(tls.getpeercert() or {})
            except (trio.BrokenResourceError, trio.TooSlowError, ValueError) as e:
                log.warning("control port: connection refused: %s",
                            e.__cause__ or e or type(e).__name__)
                await trio.aclose_forcefully(tls)
                return
            await self._handle(tls, peer)
        await trio.serve_listeners(handle, listeners)

    async def open(self) -> None:
        """Create the socket (serve() does it if not done): errors surface here, plainly
        (VssError: path not a socket, another daemon listening, and an OSError from
        creating it as E_ACCESSDENIED / E_INVALIDARG, which serve() prints as one line)."""
        if self._sock is None:
            try:
                self._sock = await self._bind()
            except OSError as e:
                # a user mistake (directory not writable, path too long for sun_path):
                # one line from serve, not a traceback
                name = ("E_ACCESSDENIED" if e.errno in (errno.EACCES, errno.EPERM)
                        else "E_INVALIDARG")
                raise VssError(name, f"cannot create the control socket {self.socket_path}"
                               f": {e.strerror or e}; choose another --socket") from e
            log.info("control socket listening at %s (mode %o)", self.socket_path, self.mode)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.open()
        assert self._sock is not None
        try:
            listener = trio.SocketListener(self._sock)
            await trio.serve_listeners(self._handle, [listener], task_status=task_status)
        finally:
            self._unlink()
