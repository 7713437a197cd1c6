"""Failure between hosts (issue 16 item 5; docs/hosts.md, "Failures"): a host daemon
(`serve --array`) whose network drops, or whose array restarts, under I/O and during a
set creation.

Each machine is a network namespace (tests/netns.py): the array in "array", the host
daemon in "hostB"; a network drop is `ip -n NS link set eth0 down` (then up) in hostB's.
The array listens on fixed ports (10809 NBD, 10810 control: its namespace is new, so
they are free), so that it can be killed and started again on the same pool and ports.
The host daemon runs with short timeouts from its environment:
SHADOWPLEX_PATH_TIMEOUT (how long a request rides out a lost path; a reply waits a
third of it) and SHADOWPLEX_SET_LEASE (the array's set-in-creation lease; its floor is
5 s). Everything is stopped, unmounted, detached and the link set up again however a
test ends; every wait is bounded. The last tests need no kernel: RemoteArray._call with a
control connection that breaks (what is asked again, what is not).
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, launch, start_daemon
from netns import Hosts, hosts
from support import ROOT, detach_loops_under, run_cmd

from blockstore import Pool
from provider.client import Client, ControlError

pytestmark = pytest.mark.kernel
MiB = 1 << 20
NBD_PORT, CONTROL_PORT = 10809, 10810
SIZE = 16 * MiB


@dataclass
class Rig:
    """The array (volume db, SIZE bytes, `data` at 0, presented to hostB) and, once
    started, hostB's daemon."""
    net: Hosts
    base: Path
    sockdir: str
    pki: Path
    certs: Path
    data: bytes
    array: Daemon | None = None
    host: Daemon | None = None
    loops: list[str] = field(default_factory=list)

    # -- the array
    def start_array(self) -> Daemon:
        addr = self.net.addr["array"]
        self.array = start_daemon(self.base, self.sockdir, {}, config={
            "nbd_listen": f"{addr}:{NBD_PORT}", "tls_dir": str(self.pki),
            "control_listen": f"{addr}:{CONTROL_PORT}"}, netns=self.net.ns["array"])
        return self.array

    def kill_array(self) -> None:
        """kill -9, then its dead FUSE mount lazily unmounted (Daemon.stop)."""
        assert self.array is not None
        self.array.proc.kill()
        self.array.proc.wait(10)
        self.array.stop()

    @property
    def array_db(self) -> Path:
        """hostB's volume db as the array's own mount shows it."""
        assert self.array is not None
        return Path(self.array.mount) / "hosts" / "hostB" / "volumes" / "db.img"

    # -- the host
    def start_host(self, path_timeout: float = 30.0, lease: float = 30.0,
                   hooks: Path | None = None) -> Daemon:
        mnt, state = self.base / "mnt-hostB", self.base / "state-hostB"
        sock = os.path.join(self.sockdir, "hostB.sock")
        mnt.mkdir(exist_ok=True)
        env = dict(os.environ, SHADOWPLEX_PATH_TIMEOUT=str(path_timeout),
                   SHADOWPLEX_SET_LEASE=str(lease))
        self.host = launch(
            ["serve", "--array", f"{self.net.addr['array']}:{CONTROL_PORT}",
             "--tls-dir", str(self.certs), "--mount", str(mnt), "--state-dir", str(state),
             "--socket", sock, "--hooks-dir", str(hooks) if hooks else ""],
            module="tools.cli", pool=str(state), mount=str(mnt), socket=sock,
            log=str(self.base / "hostB.log"), netns=self.net.ns["hostB"], env=env)
        return self.host

    @property
    def host_db(self) -> Path:
        assert self.host is not None
        return Path(self.host.mount) / "volumes" / "db.img"

    def link(self, up: bool) -> None:
        """hostB's network cable: in or out."""
        run_cmd("ip", "-n", self.net.ns["hostB"], "link", "set", "eth0",
                "up" if up else "down")

    def want(self, offset: int, length: int) -> bytes:
        whole = self.data + bytes(SIZE - len(self.data))
        return whole[offset:offset + length]


