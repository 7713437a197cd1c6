"""Naming snapshots as people do (issue 19 #2), through the CLI against a real daemon.

`snapshot create --name/--description` (stored by the coordinator, shown in list/show
and --json, unique per volume, carried in a transportable set's document), unique id
prefixes (git-style: 4+ hex digits; too short, unknown, a set's), `VOLUME@NAME` and
`VOLUME@latest` wherever an id is taken (show, delete, diff, expose, unexpose, revert,
promote, export), all resolved in the daemon (provider/snapshot_refs.py). Every refusal
is one line, a non-zero exit, and changes nothing. The ambiguous prefix, which random
GUIDs cannot be made to produce on demand, is checked on the daemon's resolver itself
with real SnapshotInfo records (the last test: no daemon).

Cleanup: every test deletes its snapshots and volumes in `finally`; the fixture stops
the daemon; conftest's session guard fails the run if a mount or loop device is left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_kernel
from harness import Daemon, launch, serve_cli
from support import one_line_error, read_head, spx, write_synced

from blockstore import SnapshotInfo
from provider.snapshot_refs import MAX_DESCRIPTION, Resolver, check_description, check_name
from provider.vss import VssError

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_kernel()
    base = tmp_path_factory.mktemp("names")
    pool, mount = str(base / "pool"), str(base / "mnt")
    os.makedirs(mount)
    res = spx("pool", "init", pool, "--chunk-size", "16K", "-q")
    assert res.returncode == 0, res.stderr
    with serve_cli(base, "spx-nam-", "--hooks-dir", "") as d:
        yield d


def _cleanup(d: Daemon, *vols: str) -> None:
    d.run("snapshot", "delete", "--all", "--yes", "--unexpose")
    for v in vols:
        d.run("volume", "delete", v)


def _create(d: Daemon, *argv: str) -> list[dict[str, Any]]:
    snaps: list[dict[str, Any]] = d.json("snapshot", "create", *argv, "--context",
                                         "nas-rollback", "--differential")["snapshots"]
    return snaps


# --------------------------------------------------------------------------- names
def test_names_are_kept_shown_and_unique_per_volume(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "nv", "4M")
    d.ok("volume", "create", "nw", "4M")
    try:
        (a,) = _create(d, "nv", "--name", "daily", "--description", "before the upgrade")
        assert a["name"] == "daily" and a["description"] == "before the upgrade"
        (b,) = _create(d, "nv")                     # no name: null, shown as '-'
        assert b["name"] is None and b["description"] is None
        # list: a NAME column by default, -o name,description, --json
        table = d.ok("snapshot", "list", "nv").stdout.splitlines()
        assert table[0].split()[:4] == ["ID", "SET", "VOLUME", "NAME"], table[0]
        assert table[1].split()[3] == "daily" and table[2].split()[3] == "-", table
        rows = d.ok("snapshot", "list", "nv", "-o", "name,description", "-H").stdout
        assert rows.splitlines() == ["daily\tbefore the upgrade", "-\t-"], rows
        assert [r["name"] for r in d.json("snapshot", "list", "nv")] == ["daily", None]
        shown = d.json("snapshot", "show", "nv@daily")
        assert shown["id"] == a["id"] and shown["description"] == "before the upgrade"
        assert "before the upgrade" in d.ok("snapshot", "show", "nv@daily").stdout

        # unique per volume: refused, nothing made; the same name on another volume is fine
        one_line_error(d.run("snapshot", "create", "nv", "--context", "nas-rollback",
                             "--name", "daily"), 1, "volume nv already has a snapshot "
                       "named 'daily' (nv@daily)")
        one_line_error(d.run("snapshot", "create", "nw", "nv", "--context", "nas-rollback",
                             "--name", "daily"), 1, "already has a snapshot named 'daily'")
        assert len(d.json("snapshot", "list")) == 2
        (w,) = _create(d, "nw", "--name", "daily")
        assert d.json("snapshot", "show", "nw@daily")["id"] == w["id"]
        # one name for every snapshot of a multi-volume set
        both = _create(d, "nv", "nw", "--name", "weekly")
        assert {s["volume"]: s["name"] for s in both} == {"nv": "weekly", "nw": "weekly"}

        # bad names and descriptions: usage errors (exit 2), nothing made
        before = len(d.json("snapshot", "list"))
        for argv, fragment in (
                (["--name=-x"], "invalid snapshot name '-x'"),
                (["--name", "a@b"], "invalid snapshot name 'a@b'"),
                (["--name", "latest"], "VOLUME@latest already means"),
                (["--description", "two\nlines"], "printable characters on one line"),
                (["--description", "x" * (MAX_DESCRIPTION + 1)],
                 f"at most {MAX_DESCRIPTION}")):
            one_line_error(d.run("snapshot", "create", "nv", "--context", "nas-rollback",
                                 *argv), 2, fragment)
        assert len(d.json("snapshot", "list")) == before

        # a deleted snapshot's name is free again
        assert d.json("snapshot", "delete", "nv@daily")["deleted"] == [a["id"]]
        one_line_error(d.run("snapshot", "show", "nv@daily"), 1,
                       "volume nv has no snapshot named 'daily'")
        (again,) = _create(d, "nv", "--name", "daily")
        assert d.json("snapshot", "show", "nv@daily")["id"] == again["id"] != a["id"]
    finally:
        _cleanup(d, "nv", "nw")


# --------------------------------------------------------------------------- prefixes
def test_unique_id_prefixes(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "pv", "4M")
    try:
        snaps = [_create(d, "pv")[0] for _ in range(3)]
        ids = [s["id"] for s in snaps]
        sid = ids[0]
        for prefix in (sid[:4], sid[:13].replace("-", ""), sid[:6].upper(), "{" + sid + "}"):
            # (a 4-digit prefix may be shared by chance: then it is refused as ambiguous,
            # which the last test checks; the longer ones are unique)
            if sum(i.startswith(prefix) for i in ids) == 1 or len(prefix) > 4:
                assert d.json("snapshot", "show", prefix)["id"] == sid, prefix
        set_id = snaps[0]["set_id"]
        assert [s["id"] for s in d.json("snapshot", "list", "--set", set_id[:8])] == [ids[0]]
        assert [s["id"] for s in d.json("snapshot", "show", "--set", set_id[:8])] == [ids[0]]

        # too short, not hex, unknown, a set's prefix where a snapshot's is wanted
        one_line_error(d.run("snapshot", "show", ids[0][:3]), 2,
                       "is too short: give at least 4 hex digits")
        one_line_error(d.run("snapshot", "show", "xyz1"), 2, "is not a snapshot id")
        unknown = next(p for p in (f"{n:06x}" for n in range(1 << 24))
                       if not any(i.startswith(p) for i in [*ids, set_id]))
        one_line_error(d.run("snapshot", "show", unknown), 1,
                       f"no snapshot id starts with '{unknown}'")
        one_line_error(d.run("snapshot", "delete", unknown), 1, "no snapshot id starts with")
        one_line_error(d.run("snapshot", "show", set_id[:8]), 1,
                       f"is snapshot set {set_id}, not a snapshot")
        assert len(d.json("snapshot", "list", "pv")) == 3          # refusals: no change

        # every op takes one: expose / unexpose / delete
        d.ok("expose", ids[1][:8], "--name", "pfx")
        assert d.json("snapshot", "show", ids[1][:8])["exposed_name"] == "pfx"
        d.ok("unexpose", ids[1][:8])
        assert d.json("snapshot", "show", ids[1])["exposed_name"] is None
        assert d.json("snapshot", "delete", ids[2][:8])["deleted"] == [ids[2]]
    finally:
        _cleanup(d, "pv")


# --------------------------------------------------------------------------- VOLUME@...
def test_volume_at_latest_and_at_name_everywhere(daemon: Daemon) -> None:
    d = daemon
    d.ok("volume", "create", "lv", "4M")
    made: list[str] = []
    try:
        one_line_error(d.run("snapshot", "show", "lv@latest"), 1,
                       "volume lv has no committed snapshot")
        write_synced(d.image("lv"), b"one.")
        (first,) = _create(d, "lv", "--name", "first")
        write_synced(d.image("lv"), b"two.")
        (second,) = _create(d, "lv")
        time.sleep(0.01)   # distinct creation times (the newest is the latest)
        (third,) = _create(d, "lv", "--name", "third")
        assert d.json("snapshot", "show", "lv@latest")["id"] == third["id"]
        assert d.json("snapshot", "delete", "lv@latest")["deleted"] == [third["id"]]
        assert d.json("snapshot", "show", "lv@latest")["id"] == second["id"]

        # diff FROM TO with names; expose / unexpose; export of the set of lv@first
        diff = d.json("snapshot", "diff", "lv@first", "lv@latest")
        assert diff and diff[0]["offset"] == 0, diff
        d.ok("expose", "lv@first", "--name", "lvfirst")
        assert d.json("snapshot", "show", "lv@first")["exposed_name"] == "lvfirst"
        d.ok("unexpose", "lv@first")
        assert d.json("snapshot", "show", "lv@first")["exposed_name"] is None

        # revert to a name: the volume's content is the snapshot's again
        write_synced(d.image("lv"), b"thr.")
        d.ok("revert", "lv@first")
        assert read_head(d.image("lv"), 4) == b"one."
        # promote and split take it too
        assert d.json("promote", "lv@first")["kind"] == "full"
        made.append("lv-first")
        assert d.json("split", "lv@first", "lv-first")["name"] == "lv-first"
        assert read_head(d.image("lv-first"), 4) == b"one."

        # what does not resolve: one line, nothing changed
        for ref, rc, fragment in (
                ("lv@nosuch", 1, "volume lv has no snapshot named 'nosuch'"),
                ("nosuchvol@latest", 1, "volume nosuchvol has no committed snapshot"),
                ("lv@", 2, "is not VOLUME@NAME or VOLUME@latest"),
                ("@latest", 2, "is not VOLUME@NAME or VOLUME@latest"),
                ("lv@a@b", 2, "is not VOLUME@NAME")):
            one_line_error(d.run("snapshot", "show", ref), rc, fragment)
            one_line_error(d.run("snapshot", "delete", ref), rc, fragment)
        assert [s["id"] for s in d.json("snapshot", "list", "lv")] == [second["id"]]
    finally:
        _cleanup(d, "lv", *made)


def test_names_survive_a_restart(tmp_path: Path) -> None:
    """The labels are the catalog's (provider.sqlite), read again at the next start."""
    require_kernel()
    pool, mount = str(tmp_path / "pool"), str(tmp_path / "mnt")
    os.makedirs(mount)
    assert spx("pool", "init", pool, "-q").returncode == 0
    sockdir = tempfile.mkdtemp(prefix="spx-nrs-")
    sock = os.path.join(sockdir, "ctl.sock")

    def start() -> Daemon:
        d = launch(["serve", "--pool", pool, "--mount", mount, "--socket", sock,
                    "--hooks-dir", ""], module="tools.cli", pool=pool, mount=mount,
                   socket=sock, log=str(tmp_path / "daemon.log"), wait=False)
        d.wait_up()
        return d
    try:
        d = start()
        try:
            d.ok("volume", "create", "rv", "1M")
            (s,) = _create(d, "rv", "--name", "kept", "--description", "über alles")
        finally:
            d.stop()
        d = start()
        try:
            shown = d.json("snapshot", "show", "rv@kept")
            assert (shown["id"], shown["description"]) == (s["id"], "über alles")
            one_line_error(d.run("snapshot", "create", "rv", "--context", "nas-rollback",
                                 "--name", "kept"), 1, "already has a snapshot named")
        finally:
            d.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


