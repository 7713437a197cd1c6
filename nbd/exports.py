"""What one host may see and open on the NBD port: its exports, as LUN masking says.

Export names are the mount's paths without `.img` (docs/network.md):

    volumes/<name>         a volume presented to the host: read-write (unless the
                           volume is read-only)
    exposed/<name>         an exposed snapshot presented to the host: read-only
    .shadow/<snapshot-id>  any snapshot presented to the host: read-only and, like the
                           mount's .shadow/, not listed (opened by its id)

A host sees exactly what MOUNT/hosts/<host>/ shows on the array (fuse_mount/view.py
builds that tree from the same Presentation): another host's LUNs are not listed and
cannot be opened. Pure and synchronous: the server asks it at every LIST and GO, so a
presentation change applies to the next connection at once (open connections keep the
LUN they opened, as an open file of the mount does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from blockstore.model import COMMITTED, INVALID
from fuse_mount.lunstore import LunStore
from fuse_mount.presentation import Presentation

VOLUMES, EXPOSED, SHADOW = "volumes/", "exposed/", ".shadow/"


class NbdStore(LunStore, Protocol):
    """The array as the NBD server uses it: the mount's LunStore plus the allocation
    map (BLOCK_STATUS base:allocation) and the changed-block map (qemu:dirty-bitmap,
    issue 17). blockstore.Pool implements it."""

    def allocation(self, key: str, offset: int, length: int) -> list[tuple[int, int]]: ...

    def changed_extents(self, from_id: str, to_id: str | None = None
                        ) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class Export:
    name: str          # the export name a client asks for
    key: str           # the LUN key: a volume name or a snapshot id
    snapshot: bool
    read_only: bool
    listed: bool       # in NBD_OPT_LIST (.shadow/ exports are not)
    description: str
    naa: str           # the LUN's identity: a connection stays bound to it


def exports_for(store: LunStore, presentation: Presentation, host: str
                ) -> dict[str, Export]:
    """Every export `host` may open, by name."""
    out: dict[str, Export] = {}
    for v in store.list_volumes():
        if host in presentation.hosts_of(v.name):
            name = VOLUMES + v.name
            out[name] = Export(name, v.name, False, bool(v.read_only), True,
                               f"volume {v.name} (naa {v.naa})", v.naa)
    for s in store.list_snapshots():
        if s.state not in (COMMITTED, INVALID) or host not in presentation.hosts_of(s.id):
            continue
        what = f"snapshot {s.id} of {s.volume} (naa {s.naa})"
        out[SHADOW + s.id] = Export(SHADOW + s.id, s.id, True, True, False, what, s.naa)
        if s.exposed_name:
            name = EXPOSED + s.exposed_name
            out[name] = Export(name, s.id, True, True, True, what, s.naa)
    return out
