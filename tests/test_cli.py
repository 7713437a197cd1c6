"""The `shadowplex` command line against one real daemon (kernel).

The module's daemon is started the way an administrator would: `python -m tools.cli serve
--config FILE.toml` (pool, mount and socket from the file; the socket in a directory
that does not exist yet, made by the control service). Every command is run as a
subprocess (`python -m tools.cli --socket ...`), checked in its --json form for the
stable field names, and in at least one failing form per command family: exit 1 for a
failed operation, 2 for a usage error, one line on stderr and never a traceback. The
daemon-free tests at the end check argv mistakes (exit 2), `serve` leaving nothing
behind on bad paths, and main()'s catch-all.

Cleanup: every test undoes what it made in `finally` (mounts, loop devices, snapshots);
the fixture stops the daemon (SIGTERM, then fusermount3 -u -z and SIGKILL); conftest's
session guard fails the run if anything is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_kernel
from harness import Daemon, running_cli
from support import ENV, ROOT, mkfs_ext4, one_line_error, read_head, spx, write_synced
from support import mounted as _mounted
from support import run_cmd as _run

from blockstore.fileio import reflink_probe
from provider.config import EXIT_CONFIG

pytestmark = pytest.mark.kernel
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NAA = re.compile(r"[0-9a-f]{32}")
# the stable snapshot fields of every --json snapshot (README, tools/cli.snapshot_view)
SNAPSHOT_FIELDS = ("id", "set_id", "volume", "naa", "state", "attributes", "attribute_names",
                   "device_path", "exposed_path", "created")
# the wire's names of those fields, and the old table-only ones: not in the CLI's --json
DROPPED_FIELDS = ("snapshot_id", "snapshot_set_id", "status", "device_object",
                  "creation_timestamp", "created_at", "exposed")
PERSISTENT, DIFFERENTIAL, PLEX = 0x1, 0x20000, 0x40000
TRANSPORTABLE, IMPORTED, EXPOSED_LOCALLY = 0x20, 0x80000, 0x100000


def eventually(pred: Any, timeout: float = 3.0) -> bool:
    """The mount shows a LUN change (a deleted name, a new size) within the kernel's
    entry/attribute cache time (fuse_mount LUN_TIMEOUT, 1 s), not necessarily at once."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gone_soon(path: str) -> bool:
    return eventually(lambda: not os.path.exists(path))


