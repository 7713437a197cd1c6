"""The checks that keep the code as DESIGN.md wants it, run with the tests (issue 13 #8):
ruff (the rules in pyproject.toml) over the tree and mypy over every package
(blockstore, provider, fuse_mount, nbd, tools: the `files` in pyproject.toml). Each takes
seconds; a finding fails with the tool's own lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / tool
    if not exe.exists():
        pytest.skip(f"{tool} is not installed in this environment (make setup installs it)")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def test_ruff() -> None:
    res = _run("ruff", "check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


def test_mypy() -> None:
    res = _run("mypy", "--cache-dir", "/dev/null")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
