"""Synchronous client of the control socket (what tools/ and scripts use).

    from provider.client import Client, ControlError

    with Client("/run/shadowplex/ab12.sock", client="backup-job") as c:
        res = c.snapshot_create(["db", "logs"], context="app-rollback",
                                progress=lambda done, total, what: ...)
        for snap in res["snapshots"]:
            print(snap["snapshot_id"], snap["device_object"])

One Client is one requester session: snapshot sets in auto-release contexts (backup,
file-share-backup) it creates are deleted by the daemon when the client closes or its
process dies. Every failure the daemon reports raises ControlError(name, message) with a
stable name (``VSS_E_*``, ``E_INVALIDARG``...); a daemon that cannot be reached raises
ControlError("VSS_E_PROVIDER_NOT_REGISTERED", ...) with a line saying what to do.
Not thread-safe: one request at a time per Client.

Interrupting a request (Ctrl-C in the caller while it waits for a reply): call
``interrupt(wait)``. It asks the daemon to cancel the request and waits at most ``wait``
seconds for the request's final reply, which tells what really happened (completed,
cancelled with nothing changed, failed, or still running in the daemon); see Verdict.
"""

from __future__ import annotations

# _socket, not socket: socket.py's enums and selectors cost ~2.5 ms of every CLI
# command's start-up, and a local session needs none of it (the TLS path imports socket)
import _socket
import itertools
import os
import time
from collections.abc import Callable, Sequence

from . import protocol
from .config import MAX_DOCUMENT_BYTES, default_socket_path

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any

CLOSE_WAIT = 30.0   # seconds close() waits for the daemon to end the session

ProgressCallback = Callable[[int, int, str], None] | None


class ControlError(Exception):
    """An error reply from the daemon, or a failure to talk to it."""

    def __init__(self, name: str, message: str, hresult: int | None = None) -> None:
        super().__init__(name, message)
        self.name = name
        self.message = message
        self.hresult = hresult

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


class Verdict:
    """What became of an interrupted request (Client.interrupt).

    state: "completed" (result: its result; the cancellation came too late),
    "cancelled" (error: E_ABORT, nothing changed), "failed" (error: it failed on its
    own), "running" (no final reply in time; answer: the daemon's answer to the cancel,
    e.g. {"state": "rolling-forward", "done": ..., "total": ...} for a revert that
    completes in the background, "cancelling", "not-cancellable"; None if none came),
    "none" (no request was waiting for its reply). A plain class, not a dataclass:
    dataclasses imports inspect, a few ms of every CLI command's start-up."""

    def __init__(self, state: str, op: str | None = None, result: Any = None,
                 error: ControlError | None = None,
                 answer: dict[str, Any] | None = None) -> None:
        self.state = state
        self.op = op
        self.result = result
        self.error = error
        self.answer = answer

    def __repr__(self) -> str:
        return (f"Verdict({self.state!r}, op={self.op!r}, result={self.result!r}, "
                f"error={self.error!r}, answer={self.answer!r})")


def _connect_unix(path: str, timeout: float | None) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise ControlError("VSS_E_PROVIDER_NOT_REGISTERED",
                           f"no shadowplex daemon listens on {path} ({e.strerror}); start "
                           "it with 'shadowplex serve'") from None
    except PermissionError:
        sock.close()
        raise ControlError("E_ACCESSDENIED", f"no permission to connect to {path} "
                           "(the socket is mode 0600 for its owner, usually root)") from None
    except OSError as e:
        sock.close()
        raise ControlError("VSS_E_PROVIDER_NOT_REGISTERED",
                           f"cannot connect to {path}: {e.strerror or e}") from None
    return sock


