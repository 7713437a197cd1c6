"""The control protocol's array.* ops: what a host daemon (provider/remote_array.py)
asks of the array it mounts (provider/array_service.py answers; docs/hosts.md).

Arguments are checked like every op's (control_ops.Args: typed, unknown keys refused).
The session is the host's (its certificate): access.py's rules apply before a handler
runs -- ``volume`` must be presented to the host, ``snapshot_id`` must be visible to it;
a snapshot the host is about to prepare is named ``new_id`` (nobody sees it yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .vss import VssError

if TYPE_CHECKING:
    from .control import Connection
    from .control_ops import Handler
    from .coordinator import ProgressFn


def _args(op: str, a: dict[str, Any], allowed: tuple[str, ...]) -> Any:
    from .control_ops import Args
    return Args(op, a, allowed)


async def _info(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    _args("array.info", a, ())
    return c.coord.array_service.info()


async def _list(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    _args("array.list", a, ())
    return c.coord.array_service.listing(c.session.host)


async def _watch(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.watch", a, ("after", "timeout"))
    return await c.coord.array_service.watch(c.session.host, x.get("after", str),
                                             float(x.get("timeout", (int, float), 25.0)))


async def _claim(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.set.claim", a, ("set_id", "lease", "context", "attributes"))
    return c.coord.host_sets.claim(c.session, x.get("set_id", str, required=True),
                                   float(x.get("lease", (int, float), 30.0)),
                                   x.get("context", int, 0), x.get("attributes", int, 0))


async def _renew(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.set.renew", a, ("set_id", "lease"))
    return c.coord.host_sets.renew(c.session, x.get("set_id", str, required=True),
                                   float(x.get("lease", (int, float), 30.0)))


async def _release(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.set.release", a, ("set_id", "created"))
    await c.coord.host_sets.release(c.session, x.get("set_id", str, required=True),
                                    bool(x.get("created", bool, False)))
    return None


async def _prepare(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.prepare", a, ("volume", "kind", "new_id", "set_id", "attributes"))
    kind = x.get("kind", str, "differential")
    if kind not in ("differential", "plex"):
        raise VssError("E_INVALIDARG", f"array.prepare: kind {kind!r}: differential or plex")
    return await c.coord.host_sets.prepare(
        c.session, x.get("volume", str, required=True), kind,
        x.get("new_id", str, required=True), x.get("set_id", str, required=True),
        int(x.get("attributes", int, 0)))


async def _sync_step(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    import trio
    x = _args("array.plex_sync_step", a, ("snapshot_id", "max_bytes"))
    sid = x.get("snapshot_id", str, required=True)
    c.coord.host_sets.snapshot_of(c.session, sid)
    step = int(x.get("max_bytes", int, 64 << 20))
    pool = c.coord.pool
    done, total = await trio.to_thread.run_sync(
        lambda: pool.plex_sync_step(sid, max(1 << 20, min(step, 256 << 20))))
    return {"done": done, "total": total}


async def _commit(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    from .control_ops import _str_list
    x = _args("array.commit", a, ("snapshot_ids",))
    ids = _str_list("array.commit", x.get("snapshot_ids", list, required=True),
                    "snapshot_ids")
    await c.coord.host_sets.commit(c.session, ids)
    return None


async def _abort(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.abort", a, ("snapshot_id",))
    await c.coord.host_sets.drop_snapshot(c.session, x.get("snapshot_id", str,
                                                           required=True))
    return None


async def _delete(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.delete", a, ("snapshot_id",))
    await c.coord.host_sets.delete(c.session, x.get("snapshot_id", str, required=True))
    return None


async def _expose(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.expose", a, ("snapshot_id", "name"))
    return await c.coord.host_sets.expose(c.session, x.get("snapshot_id", str,
                                                           required=True),
                                          x.get("name", str))


async def _export(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.export", a, ("set_id",))
    return c.coord.host_sets.export(c.session, x.get("set_id", str, required=True))


async def _import(c: Connection, a: dict[str, Any], p: ProgressFn) -> Any:
    x = _args("array.import", a, ("document",))
    # the array's own import (transport.py): LocateLuns presents the set's LUNs to
    # this host only, after every check of the document against the array
    return await c.coord.transport.import_set(c.session, x.get("document", str,
                                                               required=True))


ARRAY_HANDLERS: dict[str, Handler] = {
    "array.info": _info,
    "array.list": _list,
    "array.watch": _watch,
    "array.set.claim": _claim,
    "array.set.renew": _renew,
    "array.set.release": _release,
    "array.prepare": _prepare,
    "array.plex_sync_step": _sync_step,
    "array.commit": _commit,
    "array.abort": _abort,
    "array.delete": _delete,
    "array.expose": _expose,
    "array.export": _export,
    "array.import": _import,
}
