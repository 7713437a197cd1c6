"""Issue 17's performance section in one run: `snapshot diff` latency, incremental backups
against copying only the changed bytes, full backups of a sparse volume against qemu-img.

    python -m tools.bench.backup [--size 64G] [--allocated 2G] [--changed 1G] [--quick]
                                 [--rounds 3] [--calls 10] [--diff-only] [--json] [--dir DIR]
                                 [--keep] [-q]

In a work directory under --dir, removed however the run ends (netbench.run; Ctrl-C...):

1. Volume v (--size, sparse) with --allocated bytes of random data in scattered 4..32
   MiB pieces, and full.raw: a sparse raw file, the same bytes at the same offsets.
   `serve --nbd-listen 127.0.0.1:0 --nbd-insecure`; snapshot S0; --changed bytes written
   through the mount in scattered 64 KiB..1 MiB pieces (4 KiB aligned); snapshot S1;
   changes.raw: a sparse file holding exactly S1's bytes of `snapshot diff S0 S1`'s extents.
2. --rounds rounds; before every timed command every file of the work directory is
   written back and evicted (caches.settle; not the mount); our command and its
   comparators take turns going first:
     diff     --calls `Client.snapshot_diff(S0, S1)` in one session, --calls `shadowplex
              snapshot diff S0 S1 --json` and `shadowplex status --json` (any CLI
              command's floor: start-up and a session) processes, and `python -c pass`
              (Python's own start-up, the floor of any CLI in Python), ms each
     full_F   `shadowplex backup S0 --to FILE --format F` (F: qcow2, raw) against
              `qemu-img convert -O F full.raw FILE` + fsync
     incr_F   `shadowplex backup S1 --from S0 --base-file PREV --format F` (PREV: the
              first round's full backup) against `cp --sparse=always changes.raw FILE`
              + fsync and `nbdcopy --flush changes.raw FILE` (both skip holes)
   --diff-only: the diff case alone (a quiet check of the CLI's start-up).
   Storage bytes: getrusage (inblock, oublock) of the command and the children it waited
   for (qemu-nbd, cp, qemu-img), for ours plus the daemon's read_bytes (/proc/PID/io).
3. Medians, SPREAD, ratios, verdicts (verdicts.py) against the issue's targets: diff <=
   50 ms; an incremental writes <= 1.1x the changed bytes in <= 1.2x the comparator's
   time; a full backup reads only allocated data (bytes_read <= allocated; storage <= 1.1x).

cp / nbdcopy of changes.raw is "copying those bytes" like-for-like: the same bytes read
cold from a file on the pool's file system, written to a new sparse file there, durably:
the least an incremental must do. Our extra costs (the diff call, NBD on loopback, qcow2
via qemu-nbd, Python's start-up) are what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..output import human_size
from ..procgroup import kill_tree
from .caches import settle, sync_file
from .common import REPO, BenchError, KiB, Log, MiB, _median, _p90, socket_dir
from .netbench import check_arguments, num, parser, ratio, run, shown, table
from .netbench import versions as _versions
from .report import code_version, machine_info
from .targets import Daemon
from .verdicts import NOISY_SPREAD, spread

REPORT_VERSION = 1
VOL = "v"
FORMATS = ("qcow2", "raw")
TOOLS = ("qemu-img", "qemu-nbd", "cp", "fusermount3")
DEFAULTS = {"full": ("64G", "2G", "1G"), "quick": ("4G", "128M", "64M")}  # size, alloc, changed
# case -> its sides (ours first); what each side runs is Setup.command
CASES: dict[str, tuple[str, ...]] = {"diff": ("client", "installed", "cli", "floor",
                                              "python"),
         **{f"full_{f}": ("ours", "qemu-img") for f in FORMATS},
         **{f"incr_{f}": ("ours", "cp", "nbdcopy") for f in FORMATS}}
# (case, side, stat) -> one value per command; stats: s (wall), read / written (storage
# bytes), json_read / json_written / copy_s (ours: its --json), ms (diff)
Samples = dict[tuple[str, str, str], list[float]]
Row = tuple[str, str, str]
# target id -> (label, unit, numerator, denominator: a row, a size ("changed_bytes",
#               "allocated") or None (the numerator itself), op, bar; op None: no target)
SPECS: dict[str, tuple[str, str, Row, Row | str | None, str | None, float]] = {
    "diff_client": ("snapshot diff, Client call", "ms", ("diff", "client", "ms"), None,
                    "<=", 50.0),
    # the target: the command as `make install` writes it (tools/launcher.py: no site),
    # which is what a cron job runs; the dev checkout's `python -m tools.cli` beside it
    # (its venv's site runs the editable install's finder: ~12 ms more)
    "diff_cli": ("snapshot diff --json, installed command", "ms", ("diff", "installed", "ms"),
                 None, "<=", 50.0),
    "diff_dev": ("snapshot diff --json, python -m tools.cli", "ms", ("diff", "cli", "ms"),
                 None, None, 0),
    "cli_floor": ("CLI floor: status --json", "ms", ("diff", "floor", "ms"), None, None, 0),
    "python_floor": ("Python floor: python -c pass", "ms", ("diff", "python", "ms"), None,
                     None, 0)}
# per backup case: (id suffix, label, unit, our stat, against: a size or a side's "s")
PER_CASE = {
    "incr": [
        ("bytes", "storage writes / changed", "MiB", "written", "changed_bytes", "<=", 1.1),
        ("vs_cp", "time / cp --sparse=always", "s", "s", "cp", "<=", 1.2),
        ("vs_nbdcopy", "time / nbdcopy", "s", "s", "nbdcopy", "<=", 1.2),
        ("copy", "its copy (--json seconds) / cp", "s", "copy_s", "cp", None, 0)],
    "full": [
        ("read", "bytes_read / allocated", "MiB", "json_read", "allocated", "<=", 1.0),
        ("storage", "storage reads / allocated", "MiB", "read", "allocated", "<=", 1.1),
        ("vs_qemu_img", "time / qemu-img convert", "s", "s", "qemu-img", None, 0)]}
for _kind, _rows in PER_CASE.items():
    for _f in FORMATS:
        _c = f"{_kind}_{_f}"
        for _id, _label, _unit, _stat, _den, _op, _bar in _rows:
            SPECS[f"{_c}_{_id}"] = (
                f"{'incremental' if _kind == 'incr' else 'full'} {_f}: {_label}", _unit,
                (_c, "ours", _stat), _den if _den in ("changed_bytes", "allocated")
                else (_c, str(_den), "s"), _op, float(_bar or 0))


def scatter(rnd: random.Random, size: int, total: int, lo: int, hi: int, align: int
            ) -> list[tuple[int, int]]:
    """Non-overlapping (offset, length) pieces of lo..hi bytes (multiples of align)
    adding up to total, one at a random place in each of equal slots of the volume."""
    lens, left = [], total
    while left > 0:
        lens.append(min(left, rnd.randrange(min(lo, left), min(hi, left) + 1, align)))
        left -= lens[-1]
    slot = size // max(1, len(lens)) // align * align
    if lens and max(lens) > slot:
        raise BenchError(f"{total} bytes in pieces up to {hi} do not fit apart in {size}")
    return [(i * slot + rnd.randrange((slot - n) // align + 1) * align, n)
            for i, n in enumerate(lens)]


def timed(argv: list[str]) -> tuple[float, int, int, str]:
    """argv in a session of its own: (seconds, storage bytes read, written (getrusage of it
    and its waited-for children), stdout). Interrupted: SIGINT to it all, SIGKILL in 10 s."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, start_new_session=True)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:   # as Ctrl-C would: `backup` removes its .part, qemu-nbd, ...
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            kill_tree(proc.pid, proc.pid, wait=10.0)
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise BenchError(f"{' '.join(argv[:6])} ... failed ({proc.returncode}): "
                             f"{err.read().decode(errors='replace').strip()[-400:]}")
        out.seek(0)
        return seconds, ru.ru_inblock * 512, ru.ru_oublock * 512, out.read().decode()


