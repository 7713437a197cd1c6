"""Running a checked script over ONE control connection (one requester session), and the
cleanup after a failure or an interrupt (the rules: docs/scripts.md, tools/script/__init__.py).

`_Runner` keeps the script's state (aliases' values, the set being composed, what it
exposed); `do_<verb>` runs one statement. run_script: parse (grammar + check), connect,
run, wait until the daemon has released the session's auto-release sets.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provider import vss

from .. import interrupts, procgroup
from ..connection import NotExposed, find_exposed
from ..listing import SNAPSHOTS, Format, print_rows
from ..output import (
    PROG,
    Progress,
    one_line,
    package_version,
    print_table,
    snapshot_view,
)
from .check import parse_script
from .grammar import AUTO_RELEASE, REF_RE, SET_ALIAS, SHADOW_N_RE, ScriptError, Stmt

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CLIENT_NAME = "shadowplex-script"
RELEASE_WAIT = 30.0      # seconds to wait for the daemon to delete auto-release sets


class ScriptFailure(Exception):
    """A failure while running a line (exit 1)."""


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
        return REF_RE.sub(sub, tok)

    def ident(self, tok: str) -> str:
        v = self.expand(tok)
        m = vss.GUID_RE.fullmatch(v)
        if m is None:
            raise ScriptFailure(f"{v!r} is not an id (a GUID)")
        return vss.guid(m.group(1))

    def _find_exposed(self, tok: str) -> dict[str, Any]:
        """The snapshot behind ID, a mount directory or an exposed name."""
        try:
            return find_exposed(self.c, self.expand(tok), self.call)
        except NotExposed as e:
            raise ScriptFailure(str(e)) from None

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
            except Exception:   # noqa: BLE001 - cannot ask: wait for all of them
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
            except Exception as e:   # noqa: BLE001 - the cleanup goes on; reported
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
            except Exception as e:   # noqa: BLE001 - the cleanup goes on; reported
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
        label = vss.context_label(vss.parse_context(self.context))
        self.say(f"set context {self.context} ({label}, {life})")

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
        for k in [k for k in self.values if SHADOW_N_RE.fullmatch(k)]:
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
        for k in [k for k in self.values if SHADOW_N_RE.fullmatch(k)]:
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
            print_rows([snapshot_view(s) for s in snaps], Format(SNAPSHOTS.default), "")
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
        cmd = REF_RE.sub(sub, st.args["cmd"])
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
        elif form == "volume":   # all or nothing, as the CLI's `snapshot delete --volume`
            deleted = self.call(self.c.snapshot_delete, volume=self.expand(arg),
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
        print_rows([snapshot_view(r) for r in rows], Format(SNAPSHOTS.default),
                   "no snapshots")
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

    def do_backup(self, st: Stmt) -> None:
        """`shadowplex backup` (tools/backup.py); its refusals are one-line failures."""
        from ..backup import Refused, backup_one
        snap, to = self.ident(st.args["id"]), self.expand(st.args["file"])
        base = None if st.args["base"] is None else self.ident(st.args["base"])
        try:
            s = backup_one(self.c, snap, to, base, st.args["format"], self.quiet)
        except Refused as e:
            raise ScriptFailure(str(e)) from None
        self.say(f"backup {snap}: {s['kind']} to {to}, {s['bytes_written']} bytes written")

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
