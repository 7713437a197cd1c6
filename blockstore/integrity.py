"""A pool's integrity: check() (metadata and every checksum), scrub() (check plus a read of
every byte of every LUN) and seal() (the checksums of a full copy: luns/<id>.sum).

They run in worker threads beside the data path and reach into the Pool's state as a
part of the engine. The pool lock is held only for bookkeeping: the lists of what to
verify are made under it, with the files to read pinned (Pool._pin, so a concurrent
delete cannot close them), and the reads and hashing run outside it, so a check of a
large pool never stalls the FUSE thread (docs/concurrency.md). What is read outside the
lock is either immutable (a committed full copy, its .sum file) or verified again under
the lock before it is reported (a diff slot may be freed by gc and reused meanwhile).
A progress callback is called every PROGRESS_EVERY chunks (in bytes: the chunks' size);
one that raises (a cancelled request) stops the operation there, leaving nothing changed
but a seal's temporary file, which is removed. check() and scrub() may be limited to one
volume (and its snapshots: the pool-wide checks -- catalog, pool file, stray files --
are then left out) and count what they read in a Tally.
"""

from __future__ import annotations

import contextlib
import os
from array import array
from collections.abc import Callable, Iterator
from itertools import compress, count, islice
from operator import eq
from typing import TYPE_CHECKING

import xxhash

from . import accounting, seals
from . import format as fmt
from .diffarea import DATA, FREE, UNSUMMED
from .errors import Busy, Cancelled, NotFound, SnapshotInvalid, StoreError, Unsupported
from .fileio import DataFile, fsync_dir
from .model import COMMITTED, DIFFERENTIAL, PREPARING, Tally

if TYPE_CHECKING:
    from .diffarea import DiffArea
    from .pool import Pool, Progress, _Snapshot, _Volume

PROGRESS_EVERY = 64       # chunks between two progress calls
READ_PIECE = 1 << 20      # unit of scrub's reads
# scrub asks for a LUN's allocation map in pieces this big (a differential snapshot's
# costs O(chunks) under the pool lock: Pool.allocation)
ALLOCATION_WINDOW = 1 << 30

# a data check made under the lock, run outside it: returns the problems it found
_Job = Callable[[Callable[[int], None]], list[str]]


