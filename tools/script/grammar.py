"""The script language: one line -> one statement (`Stmt`), or a ScriptError naming the line.

Each verb has its own parser in `_PARSERS` (keyed by the first word); a parser checks
the line's shape and arguments only. What depends on other lines (verb order, aliases)
is tools/script/check.py's; running is tools/script/run.py's. The language itself is
described in docs/scripts.md.

Names and ids follow the layers below rather than a copy of their rules: volume names
are blockstore.names' (`add volume` refers to an existing volume, so a name from before
the no-leading-'-' rule is accepted; `expose ID NAME` makes a new exposure name, so it
must be one check_name accepts), ids are provider.vss.GUID_RE, contexts come from
provider.vss (their CLI names, and diskshadow's spelling derived from their bits).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockstore import names
from provider import vss

# longest line accepted (characters); Linux refuses longer single arguments anyway
# (MAX_ARG_STRLEN 128 KiB), and shlex takes quadratic time on megabyte-long words
MAX_LINE_CHARS = 65536

ALIAS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REF_RE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
SHADOW_N_RE = re.compile(r"vss_shadow_(\d+)")
SET_ALIAS = "VSS_SHADOW_SET"
AUTO_RELEASE = vss.AUTO_RELEASE_CLI_NAMES    # backup, file-share-backup

# diskshadow's spelling -> ours: `volatile` / `persistent` is the PERSISTENT bit,
# `nowriters` the NO_WRITERS bit (docs/scripts.md, "Contexts")
_DISKSHADOW_CONTEXTS = {
    ("persistent" if vss.is_persistent(c) else "volatile",)
    + (() if vss.uses_writers(c) else ("nowriters",)): c.cli_name
    for c in vss.CREATABLE_CONTEXTS
}

# Every verb: its syntax and one line on what it does. The one list of the language's
# verbs: the parser's "known:" error, `shadowplex script --help`, the man page
# shadowplex-script(1) and the fuzz tests read it; docs/scripts.md explains each verb.
VERB_TABLE: dict[str, tuple[str, str]] = {
    "set context": ("set context CTX", "context of the next sets (default backup)"),
    "set option": ("set option [differential|plex] [transportable]",
                   "attributes of the next sets"),
    "set metadata": ("set metadata FILE", "a JSON description of the sets, after each create"),
    "set verbose": ("set verbose on|off", "more output (exec commands, tables)"),
    "begin backup": ("begin backup", "start a backup (completed by 'end backup')"),
    "add volume": ("add volume NAME [alias A]", "a volume of the set being composed"),
    "create": ("create", "create the set: one instant for all its volumes"),
    "expose": ("expose ID TARGET", "mount at TARGET (with a /), or MOUNT/exposed/TARGET.img"),
    "exec": ("exec CMD", "run CMD with /bin/sh; a failure stops the script"),
    "unexpose": ("unexpose ID|PATH|NAME", "undo expose"),
    "end backup": ("end backup", "BackupComplete for the sets of this backup"),
    "delete shadows": ("delete shadows all|volume V|oldest V|set S|id ID|exposed X",
                       "delete snapshots"),
    "load metadata": ("load metadata FILE", "read a Backup Components Document"),
    "import": ("import", "import the loaded document's set on this host"),
    "list shadows": ("list shadows [all|set SETID|id ID]", "snapshots as a table"),
    "list writers": ("list writers [status|metadata|detailed]", "writers and their state"),
    "list providers": ("list providers", "the daemon's provider"),
    "revert": ("revert ID", "make the snapshot's volume equal to it"),
    "resync": ("resync ID", "the same as revert (diskshadow's LUN resync)"),
    "break": ("break [writable] ID|SETID", "split off as new volumes VOLUME-break-N"),
    "backup": ("backup ID FILE [from BASE_ID] [format qcow2|raw]",
               "a full or incremental image (docs/backup.md)"),
    "exit": ("exit", "stop here, successfully"),
}
VERBS = tuple(VERB_TABLE)


def verb_lines() -> list[str]:
    """One line per verb, its syntax then what it does (`shadowplex script --help`)."""
    width = max(len(syntax) for syntax, _ in VERB_TABLE.values() if len(syntax) <= 34)
    return [f"{syntax:<{width}}  {what}" for syntax, what in VERB_TABLE.values()]

# diskshadow verbs shadowplex does not have, with the reason
_NOT_BUILT = {
    "begin restore": "restore sessions are not supported; use 'revert ID' or 'resync ID'",
    "end restore": "restore sessions are not supported; use 'revert ID' or 'resync ID'",
    "reset": "not supported: one script is one session; split the script instead",
    "writer": "writer selection is not supported: every writer takes part in contexts "
              "with writers (use a 'nowriters' context to exclude all)",
    "mask": "not supported: to remove an imported set from this host, delete it "
            "('delete shadows set %VSS_SHADOW_SET%' after 'import')",
    "simulate": "restore simulation is not supported",
    "add shadow": "not supported: 'resync ID' resyncs a snapshot onto its own volume",
    "add alias": "not supported: aliases come from 'add volume NAME alias A'",
}


class ScriptError(Exception):
    """A mistake in the script found while parsing (exit 2)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(line, message)
        self.line = line
        self.message = message


