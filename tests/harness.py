"""The one way tests run the shadowplex daemon as a subprocess, and the in-process mount.

`start_daemon` (a fresh pool in a test directory) and `launch` (any command line: the
`python -m provider.service` options, `tools.cli serve --config ...`, the FUSE-only
`provider.daemon`) start every test daemon the same way:

* under tests/fuse_self_guard.py (unless self_guard=None): every FUSE request made by one
  of the daemon's own threads is logged as a SELF-REQUEST line. Such a request can hang
  the daemon (docs/concurrency.md, rule 1), so conftest's log check fails the test that
  saw one -- in every suite, since every suite starts its daemons here;
* with faulthandler: a daemon that hangs dumps its threads' stacks into its log
  (periodically, and on SIGUSR1);
* its stdout and stderr appended to one log file, which is registered in WATCHED:
  after each test conftest reads what the test's daemons logged and fails it on a
  traceback or an ERROR line it did not declare (`@pytest.mark.daemon_log_expects`).

`Daemon.stop` stops one cleanly (SIGTERM, wait, then kill and a lazy unmount): no mount
is left behind whatever state it was in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from support import detach_loops_under, mounted, run_cmd, spx

from blockstore import Pool
from fuse_mount.session import MountState, force_unmount, mount_state, run_mount, wait_mounted
from provider.client import Client

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
UP_TIMEOUT = 30.0      # seconds for a daemon to have its mount and socket
STOP_TIMEOUT = 30.0    # seconds for a SIGTERM'ed daemon to exit before it is killed
MOUNT_TIMEOUT = 20.0   # the in-process mount
STACK_DUMP_EVERY = 30  # seconds between faulthandler dumps of a hung daemon's threads


# --------------------------------------------------------------------------- watched logs
@dataclass
class WatchedLog:
    """A daemon log the per-test log check reads: from `offset` on, what was not checked
    yet. `self_guard`: a daemon on it ran under the guard without a stall, so any
    SELF-REQUEST line in it is a failure (a test that provokes one stalls it on purpose).
    `fd`: the log opened when its first daemon started, read by the check: pytest
    removes a passed test's tmp_path (tmp_path_retention_policy = "failed") before the
    check runs, and a log there was then read as empty -- an open file still reads."""
    path: str
    offset: int
    self_guard: bool
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    fd: int | None = None

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def read(self) -> bytes:
        """What the log holds from `offset` on (b"" if it is gone and was not open)."""
        if self.fd is None:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    return f.read()
            except FileNotFoundError:
                return b""
        out = bytearray()
        while chunk := os.pread(self.fd, 1 << 20, self.offset + len(out)):
            out += chunk
        return bytes(out)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# path -> the log; conftest.check_daemon_logs drops the logs whose daemons have all exited
WATCHED: dict[str, WatchedLog] = {}


def _watch(log: str, proc: subprocess.Popen[bytes], self_guard: bool, offset: int) -> None:
    w = WATCHED.get(log)
    if w is None:
        w = WATCHED[log] = WatchedLog(log, offset, self_guard,
                                      fd=os.open(log, os.O_RDONLY | os.O_CLOEXEC))
    w.self_guard = w.self_guard or self_guard
    w.procs.append(proc)


# --------------------------------------------------------------------------- the daemon
@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    pool: str
    mount: str
    socket: str      # "" for a daemon without a control socket
    log: str

    @property
    def base(self) -> Path:
        """The test directory the daemon's log is in (scratch space next to it)."""
        return Path(self.log).parent

    def client(self, **kw: Any) -> Client:
        return Client(self.socket, **kw)

    def log_text(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def image(self, vol: str) -> str:
        return os.path.join(self.mount, "volumes", f"{vol}.img")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`shadowplex --socket SOCKET args...` (the CLI as a subprocess)."""
        return spx(*args, socket=self.socket)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        res = self.run(*args)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def wait_up(self, timeout: float = UP_TIMEOUT) -> None:
        """Wait for the FUSE mount (in mountinfo: a stat could block on a mount whose INIT
        is not answered yet) and the control socket; a daemon that exits or is not up in
        time fails with its log (it is stopped then)."""
        deadline = time.monotonic() + timeout
        while not (mounted(self.mount) and (not self.socket or os.path.exists(self.socket))):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not come up:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait; then the hard way (lazy unmount, SIGKILL). Never leaves its mount
        behind. Returns the exit status, None if it had to be killed."""
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = self.proc.wait(timeout)
        if rc is None:
            run_cmd("fusermount3", "-u", "-z", self.mount, check=False)
            self.proc.kill()
            self.proc.wait(10)
        if mounted(self.mount):
            run_cmd("fusermount3", "-u", "-z", self.mount, check=False)
        return rc


def daemon_argv(module: str, args: list[str], self_guard: bool = True,
                stack_dump_every: int = STACK_DUMP_EVERY) -> list[str]:
    """`python -c BOOT args...`: BOOT installs tests/fuse_self_guard.py (self_guard) and
    faulthandler, then runs `module` as __main__ with `args` (runpy, as `-m` would)."""
    boot = ("import faulthandler, runpy, signal, sys; "
            f"faulthandler.dump_traceback_later({stack_dump_every}, repeat=True); "
            "faulthandler.register(signal.SIGUSR1, all_threads=True); "
            f"sys.argv[0] = {module!r}; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    if self_guard:
        boot = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
                f"import fuse_self_guard; del sys.path[0]; {boot}")
    return [sys.executable, "-c", boot, *args]


def launch(args: list[str], *, pool: str, mount: str, socket: str, log: str,
           module: str = "provider.service", self_guard: float | None = 0.0,
           env: dict[str, str] | None = None, stack_dump_every: int = STACK_DUMP_EVERY,
           wait: bool = True, netns: str | None = None) -> Daemon:
    """Start `module` with `args` (which must name pool, mount and socket as given: they
    are what the launcher waits for and cleans up), output appended to `log`.

    self_guard: not None = the daemon logs every FUSE request made by one of its own
    threads and stalls it that many seconds (tests/fuse_self_guard.py). By default
    (0.0) any such request fails the test (conftest's log check); a test that provokes
    one on purpose passes a stall > 0; None turns the guard off. netns: run it in that
    network namespace (tests/netns.py; nsenter execs it: same process, same mounts)."""
    env = dict(env if env is not None else os.environ, PYTHONPATH=str(ROOT))
    if self_guard is not None:
        env["SHADOWPLEX_TEST_SELF_STALL"] = str(self_guard)
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    with open(log, "ab") as logf:
        argv = daemon_argv(module, args, self_guard is not None, stack_dump_every)
        if netns is not None:
            argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
        proc = subprocess.Popen(
            argv,
            cwd=str(ROOT), env=env, stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    _watch(log, proc, self_guard is not None and not self_guard, offset)
    d = Daemon(proc, pool, mount, socket, log)
    if wait:
        d.wait_up()
    return d


@contextlib.contextmanager
def serve_cli(base: Path, prefix: str, *serve_args: str) -> Iterator[Daemon]:
    """`shadowplex serve` (the CLI's own way in) on BASE/pool, mounted on BASE/mnt (both
    must exist), log BASE/daemon.log, its control socket in a short private directory
    (sun_path is 108 bytes) named after ``prefix``; up when yielded, stopped and its
    socket directory removed after, whatever happened."""
    sockdir = tempfile.mkdtemp(prefix=prefix)
    sock = os.path.join(sockdir, "ctl.sock")
    with running_cli(["serve", "--pool", str(base / "pool"), "--mount", str(base / "mnt"),
                      "--socket", sock, *serve_args], base, sock, sockdir) as d:
        yield d


@contextlib.contextmanager
def running_cli(argv: list[str], base: Path, sock: str, sockdir: str) -> Iterator[Daemon]:
    """`shadowplex ARGV` (a serve: its flags or its --config file name BASE/pool, BASE/mnt
    and the control socket SOCK), log BASE/daemon.log; up when yielded, stopped and
    SOCKDIR (the socket's private directory) removed after, whatever happened."""
    try:
        d = launch(argv, module="tools.cli", pool=str(base / "pool"),
                   mount=str(base / "mnt"), socket=sock, log=str(base / "daemon.log"),
                   wait=False)
        try:
            d.wait_up()
            yield d
        finally:
            d.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def start_daemon(base: Path, sockdir: str, volumes: dict[str, int],
                 config: dict[str, Any] | None = None,
                 self_guard: float | None = 0.0, *, pool: Path | None = None,
                 mount: Path | None = None, log: Path | None = None,
                 stack_dump_every: int = STACK_DUMP_EVERY,
                 netns: str | None = None) -> Daemon:
    """`provider.service` (FUSE mount + control socket) on BASE/pool (created with
    `volumes` if it does not exist), mounted on BASE/mnt, socket SOCKDIR/ctl.sock, log
    BASE/daemon.log, `config` as its --config JSON; waits until it is up. `pool`,
    `mount`, `log` put those elsewhere (a log off a pool whose filesystem fills up)."""
    pool_dir = str(pool or base / "pool")
    mnt = str(mount or base / "mnt")
    os.makedirs(mnt, exist_ok=True)
    if not os.path.exists(pool_dir):
        p = Pool.create(pool_dir)
        for name, size in volumes.items():
            p.create_volume(name, size)
        p.close()
    sock = os.path.join(sockdir, "ctl.sock")
    return launch(["--pool", pool_dir, "--mount", mnt, "--socket", sock,
                   "--config", json.dumps(config or {})],
                  pool=pool_dir, mount=mnt, socket=sock, log=str(log or base / "daemon.log"),
                  self_guard=self_guard, stack_dump_every=stack_dump_every, netns=netns)


@contextlib.contextmanager
def fuse_daemon(pool: Path, mnt: Path, log: Path) -> Iterator[Daemon]:
    """`provider.daemon` (the FUSE mount only, no control socket) on an existing pool;
    yields once mounted. On the way out: loop devices on the mount detached, SIGTERM,
    and -- if the body passed -- exit status 0 and the mount gone are asserted."""
    d = launch(["--pool", str(pool), "--mount", str(mnt)], module="provider.daemon",
               pool=str(pool), mount=str(mnt), socket="", log=str(log), wait=False)
    body_ok = False
    rc: int | None = None
    try:
        try:
            wait_mounted(mnt, d.proc, MOUNT_TIMEOUT)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n--- daemon log ---\n{d.log_text()}") from None
        yield d
        body_ok = True
    finally:
        detach_loops_under(mnt)
        rc = d.stop()
        if mount_state(mnt).state is not MountState.NOT_MOUNTED:
            force_unmount(mnt)
    if body_ok:
        assert rc == 0, f"daemon exit status {rc}\n--- daemon log ---\n{d.log_text()}"
        assert mount_state(mnt).state is MountState.NOT_MOUNTED


# --------------------------------------------------------------------------- in-process
class InProcMount:
    """run_mount on a trio loop in a thread of this process, so the test can use the Pool
    (and the write barrier) while the mount is live."""

    def __init__(self, pool: Pool, mnt: Path, ops: Any = None) -> None:
        self.pool, self.mnt = pool, mnt
        self.ops: Any = ops    # a ShadowOperations to serve (default: run_mount's own)
        self.token: Any = None
        self._cancel: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as n:
                self.ops = await n.start(partial(run_mount, ops=self.ops), self.pool,
                                         str(self.mnt))
                self.token = trio.lowlevel.current_trio_token()
                self._cancel = n.cancel_scope
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
        finally:
            self._ready.set()

    def __enter__(self) -> InProcMount:
        self._thread.start()
        self._ready.wait(MOUNT_TIMEOUT)
        if self._error is not None:
            raise self._error
        wait_mounted(self.mnt, None, MOUNT_TIMEOUT)
        return self

    def call(self, afn: Any, *args: Any) -> Any:
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def __exit__(self, *exc: object) -> None:
        if self._cancel is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self.token)
        self._thread.join(STOP_TIMEOUT)
        if mount_state(self.mnt).state is not MountState.NOT_MOUNTED:
            force_unmount(self.mnt)
        assert not self._thread.is_alive()
