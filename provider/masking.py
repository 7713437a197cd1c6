"""LUN masking: which host sees which LUN, and where under the mount it sees it.

A LUN (volume name or snapshot id) is presented to a set of hosts. The daemon's own host
(``service_machine``) sees its LUNs at the root of the mount (MOUNT/volumes/,
MOUNT/.shadow/, MOUNT/exposed/); another host at MOUNT/hosts/<host>/. No row in the
catalog's presentation table: the daemon's own host only.

State: the presentation table is the catalog's (ProviderCatalog.presented, its
write-through cache, see provider/catalog.py); LunMasking writes it through present(),
transport.py through the catalog's import methods and reconcile.py through
set_presentation; LunMasking reads the coordinator's sessions (their hosts are the
known hosts) and holds the mount. The trio thread changes the masking; the path and
host lookups (hosts_of, volume_paths) are also called from worker threads (the in-use
checks), which only read.

The FUSE view learns the masking through the mount (fuse_mount.presentation.LiveMount,
the live ShadowOperations the daemon hands the services): push() replaces its
Presentation (local host, presented, known hosts) in one step, and the view rebuilds
its tree. The same mount is asked for its open file handles (the in-use checks), to drop
the kernel's cached names (names_changed) and pages (invalidate). Without a mount
(in-process tests) these do nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fuse_mount.presentation import LiveMount

from .catalog import ProviderCatalog

if TYPE_CHECKING:
    from .hardware import HardwareProvider
    from .model import Session

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


class LunMasking:
    def __init__(self, catalog: ProviderCatalog, mount: LiveMount | None,
                 service_machine: str, mountpoint: str | None, hardware: HardwareProvider,
                 sessions: dict[int, Session]) -> None:
        self.catalog = catalog
        # the FUSE mount serving the LUNs (None: no mount, e.g. in-process tests)
        self.mount = mount
        self.service_machine = service_machine
        self.mountpoint = mountpoint
        self.hardware = hardware
        self._sessions = sessions   # the coordinator's, read only: the known hosts

    @property
    def _presented(self) -> dict[str, frozenset[str]]:
        """The presentation table (the catalog's cache): LUN -> hosts, no entry for a
        LUN the daemon's host only sees."""
        return self.catalog.presented

    def push(self) -> None:
        """Tell the mount which host sees which LUN (it rebuilds its tree at once)."""
        if self.mount is None:
            return
        self.mount.presentation.update(self.service_machine, self._presented,
                                       {x.host for x in self._sessions.values()})

    def hosts_of(self, lun: str) -> frozenset[str]:
        """The hosts a LUN (volume name or snapshot id) is presented to."""
        return self._presented.get(lun) or frozenset((self.service_machine,))

    def present(self, luns: Iterable[str], hosts: Iterable[str] | None) -> None:
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
                changed = True
        finally:
            if changed:
                self.push()

    # ------------------------------------------------------------------ paths
    def view_root(self, host: str | None, lun: str) -> str | None:
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
        root = self.view_root(host, snapshot_id)
        return None if root is None else os.path.join(root, ".shadow", f"{snapshot_id}.img")

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

    def shown_path(self, name: str) -> str | None:
        """The volume's path in a view it is presented to (the local one first)."""
        hosts = self.hosts_of(name)
        return self.volume_path(name, None if self.service_machine in hosts else min(hosts))

    # ------------------------------------------------------------------ the kernel's caches
    async def invalidate(self, lun: str, attr_only: bool = False) -> None:
        """Drop the kernel's cache (pages and attributes, or attributes only) of a LUN
        whose content or size changed without a write through FUSE; returns once the
        kernel has. Never raises: a failure is logged (the LUN is right; what the kernel
        serves from its cache may not be)."""
        if self.mount is None:
            return
        try:
            await self.mount.invalidate_lun(lun, attr_only)
        except Exception as e:   # noqa: BLE001 - never raises (docstring); logged
            log.error("could not drop the kernel's cache of %s (%s): buffered reads may "
                      "return its old content until the file is no longer cached", lun, e)

    async def names_changed(self) -> None:
        """A name under the mount vanished or names another LUN now (expose, unexpose,
        split, volume and snapshot delete, present, import): the kernel forgets its
        cached entry before we report success (else, within its 1 s entry timeout, a
        lookup still finds the old LUN: a stat succeeds, an open reaches it)."""
        if self.mount is None:
            return
        try:
            await self.mount.refresh_now()
        except Exception as e:   # noqa: BLE001 - never raises (docstring); logged
            log.error("could not drop the kernel's cached names (%s): a name may lead to "
                      "its old LUN for up to a second", e)

    def counts_handles(self) -> bool:
        """Whether open file handles are counted (there is a mount)."""
        return self.mount is not None

    def open_handles(self, lun: str) -> int:
        """The FUSE file handles open on a LUN (0 without a mount)."""
        return self.mount.open_handles(lun) if self.mount is not None else 0