# --------------------------------------------------------------------------- transport
def test_a_name_travels_in_the_backup_components_document(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    d = daemon
    d.ok("volume", "create", "tv", "4M")
    doc = tmp_path / "set.xml"
    try:
        (s,) = d.json("snapshot", "create", "tv", "--context", "nas-rollback",
                      "--transportable", "--host", "hosta", "--name", "moved",
                      "--description", "for host b")["snapshots"]
        d.ok("export", "tv@moved", "-o", str(doc))        # a set named by VOLUME@NAME
        text = doc.read_text()
        assert 'sp:name="moved"' in text and 'sp:description="for host b"' in text
        # a document whose name or description breaks the rules is refused, one line
        for bad, fragment in (('sp:name="mo@ved"', "invalid snapshot name"),
                              ('sp:name="latest"', "VOLUME@latest already means"),
                              (f'sp:description="{"d" * (MAX_DESCRIPTION + 1)}"',
                               f"at most {MAX_DESCRIPTION}")):
            hostile = tmp_path / "hostile.xml"
            old = 'sp:name="moved"' if "name" in bad else 'sp:description="for host b"'
            hostile.write_text(text.replace(old, bad))
            one_line_error(d.run("import", str(hostile), "--host", "hostb"), 1, fragment)
        assert d.json("snapshot", "show", s["id"])["imported_by"] is None   # nothing done
        (imp,) = d.json("import", str(doc), "--host", "hostb")["snapshots"]
        assert imp["id"] == s["id"] and imp["name"] == "moved"
        assert imp["description"] == "for host b"
        assert d.json("snapshot", "show", "tv@moved", "--host", "hostb")["id"] == s["id"]
    finally:
        _cleanup(d, "tv")


# --------------------------------------------------------------------------- scripts
def _script(d: Daemon, path: Path, text: str) -> Any:
    path.write_text(text)
    return d.run("script", str(path))


def test_a_script_names_snapshots_and_takes_references(daemon: Daemon,
                                                       tmp_path: Path) -> None:
    d = daemon
    d.ok("volume", "create", "sv", "4M")
    try:
        res = _script(d, tmp_path / "name.dsh",
                      "set context persistent nowriters\nadd volume sv alias A\n"
                      'create name nightly description "from a script"\n'
                      "list shadows id sv@nightly\nadd volume sv\ncreate\n"
                      "list shadows id sv@latest\n")
        assert res.returncode == 0, res.stdout + res.stderr
        (named, plain) = d.json("snapshot", "list", "sv")
        assert named["name"] == "nightly" and named["description"] == "from a script"
        assert plain["name"] is None
        assert named["id"] in res.stdout and plain["id"] in res.stdout
        # a name taken: refused while running (exit 1), the set aborted, nothing made
        res = _script(d, tmp_path / "dup.dsh", "set context persistent nowriters\n"
                      "add volume sv\ncreate name nightly\n")
        assert res.returncode == 1 and "already has a snapshot named 'nightly'" in \
            res.stderr, res.stdout + res.stderr
        assert len(d.json("snapshot", "list", "sv")) == 2
        # a bad name, a bad reference: parse errors (exit 2) before anything runs
        for text, fragment in (("add volume sv\ncreate name a@b\n", "invalid snapshot name"),
                               ("add volume sv\ncreate name\n", "usage: create [name"),
                               ("delete shadows id no-such-thing\n", "VOLUME@NAME")):
            res = _script(d, tmp_path / "bad.dsh", text)
            assert res.returncode == 2 and fragment in res.stderr, res.stdout + res.stderr
        assert len(d.json("snapshot", "list", "sv")) == 2
        # prefixes and VOLUME@NAME in the verbs that take an id
        res = _script(d, tmp_path / "del.dsh", f"delete shadows id {plain['id'][:8]}\n"
                      "delete shadows id sv@nightly\n")
        assert res.returncode == 0, res.stdout + res.stderr
        assert d.json("snapshot", "list", "sv") == []
    finally:
        _cleanup(d, "sv")


# --------------------------------------------------------------------------- daemon-free
def _info(sid: str, volume: str, created: float) -> SnapshotInfo:
    return SnapshotInfo(id=sid, volume=volume, set_id=None, naa="6" + "0" * 31,
                        origin_naa="6" + "1" * 31, size=4096, kind="differential",
                        state="committed", created=created, attributes=0,
                        exposed_name=None, sync_done=0, sync_total=0, epoch=1, file_id=1)


def test_an_ambiguous_prefix_lists_the_candidates() -> None:
    """The daemon's resolver over real SnapshotInfo records (random GUIDs cannot be made
    to share a prefix on demand through the daemon)."""
    ids = ["abcd0001-0000-4000-8000-000000000001", "abcd0002-0000-4000-8000-000000000002",
           "abce0003-0000-4000-8000-000000000003"]
    snaps = [_info(i, "v", n) for n, i in enumerate(ids)]
    r = Resolver(lambda: snaps, lambda i: None, lambda: [],
                 lambda s: s.state == "committed")
    with pytest.raises(VssError) as e:
        r.snapshot("abcd")
    assert e.value.name == "E_INVALIDARG" and "ambiguous" in e.value.message
    assert ids[0] in e.value.message and ids[1] in e.value.message
    assert ids[2] not in e.value.message
    assert r.snapshot("abcd0002") == ids[1]            # one more digit: unique
    assert r.snapshot("ABCE") == ids[2]
    assert r.snapshot("v@latest") == ids[2]
    # a remote host resolves among what it sees only: no ambiguity, no leak
    assert r.snapshot("abcd", visible=lambda i: i == ids[0]) == ids[0]


@pytest.mark.parametrize("name", [".hidden", "-x", "x" * 65, "a b", "a/b", "latest", ""])
def test_names_the_daemon_refuses(name: str) -> None:
    with pytest.raises(VssError) as e:
        check_name(name)
    assert e.value.name == "E_INVALIDARG"


@pytest.mark.parametrize("text", ["tab\there", "two\nlines", "esc\x1b[0m", "\ud800",
                                  "x" * (MAX_DESCRIPTION + 1)])
def test_descriptions_the_daemon_refuses(text: str) -> None:
    with pytest.raises(VssError) as e:
        check_description(text)
    assert e.value.name == "E_INVALIDARG"
    assert check_description("ok: ünïcode, 'quotes' & <angles>")