def check_snapshot(s: dict[str, Any]) -> None:
    for f in SNAPSHOT_FIELDS:
        assert f in s, (f, sorted(s))
    for f in DROPPED_FIELDS:   # one name per field (issue 19 #4)
        assert f not in s, (f, sorted(s))
    assert GUID.fullmatch(s["id"]) and GUID.fullmatch(s["set_id"])
    assert NAA.fullmatch(s["naa"])
    assert s["state"] == "CREATED"
    assert isinstance(s["attributes"], int) and not isinstance(s["attributes"], bool)
    # the names are the integer's bits, not a separate opinion
    from provider.vss import attr_names
    assert s["attribute_names"] == attr_names(s["attributes"])
    assert isinstance(s["created"], float) and abs(s["created"] - time.time()) < 600
    assert s["device_path"].endswith(f"/.shadow/{s['id']}.img")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_kernel()
    base = tmp_path_factory.mktemp("cli")
    pool, mount = str(base / "pool"), str(base / "mnt")
    os.makedirs(mount)
    # `pool init` is tested here: the chunk size it was given is what `status` reports
    res = spx("pool", "init", pool, "--chunk-size", "16K", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["path"] == pool and info["chunk_size"] == 16384
    assert NAA.fullmatch(info["pool_id"])
    # what it says of the preserve mode is what its file system can do
    shares = reflink_probe(os.path.join(pool, "luns"), os.path.join(pool, "diff"), 16384)
    assert info["preserve"] == ("reflink" if shares else "copy")
    sockdir = tempfile.mkdtemp(prefix="spx-cli-")   # short: sun_path is 108 bytes
    sock = os.path.join(sockdir, "run", "ctl.sock")   # run/ does not exist yet
    conf = base / "serve.toml"
    # relative paths: relative to the file's directory; no hook writers
    conf.write_text(f'pool = "pool"\nmount = "mnt"\nsocket = "{sock}"\nhooks_dir = ""\n'
                    'default_kind = "differential"\nhold_deadline = 10\n')
    # `serve --config FILE`: the CLI's own way in (the file names pool, mount, socket)
    with running_cli(["serve", "--config", str(conf)], base, sock, sockdir) as d:
        yield d


@contextlib.contextmanager
def loop_ext4(image: str) -> Iterator[None]:
    """Put an ext4 filesystem on a volume (through a loop device, detached again)."""
    mkfs_ext4(image)
    yield


def _cleanup_snapshots(d: Daemon, volume: str) -> None:
    from provider.client import Client
    with Client(d.socket) as c:
        for s in c.snapshot_list(volume=volume):
            c.snapshot_delete(snapshot_id=s["snapshot_id"], unexpose=True)


# --------------------------------------------------------------------------- daemon
def test_status_reflects_the_config_file(daemon: Daemon) -> None:
    d = daemon
    st = d.json("status")
    # pool and mount came from the TOML file, relative to its directory
    assert st["pool"] == d.pool and st["mount"] == d.mount
    assert st["chunk_size"] == 16384
    assert st["preserve"] in ("copy", "reflink")
    assert st["capabilities"]["reflink"] == (st["preserve"] == "reflink")
    assert st["writers"] == ["fsfreeze"]             # hooks_dir = "": no hook writer
    assert isinstance(st["volumes"], int) and isinstance(st["snapshots"], int)
    assert st["capabilities"]["plex"] is True
    human = d.ok("status").stdout
    assert re.search(rf"^mount\s+{re.escape(d.mount)}$", human, re.M), human
    assert re.search(r"^capabilities\s+plex=yes promote=yes .*max_snapshots_per_volume=512$",
                     human, re.M), human
    # a second pool init on the live pool: refused, nothing touched
    one_line_error(spx("pool", "init", d.pool), 1, "is not empty")


def test_volume_commands(daemon: Daemon) -> None:
    d = daemon
    v = d.json("volume", "create", "cv", "4M")
    assert v["name"] == "cv" and v["size"] == 4 << 20 and NAA.fullmatch(v["naa"])
    assert v["path"] == d.image("cv") and os.path.getsize(d.image("cv")) == 4 << 20
    try:
        rows = d.json("volume", "list")
        assert [r["naa"] for r in rows if r["name"] == "cv"] == [v["naa"]]
        assert re.search(r"^cv\s+4\.0 MiB\s+0 B\s+" + v["naa"], d.ok("volume", "list").stdout,
                         re.M)
        # space (issue 19 #3): a fresh sparse volume holds nothing, through the mount too
        assert rows[[r["name"] for r in rows].index("cv")]["allocated"] == 0
        assert os.stat(d.image("cv")).st_blocks == 0   # `du` on the served image
        with open(d.image("cv"), "r+b") as f:
            f.write(b"w" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        assert eventually(lambda: os.stat(d.image("cv")).st_blocks * 512 >= 1 << 20)
        (cv,) = [r for r in d.json("volume", "list") if r["name"] == "cv"]
        assert 1 << 20 <= cv["allocated"] < 2 << 20
        df = d.json("df")
        assert df["space_total"] >= df["space_free"] >= df["space_available"] >= 0
        assert df["allocated"] >= cv["allocated"] and "cv" in [v["name"] for v in df["volumes"]]
        human = d.ok("df").stdout
        assert human.startswith(f"pool {d.pool}: ") and "for snapshots" in human
        assert re.search(r"^cv\s+4\.0 MiB\s+1\.\d MiB\s", human, re.M), human
        r = d.json("volume", "resize", "cv", "8M")
        assert r["size"] == 8 << 20 and r["naa"] == v["naa"]    # same LUN, grown
        assert eventually(lambda: os.path.getsize(d.image("cv")) == 8 << 20)
        one_line_error(d.run("volume", "create", "cv", "1M"), 1, "VSS_E_OBJECT_ALREADY_EXISTS")
        one_line_error(d.run("volume", "create", "a/b", "1M"), 2, "invalid volume name")
        one_line_error(d.run("volume", "create", "odd", "1000"), 2, "multiple of 512")
        one_line_error(d.run("volume", "resize", "cv", "1M"), 2, "shrinking")
        one_line_error(d.run("volume", "delete", "nosuch"), 1, "VSS_E_OBJECT_NOT_FOUND")
        assert os.path.getsize(d.image("cv")) == 8 << 20      # the failures changed nothing
    finally:
        assert d.json("volume", "delete", "cv") == {"deleted": "cv"}
    assert "cv" not in {r["name"] for r in d.json("volume", "list")}
    assert gone_soon(d.image("cv"))



def test_volume_delete_refuses_a_volume_in_use(daemon: Daemon) -> None:
    """`volume delete` of a volume in use is refused, as lvremove refuses an open LV, and
    the one line says what to do -- there is no --force (the message used to offer one):
    a loop device on it (detach it), a process with the image open (close it: the line
    names it). Once they are gone it is deleted, also right after the close."""
    from fuse_mount import loopdev
    d = daemon
    d.ok("volume", "create", "busy", "4M")
    image = d.image("busy")
    dev = loopdev.attach(image, read_only=False)
    try:
        line = one_line_error(d.run("volume", "delete", "busy"), 1, "VSS_E_VOLUME_IN_USE")
        assert f"loop device(s) {dev} use it" in line and "losetup -d" in line, line
        assert "force" not in line, line
    finally:
        loopdev.detach(dev)
    with open(image, "rb") as f:
        holder = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        line = one_line_error(d.run("volume", "delete", "busy"), 1, "VSS_E_VOLUME_IN_USE")
        assert f"is open (by pid {holder.pid} (sleep, {image}))" in line, line
        assert "force" not in line, line
        assert "busy" in {r["name"] for r in d.json("volume", "list")}
    finally:
        holder.kill()
        holder.wait(10)
    assert d.json("volume", "delete", "busy") == {"deleted": "busy"}
    assert gone_soon(image)


def test_snapshot_create_list_show_delete(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "sv", "4M")
    try:
        a = d.json("snapshot", "create", "sv", "--context", "nas-rollback")
        (sa,) = a["snapshots"]
        check_snapshot(sa)
        assert sa["set_id"] == a["set_id"] and sa["volume"] == "sv"
        assert sa["attributes"] & PERSISTENT and sa["attributes"] & DIFFERENTIAL
        assert sa["exposed_path"] is None
        b = d.json("snapshot", "create", "sv", "--context", "0x9", "--plex")   # app-rollback
        (sb,) = b["snapshots"]
        check_snapshot(sb)
        assert sb["attributes"] & PLEX and not sb["attributes"] & DIFFERENTIAL
        assert sb["context"] == "app-rollback"
        c = d.json("snapshot", "create", "sv", "--context", "nas-rollback")
        sc = c["snapshots"][0]

        rows = d.json("snapshot", "list", "--volume", "sv")
        assert [r["id"] for r in rows] == [sa["id"], sb["id"], sc["id"]]
        for r in rows:
            check_snapshot(r)
        assert [r["id"] for r in d.json("snapshot", "list", "--set", b["set_id"])] == [sb["id"]]
        table = d.ok("snapshot", "list").stdout
        assert table.startswith("ID ") and sa["id"] in table and "nas-rollback" in table
        shown = d.json("snapshot", "show", sa["id"])
        check_snapshot(shown)
        assert shown["id"] == sa["id"] and shown["naa"] == sa["naa"]
        in_set = d.json("snapshot", "show", "--set", b["set_id"])
        assert [s["id"] for s in in_set] == [sb["id"]]
        # a set's id where a snapshot's is expected: said so (issue 19 #2)
        one_line_error(d.run("snapshot", "show", b["set_id"]), 1,
                       f"{b['set_id']} is a snapshot set, not a snapshot: 'snapshot show "
                       f"--set {b['set_id']}'")
        # the volume positional, as lvs and zfs list take it
        assert d.json("snapshot", "list", "sv") == rows
        assert d.json("snapshot", "list", "sv", "--volume", "sv") == rows
        one_line_error(d.run("snapshot", "list", "sv", "--volume", "other"), 2, "disagree")

        one_line_error(d.run("snapshot", "create", "nosuch", "--context", "nas-rollback"), 1,
                       "no volume named 'nosuch'")
        one_line_error(d.run("snapshot", "create", "sv", "--context", "bogus"), 2,
                       "--context bogus: unknown snapshot context")
        one_line_error(d.run("snapshot", "show", "nonsense"), 2, "not a snapshot id")
        one_line_error(d.run("snapshot", "show", "--set", "0" * 8 + "-0000-0000-0000-"
                             + "0" * 11 + "1"), 1, "VSS_E_OBJECT_NOT_FOUND")
        one_line_error(d.run("snapshot", "delete", sa["id"], "--all"), 2, "exactly one of")
        one_line_error(d.run("snapshot", "delete", "00000000-0000-0000-0000-000000000002"),
                       1, "VSS_E_OBJECT_NOT_FOUND")
        assert len(d.json("snapshot", "list", "--volume", "sv")) == 3   # failures: no change

        assert d.json("snapshot", "delete", "--oldest", "sv")["deleted"] == [sa["id"]]
        assert d.json("snapshot", "delete", "--set", b["set_id"])["deleted"] == [sb["id"]]
        assert d.json("snapshot", "delete", sc["id"])["deleted"] == [sc["id"]]
        d.ok("snapshot", "create", "sv", "--context", "nas-rollback", "-q")
        d.ok("snapshot", "create", "sv", "--context", "nas-rollback", "-q")
        assert d.json("snapshot", "delete", "--all", "--yes")["count"] == 2
        assert d.json("snapshot", "list") == []
        assert d.ok("snapshot", "delete", "--all", "-y").stdout == "no snapshots deleted\n"

        # the one-shot default is persistent (issue 19): said on stderr, and true
        res = d.ok("snapshot", "create", "sv")
        assert "created" in res.stdout and "app-rollback" in res.stderr, res.stderr
        assert "persistent" in res.stderr
        (kept,) = d.json("snapshot", "list", "--volume", "sv")
        assert kept["context"] == "app-rollback"
        d.ok("snapshot", "delete", kept["id"])
        # an auto-release context from a one-shot command: refused, nothing made
        for ctx in ("backup", "file-share-backup"):
            one_line_error(d.run("snapshot", "create", "sv", "--context", ctx), 2,
                           f"--context {ctx} is auto-release")
        one_line_error(d.run("snapshot", "create", "sv", "--hold"), 2,
                       "--hold is for auto-release contexts")
        assert d.json("snapshot", "list", "--volume", "sv") == []
    finally:
        _cleanup_snapshots(d, "sv")
        d.ok("volume", "delete", "sv")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_hold_keeps_an_auto_release_set_until_a_signal(daemon: Daemon, sig: str) -> None:
    """`snapshot create --context backup --hold`: the set exists while the command
    waits; a stop signal ends the session, the set is deleted, exit 0."""
    d = daemon
    d.ok("volume", "create", "hv", "4M")
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "--socket", d.socket,
                             "snapshot", "create", "hv", "--context", "backup", "--hold",
                             "--json"], cwd=str(ROOT), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()   # said once the set exists
        assert line.startswith("holding snapshot set "), line
        (held,) = d.json("snapshot", "list", "--volume", "hv")
        assert held["context"] == "backup" and held["set_id"] in line
        time.sleep(0.5)
        assert d.json("snapshot", "list", "--volume", "hv") == [held]   # still there
        proc.send_signal(signal.Signals[sig])
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err)
        assert "auto-release snapshot set" in err and "Traceback" not in err
        assert d.json("snapshot", "list", "--volume", "hv") == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        d.ok("volume", "delete", "hv")


