"""Test hosts as network namespaces joined by veth pairs (DESIGN.md, "Backends and
hosts"); the namespaces themselves are tools/netns.py's Hosts (shared with the NBD
benchmark), named spx-* (the session guard in conftest.py deletes leftovers and fails).

    with hosts("array", "hostB", "hostC") as net:
        net.addr["array"]                 # 10.X.Y.1 ...
        net.run("hostB", "nbdinfo", ...)  # a command with hostB's network only
        net.argv("hostB", *argv)          # the same for Popen (nbdfuse, a daemon)

A host's commands run through `nsenter --net=/run/netns/NAME`: only the network
namespace changes, so FUSE mounts and files stay shared with the test (`ip netns exec`
would also give each command a mount namespace of its own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

from tools.netns import Hosts, leftover_namespaces

__all__ = ["Hosts", "hosts", "leftover_namespaces"]


@contextlib.contextmanager
def hosts(*names: str) -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        if os.environ.get("SHADOWPLEX_REQUIRE_KERNEL") == "1":
            pytest.fail("network namespaces need root, ip (iproute2) and nsenter")
        pytest.skip("network namespaces need root, ip (iproute2) and nsenter")
    # this session's prefix (conftest.py's NS_PREFIX: its guard deletes only those)
    h = Hosts(names, prefix=os.environ.get("SHADOWPLEX_TEST_NS_PREFIX", "spx-"))
    try:
        h.setup()
        yield h
    finally:
        h.teardown()
