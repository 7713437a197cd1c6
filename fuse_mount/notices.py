"""The kernel notifications of one FUSE session (invalidating cached names and inodes),
and the session's close, which must never run while one is being sent.

pyfuse3 sends them with the GIL released, through libfuse's session -- which
pyfuse3.close() destroys (fuse_session_destroy frees it) while other threads may still
be inside such a call: its own thread for invalidate_entry_async (which pyfuse3.main()
only asks to stop, never waits for), and our worker threads (refresh_now,
invalidate_lun) of control requests being cancelled at the same stop. A notification
sent after the close failed with EINVAL (the session pointer already NULL: pyfuse3 logged
it as an ERROR with a traceback); one sent during it used freed memory. So every
notification goes through here, under one lock, and close() takes that lock, marks the
session closed (a notification after it is dropped: the mount is gone with everything
the kernel cached) and only then lets pyfuse3 close the session.

A notification can block in the kernel while a request on a related name or inode is in
flight (pyfuse3's invalidate_entry docstring); once the session loop has stopped such a
request is never answered, so close() waits CLOSE_WAIT for the lock, then logs and
closes anyway (pyfuse3's own behaviour: better than a stop that never ends).

Threads: queue() from any thread (the trio thread, in handlers too: it never blocks);
entry()/inode() from worker threads only (they may block); close() once, from the trio
thread, after the session loop ended.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable

import pyfuse3

log = logging.getLogger(__name__)

CLOSE_WAIT = 5.0   # seconds close() waits for a notification in flight (see above)


class KernelNotices:
    def __init__(self) -> None:
        self._lock = threading.Lock()     # held while a notification is being sent
        self._closed = False
        self._later: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def queue(self, parent: int, name: bytes) -> None:
        """Invalidate a cached name soon, from a thread of our own (never blocks: a
        handler may call it). In order; errors are logged there."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_queued, daemon=True,
                                            name="fuse-notices")
            self._thread.start()
        self._later.put((parent, name))

    def _send_queued(self) -> None:
        while (item := self._later.get()) is not None:
            try:
                self.entry(*item)
            except OSError as e:
                log.warning("invalidating the entry %r: %s", item[1], e)

    def entry(self, parent: int, name: bytes) -> None:
        """Invalidate a cached name now (may block: a worker thread). A name the kernel
        does not know (ENOENT) is no error."""
        self._send(pyfuse3.invalidate_entry, parent, name)

    def inode(self, ino: int, attr_only: bool = False) -> None:
        """Drop an inode's cached attributes (and pages, unless attr_only) now (may
        block: a worker thread). An inode the kernel never looked up is no error."""
        self._send(pyfuse3.invalidate_inode, ino, attr_only)

    def _send(self, notify: Callable[..., None], *args: object) -> None:
        """One notification under the lock, unless the session is closed; ENOENT (the
        kernel has nothing of it cached) is no error."""
        with self._lock:
            if self._closed:
                return
            try:
                notify(*args)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise

    def close(self, unmount: bool = True) -> None:
        """pyfuse3.close(), once no notification is in flight; none is sent after."""
        if self._thread is not None:
            self._later.put(None)   # what is queued before it still goes out first
        got = self._lock.acquire(timeout=CLOSE_WAIT)
        if not got:
            log.warning("a kernel notification is still in flight after %g s; closing "
                        "the FUSE session anyway", CLOSE_WAIT)
        try:
            self._closed = True
            pyfuse3.close(unmount=unmount)
        finally:
            if got:
                self._lock.release()