def test_expose_and_unexpose(daemon: Daemon) -> None:
    from fuse_mount import loopdev
    d = daemon
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    d.ok("volume", "create", "ev", "16M")
    snapmnt = d.base / "snap-ev"
    snapmnt.mkdir()
    try:
        with loop_ext4(d.image("ev")):
            sid = d.json("snapshot", "create", "ev", "--context", "nas-rollback",
                         )["snapshots"][0]["id"]
        e = d.json("expose", sid, "--name", "monday")
        check_snapshot(e)
        exposed = os.path.join(d.mount, "exposed", "monday.img")
        assert e["exposed_path"] == exposed and os.path.exists(exposed)
        assert e["attributes"] & EXPOSED_LOCALLY and "EXPOSED_LOCALLY" in e["attribute_names"]
        assert os.stat(exposed).st_mode & 0o777 == 0o444
        one_line_error(d.run("unexpose", "tuesday"), 1, "no snapshot is exposed as 'tuesday'")
        u = d.json("unexpose", "monday")   # by its exposed name, as a script may
        assert u["id"] == sid
        assert u["exposed_path"] is None and not u["attributes"] & EXPOSED_LOCALLY
        assert gone_soon(exposed)

        m = d.json("expose", sid, "--mount", str(snapmnt))
        assert m["exposed_path"] == str(snapmnt) and m["loop_device"].startswith("/dev/loop")
        assert loopdev.is_mountpoint(snapmnt) and (snapmnt / "lost+found").is_dir()
        one_line_error(d.run("expose", sid, "--mount", str(d.base)), 1,
                       "VSS_E_OBJECT_ALREADY_EXISTS")
        one_line_error(d.run("unexpose", str(d.base / "elsewhere")), 1,
                       "no snapshot is exposed at")
        d.ok("unexpose", str(snapmnt))   # by the directory it is mounted at
        assert not loopdev.is_mountpoint(snapmnt)

        one_line_error(d.run("unexpose", sid), 1, "is not exposed")
        one_line_error(d.run("expose", sid, "--mount", str(d.base / "nonexistent")), 2,
                       "does not exist")
        one_line_error(d.run("expose", "00000000-0000-0000-0000-000000000003"), 1,
                       "VSS_E_OBJECT_NOT_FOUND")
    finally:
        if loopdev.is_mountpoint(snapmnt):
            _run("umount", str(snapmnt), check=False)
        _cleanup_snapshots(d, "ev")
        d.ok("volume", "delete", "ev")
    assert [b for _, b in loopdev.loops_under(d.mount)] == []


