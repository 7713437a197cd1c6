"""Our FUSE mount over Ceph RBD against ceph's own rbd-fuse on the same one-node cluster
(issue 18's performance section), in one run: data path, snapshot commit of a set,
revert and split cost against volume size, and where the time goes.

    python -m tools.bench.rbd [--size 256M] [--rounds 5] [--runtime 5] [--commits 10]
                              [--small 1G] [--big 64G] [--allocated 64M] [--no-profile]
                              [--only PARTS] [--json] [--dir DIR] [--keep] [-q]

What one run does (in a temporary directory under --dir, removed at the end, also after
Ctrl-C / SIGTERM / SIGHUP -- exit 128+N -- and after a failure except its *.log files):

1. A one-node cluster (tests/ceph_cluster.py: 1 monitor, 1 memstore OSD sized for this
   run, paxos propose interval 0.1, auth none) in a directory under /tmp; `shadowplex
   serve --array rbd:rbd` with its mount; volume v (--size) through it; image r, the
   same kind (64 KiB objects, layering, exclusive-lock, object-map, fast-diff,
   deep-flatten) made with librbd, served by `rbd-fuse -r r`. Both filled with random
   data through their own mounts. Both daemons read one ceph.conf: the same librbd
   cache settings (Ceph's defaults).
2. --rounds rounds, ours and rbd-fuse alternating which goes first: fio (psync, QD1,
   O_DIRECT: no page cache on either side; tools/fio/*.fio) for --runtime s each:
     seq_write   seq write 1M            target ours >= 0.8x rbd-fuse
     seq_read    seq read 1M             target ours >= 0.8x rbd-fuse
     rand_read   4K random read          target ours >= 1.0x rbd-fuse
   and, once per round, --commits snapshot sets of four 64 MiB volumes (commit: the
   longest write a paced writer on each of the four saw during snapshot.create, the
   worst of the four; target <= 250 ms at paxos propose interval 0.1), and per volume
   of --small and --big (each with --allocated bytes written): a snapshot, the data
   rewritten, revert (timed), split of that snapshot into a new volume (timed); target:
   big / small <= 1.25 (cost follows the data, not the volume size).
3. References, not targets, once after the rounds: `rbd bench` (librbd in C, one
   thread, no FUSE) for the three workloads on image r; 4 KiB random reads through
   librbd's Python binding in this process; with py-spy (unless --no-profile), a
   sampling profile of our daemon under fio 4K random reads: the share of its CPU in
   librbd, the binding, RbdArray, the thread hand-off, our FUSE handlers, pyfuse3.
--only PARTS (comma-separated: seq_write, seq_read, rand_read, commit, revert_split,
references; default all of them) runs those parts alone -- e.g. `--only
rand_read,references` for the 4K read rows and where their time goes; the others are
n/a in the report.

4. Medians, SPREAD = (max - min) / median, ratios and verdicts (tools/bench/verdicts.py:
   PASS / FAIL / noisy), a table or --json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import sys
import time
from typing import Any

from .common import WORKLOADS, Log, MiB, _median, _p90
from .netbench import check_arguments, num, parser, pct, ratio, run, shown, table
from .netbench import versions as _versions
from .rbd_control import (
    SET_VOLUME_SIZE,
    SET_VOLUMES,
    Samples,
    commit_round,
    prepare_set,
    prepare_sizes,
    profile_daemon,
    python_reads,
    revert_split_round,
    thread_cpu,
)
from .rbd_setup import Setup, missing_tools
from .report import code_version, machine_info
from .verdicts import NOISY_SPREAD, spread, verdict
from .workloads import Job, run_fio

REPORT_VERSION = 1
FIO = ("seq_write", "seq_read", "rand_read")
TARGETS = {"spx": "shadowplex (FUSE over librbd)", "rbd_fuse": "rbd-fuse"}
# the targets: ours / rbd-fuse
FIO_TARGETS = {"seq_write": 0.8, "seq_read": 0.8, "rand_read": 1.0}
COMMIT_MS = 250.0          # the set's commit, as its writers see it (median)
FLAT = 1.25                # revert / split: big volume / small volume (medians)
SMALL, BIG = "small", "big"


PARTS = (*FIO, "commit", "revert_split", "references")


def measure_rounds(s: Setup, args: argparse.Namespace, samples: Samples, log: Log) -> None:
    def add(row: str, target: str, stat: str, value: float) -> None:
        samples.setdefault((row, target, stat), []).append(value)

    for r in range(args.rounds):
        order = ("spx", "rbd_fuse") if r % 2 == 0 else ("rbd_fuse", "spx")
        log(f"round {r + 1}/{args.rounds} ({' then '.join(order)})")
        for w in (w for w in FIO if w in args.parts):
            for t in order:
                res = run_fio(Job(w, s.paths[t], s.size, args.runtime, time_based=True,
                                  direct=True), s.base)
                add(w, t, "value", res.value)
                add(w, t, "p50", res.p50_us)
                add(w, t, "p99", res.p99_us)
        if "commit" in args.parts:
            log(f"round {r + 1}: {args.commits} commits of a {len(SET_VOLUMES)}-volume "
                "set")
            commit_round(s, args.commits, samples)
        if "revert_split" in args.parts:
            log(f"round {r + 1}: revert and split, {SMALL if r % 2 == 0 else BIG} first")
            revert_split_round(s, [SMALL, BIG] if r % 2 == 0 else [BIG, SMALL],
                               args.allocated_bytes, samples, log)


def references(s: Setup, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    log("references: rbd bench (librbd alone), librbd from Python")
    ops = int(args.runtime * 1500)
    out["rbd_bench"] = {w: s.rbd_bench(w, ops if w == "rand_read" else ops // 10)
                        for w in FIO}
    out["python_binding"] = python_reads(s, args.runtime)
    log("CPU per 4K read: our daemon, rbd-fuse")
    assert s.daemon is not None and s.rbd_fuse is not None
    out["cpu"] = {t: thread_cpu(pid, s.paths[t], s.size, args.runtime, s.base)
                  for t, pid in (("spx", s.daemon.pid), ("rbd_fuse", s.rbd_fuse.pid))}
    if not args.no_profile:
        log("profiling our daemon under 4K random reads (py-spy)")
        out["profile"] = profile_daemon(s, args.runtime, log)
    return out


def build_report(samples: Samples, refs: dict[str, Any], args: argparse.Namespace,
                 size: int, base: str, elapsed: float) -> dict[str, Any]:
    results, targets = [], []
    for w in FIO:
        label, unit = WORKLOADS[w][0], WORKLOADS[w][1]
        for t in TARGETS:
            xs = samples.get((w, t, "value"), [])
            results.append({"row": w, "target": t, "unit": unit, "samples": xs,
                            "median": _median(xs) if xs else None,
                            "spread": spread(xs) if xs else None,
                            "latency_us": {k: _median(v) if (v := samples.get((w, t, k)))
                                           else None for k in ("p50", "p99")}})
        targets.append({"id": w, "description": f"{label} QD1 O_DIRECT: ours >= "
                        f"{FIO_TARGETS[w]}x rbd-fuse",
                        **ratio(samples.get((w, "spx", "value"), []),
                                samples.get((w, "rbd_fuse", "value"), []), ">=",
                                FIO_TARGETS[w])})
    hold = samples.get(("commit", "spx", "value"), [])
    trip = samples.get(("commit", "spx", "round_trip"), [])
    hold_median = _median(hold) if hold else None
    commit: dict[str, Any] = {
        "sets": len(hold), "volumes": len(SET_VOLUMES), "hold_median_ms": hold_median,
        "hold_p90_ms": _p90(hold) if hold else None,
        "round_trip_median_ms": _median(trip) if trip else None, "samples_ms": hold}
    targets.append({"id": "commit", "description": f"commit of a {len(SET_VOLUMES)}-volume "
                    f"set (writers' hold, median) <= {COMMIT_MS:g} ms",
                    "value": hold_median, "range": None, "spread": None,
                    "verdict": verdict("<=", COMMIT_MS, hold_median)})
    costs: dict[str, Any] = {}
    for op in ("revert", "split"):
        a, b = samples.get((op, BIG, "value"), []), samples.get((op, SMALL, "value"), [])
        costs[op] = {"small_s": _median(b) if b else None, "big_s": _median(a) if a else None,
                     "small_samples": b, "big_samples": a}
        targets.append({"id": f"{op}_flat", "description": f"{op}: {args.big} volume / "
                        f"{args.small} volume, {args.allocated} allocated <= {FLAT}x",
                        **ratio(a, b, "<=", FLAT)})
    return {
        "version": REPORT_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed, "size_MiB": size / MiB, "rounds": args.rounds,
        "runtime_s": args.runtime, "commits_per_round": args.commits,
        "small": args.small, "big": args.big, "allocated": args.allocated,
        "set_volume_MiB": SET_VOLUME_SIZE / MiB,
        "machine": machine_info(base), "code": code_version(),
        "tools": _versions(("fio", "rbd", "rbd-fuse")),
        "labels": {"rows": {w: WORKLOADS[w][0] for w in FIO}, "targets": dict(TARGETS)},
        "results": results, "commit": commit, "costs": costs, "references": refs,
        "targets": targets}


def format_table(report: dict[str, Any]) -> str:
    head = ["MEASURE", "UNIT", "SHADOWPLEX", "SPREAD", "RBD-FUSE", "SPREAD", "RATIO",
            "P50 US (OURS/THEIRS)", "RBD BENCH", "TARGET"]
    by = {(r["row"], r["target"]): r for r in report["results"]}
    tg = {t["id"]: t for t in report["targets"]}
    bench = (report["references"] or {}).get("rbd_bench") or {}
    rows = []
    for w in FIO:
        a, b = by[(w, "spx")], by[(w, "rbd_fuse")]
        t = tg[w]
        lat = "/".join(num(x["latency_us"]["p50"]) for x in (a, b)) \
            if a["latency_us"]["p50"] is not None else "-"
        rows.append([WORKLOADS[w][0] + " QD1", a["unit"], num(a["median"]), pct(a),
                     num(b["median"]), pct(b),
                     "-" if t["value"] is None else f"{t['value']:.2f}x", lat,
                     num(bench.get(w)), f">= {FIO_TARGETS[w]}x: {shown(t)}"])
    c = report["commit"]
    rows.append([f"commit, {c['volumes']}-volume set (hold)", "ms", num(c["hold_median_ms"]),
                 "-", "-", "-", "-", "-", "-",
                 f"<= {COMMIT_MS:g} ms: {tg['commit']['verdict']}"])
    lines = table(head, rows, range(2, 9))
    m = report["machine"]
    lines.append(
        f"\n{report['size_MiB']:.0f} MiB images, {report['rounds']} rounds, fio "
        f"{report['runtime_s']:g} s, {report['commits_per_round']} commits per round, "
        f"nproc {m.get('nproc')}, load {m.get('loadavg_end')}. "
        f"MEDIAN of the rounds, SPREAD = (max - min) / median; noisy: the rounds' "
        f"pairings disagree and a SPREAD > {NOISY_SPREAD:.0%}. Commit round trip "
        f"{num(c['round_trip_median_ms'])} ms, hold p90 {num(c['hold_p90_ms'])} ms.")
    for op in ("revert", "split"):
        k = report["costs"][op]
        t = tg[f"{op}_flat"]
        lines.append(f"{op} with {report['allocated']} allocated: {report['small']} volume "
                     f"{_secs(k['small_s'])}, {report['big']} volume {_secs(k['big_s'])}: "
                     f"big / small <= {FLAT}x: {shown(t)}")
    refs = report["references"] or {}
    py = refs.get("python_binding")
    if py:
        lines.append(f"librbd from Python (no FUSE): 4K randread {num(py['iops'])} IOPS, "
                     f"p50 {num(py['p50_us'])} us; rbd bench (C, no FUSE): "
                     + ", ".join(f"{WORKLOADS[w][0]} {num(v)} {WORKLOADS[w][1]}"
                                 for w, v in bench.items()))
    for t, cpu in (refs.get("cpu") or {}).items():
        lines.append(f"CPU per 4K read, {TARGETS[t]}: {cpu['cpu_us_per_request']:.0f} us "
                     f"({cpu['process']} threads {cpu['own_threads_us']:.0f}, Ceph's threads "
                     f"{cpu['ceph_threads_us']:.0f}) at {num(cpu['iops'])} IOPS, p50 "
                     f"{num(cpu['p50_us'])} us")
    prof = refs.get("profile")
    if prof:
        lines.append(f"our daemon's CPU under 4K randread ({prof['samples']} samples): "
                     + ", ".join(f"{k} {v:.0%}" for k, v in prof["shares"].items()))
    return "\n".join(lines)


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("tools.bench.rbd", __doc__)
    for a in p._actions:    # smaller than the other benches: memstore holds it all in RAM
        if a.dest == "size":
            a.default, a.help = "256M", "image size (default 256M)"
    p.add_argument("--commits", type=int, default=10, metavar="N",
                   help="set commits per round (default 10)")
    p.add_argument("--small", default="1G", help="the small volume of revert/split (1G)")
    p.add_argument("--big", default="64G", help="the big volume of revert/split (64G)")
    p.add_argument("--allocated", default="64M",
                   help="data written to each of them (default 64M)")
    p.add_argument("--no-profile", action="store_true", help="no py-spy profile")
    p.add_argument("--only", metavar="PARTS", default=",".join(PARTS),
                   help="comma-separated parts to run: " + ", ".join(PARTS) +
                   " (default all)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    return args


def _sizes(args: argparse.Namespace) -> tuple[int, int, int] | None:
    from blockstore.errors import InvalidSize
    from blockstore.names import parse_size
    try:
        small, big, alloc = (parse_size(x) for x in (args.small, args.big, args.allocated))
    except InvalidSize as e:
        print(f"bench rbd: error: {e}", file=sys.stderr)
        return None
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        print(f"bench rbd: error: --only: unknown part {bad[0] if bad else '(none)'!r}; "
              f"choose from {', '.join(PARTS)}", file=sys.stderr)
        return None
    if args.commits < 1 or alloc < MiB or alloc % MiB or not alloc <= small <= big:
        print("bench rbd: error: --commits at least 1; --allocated a multiple of 1M, at "
              "most --small, which is at most --big", file=sys.stderr)
        return None
    return small, big, alloc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = check_arguments("bench rbd", args)
    sizes = _sizes(args) if size is not None else None
    if size is None or sizes is None:
        return 2
    small, big, alloc = sizes
    args.allocated_bytes = alloc

    def measure(base: str, log: Log) -> dict[str, Any]:
        log(f"{size >> 20} MiB, {args.rounds} rounds; work directory {base}")
        samples: Samples = {}
        # memstore holds what is written: both images, the set's data, and per revert
        # volume its data, its snapshot's copy and a split's copy
        need = 2 * size + len(SET_VOLUMES) * 2 * (4 * MiB) + 6 * alloc
        with contextlib.ExitStack() as stack:
            s = Setup(base, size, stack, log, need)
            s.prepare()
            if "commit" in args.parts:
                prepare_set(s)
            if "revert_split" in args.parts:
                prepare_sizes(s, {SMALL: small, BIG: big}, alloc)
            measure_rounds(s, args, samples, log)
            refs = references(s, args, log) if "references" in args.parts else {}
        return build_report(samples, refs, args, size, base, time.monotonic() - log.t0)

    return run("bench rbd", args, missing_tools(), measure, format_table,
               "daemons stopped, cluster removed")


if __name__ == "__main__":
    raise SystemExit(main())
