"""A snapshot in use is neither deleted, split nor unexposed (issue 12, item 6).

Through the real daemon (subprocess, FUSE mount, under tests/fuse_self_guard.py), real
loop devices (`losetup -r` by hand, as an admin does), ext4 and mount: a loop device or a
process on any path a snapshot is reachable by -- MOUNT/exposed/<name>.img (also a name
it had before a rename), MOUNT/.shadow/<id>.img, and the same under MOUNT/hosts/<host>/
-- makes `snapshot delete` (also with --unexpose) and `split` (also the script's `break`,
and when the user came during the split's copy) refuse with one line naming the user,
exit 1, nothing changed; `unexpose` likewise when the user is on the exposed name it
takes away. Once the user is gone (umount, losetup -d, the process ended) the same
commands work at once. Promote and revert take nothing away: a loop device reads on. What
cannot be refused (an auto-release set ending with its session, a diff-area overflow) is
logged as an error naming the user.

Every test undoes its mounts and loop devices in `finally` (the session guard in
conftest.py fails the run if any remain).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, start_daemon
from support import need, one_line_error, run_cmd, spx, start_thread

from blockstore import Pool
from fuse_mount import loopdev
from provider.client import Client, ControlError
from provider.vss import Attr, Context

pytestmark = pytest.mark.kernel
MiB = 1 << 20
TEXT = "point in time\n"
CONFIG = {"fsfreeze": False}


@contextlib.contextmanager
def ro_loop(path: str, mnt: Path | None = None) -> Iterator[dict[str, str]]:
    """`losetup -r -f --show path` (and `mount -o ro,noload` at mnt): what an admin does
    with an exposed snapshot. Yields {"dev": /dev/loopN}; the test may take it down
    itself (detach()); whatever is still up is taken down at the end, also on failure."""
    dev = run_cmd("losetup", "-r", "-f", "--show", path).stdout.strip()
    st = {"dev": dev, "mounted": ""}
    try:
        if mnt is not None:
            mnt.mkdir(exist_ok=True)
            run_cmd("mount", "-o", "ro,noload", dev, str(mnt))
            st["mounted"] = str(mnt)
        yield st
    finally:
        detach(st)


def detach(st: dict[str, str]) -> None:
    if st["mounted"]:
        run_cmd("umount", st["mounted"], check=False)
        st["mounted"] = ""
    if st["dev"]:
        run_cmd("losetup", "-d", st["dev"], check=False)
        st["dev"] = ""


def daemon_with_ext4(tmp_path: Path, sockdir: str, host: str | None = None) -> Daemon:
    """A daemon with volume v (ext4 holding hello.txt); presented to ``host`` only, if
    given (MOUNT/hosts/<host>/volumes/v.img)."""
    need("mkfs.ext4")
    d = start_daemon(tmp_path, sockdir, {"v": 32 * MiB}, CONFIG, self_guard=0.0)
    try:
        img = os.path.join(d.mount, "volumes", "v.img")
        fs = tmp_path / "fs"
        fs.mkdir()
        dev = loopdev.attach(img, read_only=False)
        try:
            run_cmd("mkfs.ext4", "-q", "-F", dev)
            run_cmd("mount", dev, str(fs))
            try:
                (fs / "hello.txt").write_text(TEXT)
            finally:
                run_cmd("umount", str(fs))
        finally:
            loopdev.detach(dev)
        if host is not None:
            with d.client() as c:
                c.volume_present("v", [host])
    except BaseException:
        d.stop()
        raise
    return d


def exists(c: Client, sid: str) -> bool:
    return any(s["snapshot_id"] == sid for s in c.snapshot_list())


VIAS = ["exposed", "shadow", "host-exposed", "host-shadow"]


@contextlib.contextmanager
def exposed_snapshot(tmp_path: Path, sockdir: str, via: str
                     ) -> Iterator[tuple[Daemon, Client, str, str]]:
    """A daemon, a client, a persistent snapshot exposed as n2, and the path ``via``
    names: MOUNT[/hosts/hostA]/exposed/n2.img or .../.shadow/<id>.img (host-*: the
    volume, so its snapshot, is presented to hostA only)."""
    host = "hostA" if via.startswith("host-") else None
    d = daemon_with_ext4(tmp_path, sockdir, host)
    try:
        with Client(d.socket, host=host) as c:
            sid = c.snapshot_create(["v"], context="app-rollback")["snapshots"][0][
                "snapshot_id"]
            c.expose(sid, name="n2")
            view = os.path.join(d.mount, "hosts", host) if host else d.mount
            path = (os.path.join(view, "exposed", "n2.img") if via.endswith("exposed")
                    else os.path.join(view, ".shadow", f"{sid}.img"))
            yield d, c, sid, path
            assert c.check()["ok"]
    finally:
        d.stop()


@pytest.mark.parametrize("via", VIAS)
def test_snapshot_under_a_loop_device_is_not_deleted(tmp_path: Path, sockdir: str,
                                                     via: str) -> None:
    """`expose ID --name n2`; `losetup -r` on one of its paths; mount it: `snapshot
    delete` (plain, --unexpose, --all) says which loop device uses it and exits 1,
    nothing changed. Right after umount + losetup -d, delete works."""
    with exposed_snapshot(tmp_path, sockdir, via) as (d, c, sid, path), \
            ro_loop(path, tmp_path / "m") as lp:
        dev = lp["dev"]
        assert (tmp_path / "m" / "hello.txt").read_text() == TEXT
        for args in ([sid], [sid, "--unexpose"], ["--all", "--yes"]):
            res = spx("snapshot", "delete", *args, socket=d.socket)
            line = one_line_error(res, 1, f"cannot delete snapshot {sid}: in use by "
                                          f"loop device {dev} ({path}, mounted at "
                                          f"{tmp_path / 'm'})")
            assert "losetup -d" in line
        assert exists(c, sid)
        assert c.snapshot_show(snapshot_id=sid)["exposed_name"] == "n2"
        assert (tmp_path / "m" / "hello.txt").read_text() == TEXT
        detach(lp)
        # at once (the kernel releases the loop's file a moment later)
        res = spx("snapshot", "delete", sid, socket=d.socket)
        assert res.returncode == 0, res.stderr
        assert not exists(c, sid)


@pytest.mark.parametrize("via", VIAS)
def test_exposed_name_under_a_loop_device_is_not_unexposed(tmp_path: Path, sockdir: str,
                                                           via: str) -> None:
    """`unexpose` takes the exposed name away: refused while a loop device is attached
    to MOUNT[/hosts/<host>]/exposed/<name>.img (its backing file would name a path that
    is gone, or, once the name is reused, another snapshot). One on the device path
    (.shadow) is not affected by unexpose: it works, the loop device keeps reading."""
    with exposed_snapshot(tmp_path, sockdir, via) as (d, c, sid, path), \
            ro_loop(path, tmp_path / "m") as lp:
        dev = lp["dev"]
        if via.endswith("exposed"):
            one_line_error(spx("unexpose", sid, socket=d.socket), 1,
                           f"cannot unexpose snapshot {sid}: in use by loop device "
                           f"{dev} ({path}, mounted at {tmp_path / 'm'})")
            assert c.snapshot_show(snapshot_id=sid)["exposed_name"] == "n2"
            assert os.path.exists(path)
            detach(lp)
        res = spx("unexpose", sid, socket=d.socket)
        assert res.returncode == 0, res.stderr
        assert c.snapshot_show(snapshot_id=sid)["exposed_name"] is None
        if lp["dev"]:   # on .shadow: still attached, still reading the snapshot
            assert (tmp_path / "m" / "hello.txt").read_text() == TEXT
            one_line_error(spx("snapshot", "delete", sid, socket=d.socket), 1,
                           f"in use by loop device {dev}")
            detach(lp)
        assert c.snapshot_delete(snapshot_id=sid)["deleted"] == [sid]


@pytest.mark.parametrize("op", ["delete", "unexpose"])
def test_snapshot_open_by_a_process_is_kept(tmp_path: Path, sockdir: str, op: str) -> None:
    """A process reading the exposed image (dd, a backup tool): delete / unexpose name
    its pid and command and refuse; once it has ended, they work at once."""
    with exposed_snapshot(tmp_path, sockdir, "exposed") as (d, c, sid, path):
        with reader(["sh", "-c", f"exec sleep 600 < '{path}'"], path) as proc:
            want = f"cannot {op} snapshot {sid}: in use by pid {proc.pid} (sleep, {path})"
            argv = ["snapshot", "delete", sid] if op == "delete" else ["unexpose", sid]
            one_line_error(spx(*argv, socket=d.socket), 1, want)
            if op == "delete":
                one_line_error(spx(*argv, "--unexpose", socket=d.socket), 1, want)
            assert exists(c, sid)
            assert c.snapshot_show(snapshot_id=sid)["exposed_name"] == "n2"
        res = spx(*argv, socket=d.socket)
        assert res.returncode == 0, res.stderr
        assert c.snapshot_delete(all=True)["count"] == (0 if op == "delete" else 1)


@contextlib.contextmanager
def reader(argv: list[str], path: str, ready: str | None = None
           ) -> Iterator[subprocess.Popen[str]]:
    """A process using ``path`` (``ready``: the text it prints once it does, else: until
    /proc shows ``path`` among its open files); killed at the end, also on failure."""
    # leaving the with: its pipes closed and the process waited for
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            if ready is not None:
                assert proc.stdout is not None and proc.stdout.readline().strip() == ready
            else:
                deadline = time.monotonic() + 10
                while path not in (os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                                   for fd in os.listdir(f"/proc/{proc.pid}/fd")):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.02)
            yield proc
        finally:
            proc.kill()


def test_users_under_an_earlier_exposed_name_are_named(tmp_path: Path,
                                                       sockdir: str) -> None:
    """`expose ID --name n3` renames an exposure under a loop device and a process that
    opened exposed/n1.img: both keep reading the snapshot, and delete names them (the
    kernel reports that path with " (deleted)": the earlier name). Once n1 is another
    snapshot's name, a user of the new n1 counts for that one only, and the old users
    do not keep it (nor its unexpose) from working."""
    d = daemon_with_ext4(tmp_path, sockdir)
    n1 = os.path.join(d.mount, "exposed", "n1.img")
    try:
        with d.client() as c:
            s1, s2 = (c.snapshot_create(["v"], context="app-rollback")["snapshots"][0][
                "snapshot_id"] for _ in range(2))
            c.expose(s1, name="n1")
            with ro_loop(n1, tmp_path / "m1") as l1, \
                    reader(["sh", "-c", f"exec sleep 600 < '{n1}'"], n1) as p1:
                c.expose(s1, name="n3")
                assert (tmp_path / "m1" / "hello.txt").read_text() == TEXT
                line = one_line_error(spx("snapshot", "delete", s1, socket=d.socket), 1,
                                      f"cannot delete snapshot {s1}: in use by loop device "
                                      f"{l1['dev']} ({n1}, a former name, mounted at "
                                      f"{tmp_path / 'm1'})")
                assert f"pid {p1.pid} (sleep, {n1}, a former name)" in line
                c.expose(s2, name="n1")   # the old name now leads to another snapshot
                with ro_loop(n1) as l2:
                    line = one_line_error(spx("snapshot", "delete", s2, socket=d.socket), 1,
                                          f"cannot delete snapshot {s2}: in use by loop "
                                          f"device {l2['dev']} ({n1})")
                    assert l1["dev"] not in line and f"pid {p1.pid}" not in line
                    line = one_line_error(spx("snapshot", "delete", s1, socket=d.socket), 1,
                                          f"in use by loop device {l1['dev']}")
                    assert l2["dev"] not in line
                # the users of s1's earlier n1 are not users of s2 (they were before)
                res = spx("unexpose", s2, socket=d.socket)
                assert res.returncode == 0, res.stderr
                assert c.snapshot_delete(snapshot_id=s2)["deleted"] == [s2]
                assert (tmp_path / "m1" / "hello.txt").read_text() == TEXT
                assert exists(c, s1)
            assert c.snapshot_delete(snapshot_id=s1)["deleted"] == [s1]
    finally:
        d.stop()


def test_user_not_found_by_path_still_counts(tmp_path: Path, sockdir: str) -> None:
    """A process in its own mount namespace reading the exposed image through a bind
    mount: its path names nothing of ours, the FUSE open-file count still keeps the
    snapshot."""
    need("unshare")
    with exposed_snapshot(tmp_path, sockdir, "exposed") as (d, c, sid, path):
        bind = tmp_path / "bind"
        bind.write_text("")
        script = f"mount --bind '{path}' '{bind}' && echo ready && exec sleep 600 < '{bind}'"
        with reader(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    path, ready="ready"):
            one_line_error(spx("snapshot", "delete", sid, socket=d.socket), 1,
                           f"cannot delete snapshot {sid}: in use by 1 open file(s) "
                           "through the mount not found by path")
            assert exists(c, sid)
        assert c.snapshot_delete(snapshot_id=sid)["deleted"] == [sid]


MAP_ONLY = """
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
addr = libc.mmap(None, 1 << 20, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)   # only the mapping is left
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("op", ["delete", "unexpose"])
def test_snapshot_mapped_by_a_process_is_named(tmp_path: Path, sockdir: str,
                                               op: str) -> None:
    """A process that mapped the exposed image and closed the file: named by its maps
    (pid, command, "mapped PATH"); delete and unexpose refuse; once it ended they work."""
    with exposed_snapshot(tmp_path, sockdir, "exposed") as (d, c, sid, path):
        argv = ["snapshot", "delete", sid] if op == "delete" else ["unexpose", sid]
        with reader([sys.executable, "-c", MAP_ONLY, path], path, ready="ready") as p:
            assert path not in (os.readlink(f"/proc/{p.pid}/fd/{fd}")
                                for fd in os.listdir(f"/proc/{p.pid}/fd"))
            one_line_error(spx(*argv, socket=d.socket), 1, f"cannot {op} snapshot {sid}: "
                           f"in use by pid {p.pid} (python")
            one_line_error(spx(*argv, socket=d.socket), 1, f"mapped {path})")
            assert c.snapshot_show(snapshot_id=sid)["exposed_name"] == "n2"
        res = spx(*argv, socket=d.socket)
        assert res.returncode == 0, res.stderr
        assert c.snapshot_delete(all=True)["count"] == (0 if op == "delete" else 1)


