"""RbdArray's self-check (a mixin: rbdarray/array.py has the rest): every volume's image
and every committed snapshot's RBD snapshot exist, and no ``spx.*`` RBD snapshot lacks
its record. Snapshots presented to other hosts count as known; a record that is not done
yet is a commit in flight (this host's or another's), not a problem. Ceph scrubs the
data itself (`ceph osd deep-scrub`): scrub is check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from blockstore import errors as bse
from blockstore.model import COMMITTED, Tally

from .errors import translated
from .records import VOLUME_KEY, Snap, SnapRecord, Vol, rbd_snap_name, sees, snap_key
from .scan import ImageScan, text_of

Progress = Callable[[int, int], None] | None


class Integrity:
    """What check needs of the array (RbdArray sets these)."""

    host: str
    _lock: threading.RLock
    _vols: dict[str, Vol]
    _snaps: dict[str, Snap]
    _hidden_snaps: dict[str, tuple[ImageScan, SnapRecord]]

    def check(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """Every volume's image (or ``volume``'s: NotFound if it is not presented here)
        and every committed snapshot's RBD snapshot exist; no ``spx.*`` RBD snapshot
        without its record. It reads metadata, no data: progress counts the volumes'
        sizes covered, ``tally`` the LUNs."""
        problems: list[str] = []
        t = tally if tally is not None else Tally()
        with self._lock:
            vols = [v for v in self._vols.values()
                    if sees(v.rec, self.host) and volume in (None, v.name)]
            snaps = {s.id: s.volume for s in self._snaps.values() if s.state == COMMITTED}
            snaps.update({i: sc.name for i, (sc, _) in self._hidden_snaps.items()})
        if volume is not None and not vols:
            raise bse.NotFound(f"no volume {volume!r} presented to host {self.host}")
        sizes = []
        for v in vols:
            try:
                with translated(f"size of {v.name}"):
                    sizes.append(int(v.lun.image.size()))
            except bse.StoreError:
                sizes.append(0)   # (the check below reports the image)
        for i, v in enumerate(vols):
            t.luns += 1 + sum(1 for x in snaps.values() if x == v.name)
            try:
                with translated(f"checking {v.name}"):
                    rbd_snaps = {text_of(x["name"]) for x in v.lun.image.list_snaps()}
                    meta = dict(v.lun.image.metadata_list())
            except bse.StoreError as e:
                problems.append(str(e))
                continue
            if VOLUME_KEY not in meta:
                problems.append(f"volume {v.name}: its image lost the {VOLUME_KEY} record")
            for sid, volume in snaps.items():
                if volume == v.name and rbd_snap_name(sid) not in rbd_snaps:
                    problems.append(f"snapshot {sid} of {v.name}: its RBD snapshot is "
                                    "missing")
            for name in rbd_snaps:
                sid = name[4:]
                # a record not done yet: a commit in flight (this host's or another's)
                if name.startswith("spx.") and snaps.get(sid) != v.name and \
                        snap_key(sid) not in meta:
                    problems.append(f"volume {v.name}: RBD snapshot {name} has no record")
            if progress is not None:
                progress(sum(sizes[:i + 1]), sum(sizes))
        return problems

    def scrub(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """check (Ceph scrubs the data itself: `ceph osd deep-scrub`)."""
        return self.check(progress, volume, tally)
