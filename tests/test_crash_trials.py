"""Crash trials (issue 8, item 1): kill -9 `serve` at a random moment while a writer
writes fsync'ed, checksummed files through a loop-mounted ext4 on one of its volumes and
snapshots are being created, deleted and promoted; restart on the same pool and prove:

* every snapshot still listed is byte-exact (xxh3-128 of its whole device object
  MOUNT/.shadow/<id>.img) equal to its creation-time manifest      -- invariant 1;
* no snapshot whose commit was acknowledged (and whose deletion was not requested) is
  missing, and none whose deletion was acknowledged is back          -- durable commit
  and delete records (invariant 4);
* the daemon's `check` op reports no problems                         -- check();
* `e2fsck -fn` of every snapshot's device object is clean: the coordinator's fsfreeze
  writer froze the loop-mounted ext4 for each commit, so no journal replay is needed;
* after mounting the volume again (ext4 replays its own journal) every file the writer
  logged exists with its logged xxh3 -- each line of the log was written only after the
  file's data and its directory were fsync'ed, so these are exactly the fsync-acknowledged
  writes (the held-writes promise of the README: flushed writes survive a kill -9).

Trials share one pool: the first trial creates it, mkfs's the volume and mounts it; every
later trial starts from the daemon the previous trial restarted for its verification
(the ext4 stays, the snapshots persist -- app-rollback context -- and are verified again
after every later crash). The kill may hit anywhere: while a set is being created (during
the freeze, the commit, the reply), while a manifest is being read, during a delete or a
promote, or while only the writer runs. Outcomes the test cannot know in advance are accepted both
ways and counted: a create in flight may or may not have committed (if it did, the new
snapshot is adopted: fsck'ed now, its manifest taken after the restart and checked after
every later crash); a delete in flight may or may not have happened; a promote in
flight may or may not have made the snapshot a full copy (its content must be the same
either way, and an acknowledged promote must still be one after the restart); a
snapshot whose commit was acknowledged but whose manifest read was cut short must be
present, and its manifest is taken after the restart.

Profiles: SHADOWPLEX_CRASH_TRIALS (default 10: the CI profile; the long profile is 200;
SHADOWPLEX_CRASH_FS_TRIALS, default 3, with the pool on XFS and on btrfs: tests/poolfs.py),
SHADOWPLEX_CRASH_SEED (default: random; printed, and named in every failure message, so a
failing run can be replayed). A one-line summary is printed (see it with -s).

Teardown after each kill (and in `finally`, whatever failed): thaw the ext4 if the dead
daemon left it frozen (a writer blocked on a frozen filesystem cannot even be killed),
kill the writer, unmount the ext4 (`umount`, else `umount -l`), detach the loop device,
`fusermount3 -u -z` the dead FUSE mount, remove the stale control socket. The session
guard in conftest.py fails the run if a mount, a loop device or a daemon is left.

A killed daemon that does not finish dying ("killed daemon hung" in the summary) is a
failure (SHADOWPLEX_CRASH_STRICT=0 only counts it); its kernel stacks (every thread's
/proc/PID/task/TID/stack, wchan, comm, the status, the FUSE connections' waiting counts
and every other D-state task) are printed and put in the failure message, then the test
aborts the FUSE connection with `umount -f MOUNT`, as an admin would. Both causes found
so far were a daemon thread blocked in the kernel on the daemon's OWN mount when the
kill came: (1) FIFREEZE/FITHAW issued in a daemon thread, waiting for writeback through
the loop device (~1 trial in 10; fixed: a helper process issues them); (2) the fsfreeze
writer's discovery realpath'ing/stat'ing MOUNT/volumes/v.img from a trio worker thread
-- once the trio thread had read that request, the killed worker waited for its answer
uninterruptibly in request_wait_answer, so the daemon stayed a zombie (~1 in 10-70;
fixed: discovery compares paths lexically). Such a thread never exits, so /dev/fuse is
never closed and the connection never aborts. Every trial daemon therefore runs with
tests/fuse_self_guard.py, which logs each FUSE request coming from one of the daemon's
own threads, and the test fails on any: that catches the whole class at once, not only
when a kill happens to land inside the window
(`test_no_fuse_request_from_the_daemons_own_threads` holds such a request in flight and
kills the daemon then).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xxhash
from harness import Daemon, start_daemon
from poolfs import on_filesystems
from support import mounted, run_cmd

from fuse_mount import loopdev
from provider.client import ControlError

pytestmark = pytest.mark.kernel

TRIALS = int(os.environ.get("SHADOWPLEX_CRASH_TRIALS", "10"))
# with the pool on a loop-mounted XFS and btrfs (issue 14; on btrfs the daemon preserves
# every whole chunk by reference, on XFS writes of 256 KiB and more, which FUSE's 128 KiB
# requests never are): fewer trials each, for CI time
FS_TRIALS = int(os.environ.get("SHADOWPLEX_CRASH_FS_TRIALS", "3"))
SEED = int(os.environ.get("SHADOWPLEX_CRASH_SEED", str(random.SystemRandom().randrange(1 << 32))))
STRICT = os.environ.get("SHADOWPLEX_CRASH_STRICT", "1") not in ("", "0")   # hung = failure
VOLUME_SIZE = 56 << 20        # 48-64 MiB: small enough to hash and fsck every snapshot
KEEP_SNAPSHOTS = 3            # after each verification, delete the oldest beyond this
FILES_PER_TRIAL = 400         # the writer stops writing (and idles) after this many
# No hook scripts of the host; fsfreeze stays on (the default): it is what makes every
# snapshot of the mounted ext4 clean for e2fsck -fn.
CONFIG: dict[str, Any] = {"hooks_dir": None}

# The writer: new files only (a rewritten name whose last write was not acknowledged
# could legitimately hold either content), data fsync'ed, then the directory fsync'ed
# (the name must be durable too), and only then the log line, itself fsync'ed.
WRITER = r"""
import os, random, sys, xxhash
root, log_path, seed, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
os.makedirs(root, exist_ok=True)
dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(limit):
    name = f"f{i:05d}"
    data = rnd.randbytes(rnd.choice((512, 4096, 12288, 65536, 131072)) + rnd.randrange(4096))
    fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dfd)
    os.write(log, f"{name} {xxhash.xxh3_128_hexdigest(data)}\n".encode())
    os.fsync(log)
