"""The Ceph benchmark's control-plane rows (tools/bench/rbd.py) and "where the time
goes": snapshot commit of a 4-volume set, revert and split cost on a small and a big
volume with the same data, librbd's own per-request cost from Python, and a py-spy
profile of our daemon under 4 KiB random reads."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from .common import KiB, Log, MiB, _median
from .control import WriteProbe
from .rbd_setup import THEIRS, Setup
from .workloads import Job, run_fio

SET_VOLUMES = ("c0", "c1", "c2", "c3")
SET_VOLUME_SIZE = 64 * MiB
SET_VOLUME_DATA = 4 * MiB            # written into each before the commits
# the writers' pace during the commits: the hold is known to within it; each write is
# an OSD round trip, so a faster pace would load the one-node cluster (2 cores here)
PROBE_INTERVAL = 0.01
Samples = dict[tuple[str, str, str], list[float]]   # (row, target, stat) -> values


def _write(path: str, length: int, offset: int = 0) -> None:
    """`length` random bytes at `offset` in 1 MiB writes, then fsync (through the mount:
    our daemon flushes librbd)."""
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(offset, offset + length, MiB):
            os.pwrite(fd, block[:min(MiB, offset + length - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_set(s: Setup) -> None:
    with s.client() as c:
        for name in SET_VOLUMES:
            c.volume_create(name, SET_VOLUME_SIZE)
    for name in SET_VOLUMES:
        _write(s.volume_path(name), SET_VOLUME_DATA)


def commit_round(s: Setup, n: int, samples: Samples) -> None:
    """n snapshot sets of the 4 volumes (app-rollback: no writer freezes anything here),
    each timed as the round trip of snapshot.create and as the hold the volumes' writers
    see (a paced 4 KiB O_DIRECT writer per volume: the longest write overlapping the
    call, the worst of the four); each set deleted right after (untimed)."""
    probes = [WriteProbe(s.volume_path(v), interval=PROBE_INTERVAL) for v in SET_VOLUMES]
    with contextlib.ExitStack() as st, s.client() as c:
        for p in probes:
            st.enter_context(p)
        time.sleep(0.2)
        for _ in range(n):
            t = time.perf_counter()
            res = c.snapshot_create(list(SET_VOLUMES), context="app-rollback")
            t1 = time.perf_counter()
            samples.setdefault(("commit", "spx", "round_trip"), []).append((t1 - t) * 1000)
            samples.setdefault(("commit", "spx", "value"), []).append(
                max(p.longest(t, t1) for p in probes) * 1000)
            c.snapshot_delete(set_id=res["set_id"])


def prepare_sizes(s: Setup, sizes: dict[str, int], allocated: int) -> None:
    """Volumes of the given sizes (name -> bytes), each with `allocated` bytes written
    from offset 0: the same data on every one."""
    with s.client() as c:
        for name, size in sizes.items():
            c.volume_create(name, size)
    for name in sizes:
        _write(s.volume_path(name), allocated)


def revert_split_round(s: Setup, names: list[str], allocated: int, samples: Samples,
                       log: Log) -> None:
    """Per volume, in the given order: a snapshot, the allocated range rewritten (so a
    revert has every object to copy back), revert (timed), then a split of the same
    snapshot into a new volume (timed: its allocated objects copied), the new volume
    deleted (untimed)."""
    with s.client() as c:
        for name in names:
            sid = c.snapshot_create([name], context="app-rollback")["snapshots"][0]["snapshot_id"]
            _write(s.volume_path(name), allocated)
            t = time.perf_counter()
            c.revert(sid)
            samples.setdefault(("revert", name, "value"), []).append(time.perf_counter() - t)
            t = time.perf_counter()
            c.split(sid, f"{name}-split")
            samples.setdefault(("split", name, "value"), []).append(time.perf_counter() - t)
            c.volume_delete(f"{name}-split")
            log(f"  {name}: revert {samples[('revert', name, 'value')][-1]:.2f} s, split "
                f"{samples[('split', name, 'value')][-1]:.2f} s")


def python_reads(s: Setup, runtime: float) -> dict[str, float]:
    """4 KiB random reads QD1 through librbd's Python binding in this process (the
    comparator's image, read-only: no lock taken): the binding + librbd + the OSD round
    trip, without any FUSE. IOPS and the median latency (us)."""
    image = s.image(THEIRS)
    rnd = random.Random(1)
    blocks = s.size // (4 * KiB)
    lat: list[float] = []
    try:
        deadline = time.perf_counter() + runtime
        while time.perf_counter() < deadline:
            off = rnd.randrange(blocks) * 4 * KiB
            t = time.perf_counter()
            image.read(off, 4 * KiB)
            lat.append(time.perf_counter() - t)
    finally:
        image.close()
    return {"iops": len(lat) / max(sum(lat), 1e-9), "p50_us": _median(lat) * 1e6}


# ---------------------------------------------------------------- where the time goes
def _task_ticks(pid: int) -> dict[str, int]:
    """CPU clock ticks (user + system) per thread name of a process: librbd and librados
    name their threads (msgr-worker-N, io_context_pool, safe_timer...); the others keep
    the process's name (Python's threads, libfuse's) or trio's ("Trio thread N")."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[comm] = out.get(comm, 0) + int(fields[11]) + int(fields[12])
    return out