@pytest.fixture
def rig(tmp_path: Path, sockdir: str) -> Iterator[Rig]:
    require_kernel()
    from nbd_net import pki
    with hosts("array", "hostB") as net:
        pki_dir, certs = tmp_path / "pki", tmp_path / "client-hostB"
        pki("init", str(pki_dir), "--server-name", net.addr["array"])
        pki("host", "hostB", str(certs), "--ca", str(pki_dir))
        data = os.urandom(8 * MiB)
        pool = Pool.create(str(tmp_path / "pool"))
        pool.create_volume("db", SIZE)
        pool.write("db", 0, data)
        pool.close()
        r = Rig(net, tmp_path, sockdir, pki_dir, certs, data)
        try:
            r.start_array().ok("volume", "present", "db", "--to", "hostB")
            yield r
        finally:
            run_cmd("ip", "-n", net.ns["hostB"], "link", "set", "eth0", "up", check=False)
            for mnt in (tmp_path / "fs",):
                if subprocess.run(["mountpoint", "-q", str(mnt)], check=False).returncode == 0:
                    run_cmd("umount", "-l", str(mnt), check=False)
            if r.host is not None:
                detach_loops_under(Path(r.host.mount))
                r.host.stop()
            if r.array is not None:
                r.array.stop()


def _pread_direct(path: Path, offset: int, length: int, piece: int = 128 << 10,
                  pause: float = 0.0, waits: list[float] | None = None) -> bytes:
    """`length` bytes at `offset` with O_DIRECT reads of `piece` bytes (no page cache:
    every one is a request to the host daemon), `pause` s apart; each one's time is
    appended to `waits`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, piece)
    out = bytearray()
    try:
        for off in range(offset, offset + length, piece):
            t0 = time.monotonic()
            n = os.preadv(fd, [buf], off)
            if waits is not None:
                waits.append(time.monotonic() - t0)
            out += buf[:n]
            time.sleep(pause)
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def _pwrite_direct(path: Path, offset: int, data: bytes, fsync: bool) -> None:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ a: path loss
PATH_A = 9.0   # s: a reply waits 3 s, so a 5 s drop breaks the connection in flight


@pytest.mark.daemon_log_expects(r"no path to the array", r"read: .*-> EIO")
def test_a_read_rides_out_a_network_drop_within_the_path_timeout_then_fails_eio(
        rig: Rig) -> None:
    rig.start_host(path_timeout=PATH_A)
    img = rig.host_db
    # a long read (O_DIRECT, 128 KiB at a time) across a 5 s drop: it waits and completes
    got: list[bytes] = []
    errors: list[BaseException] = []
    waits: list[float] = []

    def reader() -> None:
        try:
            got.append(_pread_direct(img, 0, SIZE, pause=0.03, waits=waits))
        except BaseException as e:   # noqa: BLE001 - asserted below
            errors.append(e)

    t = threading.Thread(target=reader, name="reader", daemon=True)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "the read finished before the drop: make it longer"
    rig.link(False)
    try:
        time.sleep(5.0)
    finally:
        rig.link(True)
    t.join(PATH_A + 30)
    assert not t.is_alive(), "the read did not complete after the link came back"
    assert not errors, f"the read failed across a drop shorter than the path timeout: " \
                       f"{errors[0]!r}"
    assert got[0] == rig.want(0, SIZE)
    assert max(waits) >= 3.0, f"no read waited across the drop: {max(waits):.2f} s"
    assert "is back" in Path(rig.host.log).read_text()   # type: ignore[union-attr]
    # a drop longer than the path timeout: EIO after about PATH_A, neither at once nor never
    rig.link(False)
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            _pread_direct(img, 4 * MiB, MiB)
        took = time.monotonic() - t0
    finally:
        rig.link(True)
    assert e.value.errno == errno.EIO, e.value
    assert PATH_A * 0.9 <= took <= PATH_A + PATH_A / 3 + 5, f"EIO after {took:.1f} s"
    # and the path back: it works again, right away
    t0 = time.monotonic()
    assert _pread_direct(img, 4 * MiB, MiB) == rig.want(4 * MiB, MiB)
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------- b: during set creation
HOOK = """#!/bin/sh
echo "$1" >> {log}
if [ "$1" = freeze ]; then
    i=0
    while [ ! -e {go} ] && [ $i -lt 400 ]; do sleep 0.1; i=$((i+1)); done
