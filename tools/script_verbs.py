"""The script language's verbs: each one's syntax and one line on what it does.

The one list of the language's verbs: the parser's "known:" error (tools/script/grammar.py),
`shadowplex script --help` (tools/parser.py), the man page shadowplex-script(1) and the
fuzz tests read it; docs/scripts.md explains each verb. Data only, outside the
tools/script package: every CLI command builds the whole parser, and importing the
package would load the script runner, the block store and the provider for a plain
`shadowplex status` (its start-up time).
"""

from __future__ import annotations

VERB_TABLE: dict[str, tuple[str, str]] = {
    "set context": ("set context CTX", "context of the next sets (default backup)"),
    "set option": ("set option [differential|plex] [transportable]",
                   "attributes of the next sets"),
    "set metadata": ("set metadata FILE", "a JSON description of the sets, after each create"),
    "set verbose": ("set verbose on|off", "more output (exec commands, tables)"),
    "begin backup": ("begin backup", "start a backup (completed by 'end backup')"),
    "add volume": ("add volume NAME [alias A]", "a volume of the set being composed"),
    "create": ("create [name NAME] [description TEXT]",
               "create the set: one instant for all its volumes"),
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
def verb_lines() -> list[str]:
    """One line per verb, its syntax then what it does (`shadowplex script --help`)."""
    width = max(len(syntax) for syntax, _ in VERB_TABLE.values() if len(syntax) <= 34)
    return [f"{syntax:<{width}}  {what}" for syntax, what in VERB_TABLE.values()]
