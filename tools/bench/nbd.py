"""Our NBD port against qemu-nbd serving the same raw image (issue 15's performance
section), over a veth pair, with TLS and without.

    python -m tools.bench.nbd [--size 1G] [--rounds 5] [--runtime 5] [--tls | --plain]
                              [--json] [--dir DIR] [--keep] [-q]

What one run does (in a temporary directory under --dir, removed at the end, also after
Ctrl-C / SIGTERM / SIGHUP -- exit 128+N -- and after a failure except its *.log files):

1. Two network namespaces, "server" and "client", joined by one veth pair (no bridge;
   tools/netns.py, named spxb-*), certificates from `shadowplex pki init` / `pki host`.
2. A pool with volume v (--size of random data) and volume w (sparse); the raw images
   snap.raw (v's bytes) and w.raw (sparse, the same size) next to it.
3. Per mode (TLS: both servers on the server's veth address, clients in the client
   namespace; plain: both on 127.0.0.1 in the server namespace and the clients there
   too, because our port serves plain text on loopback only -- the same path for both):
   `serve --nbd-listen` (v presented to the client, a snapshot of v made by the
   client's requester) and two qemu-nbd (snap.raw read-only, w.raw read-write; flags in
   nbd_setup.qemu_nbd_argv), one nbdcopy of each not counted (both servers' page caches
   hold the image, as they would for a hot backup), then --rounds rounds, ours and
   qemu-nbd alternating which goes first:
     nbdcopy     the snapshot / snap.raw to null: (nbdcopy's defaults: 4 connections
                 where the server offers multi-conn), MiB/s
     rand_read   fio 4K randread QD1 (psync, O_DIRECT) for --runtime s on the export
                 through nbdfuse (its NBD client: nbdkit's nbd plugin, nbd_setup.nbdfuse
                 says why), IOPS
     seq_write   fio seq write 1M QD1 (O_DIRECT) the same way on volume w / w.raw, MiB/s
4. Medians, SPREAD = (max - min) / median, ratio ours / qemu-nbd and a verdict against
   the issue's >= 1.0x (tools/bench/verdicts.py: PASS / FAIL / noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from .. import interrupts, workdir
from .command import _keep_logs_only
from .common import BenchError, Log, MiB, _median
from .nbd_setup import QEMU_SHARED, Setup, Target, missing_tools, qemu_nbd_argv
from .report import code_version, machine_info
from .verdicts import NOISY_SPREAD, spread, verdict
from .workloads import Job, run_fio

REPORT_VERSION = 1
MODES = ("tls", "plain")
SERVERS = {"spx": "shadowplex serve", "qemu": "qemu-nbd"}
# workload id -> (label, unit)
WORKLOADS = {
    "nbdcopy": ("nbdcopy of a snapshot to null:", "MiB/s"),
    "rand_read": ("4K randread QD1 (nbdfuse, O_DIRECT)", "IOPS"),
    "seq_write": ("seq write 1M QD1 (nbdfuse, O_DIRECT)", "MiB/s"),
}
TARGET = 1.0   # the issue's: ours >= 1.0x qemu-nbd, for every workload and mode
Samples = dict[tuple[str, str, str], list[float]]   # (mode, workload, server) -> values


def _measure_mode(s: Setup, mode: str, rounds: int, runtime: float, samples: Samples,
                  info: dict[str, Any], log: Log) -> None:
    tls = mode == "tls"
    log(f"{mode}: starting shadowplex serve and qemu-nbd")
    ours, qemu = s.start_ours(tls), s.start_qemu(tls)
    info[mode] = {"multi_conn": {t.name: _multi_conn(s, t, tls) for t in (ours, qemu)},
                  "clients_in": s.client_ns(tls)}
    for t in (ours, qemu):   # warm both page caches; not counted
        s.nbdcopy(t, tls)
    for r in range(rounds):
        order = (ours, qemu) if r % 2 == 0 else (qemu, ours)
        log(f"{mode}: round {r + 1}/{rounds} ({' then '.join(t.name for t in order)})")
        for t in order:
            samples.setdefault((mode, "nbdcopy", t.name), []).append(
                s.size / MiB / s.nbdcopy(t, tls))
        for workload, write in (("rand_read", False), ("seq_write", True)):
            for t in order:
                samples.setdefault((mode, workload, t.name), []).append(
                    _fio(s, t, tls, workload, write, runtime))
    s.stop_servers()


def _fio(s: Setup, t: Target, tls: bool, workload: str, write: bool,
         runtime: float) -> float:
    with s.nbdfuse(t, tls, write) as path:
        return run_fio(Job(workload, path, s.size, runtime, time_based=True, direct=True),
                       s.base).value


def _multi_conn(s: Setup, t: Target, tls: bool) -> bool | None:
    """Does the server offer multi-conn on the read export (what nbdcopy uses)?"""
    res = s.net.run(s.client_ns(tls), "nbdinfo", "--json", s.uri(t, tls), timeout=30)
    try:
        return bool(json.loads(res.stdout)["exports"][0].get("can_multi_conn"))
    except (ValueError, KeyError, IndexError):
        return None


def build_report(samples: Samples, info: dict[str, Any], args: argparse.Namespace,
                 size: int, modes: tuple[str, ...], base: str, elapsed: float
                 ) -> dict[str, Any]:
    results, targets = [], []
    for mode in modes:
        for w, (label, unit) in WORKLOADS.items():
            rows = {}
            for srv in SERVERS:
                xs = samples.get((mode, w, srv), [])
                rows[srv] = xs
                results.append({"mode": mode, "workload": w, "server": srv, "unit": unit,
                                "samples": xs, "median": _median(xs) if xs else None,
                                "spread": spread(xs) if xs else None})
            a, b = rows["spx"], rows["qemu"]
            value = lo = hi = None
            worst = 0.0
            if a and b and min(b) > 0:
                value = _median(a) / _median(b)
                lo, hi = min(a) / max(b), max(a) / min(b)
                worst = max(spread(a), spread(b))
            targets.append({
                "mode": mode, "workload": w, "description": f"{label} >= {TARGET}x qemu-nbd",
                "value": value, "range": None if lo is None else [lo, hi], "spread": worst,
                "verdict": verdict(">=", TARGET, value, lo, hi, worst)})
    return {
        "version": REPORT_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed, "size_MiB": size / MiB, "rounds": args.rounds,
        "runtime_s": args.runtime, "modes": list(modes),
        "machine": machine_info(base), "tools": _versions(), "code": code_version(),
        "qemu_nbd": " ".join(qemu_nbd_argv("ADDR", 0, "EXPORT", "IMAGE", False, "PKI")),
        "qemu_nbd_shared": QEMU_SHARED, "servers": info,
        "labels": {"workloads": {k: v[0] for k, v in WORKLOADS.items()},
                   "servers": dict(SERVERS)},
        "results": results, "targets": targets}


def format_table(report: dict[str, Any]) -> str:
    head = ["MODE", "WORKLOAD", "UNIT", "SHADOWPLEX", "SPREAD", "QEMU-NBD", "SPREAD",
            "RATIO", f"TARGET >= {TARGET}x"]
    by = {(r["mode"], r["workload"], r["server"]): r for r in report["results"]}
    rows = []
    for t in report["targets"]:
        a, b = by[(t["mode"], t["workload"], "spx")], by[(t["mode"], t["workload"], "qemu")]
        shown = "n/a" if t["value"] is None else f"{t['verdict']} (x{t['value']:.2f}" + (
            f", {t['range'][0]:.2f}-{t['range'][1]:.2f})" if t["verdict"] == "noisy" else ")")
        rows.append([t["mode"], WORKLOADS[t["workload"]][0], a["unit"], _num(a["median"]),
                     _pct(a), _num(b["median"]), _pct(b),
                     "-" if t["value"] is None else f"{t['value']:.2f}x", shown])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if 3 <= i <= 7 else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = report["machine"]
    lines.append(f"\n{report['size_MiB']:.0f} MiB, {report['rounds']} rounds, fio "
                 f"{report['runtime_s']:g} s; nproc {m.get('nproc')}, load "
                 f"{m.get('loadavg_end')}; MEDIAN of the rounds, SPREAD = (max - min) / "
                 f"median; noisy: the rounds' pairings disagree and a SPREAD > "
                 f"{NOISY_SPREAD:.0%}. multi-conn offered: "
                 + "; ".join(f"{mode} " + ", ".join(f"{k} {v}" for k, v in
                                                    i["multi_conn"].items())
                             for mode, i in report["servers"].items()))
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _pct(row: dict[str, Any]) -> str:
    return f"{row['spread'] * 100:.0f}%" if len(row["samples"]) > 1 else "-"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for tool in ("nbdcopy", "nbdfuse", "nbdkit", "qemu-nbd", "fio"):
        try:
            res = subprocess.run([tool, "--version"], capture_output=True, text=True,
                                 timeout=10, check=False)
            lines = res.stdout.strip().splitlines()
            out[tool] = lines[0] if lines else None
        except (OSError, subprocess.TimeoutExpired):
            out[tool] = None
    return out


def _problems() -> list[str]:
    out = [] if os.geteuid() == 0 else ["not running as root (namespaces, FUSE)"]
    out += [f"{t} not found (make setup installs it)" for t in missing_tools()]
    if not os.path.exists("/dev/fuse"):
        out.append("/dev/fuse is missing")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m tools.bench.nbd",
                                description=doc.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="image size (default 1G)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5); medians")
    p.add_argument("--runtime", type=float, default=5.0, metavar="S",
                   help="seconds per fio job (default 5)")
    p.add_argument("--tls", action="store_true", help="only the TLS rows")
    p.add_argument("--plain", action="store_true", help="only the plain-text rows")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--dir", metavar="DIR", help="where the work directory goes ($TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from blockstore.errors import InvalidSize
    from blockstore.names import parse_size
    try:
        size = parse_size(args.size)
    except InvalidSize as e:
        print(f"bench nbd: error: --size: {e}", file=sys.stderr)
        return 2
    if size < 16 * MiB or size % MiB or args.rounds < 1 or args.runtime <= 0:
        print("bench nbd: error: --size must be a multiple of 1M and at least 16M, "
              "--rounds at least 1, --runtime above 0", file=sys.stderr)
        return 2
    modes = tuple(m for m in MODES if getattr(args, m)) or MODES
    problems = _problems()
    if problems:
        print(f"bench nbd: error: {'; '.join(problems)}", file=sys.stderr)
        return 1
    log = Log(args.quiet)
    base: str | None = None
    t0 = time.monotonic()
    samples: Samples = {}
    info: dict[str, Any] = {}
    with interrupts.stop_signals():
        try:
            if args.dir:
                os.makedirs(args.dir, exist_ok=True)
            base = tempfile.mkdtemp(prefix="shadowplex-bench-nbd-", dir=args.dir)
            log(f"{size >> 20} MiB, {args.rounds} rounds, modes {', '.join(modes)}; "
                f"work directory {base}")
            with contextlib.ExitStack() as stack:
                s = Setup(base, size, stack, log)
                s.prepare()
                for mode in modes:
                    _measure_mode(s, mode, args.rounds, args.runtime, samples, info, log)
            report = build_report(samples, info, args, size, modes, base,
                                  time.monotonic() - t0)
            left = workdir.clean(base, args.keep)
            if left:
                raise BenchError(f"could not clean up: {', '.join(left)}")
        except KeyboardInterrupt as e:
            stop = e if isinstance(e, interrupts.Interrupted) else interrupts.Interrupted()
            left = workdir.clean(base, args.keep)
            said = (f"left behind: {', '.join(left)}" if left else
                    "nothing was started" if base is None else
                    f"work directory {base} {'kept' if args.keep else 'removed'}, servers "
                    "stopped, namespaces deleted")
            print(f"bench nbd: {stop.what}; {said}", file=sys.stderr)
            return stop.exit_code
        except Exception as e:   # noqa: BLE001 - one line and the logs, as bench does
            why = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
            print(f"bench nbd: failed: {why}", file=sys.stderr)
            if base is not None:
                left = workdir.clean(base, keep=True)
                if not args.keep:
                    _keep_logs_only(base)
                print(f"bench nbd: logs kept in {base}"
                      + (f"; left behind: {', '.join(left)}" if left else ""),
                      file=sys.stderr)
            return 1
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
