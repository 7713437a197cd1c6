"""Held writes (blockstore/heldwrites.py, `_Volume.held`): origin writes to freshly preserved
chunks wait in memory until one grouped sync makes their preservation durable; then only
the part of each chunk that changed is written back to the origin file."""

import errno
import os
import threading

import pytest
from support import start_thread

from blockstore import Faults, Pool
from blockstore.errors import SimulatedCrash, SnapshotInvalid
from blockstore.fileio import DataFile

CS = 64 * 1024


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    yield p
    assert p.check() == []
    p.close()


def _snap(pool, vol):
    s = pool.prepare_snapshot(vol, "differential")
    pool.commit_snapshots([s.id])
    return s.id


def reopen(pool):
    pool.abandon()
    return Pool.open(pool.path)


def _image(pool, vol):
    with open(pool.image_path(vol), "rb") as f:
        return f.read()


@pytest.fixture
def origin_writes(pool, monkeypatch):
    """Bytes written to volume images (not diff areas) by pwrite/pwritev."""
    counted = {"bytes": 0}
    real_pwrite, real_pwritev = DataFile.pwrite, DataFile.pwritev

    def pwrite(self, data, offset):
        if self.role == "origin":
            counted["bytes"] += len(data)
        return real_pwrite(self, data, offset)

    def pwritev(self, buffers, offset):
        if self.role == "origin":
            counted["bytes"] += sum(len(b) for b in buffers)
        return real_pwritev(self, buffers, offset)

    monkeypatch.setattr(DataFile, "pwrite", pwrite)
    monkeypatch.setattr(DataFile, "pwritev", pwritev)
    return counted


def test_small_write_after_snapshot_writes_back_only_what_changed(pool, origin_writes):
    counted = origin_writes
    pool.create_volume("v", 4 * CS)
    old = os.urandom(4 * CS)
    pool.write("v", 0, old)
    pool.flush("v")
    sid = _snap(pool, "v")
    counted["bytes"] = 0
    pool.write("v", CS + 8192, b"N" * 4096)            # one 4 KiB write, chunk 1
    pool.write("v", 3 * CS + 100, b"M" * 10)           # 10 bytes, chunk 3
    pool.write("v", 3 * CS + 60000, b"K" * 20)         # same chunk, further on
    assert counted["bytes"] == 0                       # held until the grouped sync
    expect = bytearray(old)
    expect[CS + 8192:CS + 12288] = b"N" * 4096
    expect[3 * CS + 100:3 * CS + 110] = b"M" * 10
    expect[3 * CS + 60000:3 * CS + 60020] = b"K" * 20
    assert pool.read("v", 0, 4 * CS) == expect         # reads see held writes
    pool.flush("v")
    # chunk 1: 4 KiB; chunk 3: the hull of its two writes, not 2 x 64 KiB
    assert counted["bytes"] == 4096 + (60020 - 100)
    assert _image(pool, "v") == expect                 # the file itself, no overlay
    assert pool.read(sid, 0, 4 * CS) == old


def test_whole_chunk_writes_still_go_out_in_one_run(pool, origin_writes):
    counted = origin_writes
    pool.create_volume("v", 8 * CS)
    pool.write("v", 0, os.urandom(8 * CS))
    pool.flush("v")
    sid = _snap(pool, "v")
    before = pool.read("v", 0, 8 * CS)
    new = os.urandom(4 * CS)
    counted["bytes"] = 0
    pool.write("v", 2 * CS, new)
    pool.flush("v")
    assert counted["bytes"] == 4 * CS
    assert _image(pool, "v") == before[:2 * CS] + new + before[6 * CS:]
    assert pool.read(sid, 0, 8 * CS) == before


def test_discard_inside_a_held_chunk(pool):
    pool.create_volume("v", 2 * CS)
    data = os.urandom(2 * CS)
    pool.write("v", 0, data)
    pool.flush("v")
    sid = _snap(pool, "v")
    pool.write("v", 4096, b"x" * 4096)                 # held
    pool.discard("v", 0, CS)                           # the whole chunk, while held
    pool.discard("v", CS + 4096, 4096)                 # part of chunk 1 (also preserved)
    pool.flush("v")
    img = _image(pool, "v")
    assert img[:CS] == bytes(CS)
    assert img[CS:] == data[CS:CS + 4096] + bytes(4096) + data[CS + 8192:]
    assert pool.read(sid, 0, 2 * CS) == data
    # a chunk discarded whole while held becomes a hole again
    st = os.stat(pool.image_path("v"))
    assert st.st_blocks * 512 <= CS + 4096


