"""Where did my space go (issue 19 #3), through the CLI against a real daemon: per
snapshot the diff-area bytes held only for it (`used`, what deleting it frees, as zfs's
USED of a snapshot) and shared with other snapshots; a full copy's allocation; the
figures after a delete move as zfs's would, and after a kill -9 and a restart (the
counters rebuilt from the map) they are the same and `check` finds them right.
And a leftover of #19: set.list shows the sets' names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, serve_cli
from support import run_cmd, spx, write_synced

pytestmark = pytest.mark.kernel
CS = 64 << 10          # the pool's chunk size
MiB = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    require_kernel()
    os.makedirs(tmp_path / "mnt")
    assert spx("pool", "init", str(tmp_path / "pool"), "--chunk-size", "64K",
               "-q").returncode == 0
    yield tmp_path


def _space(d: Daemon, vol: str) -> dict[str, tuple[int, int]]:
    """snapshot name -> (used, shared), from `snapshot list VOL -H -p -o ...`."""
    out = d.ok("snapshot", "list", vol, "-H", "-p", "-o", "name,used,shared").stdout
    return {n: (int(u), int(s)) for n, u, s in (x.split("\t") for x in out.splitlines())}


def _diff_bytes(d: Daemon, vol: str) -> int:
    (row,) = [r for r in d.json("volume", "list") if r["name"] == vol]
    return int(row["diff_bytes"])


def _touch(d: Daemon, vol: str, *chunks: int) -> None:
    """A small write into each chunk (a whole chunk is preserved for it), fsync'ed."""
    for c in chunks:
        write_synced(d.image(vol), b"w" * 100, c * CS + 7)


def test_used_and_shared_per_snapshot_as_zfs_counts_them(base: Path) -> None:
    with serve_cli(base, "spx-spc-", "--hooks-dir", "") as d:
        d.ok("volume", "create", "sp", "1M")
        write_synced(d.image("sp"), os.urandom(MiB))   # no chunk is a hole: all have data

        def snap(name: str) -> None:
            d.ok("snapshot", "create", "sp", "--context", "nas-rollback", "--name", name)

        snap("s1")
        _touch(d, "sp", 0, 3)       # (0,1) (3,1): serve s1 alone
        snap("s2")
        _touch(d, "sp", 0, 1)       # (0,2): s2 alone; (1,2): s1 and s2
        snap("s3")
        _touch(d, "sp", 0, 2)       # (0,3): s3 alone; (2,3): s1, s2 and s3
        want = {"s1": (2 * CS, 2 * CS), "s2": (CS, 2 * CS), "s3": (CS, CS)}
        assert _space(d, "sp") == want
        assert _diff_bytes(d, "sp") == 6 * CS
        # the table's columns, show, --json: one name per field
        table = d.ok("snapshot", "list", "sp").stdout.splitlines()
        assert table[0].split()[:9] == ["ID", "SET", "VOLUME", "NAME", "KIND", "CONTEXT",
                                        "STATE", "USED", "SHARED"], table[0]
        assert "128.0 KiB" in table[1], table
        shown = d.json("snapshot", "show", "sp@s2")
        assert (shown["used"], shown["shared"], shown["allocated"]) == (CS, 2 * CS, None)
        assert d.ok("snapshot", "show", "sp@s1", "-H", "-p", "-o", "used,shared").stdout \
            == f"{2 * CS}\t{2 * CS}\n"
        # deleting s2 frees what it alone held; what it shared with s1 alone is s1's now
        d.ok("snapshot", "delete", "sp@s2")
        assert _space(d, "sp") == {"s1": (3 * CS, CS), "s3": (CS, CS)}
        assert _diff_bytes(d, "sp") == 5 * CS
        # and s1 going frees its 3 chunks: s3 holds the one left it shared with s1
        d.ok("snapshot", "delete", "sp@s1")
        assert _space(d, "sp") == {"s3": (2 * CS, 0)}
        assert _diff_bytes(d, "sp") == 2 * CS


def test_a_full_copy_shows_its_allocation(base: Path) -> None:
    with serve_cli(base, "spx-spc-", "--hooks-dir", "") as d:
        d.ok("volume", "create", "fc", "4M")
        write_synced(d.image("fc"), os.urandom(MiB), MiB)
        d.ok("snapshot", "create", "fc", "--context", "nas-rollback", "--plex",
             "--name", "copy")
        d.ok("snapshot", "create", "fc", "--context", "nas-rollback", "--name", "diff")
        _touch(d, "fc", 16)
        rows = {r["name"]: r for r in d.json("snapshot", "list", "fc")}
        plex = rows["copy"]
        assert (plex["used"], plex["shared"], plex["allocated"]) == (MiB, 0, MiB), plex
        assert (rows["diff"]["used"], rows["diff"]["shared"]) == (CS, 0)
        # promoted: a full copy of its own, allocated as the volume was at its instant
        d.ok("promote", "fc@diff")
        full = d.json("snapshot", "show", "fc@diff")
        assert full["kind"] == "full" and full["used"] == full["allocated"] == MiB
        assert full["shared"] == 0
        assert _diff_bytes(d, "fc") == 0   # the entry only it needed was reclaimed
        table = d.ok("snapshot", "list", "fc", "-o", "name,used,shared,allocated").stdout
        assert table.splitlines()[1].split() == ["copy", "1.0", "MiB", "0", "B", "1.0",
                                                 "MiB"], table


def test_the_counters_after_kill_9_equal_a_recount(base: Path) -> None:
    with serve_cli(base, "spx-spc-", "--hooks-dir", "") as d:
        d.ok("volume", "create", "kv", "1M")
        write_synced(d.image("kv"), os.urandom(MiB))
        for i, chunks in enumerate(((0, 1, 2), (1, 5), (1, 2, 9))):
            d.ok("snapshot", "create", "kv", "--context", "nas-rollback", "--name", f"k{i}")
            _touch(d, "kv", *chunks)
        before = _space(d, "kv")
        assert before == {"k0": (3 * CS, 2 * CS), "k1": (CS, 3 * CS), "k2": (CS, 2 * CS)}
        d.proc.kill()
        d.proc.wait(10)
        run_cmd("fusermount3", "-u", "-z", d.mount, check=False)
    with serve_cli(base, "spx-spc-", "--hooks-dir", "") as d:
        assert _space(d, "kv") == before
        assert d.ok("check").stdout.startswith("clean: "), "check compares them"


def test_set_list_shows_the_names(base: Path) -> None:
    with serve_cli(base, "spx-spc-", "--hooks-dir", "") as d:
        d.ok("volume", "create", "na", "1M")
        d.ok("volume", "create", "nb", "1M")
        made = d.json("snapshot", "create", "na", "nb", "--context", "nas-rollback",
                      "--name", "nightly", "--description", "before the upgrade")
        d.ok("snapshot", "create", "na", "--context", "nas-rollback")   # no name
        with d.client() as c:
            sets = {s["set_id"]: s for s in c.set_list()}
        named = sets.pop(made["set_id"])
        assert (named["name"], named["description"]) == ("nightly", "before the upgrade")
        assert sorted((v["volume"], v["name"]) for v in named["volumes"]) == [
            ("na", "nightly"), ("nb", "nightly")]
        ((_, unnamed),) = sets.items()
        assert unnamed["name"] is None and unnamed["volumes"][0]["name"] is None
