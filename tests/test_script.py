"""diskshadow-style scripts (tools/script.py, `shadowplex script FILE`).

Parse-level tests need nothing. The kernel tests run a real daemon (`python -m
provider.service`: FUSE mount + control socket) as a subprocess and the scripts through
the real CLI (`python -m tools.cli script`); every one cleans up in `finally` (mounts,
loop devices, snapshots, volumes it made, the daemon); conftest's session guard fails the
run if anything is left.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, start_daemon
from support import run_cmd as _run

from tools.script import ScriptError, parse_script, run_script_file

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- parsing
def test_parse_every_verb_and_the_context_mapping() -> None:
    text = """
        # a comment, then blank lines

        SET CONTEXT volatile
        set context volatile nowriters
        set context Persistent
        set context persistent NOWRITERS
        set context VSS_CTX_APP_ROLLBACK
        set context 0x19
        set option plex transportable
        set metadata /tmp/meta.json
        set verbose on
        begin backup
        add volume data alias DATA
        add volume /dev/loop7
        create
        expose %data% /mnt/snap
        expose %VSS_SHADOW_2% snapname
        exec echo %DATA% "$DATA" $(date +%Y%m%d) # the shell's comment
        unexpose /mnt/snap
        end backup
        list shadows
        list shadows set %VSS_SHADOW_SET%
        list shadows id {6a3f3b8e-0f62-4c43-9d0a-6c5e1c2b9a11}
        list writers status
        list providers
        revert %DATA%
        resync %DATA%
        break writable %VSS_SHADOW_SET%
        break %DATA%
        delete shadows all
        delete shadows volume data
        delete shadows oldest data
        delete shadows set %VSS_SHADOW_SET%
        delete shadows id %DATA%
        delete shadows exposed snapname
        exit
        delete shadows all
    """
    stmts = parse_script(text)
    contexts = [s.args["context"] for s in stmts if s.verb == "set context"]
    assert contexts == ["backup", "file-share-backup", "app-rollback", "nas-rollback",
                        "app-rollback", "nas-rollback"]
    verbs = {s.verb for s in stmts}
    assert verbs >= {"set option", "set metadata", "set verbose", "begin backup", "add volume",
                     "create", "expose", "exec", "unexpose", "end backup", "list shadows",
                     "list writers", "list providers", "revert", "resync", "break",
                     "delete shadows", "exit"}
    ex = next(s for s in stmts if s.verb == "exec")
    assert ex.args["cmd"] == 'echo %DATA% "$DATA" $(date +%Y%m%d) # the shell\'s comment'
    opt = next(s for s in stmts if s.verb == "set option")
    assert opt.args["options"] == ["PLEX", "TRANSPORTABLE"]


BAD = [
    ("set context backup\nbegin backup\nfrobnicate volume x\n", 3, "unknown verb 'frobnicate'"),
    ("create\n", 1, "nothing to create"),
    ("begin backup\nadd volume data\nadd volume logs alias\ncreate\n", 3, "usage: add volume"),
    ("add volume a alias A\nexpose %A% /x\ncreate\n", 2, "only after its 'create'"),
    ("add volume a\ncreate\nexpose %B% /x\n", 3, "alias %B% is not defined"),
    ("exec echo %A%\nadd volume a alias A\ncreate\n", 1, "used before it is defined (line 2)"),
    ("add volume a alias A\ncreate\ndelete shadows set %A%\n", 3, "a set id is expected"),
    ("revert %VSS_SHADOW_SET%\n", 1, "defined by 'create'"),
    ("add volume a alias A\nadd volume b alias a\ncreate\n", 2, "already defined on line 1"),
    ("add volume a\nadd volume a\ncreate\n", 2, "already in this set"),
    ("add volume a\nset context backup\ncreate\n", 2, "cannot change while a set is being"),
    ("add volume a\n", 1, "never created"),
    ("end backup\n", 1, "without 'begin backup'"),
    ("begin backup\nend backup\n", 2, "no set was created since"),
    ("set context clientaccessible\n", 1, "system provider"),
    ("set context sometimes\n", 1, "unknown snapshot context"),
    ("set option differential plex\n", 1, "exclude each other"),
    ("set option rollbackrecover\n", 1, "not supported"),
    ("set verbose maybe\n", 1, "set verbose on|off"),
    ("add volume a\nload metadata backup.cab\nimport\ncreate\n", 3, "being composed"),
    ("import\n", 1, "no Backup Components Document loaded"),
    ("begin restore\n", 1, "not supported"),
    ("expose 1234 /x\n", 1, "expected %ALIAS% or an id"),
    ("add volume ../etc\n", 1, "not a volume name"),
    ("exec\n", 1, "exec needs a command"),
    ("unexpose 'unterminated\n", 1, "cannot split the line"),
    ("list shadows sometimes\n", 1, "usage: list shadows"),
    ("mask %VSS_SHADOW_SET%\n", 1, "delete shadows set %VSS_SHADOW_SET%"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_parse_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ScriptError) as ei:
        parse_script(text)
    assert ei.value.line == line
    assert fragment in ei.value.message


def test_parse_error_exits_2_before_connecting(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "bad.dsh"
    script.write_text("set context backup\n\nset option sparkly\n")
    # no daemon at this socket: the parse error comes first, nothing is contacted
    assert run_script_file(str(script), socket=str(tmp_path / "none.sock")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{script}:3: set option: unknown option 'sparkly'")
    assert len(err.splitlines()) == 1


def test_unreadable_script_and_missing_daemon(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script_file(str(tmp_path / "missing.dsh")) == 2
    assert "cannot read script" in capsys.readouterr().err
    ok = tmp_path / "ok.dsh"
    ok.write_text("list providers\n")
    assert run_script_file(str(ok), socket=str(tmp_path / "none.sock")) == 1
    assert "VSS_E_PROVIDER_NOT_REGISTERED" in capsys.readouterr().err


# ----------------------------------------------------------------------------- kernel
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_kernel()
    for tool in ("mkfs.ext4", "dd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    from fuse_mount import loopdev
    base = tmp_path_factory.mktemp("script")
    sockdir = tempfile.mkdtemp(prefix="spx-script-")   # short: sun_path is 108 bytes
    d = start_daemon(base, sockdir, {"data": 64 << 20, "logs": 8 << 20, "nas": 8 << 20},
                     {"hooks_dir": None})
    try:
        dev = loopdev.attach(d.image("data"), read_only=False)
        try:
            _run("mkfs.ext4", "-q", "-F", dev)
        finally:
            loopdev.detach(dev)
        yield d
    finally:
        d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def script(d: Daemon, name: str, text: str) -> tuple[subprocess.CompletedProcess[str], str]:
    path = d.base / name
    path.write_text(text)
    res = subprocess.run(
        [sys.executable, "-m", "tools.cli", "--socket", d.socket, "script", str(path)],
        cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
        text=True, timeout=120, check=False)
    return res, str(path)


def _nothing_left(d: Daemon, c: object, *mounts: Path) -> None:
    """No snapshot, no set in creation, no exposure mount, no loop device but the
    origins' own."""
    from fuse_mount import loopdev
    assert c.snapshot_list() == []          # type: ignore[attr-defined]
    assert c.set_list() == []               # type: ignore[attr-defined]
    assert c.status()["creating"] is None   # type: ignore[attr-defined]
    for m in mounts:
        assert not loopdev.is_mountpoint(m), m
    backing = [b for _, b in loopdev.loops_under(d.mount)]
    assert all("/volumes/" in b for b in backing), backing