def _read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


class Setup:
    """The pool, full.raw, the daemon (stopped when the caller's ExitStack closes), S0,
    the changes, S1 and changes.raw; then each side's command, timed."""

    def __init__(self, base: str, sizes: dict[str, int], stack: contextlib.ExitStack,
                 log: Log) -> None:
        self.base, self.sizes, self.stack, self.log = base, sizes, stack, log
        self.pool, self.mnt = os.path.join(base, "pool"), os.path.join(base, "mnt")
        self.full_raw, self.changes_raw, self.out = (os.path.join(base, n) for n in (
            "full.raw", "changes.raw", "backups"))
        self.sock = os.path.join(socket_dir(base, stack), "ctl.sock")
        self.cli = [sys.executable, "-m", "tools.cli", "--socket", self.sock]
        self.prev: dict[str, str] = {}   # format -> round 1's full backup of S0
        self.daemon = Daemon(base, self.pool, self.mnt, self.sock, extra=[
            "--nbd-listen", "127.0.0.1:0", "--nbd-insecure", "--hooks-dir", ""])
        self.s0 = self.s1 = ""
        self.changed_bytes = self.extents = 0

    def prepare(self) -> None:
        from blockstore import Pool
        from provider.client import Client
        size, rnd = self.sizes["size"], random.Random(17)
        for d in (self.out, self.mnt):
            os.makedirs(d)
        self.log(f"writing {self.sizes['allocated'] >> 20} MiB to volume {VOL} and full.raw")
        pool = Pool.create(self.pool)
        try:
            pool.create_volume(VOL, size)
            with open(self.full_raw, "wb") as raw:
                raw.truncate(size)
                for off, n in scatter(rnd, size, self.sizes["allocated"], 4 * MiB,
                                      32 * MiB, MiB):
                    for at in range(off, off + n, 4 * MiB):
                        data = os.urandom(min(4 * MiB, off + n - at))
                        pool.write(VOL, at, data)
                        os.pwrite(raw.fileno(), data, at)
                os.fsync(raw.fileno())
            pool.flush(VOL)
        finally:
            pool.close()
        self.stack.callback(self.daemon.stop)
        self.log("starting shadowplex serve with an NBD port on 127.0.0.1")
        self.daemon.start()
        with Client(self.sock, client="shadowplex-bench-backup", timeout=600) as c:
            self.s0 = self._snapshot(c)
            self.log(f"writing {self.sizes['changed'] >> 20} MiB through the mount")
            fd = os.open(os.path.join(self.mnt, "volumes", f"{VOL}.img"), os.O_WRONLY)
            try:
                for off, n in scatter(rnd, size, self.sizes["changed"], 64 * KiB, MiB,
                                      4 * KiB):
                    os.pwrite(fd, os.urandom(n), off)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.s1 = self._snapshot(c)
            diff = c.snapshot_diff(self.s0, self.s1)
        self.changed_bytes, self.extents = int(diff["changed_bytes"]), len(diff["extents"])
        self.log(f"changes.raw: the {self.extents} changed extents of S1")
        src = os.open(os.path.join(self.mnt, ".shadow", f"{self.s1}.img"), os.O_RDONLY)
        try:
            with open(self.changes_raw, "wb") as dst:
                dst.truncate(int(diff["size"]))
                for off, n in diff["extents"]:
                    os.pwrite(dst.fileno(), os.pread(src, n, off), off)
                os.fsync(dst.fileno())
        finally:
            os.close(src)

    @staticmethod
    def _snapshot(c: Any) -> str:
        return str(c.snapshot_create([VOL], context="app-rollback")["snapshots"][0]
                   ["snapshot_id"])

    def evict(self) -> None:
        settle(self.full_raw, [self.base], evict=True)

    def diff(self, side: str, calls: int) -> list[float]:
        """ms per call: Client calls in one session, or CLI processes."""
        if side == "client":
            from provider.client import Client
            out = []
            with Client(self.sock, client="shadowplex-bench-backup", timeout=60) as c:
                for _ in range(calls):
                    t0 = time.perf_counter()
                    c.snapshot_diff(self.s0, self.s1)
                    out.append((time.perf_counter() - t0) * 1000)
            return out
        diff = ["--socket", self.sock, "snapshot", "diff", self.s0, self.s1, "--json"]
        argv = {"installed": [self.launcher(), *diff],
                "cli": [*self.cli[:3], *diff],
                "floor": [*self.cli, "status", "--json"],
                "python": [sys.executable, "-c", "pass"]}[side]
        return [timed(argv)[0] * 1000 for _ in range(calls)]

    def launcher(self) -> str:
        """BASE/shadowplex as `make install` writes it (tools/launcher.py), with this
        checkout first on its path: the installed command's start-up, this code."""
        from .. import launcher
        path = os.path.join(self.base, "shadowplex")
        if not os.path.exists(path):
            python = os.path.join(sys.prefix, "bin", "python")
            with open(path, "w") as f:
                f.write(launcher.text(python, [str(REPO), *launcher.site_dirs()]))
            os.chmod(path, 0o755)
        return path

    def backup(self, case: str, side: str, r: int) -> dict[str, float]:
        """One timed command of a backup case; its output removed after (but round 1's
        full backups: the incrementals' PREV)."""
        kind, fmt = case.split("_")
        path = os.path.join(self.out, f"{case}-{side}-{r}.{fmt}")
        if side == "ours":
            argv = [*self.cli, "backup", self.s0 if kind == "full" else self.s1, "--to",
                    path, "--format", fmt, "--json", "-q"]
            if kind == "incr":
                argv += ["--from", self.s0, "--base-file", self.prev[fmt]]
            before = _read_bytes(self.daemon.pid)
            seconds, rd, wr, stdout = timed(argv)
            s = json.loads(stdout)
            out = {"s": seconds, "read": rd + _read_bytes(self.daemon.pid) - before,
                   "written": wr, "json_read": s["bytes_read"], "copy_s": s["seconds"],
                   "json_written": s["bytes_written"] + s["bytes_zeroed"]}
        else:
            argv = {"qemu-img": ["qemu-img", "convert", "-O", fmt, self.full_raw, path],
                    "cp": ["cp", "--sparse=always", self.changes_raw, path],
                    "nbdcopy": ["nbdcopy", "--flush", self.changes_raw, path]}[side]
            seconds, rd, wr, _ = timed(argv)
            t0 = time.perf_counter()
            sync_file(path, evict=False)
            out = {"s": seconds + time.perf_counter() - t0, "read": rd, "written": wr}
        if kind == "full" and side == "ours" and fmt not in self.prev:
            self.prev[fmt] = path
        else:
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".backup.json")
        return out


