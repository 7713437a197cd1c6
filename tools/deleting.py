"""`shadowplex snapshot delete`: which snapshots a form names, `--dry-run`, and the
confirmation the bulk forms need.

`--all` and `--volume VOL` delete every snapshot they match (of every volume, of one):
they need `--yes`, or a `y` typed at the terminal after the list of what would go;
without a terminal and without --yes they are refused (exit 2) before anything is asked
of the daemon. `--dry-run` lists what a form would delete, from `snapshot list`, and
deletes nothing: the daemon may still refuse the real deletion (a snapshot in use, a set
being created), which then deletes none of them.
"""

from __future__ import annotations

import argparse
import sys

from . import connection
from .listing import emit, snapshot_table
from .output import snapshot_view

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any


class Declined(Exception):
    """The user answered anything but yes: nothing was deleted."""


def form(args: argparse.Namespace) -> str | None:
    """The one form given (id, set, oldest, volume, all), or None if not exactly one."""
    given = [name for name, v in (("id", args.id), ("set", args.set),
                                   ("oldest", args.oldest), ("volume", args.volume),
                                   ("all", args.all)) if v]
    return given[0] if len(given) == 1 else None


def is_bulk(args: argparse.Namespace) -> bool:
    return bool(args.all or args.volume)


def needs_terminal(args: argparse.Namespace) -> bool:
    """A bulk form without --yes (or --dry-run) must ask at a terminal."""
    return is_bulk(args) and not args.yes and not args.dry_run


def can_ask() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def matching(c: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """What the form would delete now (snapshot views), as the daemon chooses it."""
    if args.id:
        return [snapshot_view(c.snapshot_show(snapshot_id=args.id))]
    if args.set:
        res = c.snapshot_show(set_id=args.set)
        return [snapshot_view(s) for s in (res if isinstance(res, list) else [res])]
    rows = [snapshot_view(s) for s in c.snapshot_list(volume=args.oldest or args.volume)]
    if args.oldest:
        # the daemon's choice: the oldest committed one (a set in creation is skipped)
        done = [s for s in rows if s.get("pool_state") != "preparing"]
        return [min(done, key=lambda s: (s.get("created") or 0, s["id"]))] if done else []
    return rows


def confirm(rows: list[dict[str, Any]], what: str) -> None:
    """List ``rows`` on stderr and ask; Declined unless the answer starts with y."""
    err = sys.stderr
    for s in rows:
        print(f"  {s['id']}  {s.get('volume')}  {s.get('context')}", file=err)
    err.write(f"delete {what}: {len(rows)} snapshot{'s' * (len(rows) != 1)}? [y/N] ")
    err.flush()
    answer = sys.stdin.readline()
    if not answer.strip().lower().startswith("y"):
        raise Declined("nothing deleted")


def describe(args: argparse.Namespace) -> str:
    if args.all:
        return "every snapshot of every volume"
    return f"every snapshot of volume {args.volume}"


class BadForm(ValueError):
    """A usage error of `snapshot delete` (exit 2), found before the daemon is asked."""


def run(args: argparse.Namespace) -> int:
    """`snapshot delete`: by ID, --set, --oldest VOL, --volume VOL or --all."""
    what = form(args)
    if what is None:
        raise BadForm("snapshot delete needs exactly one of ID, --set ID, --oldest VOLUME, "
                      "--volume VOLUME, --all")
    if needs_terminal(args) and not can_ask():
        raise BadForm(f"snapshot delete --{what} deletes {describe(args)}: add --yes (or "
                      "--dry-run to list them first)")
    with connection.client(args) as c:
        if args.dry_run or needs_terminal(args):
            rows = matching(c, args)
            if args.dry_run:
                emit(args, {"would_delete": [s["id"] for s in rows], "count": len(rows)},
                     lambda r: snapshot_table(rows) if rows
                     else print("no snapshots to delete"))
                return 0
            if not rows:
                emit(args, {"deleted": [], "count": 0}, report)
                return 0
            confirm(rows, describe(args))   # Declined: exit 1, nothing asked
        res = c.snapshot_delete(snapshot_id=args.id, set_id=args.set, oldest=args.oldest,
                                all=args.all, unexpose=args.unexpose, volume=args.volume)
        emit(args, res, report)
    return 0


def report(res: dict[str, Any]) -> None:
    n = res.get("count") or 0
    if not res.get("deleted"):
        print("no snapshots deleted")
        return
    print(f"deleted {n} snapshot{'s' * (n != 1)}:")
    for sid in res["deleted"]:
        print(f"  {sid}")
