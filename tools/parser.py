"""The CLI's argument parser: every command, its options and their help. The one
description of the command line: tools/completion.py (bash completion) and the man pages
are generated from build_parser()."""

from __future__ import annotations

import argparse
import re  # argparse imports it anyway
from collections.abc import Callable, Container, Iterator, Sequence

from provider.config import DEFAULT_HOST_STATE, DEFAULT_SOCKET

from . import errors, listing
from .commands import (
    CLI_DEFAULT_CONTEXT,
    cmd_backup,
    cmd_bench,
    cmd_check,
    cmd_demo,
    cmd_df,
    cmd_end_backup,
    cmd_export,
    cmd_expose,
    cmd_import,
    cmd_pki,
    cmd_promote,
    cmd_restore,
    cmd_revert,
    cmd_script,
    cmd_snapshot,
    cmd_split,
    cmd_status,
    cmd_unexpose,
    cmd_volume,
    cmd_writers,
)
from .errors import EXIT_USAGE
from .output import PROG, one_line, package_version
from .serving import cmd_pool_init, cmd_serve

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any, NoReturn


class _Parser(argparse.ArgumentParser):
    """Usage errors: exit 2 with exactly one line on stderr, no usage dump, no traceback
    (with --json anywhere on the command line: the JSON error object, tools/errors.py).
    The line names the help of the (sub)command that was being parsed:
    `shadowplex snapshot create --bogus` -> "... (try 'shadowplex snapshot create --help')"."""

    def error(self, message: str) -> NoReturn:
        if errors.JSON_ARGV:
            errors.print_json_error("E_INVALIDARG", EXIT_USAGE, one_line(message))
            self.exit(EXIT_USAGE)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} "
                              f"(try '{self.prog} --help')\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        # argparse reports unknown arguments from the top parser, after the subcommands
        # have run: report them from the deepest subcommand chosen instead
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen(self, ns).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def chosen(parser: argparse.ArgumentParser, ns: argparse.Namespace
           ) -> argparse.ArgumentParser:
    """The parser of the deepest subcommand named in ``ns`` (``parser`` if none)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            name = getattr(ns, a.dest, None)
            if isinstance(name, str) and name in a.choices:
                return chosen(a.choices[name], ns)
    return parser


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) of the tree below ``p``, ``p`` first (path ``()``):
    what the man pages, the completion and their tests walk."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from walk(sub, (*path, name))


class _Version(argparse._VersionAction):
    """--version, the package's version looked up only when asked: importlib.metadata
    would cost every other command ~15 ms of start-up."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        self.version = f"{PROG} {package_version()}"
        super().__call__(parser, namespace, values, option_string)


def _poll_us(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds "
                                         "from 0 to 1000")
    return value


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


class _Tree:
    """What a command's function adds its parsers to: the top parser's subcommands, each
    with the global options (``common``, accepted after the command too)."""

    def __init__(self, sub: Any, common: argparse.ArgumentParser,
                 rest: Sequence[str] | None) -> None:
        self.sub = sub
        self.common = common
        self.rest = rest   # argv after the command's name (None: build every action)

    def add(self, name: str, func: Callable[[argparse.Namespace], int], help: str,
            parent: Any = None, **kw: Any) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = (parent or self.sub).add_parser(
            name, help=help, description=help, parents=[self.common], **kw)
        sp.set_defaults(func=func)
        return sp

    def group(self, name: str, help: str, dest: str,
              actions: dict[str, Callable[[_Tree, Any], None]]) -> None:
        """A command of several actions (`volume create`, `volume list`, ...), each added
        by its function in ``actions`` -- only the one argv names after the command, if
        build_parser could tell."""
        g: argparse.ArgumentParser = self.sub.add_parser(name, help=help, description=help,
                                                         parents=[self.common])
        sub = g.add_subparsers(dest=dest, metavar="ACTION", required=True,
                               parser_class=_Parser, help="what to do; "
                               f"'{g.prog} ACTION --help' lists its options")
        wanted = None if self.rest is None else _named(g, self.rest, actions)[0]
        for action, add in actions.items():
            if wanted is None or action == wanted:
                add(self, sub)


