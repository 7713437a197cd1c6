"""conftest's daemon log check (daemon_log_problems) on logs written here: what it reports,
what a test may declare, and how it reads a log a daemon is still writing."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, cast

from conftest import daemon_log_problems
from harness import WatchedLog

LINES = """\
2026-12-05 12:00:00,001 shadowplex[7] INFO provider.daemon: serving
2026-12-05 12:00:01,002 shadowplex[7] WARNING provider.daemon: an error, only a warning
2026-12-05 12:00:02,003 shadowplex[7] ERROR provider.daemon: /m is busy (1 open file): NOT stopping
SELF-REQUEST lookup from thread 12 (trio-worker)
2026-12-05 12:00:03,004 shadowplex[7] ERROR provider.control: unexpected error
Traceback (most recent call last):
  File "provider/control.py", line 1, in serve
ValueError: boom
"""


class Proc:
    """Stands in for the daemon's Popen: running or exited."""

    def __init__(self, running: bool) -> None:
        self.running = running

    def poll(self) -> int | None:
        return None if self.running else 0


def watch(log: Path, running: bool = False, self_guard: bool = True
          ) -> dict[str, WatchedLog]:
    procs = cast(list[subprocess.Popen[bytes]], [Proc(running)])
    return {str(log): WatchedLog(str(log), 0, self_guard, procs)}


def test_tracebacks_errors_and_self_requests_are_reported(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(LINES)
    watched = watch(log)
    found = daemon_log_problems(watched, [])
    assert [ln.split(": ", 1)[1] for ln in found if not ln.startswith("    ")] == [
        LINES.splitlines()[i] for i in (2, 3, 4, 5)]
    assert '    ValueError: boom' in found          # a traceback comes with its lines
    assert watched == {}                             # its daemon exited: not read again


def test_declared_errors_pass_and_an_unguarded_daemon_may_self_request(
        tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text(LINES)
    found = daemon_log_problems(watch(log, self_guard=False),
                                [re.compile(r"is busy .*NOT stopping"),
                                 re.compile("unexpected error")])
    assert [ln for ln in found if not ln.startswith("    ")] == [
        f"{log}: Traceback (most recent call last):"]


def test_a_running_daemon_is_read_on_from_where_the_last_check_stopped(
        tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text("x shadowplex[7] ERROR a: first\nx shadowplex[7] ERR")
    watched = watch(log, running=True)
    assert daemon_log_problems(watched, []) == [f"{log}: x shadowplex[7] ERROR a: first"]
    assert daemon_log_problems(watched, []) == []   # the partial line is not read yet
    with open(log, "a") as f:
        f.write("OR b: second\n")
    assert daemon_log_problems(watched, []) == [f"{log}: x shadowplex[7] ERROR b: second"]
    w: Any = watched[str(log)]
    assert w.offset == log.stat().st_size


def test_a_log_removed_before_the_check_is_still_read(tmp_path: Path) -> None:
    """pytest removes a passed test's tmp_path before the check runs (retention policy
    "failed"): the check reads the log through the descriptor harness opened at launch,
    not by its name, which read nothing then."""
    log = tmp_path / "daemon.log"
    log.write_text("x shadowplex[7] ERROR a: lost with its directory\n")
    w = WatchedLog(str(log), 0, True, [], fd=os.open(log, os.O_RDONLY | os.O_CLOEXEC))
    log.unlink()
    assert daemon_log_problems({str(log): w}, []) == [
        f"{log}: x shadowplex[7] ERROR a: lost with its directory"]
    assert w.fd is None    # closed once its daemons (none) have all exited
