"""A/B of the copy-before-write data path between two code trees (issue 14): the same
workloads through two `shadowplex serve` daemons, one per tree, on pools side by side on
one loop-mounted file system per type, alternating the trees' order every round.

    python -m tools.bench.cow_ab --tree A=/path/to/old --tree B=/path/to/new \\
        --pool-fs xfs,btrfs,ext4 --rounds 5 [--size 1G] [--json out.json]

Per file system and round, each tree in turn (order rotated), every job "O_DIRECT, cold"
(the bench's caching: the target fsync'ed, every pool file of both trees written back
and evicted first; tools/bench/caches.py), fio psync QD1 (tools/fio):
    seq0        seq write 1M, one pass over the volume, no snapshot
    seq1, seq8  the same as the first writes after 1 / 8 differential snapshots
    rand1       4K first writes after 1 snapshot (one per 64 KiB chunk, random order,
                at most --runtime)
    rand0       the same 4 KiB writes with no snapshot
The snapshots are deleted after each job. The daemon of each tree runs from that tree
(cwd and PYTHONPATH); the pools, fio and this script come from the tree it runs in.

Output: per file system, workload and tree the median, the spread ((max - min) /
median), the medians of the runs' p50 and p99 completion latencies, and the ratios
seq1/seq0, seq8/seq1, rand1/rand0 per tree and B/A per workload (each a median of the
per-round ratios, so both sides of a ratio ran in the same round)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, NoReturn

from . import caches
from .common import MiB, _fill, _fuse_unmount, _mounted, _stop_proc, _wait
from .poolfs import loop_fs, missing
from .workloads import Job, first_write_offsets, run_fio

WORKLOADS = ("seq0", "seq1", "seq8", "rand0", "rand1")


class TreeDaemon:
    """`serve` of one code tree on a pool of its own."""

    def __init__(self, name: str, tree: str, root: str, sock_dir: str) -> None:
        self.name, self.tree = name, tree
        self.pool = os.path.join(root, f"pool-{name}")
        self.mnt = os.path.join(root, f"mnt-{name}")
        self.sock = os.path.join(sock_dir, f"{name}.sock")
        self.log = os.path.join(sock_dir, f"serve-{name}.log")
        self.env = dict(os.environ, PYTHONPATH=tree, SHADOWPLEX_SOCKET=self.sock)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        subprocess.run([sys.executable, "-c", "import sys; from blockstore import Pool; "
                        "Pool.create(sys.argv[1]).close()", self.pool],
                       cwd=self.tree, env=self.env, check=True)
        os.makedirs(self.mnt)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "serve", "--socket", self.sock,
                 "--pool", self.pool, "--mount", self.mnt],
                cwd=self.tree, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        _wait(lambda: os.path.exists(self.sock) and os.path.ismount(self.mnt), 60,
              f"serve of {self.name}", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_proc(self.proc)
        if _mounted(self.mnt):
            _fuse_unmount(self.mnt)
        with contextlib.suppress(OSError):
            os.rmdir(self.mnt)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_fs(fs: str, trees: list[tuple[str, str]], size: int, rounds: int, runtime: float,
           workloads: list[str], base: str, say: Any) -> dict[str, Any]:
    from provider.client import Client
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as st:
        root = st.enter_context(loop_fs(base, fs, max(2 * MiB * 1024, 5 * size), say))
        daemons = [TreeDaemon(n, t, root, base) for n, t in trees]
        for d in daemons:
            st.callback(d.stop)
            d.start()
        clients = {d.name: st.enter_context(Client(d.sock, client="cow-ab")) for d in daemons}
        paths = {}
        for d in daemons:
            clients[d.name].volume_create("v", size)
            paths[d.name] = os.path.join(d.mnt, "volumes", "v.img")
            _fill(paths[d.name], size)
        backing = [d.pool for d in daemons]
        offs = first_write_offsets(size, seed=7)
        res: dict[tuple[str, str], list[dict[str, float]]] = {}
        for r in range(rounds):
            order = daemons[r % len(daemons):] + daemons[:r % len(daemons)]
            for w in workloads:
                for d in order:
                    nsnap = {"seq0": 0, "rand0": 0, "seq1": 1, "rand1": 1, "seq8": 8}[w]
                    c, path = clients[d.name], paths[d.name]
                    sets = [c.snapshot_create(["v"], context="app-rollback",
                                              attributes=["DIFFERENTIAL"])["set_id"]
                            for _ in range(nsnap)]
                    try:
                        caches.settle(path, backing, evict=True)
                        if w.startswith("seq"):
                            job = Job("seq_write", path, size, runtime, time_based=False)
                        else:
                            job = Job("rand_write", path, size, runtime, time_based=False,
                                      replay=offs, replay_log=os.path.join(base, "w.iolog"))
                        j = run_fio(job, base)
                    finally:
                        for s in sets:
                            c.snapshot_delete(set_id=s)
                    row = {"value": j.value, "p50": j.p50_us, "p99": j.p99_us}
                    res.setdefault((w, d.name), []).append(row)
                    say(f"{fs} round {r + 1}/{rounds} {w:5} {d.name}: {j.value:9.1f} "
                        f"p50 {j.p50_us:8.0f} us p99 {j.p99_us:9.0f} us")
        for (w, name), rows in res.items():
            vals = [x["value"] for x in rows]
            med = _median(vals)
            out[f"{w}.{name}"] = {
                "median": med, "spread": (max(vals) - min(vals)) / med if med else 0.0,
                "p50_us": _median([x["p50"] for x in rows]),
                "p99_us": _median([x["p99"] for x in rows]), "runs": vals}
        names = [n for n, _ in trees]
        pairs = [("seq1", "seq0"), ("seq8", "seq1"), ("rand1", "rand0")]
        for num, den in pairs:
            for n in names:
                if (num, n) in res and (den, n) in res:
                    rat = [a["value"] / b["value"] for a, b in zip(res[num, n], res[den, n])]
                    out[f"{num}/{den}.{n}"] = {"median": _median(rat),
                                               "min": min(rat), "max": max(rat)}
        for w in workloads:
            for n in names[1:]:
                rat = [b["value"] / a["value"]
                       for a, b in zip(res[w, names[0]], res[w, n])]
                out[f"{w}.{n}/{names[0]}"] = {"median": _median(rat),
                                              "min": min(rat), "max": max(rat)}
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, exit 2, nothing done
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m tools.bench.cow_ab", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                    help="a code tree to run serve from (two or more; the first is A)")
    ap.add_argument("--pool-fs", default="xfs", help="comma-separated: ext4,xfs,btrfs")
    ap.add_argument("--size", default="1024", help="volume size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=float, default=5.0, help="cap per job, seconds")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dir", default="/tmp",
                    help="where the work directory goes (removed at the end)")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.runtime <= 0 or not a.size.isdigit() or int(a.size) < 16:
        ap.error("--rounds >= 1, --runtime > 0 and --size >= 16 (MiB) please")
    trees = []
    for t in a.tree:
        name, sep, path = t.partition("=")
        if not sep or not os.path.isdir(os.path.join(path, "blockstore")):
            ap.error(f"--tree {t}: expected NAME=PATH of a shadowplex checkout")
        trees.append((name, os.path.abspath(path)))
    workloads = a.workloads.split(",")
    if bad := [w for w in workloads if w not in WORKLOADS]:
        ap.error(f"unknown workload {bad[0]} (one of {', '.join(WORKLOADS)})")
    for fs in a.pool_fs.split(","):
        if fs not in ("ext4", "xfs", "btrfs"):
            ap.error(f"--pool-fs {fs}: not one of ext4, xfs, btrfs")
        if why := missing(fs):
            ap.error(f"--pool-fs {fs}: {why}")

    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {"trees": dict(trees), "rounds": a.rounds,
                               "size_MiB": int(a.size), "load_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="spx-cowab-", dir=a.dir) as base:
        for fs in a.pool_fs.split(","):
            results[fs] = run_fs(fs, trees, int(a.size) * MiB, a.rounds, a.runtime,
                                 workloads, base, say)
            for k, v in results[fs].items():
                if "runs" in v:
                    print(f"{fs:5} {k:14} median {v['median']:9.1f} spread "
                          f"{v['spread']:5.0%} p50 {v['p50_us']:8.0f} us p99 "
                          f"{v['p99_us']:9.0f} us")
                else:
                    print(f"{fs:5} {k:22} x{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})")
            sys.stdout.flush()
    results["load_end"] = os.getloadavg()[0]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
