"""Following the other hosts on one RBD pool (issue 18 item 2): each host's RbdArray
keeps the pool's catalog in memory, so another host's change must reach it.

    watch/notify   every array watches the object ``spx.changes`` in the pool; after a
                   change of names, flags, presentation or snapshots it notifies that
                   object (from a thread of its own: a notify waits for every watcher's
                   acknowledgement, up to NOTIFY_TIMEOUT for a host that died and whose
                   watch the OSD has not dropped yet). A notify wakes the refresher of
                   every other host, which scans the pool (rbdarray/scan.py) and
                   applies it; the mount follows the array's ``generation``.
    poll           the refresher also scans every POLL seconds: a notify lost with a
                   broken watch (re-established on its error callback), or a change
                   made with the rbd tool, is seen within that time.

Why watch/notify rather than a poll alone: a poll short enough to feel immediate (a
fraction of a second) costs every host a read of every image's header that often; a
notify costs nothing while nothing changes. The delay measured is in docs/ceph.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHANGES = "spx.changes"      # the object every host watches and notifies
POLL = 15.0                  # s between two scans without a notify
NOTIFY_TIMEOUT_MS = 3000     # a notify waits this long for the watchers' acks
WATCH_TIMEOUT = 30           # s the OSD keeps a watch whose client went silent
RETRY = 0.05                 # s before a refresh that met a local change is tried again


class Follower:
    """The watch on CHANGES, the refresher thread and the notifier thread of one
    array. ``refresh()`` returns False when it must be tried again soon (a local change
    was under way while it scanned)."""

    def __init__(self, io: Any, refresh: Callable[[], bool], poll: float = POLL) -> None:
        self._io = io
        self._refresh = refresh
        self._poll = poll
        self.cookie = uuid.uuid4().hex      # our own notifies carry it: we skip them
        self._wake = threading.Event()
        self._outbox = threading.Event()
        self._stop = threading.Event()
        self._watch: Any = None
        self._rewatch = False
        self.refreshes = 0                  # scans applied (tests, docs' figures)
        if not _exists(io, CHANGES):
            with contextlib.suppress(Exception):   # the watch below says what failed
                io.write_full(CHANGES, b"")
        self._start_watch()
        self._threads = [threading.Thread(target=self._refresher, name="rbd-follow",
                                          daemon=True),
                         threading.Thread(target=self._notifier, name="rbd-notify",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ watch
    def _start_watch(self) -> None:
        try:
            self._watch = self._io.watch(CHANGES, self._on_notify, self._on_error,
                                         timeout=WATCH_TIMEOUT)
            self._rewatch = False
        except Exception as e:   # noqa: BLE001 - the poll goes on; tried again
            log.warning("watching %s for other hosts' changes: %s; polling every %.0f s "
                        "until it works", CHANGES, e, self._poll)
            self._rewatch = True

    def _on_notify(self, notify_id: int, notifier_id: int, watch_id: int,
                   data: bytes) -> None:
        # librados' thread: only wake the refresher (the ack goes when this returns)
        if (data.decode(errors="replace") if isinstance(data, bytes) else str(data)) \
                != self.cookie:
            self._wake.set()

    def _on_error(self, *args: Any) -> None:
        log.warning("the watch on %s broke (%s): rescanning and watching again",
                    CHANGES, args[-1] if args else "?")
        self._rewatch = True
        self._wake.set()

    # ------------------------------------------------------------------ threads
    def _refresher(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll)
            if self._stop.is_set():
                return
            self._wake.clear()
            if self._rewatch:
                self._close_watch()
                self._start_watch()
            try:
                while not self._refresh():
                    if self._stop.wait(RETRY):
                        return
                self.refreshes += 1
            except Exception as e:   # noqa: BLE001 - the next notify or poll tries again
                log.warning("refreshing the pool's catalog: %s", e)

    def _notifier(self) -> None:
        while not self._stop.is_set():
            self._outbox.wait()
            if self._stop.is_set():
                return
            self._outbox.clear()    # changes made from here on get a notify of their own
            try:
                self._io.notify(CHANGES, self.cookie, timeout_ms=NOTIFY_TIMEOUT_MS)
            except Exception as e:   # noqa: BLE001 - a dead watcher's ack timed out
                log.debug("notify of %s: %s (the live hosts got it)", CHANGES, e)

    def changed(self) -> None:
        """Tell the other hosts (soon, from the notifier thread; never blocks)."""
        self._outbox.set()

    def wake(self) -> None:
        """Scan now (as a notify would)."""
        self._wake.set()

    def _close_watch(self) -> None:
        w, self._watch = self._watch, None
        if w is not None:
            with contextlib.suppress(Exception):
                w.close()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._outbox.set()
        for t in self._threads:
            t.join(NOTIFY_TIMEOUT_MS / 1000 + 5)
        self._close_watch()


def _exists(io: Any, obj: str) -> bool:
    try:
        io.stat(obj)
    except Exception:   # noqa: BLE001 - ObjectNotFound (anything else: write_full says)
        return False
    return True
