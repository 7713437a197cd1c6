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
  create [name NAME] [description TEXT]
                              set_do: the set is created; %A% = the snapshot id of each
                              alias, %VSS_SHADOW_SET% = the set id, %VSS_SHADOW_1%.. =
                              the snapshots in `add` order (usable from the next line);
                              NAME/TEXT: every new snapshot's name (unique per volume,
                              then VOL@NAME) and description, as `snapshot create --name`
  expose ID TARGET            expose: TARGET with a `/` is a directory -> loop device +
                              read-only mount there (`expose --mount`); a plain name ->
                              MOUNT/exposed/NAME.img (a new name: not starting with
                              '.' or '-', as blockstore.names.check_name wants)
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

ID is %ALIAS%, %VSS_SHADOW_n%, %VSS_SHADOW_SET% (where a set id is wanted), a GUID, a
unique prefix of one (4+ hex digits), VOL@NAME or VOL@latest (the daemon resolves those:
docs/provider.md "Naming snapshots"; `break` takes a set by its full id or alias only).
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

The package: grammar.py (a line -> a statement: one parser per verb), check.py (the
checks across lines: verb order, aliases) and run.py (one session, the cleanup).
"""

from .check import parse_script
from .grammar import MAX_LINE_CHARS, VERBS, ScriptError, Stmt, parse_context, parse_options
from .run import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ScriptFailure,
    run_script,
    run_script_file,
)

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "MAX_LINE_CHARS", "VERBS",
    "ScriptError", "ScriptFailure", "Stmt", "parse_context", "parse_options", "parse_script",
    "run_script", "run_script_file",
]
