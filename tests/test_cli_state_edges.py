"""Edges of four state changes, through the CLI against one real daemon (issue 19 #9):

* promote: the snapshot's attributes say what it now is (PLEX, not DIFFERENTIAL) in
  `snapshot show` and in the exported Backup Components Document, as its `kind` says
  `full`;
* end-backup: BackupComplete reaches the writers once; a second end-backup of the set is
  refused in one line and notifies nobody (a hook writer records every call);
* revert --force on a volume a loop device uses (its filesystem mounted): done, with a
  warning on stderr naming the device and the mount, and a WARNING audit line;
* volume resize NAME +SIZE grows by SIZE; a shrink (smaller, or -SIZE) is refused.

The daemon runs with a hook-script writer whose hook appends "ACTION SET_ID" to a file.
Every test removes what it made (snapshots, volumes, mounts, loop devices) in `finally`.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator

import pytest
from conftest import require_kernel
from harness import Daemon, serve_cli
from support import mkfs_ext4, one_line_error, spx

from fuse_mount import loopdev

pytestmark = pytest.mark.kernel
DIFFERENTIAL, PLEX = 0x20000, 0x40000
MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_kernel()
    base = tmp_path_factory.mktemp("edges")
    pool, mount, hooks = str(base / "pool"), str(base / "mnt"), base / "hooks"
    os.makedirs(mount)
    hooks.mkdir()
    hook = hooks / "10-record"
    hook.write_text(f'#!/bin/sh\necho "$1 $SHADOWPLEX_SET_ID" >> {base / "hook.log"}\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    assert spx("pool", "init", pool, "-q").returncode == 0
    with serve_cli(base, "spx-edg-", "--hooks-dir", str(hooks)) as d:
        yield d


def _hook_calls(d: Daemon) -> list[str]:
    log = d.base / "hook.log"
    return log.read_text().splitlines() if log.exists() else []


def _volume(d: Daemon, name: str, size: str) -> None:
    """Setup and cleanup through the Client (in-process): the CLI is what is tested."""
    with d.client() as c:
        c.volume_create(name, size)


def _cleanup(d: Daemon, *vols: str) -> None:
    with d.client() as c:
        for v in vols:
            for s in c.snapshot_list(volume=v):
                c.snapshot_delete(snapshot_id=s["snapshot_id"], unexpose=True)
            c.volume_delete(v)


def test_a_promoted_snapshot_is_plex_everywhere(daemon: Daemon) -> None:
    d = daemon
    _volume(d, "pv", "4M")
    doc = d.base / "pv-set.xml"
    try:
        made = d.json("snapshot", "create", "pv", "--context", "nas-rollback",
                      "--transportable", "--differential")
        (s,) = made["snapshots"]
        assert s["kind"] == "differential" and "DIFFERENTIAL" in s["attribute_names"]
        p = d.json("promote", s["id"])
        assert p["kind"] == "full"
        for view in (p, d.json("snapshot", "show", s["id"])):
            assert view["attributes"] & PLEX and not view["attributes"] & DIFFERENTIAL
            assert "PLEX" in view["attribute_names"], view["attribute_names"]
            assert "DIFFERENTIAL" not in view["attribute_names"]
            # the rest of the mask is the one it was created with
            assert view["attributes"] & ~PLEX == s["attributes"] & ~DIFFERENTIAL
        d.ok("export", made["set_id"], "-o", str(doc))
        (attrs,) = re.findall(r'snapshotAttributes="(\d+)"', doc.read_text())
        assert int(attrs) & PLEX and not int(attrs) & DIFFERENTIAL
    finally:
        _cleanup(d, "pv")


def test_end_backup_notifies_the_writers_once(daemon: Daemon) -> None:
    d = daemon
    _volume(d, "ev", "4M")
    try:
        made = d.json("snapshot", "create", "ev", "--context", "app-rollback")  # writers
        sid = made["set_id"]
        assert f"freeze {sid}" in _hook_calls(d) and f"thaw {sid}" in _hook_calls(d)
        eb = d.json("end-backup", sid)
        assert sorted(eb["writers_notified"]) == ["fsfreeze", "hooks"], eb
        assert _hook_calls(d).count(f"backup-complete {sid}") == 1
        before = _hook_calls(d)
        line = one_line_error(d.run("end-backup", sid), 1, "VSS_E_BAD_STATE")
        assert "completed already" in line and sid in line, line
        assert _hook_calls(d) == before                 # nobody was told again
        assert d.json("snapshot", "show", made["snapshots"][0]["id"])["backup_complete"]
    finally:
        _cleanup(d, "ev")


def test_revert_force_under_a_mounted_loop_device_warns(daemon: Daemon) -> None:
    d = daemon
    _volume(d, "fv", "16M")
    image = d.image("fv")
    target = d.base / "fv-mnt"
    target.mkdir()
    dev = None
    mounted = False
    try:
        mkfs_ext4(image)
        sid = d.json("snapshot", "create", "fv", "--context", "nas-rollback")["snapshots"][0]["id"]
        dev = loopdev.attach(image, read_only=False)
        loopdev.mount_readonly(dev, target, "ext4")
        mounted = True
        # without --force: refused, nothing changed, and no warning anywhere
        line = one_line_error(d.run("revert", sid), 1, "VSS_E_VOLUME_IN_USE")
        assert dev in line and "revert --force" in line, line
        res = d.run("revert", sid, "--force")
        assert res.returncode == 0, res.stderr
        (warning,) = res.stderr.splitlines()
        assert warning.startswith("shadowplex: warning: volume fv was reverted under "
                                  f"{dev} (mounted at {target})"), warning
        assert "fsck" in warning and re.search(r"^name\s+fv$", res.stdout, re.M), res.stdout
        audit = [x for x in d.log_text().splitlines() if "snapshot.revert" in x
                 and f"id={sid}" in x]
        assert len(audit) == 1 and " WARNING " in audit[0], audit
        assert "force=yes" in audit[0] and json.dumps(f"{dev} (mounted at {target})") \
            in audit[0], audit[0]
        # --json keeps the warning in the result too; --quiet prints nothing
        res = d.run("revert", sid, "--force", "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["warning"].startswith(
            f"volume fv was reverted under {dev}"), res
        res = d.run("revert", sid, "--force", "-q")
        assert res.returncode == 0 and res.stdout == res.stderr == "", res
    finally:
        if mounted:
            loopdev.unmount(target)
        if dev is not None:
            loopdev.detach(dev)
        _cleanup(d, "fv")
    # detached: a forced revert says nothing more, its audit line is INFO again
    _volume(d, "fv", "16M")
    try:
        sid = d.json("snapshot", "create", "fv", "--context", "nas-rollback")["snapshots"][0]["id"]
        res = d.run("revert", sid, "--force")
        assert res.returncode == 0 and res.stderr == "", res.stderr
        (audit,) = [x for x in d.log_text().splitlines() if f"id={sid}" in x
                    and "snapshot.revert" in x]
        assert " INFO " in audit and "attached=" not in audit, audit
    finally:
        _cleanup(d, "fv")


def test_volume_resize_grows_by_a_relative_size(daemon: Daemon) -> None:
    d = daemon
    _volume(d, "gv", "4M")
    try:
        assert d.json("volume", "resize", "gv", "+1M")["size"] == 5 * MiB
        with d.client() as c:   # the wire takes it too, spaced
            assert c.volume_resize("gv", "+ 512K")["size"] == 5 * MiB + 512 * 1024
        assert d.json("volume", "resize", "gv", "8M")["size"] == 8 * MiB   # absolute
        one_line_error(d.run("volume", "resize", "gv", "--", "-1M"), 2, "shrinking")
        # without `--`: a size, not an unknown option (argparse's own rule)
        one_line_error(d.run("volume", "resize", "gv", "-1M"), 2, "shrinking")
        one_line_error(d.run("volume", "resize", "gv", "7M"), 2, "shrinking")
        one_line_error(d.run("volume", "resize", "gv", "+x"), 2, "is not a size")
        with d.client() as c:
            (v,) = [v for v in c.volume_list() if v["name"] == "gv"]
        assert v["size"] == 8 * MiB                       # the refusals changed nothing
        assert os.path.getsize(d.image("gv")) == 8 * MiB
    finally:
        _cleanup(d, "gv")
