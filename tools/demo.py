"""`shadowplex demo`: the whole product in one run, on a pool in a temporary directory.

pool -> serve -> volume -> loop + mkfs.ext4 + mount -> files and a SQLite database under a
write load -> application-consistent snapshot (backup context, writers frozen) -> keep
writing -> expose the snapshot read-only -> tar it -> verify every file against its
point-in-time checksum and the database's integrity -> BackupComplete -> clean up.

Cleanup happens on success, failure, Ctrl-C (SIGINT), SIGTERM and SIGHUP alike (a second
signal does not cut it short): the snapshot is
unexposed, the filesystem unmounted, the loop device detached, the daemon stopped (its
FUSE mount gone) and the temporary directory removed -- unless `--keep`, which keeps the
directory (pool, serve.log, backup.tar) for a look afterwards. Exit status: 0 PASS,
1 failed, 130 interrupted. On a failure without --keep the end of the daemon's log is
printed, since the directory holding it is removed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import xxhash

from fuse_mount import loopdev
from fuse_mount.loopdev import DELETED

from . import interrupts

VOLUME_SIZE = "256M"
FILES = 120


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"demo: {msg}", flush=True)


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


def _wait(pred: Callable[[], object], timeout: float, what: str,
          proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {proc.returncode} while {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out {what}")
        time.sleep(0.05)


def manifest(root: str) -> dict[str, str]:
    """relative path -> xxh3-128 hex of every regular file under root."""
    out = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            # The database is verified by its own means: the SQLite writer checkpoints
            # its WAL into the main file during the freeze, so its bytes change then.
            if rel.startswith(("lost+found", "app.sqlite")):
                continue
            with open(p, "rb") as fh:
                out[rel] = xxhash.xxh3_128_hexdigest(fh.read())
    return out


class Workload:
    """Files rewritten and SQLite rows inserted until stopped; `quiesced()` pauses it
    (the application's own quiesce, as a VSS writer would)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.rows = 0
        self.db_path = os.path.join(root, "app.sqlite")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def populate(self) -> None:
        rnd = random.Random(1)
        os.makedirs(os.path.join(self.root, "data", "sub"), exist_ok=True)
        for i in range(FILES):
            sub = "sub" if i % 3 == 0 else ""
            with open(os.path.join(self.root, "data", sub, f"f{i:03}.bin"), "wb") as f:
                f.write(rnd.randbytes(rnd.randint(1, 256 * 1024)))
        db = sqlite3.connect(self.db_path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
        db.commit()
        db.close()

    def _run(self) -> None:
        try:
            rnd = random.Random(2)
            db = sqlite3.connect(self.db_path, timeout=30)
            while not self.stop.is_set():
                with self.lock:
                    i = rnd.randrange(FILES)
                    sub = "sub" if i % 3 == 0 else ""
                    with open(os.path.join(self.root, "data", sub, f"f{i:03}.bin"), "wb") as f:
                        f.write(rnd.randbytes(rnd.randint(1, 64 * 1024)))
                    db.execute("INSERT INTO t (v) VALUES (?)", (rnd.randbytes(200),))
                    db.commit()
                    self.rows += 1
                time.sleep(0.002)
            db.close()
        except BaseException as e:   # noqa: BLE001 - reported by the main thread
            self.error = e

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[int]:
        with self.lock:
            yield self.rows


class _Cleanup(contextlib.ExitStack):
    """The demo's undo steps, run last-in first-out. Each step is registered BEFORE the
    action it undoes and tolerates that the action never happened, so a Ctrl-C at any
    moment (even inside `mount` or `losetup`) leaves nothing behind. A step that fails
    is reported and recorded; the others still run."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def step(self, what: str, fn: Callable[..., object], *args: object) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception as e:   # noqa: BLE001 - the cleanup goes on; reported
                self.errors.append(f"{what}: {e}")
                print(f"demo: cleanup: {what}: {e}", file=sys.stderr)
        self.callback(run)


def run_demo(keep: bool = False, quiet: bool = False) -> int:
    """Exit status: 0 PASS, 1 failed (or FAIL), 130 interrupted (SIGINT/SIGTERM/SIGHUP).
    The temporary directory is removed in every case unless ``keep`` (then its path is
    printed: pool, daemon log serve.log, backup.tar)."""
    # SIGTERM and SIGHUP unwind like Ctrl-C, and a second signal cannot cut the cleanup
    # short (it used to, and "everything was cleaned up" was printed anyway)
    with interrupts.stop_signals():
        return _run_demo(keep, quiet)


def _run_demo(keep: bool, quiet: bool) -> int:
    from provider.client import Client

    t0 = time.monotonic()
    base: str | None = None
    report: dict[str, object] = {}
    bad: list[str] = []
    cleanup = _Cleanup()
    rc = 1
    try:
        # canonical: mount targets are compared with the mount table (which has no
        # symlinks) when cleaning up
        base = os.path.realpath(tempfile.mkdtemp(prefix="shadowplex-demo-"))
        pool, mnt = os.path.join(base, "pool"), os.path.join(base, "mnt")
        fs, snapfs = os.path.join(base, "fs"), os.path.join(base, "snapshot")
        sock = os.path.join(base, "control.sock")
        for d in (mnt, fs, snapfs):
            os.makedirs(d)
        with cleanup:
            env = dict(os.environ, SHADOWPLEX_SOCKET=sock)
            cli = [sys.executable, "-m", "tools.cli"]
            _run(*cli, "pool", "init", pool)
            _say(quiet, f"pool created at {pool}")
            db_path = os.path.join(fs, "app.sqlite")
            log = open(os.path.join(base, "serve.log"), "w")   # noqa: SIM115 - cleanup closes
            cleanup.callback(log.close)
            daemons: list[subprocess.Popen[bytes]] = []
            cleanup.step("stopping the daemon", _stop_daemons, daemons, mnt)
            # its own session: a Ctrl-C on the terminal reaches the demo, which then
            # stops the daemon in order (after unmounting what uses the mount)
            daemons.append(subprocess.Popen(
                [*cli, "serve", "--pool", pool, "--mount", mnt, "--sqlite-db", db_path],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            daemon = daemons[0]
            _wait(lambda: os.path.ismount(mnt) and os.path.exists(sock), 30,
                  "waiting for the daemon", daemon)
            _say(quiet, f"serve is up (pid {daemon.pid}), volumes under {mnt}")
            c = Client(sock, client="shadowplex-demo")
            cleanup.callback(c.close)
            c.volume_create("demo", VOLUME_SIZE)
            img = os.path.join(mnt, "volumes", "demo.img")
            cleanup.step("detaching the loop device", _detach_loops, img)
            loop = _run("losetup", "--find", "--show", img)
            _run("mkfs.ext4", "-q", "-L", "demo", loop)
            cleanup.step(f"unmounting {fs}", _umount, fs)
            _run("mount", loop, fs)
            _say(quiet, f"volume demo ({VOLUME_SIZE}) is ext4 on {loop}, mounted at {fs}")
            work = Workload(fs)
            work.populate()
            cleanup.step("stopping the workload", _stop_workload, work)
            work.thread.start()
            time.sleep(0.5)
            with work.quiesced() as rows_at_snapshot:
                expected = manifest(fs)
                t = time.monotonic()
                res = c.snapshot_create(["demo"], context="backup")
                snap_ms = (time.monotonic() - t) * 1000
            snap = res["snapshots"][0]
            sid, set_id = snap["snapshot_id"], res.get("set_id") or snap["snapshot_set_id"]
            _say(quiet, f"snapshot {sid} created in {snap_ms:.0f} ms "
                        f"({len(expected)} files, {rows_at_snapshot} database rows)")
            time.sleep(1.0)   # the application keeps writing
            changed = sum(1 for k, v in manifest(fs).items() if expected.get(k) != v)
            _say(quiet, f"the live volume moved on: {changed} files differ now")
            cleanup.step(f"unexposing snapshot {sid}", _unexpose, c, sid, snapfs)
            c.expose(sid, mount=snapfs)
            tar_path = os.path.join(base, "backup.tar")
            with tarfile.open(tar_path, "w") as tar:
                tar.add(snapfs, arcname=".")
            _say(quiet, f"backed up the exposed snapshot into {tar_path} "
                        f"({os.path.getsize(tar_path) >> 10} KiB)")
            bad = verify_tar(tar_path, expected)
            db_rows, integrity = check_sqlite(os.path.join(snapfs, "app.sqlite"), base)
            c.end_backup(set_id)
            report = {"files": len(expected), "files_bad": len(bad), "rows": db_rows,
                      "rows_expected": rows_at_snapshot, "integrity": integrity,
                      "snapshot_ms": round(snap_ms, 1), "changed_after": changed}
            if work.error:
                raise RuntimeError(f"the workload failed: {work.error}")
        if cleanup.errors:
            raise RuntimeError("cleanup incomplete: " + "; ".join(cleanup.errors))
        rc = _report(report, bad, quiet, t0)
    except KeyboardInterrupt:
        print("demo: interrupted" + ("; everything was cleaned up" if not cleanup.errors
                                     else "; cleanup incomplete (see above)"),
              file=sys.stderr)
        rc = 130
    except Exception as e:   # noqa: BLE001 - the demo's one-line failure report
        print(f"demo: failed: {e}", file=sys.stderr)
        if base is not None and not keep:
            _print_tail(os.path.join(base, "serve.log"))
        rc = 1
    finally:
        if base is not None:
            _remove_base(base, keep, rc)
    return rc


def _report(report: dict[str, object], bad: list[str], quiet: bool, t0: float) -> int:
    ok = (report["files_bad"] == 0 and report["integrity"] == "ok"
          and report["rows"] == report["rows_expected"])
    if report["files_bad"]:
        print(f"demo: mismatching files: {', '.join(bad[:10])}", file=sys.stderr)
    if not quiet or not ok:
        print(f"demo: {report['files']} files verified against their point-in-time checksums, "
              f"{report['files_bad']} mismatches; database: {report['rows']} rows "
              f"(expected {report['rows_expected']}), integrity_check {report['integrity']}; "
              f"snapshot took {report['snapshot_ms']} ms; total {time.monotonic() - t0:.1f} s"
              f" -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _remove_base(base: str, keep: bool, rc: int) -> None:
    if keep:
        print(f"demo: kept {base} (the pool, serve.log, backup.tar once made)", file=sys.stderr)
        return
    # Never remove through a mount that is still there: rm -r inside the FUSE mount would
    # delete the volumes' images through the daemon, inside the ext4 one the live data.
    left = [t for t in _mount_targets() if t == base or t.startswith(base + "/")]
    if left:
        print(f"demo: NOT removing {base}: still mounted: {', '.join(left)}", file=sys.stderr)
        return
    shutil.rmtree(base, ignore_errors=True)
    if rc != 0:
        print(f"demo: removed {base}; run 'shadowplex demo --keep' to keep it",
              file=sys.stderr)


def _print_tail(path: str, lines: int = 15) -> None:
    """The end of the daemon's log, since the directory holding it is about to go."""
    try:
        with open(path, errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        print(f"demo: serve.log: {line}", file=sys.stderr)


def verify_tar(tar_path: str, expected: dict[str, str]) -> list[str]:
    bad = []
    seen = set()
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            rel = os.path.normpath(m.name)
            if rel not in expected:
                continue
            seen.add(rel)
            f = tar.extractfile(m)
            if f is None or xxhash.xxh3_128_hexdigest(f.read()) != expected[rel]:
                bad.append(rel)
    bad += sorted(set(expected) - seen)
    return bad


def check_sqlite(path: str, scratch: str) -> tuple[int, str]:
    """Row count and integrity_check of a copy (the snapshot mount is read-only)."""
    copy = os.path.join(scratch, "verify.sqlite")
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            shutil.copyfile(path + suffix, copy + suffix)
    db = sqlite3.connect(copy)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        db.close()
    return rows, integrity


def _stop_daemons(procs: list[subprocess.Popen[bytes]], mnt: str) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if os.path.ismount(mnt) or _is_dead_mount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)


def _stop_workload(work: Workload) -> None:
    work.stop.set()
    if work.thread.ident is not None:   # started (join() of an unstarted one raises)
        work.thread.join(10)


def _mount_targets() -> list[str]:
    return [mp for mp, _, _ in loopdev.mountinfo()]


def _umount(path: str) -> None:
    if loopdev.mounted_at(path):
        _run("umount", path)


def _detach_loops(image: str) -> None:
    """Detach every loop device on image: also one attached by a `losetup --find --show`
    that was interrupted before it printed its name. By the recorded back-file name, not
    `losetup -j` (which stats the image: no use on a dead mount)."""
    out = _run("losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE")
    for line in out.splitlines():
        dev, _, back = line.partition(" ")
        if back.removesuffix(DELETED) == image:
            _run("losetup", "-d", dev)


def _unexpose(c: object, sid: str, where: str) -> None:
    from provider.client import ControlError
    try:
        c.unexpose(sid)   # type: ignore[attr-defined]
    except ControlError as e:
        # never exposed (interrupted before), or the daemon already ended the set
        if e.name not in ("VSS_E_OBJECT_NOT_FOUND", "VSS_E_BAD_STATE") and \
                where in _mount_targets():
            raise


def _is_dead_mount(path: str) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True
