"""The `shadowplex` command line: the requester side.

Every command except `serve`, `pool init`, `pki` and `demo` talks to the daemon through
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

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from provider import vss
from provider.config import (
    CONTROL_PORT,
    DEFAULT_HOST_STATE,
    DEFAULT_RBD_STATE,
    DEFAULT_SOCKET,
    default_socket_path,
)

from . import connection, deleting, errors, listing
from .connection import EXIT_INTERRUPTED, Interrupted, socket_path
from .listing import Catalog, Format
from .output import (
    PROG,
    Progress,
    one_line,
    package_version,
    print_json,
    snapshot_view,
    volume_view,
    writer_view,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line found after parsing (exit 2)."""


class Failed(Exception):
    """The operation failed, said in one line (exit 1); ``name`` for --json."""

    def __init__(self, message: str, name: str = "VSS_E_OBJECT_NOT_FOUND") -> None:
        super().__init__(message)
        self.name = name


class _Parser(argparse.ArgumentParser):
    """Usage errors: exit 2 with exactly one line on stderr, no usage dump, no traceback
    (with --json anywhere on the command line: the JSON error object, tools/errors.py)."""

    def error(self, message: str) -> NoReturn:
        if errors.JSON_ARGV:
            errors.print_json_error("E_INVALIDARG", EXIT_USAGE, one_line(message))
            self.exit(EXIT_USAGE)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (try '{PROG} --help')\n")


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


# ------------------------------------------------------------------------ commands
def _serve_settings(args: argparse.Namespace) -> tuple[str, str, str, bool, dict[str, Any]]:
    """(pool, mount, socket, allow_other, service config): command-line flags over the
    --config file over the defaults. The socket: --socket, the file's `socket`,
    $SHADOWPLEX_SOCKET, DEFAULT_SOCKET (the file was named on this command line; the
    environment variable is ambient)."""
    from provider.config import ConfigError, load_file, split
    try:
        opts, config = split(load_file(args.config)) if args.config else ({}, {})
    except ConfigError as e:
        raise UsageError(str(e)) from None
    array = getattr(args, "array", None) or opts.get("array")
    pool = args.pool or opts.get("pool")
    rbd = bool(array) and str(array).startswith("rbd:")
    ceph_conf = args.ceph_conf or opts.get("ceph_conf")
    if array:   # host mode or Ceph: no pool here; --state-dir holds the catalog
        if pool:
            raise UsageError(f"serve --array {array} serves that array's LUNs: drop "
                             "--pool (the provider's state goes to --state-dir)")
        pool = args.state_dir or opts.get("state_dir") or (
            DEFAULT_RBD_STATE if rbd else DEFAULT_HOST_STATE)
        config["array"] = array
        if rbd:
            if not str(array)[4:]:
                raise UsageError("serve --array rbd:POOL: name the RBD pool")
            if not ceph_conf:
                raise UsageError("serve --array rbd:POOL needs --ceph-conf FILE (the "
                                 "cluster's ceph.conf; docs/ceph.md)")
            config["ceph"] = (os.path.abspath(ceph_conf),
                              args.ceph_id or opts.get("ceph_id"))
    elif ceph_conf or args.ceph_id:
        raise UsageError("--ceph-conf/--ceph-id are for serve --array rbd:POOL")
    elif args.state_dir:
        raise UsageError("--state-dir is for host mode (serve --array HOST); a pool "
                         "keeps its state in the pool directory")
    mount = args.mount or opts.get("mount")
    for value, flag in ((pool, "pool"), (mount, "mount")):
        if not value:
            raise UsageError(f"serve needs --{flag} DIR (or '{flag} = \"DIR\"' in the "
                             "--config file)")
    sock = args.socket or opts.get("socket") or default_socket_path()
    allow_other = bool(opts.get("allow_other", False) if args.allow_other is None
                       else args.allow_other)
    if args.default_kind:
        config["default_kind"] = args.default_kind
    if args.hooks_dir is not None:
        config["hooks_dir"] = os.path.abspath(args.hooks_dir) if args.hooks_dir else None
    if args.sqlite_db:   # the flags replace the file's list (as for every other key)
        config["sqlite_databases"] = [os.path.abspath(p) for p in args.sqlite_db]
    # popped again by cmd_serve: not service keys
    level = args.log_level or opts.get("log_level")
    if level:
        config["log_level"] = level
    log_file = os.path.abspath(args.log_file) if args.log_file else opts.get("log_file")
    if log_file:
        config["log_file"] = log_file
    poll = args.poll_us if args.poll_us is not None else opts.get("poll_us")
    if poll is not None:
        config["poll_us"] = poll   # popped again by cmd_serve: not a service key
    tls_dir = getattr(args, "tls_dir", None) or opts.get("tls_dir")
    tls_dir = os.path.abspath(tls_dir) if tls_dir else None
    listen = args.nbd_listen or opts.get("nbd_listen")
    control = args.control_listen or opts.get("control_listen")
    from nbd.settings import SettingsError, parse_listen, settings
    try:
        if listen:   # popped again by cmd_serve: not a service key
            insecure = bool(opts.get("nbd_insecure", False) if args.nbd_insecure is None
                            else args.nbd_insecure)
            config["nbd"] = settings(listen, tls_dir, insecure)
        elif args.nbd_insecure:
            raise UsageError("--nbd-insecure configures the NBD port: give "
                             "--nbd-listen ADDR[:PORT] too")
        if control:
            if tls_dir is None:
                raise UsageError("--control-listen needs --tls-dir DIR: the network "
                                 "control port is TLS only")
            config["control_listen"] = (*parse_listen(control, CONTROL_PORT), tls_dir)
    except SettingsError as e:
        raise UsageError(str(e)) from None
    if array and not rbd and (listen or control):
        raise UsageError("a host daemon (serve --array) opens no network port: the "
                         "array's own daemon serves NBD and the control API")
    if tls_dir and not (listen or control or array):
        raise UsageError("--tls-dir configures the network ports: give --nbd-listen "
                         "and/or --control-listen too")
    if array and not rbd:
        if not tls_dir:
            raise UsageError("serve --array needs --tls-dir DIR: this host's certificate "
                             "('shadowplex pki host NAME DIR') is its identity at the array")
        config["tls_dir"] = tls_dir
    assert pool and mount   # (checked above)
    return str(pool), str(mount), str(sock), allow_other, config


