"""The control protocol's ops: one small async handler per op, which checks its
arguments (``Args``: typed, unknown keys refused) and calls the coordinator; the table
``HANDLERS`` (its keys are protocol.OPS, in order). provider/control.py runs them, one
request at a time per connection, and decides how each is cancelled (TOKEN_OPS get a
cancel token, SCOPE_OPS are cancelled as trio code; see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import protocol
from .array_ops import ARRAY_HANDLERS
from .coordinator import ProgressFn
from .vss import VssError

if TYPE_CHECKING:
    from .control import Connection

Handler = Callable[["Connection", dict[str, Any], ProgressFn], Awaitable[Any]]
# how each op is cancelled (control.py's docstring); any other op is not cancellable
TOKEN_OPS = frozenset({"revert", "promote", "split", "scrub", "check"})
SCOPE_OPS = frozenset({"set.do", "snapshot.create", "array.watch"})

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
    x = Args("snapshot.create", a, ("volumes", "context", "attributes", "kind", "name",
                                    "description"))
    vols = _str_list("snapshot.create", x.get("volumes", list, required=True), "volumes")
    return await c.coord.create(c.session, vols, x.get("context", CTX, "backup"),
                                x.get("attributes", ATTRS), x.get("kind", str), p,
                                x.get("name", str), x.get("description", str))


async def _set_start(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.start", a, ("context", "attributes", "name", "description"))
    sid = await c.coord.start_set(c.session, x.get("context", CTX, "backup"),
                                  x.get("attributes", ATTRS), x.get("name", str),
                                  x.get("description", str))
    return {"set_id": sid}


async def _set_add(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.add", a, ("volume", "set_id"))
    s = c.coord.own_set(c.session, x.get("set_id", str), "add a volume")
    sid = c.coord.add_to_snapshot_set(c.session, x.get("volume", str, required=True),
                                      s.set_id)
    return {"set_id": s.set_id, "snapshot_id": sid}


async def _set_do(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("set.do", a, ("set_id", "name", "description"))
    s = c.coord.own_set(c.session, x.get("set_id", str), "do the snapshot set")
    if x.get("name", str) is not None or x.get("description", str) is not None:
        c.coord.label_set(s, x.get("name", str), x.get("description", str))
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


async def _snapshot_diff(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("snapshot.diff", a, ("snapshot_id", "to_snapshot_id", "after"))
    after = x.get("after", int, 0)
    if after < 0:
        raise _bad(f"snapshot.diff: argument 'after' must be >= 0, not {after}")
    return await c.coord.snapshot_diff(x.get("snapshot_id", str, required=True),
                                       x.get("to_snapshot_id", str), after)


async def _snapshot_delete(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("snapshot.delete", a,
             ("snapshot_id", "set_id", "oldest", "all", "context", "unexpose", "volume"))
    return await c.coord.snapshot_delete(
        x.get("snapshot_id", str), x.get("set_id", str), x.get("oldest", str),
        bool(x.get("all", bool, False)), x.get("context", CTX),
        bool(x.get("unexpose", bool, False)), x.get("volume", str))


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
    x = Args("check", a, ("volume",))
    return await c.coord.check(p, x.get("volume", str), c.token)


async def _scrub(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = Args("scrub", a, ("volume",))
    return await c.coord.scrub(p, x.get("volume", str), c.token)


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
    "snapshot.diff": _snapshot_diff,
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
HANDLERS.update(ARRAY_HANDLERS)
assert tuple(HANDLERS) == protocol.OPS