def test_revert_promote_split(daemon: Daemon) -> None:
    d = daemon
    origin = d.json("volume", "create", "rv", "4M")
    made = []
    try:
        write_synced(d.image("rv"), b"v1v1")
        snap = d.json("snapshot", "create", "rv", "--context", "nas-rollback")["snapshots"][0]
        sid = snap["id"]
        write_synced(d.image("rv"), b"v2v2")
        r = d.json("revert", sid)
        assert r["name"] == "rv" and read_head(d.image("rv"), 4) == b"v1v1"
        write_synced(d.image("rv"), b"v3v3")
        p = d.json("promote", sid)
        check_snapshot(p)                      # a snapshot view, like `snapshot show`
        assert p["id"] == sid and p["kind"] == "full"
        one_line_error(d.run("split", sid, "rv"), 1, "VSS_E_OBJECT_ALREADY_EXISTS")
        s = d.json("split", sid, "rv-copy")
        made.append("rv-copy")
        assert s["name"] == "rv-copy" and NAA.fullmatch(s["naa"])
        assert s["naa"] not in (origin["naa"], snap["naa"])    # a new LUN, a new identity
        assert read_head(d.image("rv-copy"), 4) == b"v1v1"
        assert read_head(d.image("rv"), 4) == b"v3v3"                 # the origin untouched
        one_line_error(d.run("snapshot", "show", sid), 1, "VSS_E_OBJECT_NOT_FOUND")  # split off
        one_line_error(d.run("revert", sid), 1, "VSS_E_OBJECT_NOT_FOUND")
        one_line_error(d.run("promote", "nonsense"), 2, "not a snapshot id")
        one_line_error(d.run("split", "00000000-0000-0000-0000-000000000004", "x"), 1,
                       "VSS_E_OBJECT_NOT_FOUND")
    finally:
        _cleanup_snapshots(d, "rv")
        for name in ("rv", *made):
            d.run("volume", "delete", name)


