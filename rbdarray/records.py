"""What shadowplex stores ON an RBD image (image metadata, so it travels with the LUN:
docs/ceph.md), and the small concurrency helper of the data path.

    spx.volume          {"naa", "created", "read_only", "hidden", "shadow", "origin",
                         "hosts"}
                        the image is one of our volumes (images without it are not ours
                        and are never listed or touched)
    spx.snap.<guid>     {"set", "naa", "kind", "attributes", "exposed", "created",
                         "members": {guid: volume, ...}, "done", "hosts", "exported",
                         "imported"}
                        one committed snapshot of this image; its data is the RBD
                        snapshot named ``spx.<guid>`` (the snapshot's existence is what
                        makes it committed)
    spx.revert          {"snapshot": guid, "started"}
                        a revert of this image to that snapshot is under way (or was
                        interrupted): the image is not served as a volume until a
                        daemon it is presented to has finished it (rbdarray/revert.py)

``hosts`` is the LUN's presentation (LUN masking, issue 18 item 2): the names of the
hosts whose daemons see and serve it; a volume starts presented to the host that made
it, a snapshot to the host whose set made it, an imported one to the importing host
only. None (records written before presentation was stored here): every host.
``exported`` is set by the host that exported the snapshot's set (a BCD), ``imported``
names the host that imported it: another host's import needs the first, refuses the
second.

A commit writes every member's record with done=false, creates the RBD snapshots, then
sets done=true. Opening the array finishes a commit a crash interrupted: a record not
done whose members all have their RBD snapshot is marked done; otherwise the partial
set's snapshots and records are removed (all or nothing). A record without its RBD
snapshot (a crash inside a delete) is removed.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from blockstore.model import State

VOLUME_KEY = "spx.volume"
REVERT_KEY = "spx.revert"
SNAP_PREFIX = "spx.snap."
RBD_SNAP_PREFIX = "spx."


def snap_key(snap_id: str) -> str:
    return SNAP_PREFIX + snap_id


def rbd_snap_name(snap_id: str) -> str:
    return RBD_SNAP_PREFIX + snap_id


@dataclass
class VolumeRecord:
    naa: str
    created: float
    read_only: bool = False
    hidden: bool = False
    shadow: bool = False
    origin: dict[str, str] | None = None     # split from: {"volume", "snapshot", "naa"}
    hosts: list[str] | None = None           # presented to (None: every host)

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> VolumeRecord:
        d: dict[str, Any] = json.loads(text)
        return cls(naa=str(d["naa"]), created=float(d["created"]),
                   read_only=bool(d.get("read_only")), hidden=bool(d.get("hidden")),
                   shadow=bool(d.get("shadow")), origin=d.get("origin"),
                   hosts=_hosts(d.get("hosts")))


@dataclass
class SnapRecord:
    set: str | None
    naa: str
    kind: str
    attributes: int
    created: float
    exposed: str | None = None
    members: dict[str, str] = field(default_factory=dict)   # snap id -> volume
    done: bool = False
    hosts: list[str] | None = None           # presented to (None: every host)
    exported: bool = False                   # its set's BCD was exported
    imported: str | None = None              # the host that imported it

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> SnapRecord:
        d: dict[str, Any] = json.loads(text)
        return cls(set=d.get("set"), naa=str(d["naa"]), kind=str(d["kind"]),
                   attributes=int(d.get("attributes", 0)), created=float(d["created"]),
                   exposed=d.get("exposed"), members=dict(d.get("members") or {}),
                   done=bool(d.get("done")), hosts=_hosts(d.get("hosts")),
                   exported=bool(d.get("exported")), imported=d.get("imported"))


def _hosts(value: Any) -> list[str] | None:
    return None if value is None else sorted(str(h) for h in value)


def sees(rec: VolumeRecord | SnapRecord, host: str) -> bool:
    """Whether ``host`` is presented the LUN of this record."""
    return rec.hosts is None or host in rec.hosts


class Gate:
    """A LUN's readers-writer gate: I/O enters shared (any number at once, librbd's
    Image is thread-safe for I/O); a commit, revert, resize, delete or the close of the
    LUN's Image enters exclusive (waits for the I/O in flight, holds new I/O). Waiting
    writers go first, so a stream of I/O cannot starve a commit."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._exclusive or self._waiting:
                self._cv.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                if not self._shared:
                    self._cv.notify_all()

    def try_shared(self) -> bool:
        """Enter shared without waiting: False if the gate is closed or a commit waits
        (the caller must not block: the FUSE session's trio thread). leave_shared()
        once the I/O is done."""
        with self._cv:
            if self._exclusive or self._waiting:
                return False
            self._shared += 1
            return True

    def leave_shared(self) -> None:
        with self._cv:
            self._shared -= 1
            if not self._shared:
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cv.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()


def merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, length) runs with overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for o, n in sorted(runs):
        if n <= 0:
            continue
        if out and o <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], o + n)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((o, n))
    return out


def clip(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    for o, n in runs:
        a, b = max(o, lo), min(o + n, hi)
        if a < b:
            out.append((a, b - a))
    return out


def object_runs(objects: list[int], unit: int, size: int) -> list[tuple[int, int]]:
    """Ascending object numbers as (offset, length) runs of bytes, cut at ``size``."""
    out: list[tuple[int, int]] = []
    for o in objects:
        a, b = o * unit, min((o + 1) * unit, size)
        if a >= b:
            continue
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], b - out[-1][0])
        else:
            out.append((a, b - a))
    return out


def round_out(runs: list[tuple[int, int]], unit: int, size: int) -> list[tuple[int, int]]:
    """Each run widened to whole units, clipped at size, merged."""
    out = []
    for o, n in runs:
        a = o - o % unit
        b = min(size, -(-(o + n) // unit) * unit)
        if a < b:
            out.append((a, b - a))
    return merge(out)


# ---------------------------------------------------------------- in memory
@dataclass(eq=False)
class Lun:
    """One open Image (a volume, or a snapshot opened read-only at its RBD snapshot)."""
    image: Any
    gate: Gate = field(default_factory=lambda: Gate())


@dataclass(eq=False)
class Vol:
    id: int
    name: str
    rec: VolumeRecord
    lun: Lun
    mtime: float
    reverting: str | None = None    # spx.revert's snapshot: a revert under way
    # the image's size as last known here (scan, create, resize, revert; under the
    # gate where we change it): read_async's bound, which must not ask librbd on the
    # mount's trio thread (image.size() may refresh the header over the network)
    size: int = -1


@dataclass(eq=False)
class Snap:
    id: str
    volume: str
    rec: SnapRecord
    state: State
    size: int
    rbd_id: int              # RBD snapshot id (pool-wide sequence: creation order)
    lun: Lun | None = None  # opened on first read
