"""Stop signals for the command-line tools that clean up after themselves (`script`,
`bench`, `demo`): SIGINT (Ctrl-C), SIGTERM and SIGHUP all unwind the same way.

    with interrupts.stop_signals():
        try:
            ...
        except KeyboardInterrupt as e:        # Ctrl-C, or Interrupted for any of them
            cleanup()
            return getattr(e, "exit_code", 130)

The first signal raises Interrupted (a KeyboardInterrupt, so code that already cleans up
after Ctrl-C does the same for SIGTERM and SIGHUP, whose default action killed the tool
with nothing cleaned up); later ones are ignored, until the process ends, so the
cleanup that follows cannot be cut short half-way and the exit status is the one the
tool reports. Keep that cleanup bounded (timeouts).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; exit_code is 128 + its number (130 for Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    @property
    def what(self) -> str:
        return ("interrupted" if self.signum == signal.SIGINT
                else f"terminated by {signal.Signals(self.signum).name}")


def _ignore(_signum: int, _frame: object) -> None:
    pass


def _raise(signum: int, _frame: object) -> None:
    for sig in SIGNALS:
        signal.signal(sig, _ignore)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """See the module docstring. Main thread only (elsewhere a no-op); a signal ignored
    when the block starts (nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old: dict[int, Any] = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        # After a stop signal the tool is on its way out: later signals stay ignored to
        # the end (restoring the default SIGTERM here let one that arrived after the
        # cleanup kill the tool, with another exit status than the one it reports).
        if not any(signal.getsignal(sig) is _ignore for sig in old):
            for signum, handler in old.items():
                signal.signal(signum, handler)