@pytest.mark.kernel
def test_backup_script_uses_every_backup_verb(daemon: Daemon) -> None:
    from fuse_mount import loopdev
    d = daemon
    fs, snap, out = d.base / "fs1", d.base / "snap1", d.base / "out1"
    for p in (fs, snap, out):
        p.mkdir()
    meta = out / "meta.json"
    dev = loopdev.attach(d.image("data"), read_only=False)
    try:
        _run("mount", dev, str(fs))
        try:
            (fs / "hello.txt").write_text("consistent\n")    # dirty: fsfreeze flushes it
            res, path = script(d, "backup.dsh", f"""\
# nightly backup of data and logs, diskshadow style
set context volatile
set option differential
set metadata {meta}
set verbose off
begin backup
add volume data alias DATA
add volume logs alias LOGS
create
expose %DATA% {snap}
exec echo changed > {fs}/hello.txt && sync && test "$(cat {snap}/hello.txt)" = consistent
exec test "$DATA" = "%DATA%" && test "$LOGS" = "$VSS_SHADOW_2" && echo $VSS_SHADOW_SET >{out}/s
list shadows all
list shadows set %VSS_SHADOW_SET%
list shadows id %LOGS%
list writers
list providers
unexpose {snap}
expose %LOGS% logsnap
exec test -f {d.mount}/exposed/logsnap.img
unexpose logsnap
expose %DATA% {snap}
delete shadows exposed {snap}
end backup
delete shadows set %VSS_SHADOW_SET%
exit
delete shadows all
""")
            assert res.returncode == 0, res.stdout + res.stderr
            assert res.stderr == ""
            o = res.stdout
            assert "set context backup (VSS_CTX_BACKUP 0x0, auto-release" in o
            assert "create: snapshot set" in o and "%DATA%" in o and "[differential]" in o
            assert f"mounted read-only at {snap}" in o
            assert "PROVIDER ID" in o and "fsfreeze" in o and "WRITER" in o
            assert "end backup: BackupComplete for set" in o and "notified: fsfreeze" in o
            assert "delete shadows exposed" in o and "1 snapshot(s) deleted" in o
            assert "delete shadows all" not in o        # after exit: never run
            doc = json.loads(meta.read_text())
            (s,) = doc["sets"]
            assert s["context"] == "backup" and set(s["aliases"]) == {"DATA", "LOGS"}
            assert len(s["snapshots"]) == 2
            assert (out / "s").read_text().strip() == s["set_id"]
            assert (fs / "hello.txt").read_text() == "changed\n"
            with d.client(client="test-script") as c:
                _nothing_left(d, c, snap)
        finally:
            _run("umount", str(fs), check=False)
    finally:
        loopdev.detach(dev)


