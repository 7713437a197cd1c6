"""Hostile input and security through the real daemon (issue 8, items 4 and 5).

One daemon (`python -m provider.service`, see tests/harness.py) serves the
whole module: a 32 MiB volume ``v`` with ext4, two committed app-rollback snapshots of it,
one hidden (not exposed) and one exposed as ``pub``. A second daemon, started with
``{"allow_other": true}``, checks that the option really turns FUSE's allow_other on.

* odd names (volumes, exposures) and odd ``expose --mount`` paths: refused with one line,
  exit 1 or 2 from the CLI, and nothing changed (volumes, snapshots, sets, exposures, the
  mounts and loop devices that concern this test in /proc/self/mountinfo and losetup);
* a symlink as mount target is resolved, as mount(8) does: the snapshot is mounted on the
  real directory, which is what `snapshot show` reports and what unexpose unmounts;
  a symlink into the pool or its mount is refused like the directory it points to;
* the FUSE mount has no allow_other unless configured: another user (nobody, through
  setpriv) gets EACCES on it; the control socket is 0600 and nobody gets EACCES;
* snapshots cannot be written at any layer (FUSE open/write/setattr/namespace, a loop
  device on the device path, the mounted filesystem), and a hidden snapshot is not listed
  anywhere and not found under any name but its exact device path.

Everything lives in one directory under /tmp made traversable (0755) so that nobody's
EACCES comes from the mount and the socket, not from a parent directory (pytest's
basetemp is 0700). Everything is cleaned up in finally blocks and by the fixture.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, start_daemon
from support import mkfs_ext4, need, run_cmd

from fuse_mount import loopdev
from provider.client import Client, ControlError
from tools import cli

pytestmark = pytest.mark.kernel
MiB = 1 << 20
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
PY = "/usr/bin/python3"   # readable by nobody (the venv's interpreter is under /root)


def _one_line(text: str, what: str = "message") -> None:
    assert text.strip(), f"empty {what}"
    assert len(text.splitlines()) == 1, f"{what} is not one line: {text!r}"


# --------------------------------------------------------------------------- fixtures
def _cleanup_under(base: str) -> None:
    """Whatever a failed test may have left under base: mounts, loop devices."""
    for mp, fstype, _src in sorted(loopdev.mountinfo(), key=lambda m: -len(m[0])):
        if mp.startswith(base + "/"):
            if not fstype.startswith("fuse"):
                run_cmd("umount", mp, check=False)
            if loopdev.is_mountpoint(mp):
                run_cmd("fusermount3", "-u", "-z", mp, check=False)
                run_cmd("umount", "-l", mp, check=False)
    for dev, _back in loopdev.loops_under(base):
        run_cmd("losetup", "-d", dev, check=False)


class World:
    """The module's daemon and its objects."""

    def __init__(self, base: Path, d: Daemon, hidden: str, public: str) -> None:
        self.base, self.d, self.hidden, self.public = base, d, hidden, public
        self.mount = d.mount

    def client(self) -> Client:
        return self.d.client(client="hostile")

    def state(self, extra_paths: tuple[str, ...] = ()) -> Any:
        """What a refused request must not change."""
        with self.client() as c:
            api = (c.volume_list(), c.snapshot_list(), c.set_list())
        base = str(self.base)
        watched = {os.path.realpath(p) for p in extra_paths} | set(extra_paths) | {"/"}
        ours = {dev for dev, _ in loopdev.loops_under(self.mount)}
        mounts = sorted(m for m in loopdev.mountinfo()
                        if m[0].startswith(base) or m[0] in watched or m[2] in ours)
        return (json.dumps(api, sort_keys=True), mounts,
                sorted(loopdev.loops_under(base)),
                sorted(os.listdir(os.path.join(self.mount, "exposed"))))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    need("mkfs.ext4")
    need("setpriv")
    base = Path(tempfile.mkdtemp(prefix="spx-hostile-"))
    os.chmod(base, 0o755)
    sockdir = base / "sock"
    sockdir.mkdir(mode=0o755)
    d: Daemon | None = None
    try:
        # the log outside base (removed below), where conftest's log check reads it
        d = start_daemon(base, str(sockdir), {"v": 32 * MiB},
                         log=tmp_path_factory.mktemp("hostile") / "daemon.log")
        mkfs_ext4(os.path.join(d.mount, "volumes", "v.img"))
        with d.client() as c:
            hidden = c.snapshot_create(["v"], context="app-rollback")
            public = c.snapshot_create(["v"], context="app-rollback")
            pid = public["snapshots"][0]["snapshot_id"]
            c.expose(pid, name="pub")
        yield World(base, d, hidden["snapshots"][0]["snapshot_id"], pid)
    finally:
        try:
            if d is not None:
                with contextlib.suppress(ControlError, OSError), d.client() as c:
                    for s in c.snapshot_list():
                        if s.get("mounted_at") or s.get("loop_device"):
                            c.unexpose(s["snapshot_id"])
        finally:
            _cleanup_under(str(base))
            if d is not None:
                d.stop()
            _cleanup_under(str(base))
            shutil.rmtree(base, ignore_errors=True)


