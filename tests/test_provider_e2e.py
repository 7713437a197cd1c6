"""End to end through the real daemon: `python -m provider.service` (FUSE mount + control
socket) as a subprocess, the client over the socket, loop devices and real filesystems.

Every test cleans up in `finally` (filesystems, loop devices, the daemon, its mount); the
session guard in conftest.py fails the run if anything is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import start_daemon
from support import mkfs_ext4, mounted_ext4, need
from support import run_cmd as _run

from fuse_mount import loopdev
from provider.client import ControlError

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- tests
def test_fsfreeze_snapshot_expose_mount_and_delete(tmp_path: Path, sockdir: str) -> None:
    need("mkfs.ext4")
    need("e2fsck")
    d = start_daemon(tmp_path, sockdir, {"data": 64 << 20})
    try:
        image = os.path.join(d.mount, "volumes", "data.img")
        fs = tmp_path / "fs"
        snapmnt = tmp_path / "snap"
        snapmnt.mkdir()
        with mounted_ext4(image, fs):
            (fs / "hello.txt").write_text("consistent\n")   # dirty in the page cache
            with d.client(client="e2e") as c:
                assert [w["name"] for w in c.writers_list()] == ["fsfreeze"]
                res = c.snapshot_create([image], context="backup")   # by device path
                snap = res["snapshots"][0]
                sid = snap["snapshot_id"]
                assert snap["volume"] == "data" and snap["status"] == "CREATED"
                assert snap["device_object"] == os.path.join(d.mount, ".shadow",
                                                              f"{sid}.img")
                st = {w["name"]: w["state"] for w in c.writers_list()}
                assert st == {"fsfreeze": "VSS_WS_WAITING_FOR_BACKUP_COMPLETE"}
                (fs / "hello.txt").write_text("changed after the snapshot\n")
                # fsfreeze made the filesystem consistent: the snapshot is clean as is
                fsck = _run("e2fsck", "-fn", snap["device_object"], check=False)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
                p = c.expose(sid, name="monday", mount=str(snapmnt))
                assert p["exposed_path"] == str(snapmnt) and p["loop_device"]
                assert os.path.exists(os.path.join(d.mount, "exposed", "monday.img"))
                assert (snapmnt / "hello.txt").read_text() == "consistent\n"
                with pytest.raises(ControlError) as ei:
                    c.snapshot_delete(snapshot_id=sid)
                assert ei.value.name == "VSS_E_VOLUME_IN_USE"
                with pytest.raises(ControlError) as ei:
                    c.expose(sid, mount=str(tmp_path))       # mounted already
                assert ei.value.name == "VSS_E_OBJECT_ALREADY_EXISTS"
                assert c.end_backup()["writers_notified"] == ["fsfreeze"]
                out = c.snapshot_delete(snapshot_id=sid, unexpose=True)
                assert out["deleted"] == [sid]
                assert not loopdev.is_mountpoint(snapmnt)
                # only the origin's own loop device is left on the mount
                assert [b for _, b in loopdev.loops_under(d.mount)] == [image]
                assert c.check()["ok"]
    finally:
        d.stop()


def test_expose_survives_restart_and_auto_release(tmp_path: Path, sockdir: str) -> None:
    need("mkfs.ext4")
    d = start_daemon(tmp_path, sockdir, {"v": 32 << 20, "w": 32 << 20})
    try:
        image = os.path.join(d.mount, "volumes", "v.img")
        mkfs_ext4(image)
        with d.client() as c:
            keep = c.snapshot_create(["v", "w"], context="app-rollback", kind="plex")
            gone = c.snapshot_create(["v"], context="backup")
            c.expose(keep["snapshots"][0]["snapshot_id"], name="keep")
            before = {s["snapshot_id"]: s for s in c.snapshot_list()}
            assert len(before) == 3
        with d.client() as c:     # the first session ended: its backup set is gone
            ids = {s["snapshot_id"] for s in c.snapshot_list()}
            assert ids == {s["snapshot_id"] for s in keep["snapshots"]}
            c.snapshot_create(["w"], context="backup")    # alive when the daemon stops
        d.stop()
        d = start_daemon(tmp_path, sockdir, {})
        with d.client() as c:
            after = {s["snapshot_id"]: s for s in c.snapshot_list()}
            assert set(after) == {s["snapshot_id"] for s in keep["snapshots"]}
            for sid, s in after.items():
                for k in ("snapshot_set_id", "attributes", "status", "exposed_name",
                          "originating_machine", "snapshots_count", "kind"):
                    assert s[k] == before[sid][k], k
            assert os.path.exists(os.path.join(d.mount, "exposed", "keep.img"))
            assert c.snapshot_delete(all=True)["count"] == 2
        del gone
    finally:
        d.stop()


def test_one_instant_through_the_kernel(tmp_path: Path, sockdir: str) -> None:
    """Counter writes through the FUSE mount to two volumes, in alternating order, while
    snapshot sets are taken: every pair is equal, or the volume written first is ahead."""
    d = start_daemon(tmp_path, sockdir, {"a": 8 << 20, "b": 8 << 20})
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def writer() -> None:
        try:
            fds = {v: os.open(os.path.join(d.mount, "volumes", f"{v}.img"), os.O_RDWR)
                   for v in ("a", "b")}
            try:
                n = 0
                while not stop.is_set():
                    n += 1
                    data = n.to_bytes(8, "little") * 512
                    for v in (("a", "b") if n % 2 else ("b", "a")):
                        os.pwrite(fds[v], data, 0)
                    rounds[0] = n
            finally:
                for fd in fds.values():
                    os.close(fd)
        except BaseException as e:   # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    try:
        with d.client() as c:
            t.start()
            pairs = []
            for i in range(15):
                res = c.snapshot_create(["a", "b"], context="nas-rollback",
                                        kind="plex" if i % 5 == 4 else None)
                vals = {}
                for s in res["snapshots"]:
                    with open(s["device_object"], "rb") as f:
                        vals[s["volume"]] = int.from_bytes(f.read(8), "little")
                pairs.append((vals["a"], vals["b"]))
                time.sleep(0.01)
            stop.set()
            t.join(30)
            assert not errors, errors
            assert rounds[0] > 15
            for va, vb in pairs:
                if va != vb:
                    assert abs(va - vb) == 1, pairs
                    n = max(va, vb)
                    assert ("a" if va > vb else "b") == ("a" if n % 2 else "b"), pairs
            assert len(set(pairs)) > 1
            assert c.snapshot_delete(all=True)["count"] == 30
    finally:
        stop.set()
        t.join(30)
        d.stop()


def test_requester_killed_mid_freeze(tmp_path: Path, sockdir: str) -> None:
    """A hook writer that hangs in freeze; the requester process is killed meanwhile: the
    daemon aborts the set, every hook hears abort (after thaw), nothing is left."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    trace = tmp_path / "hook.log"
    hook = hooks / "10-slow"
    hook.write_text(f"#!/bin/sh\necho \"$1\" >> {trace}\n"
                    "[ \"$1\" = freeze ] && sleep 3\nexit 0\n")
    hook.chmod(0o755)
    d = start_daemon(tmp_path, sockdir, {"a": 8 << 20},
                     {"hooks_dir": str(hooks), "fsfreeze": False, "hook_timeout": 20})
    try:
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                "from provider.client import Client\n"
                f"c = Client({d.socket!r})\n"
                "c.snapshot_create(['a'], context='app-rollback')\n")
        child = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 20
        while not (trace.exists() and "freeze" in trace.read_text()):
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.05)
        child.kill()
        child.wait(10)
        with d.client() as c:
            deadline = time.monotonic() + 20
            while c.status()["creating"] is not None or "abort" not in trace.read_text():
                assert time.monotonic() < deadline, (trace.read_text(), d.log_text())
                time.sleep(0.1)
            assert c.snapshot_list() == []
            assert c.set_list() == []
        assert trace.read_text().split() == ["freeze", "thaw", "abort"]
        assert "aborting snapshot set" in d.log_text()
    finally:
        d.stop()


