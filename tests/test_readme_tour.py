"""The README's five-minute tour, run as written (kernel: root, FUSE, loop devices, mkfs).

The tour's shell block is read from README.md and run line by line by bash with `set -e`,
with only what a reader would change: its directories moved into the test's temporary
directory, the control socket and the NBD port made private, /dev/loopN replaced by what
losetup printed, and a wait after the `serve ... &` line for the daemon to be up (a
reader types the next line a moment later). Everything the tour starts is stopped, and
everything it mounts or attaches is undone, also when a line fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_kernel

ROOT = Path(__file__).resolve().parent.parent


def tour_lines() -> list[str]:
    """The shell lines of the README's "Five-minute tour" block (comment-only lines and
    trailing comments kept: bash ignores them)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five-minute tour", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md: no ```sh block under 'Five-minute tour'"
    return [x for x in block.group(1).splitlines() if x.strip() and
            not x.lstrip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script(lines: list[str], base: Path) -> str:
    """The tour as a bash script, with the reader's substitutions (module docstring)."""
    moved = {"/srv/pool": base / "pool", "/srv/array": base / "array",
             "/mnt/db": base / "db", "/mnt/snap": base / "snap", "/backup": base / "backup",
             "/run/shadowplex/shadowplex.sock": base / "ctl.sock"}
    out = ["set -euo pipefail", f"cd {ROOT}"]
    for line in lines:
        for old, new in moved.items():
            line = re.sub(rf"{re.escape(old)}(?=[/\s]|$)", str(new), line)
        line = line.replace("backup.dsh", str(base / "backup.dsh"))
        line = line.replace("--nbd-listen 127.0.0.1 ", f"--nbd-listen 127.0.0.1:{_free_port()} ")
        if line.startswith("losetup --find --show"):
            line = "LOOP=$(" + line.split("#")[0].strip() + f"); echo $LOOP > {base}/loop"
        line = line.replace("/dev/loopN", "$LOOP")
        serve = " serve " in line and line.rstrip().endswith("&")
        if serve:   # its own log: the test's pipes must close when bash ends
            line = line.rstrip()[:-1] + f"> {base}/serve.log 2>&1 &"
        out.append(f"echo '+ {line.replace(chr(39), '')}' >&2")
        out.append(line)
        if serve:
            out.append(f"echo $! > {base}/serve.pid")
            out.append("for i in $(seq 100); do $S status >/dev/null 2>&1 && break; "
                       "sleep 0.1; done")
    return "\n".join(out) + "\n"


def _cleanup(base: Path) -> None:
    for mnt in ("snap", "db"):
        subprocess.run(["umount", str(base / mnt)], capture_output=True, check=False)
    loop = base / "loop"
    if loop.exists():
        subprocess.run(["losetup", "-d", loop.read_text().strip()], capture_output=True,
                       check=False)
    pid_file = base / "serve.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + 15
            while time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
    subprocess.run(["umount", "-l", str(base / "array")], capture_output=True, check=False)


def test_the_tour_block_is_what_the_test_runs() -> None:
    """No kernel needed: the block parses into the lines the tour promises."""
    lines = tour_lines()
    assert lines[0].startswith("S=") and any(" serve " in x for x in lines)
    assert any(x.startswith("losetup --find --show") for x in lines)
    assert "/dev/loopN" in " ".join(lines)


@pytest.mark.kernel
def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    require_kernel([t for t in ("mkfs.ext4", "qemu-img", "qemu-nbd", "tar")
                    if subprocess.run(["which", t], capture_output=True).returncode])
    base = tmp_path
    (base / "backup.dsh").write_text("set context nas-rollback\nadd volume db\ncreate\n"
                                     "list shadows\n")
    script = _script(tour_lines(), base)
    (base / "tour.sh").write_text(script)
    try:
        res = subprocess.run(["bash", str(base / "tour.sh")], capture_output=True, text=True,
                             timeout=300, check=False,
                             env=dict(os.environ, SHADOWPLEX_SOCKET=str(base / "ctl.sock")))
        assert res.returncode == 0, f"the tour stopped:\n{res.stderr[-3000:]}"
        log = res.stderr
        # what the tour says happened did: both backups, the restore, the tar of the
        # snapshot, the revert to monday, the script's set
        for f in ("db-full.qcow2", "db-incr.qcow2", "db-new.raw", "db.tar"):
            assert (base / "backup" / f).stat().st_size > 0, f
        listed = subprocess.run(["tar", "-tf", str(base / "backup" / "db.tar")],
                                capture_output=True, text=True, check=True).stdout
        assert "./etc/hostname" in listed or "./etc/passwd" in listed, listed[:500]
        assert "+ $S revert db@monday" in log
        snaps = subprocess.run([str(ROOT / ".venv" / "bin" / "shadowplex"), "--socket",
                                str(base / "ctl.sock"), "snapshot", "list", "db", "--json"],
                               capture_output=True, text=True, check=True).stdout
        names = sorted(str(x.get("name")) for x in json.loads(snaps))
        assert names == ["None", "monday"], names   # db@latest deleted; the script's set
    finally:
        _cleanup(base)
    mounts = Path("/proc/self/mounts").read_text()
    assert str(base) not in mounts, "the tour left a mount behind"
