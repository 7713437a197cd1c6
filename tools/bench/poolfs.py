"""The pool-file-system dimension (`--pool-fs ext4,xfs,btrfs`): the copy-on-write rows
again with everything -- our pool, the raw image, the qcow2 overlay, the reflink copy --
on a file system of that type, made fresh on a loop device (direct I/O, so the loop adds
no second page cache) backed by a sparse file in the work directory, mounted there, and
served by a daemon of its own.

Per file system, all "direct" (O_DIRECT, cold; caches.py), seq write 1M and 4K randwrite:
    raw         the raw image, no snapshot
    spx         the volume without a snapshot, time-based (steady)
    spx_1snap / spx_8snap   first writes and re-writes after 1 / 8 snapshots; the seq
                first writes right after a no-snapshot pass of their own (phase "before":
                what "1 snapshot vs none" divides by, run by run; datapath.pass_before)
    qsd_qcow2   first writes and re-writes on a fresh qcow2 overlay of the raw image
    reflink     (XFS, btrfs) first writes and re-writes on the raw image right after
                `cp --reflink=always` of it: the whole-file snapshot the file system gives
Then, on XFS and btrfs, the reflink copy's creation time (cp --reflink=always + fsync of
the copy) against the number of extents of an image (a fresh one, filled like the raw
image): after the fill, then after 4 KiB writes made under a reflink copy (each
un-shares, i.e. splits, an extent) -- a reflink
snapshot costs O(extents), ours O(1) (the snapshot.create round trips of the rows are
reported next to it).

Cleanup: the daemon is stopped before the unmount, the loop device detached, the image
removed (an ExitStack; after an interrupt, tools/workdir.clean is the backstop: it ends
our children, unmounts and detaches whatever is below the work directory)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fuse_mount import loopdev

from . import caches
from .common import CHUNK, REFLINK_FS, KiB, MiB, _fill, _median, _run
from .datapath import make_site
from .targets import Daemon
from .workloads import first_write_offsets

if TYPE_CHECKING:
    from .common import Log
    from .datapath import Bench

MKFS = {
    # ext4: initialise inode tables and journal now, not in a background thread that
    # would write while we measure
    "ext4": ("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"),
    "xfs": ("mkfs.xfs", "-q", "-f"),          # reflink=1 is mkfs.xfs's default (>= 5.1)
    "btrfs": ("mkfs.btrfs", "-q", "-f"),
}
FS_IOC_FIEMAP = 0xC020660B   # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 1
WRITES = ("seq_write", "rand_write")


def missing(fs: str) -> str | None:
    """Why pool file system `fs` cannot be made here (None: it can)."""
    if shutil.which(MKFS[fs][0]) is None:
        pkg = {"ext4": "e2fsprogs", "xfs": "xfsprogs", "btrfs": "btrfs-progs"}[fs]
        return f"{MKFS[fs][0]} not found (apt install {pkg})"
    return None


def image_size(volume_size: int) -> int:
    """The loop file system: the raw image, the volume, a diff area and a qcow2 overlay
    holding a full pass each, the reflink copy's un-shared extents, metadata (sparse)."""
    return max(512 * MiB, 6 * volume_size)


@contextlib.contextmanager
def loop_fs(base: str, fs: str, size: int, log: Log) -> Iterator[str]:
    """A fresh `fs` on a loop device backed by BASE/fs-FS.img, mounted at BASE/fs-FS."""
    img, root = os.path.join(base, f"fs-{fs}.img"), os.path.join(base, f"fs-{fs}")
    with open(img, "wb") as f:
        f.truncate(size)
    try:
        dev = loopdev.attach(img, read_only=False, direct_io=True)
        try:
            _run(*MKFS[fs], dev)
            os.makedirs(root)
            _run("mount", dev, root)
            log(f"{fs} pool file system: {size >> 20} MiB on {dev}, mounted at {root}")
            try:
                yield root
            finally:
                loopdev.unmount_ladder(root, loopdev.ANY_UNMOUNT)
        finally:
            with contextlib.suppress(loopdev.LoopError):
                loopdev.detach(dev)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(root)
        with contextlib.suppress(OSError):
            os.unlink(img)


