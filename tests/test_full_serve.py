"""The whole daemon on a pool filesystem that fills up (docs/reliability.md section 4,
"The whole daemon on a full pool filesystem"): `shadowplex serve` as a subprocess (FUSE
mount, coordinator, provider.sqlite beside the pool's catalog) with its pool on a small
loop XFS, btrfs or ext4 (tests/poolfs.py), used through the CLI as an admin would while
a filler file, written and synced until ENOSPC, and the diff area of a busy volume take
the filesystem's last blocks.

What a user may expect, checked at each step: the daemon stays alive; a write through
the mount succeeds -- or, where the filesystem itself has no room for it (btrfs copies
on write; a write into a hole), fails with ENOSPC -- never hangs (each step within
WRITE_TIMEOUT) and never gets EIO; `snapshot create` succeeds or fails with one line
(VSS_E_INSUFFICIENT_STORAGE) and leaves nothing; `snapshot delete` (how an
admin gets room back) works; once the filler is gone everything works again without a
restart; SIGTERM exits promptly with 0; the next start is clean.

The daemon's log is kept off the filesystem that fills up (as an admin's journal is)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import Daemon, launch
from poolfs import fill, loop_filesystem
from support import MKFS, detach_loops_under, need, spx

pytestmark = pytest.mark.kernel

MiB = 1 << 20
VOLUME = 64 * MiB
WRITE_TIMEOUT = 30.0   # seconds for the writes of one step (a busy machine takes < 1 s)
STOP_BOUND = 20.0      # seconds for a SIGTERM'ed daemon on a full filesystem to exit


@contextmanager
def serve(pool: Path, mnt: Path, log: Path) -> Iterator[Daemon]:
    """`shadowplex serve` on POOL mounted on MNT, its log LOG (off the pool's
    filesystem), its socket in a private short directory; up when yielded; loop devices
    on the mount detached and the daemon stopped after, whatever happened."""
    sockdir = tempfile.mkdtemp(prefix="spx-full-")
    sock = os.path.join(sockdir, "ctl.sock")
    mnt.mkdir(exist_ok=True)
    try:
        d = launch(["serve", "--pool", str(pool), "--mount", str(mnt), "--socket", sock,
                    "--config", str(write_config(log.parent))],
                   module="tools.cli", pool=str(pool), mount=str(mnt), socket=sock,
                   log=str(log), wait=False)
        try:
            d.wait_up()
            yield d
        finally:
            detach_loops_under(mnt)
            d.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def write_config(base: Path) -> Path:
    """No hook scripts, no SQLite writer: the writers that apply are fsfreeze's."""
    cfg = base / "serve.toml"
    cfg.write_text('hooks_dir = ""\n')
    return cfg


# the writer: pwrite (+ fsync unless told) of 1 MiB pieces of byte B at the offsets given
# (MiB), each outcome printed as it happens ("ok" or the errno's name): a hang shows as a
# timeout
_WRITER = """
import errno, os, sys
path, byte, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "sync"
fd = os.open(path, os.O_RDWR)
for off in map(int, sys.argv[4:]):
    try:
        os.pwrite(fd, bytes([byte]) * (1 << 20), off << 20)
        if sync:
            os.fsync(fd)
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
os.close(fd)
"""


