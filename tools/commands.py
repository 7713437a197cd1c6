"""The requester commands of the CLI: each opens a session with the daemon
(tools/connection.py), asks, and prints the answer as a table or --json
(tools/listing.py, tools/output.py). What they have in common: a mistake found after
parsing raises UsageError (exit 2), a failure said in one line Failed (exit 1); the
daemon's own errors reach tools/cli.py's main as ControlError."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

from . import connection, deleting, listing
from .connection import socket_path
from .errors import EXIT_FAILED, EXIT_OK, Failed, UsageError
from .listing import Catalog, Format
from .output import (
    PROG,
    Progress,
    human_size,
    print_json,
    snapshot_view,
    volume_view,
    writer_view,
)

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any


# ------------------------------------------------------------------------ presentation
def _format(args: argparse.Namespace, catalog: Catalog) -> Format:
    """A listing's -o/-H/-p, checked before the daemon is asked (a bad -o: exit 2)."""
    try:
        return listing.options(args, catalog)
    except listing.ListingError as e:
        raise UsageError(str(e)) from None


_emit, _note, _snap_table = listing.emit, listing.note, listing.snapshot_table


def _diff_table(res: dict[str, Any], extents: list[dict[str, int]], fmt: Format) -> None:
    """`snapshot diff`: one row per extent (its exact offset, then human sizes), and a
    totals line (not under -H); a size change is said (past FROM's end, what is not
    listed is zeros)."""
    listing.print_rows(extents, fmt, "no changes")
    if not fmt.header:
        return
    size, was = res["size"], res["from_size"]
    def n(v: int) -> str:
        return listing.cell(v, "size", fmt.parsable)
    cs = res["chunk_size"]
    chunk = str(cs) if fmt.parsable else f"{cs // 1024} KiB"
    grown = "" if size == was else f"; size {n(was)} at FROM"
    print(f"{len(extents)} extents, {n(res['changed_bytes'])} changed of "
          f"{n(size)} (chunk {chunk}){grown}")


def cmd_volume(args: argparse.Namespace) -> int:
    fmt = _format(args, listing.VOLUMES) if args.vcmd == "list" else None
    vols = listing.VOLUMES
    with connection.client(args) as c:
        if args.vcmd == "create":
            _emit(args, volume_view(c.volume_create(args.name, args.size)), catalog=vols)
        elif args.vcmd == "list":
            assert fmt is not None
            rows = [volume_view(v) for v in c.volume_list()]
            _emit(args, rows, lambda r: listing.print_rows(r, fmt, "no volumes"), fmt=fmt)
        elif args.vcmd == "resize":
            _emit(args, volume_view(c.volume_resize(args.name, args.size)), catalog=vols)
        elif args.vcmd == "delete":
            c.volume_delete(args.name)
            _emit(args, {"deleted": args.name})
        elif args.vcmd == "present":
            _emit(args, volume_view(c.volume_present(args.name, args.to)), catalog=vols)
    return EXIT_OK


def _attributes(args: argparse.Namespace) -> list[str]:
    attrs = []
    if args.transportable:
        attrs.append("TRANSPORTABLE")
    if args.kind == "differential":
        attrs.append("DIFFERENTIAL")
    elif args.kind == "plex":
        attrs.append("PLEX")
    return attrs


def _context(text: str) -> Any:
    """--context, checked here so that a wrong one is a usage error (exit 2) and nothing
    is sent to the daemon."""
    from provider import vss
    try:
        return vss.parse_context(text)
    except vss.VssError as e:
        raise UsageError(f"--context {text}: {e.message}") from None


# A one-shot command is one requester session: an auto-release set made by it would be
# deleted as the command exits (issue 19). So the command's default is the persistent
# APP_ROLLBACK (writers freeze and thaw), said on stderr; an auto-release context is
# refused unless --hold keeps the session (and the set) until a stop signal. Scripts and
# provider.client.Client keep VSS's default (BACKUP): they hold their session.
CLI_DEFAULT_CONTEXT = "app-rollback"


