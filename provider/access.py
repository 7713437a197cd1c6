"""Who may do what through the control API: a session acts for one host, and LUN masking
says which LUNs that host sees (issue 15: masking is a security boundary).

Two kinds of session:

* **local** (the Unix socket: root, mode 0600). Its host is what `hello` says
  (`--host`). A session of the array's own host is the array's administrator: anything
  goes. A session of another host may name only the snapshots presented to that host
  or made by its own requester (an expose, unexpose, delete, revert... of a snapshot
  imported to hostB is refused to hostC, as VSS_E_OBJECT_NOT_FOUND: it does not see
  it; hostA, whose set it is, may still show and delete it).
* **remote** (the TLS control port). Its host is its client certificate's CN, never a
  claim. Besides the snapshot rule: the volumes it names must be presented to it,
  administration (creating, resizing, deleting and presenting volumes, check, scrub,
  deleting all snapshots, a volume's or the oldest of a context) is refused
  (E_ACCESSDENIED),
  and listings show only what it sees; it may not expose with a mount on the array's
  machine, split, promote, or revert a volume not presented to it, nor import a set
  the array did not export (transport.py: for every session). `snapshot.diff` names
  two snapshots (both must be seen) or one and its live volume (remote: the volume must
  be presented to it too, as for revert).

Refusals change nothing: they happen before the operation's handler runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .masking import LunMasking
from .model import guid
from .vss import VssError

# what only the array's own host may do (split makes a volume; promote makes a full
# copy that may fill the pool, and the overflow then deletes other hosts' snapshots)
ADMIN_OPS = frozenset({"volume.create", "volume.resize", "volume.delete", "volume.present",
                       "check", "scrub", "split", "promote"})
# ops naming a set by id that is not necessarily the session's own (set.add/do/abort
# check that the set is the session's: Coordinator.own_set)
SET_OPS = frozenset({"snapshot.delete", "snapshot.show", "snapshot.list", "export"})
LISTINGS = frozenset({"volume.list", "snapshot.list", "set.list"})
REMOTE_STATUS = frozenset({"pool_id", "chunk_size", "capabilities", "preserve",
                           "service_machine", "provider_id", "space_total", "space_free",
                           "space_available", "nbd_port", "nbd_tls"})


class Access:
    def __init__(self, masking: LunMasking, snapshots_of_set: Any, creator_of: Any,
                 set_creator: Any, origin_of: Any) -> None:
        """snapshots_of_set(set_id) -> the snapshot ids of a set (empty if unknown);
        creator_of(snapshot_id) / set_creator(set_id) -> the host whose requester created
        the set, or None; origin_of(snapshot_id) -> its origin volume, or None."""
        self.masking = masking
        self.snapshots_of_set = snapshots_of_set
        self.creator_of = creator_of
        self.set_creator = set_creator
        self.origin_of = origin_of

    def admin(self, host: str, remote: bool) -> bool:
        return not remote and host == self.masking.service_machine

    def check(self, host: str, remote: bool, op: str, args: dict[str, Any]) -> None:
        """Raise (before anything happens) if a session of `host` may not do `op` with
        these arguments. Ids are taken in their canonical form (vss.guid: what the
        handler will resolve), a malformed one is refused here as the handler would."""
        if self.admin(host, remote):
            return
        if remote and op in ADMIN_OPS:
            raise VssError("E_ACCESSDENIED", f"{op}: only the array's own host "
                           f"({self.masking.service_machine}) may do that; this session "
                           f"is host {host} (its certificate)")
        if remote and op == "snapshot.delete" and (
                args.get("all") or args.get("oldest") or args.get("volume")
                or args.get("context")):
            raise VssError("E_ACCESSDENIED", "snapshot.delete of all snapshots, a volume's "
                           "or the oldest is the array's own host's to do; name the "
                           "snapshot or the set")
        if remote and op == "expose" and args.get("mount") is not None:
            # a mount on the array's machine of a file system another host wrote
            raise VssError("E_ACCESSDENIED", "expose --mount mounts on the array's machine: "
                           "the array's own host only; a host exposes a snapshot by name "
                           "and reads it over NBD (exposed/NAME)")
        sid = args.get("snapshot_id")
        if isinstance(sid, str):
            sid = guid(sid, "snapshot id")
            self._visible(host, [sid], "snapshot")
            if remote and op == "revert":   # it rewrites the origin: that must be ours
                origin = self.origin_of(sid)
                if origin is not None:
                    self._visible(host, [origin], "volume")
        to = args.get("to_snapshot_id")
        if op == "snapshot.diff" and isinstance(to, str):
            self._visible(host, [guid(to, "snapshot id")], "snapshot")
        elif remote and op == "snapshot.diff" and isinstance(sid, str):
            # against the live volume: its write pattern is the volume's, not the
            # snapshot's to show
            origin = self.origin_of(sid)
            if origin is not None:
                self._visible(host, [origin], "volume")
        set_id = args.get("set_id")
        if isinstance(set_id, str) and (op in SET_OPS or op == "end_backup"):
            set_id = guid(set_id, "snapshot set id")
            if op == "end_backup":   # BackupComplete to the writers of the set's host
                if self.set_creator(set_id) not in (None, host):
                    raise VssError("VSS_E_OBJECT_NOT_FOUND",
                                   f"no snapshot set {set_id} created by host {host}")
            else:
                members = self.snapshots_of_set(set_id)
                if not members and self.set_creator(set_id) not in (None, host):
                    raise VssError("VSS_E_OBJECT_NOT_FOUND",
                                   f"no snapshot set {set_id} for host {host}")
                self._visible(host, members, f"snapshot of set {set_id}")
        if remote:
            names: list[str] = []
            for key in ("volume", "volumes"):
                v = args.get(key)
                names += [v] if isinstance(v, str) else \
                    [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
            self._visible(host, names, "volume")

    def sees(self, host: str, remote: bool) -> tuple[Any, Any]:
        """(snapshot_visible, set_visible) predicates for resolving a session's
        references (prefixes, VOLUME@NAME) among what it sees; (None, None): everything."""
        if self.admin(host, remote):
            return None, None

        def snap(sid: str) -> bool:
            return host in self.masking.hosts_of(sid) or self.creator_of(sid) == host

        def a_set(set_id: str) -> bool:
            return self.set_creator(set_id) == host or any(
                snap(s) for s in self.snapshots_of_set(set_id))
        return snap, a_set

    def _visible(self, host: str, luns: Iterable[str], what: str) -> None:
        """Each LUN is presented to host -- or, a snapshot, was made by its requester
        (the host that created a transportable set still shows and deletes it after
        another host imported it, as the VSS transport sequence has it)."""
        for lun in luns:
            if host not in self.masking.hosts_of(lun) and (
                    what == "volume" or self.creator_of(lun) != host):
                raise VssError("VSS_E_OBJECT_NOT_FOUND",
                               f"no {what} {lun} for host {host}")

    def filter(self, host: str, remote: bool, op: str, result: Any) -> Any:
        """A listing as a remote host may see it: only the LUNs presented to it; its
        status without the array's paths, jobs and in-use marks (other hosts' LUNs)."""
        if remote and op == "status" and isinstance(result, dict):
            return {k: v for k, v in result.items() if k in REMOTE_STATUS}
        if not remote or op not in LISTINGS or not isinstance(result, list):
            return result

        def sees(item: Any) -> bool:
            if not isinstance(item, dict):
                return False
            if op == "volume.list":
                return host in self.masking.hosts_of(str(item.get("name")))
            if op == "snapshot.list":
                sid = str(item.get("snapshot_id"))
                return host in self.masking.hosts_of(sid) or self.creator_of(sid) == host
            set_id = str(item.get("set_id"))
            sids = self.snapshots_of_set(set_id)
            return (self.set_creator(set_id) == host or bool(sids)
                    and all(host in self.masking.hosts_of(s) for s in sids))
        return [x for x in result if sees(x)]
