"""Listings for people and for scripts: `-o FIELD,...`, `-H`, `-p`, as zfs and lvs have.

Every listing (volume list, snapshot list and show, writers list, status, df, snapshot
diff) is a Catalog: its columns, each named by its --json field, with a header and a
kind that says how a value is shown in a table. Humans get sizes in KiB/MiB/GiB,
ISO-8601 local times, yes/no and `-` for nothing; `-p` prints exact numbers instead
(bytes, Unix seconds, decimal attribute masks); `-H` drops the header and separates the
fields by one tab, so that `shadowplex snapshot list -H -o id,volume | while read id
vol; do ...` needs no parsing of padded columns. `-o` picks the columns (and, with
--json, the fields of each record); an unknown name is a usage error naming the valid
ones. A single record (status, snapshot show ID, volume create...) prints as `FIELD
value` lines, or with -H as one tab-separated line of its values.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .output import human_size, print_json, print_json_rows

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any

# how a column's value is shown: text, size (bytes), time (Unix seconds), count (an
# exact integer even in tables: an offset, a number of snapshots), mask (attribute bits),
# rate (bytes per second), duration (seconds, as H:MM:SS)
KINDS = ("text", "size", "time", "count", "mask", "rate", "duration")


# Col and Format are plain classes, not dataclasses: dataclasses imports inspect (and
# with it ast, dis, tokenize), a few ms of every command's start-up.
class Col:
    __slots__ = ("name", "header", "kind", "source")

    def __init__(self, name: str, header: str, kind: str = "text",
                 source: str | None = None) -> None:
        self.name = name          # the --json field, and -o's name for it
        self.header = header
        self.kind = kind
        self.source = source      # a derived column: shows this field (e.g. diff's `at`)

    def value(self, row: dict[str, Any]) -> Any:
        return row.get(self.source or self.name)


class ListingError(ValueError):
    """A bad -o list (a usage error)."""


class Catalog:
    def __init__(self, what: str, cols: Sequence[Col], default: str | None = None) -> None:
        self.what = what
        self.cols = {c.name: c for c in cols}
        self.default = self.select(default) if default else list(self.cols.values())

    def select(self, spec: str | None) -> list[Col]:
        if spec is None:
            return list(self.default)
        names = [n.strip() for n in spec.split(",")]
        bad = [n for n in names if n not in self.cols]
        if bad or not all(names):
            raise ListingError(f"-o {spec}: {', '.join(bad) or 'an empty name'} is not a "
                               f"{self.what} field; choose from {','.join(self.cols)}")
        return [self.cols[n] for n in names]


class Format:
    """What the command line asked for: the columns, a header, exact numbers."""
    __slots__ = ("cols", "header", "parsable", "chosen")

    def __init__(self, cols: list[Col], header: bool = True, parsable: bool = False,
                 chosen: bool = False) -> None:
        self.cols = cols
        self.header = header
        self.parsable = parsable
        self.chosen = chosen      # -o was given (--json then keeps only those fields)


def add_options(p: argparse.ArgumentParser, catalog: Catalog) -> None:
    """-o/-H/-p on a listing subcommand (not common options: `export -o` is its file)."""
    p.add_argument("-o", dest="fields", metavar="FIELD,...", default=None,
                   help=f"columns to show (the --json names; default "
                        f"{','.join(c.name for c in catalog.default)}; all: "
                        f"{','.join(catalog.cols)})")
    p.add_argument("-H", dest="no_header", action="store_true",
                   help="scripted mode: no header, fields separated by one tab")
    p.add_argument("-p", dest="parsable", action="store_true",
                   help="exact numbers: bytes, Unix seconds, decimal masks")


def options(args: argparse.Namespace, catalog: Catalog) -> Format:
    """The Format of a command's -o/-H/-p (ListingError for an unknown field)."""
    spec = getattr(args, "fields", None)
    return Format(catalog.select(spec), header=not getattr(args, "no_header", False),
                  parsable=bool(getattr(args, "parsable", False)), chosen=spec is not None)


# ------------------------------------------------------------------------ cells
def iso_time(ts: float | None) -> str:
    """Unix seconds as ISO-8601 local time with its offset: 2026-12-05T18:18:48+00:00."""
    if not ts:
        return "-"
    import datetime  # here: only listings with times need it (start-up time)
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _exact(v: float | int) -> str:
    return str(int(v)) if isinstance(v, int) or float(v).is_integer() else repr(float(v))