def _poll_us(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds "
                                         "from 0 to 1000")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """Configuration errors exit EXIT_CONFIG (78), not 2: systemd's Restart=on-failure
    must not retry what a restart cannot cure (contrib/shadowplex.service)."""
    from provider.config import EXIT_CONFIG
    try:
        pool, mount, sock, allow_other, config = _serve_settings(args)
    except UsageError as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_CONFIG
    from provider.daemon import serve
    from provider.service import make_service
    # No directory is made here: the control service creates the socket's directory
    # (/run/shadowplex by default) when it binds, i.e. only after serve() has checked the
    # mount directory and opened the pool, so a mistyped command leaves nothing behind.
    # resolved now, before the mount exists: later lookups stay lexical (make_service)
    mount = os.path.realpath(mount)
    poll = config.pop("poll_us", None)
    nbd = config.pop("nbd", None)
    array, tls_dir = config.pop("array", None), config.pop("tls_dir", None)
    ceph = config.pop("ceph", None)
    log_level, log_file = config.pop("log_level", None), config.pop("log_file", None)
    svc = make_service(sock, mount, config)
    return serve(pool, mount, sock, True, services=[svc], debug=args.debug,
                 allow_other=allow_other, nbd=nbd, array=array, tls_dir=tls_dir, ceph=ceph,
                 log_level=log_level, log_file=log_file,
                 **({} if poll is None else {"poll_us": poll}))


