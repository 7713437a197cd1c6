"""The Ceph benchmark's systems (tools/bench/rbd.py): a throw-away one-node cluster
(tests/ceph_cluster.py's, the one the tests use), our `serve --array rbd:POOL` with its
FUSE mount, ceph's own `rbd-fuse` on an image of the same kind, and the images.

Everything is started through an ExitStack the caller owns: leaving it (normally, on a
failure, on Ctrl-C) unmounts rbd-fuse, stops our daemon, stops the cluster's daemons by
pid and removes its directory; tools/workdir.clean then catches whatever is left.

Why the cluster lives in /tmp and not in the work directory: its daemons' admin sockets
are Unix sockets under it (107 bytes at most), and --dir may be deep down.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Any

from .common import (
    REPO,
    BenchError,
    GiB,
    Log,
    MiB,
    _fill,
    _fuse_unmount,
    _mounted,
    _stop_proc,
    _wait,
    socket_dir,
)
from .targets import Daemon

TOOLS = ("fio", "rbd-fuse", "rbd", "ceph-mon", "ceph-osd", "fusermount3")
OURS, THEIRS = "v", "r"     # our volume; the plain RBD image rbd-fuse serves
CLUSTER_EXTRA_BYTES = 512 * MiB   # memstore beyond the bench's images (metadata, slack)


def missing_tools() -> list[str]:
    out = [t for t in TOOLS if shutil.which(t) is None]
    for mod in ("rados", "rbd"):
        if importlib.util.find_spec(mod) is None:
            out.append(f"python module {mod} (make ceph links it into the venv)")
    return out


def cluster_module() -> ModuleType:
    """tests/ceph_cluster.py, the cluster the tests start (one code for both)."""
    name = "ceph_cluster"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(REPO, "tests", "ceph_cluster.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.exists(path):
        raise BenchError(f"{path} is missing: bench rbd runs from a source checkout")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class RbdFuse:
    """`rbd-fuse -p POOL -r IMAGE MNT -f`: ceph's FUSE client (libfuse 2, multi-threaded,
    one librbd Image per file), showing IMAGE as MNT/IMAGE."""

    def __init__(self, base: str, conf: str, pool: str, image: str) -> None:
        self.conf, self.pool, self.image = conf, pool, image
        self.mnt = os.path.join(base, "mnt-rbd-fuse")
        self.path = os.path.join(self.mnt, image)
        self.log_path = os.path.join(base, "rbd-fuse.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["rbd-fuse", self.mnt, "-c", self.conf, "-p", self.pool, "-r", self.image,
                 "-f"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        _wait(lambda: _mounted(self.mnt) and os.path.exists(self.path), 60,
              "waiting for rbd-fuse", self.proc, self.log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if _mounted(self.mnt):
            _fuse_unmount(self.mnt)     # rbd-fuse exits when its mount goes
        if self.proc is not None:
            _stop_proc(self.proc)


class Setup:
    """The cluster, both FUSE paths and their images (`size` bytes each, filled with
    random data through their own mounts); what the control-plane rows use."""

    def __init__(self, base: str, size: int, stack: contextlib.ExitStack, log: Log,
                 cluster_bytes: int) -> None:
        self.base, self.size, self.stack, self.log = base, size, stack, log
        self.cluster_bytes = max(2 * GiB, cluster_bytes + CLUSTER_EXTRA_BYTES)
        self.cluster: Any = None
        self.daemon: Daemon | None = None
        self.rbd_fuse: RbdFuse | None = None
        self.mnt = os.path.join(base, "mnt")
        self.sock = os.path.join(socket_dir(base, stack), "spx.sock")
        self.paths: dict[str, str] = {}      # target -> the file fio runs on
        self._rados: Any = None
        self._io: Any = None

    # ------------------------------------------------------------------ bring-up
    def prepare(self) -> None:
        cc = cluster_module()
        ceph_dir = tempfile.mkdtemp(prefix="spxb-ceph-", dir="/tmp")
        self.stack.callback(shutil.rmtree, ceph_dir, True)
        self.cluster = cc.CephCluster(ceph_dir, memstore_bytes=self.cluster_bytes)
        self.stack.callback(self.cluster.stop)
        self.log(f"starting a one-node Ceph cluster (memstore {self.cluster_bytes >> 20} MiB)")
        self.cluster.start()
        self.log(f"cluster up in {self.cluster.up_seconds:.1f} s")
        import rados
        import rbd

        from rbdarray.array import CHUNK, _feature_bits
        self._rados = rados.Rados(conffile=self.cluster.conf)
        self._rados.connect(timeout=30)
        self.stack.callback(self._rados.shutdown)
        self._io = self._rados.open_ioctx(self.cluster.pool)
        self.stack.callback(self._io.close)
        # the comparator's image: what RbdArray makes, without our metadata
        rbd.RBD().create(self._io, THEIRS, self.size, order=CHUNK.bit_length() - 1,
                         old_format=False, features=_feature_bits(rbd))
        os.makedirs(self.mnt, exist_ok=True)
        d = self.daemon = Daemon(self.base, None, self.mnt, self.sock, name="serve", extra=[
            "--array", f"rbd:{self.cluster.pool}", "--ceph-conf", self.cluster.conf,
            "--state-dir", os.path.join(self.base, "state"), "--hooks-dir", ""])
        self.stack.callback(d.stop)
        self.log("starting shadowplex serve --array rbd:" + self.cluster.pool)
        d.start()
        with self.client() as c:
            c.volume_create(OURS, self.size)
        f = self.rbd_fuse = RbdFuse(self.base, self.cluster.conf, self.cluster.pool, THEIRS)
        self.stack.callback(f.stop)
        self.log("starting rbd-fuse")
        f.start()
        self.paths = {"spx": self.volume_path(OURS), "rbd_fuse": f.path}
        for target, path in self.paths.items():
            self.log(f"writing {self.size >> 20} MiB of random data through {target}")
            _wait(lambda p=path: os.path.exists(p), 30, f"waiting for {path}")  # type: ignore[misc]
            _fill(path, self.size)

    def client(self) -> Any:
        from provider.client import Client
        return Client(self.sock, client="shadowplex-bench-rbd", timeout=3600)

    def volume_path(self, name: str) -> str:
        return os.path.join(self.mnt, "volumes", f"{name}.img")

    def image(self, name: str, read_only: bool = True) -> Any:
        """An rbd.Image of `name` in this process (close it)."""
        import rbd
        return rbd.Image(self._io, name, read_only=read_only)

    def rbd_bench(self, workload: str, runtime_ops: int) -> float:
        """`rbd bench` (librbd alone, no FUSE, one thread) on the comparator's image:
        IOPS for 4K, MiB/s for 1M."""
        io_type = "write" if workload == "seq_write" else "read"
        bs = 4096 if workload == "rand_read" else MiB
        pattern = "rand" if workload == "rand_read" else "seq"
        total = min(self.size, max(bs * 64, bs * runtime_ops))
        res = subprocess.run(
            ["rbd", "-c", self.cluster.conf, "bench", "--io-type", io_type, "--io-size",
             str(bs), "--io-threads", "1", "--io-total", str(total), "--io-pattern", pattern,
             f"{self.cluster.pool}/{THEIRS}"], capture_output=True, text=True, timeout=600,
            check=False)
        if res.returncode != 0:
            raise BenchError(f"rbd bench {workload} failed: {res.stderr.strip()[-300:]}")
        return parse_rbd_bench(res.stdout, bs)


def parse_rbd_bench(out: str, bs: int) -> float:
    """The summary line of `rbd bench`: 'elapsed: 2  ops: 512  ops/sec: 250.4  bytes/sec:
    ...': IOPS for 4 KiB blocks, MiB/s for larger ones."""
    for line in reversed(out.splitlines()):
        words = line.replace(":", " ").split()
        if "elapsed" in words and "ops/sec" in words:
            ops = float(words[words.index("ops/sec") + 1])
            return ops if bs == 4096 else ops * bs / MiB
    raise BenchError(f"rbd bench printed no summary: {out.strip()[-300:]}")
