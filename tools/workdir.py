"""A tool's temporary work directory, cleaned up for real after Ctrl-C, SIGTERM or SIGHUP.

`shadowplex bench` starts a daemon with its FUSE mount, qemu-storage-daemon exports and
fio in a directory of its own. Interrupted, it must end those, unmount, detach, remove
the directory -- and say so only if it is true:

    with interrupts.stop_signals():           # SIGINT/SIGTERM/SIGHUP -> Interrupted
        try:
            ...
        except KeyboardInterrupt as e:
            left = workdir.clean(base, keep=False)   # [] when nothing is left

Signals: tools/interrupts.py (the first raises Interrupted, later ones are ignored
until the block ends, so this cleanup cannot be cut short half-way).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

from fuse_mount import loopdev
from fuse_mount.loopdev import DELETED

from .procgroup import _running, descendants


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mounts_under(root: str) -> list[str]:
    """Mount points at or below root, deepest first (from /proc/self/mountinfo)."""
    found = {mp for mp, _, _ in loopdev.mountinfo() if _under(mp, root)}
    return sorted(found, key=len, reverse=True)


def loops_under(root: str) -> list[str]:
    """Loop devices whose backing file is below root (as the kernel names it)."""
    out = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/sys/block")):
            if not name.startswith("loop"):
                continue
            with contextlib.suppress(OSError), \
                    open(f"/sys/block/{name}/loop/backing_file") as f:
                if _under(f.read().rstrip("\n").removesuffix(DELETED), root):
                    out.append(f"/dev/{name}")
    return out


def children_using(*roots: str) -> list[int]:
    """Our descendants (children first) whose command line or environment names
    something below one of roots: a fio job is a grandchild in a session of its own,
    and names its file only in its environment (BENCH_FILE)."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            args = b"".join(open(f"/proc/{pid}/{f}", "rb").read()   # noqa: SIM115
                            for f in ("cmdline", "environ"))
        except OSError:
            continue
        text = args.decode(errors="surrogateescape")
        if any(r in text for r in roots):
            out.append(pid)
    return out


def _end(pids: list[int], timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        continue
                except ChildProcessError:   # not our child: gone once it is not running
                    if _running(pid):
                        continue
                pids.remove(pid)
            time.sleep(0.05)


def _run(*cmd: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(cmd, capture_output=True, timeout=30, check=False)


def clean(root: str | None, keep: bool = False, timeout: float = 30.0) -> list[str]:
    """End our children still working below root (SIGTERM, SIGKILL after ``timeout``),
    unmount what is mounted there (a FUSE daemon's mount: fusermount3 -u, then lazily),
    detach loop devices backed there, and remove root unless ``keep``. Returns what is
    left, one phrase each (empty: everything is gone). Never removes files through a
    mount that is still there."""
    if root is None:
        return []
    given, root = root, os.path.realpath(root)
    _end(children_using(given, root), timeout)
    for mp in mounts_under(root):
        loopdev.unmount_ladder(mp, loopdev.ANY_UNMOUNT)
    for dev in loops_under(root):
        _run("losetup", "-d", dev)
    left = [f"mount {m}" for m in mounts_under(root)]
    left += [f"loop device {d}" for d in loops_under(root)]
    left += [f"process {p}" for p in children_using(given, root)]
    if not keep and not left:
        shutil.rmtree(root, ignore_errors=True)
        if os.path.lexists(root):
            left.append(f"directory {root}")
    return left
