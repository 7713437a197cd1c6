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
import math
import os
import socket as stdsocket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import protocol
from .coordinator import Coordinator, ProgressFn, Session
from .jobs import CancelToken
from .protocol import ProtocolError
from .vss import VssError

log = logging.getLogger(__name__)

Handler = Callable[["Connection", dict[str, Any], ProgressFn], Awaitable[Any]]
PROGRESS_INTERVAL = 0.1   # seconds between two progress events of one request
QUEUE = 16                # requests read ahead per connection
# how each op is cancelled (module docstring); any other op is not cancellable
TOKEN_OPS = frozenset({"revert", "promote", "split", "scrub", "check"})
SCOPE_OPS = frozenset({"set.do", "snapshot.create"})

_ANY = object()


def _bad(msg: str) -> VssError:
    return VssError("E_INVALIDARG", msg)


class Args:
    """Typed access to a request's args; unknown keys are refused (they are typos)."""

    def __init__(self, op: str, args: dict[str, Any], allowed: tuple[str, ...]) -> None:
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            # keys are shown as sent only when printable and short (a hostile key may
            # hold line breaks or megabytes): the message stays one line
            known = ", ".join(allowed) or "none"
            shown = ", ".join(protocol.shown(k) for k in unknown[:8])
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise _bad(f"{op}: unknown argument(s) {shown}{more} (known: {known})")
        self.op, self.args = op, args

    def get(self, key: str, types: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        if key not in self.args or self.args[key] is None:
            if required:
                raise _bad(f"{self.op}: missing argument {key!r}")
            return default
        value = self.args[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                    else (types,)):
            raise _bad(f"{self.op}: argument {key!r} must not be a boolean")
        if not isinstance(value, types):
            raise _bad(f"{self.op}: argument {key!r} has the wrong type "
                       f"({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(f"{self.op}: argument {key!r} is not a finite number")
        return value


def _str_list(op: str, value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _bad(f"{op}: argument {key!r} must be a list of strings")
    return value


# --------------------------------------------------------------------------- ops
CTX = (str, int)
ATTRS = (int, str, list)


async def _hello(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    raise _bad("hello: already said hello on this connection")


async def _status(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    Args("status", a, ())
    return c.coord.status()


async def _volume_create(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("volume.create", a, ("name", "size"))
    return await c.coord.volume_create(x.get("name", str, required=True),
                                       x.get("size", (int, str), required=True))


async def _volume_list(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    Args("volume.list", a, ())
    return c.coord.volume_list()


async def _volume_resize(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("volume.resize", a, ("name", "size"))
    return await c.coord.volume_resize(x.get("name", str, required=True),
                                       x.get("size", (int, str), required=True))


async def _volume_delete(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("volume.delete", a, ("name",))
    await c.coord.volume_delete(x.get("name", str, required=True))
    return None


async def _volume_present(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("volume.present", a, ("name", "hosts"))
    hosts = _str_list("volume.present", x.get("hosts", list, required=True), "hosts")
    return await c.coord.volume_present(x.get("name", str, required=True), hosts)


async def _snapshot_create(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("snapshot.create", a, ("volumes", "context", "attributes", "kind"))
    vols = _str_list("snapshot.create", x.get("volumes", list, required=True), "volumes")
    return await c.coord.create(c.session, vols, x.get("context", CTX, "backup"),
                                x.get("attributes", ATTRS), x.get("kind", str), p)


async def _set_start(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.start", a, ("context", "attributes"))
    sid = c.coord.start_snapshot_set(c.session, x.get("context", CTX, "backup"),
                                     x.get("attributes", ATTRS))
    return {"set_id": sid}


async def _set_add(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.add", a, ("volume", "set_id"))
    s = c.coord.own_set(c.session, x.get("set_id", str), "add a volume")
    sid = c.coord.add_to_snapshot_set(c.session, x.get("volume", str, required=True),
                                      s.set_id)
    return {"set_id": s.set_id, "snapshot_id": sid}


async def _set_do(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.do", a, ("set_id",))
    s = c.coord.own_set(c.session, x.get("set_id", str), "do the snapshot set")
    snaps = await c.coord.do_snapshot_set(c.session, s.set_id, p)
    return {"set_id": s.set_id, "snapshots": snaps}


async def _set_abort(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.abort", a, ("set_id",))
    await c.coord.abort_snapshot_set(c.session, x.get("set_id", str))
    return None


async def _set_list(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    Args("set.list", a, ())
    return c.coord.set_list()


async def _snapshot_list(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("snapshot.list", a, ("set_id", "volume", "context"))
    return c.coord.snapshot_list(x.get("set_id", str), x.get("volume", str),
                                 x.get("context", CTX))


async def _snapshot_show(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("snapshot.show", a, ("snapshot_id", "set_id"))
    return c.coord.snapshot_show(x.get("snapshot_id", str), x.get("set_id", str))


async def _snapshot_delete(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("snapshot.delete", a,
             ("snapshot_id", "set_id", "oldest", "all", "context", "unexpose"))
    return await c.coord.snapshot_delete(
        x.get("snapshot_id", str), x.get("set_id", str), x.get("oldest", str),
        bool(x.get("all", bool, False)), x.get("context", CTX),
        bool(x.get("unexpose", bool, False)))


async def _expose(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("expose", a, ("snapshot_id", "name", "mount"))
    return await c.coord.expose(x.get("snapshot_id", str, required=True),
                                x.get("name", str), x.get("mount", str))


async def _unexpose(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("unexpose", a, ("snapshot_id",))
    return await c.coord.unexpose(x.get("snapshot_id", str, required=True))


async def _revert(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("revert", a, ("snapshot_id", "force"))
    return await c.coord.revert(x.get("snapshot_id", str, required=True),
                                bool(x.get("force", bool, False)), p, c.token)


async def _promote(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("promote", a, ("snapshot_id",))
    return await c.coord.promote(x.get("snapshot_id", str, required=True), p, c.token)


async def _split(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("split", a, ("snapshot_id", "name"))
    return await c.coord.split(x.get("snapshot_id", str, required=True),
                               x.get("name", str, required=True), p, c.token)


async def _end_backup(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("end_backup", a, ("set_id",))
    return await c.coord.end_backup(c.session, x.get("set_id", str))


async def _export(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("export", a, ("set_id",))
    return await c.coord.export_set(x.get("set_id", str, required=True))


async def _import(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("import", a, ("document",))
    return await c.coord.import_set(c.session, x.get("document", str, required=True))


async def _writers_list(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    Args("writers.list", a, ())
    return await c.coord.writers_list()


async def _check(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    Args("check", a, ())
    return await c.coord.check(c.token)


async def _scrub(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    Args("scrub", a, ())
    return await c.coord.scrub(p, c.token)


def _cancel_args(a: dict[str, Any]) -> int | str:
    x = Args("cancel", a, ("request",))
    rid: int | str = x.get("request", (int, str), required=True)
    return rid


async def _cancel(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    # The reader answers cancel requests at once (Connection._cancel_now); one reaches
    # the queue only when sent before hello, and _dispatch refuses it there. Run here
    # (in order), the request it names is over: there is nothing to cancel.
    return {"request": _cancel_args(a), "state": "done"}


HANDLERS: dict[str, Handler] = {
    "hello": _hello,
    "cancel": _cancel,
    "status": _status,
    "volume.create": _volume_create,
    "volume.list": _volume_list,
    "volume.resize": _volume_resize,
    "volume.delete": _volume_delete,
    "volume.present": _volume_present,
    "snapshot.create": _snapshot_create,
    "snapshot.list": _snapshot_list,
    "snapshot.show": _snapshot_show,
    "snapshot.delete": _snapshot_delete,
    "set.start": _set_start,
    "set.add": _set_add,
    "set.do": _set_do,
    "set.abort": _set_abort,
    "set.list": _set_list,
    "expose": _expose,
    "unexpose": _unexpose,
    "revert": _revert,
    "promote": _promote,
    "split": _split,
    "end_backup": _end_backup,
    "export": _export,
    "import": _import,
    "writers.list": _writers_list,
    "check": _check,
    "scrub": _scrub,
}
assert tuple(HANDLERS) == protocol.OPS


# --------------------------------------------------------------------------- connection
class _Progress:
    """Collects progress reports of one request; a pump task sends the latest one at most
    every PROGRESS_INTERVAL seconds."""

    def __init__(self) -> None:
        self.latest: tuple[int, int, str] | None = None
        self.changed = trio.Event()

    def report(self, done: int, total: int, what: str) -> None:
        self.latest = (done, total, what)
        self.changed.set()

    async def pump(self, conn: Connection, rid: Any) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            if self.latest is not None:
                done, total, what = self.latest
                await conn.send(protocol.progress_event(rid, done, total, what))
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
    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.coord = server.coord
        self.stream = stream
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
                self._session = self.coord.open_session(host, client)
            except VssError as e:
                await self.send(protocol.reply_error(rid, e))
                return
            st = self.coord.status()
            await self.send(protocol.reply_ok(rid, {
                "server": "shadowplex", "protocol": protocol.PROTOCOL_VERSION,
                "session": self.session.id, "pool": st["pool"], "pool_id": st["pool_id"],
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
                        result = await handler(self, args, progress.report)
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
            log.warning("session %s: %s cancelled (%s): nothing changed", self.session.id,
                        op, why if running.explicit else "the requester disconnected")
            if not running.explicit:
                return
            reply = protocol.reply_error(rid, VssError(
                "E_ABORT", f"{op} cancelled: nothing changed"
                + (" (the snapshot set was aborted)" if op in SCOPE_OPS else "")))
        if reply is not None:
            await self.send(reply)


# --------------------------------------------------------------------------- server
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

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await Connection(self, stream).run()
        except Exception:
            log.exception("control connection failed")

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
