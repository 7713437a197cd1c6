"""LUN masking as one typed object, and what the control plane asks of the live mount.

`Presentation` says which host sees which LUN. The daemon creates one and hands it to
both sides: the FUSE operations READ it (view.py builds the root from `local_host`'s
view and MOUNT/hosts/<host>/ for every other host) and subscribe to it; the coordinator
WRITES it, with `update()`, which replaces the whole state in one step and then calls
the subscribers (the operations' refresh(): the tree is rebuilt, vanished names are
invalidated in the kernel). No reader ever sees a half-applied change.

`LiveMount` is the rest of what the coordinator needs from the mount that serves the
LUNs (ShadowOperations implements it): open handle counts (delete refusals, the in-use
checks), dropping the kernel's caches of a LUN changed behind the data path (revert,
resize) and of names that vanished (expose, unexpose, delete...).

Pure: no pyfuse3, no trio; unit-tested in tests/test_fuse_view.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol


class Presentation:
    """Which hosts each LUN (volume name or snapshot id) is presented to.

    A LUN not in ``presented`` is presented to ``local_host`` only. ``known_hosts`` are
    hosts that get a (possibly empty) MOUNT/hosts/<host>/ view even when nothing is
    presented to them (a requester session from there is open).
    """

    def __init__(self, local_host: str | None = None) -> None:
        self.local_host: str = local_host if local_host is not None else socket.gethostname()
        self.presented: Mapping[str, frozenset[str]] = {}
        self.known_hosts: frozenset[str] = frozenset()
        self._listeners: list[Callable[[], None]] = []

    def hosts_of(self, key: str) -> frozenset[str]:
        """The hosts a LUN is presented to."""
        return self.presented.get(key) or frozenset((self.local_host,))

    def other_hosts(self) -> list[str]:
        """Every host but the local one that gets a view, sorted."""
        others = set(self.known_hosts)
        for hs in self.presented.values():
            others |= hs
        others.discard(self.local_host)
        return sorted(others)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every update()."""
        self._listeners.append(listener)

    def update(self, local_host: str, presented: Mapping[str, frozenset[str]],
               known_hosts: Iterable[str]) -> None:
        """Replace the whole state (copies are taken), then notify the subscribers. A
        subscriber's exception propagates (the state stays replaced: the caller, which
        rolls back by updating again, must know the mount did not follow)."""
        self.local_host = local_host
        self.presented = dict(presented)
        self.known_hosts = frozenset(known_hosts)
        for listener in list(self._listeners):
            listener()


class LiveMount(Protocol):
    """What the control plane asks of the mount serving the LUNs (ShadowOperations).

    The coroutines must run on the mount's trio loop, never from a FUSE handler."""

    @property
    def presentation(self) -> Presentation: ...

    def open_handles(self, key: str | None = None) -> int:
        """FUSE file handles open (on one LUN, if key is given)."""
        ...

    async def refresh_now(self) -> None:
        """Rebuild the tree; returns once the kernel forgot names that vanished."""
        ...

    async def invalidate_lun(self, key: str, attr_only: bool = False) -> None:
        """Drop the kernel's cached pages and attributes (or attributes only) of a LUN."""
        ...