def test_held_writes_survive_a_second_snapshot(pool):
    """A chunk held for snapshot 1 and written again after snapshot 2: both snapshots
    keep their contents, the origin ends with every write."""
    pool.create_volume("v", 2 * CS)
    base = os.urandom(2 * CS)
    pool.write("v", 0, base)
    pool.flush("v")
    s1 = _snap(pool, "v")
    pool.write("v", 0, b"a" * 100)
    s2 = _snap(pool, "v")
    pool.write("v", 50000, b"b" * 100)
    pool.flush("v")
    after1 = bytearray(base)
    after1[:100] = b"a" * 100
    final = bytearray(after1)
    final[50000:50100] = b"b" * 100
    assert pool.read(s1, 0, 2 * CS) == base
    assert pool.read(s2, 0, 2 * CS) == after1
    assert _image(pool, "v") == final


# -- the background batch (Pool.writeback from the daemon's timer thread) ---------------------
class PausingFaults(Faults):
    """Stops the background thread at one crash point until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.pause_at: str | None = None
        self.reached = threading.Event()
        self.go = threading.Event()

    def point(self, name: str) -> None:
        if name == self.pause_at and threading.current_thread().name == "writeback":
            self.reached.set()
            assert self.go.wait(20)
        super().point(name)


def _background(pool, errors):
    return start_thread(lambda: pool.writeback(0), errors, "writeback")


@pytest.fixture
def paused(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=CS).close()
    faults = PausingFaults()
    p = Pool.open(path, faults=faults)
    p.background_writeback = True
    p.create_volume("v", 4 * CS)
    old = os.urandom(4 * CS)
    p.write("v", 0, old)
    p.flush("v")
    sid = _snap(p, "v")
    yield p, faults, sid, old
    faults.go.set()
    if not p._closed:
        assert p.check() == []
        p.close()


def test_background_batch_syncs_without_the_pool_lock(paused):
    p, faults, sid, old = paused
    p.write("v", 0, b"A" * 4096)                       # chunk 0: preserved, held
    faults.pause_at = "cow.data_synced"
    errors: list[BaseException] = []
    t = _background(p, errors)
    assert faults.reached.wait(20)
    # the batch is stuck between its two syncs; the data path does not wait for it
    p.write("v", CS, b"B" * 4096)                      # chunk 1: the NEXT batch
    p.write("v", 100, b"C" * 10)                       # into held chunk 0
    now = bytearray(old)
    now[:4096] = b"A" * 4096
    now[100:110] = b"C" * 10
    now[CS:CS + 4096] = b"B" * 4096
    assert p.read("v", 0, 4 * CS) == now
    assert p.read(sid, 0, 4 * CS) == old
    # invariant 2: nothing held reached the origin file while its batch is not durable
    assert _image(p, "v") == old
    faults.go.set()
    t.join(20)
    assert not t.is_alive() and errors == []
    img = _image(p, "v")
    assert img[:CS] == now[:CS]                        # the batch's chunk, with the late C
    assert img[CS:2 * CS] == old[CS:2 * CS]            # chunk 1 waits for its own batch
    p.flush("v")
    assert _image(p, "v") == now
    assert p.read(sid, 0, 4 * CS) == old


def test_flush_waits_for_the_batch_in_flight(paused):
    p, faults, sid, old = paused
    p.write("v", 2 * CS, b"D" * 512)
    faults.pause_at = "cow.map_written"
    errors: list[BaseException] = []
    t = _background(p, errors)
    assert faults.reached.wait(20)
    done = threading.Event()
    flusher = threading.Thread(target=lambda: (p.flush("v"), done.set()), daemon=True)
    flusher.start()
    assert not done.wait(0.3)          # flush must not harden around the batch in flight
    faults.go.set()
    assert done.wait(20)
    t.join(20)
    assert errors == []
    assert _image(p, "v")[2 * CS:2 * CS + 512] == b"D" * 512


def test_crash_in_a_background_batch(paused, tmp_path):
    p, faults, sid, old = paused
    p.write("v", 3 * CS, b"E" * 4096)
    faults.arm_crash("cow.map_written")
    errors: list[BaseException] = []
    _background(p, errors).join(20)
    assert len(errors) == 1 and isinstance(errors[0], SimulatedCrash)
    p2 = reopen(p)
    try:
        assert p2.read(sid, 0, 4 * CS) == old          # the snapshot never saw E
        assert _image(p2, "v") == old                  # and neither did the origin file
        assert p2.check() == []
    finally:
        p2.close()


def test_eio_in_a_background_batch_invalidates_the_snapshot(paused):
    p, faults, sid, old = paused
    p.write("v", 0, b"F" * 4096)
    faults.arm_error("map", "sync", errno.EIO, count=1)
    errors: list[BaseException] = []
    _background(p, errors).join(20)
    assert errors == []                                # the origin write never fails
    assert p.snapshot(sid).state == "invalid"          # loudly, never served wrong
    with pytest.raises(SnapshotInvalid):
        p.read(sid, 0, CS)
    assert _image(p, "v")[:4096] == b"F" * 4096


def test_preadv_fills_buffers_and_leaves_zeros_past_the_end(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(100 * 1024)
    path.write_bytes(data)
    f = DataFile(str(path), "origin", Faults())
    try:
        bufs = [bytearray(CS), bytearray(CS)]
        f.preadv(bufs, 0)
        assert bytes(bufs[0]) + bytes(bufs[1]) == data + bytes(2 * CS - len(data))
        bufs = [bytearray(CS)]
        f.preadv(bufs, 200 * 1024)                     # wholly past the end
        assert bufs[0] == bytes(CS)
    finally:
        f.close()


@pytest.fixture
def queued(paused, monkeypatch):
    """The data path cuts a batch itself once a volume holds half the bound (with a
    writeback thread declared): here at 2 chunks."""
    import blockstore.heldwrites
    monkeypatch.setattr(blockstore.heldwrites, "WRITEBACK_BYTES", 4 * CS)
    p, faults, sid, old = paused
    p.write("v", 0, b"G" * 4096)
    assert p._queued == []
    p.write("v", CS, b"H" * 4096)                       # 2 chunks held: cut and queued
    assert len(p._queued) == 1 and p._volumes["v"].held.batch is not None
    assert _image(p, "v") == old                       # queued is not durable yet
    now = bytearray(old)
    now[:4096] = b"G" * 4096
    now[CS:CS + 4096] = b"H" * 4096
    return p, sid, old, now


def test_a_queued_batch_goes_to_the_writeback_thread(queued):
    p, sid, old, now = queued
    p.wait_and_writeback(5)                            # returns at once: a batch waits
    assert p._queued == [] and p._volumes["v"].held.batch is None
    assert _image(p, "v") == now
    assert p.read(sid, 0, 4 * CS) == old


def test_one_writeback_step_goes_on_while_batches_keep_coming(queued, monkeypatch):
    """The writeback thread's step takes the next batch the data path queues meanwhile
    in the same call (the daemon's step returns to its trio loop, which is the FUSE
    thread: a batch left queued there waited for the writer to sync it inline), and
    returns once none comes within WRITEBACK_LINGER."""
    import time

    import blockstore.heldwrites
    p, sid, old, now = queued
    steps: list[int] = []
    first = [True]
    real = p.writeback

    def writeback():
        real()
        steps.append(len(steps))
        if first:                                      # the data path goes on meanwhile
            first.clear()
            p.write("v", 2 * CS, b"I" * 4096)
            p.write("v", 3 * CS, b"J" * 4096)          # 2 chunks held: cut and queued
            assert len(p._queued) == 1
    monkeypatch.setattr(p, "writeback", writeback)
    monkeypatch.setattr(blockstore.heldwrites, "WRITEBACK_LINGER", 0.2)
    t = time.monotonic()
    p.wait_and_writeback(5, busy_for=30)
    assert steps == [0, 1] and p._queued == []         # both batches, one call
    assert time.monotonic() - t < 5                    # back once nothing came
    now[2 * CS:2 * CS + 4096] = b"I" * 4096
    now[3 * CS:3 * CS + 4096] = b"J" * 4096
    assert _image(p, "v") == now
    assert p.read(sid, 0, 4 * CS) == old
    steps.clear()
    p.write("v", 0, b"K" * 4096)                       # (already preserved: not held)
    p.wait_and_writeback(0.01, busy_for=0)             # busy_for 0: one step only
    assert steps == [0]


def test_a_queued_batch_runs_inline_when_no_thread_takes_it(queued):
    p, sid, old, now = queued
    p.flush("v")                                       # must not wait for a thread
    assert p._queued == [] and _image(p, "v") == now


def test_a_queued_batch_is_lost_in_a_crash(queued):
    p, sid, old, now = queued
    p2 = reopen(p)
    try:
        assert _image(p2, "v") == old                  # held, never written: lost
        assert p2.read(sid, 0, 4 * CS) == old
        assert p2.check() == []
    finally:
        p2.close()


def test_origin_eio_in_a_batch_keeps_the_chunks_held_and_spares_the_others(paused, caplog):
    p, faults, sid, old = paused
    p.create_volume("w", 2 * CS)
    p.write("w", 0, b"w" * CS)
    p.flush("w")
    wsid = _snap(p, "w")
    p.write("v", 0, b"V" * 4096)
    p.write("w", 0, b"W" * 4096)
    faults.arm_error("origin", "write", errno.EIO, count=1)
    errors: list[BaseException] = []
    _background(p, errors).join(20)
    assert errors == []                                 # logged, the thread goes on
    assert "stay held" in caplog.text
    assert all(p._volumes[n].held.batch is None for n in ("v", "w"))   # nothing left waiting
    # one volume's write-out failed: its chunk is still held, nothing lost; the other's
    # went out; a flush now writes the rest
    assert p.read("v", 0, 4096) == b"V" * 4096 and p.read("w", 0, 4096) == b"W" * 4096
    p.flush("v")
    p.flush("w")
    assert _image(p, "v")[:4096] == b"V" * 4096
    assert _image(p, "w")[:4096] == b"W" * 4096
    assert p.read(sid, 0, 4 * CS) == old and p.read(wsid, 0, CS) == b"w" * CS


def test_catalog_failure_while_invalidating_keeps_the_chunks_held(paused, monkeypatch):
    """A batch's sync fails and then the catalog write that invalidates the snapshot
    fails too: the chunk must not reach the origin (the snapshot would read the new data
    as its own); the next writeback invalidates first, then writes it out."""
    import sqlite3
    p, faults, sid, old = paused
    p.write("v", 0, b"I" * 4096)
    faults.arm_error("map", "sync", errno.EIO, count=1)
    real = p._set_state

    def broken(s, state):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(p, "_set_state", broken)
    errors: list[BaseException] = []
    _background(p, errors).join(20)
    assert errors == []                                 # logged
    assert _image(p, "v") == old                        # still held
    with pytest.raises(SnapshotInvalid):                # never served wrong: refused
        p.read(sid, 0, 4 * CS)
    assert p.read("v", 0, 4096) == b"I" * 4096
    monkeypatch.setattr(p, "_set_state", real)
    p.flush("v")                                        # invalidates durably, then writes
    assert p.snapshot(sid).state == "invalid"
    assert p.catalog.db.execute("SELECT state FROM snapshots").fetchone()[0] == "invalid"
    assert _image(p, "v")[:4096] == b"I" * 4096


def test_a_view_held_whole_becomes_writable_in_the_batch_too():
    """A chunk replaced whole by an immutable write is held as a view of that write (no
    copy); a later write into it makes it a bytearray, and the batch being synced must
    then cover the new buffer (batches find their chunks by identity: a flush would
    otherwise return with the chunk still in memory)."""
    from blockstore.model import Held, _Batch
    data = bytes(range(256)) * (2 * CS // 256)
    held = Held()
    view = memoryview(data)
    held.hold([(3, view[:CS]), (4, view[CS:])], 0.0)
    held.batch = _Batch(None, None, held.in_order(), 0.0)   # type: ignore[arg-type]
    buf = held.writable(4)
    assert isinstance(buf, bytearray) and buf == data[CS:]
    buf[:2] = b"xy"
    assert held.chunks[4] is buf and held.batch.held[1] == (4, buf)
    assert held.batch.held[1][1] is buf and held.batch.held[0][1] is held.chunks[3]
    assert held.writable(4) is buf                       # converted once
    assert data[CS:CS + 2] != b"xy"                      # the write's bytes untouched


def test_later_writes_into_chunks_held_as_views_reach_the_origin(tmp_path):
    """Whole-chunk writes (held as views on reflink pools, as copies elsewhere), then
    partial writes into the same chunks before and while their batch syncs: the origin
    ends with the last content, the snapshot with the first."""
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    p.create_volume("v", 64 * CS)
    old = os.urandom(64 * CS)
    p.write("v", 0, old)
    p.flush("v")
    sid = _snap(p, "v")
    new = bytearray(os.urandom(64 * CS))
    p.write("v", 0, bytes(new))                           # 64 whole chunks, immutable
    for c in range(0, 64, 3):
        patch = os.urandom(100)
        p.write("v", c * CS + 7, patch)
        new[c * CS + 7:c * CS + 107] = patch
        if c == 30:
            p.writeback(max_age=0)                        # a batch in between
    assert p.read("v", 0, 64 * CS) == new
    p.flush("v")
    assert _image(p, "v") == new and p.read(sid, 0, 64 * CS) == old
    assert p.check() == []
    p.close()


# -- whole chunks on any pool: old content through a scratch buffer, held from the write ------
def test_whole_chunk_write_is_held_as_the_writers_bytes(pool):
    pool.create_volume("v", 6 * CS)
    old = os.urandom(6 * CS)
    pool.write("v", 0, old)
    pool.flush("v")
    sid = _snap(pool, "v")
    new = os.urandom(4 * CS)
    pool.write("v", CS, new)                           # chunks 1..4, whole
    held = pool._volumes["v"].held
    for c in range(1, 5):                              # no copy: slices of `new`
        assert isinstance(held.chunks[c], memoryview) and held.chunks[c].obj is new
    da = pool._volumes["v"].diff
    assert pool.preserve_mode == "reflink" or \
        [da.state[s] for s in range(da.entries())] == [1] * 4   # DATA: digests kept
    pool.write("v", 2 * CS + 10, b"p" * 20)            # a partial write into a held slice
    assert isinstance(held.chunks[2], bytearray)
    expect = bytearray(old)
    expect[CS:5 * CS] = new
    expect[2 * CS + 10:2 * CS + 30] = b"p" * 20
    assert new[CS + 10:CS + 30] != b"p" * 20           # the writer's bytes are untouched
    assert pool.read("v", 0, 6 * CS) == expect
    pool.flush("v")
    assert _image(pool, "v") == expect
    assert pool.read(sid, 0, 6 * CS) == old            # read back through the digests


def test_a_mutable_write_buffer_is_copied(pool):
    pool.create_volume("v", 2 * CS)
    old = os.urandom(2 * CS)
    pool.write("v", 0, old)
    pool.flush("v")
    sid = _snap(pool, "v")
    buf = bytearray(os.urandom(2 * CS))
    first = bytes(buf)
    pool.write("v", 0, buf)
    buf[:] = bytes(2 * CS)                             # the caller reuses its buffer
    assert pool.read("v", 0, 2 * CS) == first
    pool.flush("v")
    assert _image(pool, "v") == first
    assert pool.read(sid, 0, 2 * CS) == old


def test_a_big_write_holding_few_chunks_copies_them(pool):
    """A view would keep the whole write in memory: for one chunk of 16, copy it."""
    pool.create_volume("v", 16 * CS)
    pool.write("v", 0, os.urandom(16 * CS))
    pool.flush("v")
    sid = _snap(pool, "v")
    old = pool.read("v", 0, 16 * CS)
    pool.write("v", 0, os.urandom(15 * CS))            # chunks 0..14 preserved
    pool.flush("v")
    new = os.urandom(16 * CS)
    pool.write("v", 0, new)                            # only chunk 15 is held now
    held = pool._volumes["v"].held
    assert list(held.chunks) == [15] and isinstance(held.chunks[15], bytearray)
    pool.flush("v")
    assert _image(pool, "v") == new
    assert pool.read(sid, 0, 16 * CS) == old


def test_whole_chunk_discard_and_zero_writes_of_preserved_chunks(pool):
    pool.create_volume("v", 5 * CS)
    old = os.urandom(5 * CS)
    pool.write("v", 0, old)
    pool.flush("v")
    sid = _snap(pool, "v")
    pool.discard("v", 0, 2 * CS + 4096)                # chunks 0, 1 whole; 4 KiB of 2
    pool.write("v", 3 * CS, bytes(2 * CS))             # zeros written over chunks 3, 4
    expect = bytes(2 * CS + 4096) + old[2 * CS + 4096:3 * CS] + bytes(2 * CS)
    assert pool.read("v", 0, 5 * CS) == expect
    pool.flush("v")
    assert _image(pool, "v") == expect
    assert pool.read(sid, 0, 5 * CS) == old


def test_whole_chunks_of_zeros_are_preserved_as_zero_records(pool):
    """Old content read through the scratch buffer (memoryviews) is still recognised as
    zeros: no slot data, no space."""
    pool.create_volume("v", 8 * CS)                    # never written: all holes
    sid = _snap(pool, "v")
    pool.write("v", 0, os.urandom(8 * CS))
    pool.flush("v")
    v = pool._volumes["v"]
    assert v.diff.entries() == 8 and v.diff.used_bytes() == 0
    assert pool.read(sid, 0, 8 * CS) == bytes(8 * CS)


def test_a_view_turned_bytearray_while_its_batch_syncs_still_goes_out(paused):
    """The held object of a chunk changes (a view of the write -> a bytearray) while
    the batch it belongs to syncs: the batch still writes it out -- with the later
    bytes -- and a flush covers it."""
    p, faults, sid, old = paused
    new = os.urandom(CS)
    p.write("v", 0, new)                               # chunk 0 whole: held as a view
    assert isinstance(p._volumes["v"].held.chunks[0], memoryview)
    faults.pause_at = "cow.data_synced"
    errors: list[BaseException] = []
    t = _background(p, errors)
    assert faults.reached.wait(20)
    p.write("v", 100, b"Q" * 10)                       # into it: copied to a bytearray
    assert isinstance(p._volumes["v"].held.chunks[0], bytearray)
    faults.go.set()
    t.join(20)
    assert not t.is_alive() and errors == []
    expect = bytearray(new)
    expect[100:110] = b"Q" * 10
    assert _image(p, "v")[:CS] == expect               # written out by that batch
    assert 0 not in p._volumes["v"].held.chunks
    assert p.read(sid, 0, 4 * CS) == old


def test_writeback_starts_early_for_slots_and_long_origin_runs(pool, monkeypatch):
    started: list[tuple[str, int, int]] = []
    monkeypatch.setattr(DataFile, "start_writeback",
                        lambda self, off, n: started.append((self.role, off, n)))
    pool.create_volume("v", 64 * CS)
    pool.write("v", 0, os.urandom(64 * CS))
    pool.flush("v")
    sid = _snap(pool, "v")
    old = pool.read("v", 0, 64 * CS)
    for off in range(0, 32 * CS, 8 * CS):              # 2 MiB of whole chunks
        pool.write("v", off, os.urandom(8 * CS))
    if pool.preserve_mode == "copy":                   # (clones write no slot data)
        assert started == [("diff", 0, 16 * CS), ("diff", 16 * CS, 16 * CS)]
    pool.write("v", 40 * CS + 512, b"r" * 512)         # a small write: no origin kick
    pool.flush("v")
    # the long run written out, in pieces of ORIGIN_PIECE (1 MiB), each one started
    assert ("origin", 0, 16 * CS) in started and ("origin", 16 * CS, 16 * CS) in started
    assert not any(r == "origin" and off == 40 * CS for r, off, _ in started)
    assert pool.read(sid, 0, 64 * CS) == old
