"""Host mode's figures (issue 16): a host daemon against the array's own daemon, in one
run -- set creation from the host vs locally, and FUSE throughput through the host's
NBD-backed mount vs the array's own mount.

    python -m tools.bench.hosts [--size 1G] [--rounds 5] [--runtime 5] [--creations 10]
                                [--json] [--dir DIR] [--keep] [-q]

What one run does (in a temporary directory under --dir, removed at the end, also after
Ctrl-C / SIGTERM / SIGHUP -- exit 128+N -- and after a failure except its *.log files):

1. Two network namespaces, "array" and "host", joined by one veth pair (no bridge;
   tools/netns.py, named spxb-*), certificates from `shadowplex pki init` / `pki host`
   (the host's CN: bench-host).
2. The array daemon in "array": `serve --pool --mount --nbd-listen --control-listen
   --tls-dir` on its veth address, a pool with volume v (--size of random data)
   presented to bench-host; the host daemon in "host": `serve --array ADDR:PORT
   --tls-dir --mount --state-dir` (both --hooks-dir ''). Both mounts are in the one
   mount table: MOUNT_host/volumes/v.img and MOUNT_array/hosts/bench-host/volumes/v.img
   are the same LUN. One untimed read of v through each mount first (the array's page
   cache holds the pool's image, as for a hot volume; TLS sessions are up).
3. --rounds rounds, host and array alternating which goes first:
     create      --creations times `Client(socket).snapshot_create(["v"],
                 context="app-rollback")` on the host daemon's socket and on the array
                 daemon's (the array's own host), each timed as the call's round trip
                 in one session, the snapshot set deleted after each (untimed), ms
     seq_read    fio seq read 1M, seq write 1M, 4K randread (psync, QD1, O_DIRECT;
     seq_write   tools/fio/*.fio) for --runtime s on v.img through each mount, run
     rand_read   from inside that side's namespace (nsenter --net), MiB/s or IOPS and
                 the completion latency p50 / p99
4. Per row the MEDIAN of the rounds (create: of the rounds' medians; p50 / p90 over all
   creations), SPREAD = (max - min) / median, the ratio host / array and a verdict
   (tools/bench/verdicts.py) against BARS: the issue sets no target; these bars are
   provisional, ours, to flag a regression of the host path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import shutil
import sys
import time
from typing import Any

from ..netns import Hosts
from .caches import warm
from .common import WORKLOADS, Log, MiB, _median, _p90, _wait, socket_dir
from .nbd_setup import PREFIX, _read, make_pki, make_pool
from .netbench import check_arguments, num, parser, pct, ratio, run, shown, table
from .netbench import versions as _versions
from .report import code_version, machine_info
from .targets import Daemon
from .verdicts import NOISY_SPREAD, spread
from .workloads import Job, run_fio

REPORT_VERSION = 1
HOST_CN = "bench-host"
NBD_PORT, CONTROL_PORT = 10809, 10810
VOL = "v"
SIDES = {"host": "host daemon (NBD+TLS)", "array": "array's own mount"}
FIO = ("seq_read", "seq_write", "rand_read")
# row id -> (label, unit)
ROWS = {"create": ("set creation round trip", "ms"),
        **{w: (f"{WORKLOADS[w][0]} QD1 (FUSE, O_DIRECT)", WORKLOADS[w][1]) for w in FIO}}
# provisional bars (the issue sets none): host / array
BARS = {"create": ("<=", 2.0), "seq_read": (">=", 0.5), "seq_write": (">=", 0.5),
        "rand_read": (">=", 0.5)}
TOOLS = ("ip", "nsenter", "fio", "fusermount3")
# (row, side, stat) -> values; stat "value" per round (create: the round's median),
# "p50" / "p99" per fio job (us), "all": every creation (ms)
Samples = dict[tuple[str, str, str], list[float]]


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


class HostSetup:
    """The two namespaces, the pki, the pool, the array daemon and the host daemon; all
    stopped and deleted when the caller's ExitStack closes (host daemon first)."""

    def __init__(self, base: str, size: int, stack: contextlib.ExitStack, log: Log) -> None:
        self.base, self.size, self.stack, self.log = base, size, stack, log
        self.net = Hosts(("array", "host"), prefix=PREFIX, switch=False)
        self.pki = os.path.join(base, "pki")
        self.host_pki = os.path.join(base, "pki-host")
        self.pool = os.path.join(base, "pool")
        self.mnt = {side: os.path.join(base, f"mnt-{side}") for side in SIDES}
        socks = socket_dir(base, stack)
        self.sock = {side: os.path.join(socks, f"{side}.sock") for side in SIDES}
        self.image = {"host": os.path.join(self.mnt["host"], "volumes", f"{VOL}.img"),
                      "array": os.path.join(self.mnt["array"], "hosts", HOST_CN,
                                            "volumes", f"{VOL}.img")}

    def prepare(self) -> None:
        self.stack.callback(self.net.teardown)
        self.net.setup()
        addr = self.net.addr["array"]
        make_pki(self.pki, addr, {HOST_CN: self.host_pki})
        self.log(f"writing {self.size >> 20} MiB of random data to volume {VOL}")
        make_pool(self.pool, self.size, VOL)
        for m in self.mnt.values():
            os.makedirs(m, exist_ok=True)
        array = Daemon(self.base, self.pool, self.mnt["array"], self.sock["array"],
                       name="array", prefix=self.net.argv("array"), extra=[
                           "--nbd-listen", f"{addr}:{NBD_PORT}", "--control-listen",
                           f"{addr}:{CONTROL_PORT}", "--tls-dir", self.pki,
                           "--hooks-dir", ""])
        self.stack.callback(array.stop)
        self.log("starting the array daemon")
        array.start()
        _wait(lambda: "control port open on" in _read(array.log_path), 30,
              "waiting for the array's control port", array.proc, array.log_path)
        from provider.client import Client
        with Client(self.sock["array"], client="shadowplex-bench-hosts", timeout=60) as c:
            c.volume_present(VOL, [HOST_CN])
        host = Daemon(self.base, None, self.mnt["host"], self.sock["host"], name="host",
                      prefix=self.net.argv("host"), extra=[
                          "--array", f"{addr}:{CONTROL_PORT}", "--tls-dir", self.host_pki,
                          "--state-dir", os.path.join(self.base, "state-host"),
                          "--hooks-dir", ""])
        self.stack.callback(host.stop)   # (runs before the array's: LIFO)
        self.log("starting the host daemon")
        host.start()
        _wait(lambda: os.path.exists(self.image["host"]), 30,
              f"waiting for {VOL}.img on the host's mount", host.proc, host.log_path)
        for side in SIDES:   # untimed: the pool's image in the array's page cache
            self.log(f"reading {VOL} once through the {side}'s mount (not counted)")
            warm(self.image[side], self.size)


