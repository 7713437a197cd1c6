"""The I/O generators: one Job (a workload on a path) run by fio (tools/fio/*.fio) or by
the built-in Python generator, which drives every target the same way when fio is
missing; first_write_offsets is the replayed random permutation of chunks. Every job
reports its completion-latency percentiles (p50, p99): fio's clat percentiles, or the
generator's own timing of each request."""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import random
import subprocess
import time
from dataclasses import dataclass

from .. import procgroup
from .common import CHUNK, FIO_DIR, REPLAY_JOB, WORKLOADS, BenchError, KiB, MiB


@dataclass
class Job:
    workload: str             # a WORKLOADS key
    path: str
    size: int                 # the region: [0, size)
    runtime: float            # seconds; a cap when not time_based
    time_based: bool = True   # False: one pass over the region (or the replay log)
    replay: list[int] | None = None   # 4 KiB write offsets, in order (first/re-writes)
    replay_log: str | None = None     # the same as a fio iolog file
    direct: bool = True       # O_DIRECT (a "direct" row) or buffered (a "cached" row)


@dataclass
class JobResult:
    value: float       # MiB/s for sequential workloads, IOPS for 4K ones
    io_bytes: int
    ios: int
    seconds: float
    p50_us: float = 0.0   # completion latency of one request: median
    p99_us: float = 0.0   # and 99th percentile (microseconds)


def _result(workload: str, io_bytes: int, ios: int, seconds: float, p50_us: float,
            p99_us: float) -> JobResult:
    seconds = max(seconds, 1e-6)
    unit = WORKLOADS[workload][1]
    value = io_bytes / MiB / seconds if unit == "MiB/s" else ios / seconds
    return JobResult(value, io_bytes, ios, seconds, p50_us, p99_us)


def _percentile(sorted_ns: list[int], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted latencies in ns, in microseconds."""
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, max(0, math.ceil(q / 100 * len(sorted_ns)) - 1))
    return sorted_ns[i] / 1000


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
        procgroup.kill_tree(proc.pid, proc.pid, wait=10.0)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_fio(job: Job, scratch: str, prefix: list[str] | None = None) -> JobResult:
    """fio on the job; `prefix`: what runs it (nsenter into a network namespace: it execs
    fio, the same process)."""
    label, _unit, jobfile, _bs, writes = WORKLOADS[job.workload]
    env = dict(os.environ, BENCH_FILE=job.path, BENCH_SIZE=str(job.size),
               BENCH_DIRECT="1" if job.direct else "0",
               BENCH_RUNTIME=f"{max(1, int(job.runtime * 1000))}ms",
               BENCH_TIME_BASED="1" if job.time_based else "0")
    if job.replay is not None:
        if job.replay_log is None:
            job.replay_log = os.path.join(scratch, "replay.iolog")
        write_iolog(job.replay_log, job.replay)
        env["BENCH_IOLOG"] = job.replay_log
        jobfile = REPLAY_JOB
    cmd = [*(prefix or []), "fio", "--output-format=json", os.path.join(FIO_DIR, jobfile)]
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
    # clat: for psync the whole pread/pwrite (submission latency is nil), what QD1 waits
    pct = (side.get("clat_ns") or {}).get("percentile") or {}
    return _result(job.workload, int(side["io_bytes"]), int(side["total_ios"]), seconds,
                   float(pct.get("50.000000", 0)) / 1000, float(pct.get("99.000000", 0)) / 1000)


def run_python(job: Job, scratch: str = "") -> JobResult:
    """The built-in generator (no fio): the same patterns, one synchronous request at a
    time, O_DIRECT (job.direct) when the file system accepts it."""
    _label, _unit, _jobfile, bs, writes = WORKLOADS[job.workload]
    flags = os.O_RDWR if writes else os.O_RDONLY
    try:
        fd = os.open(job.path, flags | (getattr(os, "O_DIRECT", 0) if job.direct else 0))
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
    lat: list[int] = []
    clock = time.perf_counter_ns
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
            t_io = clock()
            n = os.pwrite(fd, buf, off) if writes else os.preadv(fd, [buf], off)
            lat.append(clock() - t_io)
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
    lat.sort()
    return _result(job.workload, done, ios, seconds, _percentile(lat, 50), _percentile(lat, 99))