@pytest.mark.kernel
def test_nas_rollback_revert_resync_break(daemon: Daemon) -> None:
    d = daemon
    img = d.image("nas")
    with open(img, "r+b") as f:
        f.write(b"v1v1")
    made = ["nas-break-1", "nas-break-2"]
    try:
        dd = f"dd of={img} bs=4 count=1 conv=notrunc,fsync status=none"
        res, path = script(d, "rollback.dsh", f"""\
set context persistent nowriters
set option plex
add volume nas alias N1
create
exec printf v2v2 | {dd} && test "$(head -c 4 {img})" = v2v2
revert %N1%
exec test "$(head -c 4 {img})" = v1v1
exec printf v3v3 | {dd}
resync %N1%
exec test "$(head -c 4 {img})" = v1v1
set option differential
add volume nas alias N2
create
break writable %VSS_SHADOW_SET%
break %N1%
add volume nas alias KEEP1
create
add volume nas alias KEEP2
create
list shadows
""")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "set context nas-rollback (VSS_CTX_NAS_ROLLBACK 0x19, persistent)" in res.stdout
        assert "now volume nas-break-1 (read-write)" in res.stdout
        assert "now volume nas-break-2 (read-write)" in res.stdout
        assert f"{path}:15: note: 'break' without 'writable'" in res.stderr
        assert "released" not in res.stdout            # persistent: nothing released
        with d.client(client="test-script") as c:
            vols = {v["name"]: v for v in c.volume_list()}
            for name in made:
                assert name in vols and vols[name]["naa"] != vols["nas"]["naa"]
                with open(d.image(name), "rb") as f:
                    assert f.read(4) == b"v1v1"
            left = c.snapshot_list()
            assert [s["volume"] for s in left] == ["nas", "nas"]   # outlived the script
            assert {s["context"] for s in left} == {"nas-rollback"}
            oldest = min(left, key=lambda s: s["creation_timestamp"])["snapshot_id"]
        res, _ = script(d, "cleanup.dsh", "delete shadows oldest nas\nlist shadows\n"
                        "delete shadows volume nas\ndelete shadows all\n")
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("1 snapshot(s) deleted") == 2
        assert "delete shadows all: 0 snapshot(s) deleted" in res.stdout
        assert oldest not in res.stdout.split("delete shadows oldest nas")[1]
        with d.client(client="test-script") as c:
            _nothing_left(d, c)
    finally:
        with d.client(client="test-script") as c:
            for s in c.snapshot_list(volume="nas"):
                c.snapshot_delete(snapshot_id=s["snapshot_id"], unexpose=True)
            names = {v["name"] for v in c.volume_list()}
            for name in made:
                if name in names:
                    c.volume_delete(name)


