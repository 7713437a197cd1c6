"""What every part of the benchmark shares: sizes, workloads and targets (ids and
labels), the profiles, BenchError, the progress log and small process/file helpers."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from fuse_mount import loopdev

# the pool file systems `--pool-fs` may name (loop-mounted in the work directory): defined
# with the arguments
from .arguments import POOL_FS as POOL_FS

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
# tools/fio/*.fio, next to this package
FIO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fio")
REPO = os.path.dirname(os.path.dirname(FIO_DIR))
# 2: rows carry their caching, pool file system and latency percentiles; verdicts
# 3: the "pass" row; 4: "before" rows instead, paired targets (per-run ratios), the VM's
# free page reporting (machine.free_page_reporting)
REPORT_VERSION = 4
VOLUME = "v"
CHUNK = 64 * KiB          # the pool's chunk size = qcow2's default cluster size

# workload id -> (label, unit, fio job file, block size, writes?)
WORKLOADS: dict[str, tuple[str, str, str, int, bool]] = {
    "seq_write": ("seq write 1M", "MiB/s", "seq-write.fio", MiB, True),
    "seq_read": ("seq read 1M", "MiB/s", "seq-read.fio", MiB, False),
    "rand_read": ("4K randread", "IOPS", "rand-read.fio", 4 * KiB, False),
    "rand_write": ("4K randwrite", "IOPS", "rand-write.fio", 4 * KiB, True),
}
REPLAY_JOB = "rand-write-replay.fio"

# target id -> label. Comparators first.
TARGETS: dict[str, str] = {
    "raw": "raw file",
    "qsd_raw": "qemu-storage-daemon raw",
    "qsd_qcow2": "qemu-storage-daemon qcow2",
    "spx": "shadowplex",
    "spx_1snap": "shadowplex 1 snapshot",
    "spx_8snap": "shadowplex 8 snapshots",
    "spx_plex": "shadowplex during plex sync",
    "reflink": "raw file + reflink copy",
}
# what a row's ratios are against ("spx": the same pool without a snapshot)
COMPARATORS = ("raw", "qsd_raw", "qsd_qcow2", "reflink", "spx")
# "before": one pass over the fully written volume with no snapshot, started cold like a
# "first writes" pass and run right before it, after the same lead-in (datapath.py
# pass_before): what that first-write pass is compared with, run by run (like with like:
# a time-based "steady" job re-uses page-cache pages its first seconds allocated, and on
# this VM a pass's speed depends on what ran before it). "pass": report version 3's
# single no-snapshot pass per run (read from older reports only)
PHASES = {"steady": "", "before": "one pass before, no snapshot", "first": "first writes",
          "rewrite": "re-writes", "pass": "one pass"}
REFLINK_FS = ("xfs", "btrfs")
# a row: (target, workload, phase, caching, pool fs); pool fs "" = the work directory's
Key = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class Profile:
    name: str
    volume_size: int        # the fio volume, the raw file and the qcow2 backing file
    runtime: float          # seconds per fio job (cap for the size-bound first-write passes)
    runs: int               # default --runs
    commit_n: int           # snapshots per volume for the commit latency
    rss_written: int        # bytes of first writes spread over the 16 snapshots (RSS)
    engine_data: int        # engine-only plex sync data and metadata-memory writes
    restarts: int           # kill -9 + restart measurements
    pool_fs: tuple[str, ...] = ()   # default --pool-fs


PROFILES = {
    "full": Profile("full", 1 * GiB, 5.0, 3, 50, 1 * GiB, 1 * GiB, 3, POOL_FS),
    "quick": Profile("quick", 256 * MiB, 0.5, 3, 20, 64 * MiB, 64 * MiB, 2),
    "tiny": Profile("tiny", 32 * MiB, 0.2, 1, 5, 16 * MiB, 16 * MiB, 1),
}


class BenchError(Exception):
    """A failure of the benchmark itself (a daemon did not start, fio failed...)."""


class Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"bench [{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr,
                  flush=True)


SOCKET_PATH_MAX = 100   # bytes of a Unix socket path we use (the kernel takes 107)


def socket_dir(base: str, stack: contextlib.ExitStack) -> str:
    """Where a bench's control sockets go: its work directory, unless that path is too
    long for a Unix socket (a --dir deep down, e.g. a test's tmp_path) -- then a private
    directory in /tmp, removed when ``stack`` closes."""
    if len(os.path.join(base, "array.sock")) <= SOCKET_PATH_MAX:
        return base
    d = tempfile.mkdtemp(prefix="spxb-sock-", dir="/tmp")
    stack.callback(shutil.rmtree, d, True)
    return d


def _run(*cmd: str, timeout: float = 120) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                         cwd=REPO)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


def _mounted(path: str) -> bool:
    """True if `path` is a mount target (works for FUSE mounts on regular files and for
    dead FUSE mounts, where stat fails)."""
    return loopdev.mounted_at(os.path.realpath(path))


def _fuse_unmount(path: str) -> None:
    loopdev.unmount_ladder(os.path.realpath(path), loopdev.FUSE_UNMOUNT)


def _wait(pred: Callable[[], bool], timeout: float, what: str,
          proc: subprocess.Popen | None = None, log_path: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            tail = ""
            if log_path and os.path.exists(log_path):
                with open(log_path, errors="replace") as f:
                    tail = " | ".join(f.read().strip().splitlines()[-3:])
            raise BenchError(f"{what}: the process exited with status {proc.returncode}"
                             + (f" ({tail})" if tail else ""))
        if time.monotonic() > deadline:
            raise BenchError(f"timed out {what}")
        time.sleep(0.01)


def _stop_proc(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)])


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return float(s[max(0, math.ceil(0.9 * len(s)) - 1)])


def _fill(path: str, size: int) -> None:
    """Write every byte of `path` (1 MiB blocks of incompressible data)."""
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, block[:min(MiB, size - off)], off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _vm_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field_name} in /proc/{pid}/status")
