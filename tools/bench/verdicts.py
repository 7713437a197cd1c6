"""The project's performance targets (TARGET_SPECS) and their verdicts: PASS, FAIL, or
"noisy" when the runs disagree about it.

A data-path target is a ratio of two rows (same caching, same pool file system) against a
threshold: of their medians, or -- a paired target (Spec.paired: a first-write pass against
the no-snapshot pass run right before it, see datapath.py) -- the median of the per-run
ratios, each run's rows divided first by their own paired pass where the spec names one
(num_ref, den_ref). Per run, because what a pass costs on this VM depends on what ran
before it (docs/performance.md, "First-write targets: like with like"): a ratio of
medians would divide one run's first writes by another run's pass. Its verdict:
  PASS / FAIL   when every pairing of the runs' samples (the range min(a)/max(b) ..
                max(a)/min(b); paired: the per-run ratios' min .. max) gives that answer
                -- or when they disagree but both rows' SPREAD (paired: the per-run
                ratios' own) is at most NOISY_SPREAD: then the median decides;
  noisy         when the pairings disagree and that SPREAD is above NOISY_SPREAD: on
                this evidence the target could go either way -- rerun (more --runs, a
                quieter machine) before believing PASS or FAIL;
  n/a           a row is missing (a comparator not installed, a pool fs not run).
Control-plane targets are single figures: PASS / FAIL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common import Key, _median

NOISY_SPREAD = 0.25   # (max - min) / median of a row's samples


@dataclass(frozen=True)
class Spec:
    id: str
    description: str
    op: str                  # ">=", "<=", "within" (|value - 1| <= threshold)
    threshold: float
    num: Key | None = None   # data-path targets: value = median(num) / median(den)
    den: Key | None = None
    # paired: value = median over the runs i of (num[i] / num_ref[i]) / (den[i] / den_ref[i])
    # (a missing ref: that side is not divided)
    paired: bool = False
    num_ref: Key | None = None
    den_ref: Key | None = None


def _k(target: str, workload: str, phase: str = "steady", caching: str = "direct",
       fs: str = "") -> Key:
    return (target, workload, phase, caching, fs)


TARGET_SPECS: list[Spec] = [
    Spec("seq_write_vs_qsd_direct", "seq write 1M >= 1.2x qemu-storage-daemon raw, O_DIRECT",
         ">=", 1.2, _k("spx", "seq_write"), _k("qsd_raw", "seq_write")),
    # both mounts write-through: every buffered write(2) is copied into the mount's page
    # cache before its request is sent (docs/performance.md "Buffered seq writes")
    Spec("seq_write_vs_qsd_cached",
         "seq write 1M >= 1.2x qemu-storage-daemon raw, buffered (both write-through)", ">=",
         1.2, _k("spx", "seq_write", caching="cached"),
         _k("qsd_raw", "seq_write", caching="cached")),
    Spec("seq_read_vs_qsd_direct", "seq read 1M >= 1.5x qemu-storage-daemon raw, both cold",
         ">=", 1.5, _k("spx", "seq_read"), _k("qsd_raw", "seq_read")),
    Spec("seq_read_vs_qsd_cached", "seq read 1M >= 1.5x qemu-storage-daemon raw, both cached",
         ">=", 1.5, _k("spx", "seq_read", caching="cached"),
         _k("qsd_raw", "seq_read", caching="cached")),
    Spec("rand_read_vs_qsd_direct", "4K randread >= 1.2x qemu-storage-daemon raw, both cold",
         ">=", 1.2, _k("spx", "rand_read"), _k("qsd_raw", "rand_read")),
    Spec("rand_read_vs_qsd_cached", "4K randread >= 1.2x qemu-storage-daemon raw, both cached",
         ">=", 1.2, _k("spx", "rand_read", caching="cached"),
         _k("qsd_raw", "rand_read", caching="cached")),
    Spec("first_write_4k_vs_qcow2", "4K first writes, 1 snapshot >= 1.5x qcow2 overlay", ">=",
         1.5, _k("spx_1snap", "rand_write", "first"), _k("qsd_qcow2", "rand_write", "first")),
    Spec("snap8_vs_snap1_4k_first", "4K first writes, 8 snapshots within 10% of 1", "within",
         0.10, _k("spx_8snap", "rand_write", "first"), _k("spx_1snap", "rand_write", "first")),
    Spec("snap8_vs_snap1_seq_first", "seq first writes, 8 snapshots within 10% of 1", "within",
         0.10, _k("spx_8snap", "seq_write", "first"), _k("spx_1snap", "seq_write", "first"),
         paired=True, num_ref=_k("spx_8snap", "seq_write", "before"),
         den_ref=_k("spx_1snap", "seq_write", "before")),
    Spec("xfs_seq_1snap_vs_0", "XFS pool: seq overwrite 1M, 1 snapshot >= 0.7x no snapshot",
         ">=", 0.7, _k("spx_1snap", "seq_write", "first", fs="xfs"),
         _k("spx_1snap", "seq_write", "before", fs="xfs"), paired=True),
    Spec("btrfs_seq_1snap_vs_0",
         "btrfs pool: seq overwrite 1M, 1 snapshot >= 0.6x no snapshot", ">=", 0.6,
         _k("spx_1snap", "seq_write", "first", fs="btrfs"),
         _k("spx_1snap", "seq_write", "before", fs="btrfs"), paired=True),
    Spec("xfs_seq_8snap_vs_1", "XFS pool: seq overwrite 1M, 8 snapshots within 10% of 1",
         "within", 0.10, _k("spx_8snap", "seq_write", "first", fs="xfs"),
         _k("spx_1snap", "seq_write", "first", fs="xfs"), paired=True,
         num_ref=_k("spx_8snap", "seq_write", "before", fs="xfs"),
         den_ref=_k("spx_1snap", "seq_write", "before", fs="xfs")),
    Spec("btrfs_seq_8snap_vs_1", "btrfs pool: seq overwrite 1M, 8 snapshots within 10% of 1",
         "within", 0.10, _k("spx_8snap", "seq_write", "first", fs="btrfs"),
         _k("spx_1snap", "seq_write", "first", fs="btrfs"), paired=True,
         num_ref=_k("spx_8snap", "seq_write", "before", fs="btrfs"),
         den_ref=_k("spx_1snap", "seq_write", "before", fs="btrfs")),
    Spec("commit_median_ms", "commit (hold) median <= 5 ms, worst of 1 GiB / 1 TiB", "<=", 5.0),
    Spec("commit_flat", "commit (hold) flat in volume size: median 1 TiB / 1 GiB <= 1.25",
         "<=", 1.25),
    Spec("plex_vs_cp", "plex sync >= 0.8x cp --sparse=always (speed)", ">=", 0.8),
]
# the row that carries a target's verdict in the table: its numerator
ROW_TARGETS: dict[Key, str] = {s.num: s.id for s in TARGET_SPECS if s.num is not None}


def _met(op: str, thr: float, v: float) -> bool:
    if op == ">=":
        return v >= thr
    if op == "<=":
        return v <= thr
    return abs(v - 1.0) <= thr


def spread(xs: list[float]) -> float:
    """SPREAD of a row: (max - min) / median of its samples."""
    m = _median(xs)
    return (max(xs) - min(xs)) / m if m else 0.0


def _series(samples: dict[Key, list[float]], key: Key, ref: Key | None
            ) -> list[float] | None:
    """A row's per-run figures, each divided by its run's `ref` figure (None: missing)."""
    a = samples.get(key)
    if not a:
        return None
    if ref is None:
        return list(a)
    r = samples.get(ref)
    if not r or len(r) != len(a) or min(r) <= 0:
        return None
    return [x / y for x, y in zip(a, r, strict=True)]


def per_run_ratios(samples: dict[Key, list[float]], s: Spec) -> list[float] | None:
    """A paired target's ratio in each run (None: a row missing, or runs unpaired)."""
    assert s.num is not None and s.den is not None
    a, b = _series(samples, s.num, s.num_ref), _series(samples, s.den, s.den_ref)
    if a is None or b is None or len(a) != len(b) or min(b) <= 0:
        return None
    return [x / y for x, y in zip(a, b, strict=True)]


