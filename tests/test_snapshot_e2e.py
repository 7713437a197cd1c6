"""Point-in-time snapshots of live filesystems, end to end through the real daemon
(`python -m provider.service`, see tests/harness.py), the kernel's loop and
FUSE drivers and real ext4 / xfs: what a backup does.

The writer is a separate process that only ever adds files, each written under a
temporary name and renamed into place, and logs every rename after it returns (to a file
outside the volume). The snapshot (fsfreeze writer) is one instant of that sequence, so
the snapshot must hold exactly the files of a prefix of the log -- the first k, whole,
with their logged xxh3 -- plus at most the next file's temporary, empty or whole (one
write(2), which a freeze lets through entirely or not at all). Bounds on k come from the
log alone: every file logged before snapshot.create was sent was renamed before the
freeze (k >= lines then), and at most one rename can be unlogged at any moment (k <=
lines when snapshot.create returned, + 1).

Every test cleans up in `finally` (exposure, filesystems, loop devices, writer, daemon);
conftest's session guard fails the run if anything is left.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import xxhash
from harness import start_daemon
from support import mkfs_ext4, mounted_ext4, need
from support import run_cmd as _run

from fuse_mount import loopdev
from provider.client import ControlError
from tools.demo import manifest

pytestmark = pytest.mark.kernel
MiB = 1 << 20

# The writer process: appends files until the stop file appears; one log line per file,
# written after its rename returned.
WRITER = r"""
import os, random, sys, time
import xxhash
root, log, stop, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rnd = random.Random(seed)
os.makedirs(root, exist_ok=True)
with open(log, "a", buffering=1) as lg:
    n = 0
    while not os.path.exists(stop):
        data = rnd.randbytes(rnd.randint(1, 48 * 1024))
        tmp, final = os.path.join(root, f".{n:06}.tmp"), os.path.join(root, f"{n:06}.bin")
        with open(tmp, "wb", buffering=0) as f:
            f.write(data)
        os.rename(tmp, final)
        lg.write(f"{n:06}.bin {xxhash.xxh3_128_hexdigest(data)}\n")
        n += 1
        time.sleep(0.001)
"""


def _log_lines(log: Path) -> list[tuple[str, str]]:
    """The complete lines of the writer's log (a partial last line is not yet a record)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [tuple(line.split()) for line in text.split("\n")[:-1]]  # type: ignore[misc]


def _wait_lines(log: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 30
                ) -> int:
    deadline = time.monotonic() + timeout
    while (got := len(_log_lines(log))) < n:
        assert proc.poll() is None, f"writer exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"writer logged {got} files, waited for {n}"
        time.sleep(0.01)
    return got


@contextmanager
def writer(root: Path, log: Path, stop: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(log), str(stop),
                             "7"], stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        stop.touch()
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:   # frozen forever? do not leak it
            proc.kill()
            _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode(errors="replace")


def populate(root: Path, seed: int = 1) -> None:
    """Files that exist before the writer starts and never change."""
    rnd = random.Random(seed)
    for i in range(40):
        d = root / "base" / ("sub" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:02}.bin").write_bytes(rnd.randbytes(rnd.randint(0, 512 * 1024)))


def check_point_in_time(snap: dict[str, str], base: dict[str, str],
                        log: list[tuple[str, str]], lo: int, hi: int) -> int:
    """Assert `snap` (a manifest) is base + the first k logged files + at most file k's
    temporary (empty or whole), with lo <= k <= hi. Returns k."""
    assert {p: h for p, h in snap.items() if not p.startswith("w/")} == base
    files = {p: h for p, h in snap.items() if p.startswith("w/") and not p.endswith(".tmp")}
    k = len(files)
    assert files == {f"w/{name}": h for name, h in log[:k]}, "not a prefix of the log"
    assert lo <= k <= hi, (lo, k, hi)
    tmps = {p: h for p, h in snap.items() if p.endswith(".tmp")}
    if tmps:
        assert list(tmps) == [f"w/.{k:06}.tmp"], tmps
        assert k < len(log), "a temporary the writer never renamed"
        assert tmps[f"w/.{k:06}.tmp"] in (xxhash.xxh3_128_hexdigest(b""), log[k][1])
    return k


@pytest.mark.parametrize("kind", ["differential", "plex"])
def test_live_ext4_snapshot_is_point_in_time(tmp_path: Path, sockdir: str,
                                             kind: str) -> None:
    """mkfs.ext4 through a loop device, files, then a snapshot through the daemon while a
    writer process keeps adding files; exposed with --mount, every file's xxh3 is the
    point-in-time one and e2fsck -fn of the snapshot's device object is clean."""
    need("mkfs.ext4")
    need("e2fsck")
    fs, snapmnt = tmp_path / "fs", tmp_path / "snap"
    snapmnt.mkdir()
    log, stop = tmp_path / "writer.log", tmp_path / "stop"
    d = start_daemon(tmp_path, sockdir, {"v": 128 * MiB})
    try:
        image = os.path.join(d.mount, "volumes", "v.img")
        with mounted_ext4(image, fs):
            populate(fs)
            base = manifest(str(fs))
            with writer(fs / "w", log, stop) as proc, d.client(client="e2e") as c:
                lo = _wait_lines(log, 50, proc)       # it runs, and well past the start
                res = c.snapshot_create(["v"], context="backup", kind=kind)
                hi = len(_log_lines(log)) + 1
                snap = res["snapshots"][0]
                sid = snap["snapshot_id"]
                assert [x["kind"] for x in c.snapshot_list()] == [kind]
                # the origin moves on while the snapshot is read
                _wait_lines(log, hi + 50, proc)
                fsck = _run("e2fsck", "-fn", snap["device_object"], check=False)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
                c.expose(sid, mount=str(snapmnt))
                try:
                    assert loopdev.is_mountpoint(snapmnt)
                    got = manifest(str(snapmnt))
                finally:
                    c.unexpose(sid)
                assert not loopdev.is_mountpoint(snapmnt)
                c.end_backup()
                c.snapshot_delete(snapshot_id=sid)
            final = _log_lines(log)
            k = check_point_in_time(got, base, final, lo, hi)
            assert len(final) > k + 50                # the live volume really moved on
            assert manifest(str(fs)) == {**base, **{f"w/{n}": h for n, h in final}}
        with d.client() as c:
            assert c.check()["ok"]
    finally:
        d.stop()


