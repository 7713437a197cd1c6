"""A CLI command's session with the daemon, and Ctrl-C during one of its requests.

client() connects (--socket, else provider.config.default_socket_path()) and closes the
session; call() runs one request with a progress bar. Ctrl-C while the daemon runs a
request: after_interrupt() asks the daemon to cancel it and waits at most INTERRUPT_WAIT
s for the request's final reply, then says what happened -- it completed anyway (its
result is returned), it was cancelled with nothing changed, it failed (its error is
raised), or it still runs in the daemon -- and raises Interrupted (exit 130) otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator

from provider.config import default_socket_path

from . import errors
from .output import PROG, Progress, one_line

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any

EXIT_INTERRUPTED = 130
INTERRUPT_WAIT = 0.6   # s for the daemon's verdict after Ctrl-C (the CLI answers in < 1 s)


class Interrupted(Exception):
    """Ctrl-C during a request, whose outcome has been told: exit with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def socket_path(args: argparse.Namespace) -> str:
    return args.socket or default_socket_path()


@contextlib.contextmanager
def client(args: argparse.Namespace) -> Iterator[Any]:
    """A session with the daemon. Ctrl-C while a request runs: its outcome is told
    (after_interrupt) and the session closes without waiting for the daemon."""
    from provider.client import Client
    c = Client(socket_path(args), host=getattr(args, "host", None), client="shadowplex-cli",
               array=getattr(args, "array", None), tls_dir=getattr(args, "tls_dir", None))
    interrupted = False
    try:
        yield c
    except KeyboardInterrupt:   # not inside call(): the command's own work is cut short
        interrupted = True
        after_interrupt(c, finished=False)   # tells the outcome and raises
        raise Interrupted(EXIT_INTERRUPTED) from None
    except Interrupted:
        interrupted = True
        raise
    finally:
        if interrupted:
            c.close(wait=0)
        else:
            c.close()


def progress(args: argparse.Namespace) -> Progress:
    return Progress(not args.quiet and not args.json)


def say_interrupted(text: str, outcome: str, code: int = EXIT_INTERRUPTED) -> None:
    """What became of a command after Ctrl-C: one line on stderr, or with --json the
    error object (tools/errors.py) named E_ABORT with ``outcome``: none (nothing had
    been asked), cancelled (nothing changed), completed (it completed, but this command
    stopped first), continues (a revert rolling forward), completes (past its point of
    no return), cancelling (either, later), unknown (no answer in time). A request that
    completed anyway exits 0 with its result: under --json stdout says it all (no
    line)."""
    if errors.JSON_ARGV:
        if code:
            errors.print_json_error("E_ABORT", code, one_line(text), outcome=outcome)
        return
    print(f"{PROG}: {one_line(text)}", file=sys.stderr)


def after_interrupt(c: Any, finished: bool = True) -> Any:
    """Ctrl-C came while ``c`` waited for a reply (or after it): ask the daemon to cancel
    the request, wait at most INTERRUPT_WAIT s for its final reply and tell the user what
    became of it. Returns the result if it completed anyway and ``finished`` (the caller
    prints it); raises Interrupted (the outcome told) or the request's own ControlError
    if it failed."""
    try:
        v = c.interrupt(INTERRUPT_WAIT)
    except KeyboardInterrupt:
        say_interrupted("interrupted again: not waiting for the daemon's answer; "
                        "'shadowplex status' shows the operations still running", "unknown")
        raise Interrupted(EXIT_INTERRUPTED) from None
    what = v.op or "request"
    if v.state == "completed" and finished:
        say_interrupted(f"interrupted, but the {what} had already completed", "completed", 0)
        return v.result
    if v.state == "completed":
        say_interrupted(f"interrupted: the {what} had completed in the daemon, but this "
                        "command stopped before it finished", "completed")
        raise Interrupted(EXIT_INTERRUPTED)
    if v.state == "cancelled":
        say_interrupted(f"interrupted: {v.error.message}", "cancelled")
        raise Interrupted(EXIT_INTERRUPTED)
    if v.state == "failed":
        raise v.error
    if v.state == "none":
        say_interrupted("interrupted", "none")
        raise Interrupted(EXIT_INTERRUPTED)
    answer = v.answer or {}
    state = answer.get("state")
    total = answer.get("total") or 0
    done = f" ({100 * answer.get('done', 0) / total:.0f} % done)" if total else ""
    if state == "rolling-forward":
        say_interrupted(f"interrupted: the {what} cannot be stopped once started (it rolls "
                        f"forward, as after a crash); it continues in the daemon{done}: "
                        "'shadowplex status' shows it under operations until it has "
                        "completed", "continues")
    elif state == "completing":
        say_interrupted(f"interrupted too late: the {what} had passed its point of no "
                        f"return and completes in the daemon{done}; 'shadowplex status' "
                        "shows it under operations until it has", "completes")
    elif state == "cancelling":
        say_interrupted(f"interrupted: the {what} is being cancelled in the daemon{done} "
                        "(it stops with nothing changed, unless it completes first); "
                        "'shadowplex status' shows it under operations until it has ended",
                        "cancelling")
    else:
        say_interrupted(f"interrupted: the daemon did not answer within {INTERRUPT_WAIT:g} s "
                        f"and may still complete the {what}: check with 'shadowplex status'",
                        "unknown")
    raise Interrupted(EXIT_INTERRUPTED)


def call(args: argparse.Namespace, c: Any, call: Callable[[Progress], Any]) -> Any:
    """call(progress) -> its result; after Ctrl-C, the result if it completed anyway
    (else the outcome is told and Interrupted raised)."""
    prog = progress(args)
    try:
        return call(prog)
    except KeyboardInterrupt:
        prog.close()
        return after_interrupt(c)
    finally:
        prog.close()


class NotExposed(LookupError):
    """No snapshot is exposed under the name or at the directory given."""


# an id prefix (snapshot_refs.MIN_PREFIX hex digits or more, hyphens kept or not)
_PREFIX_RE = re.compile(r"(?:[0-9A-Fa-f]-?){4,}")


def find_exposed(c: Any, target: str,
                 call: Callable[..., Any] = lambda f, *a, **k: f(*a, **k)) -> dict[str, Any]:
    """The snapshot behind a snapshot id (or a unique prefix, VOLUME@NAME, VOLUME@latest:
    an exposed name wins over a prefix that looks the same), a mount directory (expose
    --mount) or an exposed name: what `unexpose` accepts, on the command line and in a
    script (``call`` wraps the client's calls, the script's error mapping). NotExposed if
    none is."""
    from provider.vss import GUID_RE
    m = GUID_RE.fullmatch(target)
    if m:
        return dict(call(c.snapshot_show, snapshot_id=m.group(1)))
    snaps = call(c.snapshot_list)
    if "/" in target:   # this is the client's process: resolving its paths is fine
        want = {os.path.abspath(target), os.path.realpath(target)}
        for s in snaps:
            at = s.get("mounted_at") or s.get("exposed_path")
            if at and (at in want or os.path.realpath(at) in want):
                return dict(s)
        raise NotExposed(f"no snapshot is exposed at {target}")
    for s in snaps:
        if s.get("exposed_name") == target:
            return dict(s)
    if "@" in target or _PREFIX_RE.fullmatch(target):
        # VOLUME@NAME, VOLUME@latest or an id prefix: the daemon resolves it
        # (provider/snapshot_refs.py) and says what is wrong with it
        return dict(call(c.snapshot_show, snapshot_id=target))
    raise NotExposed(f"no snapshot is exposed as {target!r}")
