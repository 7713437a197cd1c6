"""Loop devices and read-only mounts: the host-side half of "expose".

Everything here shells out to util-linux (losetup, blkid, mount, umount), the tools admins
already know, and turns their failures into one-line exceptions:

    LoopError            base: a command failed (message names the command and its stderr)
    MountTargetError     the target directory is missing / not a directory / not empty /
                         already a mountpoint / inside the pool or its mount; raised
                         BEFORE anything is changed (symlinks in it are resolved first)
    NoFilesystemError    blkid found no filesystem on the device

`expose_mount()` attaches an image read-only, detects its filesystem and mounts it with
the options a snapshot needs (ext4: ro,noload; xfs: ro,norecovery,nouuid; else ro). On any
failure it detaches the loop device again: it never leaves one behind. Nothing here is
assigned automatically (no drive letters, no automount): the caller names every path.

Synchronous by design (runs in a worker thread when called from the trio loop).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import stat as _stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CMD_TIMEOUT = 60.0  # seconds for any single util-linux command
# the kernel's mark on a path (a loop backing file, an fd link, a mapping) whose name has
# gone or now leads to another file
DELETED = " (deleted)"

# Mount options a frozen, read-only image needs. ext4/ext3: `noload` skips journal replay
# (a snapshot of a live fs has a dirty journal and cannot be written). xfs: `norecovery`
# likewise, `nouuid` because the origin with the same UUID may be mounted too.
# Every snapshot mount is also nosuid,nodev,noexec: its content was written by whoever
# wrote the volume (another host, over NBD), and a backup reads files, it runs nothing.
RO_MOUNT_OPTIONS: dict[str, str] = {
    "ext4": "ro,noload,nosuid,nodev,noexec",
    "ext3": "ro,noload,nosuid,nodev,noexec",
    "ext2": "ro,nosuid,nodev,noexec",
    "xfs": "ro,norecovery,nouuid,nosuid,nodev,noexec",
}
DEFAULT_RO_OPTIONS = "ro,nosuid,nodev,noexec"


class LoopError(Exception):
    """A loop/mount operation failed. The message is one line."""


class MountTargetError(LoopError):
    """The mount target is unusable (missing, not a directory, not empty, a mountpoint)."""


class NoFilesystemError(LoopError):
    """No recognisable filesystem on the device."""


@dataclass(frozen=True)
class ExposeRecord:
    dev: str          # /dev/loopN, attached read-only
    mountpoint: str   # absolute path
    fstype: str       # as blkid reported it


# --------------------------------------------------------------------------- helpers


def _run(cmd: list[str], *, what: str) -> str:
    """Run a command; return stdout. Raise LoopError with a one-line message on failure."""
    log.debug("running %s", " ".join(cmd))
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False
        )
    except FileNotFoundError as e:
        raise LoopError(f"{what}: {cmd[0]} not found; install util-linux") from e
    except subprocess.TimeoutExpired as e:
        raise LoopError(f"{what}: {' '.join(cmd)} timed out after {CMD_TIMEOUT:.0f}s") from e
    if res.returncode != 0:
        err = " ".join((res.stderr or res.stdout or "").split()) or f"exit {res.returncode}"
        raise LoopError(f"{what}: {err}")
    return res.stdout


# --------------------------------------------------------------------------- mount table
# The one reader of the mount table (provider/writers/mounts, tools/ and the daemon's
# checks use it) and the one unmount ladder (unmount_ladder): each had its own copy.
MOUNTINFO = "/proc/self/mountinfo"
Dev = tuple[int, int]   # (major, minor)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    dev: Dev
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options or "ro" in self.super_options


def unescape_mount_field(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_dev(text: str) -> Dev:
    """``8:1`` -> (8, 1)."""
    major, minor = text.strip().split(":")
    return int(major), int(minor)


def parse_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount in this namespace, in mountinfo order (empty if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            out.append(MountEntry(
                mount_id=int(fields[0]), dev=parse_dev(fields[2]),
                root=unescape_mount_field(fields[3]),
                mount_point=unescape_mount_field(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1], source=unescape_mount_field(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3
                else ()))
        except (ValueError, IndexError):
            log.debug("unparsable mountinfo line: %r", line)
    return out


def mountinfo() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) for every mount in this namespace (/proc/self/mountinfo).

    Unlike os.path.ismount() this also sees dead FUSE mounts (stat -> ENOTCONN).
    """
    return [(m.mount_point, m.fstype, m.source) for m in parse_mountinfo()]