def test_xfs_snapshot_exposed_read_only(tmp_path: Path, sockdir: str) -> None:
    """An xfs volume, mounted and written, snapshotted (fsfreeze) and exposed with --mount
    while the origin is still mounted: same UUID, so it only mounts with nouuid; its log
    is not replayed (norecovery); read-only."""
    need("mkfs.xfs")
    fs, snapmnt = tmp_path / "fs", tmp_path / "snap"
    fs.mkdir()
    snapmnt.mkdir()
    # mkfs.xfs refuses filesystems under 300 MiB; the image is sparse
    d = start_daemon(tmp_path, sockdir, {"x": 320 * MiB})
    try:
        image = os.path.join(d.mount, "volumes", "x.img")
        dev = loopdev.attach(image, read_only=False)
        try:
            _run("mkfs.xfs", "-q", dev)
            _run("mount", dev, str(fs))
            try:
                populate(fs, seed=3)
                base = manifest(str(fs))
                with d.client() as c:
                    assert [w["name"] for w in c.writers_list()] == ["fsfreeze"]
                    res = c.snapshot_create(["x"], context="backup")
                    sid = res["snapshots"][0]["snapshot_id"]
                    (fs / "after.txt").write_text("written after the snapshot\n")
                    out = c.expose(sid, name="xfs-monday", mount=str(snapmnt))
                    try:
                        opts = next(o for mp, fstype, o in _mounts() if mp == str(snapmnt)
                                    and fstype == "xfs")
                        assert {"ro", "norecovery", "nouuid"} <= set(opts.split(",")), opts
                        assert out["loop_device"]
                        assert manifest(str(snapmnt)) == base
                        assert not (snapmnt / "after.txt").exists()
                        with pytest.raises(OSError):
                            (snapmnt / "new").write_text("x")
                    finally:
                        c.unexpose(sid)
                    assert not loopdev.is_mountpoint(snapmnt)
                    c.end_backup()
                    c.snapshot_delete(snapshot_id=sid)
            finally:
                _run("umount", str(fs), check=False)
        finally:
            loopdev.detach(dev)
    finally:
        d.stop()


def _mounts() -> list[tuple[str, str, str]]:
    """(target, fstype, options) from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            out.append((parts[1], parts[2], parts[3]))
    return out


def test_expose_to_bad_directory_leaves_nothing(tmp_path: Path,
                                                sockdir: str) -> None:
    """expose --mount to a missing or non-empty directory (or a file): one clear error,
    and no loop device, no mount, no exposed name left -- also when a name was asked for
    in the same call. The directory is untouched."""
    need("mkfs.ext4")
    d = start_daemon(tmp_path, sockdir, {"v": 32 * MiB})
    try:
        image = os.path.join(d.mount, "volumes", "v.img")
        mkfs_ext4(image)
        full = tmp_path / "full"
        full.mkdir()
        (full / "keep.txt").write_text("mine\n")
        afile = tmp_path / "afile"
        afile.write_text("x")
        with d.client() as c:
            sid = c.snapshot_create(["v"], context="app-rollback")["snapshots"][0][
                "snapshot_id"]
            for target, name in ((tmp_path / "missing", None), (full, None),
                                 (full, "monday"), (afile, "tuesday")):
                with pytest.raises(ControlError) as ei:
                    c.expose(sid, name=name, mount=str(target))
                msg = str(ei.value)
                assert ei.value.name == "E_INVALIDARG", msg
                assert str(target) in msg and "\n" not in msg, msg
                assert loopdev.loops_under(d.mount) == []     # no loop device left
                assert not loopdev.is_mountpoint(target)
                assert os.listdir(os.path.join(d.mount, "exposed")) == []
                (s,) = c.snapshot_list()
                assert not s["exposed_name"] and not s.get("exposed_path"), s
            assert not (tmp_path / "missing").exists()
            assert os.listdir(full) == ["keep.txt"]
            assert (full / "keep.txt").read_text() == "mine\n"
            # and the snapshot still exposes fine afterwards
            ok = tmp_path / "ok"
            ok.mkdir()
            c.expose(sid, mount=str(ok))
            c.unexpose(sid)
            assert loopdev.loops_under(d.mount) == []
            c.snapshot_delete(snapshot_id=sid)
    finally:
        d.stop()