@pytest.mark.kernel
def test_syntax_error_on_line_3_changes_nothing(daemon: Daemon) -> None:
    d = daemon
    log_before = len(d.log_text())
    res, path = script(d, "typo.dsh", "begin backup\nadd volume data alias D\n"
                       "add volume logs alias\ncreate\nend backup\n")
    assert res.returncode == 2
    assert res.stderr.startswith(f"{path}:3: usage: add volume NAME [alias ALIAS]")
    assert res.stdout == ""
    new_log = d.log_text()[log_before:]
    # the daemon was not even contacted (earlier sessions may still log their close)
    assert not re.search(r"requester session \d+ opened", new_log), new_log
    with d.client(client="test-script") as c:
        _nothing_left(d, c)


@pytest.mark.kernel
def test_failure_while_running_cleans_up(daemon: Daemon) -> None:
    d = daemon
    snap = d.base / "snap4"
    snap.mkdir()
    try:
        res, path = script(d, "fails.dsh", f"""\
set context backup
begin backup
add volume data alias D
create
expose %D% {snap}
exec test -d {snap}/lost+found
exec exit 3
end backup
""")
        assert res.returncode == 1, res.stdout + res.stderr
        lines = res.stderr.splitlines()
        assert lines[0] == f"{path}:7: exec: the command exited with status 3"
        assert any(x.startswith("cleanup: unexposed snapshot") for x in lines)
        assert any(x.startswith("cleanup: released auto-release snapshot set") for x in lines)
        with d.client(client="test-script") as c:
            _nothing_left(d, c, snap)

        # a set still being composed is aborted; a daemon error names its line
        res, path = script(d, "fails2.dsh", "add volume data\nexec false\ncreate\n")
        assert res.returncode == 1
        assert res.stderr.startswith(f"{path}:2: exec: the command exited with status 1")
        assert "cleanup: aborted snapshot set" in res.stderr
        res, path = script(d, "fails3.dsh", "add volume data\nadd volume nosuch\ncreate\n")
        assert res.returncode == 1
        assert res.stderr.startswith(f"{path}:2: add volume: VSS_E_OBJECT_NOT_FOUND")
        with d.client(client="test-script") as c:
            _nothing_left(d, c, snap)
    finally:
        from fuse_mount import loopdev
        if loopdev.is_mountpoint(snap):
            _run("umount", str(snap), check=False)


@pytest.mark.kernel
def test_delete_shadows_volume_is_all_or_nothing(daemon: Daemon) -> None:
    """`delete shadows volume V` with one of V's snapshots in use deletes none of them
    (it used to delete them one by one and stop at the busy one, half done)."""
    d = daemon
    with d.client(client="test-script") as c:
        made = [c.snapshot_create(["logs"], context="nas-rollback")["snapshots"][0]
                ["snapshot_id"] for _ in range(2)]
    try:
        busy = os.open(os.path.join(d.mount, ".shadow", f"{made[1]}.img"), os.O_RDONLY)
        try:
            res, _ = script(d, "del-busy.dsh", "delete shadows volume logs\n")
            assert res.returncode == 1, res.stdout + res.stderr
            assert "in use" in res.stderr, res.stderr
            with d.client(client="test-script") as c:
                left = {x["snapshot_id"] for x in c.snapshot_list(volume="logs")}
            assert left == set(made)                 # nothing deleted, not even the first
        finally:
            os.close(busy)
        res, _ = script(d, "del-free.dsh", "delete shadows volume logs\n")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "delete shadows volume logs: 2 snapshot(s) deleted" in res.stdout
    finally:
        with d.client(client="test-script") as c:
            for x in c.snapshot_list(volume="logs"):
                c.snapshot_delete(snapshot_id=x["snapshot_id"], unexpose=True)
            _nothing_left(d, c)


