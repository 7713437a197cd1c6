"""`shadowplex demo`: the whole product in one run, on a pool in a temporary directory.

pool -> serve -> volume -> loop + mkfs.ext4 + mount -> files and a SQLite database under a
write load -> application-consistent snapshot (backup context, writers frozen) -> keep
writing -> expose the snapshot read-only -> tar it -> verify every file against its
point-in-time checksum and the database's integrity -> BackupComplete -> clean up
(also on Ctrl-C or failure).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator

import xxhash

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


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
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
        except BaseException as e:  # reported by the main thread
            self.error = e

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[int]:
        with self.lock:
            yield self.rows


def run_demo(keep: bool = False, quiet: bool = False) -> int:
    from provider.client import Client

    t0 = time.monotonic()
    base = tempfile.mkdtemp(prefix="shadowplex-demo-")
    pool, mnt = os.path.join(base, "pool"), os.path.join(base, "mnt")
    fs, snapfs = os.path.join(base, "fs"), os.path.join(base, "snapshot")
    sock = os.path.join(base, "control.sock")
    for d in (mnt, fs, snapfs):
        os.makedirs(d)
    cleanup = contextlib.ExitStack()
    # Ctrl-C and SIGTERM unwind through the ExitStack like any failure.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    report: dict[str, object] = {}
    try:
        with cleanup:
            env = dict(os.environ, SHADOWPLEX_SOCKET=sock)
            cli = [sys.executable, "-m", "tools.cli"]
            _run(*cli, "pool", "init", pool)
            _say(quiet, f"pool created at {pool}")
            db_path = os.path.join(fs, "app.sqlite")
            log = open(os.path.join(base, "serve.log"), "w")
            cleanup.callback(log.close)
            daemon = subprocess.Popen([*cli, "serve", "--pool", pool, "--mount", mnt,
                                       "--sqlite-db", db_path], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            cleanup.callback(_stop_daemon, daemon, mnt)
            _wait(lambda: os.path.ismount(mnt) and os.path.exists(sock), 30,
                  "waiting for the daemon", daemon)
            _say(quiet, f"serve is up (pid {daemon.pid}), volumes under {mnt}")
            c = Client(sock, client="shadowplex-demo")
            cleanup.callback(c.close)
            c.volume_create("demo", VOLUME_SIZE)
            img = os.path.join(mnt, "volumes", "demo.img")
            loop = _run("losetup", "--find", "--show", img)
            cleanup.callback(_run, "losetup", "-d", loop)
            _run("mkfs.ext4", "-q", "-L", "demo", loop)
            _run("mount", loop, fs)
            cleanup.callback(_run, "umount", fs)
            _say(quiet, f"volume demo ({VOLUME_SIZE}) is ext4 on {loop}, mounted at {fs}")
            work = Workload(fs)
            work.populate()
            work.thread.start()
            cleanup.callback(work.thread.join, 10)
            cleanup.callback(work.stop.set)
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
            c.expose(sid, mount=snapfs)
            cleanup.callback(c.unexpose, sid)
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
    except KeyboardInterrupt:
        print("demo: interrupted; everything was cleaned up", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        print(f"demo: daemon log: {os.path.join(base, 'serve.log')}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
    if not keep:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"demo: kept {base}")
    return 0 if ok else 1


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
    import shutil
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


def _stop_daemon(proc: subprocess.Popen, mnt: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if os.path.ismount(mnt) or _is_dead_mount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)


def _is_dead_mount(path: str) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True
