"""Self-tests of the session leak guard in conftest.py: it must see every daemon the tests
start, however they start it (`python -m provider.daemon`, `-m provider.service`, a
`python -c` runpy boot string, `shadowplex serve`, `-m tools.cli serve`), and anything
else carrying the session marker in its environment.

No kernel needed: the "daemons" here are stand-ins (a fake `provider.service` module that
only sleeps) so the command lines are exactly the real ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    SESSION_TOKEN_ENV,
    State,
    _cleanup,
    _daemons,
    _is_serve_cmdline,
    _is_test_process,
    _split_ours,
)
from harness import daemon_argv

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
E2E_BOOT = ("import faulthandler, runpy, sys; faulthandler.dump_traceback_later(30, "
            "repeat=True); sys.argv[0] = 'provider.service'; "
            "runpy.run_module('provider.service', run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("argv", [
    daemon_argv("provider.daemon", ["--pool", "/p", "--mount", "/m"]),   # tests/harness.py
    daemon_argv("provider.service", ["--pool", "/p"], self_guard=False),
    daemon_argv("tools.cli", ["serve", "--config", "/c.toml"]),
    [PY, "-m", "provider.service", "--pool", "/p", "--mount", "/m"],
    [PY, "-mprovider.daemon", "--pool", "/p"],
    [PY, "-c", E2E_BOOT, "--pool", "/p", "--mount", "/m"],    # a boot string, unguarded
    [PY, "-c", "import runpy; runpy.run_module(\"provider.daemon\")"],
    ["/work/.venv/bin/shadowplex", "--debug", "serve", "--pool", "/p"],
    [PY, "-m", "tools.cli", "serve", "--pool", "/p", "--mount", "/m"],   # tools/demo.py
])
def test_daemon_command_lines_are_recognised(argv: list[str]) -> None:
    assert _is_serve_cmdline(argv)
    assert _is_test_process(argv, b"", None)


@pytest.mark.parametrize("argv", [
    [PY, "-m", "pytest", "tests/test_provider_e2e.py"],
    [PY, "-m", "tools.cli", "snapshot", "list"],
    ["grep", "-rn", "provider.service", "docs"],
    ["vim", "provider/service.py"],
    [PY, "-c", "print('provider.service is a module')"],
    [],                                                       # a kernel thread
])
def test_other_command_lines_are_not(argv: list[str]) -> None:
    assert not _is_serve_cmdline(argv)


def test_the_environment_marker_alone_is_enough() -> None:
    env = b"PATH=/bin\0" + f"{SESSION_TOKEN_ENV}=abc\0".encode() + b"HOME=/root\0"
    assert _is_test_process(["sleep", "60"], env, "abc")
    assert not _is_test_process(["sleep", "60"], env, "abd")       # another session's
    assert not _is_test_process(["sleep", "60"], env.replace(b"=abc", b"=abcd"), "abc")
    assert not _is_test_process(["sleep", "60"], env, None)


@pytest.fixture
def fake_provider(tmp_path: Path) -> Path:
    """A directory with a `provider` package whose `service` module only sleeps (and says
    it started): `python -m provider.service` run there has the real command line."""
    pkg = tmp_path / "fake" / "provider"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "service.py").write_text(
        "import os, sys, time\n"
        "open(sys.argv[sys.argv.index('--ready') + 1], 'w').close()\n"
        "time.sleep(120)\n")
    return tmp_path / "fake"


def _start(fake: Path, ready: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # -S: no site-packages, so the editable install cannot shadow the fake package;
    # python -m puts the working directory first on sys.path
    proc = subprocess.Popen([PY, "-S", "-m", "provider.service", "--pool", "/nonexistent",
                             "--ready", str(ready)], cwd=fake, env=env)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "fake did not start"
        time.sleep(0.02)
    return proc


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:                       # whatever a failed assertion left running
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_a_running_fake_service_is_seen_attributed_and_stopped(
        tmp_path: Path, fake_provider: Path, reap: list[subprocess.Popen[bytes]]) -> None:
    token = os.environ[SESSION_TOKEN_ENV]
    before = State(frozenset(), frozenset(), frozenset(), frozenset(_daemons()))
    # with the marker (inherited) and without any environment at all (cmdline only)
    marked = _start(fake_provider, tmp_path / "r1", dict(os.environ))
    reap.append(marked)
    bare = _start(fake_provider, tmp_path / "r2", {})
    reap.append(bare)
    sleeper = subprocess.Popen(["sleep", "120"])   # not a daemon: found by the marker
    reap.append(sleeper)  # type: ignore[arg-type]
    new = State(frozenset(), frozenset(), frozenset(), frozenset(_daemons())).minus(before)
    pids = {d.pid for d in new.daemons}
    assert {marked.pid, bare.pid, sleeper.pid} <= pids
    # non-strict attribution (developer machines): the marker, else descent from pytest
    ours, _foreign = _split_ours(new, [str(tmp_path)], token, strict=False)
    assert {marked.pid, bare.pid, sleeper.pid} <= {d.pid for d in ours.daemons}
    _cleanup(State(frozenset(), frozenset(), frozenset(),
                   frozenset(d for d in ours.daemons
                             if d.pid in {marked.pid, bare.pid, sleeper.pid})))
    for p in (marked, bare, sleeper):
        assert p.wait(10) == -signal.SIGTERM


def test_a_leaked_provider_service_fails_the_session(pytester: pytest.Pytester,
                                                     fake_provider: Path) -> None:
    """An inner pytest session with this conftest whose one test starts `python -m
    provider.service` and forgets it: the session fails naming it, and it is stopped."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pidfile = pytester.path / "leaked.pid"
    pytester.makepyfile(test_leaky=f"""
        import subprocess, sys, time
        from pathlib import Path

        def test_leaks():
            ready = Path({str(pytester.path / 'ready')!r})
            p = subprocess.Popen([sys.executable, "-S", "-m", "provider.service",
                                  "--pool", "/nonexistent", "--ready", str(ready)],
                                 cwd={str(fake_provider)!r})
            while not ready.exists():
                time.sleep(0.02)
            Path({str(pidfile)!r}).write_text(str(p.pid))
    """)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    pid = int(pidfile.read_text())
    out = res.stdout.str()
    assert res.ret != 0, out
    assert "tests leaked mounts / loop devices / daemons" in out, out
    assert f"process {pid}:" in out and "-m provider.service" in out, out
    assert "STILL PRESENT" not in out, out
    # the guard stopped it (it was the inner pytest's child, so init reaps it)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(
            ")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, f"leaked process {pid} still running"
        time.sleep(0.05)