def _process_name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def thread_cpu(pid: int, path: str, size: int, runtime: float, scratch: str
               ) -> dict[str, Any]:
    """fio 4 KiB random reads QD1 (O_DIRECT) on `path` served by process `pid`: the
    process's CPU time per request, split into its own threads (named like the process:
    Python's, or libfuse's) and Ceph's (librbd, librados, the messenger), in us."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    name = _process_name(pid)
    before = _task_ticks(pid)
    res = run_fio(Job("rand_read", path, size, runtime, time_based=True, direct=True),
                  scratch)
    after = _task_ticks(pid)
    own = ceph = 0
    ios = max(1, res.ios)
    per: dict[str, float] = {}
    for comm, ticks in after.items():
        d = ticks - before.get(comm, 0)
        per[comm] = d * tick_us / ios
        # trio names its worker threads "Trio thread N"; Ceph's threads have their names
        if comm == name or comm.startswith("Trio"):
            own += d
        else:
            ceph += d
    return {"iops": res.value, "p50_us": res.p50_us, "requests": res.ios,
            "cpu_us_per_request": (own + ceph) * tick_us / ios,
            "own_threads_us": own * tick_us / ios, "ceph_threads_us": ceph * tick_us / ios,
            "process": name, "threads_us": {k: v for k, v in sorted(
                per.items(), key=lambda kv: -kv[1]) if v > 0}}


# ---------------------------------------------------------------- the profile
# a sample's category: the first of these found in its stack, innermost frame first
CATEGORIES = (
    ("librbd + librados (native)", ("librbd", "librados", "libceph-common")),
    ("rbd binding (rbd.pyx)", ("rbd.pyx", "(rbd)", "rbd.cpython")),
    ("RbdArray (rbdarray/)", ("rbdarray/",)),
    ("thread hand-off (trio.to_thread)", ("trio/_threads", "to_thread", "thread_cache")),
    ("FUSE handlers (fuse_mount/)", ("fuse_mount/",)),
    ("pyfuse3 + libfuse", ("pyfuse3", "libfuse")),
    ("trio loop (epoll, scheduling)", ("trio/",)),
)


PROFILE_HZ = 200


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, keys in CATEGORIES:
            if any(k in frame for k in keys):
                return name
    return "other (interpreter, libc)"


def profile_daemon(s: Setup, runtime: float, log: Log) -> dict[str, Any] | None:
    """py-spy (sampling, --native, CPU only: idle threads are not counted) of our daemon's
    Python threads while fio runs 4 KiB random reads QD1 on its mount: the share of their
    CPU samples per CATEGORIES and the busiest leaf frames (librbd's own threads are not
    Python threads: thread_cpu counts them). None without py-spy."""
    # the venv's bin first: `pip install py-spy` puts it there, next to python
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or \
        shutil.which("py-spy")
    if spy is None or s.daemon is None:
        log("py-spy not found: no profile (pip install py-spy)")
        return None
    out = os.path.join(s.base, "daemon.pyspy.txt")
    duration = max(1, int(round(runtime)))
    # (--native cannot be --nonblocking: py-spy stops the process for each sample, so the
    # fio figure of this run is not a measurement)
    proc = subprocess.Popen([spy, "record", "--pid", str(s.daemon.pid), "--native",
                             "--rate", str(PROFILE_HZ), "--duration", str(duration),
                             "--format", "raw", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        fio = run_fio(Job("rand_read", s.paths["spx"], s.size, duration + 1.0,
                          time_based=True, direct=True), s.base)
        _, err = proc.communicate(timeout=duration + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0 or not os.path.exists(out):
        # a reference, not a measurement: the run goes on without it
        log(f"py-spy failed, no profile: {err.strip()[-300:]}")
        return None
    cats: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    with open(out, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            cats[classify(stack)] += n
            leaves[stack.split(";")[-1].strip()] += n
    total = sum(cats.values()) or 1
    return {"samples": total, "rate_hz": PROFILE_HZ, "fio_iops": fio.value,
            "shares": {k: v / total for k, v in cats.most_common()},
            "top_leaves": [[k, v / total] for k, v in leaves.most_common(12)]}