def _connect_tls(array: str, tls_dir: str | None, timeout: float | None) -> _socket.socket:
    """A TLS connection to the array's network control port, this host's certificate
    presented, the array's checked against the CA (and its name)."""
    import socket
    import ssl

    from nbd.settings import SettingsError, parse_listen
    from nbd.tls import client_context

    from .config import CONTROL_PORT
    if not tls_dir:
        raise ControlError("E_INVALIDARG", "--array needs --tls-dir DIR (this host's "
                           "certificates: 'shadowplex pki host NAME DIR')")
    try:
        host, port = parse_listen(array, CONTROL_PORT)
        ctx = client_context(tls_dir)
    except (SettingsError, ValueError, OSError, ssl.SSLError) as e:
        raise ControlError("E_INVALIDARG", f"--array {array}: {e}") from None
    try:
        raw = socket.create_connection((host, port), timeout=timeout if timeout else 30)
    except OSError as e:
        raise ControlError("VSS_E_PROVIDER_NOT_REGISTERED",
                           f"cannot connect to the array at {host}:{port}: "
                           f"{e.strerror or e}") from None
    try:
        sock = ctx.wrap_socket(raw, server_hostname=host)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        raise ControlError("E_ACCESSDENIED", f"TLS with the array at {host}:{port} "
                           f"failed: {getattr(e, 'reason', None) or e}") from None
    sock.settimeout(timeout)
    return sock