def test_end_backup_and_writers(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "bv", "4M")
    try:
        rows = d.json("writers", "list")
        assert [w["name"] for w in rows] == ["fsfreeze"]
        assert rows[0]["state"].startswith("VSS_WS_") and GUID.fullmatch(rows[0]["writer_id"])
        assert re.search(r"^fsfreeze\s", d.ok("writers", "list").stdout, re.M)
        made = d.json("snapshot", "create", "bv", "--context", "app-rollback")   # writers
        eb = d.json("end-backup", made["set_id"])
        assert eb["set_id"] == made["set_id"] and eb["writers_notified"] == ["fsfreeze"]
        assert d.json("snapshot", "show", made["snapshots"][0]["id"])["backup_complete"]
        one_line_error(d.run("end-backup", "00000000-0000-0000-0000-000000000005"), 1,
                       "VSS_E_OBJECT_NOT_FOUND")
        one_line_error(d.run("end-backup", "notaguid"), 2, "not a snapshot set id")
    finally:
        _cleanup_snapshots(d, "bv")
        d.ok("volume", "delete", "bv")


def test_check_and_scrub(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "kv", "1M")
    try:
        write_synced(d.image("kv"), os.urandom(8192))
        d.ok("snapshot", "create", "kv", "--context", "nas-rollback", "-q")
        write_synced(d.image("kv"), os.urandom(8192))           # a preserved chunk to verify
        for cmd in ("check", "scrub"):
            res = d.json(cmd)
            assert res["ok"] is True and res["problems"] == [] and res["volume"] is None
            assert res["luns"] >= 2 and res["chunks_verified"] >= 1
            assert re.fullmatch(rf"clean: {cmd} of the pool: \d+ LUNs, \S+ \S?i?B read, "
                                r"\d+ chunks? verified against their checksums\n",
                                d.ok(cmd).stdout)
    finally:
        _cleanup_snapshots(d, "kv")
        d.ok("volume", "delete", "kv")


