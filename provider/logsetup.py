"""The daemon's log: where it goes and how its lines look.

stderr, or a log file (appended, reopened when logrotate moves it away); level INFO unless
``level``/``debug`` says otherwise. When stderr is systemd's journal ($JOURNAL_STREAM
names it) each line carries its syslog priority (``<6>``...) and no timestamp or pid:
journald records both. The audit lines (provider/audit.py) go through the same log.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from .config import LOG_LEVELS


class LogSetupError(Exception):
    """The log cannot be set up as asked (a configuration error: one line, exit 78)."""


LOG_FORMAT = "%(asctime)s shadowplex[%(process)d] %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"   # journald adds time, unit, pid


def journal_stderr() -> bool:
    """stderr is systemd's journal: $JOURNAL_STREAM ("DEV:INODE", set by systemd for a
    service whose stderr it connects to journald) names the very file stderr is. Only
    then, not merely under systemd ($INVOCATION_ID): StandardError=append:FILE wants
    timestamps, and a child whose stderr was redirected inherits the variable."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """Each line prefixed with its syslog priority, ``<6>`` for INFO (journald's
    SyslogLevelPrefix, on by default): `journalctl -p warning` then filters by level."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING
                                 else 3)
        return "\n".join(f"<{prio}>{x}" for x in super().format(record).splitlines())


def configure_logging(debug: bool, level: str | None = None,
                       log_file: str | None = None) -> logging.Handler | None:
    """The daemon's log: stderr (journal-style if it is the journal), or ``log_file``
    instead; INFO unless ``level`` (LOG_LEVELS) or ``debug`` says otherwise. A process
    whose root logger has handlers already (a test running serve() in-process) keeps
    them; a log file is added to them. Returns the handler added for ``log_file`` (the
    caller removes it); LogSetupError if the level is unknown or the file cannot be opened."""
    if level is not None and level not in LOG_LEVELS:
        raise LogSetupError(f"log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    lvl = logging.DEBUG if debug else getattr(logging, (level or "info").upper())
    root = logging.getLogger()
    added: logging.Handler | None = None
    if log_file:
        try:
            # reopened when logrotate moves the file away (no copytruncate needed)
            added = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        except OSError as e:
            raise LogSetupError(f"cannot open the log file {log_file}: "
                             f"{e.strerror or e}") from None
        added.setFormatter(logging.Formatter(LOG_FORMAT))
    if not root.handlers:
        if added is None:
            h: logging.Handler = logging.StreamHandler(sys.stderr)
            h.setFormatter(JournalFormatter(JOURNAL_FORMAT) if journal_stderr()
                           else logging.Formatter(LOG_FORMAT))
            root.addHandler(h)
        root.setLevel(lvl)
    elif debug or level is not None:
        root.setLevel(lvl)
    if added is not None:
        root.addHandler(added)
    return added
