"""Issue 12 #4 and #5 through the kernel: the real daemon, the real CLI, SIGINT.

* Cancellation tells the truth: `shadowplex revert|promote|split|scrub` interrupted with
  SIGINT at a random moment answers within about a second (measured; bounded at
  ANSWER_BOUND), and what it printed is what the daemon did: "nothing changed" (the
  snapshot still differential, no new volume, the volume's old content), "completed"
  (exit 0, the result), or "continues in the daemon" (a revert rolls forward) -- checked
  once `status` shows no operation running.
* The kernel never serves stale data: every served file (volumes/, exposed/, .shadow/,
  hosts/) reads the same buffered (page cache, warmed before the operation) and with
  O_DIRECT (the daemon) after every operation that changes what a path reads without a
  write through FUSE: revert (completed or interrupted), promote, split, an exposure
  name moved to another snapshot, a resize, LUN masking (present, import); and the
  names a volume or snapshot delete (or a failed expose) took away are gone from the
  kernel when the command returns.

The random moments come from SHADOWPLEX_TEST_SEED (printed on failure); the volume size
from SHADOWPLEX_CANCEL_MIB (default 512: each operation takes a second or more).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Daemon, start_daemon
from support import start_thread

from blockstore import Pool
from provider.client import Client, ControlError
from provider.vss import Attr, Context

pytestmark = pytest.mark.kernel

MIB = 1 << 20
SIZE = int(os.environ.get("SHADOWPLEX_CANCEL_MIB", "512")) * MIB
HOLE = SIZE - SIZE // 16        # the snapshot's content ends in a hole (reads as zeros)
SEED = int(os.environ.get("SHADOWPLEX_TEST_SEED") or random.randrange(1 << 32))
ANSWER_BOUND = 5.0              # s from SIGINT to the CLI's exit (the target is < 1 s)
ANSWERS: list[tuple[str, float, float]] = []   # (op, delay, answer time), for the record


def old_piece(i: int) -> bytes:
    """MiB number i of the snapshot's content."""
    return bytes(MIB) if i * MIB >= HOLE else (b"S%07d" % i) * (MIB // 8)


def new_piece(i: int) -> bytes:
    """MiB number i of the volume's content (written after the snapshot)."""
    return (b"V%07d" % i) * (MIB // 8)


@dataclass
class Array:
    d: Daemon
    sid: str

    def client(self) -> Client:
        return self.d.client()

    def path(self, *parts: str) -> str:
        return os.path.join(self.d.mount, *parts)


def _build_pool(pool_dir: str, size: int = SIZE) -> str:
    """Volume v holding new_piece()s, and its persistent differential snapshot holding
    old_piece()s, made in-process (much faster than through FUSE)."""
    p = Pool.create(pool_dir)
    try:
        p.create_volume("v", size)
        for i in range(min(size, HOLE) // MIB):
            p.write("v", i * MIB, old_piece(i))
        s = p.prepare_snapshot("v", attributes=int(Context.APP_ROLLBACK)
                               | int(Attr.DIFFERENTIAL))
        p.commit_snapshots([s.id])
        for i in range(size // MIB):
            p.write("v", i * MIB, new_piece(i))
        p.flush("v")
        return s.id
    finally:
        p.close()


@pytest.fixture
def array(tmp_path: Path) -> Iterator[Array]:
    yield from _array(tmp_path, SIZE)


@pytest.fixture
def big_array(tmp_path: Path) -> Iterator[Array]:
    """Four times as big: a revert that surely runs longer than the CLI waits."""
    yield from _array(tmp_path, 4 * SIZE)


def _array(tmp_path: Path, size: int) -> Iterator[Array]:
    sockdir = tempfile.mkdtemp(prefix="spx-cancel-")
    d = None
    try:
        sid = _build_pool(str(tmp_path / "pool"), size)
        d = start_daemon(tmp_path, sockdir, {})
        yield Array(d, sid)
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


# --------------------------------------------------------------------------- reading
def served_files(a: Array) -> list[str]:
    """Every file the mount serves: volumes/, exposed/, each snapshot's .shadow/ path,
    and the same in every host view."""
    roots = [a.d.mount]
    hosts = a.path("hosts")
    if os.path.isdir(hosts):
        roots += [os.path.join(hosts, h) for h in sorted(os.listdir(hosts))]
    with a.client() as c:
        sids = [s["snapshot_id"] for s in c.snapshot_list(context="all")]
    out = []
    for r in roots:
        for sub in ("volumes", "exposed"):
            if os.path.isdir(os.path.join(r, sub)):
                out += [os.path.join(r, sub, n) for n in sorted(os.listdir(os.path.join(r, sub)))]
        out += [p for p in (os.path.join(r, ".shadow", f"{s}.img") for s in sids)
                if os.path.exists(p)]
    return out


def read_buffered(path: str) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(MIB):
            yield piece


def read_direct(path: str) -> Iterator[bytes]:
    """The file through O_DIRECT: the daemon's answer, not the page cache (the buffer
    is mmap'ed: page-aligned, as O_DIRECT needs)."""
    buf = mmap.mmap(-1, MIB)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off = 0
        while n := os.preadv(fd, [buf], off):
            yield bytes(buf[:n])
            off += n
    finally:
        os.close(fd)
        buf.close()


def warm(paths: list[str]) -> None:
    """Fill the page cache with what these files read now."""
    for p in paths:
        for _ in read_buffered(p):
            pass


def stale_pieces(path: str) -> list[int]:
    """The MiB pieces where a buffered read and an O_DIRECT read of path disagree."""
    out = []
    for i, (b, d) in enumerate(zip(read_buffered(path), read_direct(path), strict=True)):
        if b != d:
            out.append(i)
    return out


def assert_coherent(a: Array, why: str) -> None:
    bad = {p: s for p in served_files(a) if (s := stale_pieces(p))}
    assert not bad, (f"{why}: buffered and O_DIRECT reads disagree (stale page cache): "
                     + "; ".join(f"{p}: {len(s)} MiB from MiB {s[0]}" for p, s in bad.items()))


def holds(path: str, piece: Any) -> bool:
    """Whether path reads (O_DIRECT) piece(0), piece(1), ... to its end."""
    return all(got == piece(i) for i, got in enumerate(read_direct(path)))


# --------------------------------------------------------------------------- the CLI
def cli(a: Array, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tools.cli", "--socket", a.d.socket,
                             *args], cwd=str(ROOT), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    answer: float | None    # s from SIGINT to exit (None: it ended before the signal)

    def says(self, text: str) -> bool:
        return text in self.err


def interrupt(proc: subprocess.Popen[str], delay: float, op: str) -> Outcome:
    time.sleep(delay)
    answer = None
    if proc.poll() is None:
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        answer = time.monotonic() - t
        ANSWERS.append((op, delay, answer))
    out, err = proc.communicate(timeout=30)
    return Outcome(proc.returncode, out, err.strip(), answer)


def wait_idle(a: Array, timeout: float = 120) -> list[str]:
    """Wait until status shows no operation running; the states it showed meanwhile."""
    seen = []
    end = time.monotonic() + timeout
    with a.client() as c:
        while ops := c.status().get("operations", []):
            seen += [o["state"] for o in ops]
            assert time.monotonic() < end, f"still running after {timeout} s: {ops}"
            time.sleep(0.1)
    return seen


def _delay(op: str, trial: int) -> float:
    # from just after the CLI starts (python's start-up is ~0.2 s) to past the op's end
    return random.Random(f"{SEED}-{op}-{trial}").uniform(0.15, 1.8)


def _classify(o: Outcome, why: str) -> str:
    """What the CLI said happened: completed | unchanged | continues (a revert rolling
    forward) | completes (past its point of no return) | cancelling (either, later)."""
    if o.rc == 0:
        assert o.answer is None or o.says("had already completed"), (why, o)
        return "completed"
    if o.rc == -signal.SIGINT:   # the signal came before main() or after its return
        if o.out:
            assert not o.err, (why, o)
            return "completed"
        # python's own start-up (importing tools.cli): a traceback, nothing asked yet
        assert not o.err or o.err.endswith("KeyboardInterrupt"), (why, o)
        return "unchanged"
    assert o.rc == 130, (why, o)
    if o.says("is being cancelled in the daemon"):
        return "cancelling"
    if o.says("continues in the daemon"):
        return "continues"
    if o.says("completes in the daemon"):
        return "completes"
    if o.err == "shadowplex: interrupted" or o.says("nothing changed"):
        return "unchanged"
    raise AssertionError(f"{why}: unexpected answer {o}")


def _answered_in_time(o: Outcome, why: str) -> None:
    if o.answer is not None:
        assert o.answer < ANSWER_BOUND, (why, o)


# --------------------------------------------------------------------------- interrupted
@pytest.mark.parametrize("trial", range(3))
def test_interrupted_revert_tells_the_truth(array: Array, trial: int) -> None:
    a = array
    delay = _delay("revert", trial)
    why = f"revert, SIGINT after {delay:.2f} s (SHADOWPLEX_TEST_SEED={SEED})"
    vol = a.path("volumes", "v.img")
    warm(served_files(a))
    o = interrupt(cli(a, "revert", a.sid), delay, "revert")
    _answered_in_time(o, why)
    said = _classify(o, why)
    assert said in ("completed", "unchanged", "continues"), (why, o)   # never half-way
    wait_idle(a)
    assert_coherent(a, why)
    want = new_piece if said == "unchanged" else old_piece
    assert holds(vol, want), f"{why}: the CLI said {said!r} ({o.err}) but the volume " \
        "holds the other content"


@pytest.mark.parametrize("trial", range(3))
def test_interrupted_promote_tells_the_truth(array: Array, trial: int) -> None:
    a = array
    delay = _delay("promote", trial)
    why = f"promote, SIGINT after {delay:.2f} s (SHADOWPLEX_TEST_SEED={SEED})"
    warm(served_files(a))
    o = interrupt(cli(a, "promote", a.sid), delay, "promote")
    _answered_in_time(o, why)
    said = _classify(o, why)
    assert said != "continues", (why, o)
    wait_idle(a)
    with a.client() as c:
        kind = c.snapshot_show(a.sid)["kind"]
    if said in ("completed", "completes"):
        assert kind == "full", (why, o)
    elif said == "unchanged":
        assert kind == "differential", (why, o)
    assert holds(a.path(".shadow", f"{a.sid}.img"), old_piece), why
    assert holds(a.path("volumes", "v.img"), new_piece), why
    assert_coherent(a, why)


@pytest.mark.parametrize("trial", range(3))
def test_interrupted_split_tells_the_truth(array: Array, trial: int) -> None:
    a = array
    delay = _delay("split", trial)
    why = f"split, SIGINT after {delay:.2f} s (SHADOWPLEX_TEST_SEED={SEED})"
    warm(served_files(a))
    o = interrupt(cli(a, "split", a.sid, "n"), delay, "split")
    _answered_in_time(o, why)
    said = _classify(o, why)
    assert said != "continues", (why, o)
    wait_idle(a)
    with a.client() as c:
        vols = [v["name"] for v in c.volume_list()]
        snaps = {s["snapshot_id"]: s["kind"] for s in c.snapshot_list(context="all")}
    split = "n" in vols
    assert split == (a.sid not in snaps), (why, vols, snaps)   # all or nothing
    if said in ("completed", "completes"):
        assert split, (why, o)
    elif said == "unchanged":
        assert not split and snaps[a.sid] == "differential", (why, o, snaps)
    if split:
        assert holds(a.path("volumes", "n.img"), old_piece), why
    assert_coherent(a, why)


@pytest.mark.parametrize("trial", range(2))
def test_interrupted_scrub_answers_and_stops(array: Array, trial: int) -> None:
    a = array
    delay = _delay("scrub", trial)
    why = f"scrub, SIGINT after {delay:.2f} s (SHADOWPLEX_TEST_SEED={SEED})"
    o = interrupt(cli(a, "scrub"), delay, "scrub")
    _answered_in_time(o, why)
    said = _classify(o, why)
    if said == "completed":
        assert o.out.startswith("clean: scrub of the pool: "), (why, o)   # and what it read
    t = time.monotonic()
    wait_idle(a)
    assert time.monotonic() - t < ANSWER_BOUND, f"{why}: the scrub went on after the answer"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_revert_that_continues_is_shown_by_status(big_array: Array, as_json: bool) -> None:
    """Interrupted early, a revert says it continues and `status` lists it until it
    has completed (the moment is chosen from the revert's own progress). With --json
    the answer is the JSON error object with its outcome."""
    a = big_array

    def early(o: dict[str, Any]) -> bool:
        return bool(o["total"]) and 0 < o["done"] < o["total"] // 4
    proc = cli(a, "revert", a.sid, *(["--json"] if as_json else []))
    try:
        with a.client() as c:
            end = time.monotonic() + 30
            while not any(early(o) for o in c.status().get("operations", [])):
                assert time.monotonic() < end and proc.poll() is None
                time.sleep(0.02)
    finally:
        o = interrupt(proc, 0, "revert")
    assert o.rc == 130 and o.says("continues in the daemon"), o
    if as_json:
        err = json.loads(o.err)["error"]   # one line, nothing else on stderr
        assert (err["name"], err["code"], err["outcome"]) == ("E_ABORT", 130, "continues")
        assert o.out == ""
    assert set(wait_idle(a)) <= {"rolling-forward"}
    assert holds(a.path("volumes", "v.img"), old_piece)
    assert_coherent(a, "revert continued in the background")


# --------------------------------------------------------------------------- completed
def test_page_cache_after_a_revert(array: Array) -> None:
    a = array
    warm(served_files(a))
    with a.client() as c:
        c.revert(a.sid)
    assert holds(a.path("volumes", "v.img"), old_piece)
    assert_coherent(a, "after revert")


def test_page_cache_after_promote_and_split(array: Array) -> None:
    a = array
    warm(served_files(a))
    with a.client() as c:
        assert c.promote(a.sid)["kind"] == "full"
        assert_coherent(a, "after promote")
        warm(served_files(a))
        c.split(a.sid, "n")
    assert holds(a.path("volumes", "n.img"), old_piece)
    assert_coherent(a, "after split")


def test_exposure_name_moved_to_another_snapshot(array: Array) -> None:
    """exposed/x.img names snapshot 1, then snapshot 2: opened right after, the path
    reads snapshot 2 (not the kernel's cached entry for snapshot 1)."""
    a = array
    x = a.path("exposed", "x.img")
    with a.client() as c:
        s2 = c.snapshot_create(["v"], context="app-rollback")["snapshots"][0]["snapshot_id"]
        c.expose(a.sid, name="x")
        warm(served_files(a))
        os.stat(x)   # the kernel caches this name (1 s) ...
        c.unexpose(a.sid)
        c.expose(s2, name="x")
    assert holds(x, new_piece)   # ... and must not use it now
    assert_coherent(a, "after the exposure name moved")


def test_resize_is_seen_at_once(array: Array) -> None:
    """A grown volume's new size (and its new zeros) are there at once, not after the
    kernel's 1 s attribute cache: `losetup -c` right after a resize must see it."""
    a = array
    vol = a.path("volumes", "v.img")
    warm([vol])
    with a.client() as c:
        assert os.stat(vol).st_size == SIZE   # the kernel caches this size (1 s) ...
        c.volume_resize("v", SIZE + 64 * MIB)   # ... and must not use it now
    assert os.stat(vol).st_size == SIZE + 64 * MIB
    with open(vol, "rb") as f:
        f.seek(SIZE)
        assert f.read(MIB) == bytes(MIB)
    assert_coherent(a, "after resize")


def test_lun_masking_hides_names_at_once(array: Array) -> None:
    """A volume presented to another host only, a set imported by another host: the
    names this host had are gone when the command returns (LUN masking is a security
    boundary; the kernel's cached entry must not open them for another second)."""
    a = array
    vol = a.path("volumes", "v.img")
    with a.client() as c:
        t = c.snapshot_create(["v"], context="app-rollback", attributes="transportable")
        sid = t["snapshots"][0]["snapshot_id"]
        shadow = a.path(".shadow", f"{sid}.img")
        doc = c.export(t["set_id"])["document"]
        os.stat(shadow)   # cached by the kernel (1 s) ...
        with Client(a.d.socket, host="hostB") as b:
            b.import_set(doc)
            with pytest.raises(FileNotFoundError):   # ... and not used
                open(shadow, "rb").close()
            assert next(read_direct(a.path("hosts", "hostB", ".shadow", f"{sid}.img"))) \
                == next(read_direct(vol))
        local = c.status()["service_machine"]
        vol_b = a.path("hosts", "hostB", "volumes", "v.img")
        for _ in range(30):   # the stale entry lived a few ms to 1 s: try it often
            os.stat(vol)
            c.volume_present("v", ["hostB"])
            with pytest.raises(FileNotFoundError):
                open(vol, "rb").close()
            assert next(read_direct(vol_b)) == new_piece(0)
            c.volume_present("v", [local])
            with pytest.raises(FileNotFoundError):
                open(vol_b, "rb").close()
            assert next(read_direct(vol)) == new_piece(0)
    assert_coherent(a, "after the masking changed")


def test_deleted_names_are_gone_at_once(tmp_path: Path) -> None:
    """`volume delete` and `snapshot delete` drop their names from the kernel before
    they reply: right after, a stat of MOUNT/volumes/<name>.img, .shadow/<id>.img,
    exposed/<name>.img (and the same in a host's view) is ENOENT, not the kernel's
    cached entry of the deleted LUN (1 s), and a volume created again under the same
    name opens at once (the cached entry led to the deleted LUN: ENOENT). Many times:
    the stale entry lived from a few ms to a second."""
    sockdir = tempfile.mkdtemp(prefix="spx-names-")
    d = None
    try:
        d = start_daemon(tmp_path, sockdir, {"v": 4 * MIB}, {"fsfreeze": False},
                         self_guard=0.0)
        w = os.path.join(d.mount, "volumes", "w.img")
        with d.client() as c, Client(d.socket, host="hostB") as b:
            for i in range(20):
                c.volume_create("w", "4M")
                os.stat(w)   # cached by the kernel (1 s) ...
                c.volume_delete("w")
                with pytest.raises(FileNotFoundError):   # ... and not used
                    os.stat(w)
                with pytest.raises(FileNotFoundError):
                    open(w, "rb").close()
                c.volume_create("w", "4M")   # the same name, another LUN: at once
                with open(w, "rb") as f:
                    assert f.read(4096) == bytes(4096)
                c.volume_delete("w")
                for who, view in ((c, d.mount), (b, os.path.join(d.mount, "hosts", "hostB"))):
                    sid = who.snapshot_create(["v"], context="app-rollback")[
                        "snapshots"][0]["snapshot_id"]
                    who.expose(sid, name=f"x{i}")
                    names = [os.path.join(view, ".shadow", f"{sid}.img"),
                             os.path.join(view, "exposed", f"x{i}.img")]
                    for n in names:
                        os.stat(n)
                    assert who.snapshot_delete(snapshot_id=sid)["deleted"] == [sid]
                    for n in names:
                        with pytest.raises(FileNotFoundError):
                            os.stat(n)
                        with pytest.raises(FileNotFoundError):
                            open(n, "rb").close()
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_failed_expose_leaves_no_cached_name(tmp_path: Path) -> None:
    """`expose ID --name z --mount DIR` names the exposure before it mounts; when the
    mount fails (DIR not empty) the name goes again before the error is returned: a
    reader that looked z up meanwhile finds it gone right after, not for another
    second through the kernel's cached entry."""
    sockdir = tempfile.mkdtemp(prefix="spx-names-")
    d = None
    stop = threading.Event()
    try:
        d = start_daemon(tmp_path, sockdir, {"v": 4 * MIB}, {"fsfreeze": False},
                         self_guard=0.0)
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "file").write_text("not empty\n")
        z = os.path.join(d.mount, "exposed", "z.img")
        seen = threading.Event()

        def look() -> None:   # the name exists only while the expose runs
            while not stop.is_set():
                try:
                    os.stat(z)
                    seen.set()
                except FileNotFoundError:
                    pass
        errors: list[BaseException] = []
        t = start_thread(look, errors, "stat z")
        with d.client() as c:
            sid = c.snapshot_create(["v"], context="app-rollback")["snapshots"][0][
                "snapshot_id"]
            tries = 0
            while not seen.is_set():
                tries += 1
                assert tries <= 50, "the reader never saw the name during an expose"
                with pytest.raises(ControlError) as ei:
                    c.expose(sid, name="z", mount=str(busy))
                assert ei.value.name == "E_INVALIDARG", ei.value
            assert c.snapshot_show(snapshot_id=sid)["exposed_name"] is None
            stop.set()
            t.join(10)
            assert not errors, errors
            with pytest.raises(FileNotFoundError):
                os.stat(z)
    finally:
        stop.set()
        if d is not None:
            d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _report_answers() -> Iterator[None]:
    yield
    if ANSWERS:
        print(f"\nCtrl-C answer times (SHADOWPLEX_TEST_SEED={SEED}):")
        for op, delay, t in ANSWERS:
            print(f"  {op:8} SIGINT at {delay:.2f} s -> answered in {t:.2f} s")