def test_import_json_uses_the_snapshot_view(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "tv", "4M")
    doc = d.base / "tv-set.xml"
    try:
        made = d.json("snapshot", "create", "tv", "--context", "nas-rollback",
                      "--transportable", "--host", "hosta")
        set_id = made["set_id"]
        assert made["snapshots"][0]["attributes"] & TRANSPORTABLE
        out = d.json("export", set_id, "-o", str(doc))
        assert out["set_id"] == set_id and out["files"] == [str(doc)]
        imp = d.json("import", str(doc), "--host", "hostb")
        assert imp["set_id"] == set_id and imp["host"] == "hostb"
        (s,) = imp["snapshots"]
        check_snapshot(s)            # the same stable names as every other command
        assert s["attributes"] & IMPORTED and "IMPORTED" in s["attribute_names"]
        assert s["device_path"] == os.path.join(d.mount, "hosts", "hostb", ".shadow",
                                                f"{s['id']}.img")
        one_line_error(d.run("import", str(doc), "--host", "hostc"), 1, "already imported")
    finally:
        _cleanup_snapshots(d, "tv")
        d.ok("volume", "delete", "tv")


@pytest.mark.parametrize("cmd", [["status"], ["check"], ["scrub"], ["writers", "list"],
                                 ["volume", "list"], ["snapshot", "list"]])