def measure_rounds(s: Setup, rounds: int, calls: int, samples: Samples, log: Log,
                   diff_only: bool = False) -> None:
    nbdcopy = shutil.which("nbdcopy") is not None
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}")
        for case, sides in CASES.items():
            if diff_only and case != "diff":
                continue
            sides = tuple(x for x in sides if nbdcopy or x != "nbdcopy")
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                s.evict()
                if case == "diff":
                    samples.setdefault((case, side, "ms"), []).extend(s.diff(side, calls))
                    continue
                for stat, v in s.backup(case, side, r).items():
                    samples.setdefault((case, side, stat), []).append(v)


def build_report(samples: Samples, args: argparse.Namespace, sizes: dict[str, int],
                 base: str, elapsed: float) -> dict[str, Any]:
    results = [{"case": c, "side": side, "stat": stat, "samples": xs, "median": _median(xs),
                "spread": spread(xs)} for (c, side, stat), xs in sorted(samples.items())]
    targets = []
    for tid, (label, unit, a_key, b_key, op, bar) in SPECS.items():
        a = samples.get(a_key, [])
        b = samples.get(b_key, []) if isinstance(b_key, tuple) else \
            [float(sizes[b_key])] if b_key else [1.0] if a else []
        t = {"id": tid, "description": label if op is None else f"{label} {op} {bar:g}"
             + ("x" if b_key else f" {unit}"), "unit": unit, "op": op, "bar": bar,
             "ours": _median(a) if a else None, "ours_spread": spread(a) if a else None,
             "p90": _p90(a) if a and unit == "ms" else None,
             "other": b_key if isinstance(b_key, str) else b_key and b_key[1],
             "other_median": _median(b) if b and b_key else None,
             "other_spread": spread(b) if b and isinstance(b_key, tuple) else None,
             **ratio(a, b, op or "<=", bar), **({"verdict": "-"} if op is None else {})}
        targets.append(t)
    return {
        "version": REPORT_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed, "rounds": args.rounds, "calls": args.calls, "sizes": sizes,
        "snapshots": "S0 -> S1", "machine": machine_info(base), "code": code_version(),
        "tools": _versions(("qemu-img", "qemu-nbd", "nbdcopy", "cp")),
        "results": results, "targets": targets}


