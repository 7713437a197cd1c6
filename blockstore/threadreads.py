"""Reads for worker threads (Pool.read_unlocked): the pool lock only to plan a read and to
check it afterwards, the preads without it -- the engine's pattern (docs/concurrency.md:
cut under the lock, I/O outside with the files pinned, finish under the lock) applied to
reads that wait for the disk, so that a thread reading never holds the lock the trio
thread needs (the NBD server's parallel reads, docs/network.md).

Under the lock, the plan: which file ranges and diff-area slots make up the range, each
file pinned (a delete closes nothing until the last unpin), each held chunk's newer
content copied (the overlay: a held write that was replied to before this read started
is in it, or already in the origin file). Outside: the preads, and the slots' digests.
Under the lock again: unpin, and check that what the plan relied on still holds --
the LUN is the same object, its files are the same, and for a differential snapshot
every chunk read from the origin still has no preserved copy for the snapshot's epoch
(else a write since the plan may have reached the origin: the snapshot's old content is
now in the diff area) and every slot read still is the one the snapshot's chunk maps to
(a slot is freed only when no snapshot needs it). A chunk first preserved since the
plan (a write to the origin meanwhile: the common change, under writes) is read again
from its new slot, without the lock, and checked again -- only those chunks, at most
PATCH_ROUNDS times; anything else that changed (the LUN, its files, a slot that is no
longer the snapshot's), or chunks still changing after those rounds, and the read is
done again under the lock (Pool.read): rare, and always right. (Done again under the
lock for the first preservation, a whole read of up to 32 MiB waited for the disk
under it, and the trio thread with it: review of 2026-12-06.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .diffarea import ZERO, DiffArea
from .errors import CorruptData, NotFound
from .fileio import DataFile
from .model import COMMITTED, _Snapshot, _Volume

if TYPE_CHECKING:
    from .datapath import DataPath

# rounds of re-reading the chunks preserved since the plan, without the lock, before the
# read is done again under it (each round's chunks are the ones preserved during the
# round before: under a steady stream of first writes a few rounds, then the lock)
PATCH_ROUNDS = 3


@dataclass
class _Plan:
    lun: _Volume | _Snapshot
    files: list[DataFile] = field(default_factory=list)      # pinned, in plan order
    # (file, file offset, length) or (diff area, slot, state, digest, lo, hi)
    pieces: list[tuple] = field(default_factory=list)
    overlays: list[tuple[int, bytes]] = field(default_factory=list)  # (out pos, bytes)
    maps: list[tuple[int, int | None]] = field(default_factory=list)  # (chunk, slot)


def read_unlocked(pool: DataPath, key: str, offset: int, length: int) -> bytes:
    with pool._lock:
        lun, end = pool._bounds(key, offset, length)
        if offset >= end:
            return b""
        if isinstance(lun, _Snapshot):
            pool._check_readable(lun)
        plan = _plan(pool, lun, offset, end)
        for f in plan.files:
            f.pin()
    err: Exception | None = None
    data: bytes | bytearray = b""
    try:
        data = _run(plan, end - offset)
    except (OSError, CorruptData) as e:   # raised below if the plan still held
        err = e
    except BaseException:
        _unpin(pool, plan.files)
        raise
    with pool._lock:
        for f in plan.files:
            f.unpin()
        stale = _stale(pool, key, plan)
        # chunks preserved since the plan: read again from their slots, unlocked
        patch = _patch(pool, plan, stale, offset, end) if stale and err is None else None
    rounds = 0
    while patch is not None:
        rounds += 1
        out = bytearray(data)
        try:
            for at, (da, slot, st, digest, lo, hi) in patch:
                out[at:at + hi - lo] = _slot(da, slot, st, digest)[lo:hi]
        except (OSError, CorruptData) as e:
            err = e
        except BaseException:
            _unpin(pool, plan.files[:1])
            raise
        with pool._lock:
            plan.files[0].unpin()
            stale = _stale(pool, key, plan)
            patch = _patch(pool, plan, stale, offset, end) \
                if stale and err is None and rounds < PATCH_ROUNDS else None
        data = out
    if stale is None or stale:
        return pool.read(key, offset, length)
    if err is not None:
        raise err
    return bytes(data)


def _unpin(pool: DataPath, files: list[DataFile]) -> None:
    with pool._lock:
        for f in files:
            f.unpin()


def _plan(pool: DataPath, lun: _Volume | _Snapshot, offset: int, end: int) -> _Plan:
    plan = _Plan(lun)
    if isinstance(lun, _Volume):
        _origin(plan, lun, offset, end - offset, 0, pool.chunk_size)
        return plan
    if lun.file is not None:   # a full copy (a committed plex or a promoted snapshot)
        plan.files.append(lun.file)
        plan.pieces.append((lun.file, offset, end - offset))
        return plan
    v, cs = lun.origin, pool.chunk_size
    da, epoch = v.diff, lun.epoch
    assert da is not None and epoch is not None
    plan.files.append(da.data)
    pos = offset
    while pos < end:   # the same walk as DataPath._read_snapshot
        c = pos // cs
        slot = da.lookup(c, epoch)
        if slot is None:
            run_end = min((c + 1) * cs, end)
            while run_end < end and da.lookup(run_end // cs, epoch) is None:
                run_end = min(run_end + cs, end)
            plan.maps += [(x, None) for x in range(c, (run_end - 1) // cs + 1)]
            _origin(plan, v, pos, run_end - pos, pos - offset, cs)
            pos = run_end
        else:
            cend = min((c + 1) * cs, end)
            plan.maps.append((c, slot))
            plan.pieces.append((da, slot, int(da.state[slot]), int(da.digest[slot]),
                                pos - c * cs, cend - c * cs))
            pos = cend
    return plan


def _origin(plan: _Plan, v: _Volume, pos: int, n: int, out: int, cs: int) -> None:
    """A range of the origin file, and the held chunks' content over it."""
    if v.file not in plan.files:
        plan.files.append(v.file)
    plan.pieces.append((v.file, pos, n))
    held = v.held.chunks
    if not held:
        return
    for c in range(pos // cs, (pos + n - 1) // cs + 1):
        buf = held.get(c)
        if buf is not None:
            lo, hi = max(pos, c * cs), min(pos + n, (c + 1) * cs)
            plan.overlays.append((out + lo - pos, bytes(buf[lo - c * cs:hi - c * cs])))


def _run(plan: _Plan, length: int) -> bytes:
    """The preads of the plan (no lock held), joined, the overlays laid over them."""
    parts: list[bytes | bytearray] = []
    for piece in plan.pieces:
        if len(piece) == 3:
            f, pos, n = piece
            data = f.pread(n, pos)
            parts.append(data if len(data) == n else data + bytes(n - len(data)))
        else:
            da, slot, st, digest, lo, hi = piece
            parts.append(_slot(da, slot, st, digest)[lo:hi])
    out = b"".join(parts)
    assert len(out) == length
    if not plan.overlays:
        return out
    buf = bytearray(out)
    for at, content in plan.overlays:
        buf[at:at + len(content)] = content
    return bytes(buf)


def _slot(da: DiffArea, slot: int, st: int, digest: int) -> bytes | bytearray:
    if st == ZERO:
        return da.zero_chunk
    return da.verified(slot, da.data.pread(da.chunk_size, slot * da.chunk_size), st, digest)


def _stale(pool: DataPath, key: str, plan: _Plan) -> list[tuple[int, int]] | None:
    """What changed since the plan read the LUN (the pool lock held): [] nothing; the
    chunks of a differential snapshot that the plan read from the origin and that have
    been preserved since, as (index in plan.maps, slot); None anything else (the read
    is done again under the lock)."""
    try:
        lun = pool._volumes.get(key) or pool._lun(key)
    except NotFound:
        return None   # (the read again raises NotFound)
    if lun is not plan.lun:
        return None
    if isinstance(lun, _Volume):
        return [] if lun.file is plan.files[0] else None
    if lun.state != COMMITTED:
        return None
    if lun.file is not None:
        return [] if lun.file is plan.files[0] else None
    da, epoch = lun.origin.diff, lun.epoch
    if da is None or epoch is None or da.data is not plan.files[0] or \
            (len(plan.files) > 1 and lun.origin.file is not plan.files[1]):
        return None
    changed: list[tuple[int, int]] = []
    for i, (c, slot) in enumerate(plan.maps):
        now = da.lookup(c, epoch)
        if now == slot:
            continue
        if slot is not None or now is None:   # a snapshot's slot never changes while
            return None                       # it lives
        changed.append((i, now))
    return changed


def _patch(pool: DataPath, plan: _Plan, changed: list[tuple[int, int]], offset: int,
           end: int) -> list[tuple[int, tuple]]:
    """The slot reads that replace the chunks `changed` (_stale) in the output, as
    (output position, slot piece); the plan's maps updated to expect them, the diff
    area pinned again (unpinned by the caller). The pool lock held."""
    lun = plan.lun
    assert isinstance(lun, _Snapshot)
    da, cs = lun.origin.diff, pool.chunk_size
    assert da is not None and da.data is plan.files[0]
    out = []
    for i, slot in changed:
        c = plan.maps[i][0]
        plan.maps[i] = (c, slot)
        lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
        out.append((lo - offset, (da, slot, int(da.state[slot]), int(da.digest[slot]),
                                  lo - c * cs, hi - c * cs)))
    da.data.pin()
    return out
