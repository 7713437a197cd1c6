"""One benchmark run's state (Bench) and the data path: setup (pool, daemon, volume, raw
file), every target's steady / first-write / re-write passes, interleaved over --runs,
under both cachings (tools/bench/caches.py). The pool-file-system rows are
tools/bench/poolfs.py's, the control-plane figures tools/bench/control.py's."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import caches
from .common import (
    CHUNK,
    PHASES,
    TARGETS,
    VOLUME,
    WORKLOADS,
    BenchError,
    Key,
    Log,
    MiB,
    Profile,
    _fill,
    _run,
    _vm_kib,
)
from .targets import Daemon, PlexLoop, QsdExport
from .workloads import Job, JobResult, first_write_offsets, run_fio, run_python

# the targets that also run "cached" (buffered, warm): the plain data path, where the
# targets compare both cachings; the copy-on-write rows run "direct" only
CACHED_TARGETS = ("raw", "qsd_raw", "spx")
# the targets whose sequential first-write pass gets its own no-snapshot pass right before
# it (phase "before", the paired targets' denominators: verdicts.py)
PAIRED_TARGETS = ("spx_1snap", "spx_8snap")


@dataclass
class Site:
    """Where the data-path jobs run: a pool with its daemon and volume, the raw image on
    the same file system, scratch space there (qcow2 overlay, reflink copy) and the files
    behind every target (evicted for "direct" jobs)."""
    fs: str                  # "" = the work directory's own file system
    raw: str
    vol_path: str            # MOUNT/volumes/v.img
    vol_image: str           # the pool's image of v
    scratch: str
    client: Any
    backing: list[str]       # files and directories: raw, pool, overlay, reflink copy
    snapshot_ms: list[float] = field(default_factory=list)   # snapshot.create round trips


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
    pool_fs: tuple[str, ...] = ()
    samples: dict[Key, list[float]] = field(default_factory=dict)
    latency: dict[Key, list[tuple[float, float]]] = field(default_factory=dict)
    control: dict[str, Any] = field(default_factory=dict)
    daemon: Daemon | None = None
    client: Any = None
    raw: str = ""
    loadavg_start: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))
    vol_path: str = ""
    vol_image: str = ""
    site: Site | None = None
    caching: str = "direct"
    # the most bytes of data files found cached right after an eviction ("direct"), except
    # while a background plex sync writes into the pool (spx_plex: not the job's data)
    cold_resident_max: int = 0
    plex_running: bool = False
    # this VM's free page reporting, and what the bench did about it (caches.hold_free_memory)
    free_memory: dict[str, Any] | None = None

    # ------------------------------------------------------------------ plumbing
    def job(self, job: Job) -> JobResult:
        """Run one job under the current caching (see caches.py): the target and every
        file behind it synced -- and evicted for "direct" -- first; "cached" reads
        start warm."""
        assert self.site is not None
        direct = self.caching == "direct"
        job.direct = direct
        caches.settle(job.path, self.site.backing, evict=direct)
        if direct and not self.plex_running:
            self.cold_resident_max = max(self.cold_resident_max,
                                         caches.resident_bytes(self.site.backing))
        elif not WORKLOADS[job.workload][4]:
            caches.warm(job.path, job.size)
        if self.generator == "fio":
            return run_fio(job, self.base)
        return run_python(job, self.base)

    def record(self, target: str, workload: str, phase: str, r: JobResult) -> None:
        assert self.site is not None
        key = (target, workload, phase, self.caching, self.site.fs)
        self.samples.setdefault(key, []).append(r.value)
        self.latency.setdefault(key, []).append((r.p50_us, r.p99_us))
        unit = WORKLOADS[workload][1]
        what = f"{WORKLOADS[workload][0]}" + (f" {PHASES[phase]}" if PHASES[phase] else "")
        where = f"{self.site.fs} pool, " if self.site.fs else ""
        self.log(f"  {TARGETS[target]:28} {what:28} {r.value:10.1f} {unit:5} p99 "
                 f"{r.p99_us:8.0f} us  ({where}{self.caching})")

    def read_job(self, workload: str, path: str) -> Job:
        """A read job: one pass (never a block twice) when cold, time-based when cached."""
        p = self.profile
        return Job(workload, path, p.volume_size, p.runtime,
                   time_based=self.caching == "cached")

    def pass_before(self, target: str, path: str, workload: str = "seq_write") -> None:
        """What `target`'s first-write pass is compared with, run by run: right before
        it, on the same volume with no snapshot yet, the same single cold pass. After a
        lead-in pass (the same again, not recorded), so that it follows what the first-write
        pass follows -- a pass over the volume and an eviction -- whatever target ran
        before: on this VM a pass's speed depends on which free memory its page cache gets
        (docs/performance.md, "First-write targets: like with like"). A time-based steady
        job is no comparator either: after its first second it re-writes pages it already
        has."""
        p = self.profile
        lead = self.job(Job(workload, path, p.volume_size, p.runtime, time_based=False))
        self.log(f"  (lead-in pass {lead.value:.1f} {WORKLOADS[workload][1]}, not recorded)")
        self.record(target, workload, "before", self.job(
            Job(workload, path, p.volume_size, p.runtime, time_based=False)))

    def steady(self, target: str, path: str, workloads: tuple[str, ...] = tuple(WORKLOADS)
               ) -> None:
        p = self.profile
        for w in workloads:
            job = (Job(w, path, p.volume_size, p.runtime) if WORKLOADS[w][4]
                   else self.read_job(w, path))
            self.record(target, w, "steady", self.job(job))

    def first_and_rewrite(self, target: str, path: str, workload: str,
                          fresh: Callable[[], contextlib.AbstractContextManager[str]],
                          then: tuple[str, ...] = ()) -> None:
        """Inside `fresh()` (a new snapshot set, a new overlay, a new reflink copy): the
        first-write pass, the re-write pass over exactly what it wrote, then the `then`
        steady workloads. Our snapshot targets' sequential first writes come right after
        their no-snapshot pass (pass_before), outside `fresh()`."""
        p = self.profile
        if workload == "seq_write" and target in PAIRED_TARGETS:
            self.pass_before(target, path, workload)
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
        # restored when the bench's stack closes: on every exit path (Ctrl-C included)
        self.free_memory = self.stack.enter_context(caches.hold_free_memory(
            leave=os.environ.get(caches.LEAVE_ENV) == "1"))
        if note := caches.free_memory_note(self.free_memory):
            self.log(f"note: {note}")
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
        self.raw = os.path.join(self.base, "raw.img")
        self.site = make_site("", self.client, pool_dir, mnt, self.raw, self.base,
                              p.volume_size, self.log)
        self.vol_path, self.vol_image = self.site.vol_path, self.site.vol_image

    # ------------------------------------------------------------------ data path
    def snapshots(self, n: int) -> Callable[[], contextlib.AbstractContextManager[str]]:
        @contextlib.contextmanager
        def fresh() -> Iterator[str]:
            assert self.site is not None
            site = self.site
            sets = []
            try:
                for _ in range(n):
                    t = time.perf_counter()
                    res = site.client.snapshot_create([VOLUME], context="app-rollback",
                                                      attributes=["DIFFERENTIAL"])
                    site.snapshot_ms.append((time.perf_counter() - t) * 1000)
                    sets.append(res["set_id"])
                yield site.vol_path
            finally:
                for s in sets:
                    site.client.snapshot_delete(set_id=s)
        return fresh

    def overlay(self) -> contextlib.AbstractContextManager[str]:
        assert self.site is not None
        site = self.site

        @contextlib.contextmanager
        def fresh() -> Iterator[str]:
            ovl = os.path.join(site.scratch, "overlay.qcow2")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ovl)
            _run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 f"cluster_size={CHUNK}", "-b", site.raw, "-F", "raw", ovl)
            try:
                with QsdExport(self.base, f"qcow2{site.fs}", [
                        f"driver=file,node-name=ovl-file,filename={ovl},cache.direct=off",
                        "driver=qcow2,node-name=q,file=ovl-file"], "q") as exp:
                    yield exp.path
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ovl)
        return fresh()

    def reflink(self) -> contextlib.AbstractContextManager[str]:
        """A whole-file reflink copy of the raw image (the snapshot a CoW file system gives
        for free): every first write to the raw image afterwards un-shares its extent."""
        assert self.site is not None
        site = self.site

        @contextlib.contextmanager
        def fresh() -> Iterator[str]:
            copy = os.path.join(site.scratch, "raw.reflink")
            _run("cp", "--reflink=always", site.raw, copy)
            caches.sync_file(copy, evict=False)
            try:
                yield site.raw
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(copy)
        return fresh()

    def cow_rows(self, target: str, then: tuple[str, ...] = ("seq_read", "rand_read")
                 ) -> None:
        """A copy-on-write target's rows: sequential and 4K first writes and re-writes
        (each on a fresh snapshot / overlay / reflink copy), then `then` reads."""
        assert self.site is not None
        if target == "qsd_qcow2":
            fresh: Callable[[], contextlib.AbstractContextManager[str]] = self.overlay
        elif target == "reflink":
            fresh = self.reflink
        else:
            fresh = self.snapshots(1 if target == "spx_1snap" else 8)
        path = self.site.raw if target == "reflink" else self.site.vol_path
        self.first_and_rewrite(target, path, "seq_write", fresh)
        self.first_and_rewrite(target, path, "rand_write", fresh, then=then)

    def run_target(self, target: str) -> None:
        assert self.site is not None
        if target == "raw":
            self.steady("raw", self.site.raw)
        elif target == "qsd_raw":
            with QsdExport(self.base, "raw", [
                    f"driver=file,node-name=f,filename={self.site.raw},cache.direct=off"],
                    "f") as e:
                self.steady("qsd_raw", e.path)
        elif target == "spx":
            self.steady("spx", self.site.vol_path)
        elif target in ("qsd_qcow2", "spx_1snap", "spx_8snap"):
            self.cow_rows(target)
        elif target == "spx_plex":
            syncs = self.control.setdefault("plex_loop_syncs", 0)
            for w in WORKLOADS:
                with PlexLoop(self.daemon.sock, VOLUME) as loop:  # type: ignore[union-attr]
                    self.plex_running = True
                    try:
                        self.steady("spx_plex", self.site.vol_path, (w,))
                    finally:
                        self.plex_running = False
                syncs += len(loop.syncs)
            self.control["plex_loop_syncs"] = syncs

    def data_path(self) -> None:
        targets = [t for t in TARGETS if t != "reflink"
                   and (self.use_qsd or t != "qsd_raw") and (self.use_qcow2 or t != "qsd_qcow2")]
        for r in range(self.runs):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            # the cachings alternate too: what runs first in a run is not always cold
            for caching in (("direct", "cached") if r % 2 == 0 else ("cached", "direct")):
                self.caching = caching
                run = [t for t in order if caching == "direct" or t in CACHED_TARGETS]
                self.log(f"run {r + 1}/{self.runs}, {caches.CACHING[caching]}: "
                         f"{', '.join(run)}")
                for t in run:
                    self.run_target(t)
        self.caching = "direct"


def make_site(fs: str, client: Any, pool_dir: str, mnt: str, raw: str, scratch: str,
              size: int, log: Log) -> Site:
    """Volume v on the daemon serving `pool_dir` at `mnt`, and the raw image `raw`, both
    `size` bytes and filled with incompressible data."""
    info = client.volume_create(VOLUME, size)
    vol_path = os.path.join(mnt, "volumes", f"{VOLUME}.img")
    vol_image = os.path.join(pool_dir, "luns", f"{info['id']}.img")
    if not os.path.exists(vol_image):
        raise BenchError(f"cannot find the image of volume {VOLUME} in {pool_dir}/luns")
    with open(raw, "wb") as f:
        f.truncate(size)
    t = time.perf_counter()
    _fill(raw, size)
    _fill(vol_path, size)
    log(f"filled volume {VOLUME} and the raw file ({size >> 20} MiB each"
        + (f", {fs} pool" if fs else "") + f") in {time.perf_counter() - t:.1f} s")
    return Site(fs, raw, vol_path, vol_image, scratch, client,
                [raw, pool_dir, os.path.join(scratch, "overlay.qcow2"),
                 os.path.join(scratch, "raw.reflink")])
