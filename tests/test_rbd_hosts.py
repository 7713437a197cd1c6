"""Hosts are machines on Ceph (issue 18 item 2): two hosts, each a network namespace
running its own `shadowplex serve --array rbd:POOL --ceph-host NAME` (its own state
directory, mount, control socket), against ONE cluster that runs in a third namespace
("storage") and that they reach over veth pairs -- nothing else in common: the BCD
travels as a file.

    the seed sequence   hostA writes a volume, takes a transportable set, exports the
                        BCD; hostB imports it and reads the snapshot as it was at the
                        instant; hostA's mount follows (the LUN is hostB's now)
    LUN masking         presentation stored on the image: hostB does not see or serve
                        a LUN presented only to hostA, and follows when that changes;
                        an exposure name hostA takes is taken for hostB too
    one set at a time   across the hosts, a RADOS lock with a lease: refused while
                        hostA holds a set (also past a whole lease: hostA renews), then
                        free a lease after hostA's daemon was killed with -9

The in-process tests at the end run two RbdArray objects (two hosts' arrays) on the
session's loopback cluster: following by notify alone, the lock's refusal, a lease that
runs out and the commit that is then refused.

The storage cluster is this module's (one per module: a monitor + a memstore OSD in the
namespace, up in a few seconds), stopped by pid and its namespaces deleted afterwards,
also after a failure; the session's loopback cluster (conftest ``ceph``) is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ceph_cluster import CephCluster, missing
from conftest import require_kernel
from harness import Daemon, launch
from netns import Hosts, hosts
from support import digest, one_line_error, spx

from blockstore import errors as bse
from provider.client import Client, ControlError

pytestmark = pytest.mark.kernel
MiB = 1 << 20
LEASE = 3          # s: the set-in-creation lease of this module's daemons (default 30)
FOLLOW = 10.0      # s a host may take to see another's change (measured: docs/ceph.md)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hosts, CephCluster]]:
    """The cluster in namespace "storage", and the namespaces hostA and hostB joined to
    it by veth pairs on a bridge (tests/netns.py)."""
    require_kernel(missing())
    with hosts("storage", "hostA", "hostB") as net:
        base = Path(tempfile.mkdtemp(prefix="spx-cephns-"))   # short: admin sockets
        c = CephCluster(base, addr=net.addr["storage"], netns=net.ns["storage"])
        try:
            c.start()
            yield net, c
        finally:
            c.stop()
            with contextlib.suppress(OSError):
                shutil.copytree(base / "log", tmp_path_factory.getbasetemp() /
                                "ceph-ns-logs", dirs_exist_ok=True)
            shutil.rmtree(base, ignore_errors=True)


@dataclass
class Two:
    net: Hosts
    ceph: CephCluster
    a: Daemon
    b: Daemon


def start_host(net: Hosts, c: CephCluster, host: str, base: Path, sockdir: str) -> Daemon:
    mnt, state = base / f"mnt-{host}", base / f"state-{host}"
    sock = os.path.join(sockdir, f"{host}.sock")
    mnt.mkdir(exist_ok=True)
    return launch(["serve", "--array", f"rbd:{c.pool}", "--ceph-conf", c.conf,
                   "--ceph-host", host, "--mount", str(mnt), "--state-dir", str(state),
                   "--socket", sock, "--hooks-dir", ""],
                  module="tools.cli", pool=str(state), mount=str(mnt), socket=sock,
                  log=str(base / f"{host}.log"), netns=net.ns[host],
                  env={**os.environ, "SHADOWPLEX_SET_LEASE": str(LEASE)})


@pytest.fixture
def two(storage: tuple[Hosts, CephCluster], tmp_path: Path, sockdir: str
        ) -> Iterator[Two]:
    net, c = storage
    c.wipe()
    a = b = None
    try:
        a = start_host(net, c, "hostA", tmp_path, sockdir)
        b = start_host(net, c, "hostB", tmp_path, sockdir)
        yield Two(net, c, a, b)
    finally:
        killed = any(d is not None and (d.proc.returncode or 0) < 0 for d in (a, b))
        for d in (b, a):
            if d is not None:
                d.stop()
        if not killed:   # a killed host's watches hold its images for 30 s: no wipe
            c.wipe()     # (~18 s); the next test's own wipe would wait for them


def _wait_for(pred: Any, what: str, timeout: float = FOLLOW) -> float:
    """Seconds until pred() held (AssertionError after timeout)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def _write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _listed(d: Daemon, where: str) -> list[str]:
    return sorted(os.listdir(Path(d.mount) / where))


