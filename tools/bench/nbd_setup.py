"""The NBD benchmark's systems (tools/bench/nbd.py): the two network namespaces, the
certificates, the images, our `serve --nbd-listen` and qemu-nbd serving the same
content, and the client side (nbdcopy, nbdfuse).

Everything is started through an ExitStack the caller owns: leaving it (normally, on a
failure, on Ctrl-C) stops the servers, unmounts nbdfuse files and deletes the
namespaces; tools/workdir.clean then catches whatever is still there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..netns import Hosts
from .common import (
    REPO,
    BenchError,
    MiB,
    _fuse_unmount,
    _mounted,
    _run,
    _stop_proc,
    _wait,
    socket_dir,
)
from .targets import Daemon

# benchmark namespaces are spxb-*: the test suite's guard deletes leftover spx-* ones,
# and a bench running beside a test session must not lose its namespaces to it
PREFIX = "spxb-"
CLIENT_CN = "bench-client"
OUR_PORT, QEMU_RO_PORT, QEMU_RW_PORT = 10809, 10810, 10811
READ_VOL, WRITE_VOL = "v", "w"       # ours: the snapshotted volume, the write target
QEMU_SHARED = 8                      # clients at a time (nbdcopy opens 4 connections)
TOOLS = ("ip", "nsenter", "ss", "nbdcopy", "nbdfuse", "nbdkit", "qemu-nbd", "fio",
         "fusermount3")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@dataclass
class Target:
    """One server as the client sees it, in one mode."""
    name: str             # "spx" | "qemu"
    addr: str             # what the client dials
    read_port: int
    read_export: str      # the snapshot (ours) / the raw image read-only (qemu-nbd)
    write_port: int
    write_export: str     # volume w (ours) / a second raw image (qemu-nbd)


class Setup:
    """Namespaces "server" and "client" joined by one veth pair (no bridge), the pki,
    the pool with volumes v (filled, snapshotted) and w (sparse), and the raw images
    snap.raw (v's bytes) and w.raw (sparse) that qemu-nbd serves."""

    def __init__(self, base: str, size: int, stack: contextlib.ExitStack,
                 log: object) -> None:
        self.base, self.size, self.stack, self.log = base, size, stack, log
        self.net = Hosts(("server", "client"), prefix=PREFIX, switch=False)
        self.pki = os.path.join(base, "pki")
        self.client_pki = os.path.join(base, "pki-client")
        self.pool = os.path.join(base, "pool")
        self.mnt = os.path.join(base, "mnt")
        self.sock = os.path.join(socket_dir(base, stack), "ctl.sock")
        self.snap_raw = os.path.join(base, "snap.raw")
        self.write_raw = os.path.join(base, "w.raw")
        self.daemon: Daemon | None = None
        self.qemu: list[subprocess.Popen] = []

    def _say(self, msg: str) -> None:
        self.log(msg)   # type: ignore[operator]

    def prepare(self) -> None:
        self.stack.callback(self.net.teardown)
        self.stack.callback(self.stop_servers)   # (runs first: LIFO)
        self.net.setup()
        make_pki(self.pki, self.net.addr["server"], {CLIENT_CN: self.client_pki})
        self._say(f"writing {self.size >> 20} MiB of random data (raw image and volume)")
        make_pool(self.pool, self.size, READ_VOL, sparse=(WRITE_VOL,), raw=self.snap_raw)
        with open(self.write_raw, "wb") as f:
            f.truncate(self.size)
        os.makedirs(self.mnt, exist_ok=True)

    # -- servers ------------------------------------------------------------------------
    def start_ours(self, tls: bool) -> Target:
        """serve with the NBD port (TLS on the veth address; plain text only on loopback,
        the server's rule) and a snapshot of v presented to whoever connects."""
        self.stop_ours()
        srv = self.net.addr["server"]
        extra = (["--nbd-listen", f"{srv}:{OUR_PORT}", "--tls-dir", self.pki] if tls else
                 ["--nbd-listen", f"127.0.0.1:{OUR_PORT}", "--nbd-insecure"])
        d = Daemon(self.base, self.pool, self.mnt, self.sock,
                   name=f"serve-{'tls' if tls else 'plain'}", extra=extra,
                   prefix=self.net.argv("server"))
        self.daemon = d
        d.start()
        _wait(lambda: "NBD port open on" in _read(d.log_path), 30,
              "waiting for the NBD port", d.proc, d.log_path)
        from provider.client import Client
        # TLS: the connection's host is the certificate's CN; plain: the array's own host
        host = CLIENT_CN if tls else None
        with Client(self.sock, client="shadowplex-bench-nbd", timeout=60) as c:
            # the array's own host is this machine's name (provider/coordinator.py)
            hosts = [CLIENT_CN] if tls else [socket.gethostname()]
            for vol in (READ_VOL, WRITE_VOL):
                c.volume_present(vol, hosts)
        # the snapshot is presented to the host whose requester made it (docs/network.md)
        with Client(self.sock, host=host, client="shadowplex-bench-nbd", timeout=600) as c:
            # persistent (the CLI's default context): "backup" is auto-release and
            # would be deleted when this session ends
            sid = c.snapshot_create([READ_VOL], context="app-rollback"
                                    )["snapshots"][0]["snapshot_id"]
        addr = srv if tls else "127.0.0.1"
        return Target("spx", addr, OUR_PORT, f".shadow/{sid}", OUR_PORT,
                      f"volumes/{WRITE_VOL}")

    def stop_ours(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def stop_servers(self) -> None:
        self.stop_ours()
        while self.qemu:
            _stop_proc(self.qemu.pop())

    def start_qemu(self, tls: bool) -> Target:
        """Two qemu-nbd processes (one export each): snap.raw read-only, w.raw
        read-write; page cache (--cache=writeback) as ours uses it, --shared for
        nbdcopy's and nbdfuse's connections, the same certificates."""
        while self.qemu:   # the previous mode's
            _stop_proc(self.qemu.pop())
        addr = self.net.addr["server"] if tls else "127.0.0.1"
        for port, export, path, ro in ((QEMU_RO_PORT, "snap", self.snap_raw, True),
                                       (QEMU_RW_PORT, "w", self.write_raw, False)):
            argv = qemu_nbd_argv(addr, port, export, path, ro, self.pki if tls else None)
            log_path = os.path.join(self.base, f"qemu-nbd-{export}.log")
            with open(log_path, "a") as out:
                proc = subprocess.Popen(self.net.argv("server", *argv), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            self.qemu.append(proc)
            _wait(functools.partial(self._listening, port), 30,
                  f"waiting for qemu-nbd :{port}", proc, log_path)
        return Target("qemu", addr, QEMU_RO_PORT, "snap", QEMU_RW_PORT, "w")

    def _listening(self, port: int) -> bool:
        res = self.net.run("server", "ss", "-Hltn", f"sport = :{port}", timeout=10)
        return bool(res.stdout.strip())

    # -- the client side ----------------------------------------------------------------
    def client_ns(self, tls: bool) -> str:
        """Where clients run: the client namespace over the veth pair; for plain text the
        server's own namespace (loopback), our server's rule -- both servers alike."""
        return "client" if tls else "server"

    def uri(self, t: Target, tls: bool, write: bool = False) -> str:
        port, export = (t.write_port, t.write_export) if write else (t.read_port,
                                                                     t.read_export)
        if tls:
            return f"nbds://{t.addr}:{port}/{export}?tls-certificates={self.client_pki}"
        return f"nbd://{t.addr}:{port}/{export}"

    def nbdcopy(self, t: Target, tls: bool) -> float:
        """nbdcopy of the read export to null: (its default: multi-conn where the server
        offers it, 4 connections); seconds."""
        argv = self.net.argv(self.client_ns(tls), "nbdcopy", self.uri(t, tls), "null:")
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=3600,
                             check=False, cwd=REPO)
        took = time.perf_counter() - t0
        if res.returncode != 0:
            raise BenchError(f"nbdcopy from {t.name} failed: {res.stderr.strip()}")
        return took

    @contextlib.contextmanager
    def nbdfuse(self, t: Target, tls: bool, write: bool) -> Iterator[str]:
        """The export as a local file (nbdfuse in the client namespace), for fio.

        nbdfuse 1.14 refuses a URI's tls-certificates (it does not call
        nbd_set_uri_allow_local_file) and, as root, libnbd's only default directory is
        /etc/pki/libnbd: so its NBD client is nbdkit's nbd plugin (libnbd) in --command
        mode, which dials the server with the certificates -- for both servers, and in
        plain text too, so the TLS and plain rows differ by TLS only."""
        port, export = (t.write_port, t.write_export) if write else (t.read_port,
                                                                     t.read_export)
        path = os.path.join(self.base, f"fuse-{t.name}-{'w' if write else 'r'}.nbd")
        pidfile = path + ".pid"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        open(path, "a").close()
        ro = [] if write else ["-r"]
        tls_args = (["tls=require", f"tls-certificates={self.client_pki}"] if tls
                    else ["tls=off"])
        argv = ["nbdfuse", *ro, "-P", pidfile, path, "--command", "nbdkit", "-s",
                "--exit-with-parent", *ro, "nbd", f"hostname={t.addr}", f"port={port}",
                f"export={export}", *tls_args]
        log_path = path + ".log"
        with open(log_path, "a") as out:
            proc = subprocess.Popen(self.net.argv(self.client_ns(tls), *argv), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            _wait(lambda: os.path.exists(pidfile) and _mounted(path), 30,
                  f"waiting for nbdfuse of {t.name} {export}", proc, log_path)
            yield path
        finally:
            if _mounted(path):
                _fuse_unmount(path)
            _stop_proc(proc, timeout=15)


def make_pki(pki: str, server_addr: str, clients: dict[str, str]) -> None:
    """`shadowplex pki init` (the array's CA and server certificate for server_addr) and
    `pki host CN DIR` for each client host."""
    cli = [sys.executable, "-m", "tools.cli"]
    _run(*cli, "pki", "init", pki, "--server-name", server_addr, timeout=60)
    for cn, directory in clients.items():
        _run(*cli, "pki", "host", cn, directory, "--ca", pki, timeout=60)


def make_pool(path: str, size: int, filled: str, sparse: tuple[str, ...] = (),
              raw: str | None = None) -> None:
    """A new pool at `path`: volume `filled` holding `size` random bytes (the same bytes
    written to the raw image `raw`, if given) and sparse volumes `sparse` of that size."""
    from blockstore import Pool
    pool = Pool.create(path)
    try:
        for vol in (filled, *sparse):
            pool.create_volume(vol, size)
        with open(raw or os.devnull, "wb") as f:
            for off in range(0, size, 4 * MiB):
                block = os.urandom(min(4 * MiB, size - off))
                pool.write(filled, off, block)
                if raw:
                    f.write(block)
            if raw:
                os.fsync(f.fileno())
        pool.flush(filled)
    finally:
        pool.close()


def qemu_nbd_argv(addr: str, port: int, export: str, path: str, read_only: bool,
                  pki: str | None) -> list[str]:
    """qemu-nbd as the comparator runs (docs/performance.md lists these flags)."""
    argv = ["qemu-nbd", "--format=raw", "--cache=writeback", "--aio=threads",
            f"--shared={QEMU_SHARED}", "--persistent", f"--bind={addr}", f"--port={port}",
            f"--export-name={export}"]
    if read_only:
        argv.append("--read-only")
    if pki is not None:   # the same directory as ours: server-cert.pem, ca-cert.pem ...
        argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki},"
                 "verify-peer=on", "--tls-creds=tls0"]
    return [*argv, path]


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