def creations(sock: str, n: int) -> list[float]:
    """n set creations of v through the daemon at `sock`, in one session: each call's
    round trip in ms; each set deleted right after (untimed)."""
    from provider.client import Client
    out = []
    with Client(sock, client="shadowplex-bench-hosts", timeout=600) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            res = c.snapshot_create([VOL], context="app-rollback")
            out.append((time.perf_counter() - t0) * 1000)
            c.snapshot_delete(set_id=res["set_id"])
    return out


def measure_rounds(s: HostSetup, rounds: int, runtime: float, n_create: int,
                   samples: Samples, log: Log) -> None:
    def add(row: str, side: str, stat: str, *values: float) -> None:
        samples.setdefault((row, side, stat), []).extend(values)

    for r in range(rounds):
        order = ("host", "array") if r % 2 == 0 else ("array", "host")
        log(f"round {r + 1}/{rounds} ({' then '.join(order)})")
        for side in order:
            ms = creations(s.sock[side], n_create)
            add("create", side, "all", *ms)
            add("create", side, "value", _median(ms))
        for w in FIO:
            for side in order:
                res = run_fio(Job(w, s.image[side], s.size, runtime, time_based=True,
                                  direct=True), s.base, prefix=s.net.argv(side))
                add(w, side, "value", res.value)
                add(w, side, "p50", res.p50_us)
                add(w, side, "p99", res.p99_us)


