"""How the CLI and scripts show things: human tables, --json, progress on a terminal,
and the views of the wire's records both print (here, not in cli.py, so that
tools/script/ need not import the CLI that imports it)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any, TextIO

PROG = "shadowplex"   # what messages start with


def package_version() -> str:
    # imported here: importlib.metadata costs ~15 ms of every command's start-up
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("shadowplex")  # single source: pyproject.toml [project] version
    except PackageNotFoundError:
        return "0+unknown"


# what str.splitlines() breaks at, and the other C0 controls: never raw in a message line
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` made safe for a one-line message: line breaks and control characters
    escaped as repr() writes them (``\\n``, ``\\x0b``, ``\\u2028``), the rest as given."""
    return _LINE_BREAKING.sub(lambda m: repr(m.group())[1:-1], text)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_json_rows(rows: Any) -> None:
    """A list of records of integers (a diff's extents: thousands of them) one record a
    line, `{"offset": 0, "length": 65536},`: written by json's C encoder in one call.
    indent= takes json's pure-Python path, 5 ms for 2,000 extents (docs/performance.md,
    "The CLI's start-up"). Anything else: print_json."""
    if not isinstance(rows, list) or not {type(r) for r in rows} <= {dict} \
            or not {type(v) for r in rows for v in r.values()} <= {int} \
            or any("}" in k for k in {k for r in rows for k in r}):
        print_json(rows)
        return
    # integer values, keys without "}": "}, {" can only stand between two records
    text = json.dumps(rows, separators=(", ", ": "))
    if rows:
        text = "[\n  " + text[1:-1].replace("}, {", "},\n  {") + "\n]"
    sys.stdout.write(text + "\n")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """columns: (field, header). Fields missing in a row show as '-'."""
    cells = [[_cell(r.get(f)) for f, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, dict):   # e.g. status's capabilities: one line, key=value
        return " ".join(f"{k}={_cell(x)}" for k, x in v.items()) or "-"
    return str(v)


def print_fields(obj: dict[str, Any]) -> None:
    width = max((len(k) for k in obj), default=0)
    for k, v in obj.items():
        print(f"{k.ljust(width)}  {_cell(v)}")


class Progress:
    """Bytes done of a total, the rate and the time left, on stderr: tqdm's bar, one per
    phase (a plex sync, then a promote...), kept on screen when the phase ends. Only on
    a terminal (or on ``stream``, given) and when ``enabled`` (not --quiet, not --json):
    a pipe or a log file gets nothing.

    Fed in one of two ways: the daemon's progress events, ``progress(done, total,
    what)`` with absolute figures (tools/connection.call, a script's long verbs); or
    work done here, ``start(total)`` then ``advance(n)`` (`shadowplex backup`)."""

    def __init__(self, enabled: bool, what: str = "", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and (stream is not None or _isatty(sys.stderr))
        self.what = what
        self._bar: Any = None
        self._phase = ""

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled:
            return
        what = what or self.what
        if self._bar is None or what != self._phase:
            self.close()
            if total <= 0:   # nothing to do (yet): no empty bar
                return
            self._open(what, total)
        bar = self._bar
        if max(total, done) != bar.total:   # (a total that grew: tqdm clamps past it)
            bar.total = max(total, done)
            bar.refresh()
        bar.update(done - bar.n)

    def start(self, total: int) -> None:
        if self.enabled:
            self.close()
            self._open(self.what, total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            if self._bar.n + n > self._bar.total:
                self._bar.total = self._bar.n + n
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _open(self, what: str, total: int) -> None:
        # imported here: a command that shows no bar (a pipe, --json) does not pay for
        # it at start-up
        from tqdm import tqdm
        tqdm.monitor_interval = 0   # no monitor thread in a short-lived CLI
        self._phase = what
        # follow the terminal's size, unless it has none (a serial console, a fresh
        # pty): tqdm would then draw nothing at all
        sized = _columns(self.stream) > 0
        self._bar = tqdm(total=total, desc=what or None, unit="B", unit_scale=True,
                         unit_divisor=1024, file=self.stream, mininterval=PROGRESS_REDRAW,
                         dynamic_ncols=sized, ncols=None if sized else PROGRESS_COLUMNS,
                         nrows=None if sized else PROGRESS_ROWS, leave=True,
                         bar_format=PROGRESS_FORMAT)


# tqdm's format: the phase, percent, bar, bytes done/total (binary prefixes: K = KiB),
# time spent, ETA, rate
PROGRESS_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                   "[{elapsed}, ETA {remaining}, {rate_fmt}]")
PROGRESS_REDRAW = 0.2   # s between two redraws of a bar
PROGRESS_COLUMNS = 80   # a bar's width on a terminal that says it has no size...
PROGRESS_ROWS = 24      # ...and its height


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):   # not a terminal, or no fileno
        return 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # replaced or closed
        return False


# ------------------------------------------------------------------ views of the wire's records
# The CLI's --json keeps one name per field: the wire's VSS_SNAPSHOT_PROP names (left)
# become the stable short names (README, docs/provider.md "The CLI's JSON"); the wire
# names themselves are not repeated.
SNAPSHOT_RENAMED = {"snapshot_id": "id", "snapshot_set_id": "set_id", "status": "state",
                    "device_object": "device_path", "creation_timestamp": "created"}


def snapshot_view(d: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as the CLI and scripts show it: the wire's record with the stable
    names (idempotent: a view's view is itself)."""
    return {SNAPSHOT_RENAMED.get(k, k): v for k, v in d.items()}


def volume_view(d: dict[str, Any]) -> dict[str, Any]:
    return dict(d)


def writer_view(d: dict[str, Any]) -> dict[str, Any]:
    """A writer's status: `name` (the wire repeats it as `writer_name`)."""
    out = {k: v for k, v in d.items() if k != "writer_name"}
    out.setdefault("name", d.get("writer_name"))
    return out
