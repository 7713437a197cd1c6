"""Who keeps the daemon's FUSE mount busy: what `shadowplex serve` names when it refuses
to stop (umount(2) said EBUSY).

    users = find(MOUNT)       # MOUNT: the daemon's realpath'ed mount point
    if users: log.error("... busy (%s)", users)

Everything is read as TEXT from the kernel's own reports, never by looking at a path
below MOUNT: /sys/block/loop*/loop/backing_file (loop devices on our images),
/proc/self/mountinfo (filesystems on those loop devices, mounts inside MOUNT) and the
link targets of /proc/<pid>/{fd/*,cwd,root} and the paths in /proc/<pid>/maps
(processes with files open, a working directory, or mappings below MOUNT). A stat,
realpath or open of a path below MOUNT from a daemon thread is a FUSE request to the
daemon itself: from the trio thread that serves FUSE it never gets an answer (the
shutdown hang of issue 12), from a worker thread it hangs a kill -9. readlink of a
/proc link prints the kernel's name of the file (d_path) without asking its filesystem.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from fuse_mount.loopdev import DELETED, mapped_files, process_name

from .writers.mounts import list_loop_devices, parse_mountinfo, stacked_devices


def _under(path: str, root: str) -> bool:
    path = path.removesuffix(DELETED)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _rel(path: str, root: str) -> str:
    return path.removesuffix(DELETED)[len(root.rstrip("/")) + 1:] or "."


@dataclass
class Users:
    """What uses a mount; str() is one line for the log."""

    loops: list[str] = field(default_factory=list)       # "/dev/loop3 on volumes/t.img ..."
    mounts: list[str] = field(default_factory=list)      # mounts inside the mount point
    processes: list[str] = field(default_factory=list)   # "pid 123 (sleep): volumes/t.img"

    def __bool__(self) -> bool:
        return bool(self.loops or self.mounts or self.processes)

    def __str__(self) -> str:
        parts = []
        if self.loops:
            parts.append("loop devices: " + ", ".join(self.loops))
        if self.mounts:
            parts.append("mounts inside it: " + ", ".join(self.mounts))
        if self.processes:
            parts.append("processes: " + ", ".join(self.processes))
        return "; ".join(parts) or "no user found in /proc and /sys"


def _loops(root: str) -> list[str]:
    mounts = parse_mountinfo()
    out = []
    for lp in list_loop_devices():
        if not _under(lp.backing_file, root):
            continue
        devs = stacked_devices(lp.name)
        on = [f"{m.fstype} {m.source} at {m.mount_point}" for m in mounts if m.dev in devs]
        holders = sorted(n for n in devs.values() if n != lp.name)
        out.append(f"{lp.path} on {_rel(lp.backing_file, root)}"
                   + (f" (holders {' '.join(holders)})" if holders else "")
                   + (f" (mounted: {'; '.join(on)})" if on else ""))
    return out


def _submounts(root: str) -> list[str]:
    return [f"{m.fstype} at {m.mount_point}" for m in parse_mountinfo()
            if m.mount_point != root and _under(m.mount_point, root)]


def _links(pid: str) -> list[str]:
    """Targets of a process's fds, cwd and root, and the files it maps (text only)."""
    base = f"/proc/{pid}"
    names = [f"{base}/cwd", f"{base}/root"]
    with contextlib.suppress(OSError):
        names += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
    out = []
    for n in names:
        try:
            out.append(os.readlink(n))
        except OSError:
            continue
    return out + mapped_files(pid)


def _processes(root: str, limit: int) -> list[str]:
    out: list[str] = []
    try:
        pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
    except OSError:
        return []
    for pid in pids:
        hits = sorted({_rel(t, root) for t in _links(pid) if _under(t, root)})
        if hits:
            if len(out) == limit:
                out.append("...")
                break
            more = f" +{len(hits) - 3}" if len(hits) > 3 else ""
            out.append(f"pid {pid} ({process_name(pid)}): {' '.join(hits[:3])}{more}")
    return out


def find(mountpoint: str, limit: int = 20) -> Users:
    """Loop devices, mounts and processes using ``mountpoint`` (the real path, compared as
    text; see the module docstring). At most ``limit`` processes are named."""
    root = os.path.normpath(mountpoint)
    return Users(_loops(root), _submounts(root), _processes(root, limit))