def _cell(v: float | None, unit: str) -> str:
    return "-" if v is None else num(v / MiB if unit == "MiB" else v) if unit != "s" \
        else f"{v:.2f}"


def _pct(t: dict[str, Any], side: str) -> str:
    return "-" if t[f"{side}_spread"] is None else f"{t[f'{side}_spread'] * 100:.0f}%"


def format_table(report: dict[str, Any]) -> str:
    head = ["MEASURE", "UNIT", "OURS", "SPREAD", "AGAINST", "THEIRS", "SPREAD", "RATIO",
            "TARGET"]
    rows = []
    for t in report["targets"]:
        ours = _cell(t["ours"], t["unit"]) + (f" (p90 {num(t['p90'])})" if t["p90"] else "")
        ratio_ = "-" if t["value"] is None or t["unit"] == "ms" else f"{t['value']:.2f}x"
        target = "-" if t["op"] is None else f"{t['op']} {t['bar']:g}: " + (
            f"{t['verdict']} ({t['value']:.1f} ms)" if t["unit"] == "ms" and t["value"]
            is not None else shown(t))
        rows.append([t["description"].split(" <=")[0], t["unit"], ours,
                     _pct(t, "ours"), t["other"] or "-",
                     _cell(t["other_median"], t["unit"]), _pct(t, "other"), ratio_,
                     target])
    lines = table(head, rows, range(2, 8))
    z, m = report["sizes"], report["machine"]
    lines.append(
        f"\nvolume {human_size(z['size'])}, {human_size(z['allocated'])} allocated, "
        f"{human_size(z['changed'])} written since S0 = {human_size(z['changed_bytes'])} "
        f"changed in {z['extents']} extents; {report['rounds']} rounds, {report['calls']} "
        f"diff calls per kind and round; nproc {m.get('nproc')}, load "
        f"{m.get('loadavg_end')}, {m.get('filesystem')}. MEDIAN of the rounds, SPREAD = "
        f"(max - min) / median; caches evicted before every command; noisy: the rounds' "
        f"pairings disagree and a SPREAD > {NOISY_SPREAD:.0%}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("tools.bench.backup", __doc__, fio=False)
    p.set_defaults(size=None, rounds=3)
    p.add_argument("--allocated", help="data in the volume at S0 (default 2G; --quick 128M)")
    p.add_argument("--changed", help="written between S0 and S1 (default 1G; --quick 64M)")
    p.add_argument("--quick", action="store_true", help="4G volume, 128M, 64M")
    p.add_argument("--calls", type=int, default=10, metavar="N",
                   help="snapshot diff calls per kind and round (default 10)")
    p.add_argument("--diff-only", action="store_true",
                   help="only the diff case (no backups): the CLI's start-up, quickly")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from blockstore.errors import InvalidSize
    from blockstore.names import parse_size
    args = parse_args(argv)
    size_d, alloc_d, changed_d = DEFAULTS["quick" if args.quick else "full"]
    args.size = args.size or size_d
    size = check_arguments("bench backup", args)
    if size is None:
        return 2
    try:
        sizes = {"size": size, "allocated": parse_size(args.allocated or alloc_d),
                 "changed": parse_size(args.changed or changed_d)}
    except InvalidSize as e:
        print(f"bench backup: error: {e}", file=sys.stderr)
        return 2
    if not (MiB <= sizes["allocated"] <= size // 8 and MiB <= sizes["changed"] <= size // 16
            and sizes["allocated"] % MiB == 0 == sizes["changed"] % MiB and args.calls >= 1):
        print("bench backup: error: --allocated and --changed must be multiples of 1M, at "
              "most --size/8 and --size/16; --calls at least 1", file=sys.stderr)
        return 2

    def measure(base: str, log: Log) -> dict[str, Any]:
        log(f"volume {size >> 20} MiB, {args.rounds} rounds; work directory {base}")
        samples: Samples = {}
        with contextlib.ExitStack() as stack:
            s = Setup(base, sizes, stack, log)
            s.prepare()
            sizes.update(changed_bytes=s.changed_bytes, extents=s.extents)
            measure_rounds(s, args.rounds, args.calls, samples, log, args.diff_only)
        return build_report(samples, args, sizes, base, time.monotonic() - log.t0)

    return run("bench backup", args, [t for t in TOOLS if shutil.which(t) is None], measure,
               format_table, "daemon stopped")


if __name__ == "__main__":
    raise SystemExit(main())
