"""`shadowplex backup` and `shadowplex restore` (issue 17, docs/backup.md): full and
incremental qcow2/raw images of snapshots, read over the NBD port, written through
qemu-nbd (qcow2) or as sparse files (a raw incremental: a delta).

A chain of a full backup and ten incrementals, with random writes, discards and a grow
between the snapshots, restores byte-identical to each snapshot (`shadowplex restore`,
for qcow2 also `qemu-img convert -O raw` and `qemu-img compare`; xxh3); an incremental
writes exactly the changed extents (bytes_written + bytes_zeroed == the diff's
changed_bytes, every byte of it in a chunk that was touched; a raw delta allocates no
more than the data written); each refusal is one line and changes nothing."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, start_daemon
from support import digest

from blockstore import Pool
from tools.output import Progress

pytestmark = pytest.mark.kernel
MiB = 1 << 20
CS = 64 << 10
TOOLS = ("qemu-img", "qemu-nbd", "fallocate")



@pytest.fixture
def array(tmp_path: Path, sockdir: str) -> Iterator[Daemon]:
    """A daemon with volumes db (24 MiB, some data) and other (4 MiB), the NBD port open
    in plain text on 127.0.0.1."""
    require_kernel()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup installs it)")
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 24 * MiB)
    pool.create_volume("other", 4 * MiB)
    pool.write("db", MiB, os.urandom(3 * MiB))
    pool.write("db", 17 * MiB, os.urandom(100_000))
    pool.close()
    d = start_daemon(tmp_path, sockdir, {}, config={"nbd_listen": "127.0.0.1:0",
                                                    "nbd_insecure": True})
    try:
        yield d
    finally:
        d.stop()


def _snapshot(d: Daemon, vol: str) -> str:
    return str(d.json("snapshot", "create", vol)["snapshots"][0]["id"])


def _shadow(d: Daemon, sid: str) -> str:
    return os.path.join(d.mount, ".shadow", f"{sid}.img")


def _restored(d: Daemon, image: str, out: Path) -> int:
    """xxh3 of the chain `image` restored to raw by `shadowplex restore`; a qcow2 chain
    also by `qemu-img convert -O raw` (docs/backup.md: either), which must agree."""
    if out.exists():
        out.unlink()
    res = d.json("restore", image, "--to", str(out))
    assert res["to"] == str(out) and res["chain"][-1] == image
    try:
        got = digest(out)
    finally:
        out.unlink()
    if image.endswith(".qcow2"):
        subprocess.run(["qemu-img", "convert", "-O", "raw", image, str(out)], check=True,
                       capture_output=True)
        try:
            assert digest(out) == got
        finally:
            out.unlink()
    return got


def _compare(fmt: str, image: str, snap_img: str) -> None:
    res = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", image, snap_img],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "identical" in res.stdout, (res.stdout, res.stderr)


def _mess(d: Daemon, rnd: random.Random, size: int) -> set[int]:
    """Random writes and a discard through the mount; the chunks they touched."""
    touched: set[int] = set()
    with open(d.image("db"), "r+b") as f:
        for _ in range(rnd.randrange(1, 6)):
            n = rnd.randrange(1, 400_000)
            off = rnd.randrange(size - n)
            data = os.urandom(n) if rnd.random() < 0.8 else bytes(n)   # some zeros too
            f.seek(off)
            f.write(data)
            touched |= set(range(off // CS, (off + n - 1) // CS + 1))
        f.flush()
        os.fsync(f.fileno())
    if rnd.random() < 0.5:
        off, n = rnd.randrange(size // CS - 8) * CS, rnd.randrange(1, 8) * CS
        subprocess.run(["fallocate", "-p", "-o", str(off), "-l", str(n), d.image("db")],
                       check=True)
        touched |= set(range(off // CS, (off + n) // CS))
    return touched


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_chain_of_ten_incrementals_restores_every_snapshot(
        array: Daemon, tmp_path: Path, fmt: str) -> None:
    d = array
    rnd = random.Random(1717)
    out = tmp_path / "backups"
    out.mkdir()
    scratch = tmp_path / "restored.raw"
    size = 24 * MiB
    sid = _snapshot(d, "db")
    first = str(out / f"db-0.{fmt}")
    full = d.json("backup", sid, "--to", first, "--format", fmt)
    assert full["kind"] == "full" and full["base_file"] is None
    # a full backup reads only the allocated chunks (base:allocation): 3 MiB + 2 chunks
    assert full["bytes_read"] <= 3 * MiB + 2 * CS
    assert full["bytes_written"] == full["bytes_read"]
    _compare(fmt, first, _shadow(d, sid))
    snap_digest = digest(_shadow(d, sid))
    assert _restored(d, first, scratch) == snap_digest
    chain = [(sid, first)]
    zeroed = 0
    for i in range(1, 11):
        if i == 6:   # a grow between two snapshots: past the old end, zeros + changes
            size += 4 * MiB
            d.ok("volume", "resize", "db", str(size))
        touched = _mess(d, rnd, size)
        sid = _snapshot(d, "db")
        path = str(out / f"db-{i}.{fmt}")
        res = d.json("backup", sid, "--to", path, "--from", chain[-1][0])
        assert res["kind"] == "incremental" and res["format"] == fmt
        assert res["base_file"] == chain[-1][1]
        # it moved the changed extents, nothing else: every byte written or zeroed
        diff = d.json("snapshot", "diff", chain[-1][0], sid)
        assert res["changed_bytes"] == sum(e["length"] for e in diff)
        assert res["bytes_written"] + res["bytes_zeroed"] == res["changed_bytes"]
        assert res["bytes_read"] <= res["changed_bytes"]
        zeroed += res["bytes_zeroed"]
        assert {o // CS for e in diff for o in range(e["offset"], e["offset"] + e["length"],
                                                     CS)} <= touched
        assert _restored(d, path, scratch) == digest(_shadow(d, sid))
        if fmt == "raw":
            # a delta: it holds the data written and nothing else (no copy of PREV)
            assert os.stat(path).st_blocks * 512 <= res["bytes_written"] + 4096
            manifest = json.loads(Path(path + ".backup.json").read_text())
            assert manifest["layout"] == "delta"
            assert manifest["extents"] == [[e["offset"], e["length"]] for e in diff]
        else:
            _compare(fmt, path, _shadow(d, sid))
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", path], check=True,
                capture_output=True, text=True).stdout)
            assert info["backing-filename"] == os.path.basename(chain[-1][1])
            assert info["virtual-size"] == size
        manifest = json.loads(Path(path + ".backup.json").read_text())
        assert manifest["snapshot_id"] == sid and manifest["base_snapshot_id"] == chain[-1][0]
        chain.append((sid, path))
    assert zeroed   # zeros written and holes punched reached the chain as zeroes
    # the first backup is still what it was: the chain only ever added files
    assert _restored(d, first, scratch) == snap_digest
    assert sorted(os.listdir(out)) == sorted(
        [os.path.basename(p) for _, p in chain] + [os.path.basename(p) + ".backup.json"
                                                   for _, p in chain])


def _state(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, digest(p)) for p in directory.iterdir()}


def test_refusals_are_one_line_and_change_nothing(array: Daemon, tmp_path: Path) -> None:
    d = array
    out = tmp_path / "backups"
    out.mkdir()
    a = _snapshot(d, "db")
    d.ok("backup", a, "--to", str(out / "a.qcow2"))
    with open(d.image("db"), "r+b") as f:
        f.write(b"x" * 5000)
    b = _snapshot(d, "db")
    o = _snapshot(d, "other")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = _state(out)
    cases = [
        # FROM not older than the snapshot
        (["backup", a, "--to", str(out / "x.qcow2"), "--from", b], "older"),
        # FROM of another volume
        (["backup", o, "--to", str(out / "x.qcow2"), "--from", a], "volume"),
        # no backup of FROM where the new one goes
        (["backup", b, "--to", str(elsewhere / "x.qcow2"), "--from", a], "no backup of"),
        # a base file that is not there
        (["backup", b, "--to", str(out / "x.qcow2"), "--from", a, "--base-file",
          str(out / "gone.qcow2")], "missing"),
        # the target exists
        (["backup", b, "--to", str(out / "a.qcow2"), "--from", a], "exists"),
        # a base backup of another format
        (["backup", b, "--to", str(out / "x.raw"), "--from", a], "format"),
        # a snapshot that does not exist
        (["backup", "00000000-0000-0000-0000-000000000001", "--to", str(out / "x.qcow2")],
         "00000000-0000-0000-0000-000000000001"),
    ]
    for argv, word in cases:
        res = d.run(*argv)
        assert res.returncode != 0, argv
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert word in res.stderr and "Traceback" not in res.stderr, (argv, res.stderr)
        assert _state(out) == before, argv
        assert list(elsewhere.iterdir()) == []
    # --force replaces; the base's manifest lets --from find it
    res = d.json("backup", b, "--to", str(out / "a2.qcow2"), "--from", a)
    assert res["base_file"] == str(out / "a.qcow2")
    res = d.json("backup", b, "--to", str(out / "a2.qcow2"), "--from", a, "--force")
    assert res["bytes_written"] + res["bytes_zeroed"] == res["changed_bytes"] == CS
    # --quiet: nothing but errors; with --json a refusal is one JSON line on stderr
    res = d.ok("backup", b, "--to", str(out / "a2.qcow2"), "--from", a, "--force", "-q")
    assert res.stdout == res.stderr == ""
    res = d.run("backup", b, "--to", str(out / "a2.qcow2"), "--json")
    assert res.returncode == 1 and res.stdout == "", res
    err = json.loads(res.stderr)["error"]
    assert err["name"] == "BACKUP_REFUSED" and "--force" in err["message"], err


def test_restore_refusals_are_one_line_and_change_nothing(array: Daemon, tmp_path: Path
                                                          ) -> None:
    d = array
    out = tmp_path / "backups"
    out.mkdir()
    a = _snapshot(d, "db")
    d.ok("backup", a, "--to", str(out / "a.raw"))
    with open(d.image("db"), "r+b") as f:
        f.write(b"x" * 5000)
    b = _snapshot(d, "db")
    d.ok("backup", b, "--to", str(out / "b.raw"), "--from", a)
    d.ok("backup", b, "--to", str(out / "b-full.raw"))
    (out / "taken.raw").write_bytes(b"keep")
    (out / "stray.raw").write_bytes(b"no manifest")
    before = _state(out)
    cases = [
        (["restore", str(out / "b.raw"), "--to", str(out / "taken.raw")], "exists"),
        (["restore", str(out / "b.raw"), "--to", str(out / "b.raw"), "--force"],
         "chain itself"),
        (["restore", str(out / "stray.raw"), "--to", str(out / "r.raw")], "no manifest"),
        (["restore", str(out / "gone.raw"), "--to", str(out / "r.raw")], "missing"),
    ]
    for argv, word in cases:
        res = d.run(*argv)
        assert res.returncode == 1, argv
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert word in res.stderr and "Traceback" not in res.stderr, (argv, res.stderr)
        assert _state(out) == before, argv
    # a delta whose base is gone: refused, nothing written
    os.rename(out / "a.raw", tmp_path / "a.raw")
    res = d.run("restore", str(out / "b.raw"), "--to", str(out / "r.raw"))
    assert res.returncode == 1 and "missing" in res.stderr and "base of" in res.stderr
    assert not (out / "r.raw").exists()
    os.rename(tmp_path / "a.raw", out / "a.raw")
    # the delta's chain and the full backup of the same snapshot restore the same bytes
    d.ok("restore", str(out / "b.raw"), "--to", str(tmp_path / "r1.raw"))
    d.ok("restore", str(out / "b-full.raw"), "--to", str(tmp_path / "r2.raw"))
    assert digest(tmp_path / "r1.raw") == digest(tmp_path / "r2.raw") == \
        digest(_shadow(d, b))


def test_without_an_nbd_port_backup_says_how(tmp_path: Path, sockdir: str) -> None:
    require_kernel()
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 4 * MiB)
    pool.close()
    d = start_daemon(tmp_path, sockdir, {})
    try:
        sid = _snapshot(d, "db")
        res = d.run("backup", sid, "--to", str(tmp_path / "x.qcow2"))
        assert res.returncode == 1 and "--nbd-listen" in res.stderr
        assert not list(tmp_path.glob("x.qcow2*"))
    finally:
        d.stop()


def test_progress_shows_bytes_rate_and_eta() -> None:
    """The backup's bar (tqdm): bytes done of the total, the rate and the ETA, one line
    kept at the end; nothing when disabled (--quiet, --json, not a terminal)."""
    s = io.StringIO()
    p = Progress(True, "backup", stream=s)
    p.start(10 * MiB)
    p.advance(5 * MiB)
    p.advance(5 * MiB)
    p.close()
    last = s.getvalue().split("\r")[-1]
    assert re.search(r"^backup: 100%\|.*\| 10\.0MB/10\.0MB \[.*, ETA .*, .*B/s\]\n$",
                     last), repr(last)
    for shown in (Progress(False, "backup", stream=io.StringIO()),
                  Progress(True, "backup")):   # stderr is not a terminal under pytest
        shown.start(1)
        shown.advance(1)
        shown.close()
    assert shown.enabled is False
    quiet = Progress(False, "backup", stream=io.StringIO())
    quiet(1, 2, "x")
    quiet.close()
    assert quiet.stream.getvalue() == ""   # type: ignore[attr-defined]


def test_a_script_backs_up_in_full_then_incrementally(array: Daemon, tmp_path: Path) -> None:
    d = array
    out = tmp_path / "backups"
    out.mkdir()
    script = tmp_path / "nightly.dsh"
    script.write_text("set context persistent\n"
                      "add volume db alias MON\n"
                      "create\n"
                      f"backup %MON% {out}/mon.qcow2\n"
                      f"exec dd if=/dev/urandom of={d.image('db')} bs=64K count=3 seek=40 "
                      "conv=notrunc,fsync status=none\n"
                      "add volume db alias TUE\n"
                      "create\n"
                      f"backup %TUE% {out}/tue.qcow2 from %MON%\n"
                      "exit\n")
    res = d.run("script", str(script))
    assert res.returncode == 0, res.stderr
    snaps = sorted(d.json("snapshot", "list"), key=lambda s: s["created"])
    assert len(snaps) == 2
    tue = snaps[1]["id"]
    _compare("qcow2", str(out / "tue.qcow2"), _shadow(d, tue))
    info = json.loads((out / "tue.qcow2.backup.json").read_text())
    assert info["kind"] == "incremental" and info["snapshot_id"] == tue
    # a refusal is one line naming the script's line, and leaves no file
    bad = tmp_path / "bad.dsh"
    bad.write_text(f"backup {tue} {out}/tue.qcow2\n")
    res = d.run("script", str(bad))
    assert res.returncode != 0 and "bad.dsh:1" in res.stderr and "exists" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "mon.qcow2", "mon.qcow2.backup.json", "tue.qcow2", "tue.qcow2.backup.json"]
