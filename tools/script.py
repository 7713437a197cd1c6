"""`shadowplex script FILE`: diskshadow-style scripts.

One verb per line, case-insensitive; `#` starts a comment (a whole line, or the rest of a
line except in `exec`, whose command goes to /bin/sh as written); blank lines are ignored.
Arguments may be quoted as in sh (`expose %A% "/mnt/my snap"`).

The whole script is parsed and checked FIRST (syntax, arguments, verb order, aliases,
lines of at most 65536 characters): a
mistake there prints ``FILE:LINE: reason`` and exits 2 before anything is done. Then the
script runs over ONE control connection, i.e. one requester session, so snapshots in the
auto-release contexts (backup, file-share-backup) live until the script ends, as in
diskshadow. A failure while running prints ``FILE:LINE: verb: reason`` and exits 1 after
cleaning up what the script made in an auto-release context: the snapshot set being
composed is aborted, exposures of auto-release snapshots are undone, and the session's
end deletes the auto-release sets (the script waits until they are gone). Persistent
snapshots (and their exposures) stay: they are meant to outlive the script; they are
listed on stderr. Exit codes: 0 done (also after `exit`), 1 failed while running,
2 usage/parse error (nothing done), 130 interrupted (Ctrl-C), 143 / 129 terminated by
SIGTERM / SIGHUP (the same cleanup as Ctrl-C, the first line on stderr says which).

Output: one line per action on stdout (none with --quiet; `list` tables are printed
anyway: they are what was asked for); cleanup lines and notes on stderr. FILE `-` reads
the script from stdin. Relative paths are relative to the current directory.

Verbs and what they map to (provider/client.py):

  set context CTX             context of the next sets (default backup); CTX below
  set option [differential|plex] [transportable]
                              attribute bits DIFFERENTIAL / PLEX / TRANSPORTABLE of the
                              next sets (replaces earlier options; none = daemon chooses)
  set metadata FILE           after every `create`, FILE gets a JSON description of the
                              script's sets (ids, aliases, snapshot properties). Not a
                              Backup Components Document: `load metadata` cannot read it
  set verbose on|off          more output (exec commands, snapshot tables)
  begin backup                starts a backup: `end backup` sends BackupComplete for every
                              set created since. Optional before `create` (without it the
                              set is diskshadow's "copy backup")
  add volume NAME [alias A]   set_start (first volume of a set) + set_add; NAME is a volume
                              name, MOUNT/volumes/NAME.img or a /dev/loopN on it
  create                      set_do: the set is created; %A% = the snapshot id of each
                              alias, %VSS_SHADOW_SET% = the set id, %VSS_SHADOW_1%.. =
                              the snapshots in `add` order (usable from the next line)
  expose ID TARGET            expose: TARGET with a `/` is a directory -> loop device +
                              read-only mount there (`expose --mount`); a plain name ->
                              MOUNT/exposed/NAME.img
  exec CMD                    /bin/sh -c CMD; %A% (defined aliases only) is replaced by its
                              value and every alias is in the environment ($A,
                              $VSS_SHADOW_SET, $VSS_SHADOW_n, $SHADOWPLEX_SOCKET); a non-zero
                              exit status stops the script (exit 1). CMD runs in its own
                              process group: after a failure or an interrupt the whole
                              group (pipelines, `cmd &`) gets SIGTERM, SIGKILL 3 s later
  unexpose ID|PATH|NAME       unexpose (a PATH is a mount directory, a NAME an exposed name)
  end backup                  end_backup (BackupComplete) for the sets of this backup
  delete shadows all          snapshot_delete(all)        \\
  delete shadows volume VOL   every snapshot of VOL        | exposed snapshots are
  delete shadows oldest VOL   snapshot_delete(oldest=VOL)  | unexposed first (as VSS's
  delete shadows set SETID    snapshot_delete(set_id=)     | DeleteSnapshots does)
  delete shadows id ID        snapshot_delete(snapshot_id=)|
  delete shadows exposed ID|PATH|NAME  the snapshot exposed there /
  list shadows [all|set SETID|id ID]   snapshot_list / snapshot_show, as a table
  list writers [status|metadata|detailed]  writers_list
  list providers              the daemon's provider (hello reply)
  revert ID                   revert (ResyncLuns onto the snapshot's own volume)
  resync ID                   the same as revert: diskshadow's LUN resync (`begin restore`,
                              `add shadow ID [DEST]`, `resync`) in one verb; only the
                              snapshot's original volume can be the destination
  break [writable] ID|SETID   split every snapshot of the set (or the one snapshot) into a
                              new volume named <volume>-break-<n> (first free n >= 1);
                              a differential snapshot is promoted (copied) first. Without
                              `writable` the volumes are read-write too (with a note): no
                              read-only volume flag can be set over the control API yet
  load metadata FILE          read a Backup Components Document (`shadowplex export`)
  import                      import it on this host (the session's --host): its snapshots
                              are presented to this host only; defines %VSS_SHADOW_SET%
                              and %VSS_SHADOW_n% as `create` does
  exit                        stop here, successfully

ID is %ALIAS%, %VSS_SHADOW_n%, %VSS_SHADOW_SET% (where a set id is wanted) or a GUID.
%NAME% inside other arguments (paths, names) is replaced too; an alias used before the
`create` that defines it, or never defined, is a parse error.

Contexts (diskshadow's `set context` names on the right; VSS values in provider/vss.py):

  backup             = volatile            VSS_CTX_BACKUP 0x0: writers, auto-release
  file-share-backup  = volatile nowriters  VSS_CTX_FILE_SHARE_BACKUP 0x10: auto-release
  app-rollback       = persistent          VSS_CTX_APP_ROLLBACK 0x9: writers, persistent
  nas-rollback       = persistent nowriters VSS_CTX_NAS_ROLLBACK 0x19: persistent
  clientaccessible: refused (only the Windows system provider makes those)

diskshadow's `persistent` is PERSISTENT|NO_AUTO_RELEASE with writers, i.e. app-rollback;
adding `nowriters` sets NO_WRITERS, i.e. nas-rollback. VSS_CTX_* names and values work too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import interrupts, procgroup
from .output import (
    SNAPSHOT_COLUMNS,
    Progress,
    one_line,
    package_version,
    print_table,
    snapshot_view,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "shadowplex"
CLIENT_NAME = "shadowplex-script"
RELEASE_WAIT = 30.0      # seconds to wait for the daemon to delete auto-release sets
# longest line accepted (characters); Linux refuses longer single arguments anyway
# (MAX_ARG_STRLEN 128 KiB), and shlex takes quadratic time on megabyte-long words
MAX_LINE_CHARS = 65536

_GUID_RE = re.compile(r"\{?([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})\}?")
_ALIAS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF_RE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
_VOLUME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_SHADOW_N_RE = re.compile(r"vss_shadow_(\d+)")
SET_ALIAS = "VSS_SHADOW_SET"
AUTO_RELEASE = ("backup", "file-share-backup")

# diskshadow's spelling -> ours (see the module docstring)
_DISKSHADOW_CONTEXTS = {
    ("volatile",): "backup",
    ("volatile", "nowriters"): "file-share-backup",
    ("persistent",): "app-rollback",
    ("persistent", "nowriters"): "nas-rollback",
}
_CLI_CONTEXTS = ("backup", "file-share-backup", "nas-rollback", "app-rollback")
_VSS_NAMES = {"backup": "VSS_CTX_BACKUP 0x0",
              "file-share-backup": "VSS_CTX_FILE_SHARE_BACKUP 0x10",
              "nas-rollback": "VSS_CTX_NAS_ROLLBACK 0x19",
              "app-rollback": "VSS_CTX_APP_ROLLBACK 0x9"}

VERBS = ("set context", "set option", "set metadata", "set verbose", "begin backup",
         "add volume", "create", "expose", "exec", "unexpose", "end backup",
         "delete shadows", "load metadata", "import", "list shadows", "list writers",
         "list providers", "revert", "resync", "break", "exit")

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


class ScriptFailure(Exception):
    """A failure while running a line (exit 1)."""


@dataclass
class Stmt:
    line: int
    verb: str                       # canonical, e.g. "delete shadows"
    text: str                       # the line as written, stripped
    args: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ parsing
def _is_ref(tok: str) -> bool:
    return bool(re.fullmatch(r"%[A-Za-z_][A-Za-z0-9_]*%", tok) or _GUID_RE.fullmatch(tok))


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
        if key[0] in _CLI_CONTEXTS:
            return key[0]
        from provider.vss import VssError
        from provider.vss import parse_context as vss_parse_context
        try:
            return vss_parse_context(words[0]).cli_name
        except VssError as e:
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


def _parse_line(n: int, raw: str) -> Stmt | None:
    s = raw.strip()
    if not s or s.startswith("#"):
        return None
    head, _, rest = s.partition(" ")
    if head.lower() == "exec" or s.lower().startswith("exec\t"):
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
    w = [t.lower() for t in toks]
    argc = len(toks)

    def st(verb: str, **args: Any) -> Stmt:
        return Stmt(n, verb, s, args)

    def exact(count: int, usage: str) -> None:
        if argc != count:
            raise ScriptError(n, f"usage: {usage}")

    two = " ".join(w[:2])
    if two in _NOT_BUILT or w[0] in _NOT_BUILT:
        verb = two if two in _NOT_BUILT else w[0]
        raise ScriptError(n, f"{verb}: {_NOT_BUILT[verb]}")
    if w[0] == "set":
        sub = w[1] if argc > 1 else ""
        if sub == "context":
            return st("set context", context=parse_context(n, toks[2:]))
        if sub == "option":
            return st("set option", options=parse_options(n, toks[2:]))
        if sub == "metadata":
            exact(3, "set metadata FILE")
            return st("set metadata", path=toks[2])
        if sub == "verbose":
            if argc != 3 or w[2] not in ("on", "off"):
                raise ScriptError(n, "usage: set verbose on|off")
            return st("set verbose", on=w[2] == "on")
        raise ScriptError(n, "set what? set context | option | metadata | verbose")
    if w[0] in ("begin", "end"):
        if argc != 2 or w[1] != "backup":
            raise ScriptError(n, f"usage: {w[0]} backup")
        return st(f"{w[0]} backup")
    if w[0] == "add":
        if argc < 2 or w[1] != "volume":
            raise ScriptError(n, "usage: add volume NAME [alias ALIAS]")
        if argc not in (3, 5) or (argc == 5 and w[3] != "alias"):
            raise ScriptError(n, "usage: add volume NAME [alias ALIAS]")
        vol = toks[2]
        if not (_VOLUME_RE.fullmatch(vol) or vol.startswith("/") or _REF_RE.search(vol)):
            raise ScriptError(n, f"add volume: {vol!r} is not a volume name "
                              "([A-Za-z0-9._-], 1-64 characters, not starting with '.') "
                              "or an absolute path")
        alias = toks[4] if argc == 5 else None
        if alias is not None:
            if not _ALIAS_RE.fullmatch(alias):
                raise ScriptError(n, f"add volume: alias {alias!r} must be a name "
                                  "([A-Za-z_][A-Za-z0-9_]*), written without %")
            if alias.upper() == SET_ALIAS or _SHADOW_N_RE.fullmatch(alias.lower()):
                raise ScriptError(n, f"add volume: alias {alias} is reserved (create sets it)")
        return st("add volume", volume=vol, alias=alias)
    if w[0] == "create":
        exact(1, "create")
        return st("create")
    if w[0] == "expose":
        exact(3, "expose ID PATH|NAME  (PATH: a directory to mount on; NAME: "
              "MOUNT/exposed/NAME.img)")
        target = toks[2]
        if "/" not in target and not _VOLUME_RE.fullmatch(target) \
                and not _REF_RE.search(target):
            raise ScriptError(n, f"expose: {target!r} is neither a directory path (with a "
                              "'/', e.g. ./snap or /mnt/snap) nor an exposed name "
                              "([A-Za-z0-9._-])")
        return st("expose", id=_need_ref(n, toks[1], "expose"), target=target)
    if w[0] == "unexpose":
        exact(2, "unexpose ID|PATH|NAME")
        return st("unexpose", target=toks[1])
    if w[0] == "delete":
        if argc < 2 or w[1] != "shadows":
            raise ScriptError(n, "usage: delete shadows all | volume VOL | oldest VOL | "
                              "set SETID | id ID | exposed ID|PATH|NAME")
        form = w[2] if argc > 2 else ""
        if form == "all":
            exact(3, "delete shadows all")
            return st("delete shadows", form="all", arg=None)
        if form in ("volume", "oldest", "set", "id", "exposed"):
            exact(4, f"delete shadows {form} " + {"volume": "VOL", "oldest": "VOL",
                                                  "set": "SETID", "id": "ID",
                                                  "exposed": "ID|PATH|NAME"}[form])
            arg = toks[3]
            if form in ("set", "id"):
                _need_ref(n, arg, f"delete shadows {form}")
            return st("delete shadows", form=form, arg=arg)
        raise ScriptError(n, "usage: delete shadows all | volume VOL | oldest VOL | "
                          "set SETID | id ID | exposed ID|PATH|NAME")
    if w[0] == "load":
        if argc != 3 or w[1] != "metadata":
            raise ScriptError(n, "usage: load metadata FILE")
        return st("load metadata", path=toks[2])
    if w[0] == "import":
        exact(1, "import")
        return st("import")
    if w[0] == "list":
        what = w[1] if argc > 1 else ""
        if what == "shadows":
            if argc == 2 or (argc == 3 and w[2] == "all"):
                return st("list shadows", form="all", arg=None)
            if argc == 4 and w[2] in ("set", "id"):
                return st("list shadows", form=w[2],
                          arg=_need_ref(n, toks[3], f"list shadows {w[2]}"))
            raise ScriptError(n, "usage: list shadows [all | set SETID | id ID]")
        if what == "writers":
            if argc > 3 or (argc == 3 and w[2] not in ("status", "metadata", "detailed")):
                raise ScriptError(n, "usage: list writers [status|metadata|detailed]")
            return st("list writers")
        if what == "providers":
            exact(2, "list providers")
            return st("list providers")
        raise ScriptError(n, "usage: list shadows [...] | writers | providers")
    if w[0] in ("revert", "resync"):
        exact(2, f"{w[0]} ID")
        return st(w[0], id=_need_ref(n, toks[1], w[0]))
    if w[0] == "break":
        writable = argc > 1 and w[1] == "writable"
        if argc != (3 if writable else 2):
            raise ScriptError(n, "usage: break [writable] ID|SETID")
        return st("break", writable=writable, id=_need_ref(n, toks[-1], "break"))
    if w[0] == "exit":
        exact(1, "exit")
        return st("exit")
    raise ScriptError(n, f"unknown verb {toks[0]!r}; known: {', '.join(VERBS)}")


@dataclass
class _Alias:
    kind: str            # "snapshot" | "set"
    usable_from: int     # line of the create that defined it (usable after it)


class _Checker:
    """Simulates the script's state line by line: verb order and aliases."""

    def __init__(self, stmts: list[Stmt]) -> None:
        self.stmts = stmts
        self.declared: dict[str, int] = {}       # alias (lower) -> line of its add volume
        self.usable: dict[str, _Alias] = {}
        self.pending: list[Stmt] = []            # add volume lines of the set being composed
        self.begun: int | None = None
        self.created_in_backup = False
        self.loaded: int | None = None           # line of 'load metadata', until import

    def run(self) -> None:
        for s in self.stmts:
            if s.verb == "add volume" and s.args["alias"]:
                key = s.args["alias"].lower()
                if key in self.declared:
                    raise ScriptError(s.line, f"alias {s.args['alias']} is already defined "
                                      f"on line {self.declared[key]}")
                self.declared[key] = s.line
        for s in self.stmts:
            getattr(self, "_" + s.verb.replace(" ", "_"), self._default)(s)
            if s.verb == "exit":
                break
        if self.pending:
            raise ScriptError(self.pending[0].line, "volumes are added here but never "
                              "created: add 'create' after the 'add volume' lines")

    # -- references
    def _ref(self, s: Stmt, tok: str, want: str | None = None) -> None:
        """Every %NAME% in tok must be usable here; `want` checks an ID's kind."""
        for m in _REF_RE.finditer(tok):
            name = m.group(1)
            key = name.lower()
            a = self.usable.get(key)
            if a is None:
                if key in self.declared:
                    where = self.declared[key]
                    if where > s.line:
                        raise ScriptError(s.line, f"alias %{name}% is used before it is "
                                          f"defined (line {where})")
                    raise ScriptError(s.line, f"alias %{name}% (line {where}) is usable "
                                      "only after its 'create'")
                if key == SET_ALIAS.lower():
                    raise ScriptError(s.line, f"%{name}% is defined by 'create'; no set "
                                      "was created before this line")
                if _SHADOW_N_RE.fullmatch(key):
                    raise ScriptError(s.line, f"%{name}% is not defined here: the last "
                                      "'create' made fewer snapshots (or none yet)")
                raise ScriptError(s.line, f"alias %{name}% is not defined (define it with "
                                  f"'add volume NAME alias {name}')")
            if want is not None and tok == m.group(0) and a.kind != want:
                raise ScriptError(s.line, f"%{name}% is a {a.kind} id; a {want} id is "
                                  "expected here")

    def _exec_refs(self, s: Stmt) -> None:
        for m in _REF_RE.finditer(s.args["cmd"]):
            key = m.group(1).lower()
            if key in self.usable:
                continue
            if key in self.declared or key == SET_ALIAS.lower() or _SHADOW_N_RE.fullmatch(key):
                self._ref(s, m.group(0))   # raises with the reason
            # other %...% (e.g. date +%Y%m%d) are left to the shell

    def _not_composing(self, s: Stmt, what: str) -> None:
        if self.pending:
            raise ScriptError(s.line, f"{what} cannot change while a set is being composed "
                              f"(add volume on line {self.pending[0].line}); put it before "
                              "the 'add volume' lines or after 'create'")

    # -- verbs
    def _default(self, s: Stmt) -> None:
        pass

    def _set_context(self, s: Stmt) -> None:
        self._not_composing(s, "the context")

    def _set_option(self, s: Stmt) -> None:
        self._not_composing(s, "the options")

    def _set_metadata(self, s: Stmt) -> None:
        self._ref(s, s.args["path"])

    def _begin_backup(self, s: Stmt) -> None:
        if self.begun is not None:
            raise ScriptError(s.line, f"a backup was already begun on line {self.begun}; "
                              "'end backup' first")
        self.begun = s.line
        self.created_in_backup = False

    def _end_backup(self, s: Stmt) -> None:
        if self.begun is None:
            raise ScriptError(s.line, "'end backup' without 'begin backup'")
        if not self.created_in_backup:
            raise ScriptError(s.line, f"'end backup': no set was created since 'begin "
                              f"backup' (line {self.begun}); add 'create' before it")
        self.begun = None

    def _add_volume(self, s: Stmt) -> None:
        self._ref(s, s.args["volume"])
        for p in self.pending:
            if p.args["volume"] == s.args["volume"]:
                raise ScriptError(s.line, f"volume {s.args['volume']} is already in this "
                                  f"set (line {p.line})")
        self.pending.append(s)

    def _create(self, s: Stmt) -> None:
        if not self.pending:
            raise ScriptError(s.line, "'create' has nothing to create: add volumes with "
                              "'add volume NAME [alias A]' first")
        for k in [k for k in self.usable if _SHADOW_N_RE.fullmatch(k)]:
            del self.usable[k]
        for i, p in enumerate(self.pending, 1):
            if p.args["alias"]:
                self.usable[p.args["alias"].lower()] = _Alias("snapshot", s.line)
            self.usable[f"vss_shadow_{i}"] = _Alias("snapshot", s.line)
        self.usable[SET_ALIAS.lower()] = _Alias("set", s.line)
        self.pending = []
        if self.begun is not None:
            self.created_in_backup = True

    def _expose(self, s: Stmt) -> None:
        self._ref(s, s.args["id"], "snapshot")
        self._ref(s, s.args["target"])

    def _exec(self, s: Stmt) -> None:
        self._exec_refs(s)

    def _unexpose(self, s: Stmt) -> None:
        self._ref(s, s.args["target"], "snapshot")

    def _delete_shadows(self, s: Stmt) -> None:
        if s.args["arg"] is not None:
            want = {"set": "set", "id": "snapshot", "exposed": "snapshot"}.get(s.args["form"])
            self._ref(s, s.args["arg"], want)

    def _list_shadows(self, s: Stmt) -> None:
        if s.args["arg"] is not None:
            self._ref(s, s.args["arg"], "set" if s.args["form"] == "set" else "snapshot")

    # Transportable import: `load metadata FILE` (a Backup Components Document written by
    # `shadowplex export`) before `import`, which defines %VSS_SHADOW_SET% and
    # %VSS_SHADOW_n% like `create` does.
    def _load_metadata(self, s: Stmt) -> None:
        self._ref(s, s.args["path"])
        self.loaded = s.line

    def _import(self, s: Stmt) -> None:
        if self.loaded is None:
            raise ScriptError(s.line, "import: no Backup Components Document loaded; put "
                              "'load metadata FILE' before it")
        if self.pending:
            raise ScriptError(s.line, "import cannot run while a set is being composed "
                              f"(add volume on line {self.pending[0].line})")
        self.loaded = None
        for k in [k for k in self.usable if _SHADOW_N_RE.fullmatch(k)]:
            del self.usable[k]
        for i in range(1, 65):
            self.usable[f"vss_shadow_{i}"] = _Alias("snapshot", s.line)
        self.usable[SET_ALIAS.lower()] = _Alias("set", s.line)

    def _revert(self, s: Stmt) -> None:
        self._ref(s, s.args["id"], "snapshot")

    _resync = _revert

    def _break(self, s: Stmt) -> None:
        self._ref(s, s.args["id"])