@pytest.mark.kernel
def test_quiet_prints_only_what_was_listed(daemon: Daemon) -> None:
    d = daemon
    path = d.base / "quiet.dsh"
    path.write_text("set context nas-rollback\nadd volume logs alias L\ncreate\n"
                    "list shadows id %L%\ndelete shadows id %L%\nlist providers\n")
    res = subprocess.run(
        [sys.executable, "-m", "tools.cli", "-q", "--socket", d.socket, "script", str(path)],
        cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
        text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("ID ") and lines[2].startswith("PROVIDER ID")
    assert " logs " in lines[1] and "nas-rollback" in lines[1]
    with d.client(client="test-script") as c:
        _nothing_left(d, c)


@pytest.mark.kernel
def test_verbose_output_and_load_metadata_failing_at_run_time(daemon: Daemon) -> None:
    """`set verbose on` adds the provider line, the set's start, the snapshot table and
    exec's expanded command; a `load metadata` whose file is missing fails AT RUN TIME
    (the file is read when the line runs): exit 1 naming the line, then the cleanup
    releases the auto-release set made before it -- not a traceback that skips cleanup."""
    d = daemon
    missing = d.base / "no-such-bcd.xml"
    res, path = script(d, "verbose.dsh", f"""\
set context backup
set verbose on
add volume logs alias L
create
exec test "$L" = "%L%"
load metadata {missing}
list providers
""")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0] == (f"{path}:6: load metadata: cannot read {missing}: "
                        "No such file or directory")
    assert any(x.startswith("cleanup: released auto-release snapshot set") for x in lines)
    out = res.stdout
    assert re.search(r"^provider \S+ on \S+, pool \S+, mount \S+, session \d+$", out, re.M), out
    assert re.search(r"^snapshot set \S+ started \(backup\)$", out, re.M), out
    assert re.search(r"^ID\s+SET\s+VOLUME\s+KIND", out, re.M), out     # the set's table
    m = re.search(r"add volume logs alias L: snapshot (\S+)", out)
    assert m, out
    sid = m.group(1)
    assert f'exec test "$L" = "{sid}"' in out            # verbose: %L% shown expanded
    assert "PROVIDER ID" not in out                       # stopped at line 6
    with d.client(client="test-script") as c:
        _nothing_left(d, c)

    # a file that is there but is not a document: the same kind of failure
    binary = d.base / "binary.xml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    res, path = script(d, "notxml.dsh", f"set verbose off\nload metadata {binary}\n")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[0] == (f"{path}:2: load metadata: {binary} is not UTF-8 "
                                          "XML (a Backup Components Document from "
                                          "'shadowplex export')")
    assert "provider " not in res.stdout                  # verbose off: no detail lines


# ------------------------------------------------------------- signals during exec (#12)
def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _exec_script(d: Daemon, name: str, snap: Path, pidfile: Path, exec_line: str) -> Path:
    """A backup script that mounts a snapshot at `snap`, then runs `exec_line` (line 5),
    which starts a long sleep whose working directory is on the snapshot (keeping its
    mount busy) and writes the sleep's pid to `pidfile`."""
    path = d.base / name
    path.write_text("set context backup\nadd volume data alias D\ncreate\n"
                    f"expose %D% {snap}\n{exec_line}\n")
    return path


def _check_cleaned_up(d: Daemon, snap: Path, sleep_pid: int, log_before: int) -> None:
    from fuse_mount import loopdev
    _wait_for(lambda: not _alive(sleep_pid), 10, f"the exec'd sleep {sleep_pid} still runs")
    assert not loopdev.is_mountpoint(snap)
    with d.client(client="test-script") as c:
        _nothing_left(d, c, snap)
    assert "deleting it anyway" not in d.log_text()[log_before:]


def _kill_leftovers(pidfile: Path, snap: Path) -> None:
    from fuse_mount import loopdev
    text = pidfile.read_text().strip() if pidfile.exists() else ""
    if text.isdigit() and _alive(int(text)):
        os.kill(int(text), signal.SIGKILL)
    sources = [src for mp, _, src in loopdev.mountinfo() if mp == str(snap)]
    if sources:
        _run("umount", "-l", str(snap), check=False)
    for dev in sources:   # the daemon may have forgotten it (the bug deleted the snapshot)
        if dev.startswith("/dev/loop"):
            _run("losetup", "-d", dev, check=False)


def _pid_in(pidfile: Path) -> bool:
    return pidfile.exists() and pidfile.read_text().strip().isdigit()


@pytest.mark.kernel
@pytest.mark.parametrize("signame,setsid", [("SIGTERM", False), ("SIGHUP", False),
                                            ("SIGINT", False), ("SIGTERM", True)])