# --------------------------------------------------------------------------- two daemons
def test_the_transport_sequence_between_two_ceph_hosts(two: Two, tmp_path: Path) -> None:
    a, b = two.a, two.b
    with a.client() as on_a, b.client() as on_b:
        on_a.volume_create("db", 16 * MiB)
        assert _listed(b, "volumes") == []          # presented to hostA only
        data = os.urandom(3 * MiB)
        _write(Path(a.image("db")), MiB, data)
        want = tmp_path / "want.img"                # the volume at the instant
        with open(want, "wb") as f:
            f.truncate(16 * MiB)
            f.seek(MiB)
            f.write(data)
        made = on_a.snapshot_create(["db"], context="app-rollback",
                                    attributes="transportable")
        set_id, sid = made["set_id"], made["snapshots"][0]["snapshot_id"]
        _write(Path(a.image("db")), MiB, b"written after the instant" * 100)
        bcd = tmp_path / "set.xml"
        a.ok("export", set_id, "-o", str(bcd))      # the BCD travels as a file
        assert not (Path(b.mount) / ".shadow" / f"{sid}.img").exists()
        imported = b.json("import", str(bcd))       # nothing else in common
        assert [s["id"] for s in imported["snapshots"]] == [sid]
        assert digest(Path(b.mount) / ".shadow" / f"{sid}.img") == digest(want)
        # hostA follows: the LUN is hostB's only now, and the image says so
        _wait_for(lambda: not (Path(a.mount) / ".shadow" / f"{sid}.img").exists(),
                  "the snapshot gone from hostA's mount")
        assert on_a.snapshot_list() == []
        rec = json.loads(two.ceph.run("rbd", "image-meta", "get", "rbd/db",
                                      f"spx.snap.{sid}"))
        assert (rec["hosts"], rec["imported"], rec["exported"]) == (["hostB"], "hostB", True)
        # hostB exposes and reads it; the exposure is on the image too
        on_b.expose(sid, name="nightly")
        assert digest(Path(b.mount) / "exposed" / "nightly.img") == digest(want)
        rec = json.loads(two.ceph.run("rbd", "image-meta", "get", "rbd/db",
                                      f"spx.snap.{sid}"))
        assert rec["exposed"] == "nightly"
        # a second import (hostA's requester this time) is refused: hostB has it
        res = a.run("import", str(bcd))
        assert res.returncode != 0 and "Traceback" not in res.stderr, res
        on_b.unexpose(sid)
        on_b.snapshot_delete(set_id=set_id)
        assert f"spx.{sid}" not in two.ceph.run("rbd", "snap", "ls", "rbd/db")
        assert on_b.snapshot_list() == []
        assert on_a.end_backup(set_id)