class Client:
    def __init__(self, socket_path: str | None = None, host: str | None = None,
                 client: str = "shadowplex", timeout: float | None = None,
                 pool: str | None = None, array: str | None = None,
                 tls_dir: str | None = None) -> None:
        """Connect and say hello. ``socket_path`` None: config.default_socket_path(pool)
        ($SHADOWPLEX_SOCKET, else ``pool``'s own socket, else the CLI's default).
        ``array`` "HOST[:PORT]": the array's network control port instead, over TLS with
        this host's certificates in ``tls_dir`` (its host is its certificate's CN:
        ``host``, if given, must be the same). ``timeout`` bounds connecting and each
        wait for data (None: wait as long as operations take)."""
        path = socket_path or default_socket_path(pool)
        self.socket_path = path if array is None else array
        self._ids = itertools.count(1)
        self._buf = bytearray()
        self._pending: tuple[int, str] | None = None   # (id, op) awaiting its reply
        # (op, reply) of the last request answered: interrupt() right after call()
        # received it (before it returned) still reports the truth
        self._answered: tuple[str, dict[str, Any]] | None = None
        self._timeout = timeout
        if array is not None:
            self._sock = _connect_tls(array, tls_dir, timeout)
            host = host or None   # the certificate says who this is
        else:
            self._sock = _connect_unix(path, timeout)
            host = host or _socket.gethostname()
        try:
            self.server = self.call("hello", {"host": host, "client": client,
                                              "protocol": protocol.PROTOCOL_VERSION}
                                    if host else {"client": client,
                                                  "protocol": protocol.PROTOCOL_VERSION})
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def close(self, wait: float = CLOSE_WAIT) -> None:
        """End the session and wait (at most ``wait`` s) until the daemon has ended it:
        the daemon closes its side only after deleting the session's auto-release
        snapshot sets, so a command run after this one never still sees them. (After
        an interrupt, pass a short wait: the daemon may still be running the request.)"""
        if self._sock.fileno() < 0:
            return
        try:
            self._sock.shutdown(_socket.SHUT_WR)
            if wait <= 0:
                return
            self._sock.settimeout(wait)
            while self._sock.recv(65536):   # replies nobody reads any more
                pass
        except OSError:   # the daemon is gone, or slow: the session ends without us
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, deadline: float | None = None) -> bytes | None:
        """One line from the daemon; with a deadline (time.monotonic()), None if none
        is complete by then."""
        scanned = 0   # how much of _buf holds no newline: a long line is scanned once
        while True:
            nl = self._buf.find(b"\n", scanned)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line
            if len(self._buf) > protocol.MAX_DOCUMENT_LINE:
                raise ControlError("VSS_E_UNEXPECTED", "the daemon sent an oversized message")
            scanned = len(self._buf)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._sock.settimeout(left)
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                if deadline is not None:
                    return None
                raise ControlError("VSS_E_REMOTE_SERVER_UNAVAILABLE",
                                   "the daemon did not answer in time") from None
            except OSError as e:
                raise ControlError("VSS_E_REMOTE_SERVER_UNAVAILABLE",
                                   f"connection to the daemon failed: {e.strerror or e}") from None
            if not data:
                raise ControlError("VSS_E_REMOTE_SERVER_UNAVAILABLE",
                                   "the daemon closed the connection (did it stop?)")
            self._buf += data

    def call(self, op: str, args: dict[str, Any] | None = None,
             progress: ProgressCallback = None) -> Any:
        """Send one request and wait for its reply; progress events go to ``progress``."""
        rid = next(self._ids)
        req = {"id": rid, "op": op, "args": {k: v for k, v in (args or {}).items()
                                             if v is not None}}
        try:
            data = protocol.encode(req, protocol.line_limit(op))
        except ValueError as e:
            raise ControlError("E_INVALIDARG", f"{op}: {e}") from None
        self._answered = None
        self._pending = (rid, op)   # before sending: an interrupt may come at any point
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._pending = None
            raise ControlError("VSS_E_REMOTE_SERVER_UNAVAILABLE",
                               f"cannot send to the daemon: {e.strerror or e}") from None
        while True:
            msg = self._message(self._readline())
            if msg.get("id") != rid:
                continue   # a late progress event of an earlier request
            if "progress" in msg:
                p = msg["progress"]
                if progress is not None and isinstance(p, dict):
                    try:
                        done, total = int(p.get("done", 0)), int(p.get("total", 0))
                    except (TypeError, ValueError, OverflowError):
                        continue   # a malformed progress event is not worth failing for
                    progress(done, total, str(p.get("what", "")))
                continue
            self._answered, self._pending = (op, msg), None
            return self._outcome(msg)

    @staticmethod
    def _message(line: bytes | None) -> dict[str, Any]:
        assert line is not None
        try:
            return protocol.decode(line)
        except protocol.ProtocolError as e:
            raise ControlError("VSS_E_UNEXPECTED", f"bad message from the daemon: "
                               f"{e.message}") from None

    @staticmethod
    def _outcome(msg: dict[str, Any]) -> Any:
        """A reply's result, or its error raised as a ControlError."""
        if msg.get("ok"):
            return msg.get("result")
        # an error reply; whatever its shape, the caller gets a ControlError with a
        # name and a non-empty one-line message
        err = msg.get("error")
        err = err if isinstance(err, dict) else {}
        name, message, hresult = err.get("name"), err.get("message"), err.get("hresult")
        raise ControlError(
            name if isinstance(name, str) and name.isidentifier() else "VSS_E_UNEXPECTED",
            " ".join(str(message).split()) if message is not None and str(message).strip()
            else "unknown error",
            hresult if isinstance(hresult, int) and not isinstance(hresult, bool) else None)

    def _verdict(self, op: str, msg: dict[str, Any]) -> Verdict:
        try:
            return Verdict("completed", op, result=self._outcome(msg))
        except ControlError as e:
            return Verdict("cancelled" if e.name == "E_ABORT" else "failed", op, error=e)

    def interrupt(self, wait: float = 0.8) -> Verdict:
        """The request whose reply call() was waiting for when it was interrupted
        (KeyboardInterrupt): ask the daemon to cancel it and wait at most ``wait`` s
        for its final reply. Never raises ControlError: a broken connection is a
        "running" verdict (the daemon decides alone then; status shows what runs)."""
        if self._pending is None:
            if self._answered is None:
                return Verdict("none")
            op, msg = self._answered
            return self._verdict(op, msg)
        rid, op = self._pending
        self._pending = None
        deadline = time.monotonic() + wait
        cid = next(self._ids)
        answer: dict[str, Any] | None = None
        try:
            self._sock.sendall(protocol.encode({"id": cid, "op": "cancel",
                                                "args": {"request": rid}}))
            while True:
                line = self._readline(deadline)
                if line is None:
                    return Verdict("running", op, answer=answer)
                msg = self._message(line)
                if msg.get("id") == cid and msg.get("ok") and "progress" not in msg:
                    res = msg.get("result")
                    answer = res if isinstance(res, dict) else None
                if msg.get("id") != rid or "progress" in msg:
                    continue
                self._answered = (op, msg)
                return self._verdict(op, msg)
        except (ControlError, OSError):
            return Verdict("running", op, answer=answer)
        finally:
            if self._sock.fileno() >= 0:
                self._sock.settimeout(self._timeout)

    def _obj(self, op: str, args: dict[str, Any] | None = None,
             progress: ProgressCallback = None) -> dict[str, Any]:
        res = self.call(op, args, progress)
        if not isinstance(res, dict):
            raise ControlError("VSS_E_UNEXPECTED", f"{op}: the daemon answered "
                               f"{type(res).__name__}, expected an object")
        return res

    def _list(self, op: str, args: dict[str, Any] | None = None,
              progress: ProgressCallback = None) -> list[dict[str, Any]]:
        res = self.call(op, args, progress)
        if not isinstance(res, list):
            raise ControlError("VSS_E_UNEXPECTED", f"{op}: the daemon answered "
                               f"{type(res).__name__}, expected a list")
        return res

    # ------------------------------------------------------------------ ops
    def status(self) -> dict[str, Any]:
        return self._obj("status")

    def volume_create(self, name: str, size: int | str) -> dict[str, Any]:
        return self._obj("volume.create", {"name": name, "size": size})

    def volume_list(self) -> list[dict[str, Any]]:
        return self._list("volume.list")

    def volume_resize(self, name: str, size: int | str) -> dict[str, Any]:
        return self._obj("volume.resize", {"name": name, "size": size})

    def volume_delete(self, name: str) -> None:
        self.call("volume.delete", {"name": name})

    def volume_present(self, name: str, hosts: Sequence[str]) -> dict[str, Any]:
        """LUN masking: present the volume to exactly ``hosts`` (the daemon's own host
        is the mount's root; others see MOUNT/hosts/<host>/volumes/<name>.img)."""
        return self._obj("volume.present", {"name": name, "hosts": list(hosts)})

    def snapshot_create(self, volumes: Sequence[str], context: str | int = "backup",
                        attributes: int | str | Sequence[str] | None = None,
                        kind: str | None = None,
                        progress: ProgressCallback = None, name: str | None = None,
                        description: str | None = None) -> dict[str, Any]:
        """``name``/``description``: each new snapshot's (a name is unique per volume;
        VOLUME@NAME names the snapshot afterwards)."""
        args = {"volumes": list(volumes), "context": context, "kind": kind,
                "attributes": list(attributes) if isinstance(attributes, list | tuple)
                else attributes, **_labels(name, description)}
        return self._obj("snapshot.create", args, progress)

    def set_start(self, context: str | int = "backup",
                  attributes: int | str | Sequence[str] | None = None,
                  name: str | None = None, description: str | None = None) -> str:
        args = {"context": context, "attributes": list(attributes)
                if isinstance(attributes, list | tuple) else attributes,
                **_labels(name, description)}
        return str(self.call("set.start", args)["set_id"])

    def set_add(self, volume: str, set_id: str | None = None) -> str:
        return str(self.call("set.add", {"volume": volume, "set_id": set_id})["snapshot_id"])

    def set_do(self, set_id: str | None = None, progress: ProgressCallback = None,
               name: str | None = None, description: str | None = None) -> dict[str, Any]:
        return self._obj("set.do", {"set_id": set_id, **_labels(name, description)},
                         progress)

    def set_abort(self, set_id: str | None = None) -> None:
        self.call("set.abort", {"set_id": set_id})

    def set_list(self) -> list[dict[str, Any]]:
        return self._list("set.list")

    def snapshot_list(self, set_id: str | None = None, volume: str | None = None,
                      context: str | int | None = None) -> list[dict[str, Any]]:
        return self._list("snapshot.list",
                         {"set_id": set_id, "volume": volume, "context": context})

    def snapshot_show(self, snapshot_id: str | None = None, set_id: str | None = None) -> Any:
        return self.call("snapshot.show", {"snapshot_id": snapshot_id, "set_id": set_id})

    def snapshot_diff(self, snapshot_id: str, to_snapshot_id: str | None = None
                      ) -> dict[str, Any]:
        """The chunks touched since snapshot ``snapshot_id``, up to ``to_snapshot_id``
        (None: the live volume): {snapshot_id, to_snapshot_id, volume, chunk_size,
        from_size, size, extents_total, changed_bytes, extents: [[offset, length]]},
        every page of the reply fetched and joined."""
        res = self._obj("snapshot.diff", {"snapshot_id": snapshot_id,
                                          "to_snapshot_id": to_snapshot_id})
        extents = list(res["extents"])
        while res.get("next") is not None:
            res = self._obj("snapshot.diff", {"snapshot_id": snapshot_id,
                                              "to_snapshot_id": to_snapshot_id,
                                              "after": res["next"]})
            for o, n in res["extents"]:
                if extents and extents[-1][0] + extents[-1][1] == o:   # cut at a page end
                    extents[-1] = [extents[-1][0], extents[-1][1] + n]
                else:
                    extents.append([o, n])
        res.pop("next", None)
        return {**res, "extents": extents}

    def snapshot_delete(self, snapshot_id: str | None = None, set_id: str | None = None,
                        oldest: str | None = None, all: bool = False,
                        context: str | int | None = None,
                        unexpose: bool = False,
                        volume: str | None = None) -> dict[str, Any]:
        """One of: ``snapshot_id``, ``set_id``, ``oldest`` (a volume: its oldest
        snapshot), ``volume`` (all of its snapshots), ``all``."""
        return self._obj("snapshot.delete", {
            "snapshot_id": snapshot_id, "set_id": set_id, "oldest": oldest,
            "all": all or None, "context": context, "unexpose": unexpose or None,
            "volume": volume})

    def expose(self, snapshot_id: str, name: str | None = None,
               mount: str | None = None) -> dict[str, Any]:
        if mount:   # relative to the caller's directory, as mount(8) does; "" stays
            mount = os.path.abspath(mount)  # "" (the daemon refuses it, not the cwd)
        return self._obj("expose", {"snapshot_id": snapshot_id, "name": name,
                                    "mount": mount})

    def unexpose(self, snapshot_id: str) -> dict[str, Any]:
        return self._obj("unexpose", {"snapshot_id": snapshot_id})

    def revert(self, snapshot_id: str, force: bool = False,
               progress: ProgressCallback = None) -> dict[str, Any]:
        return self._obj("revert", {"snapshot_id": snapshot_id,
                                    "force": force or None}, progress)

    def promote(self, snapshot_id: str, progress: ProgressCallback = None) -> dict[str, Any]:
        return self._obj("promote", {"snapshot_id": snapshot_id}, progress)

    def split(self, snapshot_id: str, name: str,
              progress: ProgressCallback = None) -> dict[str, Any]:
        return self._obj("split", {"snapshot_id": snapshot_id, "name": name},
                         progress)

    def end_backup(self, set_id: str | None = None) -> dict[str, Any]:
        return self._obj("end_backup", {"set_id": set_id})

    def export(self, set_id: str) -> dict[str, Any]:
        """The Backup Components Document of a TRANSPORTABLE set: {set_id, document,
        writers: [{name, document}]} (documents as XML text)."""
        return self._obj("export", {"set_id": set_id})

    def import_set(self, document: str | bytes) -> dict[str, Any]:
        """Import a Backup Components Document on this session's host: {set_id, host,
        origin, snapshots: [snapshot, device_object as this host sees it]}."""
        if isinstance(document, str):
            size = len(document.encode("utf-8", "surrogatepass"))
        else:
            size = len(document)
        if size > MAX_DOCUMENT_BYTES:   # the daemon says the same; do not send it
            raise ControlError("VSS_E_INVALID_XML_DOCUMENT", f"the document is {size} "
                               f"bytes, more than the {MAX_DOCUMENT_BYTES >> 20} MiB limit: "
                               "this is not a document shadowplex wrote")
        if isinstance(document, bytes):
            try:
                document = document.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ControlError("VSS_E_INVALID_XML_DOCUMENT", "the document is not "
                                   f"UTF-8 text (byte {e.start}); convert a Windows BCD "
                                   "with iconv -f UTF-16 -t UTF-8") from None
        return self._obj("import", {"document": document})

    def writers_list(self) -> list[dict[str, Any]]:
        return self._list("writers.list")

    def check(self, volume: str | None = None,
              progress: ProgressCallback = None) -> dict[str, Any]:
        """The pool's (or ``volume``'s and its snapshots') consistency: ok, problems,
        and what was read: luns, chunks_verified, bytes_read."""
        return self._obj("check", {"volume": volume} if volume else None, progress)

    def scrub(self, volume: str | None = None,
              progress: ProgressCallback = None) -> dict[str, Any]:
        """check plus a read of every allocated byte of each LUN (of ``volume``)."""
        return self._obj("scrub", {"volume": volume} if volume else None, progress)


def _labels(name: str | None, description: str | None) -> dict[str, str]:
    """Only what is given: a daemon before names refuses unknown arguments."""
    return {k: v for k, v in (("name", name), ("description", description)) if v is not None}