# ------------------------------------------------------------------------ the commands
# One function per command (a group's adds its actions), listed in COMMANDS below in
# --help's order.
def _serve(t: _Tree) -> None:
    add = t.add
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
    s.add_argument("--ceph-host", metavar="NAME", default=None,
                   help="with --array rbd:POOL: this host's name in the LUN masking stored "
                        "on the images (default: the hostname; docs/ceph.md)")
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


def _pool(t: _Tree) -> None:
    t.group("pool", "pool administration", "pcmd", {"init": _pool_init})


def _pool_init(t: _Tree, psub: Any) -> None:
    add = t.add
    pi = add("init", cmd_pool_init, "create a new pool directory", psub)
    pi.add_argument("dir", metavar="DIR", help="the pool directory (created; if it exists "
                    "it must be empty)")
    pi.add_argument("--chunk-size", default="64K", help="power of two, 4K..1M (default 64K)")


def _volume(t: _Tree) -> None:
    t.group("volume", "volumes (LUNs)", "vcmd", {
        "create": _volume_create, "list": _volume_list, "resize": _volume_resize,
        "delete": _volume_delete, "present": _volume_present})


def _volume_create(t: _Tree, vsub: Any) -> None:
    add = t.add
    vc = add("create", cmd_volume, "create a sparse volume", vsub)
    vc.add_argument("name", metavar="NAME", help="the new volume's name: letters, digits, "
                    "'.', '_', '-', 1-64 characters, not starting with '.' or '-'")
    vc.add_argument("size", metavar="SIZE",
                    help="bytes or with a K/M/G/T suffix (powers of 1024), a multiple of 512")


def _volume_list(t: _Tree, vsub: Any) -> None:
    add = t.add
    listing.add_options(add("list", cmd_volume, "list volumes", vsub), listing.VOLUMES)


def _volume_resize(t: _Tree, vsub: Any) -> None:
    add = t.add
    vr = add("resize", cmd_volume, "grow a volume", vsub)
    vr.add_argument("name", metavar="NAME", help="the volume")
    vr.add_argument("size", metavar="SIZE", help="the new size (as for create), or +SIZE to "
                    "grow it by SIZE; a smaller size is refused (no shrinking)")
    # `resize db -1G` without `--`: argparse takes -1G for an option unless it looks
    # like a negative number to this parser (its own rule knows no size suffixes)
    vr._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?[A-Za-z]*$")


def _volume_delete(t: _Tree, vsub: Any) -> None:
    add = t.add
    vd = add("delete", cmd_volume, "delete a volume without snapshots", vsub)
    vd.add_argument("name", metavar="NAME",
                    help="the volume (refused while it has snapshots or is in use)")


def _volume_present(t: _Tree, vsub: Any) -> None:
    add = t.add
    vp = add("present", cmd_volume, "LUN masking: present a volume to exactly these hosts",
             vsub)
    vp.add_argument("name", metavar="NAME", help="the volume")
    vp.add_argument("--to", metavar="HOST", action="append", required=True,
                    help="a host to present it to (repeatable; the daemon's own host is "
                         "the mount's root, others see MOUNT/hosts/HOST/volumes/)")


def _snapshot(t: _Tree) -> None:
    t.group("snapshot", "shadow copies", "scmd", {
        "create": _snapshot_create, "list": _snapshot_list, "show": _snapshot_show,
        "diff": _snapshot_diff, "delete": _snapshot_delete})