SQLITE_LOAD = r"""
import os, sqlite3, sys, time
db, stop = sys.argv[1], sys.argv[2]
c = sqlite3.connect(db, isolation_level=None, timeout=60)
n = 0
while not os.path.exists(stop):
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(v) VALUES (randomblob(500))")
    c.execute("COMMIT")
    n += 1
    time.sleep(0.002)
print(n, flush=True)
"""


def test_sqlite_under_load_is_consistent_in_every_snapshot(tmp_path: Path,
                                                          sockdir: str) -> None:
    """A SQLite database under a write load, snapshotted through the SQLite writer and
    fsfreeze, exposed with --mount: every copy passes PRAGMA integrity_check (20 times)."""
    import sqlite3
    need("mkfs.ext4")
    fs = tmp_path / "fs"
    db = fs / "app.db"
    stop = tmp_path / "stop"
    snapmnt = tmp_path / "snap"
    snapmnt.mkdir()
    d = start_daemon(tmp_path, sockdir, {"db": 64 << 20},
                     {"sqlite_databases": [str(db)]})
    try:
        image = os.path.join(d.mount, "volumes", "db.img")
        with mounted_ext4(image, fs):
            conn = sqlite3.connect(db, isolation_level=None)
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
            conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
            conn.close()
            load = subprocess.Popen([sys.executable, "-c", SQLITE_LOAD, str(db), str(stop)],
                                    stdout=subprocess.PIPE)
            try:
                with d.client() as c:
                    assert {w["name"] for w in c.writers_list()} == {"sqlite", "fsfreeze"}
                    last = 0
                    for i in range(20):
                        res = c.snapshot_create(["db"], context="backup")
                        sid = res["snapshots"][0]["snapshot_id"]
                        c.expose(sid, mount=str(snapmnt))
                        copy = tmp_path / f"copy{i}"
                        copy.mkdir()
                        try:
                            for name in ("app.db", "app.db-wal"):
                                if (snapmnt / name).exists():
                                    shutil.copy(snapmnt / name, copy / name)
                        finally:
                            c.unexpose(sid)
                        check = sqlite3.connect(copy / "app.db")
                        try:
                            assert check.execute("PRAGMA integrity_check").fetchone()[0] \
                                == "ok", i
                            rows = check.execute("SELECT count(*) FROM t").fetchone()[0]
                        finally:
                            check.close()
                        assert rows >= last, (i, rows, last)
                        last = rows
                        c.end_backup()
                        c.snapshot_delete(snapshot_id=sid)
                    assert last > 0
            finally:
                stop.touch()
                out, _ = load.communicate(timeout=60)
            assert load.returncode == 0 and int(out) > last
    finally:
        d.stop()


def test_deleted_volume_vanishes_from_the_mount_at_once(tmp_path: Path, sockdir: str) -> None:
    """The kernel caches names for a second (entry_timeout); a delete through the API
    invalidates the name at once. pyfuse3 sends that notification from a thread of its
    own, so 'at once' means well within the cache time: the test allows 0.3 s (without
    the invalidation the name would stay for the whole second)."""
    d = start_daemon(tmp_path, sockdir, {"v": 1 << 20})
    try:
        image = os.path.join(d.mount, "volumes", "gone.img")
        with d.client() as c:
            c.volume_create("gone", 1 << 20)
            assert os.path.exists(image)          # the kernel now caches the name
            c.volume_delete("gone")
        deadline = time.monotonic() + 0.3
        while os.path.exists(image) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.path.exists(image)
        assert "gone.img" not in os.listdir(os.path.join(d.mount, "volumes"))
    finally:
        d.stop()
