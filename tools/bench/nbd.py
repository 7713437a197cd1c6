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
import time
from typing import Any

from .common import Log, MiB, _median
from .nbd_setup import QEMU_SHARED, Setup, Target, missing_tools, qemu_nbd_argv
from .netbench import check_arguments, num, parser, pct, ratio, run, shown, table
from .netbench import versions as _tool_versions
from .report import code_version, machine_info
from .verdicts import NOISY_SPREAD, spread
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
            targets.append({"mode": mode, "workload": w,
                            "description": f"{label} >= {TARGET}x qemu-nbd",
                            **ratio(rows["spx"], rows["qemu"], ">=", TARGET)})
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
        rows.append([t["mode"], WORKLOADS[t["workload"]][0], a["unit"], num(a["median"]),
                     pct(a), num(b["median"]), pct(b),
                     "-" if t["value"] is None else f"{t['value']:.2f}x", shown(t)])
    lines = table(head, rows, range(3, 8))
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


def _versions() -> dict[str, str | None]:
    return _tool_versions(("nbdcopy", "nbdfuse", "nbdkit", "qemu-nbd", "fio"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("tools.bench.nbd", __doc__)
    p.add_argument("--tls", action="store_true", help="only the TLS rows")
    p.add_argument("--plain", action="store_true", help="only the plain-text rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = check_arguments("bench nbd", args)
    if size is None:
        return 2
    modes = tuple(m for m in MODES if getattr(args, m)) or MODES

    def measure(base: str, log: Log) -> dict[str, Any]:
        log(f"{size >> 20} MiB, {args.rounds} rounds, modes {', '.join(modes)}; "
            f"work directory {base}")
        samples: Samples = {}
        info: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            s = Setup(base, size, stack, log)
            s.prepare()
            for mode in modes:
                _measure_mode(s, mode, args.rounds, args.runtime, samples, info, log)
        return build_report(samples, info, args, size, modes, base,
                            time.monotonic() - log.t0)

    return run("bench nbd", args, missing_tools(), measure, format_table,
               "servers stopped, namespaces deleted")


if __name__ == "__main__":
    raise SystemExit(main())