def _create_context(args: argparse.Namespace) -> Any:
    from provider import vss
    ctx = _context(CLI_DEFAULT_CONTEXT if args.context is None else args.context)
    auto = vss.is_auto_release(ctx)
    if auto and not args.hold:
        raise UsageError(f"--context {args.context} is auto-release: the set would be "
                         "deleted as this command ends; add --hold to keep it until Ctrl-C, "
                         "or back up from a script (shadowplex script) or with "
                         "provider.client.Client")
    if args.hold and not auto:
        raise UsageError(f"--hold is for auto-release contexts; a {ctx.cli_name} set "
                         "outlives the command by itself")
    return ctx


def _hold_until_stopped(args: argparse.Namespace, set_id: str) -> None:
    """--hold: keep the session (so the auto-release set) until a stop signal."""
    import signal

    from . import interrupts
    if not args.quiet:
        print(f"holding snapshot set {set_id}: it lives until Ctrl-C (or SIGTERM, SIGHUP)",
              file=sys.stderr, flush=True)
    with interrupts.stop_signals():
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:   # interrupts.Interrupted for each of them
            pass
    if not args.quiet:
        print(f"session ended: auto-release snapshot set {set_id} is deleted",
              file=sys.stderr)


def _list_volume(args: argparse.Namespace) -> str | None:
    """`snapshot list VOLUME` and `--volume VOLUME` (as lvs/zfs list take it positional)."""
    if args.volume_arg and args.volume and args.volume_arg != args.volume:
        raise UsageError(f"snapshot list: VOLUME {args.volume_arg} and --volume "
                         f"{args.volume} disagree")
    volume: str | None = args.volume_arg or args.volume
    return volume


def cmd_snapshot(args: argparse.Namespace) -> int:
    ctx = _create_context(args) if args.scmd == "create" else None
    if args.scmd == "show" and not args.id and not args.set:
        raise UsageError("snapshot show needs an ID or --set ID")
    fmt = _format(args, listing.DIFF if args.scmd == "diff" else listing.SNAPSHOTS) \
        if args.scmd in ("list", "show", "diff") else None
    if args.scmd == "delete":   # tools/deleting.py: its forms, --dry-run, asking first
        return deleting.run(args)
    with connection.client(args) as c:
        if args.scmd == "create":
            assert ctx is not None
            res = connection.call(args, c, lambda p: c.snapshot_create(
                args.volumes, context=ctx.cli_name, attributes=_attributes(args) or None,
                progress=p, name=args.name, description=args.description))
            snaps = [snapshot_view(s) for s in res.get("snapshots", [])]
            if args.json:
                print_json({**res, "snapshots": snaps})
            elif not args.quiet:
                print(f"snapshot set {res.get('set_id') or res.get('snapshot_set_id')} created")
                _snap_table(snaps)
            if args.context is None:
                _note(args, f"note: context {ctx.cli_name} (the one-shot default): "
                      "persistent, kept until 'snapshot delete'; writers froze and thawed")
            if args.hold:
                _hold_until_stopped(args, str(res.get("set_id") or res.get("snapshot_set_id")))
        elif args.scmd == "list":
            assert fmt is not None
            rows = [snapshot_view(s) for s in c.snapshot_list(set_id=args.set,
                                                               volume=_list_volume(args))]
            _emit(args, rows, lambda r: _snap_table(r, fmt), fmt=fmt)
        elif args.scmd == "show":
            assert fmt is not None
            res = c.snapshot_show(snapshot_id=args.id, set_id=args.set)
            if isinstance(res, list):
                _emit(args, [snapshot_view(s) for s in res], lambda r: _snap_table(r, fmt),
                      fmt=fmt)
            else:
                _emit(args, snapshot_view(res), catalog=listing.SNAPSHOTS, fmt=fmt)
        elif args.scmd == "diff":
            assert fmt is not None
            res = c.snapshot_diff(args.from_id, args.to_id)
            extents = [{"offset": o, "length": n} for o, n in res["extents"]]
            _emit(args, extents, lambda r: _diff_table(res, r, fmt), fmt=fmt, rows=True)
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    """A full or incremental image of a snapshot (tools/backup.py, docs/backup.md)."""
    from . import backup
    with connection.client(args) as c:
        try:
            return backup.main(args, c)
        except backup.Refused as e:
            raise Failed(str(e), "BACKUP_REFUSED") from None


