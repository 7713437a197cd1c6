"""The hardware provider: VSS's IVssHardwareSnapshotProvider(Ex) over an Array
(provider/array.py; the embedded blockstore.Pool by default).

One method per VSS method, with VSS's names, so the coordinator reads like the VSS
documentation. LUNs are pool volumes (by name); a snapshot's LUN is its own LUN in the
pool (own naa id), reachable at MOUNT/.shadow/<snapshot-id>.img.

    AreLunsSupported        can these volumes be snapshotted in this context? (never raises)
    FillInLunInfo           identity of a volume's LUN (naa, size, device path)
    BeginPrepareSnapshot    prepare one snapshot; a plex starts syncing in a worker thread
    EndPrepareSnapshots     the rendezvous: waits until every plex of the set is in sync
    PreCommitSnapshots      last check before the instant (everything prepared and synced)
    CommitSnapshots         pool.commit_snapshots(): atomic, O(1), no I/O to origins
    PostCommitSnapshots     bookkeeping (VSS passes the number of snapshots)
    PreFinalCommitSnapshots / PostFinalCommitSnapshots   bookkeeping (nothing to do here)
    AbortSnapshots          at any point: stops syncs, removes every snapshot of the set
    GetTargetLuns           identities of the new LUNs (naa ids + device paths)
    LocateLuns              find snapshot LUNs by naa id (import / transport)
    OnLunEmpty              a snapshot LUN holds no shadow copy anymore: free it
    ResyncLuns              copy a snapshot back onto its origin (pool.revert)

Automagic resource management: a request with neither DIFFERENTIAL nor PLEX gets what the
policy says (``default_kind``, differential unless configured to plex; plex falls back to
differential when the pool has no room for a full copy); the chosen bit is set in the
snapshot's attributes together with HARDWARE_ASSISTED.

Threads: every method is synchronous and may block (the coordinator calls them through
trio.to_thread). Plex sync runs in one daemon thread per plex calling pool.plex_sync_step
until the plex is in sync or the set is aborted. The provider's own state is guarded by a
lock; the pool is thread-safe by itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from blockstore import SnapshotInfo
from blockstore import errors as bse

from . import vss
from .array import Array
from .vss import Attr, VssError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None] | None

DIFFERENTIAL, PLEX = "differential", "plex"
# Plex sync yields to foreground I/O: a step holds the pool lock for a few ms, and the
# sync thread would take it right back; while the volumes saw I/O in the last
# SYNC_YIELD_AFTER_IO s it pauses SYNC_YIELD s after each step (measured: 4K randread
# during a sync x1.55, sync throughput -12 %; without foreground I/O it never pauses).
SYNC_YIELD = 0.001
SYNC_YIELD_AFTER_IO = 0.01
SYNC_STEP = 4 << 20          # bytes per plex_sync_step: bounds how long a step holds the pool
VENDOR, PRODUCT = "SHADOWPX", "shadowplex LUN"


@dataclass(frozen=True)
class LunInfo:
    """What VDS_LUN_INFORMATION carries that means something here."""

    naa: str                 # page-83 identifier (also the LUN's serial)
    size: int
    vendor: str
    product: str
    volume: str | None       # the origin volume's name (None for a snapshot LUN)
    snapshot_id: str | None  # set for a snapshot LUN
    device_path: str | None  # MOUNT/volumes/<name>.img or MOUNT/.shadow/<id>.img

    def to_json(self) -> dict[str, Any]:
        return {"naa": self.naa, "size": self.size, "vendor": self.vendor,
                "product": self.product, "volume": self.volume,
                "snapshot_id": self.snapshot_id, "device_path": self.device_path}


@dataclass(eq=False)
class _Sync:
    """A plex being synced by a worker thread."""

    snapshot_id: str
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    total: int = 0
    error: BaseException | None = None
    finished: bool = False


@dataclass(eq=False)
class _HwSet:
    set_id: str
    snapshots: dict[str, str] = field(default_factory=dict)   # snapshot id -> volume
    syncs: dict[str, _Sync] = field(default_factory=dict)
    committed: bool = False
    aborted: bool = False


class HardwareProvider:
    """The array's provider interface. ``mountpoint`` only serves to name device paths."""

    def __init__(self, pool: Array, mountpoint: str | None = None,
                 default_kind: str = DIFFERENTIAL) -> None:
        if default_kind not in (DIFFERENTIAL, PLEX):
            raise ValueError(f"default_kind must be {DIFFERENTIAL} or {PLEX}, "
                             f"not {default_kind!r}")
        self.pool = pool
        self.mountpoint = mountpoint
        self.default_kind = default_kind
        self._lock = threading.Lock()
        self._sets: dict[str, _HwSet] = {}
        self._changed = threading.Condition(self._lock)

    # ------------------------------------------------------------------ helpers
    def device_path(self, snapshot_id: str) -> str | None:
        if self.mountpoint is None:
            return None
        return os.path.join(self.mountpoint, ".shadow", f"{snapshot_id}.img")

    def volume_path(self, volume: str) -> str | None:
        if self.mountpoint is None:
            return None
        return os.path.join(self.mountpoint, "volumes", f"{volume}.img")

    def allocated_bytes(self, volume: str) -> int:
        """Bytes allocated in a volume: what a full copy of it needs."""
        return self.pool.allocated_bytes(volume)

    def available_bytes(self) -> int:
        """Free space a full copy may take (the array keeps its own reserve)."""
        return self.pool.available_bytes()

    def require(self, capability: Literal["plex", "promote", "split", "revert",
                                          "changed_blocks"],
                what: str) -> None:
        """VSS_E_NOT_SUPPORTED unless the array has ``capability`` (a Capabilities
        field; mypy checks the name) for ``what`` the caller is about to do."""
        if not getattr(self.pool.capabilities, capability):
            raise VssError("VSS_E_NOT_SUPPORTED",
                           f"the array at {self.pool.path} cannot {what}")

    def _set(self, set_id: str) -> _HwSet:
        s = self._sets.get(set_id)
        if s is None:
            raise VssError("VSS_E_OBJECT_NOT_FOUND",
                           f"the provider has no snapshot set {set_id} in preparation")
        if s.aborted:
            raise VssError("VSS_E_BAD_STATE", f"snapshot set {set_id} was aborted")
        return s

    def choose_kind(self, attributes: int, volumes: Iterable[str] = ()) -> str:
        """differential or plex for this request (the automagic choice if neither bit)."""
        if attributes & Attr.PLEX:
            return PLEX
        if attributes & Attr.DIFFERENTIAL:
            return DIFFERENTIAL
        if self.default_kind == PLEX and self.pool.capabilities.plex:
            need = sum(self.allocated_bytes(v) for v in volumes)
            if need <= self.available_bytes():
                return PLEX
            log.info("policy asks for plex snapshots but a full copy needs %d bytes and "
                     "%d are available: choosing differential", need, self.available_bytes())
        return DIFFERENTIAL

    # ------------------------------------------------------------------ VSS methods
    def why_not_supported(self, volumes: Iterable[str], context: int) -> VssError | None:
        """Why AreLunsSupported would say False, as the error the coordinator reports
        (None: supported)."""
        vols = list(volumes)
        try:
            _ctx, attrs = vss.split_context(context)
        except VssError as e:
            return e
        if not vols:
            return VssError("E_INVALIDARG", "no volumes given")
        if len(set(vols)) != len(vols):
            return VssError("VSS_E_OBJECT_ALREADY_EXISTS", "a volume is named twice")
        caps = self.pool.capabilities
        if attrs & Attr.PLEX and not caps.plex:
            return VssError("VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER",
                            f"the array at {self.pool.path} has no full-copy (plex) "
                            "snapshots; ask for a differential one")
        known = {v.name for v in self.pool.list_volumes()}
        for v in vols:
            if v not in known:
                return VssError("VSS_E_OBJECT_NOT_FOUND",
                                f"{v!r} is not a volume of pool {self.pool.path}")
            n = len(self.pool.list_snapshots(v))
            if n >= caps.max_snapshots_per_volume:
                return VssError("VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED",
                                f"volume {v} has {n} snapshots, the maximum; delete some "
                                "first")
        if self.choose_kind(int(attrs), vols) == PLEX:
            need = sum(self.allocated_bytes(v) for v in vols)
            avail = self.available_bytes()
            if need > avail:
                return VssError(
                    "VSS_E_INSUFFICIENT_STORAGE",
                    f"a plex (full copy) of {', '.join(vols)} needs {need} bytes and the "
                    f"pool has {avail} available; use a differential snapshot or free space")
        return None

    def AreLunsSupported(self, volumes: Iterable[str], context: int) -> bool:
        """True if every volume can be snapshotted together in ``context`` (an lContext:
        context | DIFFERENTIAL/PLEX/TRANSPORTABLE). Never raises."""
        try:
            return self.why_not_supported(volumes, context) is None
        except Exception as e:   # noqa: BLE001 - a provider must answer, not fail, here
            log.warning("AreLunsSupported: %s", e)
            return False

    def FillInLunInfo(self, volume: str) -> LunInfo:
        v = self.pool.volume(volume)
        return LunInfo(v.naa, v.size, VENDOR, PRODUCT, v.name, None, self.volume_path(v.name))

    def BeginPrepareSnapshot(self, set_id: str, snapshot_id: str, volume: str,
                             attributes: int) -> SnapshotInfo:
        """Prepare one snapshot of ``volume`` in set ``set_id``; returns at once (a plex
        syncs in the background until EndPrepareSnapshots)."""
        kind = self.choose_kind(attributes, [volume])
        attrs = int(attributes) & ~int(Attr.DIFFERENTIAL | Attr.PLEX)
        attrs |= int(Attr.HARDWARE_ASSISTED) | int(Attr.PLEX if kind == PLEX
                                                    else Attr.DIFFERENTIAL)
        with self._lock:
            hs = self._sets.get(set_id)
            if hs is None:
                hs = self._sets[set_id] = _HwSet(set_id)
            elif hs.committed or hs.aborted:
                raise VssError("VSS_E_BAD_STATE",
                               f"snapshot set {set_id} is already committed or aborted")
        info: SnapshotInfo = self.pool.prepare_snapshot(volume, kind, snapshot_id, set_id,
                                                        attrs)
        with self._lock:
            hs.snapshots[info.id] = volume
            if kind == PLEX:
                sync = _Sync(info.id, total=info.sync_total)
                sync.thread = threading.Thread(target=self._sync_loop, args=(sync,),
                                               name=f"plex-sync-{info.id[:8]}", daemon=True)
                hs.syncs[info.id] = sync
                sync.thread.start()
        log.info("prepared %s snapshot %s of %s (set %s)", kind, info.id, volume, set_id)
        return info

    def _sync_loop(self, sync: _Sync) -> None:
        try:
            while not sync.stop.is_set():
                done, total = self.pool.plex_sync_step(sync.snapshot_id, SYNC_STEP)
                with self._changed:
                    sync.done, sync.total = done, total
                    self._changed.notify_all()
                if done >= total:
                    break
                if time.monotonic() - self.pool.last_io < SYNC_YIELD_AFTER_IO:
                    time.sleep(SYNC_YIELD)   # the lock free for the data path a moment
        except BaseException as e:   # noqa: BLE001 - reported by EndPrepareSnapshots
            sync.error = e
        finally:
            with self._changed:
                sync.finished = True
                self._changed.notify_all()

    def sync_progress(self, set_id: str) -> tuple[int, int]:
        """(bytes done, bytes total) over every plex of the set."""
        with self._lock:
            hs = self._sets.get(set_id)
            if hs is None:
                return 0, 0
            return (sum(s.done for s in hs.syncs.values()),
                    sum(s.total for s in hs.syncs.values()))

    def EndPrepareSnapshots(self, set_id: str, progress: Progress = None,
                            timeout: float | None = None) -> None:
        """Wait until every plex of the set is in sync, calling progress(done, total) as it
        moves. Raises the sync's error (the caller aborts), VSS_E_BAD_STATE if the set is
        aborted meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[int, int] | None = None
        while True:
            with self._changed:
                hs = self._set(set_id)
                syncs = list(hs.syncs.values())
                done = sum(s.done for s in syncs)
                total = sum(s.total for s in syncs)
                finished = all(s.finished for s in syncs)
                failed = next((s for s in syncs if s.error is not None), None)
                if not finished and failed is None:
                    wait = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                    if wait <= 0:
                        raise VssError("VSS_E_UNEXPECTED_PROVIDER_ERROR",
                                       f"plex sync of set {set_id} did not finish in "
                                       f"{timeout} s ({done}/{total} bytes)")
                    self._changed.wait(wait)
            if progress is not None and (done, total) != last and syncs:
                last = (done, total)
                progress(done, total)
            if failed is not None and failed.error is not None:
                err = failed.error
                if isinstance(err, bse.StoreError | VssError):
                    raise err
                raise VssError("VSS_E_UNEXPECTED_PROVIDER_ERROR",
                               f"plex sync of {failed.snapshot_id} failed: {err}") from err
            if finished:
                return

    def PreCommitSnapshots(self, set_id: str) -> None:
        with self._lock:
            hs = self._set(set_id)
            unsynced = [s.snapshot_id for s in hs.syncs.values()
                        if not s.finished or s.error is not None]
        if unsynced:
            raise VssError("VSS_E_BAD_STATE", f"plex(es) {', '.join(unsynced)} are not in "
                           "sync: EndPrepareSnapshots first")
        for sid in hs.snapshots:
            if self.pool.snapshot(sid).state != "preparing":
                raise VssError("VSS_E_BAD_STATE", f"snapshot {sid} is no longer prepared")

    def CommitSnapshots(self, set_id: str) -> None:
        """The instant: one atomic pool commit for every snapshot of the set."""
        with self._lock:
            hs = self._set(set_id)
            ids = list(hs.snapshots)
        self.pool.commit_snapshots(ids)
        with self._lock:
            hs.committed = True
            for s in hs.syncs.values():
                if s.thread is not None:
                    s.thread.join(0)   # finished already (PreCommit checked)
            hs.syncs.clear()

    def PostCommitSnapshots(self, set_id: str, snapshots_count: int) -> None:
        with self._lock:
            hs = self._set(set_id)
            if not hs.committed or len(hs.snapshots) != snapshots_count:
                raise VssError("VSS_E_BAD_STATE", f"snapshot set {set_id} is not committed "
                               f"with {snapshots_count} snapshot(s)")

    def PreFinalCommitSnapshots(self, set_id: str) -> None:
        with self._lock:
            self._set(set_id)

    def PostFinalCommitSnapshots(self, set_id: str) -> None:
        """The set is complete: the provider forgets its preparation state."""
        with self._lock:
            self._set(set_id)
            del self._sets[set_id]

    def AbortSnapshots(self, set_id: str) -> list[str]:
        """Undo everything of the set, whatever its stage; idempotent. Returns the ids of
        the snapshots removed. Errors are logged, never raised (abort must complete)."""
        with self._lock:
            hs = self._sets.pop(set_id, None)
            if hs is None:
                return []
            hs.aborted = True
            syncs = list(hs.syncs.values())
            for s in syncs:
                s.stop.set()
            self._changed.notify_all()
        for s in syncs:
            if s.thread is not None:
                s.thread.join()
        removed = []
        for sid in hs.snapshots:
            try:
                info = self.pool.snapshot(sid)
                if info.state == "preparing":
                    self.pool.abort_snapshot(sid)
                else:
                    self.pool.delete_snapshot(sid)
                removed.append(sid)
            except bse.NotFound:
                pass
            except Exception as e:   # noqa: BLE001 - abort must complete; logged
                log.error("aborting snapshot %s of set %s: %s", sid, set_id, e)
        log.info("aborted snapshot set %s (%d snapshot(s) removed)", set_id, len(removed))
        return removed

    def forget(self, set_id: str) -> None:
        """Drop the preparation state of a set without touching its snapshots."""
        with self._lock:
            self._sets.pop(set_id, None)

    def GetTargetLuns(self, snapshot_ids: Iterable[str]) -> list[LunInfo]:
        out = []
        for sid in snapshot_ids:
            s = self.pool.snapshot(sid)
            out.append(LunInfo(s.naa, s.size, VENDOR, PRODUCT, None, s.id,
                               self.device_path(s.id)))
        return out

    def LocateLuns(self, naas: Iterable[str]) -> list[LunInfo]:
        """Find snapshot LUNs by naa id (what an importing host asks the array)."""
        by_naa = {s.naa.lower(): s for s in self.pool.list_snapshots()}
        out = []
        for naa in naas:
            s = by_naa.get(str(naa).lower())
            if s is None:
                raise VssError("VSS_E_OBJECT_NOT_FOUND", f"no snapshot LUN with naa id {naa}")
            out.append(LunInfo(s.naa, s.size, VENDOR, PRODUCT, None, s.id,
                               self.device_path(s.id)))
        return out

    def OnLunEmpty(self, snapshot_id: str) -> None:
        """The snapshot LUN holds no shadow copy anymore: delete it and free its space."""
        self.pool.delete_snapshot(snapshot_id)

    def ResyncLuns(self, snapshot_id: str, volume: str | None = None,
                   progress: Progress = None) -> None:
        """Make the origin volume (or ``volume``) equal to the snapshot (revert)."""
        self.require("revert", "revert a volume to a snapshot")
        s = self.pool.snapshot(snapshot_id)
        self.pool.revert(volume or s.volume, snapshot_id, progress)
