"""The caching every data-path row runs under -- the same for all targets of a row's kind
-- and the page-cache control behind it.

    direct   "O_DIRECT, cold": fio opens the target with O_DIRECT, and before every job
             each file behind every target (the raw image, the pool's images and diff
             areas, the qcow2 overlay) is written back and evicted from the page cache
             (fsync + POSIX_FADV_DONTNEED), after the target itself was fsync'ed (so that
             its daemon writes back what it holds in memory: our held chunks). Reads are
             one pass over the region (never wrapping around), so no block is read twice
             in a job: every read misses every cache -- the FUSE mount's (O_DIRECT skips
             it), the pool file system's (evicted), the daemon's.
    cached   "buffered, warm": fio opens the target without O_DIRECT; before a read job
             the region is read once through the target (untimed), time-based jobs wrap
             around: everything may be cached, by whichever layer caches it (our mount
             keeps its page cache across opens, qemu-storage-daemon's export drops
             it at open and at every getattr). Buffered writes are write-through on
             both mounts (docs/performance.md "Buffered seq writes").

Both daemons read and write their image files through the pool file system's page cache
in both modes: ours has no other way, so qemu-storage-daemon runs with cache.direct=off
too (cache.direct=on would compare an O_DIRECT back end against a buffered one). The raw
file has no daemon: in "direct" rows fio reads the disk with O_DIRECT and gets no
read-ahead, while the daemons' buffered reads of their (evicted) images do -- so for
sequential reads the raw row is not an upper bound there.

Why per-file eviction rather than `echo 3 > /proc/sys/vm/drop_caches`: it drops exactly
the bench's files, for all targets alike, without emptying the caches of everything else
on a shared machine (and drop_caches does not write dirty pages back first)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

from .common import MiB

CACHING: dict[str, str] = {"direct": "O_DIRECT, cold", "cached": "buffered, warm"}
# the files whose residency the bench checks after an eviction: data, not the chunk maps
# the daemon keeps mmap'ed (FADV_DONTNEED cannot drop mapped pages) or the catalog
DATA_SUFFIXES = (".img", ".data", ".qcow2")
PAGE = mmap.PAGESIZE


def files_under(paths: list[str]) -> list[str]:
    """Every regular file among `paths` and below the directories among them (never
    following symlinks, never entering a mount: a FUSE mount below is not a backing
    file)."""
    out: list[str] = []
    for p in paths:
        if os.path.isfile(p) and not os.path.islink(p):
            out.append(p)
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
                out += [os.path.join(root, n) for n in names
                        if os.path.isfile(os.path.join(root, n))
                        and not os.path.islink(os.path.join(root, n))]
    return out


def sync_file(path: str, evict: bool) -> None:
    """fsync `path` (through whatever serves it: a FUSE file asks its daemon to write back)
    and, with evict, drop its page-cache pages (FADV_DONTNEED keeps dirty pages: hence
    the fsync first)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            if evict:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def settle(target: str, backing: list[str], evict: bool) -> None:
    """Before a job: the target, then every backing file, synced (and evicted)."""
    sync_file(target, evict)
    for f in files_under(backing):
        sync_file(f, evict)


def warm(path: str, size: int) -> None:
    """Read [0, size) of `path` once, buffered, in 1 MiB requests."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for off in range(0, size, MiB):
            if not os.pread(fd, MiB, off):
                break
    finally:
        os.close(fd)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def file_resident(path: str) -> int:
    """Bytes of `path` in the page cache now (mincore(2) on a mapping of it, what
    util-linux fincore does); 0 if it is gone or empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        libc = _libc()
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(b & 1 for b in vec) * PAGE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_bytes(paths: list[str]) -> int:
    """Bytes of the data files among `paths` (and below) in the page cache now."""
    return sum(file_resident(f) for f in files_under(paths) if f.endswith(DATA_SUFFIXES))