def test_signal_during_exec_ends_the_command_and_cleans_up(daemon: Daemon, signame: str,
                                                           setsid: bool) -> None:
    """SIGTERM / SIGHUP / SIGINT sent to the script process (no terminal) while an exec'd
    command runs on a mounted snapshot: the command (its whole process group, here a
    background sleep the shell waits for) is ended, the script unexposes the snapshot,
    its session's auto-release set is deleted, no loop device is left, and it exits
    128+N with one line naming the line and the signal. Before: SIGTERM/SIGHUP killed
    the script at once, the sleep went on (reparented to init) and the daemon deleted
    the snapshot under its busy mount ("could not unmount ...; deleting it anyway").
    setsid: the sleep left the command's process group (as fio's job processes do): it
    is ended all the same."""
    d = daemon
    sig = signal.Signals[signame]
    tag = signame + ("-setsid" if setsid else "")
    snap, pidfile = d.base / f"snap-{tag}", d.base / f"sleep-{tag}.pid"
    snap.mkdir()
    path = _exec_script(d, f"sig-{tag}.dsh", snap, pidfile,
                        f"exec (cd {snap} && exec {'setsid ' if setsid else ''}sleep 1000) & "
                        f"echo $! > {pidfile}; wait")
    log_before = len(d.log_text())
    outf, errf = d.base / f"sig-{tag}.out", d.base / f"sig-{tag}.err"
    with open(outf, "w") as o, open(errf, "w") as e:   # files: a leftover sleep keeps
        proc = subprocess.Popen(                         # pipes open, not the script
            [sys.executable, "-m", "tools.cli", "--socket", d.socket, "script", str(path)],
            cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    try:
        _wait_for(lambda: _pid_in(pidfile), 60, "the exec'd command did not start")
        sleep_pid = int(pidfile.read_text())
        assert _alive(sleep_pid)
        proc.send_signal(sig)
        proc.wait(60)
        out, err = outf.read_text(), errf.read_text()
        assert proc.returncode == 128 + sig, (proc.returncode, out, err)
        lines = err.splitlines()
        word = "interrupted" if sig == signal.SIGINT else f"terminated by {signame}"
        assert lines[0] == f"shadowplex: {path}:5: exec: {word}", err
        assert any(x.startswith("cleanup: unexposed snapshot") for x in lines), err
        assert "Traceback" not in err
        _check_cleaned_up(d, snap, sleep_pid, log_before)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _kill_leftovers(pidfile, snap)


@pytest.mark.kernel
def test_ctrl_c_on_a_terminal_during_exec(daemon: Daemon) -> None:
    """On a terminal the exec'd command is the foreground job (it has the terminal, so
    it may read it): Ctrl-C reaches the command's process group, and the script cleans
    up as after its own Ctrl-C -- exit 130, 'interrupted', nothing left."""
    d = daemon
    snap, pidfile = d.base / "snap-tty", d.base / "sleep-tty.pid"
    snap.mkdir()
    path = _exec_script(d, "tty.dsh", snap, pidfile,
                        f"exec cd {snap} && echo $$ > {pidfile} && exec sleep 1000")
    log_before = len(d.log_text())
    master, slave = pty.openpty()
    slave_name = os.ttyname(slave)

    def take_terminal() -> None:   # in the child, after setsid: the pty becomes its ctty
        os.close(os.open(slave_name, os.O_RDWR))

    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "--socket", d.socket, "script", str(path)],
        cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=slave,
        stdout=slave, stderr=slave, start_new_session=True, preexec_fn=take_terminal)
    os.close(slave)
    output = bytearray()

    def drain() -> None:
        while select.select([master], [], [], 0.05)[0]:
            try:
                output.extend(os.read(master, 65536))
            except OSError:
                return

    try:
        _wait_for(lambda: (drain(), _pid_in(pidfile))[1], 60,
                  "the exec'd command did not start")
        sleep_pid = int(pidfile.read_text())
        _wait_for(lambda: os.tcgetpgrp(master) == os.getpgid(sleep_pid), 10,
                  "the command did not get the terminal")
        os.write(master, b"\x03")                       # Ctrl-C
        _wait_for(lambda: (drain(), proc.poll())[1] is not None, 60,
                  f"the script did not end: {output.decode(errors='replace')}")
        drain()
        text = output.decode(errors="replace")
        assert proc.returncode == 130, text
        assert f"{path}:5: exec: interrupted" in text, text
        assert "cleanup: unexposed snapshot" in text, text
        _check_cleaned_up(d, snap, sleep_pid, log_before)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
        _kill_leftovers(pidfile, snap)