def extents(path: str) -> int:
    """How many extents `path` has (FIEMAP, after syncing it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        req = struct.pack("=QQIIII", 0, (1 << 64) - 1, FIEMAP_FLAG_SYNC, 0, 0, 0)
        res = fcntl.ioctl(fd, FS_IOC_FIEMAP, req)
    finally:
        os.close(fd)
    return int(struct.unpack("=QQIIII", res)[3])


def reflink_copy(src: str, dst: str) -> float:
    """`cp --reflink=always src dst` + fsync of dst; seconds."""
    t = time.perf_counter()
    _run("cp", "--reflink=always", src, dst)
    caches.sync_file(dst, evict=False)
    return time.perf_counter() - t


def fragment(raw: str, size: int, n: int, seed: int, scratch: str) -> None:
    """n 4 KiB O_DIRECT writes, each to another 64 KiB chunk of `raw`, under a reflink
    copy (so each one un-shares a piece of an extent, as writes after a reflink snapshot
    do), then the copy removed."""
    copy = os.path.join(scratch, "fragment.reflink")
    reflink_copy(raw, copy)
    buf = mmap.mmap(-1, 4 * KiB)
    buf.write(os.urandom(4 * KiB))
    fd = os.open(raw, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for off in first_write_offsets(size, seed)[:n]:
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
        os.unlink(copy)


def reflink_sweep(scratch: str, size: int, runs: int) -> list[dict[str, Any]]:
    """The reflink copy's creation time (median of `runs`) at three fragmentation levels
    of an image of its own (`size` bytes, filled sequentially -- not the raw image, which
    the rows have already fragmented): as filled, after chunks/16 and after chunks/2
    4 KiB writes under a copy."""
    img = os.path.join(scratch, "sweep.img")
    with open(img, "wb") as f:
        f.truncate(size)
    _fill(img, size)
    chunks = size // CHUNK
    out: list[dict[str, Any]] = []
    done = 0
    try:
        for i, writes in enumerate((0, chunks // 16, chunks // 2)):
            if writes > done:
                fragment(img, size, writes - done, seed=100 + i, scratch=scratch)
                done = writes
            copy = os.path.join(scratch, "sweep.reflink")
            times = []
            for _ in range(runs):
                times.append(reflink_copy(img, copy))
                os.unlink(copy)
            out.append({"cow_writes": writes, "extents": extents(img),
                        "create_ms": _median(times) * 1000})
    finally:
        os.unlink(img)
    return out


def run(b: Bench, fs: str) -> None:
    """Every row of pool file system `fs`, interleaved over --runs, then its reflink
    sweep; into b.samples (pool fs = `fs`) and b.control["pool_fs"][fs]."""
    from blockstore import Pool
    from provider.client import Client
    size = image_size(b.profile.volume_size)
    prev = b.site
    with contextlib.ExitStack() as st:
        root = st.enter_context(loop_fs(b.base, fs, size, b.log))
        pool_dir, mnt = os.path.join(root, "pool"), os.path.join(b.base, f"mnt-{fs}")
        os.makedirs(mnt)
        Pool.create(pool_dir).close()
        daemon = Daemon(b.base, pool_dir, mnt, os.path.join(b.base, f"{fs}.sock"),
                        name=f"serve-{fs}")
        st.callback(daemon.stop)     # LIFO: stopped before the file system is unmounted
        daemon.start()
        client = Client(daemon.sock, client="shadowplex-bench")
        st.callback(client.close)
        site = make_site(fs, client, pool_dir, mnt, os.path.join(root, "raw.img"), root,
                         b.profile.volume_size, b.log)
        targets = ["raw", "spx", "spx_1snap", "spx_8snap"]
        targets += ["qsd_qcow2"] if b.use_qcow2 else []
        targets += ["reflink"] if fs in REFLINK_FS else []
        b.site, b.caching = site, "direct"
        try:
            for r in range(b.runs):
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                b.log(f"{fs} pool, run {r + 1}/{b.runs}: {', '.join(order)}")
                for t in order:
                    if t in ("raw", "spx"):
                        b.steady(t, site.raw if t == "raw" else site.vol_path, WRITES)
                    else:
                        b.cow_rows(t, then=())
            out: dict[str, Any] = {
                "fs_image_MiB": size / MiB,
                "snapshot_create_median_ms": _median(site.snapshot_ms)}
            if fs in REFLINK_FS:
                out["reflink"] = reflink_sweep(root, b.profile.volume_size, b.runs)
                b.log(f"{fs}: reflink copy " + "; ".join(
                    f"{x['extents']} extents {x['create_ms']:.1f} ms" for x in out["reflink"])
                    + f"; snapshot.create {out['snapshot_create_median_ms']:.1f} ms")
            b.control.setdefault("pool_fs", {})[fs] = out
        finally:
            b.site = prev
