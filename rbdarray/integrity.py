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
from blockstore.model import COMMITTED

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

    def check(self, progress: Progress = None) -> list[str]:
        """Every volume's image and every committed snapshot's RBD snapshot exist; no
        ``spx.*`` RBD snapshot without its record."""
        problems: list[str] = []
        with self._lock:
            vols = [v for v in self._vols.values() if sees(v.rec, self.host)]
            snaps = {s.id: s.volume for s in self._snaps.values() if s.state == COMMITTED}
            snaps.update({i: sc.name for i, (sc, _) in self._hidden_snaps.items()})
        for i, v in enumerate(vols):
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
                progress(i + 1, len(vols))
        return problems

    def scrub(self, progress: Progress = None) -> list[str]:
        """check (Ceph scrubs the data itself: `ceph osd deep-scrub`)."""
        return self.check(progress)