@pytest.mark.parametrize("via", VIAS)
def test_snapshot_in_use_is_not_split(tmp_path: Path, sockdir: str, via: str) -> None:
    """`split` (and the script's `break`) takes every path of the snapshot away, as a
    delete does: refused while a loop device (ext4 mounted) uses one of them, one line
    naming it, nothing changed (the snapshot, its exposure, no new volume; the mount
    reads on). Right after umount + losetup -d, split works."""
    with exposed_snapshot(tmp_path, sockdir, via) as (d, c, sid, path):
        script = tmp_path / "break.dsh"
        script.write_text(f"break writable {sid}\n")
        with ro_loop(path, tmp_path / "m") as lp:
            want = (f"cannot split snapshot {sid}: in use by loop device {lp['dev']} "
                    f"({path}, mounted at {tmp_path / 'm'})")
            one_line_error(spx("split", sid, "b", socket=d.socket), 1, want)
            res = spx("script", str(script), socket=d.socket)
            assert res.returncode == 1 and want in res.stderr, (res.stdout, res.stderr)
            assert exists(c, sid)
            assert c.snapshot_show(snapshot_id=sid)["exposed_name"] == "n2"
            assert {v["name"] for v in c.volume_list()} == {"v"}
            assert (tmp_path / "m" / "hello.txt").read_text() == TEXT
            detach(lp)
            res = spx("split", sid, "b", socket=d.socket)
            assert res.returncode == 0, res.stderr
        assert not exists(c, sid)
        assert {v["name"] for v in c.volume_list()} == {"v", "b"}
        assert not os.path.exists(path)