def mounted_at(path: str | os.PathLike[str]) -> bool:
    """Something (alive or dead) is mounted exactly at ``path`` (made absolute, not
    resolved: no stat of a path that may be a dead mount)."""
    p = os.path.abspath(os.fspath(path))
    return any(mp == p for mp, _, _ in mountinfo())


# gentle first, lazy last: a FUSE mount (also one whose daemon is dead), or anything
FUSE_UNMOUNT = (("fusermount3", "-u"), ("fusermount3", "-u", "-z"), ("umount", "-l"))
ANY_UNMOUNT = (("umount",), ("fusermount3", "-u", "-z"), ("umount", "-l"))


def unmount_ladder(path: str | os.PathLike[str], steps: Sequence[Sequence[str]] = FUSE_UNMOUNT,
                   timeout: float = 30.0) -> bool:
    """Unmount whatever is at ``path`` by trying each command of ``steps`` in turn
    (``[*step, path]``) until nothing is mounted there (mounted_at). A command that is
    not installed is skipped, one that fails or hangs (``timeout`` s) is logged and the
    next tried. True if nothing is mounted at ``path`` afterwards. For cleanup paths:
    `unmount` is the one that reports why a mount is busy."""
    p = os.path.abspath(os.fspath(path))
    for step in steps:
        if not mounted_at(p):
            return True
        if shutil.which(step[0]) is None:
            continue
        cmd = [*step, p]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 check=False)
            if res.returncode != 0:
                log.debug("%s: %s", " ".join(cmd), res.stderr.strip())
        except subprocess.TimeoutExpired:
            log.warning("%s timed out", " ".join(cmd))
    return not mounted_at(p)


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True if something (alive or dead) is mounted exactly at path."""
    p = os.path.abspath(os.fspath(path))
    real = os.path.realpath(p) if os.path.lexists(p) else p
    if any(mp in (p, real) for mp, _, _ in mountinfo()):
        return True
    try:
        return os.path.ismount(p)
    except OSError:
        return False


# --------------------------------------------------------------------------- loop devices


def attach(path: str | os.PathLike[str], read_only: bool, direct_io: bool = False,
           check: bool = True) -> str:
    """Attach a loop device to a file; return "/dev/loopN".

    direct_io=True asks for `--direct-io=on` (no double caching; the backing file then sees
    the device's I/O sizes). The kernel silently falls back to buffered I/O when the backing
    file does not support O_DIRECT at the device's block size. check=False: no stat of
    the path here (the daemon, for its own images: see expose_mount), losetup reports.
    """
    p = os.path.abspath(os.fspath(path))
    if check and not os.path.isfile(p):
        raise LoopError(f"cannot attach {p}: not a regular file")
    cmd = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    if direct_io:
        cmd.append("--direct-io=on")
    cmd.append(p)
    dev = _run(cmd, what=f"losetup {p}").strip().splitlines()
    if not dev or not dev[-1].startswith("/dev/loop"):
        raise LoopError(f"losetup {p}: unexpected output {dev!r}")
    log.info("attached %s -> %s%s", dev[-1], p, " (read-only)" if read_only else "")
    return dev[-1]


def detach(dev: str) -> None:
    """Detach a loop device (`losetup -d`). If it is still mounted the kernel defers it."""
    _run(["losetup", "-d", dev], what=f"losetup -d {dev}")
    log.info("detached %s", dev)


def backing_file(dev: str) -> str | None:
    """The file behind /dev/loopN (None if the device is not attached)."""
    name = os.path.basename(dev)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None


def loops_backed_by(path: str | os.PathLike[str], lexical: bool = False) -> list[str]:
    """Every attached /dev/loopN whose backing file is path (by real path), sorted.
    lexical: compare the text only, no realpath -- for a path under the daemon's own
    FUSE mount, where resolving it is a request the calling daemon thread would wait for
    (a kill -9 meanwhile leaves a zombie daemon and a hung mount)."""
    target = os.path.abspath(os.fspath(path)) if lexical else os.path.realpath(os.fspath(path))
    found = [dev for dev, back in _attached()
             if back == target or back == os.path.abspath(os.fspath(path))]
    return sorted(found, key=lambda d: int(re.sub(r"\D", "", d) or 0))


def loops_under(directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(dev, backing file) for every loop device backed by a file under directory."""
    root = os.path.realpath(os.fspath(directory)).rstrip("/") + "/"
    return sorted((dev, back) for dev, back in _attached() if back.startswith(root))


def _attached() -> Iterator[tuple[str, str]]:
    """(/dev/loopN, backing file as text, without the kernel's deleted mark) of every
    attached loop device, from sysfs (no stat of the backing file)."""
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            back = Path(bf).read_text().rstrip("\n").removesuffix(DELETED)
        except OSError:
            continue   # detached meanwhile
        yield "/dev/" + bf.split("/")[3], back


def _loop_users(dev: str, mounts: list[tuple[str, str, str]],
                skip_mountpoint: str | None = None) -> list[str]:
    """Where a loop device is mounted (itself or a partition) and what holds it (dm)."""
    part = re.compile(re.escape(dev) + r"p\d+")
    out = [f"mounted at {mp}" for mp, _, src in mounts
           if (src == dev or part.fullmatch(src)) and mp != skip_mountpoint]
    try:
        holders = sorted(os.listdir(f"/sys/block/{os.path.basename(dev)}/holders"))
    except OSError:
        holders = []
    if holders:
        out.append(f"held by {', '.join(holders)}")
    return out


def _keys(key: str | Sequence[str] | None) -> list[str]:
    return [] if key is None else [key] if isinstance(key, str) else list(key)


def mapped_files(pid: int | str) -> list[str]:
    """The files a process maps (/proc/PID/maps, as text), each once."""
    out: list[str] = []
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/") and parts[5] not in out:
                    out.append(parts[5])
    except OSError:
        pass
    return out


def process_name(pid: int | str) -> str:
    """A process's command name (/proc/PID/comm); "?" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def users_by_path(classify: Callable[[str], str | Sequence[str] | None],
                  own_loops: Mapping[str, tuple[str, str]] | None = None
                  ) -> list[tuple[str, str]]:
    """What uses files whose path, as the kernel reports it, ``classify`` maps to a key
    or a list of keys (anything else: None). Returns (key, one-line description) for

    - every attached loop device backed by such a path, with where it is mounted;
    - every process (/proc/PID/fd, /proc/PID/maps) with such a path, or one of those
      loop devices, open or mapped;
    - for ``own_loops`` ({/dev/loopN: (key, mountpoint)}, the loop devices the caller
      attached and will take down itself): what else uses them -- other mounts, holders
      (device-mapper), processes with the device open.

    classify gets the kernel's text as is: a path ending in DELETED was opened by a name
    that has since gone or now leads to another file (the kernel dropped its entry);
    the description then says "a former name". Paths are compared as text (the kernel's
    d_path: loop backing files, fd links, maps); no system call touches the paths
    themselves, so a daemon may ask about files under its own FUSE mount (resolving one
    would be a request to itself). Processes in another mount namespace may report
    other paths: callers that can count open files some other way (the FUSE handles)
    should do so too."""
    own = dict(own_loops or {})
    mounts = mountinfo()
    found: list[tuple[str, str]] = []
    devs: dict[str, list[str]] = {dev: [key] for dev, (key, _) in own.items()}

    def shown(raw: str) -> str:
        path = raw.removesuffix(DELETED)
        return path if path == raw else f"{path}, a former name"

    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        dev = "/dev/" + bf.split("/")[3]
        if dev in own:
            continue
        try:
            raw = Path(bf).read_text().rstrip("\n")
        except OSError:
            continue
        keys = _keys(classify(raw))
        if not keys:
            continue
        devs[dev] = keys
        where = ", ".join([shown(raw), *_loop_users(dev, mounts)])
        found += [(key, f"loop device {dev} ({where})") for key in keys]
    for dev, (key, mountpoint) in own.items():
        extra = _loop_users(dev, mounts, skip_mountpoint=mountpoint)
        if extra:
            found.append((key, f"loop device {dev} (the exposure's own, also "
                               f"{', '.join(extra)})"))
    me = os.getpid()
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        pids = []
    for pid in sorted(pids):
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:   # gone, or a kernel thread
            continue
        links: list[tuple[str, str]] = []   # (raw text, "" or "mapped ")
        for fd in fds:
            try:
                links.append((os.readlink(f"/proc/{pid}/fd/{fd}"), ""))
            except OSError:
                continue
        links += [(m, "mapped ") for m in mapped_files(pid)]
        seen: set[str] = set()
        comm: str | None = None
        for raw, how in links:
            keys = devs.get(raw.removesuffix(DELETED)) or _keys(classify(raw))
            if not keys or raw in seen:
                continue
            seen.add(raw)
            if comm is None:
                comm = process_name(pid)
            found += [(key, f"pid {pid} ({comm}, {how}{shown(raw)})") for key in keys]
    return found


def fs_type(dev: str) -> str | None:
    """Filesystem type on a device as blkid probes it (low-level, no cache); None if none."""
    try:
        res = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", "TYPE", dev],
            capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False,
        )
    except FileNotFoundError as e:
        raise LoopError("blkid not found; install util-linux") from e
    except subprocess.TimeoutExpired as e:
        raise LoopError(f"blkid {dev} timed out") from e
    if res.returncode == 2:  # nothing found
        return None
    if res.returncode != 0:
        err = " ".join((res.stderr or "").split()) or f"exit {res.returncode}"
        raise LoopError(f"blkid {dev}: {err}")
    value = res.stdout.strip()
    return value or None


# --------------------------------------------------------------------------- mounts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_mount_target(path: str | os.PathLike[str],
                       refuse_under: Sequence[str | os.PathLike[str]] = ()) -> str:
    """Return the target, symlinks resolved (what mount(8) would mount on), if it is an
    existing, empty directory that is not a mountpoint and not inside any of
    ``refuse_under`` (the pool directory and its FUSE mount); raise MountTargetError
    (changing nothing) otherwise. The message names the path as given, and the resolved
    one when they differ."""
    p = os.path.abspath(os.fspath(path))
    try:
        real = os.path.realpath(p, strict=True)
    except FileNotFoundError:
        raise MountTargetError(
            f"mount target {p} does not exist; create the directory first"
        ) from None
    except (OSError, ValueError) as e:   # ELOOP, ENOTCONN, EACCES; a NUL byte
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise MountTargetError(f"mount target {p} is unusable: {why}") from None
    shown = p if real == p else f"{p} (-> {real})"
    for root in refuse_under:
        r = os.path.realpath(os.fspath(root))
        if _inside(real, r):
            raise MountTargetError(f"mount target {shown} is inside {r}, the pool or its "
                                   "mount; use a directory outside them")
    try:
        st = os.stat(real)
    except OSError as e:
        raise MountTargetError(f"mount target {shown} is unusable: {e.strerror}") from None
    if not _stat.S_ISDIR(st.st_mode):
        raise MountTargetError(f"mount target {shown} is not a directory")
    if is_mountpoint(real):
        raise MountTargetError(f"mount target {shown} is already a mountpoint; unmount it "
                               "first")
    try:
        with os.scandir(real) as it:
            if next(it, None) is not None:
                raise MountTargetError(
                    f"mount target {shown} is not empty; use an empty directory"
                )
    except OSError as e:
        raise MountTargetError(f"mount target {shown} is unreadable: {e.strerror}") from None
    return real


def mount_options(fstype: str) -> str:
    return RO_MOUNT_OPTIONS.get(fstype, DEFAULT_RO_OPTIONS)


def mount_readonly(dev: str, path: str | os.PathLike[str], fstype: str | None = None) -> str:
    """Mount dev read-only at path with the options its filesystem needs; return fstype.

    Refuses a missing / non-directory / non-empty / already-mounted target with
    MountTargetError before doing anything.
    """
    target = check_mount_target(path)
    if fstype is None:
        fstype = fs_type(dev)
        if fstype is None:
            raise NoFilesystemError(f"no filesystem found on {dev}")
    opts = mount_options(fstype)
    _run(["mount", "-t", fstype, "-o", opts, dev, target], what=f"mount {dev} on {target}")
    log.info("mounted %s (%s, %s) on %s", dev, fstype, opts, target)
    return fstype


def unmount(path: str | os.PathLike[str]) -> None:
    """Unmount a filesystem (`umount PATH`; not lazy: a busy mount raises LoopError)."""
    p = os.path.abspath(os.fspath(path))
    _run(["umount", p], what=f"umount {p}")
    log.info("unmounted %s", p)


# --------------------------------------------------------------------------- expose


# check_mount_target in a child process: prints the resolved target, or exits 3 with
# the one-line refusal on stderr
_CHECK_CHILD = ("import sys\n"
                "from fuse_mount.loopdev import MountTargetError, check_mount_target\n"
                "try:\n"
                "    print(check_mount_target(sys.argv[1], sys.argv[2:]))\n"
                "except MountTargetError as e:\n"
                "    print(e, file=sys.stderr)\n"
                "    sys.exit(3)\n")


def check_mount_target_in_child(path: str | os.PathLike[str],
                                refuse_under: Sequence[str | os.PathLike[str]] = ()) -> str:
    """check_mount_target run by a child process. For the daemon: resolving the target
    (a symlink into the daemon's own mount, a directory on a filesystem stacked on one
    of its volumes) may be a FUSE request that only the daemon can answer; a daemon
    thread waiting for it in the kernel would never exit on a kill -9 (zombie daemon,
    hung mount), a child does not keep the daemon alive."""
    p = os.fspath(path)
    if "\0" in p:
        raise MountTargetError(f"mount target {p!r} is unusable: embedded null byte")
    res = subprocess.run([sys.executable, "-I", "-c", _CHECK_CHILD, p,
                          *(os.fspath(r) for r in refuse_under)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         check=False, timeout=60)
    if res.returncode == 0:
        return res.stdout.rstrip("\n")
    if res.returncode == 3:
        raise MountTargetError(res.stderr.strip())
    raise MountTargetError(f"mount target {p}: checking it failed ({res.stderr.strip()})")


def expose_mount(
    image_path: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
    refuse_under: Sequence[str | os.PathLike[str]] = (), isolated: bool = False,
) -> ExposeRecord:
    """Attach image read-only, detect its filesystem, mount it read-only at mountpoint.

    A symlink as (part of) mountpoint is resolved, as mount(8) does; the record, and so
    every later unmount, uses the resolved path. Targets inside ``refuse_under`` are
    refused (see check_mount_target). isolated=True (the daemon, image_path under its own
    mount): no system call of this process touches the target or the image --
    check_mount_target_in_child, and losetup/blkid/mount are child processes anyway.

    On any failure (bad target, no filesystem, mount error, even KeyboardInterrupt) the loop
    device is detached again and the exception propagates; the target is checked before the
    loop device is attached, so a bad target changes nothing at all.
    """
    if isolated:
        target = check_mount_target_in_child(mountpoint, refuse_under)
    else:
        target = check_mount_target(mountpoint, refuse_under)
    dev = attach(image_path, read_only=True, check=not isolated)
    try:
        fstype = fs_type(dev)
        if fstype is None:
            raise NoFilesystemError(
                f"no filesystem found on {os.fspath(image_path)} (attached as {dev})"
            )
        mount_readonly(dev, target, fstype)
    except BaseException:
        try:
            detach(dev)
        except LoopError as e:  # pragma: no cover - logged, the original error wins
            log.error("could not detach %s after a failed expose: %s", dev, e)
        raise
    return ExposeRecord(dev=dev, mountpoint=target, fstype=fstype)


def unexpose_mount(record: ExposeRecord, backing_suffix: str | None = None) -> None:
    """Unmount and detach what expose_mount() set up -- only what is still ours. A busy
    mount raises LoopError and leaves the loop device attached (still mounted).

    Someone may have unmounted it by hand and mounted something else there, or detached
    our loop device and attached another file to it: the mount is unmounted only if its
    top-most source is record.dev (a filesystem mounted over ours: LoopError, nothing
    touched; ours gone: nothing to unmount), the device detached only if its backing file
    ends with ``backing_suffix`` (when given: the daemon's "/.shadow/<id>.img", in any
    host's view; the kernel's path, compared as text)."""
    sources = [src for mp, _, src in mountinfo() if mp == record.mountpoint]
    if record.dev in sources:
        if sources[-1] != record.dev:
            raise LoopError(f"{record.mountpoint}: {sources[-1]} is mounted over the "
                            f"snapshot's {record.dev}; unmount it first")
        unmount(record.mountpoint)
    elif sources:
        log.warning("%s is mounted from %s now, not from %s: left alone",
                    record.mountpoint, sources[-1], record.dev)
    back = backing_file(record.dev)
    if back is not None and (backing_suffix is None
                             or back.removesuffix(DELETED).endswith(backing_suffix)):
        detach(record.dev)
    elif back is not None:
        log.warning("%s is attached to %s now, not to a ...%s: left alone", record.dev,
                    back, backing_suffix)
