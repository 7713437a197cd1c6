"""The control API's wire format and its error names (shared by server and client).

Transport: a Unix stream socket, newline-delimited JSON, UTF-8, one object per line, at
most MAX_LINE bytes (1 MiB) per request line (newline included). Two exceptions carry
documents: requests of the ops in DOCUMENT_OPS (``import``) and every reply (an export
carries the Backup Components and Writer Metadata Documents) may be up to
MAX_DOCUMENT_LINE bytes: enough for a document of documents.MAX_DOCUMENT_BYTES (16 MiB)
even if JSON escapes every character of it as two bytes. The server reads at most that
much of any line; a longer one is skipped with one error.

    request   {"id": 7, "op": "snapshot.create", "args": {...}}
    reply     {"id": 7, "ok": true, "result": ...}
              {"id": 7, "ok": false, "error": {"name": "VSS_E_BAD_STATE",
                                               "hresult": 2147754753, "message": "..."}}
    progress  {"id": 7, "progress": {"done": 3, "total": 10, "what": "plex sync"}}
    cancel    {"id": 8, "op": "cancel", "args": {"request": 7}}   answered at once,
              out of order: {"id": 8, "ok": true, "result": {"request": 7, "state": ...}};
              request 7 then gets its true final reply (docs/provider.md)

The first request of a connection must be ``hello`` (``{"host": ..., "client": ...}``). One
connection is one requester session: snapshot sets in auto-release contexts (backup,
file-share-backup) created through it are deleted when it ends or drops.

Errors on the wire always carry a name from provider.vss.HRESULTS (``VSS_E_*`` or one of
the generic COM names ``E_INVALIDARG``, ``E_ACCESSDENIED``). ``to_vss_error()`` is the ONE
place where exceptions of the lower layers become those names; docs/provider.md lists the
mapping and why.
"""

from __future__ import annotations

import json

from .config import MAX_DOCUMENT_BYTES

# the socket rule lives in config (the CLI reads it without importing all of this);
# re-exported because the wire's two ends know it as protocol's
from .config import SOCKET_DIR as SOCKET_DIR
from .config import SOCKET_ENV as SOCKET_ENV
from .config import default_socket_path as default_socket_path
from .hresults import VssError  # not .vss: its enums cost the CLI's start-up

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE = 1 << 20          # bytes per request line, newline included
# import requests and replies: a 16 MiB document, JSON-escaped (<= 2 bytes per character
# of a well-formed XML document: quotes, backslashes, tab/CR/LF), plus the envelope
MAX_DOCUMENT_LINE = 2 * MAX_DOCUMENT_BYTES + (1 << 20)
DOCUMENT_OPS = frozenset({"import", "array.import"})

# The ops the server understands (names are stable; docs/provider.md describes each).
OPS: tuple[str, ...] = (
    "hello", "cancel",
    "status",
    "volume.create", "volume.list", "volume.resize", "volume.delete", "volume.present",
    "snapshot.create", "snapshot.list", "snapshot.show", "snapshot.diff",
    "snapshot.delete",
    "set.start", "set.add", "set.do", "set.abort", "set.list",
    "expose", "unexpose",
    "revert", "promote", "split",
    "end_backup",
    "export", "import",
    "writers.list",
    "check", "scrub",
    # host daemons (provider/array_ops.py)
    "array.info", "array.list", "array.watch", "array.set.claim", "array.set.renew",
    "array.set.release", "array.prepare", "array.plex_sync_step", "array.commit",
    "array.abort", "array.delete", "array.expose", "array.export", "array.import",
)


class ProtocolError(VssError):
    """A malformed message (not JSON, not an object, missing fields, too long)."""

    def __init__(self, message: str) -> None:
        super().__init__("E_INVALIDARG", message)


# --------------------------------------------------------------------------- encoding
def line_limit(op: str | None) -> int:
    """The longest request line ``op`` may send (replies: MAX_DOCUMENT_LINE)."""
    return MAX_DOCUMENT_LINE if op in DOCUMENT_OPS else MAX_LINE


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB"


def encode(msg: dict[str, Any], limit: int = MAX_LINE) -> bytes:
    """One message as a line. ValueError if it would exceed ``limit`` bytes."""
    line = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = line.encode() + b"\n"
    if len(data) > limit:
        raise ValueError(f"message of {len(data)} bytes exceeds the {limit}-byte "
                         f"({_mib(limit)}) limit")
    return data


def decode(line: bytes, limit: int = MAX_DOCUMENT_LINE) -> dict[str, Any]:
    """Parse one line (without or with its newline) into an object; ProtocolError if bad.
    Which ops may send lines longer than MAX_LINE is checked by check_line_length()."""
    if len(line) > limit:
        raise ProtocolError(f"message longer than {limit} bytes ({_mib(limit)})")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("message is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"message is not JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:   # huge numbers, absurd nesting
        raise ProtocolError(f"message is not usable JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a JSON object, not {type(obj).__name__}")
    return obj


def shown(text: str) -> str:
    """A name sent by a requester (an op, an argument key), for a one-line message: as
    sent if printable and short, else its shortened repr (a hostile name may hold
    newlines or megabytes)."""
    if text.isprintable() and len(text) <= 64:
        return text
    r = repr(text)
    return r if len(r) <= 64 else r[:60] + "...'"


def parse_request(obj: dict[str, Any]) -> tuple[int | str | None, str, dict[str, Any]]:
    """(id, op, args) of a request object; ProtocolError if a field is wrong."""
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int | str)):
        raise ProtocolError("'id' must be an integer or a string")
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError("request has no 'op' (a string such as \"status\")")
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(f"'args' of {shown(op)} must be a JSON object")
    return rid, op, args


