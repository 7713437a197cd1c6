"""`shadowplex restore FILE --to OUT [--force]`: a chain of backups (`shadowplex backup`,
tools/backup.py) back to one raw image of the snapshot FILE was made of (docs/backup.md).

The chain is found by the manifests (FILE.backup.json names the base backup, relative
to FILE's directory when they share it), down to the full backup; each link is checked
(its snapshot is the one the newer backup was made from, same format) before anything is
written.

* qcow2: `qemu-img convert -O raw FILE OUT` -- qemu follows the backing files.
* raw: the full backup, or the newest complete raw image of the chain, copied (`cp
  --sparse=always --reflink=auto`: shared extents on xfs/btrfs), then each incremental
  delta applied, oldest first: the image takes the delta's size (a grown volume), and
  within each changed extent of its manifest the delta's data where it has data
  (copy_file_range) and zeros (a punched hole) where it has none.

No daemon is involved. OUT is written as OUT.part-PID, synced and renamed: an
interrupted or failed restore leaves nothing, and an existing OUT is replaced (with
--force) only by a complete image.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import subprocess
import time
from typing import Any

from .backup import Refused, manifest_path, punch_hole, read_manifest
from .backup_copy import BLOCK

MAX_CHAIN = 10_000   # links followed before a chain is called a loop


def chain_of(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(file, manifest) from ``path`` down to the first complete image (a full backup, a
    qcow2 whose chain qemu follows, or an old-style complete raw incremental), newest
    first. Refused: a missing file or manifest, a broken or looping link."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    while True:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise Refused(f"backup {path} is missing" + (
                f" (the base of {out[-1][0]})" if out else ""))
        m = read_manifest(path)
        if m is None:
            raise Refused(f"{path} has no manifest {os.path.basename(manifest_path(path))}"
                          ": not a backup made by 'shadowplex backup'")
        if out:
            newer = out[-1][1]
            if m.get("snapshot_id") != newer.get("base_snapshot_id"):
                raise Refused(f"{path} is a backup of snapshot {m.get('snapshot_id')}, but "
                              f"{out[-1][0]} was made from {newer.get('base_snapshot_id')}")
            if m.get("format") != newer.get("format"):
                raise Refused(f"{path} is a {m.get('format')} backup, {out[-1][0]} a "
                              f"{newer.get('format')} one")
        if path in seen or len(out) >= MAX_CHAIN:
            raise Refused(f"the chain of {out[0][0]} loops at {path}")
        seen.add(path)
        out.append((path, m))
        if m.get("format") == "qcow2" or m.get("layout") != "delta":
            return out
        base = m.get("base_file")
        if not base:
            raise Refused(f"{path}: its manifest names no base backup")
        path = os.path.join(os.path.dirname(path), base)


def _apply_delta(delta: str, extents: list[list[int]], out_fd: int) -> int:
    """Each extent of ``delta`` onto out_fd: its data, zeros where it has a hole.
    Returns the bytes of data copied."""
    copied = 0
    fd = os.open(delta, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for off, length in extents:
            pos, end = off, off + length
            while pos < end:
                try:
                    data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
                except OSError as e:
                    if e.errno != errno.ENXIO:   # ENXIO: no data from pos to the end
                        raise
                    data = end
                if data > pos:
                    punch_hole(out_fd, pos, data - pos)
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                _copy_range(fd, out_fd, data, hole - data)
                copied += hole - data
                pos = hole
    finally:
        os.close(fd)
    return copied


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """[offset, offset+length) of src to the same place in dst: copy_file_range (the
    kernel copies, or shares extents where the file system can), else read + write."""
    end = offset + length
    while offset < end:
        n = min(BLOCK, end - offset)
        try:
            done = os.copy_file_range(src, dst, n, offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, n, offset)
            done = os.pwrite(dst, data, offset) if data else 0
        if done <= 0:
            raise OSError(errno.EIO, f"short copy at {offset}")
        offset += done


def restore(top: str, out: str, force: bool) -> dict[str, Any]:
    out = os.path.abspath(out)
    if os.path.lexists(out) and not force:
        raise Refused(f"{out} exists; choose another file or use --force to replace it")
    if os.path.isdir(out):
        raise Refused(f"{out} is a directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise Refused(f"{os.path.dirname(out)}: no such directory")
    chain = chain_of(top)
    if any(os.path.exists(out) and os.path.samefile(f, out) for f, _ in chain):
        raise Refused(f"{out} is a backup of the chain itself: restore to another file")
    t0 = time.monotonic()
    base, bm = chain[-1]
    part = f"{out}.part-{os.getpid()}"
    copied = 0
    try:
        if bm.get("format") == "qcow2":
            cmd = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", base, part]
        else:
            cmd = ["cp", "--sparse=always", "--reflink=auto", "--", base, part]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise OSError(f"{cmd[0]} {base}: {res.stderr.strip()}")
        os.chmod(part, 0o600)   # a volume's data
        fd = os.open(part, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for path, m in reversed(chain[:-1]):   # the deltas, oldest first
                os.ftruncate(fd, int(m["size"]))
                copied += _apply_delta(path, m.get("extents") or [], fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
    top_m = chain[0][1]
    return {"file": chain[0][0], "to": out, "format": top_m.get("format"),
            "snapshot_id": top_m.get("snapshot_id"), "volume": top_m.get("volume"),
            "size": os.path.getsize(out), "chain": [f for f, _ in reversed(chain)],
            "delta_bytes": copied, "seconds": round(time.monotonic() - t0, 3)}


def main(args: argparse.Namespace) -> int:
    summary = restore(args.file, args.to, args.force)
    if args.json:
        from .output import print_json
        print_json(summary)
    elif not args.quiet:
        links = len(summary["chain"])
        print(f"restored snapshot {summary['snapshot_id']} ({summary['volume']}) from "
              f"{links} backup{'s' if links > 1 else ''} to {summary['to']} in "
              f"{summary['seconds']:.1f} s")
    return 0
