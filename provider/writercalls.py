"""Calling the writers: every writer in parallel within a deadline, their metadata for an
export, their listing, and the names an error or a status gives them.

The coordinator owns the writer objects (Coordinator.writers, built once by
writer_objects); these functions keep no state. They run on the trio thread; each call
into a writer runs in a worker thread (a writer may block: fsfreeze, a database freeze),
abandoned when its deadline passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import trio

from .model import WriterEvent, in_thread
from .vss import VssError
from .writers import Writer, WriterSet

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


def writer_objects(writers: Iterable[Any], freeze_timeout: float) -> list[Any]:
    """What the coordinator calls: objects with the event interface (freeze(event),
    thaw(event), abort(event), backup_complete(event), identify()) -- a WriterSet, or a
    test double. Plain Writer instances are grouped into one WriterSet (freeze order,
    rollback), whose own deadline ends before the coordinator's."""
    out: list[Any] = []
    loose: list[Writer] = []
    for w in writers:
        (loose if isinstance(w, Writer) else out).append(w)
    if loose:
        out.append(WriterSet(loose, freeze_timeout=max(freeze_timeout / 2,
                                                       freeze_timeout - 2.0)))
    return out


async def call_writers(writers: list[Any], method: str, ev: WriterEvent,
                       timeout: float, what: str) -> list[tuple[Any, BaseException]]:
    """Call ``method`` on every writer in parallel threads, within ``timeout``.
    Returns the failures (a writer that did not answer in time fails with
    VSS_E_WRITER_NOT_RESPONDING)."""
    failures: list[tuple[Any, BaseException]] = []

    async def one(w: Any) -> None:
        try:
            await in_thread(getattr(w, method), ev, abandon=True)
        except trio.Cancelled:
            raise
        except BaseException as e:   # noqa: BLE001 - each writer's failure is collected and reported
            failures.append((w, e))
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as n:
            for w in writers:
                n.start_soon(one, w)
    if scope.cancelled_caught:
        done = {id(w) for w, _ in failures}
        for w in writers:
            if id(w) not in done:
                failures.append((w, VssError("VSS_E_WRITER_NOT_RESPONDING",
                                             f"writer {wname(w)} did not {what} within "
                                             f"{timeout:g} s")))
    return failures


def writer_metadata(writers: Iterable[Any]) -> list[Any]:
    """WriterMetadata of every writer (for the export); runs in a worker thread."""
    from .writers.base import WriterMetadata
    out: list[Any] = []
    for w in writers:
        try:
            if isinstance(w, WriterSet):
                out.extend(w.identify_all())
            else:
                meta = w.identify()
                if isinstance(meta, WriterMetadata):
                    out.append(meta)
        except Exception as e:   # noqa: BLE001 - a writer that cannot identify is left out; logged
            log.warning("writer %s did not identify itself: %s", wname(w), e)
    return out


async def writers_list(writers: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for w in writers:
        try:
            meta = await in_thread(w.identify)
        except Exception as e:   # noqa: BLE001 - reported in the listing
            out.append({"name": wname(w), "error": str(e)})
            continue
        entry = _jsonable(meta, wname(w))
        inner = entry.get("writers")
        if isinstance(inner, list):   # a WriterSet: one entry per writer
            for x in inner:
                if isinstance(x, dict):
                    x.setdefault("name", x.get("writer_name"))
                    out.append(x)
        else:
            out.append(entry)
    return out


def names(w: Any) -> list[str]:
    """Names of the writers behind one writer object (a WriterSet has several)."""
    return [wname(x) for x in (w.writers if isinstance(w, WriterSet) else [w])]


def culprit(w: Any, e: BaseException) -> str:
    """The writer to blame: the one a WriterSet's error names, else the object called."""
    return str(getattr(e, "writer", None) or wname(w))


def message(e: BaseException) -> str:
    return e.message if isinstance(e, VssError) else " ".join(str(e).split())


def wname(w: Any) -> str:
    return str(getattr(w, "name", None) or type(w).__name__)


def _jsonable(meta: Any, name: str) -> dict[str, Any]:
    """A writer's identify() answer as JSON (a dict, a dataclass, or to_json())."""
    if hasattr(meta, "to_json"):
        meta = meta.to_json()
    elif hasattr(meta, "__dataclass_fields__"):
        meta = asdict(meta)
    if not isinstance(meta, dict):
        meta = {"metadata": str(meta)}
    out: dict[str, Any] = dict(meta)
    out.setdefault("name", name)
    return out
