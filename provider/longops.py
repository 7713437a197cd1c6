"""The long operations: revert, promote, split, check and scrub.

Each runs as a job (provider/jobs.py): status lists it, and its cancel token stops it
at the next chunk. What a cancellation leaves is decided here and said in the reply:
promote, split, scrub and check stop with nothing changed (E_ABORT); a revert that has
started rolls forward and completes (docs/provider.md). One long operation at a time
per snapshot (``claim``; expose --mount takes a claim too, and deletion is refused
while one is held).

State: the claims (snapshot id -> what runs on it) and the jobs; it reads and sets the
coordinator's volume marks (a revert marks its volume). Trio thread; the block store
runs in worker threads, whose progress reaches the trio thread through
model.thread_progress.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio

from blockstore import SnapshotInfo, Tally
from blockstore import errors as bse

from . import audit
from .array import Array
from .catalog import ProviderCatalog
from .deletion import Deletion
from .exposure import Exposure
from .hardware import HardwareProvider
from .jobs import CancelToken, Job, Jobs
from .masking import LunMasking
from .model import Mark, ProgressFn, Revert, in_thread
from .views import Views
from .volumes import Volumes
from .vss import VssError

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


class LongOperations:
    def __init__(self, pool: Array, hardware: HardwareProvider, barrier: Any,
                 config: dict[str, Any], catalog: ProviderCatalog, masking: LunMasking,
                 views: Views, volumes: Volumes, exposure: Exposure, deletion: Deletion,
                 marks: dict[str, Mark], claims: dict[str, str]) -> None:
        self.pool = pool
        self.hardware = hardware
        self.barrier = barrier
        self.config = config
        self.catalog = catalog
        self.masking = masking
        self.views = views
        self.volumes = volumes
        self.exposure = exposure
        self.deletion = deletion
        self._marks = marks           # the coordinator's: a revert marks its volume
        # snapshot id -> the long operation running on it (promote, split, expose
        # --mount); ours to change, Deletion reads it (a claimed snapshot is not deleted)
        self.claims = claims
        self.jobs = Jobs()   # revert/promote/split/scrub/check running (status shows them)

    @contextlib.contextmanager
    def claim(self, snapshot_id: str, what: str) -> Iterator[None]:
        """One long operation at a time per snapshot (promote, split, expose --mount;
        deletion waits for none of them and is refused meanwhile): they run in worker
        threads, and two on one snapshot collide (the promote's temporary files, a mount
        recorded for a snapshot split or deleted meanwhile, two mounts of one snapshot)."""
        other = self.claims.get(snapshot_id)
        if other is not None:
            raise VssError("VSS_E_VOLUME_IN_USE", f"snapshot {snapshot_id} is being "
                           f"{other}; retry when that is done")
        self.claims[snapshot_id] = what
        try:
            yield
        finally:
            self.claims.pop(snapshot_id, None)

    async def revert(self, snapshot_id: str, force: bool = False,
                     progress: ProgressFn = None,
                     cancel: CancelToken | None = None) -> dict[str, Any]:
        """ResyncLuns: the origin volume becomes equal to the snapshot. Writes to it wait
        meanwhile; refused while loop devices use the volume unless ``force``.

        Cancelled before the volume changes: E_ABORT, nothing changed. Once it has begun
        to change the volume it completes (as after a crash: the store rolls it forward),
        also when cancelled or when the requester leaves. However it ends, once the
        volume has begun to change the kernel's cached pages of it are dropped before
        the reply (they hold pre-revert data: the revert writes behind the page cache)."""
        self.hardware.require("revert", "revert a volume to a snapshot")
        s = self.views.committed(snapshot_id)
        vol = s.volume
        self.volumes.check_unmarked(vol, "revert")
        if not force:
            await in_thread(self.volumes.check_not_attached, vol, "revert")
        # --force onto a volume loop devices use: done, and said -- in the reply (the CLI
        # prints it on stderr) and in the audit line (at WARNING)
        users = await in_thread(lambda: self.volumes.where_attached(
            self.volumes.attached(vol))) if force else ""
        self._marks[vol] = Revert()
        hold = None
        started = False   # pool.revert called: the volume may have changed from then on
        with self.jobs.run("revert", s.id, vol, cancel) as job:
            try:
                hold = await self.barrier.hold([vol],
                                               deadline=float(self.config["revert_hold"]))

                def run(report: Callable[[int, int], None]) -> None:
                    nonlocal started
                    job.check()   # the last moment a cancellation leaves it unchanged
                    started = True
                    self.hardware.ResyncLuns(s.id, vol, report)
                await in_thread(run, job.thread_progress(progress, "revert"))
            except bse.Cancelled:
                if started:   # the store ignores it once started: a bug
                    raise
                raise self._job_cancelled(job, f"revert of volume {vol} to snapshot "
                                          f"{s.id}", "it had not started") from None
            finally:
                if hold is not None:
                    self.barrier.release(hold)
                self._marks.pop(vol, None)
                if started:
                    # after the release: a write held by the barrier keeps its page
                    # locked, and the kernel's invalidation waits for that page
                    with trio.CancelScope(shield=True):
                        await self.masking.invalidate(vol)
        audit.audit("snapshot.revert", None, logging.WARNING if users else logging.INFO,
                    id=s.id, volume=vol, **({"force": "yes"} if force else {}),
                    **({"attached": users} if users else {}),
                    **({"note": "cancelled-after-start-rolled-forward"} if job.cancelled
                       else {}))
        out = self.views.volume_json(self.pool.volume(vol))
        if users:
            out["warning"] = (f"volume {vol} was reverted under {users}: what the kernel "
                              "and the filesystems there had cached is stale; unmount and "
                              "detach them, then fsck before mounting it again")
        return out

    @staticmethod
    def _job_cancelled(job: Job, what: str, detail: str) -> VssError:
        return VssError("E_ABORT", f"{what} cancelled ({job.token.reason or 'cancelled'}): "
                        f"nothing changed ({detail})")

    async def promote(self, snapshot_id: str, progress: ProgressFn = None,
                      cancel: CancelToken | None = None) -> dict[str, Any]:
        """Differential -> full copy. Cancelled: E_ABORT, still differential (the copy is
        thrown away); a cancellation after the copy is committed comes too late."""
        self.hardware.require("promote", "promote a snapshot to a full copy")
        s = self.views.committed(snapshot_id)
        with self.claim(s.id, "promoted"), \
                self.jobs.run("promote", s.id, s.volume, cancel) as job:
            try:
                info = await in_thread(self.pool.promote, s.id,
                                        job.thread_progress(progress, "promote"))
            except bse.Cancelled:
                raise self._job_cancelled(job, f"promote of snapshot {s.id}",
                                          "it is still differential") from None
        audit.audit("snapshot.promote", id=s.id, volume=s.volume)
        return self.views.prop_json(info)

    async def split(self, snapshot_id: str, name: str, progress: ProgressFn = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        """Break the snapshot off as volume ``name``. All or nothing: cancelled during
        its promote step, E_ABORT with the snapshot unchanged and no volume; after it,
        the split completes.

        The snapshot's paths (.shadow/<id>.img, its exposed name, the same in host
        views) vanish with it: refused (VSS_E_VOLUME_IN_USE, nothing changed) while
        anything uses one, as a delete is -- checked before it starts and again once
        the promote step's copy is complete, its last moment to stop with nothing
        changed (a copy takes long: a loop device attached meanwhile counts too)."""
        self.hardware.require("split", "split a snapshot off as a volume")
        s = self.views.committed(snapshot_id)
        with self.claim(s.id, "split"):
            if s.id in self.catalog.mounted:
                raise VssError("VSS_E_VOLUME_IN_USE", f"snapshot {s.id} is mounted at "
                               f"{self.catalog.mounted[s.id].mountpoint}; unexpose it first")
            users = await self.exposure.snapshot_users([s], wait=2.0)
            if users:
                raise VssError("VSS_E_VOLUME_IN_USE",
                               self.exposure.in_use_message(users, "split"))
            with self.jobs.run("split", s.id, s.volume, cancel) as job:
                report = job.thread_progress(progress, "split")

                def step(done: int, total: int) -> None:   # in the worker thread
                    report(done, total)   # raises Cancelled once cancelled
                    if done >= total:     # the copy is complete (and, last, durable)
                        users = trio.from_thread.run(self.exposure.users_of, s.id)
                        if users:
                            raise bse.Busy(self.exposure.in_use_message(users, "split") +
                                           f" (nothing changed: no volume {name}; the "
                                           f"snapshot is still {s.kind})")
                step.point_of_no_return = report.point_of_no_return  # type: ignore[attr-defined]
                try:
                    v = await in_thread(self.pool.split, s.id, name, step)
                except bse.Cancelled:
                    raise self._job_cancelled(job, f"split of snapshot {s.id}", f"no "
                                              f"volume {name}; the snapshot is still "
                                              f"{s.kind}") from None
                except Exception as e:
                    err = self._split_failed(s, e)
                    if err is e:
                        raise
                    raise err from e
        audit.audit("snapshot.split", id=s.id, volume=s.volume, new_volume=v.name)
        self.exposure.forget_names(s.id)
        set_id = s.set_id or s.id
        if set_id in self.catalog.records and not self.views.set_members(set_id):
            self.deletion.drop_record(set_id)
        await self.masking.names_changed()   # .shadow/<id>.img (and its exposed name) are gone
        return self.views.volume_json(v)

    def _split_failed(self, s: SnapshotInfo, e: Exception) -> Exception:
        """A split that failed after its promote step left the snapshot a full copy:
        the error says so (same content, but not what the snapshot was)."""
        try:
            now = self.pool.snapshot(s.id).kind
        except bse.StoreError:
            return e
        if now == s.kind:
            return e
        from .protocol import to_vss_error
        err = to_vss_error(e)
        return VssError(err.name, f"{err.message}; snapshot {s.id} was promoted to a full "
                        "copy before that (same content)")

    async def check(self, progress: ProgressFn = None, volume: str | None = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self._verify("check", "it only reads", progress, volume, cancel)

    async def scrub(self, progress: ProgressFn = None, volume: str | None = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self._verify("scrub", "a scrub changes no data", progress, volume,
                                  cancel)

    async def _verify(self, op: str, unchanged: str, progress: ProgressFn,
                      volume: str | None, cancel: CancelToken | None) -> dict[str, Any]:
        """check or scrub, of the pool or of one volume and its snapshots: the problems
        and what was read (the LUNs, the chunks verified against their checksums, the
        bytes). The provider's catalog is checked with the whole pool only."""
        if volume is not None:
            self.pool.volume(volume)   # VSS_E_OBJECT_NOT_FOUND before a job is listed
        tally = Tally()
        with self.jobs.run(op, volume or "pool", volume, cancel) as job:
            try:
                problems = await in_thread(functools.partial(
                    getattr(self.pool, op), volume=volume, tally=tally),
                    job.thread_progress(progress, op))
            except bse.Cancelled:
                raise self._job_cancelled(job, op, unchanged) from None
        problems = list(problems)
        if volume is None:
            problems += self.deletion.check_catalog()
        return {"ok": not problems, "problems": problems, "volume": volume,
                "luns": tally.luns, "chunks_verified": tally.chunks,
                "bytes_read": tally.bytes}

