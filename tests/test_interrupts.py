"""tools/interrupts.py: the stop signals of the tools that clean up after themselves.
Each case runs in a child process (signals are per process) and checks its exit status,
which is what a script calling the tool sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import os, signal, sys, time
from tools import interrupts
def stop(sig):
    os.kill(os.getpid(), sig)
    time.sleep(5)   # the handler raises long before this ends
"""


def _run(body: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", PRELUDE + body], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode


def test_a_signal_after_the_cleanup_does_not_change_the_exit_status() -> None:
    """SIGTERM unwinds as Interrupted (exit 143); one more after the block has ended --
    the cleanup is over, the tool is exiting -- is ignored, not the default kill."""
    assert _run("""
rc = 0
with interrupts.stop_signals():
    try:
        stop(signal.SIGTERM)
    except KeyboardInterrupt as e:
        rc = e.exit_code
        os.kill(os.getpid(), signal.SIGINT)    # during the cleanup: ignored
os.kill(os.getpid(), signal.SIGTERM)           # after it: ignored too
time.sleep(0.2)
sys.exit(rc)
""") == 143


def test_without_a_signal_the_handlers_are_given_back() -> None:
    """A block that saw no signal restores the default handlers: SIGTERM kills again."""
    assert _run("""
with interrupts.stop_signals():
    pass
stop(signal.SIGTERM)
sys.exit(0)
""") == -15
