"""FUSE session lifecycle and mount-state helpers.

`run_mount()` mounts the pool's view at a directory and serves it on the current trio loop
until the mount goes away (umount / fusermount3 -u) or the task is cancelled; on every exit
path it closes the session synchronously -- pyfuse3.close(unmount=True), once no kernel
notification is in flight (notices.py): a lazy unmount if the kernel still has it -- so a
cancelled or crashed session never leaves a live-looking mount.

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
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from . import loopdev
from .barrier import WriteBarrier
from .lunstore import LunStore
from .operations import ShadowOperations

log = logging.getLogger(__name__)

FSNAME = "shadowplex"
FSTYPE = "fuse." + FSNAME
_active = False


class MountError(RuntimeError):
    """The FUSE mount itself failed (no /dev/fuse, no permission...). One-line message."""


# glibc malloc: the data path allocates and frees 1 MiB request buffers and, on copy-before-
# write, megabytes of 64 KiB pending chunks at a time (freed in bulk by each writeback).
# With the defaults glibc hands the freed heap top back to the kernel (trim) and serves
# 1 MiB blocks with fresh mmaps, so the next requests page-fault and zero that memory
# again: measured -20..30 % on copy-before-write throughput. Keep up to 64 MiB of freed
# heap and serve blocks below 4 MiB from the heap. Process-wide; done once per process.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def tune_malloc(trim_threshold: int = 64 << 20, mmap_threshold: int = 4 << 20) -> bool:
    """Apply the malloc settings above (glibc only; elsewhere a no-op). Returns True if set."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _malloc_tuned = ok
    return ok


# Splice: libfuse reads each request with splice(2) from /dev/fuse into a pipe of its own
# when it can grow that pipe to hold a whole request -- 1 MiB of data (max_pages 256) and a
# 4 KiB header page, which the kernel rounds up to a 2 MiB pipe. The pages of a buffered
# write then reach us by reference and are copied once, by pyfuse3's read of the pipe,
# instead of twice (/dev/fuse -> libfuse's buffer -> the bytes handed to write()): +30 % on
# buffered 1 MiB writes, O_DIRECT unchanged (docs/performance.md "Buffered seq writes").
# Growing a pipe past fs.pipe-max-size (1 MiB by default) needs CAP_SYS_RESOURCE, which root
# does not always have (in this project's VMs it lacks it); libfuse then falls back to
# read(2) for good. So a mount raises that limit to SPLICE_PIPE_BYTES when it is lower
# and /proc/sys lets us (root), before each mount, and logs it. The limit only caps the
# pipes unprivileged processes may ask for; it never lowers it.
SPLICE_PIPE_BYTES = 2 << 20
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
_splice_checked = False


def allow_splice(path: str = PIPE_MAX_SIZE, need: int = SPLICE_PIPE_BYTES) -> bool:
    """Raise fs.pipe-max-size to `need` if it is lower (see "Splice" above). Returns True
    if it is at least `need` afterwards; False, logged once, if it could not be raised."""
    global _splice_checked
    try:
        with open(path) as f:
            current = int(f.read())
        if current >= need:
            return True
        with open(path, "w") as f:
            f.write(f"{need}\n")
    except (OSError, ValueError) as e:
        if not _splice_checked:
            log.info("FUSE requests are read, not spliced: fs.pipe-max-size could not be "
                     "raised to %d (%s)", need, e)
        _splice_checked = True
        return False
    log.info("raised fs.pipe-max-size from %d to %d: libfuse can splice whole FUSE requests",
             current, need)
    _splice_checked = True
    return True


