"""Helpers shared by the test suites (tests/harness.py runs the daemon itself): commands,
the CLI as a subprocess, loop devices and filesystems on volume images, threads."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_mount import loopdev

ROOT = Path(__file__).resolve().parent.parent
# what a test subprocess runs with: this worktree's code (not an installed copy)
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

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


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def spx(*args: str, socket: str | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    """`shadowplex [--socket SOCKET] args...` as a subprocess, output captured."""
    argv = [sys.executable, "-m", "tools.cli"]
    if socket is not None:
        argv += ["--socket", socket]
    return subprocess.run([*argv, *args], cwd=str(ROOT), env=ENV, capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_line_error(res: subprocess.CompletedProcess[str], rc: int, fragment: str) -> str:
    """The failure contract: exit status rc, nothing on stdout, ONE line on stderr that
    says what was wrong, no traceback."""
    assert res.returncode == rc, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("shadowplex"), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]

@contextlib.contextmanager
def mounted_ext4(image: str, target: Path) -> Iterator[str]:
    """A loop device on `image` with a fresh ext4, mounted read-write at `target`."""
    dev = loopdev.attach(image, read_only=False)
    try:
        run_cmd("mkfs.ext4", "-q", "-F", dev)
        target.mkdir(parents=True, exist_ok=True)
        run_cmd("mount", dev, str(target))
        try:
            yield dev
        finally:
            run_cmd("umount", str(target), check=False)
    finally:
        loopdev.detach(dev)


def detach_loops_under(mnt: Path | str) -> None:
    """Unmount and detach every loop device whose back-file is under `mnt`."""
    for dev, _ in loopdev.loops_under(mnt):
        for mp, _fs, source in loopdev.mountinfo():
            if source == dev:
                subprocess.run(["umount", mp], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
