"""The coordinator's objects and the small helpers its modules share.

Session (one requester), SnapshotSet (a set in creation), WriterEvent (what a writer is
told), the marks of volumes in use (Revert | InSet), the argument parsers (sizes,
attribute masks, GUIDs) and the two trio helpers every module uses to leave the trio
thread (in_thread) and to report progress from a worker thread (thread_progress).
Nothing here holds state of its own: the coordinator owns every Session and SnapshotSet
(provider/coordinator.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from . import vss
from .hardware import DIFFERENTIAL
from .vss import Attr, Context, SnapshotState, VssError

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split

SS = SnapshotState
T = TypeVar("T")

# progress(done, total, what), always called on the trio thread
ProgressFn = Callable[[int, int, str], None] | None

NIL_GUID = "00000000-0000-0000-0000-000000000000"
DEFAULTS: dict[str, Any] = {
    "default_kind": DIFFERENTIAL,   # automagic choice when neither DIFFERENTIAL nor PLEX
    "freeze_timeout": 60.0,         # seconds for every writer to freeze (and to thaw)
    "hold_deadline": 10.0,          # seconds writes may be held (flush & hold -> release)
    "writer_timeout": 60.0,         # other writer events (abort, backup-complete)
    "revert_hold": 24 * 3600.0,     # writes to a volume wait while it is reverted
}


# --------------------------------------------------------------------------- objects
@dataclass(eq=False)
class Session:
    """One requester session (one control connection, or an in-process caller)."""

    id: int
    host: str
    client: str
    started: float = field(default_factory=time.time)
    # auto-release sets whose lifetime is this session's: changed through bind_lifetime
    # only (and emptied by the coordinator as the session ends, deleting them)
    sets: list[str] = field(default_factory=list)
    last_created: str | None = None                  # for end_backup without a set id
    closed: bool = False


def bind_lifetime(sessions: Iterable[Session], set_id: str, owner: Session | None) -> None:
    """The auto-release set ``set_id`` lives as long as ``owner`` from now on (None: no
    session; the set is gone or persistent): the one place a set moves between the
    sessions' lists (created: its requester; imported: the importing session; deleted:
    none)."""
    for s in sessions:
        if s is not owner and set_id in s.sets:
            s.sets.remove(set_id)
    if owner is not None and set_id not in owner.sets:
        owner.sets.append(set_id)


@dataclass(eq=False)
class SnapshotSet:
    """A set being created (and, briefly, just created)."""

    set_id: str
    context: Context
    attributes: Attr                    # context bits | requested options
    session: Session | None
    state: SnapshotState = SS.PREPARING
    volumes: dict[str, str] = field(default_factory=dict)   # volume -> snapshot id
    created: float = field(default_factory=time.time)
    doing: bool = False                 # DoSnapshotSet has started
    prepared: bool = False              # the hardware provider holds state for it
    writers: list[Any] = field(default_factory=list)   # writers told to freeze: they
                                                        # get Abort if the set fails
    hold: Any = None                    # the barrier Hold while writes are held
    error: VssError | None = None
    name: str | None = None             # every snapshot's name (unique per volume)
    description: str | None = None      # and description (provider/snapshot_refs.py)

    def to_json(self) -> dict[str, Any]:
        return {"set_id": self.set_id, "context": self.context.cli_name,
                "attributes": int(self.attributes), "state": self.state.name,
                "name": self.name, "description": self.description,
                "volumes": [{"volume": v, "snapshot_id": s, "name": self.name}
                            for v, s in self.volumes.items()],
                "requester": self.session.host if self.session else None,
                "created": self.created}


@dataclass(frozen=True)
class WriterEvent:
    """What a writer is told about the set it freezes for."""

    set_id: str
    context: Context
    volumes: tuple[str, ...]
    volume_paths: tuple[str, ...]       # MOUNT/volumes/<name>.img (empty without a mount)
    snapshot_ids: tuple[str, ...]


# A volume's mark: what uses it, so that nothing else changes it meanwhile (resize,
# delete, another set, a revert). str() is how status and the volume list show it.
@dataclass(frozen=True)
class Revert:
    """The volume is being reverted to one of its snapshots."""

    def __str__(self) -> str:
        return "revert"


@dataclass(frozen=True)
class InSet:
    """The volume is in a snapshot set being created."""

    set_id: str

    def __str__(self) -> str:
        return f"snapshot set {self.set_id}"


Mark = Revert | InSet


# --------------------------------------------------------------------------- parsers
_SIZE_RE = re.compile(r"(\d+)\s*([kmgtp]?)(i?b?)", re.I)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as 10G, 512M, 4096, 1TiB (powers of 1024)."""
    if isinstance(value, bool):
        raise VssError("E_INVALIDARG", f"size {value!r} is not a number of bytes")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) << (10 * " kmgtp".index(m.group(2).lower() or " "))
    raise VssError("E_INVALIDARG", f"size {value!r} is not a size (bytes, or 10G, 512M, 1T)")


def parse_attributes(value: int | str | Sequence[str] | None) -> int:
    """An attribute mask from an int, a string of names (``differential,transportable``)
    or a list of names; unknown names are an unsupported context."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise VssError("VSS_E_UNSUPPORTED_CONTEXT", f"attributes {value!r} are not a mask")
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, str) or (isinstance(value, list | tuple)
                                      and all(isinstance(x, str) for x in value)):
            return int(vss.parse_attr_names(value))
    except ValueError as e:
        raise VssError("VSS_E_UNSUPPORTED_CONTEXT", str(e)) from None
    raise VssError("VSS_E_UNSUPPORTED_CONTEXT",
                   f"attributes {value!r} are not a mask or names")


def guid(value: Any, what: str) -> str:
    try:
        return vss.guid(value)
    except ValueError:
        raise VssError("E_INVALIDARG", f"{value!r} is not a {what} (a GUID)") from None


# --------------------------------------------------------------------------- trio helpers
def thread_progress(progress: ProgressFn, what: str) -> Callable[[int, int], None] | None:
    """A progress callback a worker thread may call; it reports on the trio thread."""
    if progress is None:
        return None
    token = trio.lowlevel.current_trio_token()
    report = progress

    def safe(done: int, total: int) -> None:   # runs as a bare trio callback: never raise
        try:
            report(done, total, what)
        except Exception:
            log.exception("progress report failed")

    def cb(done: int, total: int) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(safe, done, total)
    return cb


async def in_thread(fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon)
