"""Exposure: a snapshot made visible under a name (MOUNT/exposed/<name>.img, in every
host view it is presented to) and/or mounted read-only (`expose --mount`: a loop device
on its device path and a filesystem on that), and what uses a snapshot through any of
its paths (the in-use checks of delete, split and unexpose).

State: the mount records are the catalog's (ProviderCatalog.mounted, its write-through
cache; provider/catalog.py); the exposure names are the block store's (set_exposed).
Exposure owns the former exposure names of this run (``_former_names``) and the lock
that makes unmounts one at a time. The coordinator keeps the claims (one long operation
per snapshot: Coordinator.expose claims a snapshot before a mount). Trio thread; the
loop devices, mounts and /proc scans run in worker threads, and nothing here stats a
path under our own mount (that would be a FUSE request the trio thread must serve).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import trio

from blockstore import SnapshotInfo
from fuse_mount import loopdev

from . import audit
from .array import Array
from .catalog import MountRecord, ProviderCatalog
from .masking import LunMasking
from .model import in_thread
from .views import Views
from .vss import VssError

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


class Exposure:
    def __init__(self, pool: Array, catalog: ProviderCatalog, masking: LunMasking,
                 views: Views) -> None:
        self.pool = pool
        self.catalog = catalog
        self.masking = masking
        self.views = views
        self.mountpoint = masking.mountpoint
        # snapshot id -> the exposure names it had before its current one (this run): a
        # loop device or a process that opened MOUNT/exposed/<old>.img keeps reading the
        # snapshot after a rename, and the kernel still reports it by that old name
        self._former_names: dict[str, set[str]] = {}
        self._unmounting = trio.Lock()   # see unmount

    def forget_names(self, snapshot_id: str) -> None:
        """The snapshot is gone (deleted, split): its former names with it."""
        self._former_names.pop(snapshot_id, None)

    def renamed(self, snapshot_id: str, old: str | None) -> None:
        """The snapshot no longer has the exposure name ``old``: remember it for the
        in-use checks (see _former_names and snapshot_users)."""
        if old is not None:
            self._former_names.setdefault(snapshot_id, set()).add(old)

    def forget_mount(self, snapshot_id: str) -> None:
        self.catalog.delete_mount(snapshot_id)   # the cache follows the committed delete

    async def unmount(self, snapshot_id: str) -> None:
        # One unmount at a time: two requests unmounting one snapshot (two deletes with
        # unexpose, an unexpose and a delete) would both find its record, and the second
        # umount fail with "not mounted"; the second now finds no record and is done.
        async with self._unmounting:
            m = self.catalog.mounted.get(snapshot_id)
            if m is None:
                return
            try:
                await in_thread(loopdev.unexpose_mount,
                                 loopdev.ExposeRecord(m.dev, m.mountpoint, m.fstype),
                                 f"/.shadow/{snapshot_id}.img")
            except loopdev.LoopError as e:
                if await in_thread(loopdev.is_mountpoint, m.mountpoint):
                    raise VssError("VSS_E_VOLUME_IN_USE", f"snapshot {snapshot_id} is mounted "
                                   f"at {m.mountpoint} and could not be unmounted ({e}); stop "
                                   "using it first") from None
                raise
            self.forget_mount(snapshot_id)

    async def snapshot_users(self, snaps: Sequence[SnapshotInfo], exposed_only: bool = False,
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
        change of names drops the kernel's entry, see LunMasking.names_changed): a snapshot that
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
        counts = self.masking.counts_handles()
        former: dict[str, list[str]] = {}   # b"<earlier name>.img" -> snapshot ids
        if not exposed_only:
            for s in snaps:
                if counts and not self.masking.open_handles(s.id):
                    continue   # nothing has it open: no earlier name of it is in use
                for old in self._former_names.get(s.id, ()):
                    former.setdefault(f"{old}.img", []).append(s.id)

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

        own = {m.dev: (sid, m.mountpoint) for sid, m in self.catalog.mounted.items()
               if sid in by_dev.values()} if own_mounts else {}

        def scan() -> tuple[list[tuple[str, str]], dict[str, int]]:
            found = loopdev.users_by_path(classify, own)
            mine: dict[str, int] = {}   # FUSE handles our own loop devices hold
            for dev, (sid, _) in own.items():
                back = loopdev.backing_file(dev)
                if back is not None and classify(back) == sid:
                    mine[sid] = mine.get(sid, 0) + 1
            return found, mine

        found, mine = await in_thread(scan)
        users: dict[str, list[str]] = {}
        for sid, what in found:
            users.setdefault(sid, []).append(what)
        if exposed_only or not counts:
            return users
        deadline = trio.current_time() + wait
        while True:
            unnamed = {s.id: n for s in snaps if s.id not in users
                       and (n := self.masking.open_handles(s.id) - mine.get(s.id, 0)) > 0}
            if not unnamed or trio.current_time() >= deadline:
                break
            await trio.sleep(0.05)
        for sid, n in unnamed.items():
            users[sid] = [f"{n} open file(s) through the mount not found by path (a process "
                          "in another mount namespace, a path bind-mounted elsewhere)"]
        return users

    @staticmethod
    def in_use_message(users: dict[str, list[str]], what: str) -> str:
        """One line: the first snapshot in use, who uses it, what to do."""
        sid, us = next(iter(users.items()))
        more = f" (and {len(users) - 1} more snapshot(s) in use)" if len(users) > 1 else ""
        return (f"cannot {what} snapshot {sid}: in use by {'; '.join(us)}{more}; unmount "
                "and detach its loop devices (umount, losetup -d) and end the processes "
                "using it, then retry")


    async def expose(self, snapshot_id: str, name: str | None,
                      mount: str | None) -> dict[str, Any]:
        s = self.views.committed(snapshot_id)
        if name is None and mount is None:
            raise VssError("E_INVALIDARG", "expose needs a name (MOUNT/exposed/<name>.img) or a "
                           "mount directory, or both")
        if mount is not None:
            if not isinstance(mount, str) or not os.path.isabs(mount):
                raise VssError("E_INVALIDARG", f"mount directory {mount!r} must be an absolute "
                               "path")
            if not mount.isprintable():   # NUL, line breaks, control characters
                raise VssError("E_INVALIDARG", f"mount directory {mount!r} holds control "
                               "characters; use a directory name without them")
            if s.id in self.catalog.mounted:
                raise VssError("VSS_E_OBJECT_ALREADY_EXISTS", f"snapshot {s.id} is already mounted "
                               f"at {self.catalog.mounted[s.id].mountpoint}")
            if self.masking.device_path(s.id) is None:
                raise VssError("VSS_E_NOT_SUPPORTED", "the pool is not mounted: cannot attach a "
                               "loop device to the snapshot")
        old_name = s.exposed_name
        if name is not None and name != old_name:
            s = await in_thread(self.pool.set_exposed, s.id, name)
            self.renamed(s.id, old_name)
        if mount is not None:
            dev_path = self.masking.device_path(s.id)
            assert dev_path is not None
            try:
                # isolated: the target is checked by a child process (resolving it may
                # be a request to our own mount), the image never stat'ed here
                rec = await in_thread(loopdev.expose_mount, dev_path, mount,
                                       [r for r in (self.pool.path, self.mountpoint) if r],
                                       True)
            except BaseException as e:
                # deleted meanwhile (its session ended), or presented to another host
                # only (an import): losetup found no image at dev_path
                if not self.views.is_snapshot(s.id):
                    raise VssError("VSS_E_OBJECT_NOT_FOUND", f"snapshot {s.id} was deleted "
                                   "while it was being mounted") from e
                if name is not None and name != old_name:
                    with trio.CancelScope(shield=True):
                        await in_thread(self.pool.set_exposed, s.id, old_name)
                        self.renamed(s.id, name)
                        await self.masking.names_changed()   # the name it had for a moment
                if isinstance(e, loopdev.LoopError) and self.masking.device_path(s.id) != dev_path:
                    raise VssError("VSS_E_OBJECT_NOT_FOUND", f"snapshot {s.id} was presented "
                                   "to another host while it was being mounted") from e
                raise
            if not self.views.is_snapshot(s.id):   # deleted meanwhile (its session ended)
                with trio.CancelScope(shield=True):
                    await in_thread(loopdev.unexpose_mount, rec)
                raise VssError("VSS_E_OBJECT_NOT_FOUND", f"snapshot {s.id} was deleted while "
                               "it was being mounted")
            m = MountRecord(s.id, rec.mountpoint, rec.dev, rec.fstype)
            self.catalog.put_mount(m)
        audit.audit("snapshot.expose", id=s.id, volume=s.volume,
                    **({"name": name} if name else {}), **({"mount": mount} if mount else {}))
        if name is not None and name != old_name:
            await self.masking.names_changed()
        return self.views.prop_json(self.pool.snapshot(s.id))

    async def unexpose(self, snapshot_id: str) -> dict[str, Any]:
        s = self.views.committed(snapshot_id)
        if s.exposed_name is None and s.id not in self.catalog.mounted:
            raise VssError("VSS_E_BAD_STATE", f"snapshot {s.id} is not exposed")
        if s.exposed_name is not None:
            # the name goes away: a loop device or a process on MOUNT/exposed/<name>.img
            # (in any host's view) refuses it. (One on the device path, .shadow/<id>.img,
            # does not: unexpose leaves that path and the snapshot as they are.)
            users = await self.snapshot_users([s], exposed_only=True)
            if users:
                raise VssError("VSS_E_VOLUME_IN_USE", self.in_use_message(users, "unexpose"))
        await self.unmount(s.id)
        if s.exposed_name is not None:
            await in_thread(self.pool.set_exposed, s.id, None)
            self.renamed(s.id, s.exposed_name)
            await self.masking.names_changed()
        audit.audit("snapshot.unexpose", id=s.id, volume=s.volume)
        return self.views.prop_json(self.pool.snapshot(s.id))

    async def users_of(self, snapshot_id: str) -> dict[str, list[str]]:
        """snapshot_users of one snapshot as it is now (its exposure may have been
        renamed meanwhile)."""
        return await self.snapshot_users([self.pool.snapshot(snapshot_id)], wait=1.0)
