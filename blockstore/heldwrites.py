"""Held writes and grouped syncs: the concurrency core of the data path.

An origin write to a chunk freshly preserved for a snapshot may not reach the origin file
before that preservation is durable (invariant 2). Instead of a sync pair per write, the
chunk's new content is held in memory (_Volume.held, model.Held) and batches of them are made
durable together: cut under the pool lock (DiffArea.cut), synced WITHOUT it (by the
writeback thread, or _drain for a flush), finished under it (_write_out). A failed sync
invalidates the snapshots that needed what it lost before anything held reaches the
origin; the origin write itself never fails (invariant 5).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import TYPE_CHECKING

from .core import PoolCore
from .fileio import DataFile, is_zeros
from .model import (
    COMMITTED,
    DIFFERENTIAL,
    INVALID,
    WRITEBACK_AGE,
    WRITEBACK_BYTES,
    HeldBuffer,
    _Batch,
    _Volume,
)

log = logging.getLogger(__name__)
# A run of whole chunks at least this long that a batch writes out to the origin starts
# its writeback at once (DataFile.start_writeback): the disk writes it while the data path
# goes on, instead of all at the next flush (docs/performance.md). Shorter pieces -- a
# random 4 KiB write -- are left to the flush and the kernel. Only in a pool that copies:
# where the pool preserves by reference (xfs, btrfs) the origin's chunks share their
# blocks with the slots, so their writeback is a copy-on-write (new blocks, a remap at
# I/O completion), and started by the writeback thread it cost that thread ~0.1 s per
# GiB of a sequential first-write stream and made the batches' fdatasyncs wait ~2x
# longer (docs/performance.md "XFS seq first writes"): there, as for every origin write
# with no snapshot, the kernel's writeback and the flush write the origin.
ORIGIN_KICK = 1 << 20
# At most this much per system call of a write-out (a run of whole chunks is written in
# pieces): the page cache then builds folios of at most 1 MiB, as for the data path's own
# 1 MiB writes. Bigger calls get 2 MiB folios, each a whole free page block -- on a VM
# with free page reporting (virtio-balloon) often one given back to the host, whose first
# touch costs ~20x: 16 MiB pwritev ran at 430-2,700 MiB/s, 1 MiB pieces at 8-10 GiB/s
# (docs/performance.md "The copy-before-write stall").
ORIGIN_PIECE = 1 << 20
# The writeback thread writes a batch out without the pool lock only when it copies at
# least this much: below, the copy is short (random 4 KiB first writes: a few hundred
# 4 KiB pwrites, ~1 ms) and two more lock round trips and the GIL shared with the FUSE
# thread meanwhile cost more than the lock hold they save.
UNLOCKED_MIN = 4 << 20
# The writeback thread's step (wait_and_writeback) goes on with the next batch when the
# data path queues one within WRITEBACK_LINGER of the last, for up to WRITEBACK_BUSY
# seconds, before it returns to its caller. The daemon's caller is a trio task, and each
# return waits for the event loop -- the FUSE thread, busy with the very stream that
# queues the batches: meanwhile the batch waited, queued, until the writer met the
# memory bound and synced and wrote it out itself, inline (docs/performance.md "XFS seq
# first writes"). WRITEBACK_BUSY bounds how long a stop waits for the step.
WRITEBACK_LINGER = 0.01
WRITEBACK_BUSY = 0.5


class HeldWrites(PoolCore):
    if TYPE_CHECKING:   # called from here, defined above (datapath.py)
        def _overflow(self, v: _Volume, why: str) -> None: ...

    def _maybe_writeback(self, v: _Volume) -> None:
        assert self._owned(), "pool lock not held"
        if not v.held.chunks:
            return
        held = len(v.held.chunks) * self.chunk_size
        if v.held.batch is not None:   # a batch is queued or syncing: wait for it only when
            if held >= 2 * WRITEBACK_BYTES:   # the memory bound is reached (back-pressure)
                if self.background_writeback:
                    # wait for the batch in flight (its sync and write-out need no lock),
                    # then hand what is held now to the writeback thread as the next one:
                    # the writer waits for the disk only as long as the thread is behind,
                    # never for syncs of its own
                    self._settle(v)
                    if v.held.chunks and v.held.batch is None:
                        self._queued.append(self._cut(v))
                        self._wake.set()
                else:
                    self._writeback(v)
        elif self.background_writeback:
            # cut the batch here (no I/O) and hand it to the writeback thread: waiting for
            # that thread to get the lock between two back-to-back writes could take long
            if self._batch_due(v, time.monotonic(), WRITEBACK_AGE):
                self._queued.append(self._cut(v))
                self._wake.set()
        elif held >= WRITEBACK_BYTES or time.monotonic() - v.held.since >= WRITEBACK_AGE:
            self._writeback(v)

    def _batch_due(self, v: _Volume, now: float, max_age: float) -> bool:
        """Whether a background batch of v should be cut: it holds half the memory
        bound, or its oldest held write is max_age old."""
        return (len(v.held.chunks) * self.chunk_size >= WRITEBACK_BYTES // 2
                or now - v.held.since >= max_age)

    def _cut(self, v: _Volume) -> _Batch:
        """A batch of everything v holds now (lock held; no I/O)."""
        assert self._owned(), "pool lock not held"
        b = _Batch(v, v.diff.cut() if v.diff is not None else None, v.held.in_order(),
                   time.monotonic())
        v.held.batch = b
        return b

    def _settle(self, v: _Volume) -> None:
        """Finish v's batch, if it has one, before anything that syncs, reclaims or closes
        its files. The pool lock is NOT released meanwhile (so every locked operation
        stays atomic): a batch still queued is synced here; one the writeback thread is
        syncing is waited for -- that sync needs no lock -- and then finished here."""
        assert self._owned(), "pool lock not held"
        b = v.held.batch
        if b is None:
            return
        if b in self._queued:
            self._queued.remove(b)
            self._sync(b)
        else:
            b.synced.wait()
        self._finish(b)
        if b.crashed is not None:   # SimulatedCrash (tests): the caller's step crashed
            raise b.crashed

    def _writeback(self, v: _Volume) -> None:
        """Harden the diff area (one sync pair), then let the held chunks reach the origin.
        If the diff area cannot be made durable, the snapshots that needed those chunks
        become invalid first; the origin write itself never fails (invariant 5)."""
        assert self._owned(), "pool lock not held"
        self._harden(v)
        if v.held.chunks:
            self._write_out_or_overflow(v, v.held.in_order())

    def _write_out_or_overflow(self, v: _Volume, held: list[tuple[int, HeldBuffer]]
                               ) -> None:
        """_write_out, and if the file system is full: VSS's overflow, then again. A
        chunk preserved by reference (reflink pools) took no space when it was
        preserved: its origin write-out is what needs new blocks (the old ones are
        shared with the slot), so there the full file system shows, not at the
        preservation as with a copy. Deleting the oldest snapshot of the volume frees
        its slots (the shared blocks become the origin's alone again) and the write-out
        is retried -- as long as a differential snapshot of it is left to delete
        (invariant 5: origin writes never fail because of a snapshot)."""
        assert self._owned(), "pool lock not held"
        while True:
            try:
                self._write_out(v, held)
                return
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) \
                        or self.preserve_mode != "reflink" or not any(
                        s.kind == DIFFERENTIAL and s.state == COMMITTED for s in v.snaps):
                    raise   # (copying pools met a full file system at the preservation)
                self._overflow(v, f"file system full writing held chunks back ({e.strerror})")

    def _drain(self, v: _Volume) -> None:
        """_writeback(v) with its syncs WITHOUT the pool lock (call it without the lock):
        whatever v held or had preserved when called is durable, and written out to the
        origin, when it returns. The lock is taken only to cut the batch (DiffArea.cut)
        and to finish it (_write_out, in memory and the page cache); a batch the
        writeback thread is syncing is waited for first, then v's own batch is cut. A
        thread holding the lock (_settle) may finish our batch meanwhile: _finish runs
        once per batch."""
        while True:
            with self._lock:
                if self._volumes.get(v.name) is not v:
                    return   # deleted meanwhile: its delete settled every batch
                b = v.held.batch
                cut_here = b is None   # a batch of everything held up to this call
                if b is None:
                    if not v.held.chunks and not (v.diff is not None and v.diff.unsynced):
                        return
                    b = self._cut(v)
                    sync_here = True
                else:   # queued by the data path: ours to sync; else the thread syncs it
                    sync_here = b in self._queued
                    if sync_here:
                        self._queued.remove(b)
            if sync_here:
                self._sync(b)
            else:
                b.synced.wait()   # the writeback thread's sync: needs no lock
            with self._lock:
                self._finish(b)
                if b.crashed is not None:   # SimulatedCrash (tests)
                    raise b.crashed
                # another thread finished our batch (_settle) and could not write some of
                # it out (it logs and keeps them held): go again, so that the error is
                # ours to raise, never a flush that returns with the data in memory
                left = any(v.held.chunks.get(c) is buf for c, buf in b.held)
            if cut_here and not left:
                return

    def _drain_origin(self, snap_id: str) -> None:
        """(WITHOUT the lock.) _drain of a snapshot's origin: what an operation on the
        snapshot would otherwise sync under the lock (its _writeback) is synced first."""
        with self._lock:
            v = self._snap(snap_id).origin
        self._drain(v)

    def _harden(self, v: _Volume, keep_going: bool = False) -> None:
        """Every preservation of v durable, or the snapshots that needed a lost one
        invalid (what a delete and its GC need; the first half of _writeback). The batch
        in flight is finished, held chunks are NOT written out here. keep_going (a
        delete): a chunk of that batch that cannot be written out (ENOSPC on a full pool)
        stays held, logged, for the next flush to retry and report -- it must not stop
        the delete, which gives the space back."""
        assert self._owned(), "pool lock not held"
        try:
            self._settle(v)
        except OSError as e:
            if not keep_going:
                raise
            log.warning("volume %s: held writes not written back (%s); they stay held",
                        v.name, e)
        if v.diff is not None and v.diff.unsynced:
            try:
                v.diff.harden()
            except OSError as e:
                v.held.lost.append((v.diff.drop_unsynced(), e))
                v.diff.forget_failure()   # nothing unsynced is left to pass for durable
        self._resolve_lost(v)

    def _resolve_lost(self, v: _Volume) -> None:
        """Invalidate (durably) the snapshots that needed preservations a failed sync
        lost, BEFORE any held chunk may reach the origin. If the catalog fails too, the
        losses stay recorded and the chunks held: the next writeback tries again."""
        assert self._owned(), "pool lock not held"
        while v.held.lost:
            lost, err = v.held.lost[0]
            self._invalidate_needing(v, lost, err)
            v.held.lost.pop(0)

    def _invalidate_needing(self, v: _Volume, lost: list[tuple[int, int]],
                            err: OSError) -> None:
        """The diff area failed (EIO): every snapshot that needed a lost (chunk, epoch)
        preservation -- epochs in (chunk's last durable preservation, epoch] -- becomes
        invalid, durably, before the origin is overwritten. Never served wrong."""
        assert v.diff is not None
        ranges = [(v.diff.last_epoch(c), upto) for c, upto in lost]
        victims = [s for s in v.snaps
                   if s.kind == DIFFERENTIAL and s.state in (COMMITTED, INVALID)
                   and any(lo < (s.epoch or 0) <= hi for lo, hi in ranges)]
        for s in victims:   # in memory first: reads refuse at once, even if the catalog
            if s.state == COMMITTED:   # write below fails (then it is retried)
                log.error("diff area of %s failed (%s): snapshot %s is now invalid",
                          v.name, err, s.snap_id)
                s.state = INVALID
                self._changed()
        self._refresh_live(v)
        for s in victims:   # idempotent: a retry rewrites the ones already invalid
            self._set_state(s, INVALID)

    def _write_out(self, v: _Volume, held: list[tuple[int, HeldBuffer]]) -> None:
        """Write these held chunks (sorted; their preservations durable) to the origin
        file -- only the part of each that changed -- and stop holding them. A chunk
        whose buffer is no longer the one given was preserved again since (its new
        preservation is not durable yet): it stays held. A chunk stops being held only
        once its write succeeded (an EIO leaves the rest held, for the next flush).
        A run of at least ORIGIN_KICK starts its writeback at once (pools that copy)."""
        assert self._owned(), "pool lock not held"
        done, err = self._out_io(v, self._out_plan(v, held))
        v.held.release(done)
        if err is not None:
            raise err

    def _out_plan(self, v: _Volume, held: list[tuple[int, HeldBuffer]]
                  ) -> list[tuple[int, HeldBuffer, int, int, int]]:
        """(Lock held.) What _out_io writes: (chunk, buffer, lo, hi, length) of each
        chunk of `held` that still has that buffer -- [lo, hi) its changed part, length
        how much of it lies inside the volume."""
        assert self._owned(), "pool lock not held"
        cs = self.chunk_size
        chunks, dirty = v.held.chunks, v.held.dirty
        plan = []
        for c, buf0 in held:
            if chunks.get(c) is not buf0:
                continue
            n = min(cs, v.size - c * cs)
            lo, hi = dirty.get(c, (0, 0))
            plan.append((c, buf0, lo, min(hi, n), n))
        return plan

    def _out_io(self, v: _Volume, plan: list[tuple[int, HeldBuffer, int, int, int]]
                ) -> tuple[list[int], BaseException | None]:
        """The I/O of a write-out: needs no pool lock when the buffers cannot change
        meanwhile (Held.writing) and v.file is pinned. Returns the chunks written (or
        needing no write) and the error that stopped it, if any."""
        cs = self.chunk_size
        zero = bytes(cs)
        run: list[memoryview] = []     # whole dirty chunks, consecutive: one pwritev
        run_chunks: list[int] = []
        run_start = -1
        done: list[int] = []
        kick = ORIGIN_KICK if self.clone_min_chunks is None else None   # copying pools only

        def write_run() -> None:
            v.file.pwritev(run, run_start)
            if kick is not None and len(run) * cs >= kick:
                v.file.start_writeback(run_start, len(run) * cs)
            done.extend(run_chunks)

        try:
            for c, buf0, lo, hi, n in plan:
                buf = memoryview(buf0)[:n]
                whole = lo == 0 and hi == n
                if run and (not whole or c * cs != run_start + len(run) * cs):
                    write_run()
                    run, run_chunks = [], []
                if lo >= hi:                   # preserved, never changed: origin is right
                    done.append(c)
                elif is_zeros(buf, zero):      # a discard landed here: keep the hole
                    v.file.punch(c * cs, n)
                    done.append(c)
                elif whole:
                    if not run:
                        run_start = c * cs
                    run.append(buf)
                    run_chunks.append(c)
                    if len(run) * cs >= ORIGIN_PIECE:
                        write_run()
                        run, run_chunks = [], []
                else:                          # e.g. one 4 KiB write: write 4 KiB, not 64
                    v.file.pwrite(buf[lo:hi], c * cs + lo)
                    done.append(c)
            if run:
                write_run()
        except BaseException as e:   # noqa: BLE001 - handed to the caller with `done`
            return done, e
        return done, None

    def writeback(self, max_age: float = WRITEBACK_AGE) -> None:
        """Push held writes older than max_age (or, of a volume, more than half the
        WRITEBACK_BYTES bound) to the origins: the daemon's writeback thread (then set
        background_writeback, so that the data path leaves the age bound to it, cuts
        batches for it and syncs inline only at the memory bound).

        The pool lock is held to cut the batches (DiffArea.cut) and, after ALL their syncs,
        to write out the chunks each covers; the syncs themselves (sync_batch) run WITHOUT
        the lock, so reads, writes into held chunks and new preservations (for the next
        batch) go on while the disk syncs, and whoever needs a batch finished can wait
        for its sync holding the lock (_settle). One batch per volume at a time (v.held.batch).
        An origin write that fails here leaves its chunks held (logged); the next flush
        reports it."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return
            for v in self._volumes.values():
                if v.held.chunks and v.held.batch is None and self._batch_due(v, now, max_age):
                    self._queued.append(self._cut(v))   # queued at once: never orphaned
            jobs, self._queued = self._queued, []   # with those the data path cut
        for b in jobs:          # every sync first: a waiter may hold the lock meanwhile
            self._sync(b)
        crash: BaseException | None = None
        out: list[tuple[_Batch, list[DataFile]]] = []
        with self._lock:
            for b in jobs:
                try:
                    if self._start_write_out(b):
                        out.append((b, self._pin([b.volume.file])))
                except Exception as e:   # noqa: BLE001 - one volume's trouble, not all
                    log.error("writing held chunks back to volume %s: %s (they stay held)",
                              b.volume.name, e)
                crash = crash or b.crashed
        for b, _ in out:        # the copies into the page cache, WITHOUT the lock
            self._write_out_unlocked(b)
        if out:
            with self._lock:
                for b, files in out:
                    self._release(files)
                    try:
                        self._finish(b)
                    except Exception as e:   # noqa: BLE001 - one volume's trouble
                        log.error("writing held chunks back to volume %s: %s (they stay "
                                  "held)", b.volume.name, e)
                    except BaseException as e:   # noqa: BLE001 - SimulatedCrash (tests)
                        crash = crash or e
        if crash is not None:
            raise crash

    def _start_write_out(self, b: _Batch) -> bool:
        """(Lock held, b synced.) Set b up for _write_out_unlocked: True if the thread
        is to write it out now. A batch with anything unusual -- a failed or crashed
        sync, losses to resolve first -- is finished here under the lock instead, as is
        one that holds nothing to write; one finished by a waiter already is left."""
        assert self._owned(), "pool lock not held"
        if b.done:
            return False
        v = b.volume
        if b.crashed is not None or b.error is not None or v.held.lost:
            self._finish(b)
            return False
        plan = self._out_plan(v, b.held)
        if sum(hi - lo for _, _, lo, hi, _ in plan if hi > lo) < UNLOCKED_MIN:
            self._finish(b)   # nothing or little to copy: under the lock, as any finish
            return False
        v.held.writing = frozenset(c for c, *_ in plan)
        b.written = threading.Event()
        b.out = (plan, [], None)
        return True

    def _write_out_unlocked(self, b: _Batch) -> None:
        """The writeback thread's write-out of a synced batch WITHOUT the pool lock: the
        held chunks' buffers are copied into the origin's page cache while the data path
        goes on (it used to wait for the lock meanwhile: 3-110 ms per 16 MiB batch,
        docs/performance.md). Safe because the preservations are durable (the batch's
        sync came first), the file is pinned, reads still overlay the held buffers, and
        a write into a chunk being written gets a new buffer (Held.writable), so the
        chunk stays held with it. _finish then releases the chunks written."""
        assert b.out is not None and b.written is not None
        plan = b.out[0]
        try:
            done, err = self._out_io(b.volume, plan)
        except BaseException as e:   # noqa: BLE001 - recorded for _finish
            done, err = [], e
        b.out = (plan, done, err)
        b.written.set()

    def wait_and_writeback(self, timeout: float, busy_for: float = WRITEBACK_BUSY) -> None:
        """The writeback thread's step: sleep until the data path queues a batch or
        `timeout` passes, then writeback() -- and again, in the same call, whenever the
        data path queues the next batch within WRITEBACK_LINGER, for up to `busy_for`
        seconds: a stream of batches is written back without a return to the caller per
        batch (see WRITEBACK_LINGER)."""
        end = time.monotonic() + busy_for
        self._wake.wait(timeout)
        while True:
            self._wake.clear()
            self.writeback()
            if self._closed or time.monotonic() >= end \
                    or not self._wake.wait(WRITEBACK_LINGER):
                return

    def _sync(self, b: _Batch) -> None:
        """A batch's durable part; needs no pool lock. Never raises: the outcome is
        recorded in the batch for _finish."""
        try:
            if b.sync is not None:
                assert b.volume.diff is not None
                b.volume.diff.sync_batch(b.sync)
        except OSError as e:
            b.error = e
        except BaseException as e:   # noqa: BLE001 - SimulatedCrash (tests): nothing more happens
            b.crashed = e
        finally:
            b.synced.set()

    def _finish(self, b: _Batch) -> None:
        """(Lock held, the batch synced.) Once per batch, by whoever comes first."""
        assert self._owned(), "pool lock not held"
        if b.done:
            return
        if b.written is not None:   # the writeback thread is writing it out: its I/O
            b.written.wait()         # needs no lock
            self._finish_written(b)
            return
        b.done = True
        v, da = b.volume, b.volume.diff
        try:
            if b.crashed is not None:
                if b.sync is not None and da is not None:
                    da.unsynced[:0] = b.sync.slots   # not durable: for drop or a retry
                return
            if b.error is not None and b.sync is not None and da is not None:
                # Linux reports a failed writeback once: what was preserved while that
                # sync ran may be lost too, so those entries go with the batch
                v.held.lost.append((da.drop_batch(b.sync) + da.drop_unsynced(), b.error))
                da.forget_failure()   # nothing unsynced is left to pass for durable
            self._resolve_lost(v)
            self._write_out_or_overflow(v, b.held)
            if v.held.chunks:   # preserved while the batch synced: the next batch's
                v.held.since = b.cut_at
        finally:
            v.held.batch = None

    def _finish_written(self, b: _Batch) -> None:
        """(Lock held.) _finish of a batch the thread wrote out without the lock: the
        chunks written that still have the buffer written stop being held (one written
        into meanwhile has a new buffer and stays held for the next batch); an error
        leaves the rest held -- a full file system on a reflink pool overflows and
        writes them here (_write_out_or_overflow), anything else is raised."""
        assert self._owned(), "pool lock not held"
        assert b.out is not None
        b.done = True
        v = b.volume
        plan, done, err = b.out
        try:
            v.held.writing = frozenset()
            bufs = {c: buf for c, buf, *_ in plan}
            chunks = v.held.chunks
            v.held.release([c for c in done if chunks.get(c) is bufs[c]])
            if err is not None:
                if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC,
                                                                     errno.EDQUOT):
                    raise err
                gone = set(done)
                self._write_out_or_overflow(v, [(c, buf) for c, buf in bufs.items()
                                                if c not in gone and chunks.get(c) is buf])
            if v.held.chunks:   # held since the cut: the next batch's
                v.held.since = b.cut_at
        finally:
            v.held.batch = None
