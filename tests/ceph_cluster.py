"""A throw-away one-node Ceph cluster for the RBD backend's tests (issue 18): one monitor
and one OSD (memstore) bound to 127.0.0.1, msgr2 only, auth none, everything -- conf,
monitor and OSD data, pid files, sockets, logs -- under one directory; the pool ``rbd``
(8 PGs, size 1) created and initialised. Facts behind every setting: the shared note
ceph-one-node.md (measured here: up in 2-3 s, 52 up/down cycles without a failure).

    with ceph_cluster(tmpdir) as c:       # skips (or fails under CI) without Ceph
        c.conf, c.pool, c.fsid            # what RbdArray needs
    python tests/ceph_cluster.py DIR      # the same by hand, until Ctrl-C

In a network namespace (tests/test_rbd_hosts.py: a "storage" host that several test
hosts reach over veth pairs): ``CephCluster(base, addr=ADDR, netns=NS)`` binds to that
namespace's address (fixed ports: the namespace is new), runs the daemons and every
Ceph command through ``nsenter --net`` -- the administrative librados calls too, in a
child process (``python tests/ceph_cluster.py admin CONF STEP ...``): this process
cannot reach the namespace. ``c.run(...)``, ``c.wipe()`` work in both cases.

The daemons run in the foreground (-f) as our children, their pids recorded; stop()
signals them by pid (SIGTERM, then SIGKILL), waits for them, and is safe to call twice.
A daemon that exits is reaped by wait(); an unreaped one (state Z) counts as stopped.
They inherit the test session's environment marker, so conftest's leak guard sees them
if anything ever gets past stop().

Without a mgr: `ceph df`, `rados df` and pool stats report zeros, and `ceph osd df` /
`ceph pg stat` hang -- nothing here uses them (mon commands go through librados with a
timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MON_ID = "a"
OSD_ID = 0
POOL = "rbd"
PGS = 8
MEMSTORE_BYTES = 2 << 30    # the OSD's memory device; also the pool quota (RbdArray.statfs)
UP_TIMEOUT = 60.0
CMD_TIMEOUT = 30.0
BINARIES = ("ceph-mon", "ceph-osd", "monmaptool", "ceph-authtool")


def missing() -> list[str]:
    """Why a cluster cannot be brought up here (empty: it can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    for b in BINARIES:
        if shutil.which(b) is None:
            reasons.append(f"{b} not found (make ceph installs ceph-mon and ceph-osd)")
    for mod in ("rados", "rbd"):
        try:
            __import__(mod)
        except ImportError:
            reasons.append(f"python module {mod} missing (make ceph links python3-{mod}'s "
                           "module into the venv)")
    return reasons


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (a pytest killed
    with -9 runs no finalizer; its cluster must not outlive it)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def wipe(conf: str, pool: str = POOL) -> None:
    """Remove every image of the pool (their snapshots first): a clean pool between
    tests without the cost of a new one."""
    import rados
    import rbd
    with rados.Rados(conffile=conf) as cluster, cluster.open_ioctx(pool) as io:
        for _ in range(3):      # a clone goes before its parent: another pass
            left = rbd.RBD().list(io)
            for name in left:
                with contextlib.suppress(rbd.ImageNotFound, rbd.ImageBusy,
                                         rbd.ImageHasSnapshots):
                    with rbd.Image(io, name) as image:
                        for s in list(image.list_snaps()):
                            image.remove_snap_by_id(s["id"])
                    rbd.RBD().remove(io, name)
            if not left:
                return


def _free_port() -> int:
    """A port free on 127.0.0.1 with the next 32 free too (the daemons' bind range)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 33 > 65535:
            continue
        ok = True
        for p in range(port + 1, port + 33):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port range on 127.0.0.1 for a Ceph cluster")


def admin_step(conf: str, step: str, *args: str) -> Any:
    """The cluster set-up's librados calls (in a child process when the cluster is in a
    network namespace): "osd-new UUID" -> the OSD id; "osd-auth ID KEYRING" -> None (the
    OSD's key registered: cephx); "pool BYTES" -> None (pool rbd created, a quota of
    BYTES, initialised); "wipe" -> None."""
    import rados
    import rbd
    if step == "wipe":
        wipe(conf)
        return None
    cluster = rados.Rados(conffile=conf, name="client.admin")
    try:
        cluster.connect(timeout=int(UP_TIMEOUT))
        if step == "osd-new":
            osd_id = json.loads(_mon(cluster, {"prefix": "osd new", "uuid": args[0],
                                               "format": "json"}))["osdid"]
            _mon(cluster, {"prefix": "osd set-require-min-compat-client",
                           "version": "mimic", "yes_i_really_mean_it": True})
            return int(osd_id)
        if step == "osd-auth":
            keyring = Path(args[1]).read_bytes()
            rc, _, err = cluster.mon_command(json.dumps(
                {"prefix": "auth add", "entity": f"osd.{args[0]}",
                 "caps": ["mon", "allow profile osd", "osd", "allow *"]}),
                keyring, timeout=CMD_TIMEOUT)
            if rc != 0:
                raise RuntimeError(f"ceph auth add osd.{args[0]} failed ({rc}): {err}")
            return None
        if step == "pool":
            _mon(cluster, {"prefix": "osd pool create", "pool": POOL, "pg_num": PGS,
                           "pgp_num": PGS})
            _mon(cluster, {"prefix": "osd pool set-quota", "pool": POOL,
                           "field": "max_bytes", "val": args[0]})
            with cluster.open_ioctx(POOL) as ioctx:
                # rbd pool init: the application tag, and a first write (it waits for
                # the PGs to be active, so the cluster is usable when this returns)
                rbd.RBD().pool_init(ioctx, False)
            return None
    finally:
        cluster.shutdown()
    raise ValueError(f"unknown admin step {step!r}")


def _mon(cluster: Any, cmd: dict[str, Any]) -> str:
    rc, out, err = cluster.mon_command(json.dumps(cmd), b"", timeout=CMD_TIMEOUT)
    if rc != 0:
        raise RuntimeError(f"ceph {cmd['prefix']} failed ({rc}): {err}")
    return bytes(out).decode()


class CephCluster:
    """`auth`: "none" or "cephx" (every daemon and client then needs its key: the
    monitor's and client.admin's in BASE/keyring, the OSD's registered at start,
    add_client for others). `memstore_bytes`: the OSD's memory device, also the pool
    quota. `extra`: more [global] settings (name -> value), e.g. what a test of OSD
    restarts or crashes needs (tests/test_rbd_failures.py). `addr`, `netns`: the
    cluster in a network namespace (the module docstring)."""

    def __init__(self, base: Path, auth: str = "none", memstore_bytes: int = MEMSTORE_BYTES,
                 extra: dict[str, str] | None = None, addr: str = "127.0.0.1",
                 netns: str | None = None) -> None:
        if auth not in ("none", "cephx"):
            raise ValueError(f"auth {auth!r}: none or cephx")
        self.base = Path(base)
        self.conf = str(self.base / "ceph.conf")
        self.pool = POOL
        self.fsid = str(uuid.uuid4())
        self.addr = addr
        self.netns = netns
        self.port = 0
        self.auth = auth
        self.memstore_bytes = memstore_bytes
        self.extra = dict(extra or {})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, tuple[str, ...]] = {}
        self.osd_id = OSD_ID
        self.up_seconds = 0.0

    # ------------------------------------------------------------------ helpers
    def _write_conf(self) -> None:
        b = self.base
        for d in ("run", "log", "crash", "mon", "osd"):
            (b / d).mkdir(parents=True, exist_ok=True)
        # a new namespace has every port free; loopback is shared with others
        self.port = 3300 if self.netns else _free_port()
        extra = "".join(f"{k} = {v}\n" for k, v in self.extra.items())
        conf = f"""[global]
