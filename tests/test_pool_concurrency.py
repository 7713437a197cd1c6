"""The pool lock's discipline (docs/concurrency.md), checked with threads.

1. No long I/O under the pool lock: an operation paused in the middle of its disk I/O
   (flush, check, scrub, seal, the commit of a plex, a delete's diff-area reclaim) must
   not keep a 4 KiB read of another volume waiting -- that read comes from the FUSE
   thread, which serves every volume and the control socket.
2. Private mutators run with the lock held (issue 12: seal changed the writeback state
   from a worker thread without it).
3. A threaded stress: writers, snapshots coming and going, check/scrub/seal/promote/plex
   sync all at once, with the power-cut recorder on; then a power cut, and every
   committed snapshot must read exactly as at its commit.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sqlite3
import threading

import pytest
from support import start_thread

from blockstore import Faults, Pool
from blockstore.errors import (
    Busy,
    FormatError,
    InvalidState,
    NotFound,
    SnapshotInvalid,
    Unsupported,
)
from blockstore.powercut import PowerCut

CS = 64 * 1024
OP_THREAD = "pool-op"


class PausingIO(Faults):
    """Stops the operation's thread at its first I/O of (role, op) until `go`."""

    def __init__(self, powercut: PowerCut | None = None) -> None:
        super().__init__(powercut)
        self.pause: tuple[str, str] | None = None
        self.reached = threading.Event()
        self.go = threading.Event()

    def io(self, role: str, op: str) -> None:
        if self.pause == (role, op) and threading.current_thread().name == OP_THREAD:
            self.pause = None
            self.reached.set()
            assert self.go.wait(30)
        super().io(role, op)


def _thread(fn, errors, name=OP_THREAD):
    return start_thread(fn, errors, name)


@pytest.fixture
def paused(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=CS).close()
    faults = PausingIO()
    p = Pool.open(path, faults=faults)
    for name in ("a", "b"):
        p.create_volume(name, 32 * CS)
        p.write(name, 0, os.urandom(32 * CS))
        p.flush(name)
    yield p, faults
    faults.go.set()
    assert p.check() == []
    p.close()


def _plex(p, vol):
    s = p.prepare_snapshot(vol, "plex")
    while True:
        done, total = p.plex_sync_step(s.id)
        if done >= total:
            return s.id


def _setup_flush(p):
    p.write("a", 0, b"x" * 4096)
    return ("origin", "sync"), lambda: p.flush("a")


def _setup_check(p):
    s = p.prepare_snapshot("a", "differential")
    p.commit_snapshots([s.id])
    p.write("a", 0, os.urandom(8 * CS))   # 8 chunks preserved: diff slots to verify
    p.flush("a")
    return ("diff", "read"), p.check


def _setup_seal(p):
    sid = _plex(p, "a")
    p.commit_snapshots([sid])
    return ("plex", "read"), lambda: p.seal(sid)


def _setup_scrub(p):
    sid = _plex(p, "a")
    p.commit_snapshots([sid])
    return ("plex", "read"), p.scrub


def _setup_commit(p):
    sid = _plex(p, "a")
    p.write("a", 0, b"y" * 4096)          # mirrored: the plex file is dirty
    return ("plex", "sync"), lambda: p.commit_snapshots([sid])


def _setup_delete(p):
    s = p.prepare_snapshot("a", "differential")
    p.commit_snapshots([s.id])
    p.write("a", 0, os.urandom(8 * CS))   # 8 entries that only s needs: gc clears them
    p.flush("a")
    return ("map", "sync"), lambda: p.delete_snapshot(s.id)


@pytest.mark.parametrize("setup", [_setup_flush, _setup_check, _setup_seal, _setup_scrub,
                                   _setup_commit, _setup_delete],
                         ids=lambda f: f.__name__[7:])
def test_a_read_of_another_volume_never_waits_for_io_of_an_operation(paused, setup):
    p, faults = paused
    pause_at, op = setup(p)
    want = p.read("b", 0, 4096)
    faults.pause = pause_at
    errors: list[BaseException] = []
    t = _thread(op, errors)
    assert faults.reached.wait(30), f"the operation never reached its {pause_at} I/O"
    # the operation is stuck inside its I/O: a read of b must not wait for it
    got: list[bytes] = []
    reader = _thread(lambda: got.append(p.read("b", 0, 4096)), errors, name="fuse")
    reader.join(5)
    blocked = reader.is_alive()
    faults.go.set()
    t.join(30)
    reader.join(30)
    assert not blocked, f"a 4 KiB read of another volume waited for the {pause_at} I/O"
    assert errors == [] and got == [want]


