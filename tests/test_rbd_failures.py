"""`serve --array rbd:POOL` when things go wrong, on a cluster with cephx (issue 18 item
4): its own one-node cluster (tests/ceph_cluster.py) with auth cephx, our daemon as a
non-admin client (`--ceph-id spx`, caps `profile rbd`, as docs/ceph.md asks of a real
cluster), and

* a wrong client id: one line, non-zero exit, nothing made on the cluster;
* kill -9 of our daemon while a writer writes: after the restart every write the
  writer was told was flushed (fsync returned) reads back from the cluster;
* kill -9 inside a snapshot set's commit (caught when a member's record says "not done
  yet": between the records and the last of them marked done, the RBD snapshots are
  taken): after the restart the set is whole or gone, every set whose creation was
  acknowledged is there, no RBD snapshot of a removed set is left, `check` is clean;
* an OSD restart under load: the writer through our mount waits while the OSD is down
  and goes on after (or fails cleanly), and every flushed write is on the cluster.
* kill -9 inside a revert: the restarted daemon finishes it before serving the volume,
  which then reads as the snapshot.

The cluster's settings for these (beyond tests/ceph_cluster.py's): `osd fast shutdown =
false` (a memstore OSD saves its data only on a clean stop: a restart must keep it) and
`osd client watch timeout = 5` with `objecter tick interval = 1` (the images' exclusive
lock of a killed daemon is broken once its watch expires: 5 s here instead of 30; the
live clients ping every second), and `rbd cache policy = writeback` with `rbd cache
writethrough until flush = false`: an acknowledged write lives in our daemon's librbd
cache until a flush, so a lost flush shows (with Ceph's defaults, writearound and
writethrough until the first flush, both kill tests passed with DataPath.flush a
no-op; with these they fail, as they must)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, launch
from support import run_cmd, write_synced

pytestmark = pytest.mark.kernel
MiB = 1 << 20
BLOCK = 4096
CLIENT = "spx"
EXTRA = {"osd fast shutdown": "false", "osd client watch timeout": "5",
         "objecter tick interval": "1", "rbd cache policy": "writeback",
         "rbd cache writethrough until flush": "false"}

# Each 4 KiB block written once (a block the log names can hold only that content),
# fsync every EVERY writes, then the log lines of those writes (the log fsync'ed): the
# log holds exactly the acknowledged writes. Stops at STOP's appearance or the end.
WRITER = r"""
import hashlib, os, sys
path, log_path, stop, nblocks, every = sys.argv[1:4] + [int(x) for x in sys.argv[4:6]]
fd = os.open(path, os.O_WRONLY)
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
pending = []
for i in range(nblocks):
    if os.path.exists(stop):
        break
    data = os.urandom(4096)
    os.pwrite(fd, data, i * 4096)
    pending.append(f"{i} {hashlib.sha256(data).hexdigest()}\n")
    if len(pending) >= every:
        os.fsync(fd)
        os.write(log, "".join(pending).encode())
        os.fsync(log)
        pending = []
