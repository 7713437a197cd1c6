"""Control-plane figures on a running Bench: snapshot commit latency (and the hold a
writer sees, WriteProbe), plex sync vs cp, the daemon's memory, restart to ready after
kill -9 -- through the daemon and engine-only (tools/engine_bench.py)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .common import VOLUME, BenchError, GiB, KiB, MiB, TiB, _median, _p99, _run, _vm_kib

if TYPE_CHECKING:
    from .datapath import Bench


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
        except BaseException as e:   # noqa: BLE001 - re-raised by the main thread
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




def commit_latency(b: Bench) -> None:
    """N snapshots of a 1 GiB and a 1 TiB sparse volume, alternating (background noise
    hits both alike), while a 4 KiB O_DIRECT writer runs on each volume: the round trip
    of snapshot.create through the control socket (prepare + writers + flush & hold +
    commit + post-commit), and the hold as that writer sees it (the longest one of its
    writes took while the snapshot was being created)."""
    from tools import engine_bench
    assert b.daemon is not None
    n = b.profile.commit_n
    c = b.client
    out: dict[str, Any] = {"snapshots": n}
    vols = {"1GiB": ("c1g", GiB), "1TiB": ("c1t", TiB)}
    rt: dict[str, list[float]] = {k: [] for k in vols}
    windows: dict[str, list[tuple[float, float]]] = {k: [] for k in vols}
    sets: list[str] = []
    for name, size in vols.values():
        c.volume_create(name, size)
    probes = {k: WriteProbe(os.path.join(b.daemon.mnt, "volumes", f"{name}.img"))
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
    eng_dir = os.path.join(b.base, "engine-commit")
    os.makedirs(eng_dir)
    eng = engine_bench.commit_latency(eng_dir, n)
    shutil.rmtree(eng_dir, ignore_errors=True)
    out["engine_1GiB_median_ms"] = eng["commit_1GiB_ms"]
    out["engine_1TiB_median_ms"] = eng["commit_1TiB_ms"]
    out["engine_1TiB_p99_ms"] = eng["commit_p99_1TiB_ms"]
    out["engine_ratio_1TiB_vs_1GiB"] = eng["ratio_1TiB_vs_1GiB"]
    b.control["commit"] = out
    b.log(f"commit hold (as a writer sees it): {out['hold_1GiB_median_ms']:.2f} ms "
             f"(1 GiB), {out['hold_1TiB_median_ms']:.2f} ms (1 TiB), p99 "
             f"{out['hold_1TiB_p99_ms']:.2f} ms; snapshot.create round trip "
             f"{out['client_1GiB_median_ms']:.2f} / {out['client_1TiB_median_ms']:.2f} ms; "
             f"engine only {out['engine_1TiB_median_ms']:.3f} ms")

def plex_vs_cp(b: Bench) -> None:
    from tools import engine_bench
    data = os.stat(b.vol_image).st_blocks * 512
    plex, cps = [], []
    copy = os.path.join(b.base, "cp.img")
    for _ in range(b.runs):
        t = time.perf_counter()
        _run("cp", "--sparse=always", b.vol_image, copy, timeout=600)
        fd = os.open(copy, os.O_RDONLY)
        try:
            os.fdatasync(fd)   # the plex is fdatasync'ed before commit: same for cp
        finally:
            os.close(fd)
        cps.append(time.perf_counter() - t)
        os.unlink(copy)
        t = time.perf_counter()
        res = b.client.snapshot_create([VOLUME], context="app-rollback",
                                          attributes=["PLEX"])
        plex.append(time.perf_counter() - t)
        b.client.snapshot_delete(set_id=res["set_id"])
    out: dict[str, Any] = {
        "data_MiB": data / MiB, "daemon_plex_s": _median(plex), "cp_sparse_s": _median(cps),
        "daemon_plex_MiBps": data / MiB / _median(plex),
        "cp_sparse_MiBps": data / MiB / _median(cps),
        "daemon_ratio_vs_cp": _median(cps) / _median(plex)}
    eng_dir = os.path.join(b.base, "engine-plex")
    os.makedirs(eng_dir)
    eng = engine_bench.plex_sync(eng_dir, b.profile.engine_data, b.runs)
    shutil.rmtree(eng_dir, ignore_errors=True)
    out.update({"engine_data_MiB": eng["plex_data_GiB"] * 1024,
                "engine_plex_s": eng["plex_sync_s"], "engine_cp_sparse_s": eng["cp_sparse_s"],
                "engine_ratio_vs_cp": eng["plex_speed_ratio_vs_cp"]})
    b.control["plex_sync"] = out
    b.log(f"plex sync of {data >> 20} MiB: {out['daemon_plex_MiBps']:.0f} MiB/s vs cp "
             f"{out['cp_sparse_MiBps']:.0f} MiB/s (x{out['daemon_ratio_vs_cp']:.2f}); "
             f"engine only x{out['engine_ratio_vs_cp']:.2f}")

def memory(b: Bench) -> None:
    """1 TiB volume (c1t), 16 snapshots, first writes after each, read the daemon's RSS."""
    assert b.daemon is not None
    nsnap, per = 16, max(MiB, b.profile.rss_written // 16 // MiB * MiB)
    path = os.path.join(b.daemon.mnt, "volumes", "c1t.img")
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(nsnap):
            b.client.snapshot_create(["c1t"], context="app-rollback",
                                        attributes=["DIFFERENTIAL"])
            for off in range(0, per, MiB):
                os.pwrite(fd, block, i * (TiB // nsnap) + off)
        os.fsync(fd)
    finally:
        os.close(fd)
    out: dict[str, Any] = {
        "volume_GiB": TiB / GiB, "snapshots": nsnap, "written_MiB": nsnap * per / MiB,
        "daemon_rss_MiB": _vm_kib(b.daemon.pid, "VmRSS") / 1024,
        "daemon_hwm_MiB": _vm_kib(b.daemon.pid, "VmHWM") / 1024,
        "daemon_idle_rss_MiB": b.control["rss_idle_MiB"]}
    eng_dir = os.path.join(b.base, "engine-mem")
    os.makedirs(eng_dir)
    # in a fresh interpreter: its peak RSS before the call is just the imports
    code = ("import json, resource, sys; from tools.engine_bench import metadata_memory; "
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "m = metadata_memory(sys.argv[1], int(sys.argv[2])); "
            "m['peak0'] = r0; m['peak1'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "print(json.dumps(m))")
    eng = json.loads(_run(sys.executable, "-c", code, eng_dir,
                          str(b.profile.engine_data), timeout=900).splitlines()[-1])
    shutil.rmtree(eng_dir, ignore_errors=True)
    out["engine_written_MiB"] = eng["mem_written_GiB"] * 1024
    out["engine_diff_entries"] = eng["mem_diff_entries"]
    # the engine in a process of its own: peak RSS after the imports, and at the end
    out["engine_process_peak_before_MiB"] = eng["peak0"] / 1024
    out["engine_process_peak_MiB"] = eng["peak1"] / 1024
    b.control["memory"] = out
    b.log(f"daemon RSS with a 1 TiB volume and 16 snapshots: "
             f"{out['daemon_rss_MiB']:.1f} MiB (idle {out['daemon_idle_rss_MiB']:.1f} MiB)")

def restart(b: Bench) -> None:
    assert b.daemon is not None
    b.client.close()
    times = []
    for _ in range(b.profile.restarts):
        b.daemon.kill9()
        t = time.perf_counter()
        b.daemon.start()
        times.append(time.perf_counter() - t)
    from provider.client import Client
    b.client = Client(b.daemon.sock, client="shadowplex-bench")
    b.control["restart"] = {"restarts": len(times), "ready_s": _median(times),
                               "ready_max_s": max(times)}
    b.log(f"restart to ready after kill -9: {_median(times):.2f} s (median of "
             f"{len(times)})")
