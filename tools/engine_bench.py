"""Engine figures for the block-store issue (no FUSE): python -m tools.engine_bench [--quick]

Reports medians of repeated runs as ratios against side-by-side comparators:
snapshot commit on 1 GiB vs 1 TiB sparse volumes, sequential overwrite with 0/1/8
snapshots (syncs inline, and with the daemon's background writeback thread) beside
the disk's floor for any copy-before-write stream (cow_floor), chunk-metadata memory
for 1 TiB + 16 snapshots, plex sync vs cp --sparse=always, and the latency of 4 KiB reads
of one volume while another thread scrubs, checks or flushes another (the pool lock must
not make them wait for that I/O), beside the same reads with nothing else running.

Sections (--only): memory, commit, overwrite (0/1/8 snapshots), floor (the bare I/O
floors), pair (the 1-snapshot overwrite alternated with the floors in each repetition:
medians of paired engine/floor ratios), random (4 KiB first writes, 1 snapshot), plex,
latency. --pool-fs ext4|xfs|btrfs runs them on a fresh file system of that type in a
loop device (root), e.g. the issue-14 figure:

    python -m tools.engine_bench --pool-fs ext4 --only pair,random --runs 7
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from blockstore import Pool
from blockstore.fileio import keep_freed_memory
from tools import interrupts

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def _commit_ms(pool: Pool, vol: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        s = pool.prepare_snapshot(vol)
        t = time.perf_counter()
        pool.commit_snapshots([s.id])
        out.append((time.perf_counter() - t) * 1000)
    return out


def commit_latency(base: str, n: int) -> dict:
    pool = Pool.create(os.path.join(base, "commit"))
    pool.create_volume("small", GiB)
    pool.create_volume("huge", TiB)
    small, huge = _commit_ms(pool, "small", n), _commit_ms(pool, "huge", n)
    pool.close()
    return {"commit_1GiB_ms": statistics.median(small), "commit_1TiB_ms": statistics.median(huge),
            "commit_p99_1TiB_ms": sorted(huge)[int(0.99 * (len(huge) - 1))],
            "ratio_1TiB_vs_1GiB": statistics.median(huge) / statistics.median(small)}


class _WritebackThread:
    """The daemon's writeback loop (provider.daemon.writeback_timer) in a plain thread:
    grouped syncs run beside the writes instead of inline."""

    def __init__(self, pool: Pool) -> None:
        self.pool, self.stop = pool, False
        pool.background_writeback = True
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.pool.wait_and_writeback(0.05)

    def close(self) -> None:
        self.stop = True
        self.thread.join()   # (its wait_and_writeback returns within 0.5 s: WRITEBACK_BUSY)
        self.pool.background_writeback = False


def overwrite_once(base: str, size: int, nsnap: int, background: bool,
                   block: bytes | None = None) -> float:
    """MiB/s of one run: fill a volume of `size` with 1 MiB writes, flush, commit
    `nsnap` snapshots, then time 1 MiB sequential overwrites of all of it and a flush;
    `background`: with the daemon's writeback thread."""
    block = block if block is not None else os.urandom(MiB)
    d = os.path.join(base, f"ow-{nsnap}-{int(background)}")
    pool = Pool.create(d)
    try:
        pool.create_volume("v", size)
        for off in range(0, size, MiB):
            pool.write("v", off, block)
        pool.flush("v")
        for _ in range(nsnap):
            pool.commit_snapshots([pool.prepare_snapshot("v").id])
        wb = _WritebackThread(pool) if background else None
        try:
            t = time.perf_counter()
            for off in range(0, size, MiB):
                pool.write("v", off, block)
            pool.flush("v")
            return size / MiB / (time.perf_counter() - t)
        finally:
            if wb is not None:
                wb.close()
    finally:
        pool.close()
        shutil.rmtree(d)


def overwrite_throughput(base: str, size: int, runs: int, background: bool) -> dict:
    """Sequential 1 MiB overwrites of a written volume, then a flush, with 0, 1 and 8
    snapshots; `background`: with the daemon's writeback thread."""
    block = os.urandom(MiB)
    res: dict[str, list[float]] = {"0": [], "1": [], "8": []}
    for r in range(runs):
        for nsnap in [(0, 1, 8), (1, 8, 0), (8, 0, 1)][r % 3]:   # rotate: disk state drifts
            res[str(nsnap)].append(overwrite_once(base, size, nsnap, background, block))
    med = {k: statistics.median(v) for k, v in res.items()}
    tag = "_bg" if background else ""
    return {f"overwrite{tag}_MiBps_0snap": med["0"], f"overwrite{tag}_MiBps_1snap": med["1"],
            f"overwrite{tag}_MiBps_8snap": med["8"],
            f"overwrite{tag}_ratio_1snap_vs_0": med["1"] / med["0"],
            f"overwrite{tag}_ratio_8snap_vs_1": med["8"] / med["1"]}