def cell(v: Any, kind: str = "text", parsable: bool = False) -> str:
    """One value as a table shows it (never a Python repr)."""
    if v is None or v == "" or v == [] or v == {}:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float) and kind in KINDS[1:]:
        if parsable or kind == "count":
            return _exact(v)
        if kind == "size":
            return human_size(int(v))
        if kind == "rate":
            return f"{human_size(int(v))}/s"
        if kind == "duration":
            s = int(v)
            return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        if kind == "time":
            return iso_time(v)
        return hex(int(v))
    if isinstance(v, float):
        return _exact(v)
    if isinstance(v, list):
        sep = "; " if any(isinstance(x, dict) for x in v) else ","
        return sep.join(cell(x, "text", parsable) for x in v)
    if isinstance(v, dict):   # e.g. status's capabilities: one line, key=value
        return " ".join(f"{k}={cell(x, _kind_of(k), parsable)}" for k, x in v.items())
    return str(v).replace("\t", " ").replace("\n", " ")


def _kind_of(key: str) -> str:
    """A nested record's field (status's operations, capabilities): its kind by name."""
    if key in ("started", "created", "mtime"):
        return "time"
    return "text"


# ------------------------------------------------------------------------ printing
def rows_text(rows: Sequence[dict[str, Any]], fmt: Format) -> list[str]:
    cells = [[cell(c.value(r), c.kind, fmt.parsable) for c in fmt.cols] for r in rows]
    if not fmt.header:
        return ["\t".join(x) for x in cells]
    headers = [c.header for c in fmt.cols]
    widths = [max([len(h)] + [len(x[i]) for x in cells]) for i, h in enumerate(headers)]
    return ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
            for line in [headers, *cells]]


def print_rows(rows: Sequence[dict[str, Any]], fmt: Format, empty: str) -> None:
    """A table; ``empty`` (e.g. "no snapshots") when there are no rows, except under -H
    (a script reads no lines then)."""
    if not rows:
        if fmt.header:
            print(empty)
        return
    for line in rows_text(rows, fmt):
        print(line)


def print_record(rec: dict[str, Any], fmt: Format | None = None,
                 catalog: Catalog | None = None) -> None:
    """One record: `FIELD  value` lines (the catalog's kinds, else by the value), or with
    -H one tab-separated line of the values. Without -o every field is shown."""
    if fmt is not None and not fmt.header:
        cols = fmt.cols if fmt.chosen else _cols_of(rec, catalog)
        print("\t".join(cell(c.value(rec), c.kind, fmt.parsable) for c in cols))
        return
    cols = fmt.cols if fmt is not None and fmt.chosen else _cols_of(rec, catalog)
    parsable = fmt.parsable if fmt is not None else False
    width = max((len(c.name) for c in cols), default=0)
    for c in cols:
        print(f"{c.name.ljust(width)}  {cell(c.value(rec), c.kind, parsable)}".rstrip())


def _cols_of(rec: dict[str, Any], catalog: Catalog | None) -> list[Col]:
    known = catalog.cols if catalog is not None else {}
    return [known[k] if k in known and known[k].source is None else Col(k, k.upper())
            for k in rec]


def json_view(obj: Any, fmt: Format | None) -> Any:
    """--json with -o: each record keeps only the chosen fields (in -o's order)."""
    if fmt is None or not fmt.chosen:
        return obj
    pick: Callable[[dict[str, Any]], dict[str, Any]] = \
        lambda r: {c.name: c.value(r) for c in fmt.cols}
    if isinstance(obj, list):
        return [pick(r) if isinstance(r, dict) else r for r in obj]
    return pick(obj) if isinstance(obj, dict) else obj


def emit(args: argparse.Namespace, obj: Any, table: Callable[[Any], None] | None = None,
         catalog: Catalog | None = None, fmt: Format | None = None,
         rows: bool = False) -> None:
    """A command's result: --json (with -o: only those fields; ``rows``: one record a
    line), else ``table``, else a record as FIELD value lines. --quiet prints nothing but
    --json's result (errors are the caller's)."""
    if args.json:
        (print_json_rows if rows else print_json)(json_view(obj, fmt))
    elif args.quiet:
        return
    elif table is not None:
        table(obj)
    elif isinstance(obj, dict):
        print_record(obj, fmt, catalog)
    elif obj is not None:
        print(obj)


def note(args: argparse.Namespace, text: str) -> None:
    """A note on stderr (not an error): --quiet and --json drop it."""
    if not args.quiet and not args.json:
        print(text, file=sys.stderr)


def snapshot_table(rows: Sequence[dict[str, Any]], fmt: Format | None = None) -> None:
    print_rows(rows, fmt or Format(SNAPSHOTS.default), "no snapshots")


