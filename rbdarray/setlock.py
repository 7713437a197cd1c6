"""One snapshot set in creation at a time across every host of an RBD pool (issue 18
item 2): a RADOS exclusive lock with a lease on the object ``spx.set-in-creation``.

    claim     lock_exclusive(duration=LEASE) with this array's cookie; a thread renews
              it every LEASE/4 (LOCK_FLAG_MUST_RENEW: a lease that ran out and was
              taken by another host is not silently taken back) until release
    refused   the lock is another host's: Busy naming that host and its set (the xattr
              ``holder`` on the object, written by the holder after it took the lock);
              the coordinator answers VSS_E_SNAPSHOT_SET_IN_PROGRESS
    dead host its lock expires LEASE seconds after its last renewal: the OSD drops an
              expired locker when the next host asks
    commit    every commit holds the lock: the claimed set's commit renews it first (a
              host whose lease ran out does not commit), a commit outside a claimed set
              (an array used without a coordinator, host mode's sets) takes it for its
              duration. So while a host holds it no commit is in flight anywhere, which
              is what lets it repair the leftovers of a crashed one (rbdarray/scan.py).

Why a lease and not librados' own session end: the OSD would drop a dead client's lock
only when its watch times out or an operator blocklists it; a lease bounds it by a time
we choose and document (docs/ceph.md). The cost: a host that stops renewing for LEASE
seconds (hung, cut off) loses its set -- its commit then fails instead of racing another
host's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from blockstore import errors as bse

from .errors import mapped

log = logging.getLogger(__name__)

OBJECT = "spx.set-in-creation"
NAME = "spx.set"
HOLDER = "holder"            # xattr: {"host", "set", "since"} of the lock's holder
MUST_RENEW = 0x2             # LIBRADOS_LOCK_FLAG_MUST_RENEW


def lease_from_env(default: int = 30) -> int:
    """SHADOWPLEX_SET_LEASE (the same variable as host mode's lease; tests shorten it):
    whole seconds (RADOS lock durations are), at least 1."""
    try:
        value = float(os.environ.get("SHADOWPLEX_SET_LEASE", "") or default)
    except ValueError:
        return default
    return max(1, round(value)) if value > 0 else default


LEASE = lease_from_env()


class SetLock:
    """The set-in-creation lock as one array (one host) holds it."""

    def __init__(self, io: Any, host: str, pool: str, lease: int | None = None) -> None:
        self._io = io
        self.host = host
        self.pool = pool
        self.lease = lease or LEASE
        self.cookie = uuid.uuid4().hex
        self._held: str | None = None           # the set id we hold it for
        self._stop: threading.Event | None = None
        self._mutex = threading.Lock()

    @property
    def held(self) -> str | None:
        return self._held

    # ------------------------------------------------------------------ take / give
    def _take(self, set_id: str, renew: bool = False) -> None:
        import rados
        desc = json.dumps({"host": self.host, "set": set_id, "since": time.time()})
        try:
            self._io.lock_exclusive(OBJECT, NAME, self.cookie, desc=desc,
                                    duration=self.lease, flags=MUST_RENEW if renew else 0)
        except (rados.ObjectBusy, rados.ObjectExists):
            raise bse.Busy(self.busy_message()) from None
        except rados.ObjectNotFound:   # MUST_RENEW: ours expired and nobody took it yet
            raise bse.Busy(f"the set-in-creation lease of set {set_id} ran out (not "
                           f"renewed within {self.lease} s); the set cannot be committed"
                           ) from None
        except Exception as e:
            raise mapped(e, "taking the set-in-creation lock") from e
        if not renew:
            with contextlib.suppress(Exception):   # only for the refusal's message
                self._io.set_xattr(OBJECT, HOLDER, desc.encode())

    def busy_message(self) -> str:
        who = "another host"
        with contextlib.suppress(Exception):
            h = json.loads(self._io.get_xattr(OBJECT, HOLDER))
            who = f"snapshot set {h['set']} of host {h['host']}"
        return (f"{who} is being created on Ceph pool {self.pool} (a lease of "
                f"{self.lease} s, renewed while it lives); only one set at a time across "
                "its hosts: retry when it is done")

    def claim(self, set_id: str) -> None:
        """Take the lock for ``set_id`` and keep renewing it until release (Busy if
        another host, or another set of ours, has it)."""
        with self._mutex:
            if self._held is not None:
                raise bse.Busy(f"snapshot set {self._held} of host {self.host} is being "
                               "created; only one set at a time: retry when it is done")
            self._take(set_id)
            self._held = set_id
            stop = self._stop = threading.Event()
        threading.Thread(target=self._renewer, args=(set_id, stop), daemon=True,
                         name="rbd-set-lease").start()

    def _renewer(self, set_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease / 4):
            try:
                self._take(set_id, renew=True)
            except bse.StoreError as e:   # the commit checks again and fails
                log.error("renewing the set-in-creation lease of set %s: %s", set_id, e)
                return

    def check(self, set_id: str) -> None:
        """Before a claimed set's commit: renew now (Busy if the lease was lost)."""
        self._take(set_id, renew=True)

    def release(self, set_id: str | None = None) -> None:
        """Give the lock back (never raises: the lease runs out anyway)."""
        import rados
        with self._mutex:
            if self._held is None or (set_id is not None and set_id != self._held):
                return
            self._held = None
            if self._stop is not None:
                self._stop.set()
            try:
                self._io.unlock(OBJECT, NAME, self.cookie)
            except (rados.ObjectNotFound, rados.ObjectBusy):
                pass                          # it expired (and may be another's now)
            except Exception as e:   # noqa: BLE001 - logged; the lease runs out
                log.error("releasing the set-in-creation lock: %s", e)

    @contextlib.contextmanager
    def holding(self, what: str) -> Iterator[None]:
        """For the duration of a commit: renewed if we hold it for a claimed set, else
        taken (and released afterwards) under a name of its own."""
        held = self._held
        if held is not None:
            self.check(held)
            yield
            return
        tag = f"{what}-{uuid.uuid4().hex[:8]}"
        self.claim(tag)
        try:
            yield
        finally:
            self.release(tag)

    def try_briefly(self) -> bool:
        """Take the lock if it is free, for a repair at open (False: another host holds
        it; the repair waits for this array's next claim). release() gives it back."""
        try:
            self.claim(f"open-{socket.gethostname()}")
        except bse.StoreError:
            return False
        return True
