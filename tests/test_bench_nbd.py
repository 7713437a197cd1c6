"""`python -m tools.bench.nbd` (our NBD port against qemu-nbd): the report's structure,
never its speeds. The kernel test runs the real thing at a tiny size (namespaces, both
servers, nbdcopy, nbdfuse, fio) and checks every figure is there and nothing is left;
the others need no kernel: ratios and verdicts, the table, qemu-nbd's flags, the
namespace pair's argument check."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import assert_usage_errors

from tools.bench import nbd as nbd_bench
from tools.bench.nbd_setup import missing_tools, qemu_nbd_argv
from tools.netns import Hosts, leftover_namespaces

REPO = Path(__file__).resolve().parent.parent


def _report(samples: dict[tuple[str, str, str], list[float]]) -> dict:
    args = argparse.Namespace(rounds=3, runtime=1.0)
    info = {"tls": {"multi_conn": {"spx": True, "qemu": True}, "clients_in": "client"}}
    return nbd_bench.build_report(samples, info, args, 64 << 20, ("tls",), "/tmp", 1.0)


def test_ratios_and_verdicts_are_ours_over_qemu_nbd() -> None:
    samples = {("tls", "nbdcopy", "spx"): [200.0, 210.0, 205.0],
               ("tls", "nbdcopy", "qemu"): [100.0, 101.0, 99.0],
               ("tls", "rand_read", "spx"): [900.0, 950.0, 920.0],
               ("tls", "rand_read", "qemu"): [1000.0, 1010.0, 990.0],
               ("tls", "seq_write", "spx"): [100.0, 300.0, 200.0],
               ("tls", "seq_write", "qemu"): [150.0, 250.0, 200.0]}
    r = _report(samples)
    t = {x["workload"]: x for x in r["targets"]}
    assert t["nbdcopy"]["value"] == pytest.approx(205 / 100) and \
        t["nbdcopy"]["verdict"] == "PASS"
    assert t["rand_read"]["verdict"] == "FAIL"
    assert t["seq_write"]["verdict"] == "noisy"   # pairings disagree, SPREAD 100 %
    assert len(r["results"]) == 6 and "--shared=8" in r["qemu_nbd"]
    table = nbd_bench.format_table(r)
    assert "PASS (x2.05)" in table and "FAIL (x0.92)" in table and "noisy" in table
    json.dumps(r)


def test_a_missing_row_is_n_a() -> None:
    r = _report({("tls", "nbdcopy", "spx"): [1.0]})
    assert {x["verdict"] for x in r["targets"]} == {"n/a"}
    assert "n/a" in nbd_bench.format_table(r)


def test_qemu_nbd_runs_as_the_docs_say() -> None:
    argv = qemu_nbd_argv("10.0.0.1", 10810, "snap", "/x/snap.raw", True, "/x/pki")
    for flag in ("--cache=writeback", "--shared=8", "--persistent", "--read-only",
                 "--tls-creds=tls0", "--format=raw"):
        assert flag in argv
    assert any("endpoint=server,dir=/x/pki" in a for a in argv)
    assert argv[-1] == "/x/snap.raw"
    plain = qemu_nbd_argv("127.0.0.1", 10811, "w", "/x/w.raw", False, None)
    assert "--read-only" not in plain and not any("tls" in a for a in plain)
    docs = (REPO / "docs" / "performance.md").read_text()
    assert "--cache=writeback" in docs and "--shared=8" in docs


def test_a_direct_pair_joins_exactly_two_hosts() -> None:
    with pytest.raises(ValueError):
        Hosts(("a", "b", "c"), switch=False)
    h = Hosts(("server", "client"), prefix="spxb-", switch=False)
    assert all(n.startswith("spxb-") for n in h.ns.values())


def test_bad_arguments_are_one_line_usage_errors() -> None:
    assert_usage_errors("tools.bench.nbd",
                        ["--size", "lots"], ["--size", "8M"], ["--rounds", "0"])


@pytest.mark.kernel
def test_a_tiny_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    before = set(leftover_namespaces("spxb-"))
    res = subprocess.run(
        [sys.executable, "-m", "tools.bench.nbd", "--size", "16M", "--rounds", "1",
         "--runtime", "0.5", "--json", "-q", "--dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["modes"] == ["tls", "plain"] and len(r["results"]) == 12
    assert all(x["median"] and x["median"] > 0 for x in r["results"]), r["results"]
    assert {x["verdict"] for x in r["targets"]} <= {"PASS", "FAIL", "noisy"}
    assert os.listdir(tmp_path) == []   # the work directory is gone
    assert set(leftover_namespaces("spxb-")) <= before
