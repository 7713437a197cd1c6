"""`python -m tools.bench.cow_ab` (the A/B of issue 14's copy-before-write stall): a tiny
run with this tree on both sides reports every figure and leaves nothing behind; bad
arguments are one-line usage errors. Its speeds are never checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import _mounts_under, _processes_naming

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.bench.cow_ab", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)


def test_bad_arguments_are_one_line_usage_errors(tmp_path: Path) -> None:
    for args in (["--tree", f"A={tmp_path}"], ["--tree", "nonsense"],
                 ["--tree", f"A={REPO}", "--pool-fs", "zfs"],
                 ["--tree", f"A={REPO}", "--workloads", "seq3"],
                 ["--tree", f"A={REPO}", "--rounds", "0"]):
        res = _run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


@pytest.mark.kernel
def test_a_tiny_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    if shutil.which("fio") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs fio and mkfs.ext4")
    out = tmp_path / "ab.json"
    work = tmp_path / "work"
    work.mkdir()
    res = _run("--tree", f"A={REPO}", "--tree", f"B={REPO}", "--pool-fs", "ext4",
               "--rounds", "1", "--size", "32", "--runtime", "1",
               "--workloads", "seq0,seq1,rand1", "--json", str(out), "--dir", str(work),
               timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())["ext4"]
    for w in ("seq0", "seq1", "rand1"):
        for t in ("A", "B"):
            assert r[f"{w}.{t}"]["median"] > 0 and r[f"{w}.{t}"]["p99_us"] > 0
        assert r[f"{w}.B/A"]["median"] > 0
    assert r["seq1/seq0.A"]["median"] > 0
    assert os.listdir(work) == []
    assert not _mounts_under(str(work)) and not _processes_naming(str(work))