def verdict(op: str, thr: float, value: float | None, lo: float | None = None,
            hi: float | None = None, spread: float = 0.0) -> str:
    """PASS / FAIL / noisy / n/a (see the module docstring). lo..hi: the value's range
    over the pairings of the runs (None: a single figure)."""
    if value is None:
        return "n/a"
    met = _met(op, thr, value)
    if lo is None or hi is None:
        return "PASS" if met else "FAIL"
    # op "within" passes on an interval: test both ends and the point nearest 1
    points = [lo, hi] + ([1.0] if op == "within" and lo < 1.0 < hi else [])
    answers = {_met(op, thr, p) for p in points}
    if len(answers) == 1 or spread <= NOISY_SPREAD:
        return "PASS" if met else "FAIL"
    return "noisy"


def evaluate_targets(samples: dict[Key, list[float]], control: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """Every TARGET_SPECS entry: value, met (on the medians), verdict, and for the
    data-path ones the range over the runs and the larger SPREAD of the two rows."""
    single: dict[str, float] = {}
    commit = control.get("commit") or {}
    if commit:
        single["commit_median_ms"] = max(commit["hold_1GiB_median_ms"],
                                         commit["hold_1TiB_median_ms"])
        single["commit_flat"] = commit["hold_ratio_1TiB_vs_1GiB"]
    plex = control.get("plex_sync") or {}
    if plex:
        single["plex_vs_cp"] = plex["daemon_ratio_vs_cp"]
    out = []
    for s in TARGET_SPECS:
        value: float | None = None
        lo = hi = None
        worst = 0.0
        runs: list[float] | None = None
        if s.paired:
            runs = per_run_ratios(samples, s)
            if runs:
                value = _median(runs)
                if len(runs) > 1:
                    lo, hi = min(runs), max(runs)
                worst = spread(runs)
        elif s.num is not None and s.den is not None:
            a, b = samples.get(s.num), samples.get(s.den)
            if a and b and min(b) > 0:
                value = _median(a) / _median(b)
                if len(a) > 1 or len(b) > 1:
                    lo, hi = min(a) / max(b), max(a) / min(b)
                worst = max(spread(a), spread(b))
        else:
            value = single.get(s.id)
        v = verdict(s.op, s.threshold, value, lo, hi, worst)
        out.append({"id": s.id, "description": s.description, "op": s.op,
                    "threshold": s.threshold, "value": value,
                    "met": None if value is None else _met(s.op, s.threshold, value),
                    "verdict": v, "range": None if lo is None else [lo, hi],
                    "spread": worst if s.num is not None and value is not None else None,
                    "paired": s.paired, "per_run": runs})
    return out


def mark(t: dict[str, Any]) -> str:
    """The table's marker of a target: 'PASS (x1.27)', 'noisy (x0.81, 0.62-1.10)'."""
    if t["value"] is None:
        return "n/a"
    v = t["value"]
    shown = f"{v:.2f} ms" if t["id"] == "commit_median_ms" else f"x{v:.2f}"
    if t["verdict"] == "noisy" and t.get("range"):
        shown += f", {t['range'][0]:.2f}-{t['range'][1]:.2f}"
    return f"{t['verdict']} ({shown})"
