"""The engine against its in-memory model (tests/engine_model.py, which says what each
step checks): the hypothesis machine, a check that the model knows every fault point,
and a sweep that crashes at each (operation, point) pair once.

Runtime: max_examples=100, up to 40 steps each (about 15-25 s here); set
SHADOWPLEX_MODEL_EXAMPLES to run more locally (1000 is a good pre-release soak).

The machine runs again with its pool on loop-mounted XFS (reflink) and btrfs (issue 14:
chunks preserved by reference), with fewer examples (SHADOWPLEX_MODEL_FS_EXAMPLES,
default 20: about 3 s each); the sweep runs on both too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine_model import CS, OPS, POINTS, REACH, EngineModel
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from poolfs import on_filesystems


def _settings(examples_env: str, default: int) -> settings:
    return settings(max_examples=int(os.environ.get(examples_env, str(default))),
                    stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


EngineModel.TestCase.settings = _settings("SHADOWPLEX_MODEL_EXAMPLES", 100)
TestEngineModel = EngineModel.TestCase


@on_filesystems("xfs", "btrfs", tmp=False)
def test_engine_model_on_loop_filesystems(pool_fs):
    def machine() -> EngineModel:
        m = EngineModel(str(pool_fs))
        assert m.pool.preserve_mode == "reflink"   # whole chunks are cloned here
        return m
    run_state_machine_as_test(machine, settings=_settings("SHADOWPLEX_MODEL_FS_EXAMPLES", 20))


def test_every_fault_point_is_in_the_model():
    """A new named crash point must be added to POINTS, so the machine crashes there."""
    src = "".join(p.read_text() for p in (Path(__file__).parent.parent / "blockstore")
                  .glob("*.py"))
    found = set(re.findall(r'faults\.point\("([a-z_.]+)"\)', src))
    assert found == set(POINTS), (found - set(POINTS), set(POINTS) - found)


@on_filesystems("xfs", "btrfs")
def test_crash_sweep_every_point(pool_fs):
    """Every (operation, point) pair of REACH once, from one fixed state, with the same
    checks as the machine, every other one crashing again inside the recovery. Each
    pair must really crash (the random machine may miss some in a short CI run); if one
    stops being reachable, fix REACH or _prepare_crash."""
    missed = []
    pairs = [(op, point) for op in OPS for point in REACH[op]]
    for k, (op, point) in enumerate(pairs):
        m = EngineModel(pool_fs and str(pool_fs))
        try:
            m.op_write(0, 6 * CS, 7)
            m.op_snapshot("differential")
            m.op_write(CS, 2 * CS, 8)
            m.op_snapshot("plex")
            m.op_grow(2)
            m.op_snapshot("differential")
            m.op_write(3 * CS, CS, 9)
            m.op_flush()
            events = m.run_crash(op, point, 0, 0, 2 * CS, 2 * CS, 11, k % 2 == 1)
            m.contents_match()
            if not events[0].startswith("crashed"):
                missed.append((op, point))
        finally:
            m.teardown()
    assert missed == []