def parse_script(text: str) -> list[Stmt]:
    """Parse and check a whole script; ScriptError names the first wrong line."""
    stmts = []
    for n, raw in enumerate(text.splitlines(), 1):
        if "\0" in raw:
            raise ScriptError(n, "the line contains a NUL byte (is this a text file?)")
        if len(raw) > MAX_LINE_CHARS:
            raise ScriptError(n, f"the line is {len(raw)} characters long, more than "
                              f"{MAX_LINE_CHARS} (is this a script?)")
        st = _parse_line(n, raw)
        if st is not None:
            stmts.append(st)
    _Checker(stmts).run()
    return stmts


# ------------------------------------------------------------------------------ running
@dataclass
class _Exposure:
    where: str
    auto: bool           # of an auto-release snapshot
    line: int


class _Runner:
    def __init__(self, stmts: list[Stmt], filename: str, client: Any, quiet: bool,
                 socket: str | None) -> None:
        self.stmts = stmts
        self.filename = filename
        self.c = client
        self.quiet = quiet
        self.socket = socket
        self.verbose = False
        self.context = "backup"
        self.options: list[str] = []
        self.metadata: str | None = None
        self.values: dict[str, str] = {}          # alias (lower) -> id
        self.env: dict[str, str] = {}             # alias as written -> id
        self.set_id: str | None = None            # set being composed (started, not done)
        self.set_line = 0
        self.pending: list[tuple[str, str | None, str]] = []   # (volume, alias, snap id)
        self.backup_sets: list[str] | None = None              # None: no backup begun
        self.created: list[dict[str, Any]] = []                # sets created (metadata)
        self.auto_sets: list[str] = []
        self.exposed: dict[str, _Exposure] = {}
        self.in_call = False
        self.interrupted = False
        self.break_note = False
        self.bcd = ""                              # the document `load metadata` read

    # -- output
    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def detail(self, msg: str) -> None:
        if self.verbose and not self.quiet:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        self.in_call = True
        try:
            return fn(*args, **kw)
        finally:
            self.in_call = False

    def progress(self) -> Any:
        return Progress(not self.quiet)

    # -- values
    def expand(self, tok: str) -> str:
        def sub(m: re.Match[str]) -> str:
            v = self.values.get(m.group(1).lower())
            if v is None:
                raise ScriptFailure(f"%{m.group(1)}% has no value")
            return v
        return _REF_RE.sub(sub, tok)

    def ident(self, tok: str) -> str:
        v = self.expand(tok)
        m = _GUID_RE.fullmatch(v)
        if m is None:
            raise ScriptFailure(f"{v!r} is not an id (a GUID)")
        return m.group(1).lower()

    def _find_exposed(self, tok: str) -> dict[str, Any]:
        """The snapshot behind ID, a mount directory or an exposed name."""
        target = self.expand(tok)
        m = _GUID_RE.fullmatch(target)
        if m:
            return dict(self.call(self.c.snapshot_show, snapshot_id=m.group(1)))
        snaps = self.call(self.c.snapshot_list)
        if "/" in target:
            want = {os.path.abspath(target), os.path.realpath(target)}
            for s in snaps:
                at = s.get("mounted_at") or s.get("exposed_path")
                if at and (at in want or os.path.realpath(at) in want):
                    return dict(s)
            raise ScriptFailure(f"no snapshot is exposed at {target}")
        for s in snaps:
            if s.get("exposed_name") == target:
                return dict(s)
        raise ScriptFailure(f"no snapshot is exposed as {target!r}")

    def _forget(self, ids: list[str]) -> None:
        for i in ids:
            self.exposed.pop(i, None)

    # -- the run
    def run(self) -> int:
        where = "start"
        try:
            for st in self.stmts:
                where = f"{st.line}: {st.verb}"
                if st.verb == "exit":
                    self.say("exit")
                    break
                getattr(self, "do_" + st.verb.replace(" ", "_"))(st)
            where = "end of script: unexpose"
            self.finish()
        except KeyboardInterrupt as e:
            # Ctrl-C, SIGTERM, SIGHUP alike (run_script: interrupts.stop_signals). Before,
            # SIGTERM/SIGHUP killed the script outright: the exec'd command went on and
            # the daemon deleted a snapshot it still had mounted
            self.interrupted = True
            stop = e if isinstance(e, interrupts.Interrupted) else interrupts.Interrupted()
            self.warn(f"{self.filename}:{where}: {stop.what}")
            self.cleanup(interrupted=True)
            return stop.exit_code
        except Exception as e:
            from provider.client import ControlError
            if not isinstance(e, ControlError | ScriptFailure | OSError):
                # a bug: still undo what the script made, then let the CLI report it
                # (one line, or the traceback with --debug)
                self.warn(f"{self.filename}:{where}: unexpected {type(e).__name__}")
                self.cleanup()
                raise
            if isinstance(e, OSError):
                reason = (f"{e.strerror or e}: {e.filename}" if e.filename
                          else str(e.strerror or e))
            else:
                reason = str(e)
            print(one_line(f"{self.filename}:{where}: {reason}"), file=sys.stderr, flush=True)
            self.cleanup()
            return EXIT_FAILED
        return EXIT_OK

    def live_auto_sets(self) -> list[str]:
        """Auto-release sets of this session that still have snapshots."""
        out = []
        for s in self.auto_sets:
            try:
                if self.c.snapshot_list(set_id=s):
                    out.append(s)
            except Exception:
                return list(self.auto_sets)   # cannot ask: wait for all of them
        return out

    def cleanup(self, interrupted: bool = False) -> None:
        """After a failure: abort the set in progress, undo exposures of auto-release
        snapshots; closing the session (by the caller) deletes the auto-release sets."""
        if interrupted and self.in_call:
            return   # the connection is mid-request: closing it makes the daemon clean up
        if self.set_id is not None:
            sid, self.set_id = self.set_id, None
            try:
                self.c.set_abort(sid)
                self.note(f"cleanup: aborted snapshot set {sid} (started on line "
                          f"{self.set_line})")
            except Exception as e:
                if getattr(e, "name", "") not in ("VSS_E_OBJECT_NOT_FOUND", "VSS_E_BAD_STATE"):
                    self.warn(f"cleanup: aborting snapshot set {sid}: {e}")
        for snap, x in list(self.exposed.items()):
            if not x.auto:
                self.note(f"left in place: persistent snapshot {snap} exposed at {x.where} "
                          f"(line {x.line})")
                continue
            try:
                self.c.unexpose(snap)
                self.note(f"cleanup: unexposed snapshot {snap} ({x.where})")
                del self.exposed[snap]
            except Exception as e:
                self.warn(f"cleanup: unexposing snapshot {snap} at {x.where}: {e}")

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def finish(self) -> None:
        """Normal end: exposures of auto-release snapshots are undone now (their sets end
        with the session)."""
        for snap, x in list(self.exposed.items()):
            if x.auto:
                self.call(self.c.unexpose, snap)
                del self.exposed[snap]
                self.say(f"unexpose {snap}: {x.where} (auto-release: the set ends with "
                         "the script)")

    # -- verbs
    def do_set_context(self, st: Stmt) -> None:
        self.context = st.args["context"]
        life = ("auto-release: its snapshots live until the script ends"
                if self.context in AUTO_RELEASE else "persistent")
        self.say(f"set context {self.context} ({_VSS_NAMES[self.context]}, {life})")

    def do_set_option(self, st: Stmt) -> None:
        self.options = list(st.args["options"])
        self.say(f"set option {' '.join(o.lower() for o in self.options)}")

    def do_set_metadata(self, st: Stmt) -> None:
        path = os.path.abspath(self.expand(st.args["path"]))
        d = os.path.dirname(path)
        if not os.path.isdir(d):
            raise ScriptFailure(f"directory {d} does not exist")
        if os.path.isdir(path) or not os.access(d, os.W_OK):
            raise ScriptFailure(f"cannot write {path}")
        self.metadata = path
        self.say(f"set metadata {self.metadata} (written after each create)")

    def do_set_verbose(self, st: Stmt) -> None:
        self.verbose = st.args["on"]
        self.say(f"set verbose {'on' if self.verbose else 'off'}")
        self.detail(f"provider {self.c.server.get('provider_id')} on "
                    f"{self.c.server.get('service_machine')}, pool {self.c.server.get('pool')}, "
                    f"mount {self.c.server.get('mount')}, session {self.c.server.get('session')}")

    def do_begin_backup(self, st: Stmt) -> None:
        self.backup_sets = []
        self.say("begin backup")

    def do_add_volume(self, st: Stmt) -> None:
        vol = self.expand(st.args["volume"])
        if self.set_id is None:
            self.set_id = self.call(self.c.set_start, self.context, self.options or None)
            self.set_line = st.line
            self.pending = []
            self.detail(f"snapshot set {self.set_id} started ({self.context}"
                        f"{''.join(' ' + o.lower() for o in self.options)})")
        snap = self.call(self.c.set_add, vol, self.set_id)
        self.pending.append((vol, st.args["alias"], snap))
        self.say(f"add volume {vol}" + (f" alias {st.args['alias']}" if st.args["alias"]
                                          else "") + f": snapshot {snap}")

    def do_load_metadata(self, st: Stmt) -> None:
        path = os.path.abspath(self.expand(st.args["path"]))
        try:
            with open(path, "rb") as f:
                data = f.read(16 * 1024 * 1024 + 1)
        except OSError as e:
            # a run-time failure (the file is read when the line runs): ScriptFailure, so
            # that run() reports it with its line and cleans up like any other failure
            raise ScriptFailure(f"cannot read {path}: {e.strerror or e}") from None
        try:
            self.bcd = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScriptFailure(f"{path} is not UTF-8 XML (a Backup Components Document "
                                "from 'shadowplex export')") from None
        self.say(f"load metadata {path}")

    def do_import(self, st: Stmt) -> None:
        res = self.call(self.c.import_set, self.bcd)
        set_id = res.get("set_id", "")
        snaps = res.get("snapshots", [])
        for k in [k for k in self.values if _SHADOW_N_RE.fullmatch(k)]:
            del self.values[k]
            self.env.pop(k.upper(), None)
        for i, snap in enumerate(snaps, 1):
            self.values[f"vss_shadow_{i}"] = snap["snapshot_id"]
            self.env[f"VSS_SHADOW_{i}"] = snap["snapshot_id"]
        self.values[SET_ALIAS.lower()] = set_id
        self.env[SET_ALIAS] = set_id
        if snaps and snaps[0].get("context") in AUTO_RELEASE:
            self.auto_sets.append(set_id)
        self.say(f"import: snapshot set {set_id} (from {res.get('origin')}) imported on "
                 f"{res.get('host')}: " + ", ".join(
                     f"{x.get('volume')}={x['snapshot_id']} {x.get('device_object')}"
                     for x in snaps))

    def do_create(self, st: Stmt) -> None:
        set_id = self.set_id
        prog = self.progress()
        try:
            res = self.call(self.c.set_do, set_id, progress=prog)
        finally:
            prog.close()
        self.set_id = None            # done, or aborted by the daemon on failure
        snaps = res.get("snapshots", [])
        set_id = res.get("set_id", set_id)
        for k in [k for k in self.values if _SHADOW_N_RE.fullmatch(k)]:
            del self.values[k]
            self.env.pop(k.upper(), None)
        aliases = {}
        for i, (_vol, alias, snap) in enumerate(self.pending, 1):
            self.values[f"vss_shadow_{i}"] = snap
            self.env[f"VSS_SHADOW_{i}"] = snap
            if alias:
                self.values[alias.lower()] = snap
                self.env[alias] = snap
                aliases[alias] = snap
        self.values[SET_ALIAS.lower()] = set_id
        self.env[SET_ALIAS] = set_id
        if self.context in AUTO_RELEASE:
            self.auto_sets.append(set_id)
        if self.backup_sets is not None:
            self.backup_sets.append(set_id)
        by_id = {s.get("snapshot_id"): s for s in snaps}
        parts = []
        for vol, alias, snap in self.pending:
            kind = by_id.get(snap, {}).get("kind")
            parts.append(f"{vol}={snap}" + (f" %{alias}%" if alias else "")
                         + (f" [{kind}]" if kind else ""))
        self.say(f"create: snapshot set {set_id} created ({self.context}): " + ", ".join(parts))
        if self.verbose and not self.quiet and snaps:
            print_table([snapshot_view(s) for s in snaps], SNAPSHOT_COLUMNS)
        self.created.append({"set_id": set_id, "context": self.context,
                             "options": [o.lower() for o in self.options],
                             "created": time.time(), "line": st.line, "aliases": aliases,
                             "snapshots": snaps})
        self.pending = []
        if self.metadata:
            self._write_metadata()

    def _write_metadata(self) -> None:
        assert self.metadata is not None
        doc = {"format": "shadowplex-script-metadata", "version": 1,
               "note": "written by 'set metadata' in a shadowplex script; not a Backup "
                       "Components Document", "script": os.path.abspath(self.filename),
               "provider_id": self.c.server.get("provider_id"),
               "service_machine": self.c.server.get("service_machine"),
               "sets": self.created}
        d = os.path.dirname(self.metadata) or "."
        fd, tmp = tempfile.mkstemp(prefix=".metadata-", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, default=str)
                f.write("\n")
            os.replace(tmp, self.metadata)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.detail(f"metadata written to {self.metadata}")

    def do_expose(self, st: Stmt) -> None:
        snap = self.ident(st.args["id"])
        target = self.expand(st.args["target"])
        if "/" in target:
            res = self.call(self.c.expose, snap, mount=os.path.abspath(target))
            where = res.get("mounted_at") or os.path.abspath(target)
            how = f"mounted read-only at {where}" + (f" ({res['loop_device']})"
                                                     if res.get("loop_device") else "")
        else:
            res = self.call(self.c.expose, snap, name=target)
            where = res.get("exposed_path") or target
            how = f"exposed as {where}"
        self.exposed[snap] = _Exposure(where, res.get("context") in AUTO_RELEASE, st.line)
        self.say(f"expose {snap}: {how}")

    def do_exec(self, st: Stmt) -> None:
        def sub(m: re.Match[str]) -> str:
            return self.values.get(m.group(1).lower(), m.group(0))
        cmd = _REF_RE.sub(sub, st.args["cmd"])
        env = dict(os.environ)
        env.update(self.env)
        if self.socket:
            env["SHADOWPLEX_SOCKET"] = self.socket
        self.say(f"exec {cmd if self.verbose else st.args['cmd']}")
        sys.stdout.flush()
        sys.stderr.flush()
        # its own process group, ended as a whole by an interrupt (tools/procgroup.py)
        rc = procgroup.run(["/bin/sh", "-c", cmd], env)
        if rc < 0:
            raise ScriptFailure(f"the command was killed by signal {-rc}")
        if rc != 0:
            raise ScriptFailure(f"the command exited with status {rc}")

    def do_unexpose(self, st: Stmt) -> None:
        snap = self._find_exposed(st.args["target"])
        sid = snap["snapshot_id"]
        self.call(self.c.unexpose, sid)
        self._forget([sid])
        self.say(f"unexpose {sid}")

    def do_end_backup(self, st: Stmt) -> None:
        for set_id in self.backup_sets or []:
            res = self.call(self.c.end_backup, set_id)
            notified = res.get("writers_notified") or []
            self.say(f"end backup: BackupComplete for set {set_id}; writers notified: "
                     f"{', '.join(notified) or 'none'}")
        self.backup_sets = None

    def do_delete_shadows(self, st: Stmt) -> None:
        form, arg = st.args["form"], st.args["arg"]
        deleted: list[str] = []
        if form == "all":
            deleted = self.call(self.c.snapshot_delete, all=True, unexpose=True)["deleted"]
        elif form == "volume":
            vol = self.expand(arg)
            for s in self.call(self.c.snapshot_list, volume=vol):
                if s.get("pool_state") == "preparing":
                    continue
                deleted += self.call(self.c.snapshot_delete, snapshot_id=s["snapshot_id"],
                                     unexpose=True)["deleted"]
        elif form == "oldest":
            deleted = self.call(self.c.snapshot_delete, oldest=self.expand(arg),
                                unexpose=True)["deleted"]
        elif form == "set":
            deleted = self.call(self.c.snapshot_delete, set_id=self.ident(arg),
                                unexpose=True)["deleted"]
        elif form == "id":
            deleted = self.call(self.c.snapshot_delete, snapshot_id=self.ident(arg),
                                unexpose=True)["deleted"]
        elif form == "exposed":
            snap = self._find_exposed(arg)
            if not (snap.get("exposed_name") or snap.get("mounted_at")):
                raise ScriptFailure(f"snapshot {snap['snapshot_id']} is not exposed")
            deleted = self.call(self.c.snapshot_delete, snapshot_id=snap["snapshot_id"],
                                unexpose=True)["deleted"]
        self._forget(deleted)
        what = f"{form} {self.expand(arg)}" if arg else form
        self.say(f"delete shadows {what}: {len(deleted)} snapshot(s) deleted"
                 + (f": {', '.join(deleted)}" if deleted and self.verbose else ""))

    def do_list_shadows(self, st: Stmt) -> None:
        form, arg = st.args["form"], st.args["arg"]
        if form == "set":
            rows = self.call(self.c.snapshot_list, set_id=self.ident(arg))
        elif form == "id":
            rows = [self.call(self.c.snapshot_show, snapshot_id=self.ident(arg))]
        else:
            rows = self.call(self.c.snapshot_list)
        if rows:
            print_table([snapshot_view(r) for r in rows], SNAPSHOT_COLUMNS)
        else:
            print("no snapshots")
        sys.stdout.flush()

    def do_list_writers(self, st: Stmt) -> None:
        rows = self.call(self.c.writers_list)
        if rows:
            print_table(rows, [("name", "WRITER"), ("writer_id", "ID"), ("state", "STATE"),
                               ("last_error", "ERROR")])
        else:
            print("no writers")
        sys.stdout.flush()

    def do_list_providers(self, st: Stmt) -> None:
        s = self.c.server
        print_table([{"provider_id": s.get("provider_id"), "name": s.get("server", PROG),
                      "type": "hardware", "version": package_version(),
                      "machine": s.get("service_machine"), "pool": s.get("pool")}],
                    [("provider_id", "PROVIDER ID"), ("name", "NAME"), ("type", "TYPE"),
                     ("version", "VERSION"), ("machine", "MACHINE"), ("pool", "POOL")])
        sys.stdout.flush()

    def do_revert(self, st: Stmt) -> None:
        snap = self.ident(st.args["id"])
        prog = self.progress()
        try:
            res = self.call(self.c.revert, snap, progress=prog)
        finally:
            prog.close()
        self.say(f"{st.verb} {snap}: volume {res.get('name')} reverted to the snapshot")

    do_resync = do_revert

    def do_break(self, st: Stmt) -> None:
        target = self.ident(st.args["id"])
        snaps = self.call(self.c.snapshot_list)
        chosen = [s for s in snaps if s.get("snapshot_id") == target] or \
                 [s for s in snaps if s.get("snapshot_set_id") == target]
        if not chosen:
            raise ScriptFailure(f"no snapshot or snapshot set {target}")
        names = {v["name"] for v in self.call(self.c.volume_list)}
        if not st.args["writable"] and not self.break_note:
            self.break_note = True
            self.warn(f"{self.filename}:{st.line}: note: 'break' without 'writable' makes "
                      "read-write volumes too: shadowplex cannot mark a volume read-only yet")
        for s in chosen:
            vol = s.get("volume") or "volume"
            n = 1
            while f"{vol}-break-{n}" in names:
                n += 1
            name = f"{vol}-break-{n}"
            prog = self.progress()
            try:
                self.call(self.c.split, s["snapshot_id"], name, progress=prog)
            finally:
                prog.close()
            names.add(name)
            self._forget([s["snapshot_id"]])
            self.say(f"break {s['snapshot_id']}: now volume {name} (read-write)")