def cmd_pool_init(args: argparse.Namespace) -> int:
    from blockstore import Pool, parse_size
    pool = Pool.create(args.dir, chunk_size=parse_size(args.chunk_size))
    info = {"path": pool.path, "pool_id": pool.pool_id, "chunk_size": pool.chunk_size,
            # how snapshots preserve overwritten chunks: by reference on xfs (reflink=1)
            # and btrfs, else by copying (docs/format.md)
            "preserve": pool.preserve_mode}
    pool.close()
    _emit(args, info)
    return EXIT_OK


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
                progress=p))
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
            _emit(args, extents, lambda r: _diff_table(res, r, fmt), fmt=fmt)
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    """A full or incremental image of a snapshot (tools/backup.py, docs/backup.md)."""
    from . import backup
    with connection.client(args) as c:
        try:
            return backup.main(args, c)
        except backup.Refused as e:
            raise Failed(str(e), "BACKUP_REFUSED") from None


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
        return _long_op(args, c, lambda p: c.revert(args.snapshot, force=args.force,
                                                    progress=p))


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
        if snaps and snaps[0].get("context") in vss.AUTO_RELEASE_CLI_NAMES:
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
    with connection.client(args) as c:
        if args.command == "scrub":
            res = connection.call(args, c, lambda p: c.scrub(progress=p))
        else:
            res = connection.call(args, c, lambda p: c.check())
    problems = res.get("problems", [])
    if args.json:
        print_json(res)
    elif problems:   # what failed: shown under --quiet too
        for p in problems:
            print(p)
    elif not args.quiet:
        print("clean")
    return EXIT_FAILED if problems else EXIT_OK


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
    fmt = _format(args, listing.STATUS)
    with connection.client(args) as c:
        _emit(args, c.status(), catalog=listing.STATUS, fmt=fmt)
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