def mount_options(debug: bool = False, allow_other: bool = False) -> set[str]:
    opts = {f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    return opts


# Polling: at queue depth 1 the next request comes a few microseconds after our reply,
# and going to sleep in epoll and being woken costs more than that (tens of us in a VM).
# So, while requests stream (the last one came less than POLL_RECENT_NS ago), wait_readable
# polls the device for up to poll_us before it sleeps in epoll; when idle it never spins,
# nor while a handler waits for a store on the network (an RBD read: the next request
# comes only after that reply, and the spin would hold the GIL its callback needs).
DEFAULT_POLL_US = 50.0
POLL_RECENT_NS = 2_000_000
POLL_HOLD_OFF_NS = 20_000_000   # after kernel notifications are queued (hold_off)


async def run_mount(
    pool: LunStore,
    mountpoint: str | os.PathLike[str],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    debug: bool = False,
    barrier: WriteBarrier | None = None,
    ops: ShadowOperations | None = None,
    allow_other: bool = False,
    max_tasks: int = 99,
    fast_loop: bool = True,
    poll_us: float = DEFAULT_POLL_US,
) -> None:
    """Mount `pool` at `mountpoint` and serve it until unmounted or cancelled.

    task_status.started(ops) is called once the mount exists (use `await nursery.start(
    run_mount, pool, path)` to get the ShadowOperations, whose `.barrier` is the write
    barrier). Returns normally when the filesystem is unmounted from outside.
    fast_loop=False runs pyfuse3's own session loop unchanged (see "fast loop" below);
    poll_us: how long the fast loop polls for the next request before it sleeps (0: never).
    """
    global _active
    if _active:
        raise RuntimeError("a FUSE session is already running in this process")
    tune_malloc()
    allow_splice()
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
    log.info("mounted %s at %s", pool.path, path)
    try:
        task_status.started(ops)
        if fast_loop:
            fast = _FastTrio(poll_us)
            ops.notifying = fast.lowlevel.hold_off
            fast.lowlevel.waiting = lambda: ops.store_waits > 0
            saved = pyfuse3.trio  # type: ignore[attr-defined]
            pyfuse3.trio = fast  # type: ignore[attr-defined]
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fast.lock.run_waker)
                    await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
                    nursery.cancel_scope.cancel()
            finally:
                pyfuse3.trio = saved  # type: ignore[attr-defined]
        else:
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        log.info("FUSE session at %s ended (unmounted)", path)
    except Exception as e:   # (not a cancellation: that is a stop, said by the caller)
        # the session loop itself failed (pyfuse3 ends it on an exception its handlers
        # let through; the always-reply patch leaves few): every user of the mount gets
        # ENOTCONN from now on, which must not pass as an INFO line (the traceback: in
        # the caller's "the daemon failed")
        log.error("FUSE session at %s failed (%r): the mount is gone", path, e)
        raise
    finally:
        # Synchronous on purpose: runs even when cancelled. A no-op unmount if the kernel
        # already dropped the mount; a lazy (MNT_DETACH) unmount otherwise.
        try:
            ops.notices.close(unmount=True)   # once no kernel notification is in flight
        finally:
            _active = False
        log.info("FUSE session at %s closed", path)


# --------------------------------------------------------------------------- fast loop
#
# pyfuse3's session loop, per request: take a trio.Lock (whose uncontended acquire is a
# full scheduler pass), wait_readable(/dev/fuse) through trio's epoll (epoll_ctl + a
# scheduler pass even when a request is already queued), read the request, run the
# handler. pyfuse3 reaches trio only through its module attribute `pyfuse3.trio` (the
# hook pyfuse3.asyncio.enable() uses to swap in asyncio); `_FastTrio` is handed in
# through that hook while the session runs and changes two things:
#
#   * wait_readable(fd) first asks poll(fd, 0) -- one system call -- and returns at once
#     when a request is already queued; otherwise it is trio's wait_readable.
#   * Lock() is a `_ReaderLock`: an uncontended acquire does not yield; a contended one
#     parks (the task becomes a spare reader). Releasing does NOT hand the lock to a
#     parked spare: with synchronous handlers the releasing task is back for the lock as
#     soon as it has replied. A "waker" task, rescheduled (no system call) when the lock
#     is released while spares wait, runs at the next scheduler pass -- i.e. only when
#     the releasing task yields: blocks in a handler (fsync in a thread, a write held by
#     the barrier), waits for the next request, or has ended -- and then hands the free
#     lock to a spare. So a blocked handler never stops other requests (reads go on
#     while writes are held), exactly as with trio.Lock, and a session that ends wakes its
#     spares so pyfuse3.main() returns.
#
# Fairness and cancellation: the lock holder takes a scheduler pass (a trio checkpoint)
# every _YIELD_EVERY acquisitions, so a never-empty request queue cannot starve the
# daemon's other tasks, and a cancelled session stops within that many requests (at
# once when idle: trio's wait_readable and ParkingLot.park are checkpoints).

_YIELD_EVERY = 32


