"""The diff area's space accounting (blockstore/accounting.py, issue 19 #3): each
differential snapshot's bytes held only for it and shared, against a count made here
from the read rule alone (DiffArea.lookup: which entry each snapshot reads for each
chunk), after random writes, snapshots, deletes, promotes and reopens; deleting a
snapshot frees exactly its `used`; check() finds counters that disagree with the map."""

from __future__ import annotations

import os
import random

import pytest

from blockstore import Pool
from blockstore.diffarea import HAS_DATA

CS = 4096
NCHUNKS = 24


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    yield p
    if not p._closed:
        assert p.check() == []
        p.close()


def snap(pool: Pool, vol: str) -> str:
    s = pool.prepare_snapshot(vol)
    pool.commit_snapshots([s.id])
    return s.id


def by_read_rule(pool: Pool, vol: str) -> dict[str, tuple[int, int]]:
    """snapshot id -> (used, shared) counted from what each snapshot reads: a data entry
    read by exactly one live snapshot is held only for it, else shared by its readers."""
    v = pool._volumes[vol]
    da = v.diff
    live = {s.epoch: s.snap_id for s in v.snaps
            if s.kind == "differential" and s.state == "committed"}
    readers: dict[int, set[int]] = {}
    chunks = {da.chunk[s] for s, st in enumerate(da.state) if st}
    for e in live:
        for c in chunks:
            slot = da.lookup(c, e)
            if slot is not None and da.state[slot] in HAS_DATA:
                readers.setdefault(slot, set()).add(e)
    out = {}
    for e, sid in live.items():
        mine = [len(r) for r in readers.values() if e in r]
        out[sid] = (CS * mine.count(1), CS * (len(mine) - mine.count(1)))
    return out


def listed(pool: Pool, vol: str) -> dict[str, tuple[int, int]]:
    return {s.id: (s.used, s.shared) for s in pool.list_snapshots(vol)
            if s.kind == "differential"}


@pytest.mark.parametrize("seed", range(6))
def test_figures_follow_the_read_rule_through_random_histories(pool, seed):
    rng = random.Random(seed)
    pool.create_volume("v", NCHUNKS * CS)
    pool.write("v", 0, os.urandom(NCHUNKS * CS))
    try:
        pool = _history(pool, rng, seed)
        assert pool.check() == []
    finally:
        pool.close()


def _history(pool: Pool, rng: random.Random, seed: int) -> Pool:
    """40 random steps, the figures compared after each; returns the pool (reopened
    on the way, sometimes)."""
    for step in range(40):
        op = rng.random()
        snaps = [s for s in pool.list_snapshots("v") if s.kind == "differential"]
        if op < 0.2 or not snaps:
            snap(pool, "v")
        elif op < 0.3:
            victim = rng.choice(snaps)
            freed = victim.used
            before = pool.volume("v").diff_bytes
            pool.delete_snapshot(victim.id)
            # what deleting it frees is its `used`, as zfs's USED of a snapshot
            assert before - pool.volume("v").diff_bytes == freed, (seed, step)
        elif op < 0.33:
            pool.promote(rng.choice(snaps).id)
        elif op < 0.36:
            pool.close()
            pool = Pool.open(pool.path)
        else:
            c = rng.randrange(NCHUNKS)
            data = b"\0" * CS if rng.random() < 0.1 else os.urandom(rng.randrange(1, 2 * CS))
            pool.write("v", c * CS, data[:(NCHUNKS - c) * CS])
        assert listed(pool, "v") == by_read_rule(pool, "v"), (seed, step)
    return pool


def test_check_finds_counters_that_disagree_with_the_map(pool):
    pool.create_volume("v", NCHUNKS * CS)
    pool.write("v", 0, os.urandom(NCHUNKS * CS))
    a = snap(pool, "v")
    pool.write("v", 0, b"x" * CS)
    snap(pool, "v")
    pool.write("v", CS, b"y" * CS)
    assert pool.check() == []
    da = pool._volumes["v"].diff
    key = next(iter(da.spans))
    da.spans[key] += 1
    da.space_memo = None
    problems = pool.check()
    assert len(problems) == 1 and "space counters hold 3 entries, the diff map 2" in \
        problems[0], problems
    other = next(k for k in da.spans if k != key)
    da.spans[other] -= 1
    problems = pool.check()
    assert len(problems) == 1 and "space counters disagree with the diff map" in problems[0]
    da.spans[other] += 1
    # reopening rebuilds them from the map: right again, the same figures as before
    da.spans[key] -= 1
    before = listed(pool, "v")
    pool.close()
    pool = Pool.open(pool.path)
    try:
        assert listed(pool, "v") == before and before[a] == (CS, CS)
        assert pool.check() == []
    finally:
        pool.close()