def build_report(samples: Samples, args: argparse.Namespace, size: int, base: str,
                 elapsed: float) -> dict[str, Any]:
    results, ratios = [], []
    for row, (label, unit) in ROWS.items():
        for side in SIDES:
            xs = samples.get((row, side, "value"), [])
            lat: dict[str, float | None]
            if row == "create":
                every = samples.get((row, side, "all"), [])
                lat = {"p50": _median(every) if every else None,
                       "p90": _p90(every) if every else None}
            else:
                lat = {k: _median(v) if (v := samples.get((row, side, k))) else None
                       for k in ("p50", "p99")}
            results.append({"row": row, "side": side, "unit": unit, "samples": xs,
                            "median": _median(xs) if xs else None,
                            "spread": spread(xs) if xs else None,
                            "latency": lat, "latency_unit": "ms" if row == "create"
                            else "us"})
        op, bar = BARS[row]
        ratios.append({"row": row, "description": f"{label}: host / array {op} {bar}x",
                       "op": op, "bar": bar,
                       **ratio(samples.get((row, "host", "value"), []),
                               samples.get((row, "array", "value"), []), op, bar)})
    return {
        "version": REPORT_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed, "size_MiB": size / MiB, "rounds": args.rounds,
        "runtime_s": args.runtime, "creations_per_round": args.creations,
        "host_cn": HOST_CN, "machine": machine_info(base),
        "tools": _versions(("fio",)), "code": code_version(),
        "labels": {"rows": {k: v[0] for k, v in ROWS.items()}, "sides": dict(SIDES)},
        "results": results, "ratios": ratios}


def format_table(report: dict[str, Any]) -> str:
    head = ["MEASURE", "UNIT", "HOST", "SPREAD", "ARRAY", "SPREAD", "HOST/ARRAY",
            "LATENCY HOST", "LATENCY ARRAY", "BAR (provisional)"]
    by = {(r["row"], r["side"]): r for r in report["results"]}
    rows = []
    for t in report["ratios"]:
        h, a = by[(t["row"], "host")], by[(t["row"], "array")]
        rows.append([ROWS[t["row"]][0], h["unit"], num(h["median"]), pct(h),
                     num(a["median"]), pct(a),
                     "-" if t["value"] is None else f"{t['value']:.2f}x",
                     _lat(h), _lat(a), f"{t['op']} {t['bar']}x: {shown(t)}"])
    lines = table(head, rows, range(2, 9))
    m = report["machine"]
    lines.append(f"\n{report['size_MiB']:.0f} MiB, {report['rounds']} rounds, "
                 f"{report['creations_per_round']} creations per side and round, fio "
                 f"{report['runtime_s']:g} s; nproc {m.get('nproc')}, load "
                 f"{m.get('loadavg_end')}. MEDIAN of the rounds (creation: of the rounds' "
                 f"medians), SPREAD = (max - min) / median; LATENCY: creation p50/p90 ms "
                 f"over all creations, fio p50/p99 us (median of the rounds); noisy: the "
                 f"rounds' pairings disagree and a SPREAD > {NOISY_SPREAD:.0%}. The issue "
                 f"sets no target: the bars are provisional.")
    return "\n".join(lines)


def _lat(row: dict[str, Any]) -> str:
    lat = row["latency"]
    values = list(lat.values())
    if any(v is None for v in values):
        return "-"
    return "/".join(num(v) for v in values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("tools.bench.hosts", __doc__)
    p.add_argument("--creations", type=int, default=10, metavar="N",
                   help="set creations per side and round (default 10)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = check_arguments("bench hosts", args)
    if size is None:
        return 2
    if args.creations < 1:
        print("bench hosts: error: --creations must be at least 1", file=sys.stderr)
        return 2

    def measure(base: str, log: Log) -> dict[str, Any]:
        log(f"{size >> 20} MiB, {args.rounds} rounds; work directory {base}")
        samples: Samples = {}
        with contextlib.ExitStack() as stack:
            s = HostSetup(base, size, stack, log)
            s.prepare()
            measure_rounds(s, args.rounds, args.runtime, args.creations, samples, log)
        return build_report(samples, args, size, base, time.monotonic() - log.t0)

    return run("bench hosts", args, missing_tools(), measure, format_table,
               "daemons stopped, namespaces deleted")


if __name__ == "__main__":
    raise SystemExit(main())
