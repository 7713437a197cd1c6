"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per
message to the Unix socket named by $NOTIFY_SOCKET (a path, or "@name" for the
abstract namespace). `serve` sends READY=1 once its FUSE mount and its control socket
are up, STATUS=... lines while it runs, STOPPING=1 when it stops (contrib/
shadowplex.service: Type=notify). Without $NOTIFY_SOCKET (not under systemd, or
Type=simple) every call does nothing.

The variable is taken out of the environment when the daemon starts (``Notifier.
from_environment``), as sd_notify(unset_environment=1) does: hook scripts and helper
processes the daemon runs must not speak for it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


class Notifier:
    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.pop(ENV, None) or None)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one message; False if there is no socket or the
        message could not be sent (logged: systemd then times the start out)."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        msg = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall(msg)
        except OSError as e:
            log.warning("cannot notify systemd at %s ($%s): %s", self.address, ENV,
                        e.strerror or e)
            return False
        return True
