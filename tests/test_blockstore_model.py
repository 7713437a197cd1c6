"""The engine against an in-memory model (hypothesis RuleBasedStateMachine).

Every step checks that every snapshot still equals the content the model recorded at its
creation, and the volume equals the model; crash+reopen flushes, then abandons the Pool
(what kill -9 leaves) and runs check().
"""

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from blockstore import Pool

CS = 4096
SIZE = 16 * CS


class EngineModel(RuleBasedStateMachine):
    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="spx-model-")
        self.pool = Pool.create(self.dir + "/pool", chunk_size=CS)
        self.pool.create_volume("v", SIZE)
        self.vol = bytearray(SIZE)
        self.snaps: dict[str, bytes] = {}
        self.splits = 0

    def teardown(self) -> None:
        try:
            assert self.pool.check() == []
            self.pool.close()
        finally:
            shutil.rmtree(self.dir)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * CS), b=st.integers(1, 255))
    def write(self, off, n, b):
        n = min(n, SIZE - off)
        self.pool.write("v", off, bytes([b]) * n)
        self.vol[off:off + n] = bytes([b]) * n

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * CS))
    def discard(self, off, n):
        n = min(n, SIZE - off)
        self.pool.discard("v", off, n)
        self.vol[off:off + n] = bytes(n)

    @rule(target=snapshots, kind=st.sampled_from(["differential", "differential", "plex"]))
    def snapshot(self, kind):
        s = self.pool.prepare_snapshot("v", kind)
        if kind == "plex":
            while True:
                done, total = self.pool.plex_sync_step(s.id, max_bytes=2 * CS)
                if done >= total:
                    break
        self.pool.commit_snapshots([s.id])
        self.snaps[s.id] = bytes(self.vol)
        return s.id

    @rule(sid=consumes(snapshots))
    def delete(self, sid):
        self.pool.delete_snapshot(sid)
        del self.snaps[sid]

    @rule(sid=snapshots)
    def revert(self, sid):
        self.pool.revert("v", sid)
        self.vol[:] = self.snaps[sid]

    @rule(sid=snapshots)
    def promote(self, sid):
        if self.pool.snapshot(sid).kind == "differential":
            self.pool.promote(sid)

    @rule(sid=consumes(snapshots))
    def split(self, sid):
        self.splits += 1
        name = f"split{self.splits}"
        self.pool.split(sid, name)
        assert self.pool.read(name, 0, SIZE) == self.snaps.pop(sid)
        self.pool.write(name, 0, b"independent")
        self.pool.delete_volume(name)

    @rule()
    def flush_crash_and_reopen(self):
        # Like a disk with a volatile cache, only flushed writes are promised to survive.
        self.pool.flush("v")
        self.pool.abandon()
        self.pool = Pool.open(self.dir + "/pool")
        assert self.pool.check() == []

    @invariant()
    def contents_match(self):
        assert self.pool.read("v", 0, SIZE) == bytes(self.vol)
        for sid, content in self.snaps.items():
            assert self.pool.read(sid, 0, SIZE) == content, sid


EngineModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestEngineModel = EngineModel.TestCase
