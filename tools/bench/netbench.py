"""What the benchmarks between network namespaces (tools/bench/nbd.py, tools/bench/hosts.py)
share: their common arguments and checks, the run in a work directory that is cleaned
up however it ends (Ctrl-C / SIGTERM / SIGHUP: exit 128+N; a failure: its *.log files
kept), a ratio of two rows with its verdict, and the table's layout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import interrupts, workdir
from .command import _keep_logs_only
from .common import BenchError, Log, MiB, _median
from .verdicts import spread, verdict


def parser(prog: str, doc: str | None, fio: bool = True) -> argparse.ArgumentParser:
    """`python -m PROG`'s parser (described by the first paragraph of its docstring) with
    the arguments every network benchmark takes (--runtime: those that run fio); the
    caller adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}",
                                description=(doc or "").split("\n\n")[0])
    p.add_argument("--size", default="1G", help="image size (default 1G)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5); medians")
    if fio:
        p.add_argument("--runtime", type=float, default=5.0, metavar="S",
                       help="seconds per fio job (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--dir", metavar="DIR", help="where the work directory goes ($TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def check_arguments(prog: str, args: argparse.Namespace) -> int | None:
    """--size in bytes, or None after a one-line usage error on stderr."""
    from blockstore.errors import InvalidSize
    from blockstore.names import parse_size
    try:
        size = parse_size(args.size)
    except InvalidSize as e:
        print(f"{prog}: error: --size: {e}", file=sys.stderr)
        return None
    if size < 16 * MiB or size % MiB or args.rounds < 1 or getattr(args, "runtime", 1) <= 0:
        print(f"{prog}: error: --size must be a multiple of 1M and at least 16M, "
              "--rounds at least 1, --runtime above 0", file=sys.stderr)
        return None
    return size


def problems(missing_tools: list[str]) -> list[str]:
    """Why the benchmark cannot run here (empty: it can)."""
    out = [] if os.geteuid() == 0 else ["not running as root (namespaces, FUSE)"]
    out += [f"{t} not found (make setup installs it)" for t in missing_tools]
    if not os.path.exists("/dev/fuse"):
        out.append("/dev/fuse is missing")
    return out


def run(prog: str, args: argparse.Namespace, missing_tools: list[str],
        measure: Callable[[str, Log], dict[str, Any]],
        format_table: Callable[[dict[str, Any]], str], stopped: str) -> int:
    """measure(work directory, log) -> the report, in a temporary directory under --dir
    that is cleaned up (tools/workdir.py) however the run ends; prints the report (table
    or --json). `stopped`: what an interrupted run says it stopped ("servers stopped,
    namespaces deleted"). Returns the exit status."""
    found = problems(missing_tools)
    if found:
        print(f"{prog}: error: {'; '.join(found)}", file=sys.stderr)
        return 1
    log = Log(args.quiet)
    base: str | None = None
    with interrupts.stop_signals():
        try:
            if args.dir:
                os.makedirs(args.dir, exist_ok=True)
            base = tempfile.mkdtemp(prefix=f"shadowplex-{prog.replace(' ', '-')}-",
                                    dir=args.dir)
            report = measure(base, log)
            left = workdir.clean(base, args.keep)
            if left:
                raise BenchError(f"could not clean up: {', '.join(left)}")
        except KeyboardInterrupt as e:
            stop = e if isinstance(e, interrupts.Interrupted) else interrupts.Interrupted()
            left = workdir.clean(base, args.keep)
            said = (f"left behind: {', '.join(left)}" if left else
                    "nothing was started" if base is None else
                    f"work directory {base} {'kept' if args.keep else 'removed'}, {stopped}")
            print(f"{prog}: {stop.what}; {said}", file=sys.stderr)
            return stop.exit_code
        except Exception as e:   # noqa: BLE001 - one line and the logs, as bench does
            why = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
            print(f"{prog}: failed: {why}", file=sys.stderr)
            if base is not None:
                left = workdir.clean(base, keep=True)
                if not args.keep:
                    _keep_logs_only(base)
                print(f"{prog}: logs kept in {base}"
                      + (f"; left behind: {', '.join(left)}" if left else ""),
                      file=sys.stderr)
            return 1
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    log(f"done in {time.monotonic() - log.t0:.0f} s")
    return 0


def ratio(a: list[float], b: list[float], op: str, threshold: float) -> dict[str, Any]:
    """median(a) / median(b), its range over the pairings of the rounds (min(a)/max(b) ..
    max(a)/min(b)), the larger SPREAD of the two rows and the verdict against
    `op threshold` (tools/bench/verdicts.py); value None (n/a) when a row is missing."""
    value = lo = hi = None
    worst = 0.0
    if a and b and min(b) > 0:
        value = _median(a) / _median(b)
        lo, hi = min(a) / max(b), max(a) / min(b)
        worst = max(spread(a), spread(b))
    return {"value": value, "range": None if lo is None else [lo, hi], "spread": worst,
            "verdict": verdict(op, threshold, value, lo, hi, worst)}


def shown(t: dict[str, Any]) -> str:
    """A ratio's verdict in the table: 'PASS (x1.27)', 'noisy (x0.81, 0.62-1.10)'."""
    if t["value"] is None:
        return "n/a"
    return f"{t['verdict']} (x{t['value']:.2f}" + (
        f", {t['range'][0]:.2f}-{t['range'][1]:.2f})" if t["verdict"] == "noisy" else ")")


def table(head: list[str], rows: list[list[str]], right: Iterable[int]) -> list[str]:
    """Columns padded to their widest cell (those in `right` right-aligned), a rule of
    dashes under the head."""
    right = set(right)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def pct(row: dict[str, Any]) -> str:
    """A row's SPREAD as a percentage ("-" for a single sample)."""
    return f"{row['spread'] * 100:.0f}%" if len(row["samples"]) > 1 else "-"


def versions(tools: Iterable[str]) -> dict[str, str | None]:
    """The first line of each tool's --version (None: not there)."""
    out: dict[str, str | None] = {}
    for tool in tools:
        try:
            res = subprocess.run([tool, "--version"], capture_output=True, text=True,
                                 timeout=10, check=False)
            lines = res.stdout.strip().splitlines()
            out[tool] = lines[0] if lines else None
        except (OSError, subprocess.TimeoutExpired):
            out[tool] = None
    return out
