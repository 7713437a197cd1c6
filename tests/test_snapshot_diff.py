"""Changed-block maps (issue 17): Pool.changed_extents (blockstore/changes.py) against a
model, its edges, a measurement on a 1 TiB volume, and `snapshot diff` end to end.

The machine is the engine model's (tests/engine_model.py: writes, discards, snapshots
differential and plex, deletes, reverts, promotes, splits, grows, diff-area overflows,
kill -9 after a flush, crashes at every fault point with the recovery crashing again)
plus a clean close/reopen, with one more invariant after every step, for every pair (A
differential, B a later snapshot with an epoch, or the live volume):

* upper bound: every chunk reported was touched (written, discarded, or rewritten by a
  revert) after A's commit -- and before B's;
* content: every chunk whose content differs between A (zeros past its end) and B is
  reported;
* exactness: every chunk touched after A (and before B) is reported -- unless a crash
  came between the touch and the next durability point (flush, resize, revert,
  reopen): such a write may be lost, and its record with it;
* the extents are sorted, merged, chunk-aligned and inside B's size; a plex or promoted
  A, a plex B and B older than A are refused.

"Changed" is "touched" (docs/blockstore-api.md): a superset of content-differs.

Runtime: SHADOWPLEX_DIFF_EXAMPLES examples (default 40) of up to 40 steps, about 5 s
here (300: 37 s); on loop-mounted xfs and btrfs (reflink) SHADOWPLEX_DIFF_FS_EXAMPLES
(default 10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from engine_model import CS, EngineModel
from harness import start_daemon
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, rule, run_state_machine_as_test
from poolfs import on_filesystems
from support import ENV, ROOT

from blockstore import DEFAULT_CHUNK, INVALID, Pool
from blockstore.changes import extents
from blockstore.errors import InvalidState, NotFound, SnapshotInvalid, Unsupported
from provider.access import Access
from provider.client import Client
from provider.coordinator import diff_page
from provider.vss import VssError
from tools import launcher as tools_launcher


def _nch(size: int) -> int:
    return -(-size // CS)


def _chunk(buf: bytes | bytearray, c: int) -> bytes:
    piece = bytes(buf[c * CS:(c + 1) * CS])
    return piece + bytes(CS - len(piece))


class DiffModel(EngineModel):
    def __init__(self, base: str | None = None) -> None:
        # (before EngineModel's __init__: it calls _durable)
        self.clock = 0
        self.durable_at = 0
        self.touches: list[tuple[int, frozenset[int], list[bool]]] = []  # seq, chunks, [sure]
        self.commit_at: dict[str, int] = {}
        super().__init__(base)

    # -- what the engine may have touched, and when ---------------------------------------
    def _touch(self, chunks: range | set[int]) -> None:
        if chunks:
            self.clock += 1
            self.touches.append((self.clock, frozenset(chunks), [True]))

    def _durable(self) -> None:
        super()._durable()
        self.durable_at = self.clock

    def _add(self, sid: str, content: bytes, kind: str) -> None:
        super()._add(sid, content, kind)
        self.clock += 1
        self.commit_at[sid] = self.clock

    def _forget(self, sid: str) -> None:
        super()._forget(sid)
        del self.commit_at[sid]

    def _range(self, off: int, n: int) -> range:
        off %= len(self.vol)        # as EngineModel.op_write/op_discard clip it
        n = min(n, len(self.vol) - off)
        return range(off // CS, (off + n - 1) // CS + 1)

    def op_write(self, off: int, n: int, b: int) -> None:
        self._touch(self._range(off, n))
        super().op_write(off, n, b)

    def op_discard(self, off: int, n: int) -> None:
        self._touch(self._range(off, n))
        super().op_discard(off, n)

    def op_revert(self, sid: str) -> None:
        # the engine rewrites each chunk that differs and discards the tail past the
        # snapshot's size (both through copy-before-write)
        want, have = self.snaps[sid], self.vol
        self._touch({c for c in range(_nch(max(len(want), len(have))))
                     if c >= _nch(len(want)) or _chunk(want, c) != _chunk(have, c)})
        super().op_revert(sid)

    def _after_crash(self, op, sid, before_ids, vol_before, split_name):
        # touches since the last durability point may be lost with their records
        for seq, _, sure in self.touches:
            if seq > self.durable_at:
                sure[0] = False
        super()._after_crash(op, sid, before_ids, vol_before, split_name)

    # -- rules ------------------------------------------------------------------------------
    @rule()
    def close_and_reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.dir + "/pool", faults=self.faults)
        self._durable()

    # -- the invariant ------------------------------------------------------------------------
    @invariant()
    def diffs_are_exact(self):
        infos = {s.id: s for s in self.pool.list_snapshots("v")}
        assert set(infos) == set(self.snaps)
        live = bytes(self.vol)
        froms = sorted((s for s in infos.values() if s.kind == "differential"),
                       key=lambda s: s.epoch)
        for a in infos.values():
            if a.kind != "differential":
                with pytest.raises(Unsupported):
                    self.pool.changed_extents(a.id)
        for a in froms:
            later = [b for b in infos.values() if b.epoch is not None and b.epoch > a.epoch]
            for b in [None, *later]:
                self._check_pair(a.id, None if b is None else b.id, live)
            for b in infos.values():
                if b.epoch is None:
                    with pytest.raises(Unsupported):
                        self.pool.changed_extents(a.id, b.id)
                elif b.epoch < a.epoch:
                    with pytest.raises(InvalidState, match="older"):
                        self.pool.changed_extents(a.id, b.id)

    def _check_pair(self, a: str, b: str | None, live: bytes) -> None:
        got = self.pool.changed_extents(a, b)
        new = live if b is None else self.snaps[b]
        size = len(new)
        chunks: set[int] = set()
        end = -1
        for off, n in got:
            assert off > end and off % CS == 0 and n > 0, got   # sorted, merged, aligned
            end = off + n
            assert end <= size and (end % CS == 0 or end == size), got
            chunks.update(range(off // CS, _nch(end)))
        lo, hi = self.commit_at[a], (self.clock + 1 if b is None else self.commit_at[b])
        touched: set[int] = set()
        sure: set[int] = set()
        for seq, cs, ok in self.touches:
            if lo < seq < hi:
                touched |= cs
                if ok[0]:
                    sure |= cs
        inside = set(range(_nch(size)))
        old = self.snaps[a]
        differs = {c for c in inside if _chunk(old, c) != _chunk(new, c)}
        assert chunks <= touched & inside, (a, b, sorted(chunks - touched))
        assert differs <= chunks, (a, b, sorted(differs - chunks))
        assert sure & inside <= chunks, (a, b, sorted(sure & inside - chunks))


DiffModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("SHADOWPLEX_DIFF_EXAMPLES", "40")),
    stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestDiffModel = DiffModel.TestCase


@on_filesystems("xfs", "btrfs", tmp=False)
def test_diff_model_on_reflink_filesystems(pool_fs):
    """The same machine where whole chunks are preserved by reference (issue 14): the
    entries are the same, only their data is shared."""
    def machine() -> DiffModel:
        m = DiffModel(str(pool_fs))
        assert m.pool.preserve_mode == "reflink"
        return m
    run_state_machine_as_test(machine, settings=settings(
        max_examples=int(os.environ.get("SHADOWPLEX_DIFF_FS_EXAMPLES", "10")),
        stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


# --------------------------------------------------------------------------- units
def test_extents_merge_and_clip():
    assert extents([], 4096, 10 * 4096) == []
    assert extents([0, 1, 2, 5, 7, 8], 4096, 10 * 4096) == [
        (0, 3 * 4096), (5 * 4096, 4096), (7 * 4096, 2 * 4096)]
    # the last chunk is cut at the size; chunks past it are dropped
    assert extents([8, 9, 10, 11], 4096, 9 * 4096 + 512) == [(8 * 4096, 4096 + 512)]
    assert extents([12], 4096, 9 * 4096) == []


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    p.create_volume("v", 16 * CS)
    p.create_volume("w", 16 * CS)
    yield p
    assert p.check() == []
    p.close()


def _snap(p: Pool, vol: str = "v", kind: str = "differential") -> str:
    s = p.prepare_snapshot(vol, kind)
    if kind == "plex":
        while p.plex_sync_step(s.id)[0] < p.plex_sync_step(s.id)[1]:
            pass
    p.commit_snapshots([s.id])
    return s.id


def test_pairs_sizes_and_refusals(pool):
    p = pool
    a = _snap(p)
    p.write("v", 3 * CS + 10, b"x" * CS)          # chunks 3 and 4
    b = _snap(p)
    p.discard("v", 9 * CS, 1)                      # a discard is a change
    assert p.changed_extents(a, b) == [(3 * CS, 2 * CS)]
    assert p.changed_extents(b) == [(9 * CS, CS)]
    assert p.changed_extents(a) == [(3 * CS, 2 * CS), (9 * CS, CS)]
    assert p.changed_extents(a, a) == []
    # a snapshot between deleted: the record stays
    p.delete_snapshot(b)
    assert p.changed_extents(a) == [(3 * CS, 2 * CS), (9 * CS, CS)]
    # grow: the new part is not changed until written; past A's end is reported only
    # where touched, inside the newer side's size
    p.resize_volume("v", 20 * CS + 512)
    p.write("v", 20 * CS, b"y" * 512)
    c = _snap(p)
    assert p.changed_extents(a, c) == [(3 * CS, 2 * CS), (9 * CS, CS), (20 * CS, 512)]
    # refusals, one line each
    w = _snap(p, "w")
    plex = _snap(p, kind="plex")
    for args, err, text in [
            ((c, a), InvalidState, "older than"),
            ((a, w), InvalidState, "of one volume"),
            ((plex,), Unsupported, "plex"),
            ((a, plex), Unsupported, "plex"),
            (("v",), NotFound, "is a volume"),
            ((a, "v"), NotFound, "is a volume"),
            (("not-a-guid",), NotFound, "GUID"),
            (("8c3e0c1e-0000-4000-8000-000000000000",), NotFound, "no snapshot")]:
        with pytest.raises(err, match=text) as e:
            p.changed_extents(*args)
        assert "\n" not in str(e.value)
    p.promote(a)
    with pytest.raises(Unsupported, match="promoted"):
        p.changed_extents(a)
    # a promoted TO keeps its instant: diff up to it still works
    d = _snap(p)
    p.write("v", 0, b"z")
    p.promote(d)
    assert p.changed_extents(c, d) == [] and p.changed_extents(c) == [(0, CS)]


def test_revert_and_restart(tmp_path):
    p = Pool.create(str(tmp_path / "pool"), chunk_size=CS)
    p.create_volume("v", 16 * CS)
    p.write("v", 0, b"a" * 4 * CS)
    a = _snap(p)
    p.write("v", CS, b"b" * CS)
    b = _snap(p)
    p.write("v", 2 * CS, b"c" * CS)
    p.revert("v", a)        # the revert rewrites chunks 1 and 2: touched since a and b
    assert p.changed_extents(a) == [(CS, 2 * CS)]
    assert p.changed_extents(b) == [(CS, 2 * CS)]
    p.write("v", 5 * CS, b"d")
    p.abandon()            # kill -9 (the write is held: it may be lost, its record too)
    p2 = Pool.open(str(tmp_path / "pool"))
    try:
        got = p2.changed_extents(a)
        assert got in ([(CS, 2 * CS)], [(CS, 2 * CS), (5 * CS, CS)])
        assert (p2.read("v", 5 * CS, 1) == b"d") == (len(got) == 2)
        p2.flush("v")
        assert p2.changed_extents(a, b) == [(CS, CS)]
        assert p2.check() == []
    finally:
        p2.close()


def test_invalid_snapshot_refused(pool):
    p = pool
    a = _snap(p)
    with p._lock:
        p._set_state(p._snap(a), INVALID)
    with pytest.raises(SnapshotInvalid, match="back up in full"):
        p.changed_extents(a)


# --------------------------------------------------------------------------- the op
def test_pages_of_a_reply_and_their_join():
    runs = [(0, 10), (20, 10), (40, 10), (60, 10), (80, 10)]
    assert diff_page(runs, 0, 2) == ([[0, 10], [20, 10]], 40)
    assert diff_page(runs, 40, 2) == ([[40, 10], [60, 10]], 80)
    assert diff_page(runs, 80, 2) == ([[80, 10]], None)
    assert diff_page(runs, 45, 2) == ([[45, 5], [60, 10]], 80)   # cut where it resumes
    assert diff_page([], 0) == ([], None)
    # Client.snapshot_diff fetches every page and joins an extent cut at a page end
    pages = {0: ([[0, 10], [20, 5]], 25), 25: ([[25, 5], [40, 10]], 50), 50: ([], None)}
    sent = []

    def obj(op, args):
        sent.append(args)
        ext, nxt = pages[args.get("after", 0)]
        return {"snapshot_id": "A", "changed_bytes": 30, "extents": ext, "next": nxt}
    c = Client.__new__(Client)
    c._obj = obj
    res = c.snapshot_diff("A", "B")
    assert res["extents"] == [[0, 10], [20, 10], [40, 10]] and "next" not in res
    assert [a.get("after") for a in sent] == [None, 25, 50]
    assert all(a["to_snapshot_id"] == "B" for a in sent)


def test_access_rules_of_snapshot_diff():
    """A host other than the array's own names only snapshots it sees; against the live
    volume a remote one must see the volume too (its write pattern)."""
    s1, s2 = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    seen = {s1: {"hostB"}, s2: {"hostB", "hostC"}, "vol": {"hostC"}}

    class Masking:
        service_machine = "array"

        def hosts_of(self, lun):
            return frozenset(seen.get(lun, ()))
    acc = Access(Masking(), lambda set_id: [], lambda sid: None, lambda set_id: None,
                 lambda sid: "vol")

    def check(host, remote, frm, to=None):
        args = {"snapshot_id": frm, **({"to_snapshot_id": to} if to else {})}
        try:
            acc.check(host, remote, "snapshot.diff", args)
        except VssError as e:
            return e.name
        return "ok"
    assert check("array", False, s1) == "ok"                  # the array's administrator
    assert check("hostB", True, s1, s2) == "ok"
    assert check("hostB", True, s1) == "VSS_E_OBJECT_NOT_FOUND"    # not its volume
    assert check("hostC", True, s2) == "ok"
    assert check("hostC", True, s1, s2) == "VSS_E_OBJECT_NOT_FOUND"
    assert check("hostC", True, s2, s1) == "VSS_E_OBJECT_NOT_FOUND"
    assert check("hostC", False, s2, s1) == "VSS_E_OBJECT_NOT_FOUND"  # local, other host
    assert check("hostB", False, s1) == "ok"                  # local: the snapshot rule


# --------------------------------------------------------------------------- measurement
def test_measure_1tib(tmp_path, capsys):
    """Not a timed assertion: the figure for docs and the report (printed with -s).
    A 1 TiB sparse volume, 64 MiB written after the snapshot in 1024 scattered chunks."""
    chunk = 64 << 10
    p = Pool.create(str(tmp_path / "pool"), chunk_size=chunk)
    try:
        p.create_volume("big", 1 << 40)
        a = _snap(p, "big")
        nchunks = (1 << 40) // chunk
        step = nchunks // 1024
        data = b"\x5a" * chunk
        for i in range(1024):
            p.write("big", (i * step + 7) * chunk, data)
        p.flush("big")
        t0 = time.perf_counter()
        got = p.changed_extents(a)
        took = time.perf_counter() - t0
        assert len(got) == 1024 and sum(n for _, n in got) == 64 << 20
        with capsys.disabled():
            print(f"\nchanged_extents: 1 TiB volume, 64 MiB changed in 1024 extents: "
                  f"{took * 1000:.2f} ms")
    finally:
        p.close()


# --------------------------------------------------------------------------- end to end
@pytest.mark.kernel
def test_cli_snapshot_diff(tmp_path, sockdir):
    MiB = 1 << 20
    d = start_daemon(tmp_path, sockdir, {"v": 64 * MiB})
    try:
        cs = DEFAULT_CHUNK
        image = os.path.join(d.mount, "volumes", "v.img")
        with open(image, "r+b") as f:
            f.write(b"base" * 4096)
        a = d.json("snapshot", "create", "v")["snapshots"][0]["id"]
        wrote = [3 * MiB + 100, 17 * MiB, 17 * MiB + cs, 40 * MiB + 5]
        with open(image, "r+b") as f:
            for off in wrote:
                f.seek(off)
                f.write(b"new")
            os.fsync(f.fileno())
        b = d.json("snapshot", "create", "v")["snapshots"][0]["id"]
        with open(image, "r+b") as f:
            f.seek(60 * MiB)
            f.write(b"later")
        expect_ab = [{"offset": 3 * MiB, "length": cs},
                     {"offset": 17 * MiB, "length": 2 * cs},
                     {"offset": 40 * MiB, "length": cs}]
        res = d.json("snapshot", "diff", a, b)
        assert res == expect_ab
        live = d.json("snapshot", "diff", a)
        assert live == [*expect_ab, {"offset": 60 * MiB, "length": cs}]
        table = d.ok("snapshot", "diff", a, b).stdout
        assert "OFFSET" in table and "3.0 MiB" in table
        assert f"3 extents, 256.0 KiB changed of 64.0 MiB (chunk {cs // 1024} KiB)" in table
        # the CLI's start-up: a request imports the client side only
        assert not _heavy_imports(d.socket, "snapshot", "diff", a, b, "--json")
        # one extent a line (json's C encoder), the same through make install's launcher
        # (Python without site: tools/launcher.py)
        out = d.ok("snapshot", "diff", a, "--json").stdout
        assert out.splitlines()[1] == f'  {{"offset": {3 * MiB}, "length": {cs}}},'
        launcher = tmp_path / "shadowplex"
        launcher.write_text(tools_launcher.text(sys.executable, [str(ROOT),
                                                                 *tools_launcher.site_dirs()]))
        launcher.chmod(0o755)
        res = subprocess.run([str(launcher), "--socket", d.socket, "snapshot", "diff", a,
                              "--json"], capture_output=True, text=True, timeout=60,
                             check=False, cwd=str(tmp_path))
        assert res.returncode == 0 and res.stdout == out, res.stderr
        bad = d.run("snapshot", "diff", b, a)
        assert bad.returncode == 1 and "older" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
        # a restart keeps the record
        d.stop()
        d = start_daemon(tmp_path, sockdir, {})
        assert d.json("snapshot", "diff", a, b) == expect_ab
        assert json.loads(d.ok("snapshot", "diff", a, "--json").stdout)[-1]["offset"] == \
            60 * MiB
    finally:
        d.stop()



# what a plain request must not import (docs/performance.md, "The CLI's start-up"): the
# engine, the documents, certificates (cryptography), trio/pyfuse3, the bench, metadata;
# dataclasses (inspect, ast), typing, socket.py (its enums; _socket is enough), signal,
# provider.vss (its enums), tqdm -- a few ms each
HEAVY = ("blockstore", "fuse_mount", "trio", "pyfuse3", "cryptography", "nbd.pki",
         "provider.documents", "provider.coordinator", "tools.bench.command",
         "importlib.metadata", "dataclasses", "inspect", "typing", "socket", "selectors",
         "signal", "provider.vss", "tqdm", "ssl")


def _heavy_imports(socket: str, *argv: str) -> list[str]:
    """The HEAVY modules `python -X importtime -m tools.cli --socket SOCKET argv...`
    imported (the command must succeed)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "tools.cli", "--socket",
                          socket, *argv], cwd=str(ROOT), env=ENV, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    names = [line.rpartition("|")[2].strip() for line in res.stderr.splitlines()
             if line.startswith("import time:")]
    assert "tools.commands" in names and "provider.client" in names   # the parse is right
    return sorted({n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY)})
