"""Which filesystems live on our volumes: loop devices -> block devices -> mounts.

A volume is an image file (``MOUNT/volumes/<name>.img``). A user attaches it with
``losetup``, maybe partitions it or stacks device-mapper on it, makes a filesystem and
mounts it. Starting from the image paths we find:

1. the loop devices whose ``/sys/block/loopN/loop/backing_file`` (resolved) is one
   of the images (several loop devices may share one image);
2. every block device stacked on each: the loop device itself, its partitions
   (``loopNp1``...) and, transitively, their holders (dm/LVM/crypt);
3. the mounts of those devices in ``/proc/self/mountinfo``, matched by major:minor (and,
   for filesystems such as btrfs that report an anonymous device number, by source path).

Only this process's mount namespace is seen: mounts made inside other namespaces (e.g.
containers) are not found. Plain synchronous code, no root needed to discover.

No system call here touches a volume image or a path below one: backing files (which
the kernel reports as absolute, resolved paths) are compared lexically, and caller paths
below ``lexical_under`` (the daemon's own FUSE mount, where there are no symlinks) are
only normalised, never realpath'ed. Inside ``shadowplex serve`` a stat of
``MOUNT/volumes/v.img`` is a FUSE request to the daemon itself: a kill -9 while it is
in flight leaves that thread waiting for an answer forever (the kernel waits
uninterruptibly once the request was read) and the daemon a zombie with a hung mount.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# the mount table's reader is fuse_mount.loopdev's (re-exported for this package's users)
from fuse_mount.loopdev import DELETED, Dev, parse_dev
from fuse_mount.loopdev import MOUNTINFO as MOUNTINFO
from fuse_mount.loopdev import MountEntry as MountEntry
from fuse_mount.loopdev import parse_mountinfo as parse_mountinfo

SYS_BLOCK = "/sys/block"
SYS_CLASS_BLOCK = "/sys/class/block"


@dataclass(frozen=True)
class LoopDevice:
    name: str            # loop0
    path: str            # /dev/loop0
    dev: Dev
    backing_file: str    # as the kernel reports it (realpath of the image)
    read_only: bool


@dataclass(frozen=True)
class VolumeMount:
    """A mount of a filesystem that lives on a volume image."""

    volume: str          # the image path (as given by the caller, else the backing file)
    loop: LoopDevice
    device: str          # kernel name of the mounted block device: loop0, loop0p1, dm-0
    mount: MountEntry

    @property
    def mount_point(self) -> str:
        return self.mount.mount_point

    @property
    def dev(self) -> Dev:
        return self.mount.dev

    @property
    def read_only(self) -> bool:
        return self.mount.read_only


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def list_loop_devices(sys_block: str = SYS_BLOCK) -> list[LoopDevice]:
    """Every attached loop device (one with a backing file)."""
    out = []
    try:
        names = sorted(n for n in os.listdir(sys_block) if n.startswith("loop"))
    except OSError:
        return []
    for name in names:
        backing = _read(os.path.join(sys_block, name, "loop", "backing_file"))
        dev = _read(os.path.join(sys_block, name, "dev"))
        if not backing or not dev:
            continue  # not attached (or detached meanwhile)
        ro = (_read(os.path.join(sys_block, name, "ro")) or "0").strip() == "1"
        out.append(LoopDevice(name, f"/dev/{name}", parse_dev(dev),
                              backing.rstrip("\n"), ro))
    return out


def stacked_devices(name: str, sys_class_block: str = SYS_CLASS_BLOCK) -> dict[Dev, str]:
    """The block device ``name`` and everything on it: partitions and, transitively,
    holders (device-mapper). Maps major:minor -> kernel name."""
    out: dict[Dev, str] = {}
    todo = [name]
    while todo:
        n = todo.pop()
        base = os.path.join(sys_class_block, n)
        dev = _read(os.path.join(base, "dev"))
        if dev is None:
            continue
        d = parse_dev(dev)
        if d in out:
            continue
        out[d] = n
        try:
            entries = os.listdir(base)
        except OSError:
            entries = []
        # partitions are subdirectories with a "partition" file (loop0/loop0p1)
        todo += [e for e in entries if os.path.exists(os.path.join(base, e, "partition"))]
        with contextlib.suppress(OSError):
            todo += os.listdir(os.path.join(base, "holders"))
    return out


def _same_device_path(source: str, kernel_name: str) -> bool:
    if not source.startswith("/dev/"):
        return False
    return os.path.realpath(source) == f"/dev/{kernel_name}"


def _realpath(p: str) -> str:
    return os.path.realpath(os.fspath(p))


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def canonical(path: str, lexical_under: str | None = None) -> str:
    """realpath(path); only normalised (no system call) if it lies below
    ``lexical_under`` (see the module docstring)."""
    p = os.path.abspath(os.fspath(path))
    if lexical_under is not None and _under(p, os.path.normpath(lexical_under)):
        return p
    return _realpath(p)


def find_volume_mounts(volumes: Iterable[str] | None = None, *,
                       loops: Sequence[LoopDevice] | None = None,
                       mounts: Sequence[MountEntry] | None = None,
                       lexical_under: str | None = None) -> list[VolumeMount]:
    """Mounts of filesystems on loop devices backed by ``volumes`` (image paths), or by
    any file if ``volumes`` is None. In mountinfo order; read-only ones included.
    ``volumes`` below ``lexical_under`` are not realpath'ed (see the module docstring)."""
    wanted: dict[str, str] | None = None
    if volumes is not None:
        wanted = {}
        for v in volumes:
            wanted.setdefault(canonical(v, lexical_under), os.fspath(v))
    loops = list_loop_devices() if loops is None else loops
    mounts = parse_mountinfo() if mounts is None else mounts
    out = []
    for lp in loops:
        if wanted is not None:
            # " (deleted)": the kernel's name for a backing file whose name went away
            # while attached -- e.g. a volume presented to another host's view only
            # (its loop devices go on working on the same LUN). The kernel's name is
            # resolved already: compared as is, never stat'ed.
            back = os.path.normpath(lp.backing_file)
            volume = (wanted.get(back) or wanted.get(
                os.path.normpath(lp.backing_file.removesuffix(DELETED))))
            if volume is None:
                continue
        else:
            volume = lp.backing_file
        devices = stacked_devices(lp.name)
        for m in mounts:
            kname = devices.get(m.dev)
            if kname is None:
                kname = next((k for k in devices.values() if _same_device_path(m.source, k)),
                             None)
            if kname is not None:
                out.append(VolumeMount(volume, lp, kname, m))
    return out


