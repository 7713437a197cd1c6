"""`shadowplex bench`: storage performance through the FUSE mount, side by side with the
raw image file and qemu-storage-daemon, plus control-plane figures.

    shadowplex bench [--quick] [--json] [--chart FILE.svg] [--runs N] [--dir DIR] [--quiet]
    python -m tools.bench ...            (the same, without the CLI wrapper)

What one run does (everything in a temporary directory under --dir, removed at the end,
also after Ctrl-C / SIGTERM / SIGHUP -- exit 128+N, a second signal does not cut the
cleanup short -- and after a failure except its *.log files; --keep keeps it):

1. Starts its own pool and `shadowplex serve` daemon (a subprocess, as tools/demo.py does),
   creates volume `v`, fills it; fills a raw image file of the same size on the same file
   system.
2. Runs fio (psync, O_DIRECT, QD1; the job files are tools/fio/*.fio) -- seq write 1M,
   seq read 1M, 4K random read, 4K random write -- against these targets, interleaved,
   `--runs` times (rotating the order each run), and reports medians:

      raw        the raw image file itself (the limit of the disk)
      qsd_raw    qemu-storage-daemon's FUSE export of that raw file (cache.direct=off)
      qsd_qcow2  its FUSE export of a fresh qcow2 overlay on the raw file (the copy-on-write
                 comparator: first writes allocate + copy a 64 KiB cluster)
      spx        MOUNT/volumes/v.img without snapshots
      spx_1snap  with one differential snapshot: first writes (every write hits a chunk
                 not preserved yet) and re-writes (the same offsets again) separately
      spx_8snap  the same with eight differential snapshots
      spx_plex   while plex snapshots of v are created back to back in a background
                 thread through the control socket (a plex sync is running throughout)

   "First writes": seq = a size-capped pass over the volume right after the snapshot (or
   on a fresh overlay); 4K = a replayed random permutation of the 64 KiB chunks, one 4 KiB
   write at a random 4 KiB slot of each (tools/fio/rand-write-replay.fio); "re-writes"
   repeat exactly what the first pass did.
3. Control plane: snapshot commit latency (median, p99) over N snapshots on a 1 GiB and a
   1 TiB sparse volume, through the control socket (prepare + flush & hold + commit) and
   engine-only (tools/engine_bench.commit_latency); plex sync time vs `cp --sparse=always`
   (+ fdatasync) of the same image, through the daemon and engine-only; the daemon's RSS
   (VmRSS) with a 1 TiB volume and 16 snapshots; restart-to-ready after kill -9 (until the
   mount is back and the socket answers).

Output: a table (workload x target, median MiB/s or IOPS, ratio against each comparator,
PASS/FAIL markers for the project's targets), `--json` (stable keys, see `report`), and
`--chart FILE.svg` (hand-written SVG, grouped bars per workload). Progress lines go to
stderr unless --quiet. Missing fio: the built-in Python generator drives every target (the
same one for all, so the ratios stay fair). Missing qemu-storage-daemon / qemu-img: those
columns are skipped, and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import json
import math
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fuse_mount import loopdev

from . import interrupts, procgroup, workdir

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
FIO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fio")
REPO = os.path.dirname(os.path.dirname(FIO_DIR))
REPORT_VERSION = 1
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
}
COMPARATORS = ("raw", "qsd_raw", "qsd_qcow2")
PHASES = {"steady": "", "first": "first writes", "rewrite": "re-writes"}


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


PROFILES = {
    "full": Profile("full", 1 * GiB, 5.0, 3, 50, 1 * GiB, 1 * GiB, 3),
    "quick": Profile("quick", 256 * MiB, 0.5, 3, 20, 64 * MiB, 64 * MiB, 2),
    "tiny": Profile("tiny", 32 * MiB, 0.2, 1, 5, 16 * MiB, 16 * MiB, 1),
}


class BenchError(Exception):
    """A failure of the benchmark itself (a daemon did not start, fio failed...)."""


# ============================================================================ small helpers
class Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"bench [{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr,
                  flush=True)


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


def tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, cmd in (("fio", ["fio", "--version"]),
                      ("qemu_storage_daemon", ["qemu-storage-daemon", "--version"]),
                      ("qemu_img", ["qemu-img", "--version"])):
        exe = shutil.which(cmd[0])
        if exe is None:
            out[name] = None
            continue
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            out[name] = (res.stdout.strip().splitlines() or [cmd[0]])[0]
        except (OSError, subprocess.TimeoutExpired):
            out[name] = None
    return out


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the data path had uncommitted changes (read-only
    git queries; null outside a git checkout)."""
    out: dict[str, Any] = {"package": None, "commit": None, "dirty": None}
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        out["package"] = version("shadowplex")
    with contextlib.suppress(OSError, subprocess.SubprocessError, BenchError):
        out["commit"] = _run("git", "-C", REPO, "rev-parse", "--short=12", "HEAD")
        changed = _run("git", "-C", REPO, "status", "--porcelain", "--untracked-files=no",
                       "--", "blockstore", "fuse_mount", "provider")
        out["dirty"] = bool(changed)
    return out


def machine_info(path: str) -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version(),
                            "loadavg_end": round(os.getloadavg()[0], 2)}
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_GiB"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError, subprocess.SubprocessError, BenchError):
        src, fstype = _run("findmnt", "-no", "SOURCE,FSTYPE", "--target", path).split()[:2]
        info["filesystem"] = fstype
        info["device"] = src
        dev = _run("lsblk", "-ndo", "PKNAME", src) or os.path.basename(src)
        d = json.loads(_run("lsblk", "-J", "-d", "-o", "NAME,SIZE,ROTA,MODEL,TRAN",
                            f"/dev/{dev}"))["blockdevices"][0]
        kind = "virtio" if d["name"].startswith("vd") else d.get("tran") or ""
        info["disk"] = ", ".join(x for x in (
            f"{d['name']} {d['size']}", kind, (d.get("model") or "").strip(),
            "rotational" if d.get("rota") in (True, "1") else "non-rotational") if x)
    return info


# ============================================================================ I/O generators
@dataclass
class Job:
    workload: str             # a WORKLOADS key
    path: str
    size: int                 # the region: [0, size)
    runtime: float            # seconds; a cap when not time_based
    time_based: bool = True   # False: one pass over the region (or the replay log)
    replay: list[int] | None = None   # 4 KiB write offsets, in order (first/re-writes)
    replay_log: str | None = None     # the same as a fio iolog file