"""


def _require_kernel() -> bool:
    return os.environ.get("SHADOWPLEX_REQUIRE_KERNEL", "").lower() in ("1", "true", "yes",
                                                                       "on")


@pytest.fixture(scope="module")
def cephx() -> Iterator[Any]:
    from ceph_cluster import ceph_cluster, missing
    reasons = missing()
    if reasons:
        msg = "Ceph tests need root and Ceph (make ceph): " + "; ".join(reasons)
        if _require_kernel():
            pytest.fail(f"{msg} (SHADOWPLEX_REQUIRE_KERNEL=1)", pytrace=False)
        pytest.skip(msg)
    base = Path(tempfile.mkdtemp(prefix="spx-cephx-"))   # short: admin sockets under it
    try:
        with ceph_cluster(base, auth="cephx", extra=EXTRA) as cluster:
            cluster.add_client(CLIENT)
            yield cluster
    finally:
        run_cmd("rm", "-rf", str(base), check=False)


def _serve_args(c: Any, mnt: Path, state: Path, sock: str, ceph_id: str = CLIENT
                ) -> list[str]:
    return ["serve", "--array", f"rbd:{c.pool}", "--ceph-conf", c.conf, "--ceph-id", ceph_id,
            "--mount", str(mnt), "--state-dir", str(state), "--socket", sock,
            "--hooks-dir", ""]


class Served:
    """Our daemon on the cephx cluster as client.spx; kill9() and restart() keep the
    same mount, state directory, socket and log."""

    def __init__(self, c: Any, tmp: Path, sockdir: str) -> None:
        self.c = c
        self.mnt, self.state = tmp / "mnt", tmp / "state"
        self.sock = os.path.join(sockdir, "c.sock")
        self.log = str(tmp / "daemon.log")
        self.mnt.mkdir(exist_ok=True)
        self.d = self._launch()

    def _launch(self) -> Daemon:
        return launch(_serve_args(self.c, self.mnt, self.state, self.sock),
                      module="tools.cli", pool=str(self.state), mount=str(self.mnt),
                      socket=self.sock, log=self.log)

    def image(self, vol: str) -> str:
        return self.d.image(vol)

    def kill9(self) -> None:
        self.d.proc.kill()
        self.d.proc.wait(30)
        run_cmd("fusermount3", "-u", "-z", str(self.mnt), check=False)

    def restart(self) -> None:
        self.d = self._launch()

    def stop(self) -> None:
        self.d.stop()


@pytest.fixture
def served(cephx: Any, tmp_path: Path, sockdir: str) -> Iterator[Served]:
    from ceph_cluster import wipe
    wipe(cephx.conf)
    s = Served(cephx, tmp_path, sockdir)
    try:
        yield s
    finally:
        s.stop()
        wipe(cephx.conf)


def _rbd_images(c: Any) -> list[str]:
    import rados
    import rbd
    with rados.Rados(conffile=c.conf) as cluster, cluster.open_ioctx(c.pool) as io:
        return sorted(rbd.RBD().list(io))


def _read_image(c: Any, name: str, size: int) -> bytes:
    """The image's bytes straight from the cluster (as client.admin; reads take no
    lock): what the OSD has, whatever our daemon cached."""
    import rados
    import rbd
    with rados.Rados(conffile=c.conf) as cluster, cluster.open_ioctx(c.pool) as io, \
            rbd.Image(io, name, read_only=True) as image:
        return bytes(image.read(0, size))


def _acknowledged(log: Path) -> dict[int, str]:
    if not log.exists():
        return {}
    out = {}
    for line in log.read_text().splitlines():
        i, digest = line.split()
        out[int(i)] = digest
    return out


def _start_writer(path: str, tmp: Path, nblocks: int, every: int = 8
                  ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The writer; its stderr goes to TMP/writer.err."""
    log, stop = tmp / "writer.log", tmp / "writer.stop"
    with open(tmp / "writer.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(log), str(stop),
                                 str(nblocks), str(every)], stderr=err)
    return proc, log, stop


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _check_blocks(data: bytes, acked: dict[int, str]) -> list[int]:
    """The acknowledged blocks whose content is not what was written."""
    return [i for i, digest in sorted(acked.items())
            if hashlib.sha256(data[i * BLOCK:(i + 1) * BLOCK]).hexdigest() != digest]


# --------------------------------------------------------------------------- cephx
def test_a_non_admin_cephx_client_runs_the_sequence(served: Served) -> None:
    d = served.d
    d.ok("volume", "create", "db", "16M")
    img = Path(d.image("db"))
    before = os.urandom(MiB)
    write_synced(img, before)
    sid = d.json("snapshot", "create", "db")["snapshots"][0]["id"]
    write_synced(img, os.urandom(4096), 4 * MiB)
    with open(Path(served.mnt) / ".shadow" / f"{sid}.img", "rb") as f:
        assert f.read(MiB) == before
    assert d.json("snapshot", "diff", sid) == [{"offset": 4 * MiB, "length": 64 * 1024}]
    assert d.json("status")["pool_id"]          # statfs's mon commands under profile rbd
    d.ok("split", sid, "db2")                   # clone v2 + flatten under profile rbd
    with open(Path(d.image("db2")), "rb") as f:
        assert f.read(MiB) == before
    assert _rbd_images(served.c) == ["db", "db2"]