def writable_filesystems(mounts: Iterable[VolumeMount]) -> list[VolumeMount]:
    """One mount per filesystem (device) that can be written: its superblock is
    read-write and at least one of its mounts is. Read-only ones have nothing to freeze."""
    by_dev: dict[Dev, list[VolumeMount]] = {}
    for vm in mounts:
        by_dev.setdefault(vm.dev, []).append(vm)
    out = []
    for group in by_dev.values():
        if "ro" in group[0].mount.super_options:
            continue
        rw = [vm for vm in group if not vm.read_only]
        if rw:
            # prefer the mount of the filesystem root: the shortest bind path
            out.append(min(rw, key=lambda vm: (vm.mount.root != "/", vm.mount.mount_id)))
    return out


def mount_holding(real: str, mounts: Sequence[MountEntry]) -> MountEntry | None:
    """The mount whose mount point is the longest prefix of the resolved path ``real``
    (the last one listed when stacked). Lexical: no system call."""
    best: MountEntry | None = None
    for m in mounts:
        mp = m.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    return best


def mount_of_path(path: str, volume_mounts: Iterable[VolumeMount],
                  mounts: Sequence[MountEntry] | None = None) -> VolumeMount | None:
    """The volume mount holding ``path`` (which need not exist), if any: the mount with
    the longest mount point containing realpath(path), the last one when stacked."""
    real = _realpath(path)
    mounts = parse_mountinfo() if mounts is None else mounts
    best = mount_holding(real, mounts)
    if best is None:
        return None
    return next((vm for vm in volume_mounts if vm.mount.mount_id == best.mount_id), None)
