"""What RbdArray does for several hosts on one pool (a mixin: rbdarray/array.py has the
rest) -- the Array's optional members of a shared array (provider/array.py):

    present_volume(name, hosts)   LUN masking stored on the image (the record's
                                  ``hosts``): only those hosts' daemons see and serve it
                                  (presented_to(name): the hosts it has now)
    claim_set / release_set       the set-in-creation slot across hosts: the RADOS lock
                                  with a lease (rbdarray/setlock.py)
    mark_exported(set_id)         the set's snapshot records say it was exported
    import_set(document, parsed)  LocateLuns: the checks of an import against the
                                  records on the images, then the snapshots presented to
                                  this host only (and marked imported by it)

Masking here is what the daemons agree on, not a security boundary: every host holds a
Ceph key that can read any image of the pool (cephx caps are per pool or namespace; give
hosts that must not read each other's LUNs pools or namespaces of their own:
docs/ceph.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from blockstore import errors as bse
from blockstore.model import COMMITTED

from .catalog import Catalog
from .errors import translated
from .records import VOLUME_KEY, Snap, SnapRecord, Vol, snap_key

log = logging.getLogger(__name__)


class Hosts(Catalog):
    """The shared-array members (on the catalog in memory: rbdarray/catalog.py)."""

    if TYPE_CHECKING:   # RbdArray's (declared only: no stub may shadow it)
        def _vol(self, name: str) -> Vol: ...

    # ------------------------------------------------------------------ masking
    def presented_to(self, name: str) -> list[str]:
        """The hosts a volume this host sees is presented to; ["*"]: every host (a
        record from before presentation was stored on the image)."""
        with self._lock:
            return list(self._vol(name).rec.hosts or ["*"])

    def present_volume(self, name: str, hosts: Iterable[str]) -> None:
        """Present a volume (one this host sees) to exactly ``hosts``; the other hosts
        follow within the notify's delay. Leaving this host out hides it here too."""
        hs = sorted(set(hosts))
        if not hs:
            raise bse.InvalidState(f"volume {name}: name at least one host to present it to")
        with self._mutation():
            with self._lock:
                v = self._vol(name)
                rec = dataclasses.replace(v.rec, hosts=hs)
            with translated(f"presenting volume {name}"):
                v.lun.image.metadata_set(VOLUME_KEY, rec.dump())
            with self._lock:
                v.rec = rec
                self._changed()
        if self.host not in hs and self._follow is not None:
            self._follow.wake()       # the scan moves it out of this host's view

    # ------------------------------------------------------------------ set creation
    def claim_set(self, set_id: str, context: int, attributes: int) -> None:
        """The one set-in-creation slot across the pool's hosts (Busy naming the host
        that has it); renewed until release_set. Holding it, this host repairs what a
        crashed commit left, if its last scan saw any (rbdarray/scan.py)."""
        self._setlock.claim(set_id)
        if self._leftovers:
            try:
                self._repair_now()
            except Exception as e:   # noqa: BLE001 - housekeeping; the set goes on
                log.warning("repairing an interrupted commit's leftovers: %s", e)

    def release_set(self, set_id: str, created: bool) -> None:
        self._setlock.release(set_id)

    # ------------------------------------------------------------------ transport
    def mark_exported(self, set_id: str) -> None:
        """Record on the images that the set's BCD was exported (another host's import
        needs that: a document alone is not a key to this host's LUNs)."""
        with self._lock:
            snaps = [s for s in self._snaps.values()
                     if s.rec.set == set_id and s.state == COMMITTED]
        if not snaps:
            raise bse.NotFound(f"snapshot set {set_id} has no snapshot presented to host "
                               f"{self.host}")
        with self._mutation():
            for s in snaps:
                rec = dataclasses.replace(s.rec, exported=True)
                with translated(f"marking snapshot {s.id} exported"), \
                        self._image(s.volume) as image:
                    image.metadata_set(snap_key(s.id), rec.dump())
                s.rec = rec

    def import_set(self, document: str, parsed: Any = None) -> dict[str, Any]:
        """LocateLuns on Ceph: every snapshot of the document (provider/documents'
        ParsedSet, checked against this pool's id by the caller) must be on the pool,
        of that set, exported by its host, imported by nobody, with the document's LUN
        identities; then each is presented to this host only and marked imported by it
        -- all of them or none. Under the set-in-creation lock, with the records read
        again from the images: two hosts importing one set at once, one wins."""
        if parsed is None:
            raise bse.InvalidState("import on Ceph needs the parsed document")
        set_id = str(parsed.set_id).lower()
        wanted = [(str(p.snapshot_id).lower(), str(p.snapshot_naa).lower(),
                   str(p.origin_naa).lower()) for p in parsed.snapshots]
        with self._mutation(), self._setlock.holding("import"):
            found: list[tuple[str, str, SnapRecord]] = []
            for sid, snap_naa, origin_naa in wanted:
                with self._lock:
                    if sid in self._snaps and self._snaps[sid].state == COMMITTED:
                        raise bse.InvalidState(
                            f"snapshot {sid} of set {set_id} is presented to host "
                            f"{self.host} already (made or imported here): import it on "
                            "another host; nothing imported")
                    hit = self._hidden_snaps.get(sid)
                if hit is None:
                    raise bse.NotFound(f"snapshot {sid} of set {set_id} is not in Ceph pool "
                                       f"{self.pool} (deleted, or never made here); nothing "
                                       "imported")
                sc = hit[0]
                with translated(f"reading the record of snapshot {sid}"), \
                        self._image(sc.name) as image:
                    rec = SnapRecord.load(image.metadata_get(snap_key(sid)))
                _check_import(rec, sid, set_id, snap_naa, origin_naa, sc.rec.naa)
                found.append((sid, sc.name, rec))
            done: list[tuple[str, str, SnapRecord]] = []
            try:
                for sid, volume, rec in found:
                    new = dataclasses.replace(rec, hosts=[self.host], imported=self.host)
                    with translated(f"presenting snapshot {sid} to host {self.host}"), \
                            self._image(volume) as image:
                        image.metadata_set(snap_key(sid), new.dump())
                    done.append((sid, volume, rec))
            except BaseException:
                for sid, volume, rec in done:   # all or nothing
                    try:
                        with self._image(volume) as image:
                            image.metadata_set(snap_key(sid), rec.dump())
                    except Exception as e:   # noqa: BLE001 - logged; the first error is raised
                        log.error("undoing the import of snapshot %s: %s", sid, e)
                raise
            with self._lock:
                for sid, volume, rec in found:
                    sc = self._hidden_snaps.pop(sid)[0]
                    rbd_id, size = sc.rbd[sid]
                    new = dataclasses.replace(rec, hosts=[self.host], imported=self.host)
                    self._snaps[sid] = Snap(sid, volume, new, COMMITTED, size, rbd_id)
                self._changed()
        log.info("snapshot set %s imported: %d snapshot(s) presented to host %s only",
                 set_id, len(found), self.host)
        return {"set_id": set_id, "host": self.host,
                "snapshots": [{"snapshot_id": sid} for sid, _, _ in found]}


def _check_import(rec: SnapRecord, sid: str, set_id: str, snap_naa: str, origin_naa: str,
                  our_origin_naa: str) -> None:
    """One snapshot of an import against its record on the image (Exists /
    InvalidState, naming what is wrong; nothing has changed yet)."""
    if (rec.set or "").lower() != set_id:
        raise bse.InvalidState(f"snapshot {sid} is not of set {set_id} on this pool (a "
                               "foreign or edited document); nothing imported")
    if rec.imported:
        raise bse.Exists(f"snapshot set {set_id} is already imported on host "
                         f"{rec.imported}; delete it there first")
    if not rec.exported:
        raise bse.InvalidState(f"snapshot set {set_id} was not exported from this pool "
                               "(export it on its host first); nothing imported")
    for side, doc, ours in (("snapshot", snap_naa, rec.naa),
                            ("source", origin_naa, our_origin_naa)):
        if doc != ours.lower():
            raise bse.InvalidState(f"snapshot {sid}: the document's {side} LUN is "
                                   f"naa.{doc}, but this pool's is naa.{ours.lower()} (a "
                                   "foreign or edited document); nothing imported")
