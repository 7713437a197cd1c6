"""FUSE session lifecycle and mount-state helpers.

`run_mount()` mounts the pool's view at a directory and serves it on the current trio loop
until the mount goes away (umount / fusermount3 -u) or the task is cancelled; on every exit
path it calls pyfuse3.close(unmount=True) synchronously (a lazy unmount if the kernel
still has it), so a cancelled or crashed session never leaves a live-looking mount.

pyfuse3 keeps one session per process (module globals), so only one run_mount() may be
active in a process at a time.

The mount is `fuse.shadowplex` in /proc/self/mountinfo (source "shadowplex"); a daemon
killed with -9 leaves it behind as a dead mount on which every access fails with ENOTCONN
("Transport endpoint is not connected") -- never an empty, healthy-looking directory.
`mount_state()` tells the three cases apart; `force_unmount()` cleans a dead one.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from . import loopdev
from .barrier import WriteBarrier
from .operations import ShadowOperations

log = logging.getLogger(__name__)

FSNAME = "shadowplex"
FSTYPE = "fuse." + FSNAME
_active = False


class MountError(RuntimeError):
    """The FUSE mount itself failed (no /dev/fuse, no permission...). One-line message."""


def mount_options(debug: bool = False, allow_other: bool = False) -> set[str]:
    opts = {f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    return opts


async def run_mount(
    pool: Any,
    mountpoint: str | os.PathLike[str],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    debug: bool = False,
    barrier: WriteBarrier | None = None,
    ops: ShadowOperations | None = None,
    allow_other: bool = False,
    max_tasks: int = 99,
) -> None:
    """Mount `pool` at `mountpoint` and serve it until unmounted or cancelled.

    task_status.started(ops) is called once the mount exists (use `await nursery.start(
    run_mount, pool, path)` to get the ShadowOperations, whose `.barrier` is the write
    barrier). Returns normally when the filesystem is unmounted from outside.
    """
    global _active
    if _active:
        raise RuntimeError("a FUSE session is already running in this process")
    if ops is None:
        ops = ShadowOperations(pool, barrier)
    path = os.path.abspath(os.fspath(mountpoint))
    _active = True
    try:
        pyfuse3.init(ops, path, mount_options(debug, allow_other))
    except RuntimeError as e:
        _active = False
        hint = "" if os.path.exists("/dev/fuse") else "; /dev/fuse is missing (modprobe fuse)"
        raise MountError(f"cannot mount FUSE at {path}: {e}{hint}") from None
    except BaseException:
        _active = False
        raise
    log.info("mounted %s at %s", getattr(pool, "path", "pool"), path)
    try:
        task_status.started(ops)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        log.info("FUSE session at %s ended (unmounted)", path)
    finally:
        # Synchronous on purpose: runs even when cancelled. A no-op unmount if the kernel
        # already dropped the mount; a lazy (MNT_DETACH) unmount otherwise.
        try:
            pyfuse3.close(unmount=True)
        finally:
            _active = False
        log.info("FUSE session at %s closed", path)


# --------------------------------------------------------------------------- mount state


class MountState(enum.Enum):
    NOT_MOUNTED = "not-mounted"
    MOUNTED = "mounted"      # alive (or hung: not answering statfs in time)
    STALE = "stale"          # listed in mountinfo, statfs fails ENOTCONN: server gone


@dataclass(frozen=True)
class MountInfo:
    state: MountState
    fstype: str | None = None
    source: str | None = None

    @property
    def ours(self) -> bool:
        return self.fstype == FSTYPE


def _probe(path: str, timeout: float) -> OSError | None | bool:
    """statvfs(path) in a helper thread: None if it answered, the OSError if it failed,
    False if it did not answer within timeout (a hung server). statfs is never cached by
    the kernel, so unlike stat() it always reaches the FUSE server (or fails ENOTCONN)."""
    result: list[OSError | None] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=probe, name="mount-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else False


def mount_state(path: str | os.PathLike[str], timeout: float = 5.0) -> MountInfo:
    """What is mounted at exactly `path`: nothing, a live mount, or a dead one (ENOTCONN).

    A mount whose server does not answer within `timeout` counts as MOUNTED (alive but
    busy or hung: never something to clean up automatically).
    """
    p = os.path.abspath(os.fspath(path))
    found = None
    for mp, fstype, source in loopdev.mountinfo():
        if mp == p:
            found = (fstype, source)  # the last one listed is the top of the stack
    if found is None:
        return MountInfo(MountState.NOT_MOUNTED)
    res = _probe(p, timeout)
    if isinstance(res, OSError):
        if res.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return MountInfo(MountState.STALE, *found)
        raise res
    return MountInfo(MountState.MOUNTED, *found)


def wait_mounted(
    path: str | os.PathLike[str], proc: subprocess.Popen[Any] | None, timeout: float = 15.0
) -> None:
    """Poll until `path` is a live mount; fail early if `proc` (the daemon) exits.

    Raises RuntimeError (process died: its exit code in the message) or TimeoutError.
    """
    p = os.path.abspath(os.fspath(path))
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {proc.returncode} before {p} "
                               f"was mounted")
        try:
            if os.path.ismount(p) and mount_state(p).state is MountState.MOUNTED:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{p} not mounted after {timeout:.0f} s")
        time.sleep(0.05)


def force_unmount(path: str | os.PathLike[str], timeout: float = 15.0) -> bool:
    """Unmount a FUSE mount, live or dead: fusermount3 -u, then -u -z, then umount -l.

    Returns True if nothing is mounted at path afterwards.
    """
    p = os.path.abspath(os.fspath(path))
    for cmd in (["fusermount3", "-u", p], ["fusermount3", "-u", "-z", p], ["umount", "-l", p]):
        if mount_state(p).state is MountState.NOT_MOUNTED:
            return True
        if shutil.which(cmd[0]) is None:
            continue
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 check=False)
            if res.returncode != 0:
                log.debug("%s: %s", " ".join(cmd), res.stderr.strip())
        except subprocess.TimeoutExpired:
            log.warning("%s timed out", " ".join(cmd))
    return mount_state(p).state is MountState.NOT_MOUNTED


def umount_nonlazy(path: str | os.PathLike[str]) -> None:
    """umount2(path, 0): fails with OSError(EBUSY) while anything uses the mount (open
    files, loop devices backed by an image) instead of detaching it lazily.

    Blocking: call it in a worker thread while the FUSE session keeps serving.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.umount2(os.fsencode(os.path.abspath(os.fspath(path))), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(path))
