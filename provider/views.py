"""The read-only projections: what the control API returns for volumes, snapshots and
sets (the JSON of `volume list`, `snapshot list/show`, `set list`), and the lookups that
turn what a requester names into a volume or snapshot.

Views owns no state and changes nothing. It reads the block store, the catalog's cache
(records, mounts, imports; provider/catalog.py), the LUN masking (provider/masking.py)
and two of the coordinator's dicts it is given at construction: the sets in creation
(``sets``) and the volume marks (``marks``). Trio thread only; nothing here awaits, so a
projection is consistent (no other request runs while it is built). No stat of any
path: a stat under our own mount is a FUSE request the trio thread would have to serve.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from blockstore import SnapshotInfo, VolumeInfo
from blockstore import errors as bse
from fuse_mount import loopdev

from . import vss
from .array import Array
from .catalog import ProviderCatalog
from .masking import LunMasking
from .model import NIL_GUID, SS, Mark, SnapshotSet, guid
from .snapshot_prop import SnapshotProp
from .snapshot_refs import Resolver
from .vss import Attr, Context, VssError


class Views:
    def __init__(self, pool: Array, catalog: ProviderCatalog, masking: LunMasking,
                 sets: dict[str, SnapshotSet], marks: dict[str, Mark]) -> None:
        self.pool = pool
        self.catalog = catalog
        self.masking = masking
        self._sets = sets     # the coordinator's sets in creation (read only)
        self._marks = marks   # the coordinator's volume marks (read only)
        # snapshot and set references (ids, prefixes, VOLUME@NAME): provider/snapshot_refs
        self.refs = Resolver(self.pool.list_snapshots, self.label_name, self.set_ids,
                             lambda s: s.state == "committed" and not self.in_creation(s))

    # ------------------------------------------------------------------ lookups
    def resolve_volume(self, spec: str) -> str:
        """A volume name from a name, MOUNT/volumes/<name>.img, or a /dev/loopN on it."""
        if not isinstance(spec, str) or not spec:
            raise VssError("E_INVALIDARG", f"volume {spec!r} is not a volume name")
        names = {v.name for v in self.pool.list_volumes()}
        if spec in names:
            return spec
        if "/" not in spec:
            if self.is_snapshot(spec):
                raise VssError("VSS_E_VOLUME_NOT_SUPPORTED",
                               f"{spec} is a snapshot; snapshots of snapshots are not "
                               "supported")
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no volume named {spec!r} in pool "
                           f"{self.pool.path}; 'volume list' shows them")
        path = os.path.abspath(spec)
        if path.startswith("/dev/loop"):
            back = loopdev.backing_file(path)
            if back is None:
                raise VssError("VSS_E_OBJECT_NOT_FOUND", f"{spec!r} is not an attached loop "
                               "device")
            path = back.removesuffix(loopdev.DELETED)
        mountpoint = self.masking.mountpoint
        if mountpoint and path.endswith(".img"):
            # MOUNT/volumes/<name>.img or MOUNT/hosts/<host>/volumes/<name>.img
            rel = path[len(mountpoint):].split("/") if path.startswith(
                mountpoint + "/") else []
            if len(rel) == 5 and rel[1] == "hosts" and rel[3] == "volumes":
                rel = ["", rel[3], rel[4]]
            if len(rel) == 3 and rel[1] == "volumes":
                name = rel[2][:-len(".img")]
                if name in names:
                    return name
        # No stat here, of any path: this runs on the trio thread that serves the FUSE
        # requests a stat under our mount -- or on a filesystem stacked on one of our
        # volumes -- would wait for. A path is a device name: ours, or not supported.
        raise VssError("VSS_E_VOLUME_NOT_SUPPORTED", f"{spec!r} is not a volume of pool "
                       f"{self.pool.path}; shadowplex snapshots only its own volumes (by "
                       "name, MOUNT/volumes/<name>.img, or a loop device on one)")

    def is_snapshot(self, key: str) -> bool:
        try:
            self.pool.snapshot(key)
            return True
        except (bse.NotFound, bse.InvalidName):
            return False

    def label_name(self, snapshot_id: str) -> str | None:
        lab = self.catalog.labels.get(snapshot_id)
        return lab.name if lab else None

    def set_ids(self) -> set[str]:
        return {*self.catalog.records, *self._sets,
                *(s.set_id for s in self.pool.list_snapshots() if s.set_id)}

    def named(self, volume: str, name: str) -> str | None:
        """The id of volume's existing snapshot named ``name``, or None."""
        for s in self.pool.list_snapshots():
            if s.volume == volume and self.label_name(s.id) == name:
                return s.id
        return None

    def members_info(self, set_id: str) -> list[SnapshotInfo]:
        return [s for s in self.pool.list_snapshots() if (s.set_id or s.id) == set_id]

    def set_members(self, set_id: str) -> list[str]:
        return [s.id for s in self.members_info(set_id)]

    # ------------------------------------------------------------------ volumes
    def volume_json(self, v: VolumeInfo) -> dict[str, Any]:
        d = asdict(v)
        d["allocated"] = self.pool.allocated_bytes(v.name)   # one stat, in the pool dir
        d["path"] = self.masking.shown_path(v.name)
        on_lun = getattr(self.pool, "presented_to", None)   # Ceph: the image's record
        d["presented_to"] = sorted(on_lun(v.name) if on_lun is not None
                                   else self.masking.hosts_of(v.name))
        mark = self._marks.get(v.name)
        d["in_use_by"] = None if mark is None else str(mark)
        return d

    def volume_list(self) -> list[dict[str, Any]]:
        return [self.volume_json(v) for v in self.pool.list_volumes()]

    # ------------------------------------------------------------------ snapshots
    def prop(self, s: SnapshotInfo) -> SnapshotProp:
        set_id = s.set_id or NIL_GUID
        rec = self.catalog.records.get(set_id)
        live = self._sets.get(set_id)
        if s.state == "invalid":
            status = SS.UNKNOWN
        elif live is not None:
            status = live.state
        else:
            status = SS(rec.state) if rec else SS.CREATED
        count = rec.snapshots_count if rec else len(live.volumes) if live else max(
            1, sum(1 for x in self.pool.list_snapshots() if x.set_id == s.set_id))
        attrs = int(vss.kind_attributes(s.attributes, s.kind))   # promoted: PLEX
        mount = self.catalog.mounted.get(s.id)
        exposed_path = None
        mountpoint = self.masking.mountpoint
        if mount is not None:
            exposed_path = mount.mountpoint
        elif s.exposed_name and mountpoint:
            exposed_path = os.path.join(self.masking.view_root(None, s.id) or mountpoint,
                                        "exposed", f"{s.exposed_name}.img")
        if s.exposed_name or mount is not None:
            attrs |= int(Attr.EXPOSED_LOCALLY)
        if set_id in self.catalog.imported:
            attrs |= int(Attr.IMPORTED)
        return SnapshotProp(
            snapshot_id=s.id, snapshot_set_id=set_id,
            snapshots_count=min(max(1, count), vss.MAX_VOLUMES_PER_SET),
            device_object=self.masking.device_path(s.id) or f".shadow/{s.id}.img",
            original_volume_name=self.masking.shown_path(s.volume) or s.volume,
            originating_machine=rec.originating_machine if rec and rec.originating_machine
            else (live.session.host if live and live.session else ""),
            service_machine=self.masking.service_machine,
            exposed_name=s.exposed_name or (mount.mountpoint if mount else None),
            exposed_path=exposed_path,
            attributes=Attr(attrs & vss.KNOWN_ATTR_BITS),
            creation_timestamp=s.created, status=status)

    def prop_json(self, s: SnapshotInfo) -> dict[str, Any]:
        d = self.prop(s).to_json()
        mount = self.catalog.mounted.get(s.id)
        rec = self.catalog.records.get(s.set_id or NIL_GUID)
        try:
            ctx = vss.snapshot_context(s.attributes).cli_name
        except ValueError:
            ctx = None
        lab = self.catalog.labels.get(s.id)
        d.update({
            "name": lab.name if lab else None,
            "description": lab.description if lab else None,
            "volume": s.volume, "naa": s.naa, "origin_naa": s.origin_naa, "size": s.size,
            "kind": s.kind, "pool_state": s.state, "context": ctx,
            "mounted_at": mount.mountpoint if mount else None,
            "loop_device": mount.dev if mount else None,
            "backup_complete": bool(rec.backup_complete) if rec else False,
            "presented_to": sorted(self.masking.hosts_of(s.id)),
            "imported_by": (self.catalog.imported.get(s.set_id or NIL_GUID) or (None,))[0],
            **self.space_json(s),
        })
        return d

    def space_json(self, s: SnapshotInfo) -> dict[str, int | None]:
        """Where a snapshot's space goes (docs/provider.md "Space"): a differential's
        diff-area bytes held only for it (``used``: what deleting it frees) and shared
        with other snapshots, from the backend's counters (None where it has none: a
        Ceph snapshot, one being prepared); a full copy's (plex, promoted) allocation,
        which deleting it frees whole (one fstat of its image here)."""
        if s.kind == "differential":
            return {"used": s.used, "shared": s.shared, "allocated": None}
        try:
            alloc: int | None = int(self.pool.allocated_bytes(s.id))
        except (bse.StoreError, OSError):
            alloc = None   # deleted meanwhile, or a backend that cannot say
        return {"used": alloc, "shared": None if alloc is None else 0, "allocated": alloc}

    def snapshot_list(self, set_id: str | None = None, volume: str | None = None,
                      context: str | int | None = None) -> list[dict[str, Any]]:
        ctx = vss.parse_context(context, allow_all=True) if context is not None else Context.ALL
        if volume is not None:
            volume = self.resolve_volume(volume)
        if set_id is not None:
            set_id = guid(set_id, "snapshot set id")
        out = []
        for s in self.pool.list_snapshots(volume):
            if set_id is not None and (s.set_id or s.id) != set_id:
                continue
            if not vss.context_matches(ctx, s.attributes):
                continue
            out.append(self.prop_json(s))
        return out

    def snapshot_show(self, snapshot_id: str | None = None,
                      set_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        if (snapshot_id is None) == (set_id is None):
            raise VssError("E_INVALIDARG", "name exactly one of snapshot_id or set_id")
        if snapshot_id is not None:
            sid = guid(snapshot_id, "snapshot id")
            try:
                return self.prop_json(self.pool.snapshot(sid))
            except bse.NotFound:
                if sid in self.catalog.records or sid in self._sets:   # a set's id
                    raise VssError("VSS_E_OBJECT_NOT_FOUND", f"{sid} is a snapshot set, not "
                                   f"a snapshot: 'snapshot show --set {sid}' lists its "
                                   "snapshots") from None
                raise
        sid = guid(set_id, "snapshot set id")
        snaps = self.snapshot_list(set_id=sid)
        if not snaps and sid not in self._sets:
            raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        return snaps

    # ------------------------------------------------------------------ sets
    def set_list(self) -> list[dict[str, Any]]:
        """Every set: those in creation, then the catalog's (the caller prunes first)."""
        out = [s.to_json() for s in self._sets.values()]
        for rec in self.catalog.records.values():
            if rec.set_id in self._sets:
                continue
            members = self.members_info(rec.set_id)
            labels = [self.catalog.labels.get(i.id) for i in members]
            # the set's name and description: its snapshots' (one create gives every
            # snapshot of a set the same ones); None if they differ or there are none
            names = {lab.name if lab else None for lab in labels}
            descs = {lab.description if lab else None for lab in labels}
            out.append({"set_id": rec.set_id, "context": Context(rec.context).cli_name,
                        "attributes": rec.attributes, "state": SS(rec.state).name,
                        "name": names.pop() if len(names) == 1 else None,
                        "description": descs.pop() if len(descs) == 1 else None,
                        "volumes": [{"volume": i.volume, "snapshot_id": i.id,
                                     "name": lab.name if lab else None}
                                    for i, lab in zip(members, labels, strict=True)],
                        "requester": rec.originating_machine or None,
                        "created": rec.created, "auto_release": rec.auto_release,
                        "backup_complete": rec.backup_complete,
                        "snapshots_count": rec.snapshots_count})
        return out

    # ------------------------------------------------------------------ creation
    def in_creation(self, s: SnapshotInfo) -> bool:
        """Prepared, or committed in the store while its set is not CREATED yet: until
        DoSnapshotSet ends the set may still be aborted (a writer that fails to thaw),
        which deletes its snapshots. Nothing else may delete, split, expose, revert to
        or promote them meanwhile."""
        return s.state == "preparing" or (s.set_id or s.id) in self._sets

    def committed(self, snapshot_id: str) -> SnapshotInfo:
        """The snapshot, refused while it is being created."""
        s: SnapshotInfo = self.pool.snapshot(guid(snapshot_id, "snapshot id"))
        if self.in_creation(s):
            raise VssError("VSS_E_BAD_STATE", f"snapshot {s.id} is still being created")
        return s
