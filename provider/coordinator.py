"""The coordinator: shadowplex's VSS service.

It owns snapshot sets and their states, requester sessions and lifetimes, the writers and
the flush & hold; it drives the hardware provider (provider/hardware.py) and never touches
data itself. It runs on the daemon's trio loop (the same loop as the FUSE session and the
write barrier); every call that may block -- the block store, writers, losetup/mount --
runs in a trio worker thread.

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
VSS_E_SNAPSHOT_SET_IN_PROGRESS). Lifetimes: sets in auto-release contexts (BACKUP,
FILE_SHARE_BACKUP) are deleted when the requester session that created them ends; the
persistent ones (NAS_ROLLBACK, APP_ROLLBACK) live until deleted and survive restarts
(provider/catalog.py keeps what the block store does not know).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import trio

from blockstore import SnapshotInfo, VolumeInfo
from blockstore import errors as bse
from fuse_mount import loopdev
from fuse_mount.presentation import LiveMount

from . import documents, vss
from .array import Array
from .catalog import ExportRecord, MountRecord, ProviderCatalog, SetRecord
from .hardware import DIFFERENTIAL, PLEX, HardwareProvider
from .jobs import CancelToken, Job, Jobs
from .vss import Attr, Context, SnapshotProp, SnapshotState, VssError
from .writers import Writer, WriterSet

log = logging.getLogger(__name__)
OPEN_RELEASE_WAIT = 0.5   # s: a volume closed just before its delete is not "open"

SS = SnapshotState
T = TypeVar("T")

# progress(done, total, what), always called on the trio thread
ProgressFn = Callable[[int, int, str], None] | None
StateHook = Callable[["SnapshotSet", SnapshotState], Awaitable[None] | None]

NIL_GUID = "00000000-0000-0000-0000-000000000000"
DEFAULTS: dict[str, Any] = {
    "default_kind": DIFFERENTIAL,   # automagic choice when neither DIFFERENTIAL nor PLEX
    "freeze_timeout": 60.0,         # seconds for every writer to freeze (and to thaw)
    "hold_deadline": 10.0,          # seconds writes may be held (flush & hold -> release)
    "writer_timeout": 60.0,         # other writer events (abort, backup-complete)
    "revert_hold": 24 * 3600.0,     # writes to a volume wait while it is reverted
}


def _vss(name: str, message: str) -> VssError:
    return VssError(name, message)


# --------------------------------------------------------------------------- objects
@dataclass(eq=False)
class Session:
    """One requester session (one control connection, or an in-process caller)."""

    id: int
    host: str
    client: str
    started: float = field(default_factory=time.time)
    sets: list[str] = field(default_factory=list)   # auto-release sets it created
    last_created: str | None = None                  # for end_backup without a set id
    closed: bool = False


@dataclass(eq=False)
class SnapshotSet:
    """A set being created (and, briefly, just created)."""

    set_id: str
    context: Context
    attributes: Attr                    # context bits | requested options
    session: Session | None
    state: SnapshotState = SS.PREPARING
    volumes: dict[str, str] = field(default_factory=dict)   # volume -> snapshot id
    created: float = field(default_factory=time.time)
    doing: bool = False                 # DoSnapshotSet has started
    prepared: bool = False              # the hardware provider holds state for it
    writers: list[Any] = field(default_factory=list)   # writers told to freeze: they
                                                        # get Abort if the set fails
    hold: Any = None                    # the barrier Hold while writes are held
    error: VssError | None = None

    def to_json(self) -> dict[str, Any]:
        return {"set_id": self.set_id, "context": self.context.cli_name,
                "attributes": int(self.attributes), "state": self.state.name,
                "volumes": [{"volume": v, "snapshot_id": s} for v, s in self.volumes.items()],
                "requester": self.session.host if self.session else None,
                "created": self.created}


@dataclass(frozen=True)
class WriterEvent:
    """What a writer is told about the set it freezes for."""

    set_id: str
    context: Context
    volumes: tuple[str, ...]
    volume_paths: tuple[str, ...]       # MOUNT/volumes/<name>.img (empty without a mount)
    snapshot_ids: tuple[str, ...]


# --------------------------------------------------------------------------- helpers
_SIZE_RE = re.compile(r"(\d+)\s*([kmgtp]?)(i?b?)", re.I)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as 10G, 512M, 4096, 1TiB (powers of 1024)."""
    if isinstance(value, bool):
        raise _vss("E_INVALIDARG", f"size {value!r} is not a number of bytes")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) << (10 * " kmgtp".index(m.group(2).lower() or " "))
    raise _vss("E_INVALIDARG", f"size {value!r} is not a size (bytes, or 10G, 512M, 1T)")


