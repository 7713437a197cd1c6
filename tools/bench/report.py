"""The report: the environment (tool and code versions, machine), the medians, latency
percentiles and ratios of every row (workload x target x caching x pool file system), the
verdicts of the project's targets (verdicts.py) and the text tables; `--json` is
build_report's dict (stable keys, REPORT_VERSION)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

from .caches import CACHING, free_memory_note
from .common import (
    CHUNK,
    COMPARATORS,
    PHASES,
    REPO,
    REPORT_VERSION,
    TARGETS,
    WORKLOADS,
    BenchError,
    Key,
    KiB,
    MiB,
    _median,
    _run,
)
from .verdicts import NOISY_SPREAD, ROW_TARGETS, evaluate_targets, mark, spread

if TYPE_CHECKING:
    from .datapath import Bench


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
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                info["memory_GiB"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
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



def _match(med: dict[Key, float], comparator: str, key: Key) -> float | None:
    """The comparator figure a row is measured against: the same workload, caching and
    pool file system; a copy-on-write comparator's first writes for first writes, its
    re-writes for the rest; "spx" (no snapshot) its steady figure (a first-write pass
    with a pass of its own before it is divided by that instead: _ratio)."""
    _t, workload, phase, caching, fs = key
    if comparator in ("qsd_qcow2", "reflink") and WORKLOADS[workload][4]:
        return med.get((comparator, workload, "first" if phase == "first" else "rewrite",
                        caching, fs))
    return med.get((comparator, workload, "steady", caching, fs))


def _ratio(samples: dict[Key, list[float]], med: dict[Key, float], comparator: str,
           key: Key) -> float | None:
    """A row's ratio against a comparator: of the medians; but a first-write pass against
    no snapshot ("spx") is divided run by run by the no-snapshot pass run right before it
    (its "before" row), the median of those ratios (as its target: verdicts.py)."""
    target, workload, phase, caching, fs = key
    if comparator == "spx" and phase == "first":
        a, before = samples[key], samples.get((target, workload, "before", caching, fs))
        if before and len(before) == len(a) and min(before) > 0:
            return _median([x / y for x, y in zip(a, before, strict=True)])
    m = _match(med, comparator, key)
    return med[key] / m if m else None


def _order(key: Key, pool_fs: tuple[str, ...]) -> tuple[int, ...]:
    t, w, ph, c, fs = key
    return ((list(pool_fs).index(fs) + 1) if fs in pool_fs else 0, list(WORKLOADS).index(w),
            list(CACHING).index(c), list(TARGETS).index(t), list(PHASES).index(ph))


def build_report(b: Bench, versions: dict[str, str | None], skipped: list[dict[str, str]],
                 elapsed: float) -> dict[str, Any]:
    med = {k: _median(v) for k, v in b.samples.items()}
    fs_order = tuple(b.pool_fs)
    results = []
    for key in sorted(med, key=lambda k: _order(k, fs_order)):
        target, w, phase, caching, fs = key
        lat = b.latency.get(key) or []
        results.append({
            "target": target, "workload": w, "phase": phase, "caching": caching,
            "pool_fs": fs, "unit": WORKLOADS[w][1], "median": med[key],
            "samples": b.samples[key], "spread": spread(b.samples[key]),
            # the median over the runs of each run's percentile
            "p50_us": _median([x[0] for x in lat]) if lat else None,
            "p99_us": _median([x[1] for x in lat]) if lat else None,
            "latency_samples": [list(x) for x in lat],
            "ratios": {c: _ratio(b.samples, med, c, key) for c in COMPARATORS}})
    return {
        "version": REPORT_VERSION,
        "profile": b.profile.name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "runs": b.runs,
        "generator": b.generator,
        "machine": {**machine_info(b.base), "loadavg_start": b.loadavg_start,
                    "free_page_reporting": b.free_memory},
        "tools": versions,
        "code": code_version(),
        "skipped": skipped,
        "caching": {"modes": dict(CACHING), "qsd_cache_direct": "off",
                    "cold_resident_max_KiB": b.cold_resident_max / KiB},
        "pool_fs": list(fs_order),
        "labels": {"targets": dict(TARGETS), "phases": dict(PHASES),
                   "workloads": {k: v[0] for k, v in WORKLOADS.items()},
                   "caching": dict(CACHING)},
        "sizes": {"volume_MiB": b.profile.volume_size / MiB, "runtime_s": b.profile.runtime,
                  "chunk_KiB": CHUNK / KiB, "commit_snapshots": b.profile.commit_n},
        "results": results,
        "control": b.control,
        "targets": evaluate_targets(b.samples, b.control),
    }


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


COLUMNS = {"raw": "vs RAW", "qsd_raw": "vs QSD-RAW", "qsd_qcow2": "vs QSD-QCOW2",
           "reflink": "vs REFLINK", "spx": "vs NO SNAP"}
MAIN_COMPARATORS = ("raw", "qsd_raw", "qsd_qcow2")
FS_COMPARATORS = ("raw", "qsd_qcow2", "reflink", "spx")


def _table(rows_in: list[dict[str, Any]], targets: dict[str, dict[str, Any]],
           comparators: tuple[str, ...], with_fs: bool) -> list[str]:
    head = (["FS"] if with_fs else []) + [
        "WORKLOAD", "TARGET", "CACHING", "MEDIAN", "UNIT", "SPREAD", "P50 us", "P99 us",
        *[COLUMNS[c] for c in comparators], "TARGET MET?"]
    left = {0, 1, 2} | ({3} if with_fs else set())     # text columns, and UNIT
    unit_col = head.index("UNIT")
    rows = []
    for r in rows_in:
        wl = WORKLOADS[r["workload"]][0] + (f", {PHASES[r['phase']]}" if PHASES[r["phase"]]
                                            else "")
        tid = ROW_TARGETS.get((r["target"], r["workload"], r["phase"], r["caching"],
                               r["pool_fs"]))
        rows.append(([r["pool_fs"]] if with_fs else []) + [
            wl, TARGETS[r["target"]], CACHING[r["caching"]], _fmt(r["median"]), r["unit"],
            f"{r['spread'] * 100:.0f}%" if len(r["samples"]) > 1 else "-",
            _fmt(r["p50_us"]), _fmt(r["p99_us"]),
            *[_fmt(r["ratios"][c]) + ("x" if r["ratios"][c] else "") for c in comparators],
            mark(targets[tid]) if tid else ""])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i in left or i in (unit_col, len(head) - 1)
                       else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(report: dict[str, Any]) -> str:
    targets = {t["id"]: t for t in report["targets"]}
    main = [r for r in report["results"] if not r["pool_fs"]]
    on_fs = [r for r in report["results"] if r["pool_fs"]]
    lines = _table(main, targets, MAIN_COMPARATORS, with_fs=False)
    if on_fs:
        lines += ["", "pool file systems (loop-mounted in the work directory; pool, raw image, "
                  "qcow2 overlay and reflink copy on it):"]
        lines += _table(on_fs, targets, FS_COMPARATORS, with_fs=True)
    c = report["control"]
    for fs, x in (c.get("pool_fs") or {}).items():
        if x.get("reflink"):
            lines.append(f"{fs} pool: reflink copy (cp --reflink=always + fsync) " + ", ".join(
                f"{e['extents']:,} extents {e['create_ms']:.1f} ms" for e in x["reflink"])
                + f"; our snapshot.create {x['snapshot_create_median_ms']:.1f} ms (median)")
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
        lines.append(f"  {mark(t):26} {t['description']}")
    for s in report["skipped"]:
        what = "" if s["column"] == "generator" else f"column {s['column']} skipped: "
        lines.append(f"note: {what}{s['reason']}")
    m = report["machine"]
    code = report.get("code") or {}
    cold = report["caching"].get("cold_resident_max_KiB")
    lines.append(
        "caching: O_DIRECT, cold = fio O_DIRECT, every file behind every target written back "
        f"and evicted before each job, reads one pass (at most {cold:,.0f} KiB of those files "
        "stayed cached); buffered, warm = fio "
        "buffered, reads warmed first; qemu-storage-daemon cache.direct=off in both "
        "(both daemons use the pool file system's page cache). The FUSE mounts' own page "
        "cache in buffered rows: both write-through (each write(2) is copied into the "
        "mount's page cache, then sent as one FUSE WRITE of its size and answered after "
        "the daemon's pwrite), both keep what was written or read until a getattr sees a "
        "new mtime (ours: after any write; qemu-storage-daemon's: always, its mtime is the "
        "time of the getattr); at open ours keeps it (keep_cache), qemu-storage-daemon's "
        "drops it")
    if note := free_memory_note(m.get("free_page_reporting")):
        lines.append(f"memory: {note}")
    lines.append(f"code: shadowplex {code.get('package')} at {code.get('commit') or '?'}"
                 + (" + uncommitted data-path changes" if code.get("dirty") else ""))
    lines.append(f"{report['profile']} run, {report['runs']} runs, generator {report['generator']}"
                 f", {report['elapsed_s']:.0f} s, load average {m.get('loadavg_start')} -> "
                 f"{m.get('loadavg_end')}; MEDIAN of the runs, SPREAD = (max - min) / median, "
                 "P50/P99 = completion latency (median of the runs' percentiles), ratios = this "
                 f"row / the comparator (same caching and pool); noisy = the runs disagree on "
                 f"the target and a SPREAD > {NOISY_SPREAD:.0%}")
    return "\n".join(lines)