def write_mib(path: str, byte: int, offsets: range, sync: bool = True) -> list[str]:
    """The outcome of each 1 MiB write + fsync (sync) at OFFSETS (MiB) through the mount."""
    res = subprocess.run([sys.executable, "-c", _WRITER, path, str(byte),
                          "sync" if sync else "nosync", *map(str, offsets)],
                         capture_output=True, text=True,
                         timeout=WRITE_TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr
    out = res.stdout.split()
    assert len(out) == len(offsets), res
    assert set(out) <= {"ok", "ENOSPC", "EIO"}, out
    return out


def new_pool(fs: Path) -> Path:
    """`shadowplex pool init` of FS/pool."""
    pool = fs / "pool"
    res = spx("pool", "init", str(pool))
    assert res.returncode == 0, res.stderr
    return pool


def volume_and_snapshot(d: Daemon, mib: int) -> str:
    """Volume v (VOLUME bytes), its first MIB MiB written with 0x11 through the mount,
    then snapshot s1 of it; v's image path."""
    d.ok("volume", "create", "v", str(VOLUME))
    img = d.image("v")
    assert write_mib(img, 0x11, range(0, mib)) == ["ok"] * mib
    d.ok("snapshot", "create", "v", "--name", "s1")
    return img


def snapshots(d: Daemon) -> list[dict]:
    alive(d)
    return d.json("snapshot", "list")


def alive(d: Daemon) -> None:
    """The daemon still runs (a full btrfs once ended it with SIGBUS: 65c8bef)."""
    rc = d.proc.poll()
    assert rc is None, f"serve died (exit status {rc}):\n{d.log_text()[-3000:]}"


def head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(MiB)


def insufficient_storage(res: subprocess.CompletedProcess[str]) -> None:
    """A command refused for want of room: exit 1, one line naming it, no traceback."""
    assert res.returncode == 1 and res.stdout == "", res
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "VSS_E_INSUFFICIENT_STORAGE" in lines[0], res.stderr


def stop_promptly(d: Daemon) -> int:
    """SIGTERM; the exit status, which must come within STOP_BOUND."""
    d.proc.terminate()
    try:
        return d.proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve did not exit within {STOP_BOUND} s of SIGTERM on a "
                             f"full filesystem:\n{d.log_text()[-3000:]}") from None


def orphan_set_records(pool: Path) -> set[str]:
    """Set records of provider.sqlite (read after serve stopped) without a snapshot in
    the pool's catalog."""
    with contextlib.closing(sqlite3.connect(pool / "provider.sqlite")) as p, \
            contextlib.closing(sqlite3.connect(pool / "catalog.sqlite")) as c:
        sets = {r[0] for r in p.execute("SELECT set_id FROM sets")}
        live = {r[0] for r in c.execute("SELECT set_id FROM snapshots")}
    return sets - live


# on a full btrfs an overwrite in place needs new blocks (copy on write), with or without
# a snapshot: the writer gets ENOSPC, logged by the data path
@pytest.mark.daemon_log_expects(r"(write|fsync|flush).*No space left on device -> ENOSPC")
@pytest.mark.parametrize("fstype", ["xfs", "btrfs", "ext4"])
def test_serve_on_a_filesystem_that_fills_up(tmp_path: Path, fstype: str) -> None:
    """Room, full, room again, full again, SIGTERM, restart -- one daemon's life."""
    need(MKFS[fstype][0])
    log = tmp_path / "daemon.log"
    # XFS and ext4 overwrite allocated blocks in place: no room needed, so the writes
    # must all succeed (invariant 5); btrfs's may get ENOSPC from the filesystem itself
    outcomes = {"ok", "ENOSPC"} if fstype == "btrfs" else {"ok"}
    with loop_filesystem(fstype, tmp_path) as fs:
        pool = new_pool(fs)
        with serve(pool, tmp_path / "mnt", log) as d:
            img = volume_and_snapshot(d, 32)
            # 1. full: copy-before-write of a busy volume; the overflow may delete s1
            filler = fill(fs)
            assert set(write_mib(img, 0x22, range(0, 8))) <= outcomes
            for s in snapshots(d):
                assert head(s["device_path"]) == b"\x11" * MiB
            # a snapshot on the full filesystem: made, or one line and nothing left
            res = d.run("snapshot", "create", "v", "--name", "s2")
            if res.returncode != 0:
                insufficient_storage(res)
                assert "s2" not in [s["name"] for s in snapshots(d)]
            status = d.json("status")
            assert status["creating"] is None and status["volumes_in_use"] == {}, status
            assert status["snapshots"] == len(snapshots(d)), status
            assert "clean" in d.ok("check").stdout
            for s in snapshots(d):    # what an admin does to get room back
                d.ok("snapshot", "delete", s["id"])
            assert snapshots(d) == []
            # 2. room again, no restart
            filler.unlink()
            assert write_mib(img, 0x33, range(0, 16)) == ["ok"] * 16
            d.ok("snapshot", "create", "v", "--name", "s3")
            assert "clean" in d.ok("check").stdout
            # 3. full again: the overflow must still be able to record its delete
            fill(fs)
            assert set(write_mib(img, 0x44, range(16, 24))) <= outcomes
            left = snapshots(d)
            for s in left:
                assert head(s["device_path"]) == b"\x33" * MiB
            assert "clean" in d.ok("check").stdout
            # 4. stop on the full filesystem
            assert stop_promptly(d) == 0, d.log_text()[-3000:]
        # 5. the next start: its reconciliation is clean
        (fs / "filler").unlink()
        with serve(pool, tmp_path / "mnt", log) as d:
            assert [s["id"] for s in snapshots(d)] == [s["id"] for s in left]
            assert "clean" in d.ok("check").stdout
            assert stop_promptly(d) == 0
        assert orphan_set_records(pool) == set()


