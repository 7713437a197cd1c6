"""The data path: read, write, discard and flush of LUNs, copy-before-write into the diff
area, plex mirroring, and the space policy (a diff area over its limit, or a full file
system, deletes the origin's oldest snapshot: VSS's overflow).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator

from . import format as fmt
from . import threadreads
from .chunkmap import consecutive_runs
from .core import _locked
from .errors import (
    InvalidState,
    NotFound,
    OutOfRange,
    ReadOnly,
    SnapshotInvalid,
)
from .fileio import DataFile, NotCached, is_zeros
from .heldwrites import HeldWrites
from .model import (
    COMMITTED,
    DIFFERENTIAL,
    INVALID,
    PREPARING,
    SPACE_MARGIN,
    SPACE_RECHECK,
    HeldBuffer,
    _Snapshot,
    _Volume,
)

log = logging.getLogger(__name__)
# errors of a clone that mean "not here", not "the disk failed"
_CLONE_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM,
                            errno.ETXTBSY, errno.EBADF, errno.ENOTTY})
SCRATCH_MAX = 4 << 20   # the whole chunks' scratch buffer is kept up to this size


class DataPath(HeldWrites):
    # Called instead of the warning below when the diff area overflows and the oldest
    # snapshot goes: (volume, snapshot id, why), with the pool lock held -- it may log,
    # never call the pool. The daemon's coordinator sets it (its audit line).
    overflow_hook: Callable[[str, str, str], None] | None = None

    def _bounds(self, key: str, offset: int, length: int, what: str = "read"
                ) -> tuple[_Volume | _Snapshot, int]:
        """LUN `key` and the end of [offset, offset + length) cut at its size (<= offset:
        nothing there); a negative offset or length is OutOfRange. Under the pool lock."""
        lun = self._volumes.get(key) or self._lun(key)
        if offset < 0 or length < 0:
            raise OutOfRange(f"invalid {what} at offset {offset} length {length}")
        return lun, min(offset + length, lun.size)

    def read(self, key: str, offset: int, length: int) -> bytes:
        self.last_io = time.monotonic()
        with self._lock:   # (inline rather than @_locked: this is the hot path)
            lun, end = self._bounds(key, offset, length)
            if offset >= end:
                return b""
            if isinstance(lun, _Volume):
                return self._read_origin(lun, offset, end - offset)
            return self._read_snapshot(lun, offset, end)

    def read_cached(self, key: str, offset: int, length: int) -> bytes | bytearray | None:
        """read(), if the page cache holds all of it (preadv2 RWF_NOWAIT); None where
        any part would wait for the disk -- then read_unlocked() in a worker thread.
        The NBD server's first try on its trio thread (docs/network.md)."""
        self.last_io = time.monotonic()
        with self._lock:
            lun, end = self._bounds(key, offset, length)
            if offset >= end:
                return b""
            try:
                if isinstance(lun, _Volume):
                    return self._read_origin(lun, offset, end - offset, True)
                return self._read_snapshot(lun, offset, end, True)
            except NotCached:
                return None

    def read_unlocked(self, key: str, offset: int, length: int) -> bytes:
        """read() for worker threads: the pool lock only to plan the reads and to check
        them after, the preads without it (blockstore/threadreads.py). For reads that
        wait for the disk: a thread doing one never holds up the trio thread."""
        self.last_io = time.monotonic()
        return threadreads.read_unlocked(self, key, offset, length)

    def _read_origin(self, v: _Volume, offset: int, length: int, cached: bool = False
                     ) -> bytes:
        # (typed bytes: a bytearray only when `cached`, for read_cached, which says so)
        data = v.file.pread_cached(length, offset) if cached else v.file.pread(length, offset)
        if len(data) < length:   # origin shorter than a snapshot after a shrinking revert
            data += bytes(length - len(data))
        if not v.held.chunks:
            return data   # type: ignore[return-value]  # the bytes os.pread made: no copy
        return v.held.overlay(data, offset, self.chunk_size)   # type: ignore[return-value]

    def _read_snapshot(self, s: _Snapshot, offset: int, end: int, cached: bool = False
                       ) -> bytes:
        assert self._owned(), "pool lock not held"
        self._check_readable(s)
        if s.file is not None:
            data = s.file.pread_cached(end - offset, offset) if cached else \
                s.file.pread(end - offset, offset)
            return data + bytes(end - offset - len(data))   # type: ignore[return-value]
        v, cs = s.origin, self.chunk_size
        da, epoch = v.diff, s.epoch
        assert da is not None and epoch is not None
        parts: list[bytes | bytearray] = []
        pos = offset
        while pos < end:
            c = pos // cs
            slot = da.lookup(c, epoch)
            if slot is None:
                run_end = min((c + 1) * cs, end)
                while run_end < end and da.lookup(run_end // cs, epoch) is None:
                    run_end = min(run_end + cs, end)
                parts.append(self._read_origin(v, pos, run_end - pos, cached))
                pos = run_end
            else:
                cend = min((c + 1) * cs, end)
                parts.append(da.read_slot(slot, cached)[pos - c * cs:cend - c * cs])
                pos = cend
        return b"".join(parts)

    def allocation(self, key: str, offset: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) runs of [offset, offset+length) of a LUN that may hold data,
        sorted and merged; everything else reads as zeros (NBD's base:allocation, what
        `du` and a sparse copy need). A volume or full copy: its image's data extents
        (file-system blocks, via SEEK_DATA) plus the chunks held in memory. A
        differential snapshot: per chunk, the whole chunk where the diff area holds it
        (a preserved all-zero chunk is a hole), else the origin's extents there -- so its
        cost is O(chunks in the range): ask for bounded ranges. A listed run may still
        read as zeros (zeros written as data); an unlisted one never holds data."""
        with self._lock:
            lun, end = self._bounds(key, offset, length, "range")
            if offset >= end:
                return []
            if isinstance(lun, _Volume):
                return _merged(self._origin_extents(lun, offset, end))
            self._check_readable(lun)
            if lun.file is not None:
                return _merged(lun.file.extents(offset, end))
            return _merged(self._snapshot_extents(lun, offset, end))

    def _origin_extents(self, v: _Volume, offset: int, end: int) -> list[tuple[int, int]]:
        cs = self.chunk_size
        runs = list(v.file.extents(offset, min(end, v.file.size())))
        for c in v.held.chunks:   # held: newer than the file, may be data where it is not
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            if lo < hi:
                runs.append((lo, hi - lo))
        return runs

    def _snapshot_extents(self, s: _Snapshot, offset: int, end: int
                          ) -> list[tuple[int, int]]:
        assert self._owned(), "pool lock not held"
        v, cs = s.origin, self.chunk_size
        da, epoch = v.diff, s.epoch
        assert da is not None and epoch is not None
        origin = _merged(self._origin_extents(v, offset, end))
        runs = []
        i = 0   # chunks go up: one walk over the origin's runs, not one per chunk
        for c in range(offset // cs, (end - 1) // cs + 1):
            lo, hi = max(offset, c * cs), min(end, (c + 1) * cs)
            while i < len(origin) and origin[i][0] + origin[i][1] <= lo:
                i += 1
            slot = da.lookup(c, epoch)
            if slot is not None:
                if not da.is_zero(slot):
                    runs.append((lo, hi - lo))
                continue
            j = i   # the chunk as the origin has it now (not preserved)
            while j < len(origin) and origin[j][0] < hi:
                o, n = origin[j]
                runs.append((max(lo, o), min(hi, o + n) - max(lo, o)))
                j += 1
        return runs

    def _check_readable(self, s: _Snapshot) -> None:
        if s.state == INVALID:
            raise SnapshotInvalid(f"snapshot {s.snap_id} is invalid (its preserved data was "
                                  "lost); delete it")
        if s.state == PREPARING:
            raise InvalidState(f"snapshot {s.snap_id} is still being prepared")

    def _check_write(self, name: str, offset: int, length: int) -> _Volume:
        v = self._vol(name)
        if v.flags & fmt.FLAG_READ_ONLY:
            raise ReadOnly(f"volume {name} is read-only")
        if offset < 0 or length < 0 or offset + length > v.size:
            raise OutOfRange(f"I/O at offset {offset} length {length} is outside volume "
                             f"{name} (size {v.size})")
        return v

    @_locked
    def write(self, name: str, offset: int, data: bytes | memoryview) -> int:
        self.last_io = time.monotonic()
        n = len(data)
        v = self._check_write(name, offset, n)
        if n == 0:
            return 0
        view = memoryview(data)
        filled = self._copy_before_write(v, offset, n, view) if v.live_epochs else ()
        cs = self.chunk_size
        if filled and len(filled) == (offset + n - 1) // cs - offset // cs + 1:
            # every chunk of the write replaced whole and held with its new content
            # (a sequential first-write stream): no piece to copy, each chunk dirty whole
            v.held.dirty.update(dict.fromkeys(filled, (0, cs)))
        elif v.held.chunks:
            for lo, hi, buf, base in self._pieces(v, offset, n):
                if buf is None:
                    v.file.pwrite(view[lo - offset:hi - offset], lo)
                else:
                    if base // cs not in filled:
                        v.held.writable(base // cs)[lo - base:hi - base] = \
                            view[lo - offset:hi - offset]
                    v.held.mark_dirty(base // cs, lo - base, hi - base)
        else:
            v.file.pwrite(data, offset)
        for s in list(v.mirrors):
            self._mirror(s, lambda f: f.pwrite(data, offset))
        v.stream_end = offset + n
        v.mtime = time.time()
        self._maybe_writeback(v)
        return n

    @_locked
    def discard(self, name: str, offset: int, length: int) -> None:
        v = self._check_write(name, offset, length)
        if length == 0:
            return
        filled = self._copy_before_write(v, offset, length) if v.live_epochs else ()
        cs = self.chunk_size
        for lo, hi, buf, base in self._pieces(v, offset, length):
            if buf is None:
                v.file.punch(lo, hi - lo)
            else:
                if base // cs not in filled:
                    v.held.writable(base // cs)[lo - base:hi - base] = bytes(hi - lo)
                v.held.mark_dirty(base // cs, lo - base, hi - base)
        for s in list(v.mirrors):
            self._mirror(s, lambda f: f.punch(offset, length))
        v.stream_end = offset + length
        v.mtime = time.time()
        self._maybe_writeback(v)

    def _pieces(self, v: _Volume, offset: int, length: int
                ) -> Iterator[tuple[int, int, HeldBuffer | None, int]]:
        """Split [offset, offset+length) into (lo, hi, held buffer or None, chunk start):
        runs of chunks with no held buffer come out merged."""
        cs, end = self.chunk_size, offset + length
        run = offset
        pos = offset
        while pos < end:
            c = pos // cs
            cend = min((c + 1) * cs, end)
            buf = v.held.chunks.get(c)
            if buf is not None:
                if run < pos:
                    yield run, pos, None, 0
                yield pos, cend, buf, c * cs
                run = cend
            pos = cend
        if run < end:
            yield run, end, None, 0

    def _mirror(self, s: _Snapshot, op: Callable[[DataFile], None]) -> None:
        """A failing plex target fails the plex, never the origin write (invariant 5)."""
        assert s.file is not None
        try:
            op(s.file)
        except OSError as e:
            self._fail_plex(s, e)

    def _fail_plex(self, s: _Snapshot, err: OSError) -> None:
        assert self._owned(), "pool lock not held"
        # Out of the mirror list while still PREPARING = failed: sync and commit refuse
        # it, abort removes it.
        log.warning("plex %s of %s failed (%s); the plex is invalid", s.snap_id,
                    s.origin.name, err)
        if s in s.origin.mirrors:
            s.origin.mirrors.remove(s)

    def flush(self, name: str) -> None:
        """fsync of a volume: every write to it that returned before this call is durable
        in the origin and in the plexes being synced. Runs WITHOUT the pool lock around
        its syncs (only the bookkeeping takes it), so reads and writes of every volume
        go on meanwhile; writes that land during the flush are not covered by it."""
        with self._lock:
            v = self._vol(name)
        self._drain(v)
        with self._lock:
            if self._volumes.get(name) is not v:
                raise NotFound(f"volume {name} was deleted")
            mirrors = [(s, s.file) for s in v.mirrors if s.file is not None]
            files = self._pin([v.file] + [f for _, f in mirrors])
        failed: list[tuple[_Snapshot, OSError]] = []
        try:
            v.file.sync()
            for plex, f in mirrors:
                try:
                    f.sync()
                except OSError as e:   # fails the plex, never the origin (invariant 5)
                    failed.append((plex, e))
        finally:
            with self._lock:
                self._release(files)
                for plex, err in failed:
                    self._fail_plex(plex, err)

    def _copy_before_write(self, v: _Volume, offset: int, length: int,
                           data: memoryview | None = None) -> set[int]:
        """Preserve the old content of the chunks under [offset, offset+length) that a
        live differential snapshot still needs (invariant 2: durable before the origin
        is written, which the held writes see to). Chunks the write covers whole are
        preserved by reference where the pool can (_clones); the rest are read.
        Returns the chunks whose held buffer already has the new content: a cloned
        chunk's buffer is made from the write's `data` (zeros for a discard)."""
        assert self._owned(), "pool lock not held"
        da = v.diff
        assert da is not None
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        while v.live_epochs:
            need = self._chunks_needing_copy(v, first, last)
            if not need:
                return set()
            clones = self._clones(v, need, offset, length)
            whole = self._whole(v, need, offset, length, clones)
            read = dict(self._read_chunks(v, [c for c in need if c not in clones
                                              and c not in whole] if clones or whole
                                          else need))
            scratch = dict(self._read_whole(v, sorted(whole))) if whole else {}
            preserve: list[tuple[int, bytes | bytearray | memoryview | None]] = [
                (c, read[c] if c in read else scratch.get(c)) for c in need]  # None: cloned
            share = 2 * (len(clones) + len(whole)) * cs >= length   # see _new_content
            items = [(c, read[c] if c in read else self._new_content(c, offset, data, share))
                     for c in need]
            new_bytes = sum(cs for _, old in preserve
                            if old is None or not is_zeros(old, da.zero_chunk))
            if new_bytes and self._over_limit(v, new_bytes):
                self._overflow(v, "diff-area limit reached")
                continue
            try:
                da.preserve(preserve, v.epoch, v.file)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._overflow(v, f"diff area full ({e.strerror})")
                    continue
                if clones and e.errno in _CLONE_REFUSED:
                    # the file system refused a clone its probe allowed (btrfs: images
                    # with differing NODATACOW, an immutable file, ...): copy instead,
                    # from now on -- it is no reason to lose a snapshot
                    log.warning("volume %s: preserving by reference failed (%s); the pool "
                                "copies from now on", v.name, e.strerror or e)
                    self.clone_min_chunks = None
                    continue
                self._invalidate_needing(v, [(c, v.epoch) for c in need], e)
                return set()
            v.held.hold(items, time.monotonic())
            return clones | whole
        return set()

    def _new_content(self, c: int, offset: int, data: memoryview | None,
                     share: bool = True) -> HeldBuffer:
        """The held buffer of chunk c, which the write (data at offset; None: a
        discard) replaces whole: a view of the write's bytes if nothing can change them
        (bytes: the FUSE handler's) and `share` (such chunks are at least half of the
        write: a view keeps all of it in memory while held), else a copy."""
        cs = self.chunk_size
        if data is None:
            return bytearray(cs)
        piece = data[c * cs - offset:(c + 1) * cs - offset]
        return piece if share and isinstance(data.obj, bytes) else bytearray(piece)

    def _clones(self, v: _Volume, need: list[int], offset: int, length: int) -> set[int]:
        """The chunks of `need` to preserve by reference: whole chunks inside the write
        (their old content need not be read: nothing of it stays), not held (the file
        holds their current content), inside the image, and -- on a file system that
        overwrites in place (xfs) -- only in a run of at least clone_min_chunks, since
        each clone makes the origin's next write of it allocate new blocks: a stream of
        small random writes would gain nothing and fragment the origin (a write that
        continues the previous one is part of a sequential stream, whatever its size)."""
        if self.clone_min_chunks is None:
            return set()
        cs = self.chunk_size
        lo = -(-offset // cs)                            # first chunk covered whole
        hi = min(offset + length, v.size - v.size % cs) // cs   # past the last one
        if hi - lo < self.clone_min_chunks and offset != v.stream_end:
            return set()
        held = v.held.chunks
        return {c for c in need if lo <= c < hi and c not in held}

    def _chunks_needing_copy(self, v: _Volume, first: int, last: int) -> list[int]:
        da = v.diff
        assert da is not None
        newest_live = v.live_epochs[-1]
        latest = newest_live == v.epoch
        need = []
        for c in range(first, last + 1):
            if da.cowed_latest.test(c):
                continue
            if latest or newest_live > da.last_epoch(c):
                need.append(c)
            else:
                da.cowed_latest.set(c)   # no live snapshot needs it until the next commit
        return need

    def _whole(self, v: _Volume, need: list[int], offset: int, length: int,
               clones: set[int]) -> set[int]:
        """The chunks of `need` that the write covers whole, inside the image, not held
        and not cloned: nothing of their old content stays, so it is read only to be
        preserved (_read_whole), never into a held buffer, which is made from the write
        (_new_content). Any pool, any write size."""
        cs = self.chunk_size
        lo = -(-offset // cs)                                    # first chunk covered whole
        hi = min(offset + length, v.size - v.size % cs) // cs   # past the last one
        if hi <= lo:
            return set()
        held = v.held.chunks
        return {c for c in need if lo <= c < hi and c not in held and c not in clones}

    def _read_whole(self, v: _Volume, chunks: list[int]) -> list[tuple[int, memoryview]]:
        """Old contents of whole chunks that are preserved and then replaced (_whole),
        read into one reused scratch buffer -- no fresh memory per chunk, no buffer to
        hold -- and valid until the next call: for DiffArea.preserve, which writes them
        out at once. One preadv per run of consecutive chunks."""
        cs = self.chunk_size
        need = len(chunks) * cs
        if len(self._scratch) < need <= SCRATCH_MAX:
            self._scratch = bytearray(need)
        buf = self._scratch if len(self._scratch) >= need else bytearray(need)
        view = memoryview(buf)
        size = v.file.size()
        out: list[tuple[int, memoryview]] = []
        k = 0
        for i, j in consecutive_runs(chunks):
            parts = [view[(k + m) * cs:(k + m + 1) * cs] for m in range(j - i)]
            if size < (chunks[j - 1] + 1) * cs:
                for p in parts:   # past the end of the file (a shrunk origin): zeros
                    p[:] = bytes(cs)
            v.file.preadv(parts, chunks[i] * cs)  # type: ignore[arg-type]
            out += zip(chunks[i:j], parts)
            k += j - i
        return out

    def _read_chunks(self, v: _Volume, chunks: list[int]) -> list[tuple[int, bytearray]]:
        """Full-chunk old contents, one pread per run of consecutive chunks. Each content
        is a fresh bytearray that nothing else references: once preserved it becomes the
        chunk's held buffer as is (one copy per chunk, not two)."""
        cs = self.chunk_size
        out = []
        for i, j in consecutive_runs(chunks):
            bufs = [bytearray(cs) for _ in range(j - i)]
            v.file.preadv(bufs, chunks[i] * cs)   # straight into them: no bytes in between
            for c, buf in zip(chunks[i:j], bufs):
                held = v.held.chunks.get(c)
                if held is not None:   # its newest content is held, not in the file yet
                    buf[:] = held
                out.append((c, buf))
        return out

    def _over_limit(self, v: _Volume, new_bytes: int) -> bool:
        assert v.diff is not None
        used = v.diff.used_bytes()
        if v.diff_limit is not None:
            return used + new_bytes > v.diff_limit
        # statvfs per preservation batch was 7% of a 4 KiB first-write workload: trust a
        # reading for SPACE_RECHECK s, minus what we took since (other writers may take
        # more: then the write fails ENOSPC and _copy_before_write overflows as well);
        # near the limit, read it every time.
        now = time.monotonic()
        when, room = self._space
        room -= self._space_taken
        if now - when > SPACE_RECHECK or room - new_bytes < SPACE_MARGIN:
            room = self._room()
            self._space, self._space_taken = (now, room), 0
        if new_bytes > room:
            return True
        self._space_taken += new_bytes
        return False

    def _overflow(self, v: _Volume, why: str) -> None:
        """VSS behaviour: delete the oldest snapshot of this origin; the write goes on."""
        candidates = [s for s in v.snaps if s.kind == DIFFERENTIAL and s.state == COMMITTED]
        target = self._reverting.get(v.id)
        if target in candidates and len(candidates) > 1:
            candidates.remove(target)   # spare a revert's source while others can go
        oldest = min(candidates, key=lambda s: s.epoch or 0)
        hook = self.overflow_hook
        if hook is not None:
            hook(v.name, oldest.snap_id, why)
        else:
            log.warning("%s for volume %s: deleting its oldest snapshot %s", why, v.name,
                        oldest.snap_id)
        self._delete_snapshot(oldest)


def _merged(runs: Iterator[tuple[int, int]] | list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted runs, overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for o, n in sorted(runs):
        if out and o <= out[-1][0] + out[-1][1]:
            po, pn = out[-1]
            out[-1] = (po, max(pn, o + n - po))
        else:
            out.append((o, n))
    return out