class PausingNth(PausingIO):
    """PausingIO at the (skip+1)-th I/O of (role, op) of the operation's thread."""

    def __init__(self, skip: int) -> None:
        super().__init__()
        self.skip = skip

    def io(self, role: str, op: str) -> None:
        if self.pause == (role, op) and threading.current_thread().name == OP_THREAD \
                and self.skip > 0:
            self.skip -= 1
            return super(PausingIO, self).io(role, op)
        super().io(role, op)


def test_writes_go_on_while_the_writeback_thread_writes_held_chunks_out(tmp_path):
    """The writeback thread copies a synced batch's held chunks to the origin WITHOUT
    the pool lock (a 16 MiB batch took 3-110 ms, and every FUSE write waited for it):
    paused between two pieces of its write-out, a write into a chunk it has already
    copied, a write elsewhere and a read of another volume must return; the write into
    the copied chunk must not be lost when the batch releases its chunks (it got a new
    buffer, so the chunk stays held until the next batch)."""
    n = 96                      # chunks: 6 MiB
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=CS).close()
    faults = PausingNth(skip=1)
    p = Pool.open(path, faults=faults)
    try:
        for name in ("a", "b"):
            p.create_volume(name, n * CS)
            p.write(name, 0, os.urandom(n * CS))
            p.flush(name)
        before = p.read("a", 0, n * CS)
        s = p.prepare_snapshot("a", "differential")
        p.commit_snapshots([s.id])
        p.background_writeback = True
        p.write("a", 0, b"A" * 4096)   # partial: held as a bytearray, written out first
        whole = os.urandom(72 * CS)     # then 4.5 MiB of whole chunks (UNLOCKED_MIN)
        p.write("a", 8 * CS, whole)
        faults.pause = ("origin", "write")
        errors: list[BaseException] = []
        t = _thread(lambda: p.writeback(max_age=0), errors)
        assert faults.reached.wait(30), "the write-out never reached its second piece"
        done: list[str] = []

        def other() -> None:
            p.write("a", 0, b"N" * 4096)           # chunk 0: already copied to the file
            p.write("a", 90 * CS, b"E" * 4096)     # a chunk nobody holds
            done.append(p.read("a", 0, 4096).decode()[:1])
            p.read("b", 0, 4096)
        w = _thread(other, errors, name="fuse")
        w.join(5)
        blocked = w.is_alive()
        faults.go.set()
        t.join(30)
        w.join(30)
        assert not blocked, "a write waited for the writeback thread's write-out"
        assert errors == [] and done == ["N"]
        p.flush("a")
        want = bytearray(before)
        want[0:4096] = b"N" * 4096
        want[8 * CS:80 * CS] = whole
        want[90 * CS:90 * CS + 4096] = b"E" * 4096
        assert p.read("a", 0, n * CS) == bytes(want)
        assert p.read(s.id, 0, n * CS) == before
        assert p.check() == []
    finally:
        faults.go.set()
        p.close()
    with Pool.open(path) as p2:   # what reached the file, not only the held buffers
        assert p2.read("a", 0, n * CS) == bytes(want)