def test_no_daemon_is_one_line_exit_1(tmp_path: Path, cmd: list[str]) -> None:
    res = spx(*cmd, socket=str(tmp_path / "none.sock"))
    one_line_error(res, 1, "VSS_E_PROVIDER_NOT_REGISTERED")
    assert "start it with 'shadowplex serve'" in res.stderr


# --------------------------------------------------------------------------- daemon-free
BAD_ARGV = [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice"),
    (["--quiet"], "required: COMMAND"),   # (--json: the JSON error, test_cli_listing)
    (["volume"], "required: ACTION"),
    (["volume", "create", "x"], "required: SIZE"),
    (["volume", "grow", "x", "1M"], "invalid choice"),
    (["snapshot", "create"], "required: VOLUME"),
    (["snapshot", "create", "v", "--context", "bogus"], "unknown snapshot context"),
    (["snapshot", "create", "v", "--context", "client-accessible"], "system provider"),
    (["snapshot", "create", "v", "--differential", "--plex"], "not allowed with"),
    (["snapshot", "show"], "needs an ID or --set"),
    (["snapshot", "delete"], "exactly one of"),
    (["snapshot", "delete", "--all", "--oldest", "v"], "exactly one of"),
    (["snapshot", "delete", "--all"], "add --yes"),   # stdin is no terminal
    (["snapshot", "delete", "--volume", "v"], "every snapshot of volume v: add --yes"),
    (["volume", "list", "-o", "name,bogus"], "bogus is not a volume field"),
    (["snapshot", "list", "-o", ""], "an empty name is not a snapshot field"),
    (["snapshot", "delete", "--set"], "expected one argument"),
    (["expose"], "required: SNAPSHOT"),
    (["split", "00000000-0000-0000-0000-000000000001"], "required: NEWNAME"),
    (["end-backup"], "required: SET_ID"),
    (["export", "S"], "required: -o/--output"),
    (["import"], "required: FILE"),
    (["writers"], "required: ACTION"),
    (["pool", "init"], "required: DIR"),
    (["serve", "--default-kind", "full"], "invalid choice"),
    (["serve", "--log-level", "loud"], "invalid choice"),
    (["script"], "required: FILE"),
    (["script", "/nonexistent/x.dsh"], "cannot read script"),
    (["demo", "--bogus"], "unrecognized arguments"),
    (["status", "extra"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_ARGV, ids=[" ".join(a) or "(none)"
                                                               for a, _ in BAD_ARGV])
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str], fragment: str) -> None:
    # a socket nobody listens on: a usage error must be found before any connection
    res = spx(*argv, socket=str(tmp_path / "none.sock"))
    one_line_error(res, 2, fragment)


@pytest.mark.parametrize(("argv", "command"), [
    (["snapshot", "create", "v", "--bogus"], "shadowplex snapshot create"),
    (["volume", "resize", "v"], "shadowplex volume resize"),
    (["snapshot", "delete", "--set"], "shadowplex snapshot delete"),
    (["snapshot"], "shadowplex snapshot"),
    (["status", "extra"], "shadowplex status"),
    (["frobnicate"], "shadowplex"),
])
def test_usage_errors_point_to_the_commands_help(tmp_path: Path, argv: list[str],
                                                 command: str) -> None:
    """The one line names the help of the command being parsed (issue 19 #7), also for
    an unknown argument, which argparse reports from the top parser."""
    line = one_line_error(spx(*argv, socket=str(tmp_path / "none.sock")), 2,
                          f"(try '{command} --help')")
    assert line.startswith(f"{command}: error: "), line