# the stop's flush of the held writes and the close after it (ext4: each says so), the
# writes that found no room (xfs, btrfs)
@pytest.mark.daemon_log_expects(r"flushing volume v: .*No space left on device",
                                r"writing held chunks back to volume v: .*No space left",
                                r"volume v: not flushed at close: .*No space left",
                                r"closed; writes not yet synced by their writers could not",
                                r"write: .*No space left on device -> ENOSPC")
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_sigterm_with_held_writes_on_a_full_filesystem(tmp_path: Path, fstype: str) -> None:
    """Writes into holes after a snapshot are held (their preservation needs no room but
    a map block) and written out at fsync or at stop. With 512 KiB left for 4 MiB of
    them the stop's flush cannot: serve says so in its log, exits 0 within STOP_BOUND
    (docs/provider.md), and the next start finds the snapshot as it was, the pool clean,
    no record orphaned; what was never fsync'ed may be lost, as on any disk. (On XFS and
    btrfs a whole-chunk write is preserved by reference, which the default diff-area
    limit counts as room taken: there the overflow may delete the snapshot instead, and
    the writes then get ENOSPC at once.)"""
    need(MKFS[fstype][0])
    log = tmp_path / "daemon.log"
    with loop_filesystem(fstype, tmp_path) as fs:
        pool = new_pool(fs)
        with serve(pool, tmp_path / "mnt", log) as d:
            img = volume_and_snapshot(d, 8)
            fill(fs, leave=512 << 10)
            out = write_mib(img, 0x55, range(32, 36), sync=False)
            assert set(out) <= {"ok", "ENOSPC"}
            if fstype == "ext4":
                assert out == ["ok"] * 4      # held
            kept = snapshots(d)
            assert stop_promptly(d) == 0, d.log_text()[-3000:]
        if fstype == "ext4":
            assert kept and "flushing volume v: " in d.log_text()
        (fs / "filler").unlink()
        with serve(pool, tmp_path / "mnt", log) as d:
            assert [s["id"] for s in snapshots(d)] == [s["id"] for s in kept]
            for s in kept:
                assert s["name"] == "s1" and head(s["device_path"]) == b"\x11" * MiB
                d.ok("snapshot", "delete", s["id"])
            assert "clean" in d.ok("check").stdout
            assert stop_promptly(d) == 0
        assert orphan_set_records(pool) == set()


def test_a_full_catalog_is_no_room_not_a_bug(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """SQLITE_FULL (here a real one: a database capped by max_page_count) and ENOSPC from
    below are a full filesystem, not a bug: the control API names them
    VSS_E_INSUFFICIENT_STORAGE in one line, the FUSE layer answers ENOSPC, neither logs
    a traceback (before: VSS_E_UNEXPECTED, and EIO 'unexpected error (bug)')."""
    from fuse_mount.errors import to_fuse_error
    from provider.protocol import to_vss_error
    with contextlib.closing(sqlite3.connect(tmp_path / "capped.sqlite")) as db:
        db.execute("CREATE TABLE t (x BLOB)")
        db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
        with pytest.raises(sqlite3.OperationalError) as ei:
            db.execute("INSERT INTO t VALUES (?)", (bytes(1 << 16),))
    for exc in (ei.value, OSError(errno.ENOSPC, "No space left on device")):
        e = to_vss_error(exc)
        assert e.name == "VSS_E_INSUFFICIENT_STORAGE", e
        assert "free space on the pool's filesystem" in str(e) and "\n" not in str(e)
        assert to_fuse_error(exc, "write", writing=True).errno == errno.ENOSPC
    assert not [r for r in caplog.records if r.exc_info], caplog.text