@dataclass
class Stmt:
    line: int
    verb: str                       # canonical, e.g. "delete shadows"
    text: str                       # the line as written, stripped
    args: dict[str, Any] = field(default_factory=dict)


def _is_ref(tok: str) -> bool:
    return bool(re.fullmatch(r"%[A-Za-z_][A-Za-z0-9_]*%", tok) or vss.GUID_RE.fullmatch(tok))


def _need_ref(n: int, tok: str, what: str) -> str:
    if not _is_ref(tok):
        raise ScriptError(n, f"{what}: expected %ALIAS% or an id (a GUID), got {tok!r}")
    return tok


def parse_context(n: int, words: list[str]) -> str:
    """`set context` arguments -> our context name (backup, ..., nas-rollback)."""
    if not words:
        raise ScriptError(n, "set context needs a context: backup, file-share-backup, "
                          "app-rollback, nas-rollback, or diskshadow's volatile [nowriters] "
                          "/ persistent [nowriters]")
    key = tuple(w.lower() for w in words)
    if key in _DISKSHADOW_CONTEXTS:
        return _DISKSHADOW_CONTEXTS[key]
    if key[0] == "clientaccessible":
        raise ScriptError(n, "set context clientaccessible is not supported: only the "
                          "Windows system provider makes client-accessible shadow copies; "
                          "use 'persistent nowriters' (nas-rollback)")
    if len(key) == 1:
        if key[0] in vss.CREATABLE_CLI_NAMES:
            return key[0]
        try:
            return vss.parse_context(words[0]).cli_name
        except vss.VssError as e:
            raise ScriptError(n, f"set context: {e.message}") from None
    if "nowriters" in key[1:]:
        raise ScriptError(n, f"set context {' '.join(words)}: 'nowriters' goes with "
                          "'volatile' or 'persistent' only")
    raise ScriptError(n, f"set context {' '.join(words)}: one context expected "
                      "(backup, file-share-backup, app-rollback, nas-rollback, "
                      "volatile [nowriters], persistent [nowriters])")


def parse_options(n: int, words: list[str]) -> list[str]:
    """`set option` arguments -> attribute names for the daemon."""
    if not words:
        raise ScriptError(n, "set option needs differential, plex and/or transportable")
    out: list[str] = []
    for w in (x.lower() for x in words):
        if w in ("differential", "plex", "transportable"):
            if w.upper() in out:
                raise ScriptError(n, f"set option: {w} is given twice")
            out.append(w.upper())
        elif w in ("rollbackrecover", "txfrecover", "noautorecovery"):
            raise ScriptError(n, f"set option {w} is not supported: shadowplex snapshots "
                              "have no auto-recovery phase (they are read-only)")
        else:
            raise ScriptError(n, f"set option: unknown option {w!r} (differential, plex, "
                              "transportable)")
    if "DIFFERENTIAL" in out and "PLEX" in out:
        raise ScriptError(n, "set option: differential and plex exclude each other")
    return out


# ------------------------------------------------------------------------ one line
@dataclass
class _Line:
    """A line split into words: what each verb parser gets."""

    n: int
    text: str               # stripped
    toks: list[str]         # as written
    w: list[str]            # lower-cased

    @property
    def argc(self) -> int:
        return len(self.toks)

    def stmt(self, verb: str, **args: Any) -> Stmt:
        return Stmt(self.n, verb, self.text, args)

    def exact(self, count: int, usage: str) -> None:
        if self.argc != count:
            raise ScriptError(self.n, f"usage: {usage}")

    def fail(self, message: str) -> ScriptError:
        return ScriptError(self.n, message)