def parse_attributes(value: int | str | Sequence[str] | None) -> int:
    """An attribute mask from an int, a string of names (``differential,transportable``)
    or a list of names; unknown names are an unsupported context."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise _vss("VSS_E_UNSUPPORTED_CONTEXT", f"attributes {value!r} are not a mask")
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, str) or (isinstance(value, list | tuple)
                                      and all(isinstance(x, str) for x in value)):
            return int(vss.parse_attr_names(value))
    except ValueError as e:
        raise _vss("VSS_E_UNSUPPORTED_CONTEXT", str(e)) from None
    raise _vss("VSS_E_UNSUPPORTED_CONTEXT", f"attributes {value!r} are not a mask or names")


def _thread_progress(progress: ProgressFn, what: str) -> Callable[[int, int], None] | None:
    """A progress callback a worker thread may call; it reports on the trio thread."""
    if progress is None:
        return None
    token = trio.lowlevel.current_trio_token()
    report = progress

    def safe(done: int, total: int) -> None:   # runs as a bare trio callback: never raise
        try:
            report(done, total, what)
        except Exception:
            log.exception("progress report failed")

    def cb(done: int, total: int) -> None:
        try:
            token.run_sync_soon(safe, done, total)
        except trio.RunFinishedError:
            pass
    return cb


async def _in_thread(fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon)


# --------------------------------------------------------------------------- the service
class Coordinator:
    """The VSS service over one pool. Create, then ``await start()`` on the trio loop."""

    def __init__(self, pool: Array, barrier: Any, mountpoint: str | None = None,
                 writers: Iterable[Any] = (), config: dict[str, Any] | None = None,
                 mount: LiveMount | None = None) -> None:
        self.pool = pool
        self.barrier = barrier
        # the FUSE mount serving the LUNs (None: no mount, e.g. tests): its presentation
        # (LUN masking, pushed by _push_masking), handle counts and kernel caches
        self.mount = mount
        self.mountpoint = os.path.abspath(mountpoint) if mountpoint else None
        self.config = {**DEFAULTS, **(config or {})}
        self.writers = _writer_objects(writers, float(self.config["freeze_timeout"]))
        self.hardware = HardwareProvider(pool, self.mountpoint, self.config["default_kind"])
        self.catalog = ProviderCatalog(os.path.join(pool.path, ProviderCatalog.FILENAME))
        self.service_machine = socket.gethostname()
        self.state_hook: StateHook | None = None    # tests: called at every state change
        # tests: called at named steps (fault injection), see _fault()
        self.fault_hook: Callable[[str], None] | None = None
        self._creating: SnapshotSet | None = None   # THE set in creation (one at a time)
        self._sets: dict[str, SnapshotSet] = {}     # sets not yet finished, by id
        self._marks: dict[str, str] = {}             # volume -> what uses it
        self._sessions: dict[int, Session] = {}
        self._session_ids = itertools.count(1)
        self._records: dict[str, SetRecord] = {}
        self._mounts: dict[str, MountRecord] = {}
        self._presented: dict[str, frozenset[str]] = {}   # LUN masking (catalog copy)
        self._imports: dict[str, tuple[str, str]] = {}     # set id -> (host, origin)
        # exported sets: what end_backup needs once the importing host deleted them
        self._exported: dict[str, ExportRecord] = {}
        # snapshot id -> the long operation running on it (promote, split, expose --mount)
        self._claims: dict[str, str] = {}
        # snapshot id -> the exposure names it had before its current one (this run): a
        # loop device or a process that opened MOUNT/exposed/<old>.img keeps reading the
        # snapshot after a rename, and the kernel still reports it by that old name
        self._former_names: dict[str, set[str]] = {}
        self._jobs = Jobs()   # revert/promote/split/scrub/check running (status shows them)
        self._unmounting = trio.Lock()   # see _unmount

    def _fault(self, step: str) -> None:
        """A named step of a multi-step change; tests make it raise (fault injection)."""
        if self.fault_hook is not None:
            self.fault_hook(step)

    # ------------------------------------------------------------------ LUN masking
    def _push_masking(self) -> None:
        """Tell the mount which host sees which LUN (it rebuilds its tree at once)."""
        if self.mount is None:
            return
        self.mount.presentation.update(self.service_machine, self._presented,
                                       {x.host for x in self._sessions.values()})

    def hosts_of(self, lun: str) -> frozenset[str]:
        """The hosts a LUN (volume name or snapshot id) is presented to."""
        return self._presented.get(lun) or frozenset((self.service_machine,))

    def _present(self, luns: Iterable[str], hosts: Iterable[str] | None) -> None:
        """Present LUNs to exactly ``hosts`` (None: the default, the daemon's host)."""
        hs = frozenset(hosts or ())
        if hs == frozenset((self.service_machine,)):
            hs = frozenset()
        changed = False
        try:
            for lun in luns:   # the catalog first: memory never holds what it lacks
                if self._presented.get(lun, frozenset()) == hs:
                    continue
                self.catalog.set_presentation(lun, hs or None)
                if hs:
                    self._presented[lun] = hs
                else:
                    del self._presented[lun]
                changed = True
        finally:
            if changed:
                self._push_masking()

    def _view_root(self, host: str | None, lun: str) -> str | None:
        """MOUNT (the local host) or MOUNT/hosts/<host>: where ``host`` sees ``lun``."""
        if self.mountpoint is None:
            return None
        hosts = self.hosts_of(lun)
        if host is None:
            host = self.service_machine if self.service_machine in hosts else min(hosts)
        if host == self.service_machine:
            return self.mountpoint
        return os.path.join(self.mountpoint, "hosts", host)

    def device_path(self, snapshot_id: str, host: str | None = None) -> str | None:
        """The snapshot's device object as ``host`` sees it (default: a host it is
        presented to, the local one first)."""
        root = self._view_root(host, snapshot_id)
        return None if root is None else os.path.join(root, ".shadow", f"{snapshot_id}.img")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the catalog and reconcile it with the pool (see catalog.py)."""
        self._records = self.catalog.sets()
        self._mounts = self.catalog.mounts()
        self._presented = self.catalog.presentations()
        self._imports = self.catalog.imports()
        self._exported = self.catalog.exports()
        mounted = {mp for mp, _, _ in loopdev.mountinfo()}
        for sid, m in list(self._mounts.items()):
            # as text (the record holds the resolved path): a stat of a mount point on
            # a filesystem stacked on one of our volumes is I/O through our own mount
            alive = m.mountpoint in mounted and loopdev.backing_file(m.dev) is not None
            if not alive:
                log.info("snapshot %s is no longer mounted at %s: forgetting the mount",
                         sid, m.mountpoint)
                self._forget_mount(sid)
        snaps = await _in_thread(self.pool.list_snapshots)
        by_set: dict[str, list[SnapshotInfo]] = {}
        for s in snaps:
            by_set.setdefault(s.set_id or s.id, []).append(s)
        for set_id, rec in list(self._records.items()):
            members = by_set.pop(set_id, [])
            if rec.state != SS.CREATED:
                log.warning("snapshot set %s was being created when the daemon stopped "
                            "(state %s): removing it", set_id, SS(rec.state).name)
            elif rec.auto_release:
                log.info("snapshot set %s (%s) is auto-release and its requester session "
                         "ended: deleting it", set_id, Context(rec.context).vss_name)
            else:
                continue
            await self._remove_snapshots([s.id for s in members], force=True)
            self._drop_record(set_id)
        for set_id, members in by_set.items():
            attrs = members[0].attributes
            try:
                ctx = vss.snapshot_context(attrs)
                auto = vss.is_auto_release(ctx)
            except (ValueError, VssError):
                ctx, auto = Context.BACKUP, True
            preparing = any(s.state == "preparing" for s in members)
            if auto or preparing:
                log.warning("snapshot set %s has no provider record and is %s: deleting "
                            "its %d snapshot(s)", set_id,
                            "unfinished" if preparing else "auto-release", len(members))
                await self._remove_snapshots([s.id for s in members], force=True)
                continue
            log.info("adopting persistent snapshot set %s (%d snapshot(s))", set_id,
                     len(members))
            rec = SetRecord(set_id, int(ctx), int(attrs) & int(vss.CONTEXT_BITS | vss.OPTION_BITS),
                            int(SS.CREATED), min(s.created for s in members), "", "",
                            max(1, min(len(members), vss.MAX_VOLUMES_PER_SET)), False)
            self.catalog.put_set(rec)
            self._records[set_id] = rec
        luns = {v.name for v in self.pool.list_volumes()}
        luns |= {s.id for s in await _in_thread(self.pool.list_snapshots)}
        for lun in [x for x in self._presented if x not in luns]:
            self._presented.pop(lun)
            self.catalog.set_presentation(lun, None)
        for sid in [x for x in self._imports if x not in self._records]:
            self._imports.pop(sid)
            self.catalog.delete_import(sid)
        self._push_masking()

    async def stop(self) -> None:
        """End every session (auto-release sets go) and close the catalog."""
        with trio.CancelScope(shield=True):
            for s in list(self._sessions.values()):
                await self.close_session(s)
        self.catalog.close()

    # ------------------------------------------------------------------ sessions
    def open_session(self, host: str | None = None, client: str | None = None) -> Session:
        if host is not None and not documents.valid_host(host):
            raise _vss("E_INVALIDARG", f"host name {host!r} is not valid (letters, digits, "
                       "'-', '_' in dot-separated labels, at most 253 characters)")
        s = Session(next(self._session_ids), host or socket.gethostname(), client or "")
        self._sessions[s.id] = s
        if s.host != self.service_machine:
            self._push_masking()
        log.info("requester session %d opened (host %s, client %s)", s.id, s.host,
                 s.client or "-")
        return s

    async def close_session(self, session: Session) -> None:
        """The requester went away: abort its set in creation, delete its auto-release
        sets. Shielded: always completes."""
        if session.closed:
            return
        session.closed = True
        with trio.CancelScope(shield=True):
            for s in list(self._sets.values()):
                if s.session is session:
                    await self._abort(s, "the requester session ended")
            for set_id in list(session.sets):
                log.info("session %d ended: deleting auto-release snapshot set %s",
                         session.id, set_id)
                try:
                    await self._remove_snapshots(self._set_members(set_id), force=True)
                except Exception as e:
                    log.error("deleting auto-release set %s: %s", set_id, e)
                self._drop_record(set_id)
            session.sets.clear()
        self._sessions.pop(session.id, None)
        log.info("requester session %d closed", session.id)

    # ------------------------------------------------------------------ volumes
    def volume_path(self, name: str, host: str | None = None) -> str | None:
        """MOUNT/volumes/<name>.img as ``host`` sees it (None: the root, the daemon's
        host's view)."""
        if host is None or host == self.service_machine:
            return self.hardware.volume_path(name)
        if self.mountpoint is None:
            return None
        return os.path.join(self.mountpoint, "hosts", host, "volumes", f"{name}.img")

    def volume_paths(self, name: str) -> list[str]:
        """Every path of a volume a loop device may be attached to: the root's (first;
        also where a loop attached before the volume was presented elsewhere points)
        and each other host's view it is presented to. Writers and the in-use checks
        look at all of them: one LUN, one inode, in every view."""
        out = [self.hardware.volume_path(name)]
        out += [self.volume_path(name, h) for h in sorted(self.hosts_of(name))
                if h != self.service_machine]
        return [p for p in out if p]

    def _shown_path(self, name: str) -> str | None:
        """The volume's path in a view it is presented to (the local one first)."""
        hosts = self.hosts_of(name)
        return self.volume_path(name, None if self.service_machine in hosts else min(hosts))

    def _volume_json(self, v: VolumeInfo) -> dict[str, Any]:
        d = asdict(v)
        d["path"] = self._shown_path(v.name)
        d["presented_to"] = sorted(self.hosts_of(v.name))
        d["in_use_by"] = self._marks.get(v.name)
        return d

    def resolve_volume(self, spec: str) -> str:
        """A volume name from a name, MOUNT/volumes/<name>.img, or a /dev/loopN on it."""
        if not isinstance(spec, str) or not spec:
            raise _vss("E_INVALIDARG", f"volume {spec!r} is not a volume name")
        names = {v.name for v in self.pool.list_volumes()}
        if spec in names:
            return spec
        if "/" not in spec:
            if self._is_snapshot(spec):
                raise _vss("VSS_E_VOLUME_NOT_SUPPORTED",
                           f"{spec} is a snapshot; snapshots of snapshots are not supported")
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"no volume named {spec!r} in pool "
                       f"{self.pool.path}; 'volume list' shows them")
        path = os.path.abspath(spec)
        if path.startswith("/dev/loop"):
            back = loopdev.backing_file(path)
            if back is None:
                raise _vss("VSS_E_OBJECT_NOT_FOUND", f"{spec!r} is not an attached loop "
                           "device")
            path = back.removesuffix(loopdev.DELETED)
        if self.mountpoint and path.endswith(".img"):
            # MOUNT/volumes/<name>.img or MOUNT/hosts/<host>/volumes/<name>.img
            rel = path[len(self.mountpoint):].split("/") if path.startswith(
                self.mountpoint + "/") else []
            if len(rel) == 5 and rel[1] == "hosts" and rel[3] == "volumes":
                rel = ["", rel[3], rel[4]]
            if len(rel) == 3 and rel[1] == "volumes":
                name = rel[2][:-len(".img")]
                if name in names:
                    return name
        # No stat here, of any path: this runs on the trio thread that serves the FUSE
        # requests a stat under our mount -- or on a filesystem stacked on one of our
        # volumes -- would wait for. A path is a device name: ours, or not supported.
        raise _vss("VSS_E_VOLUME_NOT_SUPPORTED", f"{spec!r} is not a volume of pool "
                   f"{self.pool.path}; shadowplex snapshots only its own volumes (by name, "
                   "MOUNT/volumes/<name>.img, or a loop device on one)")

    def _is_snapshot(self, key: str) -> bool:
        try:
            self.pool.snapshot(key)
            return True
        except (bse.NotFound, bse.InvalidName):
            return False

    def _check_unmarked(self, volume: str, what: str) -> None:
        mark = self._marks.get(volume)
        if mark is not None:
            name = ("VSS_E_REVERT_IN_PROGRESS" if mark == "revert"
                    else "VSS_E_SNAPSHOT_SET_IN_PROGRESS")
            raise _vss(name, f"cannot {what} volume {volume}: it is in use by {mark}")

    def _check_not_attached(self, volume: str, what: str) -> None:
        path = self.pool.image_path(volume)
        users = loopdev.loops_backed_by(path) if path else []
        for vpath in self.volume_paths(volume):   # under our own mount: no stat
            users += loopdev.loops_backed_by(vpath, lexical=True)
        if users:
            # no `volume delete --force`: like lvremove of an open LV, deleting a volume
            # in use is refused (its users would get I/O errors); revert has --force
            hint = " (or revert --force)" if what == "revert" else ""
            raise _vss("VSS_E_VOLUME_IN_USE", f"cannot {what} volume {volume}: loop "
                       f"device(s) {', '.join(sorted(set(users)))} use it; unmount the "
                       f"filesystems on them and detach them (losetup -d) first{hint}")

    async def _check_not_open(self, volume: str) -> None:
        """Refuse to delete a volume whose image a process has open (or mapped), as
        lvremove refuses an open LV: the daemon's own count of FUSE handles, the
        processes named from /proc as text (no look at the path). A close reaches the
        daemon as an asynchronous release: wait for it a moment."""
        mount = self.mount
        if mount is None:
            return
        with trio.move_on_after(OPEN_RELEASE_WAIT):
            while mount.open_handles(volume):
                await trio.sleep(0.02)
        n = mount.open_handles(volume)
        if n:
            paths = self.volume_paths(volume)
            path = (paths or [f"MOUNT/volumes/{volume}.img"])[0]

            def classify(p: str) -> str | None:   # as text: no request to our mount
                return volume if p.removesuffix(loopdev.DELETED) in paths else None
            who = [w for _, w in await _in_thread(loopdev.users_by_path, classify)]
            if who:
                raise _vss("VSS_E_VOLUME_IN_USE", f"cannot delete volume {volume}: it is "
                           f"open (by {'; '.join(who)}); close it first")
            raise _vss("VSS_E_VOLUME_IN_USE", f"cannot delete volume {volume}: it is open "
                       f"({n} file handle(s) on {path}, not found by path: a process in "
                       f"another mount namespace?); close it first (fuser -v {path})")

    async def volume_create(self, name: str, size: int | str) -> dict[str, Any]:
        v = await _in_thread(self.pool.create_volume, name, parse_size(size))
        return self._volume_json(v)

    def volume_list(self) -> list[dict[str, Any]]:
        return [self._volume_json(v) for v in self.pool.list_volumes()]

    async def volume_resize(self, name: str, size: int | str) -> dict[str, Any]:
        self._check_unmarked(name, "resize")
        v = await _in_thread(self.pool.resize_volume, name, parse_size(size))
        # the kernel caches the size (1 s): `losetup -c` right after must see the new one
        await self._invalidate(name, attr_only=True)
        return self._volume_json(v)

    async def volume_present(self, name: str, hosts: Sequence[str]) -> dict[str, Any]:
        """LUN masking of a volume: present it to exactly ``hosts``. The daemon's own
        host is the root of the mount (MOUNT/volumes/); another host sees it at
        MOUNT/hosts/<host>/volumes/<name>.img. Open files and loop devices keep working
        (one LUN, one inode); only the names change."""
        vol = self.resolve_volume(name)
        if isinstance(hosts, str) or not isinstance(hosts, list | tuple) or not hosts:
            raise _vss("E_INVALIDARG", f"volume {vol}: name at least one host to present "
                       f"it to (the daemon's own host, {self.service_machine}, is the "
                       "mount's root)")
        for h in hosts:
            if not isinstance(h, str) or not documents.valid_host(h):
                raise _vss("E_INVALIDARG", f"host name {h!r} is not valid (letters, "
                           "digits, '-', '_' in dot-separated labels, at most 253 "
                           "characters)")
        before = self.hosts_of(vol)
        self._present([vol], hosts)
        after = self.hosts_of(vol)
        if after != before:
            log.info("volume %s presented to %s (was %s)", vol, ", ".join(sorted(after)),
                     ", ".join(sorted(before)))
            await self._names_changed()   # LUN masking: no cached name may still open it
        return self._volume_json(self.pool.volume(vol))

    async def volume_delete(self, name: str) -> None:
        self.pool.volume(name)
        self._check_unmarked(name, "delete")
        await _in_thread(self._check_not_attached, name, "delete")
        await self._check_not_open(name)
        await _in_thread(self.pool.delete_volume, name)
        self._present([name], None)
        # the kernel forgets the name before we reply, not in up to 1 s (a stat still
        # found it; an open, or a loop attach after `volume create` of the same name,
        # reached the deleted LUN: ENOENT)
        await self._names_changed()

    # ------------------------------------------------------------------ set creation
    def start_snapshot_set(self, session: Session, context: str | int = "backup",
                           attributes: int | str | Sequence[str] | None = None) -> str:
        """StartSnapshotSet: a new set id. VSS_E_SNAPSHOT_SET_IN_PROGRESS if any set is
        being created; the context and option bits are checked here."""
        ctx = vss.parse_context(context)
        attrs = vss.validate_attributes(ctx, parse_attributes(attributes))
        if self._creating is not None:
            other = self._creating
            who = (f"requester {other.session.host}" if other.session else "the daemon")
            raise _vss("VSS_E_SNAPSHOT_SET_IN_PROGRESS",
                       f"snapshot set {other.set_id} of {who} is being created "
                       f"({other.state.name}); only one at a time: retry when it is done")
        s = SnapshotSet(str(uuid.uuid4()), ctx, attrs, session)
        self._creating = s
        self._sets[s.set_id] = s
        log.info("snapshot set %s started (%s%s) by session %d", s.set_id, ctx.vss_name,
                 "".join(f"|{n}" for n in vss.attr_names(int(attrs) & int(vss.OPTION_BITS))),
                 session.id)
        return s.set_id

    def own_set(self, session: Session, set_id: str | None, what: str) -> SnapshotSet:
        if set_id is None:
            mine = [s for s in self._sets.values() if s.session is session]
            if not mine:
                raise _vss("VSS_E_BAD_STATE", f"{what}: no snapshot set was started in this "
                           "session (call set.start first)")
            return mine[-1]
        try:
            set_id = str(uuid.UUID(str(set_id)))
        except ValueError:
            raise _vss("E_INVALIDARG", f"{what}: {set_id!r} is not a snapshot set id") from None
        s = self._sets.get(set_id)
        if s is None:
            if set_id in self._records:
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
        name = self.resolve_volume(volume)
        if name in s.volumes:
            raise _vss("VSS_E_OBJECT_ALREADY_EXISTS",
                       f"volume {name} is already in snapshot set {s.set_id}")
        if len(s.volumes) >= vss.MAX_VOLUMES_PER_SET:
            raise _vss("VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED",
                       f"snapshot set {s.set_id} already holds {len(s.volumes)} volumes, "
                       f"the maximum")
        self._check_unmarked(name, "snapshot")
        err = self.hardware.why_not_supported([*s.volumes, name], int(s.attributes))
        if err is not None:   # AreLunsSupported said no: here is why
            raise _vss(err.name, f"cannot add {name} to snapshot set {s.set_id}: "
                       f"{err.message}")
        sid = str(uuid.uuid4())
        s.volumes[name] = sid
        self._marks[name] = f"snapshot set {s.set_id}"
        log.info("volume %s added to snapshot set %s as snapshot %s", name, s.set_id, sid)
        return sid

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
        paths = tuple(p for v in vols for p in self.volume_paths(v))
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
            self.catalog.put_set(self._record(s, SS.PROCESSING_PREPARE))
            await self._prepare(s, progress)
            await self._precommit(s)
            await self._commit(s)
            await self._postcommit(s)
            await self._enter(s, SS.PROCESSING_PREFINALCOMMIT)
            await _in_thread(self.hardware.PreFinalCommitSnapshots, s.set_id)
            await self._enter(s, SS.PREFINALCOMMITTED)
            await self._enter(s, SS.PROCESSING_POSTFINALCOMMIT)
            await _in_thread(self.hardware.PostFinalCommitSnapshots, s.set_id)
            s.prepared = False
            rec = self._record(s, SS.CREATED)
            self.catalog.put_set(rec)
            self._records[s.set_id] = rec
            await self._enter(s, SS.CREATED)
        except BaseException as e:
            err = self._as_vss(e)
            with trio.CancelScope(shield=True):
                await self._abort(s, err.message if err else "cancelled")
            if err is not None and not isinstance(e, VssError):
                raise err from e
            raise
        self._finish(s)
        if rec.auto_release and session is s.session:
            session.sets.append(s.set_id)
        session.last_created = s.set_id
        log.info("snapshot set %s created in %.3f s: %s", s.set_id, trio.current_time() - t0,
                 ", ".join(f"{v}={i}" for v, i in s.volumes.items()))
        return [self._prop_json(self.pool.snapshot(i)) for i in s.volumes.values()]

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
            self._present(s.volumes.values(), {s.session.host})
        s.prepared = True
        for vol, sid in s.volumes.items():
            await _in_thread(self.hardware.BeginPrepareSnapshot, s.set_id, sid, vol,
                             int(s.attributes))
        # EndPrepare waits for the plex syncs; abandoned on cancel (the abort stops them)
        cb = _thread_progress(progress, "plex sync")
        await _in_thread(self.hardware.EndPrepareSnapshots, s.set_id, cb, abandon=True)
        await self._enter(s, SS.PREPARED)

    async def _writers_call(self, writers: list[Any], method: str, ev: WriterEvent,
                            timeout: float, what: str) -> list[tuple[Any, BaseException]]:
        """Call ``method`` on every writer in parallel threads, within ``timeout``.
        Returns the failures (a writer that did not answer in time fails with
        VSS_E_WRITER_NOT_RESPONDING)."""
        failures: list[tuple[Any, BaseException]] = []

        async def one(w: Any) -> None:
            try:
                await _in_thread(getattr(w, method), ev, abandon=True)
            except trio.Cancelled:
                raise
            except BaseException as e:
                failures.append((w, e))
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as n:
                for w in writers:
                    n.start_soon(one, w)
        if scope.cancelled_caught:
            done = {id(w) for w, _ in failures}
            for w in writers:
                if id(w) not in done:
                    failures.append((w, _vss("VSS_E_WRITER_NOT_RESPONDING",
                                             f"writer {_wname(w)} did not {what} within "
                                             f"{timeout:g} s")))
        return failures

    async def _precommit(self, s: SnapshotSet) -> None:
        await self._enter(s, SS.PROCESSING_PRECOMMIT)
        if self.writers and vss.uses_writers(s.context):
            s.writers = list(self.writers)
            failures = await self._writers_call(s.writers, "freeze", self._writer_event(s),
                                                self.config["freeze_timeout"], "freeze")
            if failures:
                w, e = failures[0]
                name = e.name if isinstance(e, VssError) else "VSS_E_UNEXPECTED_WRITER_ERROR"
                raise _vss(name, f"writer {_culprit(w, e)} failed to freeze: {_msg(e)}")
        await _in_thread(self.hardware.PreCommitSnapshots, s.set_id)
        await self._enter(s, SS.PRECOMMITTED)

    async def _commit(self, s: SnapshotSet) -> None:
        await self._enter(s, SS.PROCESSING_COMMIT)
        deadline = float(self.config["hold_deadline"])
        hold = await self.barrier.hold(list(s.volumes), deadline=deadline)
        s.hold = hold
        if hold.expired or not getattr(hold, "flushed", True):
            raise _vss("VSS_E_HOLD_WRITES_TIMEOUT", f"writes to {', '.join(s.volumes)} could "
                       f"not be flushed and held within {deadline:g} s")
        await _in_thread(self.hardware.CommitSnapshots, s.set_id)
        s.hold = None
        if not self.barrier.release(hold):
            raise _vss("VSS_E_HOLD_WRITES_TIMEOUT", f"writes to {', '.join(s.volumes)} were "
                       f"held longer than {deadline:g} s; the commit came too late")
        await self._enter(s, SS.COMMITTED)

    async def _postcommit(self, s: SnapshotSet) -> None:
        await self._enter(s, SS.PROCESSING_POSTCOMMIT)
        await _in_thread(self.hardware.PostCommitSnapshots, s.set_id, len(s.volumes))
        if s.writers:
            failures = await self._writers_call(s.writers, "thaw", self._writer_event(s),
                                                self.config["freeze_timeout"], "thaw")
            if failures:
                # The snapshot may hold a writer's half-written state: not application
                # consistent, so it is not kept. Every writer gets Abort.
                w, e = failures[0]
                raise _vss("VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT",
                           f"writer {_culprit(w, e)} failed to thaw ({_msg(e)}); the "
                           "snapshot is not consistent for it and was discarded")
        await self._enter(s, SS.POSTCOMMITTED)

    def _finish(self, s: SnapshotSet) -> None:
        """The set left creation (created or aborted): free its volumes and the slot."""
        for v in s.volumes:
            if self._marks.get(v) == f"snapshot set {s.set_id}":
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
            failures = await self._writers_call(told, "abort", self._writer_event(s),
                                                self.config["writer_timeout"], "abort")
            for w, e in failures:
                log.error("writer %s failed to abort: %s", _wname(w), e)
        if s.prepared:
            await _in_thread(self.hardware.AbortSnapshots, s.set_id)
            s.prepared = False
        try:
            self._present(s.volumes.values(), None)
        except Exception as e:
            log.error("removing the presentation of set %s: %s", s.set_id, e)
        try:
            self.catalog.delete_set(s.set_id)
        except Exception as e:
            log.error("removing set %s from the catalog: %s", s.set_id, e)
        self._records.pop(s.set_id, None)
        s.state = SS.ABORTED
        self._finish(s)

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
                     progress: ProgressFn = None) -> dict[str, Any]:
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
        set_id = self.start_snapshot_set(session, context, mask)
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
        """BackupComplete: the writers hear that the backup of this set is done."""
        sid = set_id or session.last_created
        if sid is None:
            raise _vss("VSS_E_BAD_STATE", "end_backup: no snapshot set was created in this "
                       "session; name one")
        try:
            sid = str(uuid.UUID(str(sid)))
        except ValueError:
            raise _vss("E_INVALIDARG", f"{sid!r} is not a snapshot set id") from None
        rec = self._records.get(sid)
        exported = self._exported.get(sid)
        if rec is None and exported is not None:   # deleted by the importing host
            rec = exported.record
        if rec is None:
            if sid in self._sets:
                raise _vss("VSS_E_BAD_STATE", f"snapshot set {sid} is still being created")
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        ctx = Context(rec.context)
        notified: list[str] = []
        if self.writers and vss.uses_writers(ctx):
            vols = tuple(sorted({i.volume for i in self._members_info(sid)}))
            if not vols and exported is not None:
                vols = exported.volumes
            paths = tuple(p for v in vols for p in self.volume_paths(v))
            ev = WriterEvent(sid, ctx, vols, paths, tuple(self._set_members(sid))
                             or (exported.snapshots if exported else ()))
            failures = await self._writers_call(self.writers, "backup_complete", ev,
                                                self.config["writer_timeout"],
                                                "complete the backup")
            bad = {id(w) for w, _ in failures}
            notified = [n for w in self.writers if id(w) not in bad for n in _names(w)]
            for w, e in failures:
                log.error("writer %s failed in backup-complete: %s", _wname(w), e)
        rec.backup_complete = True
        self.catalog.set_backup_complete(sid)
        if exported is not None:   # BackupComplete went out: the export is done with
            self._exported.pop(sid, None)
            self.catalog.delete_export(sid)
        return {"set_id": sid, "writers_notified": notified}

    # ------------------------------------------------------------------ transport
    def _writer_metadata(self) -> list[Any]:
        """WriterMetadata of every writer (for the export); runs in a worker thread."""
        from .writers.base import WriterMetadata
        out: list[Any] = []
        for w in self.writers:
            try:
                if isinstance(w, WriterSet):
                    out.extend(w.identify_all())
                else:
                    meta = w.identify()
                    if isinstance(meta, WriterMetadata):
                        out.append(meta)
            except Exception as e:
                log.warning("writer %s did not identify itself: %s", _wname(w), e)
        return out

    async def export_set(self, set_id: str) -> dict[str, Any]:
        """The Backup Components Document of a TRANSPORTABLE set (+ each writer's
        Writer Metadata Document), as XML text."""
        sid = _guid(set_id, "snapshot set id")
        rec = self._records.get(sid)
        if rec is None:
            if sid in self._sets:
                raise _vss("VSS_E_BAD_STATE", f"snapshot set {sid} is still being created")
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        if not rec.attributes & int(Attr.TRANSPORTABLE):
            raise _vss("VSS_E_NONTRANSPORTABLE_BCD", f"snapshot set {sid} was not created "
                       "transportable: create it with the TRANSPORTABLE attribute to export it")
        if sid in self._imports:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {sid} is imported on host "
                       f"{self._imports[sid][0]}; export it before importing")
        members = [m for m in self._members_info(sid) if m.state == "committed"]
        if not members:
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"snapshot set {sid} has no usable snapshot")
        metas = (await _in_thread(self._writer_metadata)
                 if self.writers and vss.uses_writers(Context(rec.context)) else [])
        origin = rec.originating_machine or self.service_machine
        doc = await _in_thread(lambda: documents.write_backup_components(
            rec, members, metas, pool_id=str(getattr(self.pool, "pool_id", "")), host=origin,
            service_machine=self.service_machine))
        wmds = []
        for m in metas:
            wmds.append({"name": str(getattr(m, "writer_name", "") or ""),
                         "document": documents.write_writer_metadata(m).decode("utf-8")})
        exp = ExportRecord(rec, tuple(sorted({m.volume for m in members})),
                           tuple(m.id for m in members), time.time())
        self.catalog.put_export(exp)
        self._exported = self.catalog.exports()   # the newest MAX_EXPORTS
        log.info("exported snapshot set %s (%d snapshot(s), %d writer(s))", sid,
                 len(members), len(wmds))
        return {"set_id": sid, "originating_machine": origin,
                "document": doc.decode("utf-8"), "writers": wmds}

    async def import_set(self, session: Session, document: str) -> dict[str, Any]:
        """Import a Backup Components Document on the session's host: check it against
        the pool, then LocateLuns -- present the snapshot LUNs to that host only (hidden,
        read-only) and mark the set IMPORTED. Nothing changes when anything is wrong."""
        if not isinstance(document, str):
            raise _vss("E_INVALIDARG", "import: the document must be XML text")
        try:
            data = document.encode("utf-8")
        except UnicodeError:
            raise _vss("VSS_E_INVALID_XML_DOCUMENT", "import: the document is not valid "
                       "UTF-8 text") from None
        parsed = await _in_thread(lambda: documents.parse_backup_components(
            data, pool_id=str(getattr(self.pool, "pool_id", ""))))
        sid, host = parsed.set_id, session.host
        if sid in self._imports:
            raise _vss("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot set {sid} is already "
                       f"imported on host {self._imports[sid][0]}; delete it there first")
        rec = self._records.get(sid)
        if rec is None:
            raise _vss("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid} does not exist "
                       f"in pool {self.pool.path} (deleted, or never created here)")
        origin = rec.originating_machine or parsed.originating_machine
        if host == origin:
            raise _vss("VSS_E_BAD_STATE", f"snapshot set {sid} was created on host {host}: "
                       "import it on another host (its LUNs are already presented here)")
        members = {m.id: m for m in self._members_info(sid)}
        for ps in parsed.snapshots:
            info = members.get(ps.snapshot_id)
            if info is None:
                raise _vss("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot {ps.snapshot_id} of "
                           f"set {sid} does not exist in pool {self.pool.path}")
            if info.state != "committed":
                raise _vss("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot {info.id} is "
                           f"{info.state}, not a committed shadow copy")
            for side, doc_naa, ours in (("snapshot", ps.snapshot_naa, info.naa),
                                        ("source", ps.origin_naa, info.origin_naa)):
                if doc_naa.lower() != ours.lower():
                    raise _vss("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot {info.id}: the "
                               f"document's {side} LUN is naa.{doc_naa.lower()}, but this "
                               f"array's is naa.{ours.lower()} (a foreign or edited "
                               "document); nothing imported")
        try:
            located = await _in_thread(self.hardware.LocateLuns, parsed.snapshot_naas)
        except VssError as e:
            raise _vss("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid}: {e.message}; "
                       "nothing imported") from None
        ids = [lun.snapshot_id for lun in located if lun.snapshot_id]
        # Other requests ran while LocateLuns did: check again, then change everything
        # without awaiting (no other request can interleave from here on).
        if sid in self._imports:
            raise _vss("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot set {sid} is already "
                       f"imported on host {self._imports[sid][0]}; delete it there first")
        if (sid not in self._records
                or sorted(ids) != sorted(ps.snapshot_id for ps in parsed.snapshots)
                or not all(self._is_snapshot(i) for i in ids)):
            raise _vss("VSS_E_NO_SNAPSHOTS_IMPORTED", f"snapshot set {sid} changed while "
                       "it was being imported (deleted?); nothing imported")
        present_to = None if host == self.service_machine else frozenset((host,))
        before = {i: self._presented.get(i) for i in ids}
        recorded = False
        try:
            self.catalog.record_import(sid, host, origin, time.time(), ids, present_to)
            recorded = True
            self._fault("import.recorded")
            self._imports[sid] = (host, origin)
            for i in ids:   # LocateLuns: the importing host only
                if present_to:
                    self._presented[i] = present_to
                else:
                    self._presented.pop(i, None)
                self._fault("import.presented")
            self._push_masking()
            self._fault("import.surfaced")
            snaps = []
            for i in ids:
                d = self._prop_json(self.pool.snapshot(i))
                d["device_object"] = self.device_path(i, host)
                snaps.append(d)
        except BaseException as e:
            log.error("importing snapshot set %s on host %s failed (%s): undoing it", sid,
                      host, _msg(e))
            self._imports.pop(sid, None)
            for i, hs in before.items():
                if hs:
                    self._presented[i] = hs
                else:
                    self._presented.pop(i, None)
            if recorded:
                try:
                    self.catalog.undo_import(sid, before)
                except Exception as e2:
                    log.error("undoing the import of %s in the catalog: %s", sid, e2)
            try:
                self._push_masking()
            except Exception as e2:
                log.error("restoring the LUN masking after a failed import: %s", e2)
            raise
        if rec.auto_release:   # the importing session owns its lifetime now
            for other in self._sessions.values():
                if sid in other.sets:
                    other.sets.remove(sid)
            session.sets.append(sid)
        log.info("snapshot set %s (from %s) imported on host %s: %s", sid, origin, host,
                 ", ".join(ids))
        await self._names_changed()   # the origin host's names of them are gone
        return {"set_id": sid, "host": host, "origin": origin, "snapshots": snaps}

    # ------------------------------------------------------------------ queries
    def _members_info(self, set_id: str) -> list[SnapshotInfo]:
        return [s for s in self.pool.list_snapshots() if (s.set_id or s.id) == set_id]

    def _set_members(self, set_id: str) -> list[str]:
        return [s.id for s in self._members_info(set_id)]

    def _prop(self, s: SnapshotInfo) -> SnapshotProp:
        set_id = s.set_id or NIL_GUID
        rec = self._records.get(set_id)
        live = self._sets.get(set_id)
        if s.state == "invalid":
            status = SS.UNKNOWN
        elif live is not None:
            status = live.state
        else:
            status = SS(rec.state) if rec else SS.CREATED
        count = rec.snapshots_count if rec else len(live.volumes) if live else max(
            1, sum(1 for x in self.pool.list_snapshots() if x.set_id == s.set_id))
        attrs = int(s.attributes)
        mount = self._mounts.get(s.id)
        exposed_path = None
        if mount is not None:
            exposed_path = mount.mountpoint
        elif s.exposed_name and self.mountpoint:
            exposed_path = os.path.join(self._view_root(None, s.id) or self.mountpoint,
                                        "exposed", f"{s.exposed_name}.img")
        if s.exposed_name or mount is not None:
            attrs |= int(Attr.EXPOSED_LOCALLY)
        if set_id in self._imports:
            attrs |= int(Attr.IMPORTED)
        return SnapshotProp(
            snapshot_id=s.id, snapshot_set_id=set_id,
            snapshots_count=min(max(1, count), vss.MAX_VOLUMES_PER_SET),
            device_object=self.device_path(s.id) or f".shadow/{s.id}.img",
            original_volume_name=self._shown_path(s.volume) or s.volume,
            originating_machine=rec.originating_machine if rec and rec.originating_machine
            else (live.session.host if live and live.session else ""),
            service_machine=self.service_machine,
            exposed_name=s.exposed_name or (mount.mountpoint if mount else None),
            exposed_path=exposed_path,
            attributes=Attr(attrs & vss.KNOWN_ATTR_BITS),
            creation_timestamp=s.created, status=status)

    def _prop_json(self, s: SnapshotInfo) -> dict[str, Any]:
        d = self._prop(s).to_json()
        mount = self._mounts.get(s.id)
        rec = self._records.get(s.set_id or NIL_GUID)
        try:
            ctx = vss.snapshot_context(s.attributes).cli_name
        except ValueError:
            ctx = None
        d.update({
            "volume": s.volume, "naa": s.naa, "origin_naa": s.origin_naa, "size": s.size,
            "kind": s.kind, "pool_state": s.state, "context": ctx,
            "mounted_at": mount.mountpoint if mount else None,
            "loop_device": mount.dev if mount else None,
            "backup_complete": bool(rec.backup_complete) if rec else False,
            "presented_to": sorted(self.hosts_of(s.id)),
            "imported_by": (self._imports.get(s.set_id or NIL_GUID) or (None,))[0],
        })
        return d

    def snapshot_list(self, set_id: str | None = None, volume: str | None = None,
                      context: str | int | None = None) -> list[dict[str, Any]]:
        ctx = vss.parse_context(context, allow_all=True) if context is not None else Context.ALL
        if volume is not None:
            volume = self.resolve_volume(volume)
        if set_id is not None:
            set_id = _guid(set_id, "snapshot set id")
        out = []
        for s in self.pool.list_snapshots(volume):
            if set_id is not None and (s.set_id or s.id) != set_id:
                continue
            if not vss.context_matches(ctx, s.attributes):
                continue
            out.append(self._prop_json(s))
        return out

    def snapshot_show(self, snapshot_id: str | None = None,
                      set_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        if (snapshot_id is None) == (set_id is None):
            raise _vss("E_INVALIDARG", "name exactly one of snapshot_id or set_id")
        if snapshot_id is not None:
            return self._prop_json(self.pool.snapshot(_guid(snapshot_id, "snapshot id")))
        sid = _guid(set_id, "snapshot set id")
        snaps = self.snapshot_list(set_id=sid)
        if not snaps and sid not in self._sets:
            raise _vss("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        return snaps

    def set_list(self) -> list[dict[str, Any]]:
        self._prune_records()
        out = [s.to_json() for s in self._sets.values()]
        for rec in self._records.values():
            if rec.set_id in self._sets:
                continue
            out.append({"set_id": rec.set_id, "context": Context(rec.context).cli_name,
                        "attributes": rec.attributes, "state": SS(rec.state).name,
                        "volumes": [{"volume": i.volume, "snapshot_id": i.id}
                                    for i in self._members_info(rec.set_id)],
                        "requester": rec.originating_machine or None,
                        "created": rec.created, "auto_release": rec.auto_release,
                        "backup_complete": rec.backup_complete,
                        "snapshots_count": rec.snapshots_count})
        return out

    # ------------------------------------------------------------------ deletion
    def _drop_record(self, set_id: str) -> None:
        self._records.pop(set_id, None)
        self.catalog.delete_set(set_id)
        if self._imports.pop(set_id, None) is not None:
            self.catalog.delete_import(set_id)
        for sess in self._sessions.values():
            if set_id in sess.sets:
                sess.sets.remove(set_id)

    def _renamed(self, snapshot_id: str, old: str | None) -> None:
        """The snapshot no longer has the exposure name ``old``: remember it for the
        in-use checks (see _former_names and _snapshot_users)."""
        if old is not None:
            self._former_names.setdefault(snapshot_id, set()).add(old)

    def _forget_mount(self, snapshot_id: str) -> None:
        self._mounts.pop(snapshot_id, None)
        self.catalog.delete_mount(snapshot_id)

    async def _unmount(self, snapshot_id: str) -> None:
        # One unmount at a time: two requests unmounting one snapshot (two deletes with
        # unexpose, an unexpose and a delete) would both find its record, and the second
        # umount fail with "not mounted"; the second now finds no record and is done.
        async with self._unmounting:
            m = self._mounts.get(snapshot_id)
            if m is None:
                return
            try:
                await _in_thread(loopdev.unexpose_mount,
                                 loopdev.ExposeRecord(m.dev, m.mountpoint, m.fstype),
                                 f"/.shadow/{snapshot_id}.img")
            except loopdev.LoopError as e:
                if await _in_thread(loopdev.is_mountpoint, m.mountpoint):
                    raise _vss("VSS_E_VOLUME_IN_USE", f"snapshot {snapshot_id} is mounted "
                               f"at {m.mountpoint} and could not be unmounted ({e}); stop "
                               "using it first") from None
                raise
            self._forget_mount(snapshot_id)

    async def _snapshot_users(self, snaps: Sequence[SnapshotInfo], exposed_only: bool = False,
                              own_mounts: bool = False, wait: float = 0.0
                              ) -> dict[str, list[str]]:
        """What uses each snapshot, by id (snapshots nothing uses are left out): loop
        devices attached to, and processes with open or mapped, any path it is reachable
        by -- MOUNT/.shadow/<id>.img, MOUNT/exposed/<name>.img and the same under
        MOUNT/hosts/<host>/ (exposed_only: only the exposed names, what unexpose takes
        away). own_mounts: our `expose --mount` loop devices are about to be taken down
        by the caller: only what else uses them counts. The paths are compared as text
        (loopdev.users_by_path): nothing here makes a request to our own mount.

        An exposed name is matched as the kernel reports it. Without " (deleted)" it was
        opened through the name as it is now: the snapshot that has that name. With it,
        through a name that has since gone or been given to another snapshot (every
        change of names drops the kernel's entry, see _names_changed): a snapshot that
        had that name earlier in this run (_former_names) and has files open (several
        such snapshots: each of them with files open is named).

        Unless exposed_only, the FUSE file handles are counted too: a user the path scan
        cannot name (a process in another mount namespace, a path bind-mounted
        elsewhere) still keeps a snapshot in use. A closed file is released
        asynchronously by the kernel (a loop device just detached, a reader just ended):
        an unnamed count is waited for up to ``wait`` seconds."""
        if self.mountpoint is None or not snaps:
            return {}
        root = self.mountpoint.rstrip("/") + "/"
        by_dev = {f"{s.id}.img": s.id for s in snaps}
        by_name = {f"{s.exposed_name}.img": s.id for s in snaps if s.exposed_name}
        mount = self.mount
        former: dict[str, list[str]] = {}   # b"<earlier name>.img" -> snapshot ids
        if not exposed_only:
            for s in snaps:
                if mount is not None and not mount.open_handles(s.id):
                    continue   # nothing has it open: no earlier name of it is in use
                for n in self._former_names.get(s.id, ()):
                    former.setdefault(f"{n}.img", []).append(s.id)

        def classify(path: str) -> str | list[str] | None:
            gone = path.endswith(loopdev.DELETED)   # opened by a name since changed
            path = path.removesuffix(loopdev.DELETED)
            if not path.startswith(root):
                return None
            rel = path[len(root):].split("/")
            if len(rel) == 4 and rel[0] == "hosts":   # MOUNT/hosts/<host>/...
                rel = rel[2:]
            if len(rel) != 2:
                return None
            if rel[0] == "exposed":
                return former.get(rel[1]) if gone else by_name.get(rel[1])
            if rel[0] == ".shadow" and not exposed_only:   # never renamed (a "deleted"
                return by_dev.get(rel[1])                 # one: a host view changed)
            return None

        own = {m.dev: (sid, m.mountpoint) for sid, m in self._mounts.items()
               if sid in by_dev.values()} if own_mounts else {}

        def scan() -> tuple[list[tuple[str, str]], dict[str, int]]:
            found = loopdev.users_by_path(classify, own)
            mine: dict[str, int] = {}   # FUSE handles our own loop devices hold
            for dev, (sid, _) in own.items():
                back = loopdev.backing_file(dev)
                if back is not None and classify(back) == sid:
                    mine[sid] = mine.get(sid, 0) + 1
            return found, mine

        found, mine = await _in_thread(scan)
        users: dict[str, list[str]] = {}
        for sid, what in found:
            users.setdefault(sid, []).append(what)
        if exposed_only or mount is None:
            return users
        deadline = trio.current_time() + wait
        while True:
            unnamed = {s.id: c for s in snaps if s.id not in users
                       and (c := mount.open_handles(s.id) - mine.get(s.id, 0)) > 0}
            if not unnamed or trio.current_time() >= deadline:
                break
            await trio.sleep(0.05)
        for sid, c in unnamed.items():
            users[sid] = [f"{c} open file(s) through the mount not found by path (a process "
                          "in another mount namespace, a path bind-mounted elsewhere)"]
        return users

    @staticmethod
    def _in_use_message(users: dict[str, list[str]], what: str) -> str:
        """One line: the first snapshot in use, who uses it, what to do."""
        sid, us = next(iter(users.items()))
        more = f" (and {len(users) - 1} more snapshot(s) in use)" if len(users) > 1 else ""
        return (f"cannot {what} snapshot {sid}: in use by {'; '.join(us)}{more}; unmount "
                "and detach its loop devices (umount, losetup -d) and end the processes "
                "using it, then retry")

    async def _remove_snapshots(self, ids: Iterable[str], force: bool = False) -> list[str]:
        """Delete committed snapshots (unmounting them first); updates set records.
        force: the automatic deletions (an auto-release set whose session ended, an
        unfinished set at start-up): nothing refuses them, what still uses a snapshot is
        logged as an error (its reads fail with EIO from then on)."""
        ids = list(ids)
        if force:
            infos = []
            for sid in ids:
                with contextlib.suppress(bse.NotFound):
                    infos.append(self.pool.snapshot(sid))
            try:
                users = await self._snapshot_users(infos, own_mounts=True, wait=1.0)
            except Exception as e:   # never stops an automatic deletion
                log.warning("could not check what uses snapshots %s: %s", ", ".join(ids), e)
                users = {}
            for sid, us in users.items():
                log.error("automatic deletion of snapshot %s although it is in use by %s: "
                          "reads through it fail (EIO) from now on (an auto-release set ends "
                          "with its requester's session: use a persistent context, "
                          "app-rollback or nas-rollback, for snapshots used beyond it)", sid,
                          "; ".join(us))
        done = []
        sets: set[str] = set()
        for sid in ids:
            try:
                info = self.pool.snapshot(sid)
            except bse.NotFound:
                continue
            sets.add(info.set_id or info.id)
            if sid in self._mounts:
                try:
                    await self._unmount(sid)
                except Exception:
                    if not force:
                        raise
                    log.error("could not unmount snapshot %s; deleting it anyway", sid)
                    self._forget_mount(sid)
            try:
                if info.state == "preparing":
                    await _in_thread(self.pool.abort_snapshot, sid)
                else:
                    await _in_thread(self.hardware.OnLunEmpty, sid)
            except bse.NotFound:   # another request deleted it meanwhile: go on
                continue
            done.append(sid)
            self._former_names.pop(sid, None)
            self._present([sid], None)
            log.info("deleted snapshot %s of %s", sid, info.volume)
        for set_id in sets:
            if set_id in self._records and not self._set_members(set_id):
                self._drop_record(set_id)
        return done

    async def snapshot_delete(self, snapshot_id: str | None = None, set_id: str | None = None,
                              oldest: str | None = None, all: bool = False,
                              context: str | int | None = None,
                              unexpose: bool = False) -> dict[str, Any]:
        """DeleteSnapshots by snapshot id, by set, the oldest of a volume, or all (in a
        context). Mounted snapshots are refused unless ``unexpose``; nothing is deleted
        then."""
        chosen = [x for x in (snapshot_id, set_id, oldest) if x is not None] + ([1] if all
                                                                                else [])
        if len(chosen) != 1:
            raise _vss("E_INVALIDARG", "name exactly one of: snapshot_id, set_id, oldest "
                       "(a volume), all")
        ctx = vss.parse_context(context, allow_all=True) if context is not None else Context.ALL
        if snapshot_id is not None:
            targets = [self.pool.snapshot(_guid(snapshot_id, "snapshot id"))]
        elif set_id is not None:
            sid = _guid(set_id, "snapshot set id")
            if sid in self._sets:
                raise _vss("VSS_E_SNAPSHOT_SET_IN_PROGRESS", f"snapshot set {sid} is being "
                           "created; abort it instead")
            targets = self._members_info(sid)
            if not targets:
                raise _vss("VSS_E_OBJECT_NOT_FOUND", f"no snapshot set {sid}")
        elif oldest is not None:
            vol = self.resolve_volume(oldest)
            cands = [s for s in self.pool.list_snapshots(vol)
                     if not self._in_creation(s) and vss.context_matches(ctx, s.attributes)]
            if not cands:
                raise _vss("VSS_E_OBJECT_NOT_FOUND", f"volume {vol} has no snapshot to delete")
            targets = [min(cands, key=lambda s: (s.created, s.id))]
        else:
            targets = [s for s in self.pool.list_snapshots()
                       if vss.context_matches(ctx, s.attributes)]
        busy = [s for s in targets if self._in_creation(s)]
        if busy:
            raise _vss("VSS_E_SNAPSHOT_SET_IN_PROGRESS", f"snapshot {busy[0].id} belongs to "
                       "a set being created; abort that set instead")
        claimed = [s for s in targets if s.id in self._claims]
        if claimed:
            raise _vss("VSS_E_VOLUME_IN_USE", f"snapshot {claimed[0].id} is being "
                       f"{self._claims[claimed[0].id]}; retry when that is done")
        mounted = [s for s in targets if s.id in self._mounts]
        if mounted and not unexpose:
            m = self._mounts[mounted[0].id]
            raise _vss("VSS_E_VOLUME_IN_USE", f"snapshot {mounted[0].id} is mounted at "
                       f"{m.mountpoint}; unexpose it first (or delete with unexpose)")
        # A loop device or a process on any of its paths: refused, whatever unexpose says
        # (unexpose takes down our own `expose --mount`, never someone else's use).
        users = await self._snapshot_users(targets, own_mounts=unexpose, wait=2.0)
        if users:
            raise _vss("VSS_E_VOLUME_IN_USE", self._in_use_message(users, "delete"))
        deleted = await self._remove_snapshots([s.id for s in targets])
        if deleted:   # their names (.shadow, exposed, host views) leave the kernel now
            await self._names_changed()
        return {"deleted": deleted, "count": len(deleted)}

    # ------------------------------------------------------------------ expose
    def _committed(self, snapshot_id: str) -> SnapshotInfo:
        s: SnapshotInfo = self.pool.snapshot(_guid(snapshot_id, "snapshot id"))
        if self._in_creation(s):
            raise _vss("VSS_E_BAD_STATE", f"snapshot {s.id} is still being created")
        return s

    @contextlib.contextmanager
    def _claim(self, snapshot_id: str, what: str) -> Iterator[None]:
        """One long operation at a time per snapshot (promote, split, expose --mount;
        deletion waits for none of them and is refused meanwhile): they run in worker
        threads, and two on one snapshot collide (the promote's temporary files, a mount
        recorded for a snapshot split or deleted meanwhile, two mounts of one snapshot)."""
        other = self._claims.get(snapshot_id)
        if other is not None:
            raise _vss("VSS_E_VOLUME_IN_USE", f"snapshot {snapshot_id} is being {other}; "
                       "retry when that is done")
        self._claims[snapshot_id] = what
        try:
            yield
        finally:
            self._claims.pop(snapshot_id, None)

    def _in_creation(self, s: SnapshotInfo) -> bool:
        """Prepared, or committed in the store while its set is not CREATED yet: until
        DoSnapshotSet ends the set may still be aborted (a writer that fails to thaw),
        which deletes its snapshots. Nothing else may delete, split, expose, revert to
        or promote them meanwhile."""
        return s.state == "preparing" or (s.set_id or s.id) in self._sets

    async def expose(self, snapshot_id: str, name: str | None = None,
                     mount: str | None = None) -> dict[str, Any]:
        """Make a snapshot visible: as MOUNT/exposed/<name>.img, and/or mounted read-only
        (loop device + filesystem) at ``mount``."""
        if mount is None:
            return await self._expose(snapshot_id, name, mount)
        sid = self._committed(snapshot_id).id
        with self._claim(sid, "mounted"):
            return await self._expose(sid, name, mount)

    async def _expose(self, snapshot_id: str, name: str | None,
                      mount: str | None) -> dict[str, Any]:
        s = self._committed(snapshot_id)
        if name is None and mount is None:
            raise _vss("E_INVALIDARG", "expose needs a name (MOUNT/exposed/<name>.img) or a "
                       "mount directory, or both")
        if mount is not None:
            if not isinstance(mount, str) or not os.path.isabs(mount):
                raise _vss("E_INVALIDARG", f"mount directory {mount!r} must be an absolute "
                           "path")
            if not mount.isprintable():   # NUL, line breaks, control characters
                raise _vss("E_INVALIDARG", f"mount directory {mount!r} holds control "
                           "characters; use a directory name without them")
            if s.id in self._mounts:
                raise _vss("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot {s.id} is already mounted "
                           f"at {self._mounts[s.id].mountpoint}")
            if self.device_path(s.id) is None:
                raise _vss("VSS_E_NOT_SUPPORTED", "the pool is not mounted: cannot attach a "
                           "loop device to the snapshot")
        old_name = s.exposed_name
        if name is not None and name != old_name:
            s = await _in_thread(self.pool.set_exposed, s.id, name)
            self._renamed(s.id, old_name)
        if mount is not None:
            dev_path = self.device_path(s.id)
            assert dev_path is not None
            try:
                # isolated: the target is checked by a child process (resolving it may
                # be a request to our own mount), the image never stat'ed here
                rec = await _in_thread(loopdev.expose_mount, dev_path, mount,
                                       [r for r in (self.pool.path, self.mountpoint) if r],
                                       True)
            except BaseException as e:
                # deleted meanwhile (its session ended), or presented to another host
                # only (an import): losetup found no image at dev_path
                if not self._is_snapshot(s.id):
                    raise _vss("VSS_E_OBJECT_NOT_FOUND", f"snapshot {s.id} was deleted "
                               "while it was being mounted") from e
                if name is not None and name != old_name:
                    with trio.CancelScope(shield=True):
                        await _in_thread(self.pool.set_exposed, s.id, old_name)
                        self._renamed(s.id, name)
                        await self._names_changed()   # the name it had for a moment
                if isinstance(e, loopdev.LoopError) and self.device_path(s.id) != dev_path:
                    raise _vss("VSS_E_OBJECT_NOT_FOUND", f"snapshot {s.id} was presented "
                               "to another host while it was being mounted") from e
                raise
            if not self._is_snapshot(s.id):   # deleted meanwhile (its session ended)
                with trio.CancelScope(shield=True):
                    await _in_thread(loopdev.unexpose_mount, rec)
                raise _vss("VSS_E_OBJECT_NOT_FOUND", f"snapshot {s.id} was deleted while "
                           "it was being mounted")
            m = MountRecord(s.id, rec.mountpoint, rec.dev, rec.fstype)
            self.catalog.put_mount(m)
            self._mounts[s.id] = m
        log.info("exposed snapshot %s%s%s", s.id, f" as {name}" if name else "",
                 f" at {mount}" if mount else "")
        if name is not None and name != old_name:
            await self._names_changed()
        return self._prop_json(self.pool.snapshot(s.id))

    async def unexpose(self, snapshot_id: str) -> dict[str, Any]:
        s = self._committed(snapshot_id)
        if s.exposed_name is None and s.id not in self._mounts:
            raise _vss("VSS_E_BAD_STATE", f"snapshot {s.id} is not exposed")
        if s.exposed_name is not None:
            # the name goes away: a loop device or a process on MOUNT/exposed/<name>.img
            # (in any host's view) refuses it. (One on the device path, .shadow/<id>.img,
            # does not: unexpose leaves that path and the snapshot as they are.)
            users = await self._snapshot_users([s], exposed_only=True)
            if users:
                raise _vss("VSS_E_VOLUME_IN_USE", self._in_use_message(users, "unexpose"))
        await self._unmount(s.id)
        if s.exposed_name is not None:
            await _in_thread(self.pool.set_exposed, s.id, None)
            self._renamed(s.id, s.exposed_name)
            await self._names_changed()
        log.info("unexposed snapshot %s", s.id)
        return self._prop_json(self.pool.snapshot(s.id))

    # ------------------------------------------------------------------ long operations
    # Each runs as a job (provider/jobs.py): status lists it, and its cancel token stops
    # it at the next chunk. What a cancellation leaves is decided here and said in the
    # reply: promote, split, scrub and check stop with nothing changed (E_ABORT); a
    # revert that has started rolls forward and completes (docs/provider.md).
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
        s = self._committed(snapshot_id)
        vol = s.volume
        self._check_unmarked(vol, "revert")
        if not force:
            await _in_thread(self._check_not_attached, vol, "revert")
        self._marks[vol] = "revert"
        hold = None
        started = False   # pool.revert called: the volume may have changed from then on
        with self._jobs.run("revert", s.id, vol, cancel) as job:
            try:
                hold = await self.barrier.hold([vol],
                                               deadline=float(self.config["revert_hold"]))

                def run(report: Callable[[int, int], None]) -> None:
                    nonlocal started
                    job.check()   # the last moment a cancellation leaves it unchanged
                    started = True
                    self.hardware.ResyncLuns(s.id, vol, report)
                await _in_thread(run, job.thread_progress(progress, "revert"))
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
                        await self._invalidate(vol)
        log.info("volume %s reverted to snapshot %s%s", vol, s.id,
                 " (cancelled after it had started: a revert rolls forward)"
                 if job.cancelled else "")
        return self._volume_json(self.pool.volume(vol))

    async def _invalidate(self, lun: str, attr_only: bool = False) -> None:
        """Drop the kernel's cache (pages and attributes, or attributes only) of a LUN
        whose content or size changed without a write through FUSE; returns once the
        kernel has. Never raises: a failure is logged (the LUN is right; what the kernel
        serves from its cache may not be)."""
        if self.mount is None:
            return
        try:
            await self.mount.invalidate_lun(lun, attr_only)
        except Exception as e:
            log.error("could not drop the kernel's cache of %s (%s): buffered reads may "
                      "return its old content until the file is no longer cached", lun, e)

    async def _names_changed(self) -> None:
        """A name under the mount vanished or names another LUN now (expose, unexpose,
        split, volume and snapshot delete, present, import): the kernel forgets its
        cached entry before we report success (else, within its 1 s entry timeout, a
        lookup still finds the old LUN: a stat succeeds, an open reaches it)."""
        if self.mount is None:
            return
        try:
            await self.mount.refresh_now()
        except Exception as e:
            log.error("could not drop the kernel's cached names (%s): a name may lead to "
                      "its old LUN for up to a second", e)

    @staticmethod
    def _job_cancelled(job: Job, what: str, detail: str) -> VssError:
        return _vss("E_ABORT", f"{what} cancelled ({job.token.reason or 'cancelled'}): "
                    f"nothing changed ({detail})")

    async def promote(self, snapshot_id: str, progress: ProgressFn = None,
                      cancel: CancelToken | None = None) -> dict[str, Any]:
        """Differential -> full copy. Cancelled: E_ABORT, still differential (the copy is
        thrown away); a cancellation after the copy is committed comes too late."""
        s = self._committed(snapshot_id)
        with self._claim(s.id, "promoted"), \
                self._jobs.run("promote", s.id, s.volume, cancel) as job:
            try:
                info = await _in_thread(self.pool.promote, s.id,
                                        job.thread_progress(progress, "promote"))
            except bse.Cancelled:
                raise self._job_cancelled(job, f"promote of snapshot {s.id}",
                                          "it is still differential") from None
        return self._prop_json(info)

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
        s = self._committed(snapshot_id)
        with self._claim(s.id, "split"):
            if s.id in self._mounts:
                raise _vss("VSS_E_VOLUME_IN_USE", f"snapshot {s.id} is mounted at "
                           f"{self._mounts[s.id].mountpoint}; unexpose it first")
            users = await self._snapshot_users([s], wait=2.0)
            if users:
                raise _vss("VSS_E_VOLUME_IN_USE", self._in_use_message(users, "split"))
            with self._jobs.run("split", s.id, s.volume, cancel) as job:
                report = job.thread_progress(progress, "split")

                def step(done: int, total: int) -> None:   # in the worker thread
                    report(done, total)   # raises Cancelled once cancelled
                    if done >= total:     # the copy is complete (and, last, durable)
                        users = trio.from_thread.run(self._users_of, s.id)
                        if users:
                            raise bse.Busy(self._in_use_message(users, "split") +
                                           f" (nothing changed: no volume {name}; the "
                                           f"snapshot is still {s.kind})")
                step.point_of_no_return = report.point_of_no_return  # type: ignore[attr-defined]
                try:
                    v = await _in_thread(self.pool.split, s.id, name, step)
                except bse.Cancelled:
                    raise self._job_cancelled(job, f"split of snapshot {s.id}", f"no "
                                              f"volume {name}; the snapshot is still "
                                              f"{s.kind}") from None
                except Exception as e:
                    err = self._split_failed(s, e)
                    if err is e:
                        raise
                    raise err from e
        self._former_names.pop(s.id, None)
        set_id = s.set_id or s.id
        if set_id in self._records and not self._set_members(set_id):
            self._drop_record(set_id)
        await self._names_changed()   # .shadow/<id>.img (and its exposed name) are gone
        return self._volume_json(v)

    async def _users_of(self, snapshot_id: str) -> dict[str, list[str]]:
        """_snapshot_users of one snapshot as it is now (its exposure may have been
        renamed meanwhile)."""
        return await self._snapshot_users([self.pool.snapshot(snapshot_id)], wait=1.0)

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

    async def check(self, cancel: CancelToken | None = None) -> dict[str, Any]:
        with self._jobs.run("check", "pool", None, cancel) as job:
            try:
                problems = await _in_thread(self.pool.check,
                                            job.thread_progress(None, "check"))
            except bse.Cancelled:
                raise self._job_cancelled(job, "check", "it only reads") from None
        problems = list(problems) + self._check_catalog()
        return {"ok": not problems, "problems": problems}

    def _prune_records(self) -> None:
        """Forget sets whose snapshots are all gone behind our back (the store deletes the
        oldest snapshot of an origin whose diff area overflows, as VSS does)."""
        live = {s.set_id or s.id for s in self.pool.list_snapshots()}
        for sid in [x for x in self._records if x not in live and x not in self._sets]:
            log.warning("snapshot set %s has no snapshots left (deleted by the store): "
                        "forgetting it", sid)
            self._drop_record(sid)

    def _check_catalog(self) -> list[str]:
        self._prune_records()
        out = []
        for sid, m in self._mounts.items():
            if not self._is_snapshot(sid):
                out.append(f"mount record for missing snapshot {sid} at {m.mountpoint}")
        return out

    async def scrub(self, progress: ProgressFn = None,
                    cancel: CancelToken | None = None) -> dict[str, Any]:
        with self._jobs.run("scrub", "pool", None, cancel) as job:
            try:
                problems = await _in_thread(self.pool.scrub,
                                            job.thread_progress(progress, "scrub"))
            except bse.Cancelled:
                raise self._job_cancelled(job, "scrub", "a scrub changes no data"
                                          ) from None
        problems = list(problems) + self._check_catalog()
        return {"ok": not problems, "problems": problems}

    async def writers_list(self) -> list[dict[str, Any]]:
        out = []
        for w in self.writers:
            try:
                meta = await _in_thread(w.identify)
            except Exception as e:
                out.append({"name": _wname(w), "error": str(e)})
                continue
            entry = _jsonable(meta, _wname(w))
            inner = entry.get("writers")
            if isinstance(inner, list):   # a WriterSet: one entry per writer
                for x in inner:
                    if isinstance(x, dict):
                        x.setdefault("name", x.get("writer_name"))
                        out.append(x)
            else:
                out.append(entry)
        return out

    def status(self) -> dict[str, Any]:
        total, free = self.pool.statfs()
        snaps = self.pool.list_snapshots()
        c = self._creating
        return {
            "pool": self.pool.path, "pool_id": getattr(self.pool, "pool_id", None),
            "mount": self.mountpoint, "chunk_size": getattr(self.pool, "chunk_size", None),
            "space_total": total, "space_free": free,
            "volumes": len(self.pool.list_volumes()),
            "snapshots": sum(1 for s in snaps if s.state != "preparing"),
            "sets": len(self._records),
            "creating": c.to_json() if c else None,
            "volumes_in_use": dict(self._marks),
            "operations": self._jobs.list(),
            "sessions": len(self._sessions),
            "writers": [n for w in self.writers for n in _names(w)],
            "service_machine": self.service_machine,
            "provider_id": vss.PROVIDER_ID,
        }


def _writer_objects(writers: Iterable[Any], freeze_timeout: float) -> list[Any]:
    """What the coordinator calls: objects with the event interface (freeze(event),
    thaw(event), abort(event), backup_complete(event), identify()) -- a WriterSet, or a
    test double. Plain Writer instances are grouped into one WriterSet (freeze order,
    rollback), whose own deadline ends before the coordinator's."""
    out: list[Any] = []
    loose: list[Writer] = []
    for w in writers:
        (loose if isinstance(w, Writer) else out).append(w)
    if loose:
        out.append(WriterSet(loose, freeze_timeout=max(freeze_timeout / 2,
                                                       freeze_timeout - 2.0)))
    return out


def _guid(value: Any, what: str) -> str:
    try:
        return str(uuid.UUID(str(value).strip()))
    except ValueError:
        raise _vss("E_INVALIDARG", f"{value!r} is not a {what} (a GUID)") from None


def _names(w: Any) -> list[str]:
    """Names of the writers behind one writer object (a WriterSet has several)."""
    return [_wname(x) for x in (w.writers if isinstance(w, WriterSet) else [w])]


def _culprit(w: Any, e: BaseException) -> str:
    """The writer to blame: the one a WriterSet's error names, else the object called."""
    return str(getattr(e, "writer", None) or _wname(w))


def _msg(e: BaseException) -> str:
    return e.message if isinstance(e, VssError) else " ".join(str(e).split())


def _wname(w: Any) -> str:
    return str(getattr(w, "name", None) or type(w).__name__)


def _jsonable(meta: Any, name: str) -> dict[str, Any]:
    """A writer's identify() answer as JSON (a dict, a dataclass, or to_json())."""
    if hasattr(meta, "to_json"):
        meta = meta.to_json()
    elif hasattr(meta, "__dataclass_fields__"):
        meta = asdict(meta)
    if not isinstance(meta, dict):
        meta = {"metadata": str(meta)}
    out: dict[str, Any] = dict(meta)
    out.setdefault("name", name)
    return out
