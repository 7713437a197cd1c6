"""The seed sequence between two real hosts (issue 16 item 4): each a network namespace
running its own host daemon (`serve --array`), the array in a third.

hostB (the application host): ext4 on volume db through its own mount, files and a
SQLite database on it; its requester creates an APP_ROLLBACK|TRANSPORTABLE set (hostB's
fsfreeze and SQLite writers freeze on hostB), exports the BCD. hostC (the backup host):
imports the document (the LUNs surface on hostC only), exposes and mounts the snapshot
read-only, tars the files and checks them against hostB's point-in-time manifest and the
database with integrity_check, deletes the set. hostB's end-backup tells its writers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon
from nbd_net import Net
from support import detach_loops_under, run_cmd
from test_host_mode import _wait_for, start_host

from provider.client import Client

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _manifest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and "lost+found" not in p.parts}


@pytest.fixture
def two_hosts(tls_array: Net, tmp_path: Path) -> Iterator[tuple[Net, Daemon, Daemon]]:
    app = tmp_path / "app"
    app.mkdir()
    b = start_host(tls_array, "hostB", tmp_path,
                   extra=["--sqlite-db", str(app / "shop.db")])
    c = None
    try:
        c = start_host(tls_array, "hostC", tmp_path)
        yield tls_array, b, c
    finally:
        for d in (c, b):
            if d is not None:
                detach_loops_under(Path(d.mount))
                d.stop()


def test_the_transport_sequence_between_two_hosts(two_hosts: tuple[Net, Daemon, Daemon],
                                                   tmp_path: Path) -> None:
    t, b, c = two_hosts
    app = tmp_path / "app"
    img = Path(b.mount) / "volumes" / "db.img"
    dev = run_cmd("losetup", "--find", "--show", "--direct-io=on", str(img)).stdout.strip()
    mounted = False
    try:
        run_cmd("mkfs.ext4", "-q", "-F", dev)
        run_cmd("mount", dev, str(app))
        mounted = True
        (app / "docs").mkdir()
        for i in range(20):
            (app / "docs" / f"f{i}.bin").write_bytes(os.urandom(4096 * (i + 1)))
        db = sqlite3.connect(app / "shop.db")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, what TEXT)")
        db.executemany("INSERT INTO orders (what) VALUES (?)",
                       [(f"order {i}",) for i in range(500)])
        db.commit()
        db.close()
        want = {k: v for k, v in _manifest(app).items() if not k.startswith("shop.db")}
        # hostB's requester: a transportable, persistent set; its writers freeze on hostB
        res = b.json("snapshot", "create", "db", "--context", "app-rollback",
                     "--transportable", "--name", "shop", "--description", "for host C")
        set_id = res["set_id"]
        sid = res["snapshots"][0]["id"]
        froze = b.log_text()
        assert f"froze {app}" in froze and "froze database" in froze, froze
        assert "froze" not in t.d.log_text()   # the array's writers took no part
        # hostB goes on writing after the instant
        (app / "docs" / "f0.bin").write_bytes(b"rewritten after the snapshot")
        (app / "docs" / "new.bin").write_bytes(b"made after the snapshot")
        bcd = tmp_path / "set.xml"
        b.ok("export", set_id, "-o", str(bcd))
        assert bcd.stat().st_size > 0
        # the document travels as a file; hostC imports it: the LUNs surface there only
        imported = c.json("import", str(bcd))
        assert [s["id"] for s in imported["snapshots"]] == [sid]
        # its name came in the document, into hostC's own catalog (issue 19 #2)
        assert [(s["name"], s["description"]) for s in imported["snapshots"]] == [
            ("shop", "for host C")]
        assert c.json("snapshot", "show", "db@shop")["id"] == sid
        assert (Path(c.mount) / ".shadow" / f"{sid}.img").exists()
        # hostB follows the array (array.watch): its LUN is hostC's now
        _wait_for(lambda: not (Path(b.mount) / ".shadow" / f"{sid}.img").exists(),
                  "the snapshot gone from hostB", timeout=5)
        # hostC exposes and mounts it read-only, tars it, checks it
        ro = tmp_path / "ro"
        ro.mkdir()
        c.ok("expose", sid, "--name", "nightly", "--mount", str(ro))
        try:
            tar = tmp_path / "backup.tar"
            with tarfile.open(tar, "w") as tf:
                tf.add(ro, arcname=".")
            out = tmp_path / "restored"
            out.mkdir()
            with tarfile.open(tar) as tf:
                tf.extractall(out, filter="data")
            got = {k: v for k, v in _manifest(out).items() if not k.startswith("shop.db")}
            assert got == want
            check = sqlite3.connect(f"file:{out / 'shop.db'}?mode=ro", uri=True)
            assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert check.execute("SELECT count(*) FROM orders").fetchone() == (500,)
            check.close()
        finally:
            c.ok("unexpose", sid)
        # hostC deletes the set; the array has nothing left of it
        c.ok("snapshot", "delete", "--set", set_id)
        assert t.d.json("snapshot", "list") == []
        # hostB's end-backup: BackupComplete to hostB's writers
        done = b.json("end-backup", set_id)
        assert json.dumps(done)
    finally:
        if mounted:
            subprocess.run(["umount", str(app)], check=False, timeout=60)
        run_cmd("losetup", "-d", dev, check=False)


def test_a_host_does_not_see_another_host_s_volume(two_hosts: tuple[Net, Daemon, Daemon]
                                                   ) -> None:
    t, b, c = two_hosts
    assert os.listdir(Path(c.mount) / "volumes") == []
    res = c.run("snapshot", "create", "db")
    assert res.returncode != 0 and "db" in res.stderr
    t.d.ok("volume", "present", "db", "--to", "hostB", "--to", "hostC")
    _wait_for(lambda: "db.img" in os.listdir(Path(c.mount) / "volumes"), "db on hostC")


def test_an_auto_release_import_dies_with_the_importing_session(
        two_hosts: tuple[Net, Daemon, Daemon]) -> None:
    t, b, c = two_hosts
    with Client(socket_path=b.socket, client="backup-app") as on_b:
        made = on_b.snapshot_create(["db"], context="backup", attributes="transportable")
        set_id, sid = made["set_id"], made["snapshots"][0]["snapshot_id"]
        doc = on_b.export(set_id)["document"]
        with Client(socket_path=c.socket, client="backup-server") as on_c:
            on_c.import_set(doc)
            assert (Path(c.mount) / ".shadow" / f"{sid}.img").exists()
        # the importing session ended: its auto-release set is gone from the array
        _wait_for(lambda: t.d.json("snapshot", "list") == [], "the set deleted", 10)
    _wait_for(lambda: not (Path(c.mount) / ".shadow" / f"{sid}.img").exists(),
              "the snapshot gone from hostC's mount", 5)


def test_a_backup_host_killed_mid_backup_leaves_the_set_deletable(
        two_hosts: tuple[Net, Daemon, Daemon], tmp_path: Path) -> None:
    t, b, c = two_hosts
    made = b.json("snapshot", "create", "db", "--transportable")
    set_id, sid = made["set_id"], made["snapshots"][0]["id"]
    bcd = tmp_path / "set.xml"
    b.ok("export", set_id, "-o", str(bcd))
    c.ok("import", str(bcd))
    fd = os.open(Path(c.mount) / ".shadow" / f"{sid}.img", os.O_RDONLY)   # mid-backup
    try:
        c.proc.kill()
        c.proc.wait(10)
    finally:
        with contextlib.suppress(OSError):   # ENOTCONN: its mount died with it
            os.close(fd)
    subprocess.run(["fusermount3", "-u", "-z", c.mount], check=False, timeout=30)
    # the array is consistent, and its own host deletes the set
    assert t.d.json("check")["problems"] == []
    t.d.ok("snapshot", "delete", "--set", set_id)
    assert t.d.json("snapshot", "list") == []