def test_a_wrong_client_id_is_one_line_and_changes_nothing(cephx: Any, tmp_path: Path,
                                                           sockdir: str) -> None:
    from ceph_cluster import wipe
    wipe(cephx.conf)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    res = subprocess.run([sys.executable, "-m", "tools.cli",
                          *_serve_args(cephx, mnt, tmp_path / "state",
                                       os.path.join(sockdir, "x.sock"), ceph_id="nobody")],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "ceph" in lines[0].lower(), lines
    assert _rbd_images(cephx) == [] and not os.path.ismount(mnt)
    assert not os.path.exists(os.path.join(sockdir, "x.sock"))


# --------------------------------------------------------------------------- crashes
def test_kill9_during_writes_keeps_every_flushed_write(served: Served,
                                                       tmp_path: Path) -> None:
    size = 32 * MiB
    served.d.ok("volume", "create", "v", str(size))
    proc, log, _stop = _start_writer(served.image("v"), tmp_path, size // BLOCK)
    try:
        _wait_for(lambda: len(_acknowledged(log)) >= 200, 60, "200 flushed writes")
        served.kill9()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    acked = _acknowledged(log)
    served.restart()          # finds the dead mount, breaks the dead daemon's lock
    data = _read_image(served.c, "v", size)
    assert _check_blocks(data, acked) == [], "flushed writes lost"
    with open(served.image("v"), "rb") as f:      # and through the new daemon
        assert _check_blocks(f.read(size), acked) == []
    assert served.d.json("check")["problems"] == []


def test_kill9_inside_a_set_commit_leaves_it_whole_or_gone(served: Served) -> None:
    import rados
    import rbd
    vols = ["a", "b", "c"]
    for v in vols:
        served.d.ok("volume", "create", v, "8M")
    acked: list[str] = []
    failed: list[BaseException] = []

    def requester() -> None:
        try:
            with served.d.client(timeout=60) as cl:
                while True:
                    acked.append(cl.snapshot_create(vols, context="app-rollback")["set_id"])
        except BaseException as e:   # noqa: BLE001 - the kill ends it
            failed.append(e)

    def spx_snaps(io: Any) -> list[int]:
        counts = []
        for v in vols:
            with rbd.Image(io, v, read_only=True) as image:
                counts.append(sum(1 for s in image.list_snaps()
                                  if str(s["name"]).startswith("spx.")))
        return counts

    def committing(images: list[Any]) -> bool:
        """A set's records are written (done: false) and not all marked done yet: the
        commit is between its first record and its last (the RBD snapshots are taken
        in that window; records.py)."""
        return any('"done": false' in value for image in images
                   for key, value in image.metadata_list() if key.startswith("spx.snap."))

    t = threading.Thread(target=requester, daemon=True)
    caught = False
    with rados.Rados(conffile=served.c.conf) as cluster, \
            cluster.open_ioctx(served.c.pool) as io:
        images = [rbd.Image(io, v, read_only=True) for v in vols]
        try:
            t.start()
            deadline = time.monotonic() + 60
            while not caught and time.monotonic() < deadline:
                caught = committing(images)
            served.kill9()
        finally:
            for image in images:
                image.close()
    t.join(60)
    assert caught, "never caught a set in its commit"
    assert failed, "the requester did not notice the kill"
    served.restart()
    snaps = served.d.json("snapshot", "list")
    sets: dict[str, set[str]] = {}
    for s in snaps:
        sets.setdefault(s["set_id"], set()).add(s["volume"])
    assert all(members == set(vols) for members in sets.values()), sets   # whole
    assert set(acked) <= set(sets), "an acknowledged set is gone"
    assert len(sets) - len(acked) in (0, 1)     # the interrupted one: whole or gone
    assert served.d.json("check")["problems"] == []
    with rados.Rados(conffile=served.c.conf) as cluster, \
            cluster.open_ioctx(served.c.pool) as io:
        assert set(spx_snaps(io)) == {len(sets)}, "an RBD snapshot of a removed set is left"


def test_an_osd_restart_under_load_loses_no_flushed_write(served: Served,
                                                          tmp_path: Path) -> None:
    size = 32 * MiB
    served.d.ok("volume", "create", "v", str(size))
    proc, log, stop = _start_writer(served.image("v"), tmp_path, size // BLOCK)
    try:
        _wait_for(lambda: len(_acknowledged(log)) >= 100, 60, "100 flushed writes")
        served.c.restart_osd(down=1.0)
        at_restart = len(_acknowledged(log))
        _wait_for(lambda: len(_acknowledged(log)) >= at_restart + 100 or
                  proc.poll() is not None, 60, "writes after the OSD restart")
        stop.touch()
        rc = proc.wait(60)
        err = (tmp_path / "writer.err").read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the writer went on through the restart (librados waits for the OSD), or failed
    # cleanly: an errno, no hang
    assert rc == 0 or "OSError" in err, err
    acked = _acknowledged(log)
    if rc == 0:
        assert len(acked) >= at_restart + 100, "no writes after the OSD came back"
    served.kill9()            # no clean flush at the end: only what fsync flushed counts
    assert _check_blocks(_read_image(served.c, "v", size), acked) == []
    served.restart()
    with open(served.image("v"), "r+b") as f:   # and writes go on after it
        f.write(b"x" * BLOCK)
        f.flush()
        os.fsync(f.fileno())


def test_kill9_inside_a_revert_is_finished_by_the_restart(served: Served) -> None:
    """The daemon is stopped (SIGSTOP) as soon as the volume's revert record appears --
    the content is then not the snapshot's yet -- and killed with -9: the restarted
    daemon finishes the revert before it serves the volume (rbdarray/revert.py), which
    then reads as the snapshot byte for byte; without the finishing it would stay
    half-reverted."""
    import rados
    import rbd

    from rbdarray.records import REVERT_KEY
    from rbdarray.setlock import OBJECT
    size, changed = 64 * MiB, 32 * MiB
    # the set lock an earlier test's killed daemon may hold (its lease would end in 30 s)
    with rados.Rados(conffile=served.c.conf) as cluster, \
            cluster.open_ioctx(served.c.pool) as io, \
            contextlib.suppress(rados.ObjectNotFound):
        io.remove_object(OBJECT)
    d = served.d
    d.ok("volume", "create", "v", str(size))
    write_synced(Path(d.image("v")), os.urandom(changed))
    sid = d.json("snapshot", "create", "v")["snapshots"][0]["id"]
    want = hashlib.sha256(_read_image(served.c, "v", size)).hexdigest()
    write_synced(Path(d.image("v")), os.urandom(changed))
    with rados.Rados(conffile=served.c.conf) as cluster, \
            cluster.open_ioctx(served.c.pool) as io, \
            rbd.Image(io, "v", read_only=True) as image:
        req = subprocess.Popen([sys.executable, "-m", "tools.cli", "--socket", d.socket,
                                "revert", sid], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
        try:
            _wait_for(lambda: REVERT_KEY in dict(image.metadata_list()), 60,
                      "the revert record")
            os.kill(d.proc.pid, signal.SIGSTOP)
            half = hashlib.sha256(_read_image(served.c, "v", size)).hexdigest()
        finally:
            served.kill9()
            req.kill()
            req.wait(30)
    assert half != want, "the revert was over before the daemon was stopped"
    served.restart()
    assert hashlib.sha256(_read_image(served.c, "v", size)).hexdigest() == want
    with open(served.image("v"), "rb") as f:
        assert hashlib.sha256(f.read(size)).hexdigest() == want
    with rados.Rados(conffile=served.c.conf) as cluster, \
            cluster.open_ioctx(served.c.pool) as io, \
            rbd.Image(io, "v", read_only=True) as image:
        assert REVERT_KEY not in dict(image.metadata_list())
    assert "finishing its revert" in served.d.log_text()
