"""Helpers shared by the kernel tests that run `shadowplex serve` as a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from fuse_mount import loopdev

# daemon logs written under tests/fuse_self_guard.py (test_provider_e2e.start_daemon):
# conftest's no_self_requests fails a test whose daemon logged a FUSE request from one
# of its own threads (DESIGN.md's first concurrency rule: such a request can hang it)
GUARDED_LOGS: list[str] = []


def run_cmd(*cmd: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """Run a command (text output captured); with check, a failure names its stderr."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res


def mkfs_ext4(image: str) -> None:
    """Put an empty ext4 filesystem on a volume image (through a loop device, detached
    again)."""
    dev = loopdev.attach(image, read_only=False)
    try:
        run_cmd("mkfs.ext4", "-q", "-F", dev)
    finally:
        loopdev.detach(dev)


def mounted(path: str) -> bool:
    """From mountinfo, not os.path.ismount: a stat on a FUSE mount whose INIT is not
    answered yet would block this process."""
    return any(mp == path for mp, _, _ in loopdev.mountinfo())


def wait_until_up(d: Any, timeout: float = 30) -> None:
    """Wait for a test daemon (anything with .proc, .mount, .socket, .log_text()) to
    have its FUSE mount (in mountinfo) and its control socket; a daemon that exits or
    is not up within `timeout` fails with its log (it is then stopped)."""
    deadline = time.monotonic() + timeout
    while not (mounted(d.mount) and os.path.exists(d.socket)):
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log_text()}")
        if time.monotonic() > deadline:
            stop_daemon(d)
            raise AssertionError(f"daemon did not come up:\n{d.log_text()}")
        time.sleep(0.05)


def stop_daemon(d: Any) -> None:
    """Stop a test daemon (anything with .proc and .mount): SIGTERM, then the hard way;
    never leaves its mount behind."""
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.proc.wait(20)
    if d.proc.poll() is None:
        run_cmd("fusermount3", "-u", "-z", d.mount, check=False)
        d.proc.kill()
        d.proc.wait(10)
    if mounted(d.mount):
        run_cmd("fusermount3", "-u", "-z", d.mount, check=False)


def start_thread(fn: Callable[[], object], errors: list[BaseException],
                 name: str) -> threading.Thread:
    """fn() in a daemon thread named `name`; what it raises goes to `errors` (for the
    test to assert on), never lost in the thread."""
    def run() -> None:
        try:
            fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            errors.append(e)
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t