def test_lun_masking_and_flags_travel_on_the_image(two: Two) -> None:
    a, b = two.a, two.b
    with a.client() as on_a, b.client() as on_b:
        on_a.volume_create("shared", 8 * MiB)
        data = os.urandom(MiB)
        _write(Path(a.image("shared")), 0, data)
        # presented to hostA only: hostB neither sees nor serves it
        assert on_b.volume_list() == []
        with pytest.raises(ControlError, match="shared"):
            on_b.snapshot_create(["shared"])
        rec = json.loads(two.ceph.run("rbd", "image-meta", "get", "rbd/shared",
                                      "spx.volume"))
        assert rec["hosts"] == ["hostA"]
        a.ok("volume", "present", "shared", "--to", "hostA", "--to", "hostB")
        took = _wait_for(lambda: "shared.img" in _listed(b, "volumes"), "shared on hostB")
        print(f"hostB's mount showed the volume {took * 1000:.0f} ms after hostA's CLI "
              "returned")
        assert [v["presented_to"] for v in on_b.volume_list()] == [["hostA", "hostB"]]
        with open(b.image("shared"), "rb") as f:
            assert f.read(MiB) == data
        # a snapshot is presented to the host whose set made it
        sid_a = on_a.snapshot_create(["shared"])["snapshots"][0]["snapshot_id"]
        on_a.expose(sid_a, name="nightly")
        sid_b = on_b.snapshot_create(["shared"])["snapshots"][0]["snapshot_id"]
        assert [s["snapshot_id"] for s in on_b.snapshot_list()] == [sid_b]
        # hostA's exposure name is taken for hostB too, once hostB has followed
        deadline = time.monotonic() + FOLLOW
        while True:
            try:
                on_b.expose(sid_b, name="nightly")
            except ControlError as e:
                assert "nightly" in e.message and "taken" in e.message, e
                break
            on_b.unexpose(sid_b)                # hostB had not followed yet
            assert time.monotonic() < deadline, "hostB never saw hostA's exposure"
            time.sleep(0.05)
        # hostA takes the volume back: hostB's mount and requests lose it
        on_a.volume_present("shared", ["hostA"])
        _wait_for(lambda: "shared.img" not in _listed(b, "volumes"),
                  "shared gone from hostB")
        with pytest.raises(ControlError, match="shared"):
            on_b.snapshot_create(["shared"])
        on_b.snapshot_delete(snapshot_id=sid_b)
        on_a.unexpose(sid_a)
        on_a.snapshot_delete(snapshot_id=sid_a)


def test_one_set_in_creation_across_hosts_and_a_dead_host_s_lease(two: Two) -> None:
    a, b = two.a, two.b
    with a.client() as on_a, b.client() as on_b:
        on_a.volume_create("va", 4 * MiB)
        on_b.volume_create("vb", 4 * MiB)
        set_id = on_a.set_start("backup")            # hostA holds the lock
        # the requester's one line names the holder
        res = b.run("snapshot", "create", "vb")
        assert res.returncode != 0 and "Traceback" not in res.stderr, res
        assert "VSS_E_SNAPSHOT_SET_IN_PROGRESS" in res.stderr or \
            "being created" in res.stderr, res.stderr
        assert set_id in res.stderr and "hostA" in res.stderr, res.stderr
        time.sleep(LEASE + 1)                        # a whole lease: hostA renews it
        with pytest.raises(ControlError) as e:
            on_b.snapshot_create(["vb"])
        assert e.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS" and set_id in e.value.message
        a.proc.kill()                                # hostA dies mid-set
        a.proc.wait(10)
        killed = time.monotonic()
        with pytest.raises(ControlError) as e:       # its lease outlives it
            on_b.snapshot_create(["vb"])
        assert e.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
        _wait_for(lambda: _creates(on_b, "vb"), "the dead host's lease to run out",
                  timeout=LEASE + 15)
        print(f"hostB could create a set {time.monotonic() - killed:.1f} s after hostA "
              f"was killed (lease {LEASE} s)")
        assert len(on_b.snapshot_list()) == 1


def _creates(c: Client, volume: str) -> bool:
    try:
        c.snapshot_create([volume])
    except ControlError as e:
        assert e.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS", e
        return False
    return True


