"""`shadowplex demo` interrupted (kernel): Ctrl-C at two moments -- while the volume is
being set up, and after the snapshot while the workload runs with the ext4 mount, the
loop device, the FUSE mount, the daemon and an auto-release snapshot all live -- must
exit 130 and leave nothing behind: no mount, no loop device, no daemon, no temp dir.
(The uninterrupted run is tests/test_skeleton.py::test_demo_runs_end_to_end.)

The demo runs with TMPDIR set to a directory of this test's own, so "nothing left" is
checked exactly: that directory must be empty afterwards.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parent.parent


def _mounts_under(root: str) -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        targets = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), ln.split()[1])
                   for ln in f if len(ln.split()) >= 2]
    return [t for t in targets if t == root or t.startswith(root + "/")]


def _loops_under(root: str) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--raw", "--output",
                          "NAME,BACK-FILE"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return [ln for ln in out.splitlines() if f" {root}/" in ln]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("at,signals", [
    ("serve is up", ["SIGINT"]), ("snapshot ", ["SIGINT"]),
    # issue 12: SIGHUP is a stop signal too; a second signal while cleaning up used to
    # cut the cleanup short (a KeyboardInterrupt out of a step) and still print
    # "everything was cleaned up"
    ("snapshot ", ["SIGHUP"]), ("snapshot ", ["SIGTERM", "SIGINT", "SIGTERM"])])
def test_ctrl_c_cleans_everything_up(at: str, signals: list[str]) -> None:
    for tool in ("mkfs.ext4", "losetup", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="spx-demo-"))   # short, and ours only
    env = dict(os.environ, TMPDIR=tmp, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "demo"], cwd=str(ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out: list[str] = []
    daemon_pid = None
    try:
        deadline = time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "demo ended before the moment to interrupt:\n" + \
                "".join(out) + (proc.stderr.read() if proc.stderr else "")
            out.append(line)
            m = re.search(r"serve is up \(pid (\d+)\)", line)
            if m:
                daemon_pid = int(m.group(1))
            if line.startswith(f"demo: {at}"):
                break
        assert _mounts_under(tmp), "the demo should have its mounts now"   # a real moment
        for name in signals:
            proc.send_signal(signal.Signals[name])
            time.sleep(0.3)
        rc = proc.wait(120)
        reader.join(10)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for f in (proc.stdout, proc.stderr):   # the pipes, once the pump is done with them
            if f is not None:
                f.close()
    assert rc == 130, (rc, "".join(out), err)
    assert "demo: interrupted; everything was cleaned up" in err, err
    assert "Traceback" not in err and "PASS" not in "".join(out)
    assert daemon_pid is not None and not _alive(daemon_pid), "the daemon is still running"
    assert _mounts_under(tmp) == [] and _loops_under(tmp) == []
    assert os.listdir(tmp) == [], os.listdir(tmp)   # the demo's temp dir is gone too
    os.rmdir(tmp)   # only when empty: never rm -r a directory that may hold a mount
