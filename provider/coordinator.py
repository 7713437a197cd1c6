"""The coordinator: shadowplex's VSS service.

It owns snapshot sets and their states, requester sessions and lifetimes, the writers and
the flush & hold; it drives the hardware provider (provider/hardware.py) and never touches
data itself. It runs on the daemon's trio loop (the same loop as the FUSE session and the
write barrier); every call that may block -- the block store, writers, losetup/mount --
runs in a trio worker thread.

Creating a snapshot set -- VSS's sequence, one set at a time, aborting on any failure --
is provider/set_creation.py's (SetCreation, a mixin of Coordinator). Lifetimes: sets in
auto-release contexts (BACKUP, FILE_SHARE_BACKUP) are deleted when the requester session
that created them ends; the persistent ones (NAS_ROLLBACK, APP_ROLLBACK) live until
deleted and survive restarts (provider/catalog.py keeps what the block store does not
know).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import trio

from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import LiveMount

from . import audit, documents, vss
from .access import Access
from .array import Array
from .array_service import ArrayService, HostSets
from .catalog import ProviderCatalog
from .deletion import Deletion
from .exposure import Exposure
from .hardware import HardwareProvider
from .jobs import CancelToken
from .longops import LongOperations
from .masking import LunMasking
from .model import (
    DEFAULTS,
    NIL_GUID,
    InSet,
    Mark,
    ProgressFn,
    Revert,
    Session,
    SnapshotSet,
    WriterEvent,
    in_thread,
    parse_attributes,
    parse_size,
)
from .reconcile import reconcile_at_start
from .set_creation import SetCreation, StateHook
from .transport import Transport
from .views import Views
from .volumes import Volumes
from .vss import VssError
from .writercalls import names, writer_objects, writers_list

# the names tests and other modules import from here
__all__ = ["DEFAULTS", "NIL_GUID", "Coordinator", "InSet", "Mark", "Revert", "Session",
           "SnapshotSet", "StateHook", "WriterEvent", "parse_attributes", "parse_size"]

log = logging.getLogger(__name__)

# extents per snapshot.diff reply: ~30 bytes each as JSON, far below a reply's limit
# (protocol.MAX_DOCUMENT_LINE) however scattered the changes of a large volume are
DIFF_PAGE = 100_000


def _overflow_audit(volume: str, snapshot_id: str, why: str) -> None:
    """The block store deleted a volume's oldest snapshot: its diff area overflowed (VSS's
    behaviour; the write that needed the room goes on). Called with the pool lock held."""
    audit.audit("snapshot.delete", None, logging.WARNING, id=snapshot_id, volume=volume,
                reason="overflow",
                why=f"{why} for volume {volume}: deleting its oldest snapshot {snapshot_id}")


# --------------------------------------------------------------------------- the service
def diff_page(runs: list[tuple[int, int]], after: int, limit: int | None = None
              ) -> tuple[list[list[int]], int | None]:
    """One page of a snapshot.diff reply: the extents from byte ``after`` on (one that
    straddles it cut there: the volume may have changed between two pages), at most
    ``limit`` (DIFF_PAGE); and where the next page starts, None after the last."""
    limit = DIFF_PAGE if limit is None else limit
    page = [[max(o, after), o + n - max(o, after)] for o, n in runs if o + n > after]
    return page[:limit], (page[limit][0] if len(page) > limit else None)


class Coordinator(SetCreation):
    """The VSS service over one pool. Create, then ``await start()`` on the trio loop.

    It owns the sets in creation (``_creating``, ``_sets``), the sessions and the volume
    marks (``_marks``: Revert | InSet); ``longops`` (provider/longops.py) owns the
    claims (one long operation per snapshot) and the jobs; the catalog
    (provider/catalog.py) owns the persistent tables and their write-through cache. The
    rest is delegated (see each module's docstring for what it owns): ``masking`` (LUN
    masking, the FUSE view's names), ``views`` (the read-only projections and lookups),
    ``volumes``, ``exposure`` (expose/unexpose, mounts, what uses a snapshot),
    ``deletion``, ``transport`` (export/import), provider/reconcile.py (start)."""

    def __init__(self, pool: Array, barrier: WriteBarrier, mountpoint: str | None = None,
                 writers: Iterable[Any] = (), config: dict[str, Any] | None = None,
                 mount: LiveMount | None = None) -> None:
        self.pool = pool
        self.barrier = barrier
        self.mountpoint = os.path.abspath(mountpoint) if mountpoint else None
        self.config = {**DEFAULTS, **(config or {})}
        self.writers = writer_objects(writers, float(self.config["freeze_timeout"]))
        self.hardware = HardwareProvider(pool, self.mountpoint, self.config["default_kind"])
        self.catalog = ProviderCatalog(os.path.join(pool.path, ProviderCatalog.FILENAME))
        # the host this coordinator serves: this machine, or in host mode the identity
        # the remote array knows it by (its certificate's CN)
        self.service_machine = getattr(pool, "host", None) or socket.gethostname()
        self.state_hook: StateHook | None = None    # tests: called at every state change
        # tests: called at named steps (fault injection), see _fault()
        self.fault_hook: Callable[[str], None] | None = None
        self._creating: SnapshotSet | None = None   # THE set in creation (one at a time)
        self._sets: dict[str, SnapshotSet] = {}     # sets not yet finished, by id
        self._marks: dict[str, Mark] = {}            # volume -> what uses it
        self._sessions: dict[int, Session] = {}
        self._session_ids = itertools.count(1)
        claims: dict[str, str] = {}   # snapshot id -> its long operation (longops.py)
        self.masking = LunMasking(self.catalog, mount, self.service_machine,
                                  self.mountpoint, self.hardware, self._sessions)
        self.views = Views(pool, self.catalog, self.masking, self._sets, self._marks)
        self.access = Access(self.masking, self.snapshot_ids_of_set, self.creator_of,
                             self.set_creator, self.origin_of)
        self.volumes = Volumes(pool, self.masking, self.views, self._marks)
        self.exposure = Exposure(pool, self.catalog, self.masking, self.views)
        self.deletion = Deletion(pool, self.catalog, self.masking, self.views, self.exposure,
                                 self.hardware, self._sets, claims, self._sessions)
        self.transport = Transport(pool, self.catalog, self.masking, self.views,
                                   self.hardware, self.writers, self._sets, self._sessions,
                                   self._fault)
        self.array_service = ArrayService(self)
        self.host_sets = HostSets(self)     # sets host daemons create on this array
        if hasattr(type(pool), "overflow_hook"):   # the embedded block store
            pool.overflow_hook = _overflow_audit  # type: ignore[attr-defined]
        self.longops = LongOperations(pool, self.hardware, barrier, self.config, self.catalog,
                                      self.masking, self.views, self.volumes, self.exposure,
                                      self.deletion, self._marks, claims)

    @property
    def mount(self) -> LiveMount | None:
        """The FUSE mount serving the LUNs (None: no mount, e.g. in-process tests): its
        presentation (LUN masking), handle counts and kernel caches. LunMasking holds
        the one reference."""
        return self.masking.mount

    @mount.setter
    def mount(self, mount: LiveMount | None) -> None:
        self.masking.mount = mount

    def _fault(self, step: str) -> None:
        """A named step of a multi-step change; tests make it raise (fault injection)."""
        if self.fault_hook is not None:
            self.fault_hook(step)

    def hosts_of(self, lun: str) -> frozenset[str]:
        """The hosts a LUN (volume name or snapshot id) is presented to."""
        return self.masking.hosts_of(lun)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the catalog and reconcile it with the pool (provider/reconcile.py)."""
        await reconcile_at_start(self)

    async def stop(self) -> None:
        """End every session (auto-release sets go) and close the catalog."""
        with trio.CancelScope(shield=True):
            for s in list(self._sessions.values()):
                await self.close_session(s)
        self.catalog.close()

    # ------------------------------------------------------------------ sessions
    def open_session(self, host: str | None = None, client: str | None = None) -> Session:
        if host is not None and not documents.valid_host(host):
            raise VssError("E_INVALIDARG", f"host name {host!r} is not valid (letters, digits, "
                       "'-', '_' in dot-separated labels, at most 253 characters)")
        if host is None or host == socket.gethostname():
            # this machine: in host mode it is known by its certificate's name
            host = self.service_machine
        s = Session(next(self._session_ids), host, client or "")
        self._sessions[s.id] = s
        if s.host != self.service_machine:
            self.masking.push()
        log.debug("requester session %d opened (host %s, client %s)", s.id, s.host,
                  s.client or "-")
        return s

    async def close_session(self, session: Session) -> None:
        """The requester went away: abort its set in creation, delete its auto-release
        sets. Shielded: always completes."""
        if session.closed:
            return
        session.closed = True
        with trio.CancelScope(shield=True):
            await self.host_sets.session_closed(session)
            for s in list(self._sets.values()):
                if s.session is session:
                    await self._abort(s, "the requester session ended")
            for set_id in list(session.sets):
                log.debug("session %d ended: deleting auto-release snapshot set %s",
                          session.id, set_id)
                try:
                    await self.deletion.remove_snapshots(
                        self.views.set_members(set_id), force=True,
                        reason="auto-release", requester=audit.of_session(session))
                except Exception as e:   # noqa: BLE001 - a session's end must finish; logged
                    log.error("deleting auto-release set %s: %s", set_id, e)
                self.deletion.drop_record(set_id)
            session.sets.clear()
        self._sessions.pop(session.id, None)
        log.debug("requester session %d closed", session.id)

    # ------------------------------------------------------------------ volumes
    def resolve_volume(self, spec: str) -> str:
        return self.views.resolve_volume(spec)

    async def volume_create(self, name: str, size: int | str) -> dict[str, Any]:
        return await self.volumes.create(name, size)

    def volume_list(self) -> list[dict[str, Any]]:
        return self.views.volume_list()

    async def volume_resize(self, name: str, size: int | str) -> dict[str, Any]:
        return await self.volumes.resize(name, size)

    async def volume_present(self, name: str, hosts: Sequence[str]) -> dict[str, Any]:
        return await self.volumes.present(name, hosts)

    async def volume_delete(self, name: str) -> None:
        await self.volumes.delete(name)

    # ------------------------------------------------------------------ transport
    async def export_set(self, set_id: str) -> dict[str, Any]:
        return await self.transport.export_set(set_id)

    async def import_set(self, session: Session, document: str) -> dict[str, Any]:
        return await self.transport.import_set(session, document)

    # ------------------------------------------------------------------ queries
    def snapshot_list(self, set_id: str | None = None, volume: str | None = None,
                      context: str | int | None = None) -> list[dict[str, Any]]:
        return self.views.snapshot_list(set_id, volume, context)

    def snapshot_show(self, snapshot_id: str | None = None,
                      set_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        return self.views.snapshot_show(snapshot_id, set_id)

    async def snapshot_diff(self, snapshot_id: str, to_snapshot_id: str | None = None,
                            after: int = 0) -> dict[str, Any]:
        """The chunks touched between two snapshots of a volume, or since one (the live
        volume): Array.changed_extents. Extents as [offset, length], at most DIFF_PAGE
        of them from byte ``after`` on (the first one cut there); ``next`` is where the
        next page starts (None: complete). Totals are the whole diff's."""
        self.hardware.require("changed_blocks", "list changed blocks (snapshot diff)")
        a = self.views.committed(snapshot_id)
        b = self.views.committed(to_snapshot_id) if to_snapshot_id is not None else None
        runs = await in_thread(self.pool.changed_extents, a.id, b.id if b else None)
        size = b.size if b is not None else self.pool.volume(a.volume).size
        extents, nxt = diff_page(runs, after)
        return {"snapshot_id": a.id, "to_snapshot_id": b.id if b else None,
                "volume": a.volume, "chunk_size": self.pool.chunk_size,
                "from_size": a.size, "size": size, "extents_total": len(runs),
                "changed_bytes": sum(n for _, n in runs), "extents": extents,
                "next": nxt}

    def snapshot_ids_of_set(self, set_id: str) -> list[str]:
        """The snapshot ids of a set, committed or in creation (access checks)."""
        s = self._sets.get(set_id)
        if s is not None:
            return list(s.volumes.values())
        return [x.id for x in self.pool.list_snapshots() if x.set_id == set_id]

    def _snapshot_info(self, snapshot_id: str) -> Any:
        return next((x for x in self.pool.list_snapshots() if x.id == snapshot_id), None)

    def creator_of(self, snapshot_id: str) -> str | None:
        """The host whose requester created the snapshot's set (access checks)."""
        x = self._snapshot_info(snapshot_id)
        return self.set_creator(x.set_id or "") if x is not None else None

    def set_creator(self, set_id: str) -> str | None:
        """The host whose requester created the set (also after the importing host
        deleted it: the export record), or None if unknown (access checks)."""
        s = self._sets.get(set_id)
        if s is not None:
            return s.session.host if s.session else self.service_machine
        rec = self.catalog.records.get(set_id)
        if rec is None and set_id in self.catalog.exported:
            rec = self.catalog.exported[set_id].record
        return rec.originating_machine if rec is not None else None

    def origin_of(self, snapshot_id: str) -> str | None:
        x = self._snapshot_info(snapshot_id)
        return x.volume if x is not None else None

    def set_list(self) -> list[dict[str, Any]]:
        self.deletion.prune_records()
        return self.views.set_list()

    # ------------------------------------------------------------------ deletion
    async def snapshot_delete(self, snapshot_id: str | None = None, set_id: str | None = None,
                              oldest: str | None = None, all: bool = False,
                              context: str | int | None = None,
                              unexpose: bool = False,
                              volume: str | None = None) -> dict[str, Any]:
        return await self.deletion.snapshot_delete(snapshot_id, set_id, oldest, all, context,
                                                   unexpose, volume)

    # ------------------------------------------------------------------ expose
    async def expose(self, snapshot_id: str, name: str | None = None,
                     mount: str | None = None) -> dict[str, Any]:
        """Make a snapshot visible: as MOUNT/exposed/<name>.img, and/or mounted read-only
        (loop device + filesystem) at ``mount``."""
        if mount is None:
            return await self.exposure.expose(snapshot_id, name, mount)
        sid = self.views.committed(snapshot_id).id
        with self.longops.claim(sid, "mounted"):
            return await self.exposure.expose(sid, name, mount)

    async def unexpose(self, snapshot_id: str) -> dict[str, Any]:
        return await self.exposure.unexpose(snapshot_id)

    # ------------------------------------------------------------------ long operations
    async def revert(self, snapshot_id: str, force: bool = False,
                     progress: ProgressFn = None,
                     cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self.longops.revert(snapshot_id, force, progress, cancel)

    async def promote(self, snapshot_id: str, progress: ProgressFn = None,
                      cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self.longops.promote(snapshot_id, progress, cancel)

    async def split(self, snapshot_id: str, name: str, progress: ProgressFn = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self.longops.split(snapshot_id, name, progress, cancel)

    async def check(self, progress: ProgressFn = None, volume: str | None = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self.longops.check(progress, volume, cancel)

    async def scrub(self, progress: ProgressFn = None, volume: str | None = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        return await self.longops.scrub(progress, volume, cancel)

    async def writers_list(self) -> list[dict[str, Any]]:
        return await writers_list(self.writers)

    def status(self) -> dict[str, Any]:
        total, free = self.pool.statfs()
        snaps = self.pool.list_snapshots()
        c = self._creating
        nbd = getattr(self.mount, "nbd_endpoint", None)
        return {
            "pool": self.pool.path, "pool_id": self.pool.pool_id,
            "mount": self.mountpoint, "chunk_size": self.pool.chunk_size,
            "capabilities": asdict(self.pool.capabilities),
            "preserve": "reflink" if self.pool.capabilities.reflink else "copy",
            "space_total": total, "space_free": free,
            # what snapshots may take (free minus the store's reserve): a diff area that
            # grows past it deletes its origin's oldest snapshot (VSS's overflow)
            "space_available": self.pool.available_bytes(),
            "volumes": len(self.pool.list_volumes()),
            "snapshots": sum(1 for s in snaps if s.state != "preparing"),
            "sets": len(self.catalog.records),
            "creating": c.to_json() if c else None,
            "volumes_in_use": {v: str(m) for v, m in self._marks.items()},
            "operations": self.longops.jobs.list(),
            "sessions": len(self._sessions),
            "writers": [n for w in self.writers for n in names(w)],
            "service_machine": self.service_machine,
            "provider_id": vss.PROVIDER_ID,
            # the data path for `shadowplex backup` (None: no NBD port open)
            "nbd_port": nbd[0] if nbd else None, "nbd_tls": bool(nbd and nbd[1]),
            "nbd_address": getattr(self.mount, "nbd_address", None) if nbd else None,
        }
