"""The writers framework (provider.writers) against real parts: loop devices with ext4,
FIFREEZE, hook scripts run as processes, SQLite databases under a concurrent writer.

A 32 MiB sparse file in tmp_path stands in for a volume image (discovery works on any
backing file). The ``scratch`` fixture tracks every loop device, mount, process and
writer a test makes and, even when the test fails: aborts the writers, thaws every mount
point, kills the processes, unmounts and detaches.

Nothing that may block on a frozen filesystem runs in this process: such I/O is done by
subprocesses with timeouts, so a failing test cannot hang the run.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from provider.vss import HRESULTS, VssError
from provider.writers import (
    WRITER_NAMESPACE,
    FsFreezeWriter,
    HookScriptWriter,
    SQLiteWriter,
    VssWriterState,
    Writer,
    WriterError,
    WriterSet,
    find_volume_mounts,
    thaw_mount_point,
)
from provider.writers import sqlite as _sqlite

MiB = 1 << 20
CMD_TIMEOUT = 30


def sh(*cmd: str | Path) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                         timeout=CMD_TIMEOUT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}): "
                           f"{res.stderr.strip()}")
    return res.stdout.strip()


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def attached(loop: str) -> bool:
    return os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")


@dataclass
class LoopFs:
    image: Path
    loop: str
    mnt: Path


class Scratch:
    """Kernel objects of one test, all torn down by :meth:`cleanup`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fs: list[LoopFs] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.writers: list[Writer] = []

    def loopfs(self, name: str, size: int = 32 * MiB, parent: Path | None = None,
               options: str = "") -> LoopFs:
        image = (parent or self.tmp) / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        loop = sh("losetup", "--find", "--show", image)
        mnt = self.tmp / f"{name}-mnt"
        mnt.mkdir()
        fs = LoopFs(image, loop, mnt)
        self.fs.append(fs)
        sh("mkfs.ext4", "-q", loop)
        sh("mount", *(["-o", options] if options else []), loop, mnt)
        return fs

    def popen(self, *args: str | Path, **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([str(a) for a in args], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def track(self, writer: Writer) -> Writer:
        self.writers.append(writer)
        return writer

    def cleanup(self) -> list[str]:
        problems = []
        for w in self.writers:
            try:
                w.abort()
            except Exception as e:   # noqa: BLE001 - collected: the cleanup goes on
                problems.append(f"abort {w.name}: {e}")
        for _ in range(3):  # outer filesystems first: an inner freeze may wait on them
            for fs in self.fs:
                if mounted(fs.mnt):
                    try:
                        while thaw_mount_point(str(fs.mnt)):
                            pass
                    except OSError as e:
                        problems.append(f"thaw {fs.mnt}: {e}")
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"process {p.pid} did not die")
            for f in (p.stdin, p.stdout, p.stderr):   # the pipes popen(...) asked for
                if f is not None:
                    f.close()
        for fs in reversed(self.fs):
            if mounted(fs.mnt):
                for _ in range(25):
                    if subprocess.run(["umount", str(fs.mnt)], capture_output=True,
                                      timeout=CMD_TIMEOUT).returncode == 0:
                        break
                    time.sleep(0.2)
                else:
                    problems.append(f"{fs.mnt} was busy: lazily unmounted")
                    subprocess.run(["umount", "-l", str(fs.mnt)], timeout=CMD_TIMEOUT)
            if attached(fs.loop):
                subprocess.run(["losetup", "-d", fs.loop], timeout=CMD_TIMEOUT)
            if mounted(fs.mnt) or attached(fs.loop):
                problems.append(f"left behind: {fs.loop} / {fs.mnt}")
        return problems


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    s = Scratch(tmp_path)
    try:
        yield s
    finally:
        problems = s.cleanup()
    assert not problems, problems


WRITE_AND_SYNC = textwrap.dedent("""
    import os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, sys.argv[2].encode())
    os.fsync(fd)
    print("done", flush=True)
""")


def write_proc(scratch: Scratch, path: Path, data: str) -> subprocess.Popen[bytes]:
    return scratch.popen(sys.executable, "-c", WRITE_AND_SYNC, path, data,
                         stdout=subprocess.PIPE)


def blocked(p: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


# =========================================================================== base


def test_ids_and_error_names(tmp_path: Path) -> None:
    a, b = HookScriptWriter(tmp_path / "a"), HookScriptWriter(tmp_path / "b")
    assert a.writer_id == b.writer_id == str(uuid.uuid5(WRITER_NAMESPACE, "hooks"))
    assert a.instance_id != b.instance_id
    assert a.instance_id == HookScriptWriter(tmp_path / "a").instance_id  # stable
    assert FsFreezeWriter().writer_id != a.writer_id

    e = WriterError("x", retryable=True)
    assert isinstance(e, VssError) and e.retryable
    assert e.name == "VSS_E_WRITERERROR_RETRYABLE" and e.hresult == 0x800423F3
    t = WriterError("x", timed_out=True)
    assert t.name == "VSS_E_WRITERERROR_TIMEOUT" and t.retryable
    n = WriterError("x")
    assert n.name == "VSS_E_WRITERERROR_NONRETRYABLE" and not n.retryable
    assert all(e.name in HRESULTS for e in (t, n))
    assert VssWriterState.VSS_WS_FAILED_AT_FREEZE == 9
    assert VssWriterState.VSS_WS_WAITING_FOR_BACKUP_COMPLETE == 5


# =========================================================================== hooks

HOOK = """#!/bin/sh
echo "{name} $1 vols=$SHADOWPLEX_VOLUMES set=${{SHADOWPLEX_SET_ID-}}" \\
     "ok=${{SHADOWPLEX_BACKUP_SUCCEEDED-}}" >> {log}
"""


def make_hook(directory: Path, name: str, log: Path, extra: str = "",
              mode: int = 0o755) -> Path:
    directory.mkdir(exist_ok=True)
    p = directory / name
    p.write_text(HOOK.format(name=name, log=log) + extra)
    p.chmod(mode)
    return p


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def actions(log: Path) -> list[str]:
    return [" ".join(line.split()[:2]) for line in log_lines(log)]


def test_hooks_order_env_and_idempotent_thaw(tmp_path: Path) -> None:
    d, log = tmp_path / "hooks", tmp_path / "log"
    make_hook(d, "20-b", log)
    make_hook(d, "10-a", log)
    make_hook(d, ".hidden", log)
    make_hook(d, "30-not-executable", log, mode=0o644)
    (d / "40-dir").mkdir()
    w = HookScriptWriter(d)
    assert [h.name for h in w.hooks()] == ["10-a", "20-b"]
    assert w.involved(["/v/a.img"])
    assert [c.name for c in w.identify().components] == ["10-a", "20-b"]

    w.prepare_snapshot("set-1")
    w.freeze(["/v/a.img", "/v/b.img"], timeout=10)
    assert actions(log) == ["10-a freeze", "20-b freeze"]
    assert "vols=/v/a.img:/v/b.img set=set-1 ok=" in log_lines(log)[0]
    w.thaw()
    assert actions(log)[2:] == ["20-b thaw", "10-a thaw"]
    w.thaw()
    w.abort()  # after thaw: the hooks hear the set was cancelled, and nothing else
    assert actions(log)[4:] == ["20-b abort", "10-a abort"]
    w.abort()
    assert len(log_lines(log)) == 6
    w.backup_complete("set-1", succeeded=False)
    assert actions(log)[6:] == ["10-a backup-complete", "20-b backup-complete"]
    assert log_lines(log)[-1].endswith("set=set-1 ok=0")

    assert HookScriptWriter(tmp_path / "missing").involved(["/v/a.img"]) is False


def test_hook_failure_unwinds_earlier_hooks(tmp_path: Path) -> None:
    d, log = tmp_path / "hooks", tmp_path / "log"
    make_hook(d, "10-a", log)
    make_hook(d, "20-b", log, 'if [ "$1" = freeze ]; then echo noise >&2; '
              'echo "cannot lock tables" >&2; exit 3; fi\n')
    make_hook(d, "30-c", log)
    w = HookScriptWriter(d)
    with pytest.raises(WriterError) as ei:
        w.freeze(["/v/a.img"], timeout=10)
    err = ei.value
    assert "20-b" in err.message and "code 3" in err.message
    assert "cannot lock tables" in err.message and "noise" not in err.message
    assert not err.retryable and not err.timed_out
    # a was thawed, then everything run for freeze got abort, in reverse; c never ran
    assert actions(log) == ["10-a freeze", "20-b freeze", "10-a thaw", "20-b abort",
                            "10-a abort"]
    w.thaw()
    w.abort()
    assert len(log_lines(log)) == 5


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_hook_timeout_kills_process_group(tmp_path: Path) -> None:
    d, log = tmp_path / "hooks", tmp_path / "log"
    pidfile = tmp_path / "child.pid"
    make_hook(d, "10-slow", log, f'if [ "$1" = freeze ]; then sleep 60 & echo $! > {pidfile}; '
              'sleep 60; fi\n')
    w = HookScriptWriter(d, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(WriterError) as ei:
        w.freeze(["/v/a.img"], timeout=10)
    assert time.monotonic() - t0 < 5
    assert ei.value.timed_out and ei.value.name == "VSS_E_WRITERERROR_TIMEOUT"
    assert "10-slow" in ei.value.message and "timed out" in ei.value.message
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), "the hook's background child survived the timeout"
    assert actions(log) == ["10-slow freeze", "10-slow abort"]


def test_hook_may_leave_a_background_holder(tmp_path: Path) -> None:
    """A hook that leaves a process running (holding a lock until thaw) does not make
    freeze wait for it: output goes to files, not pipes."""
    d, log = tmp_path / "hooks", tmp_path / "log"
    pidfile = tmp_path / "holder.pid"
    make_hook(d, "10-holder", log,
              f'case "$1" in freeze) sleep 30 & echo $! > {pidfile};; '
              f'thaw) kill $(cat {pidfile});; esac\n')
    w = HookScriptWriter(d)
    t0 = time.monotonic()
    try:
        w.freeze(["/v/a.img"], timeout=10)
        assert time.monotonic() - t0 < 5
        holder = int(pidfile.read_text())
        assert not _gone(holder)
    finally:
        w.thaw()
    deadline = time.monotonic() + 5
    while not _gone(holder) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(holder)


# =========================================================================== WriterSet


def test_writer_set_rolls_back_when_a_later_writer_fails(tmp_path: Path) -> None:
    log = tmp_path / "log"
    first = HookScriptWriter(tmp_path / "first", name="first")
    second = HookScriptWriter(tmp_path / "second", name="second")
    make_hook(tmp_path / "first", "a", log)
    make_hook(tmp_path / "second", "b", log, '[ "$1" = freeze ] && exit 7\nexit 0\n')
    second.freeze_order = 60
    ws = WriterSet([second, first])  # added out of order: freeze_order decides
    assert ws.writers == [first, second]
    with pytest.raises(WriterError) as ei:
        ws.freeze_all(["/v/a.img"], timeout=10, set_id="s1")
    assert ei.value.writer == "second" and "code 7" in ei.value.message
    # the failing writer is aborted, the one frozen before it thawed
    assert actions(log) == ["a freeze", "b freeze", "b abort", "a thaw"]
    st = {s.writer_name: s for s in ws.statuses()}
    assert st["first"].state is VssWriterState.VSS_WS_STABLE
    assert st["second"].state is VssWriterState.VSS_WS_FAILED_AT_FREEZE
    assert st["second"].failure == "VSS_E_WRITERERROR_NONRETRYABLE"
    assert "code 7" in (st["second"].last_error or "")
    assert ws.frozen == []
    assert ws.abort_all() == []  # what the coordinator does next: AbortBackup
    assert actions(log)[4:] == ["a abort"]
    assert st["second"].state is VssWriterState.VSS_WS_FAILED_AT_FREEZE  # stays visible


def test_writer_set_states_and_event_face(tmp_path: Path) -> None:
    log = tmp_path / "log"
    make_hook(tmp_path / "h", "a", log)
    hooks = HookScriptWriter(tmp_path / "h")
    idle = HookScriptWriter(tmp_path / "empty", name="idle")  # no hooks: not involved
    ws = WriterSet([hooks, idle])
    ev = SimpleNamespace(set_id="set-9", volume_paths=("/v/x.img",))
    ws.freeze(ev)
    assert ws.frozen == [hooks]
    assert ws.status(hooks).state is VssWriterState.VSS_WS_WAITING_FOR_THAW
    assert ws.status(idle).state is VssWriterState.VSS_WS_STABLE
    with pytest.raises(WriterError):
        ws.freeze_all(["/v/x.img"])  # still frozen
    ws.thaw(ev)
    assert ws.status(hooks).state is VssWriterState.VSS_WS_WAITING_FOR_BACKUP_COMPLETE
    ws.backup_complete(ev)
    assert ws.status(hooks).state is VssWriterState.VSS_WS_STABLE
    assert actions(log) == ["a freeze", "a thaw", "a backup-complete"]
    assert all("set=set-9" in line for line in log_lines(log))
    doc = ws.identify()
    assert [w["writer_name"] for w in doc["writers"]] == ["hooks", "idle"]
    assert doc["writers"][0]["state"] == "VSS_WS_STABLE"
    assert doc["writers"][0]["components"][0]["name"] == "a"


def test_writer_set_deadline(tmp_path: Path) -> None:
    log = tmp_path / "log"
    make_hook(tmp_path / "h", "slow", log, '[ "$1" = freeze ] && sleep 5\nexit 0\n')
    ws = WriterSet([HookScriptWriter(tmp_path / "h")], freeze_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(WriterError) as ei:
        ws.freeze_all(["/v/x.img"])
    assert ei.value.timed_out and time.monotonic() - t0 < 3
    assert ws.statuses()[0].state is VssWriterState.VSS_WS_FAILED_AT_FREEZE


# =========================================================================== fsfreeze


@pytest.mark.kernel
def test_fsfreeze_discovery(scratch: Scratch, tmp_path: Path) -> None:
    fs = scratch.loopfs("vol")
    w = FsFreezeWriter(tmp_path)
    link = tmp_path / "alias.img"
    link.symlink_to(fs.image)
    assert w.involved([str(fs.image)])
    assert w.involved([str(link)])  # matched by realpath
    assert not w.involved([str(tmp_path / "other.img")])
    [vm] = w.targets([str(fs.image)])
    assert vm.mount_point == str(fs.mnt) and vm.loop.path == fs.loop
    assert vm.dev == tuple(int(x) for x in
                           Path(f"/sys/block/{os.path.basename(fs.loop)}/dev")
                           .read_text().split(":"))
    [comp] = [c for c in w.identify().components if c.name == str(fs.mnt)]
    assert comp.component_type == "filegroup" and comp.volumes == [str(fs.image)]
    assert comp.files[0].path == str(fs.mnt) and comp.files[0].recursive
    assert FsFreezeWriter(tmp_path / "elsewhere").identify().components == []

    sh("mount", "-o", "remount,ro", fs.mnt)
    assert find_volume_mounts([str(fs.image)])  # still found...
    assert not w.involved([str(fs.image)])      # ...but read-only: nothing to freeze
    w.freeze([str(fs.image)], timeout=5)
    assert w.frozen_mounts == []
    sh("mount", "-o", "remount,rw", fs.mnt)


@pytest.mark.kernel
def test_fsfreeze_blocks_writes_until_thaw(scratch: Scratch) -> None:
    fs = scratch.loopfs("vol")
    w = scratch.track(FsFreezeWriter())
    assert isinstance(w, FsFreezeWriter)
    w.freeze([str(fs.image)], timeout=10)
    assert w.frozen_mounts == [str(fs.mnt)]
    p = write_proc(scratch, fs.mnt / "f", "hello")
    assert blocked(p, 1.0), "a write completed on a frozen filesystem"
    # someone else trying to freeze it gets EBUSY
    res = subprocess.run(["fsfreeze", "-f", str(fs.mnt)], capture_output=True, text=True,
                         timeout=CMD_TIMEOUT)
    assert res.returncode != 0
    w.thaw()
    assert p.wait(timeout=10) == 0
    assert (fs.mnt / "f").read_text() == "hello"
    assert w.frozen_mounts == []
    w.thaw()   # idempotent
    w.abort()
    with pytest.raises(WriterError) as ei:
        w.freeze([str(fs.image)], timeout=0)  # no time: nothing frozen, error raised
    assert ei.value.timed_out
    assert w.frozen_mounts == []
    assert not thaw_mount_point(str(fs.mnt))  # not frozen


@pytest.mark.kernel
def test_fsfreeze_ebusy_is_an_error_and_not_ours_to_thaw(scratch: Scratch) -> None:
    fs = scratch.loopfs("vol")
    w = scratch.track(FsFreezeWriter())
    sh("fsfreeze", "-f", fs.mnt)
    with pytest.raises(WriterError) as ei:
        w.freeze([str(fs.image)], timeout=5)
    assert "already frozen" in ei.value.message and ei.value.retryable
    w.thaw()
    assert thaw_mount_point(str(fs.mnt)), "the writer thawed someone else's freeze"


@pytest.mark.kernel
def test_fsfreeze_timeout_thaws_late_freeze(scratch: Scratch) -> None:
    """FIFREEZE of an inner filesystem whose loop image lives on a frozen outer one
    cannot finish (its writeback waits on the outer): the writer times out, and when the
    outer is thawed the late freeze completes and is thawed at once."""
    outer = scratch.loopfs("outer", size=96 * MiB)
    inner = scratch.loopfs("inner", parent=outer.mnt)
    p = write_proc(scratch, inner.mnt / "dirty", "x" * 65536)
    assert p.wait(timeout=10) == 0
    (inner.mnt / "more").write_bytes(os.urandom(1 * MiB))  # dirty, not synced
    ow = scratch.track(FsFreezeWriter(name="outer"))
    iw = scratch.track(FsFreezeWriter(name="inner"))
    ow.freeze([str(outer.image)], timeout=10)
    t0 = time.monotonic()
    with pytest.raises(WriterError) as ei:
        iw.freeze([str(inner.image)], timeout=1.0)
    assert ei.value.timed_out and 0.9 < time.monotonic() - t0 < 5
    assert iw.frozen_mounts == []
    ow.thaw()
    p = write_proc(scratch, inner.mnt / "after", "ok")
    # new writes wait while FIFREEZE is in progress: this one finishing means the late
    # freeze completed and was thawed by the writer
    assert p.wait(timeout=10) == 0
    assert not thaw_mount_point(str(inner.mnt))

    # both in one set, outer named first: the writer freezes the inner one first
    both = scratch.track(FsFreezeWriter(name="both"))
    assert isinstance(both, FsFreezeWriter)
    (inner.mnt / "dirty2").write_bytes(os.urandom(1 * MiB))
    t0 = time.monotonic()
    both.freeze([str(outer.image), str(inner.image)], timeout=5)
    assert time.monotonic() - t0 < 3
    assert both.frozen_mounts == [str(inner.mnt), str(outer.mnt)]
    both.thaw()  # outer first: thawing the inner one writes its superblock
    assert not thaw_mount_point(str(inner.mnt)) and not thaw_mount_point(str(outer.mnt))


# =========================================================================== sqlite

SQLITE_WRITER = textwrap.dedent("""
    import os, sqlite3, sys, time
    db, stop = sys.argv[1], sys.argv[2]
    c = sqlite3.connect(db, timeout=60, isolation_level=None)
    n = 0
    while not os.path.exists(stop):
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO t(v) VALUES (randomblob(300))")
        c.execute("COMMIT")
        n += 1
        time.sleep(0.003)  # <= ~300 commits/s: the WAL stays small on a 32 MiB volume
    print(n, flush=True)
""")


def count_rows(db: Path) -> int:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(c.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        c.close()


def wait_rows(db: Path, more_than: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (n := count_rows(db)) <= more_than:
        assert time.monotonic() < deadline, f"the writer did not get past {more_than} rows"
        time.sleep(0.02)
    return n


def check_copy(db: Path, dest: Path) -> int:
    """Copy the database file ALONE (no -wal) with cp, which may not block; the copy
    must be a sound database. Returns its row count."""
    subprocess.run(["cp", str(db), str(dest)], check=True, timeout=10)
    c = sqlite3.connect(dest)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return int(c.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        c.close()


@pytest.mark.kernel
def test_sqlite_writer_under_a_concurrent_writer(scratch: Scratch, tmp_path: Path) -> None:
    fs = scratch.loopfs("vol")
    db = fs.mnt / "app.db"
    c = sqlite3.connect(db, isolation_level=None)
    assert c.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    c.close()
    stop = tmp_path / "stop"
    proc = scratch.popen(sys.executable, "-c", SQLITE_WRITER, db, stop, stdout=subprocess.PIPE)
    n0 = wait_rows(db, 20)

    w = SQLiteWriter([db])
    scratch.track(w)
    assert w.involved([str(fs.image)])
    assert not w.involved([str(tmp_path / "other.img")])
    [comp] = w.identify().components
    assert comp.component_type == "database" and comp.volumes == [str(fs.image)]
    assert {f.filespec for f in comp.files} == {"app.db", "app.db-wal", "app.db-shm",
                                                "app.db-journal"}

    # --- the SQLite writer alone: readers go on, writers wait
    w.freeze([str(fs.image)], timeout=10)
    assert w.frozen_databases == [str(db)]
    assert os.path.getsize(f"{db}-wal") == 0  # checkpointed: the db file is complete
    frozen_count = count_rows(db)              # a reader is not blocked
    assert frozen_count >= n0
    other = sqlite3.connect(db, timeout=0.3, isolation_level=None)
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("INSERT INTO t(v) VALUES (1)")
    assert time.monotonic() - t0 >= 0.25  # it waited (busy timeout) before giving up
    other.close()
    time.sleep(0.3)
    assert count_rows(db) == frozen_count     # the writer process is held
    assert proc.poll() is None
    assert check_copy(db, tmp_path / "copy1.db") == frozen_count
    w.thaw()
    w.thaw()
    assert wait_rows(db, frozen_count) > frozen_count  # the writer goes on

    # --- with the filesystem freeze, in a WriterSet (added in the wrong order)
    fsw = FsFreezeWriter()
    ws = WriterSet([fsw, w])
    scratch.writers.insert(0, fsw)
    ws.freeze_all([str(fs.image)], timeout=10, set_id="s")
    try:
        assert [x.name for x in ws.frozen] == ["sqlite", "fsfreeze"]
        assert check_copy(db, tmp_path / "copy2.db") > frozen_count
    finally:
        assert ws.thaw_all() == []
    n2 = count_rows(db)
    assert wait_rows(db, n2) > n2
    assert [s.state_name for s in ws.statuses()] == ["VSS_WS_WAITING_FOR_BACKUP_COMPLETE"] * 2

    stop.touch()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and int(out) > 0
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c.close()


@pytest.mark.kernel
def test_sqlite_writer_rollback_journal_mode(scratch: Scratch, tmp_path: Path) -> None:
    fs = scratch.loopfs("vol")
    db = fs.mnt / "rj.db"
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=DELETE")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    c.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    w = SQLiteWriter([db, fs.mnt / "absent.db"])
    scratch.track(w)
    try:
        w.freeze([str(fs.image)], timeout=5)
        assert w.frozen_databases == [str(db)]  # the absent one is not created
        assert not (fs.mnt / "absent.db").exists()
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 1  # readers go on
        c.execute("PRAGMA busy_timeout=200")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            c.execute("INSERT INTO t(v) VALUES (2)")
        assert check_copy(db, tmp_path / "copy.db") == 1
        w.thaw()
        c.execute("INSERT INTO t(v) VALUES (3)")
    finally:
        w.thaw()
        c.close()


def test_sqlite_writer_times_out_on_a_held_lock(tmp_path: Path) -> None:
    """Not on a volume: the freeze of one database is driven directly (by its helper
    process: the holder here is another process to it, as an application is)."""
    db = tmp_path / "x.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t(v)")
    holder.execute("BEGIN IMMEDIATE")
    w = SQLiteWriter([db])
    assert not w.involved([str(tmp_path / "v.img")])
    t0 = time.monotonic()
    with pytest.raises(WriterError) as ei:
        w._freeze_in_helper(str(db), time.monotonic() + 0.5, 0.5)
    assert ei.value.timed_out and "stayed locked" in str(ei.value)
    assert time.monotonic() - t0 < 3
    holder.execute("ROLLBACK")
    holder.close()


def test_sqlite_freeze_is_held_by_a_helper_process(tmp_path: Path) -> None:
    """The freeze (connection, lock, checkpoint, fsync) lives in a helper process: this
    process -- the daemon -- holds no file of the database, so no daemon thread can be
    left waiting on I/O through its own mount when it is killed; and a helper that dies
    takes the lock with it."""
    db = tmp_path / "h.db"
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t(v)")
    c.execute("INSERT INTO t VALUES (1)")
    w = SQLiteWriter([db])

    def our_fds() -> list[str]:
        return sorted(os.path.realpath(f"/proc/self/fd/{fd}")
                      for fd in os.listdir("/proc/self/fd"))
    before = [f for f in our_fds() if f.startswith(str(db))]   # c's own
    held = w._freeze_in_helper(str(db), time.monotonic() + 5, 5)
    try:
        assert held.helper is not None and held.helper.poll() is None
        assert [f for f in our_fds() if f.startswith(str(db))] == before
        helper_fds = {os.path.realpath(f"/proc/{held.helper.pid}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{held.helper.pid}/fd")}
        assert str(db) in helper_fds
        c.execute("PRAGMA busy_timeout=200")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            c.execute("INSERT INTO t VALUES (2)")
        held.helper.kill()   # as if it died: its lock goes with it
        held.helper.wait(10)
        c.execute("INSERT INTO t VALUES (3)")
        assert [r[0] for r in c.execute("SELECT v FROM t")] == [1, 3]
    finally:
        errors = _sqlite._release_held(held)
        c.close()
    assert errors and "did not answer" in errors[0]   # the thaw says what happened