def cmd_restore(args: argparse.Namespace) -> int:
    """A backup chain back to one raw image (tools/restore.py); local files, no daemon."""
    from .backup import Refused
    from .restore import main
    try:
        return main(args)
    except Refused as e:
        raise Failed(str(e), "RESTORE_REFUSED") from None


def cmd_expose(args: argparse.Namespace) -> int:
    with connection.client(args) as c:
        _emit(args, snapshot_view(c.expose(args.snapshot, name=args.name, mount=args.mount)),
              catalog=listing.SNAPSHOTS)
    return EXIT_OK


def cmd_unexpose(args: argparse.Namespace) -> int:
    with connection.client(args) as c:
        try:
            sid = connection.find_exposed(c, args.snapshot)["snapshot_id"]
        except connection.NotExposed as e:
            raise Failed(str(e)) from None
        _emit(args, snapshot_view(c.unexpose(sid)), catalog=listing.SNAPSHOTS)
    return EXIT_OK


def _long_op(args: argparse.Namespace, c: Any, call: Callable[[Progress], Any],
             view: Callable[[Any], Any] = volume_view,
             catalog: Catalog = listing.VOLUMES) -> int:
    _emit(args, view(connection.call(args, c, call)), catalog=catalog)
    return EXIT_OK


def cmd_revert(args: argparse.Namespace) -> int:
    with connection.client(args) as c:
        res = connection.call(args, c, lambda p: c.revert(args.snapshot, force=args.force,
                                                          progress=p))
    warning = res.get("warning") if isinstance(res, dict) else None
    if warning:   # --force on a volume in use: on stderr (--json keeps it in the result)
        if not args.quiet:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        if not args.json:
            res = {k: v for k, v in res.items() if k != "warning"}
    _emit(args, volume_view(res), catalog=listing.VOLUMES)
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    with connection.client(args) as c:
        # promote answers with the (now full) snapshot: the same view as `snapshot show`
        return _long_op(args, c, lambda p: c.promote(args.snapshot, progress=p),
                        snapshot_view, listing.SNAPSHOTS)


def cmd_split(args: argparse.Namespace) -> int:
    with connection.client(args) as c:
        return _long_op(args, c, lambda p: c.split(args.snapshot, args.name, progress=p))