def run_cli(w: World, *argv: str, cwd: str | None = None) -> tuple[int, str, str]:
    """tools.cli.main in process (as the fuzz tests do): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd or str(w.base))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(["--socket", w.d.socket, *argv])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def assert_refused(w: World, argv: list[str], extra: tuple[str, ...] = (),
                   cwd: str | None = None, expect: str | None = None) -> str:
    before = w.state(extra)
    rc, _out, err = run_cli(w, *argv, cwd=cwd)
    assert rc in (1, 2), (argv, rc, err)
    assert "Traceback" not in err
    _one_line(err.rstrip("\n"), f"stderr of {argv!r}")
    if expect is not None:
        assert expect in err, (argv, err)
    assert w.state(extra) == before, argv
    return err


def api_refused(w: World, op: str, args: dict[str, Any], extra: tuple[str, ...] = ()
                ) -> ControlError:
    """The same through the raw API (for what argv cannot carry: NUL, relative paths)."""
    before = w.state(extra)
    with w.client() as c, pytest.raises(ControlError) as ei:
        c.call(op, args)
    assert ei.value.name == "E_INVALIDARG", ei.value
    _one_line(ei.value.message)
    assert w.state(extra) == before, (op, args)
    return ei.value


def as_nobody(code: str, *args: str) -> dict[str, Any]:
    """Run Python code as uid/gid 65534 without groups; it prints one JSON object."""
    res = subprocess.run([*NOBODY, PY, "-c", code, *args], capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


# Tries each operation on each path; records the errno name or "ok" (as nobody).
PROBE = r"""
import errno, json, os, socket, sys
out = {}
for p in sys.argv[1:]:
    for what in ("stat", "open", "listdir", "connect"):
        try:
            if what == "stat":
                os.stat(p)
            elif what == "open":
                os.close(os.open(p, os.O_RDONLY))
            elif what == "listdir":
                os.listdir(p)
            else:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(p)
                finally:
                    s.close()
            r = "ok"
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e.errno))
        out[p + " " + what] = r
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- odd names
BAD_NAMES = ["../x", "..", ".", "a/b", "", "x" * 65, "a\nb", "a\rb", "a\u2028b", "ünï",
             "-x", "--all", ".x", "a b", "*", "a\tb", "/etc/passwd", "x.img/../y"]


def test_odd_volume_and_exposure_names_are_refused(world: World) -> None:
    """Through the CLI (exit 1/2, one line, nothing changed) and, with a NUL, the API.
    64 characters is still fine (the limit is 1-64)."""
    w = world
    for name in BAD_NAMES:
        assert_refused(w, ["volume", "create", "--", name, "1M"])
        assert_refused(w, ["expose", w.hidden, f"--name={name}"])
        assert_refused(w, ["expose", w.public, f"--name={name}"])   # renaming "pub"
    for name in ("a\x00b", "\x00", "x" * 10_000):
        api_refused(w, "volume.create", {"name": name, "size": MiB})
        api_refused(w, "expose", {"snapshot_id": w.hidden, "name": name})
    ok = "y" * 64
    with w.client() as c:
        c.volume_create(ok, MiB)
        c.volume_delete(ok)


