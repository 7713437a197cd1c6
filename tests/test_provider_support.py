"""Sanity tests of the provider test helpers (tests/provider_env.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from provider_env import Env, FakeWriter

from provider.coordinator import Coordinator


def test_fake_writer_records_and_fails() -> None:
    w = FakeWriter("w", fail="thaw")
    w.freeze(["/v"], 1.0)
    assert w.frozen
    with pytest.raises(RuntimeError):
        w.thaw()
    assert w.events() == ["freeze", "thaw"]


def test_env_runs_a_coordinator(tmp_path: Path) -> None:
    env = Env(tmp_path)
    try:
        async def fn(c: Coordinator) -> list[str]:
            return [v["name"] for v in c.volume_list()]
        assert env.run(fn) == ["a", "b"]
        assert os.path.exists(os.path.join(env.path, "provider.sqlite"))
    finally:
        env.close()
