"""Run a command as a job of its own: one process group, ended as a whole.

`shadowplex script`'s `exec` runs `/bin/sh -c CMD`; the shell may start pipelines and
background children that read the snapshot. They share one process group, so that a
cleanup (the script's Ctrl-C, SIGTERM, SIGHUP, a failure) ends all of them -- SIGTERM
to the group, SIGKILL after a grace period -- instead of leaving them running (reparented
to init) on a snapshot the cleanup is about to unmount and delete. A job that ends by
itself may leave background processes (`cmd &`) running; `end()` stops those too. So it
does the job's descendants that left its group while the job runs (fio's job processes
call setsid(): killing fio's group left them reading the image, holding the pipes).

The terminal: when the caller is the terminal's foreground process group, the job gets
the terminal while it runs, as a shell's foreground job does (it may read it; Ctrl-C goes
to the job); a job killed by SIGINT or SIGQUIT is then reported as KeyboardInterrupt, so
the caller cleans up as after its own Ctrl-C. Ctrl-Z stops the job and the caller's
group; `fg` resumes both. Without the terminal (a pipe, cron, systemd), the caller gets
the signals and ends the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

GRACE = 3.0   # seconds between SIGTERM and SIGKILL of a job being ended


def _foreground_tty() -> int | None:
    """A standard fd on the terminal whose foreground process group is ours, if any."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
    return None


def _give_terminal(fd: int, pgid: int) -> None:
    """tcsetpgrp from what may be a background group: SIGTTOU would stop us."""
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, pgid)
    finally:
        signal.signal(signal.SIGTTOU, old)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill_strays(strays: list[tuple[int, str | None]], grace: float) -> None:
    """SIGKILL to those strays (pid, start time) still there after grace seconds (they
    got SIGTERM). They are not our children: a pid is killed only while its start time
    is the recorded one, never a process that got the number meanwhile."""
    deadline = time.monotonic() + max(0.0, grace)
    while time.monotonic() < deadline and any(_started(p) == t for p, t in strays):
        time.sleep(0.02)
    for p, t in strays:
        if t is not None and _started(p) == t:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> bool:
    """False if the group has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:   # a member changed its credentials; others got it
        pass
    return True


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children first), whatever its process group or
    session, from /proc/*/stat. Empty once pid is gone (its orphans go to init)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int, pgid: int | None = None, sig: int = signal.SIGKILL,
              wait: float = 0.0) -> None:
    """sig to pid's process group (pgid) and to each of pid's descendants outside it;
    then, up to `wait` seconds, until those descendants are gone. (A killed process
    dies only when it leaves the kernel: one in the middle of an O_DIRECT write through
    a FUSE mount lives on until its request is answered -- and holds its paths, its
    environment, the mount meanwhile.)"""
    strays = descendants(pid)
    if pgid is not None:
        _killpg(pgid, sig)
    for p in strays:
        with contextlib.suppress(OSError):
            os.kill(p, sig)
    deadline = time.monotonic() + wait
    while strays and time.monotonic() < deadline:
        strays = [p for p in strays if _running(p)]
        if strays:
            time.sleep(0.01)


def _running(pid: int) -> bool:
    """pid is there and not a zombie (a zombie holds nothing but its exit status)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Job:
    """A started command; ``wait()`` for it, ``end()`` it and what it left running."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(list(argv), env=env, process_group=0)
        self.pgid = self.proc.pid
        self._tty = _foreground_tty()

    def wait(self) -> int:
        """The job's exit status as Popen.returncode (negative: killed by that signal).
        Any exception meanwhile (KeyboardInterrupt, a signal handler's) ends the job."""
        try:
            if self._tty is None:
                return self.proc.wait()
            return self._wait_in_foreground(self._tty)
        except BaseException:
            self.end()
            raise

    def _wait_in_foreground(self, tty: int) -> int:
        _give_terminal(tty, self.pgid)
        try:
            while True:
                _, status = os.waitpid(self.pgid, os.WUNTRACED)
                if not os.WIFSTOPPED(status):
                    self.proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                # Ctrl-Z stopped the job: stop our group too, so the shell takes the
                # terminal back; on `fg` (SIGCONT to us) the job gets it and goes on
                _give_terminal(tty, os.getpgrp())
                os.killpg(os.getpgrp(), signal.SIGTSTP)
                _give_terminal(tty, self.pgid)
                _killpg(self.pgid, signal.SIGCONT)
        finally:
            _give_terminal(tty, os.getpgrp())
        rc = self.proc.returncode
        if rc in (-signal.SIGINT, -signal.SIGQUIT):
            self.end()
            raise KeyboardInterrupt
        return rc

    def end(self, grace: float = GRACE) -> None:
        """SIGTERM (and SIGCONT, if stopped) to every process of the job, SIGKILL to
        those left after ``grace`` seconds; returns when none is left (or 10 s after the
        SIGKILL: a process stuck in D state cannot go sooner)."""
        blocked = signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            strays = [(p, _started(p)) for p in descendants(self.pgid)
                      if _pgid(p) != self.pgid]
            for p, _ in strays:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGTERM)
                    os.kill(p, signal.SIGCONT)
            if not (_killpg(self.pgid, signal.SIGTERM) and _killpg(self.pgid, signal.SIGCONT)):
                self.proc.poll()
                _kill_strays(strays, grace)
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()   # reap the leader: a zombie still counts in its group
                if not _killpg(self.pgid, 0):
                    _kill_strays(strays, deadline - time.monotonic())
                    return
                time.sleep(0.02)
            _kill_strays(strays, 0)
            _killpg(self.pgid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                self.proc.poll()
                if not _killpg(self.pgid, 0):
                    return
                time.sleep(0.02)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run argv as a job and wait for it (see Job.wait); whatever it left running in its
    group after a failure (non-zero status) is ended too."""
    job = Job(argv, env)
    rc = job.wait()
    if rc != 0:
        job.end()
    return rc