@dataclass
class JobResult:
    value: float       # MiB/s for sequential workloads, IOPS for 4K ones
    io_bytes: int
    ios: int
    seconds: float


def _result(workload: str, io_bytes: int, ios: int, seconds: float) -> JobResult:
    seconds = max(seconds, 1e-6)
    unit = WORKLOADS[workload][1]
    value = io_bytes / MiB / seconds if unit == "MiB/s" else ios / seconds
    return JobResult(value, io_bytes, ios, seconds)


def write_iolog(path: str, offsets: list[int], bs: int = 4 * KiB) -> None:
    """A fio version 2 iolog of writes (replayed with replay_redirect=FILE)."""
    with open(path, "w") as f:
        f.write("fio version 2 iolog\nbench add\nbench open\n")
        f.writelines(f"bench write {off} {bs}\n" for off in offsets)
        f.write("bench close\n")


def first_write_offsets(size: int, seed: int) -> list[int]:
    """One 4 KiB write per 64 KiB chunk, chunks in random order, a random 4 KiB slot in each:
    every write is the first one to its chunk (after a snapshot / on a fresh overlay)."""
    rnd = random.Random(seed)
    chunks = list(range(size // CHUNK))
    rnd.shuffle(chunks)
    return [c * CHUNK + rnd.randrange(CHUNK // (4 * KiB)) * 4 * KiB for c in chunks]


def _run_group(cmd: list[str], env: dict[str, str], timeout: float
               ) -> subprocess.CompletedProcess[str]:
    """subprocess.run(capture_output, text) in a process group of its own that any
    exception (the timeout, an interrupt) kills as a whole, with the descendants that
    left it: fio forks a process per job, which calls setsid(). Killing fio alone --
    what subprocess.run does -- left that job writing through the mount (the daemon
    refused to stop: an interrupted bench took 30 s more) and holding our pipes (a
    second communicate() waited for ever)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, process_group=0)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        procgroup.kill_tree(proc.pid, proc.pid)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_fio(job: Job, scratch: str) -> JobResult:
    label, _unit, jobfile, _bs, writes = WORKLOADS[job.workload]
    env = dict(os.environ, BENCH_FILE=job.path, BENCH_SIZE=str(job.size),
               BENCH_RUNTIME=f"{max(1, int(job.runtime * 1000))}ms",
               BENCH_TIME_BASED="1" if job.time_based else "0")
    if job.replay is not None:
        if job.replay_log is None:
            job.replay_log = os.path.join(scratch, "replay.iolog")
        write_iolog(job.replay_log, job.replay)
        env["BENCH_IOLOG"] = job.replay_log
        jobfile = REPLAY_JOB
    cmd = ["fio", "--output-format=json", os.path.join(FIO_DIR, jobfile)]
    try:
        res = _run_group(cmd, env, timeout=job.runtime + 120)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {label} on {job.path} did not finish in time") from None
    out = res.stdout
    try:
        data = json.loads(out[out.index("{"):])
        j = data["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {label} on {job.path} failed (status {res.returncode}): "
                         f"{(res.stderr or out).strip()[-400:]}") from None
    if res.returncode != 0 or j.get("error"):
        raise BenchError(f"fio {label} on {job.path} failed (status {res.returncode}, "
                         f"error {j.get('error')}): {res.stderr.strip()[-400:]}")
    side = j["write" if writes else "read"]
    seconds = (j.get("job_runtime") or side.get("runtime") or 0) / 1000
    return _result(job.workload, int(side["io_bytes"]), int(side["total_ios"]), seconds)


def run_python(job: Job, scratch: str = "") -> JobResult:
    """The built-in generator (no fio): the same patterns, one synchronous request at a
    time, O_DIRECT when the file system accepts it."""
    _label, _unit, _jobfile, bs, writes = WORKLOADS[job.workload]
    flags = os.O_RDWR if writes else os.O_RDONLY
    try:
        fd = os.open(job.path, flags | getattr(os, "O_DIRECT", 0))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.open(job.path, flags)
    buf = mmap.mmap(-1, bs)           # page-aligned, as O_DIRECT needs
    if writes:
        buf.write(os.urandom(bs))
    rnd = random.Random(1)
    nblocks = max(1, job.size // bs)
    sequential = job.workload.startswith("seq")
    ios = done = 0
    off = 0
    t0 = time.perf_counter()
    deadline = t0 + job.runtime
    try:
        while True:
            if job.replay is not None:
                if ios >= len(job.replay):
                    break
                off = job.replay[ios]
            elif sequential:
                if off + bs > job.size:
                    if not job.time_based:
                        break
                    off = 0
            else:
                if not job.time_based and done >= job.size:
                    break
                off = rnd.randrange(nblocks) * bs
            n = os.pwrite(fd, buf, off) if writes else os.preadv(fd, [buf], off)
            if n <= 0:
                raise BenchError(f"short {'write' if writes else 'read'} at {off} of "
                                 f"{job.path}")
            done += n
            ios += 1
            if sequential and job.replay is None:
                off += bs
            if (ios & 7) == 0 and time.perf_counter() >= deadline:
                break
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return _result(job.workload, done, ios, seconds)


# ============================================================================ processes
class Daemon:
    """`shadowplex serve` on a pool, as a subprocess (its own session)."""

    def __init__(self, base: str, pool: str, mnt: str, sock: str) -> None:
        self.base, self.pool, self.mnt, self.sock = base, pool, mnt, sock
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(base, "serve.log")
        self.starts = 0

    def start(self) -> float:
        """Start and wait until the mount is up and the socket answers; returns seconds."""
        from provider.client import Client, ControlError
        self.starts += 1
        env = dict(os.environ, SHADOWPLEX_SOCKET=self.sock)
        log = open(self.log_path, "a")
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "serve", "--socket", self.sock,
                 "--pool", self.pool, "--mount", self.mnt],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=REPO)
        finally:
            log.close()

        def ready() -> bool:
            if not _mounted(self.mnt) or not os.path.ismount(self.mnt):
                return False
            try:
                with Client(self.sock, client="shadowplex-bench", timeout=5) as c:
                    c.status()
                return True
            except ControlError:
                return False
        _wait(ready, 60, "waiting for shadowplex serve", self.proc, self.log_path)
        return time.perf_counter() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop_proc(self.proc)
        if _mounted(self.mnt):
            _fuse_unmount(self.mnt)


class QsdExport:
    """qemu-storage-daemon exporting one block node through FUSE onto a regular file."""

    def __init__(self, base: str, name: str, blockdevs: list[str], node: str) -> None:
        self.path = os.path.join(base, f"{name}.export")
        self.log_path = os.path.join(base, f"{name}.qsd.log")
        self.blockdevs, self.node = blockdevs, node
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> QsdExport:
        open(self.path, "a").close()       # the mountpoint must be an existing file
        args = ["qemu-storage-daemon"]
        for b in self.blockdevs:
            args += ["--blockdev", b]
        args += ["--export", f"type=fuse,id=e,node-name={self.node},mountpoint={self.path},"
                 "writable=on"]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait(lambda: _mounted(self.path), 30, "waiting for qemu-storage-daemon's export",
                  self.proc, self.log_path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop_proc(self.proc)
        if _mounted(self.path):
            _fuse_unmount(self.path)


class PlexLoop:
    """Plex snapshots of a volume created and deleted back to back in a thread (its own
    control-socket session), so that a plex sync runs while the main thread measures."""

    def __init__(self, sock: str, volume: str) -> None:
        self.sock, self.volume = sock, volume
        self.stop_ev = threading.Event()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.syncs: list[float] = []
        self.thread = threading.Thread(target=self._run, name="plex-loop", daemon=True)

    def _run(self) -> None:
        from provider.client import Client
        try:
            with Client(self.sock, client="shadowplex-bench-plex") as c:
                while not self.stop_ev.is_set():
                    t = time.perf_counter()
                    res = c.snapshot_create([self.volume], context="app-rollback",
                                            attributes=["PLEX"],
                                            progress=lambda *_: self.started.set())
                    self.syncs.append(time.perf_counter() - t)
                    self.started.set()
                    c.snapshot_delete(set_id=res["set_id"])
        except BaseException as e:   # re-raised by the main thread
            self.error = e
            self.started.set()

    def __enter__(self) -> PlexLoop:
        self.thread.start()
        self.started.wait(10)   # the first progress event: the sync is under way
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_ev.set()
        self.thread.join(600)
        if self.error is not None and exc[0] is None:
            raise BenchError(f"the plex snapshot loop failed: {self.error}")


class WriteProbe:
    """A thread writing 4 KiB (O_DIRECT) at the start of a volume every `interval` seconds,
    keeping the start and end time of every write: how long writes wait while a snapshot is
    made (to within `interval`). Paced, so that it measures the hold without loading the
    daemon much."""

    def __init__(self, path: str, interval: float = 0.0005) -> None:
        self.path = path
        self.interval = interval
        self.times: list[tuple[float, float]] = []
        self.stop_ev = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="write-probe", daemon=True)

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError as e:
            self.error = e
            return
        buf = mmap.mmap(-1, 4 * KiB)
        buf.write(os.urandom(4 * KiB))
        clock, add = time.perf_counter, self.times.append
        try:
            while not self.stop_ev.is_set():
                t = clock()
                os.pwrite(fd, buf, 0)
                end = clock()
                add((t, end))
                pause = t + self.interval - end
                if pause > 0:
                    time.sleep(pause)
        except BaseException as e:   # re-raised by the main thread
            self.error = e
        finally:
            os.close(fd)
            buf.close()

    def __enter__(self) -> WriteProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_ev.set()
        self.thread.join(60)
        if self.error is not None and exc[0] is None:
            raise BenchError(f"the write probe on {self.path} failed: {self.error}")

    def longest(self, a: float, b: float) -> float:
        """The longest write that overlapped [a, b] (seconds)."""
        return max((e - s for s, e in self.times if s < b and e > a), default=0.0)

    def typical(self, windows: list[tuple[float, float]]) -> float:
        """The median write outside every window (seconds)."""
        import bisect
        starts = [a for a, _b in windows]
        lat = []
        for s, e in self.times:
            i = bisect.bisect_right(starts, e) - 1
            if i < 0 or s > windows[i][1]:
                lat.append(e - s)
        return _median(lat) if lat else 0.0


# ============================================================================ the benchmark
@dataclass
class Bench:
    profile: Profile
    runs: int
    base: str
    log: Log
    generator: str                      # "fio" | "python"
    use_qsd: bool
    use_qcow2: bool
    stack: contextlib.ExitStack
    samples: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    control: dict[str, Any] = field(default_factory=dict)
    daemon: Daemon | None = None
    client: Any = None
    raw: str = ""
    loadavg_start: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))
    vol_path: str = ""
    vol_image: str = ""

    # ------------------------------------------------------------------ plumbing
    def job(self, job: Job) -> JobResult:
        if self.generator == "fio":
            return run_fio(job, self.base)
        return run_python(job, self.base)

    def record(self, target: str, workload: str, phase: str, r: JobResult) -> None:
        self.samples.setdefault((target, workload, phase), []).append(r.value)
        unit = WORKLOADS[workload][1]
        what = f"{WORKLOADS[workload][0]}" + (f" {PHASES[phase]}" if PHASES[phase] else "")
        self.log(f"  {TARGETS[target]:28} {what:28} {r.value:10.1f} {unit}")

    def steady(self, target: str, path: str, workloads: tuple[str, ...] = tuple(WORKLOADS)
               ) -> None:
        for w in workloads:
            self.record(target, w, "steady", self.job(
                Job(w, path, self.profile.volume_size, self.profile.runtime)))

    def first_and_rewrite(self, target: str, path: str, workload: str,
                          fresh: Callable[[], contextlib.AbstractContextManager[str]],
                          then: tuple[str, ...] = ()) -> None:
        """Inside `fresh()` (a new snapshot set or a new overlay): the first-write pass,
        the re-write pass over exactly what it wrote, then the `then` steady workloads."""
        p = self.profile
        with fresh() as target_path:
            target_path = target_path or path
            if workload == "seq_write":
                first = self.job(Job(workload, target_path, p.volume_size, p.runtime,
                                     time_based=False))
                self.record(target, workload, "first", first)
                region = max(MiB, first.io_bytes // MiB * MiB)
                re = self.job(Job(workload, target_path, region, p.runtime, time_based=False))
            else:
                offs = first_write_offsets(p.volume_size, seed=7)
                log = os.path.join(self.base, "first-writes.iolog")
                first = self.job(Job(workload, target_path, p.volume_size, p.runtime,
                                     time_based=False, replay=offs, replay_log=log))
                self.record(target, workload, "first", first)
                done = offs[:max(1, first.ios)]
                relog = os.path.join(self.base, "re-writes.iolog")
                re = self.job(Job(workload, target_path, p.volume_size, p.runtime,
                                  time_based=False, replay=done, replay_log=relog))
            self.record(target, workload, "rewrite", re)
            self.steady(target, target_path, then)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from blockstore import Pool
        from provider.client import Client
        p = self.profile
        pool_dir, mnt = os.path.join(self.base, "pool"), os.path.join(self.base, "mnt")
        os.makedirs(mnt)
        Pool.create(pool_dir).close()
        self.daemon = Daemon(self.base, pool_dir, mnt, os.path.join(self.base, "control.sock"))
        self.stack.callback(self.daemon.stop)
        secs = self.daemon.start()
        self.control["daemon_start_s"] = secs
        self.control["rss_idle_MiB"] = _vm_kib(self.daemon.pid, "VmRSS") / 1024
        self.log(f"serve is up in {secs:.2f} s (pid {self.daemon.pid}), mount {mnt}")
        self.client = Client(self.daemon.sock, client="shadowplex-bench")
        self.stack.callback(lambda: self.client.close())
        info = self.client.volume_create(VOLUME, p.volume_size)
        self.vol_path = os.path.join(mnt, "volumes", f"{VOLUME}.img")
        self.vol_image = os.path.join(pool_dir, "luns", f"{info['id']}.img")
        if not os.path.exists(self.vol_image):
            raise BenchError(f"cannot find the image of volume {VOLUME} in {pool_dir}/luns")
        self.raw = os.path.join(self.base, "raw.img")
        with open(self.raw, "wb") as f:
            f.truncate(p.volume_size)
        t = time.perf_counter()
        _fill(self.raw, p.volume_size)
        _fill(self.vol_path, p.volume_size)
        self.log(f"filled volume {VOLUME} and the raw file ({p.volume_size >> 20} MiB each) "
                 f"in {time.perf_counter() - t:.1f} s")

    # ------------------------------------------------------------------ data path
    def snapshots(self, n: int) -> Callable[[], contextlib.AbstractContextManager[str]]:
        @contextlib.contextmanager
        def fresh() -> Iterator[str]:
            sets = []
            try:
                for _ in range(n):
                    res = self.client.snapshot_create([VOLUME], context="app-rollback",
                                                      attributes=["DIFFERENTIAL"])
                    sets.append(res["set_id"])
                yield self.vol_path
            finally:
                for s in sets:
                    self.client.snapshot_delete(set_id=s)
        return fresh

    def overlay(self) -> contextlib.AbstractContextManager[str]:
        @contextlib.contextmanager
        def fresh() -> Iterator[str]:
            ovl = os.path.join(self.base, "overlay.qcow2")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ovl)
            _run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 f"cluster_size={CHUNK}", "-b", self.raw, "-F", "raw", ovl)
            try:
                with QsdExport(self.base, "qcow2", [
                        f"driver=file,node-name=ovl-file,filename={ovl},cache.direct=off",
                        "driver=qcow2,node-name=q,file=ovl-file"], "q") as exp:
                    yield exp.path
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ovl)
        return fresh()

    def run_target(self, target: str) -> None:
        if target == "raw":
            self.steady("raw", self.raw)
        elif target == "qsd_raw":
            with QsdExport(self.base, "raw", [
                    f"driver=file,node-name=f,filename={self.raw},cache.direct=off"], "f") as e:
                self.steady("qsd_raw", e.path)
        elif target == "qsd_qcow2":
            self.first_and_rewrite("qsd_qcow2", "", "seq_write", self.overlay)
            self.first_and_rewrite("qsd_qcow2", "", "rand_write", self.overlay,
                                   then=("seq_read", "rand_read"))
        elif target == "spx":
            self.steady("spx", self.vol_path)
        elif target in ("spx_1snap", "spx_8snap"):
            n = 1 if target == "spx_1snap" else 8
            self.first_and_rewrite(target, self.vol_path, "seq_write", self.snapshots(n))
            self.first_and_rewrite(target, self.vol_path, "rand_write", self.snapshots(n),
                                   then=("seq_read", "rand_read"))
        elif target == "spx_plex":
            syncs = self.control.setdefault("plex_loop_syncs", 0)
            for w in WORKLOADS:
                with PlexLoop(self.daemon.sock, VOLUME) as loop:  # type: ignore[union-attr]
                    self.steady("spx_plex", self.vol_path, (w,))
                syncs += len(loop.syncs)
            self.control["plex_loop_syncs"] = syncs

    def data_path(self) -> None:
        targets = [t for t in TARGETS
                   if (self.use_qsd or t != "qsd_raw") and (self.use_qcow2 or t != "qsd_qcow2")]
        for r in range(self.runs):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            self.log(f"run {r + 1}/{self.runs}: {', '.join(order)}")
            for t in order:
                self.run_target(t)

    # ------------------------------------------------------------------ control plane
    def commit_latency(self) -> None:
        """N snapshots of a 1 GiB and a 1 TiB sparse volume, alternating (background noise
        hits both alike), while a 4 KiB O_DIRECT writer runs on each volume: the round trip
        of snapshot.create through the control socket (prepare + writers + flush & hold +
        commit + post-commit), and the hold as that writer sees it (the longest one of its
        writes took while the snapshot was being created)."""
        from tools import engine_bench
        assert self.daemon is not None
        n = self.profile.commit_n
        c = self.client
        out: dict[str, Any] = {"snapshots": n}
        vols = {"1GiB": ("c1g", GiB), "1TiB": ("c1t", TiB)}
        rt: dict[str, list[float]] = {k: [] for k in vols}
        windows: dict[str, list[tuple[float, float]]] = {k: [] for k in vols}
        sets: list[str] = []
        for name, size in vols.values():
            c.volume_create(name, size)
        probes = {k: WriteProbe(os.path.join(self.daemon.mnt, "volumes", f"{name}.img"))
                  for k, (name, _size) in vols.items()}
        with contextlib.ExitStack() as st:
            for pr in probes.values():
                st.enter_context(pr)
            time.sleep(0.2)
            for _ in range(n):
                for k, (name, _size) in vols.items():
                    t = time.perf_counter()
                    res = c.snapshot_create([name], context="app-rollback",
                                            attributes=["DIFFERENTIAL"])
                    t1 = time.perf_counter()
                    rt[k].append((t1 - t) * 1000)
                    windows[k].append((t, t1))
                    sets.append(res["set_id"])
        for s in sets:
            c.snapshot_delete(set_id=s)
        for k in vols:
            stalls = [probes[k].longest(a, b) * 1000 for a, b in windows[k]]
            out[f"client_{k}_median_ms"] = _median(rt[k])
            out[f"client_{k}_p99_ms"] = _p99(rt[k])
            out[f"hold_{k}_median_ms"] = _median(stalls)
            out[f"hold_{k}_p99_ms"] = _p99(stalls)
        out["client_ratio_1TiB_vs_1GiB"] = (out["client_1TiB_median_ms"]
                                            / out["client_1GiB_median_ms"])
        out["hold_ratio_1TiB_vs_1GiB"] = out["hold_1TiB_median_ms"] / out["hold_1GiB_median_ms"]
        out["write_latency_ms"] = _median([probes[k].typical(windows[k]) * 1000
                                           for k in vols])
        eng_dir = os.path.join(self.base, "engine-commit")
        os.makedirs(eng_dir)
        eng = engine_bench.commit_latency(eng_dir, n)
        shutil.rmtree(eng_dir, ignore_errors=True)
        out["engine_1GiB_median_ms"] = eng["commit_1GiB_ms"]
        out["engine_1TiB_median_ms"] = eng["commit_1TiB_ms"]
        out["engine_1TiB_p99_ms"] = eng["commit_p99_1TiB_ms"]
        out["engine_ratio_1TiB_vs_1GiB"] = eng["ratio_1TiB_vs_1GiB"]
        self.control["commit"] = out
        self.log(f"commit hold (as a writer sees it): {out['hold_1GiB_median_ms']:.2f} ms "
                 f"(1 GiB), {out['hold_1TiB_median_ms']:.2f} ms (1 TiB), p99 "
                 f"{out['hold_1TiB_p99_ms']:.2f} ms; snapshot.create round trip "
                 f"{out['client_1GiB_median_ms']:.2f} / {out['client_1TiB_median_ms']:.2f} ms; "
                 f"engine only {out['engine_1TiB_median_ms']:.3f} ms")

    def plex_vs_cp(self) -> None:
        from tools import engine_bench
        data = os.stat(self.vol_image).st_blocks * 512
        plex, cps = [], []
        copy = os.path.join(self.base, "cp.img")
        for _ in range(self.runs):
            t = time.perf_counter()
            _run("cp", "--sparse=always", self.vol_image, copy, timeout=600)
            fd = os.open(copy, os.O_RDONLY)
            try:
                os.fdatasync(fd)   # the plex is fdatasync'ed before commit: same for cp
            finally:
                os.close(fd)
            cps.append(time.perf_counter() - t)
            os.unlink(copy)
            t = time.perf_counter()
            res = self.client.snapshot_create([VOLUME], context="app-rollback",
                                              attributes=["PLEX"])
            plex.append(time.perf_counter() - t)
            self.client.snapshot_delete(set_id=res["set_id"])
        out: dict[str, Any] = {
            "data_MiB": data / MiB, "daemon_plex_s": _median(plex), "cp_sparse_s": _median(cps),
            "daemon_plex_MiBps": data / MiB / _median(plex),
            "cp_sparse_MiBps": data / MiB / _median(cps),
            "daemon_ratio_vs_cp": _median(cps) / _median(plex)}
        eng_dir = os.path.join(self.base, "engine-plex")
        os.makedirs(eng_dir)
        eng = engine_bench.plex_sync(eng_dir, self.profile.engine_data, self.runs)
        shutil.rmtree(eng_dir, ignore_errors=True)
        out.update({"engine_data_MiB": eng["plex_data_GiB"] * 1024,
                    "engine_plex_s": eng["plex_sync_s"], "engine_cp_sparse_s": eng["cp_sparse_s"],
                    "engine_ratio_vs_cp": eng["plex_speed_ratio_vs_cp"]})
        self.control["plex_sync"] = out
        self.log(f"plex sync of {data >> 20} MiB: {out['daemon_plex_MiBps']:.0f} MiB/s vs cp "
                 f"{out['cp_sparse_MiBps']:.0f} MiB/s (x{out['daemon_ratio_vs_cp']:.2f}); "
                 f"engine only x{out['engine_ratio_vs_cp']:.2f}")

    def memory(self) -> None:
        """1 TiB volume (c1t), 16 snapshots, first writes after each, read the daemon's RSS."""
        assert self.daemon is not None
        nsnap, per = 16, max(MiB, self.profile.rss_written // 16 // MiB * MiB)
        path = os.path.join(self.daemon.mnt, "volumes", "c1t.img")
        block = os.urandom(MiB)
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in range(nsnap):
                self.client.snapshot_create(["c1t"], context="app-rollback",
                                            attributes=["DIFFERENTIAL"])
                for off in range(0, per, MiB):
                    os.pwrite(fd, block, i * (TiB // nsnap) + off)
            os.fsync(fd)
        finally:
            os.close(fd)
        out: dict[str, Any] = {
            "volume_GiB": TiB / GiB, "snapshots": nsnap, "written_MiB": nsnap * per / MiB,
            "daemon_rss_MiB": _vm_kib(self.daemon.pid, "VmRSS") / 1024,
            "daemon_hwm_MiB": _vm_kib(self.daemon.pid, "VmHWM") / 1024,
            "daemon_idle_rss_MiB": self.control["rss_idle_MiB"]}
        eng_dir = os.path.join(self.base, "engine-mem")
        os.makedirs(eng_dir)
        # in a fresh interpreter: its peak RSS before the call is just the imports
        code = ("import json, resource, sys; from tools.engine_bench import metadata_memory; "
                "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
                "m = metadata_memory(sys.argv[1], int(sys.argv[2])); "
                "m['peak0'] = r0; m['peak1'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
                "print(json.dumps(m))")
        eng = json.loads(_run(sys.executable, "-c", code, eng_dir,
                              str(self.profile.engine_data), timeout=900).splitlines()[-1])
        shutil.rmtree(eng_dir, ignore_errors=True)
        out["engine_written_MiB"] = eng["mem_written_GiB"] * 1024
        out["engine_diff_entries"] = eng["mem_diff_entries"]
        # the engine in a process of its own: peak RSS after the imports, and at the end
        out["engine_process_peak_before_MiB"] = eng["peak0"] / 1024
        out["engine_process_peak_MiB"] = eng["peak1"] / 1024
        self.control["memory"] = out
        self.log(f"daemon RSS with a 1 TiB volume and 16 snapshots: "
                 f"{out['daemon_rss_MiB']:.1f} MiB (idle {out['daemon_idle_rss_MiB']:.1f} MiB)")

    def restart(self) -> None:
        assert self.daemon is not None
        self.client.close()
        times = []
        for _ in range(self.profile.restarts):
            self.daemon.kill9()
            t = time.perf_counter()
            self.daemon.start()
            times.append(time.perf_counter() - t)
        from provider.client import Client
        self.client = Client(self.daemon.sock, client="shadowplex-bench")
        self.control["restart"] = {"restarts": len(times), "ready_s": _median(times),
                                   "ready_max_s": max(times)}
        self.log(f"restart to ready after kill -9: {_median(times):.2f} s (median of "
                 f"{len(times)})")


# ============================================================================ the report
def _match(samples: dict[tuple[str, str, str], float], comparator: str, workload: str,
           phase: str) -> float | None:
    """The comparator figure a row is measured against."""
    if comparator == "qsd_qcow2":
        if WORKLOADS[workload][4]:     # writes: first vs first, else vs the re-writes
            return samples.get((comparator, workload, "first" if phase == "first"
                                else "rewrite"))
        return samples.get((comparator, workload, "steady"))
    return samples.get((comparator, workload, "steady"))


TARGET_SPECS = [
    # id, description, op, threshold
    ("seq_read_vs_qsd", "seq read 1M >= 1.5x qemu-storage-daemon raw", ">=", 1.5),
    ("seq_write_vs_qsd", "seq write 1M >= 1.2x qemu-storage-daemon raw", ">=", 1.2),
    ("rand_read_vs_qsd", "4K randread >= 1.2x qemu-storage-daemon raw", ">=", 1.2),
    ("first_write_4k_vs_qcow2", "4K first writes, 1 snapshot >= 1.0x qcow2 overlay", ">=", 1.0),
    ("snap8_vs_snap1_4k_first", "4K first writes, 8 snapshots within 10% of 1", "within", 0.10),
    ("snap8_vs_snap1_seq_first", "seq first writes, 8 snapshots within 10% of 1", "within",
     0.10),
    ("commit_median_ms", "commit (hold) median <= 5 ms, worst of 1 GiB / 1 TiB", "<=", 5.0),
    ("commit_flat", "commit (hold) flat in volume size: median 1 TiB / 1 GiB <= 1.25", "<=",
     1.25),
    ("plex_vs_cp", "plex sync >= 0.8x cp --sparse=always (speed)", ">=", 0.8),
]
# (target, workload, phase) rows that carry a target's marker in the table
ROW_TARGETS = {
    ("spx", "seq_read", "steady"): "seq_read_vs_qsd",
    ("spx", "seq_write", "steady"): "seq_write_vs_qsd",
    ("spx", "rand_read", "steady"): "rand_read_vs_qsd",
    ("spx_1snap", "rand_write", "first"): "first_write_4k_vs_qcow2",
    ("spx_8snap", "rand_write", "first"): "snap8_vs_snap1_4k_first",
    ("spx_8snap", "seq_write", "first"): "snap8_vs_snap1_seq_first",
}


def evaluate_targets(med: dict[tuple[str, str, str], float],
                     control: dict[str, Any]) -> list[dict[str, Any]]:
    def ratio(a: tuple[str, str, str], b: tuple[str, str, str]) -> float | None:
        return med[a] / med[b] if a in med and b in med else None

    values: dict[str, float | None] = {
        "seq_read_vs_qsd": ratio(("spx", "seq_read", "steady"), ("qsd_raw", "seq_read", "steady")),
        "seq_write_vs_qsd": ratio(("spx", "seq_write", "steady"),
                                  ("qsd_raw", "seq_write", "steady")),
        "rand_read_vs_qsd": ratio(("spx", "rand_read", "steady"),
                                  ("qsd_raw", "rand_read", "steady")),
        "first_write_4k_vs_qcow2": ratio(("spx_1snap", "rand_write", "first"),
                                         ("qsd_qcow2", "rand_write", "first")),
        "snap8_vs_snap1_4k_first": ratio(("spx_8snap", "rand_write", "first"),
                                         ("spx_1snap", "rand_write", "first")),
        "snap8_vs_snap1_seq_first": ratio(("spx_8snap", "seq_write", "first"),
                                          ("spx_1snap", "seq_write", "first")),
    }
    commit = control.get("commit") or {}
    if commit:
        values["commit_median_ms"] = max(commit["hold_1GiB_median_ms"],
                                         commit["hold_1TiB_median_ms"])
        values["commit_flat"] = commit["hold_ratio_1TiB_vs_1GiB"]
    plex = control.get("plex_sync") or {}
    if plex:
        values["plex_vs_cp"] = plex["daemon_ratio_vs_cp"]
    out = []
    for tid, desc, op, thr in TARGET_SPECS:
        v = values.get(tid)
        met: bool | None
        if v is None:
            met = None
        elif op == ">=":
            met = v >= thr
        elif op == "<=":
            met = v <= thr
        else:
            met = abs(v - 1.0) <= thr
        out.append({"id": tid, "description": desc, "op": op, "threshold": thr,
                    "value": v, "met": met})
    return out


def build_report(b: Bench, versions: dict[str, str | None], skipped: list[dict[str, str]],
                 elapsed: float) -> dict[str, Any]:
    med = {k: _median(v) for k, v in b.samples.items()}
    results = []
    for target in TARGETS:
        for w in WORKLOADS:
            for phase in PHASES:
                key = (target, w, phase)
                if key not in med:
                    continue
                ratios = {}
                for comp in COMPARATORS:
                    m = _match(med, comp, w, phase)
                    ratios[comp] = med[key] / m if m else None
                results.append({"target": target, "workload": w, "phase": phase,
                                "unit": WORKLOADS[w][1], "median": med[key],
                                "samples": b.samples[key], "ratios": ratios})
    return {
        "version": REPORT_VERSION,
        "profile": b.profile.name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "runs": b.runs,
        "generator": b.generator,
        "machine": {**machine_info(b.base), "loadavg_start": b.loadavg_start},
        "tools": versions,
        "code": code_version(),
        "skipped": skipped,
        "labels": {"targets": dict(TARGETS), "phases": dict(PHASES),
                   "workloads": {k: v[0] for k, v in WORKLOADS.items()}},
        "sizes": {"volume_MiB": b.profile.volume_size / MiB, "runtime_s": b.profile.runtime,
                  "chunk_KiB": CHUNK / KiB, "commit_snapshots": b.profile.commit_n},
        "results": results,
        "control": b.control,
        "targets": evaluate_targets(med, b.control),
    }


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def format_table(report: dict[str, Any]) -> str:
    targets = {t["id"]: t for t in report["targets"]}
    head = ["WORKLOAD", "TARGET", "MEDIAN", "UNIT", "SPREAD", "vs RAW", "vs QSD-RAW",
            "vs QSD-QCOW2", "TARGET MET?"]
    rows = []
    for r in report["results"]:
        wl = WORKLOADS[r["workload"]][0] + (f", {PHASES[r['phase']]}" if PHASES[r["phase"]]
                                            else "")
        tid = ROW_TARGETS.get((r["target"], r["workload"], r["phase"]))
        mark = ""
        if tid:
            t = targets[tid]
            mark = _target_mark(t)
        spread = (max(r["samples"]) - min(r["samples"])) / r["median"] * 100
        rows.append([wl, TARGETS[r["target"]], _fmt(r["median"]), r["unit"],
                     f"{spread:.0f}%" if len(r["samples"]) > 1 else "-",
                     *[_fmt(r["ratios"][c]) + ("x" if r["ratios"][c] else "")
                       for c in COMPARATORS], mark])
    rows.sort(key=lambda x: list(WORKLOADS.values()).index(
        next(v for v in WORKLOADS.values() if x[0].startswith(v[0]))))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 or i in (3, 8) else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = report["control"]
    cm, px, mem, rs = (c.get("commit"), c.get("plex_sync"), c.get("memory"), c.get("restart"))
    lines.append("")
    if cm:
        lines.append(
            f"commit hold as a writer sees it ({cm['snapshots']} snapshots each): 1 GiB median "
            f"{cm['hold_1GiB_median_ms']:.2f} ms p99 {cm['hold_1GiB_p99_ms']:.2f} ms; 1 TiB "
            f"median {cm['hold_1TiB_median_ms']:.2f} ms p99 {cm['hold_1TiB_p99_ms']:.2f} ms; "
            f"1 TiB/1 GiB x{cm['hold_ratio_1TiB_vs_1GiB']:.2f} (a write otherwise takes "
            f"{cm['write_latency_ms']:.2f} ms)")
        lines.append(
            f"snapshot.create round trip (prepare + writers + hold + commit): 1 GiB median "
            f"{cm['client_1GiB_median_ms']:.2f} ms p99 {cm['client_1GiB_p99_ms']:.2f} ms; "
            f"1 TiB median {cm['client_1TiB_median_ms']:.2f} ms p99 "
            f"{cm['client_1TiB_p99_ms']:.2f} ms; 1 TiB/1 GiB "
            f"x{cm['client_ratio_1TiB_vs_1GiB']:.2f}")
        lines.append(
            f"commit (engine only): 1 GiB {cm['engine_1GiB_median_ms']:.3f} ms, 1 TiB "
            f"{cm['engine_1TiB_median_ms']:.3f} ms p99 {cm['engine_1TiB_p99_ms']:.3f} ms")
    if px:
        lines.append(
            f"plex sync (daemon) {px['data_MiB']:.0f} MiB: {px['daemon_plex_s']:.2f} s "
            f"({px['daemon_plex_MiBps']:.0f} MiB/s) vs cp --sparse=always {px['cp_sparse_s']:.2f}"
            f" s ({px['cp_sparse_MiBps']:.0f} MiB/s): x{px['daemon_ratio_vs_cp']:.2f}; engine "
            f"only ({px['engine_data_MiB']:.0f} MiB on 1 TiB) x{px['engine_ratio_vs_cp']:.2f}")
    if mem:
        lines.append(
            f"daemon RSS, 1 TiB volume + 16 snapshots ({mem['written_MiB']:.0f} MiB of first "
            f"writes): {mem['daemon_rss_MiB']:.1f} MiB (peak {mem['daemon_hwm_MiB']:.1f}, idle "
            f"{mem['daemon_idle_rss_MiB']:.1f}); engine only ({mem['engine_written_MiB']:.0f} MiB, "
            f"{mem['engine_diff_entries']} diff entries): process peak "
            f"{mem['engine_process_peak_MiB']:.1f} MiB (after imports "
            f"{mem['engine_process_peak_before_MiB']:.1f})")
    if rs:
        lines.append(f"restart to ready after kill -9: {rs['ready_s']:.2f} s (median of "
                     f"{rs['restarts']})")
    if "plex_loop_syncs" in c:
        lines.append(f"plex syncs completed during the 'during plex sync' jobs: "
                     f"{c['plex_loop_syncs']}")
    lines.append("")
    lines.append("targets:")
    for t in report["targets"]:
        lines.append(f"  {_target_mark(t):22} {t['description']}")
    for s in report["skipped"]:
        what = "" if s["column"] == "generator" else f"column {s['column']} skipped: "
        lines.append(f"note: {what}{s['reason']}")
    m = report["machine"]
    code = report.get("code") or {}
    lines.append(f"code: shadowplex {code.get('package')} at {code.get('commit') or '?'}"
                 + (" + uncommitted data-path changes" if code.get("dirty") else ""))
    lines.append(f"{report['profile']} run, {report['runs']} runs, generator {report['generator']}"
                 f", {report['elapsed_s']:.0f} s, load average {m.get('loadavg_start')} -> "
                 f"{m.get('loadavg_end')}; MEDIAN of the runs, SPREAD = (max - min) / median, "
                 "ratios = this row / the comparator")
    return "\n".join(lines)


def _target_mark(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return "n/a"
    v = t["value"]
    shown = f"{v:.2f} ms" if t["id"] == "commit_median_ms" else f"x{v:.2f}"
    return f"{'PASS' if t['met'] else 'FAIL'} ({shown})"


# ============================================================================ the chart
COLORS = {"raw": "#9e9e9e", "qsd_raw": "#e07b39", "qsd_qcow2": "#c44e52", "spx": "#2b6cb0",
          "spx_1snap": "#4c9be8", "spx_8snap": "#7fb8f0", "spx_plex": "#2f9e74"}


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_svg(report: dict[str, Any]) -> str:
    """Four panels (one per workload), one bar per target and phase, each panel on its own
    scale; hatched bars are re-writes."""
    panel_w, panel_h, top, left = 560, 300, 70, 60
    width, height = 2 * panel_w + 40, 2 * panel_h + top + 90
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="white" '
           'fill-opacity="0.0"/><line x1="0" y1="0" x2="0" y2="6" stroke="white" '
           'stroke-width="2"/></pattern></defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" '
           f'font-weight="bold">shadowplex bench ({_esc(report["profile"])}, medians of '
           f'{report["runs"]} runs, {_esc(report["generator"])}, psync O_DIRECT QD1)</text>',
           f'<text x="{width / 2}" y="42" text-anchor="middle" fill="#555">'
           f'{_esc(report["date"])} - {_esc(str(report["machine"].get("nproc")))} CPUs, '
           f'kernel {_esc(str(report["machine"].get("kernel")))}; higher is better; hatched = '
           f're-writes, solid snapshot bars = first writes</text>']
    for i, w in enumerate(WORKLOADS):
        px = 20 + (i % 2) * (panel_w + 20)
        py = top + (i // 2) * (panel_h + 30)
        rows = [r for r in report["results"] if r["workload"] == w]
        label, unit = WORKLOADS[w][0], WORKLOADS[w][1]
        out.append(f'<text x="{px + panel_w / 2}" y="{py}" text-anchor="middle" '
                   f'font-size="13" font-weight="bold">{_esc(label)} ({unit})</text>')
        if not rows:
            continue
        vmax = max(r["median"] for r in rows) * 1.15
        ax_x, ax_y, ax_h = px + left, py + 20, panel_h - 90
        ax_w = panel_w - left - 10
        # grid and scale
        step = 10 ** math.floor(math.log10(vmax / 4)) if vmax > 0 else 1
        for mult in (1, 2, 5, 10):
            if vmax / (step * mult) <= 6:
                step *= mult
                break
        g = 0.0
        while g <= vmax:
            y = ax_y + ax_h - g / vmax * ax_h
            out.append(f'<line x1="{ax_x}" y1="{y:.1f}" x2="{ax_x + ax_w}" y2="{y:.1f}" '
                       f'stroke="#e5e5e5"/>')
            out.append(f'<text x="{ax_x - 4}" y="{y + 4:.1f}" text-anchor="end" '
                       f'fill="#555">{g:,.0f}</text>')
            g += step
        out.append(f'<line x1="{ax_x}" y1="{ax_y + ax_h}" x2="{ax_x + ax_w}" '
                   f'y2="{ax_y + ax_h}" stroke="#333"/>')
        slot = ax_w / len(rows)
        bw = slot * 0.7
        for j, r in enumerate(rows):
            h = r["median"] / vmax * ax_h
            x = ax_x + j * slot + (slot - bw) / 2
            y = ax_y + ax_h - h
            color = COLORS[r["target"]]
            name = TARGETS[r["target"]] + (f", {PHASES[r['phase']]}" if PHASES[r["phase"]]
                                           else "")
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                       f'fill="{color}"><title>{_esc(name)}: {r["median"]:,.1f} {unit}'
                       f'</title></rect>')
            if r["phase"] == "rewrite":
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                           f'fill="url(#hatch)"/>')
            out.append(f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                       f'font-size="9">{_fmt(r["median"])}</text>')
            short = {"raw": "raw", "qsd_raw": "qsd raw", "qsd_qcow2": "qsd qcow2",
                     "spx": "spx", "spx_1snap": "spx 1 snap", "spx_8snap": "spx 8 snaps",
                     "spx_plex": "spx plex sync"}[r["target"]]
            short += {"steady": "", "first": " first", "rewrite": " rewr."}[r["phase"]]
            tx, ty = x + bw / 2, ax_y + ax_h + 8
            out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="end" font-size="9" '
                       f'transform="rotate(-40 {tx:.1f} {ty:.1f})">{_esc(short)}</text>')
    ly = height - 22
    lx = 20.0
    for t, label in TARGETS.items():
        out.append(f'<rect x="{lx:.0f}" y="{ly - 10}" width="12" height="12" '
                   f'fill="{COLORS[t]}"/>')
        out.append(f'<text x="{lx + 16:.0f}" y="{ly}">{_esc(label)}</text>')
        lx += 34 + 6.4 * len(label)
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ============================================================================ entry points
def add_arguments(p: argparse.ArgumentParser, standalone: bool = False) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small sizes and 0.5 s jobs (under 2 minutes)")
    p.add_argument("--runs", type=int, default=None, metavar="N",
                   help="runs per figure; medians are reported (default 3)")
    p.add_argument("--chart", metavar="FILE.svg", help="write an SVG bar chart")
    p.add_argument("--dir", metavar="DIR",
                   help="where to create the temporary work directory (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--progress", action="store_true",
                   help="progress lines on stderr even when it is not a terminal")
    # hidden: tiny sizes for the CI test; force the generator
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--generator", choices=("auto", "fio", "python"), default="auto",
                   help=argparse.SUPPRESS)
    if standalone:
        p.add_argument("--json", action="store_true", help="machine-readable report")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def progress_wanted(quiet: bool, forced: bool, tty: bool) -> bool:
    """Progress lines: on a terminal unless --quiet; elsewhere only with --progress."""
    return not quiet and (tty or forced)


def run(args: argparse.Namespace) -> int:
    quiet = not progress_wanted(bool(getattr(args, "quiet", False)),
                                bool(getattr(args, "progress", False)), sys.stderr.isatty())
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
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 not found (apt install fuse3)")
    if problems:
        print(f"shadowplex bench: error: the benchmark mounts FUSE file systems: "
              f"{'; '.join(problems)}", file=sys.stderr)
        return 1
    versions = tool_versions()
    skipped: list[dict[str, str]] = []
    gen = args.generator
    if gen == "auto":
        gen = "fio" if versions["fio"] else "python"
        if gen == "python":
            skipped.append({"column": "generator", "reason": "fio not found (apt install fio): the "
                            "built-in Python generator drives every target"})
    elif gen == "fio" and not versions["fio"]:
        print("shadowplex bench: error: --generator fio but fio is not installed",
              file=sys.stderr)
        return 1
    use_qsd = versions["qemu_storage_daemon"] is not None
    use_qcow2 = use_qsd and versions["qemu_img"] is not None
    if not use_qsd:
        skipped.append({"column": "qsd_raw", "reason": "qemu-storage-daemon not found "
                        "(apt install qemu-system-common)"})
    if not use_qcow2:
        skipped.append({"column": "qsd_qcow2", "reason": "qemu-storage-daemon or qemu-img not "
                        "found (apt install qemu-system-common qemu-utils)"})
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
                f"{profile.runtime:g} s jobs, generator {gen}; work directory {base}")
            with contextlib.ExitStack() as stack:
                b = Bench(profile, runs, base, log, gen, use_qsd, use_qcow2, stack)
                b.setup()
                b.data_path()
                b.commit_latency()
                b.plex_vs_cp()
                b.memory()
                b.restart()
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
    p = argparse.ArgumentParser(prog="python -m tools.bench",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(p, standalone=True)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
