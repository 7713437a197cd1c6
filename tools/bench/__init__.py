"""`shadowplex bench`: storage performance through the FUSE mount, side by side with the
raw image file and qemu-storage-daemon, plus control-plane figures.

    shadowplex bench [--quick] [--json] [--chart FILE.svg] [--runs N] [--dir DIR] [--quiet]
                     [--pool-fs ext4,xfs,btrfs|none]
    python -m tools.bench ...            (the same, without the CLI wrapper)

What one run does (everything in a temporary directory under --dir, removed at the end,
also after Ctrl-C / SIGTERM / SIGHUP -- exit 128+N, a second signal does not cut the
cleanup short -- and after a failure except its *.log files; --keep keeps it):

1. Starts its own pool and `shadowplex serve` daemon (a subprocess, as tools/demo.py does),
   creates volume `v`, fills it; fills a raw image file of the same size on the same file
   system.
2. Runs fio (psync, QD1; the job files are tools/fio/*.fio) -- seq write 1M, seq read
   1M, 4K random read, 4K random write -- against these targets, interleaved, `--runs`
   times (rotating the order each run), and reports medians and latency percentiles
   (p50, p99 of the completion latency). Every row says its caching (caches.py):
   "O_DIRECT, cold" (fio O_DIRECT; every file behind every target written back and
   evicted before each job; reads one pass) for all targets, and "buffered, warm" (fio
   buffered; reads warmed first) for raw, qsd_raw and spx, the plain data path.
   qemu-storage-daemon runs with cache.direct=off in both, as our daemon uses the page
   cache of the pool's file system too.

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
      reflink    (pool file systems XFS, btrfs) the raw file right after a whole-file
                 `cp --reflink=always` of it (the file system's own snapshot)

   "First writes": seq = a size-capped pass over the volume right after the snapshot (or
   on a fresh overlay); 4K = a replayed random permutation of the 64 KiB chunks, one 4 KiB
   write at a random 4 KiB slot of each (tools/fio/rand-write-replay.fio); "re-writes"
   repeat exactly what the first pass did. Our snapshot targets' seq first writes come
   right after a no-snapshot pass of their own ("one pass before", after an unrecorded
   lead-in pass), their comparator run by run (datapath.py pass_before). On a VM that
   reports free memory to its host the bench holds that off while it runs where the
   kernel has the knob, puts it back at the end, and says so (caches.py
   hold_free_memory).
3. `--pool-fs` (default: all three in the full run, none with --quick): the write rows
   (raw, no snapshot, 1 and 8 snapshots, qcow2 overlay, reflink copy) again on a pool
   on a loop-mounted ext4 / XFS / btrfs made in the work directory, and the reflink
   copy's creation time against the raw image's extent count (poolfs.py).
4. Control plane: snapshot commit latency (median, p99) over N snapshots on a 1 GiB and a
   1 TiB sparse volume, through the control socket (prepare + flush & hold + commit) and
   engine-only (tools/engine_bench.commit_latency); plex sync time vs `cp --sparse=always`
   (+ fdatasync) of the same image, through the daemon and engine-only; the daemon's RSS
   (VmRSS) with a 1 TiB volume and 16 snapshots; restart-to-ready after kill -9 (until the
   mount is back and the socket answers).

Output: a table (workload x target x caching, median MiB/s or IOPS, SPREAD, p50/p99
latency, ratio against each comparator, PASS / FAIL / noisy verdicts for the project's
targets, verdicts.py), a second one for the pool file systems, `--json` (stable keys,
see `report`), and `--chart FILE.svg` (hand-written SVG, grouped bars per workload).
Progress lines go to stderr unless --quiet. Missing fio: the built-in Python generator
drives every target (the same one for all, so the ratios stay fair). Missing
qemu-storage-daemon / qemu-img / a mkfs: those columns are skipped, the output says so.

The package: common.py (sizes, workloads, targets' ids, profiles, helpers), workloads.py
(fio and the Python generator), caches.py (the two cachings: sync, evict, warm),
targets.py (the daemon, qemu-storage-daemon exports, the plex loop), datapath.py (Bench:
setup and the data-path passes), poolfs.py (the pool file systems, the reflink
comparator), control.py (the control-plane figures), verdicts.py (the project's targets,
PASS / FAIL / noisy), report.py (medians, ratios, the tables), svg.py (the chart),
command.py (run, main), arguments.py (the arguments, shared with `shadowplex bench`).
Tools of their own (docs/performance.md): the NBD port against qemu-nbd, `python -m
tools.bench.nbd` (nbd.py, nbd_setup.py); host mode, `python -m tools.bench.hosts`; backups
(issue 17), `python -m tools.bench.backup`; Ceph RBD against rbd-fuse (issue 18), `python
-m tools.bench.rbd` (rbd.py, rbd_setup.py, rbd_control.py); their shared arguments, run and
table: netbench.py. The copy-before-write data path of two code trees side by side (A/B of
a change), `python -m tools.bench.cow_ab` (cow_ab.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every name below is imported from its module at first use (PEP 562), not here:
# `shadowplex` builds its parser on every command, and the parser takes the bench's
# arguments from this package (arguments.py); importing the whole bench would cost every
# command ~40 ms of start-up.
_WHERE = {name: module for module, names in {
    "caches": ("CACHING",),
    "arguments": ("add_arguments", "progress_wanted"),
    "command": ("main", "run"),
    "common": (
        "CHUNK", "COMPARATORS", "FIO_DIR", "PHASES", "POOL_FS", "PROFILES", "REPLAY_JOB",
        "REPORT_VERSION", "TARGETS", "VOLUME", "WORKLOADS", "BenchError", "Profile",
    ),
    "control": ("WriteProbe",),
    "datapath": ("Bench",),
    "report": ("build_report", "code_version", "format_table", "machine_info", "tool_versions"),
    "svg": ("render_svg",),
    "targets": ("Daemon", "PlexLoop", "QsdExport"),
    "verdicts": ("NOISY_SPREAD", "ROW_TARGETS", "TARGET_SPECS", "evaluate_targets", "verdict"),
    "workloads": (
        "Job", "JobResult", "first_write_offsets", "run_fio", "run_python", "write_iolog",
    ),
}.items() for name in names}

if TYPE_CHECKING:
    from .arguments import (
        add_arguments,
        progress_wanted,
    )
    from .caches import CACHING
    from .command import (
        main,
        run,
    )
    from .common import (
        CHUNK,
        COMPARATORS,
        FIO_DIR,
        PHASES,
        POOL_FS,
        PROFILES,
        REPLAY_JOB,
        REPORT_VERSION,
        TARGETS,
        VOLUME,
        WORKLOADS,
        BenchError,
        Profile,
    )
    from .control import WriteProbe
    from .datapath import Bench
    from .report import (
        build_report,
        code_version,
        format_table,
        machine_info,
        tool_versions,
    )
    from .svg import render_svg
    from .targets import (
        Daemon,
        PlexLoop,
        QsdExport,
    )
    from .verdicts import (
        NOISY_SPREAD,
        ROW_TARGETS,
        TARGET_SPECS,
        evaluate_targets,
        verdict,
    )
    from .workloads import (
        Job,
        JobResult,
        first_write_offsets,
        run_fio,
        run_python,
        write_iolog,
    )

__all__ = [
    "CACHING", "CHUNK", "COMPARATORS", "FIO_DIR", "NOISY_SPREAD", "PHASES", "POOL_FS",
    "PROFILES", "REPLAY_JOB", "REPORT_VERSION",
    "ROW_TARGETS", "TARGETS", "TARGET_SPECS", "VOLUME", "WORKLOADS",
    "Bench", "BenchError", "Daemon", "Job", "JobResult", "PlexLoop", "Profile", "QsdExport",
    "WriteProbe", "add_arguments", "build_report", "code_version", "evaluate_targets",
    "first_write_offsets", "format_table", "machine_info", "main", "progress_wanted",
    "render_svg", "run", "run_fio", "run_python", "tool_versions", "verdict", "write_iolog",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
