"""`python -m tools.bench.hosts` (issue 16: a host daemon against the array's own): the
report's structure, never its speeds. The kernel test runs the real thing at a tiny size
(namespaces, the array and host daemons, set creations, fio through both mounts) and
checks every figure is there and nothing is left; the others need no kernel: ratios,
verdicts, latency columns, the table, argument errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import assert_usage_errors

from fuse_mount import loopdev
from tools.bench import hosts as hosts_bench
from tools.netns import leftover_namespaces

REPO = Path(__file__).resolve().parent.parent


def _report(samples: hosts_bench.Samples) -> dict:
    args = argparse.Namespace(rounds=3, runtime=1.0, creations=4)
    return hosts_bench.build_report(samples, args, 64 << 20, "/tmp", 1.0)


def _fio(row: str, side: str, values: list[float]) -> hosts_bench.Samples:
    return {(row, side, "value"): values, (row, side, "p50"): [100.0, 120.0, 110.0],
            (row, side, "p99"): [900.0, 1000.0, 950.0]}


def test_ratios_are_host_over_array_and_judged_against_the_bars() -> None:
    samples: hosts_bench.Samples = {
        ("create", "host", "value"): [12.0, 13.0, 12.5],
        ("create", "host", "all"): [float(x) for x in range(10, 22)],
        ("create", "array", "value"): [10.0, 10.5, 10.2],
        ("create", "array", "all"): [10.0] * 11 + [30.0],
        **_fio("seq_read", "host", [300.0, 310.0, 305.0]),
        **_fio("seq_read", "array", [400.0, 410.0, 405.0]),
        **_fio("seq_write", "host", [100.0, 105.0, 102.0]),
        **_fio("seq_write", "array", [400.0, 405.0, 410.0]),
        **_fio("rand_read", "host", [100.0, 600.0, 300.0]),
        **_fio("rand_read", "array", [500.0, 600.0, 550.0])}
    r = _report(samples)
    t = {x["row"]: x for x in r["ratios"]}
    assert t["create"]["value"] == pytest.approx(12.5 / 10.2)
    assert t["create"]["verdict"] == "PASS"        # <= 2.0x
    assert t["seq_read"]["verdict"] == "PASS"      # 0.75x >= 0.5x
    assert t["seq_write"]["verdict"] == "FAIL"     # 0.25x
    assert t["rand_read"]["verdict"] == "noisy"    # pairings 0.17-1.2, SPREAD 167 %
    res = {(x["row"], x["side"]): x for x in r["results"]}
    assert res[("create", "array")]["latency"] == {"p50": 10.0, "p90": 10.0}
    assert res[("create", "host")]["latency"]["p90"] == 20.0
    assert res[("seq_read", "host")]["latency"] == {"p50": 110.0, "p99": 950.0}
    table = hosts_bench.format_table(r)
    assert "PASS (x1.23)" in table and "FAIL (x0.25)" in table and "noisy" in table
    assert "110/950" in table and "15.5/20.0" in table   # fio p50/p99, creation p50/p90
    json.dumps(r)


def test_a_missing_side_is_n_a() -> None:
    r = _report({("create", "host", "value"): [1.0], ("create", "host", "all"): [1.0]})
    assert {x["verdict"] for x in r["ratios"]} == {"n/a"}
    assert "n/a" in hosts_bench.format_table(r)


def test_bad_arguments_are_one_line_usage_errors() -> None:
    assert_usage_errors("tools.bench.hosts",
                        ["--size", "lots"], ["--size", "8M"], ["--rounds", "0"],
                        ["--creations", "0"])


def _our_processes(tmp_path: Path) -> list[str]:
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(tmp_path).encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.kernel
def test_a_tiny_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    missing = hosts_bench.missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    before = set(leftover_namespaces("spxb-"))
    res = subprocess.run(
        [sys.executable, "-m", "tools.bench.hosts", "--size", "16M", "--rounds", "1",
         "--runtime", "0.5", "--creations", "2", "--json", "-q", "--dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert len(r["results"]) == 8 and len(r["ratios"]) == 4
    assert all(x["median"] and x["median"] > 0 for x in r["results"]), r["results"]
    assert all(v and v > 0 for x in r["results"] for v in x["latency"].values())
    assert {x["verdict"] for x in r["ratios"]} <= {"PASS", "FAIL", "noisy"}
    assert os.listdir(tmp_path) == []   # the work directory is gone
    assert set(leftover_namespaces("spxb-")) <= before
    assert not [mp for mp, _, _ in loopdev.mountinfo() if mp.startswith(str(tmp_path))]
    assert _our_processes(tmp_path) == []
