"""Scriptable output (issue 19 #4), through the CLI as a subprocess against a real daemon.

`-o FIELD,...`, `-H` (no header, one tab between fields) and `-p` (exact numbers) on
every listing; human tables with sizes in KiB/MiB and ISO-8601 times, never a Python
repr; one --json name per field; --json errors as one JSON object on stderr; --quiet
printing nothing but errors; `snapshot delete --all` / `--volume VOL` asking first
(--yes, a terminal's y) and `--dry-run`. The daemon-free tests at the end: a remote
host may not delete a volume's snapshots (provider/access.py), and JSON usage errors.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_kernel
from harness import Daemon, serve_cli
from support import ENV, ROOT, one_line_error, spx, write_synced

pytestmark = pytest.mark.kernel
GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_kernel()
    base = tmp_path_factory.mktemp("listing")
    pool, mount = str(base / "pool"), str(base / "mnt")
    os.makedirs(mount)
    res = spx("pool", "init", pool, "--chunk-size", "16K", "-q")
    assert res.returncode == 0 and res.stdout == res.stderr == "", res   # --quiet
    with serve_cli(base, "spx-lst-", "--hooks-dir", "") as d:
        yield d


def _snap(d: Daemon, *vols: str) -> list[str]:
    res = d.json("snapshot", "create", *vols, "--context", "nas-rollback")
    return [s["id"] for s in res["snapshots"]]


def _cleanup(d: Daemon, *vols: str) -> None:
    d.ok("snapshot", "delete", "--all", "--yes", "--unexpose")
    for v in vols:
        d.run("volume", "delete", v)


def _json_error(res: subprocess.CompletedProcess[str], rc: int, name: str) -> dict[str, Any]:
    """--json's failure: exit rc, nothing on stdout, one JSON line on stderr."""
    assert res.returncode == rc, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "" and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    err: dict[str, Any] = json.loads(lines[0])["error"]
    assert err["name"] == name and err["code"] == rc, err
    assert isinstance(err["message"], str) and "\n" not in err["message"]
    return err


