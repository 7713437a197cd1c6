"""What a requester may write for a snapshot or a set, and the labels people give them.

A snapshot reference (everywhere an op takes ``snapshot_id`` or ``to_snapshot_id``):

    8c3e1f2a-...-...      the id (a GUID; braces and upper case are fine)
    8c3e1f2a              a unique prefix of the id, git-style: at least MIN_PREFIX hex
                          digits (hyphens may be left out or kept)
    VOLUME@NAME           the snapshot of VOLUME named NAME (snapshot create --name)
    VOLUME@latest         the newest committed snapshot of VOLUME

A set reference (``set_id``): the set's id, a unique prefix of it, or VOLUME@NAME /
VOLUME@latest (the set that snapshot belongs to). Sets in creation (set.add/do/abort)
are named by their full id only: they are the session's own.

'@' is in no volume, exposure or snapshot name (blockstore.names.NAME_RE), so the first
'@' splits a reference; ``latest`` is refused as a snapshot name so it never means two
things. Resolution happens once, in the control connection before the access check and
the op's handler (resolve_args), so every op and every client (CLI, scripts, the Client
library, remote hosts) gets it; a remote host's references resolve among the LUNs it
sees only (``visible``), so a prefix or a name tells it nothing about other hosts' LUNs.

Labels: a snapshot's name follows the volume-name rule (1-64 of A-Z a-z 0-9 . _ -, not
starting with '.' or '-') and is unique per volume among existing snapshots; its
description is at most MAX_DESCRIPTION printable characters on one line. Both are kept
by the coordinator (provider/catalog.py, table ``labels``) and carried in a
transportable set's Backup Components Document (sp:name, sp:description).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from blockstore import names

from . import vss
from .vss import VssError

MIN_PREFIX = 4          # hex digits of an id prefix (git's minimum abbreviation is 4)
MAX_DESCRIPTION = 256   # characters of a snapshot's description
MAX_SHOWN = 8           # candidates named in an "ambiguous" error
LATEST = "latest"       # VOLUME@latest: the newest committed snapshot
_PREFIX_RE = re.compile(r"[0-9A-Fa-f-]+")

# the args that name a snapshot / a set, per op (what resolve_args rewrites)
SNAPSHOT_ARGS = {"snapshot.show": ("snapshot_id",),
                 "snapshot.diff": ("snapshot_id", "to_snapshot_id"),
                 "snapshot.delete": ("snapshot_id",), "expose": ("snapshot_id",),
                 "unexpose": ("snapshot_id",), "revert": ("snapshot_id",),
                 "promote": ("snapshot_id",), "split": ("snapshot_id",)}
SET_ARGS = frozenset({"snapshot.show", "snapshot.list", "snapshot.delete", "export",
                      "end_backup"})


def _bad(msg: str) -> VssError:
    return VssError("E_INVALIDARG", msg)


def shown(text: str) -> str:
    """A reference as an error may quote it: short, one line."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def check_name(name: Any) -> str:
    """A new snapshot name (snapshot create --name)."""
    if not isinstance(name, str) or not names.is_new_name(name):
        raise _bad(f"invalid snapshot name {shown(str(name))}: use 1-64 characters from "
                   "A-Z a-z 0-9 . _ -, not starting with '.' or '-'")
    if name == LATEST:
        raise _bad(f"invalid snapshot name {name!r}: VOLUME@{LATEST} already means the "
                   "newest snapshot of VOLUME")
    return name


def check_description(text: Any) -> str:
    if not isinstance(text, str):
        raise _bad("a snapshot description must be text")
    if len(text) > MAX_DESCRIPTION:
        raise _bad(f"snapshot description of {len(text)} characters: at most "
                   f"{MAX_DESCRIPTION}")
    if not text.isprintable():   # line breaks, tabs, escapes: a listing stays one line
        raise _bad("snapshot description: printable characters on one line only (no line "
                   "breaks, tabs or control characters)")
    return text