def test_private_mutators_run_under_the_pool_lock(tmp_path, monkeypatch):
    """Regression (issue 12, item 2): Pool.seal reached _writeback (which mutates the
    held-write state and the diff area's unsynced list) from a worker thread without the
    lock. Every call of those mutators, from any public operation, must hold it."""
    unlocked: list[str] = []
    for name in ("_writeback", "_cut", "_finish", "_harden", "_write_out",
                 "_snapshot_chunks", "_set_state"):
        real = getattr(Pool, name)

        def wrapped(self, *a, _real=real, _name=name, **kw):
            if not self._lock._is_owned():
                unlocked.append(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(Pool, name, wrapped)
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    p.create_volume("v", 8 * CS)
    p.write("v", 0, os.urandom(8 * CS))
    sid = _plex(p, "v")
    p.commit_snapshots([sid])
    d = p.prepare_snapshot("v", "differential")
    p.commit_snapshots([d.id])
    p.write("v", 0, b"z" * 4096)          # a held chunk: writeback state to mutate
    p.seal(sid)
    assert p.check() == [] and p.scrub() == []
    p.promote(d.id)
    p.flush("v")
    p.delete_snapshot(sid)
    p.close()
    assert unlocked == []


# -- the threaded stress ---------------------------------------------------------------------
def _digest(p, key):
    return hashlib.sha256(p.read(key, 0, p.lun_size(key))).hexdigest()


@pytest.mark.parametrize("seed", [1, 2])
def test_threaded_stress_then_power_cut(tmp_path, seed):
    """Writers, snapshots (differential and plex, taken under a hold as the coordinator
    does), deletes, promote, seal, check and scrub run in threads at once; check() must
    be clean while they run, and each committed snapshot reads as at its commit, before
    and after a power cut."""
    rng = random.Random(seed)
    path = str(tmp_path / "pool")
    Pool.create(path, chunk_size=CS).close()
    pc = PowerCut("drop", seed=seed)
    p = Pool.open(path, faults=Faults(powercut=pc))
    vols = ["a", "b"]
    for v in vols:
        p.create_volume(v, 48 * CS)
        p.write(v, 0, os.urandom(48 * CS))
    p.close()
    pc.start(path)
    p = Pool.open(path, faults=Faults(powercut=pc))
    p.background_writeback = True
    holds = {v: threading.Lock() for v in vols}   # the write barrier of flush & hold
    expected: dict[str, str] = {}                  # snapshot id -> digest at commit
    elock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"writes": 0, "snapshots": 0, "deletes": 0, "promotes": 0, "checks": 0,
              "verified": 0}

    def writer(wseed):
        r = random.Random(wseed)
        while not stop.is_set():
            v = r.choice(vols)
            n = r.choice([512, 4096, CS])
            off = r.randrange(0, 48 * CS - n)
            with holds[v]:
                p.write(v, off, os.urandom(n))
            counts["writes"] += 1

    def snapshotter():
        while not stop.is_set():
            v = rng.choice(vols)
            kind = "plex" if rng.random() < 0.3 else "differential"
            s = p.prepare_snapshot(v, kind)
            if kind == "plex":
                while p.plex_sync_step(s.id, 4 * CS)[0] < p.snapshot(s.id).sync_total:
                    pass
            with holds[v]:                 # flush & hold, commit, read the instant
                p.flush(v)
                p.commit_snapshots([s.id])
                with elock:
                    expected[s.id] = _digest(p, s.id)
            counts["snapshots"] += 1
            live = [x.id for x in p.list_snapshots() if x.state == "committed"]
            if len(live) > 6:
                victim = rng.choice(live)
                try:
                    with elock:
                        assert _digest(p, victim) == expected[victim], "snapshot changed"
                        counts["verified"] += 1
                    p.delete_snapshot(victim)
                except (Busy, NotFound):
                    continue   # being promoted / sealed, or gone
                with elock:
                    expected.pop(victim, None)
                counts["deletes"] += 1

    def integrity():
        while not stop.is_set():
            snaps = [x for x in p.list_snapshots() if x.state == "committed"]
            op = rng.choice(["check", "scrub", "seal", "promote"])
            try:
                if op == "check":
                    assert p.check() == []
                elif op == "scrub":
                    assert p.scrub() == []
                elif snaps and op == "seal":
                    p.seal(rng.choice(snaps).id)
                elif snaps:
                    p.promote(rng.choice(snaps).id)
                    counts["promotes"] += 1
            except (Unsupported, NotFound, Busy, InvalidState, SnapshotInvalid):
                pass   # a differential to seal, a full copy to promote, deleted meanwhile
            counts["checks"] += 1

    def writeback():
        while not stop.is_set():
            p.wait_and_writeback(0.05)

    threads = [_thread(lambda i=i: writer(seed * 10 + i), errors, f"writer{i}")
               for i in range(2)]
    threads += [_thread(f, errors, f.__name__)
                for f in (snapshotter, integrity, writeback)]
    stop.wait(4)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == [], errors
    assert counts["snapshots"] >= 3 and counts["writes"] > 50, counts
    print(f"stress seed {seed}: {counts}, {len(expected)} more verified at the end")
    for sid, want in expected.items():
        assert _digest(p, sid) == want, f"snapshot {sid} changed"
    # the power cut: unflushed writes are lost, committed snapshots are not
    p.abandon()
    pc.cut()
    p = Pool.open(path)
    try:
        assert p.check() == []
        for sid, want in expected.items():
            assert _digest(p, sid) == want, f"snapshot {sid} changed across the power cut"
    finally:
        p.close()


# -- syncs outside the lock: what a second thread may conclude (review of issue 12's change) --
class Hooks(Faults):
    """Stops a named thread at a crash point or at its first I/O of (role, op)."""

    def __init__(self, powercut: PowerCut | None = None) -> None:
        super().__init__(powercut)
        self.pauses: dict[tuple[str, object], tuple[threading.Event, threading.Event]] = {}

    def add(self, thread: str, key: object) -> tuple[threading.Event, threading.Event]:
        reached, go = threading.Event(), threading.Event()
        self.pauses[(thread, key)] = (reached, go)
        return reached, go

    def _hit(self, key: object) -> None:
        pause = self.pauses.pop((threading.current_thread().name, key), None)
        if pause is not None:
            pause[0].set()
            assert pause[1].wait(30)

    def point(self, name: str) -> None:
        self._hit(name)
        super().point(name)

    def io(self, role: str, op: str) -> None:
        self._hit((role, op))
        super().io(role, op)


