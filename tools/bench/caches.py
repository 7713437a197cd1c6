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
on a shared machine (and drop_caches does not write dirty pages back first).

Free page reporting (hold_free_memory): a VM whose kernel reports free memory to its host
(virtio-balloon free page reporting) gets blocks back from the host on their first touch
after the report, at ~10x the cost of memory that stayed backed; page cache built out of
them fills that much slower (docs/performance.md, "First-write targets: like with like").
The report says so. Where this VM's kernel has a knob for it (page_reporting's
min_free_ms: how long a block must stay free before it is reported; mainline kernels have
none), the bench holds it at HOLD_FREE_MS while it runs (unless LEAVE_ENV=1) and puts
the old value back on every exit path; several benches at once share one record of the
old value (STATE), and a bench killed with -9 leaves it to the next bench to restore."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any

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


def fd_resident(fd: int, size: int) -> int:
    """Bytes of [0, size) of open file `fd` in the page cache now: mincore(2) on a mapping
    made with the size given (the caller's: an fstat of a FUSE file would ask its daemon
    for attributes, which may drop the cache it measures)."""
    libc = _libc()
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of fd {fd}")
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of fd {fd}")
        return sum(b & 1 for b in vec) * PAGE
    finally:
        libc.munmap(addr, size)


def file_resident(path: str) -> int:
    """Bytes of `path` in the page cache now (mincore(2) on a mapping of it, what
    util-linux fincore does); 0 if it is gone or empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        return fd_resident(fd, size) if size else 0
    finally:
        os.close(fd)


def resident_bytes(paths: list[str]) -> int:
    """Bytes of the data files among `paths` (and below) in the page cache now."""
    return sum(file_resident(f) for f in files_under(paths) if f.endswith(DATA_SUFFIXES))


PAGE_REPORTING = "/sys/module/page_reporting/parameters"
# page_reporting's min_free_ms while a bench runs: much longer than any gap between an
# eviction (which frees a volume's page cache) and the job that fills page cache again
HOLD_FREE_MS = 60_000
# the value before the first of the running benches changed it, and the benches holding it
STATE = "/run/shadowplex-bench-page-reporting.json"
# set to 1: the bench leaves the knob as it is (an A/B of the knob itself; holding it is
# the default: quick runs on the busy machine had 2 of 24 slow no-snapshot passes with it
# held, 8 of 12 and more without -- docs/performance.md)
LEAVE_ENV = "SHADOWPLEX_BENCH_LEAVE_PAGE_REPORTING"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _with_state(change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
                state: str, params: str, then: Callable[[], None] | None = None) -> None:
    """Run `change` on the shared record under its lock (flock on the `params` directory:
    no lock file to leave behind): it returns the new record, or None to remove it; then
    `then`, still under the lock. Holders that are no longer running are
    dropped before. (Record first, knob after, when taking; knob first, record after,
    when giving back: a bench stopped in between leaves a record naming a dead holder,
    which the next bench reads the old value from.)"""
    lock = os.open(params, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cur = json.loads(_read(state) or "null")
        except ValueError:
            cur = None
        if cur is not None:
            cur["holders"] = [p for p in cur.get("holders", []) if _alive(p)]
        new = change(cur)
        if new is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state)
        else:
            with open(state + ".tmp", "w") as f:
                json.dump(new, f)
            os.replace(state + ".tmp", state)
        if then is not None:
            then()
    finally:
        os.close(lock)       # and with it the lock


@contextlib.contextmanager
def hold_free_memory(params: str = PAGE_REPORTING, state: str = STATE,
                     hold_ms: int = HOLD_FREE_MS, leave: bool = False
                     ) -> Iterator[dict[str, Any]]:
    """While inside: free memory is reported to the host only after `hold_ms` free (see the
    module docstring); `leave`: not changed (an A/B of the knob itself). Yields what the
    report says: the reporting order (None: this kernel reports no free pages),
    min_free_ms before and during, or why not changed."""
    order = _read(os.path.join(params, "page_reporting_order"))
    info: dict[str, Any] = {"reporting": order is not None,
                            "order": int(order) if order and order.isdigit() else None,
                            "min_free_ms_was": None, "min_free_ms": None, "not_changed": None}
    knob = os.path.join(params, "min_free_ms")
    if leave and order is not None:
        # what a bench killed with -9 left held is put back first: an A/B of the knob
        # must see the machine's own value
        with contextlib.suppress(OSError):
            release_stale(params, state)
    was = _read(knob)
    if order is None or was is None or not was.isdigit() or leave:
        info["not_changed"] = (
            "no free page reporting" if order is None
            else "this kernel has no min_free_ms knob" if not (was or "").isdigit()
            else f"left at {was} ms ({LEAVE_ENV}=1)")
        yield info
        return
    me = os.getpid()
    original: list[int] = []

    def take(cur: dict[str, Any] | None) -> dict[str, Any]:
        # nobody running holds it: the value now is the machine's -- unless a bench
        # killed with -9 left its record (and its value): then the record's is. Read
        # here, under the lock: read before it, another bench's held value could be
        # taken for the machine's if that bench gave it back meanwhile
        now = _read(knob) or ""
        first = (cur["original"] if cur and not cur["holders"]
                 else int(now) if now.isdigit() else int(was))
        base = cur if cur and cur["holders"] else {"original": first, "holders": []}
        original.append(base["original"])
        return {"original": base["original"], "holders": [*base["holders"], me]}

    def hold() -> None:
        with open(knob, "w") as f:
            f.write(str(hold_ms))

    def give_back(cur: dict[str, Any] | None) -> dict[str, Any] | None:
        rest = [p for p in (cur or {}).get("holders", []) if p != me]
        if rest:
            return {"original": (cur or {}).get("original", original[0]), "holders": rest}
        with open(knob, "w") as f:
            f.write(str((cur or {}).get("original", original[0])))
        return None

    try:
        _with_state(take, state, params, hold)
    except OSError as e:
        if original:     # recorded as a holder: give it back (the knob is unchanged)
            with contextlib.suppress(OSError):
                _with_state(give_back, state, params)
        info["not_changed"] = f"could not change min_free_ms ({e.strerror or e})"
        yield info
        return
    info["min_free_ms_was"], info["min_free_ms"] = original[0], hold_ms
    try:
        yield info
    finally:
        _with_state(give_back, state, params)


def release_stale(params: str = PAGE_REPORTING, state: str = STATE) -> bool:
    """Put back the value a bench killed with -9 left held (its record names no running
    holder); True if it did."""
    if not os.path.exists(state):
        return False
    done: list[bool] = []

    def check(cur: dict[str, Any] | None) -> dict[str, Any] | None:
        if cur is None or cur["holders"]:
            return cur
        with open(os.path.join(params, "min_free_ms"), "w") as f:
            f.write(str(cur["original"]))
        done.append(True)
        return None
    _with_state(check, state, params)
    return bool(done)


def free_memory_note(info: dict[str, Any] | None) -> str | None:
    """The report's line about the VM's free page reporting (None: nothing to say)."""
    if not info or not info.get("reporting"):
        return None
    what = (f"this VM reports free memory to its host (free page reporting, order "
            f"{info['order']}): page cache built from reported blocks fills ~10x slower, "
            "so a pass's speed depends on what ran before it")
    if info.get("min_free_ms") is not None:
        return (what + f"; min_free_ms held at {info['min_free_ms']:,} ms while the bench ran "
                f"(was {info['min_free_ms_was']:,}, put back at its end)")
    return what + f"; not changed: {info.get('not_changed')}"
