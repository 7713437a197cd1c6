"""Hosts using the array over NBD with TLS the way a machine does, with clients nobody
here wrote: nbdfuse (libnbd) turns an export into a file on the host, the kernel's loop
device and ext4 use it; nbdcopy copies a snapshot off. Each host is a network namespace
of its own (tests/netns.py; nbdfuse runs there through nsenter --net, its FUSE mount is
in the shared mount namespace; its TLS client is nbdkit's nbd plugin, see
nbd_net.nbdfuse_file for why), the array is conftest's `tls_array` (tests/nbd_net.py).
Cleanup -- ext4 unmounted, loop devices detached, nbdfuse unmounted (fusermount3 -u),
the daemon stopped, the namespaces deleted -- happens in context managers' finally
blocks, also when an assertion fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from nbd_net import Net, nbdfuse_file
from support import digest, mounted_fs

pytestmark = pytest.mark.kernel
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("nbdfuse", "nbdkit", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup installs it)")



def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.sync()


def _read_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "lost+found" not in p.parts}


def _debugfs_cat(image: Path | str, path: str) -> bytes:
    """A file of the ext4 in `image`, read by debugfs (read-only, no mount)."""
    res = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _snapshot_as(t: Net, host: str, volume: str) -> str:
    """A snapshot of `volume` made by `host`'s requester over the control port (so it is
    presented to that host)."""
    res = t.cli(host, "snapshot", "create", volume, "--json")
    assert res.returncode == 0, res.stderr
    return str(json.loads(res.stdout)["snapshots"][0]["id"])


def test_the_backup_host_mounts_a_snapshot_s_ext4_through_nbdfuse(tls_array: Net,
                                                                   tmp_path: Path) -> None:
    """hostC (backup) mounts .shadow/<id> over nbds:// with its certificate, read-only
    loop + ext4 ro,noload: the files as they were at the snapshot, not as rewritten
    after it."""
    t = tls_array
    t.d.ok("volume", "present", "db", "--to", "hostB", "--to", "hostC")
    image = Path(t.d.mount, "hosts", "hostB", "volumes", "db.img")
    before = {"etc/app.conf": b"version=1\n", "data/blob": os.urandom(MiB + 4321),
              "data/gone": b"deleted after the snapshot\n"}
    with mounted_fs(image, tmp_path / "app"):   # the application's files, on the array
        _write_files(tmp_path / "app", before)
    sid = _snapshot_as(t, "hostC", "db")
    with mounted_fs(image, tmp_path / "app", mkfs=False):   # after the snapshot
        app = tmp_path / "app"
        (app / "etc/app.conf").write_bytes(b"version=2\n")
        (app / "data/blob").write_bytes(os.urandom(MiB))
        (app / "data/gone").unlink()
        (app / "data/new").write_bytes(b"written after the snapshot\n")
        os.sync()
    assert _debugfs_cat(image, "/etc/app.conf") == b"version=2\n"   # the volume moved on
    with nbdfuse_file(t, "hostC", f".shadow/{sid}", tmp_path / "snap.nbd",
                      read_only=True) as f, \
            mounted_fs(f, tmp_path / "backup", mkfs=False, options="ro,noload",
                       read_only=True):
        assert os.path.getsize(f) == 16 * MiB
        assert _read_files(tmp_path / "backup") == before


def test_a_host_s_ext4_over_nbd_is_durable_and_visible_on_the_array(tls_array: Net,
                                                                    tmp_path: Path) -> None:
    """hostB: nbdfuse of volumes/db (read-write) + loop + mkfs.ext4 + files + sync +
    umount; then the array reads them through its own FUSE mount."""
    t = tls_array
    files = {"hello.txt": b"hello from hostB\n", "dir/big.bin": os.urandom(3 * MiB + 17)}
    with nbdfuse_file(t, "hostB", "volumes/db", tmp_path / "db.nbd") as f, \
            mounted_fs(f, tmp_path / "hostB-fs"):   # mkfs.ext4 on hostB
        _write_files(tmp_path / "hostB-fs", files)
    # unmounted: ext4 and the loop device flushed, through nbdfuse, to the array
    image = Path(t.d.mount, "hosts", "hostB", "volumes", "db.img")
    for name, data in files.items():
        assert _debugfs_cat(image, "/" + name) == data
    # and the whole file system, mounted read-only from the array's mount
    with mounted_fs(image, tmp_path / "array-view", mkfs=False, options="ro,noload",
                    read_only=True):
        assert _read_files(tmp_path / "array-view") == files


def test_nbdcopy_of_a_snapshot_over_tls_is_the_snapshot(tls_array: Net,
                                                        tmp_path: Path) -> None:
    """The backup host copies .shadow/<id> off over TLS: byte-identical to the array's
    snapshot, and to the volume as it was, though the volume was rewritten since."""
    t = tls_array
    t.d.ok("volume", "present", "db", "--to", "hostB", "--to", "hostC")
    image = Path(t.d.mount, "hosts", "hostB", "volumes", "db.img")
    before = digest(image)
    sid = _snapshot_as(t, "hostC", "db")
    with open(image, "r+b") as f:   # rewrite the data the snapshot preserves
        f.write(os.urandom(2 * MiB))
        os.fsync(f.fileno())
    assert digest(image) != before
    out = tmp_path / "snap.raw"
    res = t.net.run("hostC", "nbdcopy", t.tls_uri("hostC", f".shadow/{sid}"), str(out),
                    timeout=60)
    assert res.returncode == 0, res.stderr
    assert digest(out) == before
    assert digest(Path(t.d.mount, "hosts", "hostC", ".shadow", f"{sid}.img")) == before
    # hostB did not make it and it is not presented to hostB: not even by its id
    res = t.net.run("hostB", "nbdcopy", t.tls_uri("hostB", f".shadow/{sid}"),
                    str(tmp_path / "no.raw"), timeout=60)
    assert res.returncode != 0