# --------------------------------------------------------------------------- listings
def test_every_listing_takes_o_H_p(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "la", "4M")
    d.ok("volume", "create", "lb", "1M")
    try:
        write_synced(d.image("la"), b"a" * MiB)
        sa, sb = _snap(d, "la", "lb")
        write_synced(d.image("la"), b"b" * 100, 2 * MiB)   # one 16 KiB chunk after the snapshot
        # volume list: exact bytes, tab-separated, no header
        lines = d.ok("volume", "list", "-H", "-p", "-o", "name,size,allocated").stdout
        rows = [x.split("\t") for x in lines.splitlines()]
        assert ["la", str(4 * MiB)] == rows[0][:2] and int(rows[0][2]) >= MiB, rows
        assert rows[1] == ["lb", str(MiB), "0"], rows
        human = d.ok("volume", "list").stdout
        assert re.search(r"^la\s+4\.0 MiB\s+1\.\d MiB\s", human, re.M), human
        # snapshot list: the default table has ISO-8601 times, -p Unix seconds
        table = d.ok("snapshot", "list", "la").stdout
        assert table.split()[:11] == ["ID", "SET", "VOLUME", "NAME", "KIND", "CONTEXT",
                                      "STATE", "USED", "SHARED", "CREATED", "EXPOSED"], table
        # USED 0 B: the one chunk preserved for it was a hole (an all-zero chunk holds
        # no data); SHARED: nothing (test_cli_space.py checks the figures)
        assert re.search(rf"^{sa}\s+{GUID}\s+la\s+-\s+differential\s+nas-rollback\s+"
                         rf"CREATED\s+0 B\s+0 B\s+{ISO}\s+-$", table, re.M), table
        (line,) = d.ok("snapshot", "list", "la", "-H", "-p",
                       "-o", "id,created,size,attributes").stdout.splitlines()
        sid, created, size, attrs = line.split("\t")
        snap = d.json("snapshot", "show", sa)
        assert (sid, float(created), int(size), int(attrs)) == (
            sa, snap["created"], 4 * MiB, snap["attributes"])
        assert abs(float(created) - time.time()) < 600
        hexed = d.ok("snapshot", "list", "la", "-H", "-o", "attributes,backup_complete").stdout
        assert hexed == f"{hex(snap['attributes'])}\tno\n"
        assert d.ok("snapshot", "show", sa, "-H", "-o", "id,volume,state").stdout == \
            f"{sa}\tla\tCREATED\n"
        # one snapshot as FIELD value lines: no float times, no Python booleans
        shown = d.ok("snapshot", "show", sa).stdout
        assert re.search(rf"^created\s+{ISO}$", shown, re.M), shown
        assert re.search(r"^backup_complete\s+no$", shown, re.M), shown
        assert "False" not in shown and "True" not in shown
        # --json with -o: only those fields, in that order
        assert d.json("snapshot", "list", "la", "-o", "volume,id") == [{"volume": "la",
                                                                        "id": sa}]
        # snapshot diff: exact lengths with -p, no totals line under -H
        diff = d.ok("snapshot", "diff", sa, "-H", "-p").stdout
        assert diff == f"{2 * MiB}\t{2 * MiB}\t{16384}\n", diff
        assert d.ok("snapshot", "diff", sa, "-H", "-o", "length").stdout == "16.0 KiB\n"
        assert "1 extents, 16.0 KiB changed of 4.0 MiB (chunk 16 KiB)" in \
            d.ok("snapshot", "diff", sa).stdout
        # writers list
        assert d.ok("writers", "list", "-H", "-o", "name,state").stdout == \
            "fsfreeze\tVSS_WS_STABLE\n"
        # status: a record; human sizes, yes/no, no reprs; -H -p: its values on one line
        st = d.ok("status").stdout
        assert re.search(r"^chunk_size\s+16\.0 KiB$", st, re.M), st
        assert re.search(r"^capabilities\s+plex=yes .*reflink=(yes|no) ", st, re.M), st
        assert re.search(r"^space_free\s+\d+\.\d [KMGT]iB$", st, re.M), st
        assert "True" not in st and "False" not in st and "{" not in st and "[" not in st
        free = d.json("status")["space_free"]
        vals = d.ok("status", "-H", "-p", "-o", "chunk_size,volumes,space_free").stdout
        chunk, nvol, got_free = vals.rstrip("\n").split("\t")
        # exact bytes (-p), not a human size; the pool's file system is shared with
        # whatever else runs on the machine, so free space moves between two calls
        assert (chunk, nvol) == ("16384", "2") and abs(int(got_free) - free) < max(
            64 * MiB, free // 50)
        # df: -H drops the summary lines; -o picks volume columns
        df = d.ok("df", "-H", "-p", "-o", "name,size,snapshots").stdout
        assert df.splitlines() == [f"la\t{4 * MiB}\t1", f"lb\t{MiB}\t1"], df
        assert d.ok("df").stdout.startswith(f"pool {d.pool}: ")
        # a record printed by a command: volume create
        made = d.ok("volume", "create", "lc", "1M").stdout
        assert re.search(rf"^created\s+{ISO}$", made, re.M), made
        assert re.search(r"^read_only\s+no$", made, re.M), made
        assert re.search(r"^size\s+1\.0 MiB$", made, re.M), made
        # a wrong -o: exit 2 before anything is asked, naming the valid fields
        line = one_line_error(d.run("snapshot", "list", "-o", "id,bogus"), 2,
                              "bogus is not a snapshot field")
        assert "choose from id,set_id,volume," in line
        one_line_error(d.run("df", "-o", "size_h"), 2, "size_h is not a volume field")
    finally:
        _cleanup(d, "la", "lb", "lc")


def test_json_has_one_name_per_field(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "ja", "1M")
    try:
        _snap(d, "ja")
        for s in [*d.json("snapshot", "list"), d.json("snapshot", "create", "ja", "--context",
                                                      "nas-rollback")["snapshots"][0]]:
            for kept in ("id", "set_id", "state", "device_path", "created"):
                assert kept in s, sorted(s)
            for gone in ("snapshot_id", "snapshot_set_id", "status", "device_object",
                         "creation_timestamp", "created_at", "exposed"):
                assert gone not in s, (gone, sorted(s))
        (v,) = [v for v in d.json("volume", "list") if v["name"] == "ja"]
        assert "size" in v and not {"size_h", "alloc_h", "diff_h"} & set(v), sorted(v)
        (w,) = d.json("writers", "list")
        assert w["name"] == "fsfreeze" and "writer_name" not in w
    finally:
        _cleanup(d, "ja")


def test_json_errors_and_quiet(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    nosuch = "00000000-0000-0000-0000-00000000000a"
    err = _json_error(d.run("snapshot", "show", nosuch, "--json"), 1,
                      "VSS_E_OBJECT_NOT_FOUND")
    assert err["hresult"] == 0x80042308 and nosuch in err["message"]
    _json_error(d.run("snapshot", "show", "nonsense", "--json"), 2, "E_INVALIDARG")
    _json_error(d.run("volume", "list", "-o", "bogus", "--json"), 2, "E_INVALIDARG")
    _json_error(d.run("--json", "volume", "create", "x"), 2, "E_INVALIDARG")   # argparse's
    _json_error(spx("status", "--json", socket=str(tmp_path / "none.sock")), 1,
                "VSS_E_PROVIDER_NOT_REGISTERED")
    # --quiet: nothing but errors (no result, no note on stderr)
    res = d.ok("volume", "create", "qa", "1M", "--quiet")
    try:
        assert res.stdout == res.stderr == ""
        res = d.ok("snapshot", "create", "qa", "-q")        # the app-rollback note: gone
        assert res.stdout == res.stderr == ""
        for argv in (["volume", "list"], ["snapshot", "list"], ["status"], ["df"],
                     ["check"], ["snapshot", "delete", "--volume", "qa", "--yes"]):
            res = d.ok(*argv, "-q")
            assert res.stdout == res.stderr == "", (argv, res.stdout, res.stderr)
        one_line_error(d.run("volume", "create", "qa", "1M", "-q"), 1,
                       "VSS_E_OBJECT_ALREADY_EXISTS")
        # --json still prints its result under --quiet
        assert d.json("volume", "list", "-q", "-o", "name") == [{"name": "qa"}]
    finally:
        _cleanup(d, "qa")


# --------------------------------------------------------------------------- delete
def _on_terminal(d: Daemon, answer: bytes, *argv: str) -> tuple[int, str, str]:
    """The CLI with stdin and stderr on a pseudo-terminal: answers the prompt."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "--socket", d.socket, *argv],
                            cwd=str(ROOT), env=ENV, stdin=slave, stderr=slave,
                            stdout=subprocess.PIPE, text=True)
    os.close(slave)
    said = b""
    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in said:
            assert time.monotonic() < deadline and proc.poll() is None, said
            if select.select([master], [], [], 0.2)[0]:
                said += os.read(master, 4096)
        os.write(master, answer)
        out, _ = proc.communicate(timeout=30)
        with_rest = said
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # EIO: the other end is closed
                break
            if not chunk:
                break
            with_rest += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out, with_rest.decode(errors="replace")


def test_bulk_delete_asks_first_and_dry_run_lists(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "da", "1M")
    d.ok("volume", "create", "db", "1M")
    try:
        a1, b1 = _snap(d, "da", "db")
        (a2,) = _snap(d, "da")

        def ids() -> set[str]:
            return {s["id"] for s in d.json("snapshot", "list")}
        everything = {a1, a2, b1}
        assert ids() == everything
        # no terminal, no --yes: refused before anything is asked, nothing deleted
        one_line_error(d.run("snapshot", "delete", "--all"), 2,
                       "snapshot delete --all deletes every snapshot of every volume: add "
                       "--yes (or --dry-run to list them first)")
        one_line_error(d.run("snapshot", "delete", "--volume", "da"), 2, "add --yes")
        assert ids() == everything
        # --dry-run: what would go, nothing gone
        dry = d.json("snapshot", "delete", "--volume", "da", "--dry-run")
        assert dry == {"would_delete": [a1, a2], "count": 2}
        assert set(d.json("snapshot", "delete", "--all", "--dry-run")["would_delete"]) == \
            everything
        assert d.json("snapshot", "delete", "--oldest", "da", "-n")["would_delete"] == [a1]
        assert d.json("snapshot", "delete", b1, "-n")["would_delete"] == [b1]
        table = d.ok("snapshot", "delete", "--volume", "da", "--dry-run").stdout
        assert a1 in table and a2 in table and b1 not in table and table.startswith("ID ")
        assert ids() == everything
        # at a terminal: the list, then a question; anything but y deletes nothing
        rc, out, said = _on_terminal(d, b"n\n", "snapshot", "delete", "--all")
        assert rc == 1 and out == "", (rc, out, said)
        assert all(s in said for s in everything) and "3 snapshots? [y/N]" in said, said
        assert "nothing deleted" in said
        assert ids() == everything
        # a snapshot in use: the whole --volume deletion is refused, none deleted
        shadow = d.json("snapshot", "show", a2)["device_path"]
        with open(shadow, "rb") as f:
            holder = subprocess.Popen(["sleep", "60"], stdin=f)
        try:
            one_line_error(d.run("snapshot", "delete", "--volume", "da", "--yes"), 1,
                           "VSS_E_VOLUME_IN_USE")
            assert ids() == everything
        finally:
            holder.kill()
            holder.wait(10)
        # --volume VOL --yes: every snapshot of that volume, the others stay
        res = d.json("snapshot", "delete", "--volume", "da", "--yes")
        assert sorted(res["deleted"]) == sorted([a1, a2]) and res["count"] == 2
        assert ids() == {b1}
        assert d.ok("snapshot", "delete", "--volume", "da", "-y").stdout == \
            "no snapshots deleted\n"
        one_line_error(d.run("snapshot", "delete", "--volume", "nosuch", "--yes"), 1,
                       "VSS_E_OBJECT_NOT_FOUND")
        # y at the terminal: deleted, and said
        rc, out, said = _on_terminal(d, b"y\n", "snapshot", "delete", "--volume", "db")
        assert rc == 0 and out == f"deleted 1 snapshot:\n  {b1}\n", (rc, out, said)
        assert "every snapshot of volume db: 1 snapshot? [y/N]" in said, said
        assert ids() == set()
    finally:
        _cleanup(d, "da", "db")


# --------------------------------------------------------------------------- daemon-free
def test_a_remote_host_may_not_delete_a_volume_s_snapshots() -> None:
    from provider.access import Access
    from provider.vss import VssError

    class Masking:
        service_machine = "array"

        def hosts_of(self, lun: str) -> frozenset[str]:
            return frozenset({"hostB"})
    acc = Access(Masking(), lambda set_id: [], lambda sid: None, lambda set_id: None,
                 lambda sid: None)
    for args in ({"volume": "db"}, {"all": True}, {"oldest": "db"}):
        with pytest.raises(VssError) as e:
            acc.check("hostB", True, "snapshot.delete", args)
        assert e.value.name == "E_ACCESSDENIED", args
        acc.check("array", False, "snapshot.delete", args)    # the array's own host
        acc.check("hostB", False, "snapshot.delete", args)    # local: as before


def test_delete_needs_exactly_one_form(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    one_line_error(spx("snapshot", "delete", "--volume", "a", "--all", socket=sock), 2,
                   "exactly one of ID, --set ID, --oldest VOLUME, --volume VOLUME, --all")
    res = spx("snapshot", "delete", "--all", "--json", socket=sock)
    assert "add --yes" in _json_error(res, 2, "E_INVALIDARG")["message"]
    assert "required: COMMAND" in _json_error(spx("--json", socket=sock), 2,
                                              "E_INVALIDARG")["message"]
