"""The NBD port (nbd/, docs/network.md) with clients nobody here wrote: nbdinfo, nbdcopy,
qemu-img and qemu-io against `serve` with the port open on loopback (plain text here;
TLS and hosts in their own network namespaces: tests/test_nbd_tls.py). The raw
protocol's refusals (hostile input) are in tests/test_nbd_wire.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, start_daemon
from support import digest

from blockstore import Pool

pytestmark = pytest.mark.kernel
MiB = 1 << 20
TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")


def nbd_port(d: Daemon, timeout: float = 10.0) -> int:
    """The port the daemon's NBD port opened on (it was asked for port 0)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(r"NBD port open on 127\.0\.0\.1:(\d+)", d.log_text())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError("no 'NBD port open' line in the daemon log:\n" + d.log_text())


def run(*argv: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         check=False)
    if ok:
        assert res.returncode == 0, (argv, res.stdout, res.stderr)
    return res



@pytest.fixture
def array(tmp_path: Path, sockdir: str) -> Iterator[tuple[Daemon, str]]:
    """A daemon with volume db (64 MiB: 1 MiB of data at 1 MiB, the rest holes) and the
    NBD port open in plain text on 127.0.0.1; yields it and its nbd:// base URI."""
    require_kernel()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup installs it)")
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 64 * MiB)
    pool.write("db", MiB, os.urandom(MiB))
    pool.close()
    d = start_daemon(tmp_path, sockdir, {}, config={"nbd_listen": "127.0.0.1:0",
                                                    "nbd_insecure": True})
    try:
        yield d, f"nbd://127.0.0.1:{nbd_port(d)}"
    finally:
        d.stop()


def _snapshot(d: Daemon, vol: str) -> str:
    out = d.json("snapshot", "create", vol)
    return str(out["snapshots"][0]["id"])


def test_list_and_info_show_what_the_mount_shows(array: tuple[Daemon, str]) -> None:
    d, uri = array
    sid = _snapshot(d, "db")
    d.ok("expose", sid, "--name", "nightly")
    listing = run("nbdinfo", "--list", "--json", uri).stdout
    names = {e["export-name"] for e in json.loads(listing)["exports"]}
    # the hidden device path of a snapshot is not listed (as MOUNT/.shadow/ is not)
    assert names == {"volumes/db", "exposed/nightly"}
    vol = json.loads(run("nbdinfo", "--json", f"{uri}/volumes/db").stdout)["exports"][0]
    assert vol["export-size"] == 64 * MiB and vol["is_read_only"] is False
    assert vol["can_flush"] and vol["can_trim"] and vol["can_zero"]
    for name in (f".shadow/{sid}", "exposed/nightly"):
        snap = json.loads(run("nbdinfo", "--json", f"{uri}/{name}").stdout)["exports"][0]
        assert snap["is_read_only"] is True and snap["export-size"] == 64 * MiB
    res = run("nbdinfo", f"{uri}/volumes/nope", ok=False)
    assert res.returncode != 0 and "volumes/nope" in res.stderr


def test_map_is_the_allocation_of_the_volume_and_of_a_snapshot(
        array: tuple[Daemon, str]) -> None:
    d, uri = array

    def data_extents(name: str) -> list[tuple[int, int]]:
        out = json.loads(run("nbdinfo", "--map", "--json", f"{uri}/{name}").stdout)
        return [(e["offset"], e["length"]) for e in out if e["type"] & 1 == 0]

    assert data_extents("volumes/db") == [(MiB, MiB)]
    sid = _snapshot(d, "db")
    d.ok("snapshot", "list", "db")
    with open(d.image("db"), "r+b") as f:   # through the mount: new data, then a hole
        f.seek(8 * MiB)
        f.write(b"x" * MiB)
        f.flush()
        os.fsync(f.fileno())
    assert data_extents("volumes/db") == [(MiB, MiB), (8 * MiB, MiB)]
    assert data_extents(f".shadow/{sid}") == [(MiB, MiB)]   # as it was


def test_nbdcopy_of_a_snapshot_is_byte_identical(array: tuple[Daemon, str],
                                                  tmp_path: Path) -> None:
    d, uri = array
    sid = _snapshot(d, "db")
    before = digest(os.path.join(d.mount, ".shadow", f"{sid}.img"))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", f"{uri}/volumes/db")
    out = tmp_path / "backup.raw"
    run("nbdcopy", f"{uri}/.shadow/{sid}", str(out))
    assert digest(out) == before
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", f"{uri}/.shadow/{sid}",
              str(out))
    assert "identical" in res.stdout


def test_writes_over_nbd_are_seen_through_the_mount_at_once(
        array: tuple[Daemon, str]) -> None:
    """The mount keeps its page cache (keep_cache): a write through the NBD port must
    drop the mount's cached pages of that volume before it is answered."""
    d, uri = array
    with open(d.image("db"), "rb") as f:
        assert f.read(4 * MiB)[:MiB] == bytes(MiB)   # cached by the kernel now
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4M", f"{uri}/volumes/db")
    with open(d.image("db"), "rb") as f:
        assert f.read(4 * MiB) == b"\x33" * (4 * MiB)
    # and the other way: written through the mount, read over NBD
    with open(d.image("db"), "r+b") as f:
        f.write(b"\x44" * MiB)
    res = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x44 0 1M",
                          f"{uri}/volumes/db"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout


def test_snapshots_are_read_only_over_nbd(array: tuple[Daemon, str]) -> None:
    d, uri = array
    sid = _snapshot(d, "db")
    before = digest(os.path.join(d.mount, ".shadow", f"{sid}.img"))
    res = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", f"{uri}/.shadow/{sid}",
              ok=False)
    assert res.returncode != 0 or "Permission denied" in res.stdout + res.stderr \
        or "Operation not permitted" in res.stdout + res.stderr
    assert digest(os.path.join(d.mount, ".shadow", f"{sid}.img")) == before


def test_a_volume_presented_to_another_host_is_invisible(array: tuple[Daemon, str]) -> None:
    d, uri = array
    d.ok("volume", "create", "other", "8M")
    d.ok("volume", "present", "other", "--to", "hostB")
    listing = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)
    assert {e["export-name"] for e in listing["exports"]} == {"volumes/db"}
    res = run("nbdinfo", f"{uri}/volumes/other", ok=False)
    assert res.returncode != 0


def test_trim_and_zeroes_read_back_as_zeros_and_leave_holes(array: tuple[Daemon, str]
                                                            ) -> None:
    d, uri = array
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 4M 2M", "-c", "discard 4M 1M",
        "-c", "write -z -u 5M 1M", f"{uri}/volumes/db")   # -u: may unmap
    with open(d.image("db"), "rb") as f:
        f.seek(4 * MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)
    out = json.loads(run("nbdinfo", "--map", "--json", f"{uri}/volumes/db").stdout)
    data = [(e["offset"], e["length"]) for e in out if e["type"] & 1 == 0]
    assert all(o + n <= 4 * MiB or o >= 6 * MiB for o, n in data), data


def test_flush_is_durable_across_kill_9(tmp_path: Path, sockdir: str) -> None:
    """What FLUSH (and FUA) returned for survives a kill -9 of serve."""
    require_kernel()
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 16 * MiB)
    pool.close()
    d = start_daemon(tmp_path, sockdir, {}, config={"nbd_listen": "127.0.0.1:0",
                                                    "nbd_insecure": True})
    try:
        uri = f"nbd://127.0.0.1:{nbd_port(d)}"
        sid = _snapshot(d, "db")   # so that the writes go through copy-before-write
        run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 3M", "-c", "flush",
            "-c", "write -f -P 0x62 3M 1M", f"{uri}/volumes/db")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
    finally:
        d.stop()
    pool = Pool.open(str(tmp_path / "pool"))
    try:
        assert pool.read("db", 0, 3 * MiB) == b"\x61" * (3 * MiB)
        assert pool.read("db", 3 * MiB, MiB) == b"\x62" * MiB
        assert pool.read(sid, 0, 4 * MiB) == bytes(4 * MiB)
        assert pool.check() == []
    finally:
        pool.close()


def test_dirty_bitmap_map_is_snapshot_diff(array: tuple[Daemon, str]) -> None:
    """nbdinfo --map=qemu:dirty-bitmap:FROM on .shadow/TO (and on the live volume, and
    an exposed TO) reads what `snapshot diff FROM [TO] --json` prints (docs/network.md)."""
    d, uri = array

    def dirty(name: str, from_id: str) -> list[dict[str, int]]:
        out = json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{from_id}",
                             f"{uri}/{name}").stdout)
        merged: list[dict[str, int]] = []
        for e in out:
            if e["type"] & 1 and merged and merged[-1]["offset"] + merged[-1]["length"] \
                    == e["offset"]:
                merged[-1]["length"] += e["length"]
            elif e["type"] & 1:
                merged.append({"offset": e["offset"], "length": e["length"]})
        return merged

    a = _snapshot(d, "db")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x21 3M 100k", "-c", "write -P 0x22 9M 1",
        f"{uri}/volumes/db")
    b = _snapshot(d, "db")
    with open(d.image("db"), "r+b") as f:   # through the mount
        f.seek(20 * MiB)
        f.write(b"y" * 5000)
    d.ok("expose", b, "--name", "tuesday")
    ab = d.json("snapshot", "diff", a, b)
    assert ab and dirty(f".shadow/{b}", a) == ab == dirty("exposed/tuesday", a)
    assert dirty("volumes/db", a) == d.json("snapshot", "diff", a)
    assert dirty("volumes/db", b) == d.json("snapshot", "diff", b) == [
        {"offset": 20 * MiB, "length": 64 << 10}]
    res = run("nbdinfo", f"--map=qemu:dirty-bitmap:{b}", f"{uri}/.shadow/{a}", ok=False)
    assert res.returncode != 0 and "does not support metadata context" in res.stderr
