"""`shadowplex serve` as a service (issue 19 items 6 and 8): the audit log, the log's
destinations and levels, systemd's readiness protocol and the exit status of a
configuration error.

* the audit log: a sequence of state changes run through the CLI against a real daemon
  logs exactly one `audit:` line each, naming who asked (host, session, client), and the
  requester sessions' opening and closing are not at INFO any more;
* sd_notify: with $NOTIFY_SOCKET (a Unix datagram socket this test binds) serve sends
  READY=1 once the FUSE mount and the control socket are up, STOPPING=1 on SIGTERM;
* a configuration error (no pool at --pool) exits 78, EX_CONFIG, which the unit's
  RestartPreventExitStatus= does not restart, and sends no READY=1;
* journald: when stderr is the journal ($JOURNAL_STREAM names it) lines carry a
  syslog priority prefix and no timestamp; --log-file moves the log to a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_kernel
from harness import Daemon, launch
from support import mounted, spx

from provider import audit
from provider.config import EXIT_CONFIG

pytestmark = pytest.mark.kernel

GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
MISSING_DB = "/nonexistent-shadowplex-test/app.db"


@contextlib.contextmanager
def serve_setup(tmp_path: Path, extra: str = "") -> Iterator[tuple[Path, str, str, str]]:
    """(config file, pool, mount, socket) of a fresh pool; the socket in a short temp
    directory (sun_path is 108 bytes)."""
    require_kernel()
    pool, mount = str(tmp_path / "pool"), str(tmp_path / "mnt")
    os.makedirs(mount)
    assert spx("pool", "init", pool, "-q").returncode == 0
    sockdir = tempfile.mkdtemp(prefix="spx-svc-")
    sock = os.path.join(sockdir, "ctl.sock")
    conf = tmp_path / "serve.toml"
    conf.write_text(f'pool = "pool"\nmount = "mnt"\nsocket = "{sock}"\nhooks_dir = ""\n'
                    f'fsfreeze = false\ndefault_kind = "differential"\n{extra}')
    try:
        yield conf, pool, mount, sock
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def serve(conf: Path, pool: str, mount: str, sock: str, log: Path, *args: str,
          env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
    return launch(["serve", "--config", str(conf), *args], module="tools.cli", pool=pool,
                  mount=mount, socket=sock, log=str(log), env=env, wait=wait)


# --------------------------------------------------------------------------- audit
def audit_lines(text: str) -> list[str]:
    return [x[x.index(" audit: ") + 1:] for x in text.splitlines() if " audit: " in x]


def test_audit_log_of_a_cli_sequence(tmp_path: Path) -> None:
    with serve_setup(tmp_path, f'sqlite_databases = ["{MISSING_DB}"]\n') as \
            (conf, pool, mount, sock):
        d = serve(conf, pool, mount, sock, tmp_path / "daemon.log")
        try:
            me = d.json("status")["service_machine"]
            d.ok("volume", "create", "db", "8M")
            d.ok("volume", "resize", "db", "16M")
            s1 = d.json("snapshot", "create", "db", "--context", "app-rollback")
            set1, snap1 = s1["set_id"], s1["snapshots"][0]["id"]
            d.ok("expose", snap1, "--name", "snap1")
            d.ok("unexpose", snap1)
            d.ok("promote", snap1)
            d.ok("split", snap1, "dbcopy")
            s2 = d.json("snapshot", "create", "db", "--context", "app-rollback")
            set2, snap2 = s2["set_id"], s2["snapshots"][0]["id"]
            d.ok("revert", snap2)
            d.ok("snapshot", "delete", snap2)
            s3 = d.json("snapshot", "create", "db", "--context", "nas-rollback",
                        "--transportable", "--host", "hosta")
            set3, snap3 = s3["set_id"], s3["snapshots"][0]["id"]
            doc = tmp_path / "set.xml"
            d.ok("export", set3, "-o", str(doc))
            d.ok("import", str(doc), "--host", "hostb")
            d.ok("snapshot", "delete", "--set", set3, "--host", "hostb")
            d.ok("volume", "present", "db", "--to", me, "--to", "hostc")
            # a backup script: its auto-release set goes when its session ends
            script = tmp_path / "b.dsh"
            script.write_text("begin backup\nadd volume db\ncreate\nend backup\n")
            d.ok("script", str(script))
            d.ok("volume", "delete", "dbcopy")
        finally:
            assert d.stop() == 0
        text = d.log_text()
    lines = audit_lines(text)
    # the script's set: its snapshot id is known only from the log
    snap4 = re.search(rf"snapshot.create id=({GUID}) volume=db set=({GUID}) context=backup",
                      text)
    assert snap4, text
    ids = {snap1: "S1", snap2: "S2", snap3: "S3", snap4[1]: "S4", set1: "SET1",
           set2: "SET2", set3: "SET3", snap4[2]: "SET4"}

    def norm(x: str) -> str:
        x = re.sub(GUID, lambda m: ids.get(m[0], "?" + m[0]), x)
        x = re.sub(r"took=[0-9.]+s", "took=T", x)
        return re.sub(r"session=\d+", "session=N", x)
    cli = f"host={me} session=N client=shadowplex-cli"
    skip = f"writer.skip writer=sqlite database={MISSING_DB} reason=missing"
    got = [norm(x) for x in lines]
    script_client = re.search(r"client=(\S+) snapshot.create id=" + snap4[1], text)
    assert script_client, text
    scr = f"host={me} session=N client={script_client[1]}"
    mib = 1 << 20
    assert got == [
        f"audit: {cli} volume.create name=db size={8 * mib}",
        f"audit: {cli} volume.resize name=db size={16 * mib} was={8 * mib}",
        f"audit: {cli} {skip}",
        f"audit: {cli} snapshot.create id=S1 volume=db set=SET1 context=app-rollback "
        "kind=differential took=T",
        f"audit: {cli} snapshot.expose id=S1 volume=db name=snap1",
        f"audit: {cli} snapshot.unexpose id=S1 volume=db",
        f"audit: {cli} snapshot.promote id=S1 volume=db",
        f"audit: {cli} snapshot.split id=S1 volume=db new_volume=dbcopy",
        f"audit: {cli} {skip}",
        f"audit: {cli} snapshot.create id=S2 volume=db set=SET2 context=app-rollback "
        "kind=differential took=T",
        f"audit: {cli} snapshot.revert id=S2 volume=db",
        f"audit: {cli} snapshot.delete id=S2 volume=db set=SET2",
        "audit: host=hosta session=N client=shadowplex-cli snapshot.create id=S3 volume=db "
        "set=SET3 context=nas-rollback kind=differential took=T",
        f"audit: {cli} set.export id=SET3 snapshots=S3 writers=0",
        "audit: host=hostb session=N client=shadowplex-cli set.import id=SET3 "
        "on_host=hostb origin=hosta snapshots=S3",
        "audit: host=hostb session=N client=shadowplex-cli snapshot.delete id=S3 "
        "volume=db set=SET3",
        f"audit: {cli} volume.present name=db hosts={','.join(sorted([me, 'hostc']))} "
        f"was={me}",
        f"audit: {scr} {skip}",
        f"audit: {scr} snapshot.create id=S4 volume=db set=SET4 context=backup "
        "kind=differential took=T",
        f"audit: {scr} snapshot.delete id=S4 volume=db set=SET4 reason=auto-release",
        f"audit: {cli} volume.delete name=dbcopy",
    ], "\n".join(got)
    # who asked: one session per command (distinct numbers, in order)
    sessions = [int(m[1]) for x in lines if (m := re.search(r"session=(\d+)", x))]
    assert sessions == sorted(sessions)
    # sessions open and close at DEBUG now (they were half of all lines at INFO)
    assert not re.search(r"session \d+ (opened|closed)", text), text
    assert " INFO " in text


def test_audit_values_cannot_forge_a_line() -> None:
    """A client name is the requester's to choose: quoted and escaped, one line."""
    who = audit.Requester(7, "hostb", 'evil\naudit: host=x session=1 client=y volume.delete')
    x = audit.line("volume.create", who, name="db", size=1)
    assert "\n" not in x
    assert x.startswith('audit: host=hostb session=7 client="evil\\naudit: host=x ')
    assert audit.line("writer.skip", None, database="/a b/c.db") == \
        'audit: host=- session=- client=- writer.skip database="/a b/c.db"'