def check_line_length(op: str, length: int) -> None:
    """ProtocolError if a request line of ``length`` bytes is too long for ``op``."""
    limit = line_limit(op)
    if length > limit:
        only = (f" (only {', '.join(sorted(DOCUMENT_OPS))} may carry up to "
                f"{_mib(MAX_DOCUMENT_LINE)})" if limit == MAX_LINE else "")
        raise ProtocolError(f"{shown(op)}: message of {length} bytes is longer than the "
                            f"{limit}-byte ({_mib(limit)}) limit{only}")


def reply_ok(rid: int | str | None, result: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def reply_error(rid: int | str | None, err: VssError) -> dict[str, Any]:
    return {"id": rid, "ok": False,
            "error": {"name": err.name, "hresult": err.hresult, "message": err.message}}


def progress_event(rid: int | str | None, done: int, total: int, what: str) -> dict[str, Any]:
    return {"id": rid, "progress": {"done": int(done), "total": int(total), "what": what}}


# --------------------------------------------------------------------------- error names
def _error_names() -> tuple[tuple[type[BaseException], str], ...]:
    """Lower-layer exception type -> stable wire name. Order matters only for subclasses
    (the first match wins), so subclasses come before their bases. Built at the first
    error, not at import: the CLI imports this module (through provider.client) on every
    command, and blockstore and fuse_mount cost it tens of ms of start-up."""
    from blockstore import errors as bse
    from fuse_mount import loopdev
    return (
        (bse.NotFound, "VSS_E_OBJECT_NOT_FOUND"),
        (bse.Exists, "VSS_E_OBJECT_ALREADY_EXISTS"),
        (bse.InvalidName, "E_INVALIDARG"),
        (bse.InvalidSize, "E_INVALIDARG"),
        (bse.OutOfRange, "E_INVALIDARG"),
        # A snapshot named where a volume is needed: snapshots are read-only LUNs.
        (bse.ReadOnly, "E_ACCESSDENIED"),
        (bse.Busy, "VSS_E_VOLUME_IN_USE"),
        (bse.PoolLocked, "VSS_E_PROVIDER_IN_USE"),
        (bse.NoSpace, "VSS_E_INSUFFICIENT_STORAGE"),
        (bse.InvalidState, "VSS_E_BAD_STATE"),
        (bse.Unsupported, "VSS_E_NOT_SUPPORTED"),
        # The requester cancelled it and nothing changed (an operation that cannot undo
        # what it did completes instead: it never raises Cancelled then).
        (bse.Cancelled, "E_ABORT"),
        # Lost or corrupt data, a damaged pool: the provider failed, the caller did
        # nothing wrong and retrying the same call will not help. VSS has exactly this
        # name for "the provider returned an unexpected error"; the message says what was
        # lost.
        (bse.SnapshotInvalid, "VSS_E_UNEXPECTED_PROVIDER_ERROR"),
        (bse.CorruptData, "VSS_E_UNEXPECTED_PROVIDER_ERROR"),
        (bse.FormatError, "VSS_E_UNEXPECTED_PROVIDER_ERROR"),
        # expose --mount: a bad target directory is the caller's argument; an image
        # without a filesystem cannot be mounted (not supported); any other
        # losetup/mount failure is the provider's.
        (loopdev.MountTargetError, "E_INVALIDARG"),
        (loopdev.NoFilesystemError, "VSS_E_NOT_SUPPORTED"),
        (loopdev.LoopError, "VSS_E_UNEXPECTED_PROVIDER_ERROR"),
    )


_ERROR_NAMES: tuple[tuple[type[BaseException], str], ...] = ()


def error_name(exc: BaseException) -> str | None:
    """The wire name of a known exception type, None for anything unexpected."""
    global _ERROR_NAMES
    if isinstance(exc, VssError):
        return exc.name
    if not _ERROR_NAMES:
        _ERROR_NAMES = _error_names()
    for cls, name in _ERROR_NAMES:
        if isinstance(exc, cls):
            return name
    return "VSS_E_INSUFFICIENT_STORAGE" if _full_filesystem(exc) else None


def _full_filesystem(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT or SQLITE_FULL from below: the pool's filesystem is full -- a
    condition of the machine, not a bug (no traceback), named as NoSpace is."""
    from blockstore.errors import disk_full
    return disk_full(exc)


def _store_error(exc: BaseException) -> bool:
    from blockstore.errors import StoreError
    return isinstance(exc, StoreError)


def to_vss_error(exc: BaseException) -> VssError:
    """Any exception -> VssError with a stable name and a one-line message.

    Unknown exception types are bugs: logged with their traceback, sent as VSS_E_UNEXPECTED.
    """
    if isinstance(exc, VssError):
        return exc
    name = error_name(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if name is None:
        import logging  # here: requesters import this module and never log through it
        logging.getLogger(__name__).error("unexpected error: %s", message, exc_info=exc)
        return VssError("VSS_E_UNEXPECTED", f"internal error ({type(exc).__name__}: "
                        f"{message}); see the daemon's log")
    if name == "VSS_E_INSUFFICIENT_STORAGE" and not _store_error(exc):
        message = f"no room ({message}): free space on the pool's filesystem and retry"
    return VssError(name, message)