@pytest.fixture
def cut_pool(tmp_path):
    """(pool, hooks, power cut, reopen): a pool recorded by the power-cut emulator."""
    path = str(tmp_path / "pool")
    pc = PowerCut()
    hooks = Hooks(powercut=pc)
    Pool.create(path, chunk_size=CS).close()
    pc.start(path)
    p = Pool.open(path, faults=hooks)
    p.create_volume("v", 8 * CS)
    p.write("v", 0, b"1" * (8 * CS))
    p.flush("v")
    opened = [p]

    def power_cut_and_reopen():
        p.abandon()
        pc.cut()
        q = Pool.open(path)
        opened.append(q)
        return q
    yield p, hooks, power_cut_and_reopen
    for q in opened:
        if not q._closed:
            q.close()


def _stall_fdatasync(monkeypatch, thread: str, fd: int | None = None):
    """os.fdatasync blocks in `thread` (on `fd` only, if given) until `go`."""
    inside, go = threading.Event(), threading.Event()
    real = os.fdatasync

    def fdatasync(f):
        if threading.current_thread().name == thread and fd in (None, f):
            inside.set()
            assert go.wait(30)
        return real(f)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return inside, go


def _ended_while_held(t: threading.Thread, release: threading.Event,
                      *others: threading.Thread) -> bool:
    """Whether thread t ended within 0.5 s while what it must wait for is held; then
    release that and join every thread."""
    t.join(0.5)
    early = not t.is_alive()
    release.set()
    for x in (t, *others):
        x.join(10)
    return early


def test_a_second_flush_waits_for_the_sync_in_flight(cut_pool, monkeypatch):
    """Two flushes of one volume: the second returned while the first was still inside
    fdatasync (it took the cleared dirty flag for durability); a power cut then lost a
    write both had acknowledged."""
    p, _hooks, power_cut = cut_pool
    p.write("v", 0, b"2" * CS)
    inside, go = _stall_fdatasync(monkeypatch, "F1")
    errors: list[BaseException] = []
    t1 = start_thread(lambda: p.flush("v"), errors, "F1")
    assert inside.wait(10)
    t2 = start_thread(lambda: p.flush("v"), errors, "F2")
    assert not _ended_while_held(t2, go, t1), \
        "the second flush returned while the first one's fdatasync ran"
    assert errors == []
    assert power_cut().read("v", 0, CS) == b"2" * CS


def test_a_plex_commit_waits_for_a_flush_syncing_it(cut_pool, monkeypatch):
    """A flush inside the plex's fdatasync; the commit's syncs skipped it (clean flag)
    and committed: after a power cut the committed plex had lost a mirrored write."""
    p, _hooks, power_cut = cut_pool
    s = _plex(p, "v")
    p.write("v", 0, b"2" * CS)                         # mirrored into the plex
    inside, go = _stall_fdatasync(monkeypatch, "F", p._snaps[s].file.fd)
    errors: list[BaseException] = []
    tf = start_thread(lambda: p.flush("v"), errors, "F")
    assert inside.wait(10)
    tc = start_thread(lambda: p.commit_snapshots([s]), errors, "C")
    assert not _ended_while_held(tc, go, tf), \
        "the commit did not wait for the plex's sync in flight"
    assert errors == [] and p.snapshot(s).state == "committed"
    assert power_cut().read(s, 0, CS) == b"2" * CS


def test_a_delete_reclaiming_does_not_let_a_flush_skip_the_map_sync(cut_pool, monkeypatch):
    """A delete's reclaim inside the map's fdatasync; a flush's batch skipped its own map
    sync and wrote the held chunk out: after a power cut snapshot s2 read the new data
    (invariant 1) and check() saw nothing."""
    p, hooks, power_cut = cut_pool
    s1 = p.prepare_snapshot("v", "differential")
    p.commit_snapshots([s1.id])
    p.write("v", 0, b"2" * CS)
    p.flush("v")                                       # an entry only s1 needs
    s2 = p.prepare_snapshot("v", "differential")
    p.commit_snapshots([s2.id])
    reached, go_g = hooks.add("G", "gc.map_written")
    inside, go_sync = _stall_fdatasync(monkeypatch, "G")
    errors: list[BaseException] = []
    tg = start_thread(lambda: p.delete_snapshot(s1.id), errors, "G")
    assert reached.wait(10)
    p.write("v", CS, b"3" * CS)                        # preserved for s2, held
    reached_w, go_w = hooks.add("W", "cow.map_written")
    tw = start_thread(lambda: p.flush("v"), errors, "W")
    assert reached_w.wait(10)
    go_g.set()
    assert inside.wait(10)                             # the reclaim is inside fdatasync
    go_w.set()
    assert not _ended_while_held(tw, go_sync, tg), \
        "the flush did not wait for the map's sync in flight"
    assert errors == []
    q = power_cut()
    assert q.read(s2.id, CS, CS) == b"1" * CS
    assert q.check() == []