class _Ready:
    """An awaitable that is already complete: `await READY` costs no coroutine frame."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_READY = _Ready()


class _ReaderLock:
    """The lock pyfuse3 takes around wait_readable(/dev/fuse); see "fast loop" above.

    __aenter__/__aexit__ are plain methods returning awaitables: _READY on the fast path,
    a coroutine only when the task must park or take its periodic scheduler pass.
    """

    __slots__ = ("_held", "_lot", "_steps", "_waker", "_waker_idle")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()
        self._steps = 0
        self._waker: Any = None        # the waker task, None if not running
        self._waker_idle = False       # True while the waker waits to be rescheduled

    def __aenter__(self) -> Any:
        if self._held:
            return self._lot.park()     # cancellable; returns owning the lock (handed over)
        self._held = True
        self._steps += 1
        if self._steps < _YIELD_EVERY:
            return _READY
        self._steps = 0
        return self._yield()

    async def _yield(self) -> None:
        try:
            await trio.lowlevel.checkpoint()   # fairness + cancellation point
        except BaseException:
            self._release()
            raise

    def __aexit__(self, *exc: object) -> Any:
        self._release()
        return _READY

    def _release(self) -> None:
        self._held = False
        if self._lot:
            if self._waker_idle:
                self._waker_idle = False
                trio.lowlevel.reschedule(self._waker)
            elif self._waker is None:   # no waker (not started / gone): hand over now
                self._held = True
                self._lot.unpark()

    def _abort_waker(self, _raise_cancel: Any) -> Any:
        self._waker_idle = False
        self._waker = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def run_waker(self) -> None:
        """Run in the session's nursery until cancelled."""
        self._waker = trio.lowlevel.current_task()
        while True:
            self._waker_idle = True
            await trio.lowlevel.wait_task_rescheduled(self._abort_waker)
            if not self._held and self._lot:
                self._held = True
                self._lot.unpark()


class _FastLowlevel:
    def __init__(self, poll_us: float) -> None:
        self.poll_ns = int(poll_us * 1000)
        self._poller = select.poll()
        self._poll = self._poller.poll
        self._fd = -1
        self._last = 0
        self._quiet_until = 0
        # True while a handler waits for a store on the network (ShadowOperations.
        # store_waits): the kernel's next request then waits for that reply (QD1), so
        # polling would only burn the CPU -- and the GIL the store's reply needs
        self.waiting: Callable[[], bool] = lambda: False
        self.current_task = trio.lowlevel.current_task
        self.current_trio_token = trio.lowlevel.current_trio_token
        self.notify_closing = trio.lowlevel.notify_closing

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    def wait_readable(self, fd: int) -> Any:
        """An awaitable: already complete if a request is queued on fd (poll, timeout 0)
        or comes within poll_ns while requests stream (see "Polling" above), else trio's
        wait_readable(fd)."""
        if fd != self._fd:
            if self._fd >= 0:
                self._poller.unregister(self._fd)
            self._poller.register(fd, select.POLLIN)
            self._fd = fd
        if self._poll(0):
            self._last = time.perf_counter_ns()
            return _READY
        if self.poll_ns and not self.waiting():
            now = time.perf_counter_ns()
            if now - self._last < POLL_RECENT_NS and now >= self._quiet_until:
                deadline = now + self.poll_ns
                while time.perf_counter_ns() < deadline:
                    if self._poll(0):
                        self._last = time.perf_counter_ns()
                        return _READY
        return self._slow(fd)

    def hold_off(self) -> None:
        """No polling for POLL_HOLD_OFF_NS: a Python spin loop keeps the GIL between
        its poll(0) calls, so pyfuse3's notification thread (kernel cache invalidations
        queued by ShadowOperations) would wait for the interpreter's 5 ms switch
        interval, per step; sleeping in epoll releases the GIL."""
        self._quiet_until = time.perf_counter_ns() + POLL_HOLD_OFF_NS

    async def _slow(self, fd: int) -> None:
        await trio.lowlevel.wait_readable(fd)
        self._last = time.perf_counter_ns()


class _FastTrio:
    """What pyfuse3 sees as `trio` while a fast-loop session runs."""

    def __init__(self, poll_us: float) -> None:
        self.lock = _ReaderLock()
        self.lowlevel = _FastLowlevel(poll_us)
        self.from_thread = trio.from_thread
        self.open_nursery = trio.open_nursery
        self.ClosedResourceError = trio.ClosedResourceError

    def Lock(self) -> _ReaderLock:   # trio's name
        return self.lock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


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
    """Unmount a FUSE mount, live or dead: fusermount3 -u, then -u -z, then umount -l
    (loopdev.unmount_ladder). Returns True if nothing is mounted at path afterwards.
    """
    return loopdev.unmount_ladder(path, loopdev.FUSE_UNMOUNT, timeout)


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