def test_overflow_deletion_is_an_audit_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The block store's overflow hook (set by the coordinator): one WARNING audit line
    that still says what the engine's own warning said."""
    from provider.coordinator import _overflow_audit
    with caplog.at_level(logging.INFO, logger="provider.audit"):
        _overflow_audit("v", "00000000-0000-0000-0000-000000000001",
                        "diff-area limit reached")
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING
    assert rec.getMessage() == (
        "audit: host=- session=- client=- snapshot.delete "
        "id=00000000-0000-0000-0000-000000000001 volume=v reason=overflow "
        'why="diff-area limit reached for volume v: deleting its oldest snapshot '
        '00000000-0000-0000-0000-000000000001"')


# --------------------------------------------------------------------------- sd_notify
@contextlib.contextmanager
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    d = tempfile.mkdtemp(prefix="spx-ntf-")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(os.path.join(d, "notify"))
        yield s
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def receive(s: socket.socket, timeout: float) -> dict[str, str]:
    s.settimeout(timeout)
    msg = s.recv(4096).decode()
    return dict(x.split("=", 1) for x in msg.splitlines())


def test_ready_after_the_mount_and_socket_stopping_on_sigterm(tmp_path: Path) -> None:
    with serve_setup(tmp_path) as (conf, pool, mount, sock), notify_socket(tmp_path) as ns:
        env = dict(os.environ, NOTIFY_SOCKET=ns.getsockname())
        d = serve(conf, pool, mount, sock, tmp_path / "daemon.log", env=env, wait=False)
        try:
            msg = receive(ns, 30)
            # at READY=1 the array can be used: mounted, and the control socket answers
            assert msg.get("READY") == "1", msg
            assert mounted(mount) and os.path.exists(sock)
            assert msg["STATUS"] == f"serving {pool} at {os.path.realpath(mount)}"
            assert d.json("status")["mount"] == os.path.realpath(mount)
        finally:
            rc = d.stop()
        assert rc == 0
        msg = receive(ns, 5)
        assert msg.get("STOPPING") == "1" and msg["STATUS"].startswith("stopping"), msg


