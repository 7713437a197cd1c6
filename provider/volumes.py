"""Volumes: create, resize, present (LUN masking), delete, and the checks that refuse
to change a volume in use: marked by the coordinator (a set being created, a revert), a
loop device on any of its paths, a process holding its image open.

State: none of its own. The volumes are the block store's, their presentation the
catalog's (through provider/masking.py), the marks the coordinator's (``marks``, read
only here: Coordinator owns every mark). Trio thread; the block store and the /proc and
/sys scans run in worker threads, and nothing here stats a path under our own mount.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from blockstore import errors as bse
from fuse_mount import loopdev

from . import audit, documents
from .array import Array
from .masking import LunMasking
from .model import Mark, Revert, in_thread, parse_size
from .views import Views
from .vss import VssError

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split
OPEN_RELEASE_WAIT = 0.5   # s: a volume closed just before its delete is not "open"


class Volumes:
    def __init__(self, pool: Array, masking: LunMasking, views: Views,
                 marks: dict[str, Mark]) -> None:
        self.pool = pool
        self.masking = masking
        self.views = views
        self._marks = marks   # the coordinator's volume marks (read only)
        # resizes one at a time: a relative one (+1G) reads the size and grows it as
        # one step, two at once both grow it
        self._resizing = trio.Lock()

    def check_unmarked(self, volume: str, what: str) -> None:
        mark = self._marks.get(volume)
        if mark is not None:
            name = ("VSS_E_REVERT_IN_PROGRESS" if isinstance(mark, Revert)
                    else "VSS_E_SNAPSHOT_SET_IN_PROGRESS")
            raise VssError(name, f"cannot {what} volume {volume}: it is in use by {mark}")

    def attached(self, volume: str) -> list[str]:
        """The loop devices on the volume: on its pool file or on one of its paths under
        our mount (compared as text: no stat there). A worker thread's (/sys scans)."""
        path = self.pool.image_path(volume)
        users = loopdev.loops_backed_by(path) if path else []
        for vpath in self.masking.volume_paths(volume):   # under our own mount: no stat
            users += loopdev.loops_backed_by(vpath, lexical=True)
        return sorted(set(users))

    @staticmethod
    def where_attached(devices: Sequence[str]) -> str:
        """'/dev/loop3 (mounted at /mnt/db), /dev/loop4': the devices and where their
        filesystems are mounted (/proc/self/mountinfo, as text)."""
        mounts = loopdev.mountinfo()
        out = []
        for dev in devices:
            at = [mp for mp, _, src in mounts if src == dev]
            out.append(f"{dev} (mounted at {', '.join(at)})" if at else dev)
        return ", ".join(out)

    def check_not_attached(self, volume: str, what: str) -> None:
        users = self.attached(volume)
        if users:
            # no `volume delete --force`: like lvremove of an open LV, deleting a volume
            # in use is refused (its users would get I/O errors); revert has --force
            hint = " (or revert --force)" if what == "revert" else ""
            raise VssError("VSS_E_VOLUME_IN_USE", f"cannot {what} volume {volume}: loop "
                           f"device(s) {', '.join(sorted(set(users)))} use it; unmount the "
                           f"filesystems on them and detach them (losetup -d) first{hint}")

    async def check_not_open(self, volume: str) -> None:
        """Refuse to delete a volume whose image a process has open (or mapped), as
        lvremove refuses an open LV: the daemon's own count of FUSE handles, the
        processes named from /proc as text (no look at the path). A close reaches the
        daemon as an asynchronous release: wait for it a moment."""
        if not self.masking.counts_handles():
            return
        with trio.move_on_after(OPEN_RELEASE_WAIT):
            while self.masking.open_handles(volume):
                await trio.sleep(0.02)
        n = self.masking.open_handles(volume)
        if n:
            paths = self.masking.volume_paths(volume)
            path = (paths or [f"MOUNT/volumes/{volume}.img"])[0]

            def classify(p: str) -> str | None:   # as text: no request to our mount
                return volume if p.removesuffix(loopdev.DELETED) in paths else None
            who = [w for _, w in await in_thread(loopdev.users_by_path, classify)]
            if who:
                raise VssError("VSS_E_VOLUME_IN_USE", f"cannot delete volume {volume}: it is "
                               f"open (by {'; '.join(who)}); close it first")
            raise VssError("VSS_E_VOLUME_IN_USE", f"cannot delete volume {volume}: it is open "
                           f"({n} file handle(s) on {path}, not found by path: a process in "
                           f"another mount namespace?); close it first (fuser -v {path})")

    async def create(self, name: str, size: int | str) -> dict[str, Any]:
        v = await in_thread(self.pool.create_volume, name, parse_size(size))
        audit.audit("volume.create", name=v.name, size=v.size)
        return self.views.volume_json(v)

    async def resize(self, name: str, size: int | str) -> dict[str, Any]:
        """Grow a volume to ``size``, or by it: "+1G" (as lvextend -L +1G); "-1G", like
        a smaller size, is refused by the store (no shrinking: it would destroy data)."""
        self.check_unmarked(name, "resize")
        async with self._resizing:
            was = self.pool.volume(name).size
            text = size.strip() if isinstance(size, str) else ""
            if text[:1] in ("+", "-"):
                delta = parse_size(text[1:].lstrip())
                new_size = was + delta if text[0] == "+" else was - delta
            else:
                new_size = parse_size(size)
            v = await in_thread(self.pool.resize_volume, name, new_size)
        audit.audit("volume.resize", name=v.name, size=v.size, was=was)
        # the kernel caches the size (1 s): `losetup -c` right after must see the new one
        await self.masking.invalidate(name, attr_only=True)
        return self.views.volume_json(v)

    async def present(self, name: str, hosts: Sequence[str]) -> dict[str, Any]:
        """LUN masking of a volume: present it to exactly ``hosts``. The daemon's own
        host is the root of the mount (MOUNT/volumes/); another host sees it at
        MOUNT/hosts/<host>/volumes/<name>.img. Open files and loop devices keep working
        (one LUN, one inode); only the names change."""
        vol = self.views.resolve_volume(name)
        if isinstance(hosts, str) or not isinstance(hosts, list | tuple) or not hosts:
            raise VssError("E_INVALIDARG", f"volume {vol}: name at least one host to present "
                           f"it to (the daemon's own host, {self.masking.service_machine}, is the "
                           "mount's root)")
        for h in hosts:
            if not isinstance(h, str) or not documents.valid_host(h):
                raise VssError("E_INVALIDARG", f"host name {h!r} is not valid (letters, "
                               "digits, '-', '_' in dot-separated labels, at most 253 "
                               "characters)")
        on_lun = getattr(self.pool, "present_volume", None)
        if on_lun is not None:
            # the backend keeps the masking on the LUN (Ceph: each host's daemon serves
            # what the image presents to it; no MOUNT/hosts/ view here)
            before = frozenset(self.pool.presented_to(vol))  # type: ignore[attr-defined]
            await in_thread(on_lun, vol, list(hosts))
            after = frozenset(hosts)
        else:
            before = self.masking.hosts_of(vol)
            self.masking.present([vol], hosts)
            after = self.masking.hosts_of(vol)
        if after != before:
            audit.audit("volume.present", name=vol, hosts=sorted(after), was=sorted(before))
            await self.masking.names_changed()   # LUN masking: no cached name may still open it
        try:
            return self.views.volume_json(self.pool.volume(vol))
        except bse.NotFound:   # presented away from this host (Ceph): not seen here now
            return {"name": vol, "presented_to": sorted(after)}

    async def delete(self, name: str) -> None:
        self.pool.volume(name)
        self.check_unmarked(name, "delete")
        await in_thread(self.check_not_attached, name, "delete")
        await self.check_not_open(name)
        await in_thread(self.pool.delete_volume, name)
        audit.audit("volume.delete", name=name)
        self.masking.present([name], None)
        # the kernel forgets the name before we reply, not in up to 1 s (a stat still
        # found it; an open, or a loop attach after `volume create` of the same name,
        # reached the deleted LUN: ENOENT)
        await self.masking.names_changed()
