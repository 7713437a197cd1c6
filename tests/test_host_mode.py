"""Host mode (issue 16): `shadowplex serve --array HOST:PORT --tls-dir DIR --mount MOUNT`
on another machine (a network namespace, tests/netns.py) presents at its mount what the
array presents to that host, with the data path over NBD (TLS, the host's certificate).

The array runs in namespace "array" (conftest's tls_array fixture, tests/nbd_net.py: volumes db,
presented to hostB, and logs, the array's own); the host daemon in hostB's namespace.
Namespaces share the mount table here (nsenter --net only), so the test reads both
mounts directly."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Daemon, launch
from nbd_net import Net
from support import detach_loops_under, run_cmd

from provider.client import Client, ControlError

pytestmark = pytest.mark.kernel
MiB = 1 << 20


@dataclass
class Host:
    d: Daemon
    mount: Path
    net: Net

    def image(self, kind: str, name: str) -> Path:
        return self.mount / kind / f"{name}.img"


def _wait_for(pred, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_host(t: Net, host: str, base: Path, extra: list[str] | None = None) -> Daemon:
    mnt, state, sock = base / f"mnt-{host}", base / f"state-{host}", base / f"{host}.sock"
    mnt.mkdir(exist_ok=True)
    array = f"{t.net.addr['array']}:{t.control_port}"
    return launch(["serve", "--array", array, "--tls-dir", str(t.clients[host]),
                   "--mount", str(mnt), "--state-dir", str(state), "--socket", str(sock),
                   "--hooks-dir", "", *(extra or [])],
                  module="tools.cli", pool=str(state), mount=str(mnt), socket=str(sock),
                  log=str(base / f"{host}.log"), netns=t.net.ns[host])


@pytest.fixture
def host_b(tls_array: Net, tmp_path: Path) -> Iterator[Host]:
    d = start_host(tls_array, "hostB", tmp_path)
    try:
        yield Host(d, Path(d.mount), tls_array)
    finally:
        detach_loops_under(Path(d.mount))
        d.stop()


def test_a_host_daemon_mounts_what_the_array_presents_to_it(host_b: Host) -> None:
    h, t = host_b, host_b.net
    assert sorted(os.listdir(h.mount / "volumes")) == ["db.img"]   # not logs: the array's
    assert os.path.getsize(h.image("volumes", "db")) == 16 * MiB
    # the array's own mount shows hostB's LUNs under hosts/hostB/
    array_db = Path(t.d.mount) / "hosts" / "hostB" / "volumes" / "db.img"
    with open(array_db, "rb") as f:
        want = f.read(4 * MiB)
    with open(h.image("volumes", "db"), "rb") as f:
        assert f.read(4 * MiB) == want
    # a write on the host, made durable there, is on the array
    data = os.urandom(MiB)
    fd = os.open(h.image("volumes", "db"), os.O_WRONLY)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(array_db, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [buf], 3 * MiB) == MiB
        assert bytes(buf) == data
    finally:
        os.close(fd)
    # the array presents another volume to the host: the host's mount follows
    t.d.ok("volume", "present", "logs", "--to", "hostB")
    _wait_for(lambda: "logs.img" in os.listdir(h.mount / "volumes"), "logs on hostB")
    # and a snapshot made on the array of a volume presented to hostB is not hostB's
    # until presented: .shadow/<id> stays unknown
    sid = t.d.json("snapshot", "create", "db")["snapshots"][0]["id"]
    time.sleep(1.0)
    assert not (h.mount / ".shadow" / f"{sid}.img").exists()


def test_ext4_on_a_host_s_volume_lands_on_the_array(host_b: Host, tmp_path: Path) -> None:
    h, t = host_b, host_b.net
    img = h.image("volumes", "db")
    fs = tmp_path / "fs"
    fs.mkdir()
    dev = run_cmd("losetup", "--find", "--show", "--direct-io=on", str(img)).stdout.strip()
    try:
        run_cmd("mkfs.ext4", "-q", "-F", dev)
        run_cmd("mount", dev, str(fs))
        try:
            (fs / "hello.txt").write_text("written on hostB\n")
            payload = os.urandom(3 * MiB)
            (fs / "blob").write_bytes(payload)
        finally:
            run_cmd("umount", str(fs))
    finally:
        run_cmd("losetup", "-d", dev, check=False)
    # the array's own view of the volume holds the file system the host made
    out = subprocess.run(["debugfs", "-R", "cat /hello.txt",
                          str(Path(t.d.mount) / "hosts" / "hostB" / "volumes" / "db.img")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout == "written on hostB\n", out.stderr


def test_du_on_a_host_s_mount_is_the_array_s_allocation(host_b: Host) -> None:
    """Issue 19 #3: a host's `du` and `volume list` show the LUN's allocation on the
    array (from its listing, fetched again in the background once ALLOC_TTL old), not
    its size; a write shows within a few seconds."""
    h = host_b
    img = h.image("volumes", "db")
    c = _host_client(h)

    def du() -> int:
        return int(run_cmd("du", "-B1", str(img)).stdout.split()[0])

    def listed() -> int:
        (v,) = [v for v in c.volume_list() if v["name"] == "db"]
        return int(v["allocated"])

    try:
        assert os.path.getsize(img) == 16 * MiB
        _wait_for(lambda: du() == listed() == 2 * MiB, "2 MiB allocated (of 16)")
        fd = os.open(img, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(MiB), 5 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        _wait_for(lambda: du() == listed() == 3 * MiB, "the write's MiB in du")
    finally:
        c.close()


def _write_synced(img: Path, data: bytes) -> None:
    """Write at the start through the host's mount and fsync: then it is on the array."""
    with open(img, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _host_client(h: Host) -> Client:
    return Client(socket_path=h.d.socket, client="test")


def test_a_host_creates_a_snapshot_set_on_the_array(host_b: Host) -> None:
    h, t = host_b, host_b.net
    img = h.image("volumes", "db")
    before = os.urandom(MiB)
    _write_synced(img, before)
    res = h.d.json("snapshot", "create", "db")          # the host's CLI, its daemon
    sid = res["snapshots"][0]["id"]
    with open(img, "r+b") as f:                          # after the instant
        f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    # the array holds it, presented to hostB only; the host's mount serves it read-only
    snaps = {s["id"]: s for s in t.d.json("snapshot", "list")}
    assert sid in snaps
    shadow = h.mount / ".shadow" / f"{sid}.img"
    _wait_for(shadow.exists, "the snapshot on hostB's mount")
    with open(shadow, "rb") as f:
        assert f.read(MiB) == before
    with pytest.raises(OSError), open(shadow, "r+b"):
        pass
    assert [s["id"] for s in h.d.json("snapshot", "list")] == [sid]
    # deleted from the host: gone from the array
    h.d.ok("snapshot", "delete", sid)
    assert t.d.json("snapshot", "list") == []


def test_one_set_in_creation_per_array_across_hosts(host_b: Host) -> None:
    h, t = host_b, host_b.net
    with Client(socket_path=t.d.socket, client="array-requester") as local:
        local.set_start("app-rollback")          # the array's own requester holds it
        res = h.d.run("snapshot", "create", "db")
        assert res.returncode != 0 and "VSS_E_SNAPSHOT_SET_IN_PROGRESS" in res.stderr, \
            res.stderr
        local.set_abort()
    with _host_client(h) as c:
        c.set_start("app-rollback")               # now hostB holds the array's slot
        with Client(socket_path=t.d.socket, client="array-requester") as local:
            with pytest.raises(ControlError) as e:
                local.set_start("app-rollback")
            assert e.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
            assert "hostB" in e.value.message
        # the host daemon dies holding it: the array frees the slot (its session ends)
        h.d.proc.kill()
        h.d.proc.wait(10)
    deadline = time.monotonic() + 10
    while True:
        with Client(socket_path=t.d.socket, client="array-requester") as local:
            try:
                local.set_start("app-rollback")
                local.set_abort()
                break
            except ControlError as e:
                if e.name != "VSS_E_SNAPSHOT_SET_IN_PROGRESS" or time.monotonic() > deadline:
                    raise
        time.sleep(0.2)
    assert t.d.json("snapshot", "list") == []


def test_restarting_a_host_daemon_loses_nothing(host_b: Host, tmp_path: Path) -> None:
    h, t = host_b, host_b.net
    res = h.d.json("snapshot", "create", "db")
    set_id, sid = res["set_id"], res["snapshots"][0]["id"]
    assert h.d.stop() == 0
    d = start_host(t, "hostB", tmp_path)     # same state directory, same mount
    try:
        # the array says what the LUN is; the host's catalog still knows its set
        assert (Path(d.mount) / ".shadow" / f"{sid}.img").exists()
        assert [s["id"] for s in d.json("snapshot", "list")] == [sid]
        with Client(socket_path=d.socket, client="test") as c:
            assert [s["set_id"] for s in c.set_list()] == [set_id]
        d.ok("snapshot", "delete", "--set", set_id)
        assert t.d.json("snapshot", "list") == []
    finally:
        d.stop()


def test_a_set_is_one_instant_across_a_host_s_and_the_array_s_writers(host_b: Host) -> None:
    """db is written through hostB's mount (its data path: NBD), logs through the
    array's own FUSE mount; one writer writes n to db, then n to logs. A set of both,
    created by hostB while that runs, must hold db >= logs >= db - 1: the array's
    barrier held both kinds of writer at one instant."""
    import mmap
    import struct
    import threading
    h, t = host_b, host_b.net
    t.d.ok("volume", "present", "logs", "--to", "hostB")
    _wait_for(lambda: "logs.img" in os.listdir(h.mount / "volumes"), "logs on hostB")
    paths = (h.image("volumes", "db"),
             Path(t.d.mount) / "hosts" / "hostB" / "volumes" / "logs.img")
    fds = [os.open(p, os.O_RDWR | os.O_DIRECT) for p in paths]
    buf = mmap.mmap(-1, 4096)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            buf[:8] = struct.pack("<Q", n)
            for fd in fds:
                os.pwrite(fd, buf, 0)
            written[0] = n

    th = threading.Thread(target=writer)
    th.start()
    try:
        sets = []
        for _ in range(4):
            time.sleep(0.2)
            res = h.d.json("snapshot", "create", "db", "logs")
            sets.append({s["volume"]: s["id"] for s in res["snapshots"]})
    finally:
        stop.set()
        th.join(30)
        for fd in fds:
            os.close(fd)
    assert written[0] > 10
    for snaps in sets:
        got = {}
        for vol, sid in snaps.items():
            with open(h.mount / ".shadow" / f"{sid}.img", "rb") as f:
                got[vol] = struct.unpack("<Q", f.read(8))[0]
        assert got["db"] - 1 <= got["logs"] <= got["db"], (got, written[0])


def test_snapshot_diff_on_a_host_is_the_array_s(host_b: Host) -> None:
    h = host_b
    sid = h.d.json("snapshot", "create", "db")["snapshots"][0]["id"]
    fd = os.open(h.image("volumes", "db"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 5 * MiB + 100)     # one chunk (64 KiB) touched
        os.fsync(fd)
    finally:
        os.close(fd)
    res = h.d.json("snapshot", "diff", sid)
    assert res == [{"offset": 5 * MiB, "length": 64 * 1024}], res


def test_a_host_reverts_its_volume_to_its_snapshot(host_b: Host) -> None:
    h, t = host_b, host_b.net
    img = h.image("volumes", "db")
    before = os.urandom(MiB)
    _write_synced(img, before)
    sid = h.d.json("snapshot", "create", "db")["snapshots"][0]["id"]
    _write_synced(img, os.urandom(MiB))
    h.d.ok("revert", sid)
    with open(img, "rb") as f:     # the host's page cache of it was dropped
        assert f.read(MiB) == before
    with open(Path(t.d.mount) / "hosts" / "hostB" / "volumes" / "db.img", "rb") as f:
        assert f.read(MiB) == before


def test_a_diskshadow_script_runs_unchanged_on_a_host_daemon(host_b: Host,
                                                            tmp_path: Path) -> None:
    h, t = host_b, host_b.net
    script = tmp_path / "backup.dsh"
    script.write_text("set context persistent\n"
                      "begin backup\n"
                      "add volume db alias DB\n"
                      "create\n"
                      "expose %DB% nightly\n"
                      "list shadows set %VSS_SHADOW_SET%\n"
                      "end backup\n"
                      "exit\n")
    res = h.d.run("script", str(script))
    assert res.returncode == 0, res.stderr
    snaps = t.d.json("snapshot", "list")
    assert len(snaps) == 1 and snaps[0]["exposed_name"] == "nightly", snaps
    _wait_for((h.mount / "exposed" / "nightly.img").exists, "exposed/nightly on hostB")
    h.d.ok("snapshot", "delete", snaps[0]["id"], "--unexpose")
    assert t.d.json("snapshot", "list") == []
