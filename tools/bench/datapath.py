"""One benchmark run's state (Bench) and the data path: setup (pool, daemon, volume, raw
file), every target's steady / first-write / re-write passes, interleaved over --runs.
The control-plane figures are tools/bench/control.py's."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .common import (
    CHUNK,
    PHASES,
    TARGETS,
    VOLUME,
    WORKLOADS,
    BenchError,
    Log,
    MiB,
    Profile,
    _fill,
    _run,
    _vm_kib,
)
from .targets import Daemon, PlexLoop, QsdExport
from .workloads import Job, JobResult, first_write_offsets, run_fio, run_python


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
