"""Progress for long work (issue 19 #5), through the CLI as a subprocess against a real
daemon.

* A long operation's bar (tqdm: bytes done/total, rate, ETA) appears on a terminal
  (stderr on a pseudo-terminal) and nowhere else: not on a pipe, not under --quiet or
  --json.
* `status` lists every running operation with its progress: a promote started from
  the CLI is seen with a `done` that moves, in --json and in the table.
* `scrub`/`check --volume NAME` cover that volume and its snapshots only, and say what
  they read: scrub reads every allocated byte of each LUN (the allocation is known
  here: the pool is written in-process, in whole chunks), and the pool's figures are
  the sum of its volumes'.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import require_kernel
from harness import Daemon, start_daemon
from support import ENV, ROOT, one_line_error

from blockstore import Pool
from provider.vss import Attr, Context

pytestmark = pytest.mark.kernel

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 4 * KiB            # small chunks: the promote below takes a while per byte
BIG = 256 * MiB            # `big`: its promote runs long enough to be watched (~4 s)
PERSISTENT_DIFF = int(Context.APP_ROLLBACK) | int(Attr.DIFFERENTIAL)
# what the bar looks like (tools/output.py PROGRESS_FORMAT)
BAR = re.compile(r"(\w[\w ]*): +(\d+)%\|[^|\r\n]*\| (\S+)B/(\S+)B \[[\d:]+, "
                 r"ETA [\d:?]+, \S+B/s\]")


@dataclass
class Array:
    d: Daemon
    big_snap: str
    a_snap: str
    expect_a: int      # bytes allocated in volume a and in its snapshot


def _snapshot(p: Pool, vol: str) -> str:
    s = p.prepare_snapshot(vol, attributes=PERSISTENT_DIFF)
    p.commit_snapshots([s.id])
    return s.id


def _build(pool_dir: str) -> tuple[str, str, int]:
    """`big` (BIG bytes of data, a snapshot of it), `a` (written, a snapshot, written
    again: some chunks preserved, one range new), `b` (no snapshot); written in
    whole chunks, so each LUN's allocation is known."""
    p = Pool.create(pool_dir, chunk_size=CHUNK)
    try:
        p.create_volume("big", BIG)
        for off in range(0, BIG, MiB):
            p.write("big", off, os.urandom(16) * (MiB // 16))
        big = _snapshot(p, "big")
        p.create_volume("a", 4 * MiB)
        p.write("a", 0, b"a" * (256 * KiB))
        p.write("a", 512 * KiB, b"A" * (128 * KiB))
        a = _snapshot(p, "a")
        p.write("a", 0, b"x" * (64 * KiB))        # preserved: 64 KiB in the diff area
        p.write("a", MiB, b"y" * (64 * KiB))      # was a hole: none for the snapshot
        p.create_volume("b", 4 * MiB)
        p.write("b", 2 * MiB, b"b" * (320 * KiB))
        for v in ("big", "a", "b"):
            p.flush(v)
        # a: 256 + 128 + 64 KiB; its snapshot: the 64 KiB preserved + the rest of what
        # it had (192 + 128 KiB) as the volume still holds it
        return big, a, (256 + 128 + 64) * KiB + (64 + 192 + 128) * KiB
    finally:
        p.close()


@pytest.fixture(scope="module")
def array(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Array]:
    require_kernel()
    base = tmp_path_factory.mktemp("progress")
    sockdir = tempfile.mkdtemp(prefix="spx-prog-")
    d = None
    try:
        big, a, expect = _build(str(base / "pool"))
        d = start_daemon(base, sockdir, {})
        yield Array(d, big, a, expect)
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def _on_terminal(d: Daemon, *argv: str) -> subprocess.Popen[str]:
    """The CLI with its stderr on a pseudo-terminal (stdout a pipe); read what the
    terminal got with _terminal_output. The test keeps the terminal's other end open
    until it has read everything (the kernel may drop what is unread at its close)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "--socket", d.socket, *argv],
                            cwd=str(ROOT), env=ENV, stdin=subprocess.DEVNULL, stderr=slave,
                            stdout=subprocess.PIPE, text=True)
    proc.pty = (master, slave)  # type: ignore[attr-defined]
    return proc


def _terminal_output(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    """Wait for the command; (its stdout, what its terminal showed)."""
    master, slave = proc.pty  # type: ignore[attr-defined]
    said = b""
    try:
        deadline = time.monotonic() + timeout
        exited = False
        while True:
            if select.select([master], [], [], 0.1)[0]:
                said += os.read(master, 65536)
                continue
            if exited:
                break   # exited before that select: everything has been read
            exited = proc.poll() is not None
            assert time.monotonic() < deadline, said
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        os.close(master)
        os.close(slave)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    return out, said.decode(errors="replace")


def _bars(screen: str) -> list[tuple[str, int, str, str]]:
    """Every state of every bar drawn: (phase, percent, done, total)."""
    return [(m.group(1), int(m.group(2)), m.group(3), m.group(4))
            for m in BAR.finditer(screen)]


# --------------------------------------------------------------------------- the bars
def test_progress_on_a_terminal_only(array: Array) -> None:
    d = array.d
    proc = _on_terminal(d, "scrub", "--volume", "a")
    out, screen = _terminal_output(proc)
    assert proc.returncode == 0, (out, screen)
    bars = _bars(screen)
    assert bars and bars[-1][:2] == ("scrub", 100), screen
    assert bars[-1][2] == bars[-1][3] == "832k", bars   # the allocated bytes, KiB
    assert out.startswith("clean: scrub of volume a and its snapshots: 2 LUNs, "), out
    # the same on a pipe: the summary, no bar
    res = d.ok("scrub", "--volume", "a")
    assert res.stdout == out and res.stderr == ""
    # --quiet and --json on a terminal: no bar either
    for flags, stdout in ((["-q"], ""), (["--json"], None)):
        proc = _on_terminal(d, "scrub", "--volume", "a", *flags)
        out, screen = _terminal_output(proc)
        assert proc.returncode == 0 and screen == "", (flags, screen)
        if stdout is None:
            assert json.loads(out)["volume"] == "a"
        else:
            assert out == stdout
    # a set's creation waits for its plex sync: that bar too
    d.ok("volume", "create", "c", "2M")
    try:
        with open(d.image("c"), "r+b") as f:   # something to sync
            f.write(b"c" * MiB)
            os.fsync(f.fileno())
        proc = _on_terminal(d, "snapshot", "create", "c", "--plex")
        out, screen = _terminal_output(proc)
        assert proc.returncode == 0 and "created" in out, (out, screen)
        assert [b[:2] for b in _bars(screen)][-1:] == [("plex sync", 100)], screen
    finally:
        d.run("snapshot", "delete", "--volume", "c", "--yes")
        d.run("volume", "delete", "c")


# --------------------------------------------------------------------------- status
def test_status_shows_a_running_operation_and_its_progress(array: Array) -> None:
    d = array.d
    proc = _on_terminal(d, "promote", array.big_snap)
    seen: list[dict[str, Any]] = []
    status: subprocess.Popen[str] | None = None   # the table, asked for while it runs
    try:
        with d.client() as c:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                ops = [o for o in c.status()["operations"] if o["op"] == "promote"]
                if ops:
                    seen.append(ops[0])
                    if status is None and 0 < ops[0]["done"] < ops[0]["total"] // 4:
                        status = subprocess.Popen(
                            [sys.executable, "-m", "tools.cli", "--socket", d.socket,
                             "status"], cwd=str(ROOT), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
                time.sleep(0.02)
    finally:
        out, screen = _terminal_output(proc)
        table = status.communicate(timeout=60)[0] if status is not None else ""
    assert proc.returncode == 0, (out, screen)
    assert status is not None and status.returncode == 0, seen
    assert re.search(r"^kind\s+full$", out, re.M), out
    running = [o for o in seen if 0 < o["done"] < o["total"]]
    assert len({o["done"] for o in running}) >= 2, seen   # it moved while we looked
    first, last = running[0], running[-1]
    assert first["target"] == array.big_snap and first["volume"] == "big"
    assert first["state"] == "running" and first["total"] == BIG   # bytes: every chunk
    assert last["done"] > first["done"] and last["rate"] > 0 and last["eta"] is not None
    assert last["percent"] == round(100 * last["done"] / last["total"], 1)
    # the table: the record says how many, then a row per operation
    assert re.search(r"^operations\s+1$", table, re.M), table
    header = next(line for line in table.splitlines() if line.startswith("ID"))
    assert header.split() == ["ID", "OP", "TARGET", "STATE", "DONE", "TOTAL", "%", "RATE",
                              "ETA"], header
    row = next(line for line in table.splitlines() if " promote " in line)
    assert array.big_snap in row and re.search(r" running +\d+\.\d [KMG]iB +256\.0 MiB +"
                                                r"[\d.]+ +\d+\.\d [KMG]iB/s +\d+:\d\d:\d\d$",
                                                row), row
    # its own bar on the terminal: promote, up to all of it
    bars = [b for b in _bars(screen) if b[0] == "promote"]
    assert bars and bars[-1][1:] == (100, "256M", "256M"), screen
    with d.client() as c:
        assert c.status()["operations"] == []   # gone once it has ended


# --------------------------------------------------------------------------- --volume
def test_scrub_and_check_of_one_volume_read_only_its_luns(array: Array) -> None:
    d = array.d
    names = [v["name"] for v in d.json("volume", "list")]
    assert {"a", "b", "big"} <= set(names)
    chk = {v: d.json("check", "--volume", v) for v in names}
    scr = {v: d.json("scrub", "--volume", v) for v in names}
    pool_chk, pool_scr = d.json("check"), d.json("scrub")
    a = scr["a"]
    assert a["ok"] and a["problems"] == [] and a["volume"] == "a" and a["luns"] == 2
    assert chk["a"]["luns"] == 2 and chk["b"]["luns"] == 1 and scr["b"]["luns"] == 1
    # a's chunks preserved after its snapshot are verified: by check, and again by scrub
    assert chk["a"]["chunks_verified"] == a["chunks_verified"] > 0
    assert chk["a"]["bytes_read"] == chk["a"]["chunks_verified"] * CHUNK
    # scrub = check + every allocated byte of a and its snapshot, nothing of b or big
    assert a["bytes_read"] - chk["a"]["bytes_read"] == array.expect_a
    assert scr["b"]["bytes_read"] - chk["b"]["bytes_read"] == 320 * KiB
    # the pool: its volumes' figures added up
    for key in ("luns", "chunks_verified", "bytes_read"):
        assert pool_scr[key] == sum(s[key] for s in scr.values()), (key, pool_scr, scr)
        assert pool_chk[key] == sum(s[key] for s in chk.values()), (key, pool_chk, chk)
    assert pool_scr["volume"] is None and pool_scr["bytes_read"] > BIG
    line = d.ok("check", "--volume", "b").stdout
    assert line == ("clean: check of volume b and its snapshots: 1 LUN, 0 B read, "
                    "0 chunks verified against their checksums\n"), line
    # an unknown volume: one line, exit 1, no job left behind
    for cmd in ("check", "scrub"):
        one_line_error(d.run(cmd, "--volume", "nope"), 1, "VSS_E_OBJECT_NOT_FOUND")
    with d.client() as c:
        assert c.status()["operations"] == []
