"""Snapshot set creation: VSS's state machine, the part of the coordinator that makes sets.

Creation of a snapshot set (VSS's sequence; VSS_SNAPSHOT_STATE values in brackets):

    StartSnapshotSet                                   [PREPARING 1]
    AddToSnapshotSet x N (<= 64 volumes)               [PREPARING 1]
    DoSnapshotSet:
      BeginPrepareSnapshot x N, EndPrepareSnapshots    [PROCESSING_PREPARE 2 -> PREPARED 3]
      writers Freeze (<= freeze_timeout, 60 s)         [PROCESSING_PRECOMMIT 4]
      PreCommitSnapshots                               [-> PRECOMMITTED 5]
      flush & hold every volume (<= hold_deadline,     [PROCESSING_COMMIT 6]
        10 s, else VSS_E_HOLD_WRITES_TIMEOUT),
      CommitSnapshots, release                         [-> COMMITTED 7]
      PostCommitSnapshots, writers Thaw                [PROCESSING_POSTCOMMIT 8 -> 15]
      PreFinalCommitSnapshots                          [PROCESSING_PREFINALCOMMIT 9 -> 10]
      PostFinalCommitSnapshots                         [PROCESSING_POSTFINALCOMMIT 11]
                                                       [CREATED 12]

Any failure or cancellation (a requester that disconnects) at any point aborts the set:
the hold is released, writers get Abort (which thaws them), the hardware provider removes
every snapshot of the set, whether prepared or already committed [ABORTED 13]. Nothing is
left: no snapshot, no diff-area growth, no catalog row.

One set is in creation at a time, system-wide (a second StartSnapshotSet gets
VSS_E_SNAPSHOT_SET_IN_PROGRESS; on a shared array also the array's slot, see start_set).

SetCreation is a mixin of Coordinator (provider/coordinator.py): the state it works on --
the set in creation, the sets, the volume marks, the sessions, the writers, the hardware
provider -- is the coordinator's, created in its __init__; the names below only declare
it. It runs on the daemon's trio loop; every call that may block runs in a worker thread.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from blockstore import errors as bse
from fuse_mount.barrier import WriteBarrier

from . import audit, snapshot_refs, vss
from .array import Array
from .array_service import HostSets
from .catalog import Label, ProviderCatalog, SetRecord
from .hardware import DIFFERENTIAL, PLEX, HardwareProvider
from .longops import LongOperations
from .masking import LunMasking
from .model import (
    SS,
    InSet,
    Mark,
    ProgressFn,
    Session,
    SnapshotSet,
    WriterEvent,
    bind_lifetime,
    in_thread,
    parse_attributes,
    thread_progress,
)
from .views import Views
from .volumes import Volumes
from .vss import Attr, Context, SnapshotState, VssError
from .writercalls import call_writers, culprit, message, names, wname

log = logging.getLogger("provider.coordinator")

StateHook = Callable[["SnapshotSet", SnapshotState], Awaitable[None] | None]


def _vss(name: str, message: str) -> VssError:
    return VssError(name, message)


class SetCreation:
    """StartSnapshotSet .. DoSnapshotSet, abort, BackupComplete (see the module doc)."""

    pool: Array
    barrier: WriteBarrier
    config: dict[str, Any]
    writers: list[Any]
    hardware: HardwareProvider
    catalog: ProviderCatalog
    masking: LunMasking
    views: Views
    volumes: Volumes
    host_sets: HostSets
    service_machine: str
    state_hook: StateHook | None
    _creating: SnapshotSet | None
    _sets: dict[str, SnapshotSet]
    _marks: dict[str, Mark]
    _sessions: dict[int, Session]
    longops: LongOperations

    def start_snapshot_set(self, session: Session, context: str | int = "backup",
                           attributes: int | str | Sequence[str] | None = None) -> str:
        """StartSnapshotSet: a new set id. VSS_E_SNAPSHOT_SET_IN_PROGRESS if any set is
        being created; the context and option bits are checked here."""
        ctx = vss.parse_context(context)
        attrs = vss.validate_attributes(ctx, parse_attributes(attributes))
        other = self.creating_message()
        if other is not None:
            raise _vss("VSS_E_SNAPSHOT_SET_IN_PROGRESS", other)
        s = SnapshotSet(str(uuid.uuid4()), ctx, attrs, session)
        self._creating = s
        self._sets[s.set_id] = s
        log.debug("snapshot set %s started (%s%s) by session %d", s.set_id, ctx.vss_name,
                  "".join(f"|{n}" for n in vss.attr_names(int(attrs) & int(vss.OPTION_BITS))),
                  session.id)
        return s.set_id

    def creating_message(self) -> str | None:
        """Why no set can be started now (the one in creation), or None."""
        other = self._creating
        if other is not None:
            who = (f"requester {other.session.host}" if other.session else "the daemon")
            return (f"snapshot set {other.set_id} of {who} is being created "
                    f"({other.state.name}); only one at a time: retry when it is done")
        return self.host_sets.busy_message()

    async def start_set(self, session: Session, context: str | int = "backup",
                        attributes: int | str | Sequence[str] | None = None,
                        name: str | None = None, description: str | None = None) -> str:
        """StartSnapshotSet, and on a shared array (host mode) the array's slot too: a
        set in creation on the array (any host's) makes it VSS_E_SNAPSHOT_SET_IN_PROGRESS.
        ``name``/``description``: every snapshot of the set gets them (snapshot_refs)."""
        if name is not None:
            name = snapshot_refs.check_name(name)
        if description is not None:
            description = snapshot_refs.check_description(description)
        set_id = self.start_snapshot_set(session, context, attributes)
        self._sets[set_id].name, self._sets[set_id].description = name, description
        claim = getattr(self.pool, "claim_set", None)
        if claim is not None:
            s = self._sets[set_id]
            try:
                await in_thread(claim, set_id, int(s.context), int(s.attributes))
            except bse.Busy as e:   # a shared backend's slot (Ceph: another host's set)
                self._finish(self._sets[set_id])
                raise _vss("VSS_E_SNAPSHOT_SET_IN_PROGRESS", str(e)) from None
            except BaseException:
                self._finish(self._sets[set_id])
                raise
        return set_id

    async def _release_array(self, s: SnapshotSet, created: bool) -> None:
        """Give the array's slot back (host mode); never raises (the lease runs out)."""
        release = getattr(self.pool, "release_set", None)
        if release is not None:
            with trio.CancelScope(shield=True):
                try:
                    await in_thread(release, s.set_id, created)
                except Exception as e:   # noqa: BLE001 - logged; the lease expires
                    log.error("releasing set %s on the array: %s", s.set_id, e)

    def own_set(self, session: Session, set_id: str | None, what: str) -> SnapshotSet:
        if set_id is None:
            mine = [s for s in self._sets.values() if s.session is session]
            if not mine:
                raise _vss("VSS_E_BAD_STATE", f"{what}: no snapshot set was started in this "
                           "session (call set.start first)")
            return mine[-1]
        try:
            set_id = vss.guid(set_id)
        except ValueError:
            raise _vss("E_INVALIDARG", f"{what}: {set_id!r} is not a snapshot set id") from None
        s = self._sets.get(set_id)
        if s is None:
            if set_id in self.catalog.records:
                raise _vss("VSS_E_BAD_STATE", f"{what}: snapshot set {set_id} is already "
                           "created")
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"{what}: no snapshot set {set_id} is being "
                       "created")
        if s.session is not session:
            raise _vss("VSS_E_BAD_STATE", f"{what}: snapshot set {set_id} belongs to another "
                       "requester session")
        return s

    def add_to_snapshot_set(self, session: Session, volume: str,
                            set_id: str | None = None) -> str:
        """AddToSnapshotSet: returns the new snapshot's id."""
        s = self.own_set(session, set_id, "add a volume")
        if s.state != SS.PREPARING or s.doing:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {s.set_id} is {s.state.name}: "
                       "volumes can only be added before set.do")
        name = self.views.resolve_volume(volume)
        if name in s.volumes:
            raise _vss("VSS_E_OBJECT_ALREADY_EXISTS",
                       f"volume {name} is already in snapshot set {s.set_id}")
        if len(s.volumes) >= vss.MAX_VOLUMES_PER_SET:
            raise _vss("VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED",
                       f"snapshot set {s.set_id} already holds {len(s.volumes)} volumes, "
                       f"the maximum")
        self.volumes.check_unmarked(name, "snapshot")
        self._check_label_free(s, name)
        err = self.hardware.why_not_supported([*s.volumes, name], int(s.attributes))
        if err is not None:   # AreLunsSupported said no: here is why
            raise _vss(err.name, f"cannot add {name} to snapshot set {s.set_id}: "
                       f"{err.message}")
        sid = str(uuid.uuid4())
        s.volumes[name] = sid
        self._marks[name] = InSet(s.set_id)
        log.debug("volume %s added to snapshot set %s as snapshot %s", name, s.set_id, sid)
        return sid

    def label_set(self, s: SnapshotSet, name: str | None, description: str | None) -> None:
        """Name/describe the snapshots of a set before set.do (a script's `create name
        N`): checked here, so a refusal leaves the set as it was."""
        if s.doing:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {s.set_id} is already being done")
        if name is not None:
            name = snapshot_refs.check_name(name)
        if description is not None:
            description = snapshot_refs.check_description(description)
        was = s.name
        s.name = name if name is not None else s.name
        try:
            for volume in s.volumes:
                self._check_label_free(s, volume)
        except VssError:
            s.name = was
            raise
        if description is not None:
            s.description = description

    def _check_label_free(self, s: SnapshotSet, volume: str) -> None:
        if s.name is not None and self.views.named(volume, s.name) is not None:
            raise _vss("VSS_E_OBJECT_ALREADY_EXISTS", f"volume {volume} already has a "
                       f"snapshot named {s.name!r} ({volume}@{s.name}): choose another "
                       "name or delete that snapshot")

    def _put_labels(self, s: SnapshotSet) -> None:
        """The set's snapshots' name and description, checked once more: no await
        between this check and the write (no other request interleaves)."""
        if s.name is None and s.description is None:
            return
        for volume in s.volumes:
            self._check_label_free(s, volume)
        self.catalog.put_labels(
            {sid: Label(v, s.name, s.description) for v, sid in s.volumes.items()},
            [x.id for x in self.pool.list_snapshots()])

    async def _enter(self, s: SnapshotSet, state: SnapshotState) -> None:
        s.state = state
        log.debug("snapshot set %s: %s", s.set_id, state.vss_name)
        if self.state_hook is not None:
            r = self.state_hook(s, state)
            if r is not None:
                await r

    def _record(self, s: SnapshotSet, state: SnapshotState) -> SetRecord:
        return SetRecord(s.set_id, int(s.context), int(s.attributes), int(state), s.created,
                         s.session.host if s.session else self.service_machine,
                         s.session.client if s.session else "", len(s.volumes),
                         vss.is_auto_release(s.context))

    def _writer_event(self, s: SnapshotSet) -> WriterEvent:
        vols = tuple(s.volumes)
        paths = tuple(p for v in vols for p in self.masking.volume_paths(v))
        return WriterEvent(s.set_id, s.context, vols, paths, tuple(s.volumes.values()))

    async def do_snapshot_set(self, session: Session, set_id: str | None = None,
                              progress: ProgressFn = None) -> list[dict[str, Any]]:
        """DoSnapshotSet: the whole sequence; returns the new snapshots (SnapshotProp JSON).
        On any failure or cancellation the set is aborted and leaves nothing behind."""
        s = self.own_set(session, set_id, "do the snapshot set")
        if s.doing or s.state != SS.PREPARING:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {s.set_id} is {s.state.name}, "
                       "not waiting for set.do")
        if not s.volumes:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {s.set_id} has no volumes: add "
                       "at least one (set.add) before set.do")
        s.doing = True
        t0 = trio.current_time()
        try:
            self.catalog.begin_set(self._record(s, SS.PROCESSING_PREPARE))
            await self._prepare(s, progress)
            await self._precommit(s)
            await self._commit(s)
            await self._postcommit(s)
            await self._enter(s, SS.PROCESSING_PREFINALCOMMIT)
            await in_thread(self.hardware.PreFinalCommitSnapshots, s.set_id)
            await self._enter(s, SS.PREFINALCOMMITTED)
            await self._enter(s, SS.PROCESSING_POSTFINALCOMMIT)
            await in_thread(self.hardware.PostFinalCommitSnapshots, s.set_id)
            s.prepared = False
            rec = self._record(s, SS.CREATED)
            self._put_labels(s)
            self.catalog.put_set(rec)
            await self._enter(s, SS.CREATED)
        except BaseException as e:
            err = self._as_vss(e)
            with trio.CancelScope(shield=True):
                await self._abort(s, err.message if err else "cancelled")
            if err is not None and not isinstance(e, VssError):
                raise err from e
            raise
        self._finish(s)
        await self._release_array(s, created=True)
        if rec.auto_release and session is s.session:
            bind_lifetime(self._sessions.values(), s.set_id, session)
        session.last_created = s.set_id
        took = f"{trio.current_time() - t0:.3f}s"
        props = [self.views.prop_json(self.pool.snapshot(i)) for i in s.volumes.values()]
        who = audit.of_session(s.session) if s.session is not None else None
        for p in props:
            audit.audit("snapshot.create", who, id=p["snapshot_id"], volume=p["volume"],
                        set=s.set_id, context=s.context.cli_name, kind=p.get("kind"),
                        took=took)
        return props

    @staticmethod
    def _as_vss(e: BaseException) -> VssError | None:
        if isinstance(e, trio.Cancelled | KeyboardInterrupt | SystemExit):
            return None
        if isinstance(e, BaseExceptionGroup):
            inner = [x for x in e.exceptions if not isinstance(x, trio.Cancelled)]
            if not inner:
                return None
            e = inner[0]
        from .protocol import to_vss_error
        return to_vss_error(e)

    async def _prepare(self, s: SnapshotSet, progress: ProgressFn) -> None:
        await self._enter(s, SS.PROCESSING_PREPARE)
        if s.session is not None and s.session.host != self.service_machine:
            # snapshot LUNs are presented to the host that created the set
            self.masking.present(s.volumes.values(), {s.session.host})
        s.prepared = True
        for vol, sid in s.volumes.items():
            await in_thread(self.hardware.BeginPrepareSnapshot, s.set_id, sid, vol,
                             int(s.attributes))
        # EndPrepare waits for the plex syncs; abandoned on cancel (the abort stops them).
        # A sync is a job while it runs (status lists it with its progress).
        if self.hardware.sync_progress(s.set_id)[1]:
            with self.longops.jobs.run("plex sync", s.set_id, ",".join(s.volumes)) as job:
                cb = job.thread_progress(progress, "plex sync")
                await in_thread(self.hardware.EndPrepareSnapshots, s.set_id, cb,
                                abandon=True)
        else:
            await in_thread(self.hardware.EndPrepareSnapshots, s.set_id,
                            thread_progress(progress, "plex sync"), abandon=True)
        await self._enter(s, SS.PREPARED)

    async def _precommit(self, s: SnapshotSet) -> None:
        await self._enter(s, SS.PROCESSING_PRECOMMIT)
        if self.writers and vss.uses_writers(s.context):
            s.writers = list(self.writers)
            failures = await call_writers(s.writers, "freeze", self._writer_event(s),
                                          self.config["freeze_timeout"], "freeze")
            if failures:
                w, e = failures[0]
                name = e.name if isinstance(e, VssError) else "VSS_E_UNEXPECTED_WRITER_ERROR"
                raise _vss(name, f"writer {culprit(w, e)} failed to freeze: {message(e)}")
        await in_thread(self.hardware.PreCommitSnapshots, s.set_id)
        await self._enter(s, SS.PRECOMMITTED)

    async def _commit(self, s: SnapshotSet) -> None:
        await self._enter(s, SS.PROCESSING_COMMIT)
        deadline = float(self.config["hold_deadline"])
        hold = await self.barrier.hold(list(s.volumes), deadline=deadline)
        s.hold = hold
        if hold.expired or not hold.flushed:
            raise _vss("VSS_E_HOLD_WRITES_TIMEOUT", f"writes to {', '.join(s.volumes)} could "
                       f"not be flushed and held within {deadline:g} s")
        await in_thread(self.hardware.CommitSnapshots, s.set_id)
        s.hold = None
        if not self.barrier.release(hold):
            raise _vss("VSS_E_HOLD_WRITES_TIMEOUT", f"writes to {', '.join(s.volumes)} were "
                       f"held longer than {deadline:g} s; the commit came too late")
        await self._enter(s, SS.COMMITTED)

    async def _postcommit(self, s: SnapshotSet) -> None:
        await self._enter(s, SS.PROCESSING_POSTCOMMIT)
        await in_thread(self.hardware.PostCommitSnapshots, s.set_id, len(s.volumes))
        if s.writers:
            failures = await call_writers(s.writers, "thaw", self._writer_event(s),
                                          self.config["freeze_timeout"], "thaw")
            if failures:
                # The snapshot may hold a writer's half-written state: not application
                # consistent, so it is not kept. Every writer gets Abort.
                w, e = failures[0]
                raise _vss("VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT",
                           f"writer {culprit(w, e)} failed to thaw ({message(e)}); the "
                           "snapshot is not consistent for it and was discarded")
        await self._enter(s, SS.POSTCOMMITTED)

    def _finish(self, s: SnapshotSet) -> None:
        """The set left creation (created or aborted): free its volumes and the slot."""
        for v in s.volumes:
            if self._marks.get(v) == InSet(s.set_id):
                del self._marks[v]
        self._sets.pop(s.set_id, None)
        if self._creating is s:
            self._creating = None

    async def _abort(self, s: SnapshotSet, why: str) -> None:
        """Undo everything of a set in creation. Never raises; call shielded."""
        log.warning("aborting snapshot set %s at %s: %s", s.set_id, s.state.name, why)
        if s.hold is not None:
            self.barrier.release(s.hold)
            s.hold = None
        if s.writers:
            told, s.writers = s.writers, []
            failures = await call_writers(told, "abort", self._writer_event(s),
                                          self.config["writer_timeout"], "abort")
            for w, e in failures:
                log.error("writer %s failed to abort: %s", wname(w), e)
        if s.prepared:
            await in_thread(self.hardware.AbortSnapshots, s.set_id)
            s.prepared = False
        try:
            self.masking.present(s.volumes.values(), None)
        except Exception as e:   # noqa: BLE001 - an abort must complete; logged
            log.error("removing the presentation of set %s: %s", s.set_id, e)
        try:
            self.catalog.delete_set(s.set_id)
        except Exception as e:   # noqa: BLE001 - an abort must complete; logged
            log.error("removing set %s from the catalog: %s", s.set_id, e)
        s.state = SS.ABORTED
        self._finish(s)
        await self._release_array(s, created=False)

    async def abort_snapshot_set(self, session: Session, set_id: str | None = None) -> None:
        """AbortBackup for a set that is not being done (set.do aborts by itself)."""
        s = self.own_set(session, set_id, "abort the snapshot set")
        if s.doing:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {s.set_id} is being done; "
                       "disconnect (or cancel set.do) to abort it")
        with trio.CancelScope(shield=True):
            await self._abort(s, "aborted by the requester")

    async def create(self, session: Session, volumes: Sequence[str],
                     context: str | int = "backup",
                     attributes: int | str | Sequence[str] | None = None,
                     kind: str | None = None,
                     progress: ProgressFn = None, name: str | None = None,
                     description: str | None = None) -> dict[str, Any]:
        """snapshot.create: start, add every volume, do. On any error nothing remains."""
        if isinstance(volumes, str) or not isinstance(volumes, list | tuple):
            raise _vss("E_INVALIDARG", "volumes must be a list of volume names")
        if not volumes:
            raise _vss("E_INVALIDARG", "no volumes given: name at least one")
        if len(volumes) > vss.MAX_VOLUMES_PER_SET:
            raise _vss("VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED",
                       f"{len(volumes)} volumes given; a snapshot set holds at most "
                       f"{vss.MAX_VOLUMES_PER_SET}")
        mask = parse_attributes(attributes)
        if kind is not None:
            if kind not in (DIFFERENTIAL, PLEX):
                raise _vss("E_INVALIDARG", f"kind {kind!r}: use differential or plex")
            mask |= int(Attr.PLEX if kind == PLEX else Attr.DIFFERENTIAL)
        set_id = await self.start_set(session, context, mask, name, description)
        try:
            for v in volumes:
                self.add_to_snapshot_set(session, v, set_id)
        except BaseException:
            s = self._sets.get(set_id)
            if s is not None:
                with trio.CancelScope(shield=True):
                    await self._abort(s, "a volume could not be added")
            raise
        snaps = await self.do_snapshot_set(session, set_id, progress)
        return {"set_id": set_id, "snapshots": snaps}

    async def end_backup(self, session: Session, set_id: str | None = None) -> dict[str, Any]:
        """BackupComplete: the writers hear that the backup of this set is done -- once:
        a second time is VSS_E_BAD_STATE and tells nobody (a writer that truncates its
        logs on BackupComplete must not do it twice for one backup)."""
        sid = set_id or session.last_created
        if sid is None:
            raise _vss("VSS_E_BAD_STATE", "end_backup: no snapshot set was created in this "
                       "session; name one")
        try:
            sid = vss.guid(sid)
        except ValueError:
            raise _vss("E_INVALIDARG", f"{sid!r} is not a snapshot set id") from None
        rec = self.catalog.records.get(sid)
        exported = self.catalog.exported.get(sid)
        if rec is None and exported is not None:   # deleted by the importing host
            rec = exported.record
        if rec is None:
            if sid in self._sets:
                raise _vss("VSS_E_BAD_STATE", f"snapshot set {sid} is still being created")
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        if rec.backup_complete:
            raise _vss("VSS_E_BAD_STATE", f"the backup of snapshot set {sid} was completed "
                       "already: its writers were told then, they are not told twice")
        # marked before the writers are called (they are awaited): a second end_backup
        # meanwhile is refused too -- BackupComplete goes out at most once per set
        self.catalog.set_backup_complete(sid)
        if exported is not None:   # BackupComplete goes out: the export is done with
            self.catalog.delete_export(sid)
        ctx = Context(rec.context)
        notified: list[str] = []
        if self.writers and vss.uses_writers(ctx):
            vols = tuple(sorted({i.volume for i in self.views.members_info(sid)}))
            if not vols and exported is not None:
                vols = exported.volumes
            paths = tuple(p for v in vols for p in self.masking.volume_paths(v))
            ev = WriterEvent(sid, ctx, vols, paths, tuple(self.views.set_members(sid))
                             or (exported.snapshots if exported else ()))
            failures = await call_writers(self.writers, "backup_complete", ev,
                                          self.config["writer_timeout"],
                                          "complete the backup")
            bad = {id(w) for w, _ in failures}
            notified = [n for w in self.writers if id(w) not in bad for n in names(w)]
            for w, e in failures:
                log.error("writer %s failed in backup-complete: %s", wname(w), e)
        return {"set_id": sid, "writers_notified": notified}
