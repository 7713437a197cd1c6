"""The audit log: one line per state change, naming who asked.

Every change of the array's state -- a volume created, deleted, resized or presented;
a snapshot created, deleted, promoted, split, reverted to, exposed or unexposed; a set
imported or exported; a snapshot deleted because its diff area overflowed; a writer
skipped because its database is missing -- is logged once, at INFO (an overflow
deletion at WARNING: data the user kept is gone), on the logger ``provider.audit``:

    audit: host=hostB session=4 client=backup-job snapshot.delete id=... volume=db

``host``, ``session`` and ``client`` are the requester session's (control.py sets
``REQUESTER`` around each request; trio copies it into the tasks and worker threads
the request starts). A change nobody asked for right then -- an overflow deletion on
the data path, the deletion of an auto-release set whose session ended (that session
is named), a set left unfinished by a crash, deleted at start -- carries ``reason=``;
one without any requester shows ``host=- session=- client=-``. Values are written
bare when they are plain (letters, digits, ``._:/@+,=-``), else as a JSON string
(quoted, escaped: a client name cannot forge a line or a field).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("provider.audit")

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+,=-]+")


@dataclass(frozen=True)
class Requester:
    session: int
    host: str
    client: str


#: the requester of the request being served (None: the daemon itself)
REQUESTER: contextvars.ContextVar[Requester | None] = contextvars.ContextVar(
    "shadowplex_requester", default=None)


def of_session(session: Any) -> Requester:
    """The Requester of a provider.model.Session."""
    return Requester(session.id, session.host, session.client)


def value(v: Any) -> str:
    """A field's value as written: bare if plain, else a JSON string."""
    if v is None or v == "":
        return "-"
    if isinstance(v, list | tuple | set | frozenset):
        v = ",".join(str(x) for x in (sorted(v) if isinstance(v, set | frozenset) else v))
        if not v:
            return "-"
    text = str(v)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def line(action: str, requester: Requester | None = None, /, **fields: Any) -> str:
    """The audit line's text (without the logger's prefix)."""
    r = requester if requester is not None else REQUESTER.get()
    who = (f"host={value(r.host)} session={r.session} client={value(r.client)}"
           if r is not None else "host=- session=- client=-")
    rest = "".join(f" {k}={value(v)}" for k, v in fields.items())
    return f"audit: {who} {action}{rest}"


def audit(action: str, requester: Requester | None = None, level: int = logging.INFO, /,
          **fields: Any) -> None:
    """Log one state change. ``requester``: who asked, if not the current request's;
    ``level``: INFO, or WARNING for a change that lost data (an overflow deletion)."""
    if log.isEnabledFor(level):
        log.log(level, "%s", line(action, requester, **fields))
