"""Test hosts as network namespaces joined by veth pairs (DESIGN.md, "Backends and
hosts"): every address lives inside namespaces the test created, nothing reaches any
other network, and the namespaces (with their veth ends) are deleted afterwards, also
when the test fails.

    with hosts("array", "hostB", "hostC") as net:
        net.addr["array"]                 # 10.X.Y.1 ...
        net.run("hostB", "nbdinfo", ...)  # a command with hostB's network only
        net.popen("array", argv)          # a daemon inside the array's namespace

A host's commands run through `nsenter --net=/run/netns/NAME`: only the network
namespace changes, so FUSE mounts and files stay shared with the test (`ip netns exec`
would also give each command a mount namespace of its own). The hosts hang off one
bridge in a namespace of its own ("switch"), each with one veth pair.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class Hosts:
    def __init__(self, names: tuple[str, ...]) -> None:
        tag = secrets.token_hex(3)
        self.tag = tag
        self.ns = {n: f"spx-{tag}-{i}" for i, n in enumerate(names)}
        self.switch = f"spx-{tag}-sw"
        subnet = 10 + secrets.randbelow(200)
        self.addr = {n: f"10.{subnet}.{int(tag[:2], 16)}.{i + 1}"
                     for i, n in enumerate(names)}
        self.created: list[str] = []

    def setup(self) -> None:
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.ns.items()):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # both ends are created inside the host's namespace, then one end moves to
            # the switch: no interface ever appears in the test's own namespace
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", ns, "link", "set", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def teardown(self) -> None:
        for ns in reversed(self.created):   # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10,
                           check=False)
        self.created.clear()

    def argv(self, host: str, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns[host]}", "--", *argv]

    def run(self, host: str, *argv: str, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(host, *argv), capture_output=True, text=True,
                              timeout=timeout, check=check)


@contextlib.contextmanager
def hosts(*names: str) -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        if os.environ.get("SHADOWPLEX_REQUIRE_KERNEL") == "1":
            pytest.fail("network namespaces need root, ip (iproute2) and nsenter")
        pytest.skip("network namespaces need root, ip (iproute2) and nsenter")
    h = Hosts(names)
    try:
        h.setup()
        yield h
    finally:
        h.teardown()


def leftover_namespaces() -> list[str]:
    """Namespaces a test of ours left (the leak guard's question)."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith("spx-"))
    except FileNotFoundError:
        return []
