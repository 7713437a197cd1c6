"""`shadowplex backup SNAPSHOT --to FILE [--from BASE] [--format qcow2|raw]`: a full or
incremental image of a snapshot (issue 17, docs/backup.md).

Reads come over the array's NBD port (nbd/client.py), not through the mount:

* the port gives the allocation map (base:allocation) with the data, so a full backup
  reads only allocated chunks -- the FUSE mount has no SEEK_DATA, reading it would read
  every byte of a sparse volume;
* it is the same path on the array (plain text on loopback, --nbd-insecure) and on a
  backup host (`--array HOST --tls-dir DIR`: TLS, the host's certificate, LUN masking:
  exactly the snapshots the host sees, the access rule snapshot.diff applies too);
* nothing is left open in the mount (an open handle there would hold the snapshot in use).

The changed extents come from the control API's snapshot.diff (the engine's answer, with
its one-line refusals: FROM not older, another volume, a plex, ...), the same map the NBD
port's qemu:dirty-bitmap:<FROM> context reports.

Writing: a qcow2 through qemu-nbd on a Unix socket (qemu writes the format: no qcow2
writer here); an incremental qcow2's backing file is the previous backup (`qemu-img
create -b PREV -F qcow2`, relative to the new file's directory when they share one), and
it receives only the changed extents (a changed extent that now reads as zeros: a
WRITE_ZEROES, so the backing file's old data does not show through). Raw: a sparse file;
an incremental raw is a *delta*: a sparse file of the snapshot's size holding the changed
extents' data at their offsets, the extents listed in its manifest (a hole inside one
reads as zeros), restored by `shadowplex restore` (tools/restore.py), which applies a
chain's deltas over its full image -- so an incremental moves the changed bytes only, on
any file system (a complete image would be a copy of PREV: free with reflinks, the whole
volume's allocated bytes again on ext4). Everything goes to FILE.part-PID first and is
renamed to FILE when complete: an interrupted or failed backup leaves nothing. The copy
itself, several blocks in flight, is tools/backup_copy.py.

Each backup gets a manifest FILE.backup.json (snapshot, volume, size, format, base file
and base snapshot): an incremental finds its base backup by it (--from BASE: the newest
backup of BASE in FILE's directory, or --base-file PREV) and checks that PREV is a backup
of BASE.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nbd.client import NbdClient
from nbd.pool import NbdPool

from .backup_copy import BLOCK, STREAMS, ZEROS, Stats, Target, allocated, copy_extents
from .output import Progress, human_size

MANIFEST = ".backup.json"    # FILE + this
QEMU_NBD_WAIT = 10.0         # s for qemu-nbd to open its socket
FORMATS = ("qcow2", "raw")


class Refused(Exception):
    """A backup that cannot be made as asked: one line, exit 1, nothing changed."""


# ---------------------------------------------------------------------- the manifest
def manifest_path(path: str) -> str:
    return path + MANIFEST


def read_manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(manifest_path(path), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Refused(f"{manifest_path(path)}: unreadable manifest: {e}") from None
    return data if isinstance(data, dict) else None


def find_base(directory: str, base_id: str) -> str | None:
    """The newest backup of snapshot ``base_id`` in ``directory`` (by its manifest)."""
    best: tuple[float, str] | None = None
    for m in glob.glob(os.path.join(glob.escape(directory), "*" + MANIFEST)):
        path = m[:-len(MANIFEST)]
        try:
            data = read_manifest(path)
        except Refused:
            continue
        if data and data.get("snapshot_id") == base_id and os.path.exists(path):
            at = float(data.get("created") or 0)
            if best is None or at > best[0]:
                best = (at, path)
    return best[1] if best else None


# ---------------------------------------------------------------------- targets
class RawTarget:
    """A new sparse raw file of the snapshot's size: a full image, or an incremental's
    delta (only the changed extents hold data; the manifest lists them). zero() punches
    a hole (the range reads as zeros; in a new file it is one already)."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        start, length = offset, len(view)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        start_writeback(self.fd, start, length)

    def zero(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        # the process's own symbols (glibc's): find_library("c") would run ldconfig
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                    ctypes.c_int64]
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_uint]
    return _libc


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): the disk starts on the range now, while
    the copy reads on, so the final fsync has that much less to wait for (no durability
    here: that is the fsync's; errors are reported by it)."""
    _c().sync_file_range(fd, offset, length, 0x2)


def punch_hole(fd: int, offset: int, length: int) -> None:
    _libc = _c()
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, 0x02 | 0x01, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        pos = offset   # a file system without holes: write the zeros
        while pos < offset + length:
            n = min(BLOCK, offset + length - pos)
            os.pwrite(fd, memoryview(ZEROS)[:n], pos)
            pos += n


class Qcow2Target:
    """A qcow2 made by qemu-img, written through qemu-nbd on a Unix socket: ``streams``
    connections (qemu-nbd --shared), one per copy worker (tools/backup_copy.py)."""

    def __init__(self, path: str, size: int, prev: str | None, streams: int = STREAMS
                 ) -> None:
        self.path = path
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if prev is not None:
            cmd += ["-b", _backing_name(prev, path), "-F", "qcow2"]
        res = subprocess.run([*cmd, path, str(size)], capture_output=True, text=True,
                             check=False)
        if res.returncode:
            raise OSError(f"qemu-img create: {res.stderr.strip()}")
        os.chmod(path, 0o600)   # a volume's data: as the raw image, not the umask's
        self.dir = tempfile.mkdtemp(prefix="shadowplex-backup-")
        sock = os.path.join(self.dir, "nbd.sock")
        self.proc = subprocess.Popen(
            ["qemu-nbd", "--format=qcow2", f"--socket={sock}", "--export-name=backup",
             "--discard=unmap", f"--shared={max(1, streams)}", path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.nbd: NbdPool | None = None

        def connect() -> NbdClient:
            return NbdClient.connect_unix(sock, "backup", timeout=10, block_status=False)
        try:
            deadline = time.monotonic() + QEMU_NBD_WAIT
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") \
                        if self.proc.stderr else ""
                    raise OSError(f"qemu-nbd {path}: {err.strip() or 'exited'}")
                if os.path.exists(sock):   # bound: listening a moment later
                    try:
                        self.nbd = NbdPool(connect, streams)
                        break
                    except ConnectionError as e:
                        if time.monotonic() > deadline:
                            raise OSError(f"qemu-nbd {path}: {e}") from None
                elif time.monotonic() > deadline:
                    raise OSError(f"qemu-nbd {path}: no socket in {QEMU_NBD_WAIT} s")
                time.sleep(0.005)
        except BaseException:
            self.abort()
            raise

    def write(self, offset: int, data: bytes) -> None:
        assert self.nbd is not None
        self.nbd.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        assert self.nbd is not None
        self.nbd.zero(offset, length)

    def finish(self) -> None:
        assert self.nbd is not None
        self.nbd.flush()   # (NbdPool: every connection written, without multi-conn)
        self.nbd.close()
        self.nbd = None
        try:
            code = self.proc.wait(30)   # qemu-nbd ends with its last client
        except subprocess.TimeoutExpired:
            self.abort()
            raise OSError("qemu-nbd did not exit after the backup") from None
        stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if code:
            raise OSError(f"qemu-nbd exited with {code}: {stderr.strip()}")

    def abort(self) -> None:
        if self.nbd is not None:
            with contextlib.suppress(OSError):
                self.nbd.close()
            self.nbd = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _backing_name(prev: str, new: str) -> str:
    """The backing file as the new image records it: relative when both sit in one
    directory (the chain can be moved as a whole), else absolute."""
    prev, new = os.path.abspath(prev), os.path.abspath(new)
    if os.path.dirname(prev) == os.path.dirname(new):
        return os.path.basename(prev)
    return prev


# ---------------------------------------------------------------------- the command
def _nbd_source(args: argparse.Namespace, status: dict[str, Any], snapshot_id: str
                ) -> Callable[[], NbdClient]:
    """How to open a connection to the snapshot's export (the copy opens STREAMS)."""
    port = status.get("nbd_port")
    if not port:
        raise Refused("backup reads over the array's NBD port, and this daemon has none "
                      "open: start serve with --nbd-listen 127.0.0.1 --nbd-insecure (or, "
                      "from a backup host, --nbd-listen ADDR --tls-dir DIR and "
                      "'shadowplex --array HOST --tls-dir DIR backup ...')")
    export = f".shadow/{snapshot_id}"
    if getattr(args, "array", None):
        from nbd.settings import parse_listen
        from nbd.tls import client_context
        host = parse_listen(args.array)[0]
        tls = client_context(args.tls_dir) if status.get("nbd_tls") else None
        return lambda: NbdClient.connect(host, int(port), export, tls=tls, timeout=30)
    if status.get("nbd_tls"):
        raise Refused("the daemon's NBD port requires TLS, and the array's own host has "
                      "no client certificate: back up from a host ('shadowplex --array "
                      "HOST --tls-dir DIR backup ...') or open a plain-text loopback port "
                      "(--nbd-insecure)")
    addr = status.get("nbd_address") or "127.0.0.1"
    if addr in ("0.0.0.0", "::"):
        addr = "127.0.0.1" if addr == "0.0.0.0" else "::1"
    return lambda: NbdClient.connect(addr, int(port), export, tls=None, timeout=30)


def _streams() -> int:
    """Blocks in flight (tools/backup_copy.py); SHADOWPLEX_BACKUP_STREAMS for
    measurements (1: one at a time, as before)."""
    try:
        return max(1, min(16, int(os.environ.get("SHADOWPLEX_BACKUP_STREAMS", STREAMS))))
    except ValueError:
        return STREAMS


@dataclass
class Plan:
    snapshot: dict[str, Any]
    target: str
    fmt: str
    base_id: str | None = None
    base_file: str | None = None
    diff: dict[str, Any] | None = None


def plan(args: argparse.Namespace, c: Any) -> Plan:
    """Every check before anything is written (each a one-line Refused)."""
    target = os.path.abspath(args.to)
    fmt = args.format or ("raw" if target.endswith((".raw", ".img")) else "qcow2")
    if os.path.lexists(target) and not args.force:
        raise Refused(f"{target} exists; choose another file or use --force to replace it")
    if os.path.isdir(target):
        raise Refused(f"{target} is a directory")
    if not os.path.isdir(os.path.dirname(target)):
        raise Refused(f"{os.path.dirname(target)}: no such directory")
    snap = c.snapshot_show(snapshot_id=args.snapshot)
    if isinstance(snap, list) or not isinstance(snap, dict):
        raise Refused(f"{args.snapshot} is not one snapshot")
    sid = str(snap.get("snapshot_id"))
    if snap.get("pool_state") != "committed":
        raise Refused(f"snapshot {sid} is {snap.get('pool_state')}: only a committed, "
                      "valid one can be backed up")
    pl = Plan(snap, target, fmt)
    if args.base_file and not args.base:
        raise Refused("--base-file is the backup of --from BASE: give --from too")
    if args.base is None:
        return pl
    # the engine's refusals first: FROM not older, another volume, a plex, invalid
    diff = c.snapshot_diff(args.base, sid)
    pl.base_id, pl.diff = str(diff["snapshot_id"]), diff
    base_file = os.path.abspath(args.base_file) if args.base_file else \
        find_base(os.path.dirname(target), pl.base_id)
    if base_file is None:
        raise Refused(f"no backup of snapshot {pl.base_id} in {os.path.dirname(target)} "
                      "(its FILE.backup.json names it): back up in full, or give "
                      "--base-file PREV")
    if not os.path.isfile(base_file):
        raise Refused(f"base backup {base_file} is missing")
    m = read_manifest(base_file)
    if m is None:
        raise Refused(f"{base_file} has no manifest {os.path.basename(manifest_path(base_file))}: "
                      "not a backup made by 'shadowplex backup'")
    if m.get("snapshot_id") != pl.base_id:
        raise Refused(f"{base_file} is a backup of snapshot {m.get('snapshot_id')}, not "
                      f"of {pl.base_id}")
    if m.get("format") != fmt:
        raise Refused(f"{base_file} is a {m.get('format')} backup; an incremental backup "
                      f"has its base's format (--format {m.get('format')})")
    if os.path.exists(target) and os.path.samefile(base_file, target):
        raise Refused(f"{target} is the base backup itself: write the incremental backup "
                      "to another file")
    pl.base_file = base_file
    return pl


@contextlib.contextmanager
def _part(target: str) -> Iterator[str]:
    """FILE.part-PID while it is written; removed unless renamed."""
    part = f"{target}.part-{os.getpid()}"
    try:
        yield part
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)


def run_backup(args: argparse.Namespace, c: Any, progress: Progress) -> dict[str, Any]:
    pl = plan(args, c)
    snap = pl.snapshot
    sid = str(snap["snapshot_id"])
    status = c.status()
    size = int(pl.diff["size"]) if pl.diff else None
    streams = _streams()
    src = NbdPool(_nbd_source(args, status, sid), streams)
    stats = Stats()
    try:
        size = src.size if size is None else size
        if pl.diff is not None:
            extents = [(int(o), int(n)) for o, n in pl.diff["extents"]]
        else:
            extents = allocated(src)
        progress.start(sum(n for _, n in extents))
        with _part(pl.target) as part:
            tgt: Target = Qcow2Target(part, size, pl.base_file, streams) \
                if pl.fmt == "qcow2" else RawTarget(part, size)
            try:
                copy_extents(src, tgt, extents, pl.diff is not None, stats, progress,
                             streams)
                tgt.finish()
            except BaseException:
                tgt.abort()
                raise
            progress.close()
            os.replace(part, pl.target)
    finally:
        src.close()
    seconds = time.monotonic() - stats.started
    summary: dict[str, Any] = {
        "snapshot_id": sid, "volume": snap.get("volume") or
        (pl.diff or {}).get("volume"), "size": size,
        "kind": "incremental" if pl.diff is not None else "full", "format": pl.fmt,
        "file": pl.target, "base_snapshot_id": pl.base_id, "base_file": pl.base_file,
        "extents": stats.extents, "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written, "bytes_zeroed": stats.bytes_zeroed,
        "changed_bytes": pl.diff["changed_bytes"] if pl.diff else None,
        "seconds": round(seconds, 3),
    }
    # layout: "image" (a raw image, or a qcow2 that is one with its backing chain) or
    # "delta" (a raw incremental: only its extents are its own, tools/restore.py)
    delta = pl.fmt == "raw" and pl.diff is not None
    manifest = {"format_version": 1, "created": time.time(),
                "snapshot_id": sid, "set_id": snap.get("snapshot_set_id"),
                "volume": summary["volume"], "size": size, "format": pl.fmt,
                "kind": summary["kind"], "base_snapshot_id": pl.base_id,
                "base_file": None if pl.base_file is None
                else _backing_name(pl.base_file, pl.target),
                "layout": "delta" if delta else "image",
                **({"extents": extents} if delta else {})}
    tmp = f"{manifest_path(pl.target)}.part-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest_path(pl.target))
    return summary


def print_summary(s: dict[str, Any]) -> None:
    rate = s["bytes_read"] / s["seconds"] if s["seconds"] else 0
    base = f" on {os.path.basename(s['base_file'])}" if s["base_file"] else ""
    print(f"{s['kind']} {s['format']} backup of snapshot {s['snapshot_id']} "
          f"({s['volume']}, {human_size(s['size'])}) to {s['file']}{base}")
    zeroed = f", {human_size(s['bytes_zeroed'])} zeroed" if s["bytes_zeroed"] else ""
    print(f"{s['extents']} extents: {human_size(s['bytes_read'])} read, "
          f"{human_size(s['bytes_written'])} written{zeroed} in {s['seconds']:.1f} s "
          f"({human_size(int(rate))}/s)")


def backup_one(c: Any, snapshot: str, to: str, base: str | None, fmt: str | None,
               quiet: bool) -> dict[str, Any]:
    """One backup as the script verb `backup ID FILE [from BASE] [format F]` runs it:
    through the script's session, never replacing a file. Raises Refused."""
    args = argparse.Namespace(snapshot=snapshot, to=to, base=base, base_file=None,
                              format=fmt, force=False, array=None, tls_dir=None)
    progress = Progress(not quiet, "backup")
    try:
        return run_backup(args, c, progress)
    finally:
        progress.close()


def main(args: argparse.Namespace, c: Any) -> int:
    progress = Progress(not args.quiet and not args.json, "backup")
    try:
        summary = run_backup(args, c, progress)
    finally:
        progress.close()
    if args.json:
        from .output import print_json
        print_json(summary)
    elif not args.quiet:   # --quiet: nothing but errors
        print_summary(summary)
    return 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit("use: shadowplex backup")