def cmd_end_backup(args: argparse.Namespace) -> int:
    with connection.client(args) as c:
        _emit(args, c.end_backup(args.set))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Write the Backup Components Document of a TRANSPORTABLE set to FILE (and each
    writer's Writer Metadata Document next to it, FILE.<writer>.wmd.xml)."""
    out = os.path.abspath(args.output)
    if os.path.lexists(out) and not args.force:
        raise UsageError(f"{out} exists; choose another file or use --force to overwrite it")
    with connection.client(args) as c:
        res = c.export(args.set)
    written = [out]
    _write_text(out, res["document"])
    for i, w in enumerate(res.get("writers", []), 1):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", w.get("name") or f"writer{i}")
        path = f"{out}.{name}.wmd.xml"
        _write_text(path, w["document"])
        written.append(path)
    _emit(args, {"set_id": res["set_id"], "originating_machine": res.get("originating_machine"),
                 "files": written})
    return EXIT_OK


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cmd_import(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            data = f.read(16 * 1024 * 1024 + 1)
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{args.file} is not UTF-8 XML (a document from "
                         f"'{PROG} export')") from None
    with connection.client(args) as c:
        res = c.import_set(text)
        snaps = [snapshot_view(x) for x in res.get("snapshots", [])]
        res = {**res, "snapshots": snaps}
        def table(r: dict[str, Any]) -> None:
            print(f"snapshot set {r['set_id']} (from {r['origin']}) imported on {r['host']}")
            _snap_table(snaps)
        _emit(args, res, table)
        from provider.vss import AUTO_RELEASE_CLI_NAMES
        if snaps and snaps[0].get("context") in AUTO_RELEASE_CLI_NAMES:
            _note(args, f"note: an auto-release ({snaps[0].get('context')}) set is deleted "
                  "when this command's session ends; import it from a script or program "
                  "that keeps its session")
    return EXIT_OK


def cmd_writers(args: argparse.Namespace) -> int:
    fmt = _format(args, listing.WRITERS)
    with connection.client(args) as c:
        rows = [writer_view(w) for w in c.writers_list()]
        _emit(args, rows, lambda r: listing.print_rows(r, fmt, "no writers"), fmt=fmt)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """check or scrub, of the pool or of one volume (--volume) and its snapshots: the
    problems (shown under --quiet too), then a line of what was read."""
    op = args.command   # "check" | "scrub": the client's method of that name
    with connection.client(args) as c:
        res = connection.call(args, c, lambda p: getattr(c, op)(args.volume, progress=p))
    problems = res.get("problems", [])
    if args.json:
        print_json(res)
        return EXIT_FAILED if problems else EXIT_OK
    for p in problems:
        print(p)
    if not args.quiet:
        scope = f"volume {args.volume} and its snapshots" if args.volume else "the pool"
        print(f"{_count(len(problems), 'problem') if problems else 'clean'}: {op} of "
              f"{scope}: {_count(res.get('luns', 0), 'LUN')}, "
              f"{human_size(res.get('bytes_read', 0))} read, "
              f"{_count(res.get('chunks_verified', 0), 'chunk')} verified against their "
              "checksums")
    return EXIT_FAILED if problems else EXIT_OK


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def cmd_df(args: argparse.Namespace) -> int:
    """Where the space went: the pool's file system, what snapshots may still take, and
    per volume its size, allocation and diff area (like `zfs list -o space`, `lvs`).
    -o/-H/-p are the volume table's; -H leaves the two summary lines out."""
    fmt = _format(args, listing.DF)
    with connection.client(args) as c:
        st = c.status()
        vols = [volume_view(v) for v in c.volume_list()]
    pool = {k: st.get(k) for k in ("pool", "space_total", "space_free", "space_available")}
    pool["allocated"] = sum(v.get("allocated") or 0 for v in vols)
    pool["diff_bytes"] = sum(v.get("diff_bytes") or 0 for v in vols)
    if args.json:
        print_json({**pool, "volumes": listing.json_view(vols, fmt)})
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    if fmt.header:
        def size(n: int | None) -> str:
            return listing.cell(n, "size", fmt.parsable)
        print(f"pool {pool['pool']}: {size(pool['space_total'])}, "
              f"{size(pool['space_free'])} free, {size(pool['space_available'])} "
              "for snapshots (past it a diff area deletes its oldest snapshot)")
        print(f"volumes: {size(pool['allocated'])} allocated, "
              f"{size(pool['diff_bytes'])} in diff areas")
    if vols:
        listing.print_rows(vols, fmt, "")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """The daemon's record (`operations` as a count), then a table of the running
    operations with their progress (--json: the list, each with its figures)."""
    fmt = _format(args, listing.STATUS)
    with connection.client(args) as c:
        st = c.status()

    def table(st: dict[str, Any]) -> None:
        ops = st.get("operations") or []
        listing.print_record({**st, "operations": len(ops)}, fmt, listing.STATUS)
        shown = not fmt.chosen or any(col.name == "operations" for col in fmt.cols)
        if ops and fmt.header and shown:
            print()
            listing.print_rows(ops, listing.Format(listing.OPERATIONS.default,
                                                   parsable=fmt.parsable), "")
    _emit(args, st, table, fmt=fmt)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(keep=args.keep, quiet=args.quiet)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run
    return run(args)


def cmd_pki(args: argparse.Namespace) -> int:
    """Certificates of the NBD port (tools/pki.py); local files only, no daemon."""
    from nbd.pki import PkiError, PkiExists

    from .pki import BadArgument, run
    try:
        return run(args)
    except (BadArgument, PkiExists) as e:
        raise UsageError(str(e)) from e
    except PkiError as e:
        if args.debug:
            raise
        raise Failed(str(e), "PKI_ERROR") from None


def cmd_script(args: argparse.Namespace) -> int:
    from .script import run_script_file
    return run_script_file(args.file, socket=socket_path(args), quiet=args.quiet,
                           host=args.host)