def test_a_flush_never_returns_with_its_writes_still_held(cut_pool):
    """Another thread (an abort's _settle) finished the flush's batch and could not write
    a chunk out (EIO, logged, kept held); the flush then returned OK with the data only
    in memory, and a power cut lost it."""
    p, hooks, power_cut = cut_pool
    s1 = p.prepare_snapshot("v", "differential")
    p.commit_snapshots([s1.id])
    s2 = p.prepare_snapshot("v", "differential")
    p.write("v", 0, b"2" * CS)                         # preserved; the new content held
    reached, go = hooks.add("F", "cow.map_synced")
    errors: list[BaseException] = []
    tf = start_thread(lambda: p.flush("v"), errors, "F")
    assert reached.wait(10)
    hooks.arm_error("origin", "write", errno.EIO, count=1)
    ta = start_thread(lambda: p.abort_snapshot(s2.id), errors, "A")
    ta.join(0.3)
    go.set()
    tf.join(10)
    ta.join(10)
    assert errors == []                 # the retry wrote it (the EIO came once)
    assert 0 not in p._volumes["v"].held.chunks
    assert power_cut().read("v", 0, CS) == b"2" * CS


def test_a_failed_plex_sync_fails_the_commit(tmp_path):
    """Linux reports a writeback error once: the commit's first sync met it, suppressed
    it, and its second sync succeeded, committing a plex that had lost a write."""
    faults = Faults()
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS, faults=faults)
    p.create_volume("v", 8 * CS)
    p.write("v", 0, b"1" * CS)
    s = _plex(p, "v")
    p.write("v", 0, b"2" * CS)                         # mirrored: the plex file is dirty
    faults.arm_error("plex", "sync", errno.EIO, count=1)
    with pytest.raises(OSError):
        p.commit_snapshots([s])
    assert p.snapshot(s).state == "preparing"
    with pytest.raises((OSError, InvalidState)):       # and it stays failed
        p.commit_snapshots([s])
    p.abort_snapshot(s)
    assert p.check() == []
    p.close()


def test_check_during_a_split_reports_nothing_false(paused):
    p, faults = paused
    sid = _plex(p, "a")
    p.commit_snapshots([sid])
    p.seal(sid)
    faults.pause = ("plex", "read")
    errors: list[BaseException] = []
    found: list[list[str]] = []
    t = _thread(lambda: found.append(p.check()), errors)
    assert faults.reached.wait(10)
    p.split(sid, "w")
    p.write("w", 0, b"new" * 1000)                     # the image is a volume now
    faults.go.set()
    t.join(30)
    assert errors == [] and found == [[]]


def test_two_seals_at_once(paused):
    p, faults = paused
    sid = _plex(p, "a")
    p.commit_snapshots([sid])
    faults.pause = ("plex", "read")
    errors: list[BaseException] = []
    t = _thread(lambda: p.seal(sid), errors)
    assert faults.reached.wait(10)
    with pytest.raises(Busy):
        p.seal(sid)
    assert p.scrub() == []                             # skips the seal in progress
    faults.go.set()
    t.join(30)
    assert errors == [] and p._snaps[sid].sealed


def test_an_unknown_kind_in_the_catalog_is_one_clear_error(tmp_path):
    path = str(tmp_path / "pool")
    p = Pool.create(path, chunk_size=CS)
    p.create_volume("v", 8 * CS)
    s = _plex(p, "v")
    p.commit_snapshots([s])
    image = p.image_path(s)
    p.close()
    db = sqlite3.connect(os.path.join(path, "catalog.sqlite"))
    db.execute("UPDATE snapshots SET kind='mirror'")
    db.commit()
    db.close()
    with pytest.raises(FormatError, match="unknown kind 'mirror'"):
        Pool.open(path)
    assert image is not None and os.path.exists(image)   # nothing removed as an orphan