def test_a_bad_host_name_is_one_line_and_exit_78(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for extra, fragment in ((["--array", "rbd:rbd", "--ceph-conf", "/nonexistent/ceph.conf",
                              "--ceph-host", "bad host!"], "--ceph-host"),
                            (["--pool", str(tmp_path / "pool"), "--ceph-host", "hostA"],
                             "rbd:POOL")):
        res = spx("serve", *extra, "--mount", str(mnt), "--socket",
                  str(tmp_path / "s.sock"))
        one_line_error(res, 78, fragment)
    assert sorted(os.listdir(tmp_path)) == ["mnt"]          # nothing made


# --------------------------------------------------------------------------- in process
@pytest.fixture
def arrays(ceph: Any, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Two hosts' arrays on the session's loopback cluster; the pool wiped around."""
    from ceph_cluster import wipe

    from rbdarray import RbdArray
    wipe(ceph.conf)
    made = []
    try:
        for host in ("a", "b"):
            # no poll worth the name: what follows here follows by notify
            made.append(RbdArray(ceph.pool, ceph.conf, str(tmp_path / host), host=host,
                                 poll=3600))
        yield made[0], made[1]
    finally:
        for arr in made:
            arr.close()
        wipe(ceph.conf)


def test_an_array_follows_another_host_by_notify(arrays: tuple[Any, Any]) -> None:
    a, b = arrays
    gen = b.generation
    a.create_volume("v", 4 * MiB)
    a.write("v", 0, b"x" * 4096)
    a.present_volume("v", ["a", "b"])
    _wait_for(lambda: [v.name for v in b.list_volumes()] == ["v"], "v on host b")
    assert b.generation > gen
    assert b.read("v", 0, 4096) == b"x" * 4096
    a.present_volume("v", ["a"])
    _wait_for(lambda: b.list_volumes() == [], "v gone from host b")
    with pytest.raises(bse.NotFound):
        b.read("v", 0, 4096)
    with pytest.raises(bse.NotFound):
        b.present_volume("v", ["b"])


def test_the_set_lock_refuses_and_a_lapsed_lease_cannot_commit(arrays: tuple[Any, Any]
                                                               ) -> None:
    a, b = arrays
    a.create_volume("v", 4 * MiB)
    a._setlock.lease = b._setlock.lease = 2     # short leases for this test
    a.claim_set("11111111-1111-1111-1111-111111111111", 0, 0)
    with pytest.raises(bse.Busy, match="11111111-1111-1111-1111-111111111111 of host a"):
        b.claim_set("22222222-2222-2222-2222-222222222222", 0, 0)
    time.sleep(3)                               # past a lease: a renews it
    with pytest.raises(bse.Busy):
        b.claim_set("22222222-2222-2222-2222-222222222222", 0, 0)
    a.release_set("11111111-1111-1111-1111-111111111111", True)
    b.claim_set("22222222-2222-2222-2222-222222222222", 0, 0)
    b.release_set("22222222-2222-2222-2222-222222222222", False)
    # a host that stops renewing (hung, cut off) loses the lock after its lease, and
    # then cannot commit: the other host may be creating a set by then
    set_a = "33333333-3333-3333-3333-333333333333"
    a.claim_set(set_a, 0, 0)
    s = a.prepare_snapshot("v", set_id=set_a)
    assert a._setlock._stop is not None
    a._setlock._stop.set()                      # its renewer stops: a "hung" host
    _wait_for(lambda: _claims(b, "44444444-4444-4444-4444-444444444444"),
              "the lapsed lease", timeout=10)
    with pytest.raises(bse.Busy, match="lease"):
        a.commit_snapshots([s.id])
    assert [x.state for x in a.list_snapshots()] == ["preparing"]
    assert list(a._vols["v"].lun.image.list_snaps()) == []     # nothing on the image
    b.release_set("44444444-4444-4444-4444-444444444444", False)
    a.abort_snapshot(s.id)
    a.release_set(set_a, False)


def _claims(arr: Any, set_id: str) -> bool:
    try:
        arr.claim_set(set_id, 0, 0)
    except bse.Busy:
        return False
    return True
