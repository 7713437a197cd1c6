"""Hosts as network namespaces joined by veth (DESIGN.md, "Backends and hosts"): the
tests' hosts (tests/netns.py) and the NBD benchmark's server and client
(tools/bench/nbd.py). Every address lives inside namespaces made here, nothing reaches
any other network, and `teardown` deletes them (with their veth ends).

    h = Hosts(("array", "hostB"))      # Hosts(..., prefix="spxb-", switch=False)
    h.setup()
    try:
        h.addr["array"]                # 10.X.Y.1 ...
        h.run("hostB", "nbdinfo", ...) # a command with hostB's network only
        h.argv("array", *argv)         # the same argv for Popen (a daemon)
    finally:
        h.teardown()

A host's commands run through `nsenter --net=/run/netns/NAME`: only the network
namespace changes, so FUSE mounts and files stay shared with the caller (`ip netns
exec` would also give each command a mount namespace of its own, and a FUSE mount made
there would be invisible outside). By default the hosts hang off one bridge in a
namespace of its own ("switch"), each with one veth pair; `switch=False` joins exactly
two hosts by one veth pair and nothing else (the benchmark: no bridge in the path).
"""

from __future__ import annotations

import os
import secrets
import subprocess

# the tests' prefix: their session guard (tests/conftest.py) deletes leftover spx-*
# namespaces, so anything else (the benchmark) must use another one
TEST_PREFIX = "spx-"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class Hosts:
    def __init__(self, names: tuple[str, ...], prefix: str = TEST_PREFIX,
                 switch: bool = True) -> None:
        if not switch and len(names) != 2:
            raise ValueError("switch=False joins exactly two hosts")
        tag = secrets.token_hex(3)
        self.tag = tag
        self.use_switch = switch
        self.ns = {n: f"{prefix}{tag}-{i}" for i, n in enumerate(names)}
        self.switch = f"{prefix}{tag}-sw"
        subnet = 10 + secrets.randbelow(200)
        self.addr = {n: f"10.{subnet}.{int(tag[:2], 16)}.{i + 1}"
                     for i, n in enumerate(names)}
        self.created: list[str] = []

    def setup(self) -> None:
        if not self.use_switch:
            self._pair()
            return
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.ns.items()):
            self._add(ns)
            # both ends are created inside the host's namespace, then one end moves to
            # the switch: no interface ever appears in the caller's own namespace
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", ns, "link", "set", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            self._up(name)

    def _pair(self) -> None:
        (a, na), (b, nb) = self.ns.items()
        self._add(na)
        self._add(nb)
        _ip("-n", na, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        _ip("-n", na, "link", "set", "peer0", "netns", nb)
        _ip("-n", nb, "link", "set", "peer0", "name", "eth0")
        self._up(a)
        self._up(b)

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _up(self, name: str) -> None:
        ns = self.ns[name]
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


def leftover_namespaces(prefix: str = TEST_PREFIX) -> list[str]:
    """Namespaces with that prefix still there (the tests' leak guard's question)."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))
    except FileNotFoundError:
        return []