def piece(tag: bytes, i: int) -> bytes:
    """MiB number i of a recognisable content (tag S: the snapshot's, V: the volume's)."""
    return (tag + b"%07d" % i) * (MiB // 8)


def differential_pool(pool_dir: str, mib: int) -> str:
    """Volume v of ``mib`` MiB and its persistent differential snapshot holding
    piece(b"S", i); the volume then holds piece(b"V", i). Made in-process (quick)."""
    pool = Pool.create(pool_dir)
    try:
        pool.create_volume("v", mib * MiB)
        for i in range(mib):
            pool.write("v", i * MiB, piece(b"S", i))
        s = pool.prepare_snapshot("v", attributes=int(Context.APP_ROLLBACK)
                                  | int(Attr.DIFFERENTIAL))
        pool.commit_snapshots([s.id])
        for i in range(mib):
            pool.write("v", i * MiB, piece(b"V", i))
        pool.flush("v")
        return s.id
    finally:
        pool.close()


def read_all(path: str, direct: bool) -> Iterator[bytes]:
    """Every MiB of path, through the page cache or with O_DIRECT."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, MiB)   # page-aligned, as O_DIRECT needs
    try:
        while (n := os.readv(fd, [buf])) > 0:
            yield buf[:n]
    finally:
        buf.close()
        os.close(fd)


def holds(path: str, tag: bytes, mib: int) -> None:
    """path reads piece(tag, i) for every MiB, buffered and with O_DIRECT."""
    for direct in (False, True):
        n = 0
        for i, data in enumerate(read_all(path, direct)):
            assert data == piece(tag, i), f"{path}: MiB {i} differs (O_DIRECT={direct})"
            n += 1
        assert n == mib, (path, n)


def test_split_refused_when_used_during_its_copy(tmp_path: Path, sockdir: str) -> None:
    """A differential snapshot's split copies it first (seconds, hours for a big one):
    a loop device attached meanwhile is found by the check at the end of that copy,
    the last moment the split can stop with nothing changed. Refused, naming it; the
    snapshot is still differential, there is no new volume, the loop reads on."""
    mib = 512
    sid = differential_pool(str(tmp_path / "pool"), mib)
    d = start_daemon(tmp_path, sockdir, {}, CONFIG, self_guard=0.0)
    shadow = os.path.join(d.mount, ".shadow", f"{sid}.img")
    errors: list[BaseException] = []
    try:
        with d.client() as c:
            def split() -> None:
                with d.client() as c2:
                    c2.split(sid, "b")
            t = start_thread(split, errors, "split")

            def copying() -> bool:
                return any(o["op"] == "split" and 0 < o["done"] < o["total"] // 2
                           for o in c.status()["operations"])
            deadline = time.monotonic() + 30
            while not copying():
                assert t.is_alive() and time.monotonic() < deadline, errors
                time.sleep(0.01)
            with ro_loop(shadow) as lp:
                t.join(60)
                assert not t.is_alive()
                assert errors, "split completed under a loop device"
                e = errors[0]
                assert isinstance(e, ControlError) and e.name == "VSS_E_VOLUME_IN_USE", e
                assert (f"cannot split snapshot {sid}: in use by loop device {lp['dev']} "
                        f"({shadow})") in e.message, e.message
                assert "nothing changed" in e.message
                assert c.snapshot_show(snapshot_id=sid)["kind"] == "differential"
                assert {v["name"] for v in c.volume_list()} == {"v"}
                holds(lp["dev"], b"S", mib)
            assert c.split(sid, "b")["name"] == "b"
            holds(os.path.join(d.mount, "volumes", "b.img"), b"S", mib)
            assert c.check()["ok"]
    finally:
        d.stop()


def test_promote_and_revert_keep_a_loop_device_reading(tmp_path: Path,
                                                       sockdir: str) -> None:
    """Promote and revert do not take a snapshot away: they need no in-use check, and a
    loop device on it reads the snapshot's content all along -- while the promote
    copies it, after it (now from its own full copy), after a revert of the volume to
    it -- through its page cache and with O_DIRECT, as does the device path itself."""
    mib = 64
    sid = differential_pool(str(tmp_path / "pool"), mib)
    d = start_daemon(tmp_path, sockdir, {}, CONFIG, self_guard=0.0)
    shadow = os.path.join(d.mount, ".shadow", f"{sid}.img")
    vol = os.path.join(d.mount, "volumes", "v.img")
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        with d.client() as c, ro_loop(shadow) as lp:
            holds(lp["dev"], b"S", mib)   # its page cache (and ours) warm
            holds(shadow, b"S", mib)

            def keep_reading() -> None:
                while not stop.is_set():
                    holds(lp["dev"], b"S", mib)
            t = start_thread(keep_reading, errors, "reader")
            try:
                assert c.promote(sid)["kind"] == "full"
                time.sleep(0.2)   # a read or two from the full copy
            finally:
                stop.set()
                t.join(60)
            assert not errors, errors
            holds(lp["dev"], b"S", mib)
            holds(shadow, b"S", mib)
            holds(vol, b"V", mib)
            c.revert(sid)   # the volume's loop devices matter here, not the snapshot's
            holds(vol, b"S", mib)
            holds(lp["dev"], b"S", mib)
            holds(shadow, b"S", mib)
            one_line_error(spx("snapshot", "delete", sid, socket=d.socket), 1,
                           f"in use by loop device {lp['dev']} ({shadow})")
            detach(lp)
            assert c.snapshot_delete(snapshot_id=sid)["deleted"] == [sid]
            assert c.check()["ok"]
    finally:
        stop.set()
        d.stop()


def test_delete_right_after_detach_works(tmp_path: Path, sockdir: str) -> None:
    """The normal cycle -- attach, read, detach, delete at once -- is never refused: the
    in-use check waits for the kernel's asynchronous release of the loop's file."""
    d = start_daemon(tmp_path, sockdir, {"v": 4 * MiB}, CONFIG, self_guard=0.0)
    try:
        with d.client() as c:
            made = c.snapshot_create(["v"], context="app-rollback")
            for i in range(4):
                sid = c.snapshot_create(["v"], context="app-rollback")["snapshots"][0][
                    "snapshot_id"]
                c.expose(sid, name=f"s{i}")
                path = (os.path.join(d.mount, "exposed", f"s{i}.img") if i % 2
                        else os.path.join(d.mount, ".shadow", f"{sid}.img"))
                with ro_loop(path) as lp:
                    run_cmd("dd", f"if={lp['dev']}", "of=/dev/null", "bs=1M")
                    detach(lp)
                    if i == 1:
                        c.unexpose(sid)
                    assert c.snapshot_delete(snapshot_id=sid)["deleted"] == [sid]
            with ro_loop(os.path.join(d.mount, ".shadow",
                                      f"{made['snapshots'][0]['snapshot_id']}.img")) as lp:
                pass   # detached by the context
            assert c.snapshot_delete(all=True)["count"] == 1
    finally:
        d.stop()


def _wait_log(d: Daemon, pattern: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, d.log_text())
        if m:
            return m.group(0)
        assert time.monotonic() < deadline, f"{pattern!r} not in the log:\n{d.log_text()}"
        time.sleep(0.05)


@pytest.mark.daemon_log_expects(r"snapshot \S+ was deleted while \d+ file\(s\) had it open",
                                 r"automatic deletion of snapshot \S+ although it is in use")
def test_auto_release_set_in_use_is_deleted_loudly(tmp_path: Path, sockdir: str) -> None:
    """An auto-release (backup) set ends with its requester's session: that deletion is
    not refused (its lifetime is the contract), but a loop device still on it is named in
    an error in the daemon's log, and the data path logs the open file it orphaned."""
    d = start_daemon(tmp_path, sockdir, {"v": 4 * MiB}, CONFIG, self_guard=0.0)
    loops = contextlib.ExitStack()
    try:
        with d.client() as c:
            sid = c.snapshot_create(["v"], context="backup")["snapshots"][0]["snapshot_id"]
            c.expose(sid, name="b")
            path = os.path.join(d.mount, "exposed", "b.img")
            lp = loops.enter_context(ro_loop(path))
        # the session ended: its set is deleted, the loop device still on it
        _wait_log(d, rf"automatic deletion of snapshot {sid} although it is in use by "
                     rf"loop device {lp['dev']} \({re.escape(path)}")
        assert "b.img" not in os.listdir(os.path.join(d.mount, "exposed"))
        _wait_log(d, rf"snapshot {sid} was deleted while 1 file\(s\) had it open")
        loops.close()
        with d.client() as c:
            assert not exists(c, sid)
    finally:
        loops.close()
        d.stop()


@pytest.mark.daemon_log_expects(r"snapshot \S+ was deleted while \d+ file\(s\) had it open")
def test_overflow_of_a_snapshot_in_use_is_logged(tmp_path: Path, sockdir: str) -> None:
    """Origin writes never fail because of a snapshot: a diff-area overflow deletes the
    oldest even while a loop device reads it -- logged as an error by the data path."""
    pool = Pool.create(str(tmp_path / "pool"))
    try:
        pool.create_volume("v", 4 * MiB)
        pool.set_diff_limit("v", pool.chunk_size)
    finally:
        pool.close()
    d = start_daemon(tmp_path, sockdir, {}, CONFIG, self_guard=0.0)
    try:
        img = os.path.join(d.mount, "volumes", "v.img")
        with open(img, "r+b") as f:
            f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        with d.client() as c:
            sid = c.snapshot_create(["v"], context="app-rollback")["snapshots"][0][
                "snapshot_id"]
            with ro_loop(os.path.join(d.mount, ".shadow", f"{sid}.img")):
                with open(img, "r+b") as f:
                    f.write(os.urandom(MiB))   # needs 16 preserved chunks: overflow
                    os.fsync(f.fileno())
                assert not exists(c, sid)
                _wait_log(d, r"deleting its oldest snapshot")
                os.listdir(os.path.join(d.mount, ".shadow"))   # any request will do
                _wait_log(d, rf"snapshot {sid} was deleted while 1 file\(s\) had it open")
    finally:
        d.stop()
