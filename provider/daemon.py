"""`shadowplex serve`: the array daemon. One process per pool, one trio loop.

    python -m provider.daemon --pool DIR --mount DIR [--socket PATH] [--debug]

What it does, in order:
  1. checks the mount directory (exists, is a directory, not already mounted; a dead
     FUSE mount left by a killed shadowplex daemon is accepted and cleaned in step 3);
  2. opens the pool (exclusive lock: errors.PoolLocked names the holder);
  3. mounts the FUSE view (fuse_mount.session.run_mount) and starts the extra services
     (control socket, coordinator, background jobs) in the same nursery;
  4. once the mount and the services are up (the control socket listens), tells
     systemd READY=1 if $NOTIFY_SOCKET is set (provider/sdnotify.py; Type=notify);
  5. on SIGTERM / SIGINT / SIGHUP (unless started ignoring SIGHUP, as nohup does):
     flushes every volume, unmounts (STOPPING=1), stops the services, closes the pool
     and exits 0.
Any user error is ONE line on stderr, and nothing is mounted or changed: exit status
78 (EX_CONFIG, config.EXIT_CONFIG) for a configuration error a restart cannot cure (no
pool at --pool, a directory that is not a pool, a missing or unusable mount directory,
the pool or socket inside the mount, a bad --tls-dir or --log-file), 1 for the others
(the pool in use by another daemon, the array unreachable, the mount failing).

The log: provider/logsetup.py (stderr or ``log_file``, journald priorities).

Stopping while the mount is in use: the unmount is attempted NON-lazily first. If the
mount is busy (a loop device or a process still has an image open) the daemon refuses to
stop, logs who uses it, and keeps serving -- detaching the mount under an attached loop
device would turn the filesystem above it into I/O errors. A second signal while busy
within FORCE_WINDOW (10 s) forces the stop (lazy unmount: the users then get errors); a
later one is refused again. A daemon killed with -9 leaves a dead mount (ENOTCONN on
every access, never an empty-looking directory); the next `serve` on the same directory
cleans it.

`--foreground` is the default and the only mode: the daemon never forks (run it under
systemd Type=notify or simple, or with `&`/nohup). `--background` is accepted for compatibility and
only logs that it runs in the foreground.

Threads (docs/concurrency.md has the whole table): the trio thread runs the FUSE
handlers (reads and writes call the pool inline), the write barrier, the control socket
and the coordinator. Trio worker threads run whatever waits for the disk or the kernel:
fsync (pool.flush), the writeback loop (pool.wait_and_writeback, one step at a time),
the coordinator's block-store calls (commit, delete, revert, promote, split, check,
scrub), writers (fsfreeze, hooks, SQLite), losetup/mount, the non-lazy umount(2) and the
busy report. The hardware provider syncs each plex in a thread of its own. No thread of
the daemon looks at a path below its own mount (a FUSE request to itself, which would
wait for the very thread serving it): paths there are compared as text and the busy
report reads /proc and /sys as text (mount_users.py); tests run every daemon under
tests/fuse_self_guard.py, which fails a test on any such request.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import os
import signal
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from blockstore import Pool
from blockstore import errors as bse
from blockstore.fileio import keep_freed_memory, lock_directory
from fuse_mount.barrier import WriteBarrier
from fuse_mount.operations import ShadowOperations
from fuse_mount.presentation import LiveMount, Presentation
from fuse_mount.session import (
    DEFAULT_POLL_US,
    MountError,
    MountState,
    force_unmount,
    mount_state,
    run_mount,
    umount_nonlazy,
)
from nbd.server import NbdServer
from nbd.settings import NbdSettings

from . import mount_users
from .array import Array
from .config import EXIT_CONFIG, LOG_LEVELS
from .logsetup import LogSetupError, configure_logging, journal_stderr
from .sdnotify import Notifier
from .vss import VssError

log = logging.getLogger(__name__)

PROG = "shadowplex serve"

# An extra service started in the daemon's nursery once the mount is up:
#   async def control_socket(pool, barrier, nursery, mount) -> None
# mount is the live ShadowOperations as a LiveMount (fuse_mount/presentation.py): its
# presentation (LUN masking: update() it), open handle counts, kernel cache invalidation.
Service = Callable[[Array, WriteBarrier, trio.Nursery, LiveMount], Awaitable[Any]]


class ServeError(Exception):
    """A configuration error: reported as one line, exit status EXIT_CONFIG."""


def _error_line(msg: str) -> None:
    prio = "<3>" if journal_stderr() else ""   # journald: priority "err"
    sys.stderr.write(f"{prio}{PROG}: error: {msg}\n")
    sys.stderr.flush()


def _check_mountpoint(path: str) -> bool:
    """Validate the mount directory. Returns True if a stale mount of ours must be cleaned."""
    info = mount_state(path)
    if info.state is MountState.STALE:
        if info.ours:
            return True
        raise ServeError(f"{path} is a dead {info.fstype} mount; unmount it first "
                         f"(fusermount3 -u -z {path})")
    if info.state is MountState.MOUNTED:
        raise ServeError(f"{path} is already a mountpoint ({info.fstype} from {info.source});"
                         " unmount it or choose another directory")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ServeError(f"mount directory {path} does not exist; create it first "
                         f"(mkdir -p {path})") from None
    except OSError as e:
        raise ServeError(f"mount directory {path} is unusable: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ServeError(f"mount directory {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ServeError(f"mount directory {path} is not accessible")
    return False


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_not_inside(mountpoint: str, **paths: str | None) -> None:
    """The pool and the control socket must not live inside the mount: once it is up,
    every access to them (the socket's bind and lstat, the pool's new files) would be a
    FUSE request to the daemon itself, from the thread that serves them -- a daemon
    hung at start, in D state until kill -9. Lexically first: resolving a path below
    the mount directory would look into whatever is mounted there now."""
    for what, path in paths.items():
        if not path:
            continue
        p = os.path.abspath(path)
        if _inside(p, mountpoint) or _inside(os.path.realpath(p), mountpoint):
            raise ServeError(f"the {what} {path} is inside the mount directory {mountpoint};"
                             f" put the {what} elsewhere")


async def _busy_report(mountpoint: str, ops: ShadowOperations) -> str:
    """Who uses the mount, for the refusal's log line. Read as text from /proc and /sys
    in a worker thread (provider/mount_users.py): never a stat or realpath of a path
    below the mount, which from the trio thread is a FUSE request to itself that it
    never answers (issue 12: SIGTERM with an image open hung the daemon)."""
    users = await trio.to_thread.run_sync(mount_users.find, mountpoint)
    return f"{users}; {ops.open_handles()} open file handle(s) on the mount"


def stop_signals() -> list[signal.Signals]:
    """The signals that stop the daemon (each as SIGTERM: refused while the mount is in
    use). SIGHUP too -- the terminal of a `serve` in the foreground went away; its
    default action would kill the daemon at once and leave a dead mount under every
    loop device -- unless it is ignored already (nohup)."""
    sigs = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        sigs.append(signal.SIGHUP)
    return sigs


async def _flush_all(pool: Array) -> None:
    for v in pool.list_volumes():
        try:
            await trio.to_thread.run_sync(pool.flush, v.name)
        except bse.NotFound:
            continue   # deleted meanwhile (a request still running at the stop): nothing held
        except (bse.StoreError, OSError) as e:
            # OSError: host mode with the array unreachable (EIO after the path timeout)
            log.error("flushing volume %s: %s", v.name, e)


WRITEBACK_PERIOD = 0.05
FORCE_WINDOW = 10.0   # s after a refused stop in which another stop signal forces it


async def writeback_timer(pool: Pool) -> None:
    """The store holds origin writes to freshly preserved chunks until one grouped sync
    covers them (blockstore WRITEBACK_*); this timer bounds how long they wait when the
    writes stop. Runs in a worker thread: it fsyncs (without the pool lock, see
    Pool.writeback, so the FUSE handlers go on meanwhile)."""
    pool.background_writeback = True
    try:
        while True:
            # back to trio after each step (a cancellation point): a step waits at most
            # WRITEBACK_PERIOD for the data path to queue a batch, then syncs what is due,
            # and goes on with the batches queued meanwhile for up to WRITEBACK_BUSY
            # (blockstore/heldwrites.py: this loop runs on the FUSE thread's trio loop)
            try:
                await trio.to_thread.run_sync(pool.wait_and_writeback, WRITEBACK_PERIOD)
            except Exception:   # e.g. the catalog failing: keep serving
                log.exception("background writeback failed; retrying")
                await trio.sleep(1)
    finally:
        pool.background_writeback = False   # the data path bounds the age again


SEAL_IDLE = 2.0      # s without I/O before the sealer reads preserved chunks
SEAL_STEP = 256      # slots per sealing step (16 MiB at 64 KiB chunks)


async def seal_timer(pool: Pool) -> None:
    """Chunks preserved by reference (reflink pools) carry no digest until sealed; this
    task seals them while the pool is idle (no read or write for SEAL_IDLE s), a step of
    SEAL_STEP slots at a time in a worker thread, so that reads verify them soon after
    a backup window instead of only at the next scrub (docs/format.md)."""
    while True:
        await trio.sleep(SEAL_IDLE)
        if time.monotonic() - pool.last_io < SEAL_IDLE:
            continue
        try:
            while await trio.to_thread.run_sync(pool.seal_preserved, SEAL_STEP) \
                    and time.monotonic() - pool.last_io >= SEAL_IDLE:
                pass
        except Exception:   # a failing seal must not stop the daemon
            log.exception("sealing preserved chunks failed; retrying later")
            await trio.sleep(10 * SEAL_IDLE)


async def _serve_async(
    pool: Array,
    mountpoint: str,
    services: Sequence[Service],
    debug: bool,
    allow_other: bool,
    poll_us: float = DEFAULT_POLL_US,
    nbd: NbdSettings | None = None,
    nbd_tls: ssl.SSLContext | None = None,
    notifier: Notifier | None = None,
) -> int:
    notifier = notifier or Notifier(None)
    barrier = WriteBarrier(pool)
    # LUN masking: the operations read it, the services (the coordinator) update it
    # the host the root of the mount is for: this machine, or in host mode the identity
    # the array knows this host by (its certificate)
    ops = ShadowOperations(pool, barrier, Presentation(getattr(pool, "host", None)))
    nbd_server = None if nbd is None else NbdServer(
        pool, barrier, ops.presentation, nbd_tls, _peer_host if nbd_tls else lambda _c: "",
        ops.changed_elsewhere)
    session_ended = trio.Event()
    stop_requested = trio.Event()
    unmounting = False  # True while our own umount(2) runs: the session ending is expected
    forced = False      # the stop goes on although the mount is busy: no unmount happened

    async def mount_task(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await run_mount(pool, mountpoint, ops=ops, debug=debug, allow_other=allow_other,
                            poll_us=poll_us, task_status=task_status)
        finally:
            session_ended.set()

    async def stop_on_signals(sigs: Any) -> None:
        nonlocal unmounting, forced
        refused_at: float | None = None   # when a stop was last refused (busy)
        async for signum in sigs:
            name = signal.Signals(signum).name
            log.info("%s received: flushing volumes and unmounting %s", name, mountpoint)
            await _flush_all(pool)
            unmounting = True
            try:
                await trio.to_thread.run_sync(umount_nonlazy, mountpoint)
            except OSError as e:
                # A second signal soon after a refusal is the admin insisting (a second
                # Ctrl-C); one much later is a new stop request, refused again: a stop
                # forgotten hours ago must not turn filesystems into I/O errors.
                if e.errno == errno.EBUSY and (
                        refused_at is None or trio.current_time() - refused_at > FORCE_WINDOW):
                    unmounting = False
                    busy = await _busy_report(mountpoint, ops)
                    log.error(
                        "%s is busy (%s): NOT stopping, the array keeps serving. Close "
                        "the files, unmount the filesystems and detach the loop devices on "
                        "it, then signal again; a second signal within %g s forces a lazy "
                        "unmount.",
                        mountpoint, busy, FORCE_WINDOW,
                    )
                    notifier.notify(f"STATUS=refused to stop: {mountpoint} is busy ({busy})")
                    refused_at = trio.current_time()
                    continue
                if e.errno == errno.EBUSY:
                    forced = True
                    log.warning("%s still busy (%s): forcing a lazy unmount; its users will "
                                "get I/O errors", mountpoint,
                                await _busy_report(mountpoint, ops))
                elif e.errno not in (errno.EINVAL, errno.ENOENT):
                    log.warning("unmounting %s: %s; detaching lazily", mountpoint, e.strerror)
            notifier.notify("STOPPING=1", f"STATUS=stopping ({name})")
            stop_requested.set()
            return

    with trio.open_signal_receiver(*stop_signals()) as sigs:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount_task)
            nursery.start_soon(stop_on_signals, sigs)
            if isinstance(pool, Pool):   # the embedded pool's own background work
                nursery.start_soon(writeback_timer, pool)
                if pool.preserve_mode == "reflink":
                    nursery.start_soon(seal_timer, pool)
            if nbd_server is not None and nbd is not None:
                listeners = await nursery.start(nbd_server.serve, nbd.host, nbd.port)
                # host daemons ask the array where its data path is (array.info)
                ops.nbd_endpoint = (listeners[0].socket.getsockname()[1],
                                    nbd.tls_dir is not None)
                ops.nbd_address = listeners[0].socket.getsockname()[0]
                log.info("NBD port open on %s (%s)", ", ".join(
                    "{}:{}".format(*ln.socket.getsockname()[:2]) for ln in listeners),
                    "plain text, loopback" if nbd.tls_dir is None else "TLS required")
            # ---------------------------------------------------------------------------
            # Other services (control socket, coordinator, background jobs) start HERE, on
            # the same trio loop, after the mount exists. Each gets (pool, barrier, nursery,
            # mount).
            # A service that takes task_status (control_service) is up once it calls
            # started(): its socket listens. Then systemd hears READY=1.
            for svc in services:
                if _takes_task_status(svc):
                    await nursery.start(svc, pool, barrier, nursery, ops)
                else:
                    nursery.start_soon(svc, pool, barrier, nursery, ops)
            notifier.notify("READY=1", f"STATUS=serving {pool.path} at {mountpoint}")
            log.info("ready: serving at %s", mountpoint)
            # ---------------------------------------------------------------------------
            async with trio.open_nursery() as waiter:
                async def wait_for(ev: trio.Event) -> None:
                    await ev.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(wait_for, stop_requested)
                waiter.start_soon(wait_for, session_ended)
            if not session_ended.is_set() and not forced:
                # Signalled: the non-lazy unmount normally ended the session already; if
                # not (an error), cancelling makes run_mount close it (lazily). Forced:
                # nothing will end it, no use waiting (it cost 5 s).
                with trio.move_on_after(5):
                    await session_ended.wait()
            elif not (stop_requested.is_set() or unmounting):
                log.warning("%s was unmounted from outside: stopping", mountpoint)
                notifier.notify("STOPPING=1", "STATUS=stopping (unmounted from outside)")
            nursery.cancel_scope.cancel()
    await _flush_all(pool)
    return 0


def _takes_task_status(svc: Service) -> bool:
    try:
        return "task_status" in inspect.signature(svc).parameters
    except (TypeError, ValueError):   # no signature to read: started with start_soon
        return False


def _nbd_tls(nbd: NbdSettings) -> ssl.SSLContext | None:
    """The NBD port's TLS context, read before anything is mounted (a bad certificate
    directory is a one-line error of serve). Raises ServeError."""
    if nbd.tls_dir is None:
        return None
    from nbd.tls import server_context
    try:
        return server_context(nbd.tls_dir)
    except (OSError, ValueError, ssl.SSLError) as e:
        raise ServeError(f"--tls-dir {nbd.tls_dir}: {e}") from None


def _peer_host(cert: dict) -> str:
    """A TLS peer's host: its certificate's CN, and a name LUN masking accepts (it
    becomes MOUNT/hosts/<host>/); ValueError (nbd.tls.PeerIdentityError) if not."""
    from nbd.tls import peer_host_name

    from .documents import valid_host
    return peer_host_name(cert, valid_host)


def serve(
    pool_dir: str,
    mountpoint: str,
    socket_path: str | None = None,
    foreground: bool = True,
    *,
    services: Sequence[Service] = (),
    debug: bool = False,
    allow_other: bool = False,
    poll_us: float = DEFAULT_POLL_US,
    nbd: NbdSettings | None = None,
    array: str | None = None,
    tls_dir: str | None = None,
    ceph: tuple[str, str | None, str | None] | None = None,
    log_level: str | None = None,
    log_file: str | None = None,
) -> int:
    """Run the array daemon until SIGTERM/SIGINT; return the exit status: 0, 1 (a
    failure), or EXIT_CONFIG (78: a configuration error; see the module docstring).

    socket_path is for the control-socket service (passed to it by the caller, e.g. with
    functools.partial); serve only checks that it is not inside the mount.

    Host mode (issue 16): with ``array`` "HOST[:PORT]" and ``tls_dir`` (this host's
    certificate), the LUNs are the remote array's (provider/remote_array.py) and
    ``pool_dir`` is this host's state directory (its coordinator's catalog). Ceph
    (issue 18): ``array`` "rbd:POOL" and ``ceph`` (ceph.conf, client id, host name): the LUNs are
    that RBD pool's (rbdarray/), ``pool_dir`` the provider's state directory.
    """
    notifier = Notifier.from_environment()
    try:
        handler = configure_logging(debug, log_level, log_file)
    except LogSetupError as e:
        _error_line(str(e))
        return EXIT_CONFIG
    try:
        return _serve(pool_dir, mountpoint, socket_path, foreground, services, debug,
                      allow_other, poll_us, nbd, array, tls_dir, ceph, notifier)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _serve(pool_dir: str, mountpoint: str, socket_path: str | None, foreground: bool,
           services: Sequence[Service], debug: bool, allow_other: bool, poll_us: float,
           nbd: NbdSettings | None, array: str | None, tls_dir: str | None,
           ceph: tuple[str, str | None, str | None] | None, notifier: Notifier) -> int:
    pool_dir = os.path.abspath(pool_dir)
    mountpoint = os.path.realpath(mountpoint)   # before mounting: safe to stat
    if not foreground:
        log.info("daemonizing is not supported: running in the foreground")
    try:
        _check_not_inside(mountpoint, pool=pool_dir, socket=socket_path)
        stale = _check_mountpoint(mountpoint)
        nbd_tls = _nbd_tls(nbd) if nbd is not None else None
    except ServeError as e:
        _error_line(str(e))
        return EXIT_CONFIG
    keep_freed_memory()   # the data path's chunk buffers: see its docstring
    state_lock = -1
    try:
        if array is not None:
            # host mode, Ceph: no pool here to flock, but the provider's catalog in the
            # state directory is this daemon's alone (it holds it in exclusive locking
            # mode: a second daemon would wait 5 s, then die of "database is locked")
            os.makedirs(pool_dir, mode=0o700, exist_ok=True)
            state_lock = lock_directory(pool_dir, "state directory")
        pool = _open_backend(pool_dir, array, tls_dir, ceph)
    except BaseException as e:
        if state_lock >= 0:
            os.close(state_lock)
        if not isinstance(e, Exception):
            raise
        return _open_failed(e, pool_dir, array)
    try:
        return _serve_open(pool, pool_dir, mountpoint, socket_path, services, debug,
                           allow_other, poll_us, nbd, nbd_tls, array, stale, notifier)
    finally:
        if state_lock >= 0:
            os.close(state_lock)


def _open_failed(e: Exception, pool_dir: str, array: str | None) -> int:
    """The exit status (and one line) of a backend that cannot be opened; anything else
    than the errors below is raised again."""
    if isinstance(e, ServeError | bse.NotFound | bse.FormatError):
        # no pool there, or not a pool: a wrong path (a broken pool.json is no better
        # after a restart either)
        _error_line(str(e))
        return EXIT_CONFIG
    if isinstance(e, bse.StoreError):   # PoolLocked: another daemon, which may stop
        _error_line(str(e))
        return 1
    if isinstance(e, OSError):
        what = f"the array at {array}" if array else f"pool {pool_dir}"
        _error_line(f"cannot open {what}: {e.strerror or e}")
        return 1
    raise e


def _serve_open(pool: Array, pool_dir: str, mountpoint: str, socket_path: str | None,
                services: Sequence[Service], debug: bool, allow_other: bool,
                poll_us: float, nbd: NbdSettings | None, nbd_tls: ssl.SSLContext | None,
                array: str | None, stale: bool, notifier: Notifier) -> int:
    """_serve once the backend is open: the mount, the services, until stopped; the
    backend closed on every way out."""
    try:
        if stale:
            log.warning("cleaning the dead mount a killed daemon left at %s", mountpoint)
            if not force_unmount(mountpoint):
                _error_line(f"cannot remove the dead mount at {mountpoint}; run "
                            f"fusermount3 -u -z {mountpoint}")
                return 1
            try:
                _check_mountpoint(mountpoint)
            except ServeError as e:
                _error_line(str(e))
                return EXIT_CONFIG
        log.info("serving pool %s at %s (pid %d)%s", pool_dir, mountpoint, os.getpid(),
                 f", control socket {socket_path}" if socket_path else "")
        try:
            rc = trio.run(_serve_async, pool, mountpoint, list(services), debug, allow_other,
                          poll_us, nbd, nbd_tls, notifier)
        except Exception as e:
            # MountError, and VssError from a service (the control socket cannot be
            # created, another daemon listens there): user errors, one line
            user_err = _find(e, MountError) or _find(e, VssError)
            if user_err is not None:
                _error_line(getattr(user_err, "message", None) or str(user_err))
            else:
                log.exception("the daemon failed")
            rc = 1
        return rc
    finally:
        what = f"array {array}" if array else f"pool {pool_dir}"
        try:
            pool.close()
        except (bse.StoreError, OSError) as e:
            # close() logged each volume it could not flush (a full pool filesystem:
            # writes held since the last fsync had no room) and released the pool: the
            # stop is done, its exit status stays the stop's (0), not this error's
            log.error("%s closed; writes not yet synced by their writers could not be "
                      "written out and are lost: %s", what, e)
        else:
            log.info("%s closed", what)


def _open_backend(pool_dir: str, array: str | None, tls_dir: str | None,
                  ceph: tuple[str, str | None, str | None] | None = None) -> Array:
    """The embedded pool, an RBD pool (``rbd:POOL``), or in host mode the remote array
    (raises StoreError/OSError; ControlError for an array that refuses or cannot be
    reached)."""
    if array is None:
        return Pool.open(pool_dir)
    if array.startswith("rbd:"):
        from rbdarray import RbdArray
        conf, ceph_id, host = ceph or ("/etc/ceph/ceph.conf", None, None)
        os.makedirs(pool_dir, mode=0o700, exist_ok=True)
        return RbdArray(array[4:], conf, pool_dir, ceph_id=ceph_id, host=host)
    from .client import ControlError
    from .remote_array import RemoteArray
    if not tls_dir:
        raise ServeError("--array needs --tls-dir DIR (this host's certificate: "
                         "'shadowplex pki host NAME DIR')")
    try:
        return RemoteArray(array, tls_dir, pool_dir)
    except ControlError as e:
        raise bse.StoreError(f"the array at {array}: {e.message}") from None


def _find(exc: BaseException, cls: type[BaseException]) -> BaseException | None:
    """exc itself or the first exception of type cls inside (nested) exception groups."""
    if isinstance(exc, cls):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, cls)
            if found is not None:
                return found
    return None


def build_parser(paths_required: bool = True) -> argparse.ArgumentParser:
    """paths_required=False: --pool/--mount may come from elsewhere (a --config file)."""
    p = argparse.ArgumentParser(
        prog="python -m provider.daemon",
        description="Serve a shadowplex pool: FUSE mount + control socket, until SIGTERM.",
    )
    p.add_argument("--pool", required=paths_required, metavar="DIR", help="pool directory")
    p.add_argument("--mount", required=paths_required, metavar="DIR", help="mount directory")
    p.add_argument("--socket", metavar="PATH", help="control socket path")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--foreground", dest="foreground", action="store_true", default=True,
                   help="stay in the foreground (the default and only mode)")
    g.add_argument("--background", dest="foreground", action="store_false",
                   help="accepted; the daemon still runs in the foreground")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than root use the mount (FUSE allow_other)")
    p.add_argument("--debug", action="store_true", help="debug logging (and FUSE debug)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="log level (default info)")
    p.add_argument("--log-file", metavar="PATH", default=None,
                   help="append the log to PATH instead of stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve(args.pool, args.mount, args.socket, args.foreground, debug=args.debug,
                 allow_other=args.allow_other, log_level=args.log_level,
                 log_file=args.log_file)


if __name__ == "__main__":
    sys.exit(main())
