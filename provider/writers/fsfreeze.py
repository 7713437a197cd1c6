"""FsFreezeWriter: freeze the filesystems mounted from our volumes (FIFREEZE / FITHAW).

What ``fsfreeze --freeze`` does, for exactly the filesystems that live on the volumes of a
snapshot set (found through their loop devices, see :mod:`provider.writers.mounts`):
the kernel flushes the filesystem, makes its on-disk image consistent (journal committed)
and blocks every new write until thawed. Read-only filesystems are skipped.

Details:

* FIFREEZE (and FITHAW) is issued on an O_RDONLY fd of the mount point directory, by a
  helper PROCESS that inherits only that fd (a helper thread waits for it): it can block for
  long (it writes back all dirty data, through the loop device and our FUSE mount). In
  a thread of the daemon, a kill -9 during that wait left the daemon a zombie for good:
  the frozen thread never exits, so /dev/fuse is never closed and the kernel never aborts
  the connection the freeze waits on. A child that does not hold /dev/fuse lets the
  daemon die, the connection abort and the freeze fail. If it does not return within the
  timeout, the writer raises ``WriterError(timed_out=True)``; the helper thread thaws
  the filesystem itself as soon as the ioctl returns (the kernel cannot be interrupted
  earlier).
* Discovery makes no system call on the images (MOUNT/volumes/<name>.img): their paths
  are compared lexically and the nesting is read from mountinfo. A stat there is a FUSE
  request that our own trio thread must answer; a kill -9 between the daemon reading it
  and answering it left the stat'ing worker thread in uninterruptible sleep
  (request_wait_answer) for good, so the daemon could not finish dying either (the
  residual "hung daemon during a plex create" of tests/test_crash_trials.py).
* The fd is checked to be on the expected mount (``mnt_id`` in /proc/self/fdinfo), so a
  mount point covered by another mount is never frozen by mistake.
* Nested volumes (an image on a filesystem of another volume of the set) are frozen
  innermost first and thawed outermost first.
* EBUSY (already frozen by someone else, e.g. ``fsfreeze -f``) is an error; it is not
  ours to thaw.
* The writer records exactly the filesystems *it* froze and keeps their fds open until
  thawed (so thaw hits the same filesystem, and it cannot be unmounted meanwhile); thaw
  thaws only those. A filesystem someone else thawed meanwhile (EINVAL) is logged.

Needs CAP_SYS_ADMIN (root).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fuse_mount.loopdev import DELETED

from .base import Component, FileSpec, UsageType, Writer, WriterError, WriterMetadata
from .mounts import (
    MountEntry,
    VolumeMount,
    find_volume_mounts,
    mount_holding,
    parse_mountinfo,
    writable_filesystems,
)

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878    # _IOWR('X', 120, int)


def fd_mount_id(fd: int) -> int | None:
    """The mount id of an open fd (from /proc/self/fdinfo), None if not known."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def thaw_mount_point(path: str) -> bool:
    """FITHAW on ``path``. True if it was frozen; False if it was not (EINVAL).
    For cleanup (tests, rescue): the writer itself thaws through the fds it keeps."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _ioctl_in_child(fd, FITHAW)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


@dataclass
class _Freeze:
    """One FIFREEZE in flight or done."""

    vm: VolumeMount
    fd: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    error: OSError | None = None
    abandoned: bool = False   # the writer gave up waiting: the helper cleans up

    def run(self) -> None:
        try:
            _ioctl_in_child(self.fd, FIFREEZE)
        except OSError as e:
            self.error = e
        with self.lock:
            self.done.set()
            if not self.abandoned:
                return
        # The writer timed out and is gone: undo what the kernel finally did.
        try:
            if self.error is None:
                _ioctl_in_child(self.fd, FITHAW)
                log.warning("late freeze of %s finished after the timeout: thawed it",
                            self.vm.mount_point)
        except OSError as e:
            log.error("thawing %s after a late freeze: %s", self.vm.mount_point, e)
        finally:
            os.close(self.fd)


# The child: one ioctl on the fd it inherited; its exit status is the errno (0: done).
_CHILD = ("import fcntl, sys\n"
          "try:\n"
          "    fcntl.ioctl(int(sys.argv[1]), int(sys.argv[2]), 0)\n"
          "except OSError as e:\n"
          "    sys.exit(e.errno or 1)\n")


def _ioctl_in_child(fd: int, request: int) -> None:
    """FIFREEZE / FITHAW on ``fd`` in a child process holding nothing else of ours (see
    the module docstring: never /dev/fuse; a thaw may write the superblock through our
    mount too). Raises OSError as the ioctl would."""
    res = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, str(fd), str(request)],
                         pass_fds=(fd,), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if res.returncode > 0:
        raise OSError(res.returncode, os.strerror(res.returncode))
    if res.returncode < 0:   # killed (by a signal): say so, not a made-up errno
        raise OSError(errno.EINTR, f"the freeze helper was killed by signal "
                      f"{-res.returncode}")


def _freeze_error(vm: VolumeMount, e: OSError) -> WriterError:
    mp = vm.mount_point
    if e.errno == errno.EBUSY:
        return WriterError(f"{mp} is already frozen by someone else (fsfreeze -u {mp} "
                           "thaws it)", retryable=True)
    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
        return WriterError(f"{mp}: {vm.mount.fstype} does not support freezing; exclude "
                           "the fsfreeze writer or unmount it")
    if e.errno == errno.EPERM:
        return WriterError(f"freezing {mp} needs CAP_SYS_ADMIN: run as root")
    return WriterError(f"freezing {mp} failed: {os.strerror(e.errno or 0)}",
                       retryable=e.errno in (errno.EAGAIN, errno.EINTR, errno.ENOMEM))


def nesting_order(targets: Sequence[VolumeMount],
                  mounts: Sequence[MountEntry] | None = None) -> list[VolumeMount]:
    """``targets`` with nested filesystems first: a filesystem whose loop image lives on
    another target must be frozen before it (freezing flushes through the image, which
    would wait forever on a frozen host) and thawed after it (thaw writes the superblock).
    Otherwise the given order is kept.

    Which filesystem holds an image is read from mountinfo (the mount whose mount point
    is the longest prefix of the kernel's resolved backing-file path), never by a stat of
    the image: that would be a FUSE request to our own daemon (see mounts.py)."""
    by_dev = {t.dev: t for t in targets}
    if len(by_dev) < 2:
        return list(targets)
    mounts = parse_mountinfo() if mounts is None else mounts

    def host(t: VolumeMount) -> VolumeMount | None:
        path = os.path.normpath(t.loop.backing_file.removesuffix(DELETED))
        m = mount_holding(path, mounts)
        return None if m is None else by_dev.get(m.dev)

    def depth(t: VolumeMount) -> int:
        n, seen = 0, {t.dev}
        h = host(t)
        while h is not None and h.dev not in seen:
            n, seen = n + 1, seen | {h.dev}
            h = host(h)
        return n

    return sorted(targets, key=lambda t: -depth(t))


class FsFreezeWriter(Writer):
    """Freezes every writable filesystem mounted from the volumes being snapshotted.

    ``volume_dir`` (e.g. ``MOUNT/volumes``) only limits what ``identify()`` reports (the
    filesystems on loop devices backed by images in that directory -- or in another
    host's view of it, ``MOUNT/hosts/<host>/volumes``; all loop-backed ones if None).
    ``freeze`` uses exactly the volumes it is given. ``own_mount``: the FUSE mount of the
    daemon this writer runs in (resolved, no symlinks below it); volume paths below it are
    compared lexically, never stat'ed (see the module docstring).
    """

    usage_type = UsageType.VSS_UT_SYSTEMSERVICE
    freeze_order = 90

    def __init__(self, volume_dir: str | os.PathLike[str] | None = None, *,
                 name: str = "fsfreeze",
                 own_mount: str | os.PathLike[str] | None = None) -> None:
        # Lexical on purpose: volume_dir is usually MOUNT/volumes, and a stat on our own
        # FUSE mount from the daemon's trio thread would deadlock it (the daemon passes a
        # realpath'ed mount point). Image paths below own_mount (the daemon's MOUNT) are
        # never stat'ed at all, not even from worker threads (lexical_under, see
        # mounts.py): a kill -9 while such a stat waited for our own answer left the
        # daemon a zombie with a hung mount.
        vdir = os.path.abspath(volume_dir) if volume_dir is not None else None
        super().__init__(name, vdir or "")
        self.volume_dir = vdir
        self.own_mount = os.path.abspath(own_mount) if own_mount is not None else None
        self._lock = threading.Lock()
        self._held: list[_Freeze] = []

    # ------------------------------------------------------------------ discovery
    def targets(self, volumes: Sequence[str]) -> list[VolumeMount]:
        """The filesystems freeze would freeze: one mount per writable filesystem, in
        freeze order (see :func:`nesting_order`)."""
        return nesting_order(writable_filesystems(
            find_volume_mounts(volumes, lexical_under=self.own_mount)))

    def involved(self, volumes: Sequence[str]) -> bool:
        return bool(self.targets(volumes))

    @property
    def frozen_mounts(self) -> list[str]:
        """Mount points this writer froze and has not thawed yet."""
        with self._lock:
            return [f.vm.mount_point for f in self._held]

    def identify(self) -> WriterMetadata:
        comps = []
        for vm in find_volume_mounts(None, lexical_under=self.own_mount):
            if self.volume_dir is not None and not self._ours(vm.loop.backing_file):
                continue
            logical = os.path.splitext(os.path.basename(vm.volume))[0]
            comps.append(Component(
                name=vm.mount_point, logical_path=logical, component_type="filegroup",
                files=[FileSpec(vm.mount_point, "*", True)], volumes=[vm.volume]))
        return self._metadata(comps)

    def _ours(self, backing_file: str) -> bool:
        """In volume_dir, or in MOUNT/hosts/<host>/volumes (LUN masking: the same
        volumes as another host sees them)."""
        assert self.volume_dir is not None
        path = os.path.normpath(backing_file)
        vdir = self.volume_dir.rstrip("/")
        if path.startswith(vdir + "/"):
            return True
        mount, leaf = os.path.split(vdir)
        rel = path[len(mount) + 1:].split("/") if path.startswith(mount + "/") else []
        return len(rel) == 4 and rel[0] == "hosts" and rel[2] == leaf

    # ------------------------------------------------------------------ events
    def freeze(self, volumes: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._held:
                raise WriterError("already frozen (" + ", ".join(
                    f.vm.mount_point for f in self._held) + "): thaw first")
            try:
                for vm in self.targets(volumes):
                    self._freeze_one(vm, deadline - time.monotonic())
            except BaseException:
                errors = self._thaw_held()
                for e in errors:
                    log.error("rolling back the freeze: %s", e)
                raise

    def _freeze_one(self, vm: VolumeMount, remaining: float) -> None:
        mp = vm.mount_point
        if remaining <= 0:
            raise WriterError(f"no time left to freeze {mp}", timed_out=True)
        try:
            fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise WriterError(f"cannot open mount point {mp}: {e.strerror}",
                              retryable=True) from e
        mnt = fd_mount_id(fd)
        if mnt is not None and mnt != vm.mount.mount_id:
            os.close(fd)
            raise WriterError(f"{mp} is covered by another mount; cannot freeze the "
                              f"filesystem of {vm.loop.path} through it", retryable=True)
        job = _Freeze(vm, fd)
        threading.Thread(target=job.run, name=f"FIFREEZE {mp}", daemon=True).start()
        finished = job.done.wait(remaining)
        with job.lock:
            if not finished and not job.done.is_set():
                job.abandoned = True
                raise WriterError(f"freezing {mp} did not finish within {remaining:.3g} s "
                                  "(slow or stuck writeback); it is thawed as soon as the "
                                  "kernel returns", timed_out=True)
        if job.error is not None:
            os.close(fd)
            raise _freeze_error(vm, job.error) from job.error
        self._held.append(job)
        log.info("froze %s (%s on %s, volume %s)", mp, vm.mount.fstype, vm.device, vm.volume)

    def _thaw_held(self) -> list[str]:
        """Thaw what we froze, in reverse order; returns the errors. Caller holds _lock."""
        held, self._held = self._held, []
        errors = []
        for job in reversed(held):
            mp = job.vm.mount_point
            try:
                _ioctl_in_child(job.fd, FITHAW)
                log.info("thawed %s", mp)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    log.warning("%s was not frozen any more (thawed by someone else)", mp)
                else:
                    errors.append(f"thawing {mp}: {os.strerror(e.errno or 0)}")
            finally:
                os.close(job.fd)
        return errors

    def thaw(self) -> None:
        with self._lock:
            errors = self._thaw_held()
        if errors:
            raise WriterError("; ".join(errors))

    def abort(self) -> None:
        self.thaw()
