"""The `shadowplex` command line: the requester side.

Every command except `serve`, `pool init`, `pki`, `demo` and `restore` talks to the daemon through
provider.client, in a session of tools/connection.py (socket: --socket, else
provider.config.default_socket_path(): $SHADOWPLEX_SOCKET, else DEFAULT_SOCKET).
Exit codes: 0 success, 1 the operation failed, 2 usage error. User mistakes print one
line; a traceback only with --debug.

Ctrl-C while the daemon runs a request (tools/connection.py): the CLI asks the daemon to
cancel it and waits at most INTERRUPT_WAIT s for the request's final reply, then says
what happened: it completed anyway (its result is printed, exit 0), it was cancelled
with nothing changed (exit 130), it failed (exit 1), or it still runs in the daemon -- a
revert rolls forward once started; anything else is being stopped -- and `shadowplex
status` shows it (130).
"""

from __future__ import annotations

import contextlib
import os
import sys

from . import deleting, errors
from .connection import EXIT_INTERRUPTED, Interrupted, say_interrupted
from .errors import EXIT_FAILED, EXIT_USAGE, Failed, UsageError
from .output import PROG, one_line
from .parser import build_parser


def _reported(control: type[Exception]) -> tuple[type[Exception], ...]:
    """The daemon's errors (ControlError) and blockstore's StoreError -- if blockstore
    was imported: an exception of a module never loaded cannot have been raised, and
    importing blockstore to catch its errors would cost every command (most only talk
    to the daemon) ~40 ms of start-up."""
    mod = sys.modules.get("blockstore.errors")
    return (control, mod.StoreError) if mod is not None else (control,)


def _is_usage(e: Exception) -> bool:
    """Invalid arguments (names, sizes, ids, chunk sizes) are usage errors: exit 2."""
    errors = sys.modules.get("blockstore.errors")
    if errors is not None and isinstance(e, errors.InvalidName | errors.InvalidSize):
        return True
    if errors is not None and isinstance(e, errors.FormatError) and "chunk size" in str(e):
        return True
    return getattr(e, "name", None) == "E_INVALIDARG"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:   # while starting up (parsing, imports): nothing was asked
        say_interrupted("interrupted", "none")
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    errors.JSON_ARGV = "--json" in argv
    parser = build_parser(argv)   # only the command argv names (its start-up time)
    args = parser.parse_args(argv)
    try:
        from provider.client import ControlError
    except ImportError:  # pragma: no cover - provider is part of the distribution
        ControlError = RuntimeError  # type: ignore[misc,assignment]

    def fail(code: int, name: str, line: str, prefix: str = f"{PROG}: ") -> int:
        """One line on stderr, or with --json the error object (tools/errors.py)."""
        if getattr(args, "json", False):
            errors.print_json_error(name, code, one_line(line))
        else:
            print(f"{prefix}{one_line(line)}", file=sys.stderr)
        return code

    try:
        return int(args.func(args))
    except UsageError as e:
        return fail(EXIT_USAGE, "E_INVALIDARG", str(e), f"{PROG}: error: ")
    except Interrupted as e:   # Ctrl-C during a request: its outcome was told
        return e.code
    except Failed as e:
        return fail(EXIT_FAILED, e.name, str(e))
    except deleting.Declined as e:
        return fail(EXIT_FAILED, "E_ABORT", str(e))
    except deleting.BadForm as e:
        return fail(EXIT_USAGE, "E_INVALIDARG", str(e), f"{PROG}: error: ")
    except _reported(ControlError) as e:
        if args.debug:
            raise
        code = EXIT_USAGE if _is_usage(e) else EXIT_FAILED
        if args.json:
            message = e.message if isinstance(e, ControlError) else str(e)
            return fail(code, errors.name_of(e), message)
        return fail(code, "", str(e))
    except KeyboardInterrupt:   # outside a request: nothing was asked of the daemon
        say_interrupted("interrupted", "none")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `shadowplex snapshot list | head`: the reader is gone, nothing to report; point
        # stdout at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13   # as if killed by SIGPIPE, like other command-line tools
    except OSError as e:
        if args.debug:
            raise
        return fail(EXIT_FAILED, errors.errno_name(e),
                    f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except Exception as e:
        # Anything else is a bug or an unforeseen failure: still one line, not a traceback
        # (the user asked for an operation, not for our stack); --debug shows it.
        if args.debug:
            raise
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        return fail(EXIT_FAILED, "VSS_E_UNEXPECTED",
                    f"{what} (run with --debug for the traceback)", f"{PROG}: error: ")


def run() -> None:
    """The `shadowplex` command (the console script, make install's launcher and
    `python -m tools.cli`): main(), its output flushed, then leave at once with its
    status, by os._exit. Why not sys.exit: the interpreter's finalization (every module
    and object torn down) costs a command ~5 ms it has no use for (docs/performance.md,
    "The CLI's start-up"); and CPython 3.11 remembers a KeyboardInterrupt that left an
    exec() or eval() of a string -- namedtuples build their methods that way, so a Ctrl-C
    during one of main()'s lazy imports -- even when main() caught it, and under `-m` the
    interpreter then kills itself by SIGINT at exit, after main() said "interrupted"
    (status -2, not 130: seen 6 times in 150 Ctrl-Cs in the first 0.45 s). Nothing a
    command needs runs after main(): logging writes every record through, and `serve`
    has left this way under `python -m tools.cli` (every test's daemon) all along."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):   # the reader went away
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
