"""`shadowplex script FILE`: diskshadow-style scripts.

The language -- every verb, the contexts, output, failures and cleanup, exit codes, and
examples -- is described in docs/scripts.md. The verbs' one-line list is grammar.py's
VERB_TABLE (`shadowplex script --help` and shadowplex-script(1) print it).

In short: the whole script is parsed and checked FIRST (a mistake: ``FILE:LINE: reason``,
exit 2, nothing done). Then it runs over ONE control connection, i.e. one requester
session, so snapshots in the auto-release contexts (backup, file-share-backup) live
until the script ends, as in diskshadow. A failure while running (``FILE:LINE: verb:
reason``, exit 1) or an interrupt (130; SIGTERM 143, SIGHUP 129) first cleans up what the
script made in an auto-release context: the set being composed is aborted, exposures of
auto-release snapshots are undone, the session's end deletes the auto-release sets (the
script waits until they are gone). Persistent snapshots and their exposures stay; they
are listed on stderr.

The package: grammar.py (a line -> a statement: one parser per verb), check.py (the
checks across lines: verb order, aliases) and run.py (one session, the cleanup).
"""

from .check import parse_script
from .grammar import (
    MAX_LINE_CHARS,
    VERB_TABLE,
    VERBS,
    ScriptError,
    Stmt,
    parse_context,
    parse_options,
    verb_lines,
)
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
    "VERB_TABLE", "ScriptError", "ScriptFailure", "Stmt", "parse_context", "parse_options",
    "parse_script", "run_script", "run_script_file", "verb_lines",
]