fsid = {self.fsid}
mon host = v2:{self.addr}:{self.port}
mon initial members = {MON_ID}
public addr = {self.addr}
ms bind msgr1 = false
ms bind msgr2 = true
ms bind port min = {self.port + 1}
ms bind port max = {self.port + 32}
auth cluster required = {self.auth}
auth service required = {self.auth}
auth client required = {self.auth}
auth allow insecure global id reclaim = false
keyring = {b}/keyring
run dir = {b}/run
admin socket = {b}/run/$cluster-$name.asok
pid file = {b}/run/$cluster-$name.pid
log file = {b}/log/$cluster-$name.log
crash dir = {b}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
paxos propose interval = 0.1
mon mgr mkfs grace = 31536000
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd crush chooseleaf type = 0
rbd default features = layering,exclusive-lock,object-map,fast-diff,deep-flatten
{extra}

[mon]
mon data = {b}/mon/$cluster-$id

[osd]
osd data = {b}/osd/$cluster-$id
keyring = {b}/osd/keyring

[client]
admin socket = {b}/run/$cluster-$name.$pid.$cctid.asok
log file = {b}/log/$cluster-$name.$pid.log
"""
        Path(self.conf).write_text(conf)

    def ns_argv(self, *argv: str) -> list[str]:
        """A command line run where the cluster is reachable (its namespace)."""
        if self.netns is None:
            return list(argv)
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def run(self, *argv: str) -> str:
        """A Ceph tool (rbd, rados, ceph) against this cluster, e.g. run("rbd", "ls")."""
        return self._run(argv[0], "-c", self.conf, *argv[1:])

    def mon_command(self, cluster: Any, cmd: dict[str, Any]) -> str:
        """A monitor command through a connected librados handle (its output text)."""
        return _mon(cluster, cmd)

    def _admin(self, step: str, *args: str) -> Any:
        if self.netns is None:
            return admin_step(self.conf, step, *args)
        out = self._run(sys.executable, str(Path(__file__).resolve()), "admin", self.conf,
                        step, *args)
        return json.loads(out.strip().splitlines()[-1])

    def wipe(self) -> None:
        """wipe() of the pool, from where the cluster is reachable."""
        self._admin("wipe")

    def _run(self, *argv: str) -> str:
        res = subprocess.run(self.ns_argv(*argv), capture_output=True, text=True,
                             timeout=CMD_TIMEOUT, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res.stdout

    def _start(self, name: str, *argv: str) -> None:
        self.argv[name] = argv
        log = open(self.base / "log" / f"{name}.out", "ab")   # noqa: SIM115 (kept open)
        try:
            self.procs[name] = subprocess.Popen(self.ns_argv(*argv, "-f", "-c", self.conf),
                                                stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                out = (self.base / "log" / f"{name}.out").read_text(errors="replace")
                raise RuntimeError(f"ceph {name} exited ({p.returncode}): {out[-2000:]}")

    # ------------------------------------------------------------------ up / down
    def start(self) -> None:
        t0 = time.monotonic()
        b = self.base
        self._write_conf()
        self._run("ceph-authtool", "--create-keyring", f"{b}/keyring", "--gen-key",
                  "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", f"{b}/keyring", "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", MON_ID,
                  f"[v2:{self.addr}:{self.port}]", f"{b}/monmap")
        self._run("ceph-mon", "-c", self.conf, "--mkfs", "-i", MON_ID,
                  "--monmap", f"{b}/monmap", "--keyring", f"{b}/keyring")
        self._start("mon", "ceph-mon", "-i", MON_ID)
        osd_uuid = str(uuid.uuid4())
        osd_id = self._admin("osd-new", osd_uuid)
        (b / "osd" / f"ceph-{osd_id}").mkdir(exist_ok=True)
        self._run("ceph-authtool", "--create-keyring", f"{b}/osd/keyring", "--gen-key",
                  "-n", f"osd.{osd_id}")
        if self.auth == "cephx":   # the OSD's key, known to the monitor
            self._admin("osd-auth", str(osd_id), f"{b}/osd/keyring")
        self._run("ceph-osd", "-c", self.conf, "-i", str(osd_id), "--mkfs",
                  "--osd-uuid", osd_uuid)
        self.osd_id = int(osd_id)
        self._start("osd", "ceph-osd", "-i", str(osd_id))
        self._admin("pool", str(self.memstore_bytes))
        self._check_alive()
        self.up_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemons by pid, the last started first (an OSD stopped after its
        monitor waits ~5 s to report itself down; before it: 0.1 s): SIGTERM, SIGKILL
        after `timeout`, and wait for each."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(10)
        self.procs.clear()

    # ------------------------------------------------------------------ for tests
    def admin(self) -> Any:
        """A librados handle as client.admin (not connected yet; `with` connects)."""
        import rados
        return rados.Rados(conffile=self.conf, name="client.admin")

    def add_client(self, name: str, mon_caps: str = "profile rbd",
                   osd_caps: str | None = None) -> str:
        """client.NAME with these caps (default: what docs/ceph.md asks of the cluster
        for shadowplex: profile rbd on the pool), its keyring in BASE/client.NAME.keyring
        named in the conf's [client.NAME] section; returns the keyring's path."""
        caps = ["mon", mon_caps, "osd", osd_caps or f"profile rbd pool={self.pool}"]
        with self.admin() as cluster:      # (entering connects)
            keyring = self.mon_command(cluster, {"prefix": "auth get-or-create",
                                                 "entity": f"client.{name}", "caps": caps})
        path = self.base / f"client.{name}.keyring"
        path.write_text(keyring)
        with open(self.conf, "a") as f:
            f.write(f"\n[client.{name}]\nkeyring = {path}\n")
        return str(path)

    def restart_osd(self, down: float = 0.0) -> None:
        """Stop the OSD (SIGTERM: a memstore OSD keeps its data only through a clean
        stop with `osd fast shutdown = false`), wait `down` seconds, start it again with
        the same command line and wait until the monitor has it up."""
        p = self.procs["osd"]
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        time.sleep(down)
        self._start("osd", *self.argv["osd"])
        self.wait_osd_up()

    def wait_osd_up(self, timeout: float = UP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self.admin() as cluster:      # (entering connects)
            while True:
                dump = json.loads(self.mon_command(cluster, {"prefix": "osd dump",
                                                             "format": "json"}))
                if all(o.get("up") for o in dump.get("osds", [])):
                    return
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the OSD is not up after {timeout:.0f} s")
                time.sleep(0.1)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]


@contextlib.contextmanager
def ceph_cluster(base: Path, **kw: Any) -> Iterator[CephCluster]:
    """A started CephCluster (keywords: CephCluster's), stopped on the way out."""
    c = CephCluster(base, **kw)
    try:
        c.start()
        yield c
    finally:
        c.stop()


if __name__ == "__main__":
    if sys.argv[1] == "admin":   # CephCluster._admin in a network namespace
        print(json.dumps(admin_step(*sys.argv[2:])), flush=True)
        sys.exit(0)
    with ceph_cluster(Path(sys.argv[1])) as c:
        print(f"up in {c.up_seconds:.1f} s: conf {c.conf}, pool {c.pool}, pids {c.pids()}",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
