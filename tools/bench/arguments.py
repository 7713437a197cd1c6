"""The bench's arguments, shared by `shadowplex bench` (tools/parser.py) and `python -m
tools.bench` (command.py): a module of its own with nothing heavy imported, because every
CLI command builds the whole parser (its start-up time)."""

from __future__ import annotations

import argparse

POOL_FS = ("ext4", "xfs", "btrfs")   # --pool-fs: the file systems the write rows run on


def add_arguments(p: argparse.ArgumentParser, standalone: bool = False) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small sizes and 0.5 s jobs (about 3 minutes)")
    p.add_argument("--runs", type=int, default=None, metavar="N",
                   help="runs per figure; medians are reported (default 3)")
    p.add_argument("--chart", metavar="FILE.svg", help="write an SVG bar chart")
    p.add_argument("--dir", metavar="DIR",
                   help="where to create the temporary work directory (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--pool-fs", metavar="FS,...",
                   help="also measure the write rows on pools on these loop-mounted file "
                   f"systems ({','.join(POOL_FS)}, or none; default: all in the full run, "
                   "none with --quick)")
    p.add_argument("--progress", action="store_true",
                   help="progress lines (one per phase) on stderr even when it is not a "
                        "terminal, or with --json")
    # hidden: tiny sizes for the CI test
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--generator", choices=("auto", "fio", "python"), default="auto",
                   help="the I/O generator: fio, the built-in Python one, or auto (fio "
                        "when installed; default)")
    if standalone:
        p.add_argument("--json", action="store_true", help="machine-readable report")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def progress_wanted(quiet: bool, forced: bool, tty: bool) -> bool:
    """Progress lines: on a terminal unless --quiet; elsewhere only with --progress."""
    return not quiet and (tty or forced)
