"""`shadowplex serve --array rbd:POOL --ceph-conf FILE` (issue 18): the daemon over a
real one-node Ceph cluster (conftest's ``ceph`` fixture): the FUSE mount, the CLI, a
snapshot set, its content, snapshot diff, deletion -- the same commands as on a pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, launch
from support import one_line_error, spx, write_synced

pytestmark = pytest.mark.kernel
MiB = 1 << 20


@pytest.fixture
def rbd_daemon(ceph: object, tmp_path: Path, sockdir: str) -> Iterator[Daemon]:
    from ceph_cluster import wipe
    conf = ceph.conf   # type: ignore[attr-defined]
    wipe(conf)
    mnt, state, sock = tmp_path / "mnt", tmp_path / "state", os.path.join(sockdir, "c.sock")
    mnt.mkdir()
    d = launch(["serve", "--array", f"rbd:{ceph.pool}", "--ceph-conf", conf,  # type: ignore[attr-defined]
                "--mount", str(mnt), "--state-dir", str(state), "--socket", sock,
                "--hooks-dir", ""],
               module="tools.cli", pool=str(state), mount=str(mnt), socket=sock,
               log=str(tmp_path / "daemon.log"))
    try:
        yield d
    finally:
        d.stop()
        wipe(conf)


def test_serve_on_rbd_runs_the_cli_s_sequence(rbd_daemon: Daemon) -> None:
    d = rbd_daemon
    d.ok("volume", "create", "db", "16M")
    img = Path(d.mount) / "volumes" / "db.img"
    before = os.urandom(MiB)
    write_synced(img, before)
    sid = d.json("snapshot", "create", "db")["snapshots"][0]["id"]
    write_synced(img, b"after" * 1000, 4 * MiB)
    with open(Path(d.mount) / ".shadow" / f"{sid}.img", "rb") as f:
        assert f.read(MiB) == before
        f.seek(4 * MiB)
        assert f.read(5000) == bytes(5000)
    diff = d.json("snapshot", "diff", sid)
    assert diff == [{"offset": 4 * MiB, "length": 64 * 1024}], diff
    d.ok("snapshot", "delete", sid)
    assert d.json("snapshot", "list") == []
    st = d.json("status")
    assert st["pool_id"] and st["chunk_size"] == 64 * 1024


def test_a_second_daemon_on_the_same_state_directory_is_refused(
        rbd_daemon: Daemon, ceph: object, tmp_path: Path, sockdir: str) -> None:
    """The provider's catalog in the state directory is one daemon's (exclusive locking
    mode): a second serve on it -- another mount, another socket -- is refused at once
    with one line naming the first one's pid, and the first goes on serving. (Before
    the directory's flock: it mounted, waited 5 s for the catalog and died of
    "database is locked" with a traceback.)"""
    d = rbd_daemon
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    res = spx("serve", "--array", f"rbd:{ceph.pool}",  # type: ignore[attr-defined]
              "--ceph-conf", ceph.conf, "--mount", str(mnt2),  # type: ignore[attr-defined]
              "--state-dir", d.pool, "--socket", os.path.join(sockdir, "second.sock"),
              "--hooks-dir", "", timeout=30)
    line = one_line_error(res, 1, f"state directory {d.pool} is in use by process "
                                  f"{d.proc.pid}")
    assert "stop that shadowplex serve first" in line
    assert not os.path.ismount(mnt2)
    d.ok("volume", "create", "db", "16M")     # the first one still serves
    assert [v["name"] for v in d.json("volume", "list")] == ["db"]

