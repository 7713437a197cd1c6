"""How the CLI reports a failure: one line on stderr, or with --json one JSON object.

With --json the failure is `{"error": {"name", "code", "message"[, "hresult"]}}` on
**stderr**, one line: stdout carries a command's result and nothing else, so
`x=$(shadowplex ... --json)` is either the result or empty, and the exit status says
which (it is the same as without --json). `name` is the stable error name: the
daemon's (`VSS_E_OBJECT_NOT_FOUND`, `E_INVALIDARG` for every usage error, ...), an
errno name for a local OS error (`ENOENT`), `VSS_E_UNEXPECTED` for anything
unforeseen; `code` is the exit status (1 the operation failed, 2 usage error); `hresult`
the name's HRESULT when it has one (docs/provider.md, provider/hresults.py).
"""

from __future__ import annotations

import errno as _errno
import json
import sys

from provider.hresults import HRESULTS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line found after parsing (exit 2)."""


class Failed(Exception):
    """The operation failed, said in one line (exit 1); ``name`` for --json."""

    def __init__(self, message: str, name: str = "VSS_E_OBJECT_NOT_FOUND") -> None:
        super().__init__(message)
        self.name = name

# set by main() before parsing: argparse's own errors come before the Namespace exists
JSON_ARGV = False


def print_json_error(name: str, code: int, message: str, **extra: object) -> None:
    err: dict[str, object] = {"name": name, "code": code, "message": message, **extra}
    if name in HRESULTS:
        err["hresult"] = HRESULTS[name]
    sys.stderr.write(json.dumps({"error": err}) + "\n")
    sys.stderr.flush()


def errno_name(e: OSError) -> str:
    return _errno.errorcode.get(e.errno or 0, "OSError")


def name_of(e: BaseException) -> str:
    """The stable name of a failure the CLI reports."""
    name = getattr(e, "name", None)
    if isinstance(name, str) and name:
        return name
    from provider.protocol import error_name
    return error_name(e) or "VSS_E_UNEXPECTED"