# --------------------------------------------------------------------------- mount paths
def test_odd_mount_paths_are_refused(world: World) -> None:
    w = world
    b = w.base
    full = b / "full"
    full.mkdir(exist_ok=True)
    (full / "keep.txt").write_text("mine\n")
    afile = b / "afile"
    afile.write_text("x")
    empty = b / "empty"
    empty.mkdir(exist_ok=True)
    (b / "nl\ndir").mkdir(exist_ok=True)
    links = {"to-full": full, "to-file": afile, "to-missing": b / "missing",
             "to-fuse": Path(w.mount) / "exposed", "to-shadow": Path(w.mount) / ".shadow",
             "to-pool": Path(w.d.pool), "loop-a": b / "loop-b", "loop-b": b / "loop-a",
             "to-root": Path("/")}
    for name, target in links.items():
        with contextlib.suppress(FileNotFoundError):
            (b / name).unlink()
        (b / name).symlink_to(target)
    m = w.mount
    shadow_img = os.path.join(m, ".shadow", f"{w.hidden}.img")
    cases = {
        str(b / "missing"): "does not exist",
        str(full): "not empty",
        str(afile): "not a directory",
        str(empty / ".." / "full"): "not empty",            # '..' is normalised first
        str(empty / ".." / ".." / ".." / "etc"): "",          # -> /etc: not empty
        "/": "",
        m: "inside",                                        # the FUSE mount itself
        os.path.join(m, "exposed"): "inside",               # empty FUSE directories
        os.path.join(m, ".shadow"): "inside",
        os.path.join(m, "hosts"): "inside",
        os.path.join(m, "volumes"): "inside",
        shadow_img: "inside",
        os.path.join(m, "exposed", "..", "hosts"): "inside",
        w.d.pool: "inside",                                 # the pool directory
        os.path.join(w.d.pool, "luns"): "inside",
        str(b / "to-full"): "not empty",                    # symlinks are resolved
        str(b / "to-file"): "not a directory",
        str(b / "to-missing"): "does not exist",
        str(b / "to-fuse"): "inside",
        str(b / "to-shadow"): "inside",
        str(b / "to-pool"): "inside",
        str(b / "loop-a"): "unusable",                      # ELOOP
        str(b / "to-root"): "",
    }
    for path, expect in cases.items():
        err = assert_refused(w, ["expose", w.hidden, "--mount", path], (path,),
                             expect=expect or None)
        assert os.path.normpath(path) in err or path == "/", err
        # a name asked for in the same call is not left behind either
        assert_refused(w, ["expose", w.hidden, "--name", "mon", "--mount", path], (path,))
    # relative paths: the CLI resolves them against its directory (as mount(8) does);
    # the daemon itself refuses them (its directory means nothing to the caller)
    assert_refused(w, ["expose", w.hidden, "--mount", "full"], cwd=str(b),
                   expect=str(full))
    assert_refused(w, ["expose", w.hidden, "--mount", ""], cwd=str(empty),
                   expect="absolute")
    for path in ("empty", "./empty", "../x", "", "a\x00b", str(empty) + "\x00",
                 str(b / "nl\ndir"), str(empty) + "\r", "/\u2028"):
        e = api_refused(w, "expose", {"snapshot_id": w.hidden, "mount": path}, (str(empty),))
        assert "absolute" in e.message or "control characters" in e.message, e
    assert os.listdir(full) == ["keep.txt"] and afile.read_text() == "x"
    assert os.listdir(empty) == []
    assert not loopdev.is_mountpoint(empty)


def test_a_symlink_mount_target_is_resolved(world: World) -> None:
    """mount(8) follows symlinks; so does expose --mount, and it says where it mounted:
    the record (and so unexpose) uses the real directory, never the link, so a link
    changed after the expose cannot redirect the unmount elsewhere."""
    w = world
    outside = Path(tempfile.mkdtemp(prefix="spx-outside-"))
    link = w.base / "link-out"
    try:
        link.symlink_to(outside)
        with w.client() as c:
            p = c.expose(w.hidden, mount=str(link))
            try:
                assert p["exposed_path"] == str(outside), p
                mp = [m for m in loopdev.mountinfo() if m[0] == str(outside)]
                assert mp and mp[0][2] == p["loop_device"], mp
                assert not any(m[0] == str(link) for m in loopdev.mountinfo())
                assert (outside / "lost+found").is_dir()       # the snapshot's ext4
                # retarget the link: unexpose still unmounts the real directory only
                link.unlink()
                link.symlink_to(w.base / "empty")
            finally:
                c.unexpose(w.hidden)
            assert not loopdev.is_mountpoint(outside)
            assert loopdev.loops_under(w.d.pool) == []
            assert [b for _, b in loopdev.loops_under(w.mount)] == []
            (s,) = [s for s in c.snapshot_list() if s["snapshot_id"] == w.hidden]
            assert not s.get("exposed_path") and not s.get("exposed_name"), s
    finally:
        if loopdev.is_mountpoint(outside):
            run_cmd("umount", "-l", str(outside), check=False)
        for dev, _ in loopdev.loops_under(w.mount):
            run_cmd("losetup", "-d", dev, check=False)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        shutil.rmtree(outside, ignore_errors=True)


# --------------------------------------------------------------------------- security
def _fuse_options(mount: str) -> tuple[str, set[str]]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if lf[4] == mount:
                return rf[0], set(rf[2].split(",")) | set(lf[5].split(","))
    raise AssertionError(f"{mount} is not mounted")


