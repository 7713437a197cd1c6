"""Per-volume write barrier: the array's "flush & hold" for the coordinator.

    barrier = WriteBarrier(pool)
    hold = await barrier.hold(["db", "logs"], deadline=10.0)   # writes now wait
    ... commit the snapshot set ...
    ok = barrier.release(hold)       # False if the hold had expired before release

While a volume is held, FUSE writes (and discards) to it WAIT on the trio loop -- they are
never failed -- and reads go on. `hold()`:
  1. marks the volumes held (from this instant new writes wait),
  2. waits until writes already in flight on those volumes have finished,
  3. flushes each volume to the store (pool.flush, in a worker thread so reads keep being
     served), so everything acknowledged before the hold is durable,
  4. returns a `Hold` handle.
A hold auto-releases at its deadline (counted from the moment writes started waiting); its
`expired` flag then reads True and `release()` returns False, so the coordinator can fail
the set with VSS_E_FLUSH_WRITES_TIMEOUT. Expiry is exact but lazy: it is evaluated against
trio's clock whenever anyone looks (waiting writers wake at the deadline by themselves), so
no background task is needed. Several holds may cover the same volume; it stays held until
all of them are released or expired.

Kernel caches: the mount does NOT enable FUSE's writeback cache (see operations.py), so
every write(2) -- including the loop driver's writes to an image -- reaches our write
handler synchronously before the caller's write returns. There are therefore no dirty
pages for an image inside the kernel that could bypass the barrier: what the kernel has
acknowledged, we have received. Dirty data ABOVE the image (the page cache of a filesystem
mounted from a loop device on the image) is the writers' business (fsfreeze), as in VSS.

All methods must be called from the trio thread that runs the FUSE session (the
coordinator runs on the same loop). Nothing here blocks the loop.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import trio

from .lunstore import LunStore

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 10.0  # seconds; VSS holds writes for at most 10 s


class Hold:
    """One flush-&-hold over a set of volumes."""

    def __init__(self, volumes: frozenset[str], started: float, deadline: float) -> None:
        self.volumes = volumes
        self.started = started          # trio.current_time() when writes began to wait
        self.deadline = deadline        # absolute trio time of the auto-release
        self.flushed = False            # True once hold() has flushed every volume
        self.released = False           # released by release()
        self._expired = False

    @property
    def expired(self) -> bool:
        """True if the deadline passed before release() (the hold auto-released)."""
        if not self._expired and not self.released and trio.current_time() >= self.deadline:
            self._expired = True
        return self._expired

    @property
    def active(self) -> bool:
        return not self.released and not self.expired

    def __repr__(self) -> str:
        state = "released" if self.released else "expired" if self._expired else "active"
        return f"<Hold {sorted(self.volumes)} {state}>"


class WriteBarrier:
    """Holds writes per volume. Of the store it uses only `flush(name)`."""

    def __init__(self, pool: LunStore) -> None:
        self._pool = pool
        self._holds: list[Hold] = []
        self._inflight: defaultdict[str, int] = defaultdict(int)
        self._changed = trio.Event()
        self._expired_unreleased: dict[str, Hold] = {}

    # ------------------------------------------------------------------ state

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _prune(self) -> None:
        if not self._holds:
            return
        keep = []
        for h in self._holds:
            if h.released:
                continue
            if h.expired:
                for v in h.volumes:
                    self._expired_unreleased[v] = h
                log.warning(
                    "write hold on %s expired after %.1f s: writes resume",
                    ", ".join(sorted(h.volumes)), h.deadline - h.started,
                )
                continue
            keep.append(h)
        if len(keep) != len(self._holds):
            self._holds = keep
            self._notify()

    def holding(self, name: str) -> Hold | None:
        """The (first) active hold covering volume `name`, or None."""
        if not self._holds:
            return None
        self._prune()
        for h in self._holds:
            if name in h.volumes:
                return h
        return None

    def is_held(self, name: str) -> bool:
        return self.holding(name) is not None

    @property
    def holds(self) -> list[Hold]:
        self._prune()
        return list(self._holds)

    # ------------------------------------------------------------------ write side

    async def wait_writable(self, name: str) -> None:
        """Return when no active hold covers `name` (immediately, without a checkpoint,
        on the fast path)."""
        while True:
            h = self.holding(name)
            if h is None:
                return
            ev = self._changed
            with trio.move_on_at(h.deadline):
                await ev.wait()

    def begin_write(self, name: str) -> None:
        self._inflight[name] += 1

    def end_write(self, name: str) -> None:
        n = self._inflight[name] - 1
        if n <= 0:
            del self._inflight[name]
            if self._holds:
                self._notify()
        else:
            self._inflight[name] = n

    # ------------------------------------------------------------------ coordinator side

    async def hold(self, volume_names: Iterable[str], deadline: float = DEFAULT_DEADLINE) -> Hold:
        """Flush & hold writes to these volumes; see the module docstring.

        Raises what pool.flush raises (e.g. blockstore.errors.NotFound for an unknown
        volume); the hold is then dropped. Cancellation drops it too.
        """
        names = frozenset(volume_names)
        if not names:
            raise ValueError("hold() needs at least one volume")
        now = trio.current_time()
        h = Hold(names, now, now + deadline)
        for v in names:
            self._expired_unreleased.pop(v, None)
        self._holds.append(h)
        log.info("holding writes to %s (deadline %.1f s)", ", ".join(sorted(names)), deadline)
        try:
            while any(self._inflight.get(n, 0) for n in names) and h.active:
                ev = self._changed
                with trio.move_on_at(h.deadline):
                    await ev.wait()
            for n in sorted(names):
                if not h.active:
                    break
                await trio.to_thread.run_sync(self._pool.flush, n)
        except BaseException:
            self._drop(h)
            raise
        h.flushed = not h.expired
        if h.expired:
            self._prune()
        return h

    def _drop(self, h: Hold) -> None:
        h.released = True
        if h in self._holds:
            self._holds.remove(h)
        for v in [v for v, e in self._expired_unreleased.items() if e is h]:
            del self._expired_unreleased[v]
        self._notify()

    def release(self, what: Hold | Iterable[str]) -> bool:
        """Release a hold (or every hold's claim on these volume names); writes resume.

        Returns True if everything released was still active (or already released),
        False if a hold had expired first (its writes resumed at the deadline).
        Synchronous and idempotent: safe in cleanup code.
        """
        if isinstance(what, Hold):
            ok = what.released or not what.expired
            if not what.released:
                log.info("released write hold on %s", ", ".join(sorted(what.volumes)))
            self._drop(what)
            return ok
        names = frozenset(what)
        self._prune()
        ok = True
        for v in names:
            if self._expired_unreleased.pop(v, None) is not None:
                ok = False
        for h in list(self._holds):
            if h.volumes & names:
                h.volumes = h.volumes - names
                if not h.volumes:
                    self._drop(h)
        self._notify()
        log.info("released write holds on %s", ", ".join(sorted(names)))
        return ok