class _Plan:
    """check()'s data checks, planned under the lock: the jobs with their size in chunks,
    and what they hold open (pinned files, file descriptors) until close()."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.jobs: list[tuple[_Job, int]] = []
        self.pinned: list[DataFile] = []
        self.fds: list[int] = []

    def pin(self, f: DataFile | None) -> DataFile:
        assert f is not None
        self.pinned += self.pool._pin([f])
        return f

    def close(self) -> None:
        self.pool._unpin(self.pinned)
        for fd in self.fds:
            os.close(fd)


def _chunk_sums(f: DataFile, chunks: list[int], cs: int,
                tick: Callable[[int], None]) -> Iterator[tuple[int, int]]:
    """(chunk, digest) of every non-zero chunk among `chunks` of a full copy's file;
    digest 0 is reserved for an all-zero chunk, so a real digest of 0 is stored as 1."""
    zero = bytes(cs)
    for c in chunks:
        data = f.pread(cs, c * cs)
        if data and data != zero[:len(data)]:
            yield c, xxhash.xxh3_64_intdigest(data) or 1
        tick(1)


def _ticker(progress: Progress, total: int, unit: int = 1) -> Callable[[int], None]:
    """tick(n): n more steps of ``total`` done; progress(done, total) in bytes, a step
    being ``unit`` bytes (a chunk's size, or 1)."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        before, done = done, done + n
        if progress and (before // PROGRESS_EVERY != done // PROGRESS_EVERY or done == total):
            progress(done * unit, max(done, total) * unit)
    return tick


def _scope(pool: Pool, volume: str | None) -> list[_Volume]:
    """(Lock held.) The volumes a check covers: every one, or the one named (NotFound)."""
    return list(pool._volumes.values()) if volume is None else [pool._vol(volume)]


# -- seal -------------------------------------------------------------------------------------
def seal(pool: Pool, snap_id: str, progress: Progress = None) -> None:
    """Record an xxh3 per chunk of a full copy (plex or promoted): luns/<id>.sum."""
    with pool._lock:
        s = pool._snap(snap_id)
        pool._readable(s)
        if s.file is None:
            raise Unsupported(f"snapshot {s.snap_id} is differential; its preserved "
                              "chunks carry their own checksums")
        if s.sealed:
            return
        if s.snap_id in pool._sealing:
            raise Busy(f"snapshot {s.snap_id} is being sealed already")
        chunks = pool._snapshot_chunks(s)
        tmp = pool._sum(s.id) + ".tmp"
        sums = DataFile(tmp, "plex", pool.faults, create=True)
        pinned = pool._pin([s.file])
        pool._sealing.add(s.snap_id)
    try:
        tick = _ticker(progress, len(chunks), pool.chunk_size)
        for c, digest in _chunk_sums(pinned[0], chunks, pool.chunk_size, tick):
            sums.pwrite(digest.to_bytes(8, "little"), c * 8)
        sums.truncate(pool._nchunks(s.size) * 8)
        sums.sync()
        with pool._lock:
            pool._readable(s)   # deleted meanwhile: NotFound, nothing recorded
            os.replace(tmp, pool._sum(s.id))
            fsync_dir(os.path.join(pool.path, "luns"))
            with pool.catalog.transaction() as db:
                db.execute("UPDATE snapshots SET sealed=1 WHERE id=?", (s.id,))
            s.sealed = True
    finally:
        with pool._lock:
            pool._sealing.discard(s.snap_id)
        pool._unpin(pinned)
        sums.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- check ------------------------------------------------------------------------------------
def check(pool: Pool, progress: Progress = None, volume: str | None = None,
          tally: Tally | None = None) -> list[str]:
    """Verify catalog, headers, images, maps and every checksum (of ``volume`` and its
    snapshots only, if given: NotFound if there is none). [] means clean. ``tally``: the
    LUNs covered, the chunks verified and their bytes."""
    t = tally if tally is not None else Tally()
    with pool._lock:
        volumes = _scope(pool, volume)
    for v in volumes:
        pool._drain(v)   # held writes out first: sizes and extents are read from files
    plan = _Plan(pool)
    try:
        with pool._lock:
            problems: list[str] = []
            if volume is None:
                problems += pool.problems
                problems += pool.catalog.integrity()
                try:
                    fmt.read_pool_file(pool.path)
                except StoreError as e:
                    problems.append(str(e))
            for v in _scope(pool, volume):
                problems += _check_volume(pool, v, plan)
                t.luns += 1 + sum(1 for s in v.snaps if s.state == COMMITTED)
            if volume is None:
                problems += _stray_files(pool)
        cs = pool.chunk_size
        tick = _ticker(progress, sum(n for _, n in plan.jobs), cs)

        def counted(n: int) -> None:
            t.chunks += n
            t.bytes += n * cs
            tick(n)
        for job, _ in plan.jobs:
            problems += job(counted)
    finally:
        plan.close()
    return problems


def _stray_files(pool: Pool) -> list[str]:
    """luns/ and diff/ files of no LUN (opening the pool removes them); the unfinished
    .tmp/.partial files of an operation in progress are not strays."""
    vols = {str(v.id) for v in pool._volumes.values()}
    luns = vols | {str(s.id) for s in pool._snaps.values()}
    out = []
    for sub, ids in (("luns", luns), ("diff", vols)):
        for fn in sorted(os.listdir(os.path.join(pool.path, sub))):
            if fn.split(".", 1)[0] not in ids and not fn.endswith((".tmp", ".partial")):
                out.append(f"{sub}/{fn} belongs to no volume or snapshot")
    return out


def _check_volume(pool: Pool, v: _Volume, plan: _Plan) -> list[str]:
    """(Lock held.) The metadata checks of a volume and its snapshots; the data checks
    go to the plan."""
    out = []
    if v.file.size() != v.size:
        out.append(f"volume {v.name}: image is {v.file.size()} bytes, catalog says {v.size}")
    out += _check_header(pool, v, f"volume {v.name}")
    epochs = [s.epoch for s in v.snaps if s.kind == DIFFERENTIAL and s.state != PREPARING]
    if len(set(epochs)) != len(epochs):
        out.append(f"volume {v.name}: two differential snapshots share an epoch")
    for s in v.snaps:
        what = f"snapshot {s.snap_id} of {v.name}"
        out += _check_header(pool, s, what)
        if s.kind == DIFFERENTIAL and s.state == COMMITTED:
            if s.epoch is None or s.epoch > v.epoch:
                out.append(f"{what}: epoch {s.epoch} beyond the volume's {v.epoch}")
            if v.diff is None:
                out.append(f"{what}: the volume has no diff area")
        if s.file is not None and s.state == COMMITTED:
            if s.file.size() != s.size:
                out.append(f"{what}: image is {s.file.size()} bytes, expected {s.size}")
            if s.sealed:
                out += _plan_sums(pool, s, what, plan)
    if v.diff is not None:
        da = v.diff
        out += accounting.check(da, v.live_epochs, f"volume {v.name}")
        # the copy rule preserves a chunk once per epoch: a second entry either took
        # the first one's place in its epoch's table (fewer listed than used slots) or
        # sits next to it in the table's sorted keys (found outside the lock, on copies)
        used = len(da.state) - da.state.count(FREE)
        listed = sum(len(t) for t in da.tables.values())
        if listed != used:
            out.append(f"volume {v.name}: the epoch tables list {listed} diff entries, "
                       f"the map holds {used}")
        keys = [(e, array("Q", da.tables[e].sorted_chunks())) for e in da.epochs]
        plan.jobs.append((lambda tick: _twice_in_an_epoch(v.name, keys), 0))
        slots: list[tuple[int, int | None]] = []
        for slot, st in enumerate(da.state):
            if not st:
                continue
            if da.epoch[slot] > v.epoch or da.epoch[slot] < 1:
                out.append(f"volume {v.name}: diff slot {slot} has epoch {da.epoch[slot]} "
                           f"outside 1..{v.epoch}")
            if st == DATA:
                slots.append((slot, da.digest[slot]))
            elif st == UNSUMMED:   # no digest yet (not sealed): only read
                slots.append((slot, None))
        plan.pin(da.data)
        plan.jobs.append((lambda tick: _verify_slots(pool, v, da, slots, tick), len(slots)))
    return out


def _check_header(pool: Pool, lun: _Volume | _Snapshot, what: str) -> list[str]:
    doc = fmt.read_header(pool._hdr(lun.id))
    if doc is None:
        return [f"{what}: header {pool._hdr(lun.id)} is missing or damaged"]
    want = dict(pool._header_fields(lun))
    bad = sorted(k for k, val in want.items() if doc.get(k) != val)
    if not bad:
        return []
    return [f"{what}: header field(s) {', '.join(bad)} disagree with the catalog"]


def _plan_sums(pool: Pool, s: _Snapshot, what: str, plan: _Plan) -> list[str]:
    """(Lock held.) Queue the check of a sealed copy against its .sum file. Both are
    immutable once sealed; the .sum file is opened here, so a delete meanwhile leaves
    the job reading what it planned to read."""
    try:
        fd = os.open(pool._sum(s.id), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [f"{what}: checksum file {pool._sum(s.id)} is missing"]
    plan.fds.append(fd)
    chunks = pool._snapshot_chunks(s)
    f = plan.pin(s.file)

    def job(tick: Callable[[int], None]) -> list[str]:
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        want = dict(_chunk_sums(f, chunks, pool.chunk_size, tick))
        out = []
        for c in range(len(raw) // 8):
            stored = int.from_bytes(raw[c * 8:c * 8 + 8], "little")
            if stored != want.get(c, 0):
                out.append(f"{what}: chunk {c} fails its checksum")
        with pool._lock:   # split meanwhile: its image is a writable volume now
            if out and (pool._snaps.get(s.snap_id) is not s or s.file is not f):
                return []
        return out
    plan.jobs.append((job, len(chunks)))
    return []


def _twice_in_an_epoch(name: str, keys: list[tuple[int, array]]) -> list[str]:
    """A chunk with two entries of one epoch, from copies of each epoch table's sorted
    chunks: two equal neighbours (at C speed, without the lock: a 1 TiB volume at 64 KiB
    has up to 16 M entries)."""
    out = []
    for epoch, k in keys:
        i = next(compress(count(), map(eq, k, islice(k, 1, None))), None)
        if i is not None:
            out.append(f"volume {name}: chunk {k[i]} has two entries of epoch {epoch}")
    return out


def _verify_slots(pool: Pool, v: _Volume, da: DiffArea,
                  slots: list[tuple[int, int | None]],
                  tick: Callable[[int], None]) -> list[str]:
    """Read every planned diff slot outside the lock and compare it with its digest
    (None: not sealed yet, only read). A mismatch is verified again under the lock,
    where a slot freed (gc) or reused since the plan is skipped: only a slot that still
    holds the planned entry is reported."""
    cs = da.chunk_size
    out = []
    for slot, digest in slots:
        try:
            data = da.data.pread(cs, slot * cs)
            good = len(data) == cs and (digest is None
                                        or xxhash.xxh3_64_intdigest(data) == digest)
        except OSError:
            good = False
        if not good and digest is None:
            with pool._lock:   # unsealed: only a read error can be found
                if v.diff is da and slot < len(da.state) and da.state[slot] == UNSUMMED:
                    out.append(f"volume {v.name}: diff area slot {slot} (chunk "
                               f"{da.chunk[slot]}) cannot be read in full")
        elif not good:
            with pool._lock:
                if (v.diff is da and slot < len(da.state) and da.state[slot] == DATA
                        and da.digest[slot] == digest):
                    try:
                        da.read_slot(slot)
                    except (StoreError, OSError) as e:
                        out.append(f"volume {v.name}: {e}")
        tick(1)
    return out


# -- sealing slots preserved by reference ------------------------------------------------------
def seal_preserved(pool: Pool, limit: int | None = None,
                   tick: Callable[[int], None] = lambda _n: None,
                   volumes: set[str] | None = None) -> int:
    """Compute and record the digest of slots preserved by reference (UNSUMMED: cloned,
    never in memory), so that reads and check() verify them from now on. At most `limit`
    slots (None: all). Returns how many were sealed. The reads and the seal file's sync
    run without the pool lock; a slot freed or reused meanwhile is left alone
    (seals.finish). A digest records what the slot holds when sealed: rot
    before that is not detected (as for a plex before its seal). ``volumes``: only
    these volumes' diff areas."""
    done = 0
    with pool._lock:
        names = [v.name for v in pool._volumes.values()
                 if v.diff is not None and v.diff.unsummed()
                 and (volumes is None or v.name in volumes)]
    for name in names:
        if limit is not None and done >= limit:
            break
        with pool._lock:
            v = pool._volumes.get(name)
            da = v.diff if v is not None else None
            if v is None or da is None:
                continue
            b = v.held.batch
            busy = set(b.sync.slots) if b is not None and b.sync is not None else set()
            plan = seals.plan(da, busy)
            if limit is not None:
                plan = plan[:limit - done]
            if not plan:
                continue
            pinned = pool._pin([da.data, da.sums])
        cs = da.chunk_size
        sealed = []
        try:
            for slot, epoch, chunk in plan:
                data = da.data.pread(cs, slot * cs)
                if len(data) == cs:   # (a short slot stays unsealed: check reads it)
                    sealed.append((slot, epoch, chunk, xxhash.xxh3_64_intdigest(data)))
                tick(1)
            seals.write(da, sealed)
        finally:
            pool._unpin(pinned)
        with pool._lock:
            if v.diff is da:
                seals.finish(da, sealed)
        done += len(sealed)
    return done


# -- scrub ------------------------------------------------------------------------------------
def scrub(pool: Pool, progress: Progress = None, volume: str | None = None,
          tally: Tally | None = None) -> list[str]:
    """check() plus a read of every allocated byte of every LUN (of ``volume`` and its
    snapshots, if given); seals unsealed full copies. A hole holds no data to read back
    (invariant 6), so it is not read. LUNs deleted meanwhile are skipped. ``tally``: the
    LUNs read, the chunks check() verified, every byte read (check's and the LUNs')."""
    t = tally if tally is not None else Tally()
    with pool._lock:
        names = {v.name for v in _scope(pool, volume)}
        keys = sorted(names) + [s.snap_id for s in pool._snaps.values()
                                if s.state == COMMITTED and s.origin.name in names]
    total = sum(_allocated(pool, k) for k in keys)
    # first: check() then verifies the slots cloned so far too
    seal_preserved(pool, volumes=None if volume is None else names)
    checked = Tally()
    problems = check(pool, (lambda _d, _t: progress(0, total)) if progress else None,
                     volume, checked)
    t.chunks += checked.chunks
    t.bytes += checked.bytes
    tick = _ticker(progress, total)   # (bytes: every READ_PIECE step reports)
    for key in keys:
        problems += _read_lun(pool, key, tick, t)
        with contextlib.suppress(Busy, NotFound, SnapshotInvalid, Unsupported):
            with pool._lock:
                s = pool._snaps.get(key)
                unsealed = s is not None and s.file is not None and not s.sealed
            if unsealed:
                seal(pool, key)
    return problems


def _runs(pool: Pool, key: str, size: int) -> Iterator[tuple[int, int]]:
    """The LUN's allocated runs (Pool.allocation), asked for a window at a time."""
    for base in range(0, size, ALLOCATION_WINDOW):
        yield from pool.allocation(key, base, min(ALLOCATION_WINDOW, size - base))


def _allocated(pool: Pool, key: str) -> int:
    """Bytes of the LUN that may hold data (0 if it is gone or unreadable: its read
    reports that)."""
    try:
        with pool._lock:
            size = pool._lun(key).size
        return sum(n for _, n in _runs(pool, key, size))
    except StoreError:
        return 0


def _read_lun(pool: Pool, key: str, tick: Callable[[int], None], tally: Tally) -> list[str]:
    """Read every allocated byte of one LUN: a volume or full copy from its file, outside
    the lock; a differential snapshot through Pool.read, which takes the lock per chunk."""
    with pool._lock:
        lun = pool._volumes.get(key) or pool._snaps.get(key)
        if lun is None:
            return []
        size = lun.size
        pinned = pool._pin([lun.file])
    cs = pool.chunk_size
    at = 0
    try:
        tally.luns += 1
        for off, n in _runs(pool, key, size):
            for at in range(off, off + n, READ_PIECE):
                k = min(READ_PIECE, off + n - at)
                if pinned:
                    pinned[0].pread(k, at)
                else:
                    for pos in range(at, at + k, cs):
                        pool.read(key, pos, min(cs, at + k - pos))
                tally.bytes += k
                tick(k)
    except NotFound:
        tally.luns -= 1
        return []   # deleted meanwhile
    except Cancelled:   # (a StoreError, raised by tick: the scrub stops, not a finding)
        raise
    except (StoreError, OSError) as e:
        return [f"{key} at offset {at}: {e}"]
    finally:
        pool._unpin(pinned)
    return []
