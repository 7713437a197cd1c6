"""The report: the environment (tool and code versions, machine), the medians and ratios,
the project's performance targets (TARGET_SPECS, PASS/FAIL) and the text table;
`--json` is build_report's dict (stable keys, REPORT_VERSION)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

from .common import (
    CHUNK,
    COMPARATORS,
    PHASES,
    REPO,
    REPORT_VERSION,
    TARGETS,
    WORKLOADS,
    BenchError,
    KiB,
    MiB,
    _median,
    _run,
)

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
