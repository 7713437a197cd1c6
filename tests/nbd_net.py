"""The array on the network for the NBD tests between machines (tests/test_nbd_tls.py,
tests/test_nbd_hosts.py): `serve` with the NBD and control ports open over TLS in the
namespace "array", client hosts hostB and hostC in namespaces of their own
(tests/netns.py), certificates from `shadowplex pki`. conftest.py's `tls_array`
fixture is `tls_net` below; client tools that mount things (nbdfuse) are in
`nbdfuse_file`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, start_daemon
from netns import Hosts, hosts
from support import ROOT, spx

from blockstore import Pool
from fuse_mount import loopdev

MiB = 1 << 20


@dataclass
class Net:
    d: Daemon
    net: Hosts
    port: int
    pki: Path                      # the array's directory (CA + server)
    clients: dict[str, Path]       # host -> its client directory
    control_port: int

    def cli(self, host: str, *args: str, certs: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        """`shadowplex --array ADDR:PORT --tls-dir DIR args...` run on `host`."""
        return self.net.run(host, "env", f"PYTHONPATH={ROOT}", sys.executable, "-m",
                            "tools.cli", "--array",
                            f"{self.net.addr['array']}:{self.control_port}", "--tls-dir",
                            str(certs or self.clients[host]), *args, timeout=60)

    def uri(self, export: str = "", tls: bool = True) -> str:
        scheme = "nbds" if tls else "nbd"
        return f"{scheme}://{self.net.addr['array']}:{self.port}/{export}"

    def tls_uri(self, host: str, export: str) -> str:
        """The nbds:// URI of `export` with `host`'s certificates (libnbd takes the
        directory in the URI's tls-certificates query; nbdinfo 1.14 has no option)."""
        return f"{self.uri(export)}?tls-certificates={self.clients[host]}"

    def nbdinfo(self, host: str, *args: str, export: str = "", certs: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
        """nbdinfo ARGS URI on `host` with its certificates."""
        cert_dir = certs if certs is not None else self.clients[host]
        return self.net.run(host, "nbdinfo", *args,
                            f"{self.uri(export)}?tls-certificates={cert_dir}", timeout=30)


def daemon_port(d: Daemon, what: str) -> int:
    """The port the daemon opened for `what` ("NBD", "control"): it was asked for 0."""
    for _ in range(200):
        m = re.search(rf"{what} port open on [0-9.]+:(\d+)", d.log_text())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no '{what} port open' line:\n{d.log_text()}")


def pki(*args: str) -> None:
    res = spx("pki", *args)
    assert res.returncode == 0, (args, res.stdout, res.stderr)


@contextlib.contextmanager
def tls_net(tmp_path: Path, sockdir: str) -> Iterator[Net]:
    """The array (volume db, 16 MiB, 2 MiB of data at 0, presented to hostB; volume logs,
    8 MiB, the array's own) with NBD and control over TLS; hostB and hostC have client
    certificates. Stopped and the namespaces deleted however the test ends."""
    require_kernel()
    for tool in ("nbdinfo", "nbdcopy", "qemu-img", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup installs it)")
    pki_dir = tmp_path / "pki"
    with hosts("array", "hostB", "hostC") as net:
        pki("init", str(pki_dir), "--server-name", net.addr["array"])
        clients = {}
        for h in ("hostB", "hostC"):
            clients[h] = tmp_path / f"client-{h}"
            pki("host", h, str(clients[h]), "--ca", str(pki_dir))
        pool = Pool.create(str(tmp_path / "pool"))
        pool.create_volume("db", 16 * MiB)
        pool.write("db", 0, os.urandom(2 * MiB))
        pool.create_volume("logs", 8 * MiB)
        pool.close()
        d = start_daemon(tmp_path, sockdir, {}, config={
            "nbd_listen": f"{net.addr['array']}:0", "tls_dir": str(pki_dir),
            "control_listen": f"{net.addr['array']}:0"}, netns=net.ns["array"])
        try:
            d.ok("volume", "present", "db", "--to", "hostB")
            yield Net(d, net, daemon_port(d, "NBD"), pki_dir, clients,
                      daemon_port(d, "control"))
        finally:
            d.stop()


def _fuse_unmount(path: Path) -> None:
    if loopdev.mounted_at(path):
        loopdev.unmount_ladder(path, loopdev.FUSE_UNMOUNT)


@contextlib.contextmanager
def nbdfuse_file(t: Net, host: str, export: str, path: Path, read_only: bool = False,
                 timeout: float = 30) -> Iterator[Path]:
    """nbdfuse on `host` (its network namespace; the FUSE mount is in the shared mount
    namespace, tests/netns.py) presenting `export` over TLS with `host`'s certificates
    as the regular file `path` (a "naked" mount over a file); unmounted (fusermount3
    -u, then lazily) and nbdfuse reaped however the block ends.

    nbdfuse 1.14 (Debian 12's) refuses the URI's tls-certificates query ("local file
    access is not allowed": unlike nbdinfo and nbdcopy it does not call
    nbd_set_uri_allow_local_file) and has no option for the directory; as root, libnbd's
    only default is /etc/pki/libnbd, which a test must not write. So nbdfuse runs its
    NBD client through nbdkit's nbd plugin (libnbd too) in --command mode: nbdkit -s
    speaks NBD to nbdfuse over a pipe and nbds:// with the host's certificate to the
    array -- the TLS session, and so the host's identity, are the same."""
    path.touch()
    pidfile = path.with_name(path.name + ".pid")
    log = path.with_name(path.name + ".log")
    argv = ["nbdfuse", *(["-r"] if read_only else []), "-P", str(pidfile), str(path),
            "--command", "nbdkit", "-s", "--exit-with-parent",
            *(["-r"] if read_only else []), "nbd", f"hostname={t.net.addr['array']}",
            f"port={t.port}", f"export={export}", "tls=require",
            f"tls-certificates={t.clients[host]}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(t.net.argv(host, *argv), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + timeout
        # -P writes the pid file once nbdfuse is connected and serving
        while not (pidfile.exists() and loopdev.mounted_at(path)):
            if proc.poll() is not None:
                raise AssertionError(f"nbdfuse {export} on {host} exited with "
                                     f"{proc.returncode}: {log.read_text(errors='replace')}")
            if time.monotonic() > end:
                raise AssertionError(f"nbdfuse {export}: not mounted after {timeout} s")
            time.sleep(0.05)
        yield path
    finally:
        _fuse_unmount(path)
        try:
            proc.wait(15)   # it exits once unmounted (and nbdkit with it)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
