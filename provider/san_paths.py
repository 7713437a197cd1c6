"""SanPaths: a host daemon's data path to its array (host mode, issue 16): NBD
connections per LUN, with a SAN's path-loss semantics (docs/hosts.md, "Failures").

provider/remote_array.py's RemoteArray reads, writes, zeroes and flushes through it.
A lost path (a connection that breaks, a reply that does not come within
REPLY_TIMEOUT, an array that cannot be reached) is not an answer: the request is tried
again on new connections for up to PATH_TIMEOUT (30 s, $SHADOWPLEX_PATH_TIMEOUT), then
fails with EIO (_retry). A new connection must open the LUN the request was for (the
naa in the export's description). Flushes stay honest: writes the array acknowledged
on a connection that broke before a FLUSH covered them may be lost if the array
restarted (a new boot_id in array.info) -- the LUN's next flush then fails with EIO,
once (_check_cache).

Threads: any; the state below is guarded by ``_conn_cv``; network I/O happens outside
it. Up to CONNECTIONS_PER_LUN connections per LUN serve requests at once (the mount's
worker threads); idle ones are kept for the next request.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from nbd.handshake import NoSuchExport

from .client import Client, ControlError

log = logging.getLogger("provider.remote_array")
_T = TypeVar("_T")


def seconds_from_env(name: str, default: float) -> float:
    """A time from the environment variable ``name`` (tests shorten them), else
    ``default``."""
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        value = default
    return value if value > 0 else default


CONNECTIONS_PER_LUN = 4     # NBD connections a LUN may have open at once (FUSE workers)
RETRY_PAUSE = 1.0           # s at most between attempts to reach an array that went away
NBD_TIMEOUT = 30.0          # s at most for connecting to the NBD port
# SAN path-loss semantics: a read, write, discard or flush whose connection to the array
# fails is tried again on new connections for up to PATH_TIMEOUT s from its start
# (multipath's bounded queue_if_no_path), then fails with EIO. A connection that gives
# no reply for REPLY_TIMEOUT s counts as failed (as a SCSI command timer): so a dead
# path is noticed within the path timeout.
PATH_TIMEOUT = seconds_from_env("SHADOWPLEX_PATH_TIMEOUT", 30.0)
REPLY_TIMEOUT = PATH_TIMEOUT / 3
_NAA = re.compile(r"\(naa ([^)\s]+)\)")   # in our NBD export's description


@dataclass
class _Path:
    """One NBD connection to a LUN and what it is bound to."""
    client: Any          # nbd.client.NbdClient
    naa: str | None      # the LUN it opened (its export description), None: not said
    boot: str | None     # the array's boot id when it was opened
    last_write: int = 0  # the LUN's write sequence number of its last acknowledged write


class _Replaced(Exception):
    """The export name now opens another LUN (another naa) than the request was for."""


class SanPaths:
    def __init__(self, array: str, addr: tuple[str, int], tls: ssl.SSLContext,
                 boot: str | None, export_of: Callable[[str], str],
                 naa_of: Callable[[str], str | None],
                 connect_control: Callable[[float], Client]) -> None:
        """array: its HOST[:PORT] (messages); addr: its NBD port; boot: its boot id at
        start; export_of(key) / naa_of(key): a LUN's export name and identity as this
        host's listing knows them; connect_control(timeout): a new control connection
        (the boot id is asked on one of its own)."""
        self.array = array
        self._nbd_addr = addr
        self._tls = tls
        self._boot = boot
        self._export_of = export_of
        self._naa_of = naa_of
        self._connect_control = connect_control
        self._idle: dict[str, list[_Path]] = {}  # LUN key -> idle NBD connections
        self._open: dict[str, int] = {}         # LUN key -> connections open
        self._conn_cv = threading.Condition()
        # flush honesty (flush, _check_cache), per LUN key: the sequence number of its
        # last acknowledged write, the last one a successful FLUSH covered, and the boot
        # ids of the array under which writes were acknowledged on connections that then
        # broke with no FLUSH after them
        self._wseq: dict[str, int] = {}
        self._durable: dict[str, int] = {}
        self._at_risk: dict[str, set[str | None]] = {}
        self._path_broken = threading.Event()   # a connection failed: re-ask the boot id
        self.last_io = time.monotonic()
        self._stopping = threading.Event()

    def close(self) -> None:
        self._stopping.set()
        with self._conn_cv:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            with contextlib.suppress(Exception):
                c.client.close()

    @contextlib.contextmanager
    def _nbd(self, key: str, naa: str | None) -> Iterator[_Path]:
        """An NBD connection to the LUN's export for one request: an idle one, a new one
        (up to CONNECTIONS_PER_LUN), or wait for one. It carries the LUN ``naa`` (when
        known): an idle one bound to another identity is closed; a new one that opens
        another LUN under the name is refused (_Replaced). A connection that failed is
        dropped, not returned: the next attempt opens a new one."""
        from nbd.client import NbdClient
        stale: list[_Path] = []
        with self._conn_cv:
            while True:
                idle = self._idle.setdefault(key, [])
                while idle and naa is not None and idle[-1].naa not in (None, naa):
                    stale.append(idle.pop())
                    self._open[key] -= 1
                if idle:
                    path: _Path | None = idle.pop()
                    break
                if self._open.get(key, 0) < CONNECTIONS_PER_LUN:
                    self._open[key] = self._open.get(key, 0) + 1
                    path = None
                    break
                self._conn_cv.wait()
        self._drop(key, stale, "bound to a LUN this name no longer has")
        ok = False
        try:
            if path is None:
                boot = self._boot_for_new_path()
                conn = NbdClient.connect(*self._nbd_addr, self._export_of(key), tls=self._tls,
                                         server_hostname=self._nbd_addr[0],
                                         timeout=min(NBD_TIMEOUT, REPLY_TIMEOUT),
                                         io_timeout=REPLY_TIMEOUT)
                m = _NAA.search(conn.info.description)
                path = _Path(conn, m.group(1) if m else None, boot)
                if naa is not None and path.naa is not None and path.naa != naa:
                    raise _Replaced(f"{self._export_of(key)} on the array at {self.array} is "
                                    f"LUN naa {path.naa}, not naa {naa} that this request "
                                    "was for (deleted and created again?): not used")
            yield path
            ok = True
        finally:
            with self._conn_cv:
                if ok and path is not None and not self._stopping.is_set():
                    self._idle[key].append(path)
                    path = None
                else:
                    self._open[key] -= 1
                self._conn_cv.notify()
            if path is not None:
                self._drop(key, [path], "failed")

    def _drop(self, key: str, paths: list[_Path], why: str) -> None:
        """Close connections; writes acknowledged on one of them that no FLUSH covered
        are at risk if the array dies: the LUN's next flush checks (_check_cache)."""
        for path in paths:
            with self._conn_cv:
                if path.last_write > self._durable.get(key, 0):
                    self._at_risk.setdefault(key, set()).add(path.boot)
            with contextlib.suppress(Exception):
                path.client.close()
        if paths:
            log.debug("%d NBD connection(s) to %s dropped: %s", len(paths), key, why)

    def _drop_idle(self, key: str) -> None:
        """After a failure: every idle connection of the LUN goes too (to an array that
        restarted they are all dead; their unflushed writes are accounted for now)."""
        with self._conn_cv:
            paths = self._idle.pop(key, [])
            self._open[key] = self._open.get(key, 0) - len(paths)
            self._conn_cv.notify_all()
        self._drop(key, paths, "another connection to the array failed")

    def _boot_for_new_path(self) -> str | None:
        """The array's boot id for a connection about to be opened: known, or -- after
        a failure -- asked again (the array may have restarted)."""
        if self._path_broken.is_set():
            self._probe_boot()
            self._path_broken.clear()
        return self._boot

    def _probe_boot(self) -> str | None:
        """array.info's boot_id on a connection of its own, within REPLY_TIMEOUT (not
        the shared control connection: a long call may hold it). A restart is logged."""
        try:
            c = self._connect_control(REPLY_TIMEOUT)
        except ControlError as e:
            raise ConnectionError(f"the array's control port: {e.message}") from None
        try:
            got = c.call("array.info", {}).get("boot_id")
        except ControlError as e:
            raise ConnectionError(f"the array's control port: {e.message}") from None
        finally:
            with contextlib.suppress(Exception):
                c.close(wait=0)
        boot = str(got) if got else None
        if boot != self._boot:
            log.warning("the array at %s restarted (boot id %s, was %s)", self.array,
                        boot, self._boot)
            self._boot = boot
        return boot

    def _retry(self, key: str, what: str, attempt: Callable[[], _T]) -> _T:
        """SAN path-loss semantics (a multipath device's bounded queue): a request whose
        connection fails is tried again on a new one until PATH_TIMEOUT has passed since
        it began, then fails with EIO. Safe: reads, writes, zeroing and flushes at fixed
        offsets are idempotent. An error reply of the array (EPERM, ENOSPC, EIO...) is
        an answer, not a path failure: it is raised as it is."""
        self.last_io = time.monotonic()
        deadline = time.monotonic() + PATH_TIMEOUT
        pause = 0.05
        failed: str | None = None
        while True:
            try:
                result = attempt()
            except _Replaced as e:
                log.error("%s of %s: %s", what, key, e)
                raise OSError(errno.EIO, str(e)) from None
            except NoSuchExport as e:
                if self._naa_of(key) is None:   # not presented any more: an answer
                    raise OSError(errno.EIO, f"{what} of {key}: {e}") from None
                failed = failed or str(e)
            except (ConnectionError, TimeoutError, ssl.SSLError) as e:
                failed = failed or str(e)
                self._path_broken.set()
                self._drop_idle(key)
            else:
                if failed is not None:
                    log.warning("%s of %s: the path to the array at %s is back",
                                what, key, self.array)
                return result
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                log.error("%s of %s: no path to the array at %s for %g s (%s) -> EIO",
                          what, key, self.array, PATH_TIMEOUT, failed)
                raise OSError(errno.EIO, f"the array at {self.array} is unreachable: "
                                         f"{failed}")
            if pause == 0.05:
                log.warning("%s of %s: path to the array at %s lost (%s); retrying for "
                            "up to %g s", what, key, self.array, failed, PATH_TIMEOUT)
            self._stopping.wait(min(pause, left))
            pause = min(pause * 2, RETRY_PAUSE)

    def io(self, key: str, fn: str, *args: Any, writes: bool = False) -> Any:
        """``client.fn(*args)`` on a connection to the LUN, with _retry's semantics."""
        naa = self._naa_of(key)

        def attempt() -> Any:
            with self._nbd(key, naa) as path:
                result = getattr(path.client, fn)(*args)
                if writes:
                    with self._conn_cv:
                        self._wseq[key] = path.last_write = self._wseq.get(key, 0) + 1
                return result
        return self._retry(key, fn, attempt)

    def flush(self, name: str) -> None:
        """NBD FLUSH -- unless writes the array acknowledged may have been lost with it
        (_check_cache): then EIO, once, like a disk that lost its volatile cache."""
        naa = self._naa_of(name)

        def attempt() -> None:
            risky = self._check_cache(name)
            with self._conn_cv:
                mark = self._wseq.get(name, 0)   # acknowledged before this FLUSH
            with self._nbd(name, naa) as path:
                path.client.flush()
            with self._conn_cv:
                self._durable[name] = max(self._durable.get(name, 0), mark)
                self._at_risk.get(name, set()).difference_update(risky)
        self._retry(name, "flush", attempt)

    def _check_cache(self, key: str) -> set[str | None]:
        """Writes acknowledged on connections that broke before a FLUSH covered them
        (by the array with boot ids ``risky``) are still in the array's memory if that
        array process still runs (same boot id): the coming FLUSH covers them. If it
        restarted (or it cannot tell) they may be lost: EIO, once, and say so."""
        with self._conn_cv:
            risky = set(self._at_risk.get(key, ()))
        if not risky:
            return risky
        now = self._probe_boot()
        if now is not None and risky == {now}:
            return risky
        with self._conn_cv:
            self._at_risk.get(key, set()).difference_update(risky)
        msg = (f"writes to {key} that the array at {self.array} acknowledged before it "
               f"restarted (boot id {', '.join(sorted(map(str, risky)))}, now {now}) were "
               "not flushed and may be lost: this flush fails (once)")
        log.error("%s", msg)
        raise OSError(errno.EIO, msg)