def _snapshot_create(t: _Tree, ssub: Any) -> None:
    from provider import vss  # here: its enums cost every other command's start-up
    add = t.add
    sc = add("create", cmd_snapshot, "create a snapshot set of one or more volumes", ssub)
    sc.add_argument("volumes", nargs="+", metavar="VOLUME",
                    help="a volume: its name, MOUNT/volumes/NAME.img or a /dev/loopN on it; "
                         "several: one set, one instant for all")
    sc.add_argument("--context", default=None,
                    help=" | ".join(vss.CREATABLE_CLI_NAMES) + " (or VSS value); default "
                    f"{CLI_DEFAULT_CONTEXT} (persistent): an auto-release one needs --hold")
    sc.add_argument("--hold", action="store_true",
                    help="keep this command, its session and so an auto-release set, until "
                    "Ctrl-C/SIGTERM")
    kind = sc.add_mutually_exclusive_group()
    kind.add_argument("--differential", dest="kind", action="store_const", const="differential",
                      help="copy-on-write: a chunk's old content is copied to the diff area "
                           "before its first overwrite (VSS DIFFERENTIAL; the daemon's "
                           "default unless serve --default-kind plex)")
    kind.add_argument("--plex", dest="kind", action="store_const", const="plex",
                      help="a full-copy mirror, synced while the set is prepared and split "
                           "off at its instant (VSS PLEX)")
    sc.add_argument("--transportable", action="store_true",
                    help="may be exported ('export') and imported on another host "
                         "(VSS TRANSPORTABLE)")
    sc.add_argument("--name", metavar="NAME",
                    help="name each new snapshot (unique per volume; VOLUME@NAME names it "
                    "afterwards)")
    sc.add_argument("--description", metavar="TEXT",
                    help="a description kept with each new snapshot (one line, at most 256 "
                    "characters)")


def _snapshot_list(t: _Tree, ssub: Any) -> None:
    add = t.add
    sl = add("list", cmd_snapshot, "list snapshots", ssub)
    sl.add_argument("volume_arg", nargs="?", metavar="VOLUME", help="only this volume's")
    sl.add_argument("--set", metavar="SET_ID", help="only this snapshot set's")
    sl.add_argument("--volume", metavar="VOLUME", help="the same as VOLUME")
    listing.add_options(sl, listing.SNAPSHOTS)


def _snapshot_show(t: _Tree, ssub: Any) -> None:
    add = t.add
    ss = add("show", cmd_snapshot, "show one snapshot or a set", ssub)
    ss.add_argument("id", nargs="?", metavar="ID", help="the snapshot's id")
    ss.add_argument("--set", metavar="SET_ID", help="every snapshot of this set instead")
    listing.add_options(ss, listing.SNAPSHOTS)


def _snapshot_diff(t: _Tree, ssub: Any) -> None:
    add = t.add
    sf = add("diff", cmd_snapshot, "the chunks touched since a differential snapshot "
             "(changed-block map)", ssub)
    sf.add_argument("from_id", metavar="FROM", help="a differential snapshot")
    sf.add_argument("to_id", nargs="?", metavar="TO",
                    help="a later snapshot of the same volume (default: the live volume)")
    listing.add_options(sf, listing.DIFF)


def _snapshot_delete(t: _Tree, ssub: Any) -> None:
    add = t.add
    sd = add("delete", cmd_snapshot, "delete snapshots (name exactly one: ID, --set, "
             "--oldest, --volume or --all)", ssub)
    sd.add_argument("id", nargs="?", metavar="ID", help="the snapshot to delete")
    sd.add_argument("--set", metavar="SET_ID", help="every snapshot of this set")
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


def _backup(t: _Tree) -> None:
    add = t.add
    bk = add("backup", cmd_backup, "a full or incremental (--from) qcow2/raw image of a "
             "snapshot, read over the NBD port")
    bk.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot to back up")
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


def _restore(t: _Tree) -> None:
    add = t.add
    rs = add("restore", cmd_restore, "a chain of backups back to one raw image (no daemon)")
    rs.add_argument("file", metavar="FILE", help="the chain's newest backup (its manifest "
                    "FILE.backup.json names its base)")
    rs.add_argument("--to", metavar="OUT", required=True, help="the raw image to write")
    rs.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _expose(t: _Tree) -> None:
    add = t.add
    e = add("expose", cmd_expose, "make a snapshot visible (exposed/NAME.img, or mounted)")
    e.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot to expose")
    e.add_argument("--name", metavar="NAME", help="show it as MOUNT/exposed/NAME.img (a new "
                   "name, as for a volume); --name, --mount or both")
    e.add_argument("--mount", metavar="PATH", help="loop-attach it read-only and mount its "
                   "filesystem read-only at PATH (an empty directory)")