def _fill(path: str, size: int, block: bytes) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    for off in range(0, size, MiB):
        os.pwrite(fd, block, off)
    os.fsync(fd)
    return fd


def floor_plain_once(base: str, size: int, block: bytes | None = None) -> float:
    """MiB/s of the no-snapshot floor: 1 MiB overwrites of a written file + fdatasync."""
    block = block if block is not None else os.urandom(MiB)
    origin = os.path.join(base, "floor.img")
    fd = _fill(origin, size, block)
    try:
        t = time.perf_counter()
        for off in range(0, size, MiB):
            os.pwrite(fd, block, off)
        os.fdatasync(fd)
        return size / MiB / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(origin)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                     ctypes.c_uint]
    return libc


def _sync_file_range_write(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE), what the engine's early writeback does
    (blockstore.fileio.start_writeback; its own here so that the floors do not depend on
    the engine version measured)."""
    _libc().sync_file_range(fd, offset, length, 2)


def floor_cow_once(base: str, size: int, block: bytes | None = None,
                   early: bool = False) -> float:
    """MiB/s of the bare copy-before-write floor (see cow_floor). `early`: with the
    engine's early writeback (sync_file_range WRITE of each 1 MiB copied and of each
    32 MiB written back to the origin), the same I/O started sooner."""
    start = _sync_file_range_write
    block = block if block is not None else os.urandom(MiB)
    origin, diff = os.path.join(base, "floor.img"), os.path.join(base, "floor.diff")
    fd = _fill(origin, size, block)
    dfd = os.open(diff, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        jobs: queue.Queue[tuple[int, int, list[int]] | None] = queue.Queue(maxsize=1)

        def syncer() -> None:
            while (job := jobs.get()) is not None:
                lo, hi, held = job
                os.fdatasync(dfd)
                os.posix_fadvise(dfd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
                for off in held:
                    os.pwrite(fd, block, off)
                if early and held:
                    start(fd, held[0], held[-1] + MiB - held[0])
        th = threading.Thread(target=syncer)
        th.start()
        t = time.perf_counter()
        held: list[int] = []
        lo = 0
        try:
            for off in range(0, size, MiB):
                os.pwrite(dfd, os.pread(fd, MiB, off), off)
                if early:
                    start(dfd, off, MiB)
                held.append(off)
                if len(held) == 32:
                    jobs.put((lo, off + MiB, held))
                    held, lo = [], off + MiB
            jobs.put((lo, size, held))
        finally:
            jobs.put(None)
            th.join()
        os.fdatasync(fd)
        return size / MiB / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.close(dfd)
        os.unlink(diff)
        os.unlink(origin)


def cow_floor(base: str, size: int, runs: int) -> dict:
    """What the disk allows a copy-before-write overwrite stream, without the engine: per
    1 MiB, read the old data and write it to a new diff file; every 32 MiB (in a second
    thread, overlapped with the next copies) fdatasync the diff file, drop its pages and
    write the held new data to the origin; fdatasync the origin at the end. Against the
    same overwrite with no copies (the 0-snapshot case). The engine cannot beat this
    ratio: it does the same I/O plus its own work (checksums, maps, syncs of the map)."""
    block = os.urandom(MiB)
    res: dict[str, list[float]] = {"plain": [], "cow": []}
    for _ in range(runs):
        res["plain"].append(floor_plain_once(base, size, block))
        res["cow"].append(floor_cow_once(base, size, block))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"floor_MiBps_plain": med["plain"], "floor_MiBps_cow": med["cow"],
            "floor_ratio_cow_vs_plain": med["cow"] / med["plain"]}


def overwrite_vs_floor(base: str, size: int, runs: int) -> dict:
    """The engine's 1 MiB sequential overwrite with 1 snapshot (inline syncs and with the
    writeback thread) beside the bare floors, alternated in each repetition (order
    rotated): per repetition the ratio engine / copy-before-write floor (cow: the issue's
    floor; cow_early: the same I/O with the engine's early writeback) and engine /
    plain overwrite; medians of those paired ratios (and of the MiB/s)."""
    block = os.urandom(MiB)
    cases: dict[str, Callable[[], float]] = {
        "eng1": lambda: overwrite_once(base, size, 1, False, block),
        "eng1_bg": lambda: overwrite_once(base, size, 1, True, block),
        "eng0": lambda: overwrite_once(base, size, 0, False, block),
        "plain": lambda: floor_plain_once(base, size, block),
        "cow": lambda: floor_cow_once(base, size, block),
        "cow_early": lambda: floor_cow_once(base, size, block, early=True),
    }
    names = list(cases)
    res: dict[str, list[float]] = {k: [] for k in names}
    for r in range(runs):
        for k in names[r % len(names):] + names[:r % len(names)]:
            res[k].append(cases[k]())
    out = {f"pair_{k}_MiBps": statistics.median(v) for k, v in res.items()}
    for eng in ("eng1", "eng1_bg", "eng0"):
        for fl in ("cow", "cow_early", "plain"):
            out[f"pair_{eng}_vs_{fl}"] = statistics.median(
                e / f for e, f in zip(res[eng], res[fl], strict=True))
    out["pair_cow_vs_plain"] = statistics.median(
        c / p for c, p in zip(res["cow"], res["plain"], strict=True))
    return out


def random_first_writes_once(base: str, size: int, background: bool,
                             seed: int = 14) -> tuple[float, float]:
    """(IOPS, process CPU microseconds per write) of 4 KiB first writes after one
    snapshot: one write at a random 4 KiB of every chunk of a written volume of `size`,
    chunks in random order, then a flush (the fio '4K randwrite, first writes' replay
    of tools/bench, without FUSE); `background`: with the daemon's writeback thread.
    The CPU figure (all threads, user + system) is steadier than IOPS on a shared
    machine."""
    import random
    rng = random.Random(seed)
    d = os.path.join(base, f"rnd-{int(background)}")
    pool = Pool.create(d)
    try:
        pool.create_volume("v", size)
        block = os.urandom(MiB)
        for off in range(0, size, MiB):
            pool.write("v", off, block)
        pool.flush("v")
        pool.commit_snapshots([pool.prepare_snapshot("v").id])
        cs = pool.chunk_size
        offsets = [c * cs + rng.randrange(cs // 4096) * 4096 for c in range(size // cs)]
        rng.shuffle(offsets)
        small = os.urandom(4096)
        wb = _WritebackThread(pool) if background else None
        try:
            t, cpu = time.perf_counter(), time.process_time()
            for off in offsets:
                pool.write("v", off, small)
            pool.flush("v")
            return (len(offsets) / (time.perf_counter() - t),
                    (time.process_time() - cpu) * 1e6 / len(offsets))
        finally:
            if wb is not None:
                wb.close()
    finally:
        pool.close()
        shutil.rmtree(d)


def random_first_writes(base: str, size: int, runs: int) -> dict:
    """random_first_writes_once inline and with the writeback thread, alternated;
    medians."""
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(runs):
        for bg in ((False, True) if r % 2 == 0 else (True, False)):
            res[bg].append(random_first_writes_once(base, size, bg, seed=r))
    return {"rand4k_IOPS_1snap": statistics.median(x[0] for x in res[False]),
            "rand4k_bg_IOPS_1snap": statistics.median(x[0] for x in res[True]),
            "rand4k_cpu_us_per_write": statistics.median(x[1] for x in res[False]),
            "rand4k_bg_cpu_us_per_write": statistics.median(x[1] for x in res[True])}


def metadata_memory(base: str, written: int) -> dict:
    """1 TiB volume, 16 snapshots, `written` bytes of first writes spread over them."""
    d = os.path.join(base, "mem")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pool = Pool.create(d)
    pool.create_volume("v", TiB)
    block = b"\x5a" * MiB
    per = written // 16
    stride = TiB // 16
    for i in range(16):
        pool.commit_snapshots([pool.prepare_snapshot("v").id])
        for off in range(0, per, MiB):
            pool.write("v", i * stride + off, block)
    entries = pool.diff_entries("v")
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pool.close()
    shutil.rmtree(d)
    return {"mem_written_GiB": written / GiB, "mem_diff_entries": entries,
            "mem_peak_rss_growth_MiB": (rss1 - rss0) / 1024}


def plex_sync(base: str, data: int, runs: int) -> dict:
    ours, cps = [], []
    for r in range(runs):
        d = os.path.join(base, f"plex{r}")
        pool = Pool.create(d)
        pool.create_volume("v", TiB)
        block = os.urandom(MiB)
        for off in range(0, data, MiB):   # data spread over the first 1/8 of the volume
            pool.write("v", off * 64, block)
        pool.flush("v")
        img = pool.image_path("v")
        assert img is not None
        t = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", img, os.path.join(base, "cp.img")], check=True)
        fd = os.open(os.path.join(base, "cp.img"), os.O_RDONLY)
        os.fdatasync(fd)   # the plex is fdatasync'ed at commit: same durability for cp
        os.close(fd)
        cps.append(time.perf_counter() - t)
        os.unlink(os.path.join(base, "cp.img"))
        t = time.perf_counter()
        s = pool.prepare_snapshot("v", "plex")
        while True:
            done, total = pool.plex_sync_step(s.id, 64 * MiB)
            if done >= total:
                break
        pool.commit_snapshots([s.id])
        ours.append(time.perf_counter() - t)
        pool.close()
        shutil.rmtree(d)
    return {"plex_sync_s": statistics.median(ours), "cp_sparse_s": statistics.median(cps),
            "plex_speed_ratio_vs_cp": statistics.median(cps) / statistics.median(ours),
            "plex_data_GiB": data / GiB}


def _pcts(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"p50": ms[len(ms) // 2], "p99": ms[int(0.99 * (len(ms) - 1))], "max": ms[-1]}


def read_latency(base: str, plex_size: int, runs: int) -> dict:
    """4 KiB reads of volume b (from the page cache) in one thread while another runs:
    nothing (idle, as long as the scrub took), a scrub of a plex of `plex_size` (its
    pages dropped first), a check() of it, a flush of `plex_size // 4` of fresh writes.
    Alternated per run; medians over runs of each percentile, in ms."""
    pool = Pool.create(os.path.join(base, "latency"))
    pool.create_volume("a", plex_size)
    pool.create_volume("b", 64 * MiB)
    block = os.urandom(MiB)
    for off in range(0, plex_size, MiB):
        pool.write("a", off, block)
    for off in range(0, 64 * MiB, MiB):
        pool.write("b", off, block)
    pool.flush("a")
    pool.flush("b")
    s = pool.prepare_snapshot("a", "plex")
    while pool.plex_sync_step(s.id, 64 * MiB)[0] < pool.snapshot(s.id).sync_total:
        pass
    pool.commit_snapshots([s.id])
    pool.seal(s.id)   # check() then verifies every chunk of it
    plex_img = pool.image_path(s.id)
    assert plex_img is not None

    def drop_plex_pages() -> None:
        fd = os.open(plex_img, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def dirty() -> None:
        for off in range(0, plex_size // 4, MiB):
            pool.write("a", off, block)

    ops = {"idle": None, "scrub": pool.scrub, "check": pool.check,
           "flush": lambda: pool.flush("a")}
    figures: dict[str, list[dict]] = {k: [] for k in ops}
    idle_for = 1.0
    for _ in range(runs):
        for name, op in ops.items():
            drop_plex_pages()
            if name == "flush":
                dirty()
            done = threading.Event()

            def background(op: Callable[[], object] | None = op,
                           done: threading.Event = done, idle_for: float = idle_for) -> None:
                if op is None:
                    time.sleep(idle_for)
                else:
                    op()
                done.set()
            t0 = time.perf_counter()
            th = threading.Thread(target=background)
            th.start()
            lat, i = [], 0
            while not done.is_set():
                off = (i * 7919 % (16 * 1024)) * 4096
                t = time.perf_counter()
                pool.read("b", off, 4096)
                lat.append((time.perf_counter() - t) * 1000)
                i += 1
                time.sleep(0.0005)   # ~2000 reads/s, as a busy FUSE client would
            th.join()
            if name == "scrub":
                idle_for = time.perf_counter() - t0
            figures[name].append(_pcts(lat))
    pool.close()
    out: dict[str, float] = {}
    for name, runs_ in figures.items():
        for pct in ("p50", "p99", "max"):
            out[f"read4k_{name}_{pct}_ms"] = statistics.median(r[pct] for r in runs_)
    out["read4k_p99_scrub_vs_idle"] = out["read4k_scrub_p99_ms"] / out["read4k_idle_p99_ms"]
    return out


POOL_FS = ("here", "ext4", "xfs", "btrfs")
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"],
        "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],   # reflink: issue 14
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}
FS_IMAGE_SIZE = 32 * GiB   # sparse; only what the figures write takes host blocks
SECTIONS = ("memory", "commit", "overwrite", "floor", "pair", "random", "plex",
            "latency")


@contextlib.contextmanager
def work_directory(pool_fs: str, parent: str | None) -> Iterator[str]:
    """A temporary work directory: below `parent` (default: the temp dir) for "here",
    else the root of a fresh filesystem of that type on a sparse image in a loop
    device (--direct-io=on: no second page cache), mounted inside the temp dir.
    Unmounted, detached and removed afterwards, also after a failure or Ctrl-C
    (tools/workdir.clean); what could not be removed is said on stderr."""
    if pool_fs == "here":
        base = tempfile.mkdtemp(prefix="spx-engine-bench-", dir=parent)
        try:
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    from fuse_mount import loopdev
    from tools import workdir
    root = tempfile.mkdtemp(prefix=f"spx-engine-bench-{pool_fs}-", dir=parent)
    try:
        img, mnt = os.path.join(root, "fs.img"), os.path.join(root, "mnt")
        with open(img, "wb") as f:
            f.truncate(FS_IMAGE_SIZE)
        os.mkdir(mnt)
        dev = loopdev.attach(img, read_only=False, direct_io=True)
        subprocess.run([*MKFS[pool_fs], dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, mnt], check=True, capture_output=True)
        yield mnt
    finally:
        left = workdir.clean(root)
        if left:
            print(f"engine_bench: left behind: {', '.join(left)}", file=sys.stderr)


def floor_ratios(out: dict) -> dict:
    """engine / floor ratios of the (unpaired) overwrite and floor sections."""
    ratios = {}
    for tag in ("", "_bg"):
        for n in ("1", "8"):
            eng = out.get(f"overwrite{tag}_MiBps_{n}snap")
            if eng is not None and "floor_MiBps_cow" in out:
                ratios[f"overwrite{tag}_{n}snap_vs_floor_cow"] = eng / out["floor_MiBps_cow"]
        eng0 = out.get(f"overwrite{tag}_MiBps_0snap")
        if eng0 is not None and "floor_MiBps_plain" in out:
            ratios[f"overwrite{tag}_0snap_vs_floor_plain"] = eng0 / out["floor_MiBps_plain"]
    return ratios


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()   # as the daemon does (blockstore/fileio.py)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--dir", default=None, help="where the work directory goes "
                    "(default: the temp dir)")
    ap.add_argument("--pool-fs", choices=POOL_FS, default="here",
                    help="run on a fresh loop-mounted filesystem of this type (xfs with "
                    "reflink=1; needs root), or 'here' (default): the file system of --dir")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    ap.add_argument("--size", type=int, default=None, help="MiB of the overwrite, floor "
                    "and pair figures (default 512; --quick 16)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=5, help="repetitions of the overwrite "
                    "figures (medians; default 5)")
    a = ap.parse_args(argv)
    only = [x for x in a.only.split(",") if x]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    size = (a.size or (16 if a.quick else 512)) * MiB
    out: dict[str, float | str] = {}
    with interrupts.stop_signals():
        try:
            with work_directory(a.pool_fs, a.dir) as base:
                # first: its figure is the growth of this process's PEAK RSS, which the
                # overwrite runs' held buffers would raise beforehand
                if "memory" in only:
                    out.update(metadata_memory(base, (256 * MiB) if a.quick else 10 * GiB))
                if "commit" in only:
                    out.update(commit_latency(base, 10 if a.quick else 50))
                if "overwrite" in only:
                    for background in (False, True):
                        out.update(overwrite_throughput(base, size, a.runs, background))
                if "floor" in only:
                    out.update(cow_floor(base, size, a.runs))
                    out.update(floor_ratios(out))
                if "pair" in only:
                    out.update(overwrite_vs_floor(base, size, a.runs))
                if "random" in only:
                    out.update(random_first_writes(base, (16 if a.quick else 1024) * MiB,
                                                   a.runs))
                if "plex" in only:
                    out.update(plex_sync(base, (32 if a.quick else 1024) * MiB, 3))
                if "latency" in only:
                    out.update(read_latency(base, (64 if a.quick else 1024) * MiB, 3))
        except KeyboardInterrupt as e:
            print("engine_bench: interrupted; work directory removed", file=sys.stderr)
            return getattr(e, "exit_code", 130)
    if a.json:
        print(json.dumps({"pool_fs": a.pool_fs, **out}, indent=1))
    else:
        print(f"{'pool_fs':32} {a.pool_fs:>10}")
        for k, v in out.items():
            print(f"{k:32} {v:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
