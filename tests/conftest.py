"""Session-wide guards for the shadowplex test suite.

1. ``no_leftovers`` (session, autouse): records FUSE mounts, loop-device mounts, attached
   loop devices and daemon processes at session start. At session end any new one is
   cleaned up (umount / fusermount3 -u, -z / losetup -d / SIGTERM, SIGKILL) and the
   session FAILS listing what leaked.

   Processes counted (`_is_test_process`): every process whose environment carries this
   session's ``SHADOWPLEX_TEST_SESSION=<token>`` (read from /proc/PID/environ; the token
   is put in os.environ here, so whatever a test starts inherits it unless the test builds
   an environment from scratch) -- daemons however they are started, writer loads, hooks;
   and, marker or not, any command line that runs the daemon: ``shadowplex ... serve``,
   ``-m tools.cli serve``, ``-m provider.daemon`` / ``-m provider.service``, and
   ``python -c`` boot strings naming provider.daemon / provider.service (runpy).

   Scope: on CI (``CI`` true) or with ``SHADOWPLEX_LEAK_STRICT=1`` every new object counts.
   Otherwise (developer machines, where other test runs may be going on concurrently) only
   objects attributable to this session count: mounts and loop back-files under this
   session's pytest basetemp, loop devices mounted there, and processes that descend from
   this pytest or carry ``SHADOWPLEX_TEST_SESSION=<token>`` in their environment (set here,
   so every subprocess a test starts inherits it). Other new objects are reported, not touched.

2. Tests marked ``kernel`` need root, /dev/fuse, /dev/loop-control, losetup and fusermount3.
   Missing any of them skips the test with the reason, unless ``SHADOWPLEX_REQUIRE_KERNEL=1``
   (CI), in which case the test fails instead. Fixtures may call ``require_kernel()`` too.

3. The daemon log check (``pytest_runtest_teardown``): every daemon a test starts goes
   through tests/harness.py, which registers its log; after each test what the daemons
   logged meanwhile is read, and a traceback, an ERROR not declared with
   ``@pytest.mark.daemon_log_expects(r"regex", ...)``, or a FUSE request from one of a
   daemon's own threads (tests/fuse_self_guard.py) fails the test, with the lines.

4. Fixtures shared by several suites (``sockdir``; ``pool_fs`` and ``pool_tmp``: pools on
   loop-mounted XFS, btrfs or ext4, see tests/poolfs.py; ``tls_array``: the array and
   client hosts on the network, see tests/nbd_net.py); helpers shared by several suites are
   in tests/support.py, tests/harness.py, tests/provider_env.py and tests/engine_model.py
   -- test files do not import each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from harness import WatchedLog

REQUIRE_KERNEL_ENV = "SHADOWPLEX_REQUIRE_KERNEL"
SESSION_TOKEN_ENV = "SHADOWPLEX_TEST_SESSION"
# this session's test hosts are network namespaces named NS_PREFIX... (tests/netns.py
# reads it): the guard below deletes only this session's, never those of another test
# session running beside it on the machine (pytester sessions inherit the prefix)
NS_PREFIX = os.environ.setdefault("SHADOWPLEX_TEST_NS_PREFIX", f"spx-{uuid.uuid4().hex[:4]}")
LEAK_STRICT_ENV = "SHADOWPLEX_LEAK_STRICT"
CMD_TIMEOUT = 15  # seconds, for every cleanup command


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- kernel guard


def kernel_missing() -> list[str]:
    """Reasons why kernel tests cannot run here (empty list: they can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            reasons.append(f"{dev} is missing")
    for tool in ("losetup", "fusermount3"):
        if shutil.which(tool) is None:
            reasons.append(f"{tool} not found on PATH")
    return reasons


def require_kernel(also_missing: list[str] | None = None) -> None:
    """Skip (or, with SHADOWPLEX_REQUIRE_KERNEL=1, fail) unless kernel tests can run;
    `also_missing`: what else the calling test lacks (a mkfs tool, say)."""
    reasons = kernel_missing() + (also_missing or [])
    if not reasons:
        return
    msg = "kernel test needs root, /dev/fuse and loop devices: " + "; ".join(reasons)
    if _truthy(os.environ.get(REQUIRE_KERNEL_ENV)):
        pytest.fail(f"{msg} ({REQUIRE_KERNEL_ENV}=1, so this is a failure)", pytrace=False)
    pytest.skip(msg)


def pytest_configure(config: pytest.Config) -> None:
    # A run started in the background by a shell without job control (`cmd &` in a
    # script, nohup) inherits SIGINT ignored, and so would every child: the CLI, scripts
    # and bench that the tests interrupt with Ctrl-C would ignore it and the tests fail
    # for a reason of how they were started. Python's own handler is not inherited by an
    # exec'd child (SIG_IGN is), so the children get the default again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        require_kernel()


# --------------------------------------------------------------------------- system state


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str

    def __str__(self) -> str:
        return f"mount {self.target} ({self.fstype} from {self.source})"


@dataclass(frozen=True)
class Loop:
    name: str
    back_file: str

    def __str__(self) -> str:
        return f"loop device {self.name} -> {self.back_file}"


@dataclass(frozen=True)
class Daemon:
    pid: int
    starttime: str  # /proc/PID/stat field 22: tells a reused pid apart
    cmdline: str

    def __str__(self) -> str:
        return f"process {self.pid}: {self.cmdline}"


@dataclass(frozen=True)
class State:
    fuse_mounts: frozenset[Mount]
    loop_mounts: frozenset[Mount]
    loops: frozenset[Loop]
    daemons: frozenset[Daemon]

    def minus(self, other: State) -> State:
        return State(
            self.fuse_mounts - other.fuse_mounts,
            self.loop_mounts - other.loop_mounts,
            self.loops - other.loops,
            self.daemons - other.daemons,
        )

    def items(self) -> list[object]:
        return [*self.fuse_mounts, *self.loop_mounts, *self.loops, *self.daemons]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[Mount]:
    out = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def _loops() -> set[Loop]:
    if shutil.which("losetup") is None:
        return set()
    try:
        res = subprocess.run(
            ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
            capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if res.returncode != 0 or not res.stdout.strip():
        return set()
    devices = json.loads(res.stdout).get("loopdevices", [])
    return {Loop(d.get("name") or "", d.get("back-file") or "") for d in devices}


DAEMON_MODULES = ("provider.daemon", "provider.service")


def _is_serve_cmdline(argv: list[str]) -> bool:
    """Does this command line run a shadowplex daemon (whatever its environment)?"""
    for i, arg in enumerate(argv):
        rest = argv[i + 1:]
        if os.path.basename(arg) == "shadowplex" or arg == "tools.cli":
            return "serve" in rest
        if arg == "-m" and rest and rest[0] in DAEMON_MODULES:
            return True
        if arg.startswith("-m") and arg[2:] in DAEMON_MODULES:     # python -mprovider.daemon
            return True
        if arg == "-c" and rest:       # a boot string: runpy.run_module('provider.service')
            if re.search(r"""['"]tools\.cli['"]""", rest[0]):     # ... ('tools.cli') serve
                return "serve" in rest[1:]
            return any(re.search(rf"""['"]{re.escape(m)}['"]""", rest[0])
                       for m in DAEMON_MODULES)
    return False


def _carries_token(environ: bytes, token: str | None) -> bool:
    return bool(token) and f"{SESSION_TOKEN_ENV}={token}".encode() in environ.split(b"\0")


def _is_test_process(argv: list[str], environ: bytes, token: str | None) -> bool:
    """A process the leak guard tracks: a daemon by its command line, or anything that
    carries this session's marker in its environment."""
    return _is_serve_cmdline(argv) or _carries_token(environ, token)


def _daemons() -> set[Daemon]:
    token = os.environ.get(SESSION_TOKEN_ENV)
    me = os.getpid()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:     # another user's process (not root) or gone: no marker
            environ = b""
        fields = stat.rsplit(")", 1)[-1].split()
        if fields[0] == "Z":  # exited, not yet reaped: nothing left to stop
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if _is_test_process(argv, environ, token):
            found.add(Daemon(int(entry.name), fields[19], " ".join(argv)))
    return found


def snapshot_state() -> State:
    mounts = _mounts()
    return State(
        frozenset(m for m in mounts if m.fstype.startswith("fuse") and m.fstype != "fusectl"),
        frozenset(m for m in mounts if m.source.startswith("/dev/loop")),
        frozenset(_loops()),
        frozenset(_daemons()),
    )


# --------------------------------------------------------------------------- attribution


def _under(path: str, root: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == root or path.startswith(root.rstrip("/") + "/")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _process_is_ours(pid: int, token: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"{SESSION_TOKEN_ENV}={token}".encode() in env:
            return True
    except OSError:
        pass
    me, p = os.getpid(), pid
    for _ in range(64):
        p = _ppid(p)
        if p <= 1:
            return False
        if p == me:
            return True
    return False


def _split_ours(new: State, roots: list[str], token: str, strict: bool) -> tuple[State, State]:
    """(ours, foreign). Strict: everything new is ours."""
    if strict:
        return new, State(frozenset(), frozenset(), frozenset(), frozenset())

    def under_roots(path: str) -> bool:
        return any(_under(path, r) for r in roots)

    loops = {lp for lp in new.loops if under_roots(lp.back_file)}
    loop_mounts = {m for m in new.loop_mounts if under_roots(m.target)}
    loops |= {lp for lp in new.loops if any(m.source == lp.name for m in loop_mounts)}
    loop_mounts |= {m for m in new.loop_mounts if any(m.source == lp.name for lp in loops)}
    ours = State(
        frozenset(m for m in new.fuse_mounts if under_roots(m.target)),
        frozenset(loop_mounts),
        frozenset(loops),
        frozenset(d for d in new.daemons if _process_is_ours(d.pid, token)),
    )
    return ours, new.minus(ours)


# --------------------------------------------------------------------------- cleanup


def _run(*cmd: str) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    try:
        return subprocess.run(
            list(cmd), capture_output=True, timeout=CMD_TIMEOUT, check=False
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _is_mounted(target: str) -> bool:
    return any(m.target == target for m in _mounts())


def _cleanup(leaked: State) -> None:
    # Innermost first: filesystems on loop devices, the loop devices (whose back-files may
    # live inside a FUSE mount), the FUSE mounts, and finally the daemons serving them.
    for m in sorted(leaked.loop_mounts, key=lambda m: -len(m.target)):
        _run("umount", m.target) or _run("umount", "-l", m.target)
    for lp in leaked.loops:
        _run("losetup", "-d", lp.name)
    for m in sorted(leaked.fuse_mounts, key=lambda m: -len(m.target)):
        for cmd in (("fusermount3", "-u"), ("fusermount3", "-u", "-z"), ("umount", "-l")):
            if not _is_mounted(m.target):
                break
            _run(*cmd, m.target)
    for d in leaked.daemons:
        _signal(d, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(d) for d in leaked.daemons):
        time.sleep(0.1)
    for d in leaked.daemons:
        if _alive(d):
            _signal(d, signal.SIGKILL)


def _alive(d: Daemon) -> bool:
    return d in _daemons()


def _signal(d: Daemon, sig: int) -> None:
    if _alive(d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(d.pid, sig)


# --------------------------------------------------------------------------- the fixture


@pytest.fixture(scope="session", autouse=True)
def no_leftover_namespaces() -> Iterator[None]:
    """Test hosts (tests/netns.py: network namespaces named NS_PREFIX*) are deleted by
    the tests that made them; any of this session's still there at the end is deleted
    here and fails the session."""
    def leftover_namespaces() -> list[str]:   # (tests/netns.py's; this file is also
        try:                                  # copied alone into pytester sessions)
            return sorted(n for n in os.listdir("/run/netns") if n.startswith(NS_PREFIX))
        except FileNotFoundError:
            return []
    before = set(leftover_namespaces())
    yield
    left = [n for n in leftover_namespaces() if n not in before]
    for n in left:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10,
                       check=False)
    if left:
        pytest.fail("network namespaces left behind (deleted now): " + ", ".join(left),
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    token = os.environ.setdefault(SESSION_TOKEN_ENV, uuid.uuid4().hex)
    strict = _truthy(os.environ.get("CI")) or _truthy(os.environ.get(LEAK_STRICT_ENV))
    basetemp = tmp_path_factory.getbasetemp()
    roots = sorted({str(basetemp), os.path.realpath(basetemp)})
    before = snapshot_state()

    yield

    new = snapshot_state().minus(before)
    ours, foreign = _split_ours(new, roots, token, strict)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if foreign.items() and reporter is not None:
        reporter.write_line(
            "no_leftovers: new objects not attributable to this session (left alone): "
            + "; ".join(map(str, foreign.items())),
            yellow=True,
        )
    if not ours.items():
        return
    _cleanup(ours)
    remaining = snapshot_state().minus(before)
    still = [str(x) for x in ours.items() if x in set(remaining.items())]
    lines = [f"  - {x}" for x in ours.items()]
    msg = "tests leaked mounts / loop devices / daemons (cleaned up now):\n" + "\n".join(lines)
    if still:
        msg += "\nSTILL PRESENT after cleanup:\n" + "\n".join(f"  - {x}" for x in still)
    pytest.fail(msg, pytrace=False)


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory for a control socket, outside tmp_path: a Unix socket's path is at most
    107 bytes, and pytest's tmp_path can be longer than that."""
    d = tempfile.mkdtemp(prefix="spx-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pool_fs(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """Where the pools of a test parametrized with tests/poolfs.on_filesystems live:
    None for "tmp" (the suite's usual place), else the mount point of a fresh filesystem
    of that type on a loop device, shared by the module's tests of that parameter and
    unmounted and detached after them (also after a failure or Ctrl-C). Meanwhile pools
    on XFS preserve every whole chunk by reference, as on btrfs (poolfs.CLONE_EVERY_CHUNK)."""
    fstype = getattr(request, "param", "tmp")
    if fstype == "tmp":
        yield None
        return
    # here, not at the top: this conftest also runs copied into pytester sessions
    # (test_leak_guard.py) where the tests' helper modules are not importable
    from poolfs import CLONE_EVERY_CHUNK, loop_filesystem, missing_tools
    require_kernel(missing_tools(fstype))
    with loop_filesystem(fstype, tmp_path_factory.mktemp(f"fs-{fstype}")) as mnt, \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(*CLONE_EVERY_CHUNK)
        yield mnt


@pytest.fixture
def pool_tmp(pool_fs: Path | None, tmp_path: Path) -> Iterator[Path]:
    """tmp_path for a test's pools: tmp_path itself for "tmp", else a fresh directory on
    pool_fs's filesystem, removed afterwards (the filesystem is small and shared)."""
    if pool_fs is None:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="t-", dir=pool_fs))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A one-node Ceph cluster for the session (tests/ceph_cluster.py: 1 monitor, 1
    memstore OSD, pool ``rbd``), up on first use, its daemons stopped by pid at the end
    (also after a failure or Ctrl-C; they die with this process if it is killed). Skips
    without Ceph (make ceph) or root, unless SHADOWPLEX_REQUIRE_KERNEL=1: then fails."""
    from ceph_cluster import ceph_cluster, missing  # here: see pool_fs
    reasons = missing()
    if reasons:
        msg = "Ceph tests need root and Ceph (make ceph): " + "; ".join(reasons)
        if _truthy(os.environ.get(REQUIRE_KERNEL_ENV)):
            pytest.fail(f"{msg} ({REQUIRE_KERNEL_ENV}=1, so this is a failure)",
                        pytrace=False)
        pytest.skip(msg)
    # a short path: the daemons' admin sockets live under it (107 bytes at most)
    base = Path(tempfile.mkdtemp(prefix="spx-ceph-"))
    try:
        with ceph_cluster(base) as cluster:
            yield cluster
    finally:
        logs = tmp_path_factory.getbasetemp() / "ceph-logs"
        with contextlib.suppress(OSError):
            shutil.copytree(base / "log", logs, dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def arr(ceph: Any, tmp_path: Path) -> Iterator[object]:
    """An RbdArray on the session's cluster (its records under tmp_path), closed and
    the cluster's pool wiped afterwards."""
    from ceph_cluster import wipe

    from rbdarray import RbdArray  # here: librbd only for the tests that ask
    a = RbdArray(ceph.pool, ceph.conf, str(tmp_path))
    try:
        yield a
    finally:
        a.close()
        wipe(ceph.conf, ceph.pool)


@pytest.fixture
def tls_array(tmp_path: Path, sockdir: str) -> Iterator[object]:
    """The array on the network (tests/nbd_net.py's tls_net: serve with NBD and control
    over TLS in namespace "array", client hosts hostB and hostC with certificates),
    shared by tests/test_nbd_tls.py and tests/test_nbd_hosts.py."""
    # here, not at the top: see pool_fs
    from nbd_net import tls_net
    with tls_net(tmp_path, sockdir) as net:
        yield net


# --------------------------------------------------------------------------- daemon logs

# what no daemon may log unless the test declares it (daemon_log_expects): a traceback,
# an ERROR or CRITICAL record (provider.daemon's log format: "... shadowplex[PID] LEVEL
# logger: message"), and -- from a daemon under tests/fuse_self_guard.py without a stall
# -- a FUSE request from one of its own threads, which can hang it (docs/concurrency.md,
# rule 1)
_BAD_LINE = re.compile(r"Traceback|\] (?:ERROR|CRITICAL) ")
_SELF_REQUEST = "SELF-REQUEST"
_SHOWN = 30      # log lines shown per failure


def daemon_log_problems(watched: dict[str, WatchedLog], expected: list[re.Pattern[str]]
                        ) -> list[str]:
    """What the daemons of `watched` (tests/harness.WATCHED) logged since the last check
    that is bad and matches none of `expected`, with a few lines of context after each
    traceback; advances the offsets, and drops the logs whose daemons all exited."""
    found: list[str] = []
    for path, w in list(watched.items()):
        data = w.read()
        if not w.running():
            del watched[path]
            w.close()
        else:      # a partial last line waits for the next check
            data = data[:data.rfind(b"\n") + 1]
        w.offset += len(data)
        lines = data.decode(errors="replace").splitlines()
        for i, line in enumerate(lines):
            bad = bool(_BAD_LINE.search(line)) or (w.self_guard and _SELF_REQUEST in line)
            if bad and not any(p.search(line) for p in expected):
                context = lines[i + 1:i + 8] if "Traceback" in line else []
                found += [f"{path}: {line}", *(f"    {ln}" for ln in context)]
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The daemon log check (S3QL's pytest_checklogs): after the test and its fixtures
    (a module-scoped daemon stopped with the module's last test included), a test whose
    daemons logged a traceback, an ERROR they were not expected to, or a SELF-REQUEST
    fails, with those lines. A test that provokes an ERROR on purpose says so:
    ``@pytest.mark.daemon_log_expects(r"regex", ...)``, each line matching one is fine."""
    try:
        return (yield)
    finally:
        try:
            from harness import WATCHED
        except ImportError:   # this conftest copied into another session (test_leak_guard)
            WATCHED = {}
        found = daemon_log_problems(WATCHED, [
            re.compile(p) for m in item.iter_markers("daemon_log_expects") for p in m.args])
        if found:
            more = f"\n... and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
            pytest.fail("a daemon logged a traceback, an unexpected ERROR or a FUSE request "
                        "from one of its own threads (SELF-REQUEST: it can hang there, see "
                        "tests/fuse_self_guard.py); a test that expects an ERROR says so "
                        "with @pytest.mark.daemon_log_expects:\n"
                        + "\n".join(found[:_SHOWN]) + more, pytrace=False)