def test_notifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable is taken out of the environment (hooks and helpers the daemon runs
    must not speak for it); an abstract "@name" works; no socket: nothing, no error."""
    from provider.sdnotify import Notifier
    name = f"@spx-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name[1:])
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        n = Notifier.from_environment()
        assert "NOTIFY_SOCKET" not in os.environ
        assert n.notify("READY=1", "STATUS=two\nlines")
        assert receive(s, 5) == {"READY": "1", "STATUS": "two lines"}
    assert not Notifier.from_environment().notify("READY=1")
    assert not Notifier(str(tmp_path / "nobody")).notify("READY=1")   # logged, no raise


def test_config_error_exits_78_without_ready(tmp_path: Path) -> None:
    """No pool at --pool: exit 78 (EX_CONFIG; contrib/shadowplex.service does not
    restart it), one line, nothing sent to systemd."""
    with serve_setup(tmp_path) as (conf, pool, mount, sock), notify_socket(tmp_path) as ns:
        env = dict(os.environ, NOTIFY_SOCKET=ns.getsockname())
        log = tmp_path / "daemon.log"
        d = serve(conf, pool, mount, sock, log, "--pool", str(tmp_path / "nopool"),
                  env=env, wait=False)
        assert d.proc.wait(30) == EXIT_CONFIG
        assert log.read_text().splitlines()[-1].startswith(
            f"shadowplex serve: error: no pool at {tmp_path / 'nopool'}")
        ns.setblocking(False)
        with pytest.raises(BlockingIOError):
            ns.recv(4096)
        assert not mounted(mount)


# --------------------------------------------------------------------------- destinations
def test_journal_format_and_log_file(tmp_path: Path) -> None:
    """stderr that is the journal ($JOURNAL_STREAM = its dev:ino): '<6>INFO name: ...'
    lines, no timestamp. Then --log-file: the log goes to the file instead (with
    timestamps), at the level asked."""
    with serve_setup(tmp_path) as (conf, pool, mount, sock):
        log = tmp_path / "daemon.log"
        log.touch()
        st = os.stat(log)
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        d = serve(conf, pool, mount, sock, log, env=env)
        d.ok("volume", "create", "v", "1M")
        assert d.stop() == 0
        ours = [x for x in log.read_text().splitlines() if "provider." in x]
        assert ours and all(re.match(r"<[2-7]>[A-Z]+ [a-z_.]+: ", x) for x in ours), ours
        assert any(x.startswith("<6>INFO provider.audit: audit: ") for x in ours), ours

        size = log.stat().st_size
        logfile = tmp_path / "serve-file.log"
        d = serve(conf, pool, mount, sock, log, "--log-file", str(logfile),
                  "--log-level", "warning")
        d.ok("volume", "create", "w", "1M")
        assert d.stop() == 0
        assert "provider." not in log.read_text()[size:]
        text = logfile.read_text()
        assert " INFO " not in text and "audit:" not in text, text   # --log-level warning
        d = serve(conf, pool, mount, sock, log, "--log-file", str(logfile))
        d.ok("volume", "delete", "w")
        assert d.stop() == 0
        text = logfile.read_text()
        assert re.search(r"^\d{4}-\d\d-\d\d [0-9:,]+ shadowplex\[\d+\] INFO provider.audit: "
                         r"audit: host=\S+ session=\d+ client=shadowplex-cli volume.delete "
                         r"name=w$", text, re.M), text


def test_audit_value_rendering() -> None:
    """(audit values: lists joined by commas, sets sorted, empty as '-')"""
    assert audit.value(["a", "b"]) == "a,b" and audit.value({"b", "a"}) == "a,b"
    assert audit.value([]) == "-" and audit.value(None) == "-" and audit.value("") == "-"
    assert audit.value('x"y') == json.dumps('x"y')