os.write(log, b"# done\n")
os.fsync(log)
sys.stdin.read()     # idle until killed (or stdin closes)
"""


def xxh3_file(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def e2fsck_clean(path: str) -> str | None:
    """None if `e2fsck -fn` finds nothing, else its output."""
    res = run_cmd("e2fsck", "-fn", path, check=False)
    return None if res.returncode == 0 else f"rc {res.returncode}: {res.stdout}{res.stderr}"


@dataclass
class Ledger:
    """What the requester knows, across trials."""
    manifests: dict[str, str] = field(default_factory=dict)   # sid -> xxh3 of its device
    order: list[str] = field(default_factory=list)            # creation order
    deleted: set[str] = field(default_factory=set)            # delete acknowledged
    # per-trial, about the moment of the kill:
    unmanifested: set[str] = field(default_factory=set)       # committed, manifest cut short
    deleting: set[str] = field(default_factory=set)           # delete sent, no reply
    creating: bool = False                                    # create sent, no reply
    kinds: dict[str, str] = field(default_factory=dict)       # sid -> differential/plex/full
    promoting: set[str] = field(default_factory=set)          # promote sent, no reply
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Counts:
    trials: int = 0
    snapshots_created: int = 0
    snapshots_deleted: int = 0
    promotes: int = 0                    # differential -> full, acknowledged
    snapshot_verifications: int = 0      # byte-exact manifest matches after a restart
    fscks: int = 0
    files_verified: int = 0
    adopted_in_flight: int = 0           # a create cut by the kill that had committed
    lost_in_flight: int = 0              # ... that had not
    late_manifests: int = 0              # committed, manifest taken after the restart
    promotes_in_flight: dict[str, int] = field(default_factory=dict)  # done / not done
    fuse_aborts: dict[str, int] = field(default_factory=dict)  # killed daemon hung
    kills_while_writing: int = 0
    kills: dict[str, int] = field(default_factory=dict)   # what the kill cut

    def line(self) -> str:
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
        return (f"crash trials: {self.trials} trials (seed {SEED}), "
                f"{self.snapshot_verifications} snapshot verifications byte-exact, "
                f"{self.files_verified} fsync'ed files verified, {self.fscks} e2fsck clean; "
                f"{self.snapshots_created} snapshots created, {self.snapshots_deleted} "
                f"deleted, {self.promotes} promoted; in-flight creates adopted "
                f"{self.adopted_in_flight} / lost {self.lost_in_flight}, in-flight promotes "
                f"{fmt(self.promotes_in_flight)}, late manifests {self.late_manifests}; "
                "kill cut: "
                f"{fmt(self.kills)} (writer busy in {self.kills_while_writing}); killed "
                f"daemon hung, FUSE connection aborted: {fmt(self.fuse_aborts)}")


class SnapshotOps(threading.Thread):
    """1-3 creates (differential or plex, app-rollback: persistent), each followed by its
    manifest and, sometimes, the delete of an older snapshot or the promote (differential
    -> full copy) of a differential one; sometimes a promote comes before a create. Stops
    at the first error (the daemon was killed); `phase` says what it was doing then."""

    def __init__(self, d: Daemon, ledger: Ledger, counts: Counts, rnd: random.Random) -> None:
        super().__init__(name="snapshot-ops", daemon=True)
        self.d, self.ledger, self.counts, self.rnd = d, ledger, counts, rnd
        self.phase = "starting"
        self.error: BaseException | None = None
        self.finished = False

    def run(self) -> None:
        led = self.ledger
        try:
            with self.d.client(client="crash-trials") as c:
                for _ in range(self.rnd.randint(1, 3)):
                    if self.rnd.random() < 0.3:    # an older differential, first
                        self._promote_one(c)
                    self.phase = "idle"
                    time.sleep(self.rnd.uniform(0.0, 0.4))
                    kind = self.rnd.choice(("differential", "plex"))
                    self.phase = f"create-{kind}"
                    with led.lock:
                        led.creating = True
                    res = c.snapshot_create(["v"], context="app-rollback", kind=kind)
                    sid = res["snapshots"][0]["snapshot_id"]
                    dev = res["snapshots"][0]["device_object"]
                    with led.lock:
                        led.creating = False
                        led.unmanifested.add(sid)
                        led.order.append(sid)
                        led.kinds[sid] = res["snapshots"][0]["kind"]
                    self.counts.snapshots_created += 1
                    self.phase = "manifest"
                    digest = xxh3_file(dev)
                    with led.lock:
                        led.manifests[sid] = digest
                        led.unmanifested.discard(sid)
                    roll = self.rnd.random()
                    if roll < 0.35:
                        self._delete_older(c, sid)
                    elif roll < 0.7:
                        self._promote_one(c)
                self.phase = "done"
                self.finished = True
        except (ControlError, OSError) as e:     # the kill: ENOTCONN, EOF, reset...
            self.error = e
        except BaseException as e:   # noqa: BLE001 - anything else is a test bug: report it
            self.error = e
            self.phase = f"unexpected {type(e).__name__}"

    def _promote_one(self, c: Any) -> None:
        """Promote (differential -> full copy) a manifested differential snapshot."""
        led = self.ledger
        diffs = [s for s in led.order if s in led.manifests
                 and led.kinds.get(s) == "differential"]
        if not diffs:
            return
        target = self.rnd.choice(diffs)
        self.phase = "promote"
        with led.lock:
            led.promoting.add(target)
        info = c.promote(target)
        assert info["kind"] == "full", f"promote {target}: {info['kind']}"
        with led.lock:
            led.promoting.discard(target)
            led.kinds[target] = "full"
        self.counts.promotes += 1

    def _delete_older(self, c: Any, newest: str) -> None:
        """Delete a manifested snapshot older than ``newest``."""
        led = self.ledger
        live = [s for s in led.order if s in led.manifests and s != newest]
        if not live:
            return
        victim = self.rnd.choice(live)
        self.phase = "delete"
        with led.lock:
            led.deleting.add(victim)
        c.snapshot_delete(snapshot_id=victim)
        with led.lock:
            led.deleting.discard(victim)
            self._forget(victim)
        self.counts.snapshots_deleted += 1

    def _forget(self, sid: str) -> None:
        led = self.ledger
        led.deleted.add(sid)
        led.manifests.pop(sid, None)
        led.unmanifested.discard(sid)
        led.kinds.pop(sid, None)


@dataclass
class Stack:
    """The ext4 on v.img through a loop device, mounted at fsdir."""
    dev: str | None = None
    fsdir: str = ""
    writer: subprocess.Popen[bytes] | None = None


def stop_writer(st: Stack) -> None:
    if st.writer is None:
        return
    if st.writer.poll() is None:
        st.writer.kill()
        try:
            st.writer.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the writer (pid {st.writer.pid}) did not die after "
                                 "SIGKILL (blocked on a frozen filesystem?)") from None
    if st.writer.stdin is not None:
        st.writer.stdin.close()
    st.writer = None


def teardown_stack(st: Stack) -> None:
    """Tear the ext4 + loop stack down, over a live or a dead daemon; never raises before
    it has tried every step."""
    errors: list[str] = []
    if st.fsdir and mounted(st.fsdir):
        # A daemon killed between freeze and thaw leaves the ext4 frozen: thaw it, else
        # the writer sleeps uninterruptibly in it. EINVAL (not frozen) is the usual case.
        run_cmd("fsfreeze", "--unfreeze", st.fsdir, check=False, timeout=30)
    try:
        stop_writer(st)
    except AssertionError as e:
        errors.append(str(e))
    if st.fsdir and mounted(st.fsdir):
        if run_cmd("umount", st.fsdir, check=False, timeout=60).returncode != 0:
            run_cmd("umount", "-l", st.fsdir, check=False, timeout=60)
        if mounted(st.fsdir):
            errors.append(f"cannot unmount {st.fsdir}")
    if st.dev is not None:
        try:
            loopdev.detach(st.dev)
        except loopdev.LoopError as e:
            errors.append(str(e))
        st.dev = None
    if errors:
        raise AssertionError("; ".join(errors))


HANG_REPORTS: list[str] = []   # one hang_report() per killed daemon that hung


def _slurp(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().rstrip("\n")
    except OSError as e:
        return f"<{e.strerror}>"


def hang_report(pid: int) -> str:
    """What a killed daemon that does not die is doing, from the kernel's side: per thread
    its name, wchan, state and kernel stack (/proc/PID/task/TID/stack, root only), the
    process status, and the FUSE connections with requests waiting for an answer."""
    out = [f"killed daemon {pid} hung; /proc/{pid}/status:", _slurp(f"/proc/{pid}/status")]
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        tids = []
        out.append(f"/proc/{pid}/task: {e.strerror}")
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        state = next((ln for ln in _slurp(f"{base}/status").splitlines()
                      if ln.startswith("State:")), "State: ?")
        out.append(f"--- thread {tid} comm={_slurp(f'{base}/comm')!r} "
                   f"wchan={_slurp(f'{base}/wchan')!r} {state}")
        out.append(_slurp(f"{base}/stack"))
    conns = "/sys/fs/fuse/connections"
    with contextlib.suppress(OSError):
        for c in sorted(os.listdir(conns)):
            out.append(f"fuse connection {c}: waiting {_slurp(f'{conns}/{c}/waiting')}")
    # other processes in D state (the loop worker, the writer, a helper...)
    with contextlib.suppress(OSError):
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == pid:
                continue
            for tid in (os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task")
                        else []):
                base = f"/proc/{p}/task/{tid}"
                st = _slurp(f"{base}/stat")
                if ") D " in st:
                    out.append(f"--- D-state {p}/{tid} comm={_slurp(f'{base}/comm')!r} "
                               f"wchan={_slurp(f'{base}/wchan')!r}")
                    out.append(_slurp(f"{base}/stack"))
    return "\n".join(out)


def kill_daemon(d: Daemon) -> bool:
    """kill -9 and reap. Returns True if the FUSE connection had to be aborted first.

    A daemon with a thread blocked in the kernel on its own FUSE mount cannot finish
    dying: inside FIFREEZE of the loop-mounted ext4 (the flush the freeze sends through
    the loop device), or in a stat of MOUNT/volumes/v.img whose FUSE request the trio
    thread had read but not answered (request_wait_answer). The FUSE connection is only
    aborted when the daemon's /dev/fuse fd is closed, and that fd is closed only when the
    last thread exits (the process stays a zombie, the mount hangs instead of failing
    with ENOTCONN, the pool stays locked). Both fixed (module docstring). If it happens
    again: hang_report() first (the kernel stacks), then what an admin would do:
    `umount -f MOUNT` (FUSE's umount_begin aborts the connection; the unmount itself then
    fails "busy" while the loop device is attached, which is fine). Counted; a failure
    unless SHADOWPLEX_CRASH_STRICT=0.
    """
    if d.proc.poll() is None:
        d.proc.kill()
    try:
        d.proc.wait(5)
        return False
    except subprocess.TimeoutExpired:
        pass
    report = hang_report(d.proc.pid)
    HANG_REPORTS.append(report)
    print(report, file=sys.stderr)
    run_cmd("umount", "-f", d.mount, check=False, timeout=30)
    try:
        d.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon (pid {d.proc.pid}) did not exit after SIGKILL "
                             "and an aborted FUSE connection") from None
    return True


def clear_dead(d: Daemon) -> None:
    if mounted(d.mount):
        run_cmd("fusermount3", "-u", "-z", d.mount, check=False)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d.socket)


def mount_volume(d: Daemon, st: Stack, fresh: bool) -> None:
    image = os.path.join(d.mount, "volumes", "v.img")
    st.dev = loopdev.attach(image, read_only=False)
    if fresh:
        run_cmd("mkfs.ext4", "-q", "-F", st.dev)
    os.makedirs(st.fsdir, exist_ok=True)
    run_cmd("mount", st.dev, st.fsdir)      # rw: ext4 replays its journal here


def read_log(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                name, digest = line.split()
                out[name] = digest
    return out


@contextlib.contextmanager
def stack_cleanup(st: Stack, holder: dict[str, Daemon]) -> Iterator[None]:
    try:
        yield
    finally:
        errors = []
        try:
            teardown_stack(st)
        except AssertionError as e:
            errors.append(str(e))
        d = holder.get("d")
        if d is not None:
            d.stop()
            clear_dead(d)
        if errors:
            raise AssertionError("; ".join(errors))


@pytest.mark.timeout(120 + 20 * max(TRIALS, FS_TRIALS))
@on_filesystems("xfs", "btrfs")
def test_crash_trials(tmp_path: Path, pool_tmp: Path, pool_fs: Path | None,
                      sockdir: str) -> None:
    trials = TRIALS if pool_fs is None else FS_TRIALS
    for tool in ("mkfs.ext4", "e2fsck", "fsfreeze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    rnd = random.Random(SEED)
    # shown with a failure of conftest's daemon log check too (a traceback, a SELF-REQUEST)
    print(f"crash trials: seed {SEED} (SHADOWPLEX_CRASH_SEED replays it)")
    ledger, counts = Ledger(), Counts()
    st = Stack(fsdir=str(tmp_path / "fs"))
    logs = tmp_path / "logs"
    logs.mkdir()
    holder: dict[str, Daemon] = {}
    t0 = time.monotonic()

    def ctx() -> str:
        return f"[seed {SEED}, trial {counts.trials}/{trials}] {counts.line()}"

    with stack_cleanup(st, holder):
        d = holder["d"] = start_daemon(pool_tmp, sockdir, {"v": VOLUME_SIZE}, CONFIG,
                                       self_guard=0.0)
        if pool_fs is not None:   # what these runs are for
            assert d.json("status")["preserve"] == "reflink"
        mount_volume(d, st, fresh=True)
        for trial in range(1, trials + 1):
            counts.trials = trial
            # ---------------------------------------------------------------- the load
            log_path = logs / f"t{trial:03d}.log"
            st.writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, os.path.join(st.fsdir, f"t{trial:03d}"),
                 str(log_path), str(rnd.randrange(1 << 32)), str(FILES_PER_TRIAL)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not log_path.exists() or not log_path.stat().st_size:
                assert st.writer.poll() is None, f"the writer died at start {ctx()}"
                assert time.monotonic() < deadline, f"the writer wrote nothing {ctx()}"
                time.sleep(0.01)
            ops = SnapshotOps(d, ledger, counts, random.Random(rnd.randrange(1 << 32)))
            ops.start()
            time.sleep(rnd.uniform(0.05, 1.2))
            # ---------------------------------------------------------------- the crash
            writing = b"# done" not in log_path.read_bytes()
            counts.kills_while_writing += writing
            hung = kill_daemon(d)
            ops.join(30)
            assert not ops.is_alive(), f"snapshot ops hang after the kill {ctx()}"
            where = "after-ops" if ops.finished else ops.phase   # what the kill cut
            counts.kills[where] = counts.kills.get(where, 0) + 1
            if hung:
                counts.fuse_aborts[where] = counts.fuse_aborts.get(where, 0) + 1
                assert not STRICT, (f"the killed daemon hung (kill cut {where}); its "
                                    f"FUSE connection had to be aborted {ctx()}\n"
                                    f"{HANG_REPORTS[-1]}")
            assert not ops.phase.startswith("unexpected"), f"{ops.error!r} {ctx()}"
            teardown_stack(st)
            # ---------------------------------------------------------------- restart
            # start_daemon waits for the mount and the socket, and mkdir's the mount
            # point (EEXIST + ENOTCONN on a dead mount): clear both first. (The daemon's
            # own dead-mount cleanup is tested in test_fuse_mount.py.)
            clear_dead(d)
            d = holder["d"] = start_daemon(pool_tmp, sockdir, {}, CONFIG, self_guard=0.0)
            verify_snapshots(d, ledger, counts, ctx)
            mount_volume(d, st, fresh=False)
            logged = read_log(log_path)
            for name, digest in logged.items():
                path = os.path.join(st.fsdir, f"t{trial:03d}", name)
                assert os.path.exists(path), f"fsync'ed file {path} is missing {ctx()}"
                assert xxh3_file(path) == digest, f"fsync'ed file {path} differs {ctx()}"
            counts.files_verified += len(logged)
            # ---------------------------------------------------------------- keep it small
            shutil.rmtree(os.path.join(st.fsdir, f"t{trial:03d}"))   # verified: make room
            trim_snapshots(d, ledger, counts)
            ledger.unmanifested.clear()
            ledger.deleting.clear()
            ledger.promoting.clear()
            ledger.creating = False
        # a last full pass over what is left, then a clean stop
        with d.client() as c:
            res = c.check()
            assert res["ok"], f"check: {res['problems']} {ctx()}"
        teardown_stack(st)
    elapsed = time.monotonic() - t0
    summary = f"{counts.line()}; {elapsed:.1f} s"
    print(summary)
    assert counts.trials == trials, summary
    assert counts.snapshot_verifications > 0 and counts.files_verified > 0, summary


def verify_snapshots(d: Daemon, led: Ledger, counts: Counts, ctx: Any) -> None:
    with d.client(client="crash-verify") as c:
        listed = {s["snapshot_id"]: s for s in c.snapshot_list()}
        for sid in led.deleted:
            assert sid not in listed, f"deleted snapshot {sid} is back {ctx()}"
        for sid in list(led.manifests) + sorted(led.unmanifested):
            if sid not in listed:
                assert sid in led.deleting, f"committed snapshot {sid} is missing {ctx()}"
                led.manifests.pop(sid, None)     # the in-flight delete happened
                led.deleted.add(sid)
        extra = [sid for sid in listed if sid not in led.manifests
                 and sid not in led.unmanifested]
        assert len(extra) <= (1 if led.creating else 0), (
            f"unknown snapshots {extra} after the restart (create in flight: "
            f"{led.creating}) {ctx()}")
        if led.creating:
            if extra:
                counts.adopted_in_flight += 1
                led.order.append(extra[0])
            else:
                counts.lost_in_flight += 1
        for sid, s in listed.items():
            assert s["status"] == "CREATED", f"{sid}: {s['status']} {ctx()}"
            kind, was = s.get("kind"), led.kinds.get(sid)
            if sid in led.promoting:       # cut by the kill: done or not, never half
                assert kind in ("differential", "full"), f"{sid} is {kind} {ctx()}"
                what = "done" if kind == "full" else "not done"
                counts.promotes_in_flight[what] = counts.promotes_in_flight.get(what, 0) + 1
            elif was is not None:
                assert kind == was, (f"snapshot {sid} is {kind} after the restart, "
                                     f"{was} before {ctx()}")
            led.kinds[sid] = str(kind)
            dev = os.path.join(d.mount, ".shadow", f"{sid}.img")
            digest = xxh3_file(dev)
            if sid in led.manifests:
                assert digest == led.manifests[sid], (
                    f"snapshot {sid} ({s.get('kind')}) changed across the crash {ctx()}")
                counts.snapshot_verifications += 1
            else:                          # acknowledged but manifest cut short, or adopted
                if sid in led.unmanifested:
                    counts.late_manifests += 1
                led.manifests[sid] = digest
            bad = e2fsck_clean(dev)
            assert bad is None, f"e2fsck -fn {sid} ({s.get('kind')}): {bad} {ctx()}"
            counts.fscks += 1
        res = c.check()
        assert res["ok"], f"check after the restart: {res['problems']} {ctx()}"


def trim_snapshots(d: Daemon, led: Ledger, counts: Counts) -> None:
    live = [s for s in led.order if s in led.manifests]
    with d.client(client="crash-trim") as c:
        for sid in live[:max(0, len(live) - KEEP_SNAPSHOTS)]:
            c.snapshot_delete(snapshot_id=sid)
            led.manifests.pop(sid, None)
            led.kinds.pop(sid, None)
            led.deleted.add(sid)
            counts.snapshots_deleted += 1



@pytest.mark.timeout(180)
def test_no_fuse_request_from_the_daemons_own_threads(tmp_path: Path,
                                                      sockdir: str) -> None:
    """Regression test of the residual "killed daemon hung" (root cause of the 1-in-10..70
    trials): during a snapshot create the fsfreeze writer's discovery realpath'ed and
    stat'ed MOUNT/volumes/v.img from a trio worker thread -- a FUSE request to the daemon
    itself. A kill -9 after the trio thread had read it and before it answered left that
    worker in request_wait_answer (D state) for good and the daemon a zombie.

    The daemon runs with tests/fuse_self_guard.py, which logs every FUSE request coming
    from one of its own threads and holds it in flight for a second; the test kills -9 the
    daemon as soon as one shows up (so a regression hangs the daemon deterministically,
    and the failure carries its kernel stacks). Creates of both kinds with the fsfreeze
    writer on a loop-mounted ext4 under load, a promote, a delete and an expose --mount
    must make none."""
    for tool in ("mkfs.ext4", "fsfreeze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    st = Stack(fsdir=str(tmp_path / "fs"))
    holder: dict[str, Daemon] = {}
    with stack_cleanup(st, holder):
        d = holder["d"] = start_daemon(tmp_path, sockdir, {"v": VOLUME_SIZE}, CONFIG,
                                       self_guard=1.0)
        mount_volume(d, st, fresh=True)
        st.writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, os.path.join(st.fsdir, "w"),
             str(tmp_path / "w.log"), "1", str(FILES_PER_TRIAL)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        errors: list[BaseException] = []
        expose_dir = tmp_path / "exposed"
        expose_dir.mkdir()

        def ops() -> None:
            try:
                with d.client(client="self-guard") as c:
                    made = []
                    for kind in ("differential", "plex", "differential"):
                        res = c.snapshot_create(["v"], context="app-rollback", kind=kind)
                        made.append(res["snapshots"][0]["snapshot_id"])
                    c.promote(made[0])
                    c.snapshot_delete(snapshot_id=made[1])
                    # expose --mount: its target check and attach used to stat under
                    # MOUNT (the check now runs in a child process)
                    c.expose(made[2], mount=str(expose_dir))
                    c.unexpose(made[2])
            except BaseException as e:   # noqa: BLE001 - the kill, if one was needed
                errors.append(e)

        t = threading.Thread(target=ops, daemon=True)
        t.start()
        while t.is_alive() and "SELF-REQUEST" not in d.log_text():
            time.sleep(0.01)
        self_requests = [ln for ln in d.log_text().splitlines() if "SELF-REQUEST" in ln]
        hung = kill_daemon(d)     # mid-request if there was one: it must die all the same
        t.join(30)
        assert not hung, ("the daemon made a FUSE request to its own mount and, killed "
                          f"meanwhile, did not die: {self_requests}\n{HANG_REPORTS[-1]}")
        assert not self_requests, f"FUSE requests from the daemon's own threads: {self_requests}"
        assert not errors, f"snapshot operations failed: {errors!r}"
        assert d.log_text().count("fsfreeze: froze") == 3, "the ext4 was not frozen 3 times"
        teardown_stack(st)
        clear_dead(d)