def test_mount_without_allow_other_and_socket_0600(world: World) -> None:
    w = world
    fstype, opts = _fuse_options(w.mount)
    assert fstype == "fuse.shadowplex"
    assert "allow_other" not in opts and "default_permissions" in opts, opts
    assert "user_id=0" in opts, opts
    st = os.lstat(w.d.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    # the parents are traversable: nobody's refusals come from the mount and the socket
    assert stat.S_IMODE(os.stat(w.base).st_mode) & 0o005 == 0o005
    paths = [w.mount, os.path.join(w.mount, "volumes", "v.img"),
             os.path.join(w.mount, ".shadow", f"{w.hidden}.img"),
             os.path.join(w.mount, "exposed", "pub.img"), w.d.socket]
    got = as_nobody(PROBE, *paths)
    for p in paths[:-1]:
        assert got[f"{p} stat"] == "EACCES", got
        assert got[f"{p} open"] == "EACCES", got
    assert got[f"{w.d.socket} connect"] == "EACCES", got
    # the CLI as nobody: one line saying so, exit 1 (run from the source tree)
    res = subprocess.run([*NOBODY, PY, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                          "from tools import cli; sys.exit(cli.main(sys.argv[2:]))",
                          str(Path(__file__).resolve().parent.parent), "--socket",
                          w.d.socket, "status"],
                         capture_output=True, text=True, timeout=30, check=False)
    if "ModuleNotFoundError" not in res.stderr:   # system python without our deps
        assert res.returncode == 1, res
        _one_line(res.stderr.rstrip("\n"))
        assert "permission" in res.stderr.lower(), res.stderr


def test_allow_other_config_turns_it_on(world: World) -> None:
    """{"allow_other": true}: the option is on the mount and nobody may look inside;
    what the mode bits allow then holds (LUNs are 0644/0444: readable by every local
    user; nobody can write any of them or list .shadow)."""
    base = Path(tempfile.mkdtemp(prefix="spx-other-"))
    os.chmod(base, 0o755)
    (base / "sock").mkdir(mode=0o755)
    d: Daemon | None = None
    try:
        d = start_daemon(base, str(base / "sock"), {"o": 4 * MiB},
                         config={"allow_other": True})
        fstype, opts = _fuse_options(d.mount)
        assert fstype == "fuse.shadowplex" and "allow_other" in opts, opts
        with d.client() as c:
            sid = c.snapshot_create(["o"], context="app-rollback")["snapshots"][0][
                "snapshot_id"]
        vol = os.path.join(d.mount, "volumes", "o.img")
        snap = os.path.join(d.mount, ".shadow", f"{sid}.img")
        shadow = os.path.join(d.mount, ".shadow")
        got = as_nobody(PROBE, d.mount, vol, snap, shadow)
        assert got[f"{d.mount} stat"] == "ok" and got[f"{d.mount} listdir"] == "ok", got
        assert got[f"{shadow} listdir"] == "EACCES", got        # 0711: not listable
        assert got[f"{vol} open"] == "ok" and got[f"{snap} open"] == "ok", got
        wr = as_nobody(r"""
import errno, json, os, sys
out = {}
for p in sys.argv[1:]:
    try:
        os.close(os.open(p, os.O_RDWR)); out[p] = "ok"
    except OSError as e:
        out[p] = errno.errorcode[e.errno]
print(json.dumps(out))
""", vol, snap)
        assert wr == {vol: "EACCES", snap: "EACCES"}, wr
    finally:
        if d is not None:
            d.stop()
        _cleanup_under(str(base))
        shutil.rmtree(base, ignore_errors=True)


def _errno(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def test_snapshots_are_unwritable_at_every_layer(world: World) -> None:
    w = world
    m = w.mount
    hidden = os.path.join(m, ".shadow", f"{w.hidden}.img")
    public = os.path.join(m, "exposed", "pub.img")
    pub_dev = os.path.join(m, ".shadow", f"{w.public}.img")
    with open(hidden, "rb") as f:
        head = f.read(1 << 16)
    for p in (hidden, public, pub_dev):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o444
        for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_TRUNC,
                      os.O_RDWR | os.O_APPEND):
            assert _errno(os.open, p, flags) == "EROFS", (p, flags)
        assert _errno(os.truncate, p, 0) == "EROFS"
        assert _errno(os.chmod, p, 0o666) == "EROFS"
        assert _errno(os.chown, p, 1, 1) == "EROFS"
        assert _errno(os.utime, p, (0, 0)) == "EROFS"
        assert _errno(os.unlink, p) == "EROFS"
        assert _errno(os.rename, p, p + ".x") == "EROFS"
        assert _errno(os.link, p, p + ".x") in ("EROFS", "EPERM")
        fd = os.open(p, os.O_RDONLY)
        try:
            assert _errno(os.write, fd, b"x") == "EBADF"
            assert _errno(os.posix_fallocate, fd, 0, 4096) in ("EBADF", "EROFS")
            assert _errno(os.ftruncate, fd, 0) in ("EBADF", "EINVAL", "EROFS")
        finally:
            os.close(fd)
    for d in ("exposed", ".shadow"):
        assert _errno(os.open, os.path.join(m, d, "new.img"),
                      os.O_CREAT | os.O_WRONLY, 0o644) == "EROFS"
        assert _errno(os.mkdir, os.path.join(m, d, "dir")) == "EROFS"
    # a loop device on a snapshot is read-only, even when read-write is asked for
    dev = loopdev.attach(hidden, read_only=False)
    try:
        name = os.path.basename(dev)
        assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
        assert run_cmd("blockdev", "--getro", dev).stdout.strip() == "1"
        try:
            fd = os.open(dev, os.O_RDWR)
        except OSError as e:
            assert e.errno in (errno.EROFS, errno.EACCES, errno.EPERM), e
        else:
            try:
                assert _errno(os.pwrite, fd, b"x" * 512, 0) in ("EPERM", "EROFS", "EIO")
            finally:
                os.close(fd)
    finally:
        loopdev.detach(dev)
    # mounted through expose --mount: a read-only loop device, a read-only filesystem
    target = w.base / "ro-mnt"
    target.mkdir(exist_ok=True)
    with w.client() as c:
        prop = c.expose(w.hidden, mount=str(target))
        try:
            dev = prop["loop_device"]
            assert Path(f"/sys/block/{os.path.basename(dev)}/ro").read_text().strip() == "1"
            sources = [src for mp, _t, src in loopdev.mountinfo() if mp == str(target)]
            assert sources == [dev], sources
            assert "ro" in _mount_opts(str(target))
            assert _errno(os.open, str(target / "new"), os.O_CREAT | os.O_WRONLY) == "EROFS"
            assert _errno(os.mkdir, str(target / "d")) == "EROFS"
        finally:
            c.unexpose(w.hidden)
    assert not loopdev.is_mountpoint(target)
    with open(hidden, "rb") as f:
        assert f.read(1 << 16) == head
    with w.client() as c:
        assert c.check()["ok"]


def _mount_opts(mp: str) -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            lf = line.split(" - ")[0].split()
            if lf[4] == mp:
                return set(lf[5].split(","))
    return set()


def test_hidden_snapshot_is_not_listed_nor_found_by_guessing(world: World) -> None:
    """Hidden = not listed and not found under any other name. Its exact device path
    MOUNT/.shadow/<id>.img stays reachable for root (by design: it is the device object
    a requester or expose --mount attaches to); for anyone else the mount itself is
    closed (see test_mount_without_allow_other_and_socket_0600)."""
    w = world
    m = w.mount
    assert os.listdir(os.path.join(m, ".shadow")) == []
    assert os.listdir(os.path.join(m, "exposed")) == ["pub.img"]
    assert sorted(os.listdir(m)) == [".shadow", "exposed", "hosts", "volumes"]
    assert os.listdir(os.path.join(m, "volumes")) == ["v.img"]
    assert os.listdir(os.path.join(m, "hosts")) == []
    found = [os.path.join(r, f) for r, _, fs in os.walk(m) for f in fs]
    assert not any(w.hidden in f for f in found), found
    sid = w.hidden
    guesses = [f"{sid.upper()}.img", f"{{{sid}}}.img", sid, f"{sid}.IMG", f"{sid}.img.",
               f"{sid.replace('-', '')}.img", f" {sid}.img", f"{uuid.uuid4()}.img",
               f"{sid}.img/", f"{sid[:-1]}.img", f"..{sid}.img", f"{sid}.img\x00"[:-1] + "~"]
    for g in guesses:
        for d in (".shadow", "exposed", "volumes", "hosts"):
            p = os.path.join(m, d, g)
            assert _errno(os.stat, p) in ("ENOENT", "ENOTDIR"), p
    for d in ("exposed", "volumes"):
        assert _errno(os.stat, os.path.join(m, d, f"{sid}.img")) == "ENOENT"
    assert os.path.isfile(os.path.join(m, ".shadow", f"{sid}.img"))
    assert os.path.isfile(os.path.join(m, "exposed", "..", ".shadow", f"{sid}.img"))
    # the id is a random (version 4) GUID: 122 random bits, nothing to guess from
    assert uuid.UUID(sid).version == 4
