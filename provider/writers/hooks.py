"""HookScriptWriter: run the executables of a directory as freeze/thaw hooks.

Like qemu-guest-agent's ``fsfreeze-hook.d`` and the pre/post scripts of backup tools:
every executable regular file in the directory (symlinks to one count; names starting
with ``.`` and ending with ``~`` are ignored), in name order, is a hook, called as::

    HOOK freeze | thaw | abort | backup-complete

with stdin from /dev/null, the working directory ``/`` and in its environment:

* ``SHADOWPLEX_VOLUMES``: the volume image paths of the set, colon-separated;
* ``SHADOWPLEX_SET_ID``: the snapshot set id, where known;
* ``SHADOWPLEX_ACTION``: the argument again;
* ``SHADOWPLEX_BACKUP_SUCCEEDED``: ``1`` or ``0``, for backup-complete only.

The contract a hook can rely on:

* ``freeze`` runs in name order. A hook that exits non-zero (or runs past its timeout:
  its whole process group is killed) fails the freeze: the hooks frozen before it get
  ``thaw`` in reverse order, then every hook that was run for freeze, the failing one
  included, gets ``abort`` in reverse order.
* ``thaw`` is sent exactly once, in reverse order, to every hook whose ``freeze``
  succeeded: after the snapshot, or when the set is cancelled (before its ``abort``).
  So a hook written for freeze/thaw only (exit 0 on anything else) is always released.
* ``abort`` tells the hooks run for freeze that the set was cancelled.
* ``backup-complete`` goes to the hooks run for freeze of the set whose backup is done
  (to every hook if the writer does not know, e.g. after a restart).

A hook may leave a background process behind on purpose (e.g. one that holds a database
lock until thaw): only a hook that times out has its process group killed. Output goes to
temporary files, never pipes, so such a process cannot block the writer; stdout and stderr
are logged at debug level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .base import Component, UsageType, Writer, WriterError, WriterMetadata

log = logging.getLogger(__name__)

DEFAULT_HOOK_TIMEOUT = 30.0


@dataclass(frozen=True)
class HookResult:
    hook: str
    action: str
    returncode: int | None   # None: killed on timeout
    stderr_tail: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            what = f"timed out after {self.duration:.3g} s and was killed"
        elif self.returncode < 0:
            what = f"was killed by signal {-self.returncode}"
        else:
            what = f"exited with code {self.returncode}"
        tail = f": {self.stderr_tail}" if self.stderr_tail else ""
        return f"hook {self.hook} {self.action} {what}{tail}"


def _last_line(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4096))
    lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


def _head(f: IO[bytes], limit: int = 4096) -> str:
    f.seek(0)
    return f.read(limit).decode(errors="replace")


class HookScriptWriter(Writer):
    """Runs the hooks of ``directory`` (see the module doc). ``timeout``: seconds per hook
    call (a freeze call also stops at the freeze deadline)."""

    usage_type = UsageType.VSS_UT_USERDATA
    freeze_order = 10

    def __init__(self, directory: str | os.PathLike[str], *,
                 timeout: float = DEFAULT_HOOK_TIMEOUT, name: str = "hooks") -> None:
        self.directory = Path(os.path.abspath(directory))
        super().__init__(name, str(self.directory))
        self.timeout = timeout
        self._lock = threading.Lock()
        self._volumes: list[str] = []
        self._ran_freeze: list[Path] = []  # hooks sent freeze in the current cycle
        self._frozen: list[Path] = []      # hooks whose freeze succeeded, not thawed yet

    # ------------------------------------------------------------------ discovery
    def hooks(self) -> list[Path]:
        """The hooks, in the order freeze runs them."""
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            if e.name.startswith(".") or e.name.endswith("~"):
                continue
            try:
                if e.is_file() and os.access(e.path, os.X_OK):
                    out.append(Path(e.path))
            except OSError:
                continue
        return out

    def involved(self, volumes: Sequence[str]) -> bool:
        return bool(self.hooks())

    def identify(self) -> WriterMetadata:
        return self._metadata([
            Component(name=h.name, logical_path=str(self.directory),
                      component_type="filegroup") for h in self.hooks()])

    # ------------------------------------------------------------------ running
    def run_hook(self, hook: Path, action: str, timeout: float, *,
                 volumes: Sequence[str] = (), set_id: str | None = None,
                 succeeded: bool | None = None) -> HookResult:
        """Run one hook call; never raises for the hook's own failure."""
        env = dict(os.environ)
        env["SHADOWPLEX_VOLUMES"] = ":".join(volumes)
        env["SHADOWPLEX_ACTION"] = action
        env.pop("SHADOWPLEX_SET_ID", None)
        if set_id:
            env["SHADOWPLEX_SET_ID"] = set_id
        env.pop("SHADOWPLEX_BACKUP_SUCCEEDED", None)
        if succeeded is not None:
            env["SHADOWPLEX_BACKUP_SUCCEEDED"] = "1" if succeeded else "0"
        start = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    [str(hook), action], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    cwd="/", env=env, start_new_session=True, close_fds=True)
            except OSError as e:
                return HookResult(hook.name, action, 127, f"cannot run: {e.strerror}",
                                  time.monotonic() - start)
            rc: int | None
            try:
                rc = proc.wait(timeout=max(timeout, 0.0))
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                if proc.returncode is None:  # timed out, or we were interrupted
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            duration = time.monotonic() - start
            tail = _last_line(err)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("hook %s %s: rc=%s stdout=%r stderr=%r", hook.name, action, rc,
                          _head(out), _head(err))
        return HookResult(hook.name, action, rc, tail, duration)

    def _call(self, hooks: Sequence[Path], action: str, *, succeeded: bool | None = None
              ) -> list[HookResult]:
        """Run ``action`` on each hook in the given order; returns the failures."""
        failures = []
        for h in hooks:
            r = self.run_hook(h, action, self.timeout, volumes=self._volumes,
                              set_id=self.set_id, succeeded=succeeded)
            if not r.ok:
                log.error("%s", r.describe())
                failures.append(r)
        return failures

    def _unwind(self) -> list[HookResult]:
        """thaw the frozen hooks, then abort every hook run for freeze (both reversed).
        Caller holds _lock."""
        frozen, self._frozen = self._frozen, []
        ran, self._ran_freeze = self._ran_freeze, []
        return self._call(frozen[::-1], "thaw") + self._call(ran[::-1], "abort")

    # ------------------------------------------------------------------ events
    def freeze(self, volumes: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._frozen:
                raise WriterError("hooks are already frozen: thaw first")
            self._volumes = list(volumes)
            self._ran_freeze = []
            for h in self.hooks():
                remaining = min(self.timeout, deadline - time.monotonic())
                if remaining <= 0:
                    self._unwind()
                    raise WriterError(f"no time left to run hook {h.name} freeze",
                                      timed_out=True)
                self._ran_freeze.append(h)
                r = self.run_hook(h, "freeze", remaining, volumes=self._volumes,
                                  set_id=self.set_id)
                if not r.ok:
                    self._unwind()
                    raise WriterError(r.describe(), timed_out=r.returncode is None)
                self._frozen.append(h)

    def thaw(self) -> None:
        with self._lock:
            frozen, self._frozen = self._frozen, []
            failures = self._call(frozen[::-1], "thaw")
        if failures:
            raise WriterError("; ".join(r.describe() for r in failures))

    def abort(self) -> None:
        with self._lock:
            failures = self._unwind()
        if failures:
            raise WriterError("; ".join(r.describe() for r in failures))

    def backup_complete(self, set_id: str, succeeded: bool) -> None:
        with self._lock:
            ran, self._ran_freeze = self._ran_freeze, []
            self.set_id = set_id
            # after a restart nothing is remembered: tell every hook
            failures = self._call(ran or self.hooks(), "backup-complete",
                                  succeeded=succeeded)
        if failures:
            raise WriterError("; ".join(r.describe() for r in failures))
