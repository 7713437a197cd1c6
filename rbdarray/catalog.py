"""RbdArray's catalog in memory (a mixin: rbdarray/array.py has the rest): our volumes
and the snapshots presented to this host, built from a scan of the pool
(rbdarray/scan.py) when the array opens, and rebuilt whenever another host may have
changed the pool (rbdarray/follow.py calls ``_refresh``).

A scan is not applied when a local change overlapped it (``_mutation`` brackets every
local change of the pool's records and counts them in ``_epoch``): it may predate the
change and would undo it in memory; the follower tries again 50 ms later. A local
change updates memory itself, and the other hosts are notified when it ends.
``generation`` moves when what this host sees changes (``_digest``), so the FUSE view
rebuilds its tree only then.

What the scan says wins over memory: an image or snapshot gone from the pool, or no
longer presented here, leaves ``_vols`` / ``_snaps`` (its Image closed once its I/O in
flight is done); one presented here is opened. Snapshots this array is preparing are
its own (in memory only) and stay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blockstore.model import COMMITTED

from .errors import translated
from .follow import Follower
from .records import Lun, Snap, SnapRecord, Vol, sees
from .scan import ImageScan, repair, scan_pool
from .setlock import SetLock


class Catalog:
    """What the catalog needs of the array (RbdArray sets these)."""

    pool: str
    host: str
    _lock: threading.RLock
    _vols: dict[str, Vol]
    _snaps: dict[str, Snap]
    _hidden: dict[str, ImageScan]
    _hidden_snaps: dict[str, tuple[ImageScan, SnapRecord]]
    _epoch: int
    _mutating: int
    _token: str
    _leftovers: bool
    _follow: Follower | None
    _setlock: SetLock
    _io: Any
    _rbd: Any

    if TYPE_CHECKING:   # RbdArray's (declared only: no stub may shadow it)
        def _changed(self) -> None: ...

    def _load(self) -> None:
        """Our volumes and their committed snapshots, from a scan of the pool. If no
        host is creating a set (the set lock is free), first finishes or undoes what a
        crash interrupted (rbdarray/scan.py); else that waits for our next claim."""
        repairing = self._setlock.try_briefly()
        try:
            scans = scan_pool(self._io, self._rbd, self.pool)
            if repairing:
                repair(scans, self._image, self._rbd)
        finally:
            if repairing:
                self._setlock.release()
        self._apply(scans, self._epoch)

    def _refresh(self) -> bool:
        """Rebuild the catalog from a scan (the follower's call: another host may have
        changed the pool). False: a local change was under way; try again soon."""
        with self._lock:
            if self._mutating:
                return False
            epoch = self._epoch
        return self._apply(scan_pool(self._io, self._rbd, self.pool), epoch)

    def _apply(self, scans: dict[str, ImageScan], epoch: int) -> bool:
        """Make the catalog in memory what ``scans`` says, unless a local change came
        between (the epoch moved: the scan may predate it). Images newly presented here
        are opened before the lock is taken, those no longer presented closed after."""
        opened: dict[str, Any] = {}
        try:
            for name, sc in scans.items():
                v = self._vols.get(name)
                if sees(sc.rec, self.host) and (v is None or v.id != sc.id):
                    with translated(f"opening image {name}"), \
                            contextlib.suppress(self._rbd.ImageNotFound):
                        opened[name] = self._rbd.Image(self._io, name)
            with self._lock:
                if self._mutating or self._epoch != epoch:
                    return False
                closing = self._apply_locked(scans, opened)
        finally:
            for image in opened.values():      # the ones not taken
                with contextlib.suppress(Exception):
                    image.close()
        for lun in closing:
            with lun.gate.exclusive(), contextlib.suppress(Exception):
                lun.image.close()
        return True

    def _apply_locked(self, scans: dict[str, ImageScan], opened: dict[str, Any]
                      ) -> list[Lun]:
        closing: list[Lun] = []
        for name in list(self._vols):
            v = self._vols[name]
            sc = scans.get(name)
            if sc is None or sc.id != v.id or not sees(sc.rec, self.host):
                closing.append(v.lun)          # gone, re-created, or not ours to see
                del self._vols[name]
        self._hidden = {}
        for name, sc in scans.items():
            known = self._vols.get(name)
            if not sees(sc.rec, self.host):
                self._hidden[name] = sc
            elif known is not None:
                known.rec = sc.rec
                known.reverting = sc.revert
                known.size = sc.size
            elif name in opened:
                self._vols[name] = Vol(sc.id, name, sc.rec, Lun(opened.pop(name)),
                                       sc.mtime, sc.revert, sc.size)
        committed = {sid: (sc, rec) for sc in scans.values()
                     for sid, rec in sc.committed().items()}
        # a crashed commit's or delete's records (or another host's commit in flight):
        # this host repairs them at its next claim of the set lock (_repair_now)
        self._leftovers = any(len(sc.committed()) != len(sc.records)
                              for sc in scans.values())
        self._hidden_snaps = {}
        for sid, (sc, rec) in committed.items():
            s = self._snaps.get(sid)
            if not sees(rec, self.host):
                self._hidden_snaps[sid] = (sc, rec)
            elif s is None:
                rbd_id, size = sc.rbd[sid]
                self._snaps[sid] = Snap(sid, sc.name, rec, COMMITTED, size, rbd_id)
            elif s.state == COMMITTED:
                s.rec = rec
        for sid in list(self._snaps):
            s = self._snaps[sid]
            if s.state == COMMITTED and (sid not in committed or sid in self._hidden_snaps):
                del self._snaps[sid]
                if s.lun is not None:
                    closing.append(s.lun)
        token = self._digest()
        if token != self._token:
            self._token = token
            self._changed()
        return closing

    def _digest(self) -> str:
        """What this host sees (names, identities, records): generation moves with it."""
        vols = [(n, v.id, v.rec.dump()) for n, v in sorted(self._vols.items())
                if sees(v.rec, self.host)]
        snaps = [(i, str(s.state), s.rec.dump()) for i, s in sorted(self._snaps.items())
                 if sees(s.rec, self.host)]
        return hashlib.blake2b(json.dumps([vols, snaps]).encode(),
                               digest_size=12).hexdigest()

    def _repair_now(self) -> None:
        """Under the set lock (a claim: no commit is in flight anywhere), finish or undo
        what a crash left (rbdarray/scan.py); the refresh that follows shows it."""
        with self._mutation():
            scans = scan_pool(self._io, self._rbd, self.pool)
            repair(scans, self._image, self._rbd)
        self._leftovers = False
        if self._follow is not None:
            self._follow.wake()

    @contextlib.contextmanager
    def _mutation(self) -> Iterator[None]:
        """Around every local change of the pool's records: a scan that overlapped it is
        not applied (it may predate the change), and the other hosts are told after."""
        with self._lock:
            self._mutating += 1
        try:
            yield
        finally:
            with self._lock:
                self._mutating -= 1
                self._epoch += 1
                self._token = self._digest()
            if self._follow is not None:
                self._follow.changed()

    @contextlib.contextmanager
    def _image(self, name: str) -> Iterator[Any]:
        """A writable Image of volume ``name``: the open one if it is presented here,
        else opened for the duration (another host's volume, e.g. an imported
        snapshot's origin)."""
        v = self._vols.get(name)
        if v is not None:
            yield v.lun.image
            return
        with translated(f"opening image {name}"):
            image = self._rbd.Image(self._io, name)
        try:
            yield image
        finally:
            with contextlib.suppress(Exception):
                image.close()