def test_usage_errors_found_after_parsing_change_nothing(tmp_path: Path) -> None:
    """Mistakes only the command can see (a bad chunk size, a file that is not a
    document) are exit 2 too, and nothing is created."""
    sock = str(tmp_path / "none.sock")
    one_line_error(spx("pool", "init", str(tmp_path / "p"), "--chunk-size", "3K",
                       socket=sock), 2, "invalid chunk size")
    assert not (tmp_path / "p").exists()
    binary = tmp_path / "doc.xml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    one_line_error(spx("import", str(binary), socket=sock), 2, "is not UTF-8 XML")
    target = tmp_path / "out.xml"
    target.write_text("keep me")
    one_line_error(spx("export", "00000000-0000-0000-0000-000000000001", "-o", str(target),
                       socket=sock), 2, "--force")
    assert target.read_text() == "keep me"


SERVE_CONFIG_ERRORS = [
    (["serve"], "serve needs --pool"),
    (["serve", "--pool", "/p"], "serve needs --mount"),
    (["serve", "--config", "/nonexistent/shadowplex.toml"], "cannot read config file"),
    (["serve", "--state-dir", "/s", "--pool", "/p", "--mount", "/m"], "--state-dir is for"),
]


@pytest.mark.parametrize(("argv", "fragment"), SERVE_CONFIG_ERRORS,
                         ids=[" ".join(a) for a, _ in SERVE_CONFIG_ERRORS])
def test_serve_config_errors_exit_78(tmp_path: Path, argv: list[str], fragment: str) -> None:
    """serve's settings mistakes (flags or --config file) exit 78, EX_CONFIG, which the
    unit's RestartPreventExitStatus= keeps systemd from retrying; argv syntax stays 2."""
    one_line_error(spx(*argv, socket=str(tmp_path / "none.sock")), EXIT_CONFIG, fragment)


def test_serve_with_bad_paths_leaves_nothing_behind(tmp_path: Path) -> None:
    """The socket's directory is made by the control service, after the mount and pool
    checks: a mistyped serve creates no directory. A missing mount directory or pool is
    a configuration error (78: systemd does not restart it)."""
    nx = tmp_path / "nonexistent"
    res = spx("serve", "--pool", str(nx / "p"), "--mount", str(nx / "m"),
              "--socket", str(nx / "run" / "s.sock"))
    one_line_error(res, EXIT_CONFIG, f"mount directory {nx / 'm'} does not exist")
    assert not nx.exists()
    (tmp_path / "m").mkdir()
    res = spx("serve", "--pool", str(nx / "p"), "--mount", str(tmp_path / "m"),
              "--socket", str(nx / "run" / "s.sock"))
    assert res.returncode == EXIT_CONFIG and "Traceback" not in res.stderr
    assert f"{nx / 'p'}" in res.stderr.splitlines()[-1]
    assert not nx.exists() and not _mounted(str(tmp_path / "m"))


def test_serve_socket_path_that_is_not_a_socket(tmp_path: Path) -> None:
    """The control socket fails after the FUSE mount is up: one error line (not a
    traceback in the log), exit 1, the mount gone again, the file untouched."""
    pool, mount = tmp_path / "p", tmp_path / "m"
    mount.mkdir()
    assert spx("pool", "init", str(pool), "-q").returncode == 0
    notsock = tmp_path / "notsock"
    notsock.write_text("precious")
    res = spx("serve", "--pool", str(pool), "--mount", str(mount), "--socket", str(notsock))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    errors = [x for x in res.stderr.splitlines() if " INFO " not in x]
    assert errors == [f"shadowplex serve: error: control socket path {notsock} exists and "
                      "is not a socket; remove it or choose another --socket"], res.stderr
    assert not _mounted(str(mount)) and notsock.read_text() == "precious"


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    import tools.cli as cli
    import tools.parser

    def boom(args: object) -> int:
        raise RuntimeError("the frobnicator broke\nsecond line")

    monkeypatch.setattr(tools.parser, "cmd_status", boom)   # what the parser dispatches to
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == ("shadowplex: error: the frobnicator broke (run with --debug for the "
                   "traceback)\n")
    with pytest.raises(RuntimeError, match="frobnicator"):
        cli.main(["status", "--debug"])