def _parse_set(ln: _Line) -> Stmt:
    sub = ln.w[1] if ln.argc > 1 else ""
    if sub == "context":
        return ln.stmt("set context", context=parse_context(ln.n, ln.toks[2:]))
    if sub == "option":
        return ln.stmt("set option", options=parse_options(ln.n, ln.toks[2:]))
    if sub == "metadata":
        ln.exact(3, "set metadata FILE")
        return ln.stmt("set metadata", path=ln.toks[2])
    if sub == "verbose":
        if ln.argc != 3 or ln.w[2] not in ("on", "off"):
            raise ln.fail("usage: set verbose on|off")
        return ln.stmt("set verbose", on=ln.w[2] == "on")
    raise ln.fail("set what? set context | option | metadata | verbose")


def _parse_begin_end(ln: _Line) -> Stmt:
    if ln.argc != 2 or ln.w[1] != "backup":
        raise ln.fail(f"usage: {ln.w[0]} backup")
    return ln.stmt(f"{ln.w[0]} backup")


def _parse_add(ln: _Line) -> Stmt:
    if ln.argc < 2 or ln.w[1] != "volume":
        raise ln.fail("usage: add volume NAME [alias ALIAS]")
    if ln.argc not in (3, 5) or (ln.argc == 5 and ln.w[3] != "alias"):
        raise ln.fail("usage: add volume NAME [alias ALIAS]")
    vol = ln.toks[2]
    if not (names.is_name(vol) or vol.startswith("/") or REF_RE.search(vol)):
        raise ln.fail(f"add volume: {vol!r} is not a volume name ([A-Za-z0-9._-], 1-64 "
                      "characters, not starting with '.') or an absolute path")
    alias = ln.toks[4] if ln.argc == 5 else None
    if alias is not None:
        if not ALIAS_RE.fullmatch(alias):
            raise ln.fail(f"add volume: alias {alias!r} must be a name "
                          "([A-Za-z_][A-Za-z0-9_]*), written without %")
        if alias.upper() == SET_ALIAS or SHADOW_N_RE.fullmatch(alias.lower()):
            raise ln.fail(f"add volume: alias {alias} is reserved (create sets it)")
    return ln.stmt("add volume", volume=vol, alias=alias)


def _parse_expose(ln: _Line) -> Stmt:
    ln.exact(3, "expose ID PATH|NAME  (PATH: a directory to mount on; NAME: "
             "MOUNT/exposed/NAME.img)")
    target = ln.toks[2]
    if "/" not in target and not names.is_new_name(target) and not REF_RE.search(target):
        raise ln.fail(f"expose: {target!r} is neither a directory path (with a '/', e.g. "
                      "./snap or /mnt/snap) nor an exposed name ([A-Za-z0-9._-], not "
                      "starting with '.' or '-')")
    return ln.stmt("expose", id=_need_ref(ln.n, ln.toks[1], "expose"), target=target)


_BACKUP_USAGE = VERB_TABLE["backup"][0]


def _parse_backup(ln: _Line) -> Stmt:
    """Not diskshadow's: `shadowplex backup` (docs/backup.md) as a statement."""
    if ln.argc < 3 or ln.argc % 2 == 0:
        raise ln.fail(f"usage: {_BACKUP_USAGE}")
    opts: dict[str, str] = {}
    for i in range(3, ln.argc, 2):
        key = ln.w[i]
        if key not in ("from", "format") or key in opts:
            raise ln.fail(f"backup: {ln.toks[i]!r} is not expected here; usage: "
                          f"{_BACKUP_USAGE}")
        opts[key] = ln.toks[i + 1]
    fmt = opts.get("format")
    if fmt is not None and fmt.lower() not in ("qcow2", "raw"):
        raise ln.fail(f"backup: format {fmt!r}: qcow2 or raw")
    base = opts.get("from")
    return ln.stmt("backup", id=_need_ref(ln.n, ln.toks[1], "backup"), file=ln.toks[2],
                   base=None if base is None else _need_ref(ln.n, base, "backup from"),
                   format=None if fmt is None else fmt.lower())


def _parse_unexpose(ln: _Line) -> Stmt:
    ln.exact(2, "unexpose ID|PATH|NAME")
    return ln.stmt("unexpose", target=ln.toks[1])


_DELETE_USAGE = ("usage: delete shadows all | volume VOL | oldest VOL | set SETID | id ID | "
                 "exposed ID|PATH|NAME")
_DELETE_ARG = {"volume": "VOL", "oldest": "VOL", "set": "SETID", "id": "ID",
               "exposed": "ID|PATH|NAME"}


