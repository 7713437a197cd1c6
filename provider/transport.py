"""Transport: a TRANSPORTABLE set exported as a Backup Components Document (BCD, with
each writer's Writer Metadata Document) and imported on another host, where LocateLuns
presents its snapshot LUNs to the importing host only (docs/provider.md).

State: none of its own. The imports and exports are the catalog's tables and its
write-through cache (ProviderCatalog.imported/.exported; provider/catalog.py), the LUN
masking goes through provider/masking.py. Transport reads the coordinator's sets in
creation and its sessions (an import moves an auto-release set's lifetime to the
importing session), given at construction. Trio thread; the documents are written and
parsed in worker threads, and an import changes nothing without awaiting once its
checks passed (no other request can interleave), or undoes all of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import audit, documents, vss
from .array import Array
from .catalog import ExportRecord, ProviderCatalog, SetRecord
from .hardware import HardwareProvider
from .masking import LunMasking
from .model import Session, SnapshotSet, bind_lifetime, guid, in_thread
from .views import Views
from .vss import Attr, Context, SnapshotState, VssError
from .writercalls import message, writer_metadata

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


class Transport:
    def __init__(self, pool: Array, catalog: ProviderCatalog, masking: LunMasking,
                 views: Views, hardware: HardwareProvider, writers: list[Any],
                 sets: dict[str, SnapshotSet], sessions: dict[int, Session],
                 fault: Callable[[str], None]) -> None:
        self.pool = pool
        self.catalog = catalog
        self.masking = masking
        self.views = views
        self.hardware = hardware
        self.writers = writers
        self._sets = sets           # the coordinator's sets in creation (read only)
        self._sessions = sessions   # the coordinator's sessions
        self._fault = fault         # Coordinator._fault: the named steps tests break

    async def export_set(self, set_id: str) -> dict[str, Any]:
        """The Backup Components Document of a TRANSPORTABLE set (+ each writer's
        Writer Metadata Document), as XML text."""
        sid = guid(set_id, "snapshot set id")
        rec = self.catalog.records.get(sid)
        if rec is None:
            if sid in self._sets:
                raise VssError("VSS_E_BAD_STATE", f"snapshot set {sid} is still being created")
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        if not rec.attributes & int(Attr.TRANSPORTABLE):
            raise VssError("VSS_E_NONTRANSPORTABLE_BCD", f"snapshot set {sid} was not created "
                           "transportable: create it with the TRANSPORTABLE attribute to export it")
        if sid in self.catalog.imported:
            raise VssError("VSS_E_BAD_STATE", f"snapshot set {sid} is imported on host "
                           f"{self.catalog.imported[sid][0]}; export it before importing")
        members = [m for m in self.views.members_info(sid) if m.state == "committed"]
        if not members:
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"snapshot set {sid} has no usable snapshot")
        metas = (await in_thread(writer_metadata, self.writers)
                 if self.writers and vss.uses_writers(Context(rec.context)) else [])
        origin = rec.originating_machine or self.masking.service_machine
        doc = await in_thread(lambda: documents.write_backup_components(
            rec, members, metas, pool_id=self.pool.pool_id, host=origin,
            service_machine=self.masking.service_machine))
        wmds = []
        for m in metas:
            wmds.append({"name": str(getattr(m, "writer_name", "") or ""),
                         "document": documents.write_writer_metadata(m).decode("utf-8")})
        exp = ExportRecord(rec, tuple(sorted({m.volume for m in members})),
                           tuple(m.id for m in members), time.time())
        mark = getattr(self.pool, "mark_exported", None)
        if mark is not None:   # host mode: the array must know (another host imports)
            await in_thread(mark, sid)
        self.catalog.put_export(exp)
        audit.audit("set.export", id=sid, snapshots=[m.id for m in members],
                    writers=len(wmds))
        return {"set_id": sid, "originating_machine": origin,
                "document": doc.decode("utf-8"), "writers": wmds}

    async def import_set(self, session: Session, document: str) -> dict[str, Any]:
        """Import a Backup Components Document on the session's host: check it against
        the pool, then LocateLuns -- present the snapshot LUNs to that host only (hidden,
        read-only) and mark the set IMPORTED. Nothing changes when anything is wrong."""
        if not isinstance(document, str):
            raise VssError("E_INVALIDARG", "import: the document must be XML text")
        try:
            data = document.encode("utf-8")
        except UnicodeError:
            raise VssError("VSS_E_INVALID_XML_DOCUMENT", "import: the document is not valid "
                           "UTF-8 text") from None
        parsed = await in_thread(lambda: documents.parse_backup_components(
            data, pool_id=self.pool.pool_id))
        if getattr(self.pool, "import_set", None) is not None:
            return await self._import_at_array(session, document, parsed)
        sid, host = parsed.set_id, session.host
        if sid in self.catalog.imported:
            raise VssError("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot set {sid} is already "
                           f"imported on host {self.catalog.imported[sid][0]}; delete it "
                           "there first")
        rec = self.catalog.records.get(sid)
        if rec is None:
            raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid} does not exist "
                           f"in pool {self.pool.path} (deleted, or never created here)")
        if not rec.attributes & int(Attr.TRANSPORTABLE) or sid not in self.catalog.exported:
            # only what the array itself exported can be imported: a document is not a
            # key to another host's LUNs
            raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid} was not "
                           "exported from this array (export it on its host first)")
        origin = rec.originating_machine or parsed.originating_machine
        if host == origin:
            raise VssError("VSS_E_BAD_STATE", f"snapshot set {sid} was created on host {host}: "
                           "import it on another host (its LUNs are already presented here)")
        members = {m.id: m for m in self.views.members_info(sid)}
        for ps in parsed.snapshots:
            info = members.get(ps.snapshot_id)
            if info is None:
                raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot {ps.snapshot_id} of "
                               f"set {sid} does not exist in pool {self.pool.path}")
            if info.state != "committed":
                raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot {info.id} is "
                               f"{info.state}, not a committed shadow copy")
            for side, doc_naa, ours in (("snapshot", ps.snapshot_naa, info.naa),
                                        ("source", ps.origin_naa, info.origin_naa)):
                if doc_naa.lower() != ours.lower():
                    raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot {info.id}: the "
                                   f"document's {side} LUN is naa.{doc_naa.lower()}, but this "
                                   f"array's is naa.{ours.lower()} (a foreign or edited "
                                   "document); nothing imported")
        try:
            located = await in_thread(self.hardware.LocateLuns, parsed.snapshot_naas)
        except VssError as e:
            raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid}: {e.message}; "
                           "nothing imported") from None
        ids = [lun.snapshot_id for lun in located if lun.snapshot_id]
        # Other requests ran while LocateLuns did: check again, then change everything
        # without awaiting (no other request can interleave from here on).
        if sid in self.catalog.imported:
            raise VssError("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot set {sid} is already "
                           f"imported on host {self.catalog.imported[sid][0]}; delete it "
                           "there first")
        if (sid not in self.catalog.records
                or sorted(ids) != sorted(ps.snapshot_id for ps in parsed.snapshots)
                or not all(self.views.is_snapshot(i) for i in ids)):
            raise VssError("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid} changed while "
                           "it was being imported (deleted?); nothing imported")
        present_to = None if host == self.masking.service_machine else frozenset((host,))
        before = {i: self.catalog.presented.get(i) for i in ids}
        recorded = False
        try:
            # one transaction: the import and the LUNs presented to the importing host
            # only (LocateLuns); the catalog's cache with it
            self.catalog.record_import(sid, host, origin, time.time(), ids, present_to)
            recorded = True
            self._fault("import.recorded")
            self.masking.push()
            self._fault("import.surfaced")
            snaps = []
            for i in ids:
                d = self.views.prop_json(self.pool.snapshot(i))
                d["device_object"] = self.masking.device_path(i, host)
                snaps.append(d)
        except BaseException as e:
            log.error("importing snapshot set %s on host %s failed (%s): undoing it", sid,
                      host, message(e))
            try:   # memory is given back even when the rows cannot be
                self.catalog.undo_import(sid, before, rows=recorded)
            except Exception as e2:   # noqa: BLE001 - the undo goes on; the first error is raised
                log.error("undoing the import of %s in the catalog: %s", sid, e2)
            try:
                self.masking.push()
            except Exception as e2:   # noqa: BLE001 - the undo goes on; the first error is raised
                log.error("restoring the LUN masking after a failed import: %s", e2)
            raise
        if rec.auto_release:   # the importing session owns its lifetime now
            bind_lifetime(self._sessions.values(), sid, session)
        audit.audit("set.import", id=sid, on_host=host, origin=origin, snapshots=ids)
        await self.masking.names_changed()   # the origin host's names of them are gone
        return {"set_id": sid, "host": host, "origin": origin, "snapshots": snaps}

    async def _import_at_array(self, session: Session, document: str,
                               parsed: documents.ParsedSet) -> dict[str, Any]:
        """Host mode, or a pool shared by several hosts (Ceph): the array checks the
        document and presents the LUNs to this host (host mode: its own import,
        transport.py there; Ceph: the records on the images, rbdarray/hosts.py); this
        host's coordinator then keeps the set's row and the import, as for a set it
        created (delete, lifetimes, list)."""
        sid, host = parsed.set_id, session.host
        if host != self.masking.service_machine:
            raise VssError("E_ACCESSDENIED", f"import on host daemon "
                           f"{self.masking.service_machine}: a requester here imports for "
                           f"this host, not for {host}")
        if sid in self.catalog.records:
            raise VssError("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot set {sid} is already "
                           "known on this host")
        res: dict[str, Any] = await in_thread(self.pool.import_set, document,  # type: ignore[attr-defined]
                                              parsed)
        ids = [s["snapshot_id"] for s in res.get("snapshots", [])]
        rec = SetRecord(sid, int(parsed.context), int(parsed.attributes),
                        int(SnapshotState.CREATED), time.time(), parsed.originating_machine,
                        session.client, len(ids), vss.is_auto_release(parsed.context))
        self.catalog.put_set(rec)
        self.catalog.record_import(sid, host, parsed.originating_machine, time.time(), ids,
                                   None)
        if rec.auto_release:
            bind_lifetime(self._sessions.values(), sid, session)
        snaps = []
        for i in ids:
            d = self.views.prop_json(self.pool.snapshot(i))
            d["device_object"] = self.masking.device_path(i, host)
            snaps.append(d)
        audit.audit("set.import", id=sid, on_host=host, origin=parsed.originating_machine,
                    snapshots=ids, at="array")
        await self.masking.names_changed()
        return {"set_id": sid, "host": host, "origin": parsed.originating_machine,
                "snapshots": snaps}
