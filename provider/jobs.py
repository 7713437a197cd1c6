"""The long operations a requester may cancel (revert, promote, split, scrub, check):
their cancellation token, their progress and what `status` shows while they run (also
a set's plex sync, which its creation's cancellation stops). Progress is in bytes; the
rate is the average since the job started, the ETA what is left at that rate.

A long operation runs in a worker thread; the block store calls its progress callback
between steps (chunks). That callback is the one cancellation point: once the token is
cancelled it raises blockstore.errors.Cancelled, which the operation either passes on
after undoing what it did (promote, split, scrub, check: nothing changed) or ignores
because it rolls forward once started (revert, as after a crash). The thread is never
abandoned: it holds pool files and the coordinator's claims until it returns.

Who cancels: the control connection (an explicit ``cancel`` request, the requester
disconnecting, the daemon stopping), through the token it gave the coordinator call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

from blockstore import errors as bse

log = logging.getLogger(__name__)

FORWARD_EVERY = 0.05   # seconds between two progress reports sent to the trio thread

# progress(done, total, what), called on the trio thread
ProgressFn = Callable[[int, int, str], None] | None


class CancelToken:
    """Set once, from the trio thread; read by worker threads between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.job: Job | None = None   # the job running under it (Jobs.run sets it)

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Job:
    """One running long operation (status shows it: op, target, progress, state)."""

    def __init__(self, jid: int, op: str, target: str, volume: str | None,
                 token: CancelToken | None) -> None:
        self.id = jid
        self.op = op
        self.target = target
        self.volume = volume
        self.token = token if token is not None else CancelToken()
        self.started = time.time()
        self._t0 = time.monotonic()
        self.done = 0
        self.total = 0
        # set (in the worker thread, by the block store) once the operation is past its
        # point of no return: a cancellation from then on lets it complete (a promote
        # commits its copy, a revert rolls forward)
        self.rolls_forward = False

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def check(self) -> None:
        """Raise Cancelled if the requester cancelled (call between steps, any thread)."""
        if self.token.cancelled:
            raise bse.Cancelled(f"{self.op} cancelled: {self.token.reason}")

    def thread_progress(self, progress: ProgressFn, what: str) -> Callable[[int, int], None]:
        """The block store's progress callback for this job (called in its worker
        thread): records progress for status, forwards it to ``progress`` on the trio
        thread (at most every FORWARD_EVERY s, and the last step), and raises Cancelled
        once the token is cancelled."""
        token = trio.lowlevel.current_trio_token()
        last = 0.0

        def safe(done: int, total: int) -> None:   # a bare trio callback: never raise
            if progress is None:
                return
            try:
                progress(done, total, what)
            except Exception:
                log.exception("progress report failed")

        def cb(done: int, total: int) -> None:
            nonlocal last
            self.done, self.total = done, total
            now = time.monotonic()
            if progress is not None and (now - last >= FORWARD_EVERY or done >= total):
                last = now
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(safe, done, total)
            self.check()

        def point_of_no_return() -> None:   # the store: it completes from now on
            self.rolls_forward = True
        cb.point_of_no_return = point_of_no_return  # type: ignore[attr-defined]
        return cb

    def to_json(self) -> dict[str, Any]:
        state = "running"
        if self.cancelled:
            state = ("cancelling" if not self.rolls_forward else
                     "rolling-forward" if self.op == "revert" else "completing")
        done, total = self.done, self.total   # (a worker thread moves them)
        spent = time.monotonic() - self._t0
        rate = done / spent if spent > 0 else 0.0
        eta = (max(total - done, 0) / rate) if rate > 0 and total else None
        return {"id": self.id, "op": self.op, "target": self.target, "volume": self.volume,
                "state": state, "done": done, "total": total,
                "percent": round(100 * done / total, 1) if total else None,
                "rate": int(rate), "eta": None if eta is None else round(eta, 1),
                "started": self.started}


class Jobs:
    """The coordinator's running jobs (trio thread only)."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)

    @contextlib.contextmanager
    def run(self, op: str, target: str, volume: str | None = None,
            token: CancelToken | None = None) -> Iterator[Job]:
        job = Job(next(self._ids), op, target, volume, token)
        job.token.job = job
        self._jobs[job.id] = job
        try:
            yield job
        finally:
            del self._jobs[job.id]

    def list(self) -> list[dict[str, Any]]:
        return [j.to_json() for j in self._jobs.values()]
