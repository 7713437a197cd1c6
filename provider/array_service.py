"""The array's side of host mode (issue 16): the Array interface over the control port.

A host daemon (`serve --array HOST:PORT`, provider/remote_array.py) runs its own
coordinator and writers; its hardware provider is this array. It reaches the array over
the TLS control port (its host is its certificate's CN) with the ops below, and its data
path goes over the NBD port. What a host sees is what LUN masking presents to it: the
same rule as NBD's export list and the FUSE view's MOUNT/hosts/<host>/.

    array.info    the array's identity and geometry: pool_id, chunk_size, capabilities,
                  boot_id (new at every start of the daemon: a host tells a restart by it)
    array.list    the LUNs presented to the host (VolumeInfo / SnapshotInfo records as
                  JSON objects) and ``token``, which changes whenever that listing does
    array.watch   {"after": token, "timeout": s}: returns array.list's answer as soon as
                  the host's listing differs from ``after``, or at the timeout (<= 30 s);
                  the host's FUSE view follows the array this way (a long poll: the
                  connection is the host's own, nothing is pushed to a host that is gone)

Why a long poll of the whole listing instead of change events: the listing a host sees
depends on the pool (snapshots come and go), on masking (presentation, imports) and on
exposures; comparing one digest of the host's listing every WATCH_TICK catches all of
them without each of those places knowing about hosts. A listing is small (a record per
LUN presented to the host); the array computes it on its trio thread from memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from blockstore import errors as bse
from blockstore.model import COMMITTED, PREPARING

from . import audit
from .catalog import ExportRecord, SetRecord
from .model import Session, guid
from .vss import Attr, SnapshotState, VssError

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger(__name__)

WATCH_TICK = 0.2       # s between two looks at a watched listing
WATCH_MAX = 30.0       # s a watch may wait (a host asks again)
VOLATILE = frozenset({"mtime", "diff_bytes", "sync_done", "used", "shared"})
# this daemon process's identity in array.info: a host that sees it change knows the
# array restarted, so writes it acknowledged and no FLUSH covered may be gone
BOOT_ID = uuid.uuid4().hex


class ArrayService:
    """The answers of the array.* ops for one host (the session's)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        # listings are numbered in the order they are made (all on the daemon's trio
        # thread): a host that receives two on different connections applies the newer
        self._answered = 0

    def info(self) -> dict[str, Any]:
        pool = self.coord.pool
        total, free = pool.statfs()
        port, tls = getattr(self.coord.mount, "nbd_endpoint", None) or (None, False)
        return {"pool_id": pool.pool_id, "chunk_size": pool.chunk_size,
                "capabilities": dataclasses.asdict(pool.capabilities),
                "service_machine": self.coord.service_machine, "boot_id": BOOT_ID,
                # where the data path is: the daemon's NBD port (None: not opened)
                "nbd_port": port, "nbd_tls": tls,
                "space_total": total, "space_free": free}

    def listing(self, host: str) -> dict[str, Any]:
        """What ``host`` sees: the volumes and snapshots presented to it (a snapshot its
        set is preparing too: its coordinator follows the states; mounts and NBD show
        committed ones only), and ``allocated``: LUN key -> its allocated bytes, for the
        volumes and full copies among them (`du` on the host's mount, its listings)."""
        return self._answer(*self._records(host))

    def _records(self, host: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        pool, masking = self.coord.pool, self.coord.masking
        vols = [dataclasses.asdict(v) for v in pool.list_volumes()
                if host in masking.hosts_of(v.name)]
        snaps = [dataclasses.asdict(s) for s in pool.list_snapshots()
                 if host in masking.hosts_of(s.id)]
        # the token follows names, sizes, states and flags, not what every write moves
        # (mtime, diff-area bytes, a plex's progress, free space): a watch wakes the
        # host for changes of its tree only
        steady = [{k: v for k, v in r.items() if k not in VOLATILE} for r in vols + snaps]
        digest = hashlib.blake2b(json.dumps(steady, sort_keys=True, default=str).encode(),
                                 digest_size=12).hexdigest()
        return vols, snaps, digest

    def _answer(self, vols: list[dict[str, Any]], snaps: list[dict[str, Any]],
                digest: str) -> dict[str, Any]:
        pool = self.coord.pool
        allocated = {}
        for key in [v["name"] for v in vols] + [s["id"] for s in snaps
                                                if s["kind"] != "differential"]:
            try:
                allocated[key] = int(pool.allocated_bytes(key))
            except (bse.StoreError, OSError):
                continue   # gone meanwhile: the host shows the size
        total, free = pool.statfs()
        self._answered += 1
        return {"volumes": vols, "snapshots": snaps, "space_total": total,
                "space_free": free, "token": digest, "allocated": allocated,
                "seq": self._answered, "boot_id": BOOT_ID}

    async def watch(self, host: str, after: str | None, timeout: float) -> dict[str, Any]:
        """array.list's answer once it differs from ``after`` (or at the timeout). The
        allocations are counted for the answer only, not at every look."""
        with trio.move_on_after(max(0.0, min(timeout, WATCH_MAX))):
            while True:
                vols, snaps, digest = self._records(host)
                if digest != after:
                    return self._answer(vols, snaps, digest)
                await trio.sleep(WATCH_TICK)
        return self.listing(host)


# --------------------------------------------------------------------------- host sets
LEASE = 30.0           # s a host's claim on the set-in-creation slot lasts unrenewed


@dataclass
class HostSet:
    """A set a host daemon is creating: it holds the array's one set-in-creation slot
    (the array's own coordinator's StartSnapshotSet is refused meanwhile, and the
    reverse). Its snapshots are the host's to prepare, commit and abort."""
    set_id: str
    session: Session
    expires: float
    context: int = 0                 # VSS context and attributes (the array's set row)
    attributes: int = 0
    snaps: dict[str, str] = field(default_factory=dict)   # snapshot id -> volume
    committed: bool = False


class HostSets:
    """The array side of a host's set creation (array.set.* and the Array calls on the
    set's snapshots). A host that goes away (its session ends: the connection dropped,
    its daemon was killed) or stops renewing its lease (a host that hangs or lost the
    network) loses the slot, and every snapshot of its set goes: nothing half-created
    stays on the array (expire(), run every second by the control service)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.holder: HostSet | None = None

    def busy_message(self) -> str | None:
        h = self.holder
        if h is None:
            return None
        return (f"snapshot set {h.set_id} of host {h.session.host} is being created; "
                "only one at a time per array: retry when it is done")

    def claim(self, session: Session, set_id: str, lease: float, context: int,
              attributes: int) -> dict[str, Any]:
        set_id = guid(set_id, "snapshot set id")
        if set_id in self.coord.catalog.records:
            raise VssError("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot set {set_id} exists")
        other = self.coord.creating_message()
        if other is not None:
            raise VssError("VSS_E_SNAPSHOT_SET_IN_PROGRESS", other)
        self.holder = HostSet(set_id, session, time.monotonic() + _lease(lease),
                              int(context), int(attributes))
        log.info("host %s claims the set-in-creation slot for set %s", session.host, set_id)
        return {"set_id": set_id, "lease": _lease(lease)}

    def own(self, session: Session, set_id: str | None = None) -> HostSet:
        h = self.holder
        if h is None or h.session is not session or (
                set_id is not None and guid(set_id, "snapshot set id") != h.set_id):
            raise VssError("VSS_E_BAD_STATE", "this host holds no set in creation on the "
                           "array (claim it with array.set.claim first; a lease that was "
                           "not renewed in time is lost)")
        return h

    def renew(self, session: Session, set_id: str, lease: float) -> dict[str, Any]:
        h = self.own(session, set_id)
        h.expires = time.monotonic() + _lease(lease)
        return {"set_id": h.set_id, "lease": _lease(lease)}

    def snapshot_of(self, session: Session, snap_id: str) -> HostSet:
        h = self.own(session)
        if guid(snap_id, "snapshot id") not in h.snaps:
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"snapshot {snap_id} is not one of "
                           f"set {h.set_id} in creation")
        return h

    async def prepare(self, session: Session, volume: str, kind: str, snap_id: str,
                      set_id: str, attributes: int) -> dict[str, Any]:
        h = self.own(session, set_id)
        snap_id = guid(snap_id, "snapshot id")
        self.coord.volumes.check_unmarked(volume, "snapshot")
        pool = self.coord.pool
        info = await trio.to_thread.run_sync(
            lambda: pool.prepare_snapshot(volume, kind, snap_id, h.set_id, attributes))
        h.snaps[snap_id] = volume
        # the snapshot LUN is the host's (as for a set a remote requester creates)
        self.coord.masking.present([snap_id], {session.host})
        return dataclasses.asdict(info)

    async def commit(self, session: Session, snap_ids: list[str]) -> None:
        """The instant, on the array: its write barrier holds every writer of the
        volumes (NBD and FUSE, every host's) while the pool commits."""
        h = self.own(session)
        ids = [guid(i, "snapshot id") for i in snap_ids]
        for i in ids:
            self.snapshot_of(session, i)
        vols = sorted({h.snaps[i] for i in ids})
        deadline = float(self.coord.config["hold_deadline"])
        barrier = self.coord.barrier
        hold = await barrier.hold(vols, deadline=deadline)
        try:
            if hold.expired or not hold.flushed:
                raise VssError("VSS_E_HOLD_WRITES_TIMEOUT", f"writes to {', '.join(vols)} "
                               f"could not be flushed and held within {deadline:g} s")
            pool = self.coord.pool
            await trio.to_thread.run_sync(pool.commit_snapshots, ids)
        finally:
            in_time = barrier.release(hold)
        if not in_time:
            raise VssError("VSS_E_HOLD_WRITES_TIMEOUT", f"writes to {', '.join(vols)} were "
                           f"held longer than {deadline:g} s; the commit came too late")
        h.committed = True

    async def drop_snapshot(self, session: Session, snap_id: str) -> None:
        """Abort one prepared snapshot of the host's set."""
        h = self.snapshot_of(session, snap_id)
        sid = guid(snap_id, "snapshot id")
        await self._remove(h, [sid])

    async def delete(self, session: Session, snap_id: str) -> None:
        """A committed snapshot presented to the host (access.py checked that), deleted
        by its host's coordinator (its set ended, or its requester deleted it). One the
        array's own daemon exposed or mounted is refused as Busy by the pool's rules."""
        sid = self._only_host(session, snap_id, "deletes")
        # the array's own deletion path: its set row goes with its last snapshot
        await self.coord.deletion.remove_snapshots([sid])

    def export(self, session: Session, set_id: str) -> dict[str, Any]:
        """The host that created a TRANSPORTABLE set exported it (its BCD is written by
        the host's coordinator): only an exported set can be imported by another host."""
        sid = guid(set_id, "snapshot set id")
        rec = self.coord.catalog.records.get(sid)
        if rec is None or rec.originating_machine != session.host:
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid} created by "
                           f"host {session.host} on this array")
        if not rec.attributes & int(Attr.TRANSPORTABLE):
            raise VssError("VSS_E_NONTRANSPORTABLE_BCD", f"snapshot set {sid} was not "
                           "created transportable")
        members = [s for s in self.coord.pool.list_snapshots() if s.set_id == sid
                   and s.state == COMMITTED]
        if not members:
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"snapshot set {sid} has no usable "
                           "snapshot")
        self.coord.catalog.put_export(ExportRecord(
            rec, tuple(sorted({m.volume for m in members})), tuple(m.id for m in members),
            time.time()))
        audit.audit("set.export", audit.of_session(session), id=sid,
                    snapshots=[m.id for m in members], at="array")
        return {"set_id": sid, "snapshots": [m.id for m in members]}

    def _only_host(self, session: Session, snap_id: str, what: str) -> str:
        sid = guid(snap_id, "snapshot id")
        if self.coord.masking.hosts_of(sid) != frozenset((session.host,)):
            raise VssError("E_ACCESSDENIED", f"snapshot {sid} is presented to other hosts "
                           f"too; the array's own host {what} it")
        return sid

    async def expose(self, session: Session, snap_id: str, name: str | None
                     ) -> dict[str, Any]:
        """Give (or take, name None) a snapshot presented to this host only its
        exposure name: it shows as exposed/<name> on the host (and under
        hosts/<host>/ on the array). Names are the array's: one name, one snapshot."""
        sid = self._only_host(session, snap_id, "exposes")
        pool = self.coord.pool
        info = await trio.to_thread.run_sync(pool.set_exposed, sid, name)
        await self.coord.masking.names_changed()
        return dataclasses.asdict(info)

    async def release(self, session: Session, set_id: str, created: bool) -> None:
        """The host is done with the slot: its set was created (``created``: its
        snapshots stay) or not (they go)."""
        h = self.own(session, set_id)
        if created:
            self._keep(h)
            await self._end(h, None)
        else:
            await self._end(h, "the host aborted it")

    def _keep(self, h: HostSet) -> None:
        """The array's row of a committed set: it travels with the array (export, import
        on another host, the array's own listings, a restart adopts it as is). Its
        lifetime is the host's to manage: never auto-released by the array."""
        if h.committed and h.snaps and h.set_id not in self.coord.catalog.records:
            self.coord.catalog.put_set(SetRecord(
                h.set_id, h.context, h.attributes, int(SnapshotState.CREATED), time.time(),
                h.session.host, h.session.client, len(h.snaps), False))

    async def session_closed(self, session: Session) -> None:
        if self.holder is not None and self.holder.session is session:
            await self._lost(self.holder, f"host {session.host}'s session ended")

    async def expire(self) -> None:
        """Release a lease that ran out (call periodically)."""
        h = self.holder
        if h is not None and time.monotonic() > h.expires:
            await self._lost(h, f"host {h.session.host} did not renew its lease")

    async def _lost(self, h: HostSet, why: str) -> None:
        """The host went away holding the slot. Before the commit its set is nothing yet:
        its snapshots go. After it the instant has happened, and the host may have told
        its requester so (its release lost with the network): the set stays, with the
        array's row -- losing a set a requester was told exists is worse than keeping one
        it was told failed (it is listed with its host; its owner deletes it)."""
        if h.committed:
            log.warning("snapshot set %s of host %s was committed, then %s: kept (%d "
                        "snapshot(s)); delete it if its requester was told it failed",
                        h.set_id, h.session.host, why, len(h.snaps))
            self._keep(h)
            await self._end(h, None)
        else:
            await self._end(h, why)

    async def _end(self, h: HostSet, why: str | None) -> None:
        with trio.CancelScope(shield=True):
            if why is not None:
                log.warning("snapshot set %s of host %s: removing its %d snapshot(s): %s",
                            h.set_id, h.session.host, len(h.snaps), why)
                await self._remove(h, list(h.snaps))
            if self.holder is h:
                self.holder = None

    async def _remove(self, h: HostSet, sids: list[str]) -> None:
        pool = self.coord.pool

        def remove() -> None:
            for sid in sids:
                try:
                    info = pool.snapshot(sid)
                    if info.state == PREPARING:
                        pool.abort_snapshot(sid)
                    else:
                        pool.delete_snapshot(sid)
                except bse.NotFound:
                    pass
                except Exception as e:   # noqa: BLE001 - an abort must complete; logged
                    log.error("removing snapshot %s of host %s: %s", sid, h.session.host, e)
        await trio.to_thread.run_sync(remove)
        for sid in sids:
            h.snaps.pop(sid, None)
        try:
            self.coord.masking.present(sids, None)
        except Exception as e:   # noqa: BLE001 - logged
            log.error("removing the presentation of %s: %s", ", ".join(sids), e)


def _lease(lease: float) -> float:
    return max(5.0, min(float(lease), 300.0))