# ------------------------------------------------------------------------ the catalogs
VOLUMES = Catalog("volume", [
    Col("name", "NAME"), Col("size", "SIZE", "size"), Col("allocated", "ALLOCATED", "size"),
    Col("naa", "NAA"), Col("snapshots", "SNAPSHOTS", "count"),
    Col("diff_bytes", "DIFF AREA", "size"), Col("path", "PATH"), Col("id", "ID", "count"),
    Col("created", "CREATED", "time"), Col("mtime", "MODIFIED", "time"),
    Col("read_only", "RO"), Col("presented_to", "PRESENTED TO"),
    Col("in_use_by", "IN USE BY")],
    "name,size,allocated,naa,snapshots,diff_bytes,path")
# df: the same fields, another default
DF = Catalog("volume", [Col("name", "VOLUME"), *(c for c in VOLUMES.cols.values()
                                               if c.name != "name")],
             "name,size,allocated,diff_bytes,snapshots")

SNAPSHOTS = Catalog("snapshot", [
    Col("id", "ID"), Col("set_id", "SET"), Col("volume", "VOLUME"), Col("name", "NAME"),
    Col("description", "DESCRIPTION"), Col("kind", "KIND"),
    Col("context", "CONTEXT"), Col("state", "STATE"), Col("used", "USED", "size"),
    Col("shared", "SHARED", "size"), Col("created", "CREATED", "time"),
    Col("exposed_path", "EXPOSED"), Col("naa", "NAA"), Col("origin_naa", "ORIGIN NAA"),
    Col("size", "SIZE", "size"), Col("allocated", "ALLOCATED", "size"),
    Col("attributes", "ATTRIBUTES", "mask"),
    Col("attribute_names", "ATTRIBUTE NAMES"), Col("device_path", "DEVICE"),
    Col("exposed_name", "EXPOSED NAME"), Col("mounted_at", "MOUNTED AT"),
    Col("loop_device", "LOOP"), Col("pool_state", "POOL STATE"),
    Col("backup_complete", "BACKUP COMPLETE"), Col("presented_to", "PRESENTED TO"),
    Col("imported_by", "IMPORTED BY"), Col("snapshots_count", "IN SET", "count"),
    Col("original_volume_name", "ORIGINAL VOLUME"),
    Col("originating_machine", "ORIGINATING MACHINE"),
    Col("service_machine", "SERVICE MACHINE"), Col("provider_id", "PROVIDER")],
    "id,set_id,volume,name,kind,context,state,used,shared,created,exposed_path")

WRITERS = Catalog("writer", [
    Col("name", "WRITER"), Col("writer_id", "ID"), Col("state", "STATE"),
    Col("last_error", "ERROR"), Col("instance_id", "INSTANCE"),
    Col("instance_name", "INSTANCE NAME"), Col("state_value", "STATE VALUE", "count"),
    Col("failure", "FAILURE"), Col("usage_type", "USAGE"), Col("components", "COMPONENTS")],
    "name,writer_id,state,last_error")

STATUS = Catalog("status", [
    Col("pool", "POOL"), Col("pool_id", "POOL ID"), Col("mount", "MOUNT"),
    Col("chunk_size", "CHUNK", "size"), Col("capabilities", "CAPABILITIES"),
    Col("preserve", "PRESERVE"), Col("space_total", "TOTAL", "size"),
    Col("space_free", "FREE", "size"), Col("space_available", "AVAILABLE", "size"),
    Col("volumes", "VOLUMES", "count"), Col("snapshots", "SNAPSHOTS", "count"),
    Col("sets", "SETS", "count"), Col("creating", "CREATING"),
    Col("volumes_in_use", "IN USE"), Col("operations", "OPERATIONS", "count"),
    Col("sessions", "SESSIONS", "count"), Col("writers", "WRITERS"),
    Col("service_machine", "MACHINE"), Col("provider_id", "PROVIDER"),
    Col("nbd_port", "NBD PORT", "count"), Col("nbd_tls", "NBD TLS"),
    Col("nbd_address", "NBD ADDRESS")])

# status's running operations (provider/jobs.py): progress in bytes, the average rate
OPERATIONS = Catalog("operation", [
    Col("id", "ID", "count"), Col("op", "OP"), Col("target", "TARGET"),
    Col("volume", "VOLUME"), Col("state", "STATE"), Col("done", "DONE", "size"),
    Col("total", "TOTAL", "size"), Col("percent", "%"), Col("rate", "RATE", "rate"),
    Col("eta", "ETA", "duration"), Col("started", "STARTED", "time")],
    "id,op,target,state,done,total,percent,rate,eta")

DIFF = Catalog("snapshot diff", [
    Col("offset", "OFFSET", "count"), Col("at", "AT", "size", source="offset"),
    Col("length", "LENGTH", "size")], "offset,at,length")
