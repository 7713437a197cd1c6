"""The engine against an in-memory model (hypothesis RuleBasedStateMachine): the model,
run by tests/test_blockstore_model.py and extended by tests/test_power_cut.py.

Every step checks that every snapshot still equals the content the model recorded at its
commit, and that the volume equals the model. Two kinds of stop:

* flush_crash_and_reopen: flush, then abandon the Pool (what kill -9 leaves) and reopen.
* crash: arm one named fault point (every point the engine has, see POINTS), run one
  operation that may pass it, abandon the Pool WITHOUT flushing, sometimes crash once
  more inside the recovery (Pool.open), reopen, and require check() == [] and:
  - every committed snapshot reads exactly its model content; a snapshot may be missing
    only if the crashed operation was deleting or splitting it, or a diff-area overflow
    may have deleted it (the model has a limit set and it is differential);
  - a snapshot whose commit crashed is present (with the right content) or absent;
  - a split either happened (the new volume holds the snapshot's content, the snapshot
    is gone) or not; a revert always completed (it rolls forward at open);
  - each volume chunk holds one of the contents it had since the last durability point
    (flush, resize, revert, reopen): unflushed writes may be lost, like a disk's volatile
    cache, but never torn within a chunk and never older than the last flush.

Runtime: max_examples=100, up to 40 steps each (about 15-25 s here; roughly 300 of the
steps really crash); set SHADOWPLEX_MODEL_EXAMPLES to run more locally (1000 is a good
pre-release soak). A crash step draws the point from the ones its operation can pass
(REACH) and first prepares a state that reaches it (_prepare_crash), so most steps crash.
"""

import shutil
import tempfile

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockstore import Faults, Pool
from blockstore.errors import SimulatedCrash

CS = 4096
SIZE = 16 * CS           # initial volume size
MAX_SIZE = 32 * CS       # grow stops here
NCH = MAX_SIZE // CS

# The named crash points each operation can pass (test_every_fault_point_is_in_the_model
# keeps the union equal to the engine's points when one is added). Drawing the point
# from the operation's own list makes most crash steps really crash.
COW = ["cow.data_written", "cow.data_synced", "cow.map_written", "cow.map_synced"]
GC = ["gc.map_written", "gc.map_synced"]
DELETE = GC + ["delete.after_record"]      # a delete, or a diff-area overflow's delete
RESIZE = ["resize.image_sized", "resize.recorded"]
PROMOTE = ["promote.copied"]
REACH = {
    "write": DELETE,                    # held: reaches the cow.* points only via a flush
    "write_flush": COW + DELETE,
    "discard_flush": COW + DELETE,
    "snapshot": COW + ["commit.before_record", "commit.after_record"],
    "plex": COW + ["plex.copied", "commit.before_record", "commit.after_record"],
    "delete": COW + DELETE,
    "revert": COW + DELETE + RESIZE + ["revert.recorded", "revert.copied", "revert.flushed"],
    "promote": COW + GC + PROMOTE,
    "split": COW + GC + PROMOTE + ["split.promoted", "split.recorded"],
    "grow": COW + RESIZE,
    "flush": COW,
    "writeback": COW,                   # the daemon's timer: syncs without the pool lock
}
OPS = sorted(REACH)
POINTS = sorted({p for points in REACH.values() for p in points})
COW_OPS = {"write", "write_flush", "discard_flush", "revert"}   # may overflow the diff area


def _pad(buf: bytes | bytearray) -> bytes:
    return bytes(buf) + bytes(MAX_SIZE - len(buf))


def _chunks(buf: bytes | bytearray) -> list[bytes]:
    p = _pad(buf)
    return [p[c * CS:(c + 1) * CS] for c in range(NCH)]