fi
exit 0
"""
LEASE_B = 5.0


def _array_slot_free(rig: Rig) -> bool:
    assert rig.array is not None
    with Client(socket_path=rig.array.socket, client="array-requester") as local:
        try:
            local.set_start("app-rollback")
        except ControlError as e:
            if e.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS":
                return False
            raise
        local.set_abort()
        return True


@pytest.mark.daemon_log_expects(r"snapshot set .* of host hostB: removing",
                                r"VSS_E_BAD_STATE", r"releasing set .* on the array",
                                r"renewing the array's lease", r"aborting snapshot set",
                                r"array\.(abort|commit|set\.release)")
def test_a_network_drop_during_set_creation_aborts_it_and_frees_the_array(
        rig: Rig) -> None:
    hooks = rig.base / "hooks"
    hooks.mkdir()
    hook_log, go = rig.base / "hook.log", rig.base / "go"
    hook = hooks / "10-slow"
    hook.write_text(HOOK.format(log=hook_log, go=go))
    hook.chmod(0o755)
    host = rig.start_host(path_timeout=20.0, lease=LEASE_B, hooks=hooks)
    create = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "--socket", host.socket, "snapshot", "create",
         "db"], cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (hook_log.exists() and "freeze" in hook_log.read_text()):
            assert create.poll() is None, create.communicate()
            assert time.monotonic() < deadline, "the host's writers were never frozen"
            time.sleep(0.1)
        # the host is frozen, its set prepared on the array: the cable goes out
        assert rig.array is not None
        prepared = rig.array.json("snapshot", "list")
        assert len(prepared) == 1, prepared     # the host's, half-created
        rig.link(False)
        try:
            t0 = time.monotonic()
            while not _array_slot_free(rig):
                # the lease (renewed every LEASE_B/4 before the drop) plus the array's
                # 1 s expiry tick, and a margin
                assert time.monotonic() - t0 < LEASE_B + 4, \
                    "the array kept the set-in-creation slot of a host it lost"
                time.sleep(0.2)
        finally:
            rig.link(True)
        assert rig.array.json("snapshot", "list") == []
        go.touch()
        out, err = create.communicate(timeout=60)
    finally:
        go.touch()
        if create.poll() is None:
            create.kill()
            create.wait(10)
    # the set failed on the host, its writers were thawed, nothing is left anywhere
    assert create.returncode != 0, out
    assert "Traceback" not in err
    actions = hook_log.read_text().split()
    assert actions[0] == "freeze" and "thaw" in actions[1:], actions
    assert rig.array.json("snapshot", "list") == []
    assert host.json("snapshot", "list") == []
    # the host and the array work on: a set from the host now succeeds
    sid = host.json("snapshot", "create", "db")["snapshots"][0]["id"]
    assert [s["id"] for s in rig.array.json("snapshot", "list")] == [sid]


# ------------------------------------------------------------- c: the array restarts
PATH_C = 24.0


@pytest.mark.daemon_log_expects(r"following the array")
def test_ext4_on_a_host_rides_out_an_array_restart(rig: Rig) -> None:
    rig.start_host(path_timeout=PATH_C)
    fs = rig.base / "fs"
    fs.mkdir()
    dev = run_cmd("losetup", "--find", "--show", "--direct-io=on",
                  str(rig.host_db)).stdout.strip()
    rig.loops.append(dev)
    before, during = os.urandom(MiB), os.urandom(MiB)
    try:
        run_cmd("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                dev)
        run_cmd("mount", "-o", "noatime", dev, str(fs))
        try:
            (fs / "before").write_bytes(before)
            _fsync(fs / "before")
            # syncfs writes the block device's buffers back last, with no FLUSH after
            # them: fsync the device too, or the array's restart would (rightly) fail the
            # next flush -- test_a_flush_after_an_array_restart_fails_once... shows that
            run_cmd("sync", "-f", str(fs))
            _fsync(Path(dev))
            rig.kill_array()
            # I/O on the host waits for the array (within the path timeout)
            errors: list[BaseException] = []

            def writer() -> None:
                try:
                    (fs / "during").write_bytes(during)
                    _fsync(fs / "during")
                except BaseException as e:   # noqa: BLE001 - asserted below
                    errors.append(e)

            t = threading.Thread(target=writer, name="writer", daemon=True)
            t0 = time.monotonic()
            t.start()
            time.sleep(2.0)
            assert t.is_alive() and not errors, "a write finished with the array down"
            rig.start_array()
            t.join(PATH_C + 10)
            assert not t.is_alive(), "the write did not resume after the array restarted"
            assert not errors, f"the write failed across the restart: {errors[0]!r}"
            assert time.monotonic() - t0 < PATH_C
            # the file fsync'ed before the kill and the one written across it read
            # back right (O_DIRECT: from the array, not from the host's page cache)
            assert _pread_direct(fs / "before", 0, MiB) == before
            assert _pread_direct(fs / "during", 0, MiB) == during
        finally:
            run_cmd("umount", str(fs))
    finally:
        run_cmd("losetup", "-d", dev, check=False)
    # ext4 saw no wrong data: the array's own image checks clean
    res = subprocess.run(["e2fsck", "-fn", str(rig.array_db)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


PATH_D = 15.0


@pytest.mark.daemon_log_expects(r"following the array", r"may be lost",
                                r"fsync: .*-> EIO")
def test_a_flush_after_an_array_restart_fails_once_if_acknowledged_writes_were_not_flushed(
        rig: Rig) -> None:
    host = rig.start_host(path_timeout=PATH_D)
    img = rig.host_db
    # written and flushed before the restart: the next flush succeeds (no false alarm)
    _pwrite_direct(img, 0, os.urandom(MiB), fsync=True)
    rig.kill_array()
    rig.start_array()
    _fsync(img)
    # written (acknowledged by the array) but not flushed when it restarts: the next
    # flush fails with EIO, once, and the host's log says why
    data = os.urandom(MiB)
    _pwrite_direct(img, MiB, data, fsync=False)
    rig.kill_array()
    rig.start_array()
    with pytest.raises(OSError) as e:
        _fsync(img)
    assert e.value.errno == errno.EIO
    assert "may be lost" in Path(host.log).read_text()
    _fsync(img)
    # (kill -9 keeps the engine's page cache: the data did survive this time)
    assert _pread_direct(img, MiB, MiB) == data
    # the connections break but the array process lives on (same boot id): what it
    # acknowledged is still there, the next flush covers it -- no EIO
    _pwrite_direct(img, 2 * MiB, os.urandom(MiB), fsync=False)
    lost = Path(host.log).read_text().count("may be lost")
    rig.link(False)
    try:
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                _pread_direct(img, 8 * MiB, MiB)
            except BaseException as e:   # noqa: BLE001 - asserted below
                errors.append(e)

        t = threading.Thread(target=reader, name="reader", daemon=True)
        t.start()
        time.sleep(PATH_D / 3 + 2)   # the read's reply is overdue: its connection is dropped
    finally:
        rig.link(True)
    t.join(PATH_D + 5)
    assert not t.is_alive() and not errors, errors
    log = Path(host.log).read_text()
    assert "is back" in log
    _fsync(img)
    assert Path(host.log).read_text().count("may be lost") == lost


# ------------------------------------------------------- a LUN replaced under its name
@pytest.mark.daemon_log_expects(r"not naa", r"write: .*-> EIO", r"is gone or no longer")
def test_a_write_is_never_sent_to_another_lun_created_under_the_same_name(
        rig: Rig) -> None:
    host = rig.start_host(path_timeout=PATH_A)
    assert rig.array is not None
    img = rig.host_db
    assert _pread_direct(img, 0, MiB) == rig.want(0, MiB)   # connections open to db
    # cut off, the host cannot learn that the array deleted db and made a new one
    rig.link(False)
    try:
        rig.array.ok("volume", "delete", "db")
        rig.array.ok("volume", "create", "db", "16M")
        rig.array.ok("volume", "present", "db", "--to", "hostB")
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                _pwrite_direct(img, 4 * MiB, b"\xee" * MiB, fsync=False)
            except BaseException as e:   # noqa: BLE001 - asserted below
                errors.append(e)

        t = threading.Thread(target=writer, name="writer", daemon=True)
        t.start()
        time.sleep(PATH_A / 3 + 1)   # its connection times out; it waits for a path
    finally:
        rig.link(True)
    t.join(PATH_A + 10)
    assert not t.is_alive()
    # the new connection opens the new LUN: the write meant for the old one fails ...
    assert errors and isinstance(errors[0], OSError) and errors[0].errno == errno.EIO, \
        errors
    assert "not naa" in Path(host.log).read_text()
    # ... and never lands on the new one
    with open(rig.array_db, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(MiB) == bytes(MiB)


# ------------------------------------------------ the control connection: what is repeated
class _FakeControl:
    """A control connection that is lost at its first call (as when the array restarts
    under it), and answers every call after that; `sent` records what reached it."""

    def __init__(self, sent: list[str], lost: bool) -> None:
        self.sent, self.lost = sent, lost

    def call(self, op: str, args: dict[str, object]) -> object:
        self.sent.append(op)
        if self.lost:
            raise ControlError("VSS_E_REMOTE_SERVER_UNAVAILABLE",
                               "the daemon closed the connection (did it stop?)")
        return {"op": op}

    def close(self, wait: float = 0) -> None:
        pass


def _remote_with(first_lost: bool) -> tuple[object, list[str], list[int]]:
    from provider.remote_array import RemoteArray
    ra = RemoteArray.__new__(RemoteArray)   # only what _call uses
    sent: list[str] = []
    connects = [0]

    def connect() -> _FakeControl:
        connects[0] += 1
        return _FakeControl(sent, lost=False)
    ra.array, ra._lock = "array.test", threading.Lock()   # type: ignore[attr-defined]
    ra._control = _FakeControl(sent, lost=first_lost)     # type: ignore[assignment]
    ra._control_ok = True                                 # type: ignore[attr-defined]
    ra._connect = connect                                 # type: ignore[method-assign]
    return ra, sent, connects


@pytest.mark.parametrize("op", ["array.info", "array.list", "array.watch"])
def test_a_query_is_asked_again_once_on_a_new_control_connection(op: str) -> None:
    ra, sent, connects = _remote_with(first_lost=True)
    assert ra._call(op) == {"op": op}   # type: ignore[attr-defined]
    assert sent == [op, op] and connects == [1]


@pytest.mark.parametrize("op", ["array.set.claim", "array.prepare", "array.commit",
                                "array.abort", "array.set.release", "array.delete",
                                "array.plex_sync_step", "array.set.renew"])
def test_an_op_that_changes_the_array_is_not_repeated_when_its_connection_broke(
        op: str) -> None:
    from provider.vss import VssError
    ra, sent, connects = _remote_with(first_lost=True)
    with pytest.raises(VssError) as e:
        ra._call(op, {"set_id": "x"})   # type: ignore[attr-defined]
    assert e.value.name == "VSS_E_REMOTE_SERVER_UNAVAILABLE"
    assert "not repeated" in str(e.value)
    assert sent == [op] and connects == [0]   # sent once, nothing re-sent
    # the next call opens a new connection first, then sends once
    assert ra._call("array.list") == {"op": "array.list"}   # type: ignore[attr-defined]
    assert sent == [op, "array.list"] and connects == [1]
