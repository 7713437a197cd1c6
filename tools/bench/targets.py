"""The systems under test, as processes: our own `serve` daemon (Daemon),
qemu-storage-daemon's FUSE exports (QsdExport, the comparators) and the background
plex snapshot loop (PlexLoop) for the `spx_plex` target."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from .common import REPO, BenchError, _fuse_unmount, _mounted, _stop_proc, _wait


class Daemon:
    """`shadowplex serve` on a pool, as a subprocess (its own session). `extra`: more
    serve arguments (the NBD port: tools/bench/nbd.py); `prefix`: what runs it (nsenter
    into a network namespace, which execs serve: the same process). pool None: no
    --pool (a host daemon, `serve --array ...` in `extra`: tools/bench/hosts.py)."""

    def __init__(self, base: str, pool: str | None, mnt: str, sock: str, name: str = "serve",
                 extra: list[str] | None = None, prefix: list[str] | None = None) -> None:
        self.base, self.pool, self.mnt, self.sock = base, pool, mnt, sock
        self.extra, self.prefix = list(extra or []), list(prefix or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(base, f"{name}.log")
        self.starts = 0

    def start(self) -> float:
        """Start and wait until the mount is up and the socket answers; returns seconds."""
        from provider.client import Client, ControlError
        self.starts += 1
        env = dict(os.environ, SHADOWPLEX_SOCKET=self.sock)
        log = open(self.log_path, "a")   # noqa: SIM115 - closed once the child has it
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "tools.cli", "serve", "--socket",
                 self.sock, *(["--pool", self.pool] if self.pool else []), "--mount",
                 self.mnt, *self.extra],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=REPO)
        finally:
            log.close()

        def ready() -> bool:
            if not _mounted(self.mnt) or not os.path.ismount(self.mnt):
                return False
            try:
                with Client(self.sock, client="shadowplex-bench", timeout=5) as c:
                    c.status()
                return True
            except ControlError:
                return False
        _wait(ready, 60, "waiting for shadowplex serve", self.proc, self.log_path)
        return time.perf_counter() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop_proc(self.proc)
        if _mounted(self.mnt):
            _fuse_unmount(self.mnt)


class QsdExport:
    """qemu-storage-daemon exporting one block node through FUSE onto a regular file."""

    def __init__(self, base: str, name: str, blockdevs: list[str], node: str) -> None:
        self.path = os.path.join(base, f"{name}.export")
        self.log_path = os.path.join(base, f"{name}.qsd.log")
        self.blockdevs, self.node = blockdevs, node
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> QsdExport:
        open(self.path, "a").close()       # the mountpoint must be an existing file
        args = ["qemu-storage-daemon"]
        for b in self.blockdevs:
            args += ["--blockdev", b]
        args += ["--export", f"type=fuse,id=e,node-name={self.node},mountpoint={self.path},"
                 "writable=on"]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait(lambda: _mounted(self.path), 30, "waiting for qemu-storage-daemon's export",
                  self.proc, self.log_path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop_proc(self.proc)
        if _mounted(self.path):
            _fuse_unmount(self.path)


class PlexLoop:
    """Plex snapshots of a volume created and deleted back to back in a thread (its own
    control-socket session), so that a plex sync runs while the main thread measures."""

    def __init__(self, sock: str, volume: str) -> None:
        self.sock, self.volume = sock, volume
        self.stop_ev = threading.Event()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.syncs: list[float] = []
        self.thread = threading.Thread(target=self._run, name="plex-loop", daemon=True)

    def _run(self) -> None:
        from provider.client import Client
        try:
            with Client(self.sock, client="shadowplex-bench-plex") as c:
                while not self.stop_ev.is_set():
                    t = time.perf_counter()
                    res = c.snapshot_create([self.volume], context="app-rollback",
                                            attributes=["PLEX"],
                                            progress=lambda *_: self.started.set())
                    self.syncs.append(time.perf_counter() - t)
                    self.started.set()
                    c.snapshot_delete(set_id=res["set_id"])
        except BaseException as e:   # noqa: BLE001 - re-raised by the main thread
            self.error = e
            self.started.set()

    def __enter__(self) -> PlexLoop:
        self.thread.start()
        self.started.wait(10)   # the first progress event: the sync is under way
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_ev.set()
        self.thread.join(600)
        if self.error is not None and exc[0] is None:
            raise BenchError(f"the plex snapshot loop failed: {self.error}")