class EngineModel(RuleBasedStateMachine):
    def __init__(self, base: str | None = None) -> None:
        """base: the directory the pool goes in (a loop filesystem, tests/poolfs.py);
        None: the system's temporary directory."""
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="spx-model-", dir=base)
        self.faults = Faults()
        self.pool = Pool.create(self.dir + "/pool", chunk_size=CS, faults=self.faults)
        self.pool.create_volume("v", SIZE)
        self.vol = bytearray(SIZE)
        self.snaps: dict[str, bytes] = {}    # committed snapshot -> content (len = size)
        self.kinds: dict[str, str] = {}
        self.order: dict[str, int] = {}      # creation order (overflow deletes oldest)
        self.created = 0
        self.splits = 0
        self.limit: int | None = None
        self.versions: list[set[bytes]] = []
        self._durable()

    def teardown(self) -> None:
        try:
            problems = self.pool.check()
            assert problems == [], problems
            self.pool.close()
        finally:
            shutil.rmtree(self.dir)

    # -- model bookkeeping ---------------------------------------------------------------
    def _durable(self) -> None:
        """Everything written so far is durable: each chunk has one possible content."""
        self.versions = [{c} for c in _chunks(self.vol)]

    def _note(self) -> None:
        """The current content of each chunk is one it may hold after a crash."""
        for c, data in enumerate(_chunks(self.vol)):
            self.versions[c].add(data)

    def _pick(self, i: int) -> str:
        ids = sorted(self.snaps, key=self.order.__getitem__)
        return ids[i % len(ids)]

    def _forget(self, sid: str) -> None:
        del self.snaps[sid], self.kinds[sid], self.order[sid]

    def _add(self, sid: str, content: bytes, kind: str) -> None:
        self.snaps[sid] = content
        self.kinds[sid] = kind
        self.order[sid] = self.created
        self.created += 1

    def _overflowed(self, spared: str | None = None) -> None:
        """Snapshots the diff-area limit made the engine delete (VSS: oldest first)."""
        present = {s.id for s in self.pool.list_snapshots("v")}
        gone = [sid for sid in self.snaps if sid not in present]
        if not gone:
            return
        assert self.limit is not None, f"snapshots vanished without a limit: {gone}"
        assert all(self.kinds[sid] == "differential" for sid in gone), gone
        kept = [self.order[s] for s in present if self.kinds.get(s) == "differential"
                and s != spared]
        assert not kept or max(self.order[s] for s in gone) < min(kept), "not the oldest"
        for sid in gone:
            self._forget(sid)

    # -- operations (shared by the plain rules and the crash rule) -------------------------
    # Each updates the model with its intent BEFORE calling the engine, so that after a
    # crash the model knows what the operation may or may not have done.
    def op_write(self, off: int, n: int, b: int) -> None:
        off %= len(self.vol)
        n = min(n, len(self.vol) - off)
        self.vol[off:off + n] = bytes([b]) * n
        self._note()
        self.pool.write("v", off, bytes([b]) * n)
        self._overflowed()

    def op_discard(self, off: int, n: int) -> None:
        off %= len(self.vol)
        n = min(n, len(self.vol) - off)
        self.vol[off:off + n] = bytes(n)
        self._note()
        self.pool.discard("v", off, n)
        self._overflowed()

    def op_snapshot(self, kind: str) -> str:
        s = self.pool.prepare_snapshot("v", kind)
        if kind == "plex":
            while True:
                done, total = self.pool.plex_sync_step(s.id, max_bytes=2 * CS)
                if done >= total:
                    break
        self.pool.commit_snapshots([s.id])
        self._add(s.id, bytes(self.vol), kind)
        return s.id

    def op_delete(self, sid: str) -> None:
        self.pool.delete_snapshot(sid)
        self._forget(sid)

    def op_revert(self, sid: str) -> None:
        # (an overflow while reverting never deletes the target: the revert only needs
        # preservations for newer snapshots, and _overflow spares the target meanwhile)
        self.vol = bytearray(self.snaps[sid])
        self._note()
        self.pool.revert("v", sid)
        self._durable()            # revert ends with a flush
        self._overflowed(spared=sid)

    def op_promote(self, sid: str) -> None:
        if self.kinds[sid] == "differential":
            self.pool.promote(sid)
            self.kinds[sid] = "full"

    def op_split(self, sid: str) -> None:
        self.splits += 1
        name = f"split{self.splits}"
        self.pool.split(sid, name)
        assert self.pool.read(name, 0, MAX_SIZE) == self.snaps[sid]
        self._forget(sid)
        self.pool.write(name, 0, b"independent")
        self.pool.delete_volume(name)

    def op_grow(self, k: int) -> None:
        new = min(MAX_SIZE, len(self.vol) + k * CS)
        if new == len(self.vol):
            return
        self.vol += bytes(new - len(self.vol))
        self.pool.resize_volume("v", new)
        self._durable()            # resize syncs the image after the held writes

    def op_flush(self) -> None:
        self.pool.flush("v")
        self._durable()

    def op_writeback(self) -> None:
        # held chunks reach the origin file, unsynced: no durability point for the model
        self.pool.writeback(max_age=0)

    # -- plain rules -------------------------------------------------------------------------
    @rule(off=st.integers(0, MAX_SIZE - 1), n=st.integers(1, 3 * CS), b=st.integers(1, 255))
    def write(self, off, n, b):
        self.op_write(off, n, b)

    # whole chunks, 4-8 at once: a sequential stream, what the bulk preserve
    # (diffarea._preserve_new_clones) takes on a reflink pool
    @rule(c=st.integers(0, NCH - 1), k=st.integers(4, 8), b=st.integers(1, 255))
    def write_run(self, c, k, b):
        self.op_write(c * CS, k * CS, b)

    @rule(off=st.integers(0, MAX_SIZE - 1), n=st.integers(1, 3 * CS))
    def discard(self, off, n):
        self.op_discard(off, n)

    @rule(kind=st.sampled_from(["differential", "differential", "plex"]))
    def snapshot(self, kind):
        self.op_snapshot(kind)

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 63))
    def delete(self, i):
        self.op_delete(self._pick(i))

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 63))
    def revert(self, i):
        self.op_revert(self._pick(i))

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 63))
    def promote(self, i):
        self.op_promote(self._pick(i))

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 63))
    def split(self, i):
        self.op_split(self._pick(i))

    @rule()
    def writeback(self):
        self.op_writeback()

    @rule(k=st.integers(1, 4))
    def grow(self, k):
        self.op_grow(k)

    @rule(chunks=st.sampled_from([None, None, 3, 6, 10]))
    def limit(self, chunks):
        self.limit = None if chunks is None else chunks * CS
        self.pool.set_diff_limit("v", self.limit)

    @rule()
    def flush_crash_and_reopen(self):
        # Like a disk with a volatile cache, only flushed writes are promised to survive.
        self.op_flush()
        self.pool.abandon()
        self.pool = Pool.open(self.dir + "/pool", faults=self.faults)
        assert self.pool.check() == []

    # -- the crash rule ------------------------------------------------------------------------
    def _prepare_crash(self, point: str, op: str, off: int, b: int) -> tuple[int, str | None]:
        """Plain (modelled) steps that make `op` likely to pass `point`. Returns the offset
        the operation writes at and the snapshot it should work on (None: any)."""
        writes = op in ("write", "write_flush", "discard_flush")
        target = None
        if point in COW:
            # a snapshot that needs preservations and, unless the op writes itself, a
            # held (unhardened) one that the op's next _writeback hardens
            self.op_snapshot("differential")
            if not writes:
                self.op_write(off, CS, b)
        elif point in DELETE and (writes or op == "revert"):
            # an overflow: snapshot A, then old content that is not zero (zeros cost no
            # diff space) preserved for A, snapshot B and a limit one chunk above what is
            # used now. The op's 2-chunk write (or a revert to A) then deletes the oldest.
            off = off % (len(self.vol) - 2 * CS) // CS * CS
            target = self.op_snapshot("differential")
            self.op_write(off, 2 * CS, b)
            self.op_flush()
            self.op_snapshot("differential")
            self.limit = self.pool.volume("v").diff_bytes + CS
            self.pool.set_diff_limit("v", self.limit)
        elif point in DELETE + PROMOTE + ["split.promoted"] and op in ("delete", "promote",
                                                                        "split"):
            # the oldest differential snapshot: entries only it needs get reclaimed
            diff = [x for x in sorted(self.snaps, key=self.order.__getitem__)
                    if self.kinds[x] == "differential"]
            if not diff:
                diff = [self.op_snapshot("differential")]
                self.op_write(off, 2 * CS, b)
                self.op_flush()
            target = diff[0]
        elif point in RESIZE and op == "revert":
            if all(len(c) == len(self.vol) for c in self.snaps.values()):
                self.op_grow(2)
            other = [x for x in self.snaps if len(self.snaps[x]) != len(self.vol)]
            target = other[0] if other else None
        return off, target

    @rule(data=st.data(), op=st.sampled_from(OPS), after=st.sampled_from([0, 0, 0, 1, 2]),
          i=st.integers(0, 63), off=st.integers(0, MAX_SIZE - 1),
          n=st.integers(1, 3 * CS), b=st.integers(1, 255), in_recovery=st.booleans())
    def crash(self, data, op, after, i, off, n, b, in_recovery):
        point = data.draw(st.sampled_from(REACH[op]), label="point")
        for what in self.run_crash(op, point, after, i, off, n, b, in_recovery):
            event(what)

    def run_crash(self, op: str, point: str, after: int, i: int, off: int, n: int, b: int,
                  in_recovery: bool) -> list[str]:
        """Crash at `point` during `op`, recover, check. Returns what happened (events)."""
        happened = []
        if point not in COW + GC + ["plex.copied"]:
            after = 0              # passed once per operation: a later pass never comes
        if op in ("delete", "revert", "promote", "split") and not self.snaps:
            self.op_snapshot("differential")
        off, target = self._prepare_crash(point, op, off, b)
        if op in ("delete", "revert", "promote", "split") and not self.snaps:
            self.op_snapshot("differential")   # an overflow in the preparation took all
        if op in ("write", "write_flush", "discard_flush") and point in DELETE:
            n = 2 * CS
        sid = None
        if op in ("delete", "revert", "promote", "split"):
            sid = target if target in self.snaps else self._pick(i)
        before_ids = set(self.snaps)
        vol_before = bytes(self.vol)
        split_name = f"split{self.splits + 1}"
        self.faults.arm_crash(point, after)
        try:
            if op in ("write", "write_flush"):
                self.op_write(off, n, b ^ 0x5A or 1)
            elif op == "discard_flush":
                self.op_discard(off, n)
            elif op in ("snapshot", "plex"):
                self.op_snapshot("plex" if op == "plex" else "differential")
            elif op == "delete":
                self.op_delete(sid)
            elif op == "revert":
                self.op_revert(sid)
            elif op == "promote":
                self.op_promote(sid)
            elif op == "split":
                self.op_split(sid)
            elif op == "grow":
                self.op_grow(1 + i % 4)
            elif op == "writeback":
                self.op_writeback()
            if op.endswith("flush"):
                self.op_flush()
        except SimulatedCrash:
            happened.append(f"crashed at {point} during {op}")
        else:
            happened.append("crash not hit")
        # kill -9: no flush, no close; the held writes are simply gone
        self.faults.disarm()
        self.pool.abandon()
        if in_recovery:            # and once more while recovering
            self.faults.arm_crash(point)
            try:
                self.pool = Pool.open(self.dir + "/pool", faults=self.faults)
                self.pool.abandon()
            except SimulatedCrash:
                happened.append(f"crashed again at {point} while recovering")
            self.faults.disarm()
        self.pool = Pool.open(self.dir + "/pool", faults=self.faults)
        assert self.pool.check() == []
        self._after_crash(op, sid, before_ids, vol_before, split_name)
        return happened

    def _after_crash(self, op, sid, before_ids, vol_before, split_name):
        pool = self.pool
        present = {s.id: s for s in pool.list_snapshots("v")}
        volumes = {v.name for v in pool.list_volumes()}
        # the operation's own snapshot
        if op == "split" and split_name in volumes:
            assert sid not in present, "split both happened and did not"
            assert pool.read(split_name, 0, MAX_SIZE) == self.snaps[sid]
            pool.delete_volume(split_name)
        if op in ("split", "promote") and sid in present:
            self.kinds[sid] = present[sid].kind
        for s in present.values():
            if s.id not in self.snaps:   # a crashed commit that got recorded
                assert op in ("snapshot", "plex") and s.id not in before_ids, s.id
                self._add(s.id, vol_before, s.kind)
        # every committed snapshot: exactly its content, or legitimately gone
        for x in list(self.snaps):
            if x in present:
                assert pool.read(x, 0, MAX_SIZE) == self.snaps[x], x
                continue
            may_go = (x == sid and (op == "delete" or split_name in volumes)) or (
                self.limit is not None and self.kinds[x] == "differential"
                and op in COW_OPS)
            assert may_go, f"snapshot {x} lost by a crash during {op}"
            self._forget(x)
        assert volumes - {split_name} == {"v"}, volumes
        # the volume: a revert rolled forward; otherwise per chunk an allowed content
        actual = pool.read("v", 0, MAX_SIZE)
        if op == "revert" and sid in self.snaps:
            assert actual == self.snaps[sid], "revert neither undone nor completed"
        else:
            assert len(actual) % CS == 0 and CS <= len(actual) <= MAX_SIZE
            for c, data in enumerate(_chunks(actual)[:len(actual) // CS]):
                assert data in self.versions[c], f"chunk {c} holds content never written"
        self.vol = bytearray(actual)
        self._durable()

    @invariant()
    def contents_match(self):
        assert self.pool.read("v", 0, MAX_SIZE) == bytes(self.vol)
        for sid, content in self.snaps.items():
            assert self.pool.read(sid, 0, MAX_SIZE) == content, sid