def _wait_released(socket: str | None, host: str | None, sets: list[str]) -> bool:
    """The session has ended: wait until the daemon deleted its auto-release sets, so
    they are gone when the script returns. False if they are not (said on stderr)."""
    if not sets:
        return True
    from provider.client import Client, ControlError
    deadline = time.monotonic() + RELEASE_WAIT
    try:
        with Client(socket, host=host, client=CLIENT_NAME + "-release", timeout=10) as c:
            left = list(sets)
            while left:
                left = [s for s in left if c.snapshot_list(set_id=s)]
                if not left:
                    break
                if time.monotonic() > deadline:
                    print(f"{PROG}: auto-release snapshot set(s) {', '.join(left)} not yet "
                          f"deleted after {RELEASE_WAIT:g} s", file=sys.stderr)
                    return False
                time.sleep(0.05)
    except ControlError as e:
        print(f"{PROG}: checking the release of auto-release sets: {e}", file=sys.stderr)
        return False
    return True


def run_script(text: str, filename: str = "<script>", socket: str | None = None,
               quiet: bool = False, host: str | None = None) -> int:
    """Parse, then run the script over one requester session. Returns the exit code."""
    try:
        stmts = parse_script(text)
    except ScriptError as e:
        print(one_line(f"{filename}:{e.line}: {e.message}"), file=sys.stderr)
        return EXIT_USAGE
    from provider.client import Client, ControlError
    try:
        client = Client(socket, host=host, client=CLIENT_NAME)
    except ControlError as e:
        print(one_line(f"{PROG}: {e}"), file=sys.stderr)
        return EXIT_USAGE if e.name == "E_INVALIDARG" else EXIT_FAILED
    runner = _Runner(stmts, filename, client, quiet, socket or client.socket_path)
    live: list[str] = []
    with interrupts.stop_signals():   # later signals cannot cut the cleanup short
        try:
            rc = runner.run()
            if not (runner.interrupted and runner.in_call):
                live = runner.live_auto_sets()
        finally:
            client.close()
        try:
            if _wait_released(client.socket_path, host, live) and not quiet:
                for s in live:
                    msg = (f"released auto-release snapshot set {s} (the script's session "
                           "ended)")
                    if rc == EXIT_OK:
                        print(msg, flush=True)
                    else:
                        print(f"cleanup: {msg}", file=sys.stderr, flush=True)
        except KeyboardInterrupt as e:
            return getattr(e, "exit_code", EXIT_INTERRUPTED)
        return rc


def run_script_file(path: str, socket: str | None = None, quiet: bool = False,
                    host: str | None = None) -> int:
    """`shadowplex script FILE` (tools/cli.py). Returns the exit code."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:
        print(one_line(f"{PROG}: error: {path} is not UTF-8 text ({e.reason} at byte "
                       f"{e.start})"), file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(one_line(f"{PROG}: error: cannot read script {path}: {e.strerror or e}"),
              file=sys.stderr)
        return EXIT_USAGE
    return run_script(text, "<stdin>" if path == "-" else path, socket, quiet, host)