def _parse_delete(ln: _Line) -> Stmt:
    if ln.argc < 2 or ln.w[1] != "shadows":
        raise ln.fail(_DELETE_USAGE)
    form = ln.w[2] if ln.argc > 2 else ""
    if form == "all":
        ln.exact(3, "delete shadows all")
        return ln.stmt("delete shadows", form="all", arg=None)
    if form in _DELETE_ARG:
        ln.exact(4, f"delete shadows {form} {_DELETE_ARG[form]}")
        arg = ln.toks[3]
        if form in ("set", "id"):
            _need_ref(ln.n, arg, f"delete shadows {form}")
        return ln.stmt("delete shadows", form=form, arg=arg)
    raise ln.fail(_DELETE_USAGE)


def _parse_load(ln: _Line) -> Stmt:
    if ln.argc != 3 or ln.w[1] != "metadata":
        raise ln.fail("usage: load metadata FILE")
    return ln.stmt("load metadata", path=ln.toks[2])


def _parse_list(ln: _Line) -> Stmt:
    what = ln.w[1] if ln.argc > 1 else ""
    if what == "shadows":
        if ln.argc == 2 or (ln.argc == 3 and ln.w[2] == "all"):
            return ln.stmt("list shadows", form="all", arg=None)
        if ln.argc == 4 and ln.w[2] in ("set", "id"):
            return ln.stmt("list shadows", form=ln.w[2],
                           arg=_need_ref(ln.n, ln.toks[3], f"list shadows {ln.w[2]}"))
        raise ln.fail("usage: list shadows [all | set SETID | id ID]")
    if what == "writers":
        if ln.argc > 3 or (ln.argc == 3 and ln.w[2] not in ("status", "metadata", "detailed")):
            raise ln.fail("usage: list writers [status|metadata|detailed]")
        return ln.stmt("list writers")
    if what == "providers":
        ln.exact(2, "list providers")
        return ln.stmt("list providers")
    raise ln.fail("usage: list shadows [...] | writers | providers")


def _parse_revert(ln: _Line) -> Stmt:   # and resync
    ln.exact(2, f"{ln.w[0]} ID")
    return ln.stmt(ln.w[0], id=_need_ref(ln.n, ln.toks[1], ln.w[0]))


def _parse_break(ln: _Line) -> Stmt:
    writable = ln.argc > 1 and ln.w[1] == "writable"
    if ln.argc != (3 if writable else 2):
        raise ln.fail("usage: break [writable] ID|SETID")
    return ln.stmt("break", writable=writable, id=_need_ref(ln.n, ln.toks[-1], "break"))


def _bare(verb: str) -> Callable[[_Line], Stmt]:
    """A verb without arguments."""
    def parse(ln: _Line) -> Stmt:
        ln.exact(1, verb)
        return ln.stmt(verb)
    return parse


# first word -> its parser (`exec` is split off before the words are: see parse_line)
_PARSERS: dict[str, Callable[[_Line], Stmt]] = {
    "set": _parse_set,
    "begin": _parse_begin_end,
    "end": _parse_begin_end,
    "add": _parse_add,
    "create": _bare("create"),
    "expose": _parse_expose,
    "unexpose": _parse_unexpose,
    "delete": _parse_delete,
    "load": _parse_load,
    "import": _bare("import"),
    "list": _parse_list,
    "revert": _parse_revert,
    "resync": _parse_revert,
    "break": _parse_break,
    "backup": _parse_backup,
    "exit": _bare("exit"),
}


def parse_line(n: int, raw: str) -> Stmt | None:
    """Line ``n`` as a statement; None for a blank or comment line."""
    s = raw.strip()
    if not s or s.startswith("#"):
        return None
    head, _, _rest = s.partition(" ")
    if head.lower() == "exec" or s.lower().startswith("exec\t"):
        # the command goes to /bin/sh as written: not split, `#` not a comment
        cmd = s[4:].strip()
        if not cmd:
            raise ScriptError(n, "exec needs a command")
        return Stmt(n, "exec", s, {"cmd": cmd})
    try:
        toks = shlex.split(s, comments=True)
    except ValueError as e:
        raise ScriptError(n, f"cannot split the line into words: {e}") from None
    if not toks:
        return None
    ln = _Line(n, s, toks, [t.lower() for t in toks])
    two = " ".join(ln.w[:2])
    if two in _NOT_BUILT or ln.w[0] in _NOT_BUILT:
        verb = two if two in _NOT_BUILT else ln.w[0]
        raise ScriptError(n, f"{verb}: {_NOT_BUILT[verb]}")
    parser = _PARSERS.get(ln.w[0])
    if parser is None:
        raise ScriptError(n, f"unknown verb {toks[0]!r}; known: {', '.join(VERBS)}")
    return parser(ln)
