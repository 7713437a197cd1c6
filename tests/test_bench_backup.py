"""`python -m tools.bench.backup` (issue 17's performance section): the report's structure
and verdicts, never its speeds. The kernel tests run the real thing at a tiny size (pool,
daemon with an NBD port, backups through qemu-nbd, cp, nbdcopy, qemu-img) and check that
every figure is there and nothing is left -- also after a SIGTERM in the middle of a
backup (its qemu-nbd included); the others need no kernel: scatter, ratios and
verdicts, the table, the argument checks."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import assert_usage_errors
from test_bench import _mounts_under, _processes_naming, force_clean

from tools.bench import backup as backup_bench
from tools.bench.common import BenchError

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SIZES = {"size": 64 * MiB, "allocated": 8 * MiB, "changed": 4 * MiB,
         "changed_bytes": 5 * MiB, "extents": 9}
TINY = ["--size", "64M", "--allocated", "8M", "--changed", "4M", "--rounds", "1",
        "--calls", "2"]


def _report(samples: dict[tuple[str, str, str], list[float]]) -> dict:
    args = argparse.Namespace(rounds=3, calls=2)
    return backup_bench.build_report(samples, args, dict(SIZES), "/tmp", 1.0)


def _by_id(r: dict) -> dict[str, dict]:
    return {t["id"]: t for t in r["targets"]}


def test_scatter_places_exact_aligned_pieces_apart() -> None:
    for size, total, lo, hi, align in ((64 * MiB, 4 * MiB, 64 << 10, MiB, 4096),
                                      (4 << 30, 128 * MiB, 4 * MiB, 32 * MiB, MiB)):
        pieces = backup_bench.scatter(random.Random(1), size, total, lo, hi, align)
        assert sum(n for _, n in pieces) == total
        assert all(o % align == 0 and n % align == 0 and n <= hi for o, n in pieces)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(pieces, pieces[1:]))
        assert pieces[-1][0] + pieces[-1][1] <= size
        assert pieces == backup_bench.scatter(random.Random(1), size, total, lo, hi, align)
    with pytest.raises(BenchError):
        backup_bench.scatter(random.Random(1), 4 * MiB, 4 * MiB, MiB, 2 * MiB, MiB)


def test_ratios_and_verdicts_follow_the_issue() -> None:
    samples = {("diff", "client", "ms"): [3.0, 4.0, 5.0],
               ("diff", "installed", "ms"): [300.0, 310.0, 320.0],
               ("diff", "cli", "ms"): [310.0, 320.0, 330.0],
               ("diff", "floor", "ms"): [290.0, 300.0, 310.0],
               ("incr_qcow2", "ours", "written"): [5.2 * MiB] * 3,
               ("incr_qcow2", "ours", "s"): [1.1, 1.0, 1.05],
               ("incr_qcow2", "cp", "s"): [1.0, 1.0, 1.0],
               ("incr_qcow2", "nbdcopy", "s"): [0.5, 1.5, 1.0],
               ("incr_qcow2", "ours", "copy_s"): [0.9, 0.9, 0.9],
               ("incr_raw", "ours", "written"): [13 * MiB] * 3,
               ("full_qcow2", "ours", "json_read"): [8 * MiB] * 3,
               ("full_qcow2", "ours", "read"): [9 * MiB] * 3,
               ("full_qcow2", "ours", "s"): [2.0] * 3,
               ("full_qcow2", "qemu-img", "s"): [1.0] * 3}
    r = _report(samples)
    t = _by_id(r)
    assert t["diff_client"]["value"] == pytest.approx(4.0) and \
        t["diff_client"]["verdict"] == "PASS" and t["diff_client"]["p90"] == 5.0
    assert t["diff_cli"]["verdict"] == "FAIL" and t["cli_floor"]["verdict"] == "-"
    assert t["diff_cli"]["value"] == pytest.approx(310.0) and t["diff_dev"]["verdict"] == "-"
    # storage writes against the diff's changed bytes (not the bytes written since S0)
    assert t["incr_qcow2_bytes"]["value"] == pytest.approx(5.2 / 5) and \
        t["incr_qcow2_bytes"]["verdict"] == "PASS"
    assert t["incr_raw_bytes"]["verdict"] == "FAIL"
    assert t["incr_qcow2_vs_cp"]["value"] == pytest.approx(1.05) and \
        t["incr_qcow2_vs_cp"]["verdict"] == "PASS"
    assert t["incr_qcow2_vs_nbdcopy"]["verdict"] == "noisy"   # 0.70..2.10, SPREAD 100 %
    assert t["incr_qcow2_copy"]["verdict"] == "-"
    assert t["full_qcow2_read"]["verdict"] == "PASS"            # exactly the allocated
    assert t["full_qcow2_storage"]["verdict"] == "FAIL"         # 9/8 > 1.1
    assert t["full_qcow2_vs_qemu_img"]["value"] == pytest.approx(2.0) and \
        t["full_qcow2_vs_qemu_img"]["verdict"] == "-"
    for missing in ("incr_raw_vs_cp", "full_raw_read", "full_raw_vs_qemu_img"):
        assert t[missing]["value"] is None
    assert t["incr_raw_vs_cp"]["verdict"] == "n/a"
    table = backup_bench.format_table(r)
    for text in ("PASS (4.0 ms)", "FAIL (310.0 ms)", "PASS (x1.05)", "noisy (x1.05, ",
                 "changed_bytes", "qemu-img", "5.0 MiB changed in 9 extents"):
        assert text in table, text
    json.dumps(r)


def test_bad_arguments_are_one_line_usage_errors() -> None:
    assert_usage_errors("tools.bench.backup",
                        ["--size", "lots"], ["--changed", "1G", "--size", "4G"],
                        ["--allocated", "1T", "--quick"], ["--calls", "0"], ["--rounds", "0"],
                        ["--changed", "1.5M"])


def _skip_without_tools() -> None:
    missing = [t for t in backup_bench.TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.mark.kernel
def test_a_tiny_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    _skip_without_tools()
    res = subprocess.run(
        [sys.executable, "-m", "tools.bench.backup", *TINY, "--json", "-q", "--dir",
         str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["sizes"]["changed_bytes"] >= 4 * MiB and r["sizes"]["extents"] > 0
    t = _by_id(r)
    assert set(t) == set(backup_bench.SPECS)
    have_nbdcopy = shutil.which("nbdcopy") is not None
    for tid, x in t.items():
        if "nbdcopy" in tid and not have_nbdcopy:
            assert x["verdict"] == "n/a"
            continue
        assert x["value"] and x["value"] > 0, x
        assert x["verdict"] in ({"-"} if x["op"] is None else {"PASS", "FAIL", "noisy"})
    # a full backup reads exactly the allocated chunks; the diff is a fast call
    assert t["full_qcow2_read"]["value"] == pytest.approx(1.0)
    assert t["full_raw_read"]["verdict"] == "PASS"
    assert t["diff_client"]["verdict"] == "PASS"
    assert os.listdir(tmp_path) == []   # the work directory is gone
    assert not _processes_naming(str(tmp_path))


@pytest.mark.kernel
def test_sigterm_during_a_backup_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM while a round runs (a backup, its qemu-nbd, cp or qemu-img at work): exit
    143 with one line saying the work directory was removed, and it was: nothing in
    --dir, no mount below it, no process naming it (qemu-nbd has the .part file open),
    no qemu-nbd socket directory left in $TMPDIR (the backup got SIGINT, as from Ctrl-C,
    and cleaned up itself)."""
    _skip_without_tools()
    work = Path(tempfile.mkdtemp(prefix="spxb-"))
    sockets_before = set(Path(tempfile.gettempdir()).glob("shadowplex-backup-*"))
    err_path = tmp_path / "bench.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.backup", *TINY, "--rounds", "3", "--dir",
             str(work)], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
            stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
    at = random.Random().uniform(0.2, 2.0)
    try:
        deadline = time.monotonic() + 120
        while "round 1/3" not in err_path.read_text() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(at)
        assert proc.poll() is None, err_path.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        text = err_path.read_text()
        assert proc.returncode == 128 + signal.SIGTERM, (at, text[-2000:])
        assert text.splitlines()[-1].startswith("bench backup: terminated by SIGTERM; "
                                                "work directory "), text[-500:]
        assert os.listdir(work) == [], (at, os.listdir(work))
        assert not _mounts_under(str(work)) and not _processes_naming(str(work)), at
        # a qcow2 backup's qemu-nbd socket directory went with it
        assert set(Path(tempfile.gettempdir()).glob("shadowplex-backup-*")) <= sockets_before
    finally:
        force_clean(proc, work)


@pytest.mark.kernel
def test_diff_only_measures_the_diff_alone(tmp_path: Path) -> None:
    """--diff-only: the diff's rows (Client call, CLI, floors), no backup's."""
    _skip_without_tools()
    res = subprocess.run(
        [sys.executable, "-m", "tools.bench.backup", *TINY, "--diff-only", "--json", "-q",
         "--dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert {x["case"] for x in r["results"]} == {"diff"}
    t = _by_id(r)
    assert all(t[k]["ours"] > 0 for k in ("diff_client", "diff_cli", "diff_dev", "cli_floor",
                                            "python_floor"))
    assert t["full_raw_read"]["verdict"] == "n/a" and t["incr_qcow2_bytes"]["ours"] is None
    assert os.listdir(tmp_path) == []