class Resolver:
    """Turns references into ids. ``snapshots()`` -> the pool's SnapshotInfo list;
    ``label_of(id)`` -> the snapshot's name or None; ``set_ids()`` -> every known set id;
    ``committed(info)`` -> whether it may be VOLUME@latest (committed, not in creation)."""

    def __init__(self, snapshots: Callable[[], list[Any]], label_of: Callable[[str], Any],
                 set_ids: Callable[[], Iterable[str]],
                 committed: Callable[[Any], bool]) -> None:
        self.snapshots = snapshots
        self.label_of = label_of
        self.set_ids = set_ids
        self.committed = committed

    def snapshot(self, spec: str, visible: Callable[[str], bool] | None = None) -> str:
        """The id of the snapshot ``spec`` names (a full GUID is returned as is: the op
        says whether it exists, as before)."""
        try:
            return vss.guid(spec)
        except ValueError:
            pass
        if "@" in spec:
            return str(self._at(spec, visible).id)
        ids = [s.id for s in self.snapshots() if visible is None or visible(s.id)]
        try:
            return self._prefix(spec, ids, "snapshot")
        except VssError as e:
            if e.name != "VSS_E_OBJECT_NOT_FOUND":
                raise
            try:   # a set's id given for a snapshot's: say so (snapshot show SET_ID)
                set_id = self._prefix(spec, sorted(self.set_ids()), "snapshot set")
            except VssError:
                raise e from None
            if visible is not None:
                raise
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"{spec} is snapshot set {set_id}, not "
                           f"a snapshot: 'snapshot show --set {set_id}' lists its "
                           "snapshots") from None

    def set(self, spec: str, visible: Callable[[str], bool] | None = None) -> str:
        try:
            return vss.guid(spec)
        except ValueError:
            pass
        if "@" in spec:
            s = self._at(spec, visible)
            return str(s.set_id or s.id)
        ids = {i for i in self.set_ids() if visible is None or visible(i)}
        return self._prefix(spec, sorted(ids), "snapshot set")

    def _prefix(self, spec: str, ids: list[str], what: str) -> str:
        if not _PREFIX_RE.fullmatch(spec):
            raise _bad(f"{shown(spec)} is not a {what} id: give the id, a unique prefix of "
                       f"it ({MIN_PREFIX}+ hex digits), VOLUME@NAME or VOLUME@{LATEST}")
        want = spec.replace("-", "").lower()
        if len(want) < MIN_PREFIX:
            raise _bad(f"{what} id prefix {spec!r} is too short: give at least "
                       f"{MIN_PREFIX} hex digits")
        found = sorted(i for i in ids if i.replace("-", "").startswith(want))
        if not found:
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no {what} id starts with {spec!r}")
        if len(found) > 1:
            more = f" and {len(found) - MAX_SHOWN} more" if len(found) > MAX_SHOWN else ""
            raise _bad(f"{what} id prefix {spec!r} is ambiguous: it starts "
                       f"{', '.join(found[:MAX_SHOWN])}{more}; give more digits")
        return found[0]

    def _at(self, spec: str, visible: Callable[[str], bool] | None) -> Any:
        volume, _, label = spec.partition("@")
        if not names.is_name(volume) or not (label == LATEST or names.is_name(label)):
            raise _bad(f"{shown(spec)} is not VOLUME@NAME or VOLUME@{LATEST} (a volume "
                       "name, '@', a snapshot name)")
        mine = [s for s in self.snapshots()
                if s.volume == volume and (visible is None or visible(s.id))]
        if label == LATEST:
            done = [s for s in mine if self.committed(s)]
            if not done:
                raise VssError("VSS_E_OBJECT_NOT_FOUND", f"{spec}: volume {volume} has no "
                               "committed snapshot")
            return max(done, key=lambda s: (s.created, s.id))
        for s in mine:
            if self.label_of(s.id) == label:
                return s
        raise VssError("VSS_E_OBJECT_NOT_FOUND", f"{spec}: volume {volume} has no snapshot "
                       f"named {label!r} ('snapshot list {volume}' shows them)")


def resolve_args(op: str, args: dict[str, Any], resolver: Resolver,
                 snap_visible: Callable[[str], bool] | None = None,
                 set_visible: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """``args`` with every snapshot and set reference of ``op`` turned into its id (a
    copy; non-string values are left for the op's own type check)."""
    out = dict(args)
    for key in SNAPSHOT_ARGS.get(op, ()):
        if isinstance(out.get(key), str):
            out[key] = resolver.snapshot(out[key], snap_visible)
    if op in SET_ARGS and isinstance(out.get("set_id"), str):
        out["set_id"] = resolver.set(out["set_id"], set_visible)
    return out
