"""Deletion of snapshots: by id, by set, the oldest of a volume, all of a volume, or all
(in a context),
refused while anything uses them; the automatic deletions (an auto-release set whose
session ended, an unfinished set at start), which nothing refuses; and the set records
that go with the last snapshot of a set (also when the store deleted it on overflow).

State: none of its own. It reads the coordinator's sets in creation, claims and
sessions (given at construction; a dropped set leaves its session's list), unmounts
and scans through provider/exposure.py, and writes the catalog through its
write-through cache. Trio thread; the block store and the scans run in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from blockstore import errors as bse

from . import audit, vss
from .array import Array
from .catalog import ProviderCatalog
from .exposure import Exposure
from .hardware import HardwareProvider
from .masking import LunMasking
from .model import Session, SnapshotSet, bind_lifetime, guid, in_thread
from .views import Views
from .vss import Context, VssError

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


class Deletion:
    def __init__(self, pool: Array, catalog: ProviderCatalog, masking: LunMasking,
                 views: Views, exposure: Exposure, hardware: HardwareProvider,
                 sets: dict[str, SnapshotSet], claims: dict[str, str],
                 sessions: dict[int, Session]) -> None:
        self.pool = pool
        self.catalog = catalog
        self.masking = masking
        self.views = views
        self.exposure = exposure
        self.hardware = hardware
        self._sets = sets           # the coordinator's sets in creation (read only)
        self._claims = claims       # longops' claims (read only: a claimed snapshot stays)
        self._sessions = sessions   # the coordinator's sessions

    def drop_record(self, set_id: str) -> None:
        self.catalog.delete_set(set_id)
        if set_id in self.catalog.imported:
            self.catalog.delete_import(set_id)
        bind_lifetime(self._sessions.values(), set_id, None)

    async def remove_snapshots(self, ids: Iterable[str], force: bool = False,
                               reason: str | None = None,
                               requester: audit.Requester | None = None) -> list[str]:
        """Delete committed snapshots (unmounting them first); updates set records.
        force: the automatic deletions (an auto-release set whose session ended, an
        unfinished set at start-up): nothing refuses them, what still uses a snapshot is
        logged as an error (its reads fail with EIO from then on). ``reason`` and
        ``requester`` go into each deletion's audit line (default: the current
        request's requester, no reason)."""
        ids = list(ids)
        if force:
            infos = []
            for sid in ids:
                with contextlib.suppress(bse.NotFound):
                    infos.append(self.pool.snapshot(sid))
            try:
                users = await self.exposure.snapshot_users(infos, own_mounts=True, wait=1.0)
            except Exception as e:   # noqa: BLE001 - never stops an automatic deletion
                log.warning("could not check what uses snapshots %s: %s", ", ".join(ids), e)
                users = {}
            for sid, us in users.items():
                log.error("automatic deletion of snapshot %s although it is in use by %s: "
                          "reads through it fail (EIO) from now on (an auto-release set ends "
                          "with its requester's session: use a persistent context, "
                          "app-rollback or nas-rollback, for snapshots used beyond it)", sid,
                          "; ".join(us))
        done = []
        sets: set[str] = set()
        for sid in ids:
            try:
                info = self.pool.snapshot(sid)
            except bse.NotFound:
                continue
            sets.add(info.set_id or info.id)
            if sid in self.catalog.mounted:
                try:
                    await self.exposure.unmount(sid)
                except Exception:
                    if not force:
                        raise
                    log.error("could not unmount snapshot %s; deleting it anyway", sid)
                    self.exposure.forget_mount(sid)
            try:
                if info.state == "preparing":
                    await in_thread(self.pool.abort_snapshot, sid)
                else:
                    await in_thread(self.hardware.OnLunEmpty, sid)
            except bse.NotFound:   # another request deleted it meanwhile: go on
                continue
            done.append(sid)
            self.exposure.forget_names(sid)
            self.masking.present([sid], None)
            audit.audit("snapshot.delete", requester, id=sid, volume=info.volume,
                        set=info.set_id, **({"reason": reason} if reason else {}))
        for set_id in sets:
            if set_id in self.catalog.records and not self.views.set_members(set_id):
                self.drop_record(set_id)
        return done

    async def snapshot_delete(self, snapshot_id: str | None = None, set_id: str | None = None,
                              oldest: str | None = None, all: bool = False,
                              context: str | int | None = None,
                              unexpose: bool = False,
                              volume: str | None = None) -> dict[str, Any]:
        """DeleteSnapshots by snapshot id, by set, the oldest of a volume, all of a volume
        or all (both in a context). Mounted snapshots are refused unless ``unexpose``;
        anything refused deletes none of them."""
        chosen = [x for x in (snapshot_id, set_id, oldest, volume) if x is not None] + (
            [1] if all else [])
        if len(chosen) != 1:
            raise VssError("E_INVALIDARG", "name exactly one of: snapshot_id, set_id, oldest "
                           "(a volume), volume, all")
        ctx = vss.parse_context(context, allow_all=True) if context is not None else Context.ALL
        if snapshot_id is not None:
            targets = [self.pool.snapshot(guid(snapshot_id, "snapshot id"))]
        elif set_id is not None:
            sid = guid(set_id, "snapshot set id")
            if sid in self._sets:
                raise VssError("VSS_E_SNAPSHOT_SET_IN_PROGRESS", f"snapshot set {sid} is being "
                               "created; abort it instead")
            targets = self.views.members_info(sid)
            if not targets:
                raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        elif oldest is not None:
            vol = self.views.resolve_volume(oldest)
            cands = [s for s in self.pool.list_snapshots(vol)
                     if not self.views.in_creation(s) and vss.context_matches(ctx, s.attributes)]
            if not cands:
                raise VssError("VSS_E_OBJECT_NOT_FOUND", f"volume {vol} has no snapshot to delete")
            targets = [min(cands, key=lambda s: (s.created, s.id))]
        elif volume is not None:   # as all, of one volume (in creation: refused below)
            vol = self.views.resolve_volume(volume)
            targets = [s for s in self.pool.list_snapshots(vol)
                       if vss.context_matches(ctx, s.attributes)]
        else:
            targets = [s for s in self.pool.list_snapshots()
                       if vss.context_matches(ctx, s.attributes)]
        busy = [s for s in targets if self.views.in_creation(s)]
        if busy:
            raise VssError("VSS_E_SNAPSHOT_SET_IN_PROGRESS", f"snapshot {busy[0].id} belongs to "
                           "a set being created; abort that set instead")
        claimed = [s for s in targets if s.id in self._claims]
        if claimed:
            raise VssError("VSS_E_VOLUME_IN_USE", f"snapshot {claimed[0].id} is being "
                           f"{self._claims[claimed[0].id]}; retry when that is done")
        mounted = [s for s in targets if s.id in self.catalog.mounted]
        if mounted and not unexpose:
            m = self.catalog.mounted[mounted[0].id]
            raise VssError("VSS_E_VOLUME_IN_USE", f"snapshot {mounted[0].id} is mounted at "
                           f"{m.mountpoint}; unexpose it first (or delete with unexpose)")
        # A loop device or a process on any of its paths: refused, whatever unexpose says
        # (unexpose takes down our own `expose --mount`, never someone else's use).
        users = await self.exposure.snapshot_users(targets, own_mounts=unexpose, wait=2.0)
        if users:
            raise VssError("VSS_E_VOLUME_IN_USE", self.exposure.in_use_message(users, "delete"))
        deleted = await self.remove_snapshots([s.id for s in targets])
        if deleted:   # their names (.shadow, exposed, host views) leave the kernel now
            await self.masking.names_changed()
        return {"deleted": deleted, "count": len(deleted)}


    def prune_records(self) -> None:
        """Forget sets whose snapshots are all gone behind our back (the store deletes the
        oldest snapshot of an origin whose diff area overflows, as VSS does)."""
        live = {s.set_id or s.id for s in self.pool.list_snapshots()}
        for sid in [x for x in self.catalog.records if x not in live and x not in self._sets]:
            try:
                self.drop_record(sid)
            except Exception as e:
                # a listing or a check that only reads must not fail for want of room
                # to forget: the record stays (listing nothing) until the next try
                if not bse.disk_full(e):
                    raise
                log.warning("snapshot set %s has no snapshots left (deleted by the store),"
                            " but the pool's filesystem is full: forgetting it later (%s)",
                            sid, e)
                continue
            log.warning("snapshot set %s has no snapshots left (deleted by the store): "
                        "forgot it", sid)

    def check_catalog(self) -> list[str]:
        self.prune_records()
        out = []
        for sid, m in self.catalog.mounted.items():
            if not self.views.is_snapshot(sid):
                out.append(f"mount record for missing snapshot {sid} at {m.mountpoint}")
        return out