def _unexpose(t: _Tree) -> None:
    add = t.add
    u = add("unexpose", cmd_unexpose, "undo expose (unmount, detach, hide)")
    u.add_argument("snapshot", metavar="SNAPSHOT|NAME|DIR",
                   help="a snapshot id, its exposed name or the directory it is mounted at")


def _revert(t: _Tree) -> None:
    add = t.add
    r = add("revert", cmd_revert, "revert a volume to a snapshot (ResyncLuns)")
    r.add_argument("snapshot", metavar="SNAPSHOT",
                   help="the snapshot; its own volume becomes equal to it")
    r.add_argument("--force", action="store_true",
                   help="even if loop devices use the volume (warns: their filesystems see "
                        "the content change under them)")


def _promote(t: _Tree) -> None:
    add = t.add
    pr = add("promote", cmd_promote, "turn a differential snapshot into a full copy")
    pr.add_argument("snapshot", metavar="SNAPSHOT", help="a differential snapshot")


def _split(t: _Tree) -> None:
    add = t.add
    sp = add("split", cmd_split, "break a snapshot off as a new read-write volume")
    sp.add_argument("snapshot", metavar="SNAPSHOT",
                    help="the snapshot (a differential one is promoted first; gone after)")
    sp.add_argument("name", metavar="NEWNAME", help="the new volume's name")


def _end_backup(t: _Tree) -> None:
    add = t.add
    eb = add("end-backup", cmd_end_backup, "BackupComplete: tell the writers the backup is done")
    eb.add_argument("set", metavar="SET_ID",
                    help="the snapshot set backed up (once per set: a second time is refused)")


def _export(t: _Tree) -> None:
    add = t.add
    ex = add("export", cmd_export, "write the Backup Components Document of a transportable "
             "set")
    ex.add_argument("set", metavar="SET_ID", help="a set created with --transportable")
    ex.add_argument("-o", "--output", metavar="FILE", required=True,
                    help="the document to write (each writer's metadata next to it, "
                         "FILE.WRITER.wmd.xml)")
    ex.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def _import(t: _Tree) -> None:
    add = t.add
    im = add("import", cmd_import, "import a transportable set on this host (--host)")
    im.add_argument("file", metavar="FILE", help="the document 'export' wrote")


def _writers(t: _Tree) -> None:
    t.group("writers", "writers (quiescers: fsfreeze, hook scripts, SQLite)", "wcmd",
            {"list": _writers_list})


def _writers_list(t: _Tree, wsub: Any) -> None:
    add = t.add
    listing.add_options(add("list", cmd_writers, "list writers and their state", wsub),
                        listing.WRITERS)


def _checking(name: str, what: str) -> Callable[[_Tree], None]:
    """`check` and `scrub`: the same option, their own words."""
    def add_check(t: _Tree) -> None:
        t.add(name, cmd_check, what).add_argument(
            "--volume", metavar="VOLUME",
            help=f"{name} only this volume and its snapshots (not the pool-wide catalog)")
    return add_check


def _status(t: _Tree) -> None:
    add = t.add
    listing.add_options(add("status", cmd_status, "daemon and pool status"), listing.STATUS)


def _df(t: _Tree) -> None:
    add = t.add
    listing.add_options(add("df", cmd_df, "space: the pool, what snapshots may take, each "
                            "volume's allocation"), listing.DF)


def _demo(t: _Tree) -> None:
    add = t.add
    d = add("demo", cmd_demo, "run the end-to-end demonstration in a temporary directory")
    d.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (pool, serve.log), also after a "
                        "failure or Ctrl-C; without it the directory is always removed")


