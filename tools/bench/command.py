"""Entry points: run() and main() (`python -m tools.bench`); the arguments, shared with
`shadowplex bench`, are arguments.py's."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from .. import interrupts, workdir
from . import control, poolfs
from .arguments import add_arguments, progress_wanted
from .common import POOL_FS, PROFILES, BenchError, Log, _mounted
from .datapath import Bench
from .report import build_report, format_table, tool_versions
from .svg import render_svg


def _host_problems() -> list[str]:
    """Why the benchmark cannot mount FUSE file systems here (empty: it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 not found (apt install fuse3)")
    return problems


def _choose_tools(generator: str, versions: dict[str, str | None]
                  ) -> tuple[str, bool, bool, list[dict[str, str]]] | None:
    """(generator, qemu-storage-daemon?, qcow2?, the columns skipped and why) from what is
    installed; None if --generator fio was asked for without fio."""
    skipped: list[dict[str, str]] = []
    gen = generator
    if gen == "auto":
        gen = "fio" if versions["fio"] else "python"
        if gen == "python":
            skipped.append({"column": "generator", "reason": "fio not found (apt install fio): the "
                            "built-in Python generator drives every target"})
    elif gen == "fio" and not versions["fio"]:
        return None
    use_qsd = versions["qemu_storage_daemon"] is not None
    use_qcow2 = use_qsd and versions["qemu_img"] is not None
    if not use_qsd:
        skipped.append({"column": "qsd_raw", "reason": "qemu-storage-daemon not found "
                        "(apt install qemu-system-common)"})
    if not use_qcow2:
        skipped.append({"column": "qsd_qcow2", "reason": "qemu-storage-daemon or qemu-img not "
                        "found (apt install qemu-system-common qemu-utils)"})
    return gen, use_qsd, use_qcow2, skipped


def _pool_fs(arg: str | None, default: tuple[str, ...]
             ) -> tuple[tuple[str, ...], list[dict[str, str]]] | str:
    """(the pool file systems to measure, those skipped and why) from --pool-fs; a str:
    the error."""
    if arg is None:
        wanted = default
    elif arg.strip().lower() in ("", "none"):
        wanted = ()
    else:
        wanted = tuple(dict.fromkeys(x.strip().lower() for x in arg.split(",") if x.strip()))
        bad = [x for x in wanted if x not in POOL_FS]
        if bad:
            return (f"--pool-fs: unknown file system {', '.join(bad)} (choose from "
                    f"{', '.join(POOL_FS)}, or none)")
    use, skipped = [], []
    for fs in wanted:
        why = poolfs.missing(fs)
        if why:
            skipped.append({"column": f"pool_fs_{fs}", "reason": f"{fs} pool: {why}"})
        else:
            use.append(fs)
    return tuple(use), skipped


def _measure(b: Bench) -> None:
    """Everything one run measures, in order: the data path, the pool file systems, then
    the control plane."""
    b.setup()
    b.data_path()
    for fs in b.pool_fs:
        poolfs.run(b, fs)
    control.commit_latency(b)
    control.plex_vs_cp(b)
    control.memory(b)
    control.restart(b)


def run(args: argparse.Namespace) -> int:
    # a line per phase on a terminal; --json (a report for a program) as a pipe
    quiet = not progress_wanted(bool(getattr(args, "quiet", False)),
                                bool(getattr(args, "progress", False)),
                                sys.stderr.isatty() and not getattr(args, "json", False))
    log = Log(quiet)
    tiny = getattr(args, "tiny", False) or os.environ.get("SHADOWPLEX_BENCH_TINY") == "1"
    profile = PROFILES["tiny" if tiny else "quick" if args.quick else "full"]
    runs = args.runs if args.runs is not None else profile.runs
    if runs < 1:
        print("shadowplex bench: error: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.chart and not args.chart.lower().endswith(".svg"):
        print("shadowplex bench: error: --chart writes SVG: give a FILE.svg", file=sys.stderr)
        return 2
    problems = _host_problems()
    if problems:
        print(f"shadowplex bench: error: the benchmark mounts FUSE file systems: "
              f"{'; '.join(problems)}", file=sys.stderr)
        return 1
    versions = tool_versions()
    choice = _choose_tools(args.generator, versions)
    if choice is None:
        print("shadowplex bench: error: --generator fio but fio is not installed",
              file=sys.stderr)
        return 1
    gen, use_qsd, use_qcow2, skipped = choice
    fs_choice = _pool_fs(getattr(args, "pool_fs", None), profile.pool_fs)
    if isinstance(fs_choice, str):
        print(f"shadowplex bench: error: {fs_choice}", file=sys.stderr)
        return 2
    pool_fs, fs_skipped = fs_choice
    skipped += fs_skipped
    for s in skipped:
        log(f"note: {s['reason']}")
    keep = bool(getattr(args, "keep", False))
    base: str | None = None
    t0 = time.monotonic()
    report: dict[str, Any] | None = None
    # Ctrl-C, SIGTERM, SIGHUP: the same cleanup, which a second signal cannot cut short
    # (tools/interrupts.py); the message says what really is left (tools/workdir.py)
    with interrupts.stop_signals():
        try:
            if args.dir:
                os.makedirs(args.dir, exist_ok=True)
            base = tempfile.mkdtemp(prefix="shadowplex-bench-", dir=args.dir)
            log(f"{profile.name} run: {runs} runs, {profile.volume_size >> 20} MiB volume, "
                f"{profile.runtime:g} s jobs, generator {gen}, pool file systems "
                f"{', '.join(pool_fs) or 'none'}; work directory {base}")
            with contextlib.ExitStack() as stack:
                b = Bench(profile, runs, base, log, gen, use_qsd, use_qcow2, stack, pool_fs)
                _measure(b)
                report = build_report(b, versions, skipped, time.monotonic() - t0)
            left = workdir.clean(base, keep)
            if left:
                raise BenchError(f"could not clean up: {', '.join(left)}")
        except KeyboardInterrupt as e:
            stop = e if isinstance(e, interrupts.Interrupted) else interrupts.Interrupted()
            left = workdir.clean(base, keep)
            if left:
                said = f"left behind: {', '.join(left)}"
            elif base is None:
                said = "nothing was started"
            else:
                said = (f"work directory kept in {base}" if keep else
                        f"work directory {base} removed") + ", daemons stopped, unmounted"
            print(f"shadowplex bench: {stop.what}; {said}", file=sys.stderr)
            return stop.exit_code
        except Exception as e:
            if getattr(args, "debug", False):
                raise
            why = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
            print(f"shadowplex bench: failed: {why}", file=sys.stderr)
            if base is not None:
                left = workdir.clean(base, keep=True)
                if not keep:
                    _keep_logs_only(base)
                print(f"shadowplex bench: logs kept in {base}"
                      + (f"; left behind: {', '.join(left)}" if left else ""), file=sys.stderr)
            return 1
    if keep:
        log(f"kept {base}")
    assert report is not None
    if args.chart:
        with open(args.chart, "w") as f:
            f.write(render_svg(report))
        log(f"chart written to {args.chart}")
    if getattr(args, "json", False):
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 0


def _keep_logs_only(base: str) -> None:
    """After a failure: remove the images and the pool, keep the *.log files."""
    for entry in os.scandir(base):
        if entry.name.endswith(".log"):
            continue
        if entry.is_dir(follow_symlinks=False) and not _mounted(entry.path):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.is_file(follow_symlinks=False) and not _mounted(entry.path):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def main(argv: list[str] | None = None) -> int:
    doc = sys.modules[__package__].__doc__   # the package's (tools/bench/__init__.py)
    p = argparse.ArgumentParser(prog="python -m tools.bench",
                                description=doc.split("\n\n")[0] if doc else None)
    add_arguments(p, standalone=True)
    return run(p.parse_args(argv))

