"""A host daemon applies the array's listings in the order the array made them (review
of 2026-12-06): the watch thread, the allocation fetcher and an operation's refresh get
them on different connections, and an older one applied last took the host's tree back
(a volume created by another host vanished until the next watch). Pure logic: the
listing's (boot_id, seq), as provider/array_service.py numbers them."""

from __future__ import annotations

import threading
from typing import Any

from provider.remote_array import RemoteArray


def _host() -> RemoteArray:
    h = RemoteArray.__new__(RemoteArray)   # no array: only what _apply keeps
    h._applying = threading.Lock()
    h._listed = (None, None)
    h._token, h._generation = None, 0
    h._volumes, h._snapshots = {}, {}
    return h


def _listing(token: str, seq: int | None, boot: str = "b1", free: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"volumes": [], "snapshots": [], "space_total": 100,
                           "space_free": free, "token": token, "allocated": {}}
    if seq is not None:
        out.update(seq=seq, boot_id=boot)
    return out


def test_an_older_listing_never_takes_the_tree_back() -> None:
    h = _host()
    h._apply(_listing("T2", 2, free=2))
    h._apply(_listing("T1", 1, free=1))          # made before T2, received after it
    assert (h._token, h._generation, h._space) == ("T2", 1, (100, 2))
    h._apply(_listing("T2", 2, free=3))          # the same listing again: nothing new
    assert h._space == (100, 2)
    h._apply(_listing("T3", 3, free=3))
    assert (h._token, h._generation) == ("T3", 2)


def test_a_restarted_array_and_an_older_array_are_followed() -> None:
    h = _host()
    h._apply(_listing("T5", 5))
    h._apply(_listing("R1", 1, boot="b2"))       # the array daemon restarted: its count too
    assert (h._token, h._generation) == ("R1", 2)
    h._apply(_listing("OLD", None))              # an array that does not number them
    assert h._token == "OLD"
