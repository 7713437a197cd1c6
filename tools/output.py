"""How the CLI and scripts show things: human tables, --json, progress on a terminal,
and the views of the wire's records both print (here, not in cli.py, so that
tools/script/ need not import the CLI that imports it)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
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
    """A one-line progress bar on stderr, only on a terminal and without --quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{what:<14} [{bar:<30}] {frac * 100:5.1f}%")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            self._shown = False


class ByteProgress:
    """Bytes done of a total, the rate and the time left, on one line of stderr (only on
    a terminal, unless ``stream`` is given): `shadowplex backup`'s progress. Neither
    rich nor tqdm is a dependency of ours; this is the 30 lines they would replace."""

    def __init__(self, enabled: bool, what: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and (stream is not None or sys.stderr.isatty())
        self.what = what
        self.total = self.done = 0
        self._t0 = self._last = time.monotonic()
        self._shown = False

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self._t0 = time.monotonic()
        self._show(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._show(force=self.done >= self.total)

    def line(self) -> str:
        spent = max(time.monotonic() - self._t0, 1e-9)
        rate = self.done / spent
        frac = self.done / self.total if self.total else 1.0
        if self.done >= self.total:
            eta = "done"
        elif rate > 0:
            left = int((self.total - self.done) / rate)
            eta = f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        else:
            eta = "ETA -"
        return (f"{self.what} {human_size(self.done)} / {human_size(self.total)} "
                f"{frac * 100:5.1f}%  {human_size(int(rate))}/s  {eta}")

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


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
