"""The script's checks across lines, before anything runs: verb order (a set composed
then created, `begin`/`end backup`, `load metadata` before `import`) and aliases (each
defined once, used only after the `create` or `import` that gives it a value, of the
kind the verb wants). A simulation of the script's state, line by line; the first
mistake is a ScriptError naming its line. parse_script = grammar + these checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .grammar import MAX_LINE_CHARS, REF_RE, SET_ALIAS, SHADOW_N_RE, ScriptError, Stmt, parse_line


@dataclass
class _Alias:
    kind: str            # "snapshot" | "set"
    usable_from: int     # line of the create that defined it (usable after it)


class Checker:
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
        for m in REF_RE.finditer(tok):
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
                if SHADOW_N_RE.fullmatch(key):
                    raise ScriptError(s.line, f"%{name}% is not defined here: the last "
                                      "'create' made fewer snapshots (or none yet)")
                raise ScriptError(s.line, f"alias %{name}% is not defined (define it with "
                                  f"'add volume NAME alias {name}')")
            if want is not None and tok == m.group(0) and a.kind != want:
                raise ScriptError(s.line, f"%{name}% is a {a.kind} id; a {want} id is "
                                  "expected here")

    def _exec_refs(self, s: Stmt) -> None:
        for m in REF_RE.finditer(s.args["cmd"]):
            key = m.group(1).lower()
            if key in self.usable:
                continue
            if key in self.declared or key == SET_ALIAS.lower() or SHADOW_N_RE.fullmatch(key):
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
        for k in [k for k in self.usable if SHADOW_N_RE.fullmatch(k)]:
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
        for k in [k for k in self.usable if SHADOW_N_RE.fullmatch(k)]:
            del self.usable[k]
        for i in range(1, 65):
            self.usable[f"vss_shadow_{i}"] = _Alias("snapshot", s.line)
        self.usable[SET_ALIAS.lower()] = _Alias("set", s.line)

    def _backup(self, s: Stmt) -> None:
        self._ref(s, s.args["id"], "snapshot")
        self._ref(s, s.args["file"])
        if s.args["base"] is not None:
            self._ref(s, s.args["base"], "snapshot")

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
        st = parse_line(n, raw)
        if st is not None:
            stmts.append(st)
    Checker(stmts).run()
    return stmts