# ------------------------------------------------------------------------ parser
def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The global options, accepted before or after the command. Below the top level
    their default is SUPPRESS, so a subcommand does not reset what the top level set."""
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--socket", metavar="PATH", **kw,
                        help=f"control socket (default $SHADOWPLEX_SOCKET or {DEFAULT_SOCKET})")
    parser.add_argument("--host", metavar="NAME", **kw,
                        help="requester host name (default: hostname)")
    parser.add_argument("--array", metavar="HOST[:PORT]", **kw,
                        help="talk to the array's network control port (TLS; port 10810 "
                             "by default) instead of the local socket; needs --tls-dir")
    parser.add_argument("--tls-dir", metavar="DIR", **kw,
                        help="certificates: with --array this host's ('shadowplex pki "
                             "host'); for serve the array's ('shadowplex pki init')")
    parser.add_argument("--json", action="store_true", **kw, help="machine-readable output")
    parser.add_argument("-q", "--quiet", action="store_true", **kw,
                        help="print nothing but errors (and --json's result)")
    parser.add_argument("--debug", action="store_true", **kw,
                        help="tracebacks for every error")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _common_options(common, top=False)
    p = _Parser(prog=PROG, description="Linux user-space shadow-copy provider (VSS-like).")
    _common_options(p, top=True)
    p.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help,
                                                        parents=[common])
        sp.set_defaults(func=func)
        return sp

    # serve's flags default to None: "not given", so that --config FILE fills them in
    s = add("serve", cmd_serve, "run the array daemon: FUSE mount + control socket")
    s.add_argument("--config", metavar="FILE",
                   help="TOML settings (contrib/shadowplex.toml); flags override them")
    s.add_argument("--pool", metavar="DIR", help="pool directory (or 'pool' in --config)")
    s.add_argument("--mount", metavar="DIR", help="mount directory (or 'mount' in --config)")
    s.add_argument("--ceph-conf", metavar="FILE", default=None,
                   help="with --array rbd:POOL: the Ceph cluster's ceph.conf (docs/ceph.md)")
    s.add_argument("--ceph-id", metavar="NAME", default=None,
                   help="with --array rbd:POOL: the Ceph client id (default: admin)")
    s.add_argument("--state-dir", metavar="DIR", default=None,
                   help="host mode (with the global --array HOST[:PORT] --tls-dir DIR): "
                        f"this host's state, its catalog (default {DEFAULT_HOST_STATE})")
    s.add_argument("--foreground", action="store_true",
                   help="stay in the foreground (the only mode; for systemd Type=simple)")
    s.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=None,
                   help="FUSE allow_other (default: off)")
    s.add_argument("--poll-us", type=_poll_us, default=None, metavar="US",
                   help="how long the FUSE loop polls for the next request before it "
                        "sleeps while requests stream (0..1000, default 50; 0: never)")
    s.add_argument("--nbd-listen", metavar="ADDR[:PORT]", default=None,
                   help="open the NBD port on this address (port 10809 by default); "
                        "needs --tls-dir, or --nbd-insecure on loopback (docs/network.md)")
    s.add_argument("--control-listen", metavar="ADDR[:PORT]", default=None,
                   help="open the control API on this address too (port 10810 by "
                        "default), TLS only: a requester's host is its certificate's CN")
    s.add_argument("--nbd-insecure", action=argparse.BooleanOptionalAction, default=None,
                   help="serve NBD in plain text, as the array's own host (loopback only)")
    s.add_argument("--default-kind", choices=("differential", "plex"), default=None,
                   help="kind chosen when a request names neither (default differential)")
    s.add_argument("--hooks-dir", metavar="DIR", default=None,
                   help="hook-script writers' directory (default /etc/shadowplex/hooks.d; "
                        "'' for none)")
    s.add_argument("--sqlite-db", metavar="PATH", action="append",
                   help="a SQLite database the SQLite writer quiesces (repeatable)")
    from provider.config import LOG_LEVELS
    s.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="log level (default info; --debug: debug, and FUSE debug)")
    s.add_argument("--log-file", metavar="PATH", default=None,
                   help="append the log to PATH (reopened after logrotate) instead of "
                        "stderr; under systemd stderr goes to the journal")

    pool = sub.add_parser("pool", help="pool administration", parents=[common])
    psub = pool.add_subparsers(dest="pcmd", metavar="ACTION", required=True,
                               parser_class=_Parser)
    pi = add("init", cmd_pool_init, "create a new pool directory", psub)
    pi.add_argument("dir", metavar="DIR")
    pi.add_argument("--chunk-size", default="64K", help="power of two, 4K..1M (default 64K)")

    vol = sub.add_parser("volume", help="volumes (LUNs)", parents=[common])
    vsub = vol.add_subparsers(dest="vcmd", metavar="ACTION", required=True, parser_class=_Parser)
    vc = add("create", cmd_volume, "create a sparse volume", vsub)
    vc.add_argument("name")
    vc.add_argument("size", help="bytes or with K/M/G/T suffix, multiple of 512")
    listing.add_options(add("list", cmd_volume, "list volumes", vsub), listing.VOLUMES)
    vr = add("resize", cmd_volume, "grow a volume", vsub)
    vr.add_argument("name")
    vr.add_argument("size")
    vd = add("delete", cmd_volume, "delete a volume without snapshots", vsub)
    vd.add_argument("name")
    vp = add("present", cmd_volume, "LUN masking: present a volume to exactly these hosts",
             vsub)
    vp.add_argument("name")
    vp.add_argument("--to", metavar="HOST", action="append", required=True,
                    help="a host to present it to (repeatable; the daemon's own host is "
                         "the mount's root, others see MOUNT/hosts/HOST/volumes/)")

    snap = sub.add_parser("snapshot", help="shadow copies", parents=[common])
    ssub = snap.add_subparsers(dest="scmd", metavar="ACTION", required=True, parser_class=_Parser)
    sc = add("create", cmd_snapshot, "create a snapshot set of one or more volumes", ssub)
    sc.add_argument("volumes", nargs="+", metavar="VOLUME")
    sc.add_argument("--context", default=None,
                    help=" | ".join(vss.CREATABLE_CLI_NAMES) + " (or VSS value); default "
                    f"{CLI_DEFAULT_CONTEXT} (persistent): an auto-release one needs --hold")
    sc.add_argument("--hold", action="store_true",
                    help="keep this command, its session and so an auto-release set, until "
                    "Ctrl-C/SIGTERM")
    kind = sc.add_mutually_exclusive_group()
    kind.add_argument("--differential", dest="kind", action="store_const", const="differential")
    kind.add_argument("--plex", dest="kind", action="store_const", const="plex")
    sc.add_argument("--transportable", action="store_true")
    sl = add("list", cmd_snapshot, "list snapshots", ssub)
    sl.add_argument("volume_arg", nargs="?", metavar="VOLUME", help="only this volume's")
    sl.add_argument("--set", metavar="SET_ID")
    sl.add_argument("--volume", metavar="VOLUME", help="the same as VOLUME")
    listing.add_options(sl, listing.SNAPSHOTS)
    ss = add("show", cmd_snapshot, "show one snapshot or a set", ssub)
    ss.add_argument("id", nargs="?", metavar="ID")
    ss.add_argument("--set", metavar="SET_ID")
    listing.add_options(ss, listing.SNAPSHOTS)
    sf = add("diff", cmd_snapshot, "the chunks touched since a differential snapshot "
             "(changed-block map)", ssub)
    sf.add_argument("from_id", metavar="FROM", help="a differential snapshot")
    sf.add_argument("to_id", nargs="?", metavar="TO",
                    help="a later snapshot of the same volume (default: the live volume)")
    listing.add_options(sf, listing.DIFF)
    sd = add("delete", cmd_snapshot, "delete snapshots", ssub)
    sd.add_argument("id", nargs="?", metavar="ID")
    sd.add_argument("--set", metavar="SET_ID")
    sd.add_argument("--oldest", metavar="VOLUME", help="the oldest snapshot of VOLUME")
    sd.add_argument("--volume", metavar="VOLUME", help="every snapshot of VOLUME (needs "
                    "--yes or a terminal's confirmation)")
    sd.add_argument("--all", action="store_true",
                    help="every snapshot of every volume (needs --yes or a terminal's "
                         "confirmation)")
    sd.add_argument("--unexpose", action="store_true", help="unmount/unexpose first")
    sd.add_argument("--yes", "-y", action="store_true",
                    help="do not ask before deleting with --all or --volume")
    sd.add_argument("--dry-run", "-n", action="store_true",
                    help="list what would be deleted, delete nothing")

    bk = add("backup", cmd_backup, "a full or incremental (--from) qcow2/raw image of a "
             "snapshot, read over the NBD port")
    bk.add_argument("snapshot", metavar="SNAPSHOT")
    bk.add_argument("--to", metavar="FILE", required=True, help="the image to write")
    bk.add_argument("--from", dest="base", metavar="BASE",
                    help="incremental: only the chunks changed since snapshot BASE, over "
                         "its backup (qcow2: as its backing file)")
    bk.add_argument("--base-file", metavar="PREV",
                    help="the backup of BASE (default: the newest one in FILE's directory, "
                         "by its manifest FILE.backup.json)")
    bk.add_argument("--format", choices=("qcow2", "raw"), default=None,
                    help="default qcow2 (raw for a FILE ending in .raw or .img)")
    bk.add_argument("--force", action="store_true", help="replace FILE if it exists")
    e = add("expose", cmd_expose, "make a snapshot visible (exposed/NAME.img, or mounted)")
    e.add_argument("snapshot", metavar="SNAPSHOT")
    e.add_argument("--name", metavar="NAME")
    e.add_argument("--mount", metavar="PATH", help="loop-attach read-only and mount here")
    u = add("unexpose", cmd_unexpose, "undo expose (unmount, detach, hide)")
    u.add_argument("snapshot", metavar="SNAPSHOT|NAME|DIR",
                   help="a snapshot id, its exposed name or the directory it is mounted at")
    r = add("revert", cmd_revert, "revert a volume to a snapshot (ResyncLuns)")
    r.add_argument("snapshot", metavar="SNAPSHOT")
    r.add_argument("--force", action="store_true", help="even if the volume is in use")
    pr = add("promote", cmd_promote, "turn a differential snapshot into a full copy")
    pr.add_argument("snapshot", metavar="SNAPSHOT")
    sp = add("split", cmd_split, "break a snapshot off as a new read-write volume")
    sp.add_argument("snapshot", metavar="SNAPSHOT")
    sp.add_argument("name", metavar="NEWNAME")
    eb = add("end-backup", cmd_end_backup, "BackupComplete: tell the writers the backup is done")
    eb.add_argument("set", metavar="SET_ID")
    ex = add("export", cmd_export, "write the Backup Components Document of a transportable "
             "set")
    ex.add_argument("set", metavar="SET_ID")
    ex.add_argument("-o", "--output", metavar="FILE", required=True)
    ex.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    im = add("import", cmd_import, "import a transportable set on this host (--host)")
    im.add_argument("file", metavar="FILE")
    w = sub.add_parser("writers", help="writers", parents=[common])
    wsub = w.add_subparsers(dest="wcmd", metavar="ACTION", required=True, parser_class=_Parser)
    listing.add_options(add("list", cmd_writers, "list writers and their state", wsub),
                        listing.WRITERS)
    add("check", cmd_check, "verify catalog, maps and checksums")
    add("scrub", cmd_check, "read every byte and verify it")
    listing.add_options(add("status", cmd_status, "daemon and pool status"), listing.STATUS)
    listing.add_options(add("df", cmd_df, "space: the pool, what snapshots may take, each "
                            "volume's allocation"), listing.DF)
    d = add("demo", cmd_demo, "run the end-to-end demonstration in a temporary directory")
    d.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (pool, serve.log), also after a "
                        "failure or Ctrl-C; without it the directory is always removed")
    bn = add("bench", cmd_bench, "storage benchmark: fio through the mount vs the raw file and "
             "qemu-storage-daemon, plus snapshot commit, plex sync, memory and restart figures")
    from .bench import add_arguments as _bench_arguments
    _bench_arguments(bn)
    pk = sub.add_parser("pki", help="certificates of the NBD port (TLS)", parents=[common])
    ksub = pk.add_subparsers(dest="kcmd", metavar="ACTION", required=True, parser_class=_Parser)
    from .pki import add_arguments as _pki_arguments
    _pki_arguments(add("init", cmd_pki, "create a CA and the array's server certificate", ksub),
                   add("host", cmd_pki, "create a host's client certificate (CN = NAME)", ksub))
    sf = add("script", cmd_script, "run a diskshadow-style script")
    sf.add_argument("file", metavar="FILE")
    return p


def _is_usage(e: Exception) -> bool:
    """Invalid arguments (names, sizes, ids, chunk sizes) are usage errors: exit 2."""
    from blockstore import errors
    if isinstance(e, errors.InvalidName | errors.InvalidSize):
        return True
    if isinstance(e, errors.FormatError) and "chunk size" in str(e):
        return True
    return getattr(e, "name", None) == "E_INVALIDARG"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:   # while starting up (parsing, imports): nothing was asked
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    errors.JSON_ARGV = "--json" in (sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from blockstore.errors import StoreError
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
    except (ControlError, StoreError) as e:
        if args.debug:
            raise
        code = EXIT_USAGE if _is_usage(e) else EXIT_FAILED
        if args.json:
            message = e.message if isinstance(e, ControlError) else str(e)
            return fail(code, errors.name_of(e), message)
        return fail(code, "", str(e))
    except KeyboardInterrupt:   # outside a request: nothing was asked of the daemon
        print(f"{PROG}: interrupted", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