def _bench(t: _Tree) -> None:
    add = t.add
    bn = add("bench", cmd_bench, "storage benchmark: fio through the mount vs the raw file and "
             "qemu-storage-daemon, plus snapshot commit, plex sync, memory and restart figures")
    from .bench import add_arguments as _bench_arguments
    _bench_arguments(bn)


def _pki(t: _Tree) -> None:
    t.group("pki", "certificates of the NBD port (TLS)", "kcmd",
            {"init": _pki_init, "host": _pki_host})


def _pki_init(t: _Tree, ksub: Any) -> None:
    from .pki import add_init_arguments
    add_init_arguments(t.add("init", cmd_pki, "create a CA and the array's server "
                             "certificate", ksub))


def _pki_host(t: _Tree, ksub: Any) -> None:
    from .pki import add_host_arguments
    add_host_arguments(t.add("host", cmd_pki, "create a host's client certificate (CN = NAME)",
                             ksub))


def _script(t: _Tree) -> None:
    add = t.add
    from .script_verbs import verb_lines
    sf = add("script", cmd_script, "run a diskshadow-style script", formatter_class=(
             argparse.RawDescriptionHelpFormatter),
             epilog="verbs (one per line; the language: docs/scripts.md, "
                    f"{PROG}-script(1)):\n" + "\n".join("  " + v for v in verb_lines()))
    sf.add_argument("file", metavar="FILE", help="the script ('-': read it from stdin)")


# Every command in --help's order, with the function that adds it (a group: with its
# actions). build_parser(argv) calls only the one argv names: a command does not pay at
# start-up for building the ~35 parsers of the others (docs/performance.md, "The CLI's
# start-up").
COMMANDS: dict[str, Callable[[_Tree], None]] = {
    "serve": _serve, "pool": _pool, "volume": _volume, "snapshot": _snapshot,
    "backup": _backup, "restore": _restore, "expose": _expose, "unexpose": _unexpose,
    "revert": _revert, "promote": _promote, "split": _split, "end-backup": _end_backup,
    "export": _export, "import": _import, "writers": _writers,
    "check": _checking("check", "verify catalog, maps and checksums"),
    "scrub": _checking("scrub", "check, and read every allocated byte back"),
    "status": _status, "df": _df, "demo": _demo, "bench": _bench, "pki": _pki,
    "script": _script,
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Without ``argv`` the whole tree (--help's command list,
    tools/completion.py, tools/manpages.py); with it, the top level and only the command
    ``argv`` names -- which parses ``argv`` exactly as the whole tree would -- or the
    whole tree when _named() cannot tell which (an unknown command, -h, an abbreviated
    option: argparse then answers as always)."""
    common = _Parser(add_help=False)
    _common_options(common, top=False)
    p = _Parser(prog=PROG, description="Linux user-space shadow-copy provider (VSS-like).")
    _common_options(p, top=True)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           parser_class=_Parser,
                           help=f"what to do; '{PROG} COMMAND --help' lists its options")
    name, rest = _named(p, argv, COMMANDS) if argv is not None else (None, None)
    tree = _Tree(sub, common, rest)
    for command, add in COMMANDS.items():
        if name is None or command == name:
            add(tree)
    return p


def _named(p: argparse.ArgumentParser, argv: Sequence[str], names: Container[str]
           ) -> tuple[str | None, Sequence[str] | None]:
    """The command (or action) of ``names`` that ``argv`` names after ``p``'s options
    (spelled out in full: `--socket PATH`, `--socket=PATH`, `--json`...), and what
    follows it; (None, None) if it names none of them or has anything else before it
    (-h, --version, `--`, `--sock`, `-qh`)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            return (arg, argv[i + 1:]) if arg in names else (None, None)
        action = p._option_string_actions.get(arg.partition("=")[0])
        if action is None or isinstance(action, argparse._HelpAction | _Version) \
                or (action.nargs == 0 and "=" in arg):
            return None, None
        i += 2 if action.nargs != 0 and "=" not in arg else 1   # with its value
    return None, None
