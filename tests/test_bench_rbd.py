"""`python -m tools.bench.rbd` (our FUSE mount over RBD against rbd-fuse): the report's
structure, never its speeds. The kernel test runs the real thing at a tiny size (its
own cluster, our daemon, rbd-fuse, fio, commits, revert and split, rbd bench, the
profile when py-spy is there) and checks every figure is there and nothing is left; the
others need no cluster: ratios and verdicts, the table, rbd bench's summary line, the
profile's categories, argument checks."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import assert_usage_errors

from tools.bench import rbd as rbd_bench
from tools.bench.common import BenchError
from tools.bench.rbd_control import classify
from tools.bench.rbd_setup import missing_tools, parse_rbd_bench

REPO = Path(__file__).resolve().parent.parent


def _report(samples: dict[tuple[str, str, str], list[float]]) -> dict:
    args = argparse.Namespace(rounds=3, runtime=1.0, commits=2, small="1G", big="64G",
                              allocated="64M")
    refs = {"rbd_bench": {"seq_write": 100.0, "seq_read": 200.0, "rand_read": 3000.0},
            "python_binding": {"iops": 2500.0, "p50_us": 380.0},
            "profile": {"samples": 10, "shares": {"librbd + librados (native)": 0.5}}}
    return rbd_bench.build_report(samples, refs, args, 64 << 20, "/tmp", 1.0)


def test_ratios_and_verdicts_are_ours_over_rbd_fuse() -> None:
    samples = {("seq_write", "spx", "value"): [90.0, 95.0, 92.0],
               ("seq_write", "rbd_fuse", "value"): [100.0, 101.0, 99.0],
               ("seq_read", "spx", "value"): [50.0, 52.0, 51.0],
               ("seq_read", "rbd_fuse", "value"): [100.0, 100.0, 100.0],
               ("rand_read", "spx", "value"): [900.0, 1500.0, 1200.0],
               ("rand_read", "rbd_fuse", "value"): [1000.0, 1400.0, 1150.0],
               ("commit", "spx", "value"): [120.0, 130.0, 400.0],
               ("revert", "small", "value"): [1.0, 1.1, 0.9],
               ("revert", "big", "value"): [1.05, 1.1, 1.0],
               ("split", "small", "value"): [1.0, 1.0, 1.0],
               ("split", "big", "value"): [3.0, 3.1, 2.9]}
    r = _report(samples)
    t = {x["id"]: x for x in r["targets"]}
    assert t["seq_write"]["value"] == pytest.approx(92 / 100)
    assert t["seq_write"]["verdict"] == "PASS"       # >= 0.8x
    assert t["seq_read"]["verdict"] == "FAIL"
    assert t["rand_read"]["verdict"] == "noisy"      # pairings disagree, SPREAD > 25 %
    assert t["commit"]["value"] == 130.0 and t["commit"]["verdict"] == "PASS"
    assert t["revert_flat"]["verdict"] == "PASS" and t["split_flat"]["verdict"] == "FAIL"
    table = rbd_bench.format_table(r)
    for text in ("PASS (x0.92)", "FAIL (x0.51)", "noisy", "<= 250 ms: PASS",
                 "split with 64M allocated", "librbd + librados (native) 50%"):
        assert text in table, (text, table)
    json.dumps(r)


def test_a_missing_row_is_n_a() -> None:
    r = _report({("seq_write", "spx", "value"): [1.0]})
    assert {x["verdict"] for x in r["targets"]} == {"n/a"}
    assert "n/a" in rbd_bench.format_table(r)


def test_rbd_bench_summary_line() -> None:
    out = ("bench  type read io_size 4096 io_threads 1 bytes 4194304 pattern random\n"
           "  SEC       OPS   OPS/SEC   BYTES/SEC\n"
           "    1       812    815.2   3.2 MiB/s\n"
           "elapsed: 1   ops: 1024   ops/sec: 812.36   bytes/sec: 3.2 MiB/s\n")
    assert parse_rbd_bench(out, 4096) == pytest.approx(812.36)
    assert parse_rbd_bench(out.replace("812.36", "100"), 1 << 20) == pytest.approx(100.0)
    with pytest.raises(BenchError):
        parse_rbd_bench("nothing", 4096)


def test_profile_samples_go_to_their_innermost_known_layer() -> None:
    stack = ("process 1:\"python\";thread (0x1);run (trio/_core/_run.py:2000);"
             "read (fuse_mount/operations.py:409);run_sync (trio/_threads.py:300);"
             "read (rbdarray/datapath.py:78);rbd_read (librbd.so.1)")
    assert classify(stack) == "librbd + librados (native)"
    assert classify(stack.rsplit(";", 1)[0]) == "RbdArray (rbdarray/)"
    assert classify("thread (0x1);epoll_wait (libc.so.6)") == "other (interpreter, libc)"


def test_bad_arguments_are_one_line_usage_errors() -> None:
    assert_usage_errors("tools.bench.rbd",
                        ["--size", "lots"], ["--rounds", "0"], ["--commits", "0"],
                        ["--small", "2G", "--big", "1G"], ["--allocated", "3k"],
                        ["--only", "rand_read,nope"], ["--only", ","])


@pytest.mark.kernel
def test_a_tiny_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    missing = missing_tools()
    if missing:
        if os.environ.get("SHADOWPLEX_REQUIRE_KERNEL") == "1":
            pytest.fail(f"not installed: {', '.join(missing)} (make ceph)")
        pytest.skip(f"not installed: {', '.join(missing)}")
    before = set(os.listdir("/tmp"))
    res = subprocess.run(
        [sys.executable, "-m", "tools.bench.rbd", "--size", "16M", "--rounds", "1",
         "--runtime", "0.5", "--commits", "2", "--small", "16M", "--big", "512M",
         "--allocated", "4M", "--json", "-q", "--dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert len(r["results"]) == 6
    assert all(x["median"] and x["median"] > 0 for x in r["results"]), r["results"]
    assert {x["verdict"] for x in r["targets"]} <= {"PASS", "FAIL", "noisy"}
    assert len(r["targets"]) == 6 and r["commit"]["sets"] == 2
    assert all(r["costs"][op][k] > 0 for op in ("revert", "split")
               for k in ("small_s", "big_s"))
    refs = r["references"]
    assert all(v > 0 for v in refs["rbd_bench"].values()) and refs["python_binding"]["iops"]
    if refs.get("profile") is not None:
        assert refs["profile"]["samples"] > 0
        assert sum(refs["profile"]["shares"].values()) == pytest.approx(1.0)
    assert os.listdir(tmp_path) == []   # the work directory is gone
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("spxb-ceph-")]
