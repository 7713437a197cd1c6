"""`shadowplex pki init` and `shadowplex pki host`: the certificate directories of the NBD
port (nbd/pki.py makes them; docs/network.md, "Certificates").

Here: the command-line side. Names are checked before anything is made -- a host name
by the rule LUN masking uses (provider.documents.valid_host, which nbd/ cannot import:
it sits below provider/), and no longer than a certificate's commonName may be -- and
what was written is reported (--json: the same fields).
"""

from __future__ import annotations

import argparse
from typing import Any

from nbd import pki_limits

from .output import print_json, print_table


class BadArgument(Exception):
    """A name or number on the command line that cannot be used (a usage error)."""


def _days(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--days wants a whole number of days, not {text!r}"
                                         ) from None
    if not 1 <= n <= 36500:
        raise argparse.ArgumentTypeError(f"--days must be 1..36500, not {n}")
    return n


def add_init_arguments(init: argparse.ArgumentParser) -> None:
    init.add_argument("dir", metavar="DIR", help="where the files go (created if missing)")
    init.add_argument("--server-name", metavar="NAME", action="append", dest="server_names",
                      help="a DNS name or IP address clients dial the array by (repeatable; "
                           "default: this host's name, localhost, 127.0.0.1, ::1)")
    init.add_argument("--days", type=_days, default=pki_limits.LEAF_DAYS,
                      help=f"the server certificate's validity (default "
                           f"{pki_limits.LEAF_DAYS}; the CA's is {pki_limits.CA_DAYS}, or "
                           "this if longer)")
    init.add_argument("--force", action="store_true",
                      help="replace existing files -- a new CA invalidates every host "
                           "certificate the old one signed")


def add_host_arguments(host: argparse.ArgumentParser) -> None:
    host.add_argument("name", metavar="NAME", help="the host name: the certificate's CN, "
                      "which is the host's identity for LUN masking")
    host.add_argument("dir", metavar="DIR", help="the host's certificate directory: "
                      "client-cert.pem, client-key.pem and a copy of ca-cert.pem")
    host.add_argument("--ca", metavar="DIR", help="the directory of ca-cert.pem and "
                      "ca-key.pem (default: DIR)")
    host.add_argument("--days", type=_days, default=pki_limits.LEAF_DAYS,
                      help=f"validity (default {pki_limits.LEAF_DAYS}; not past the CA's)")
    host.add_argument("--force", action="store_true", help="replace existing files")


def _check_host(name: str) -> None:
    from provider.documents import valid_host
    if not valid_host(name):
        raise BadArgument(f"invalid host name {name!r}: letters, digits, '-' and '_' in "
                          "dot-separated labels of up to 63 characters")
    if len(name) > pki_limits.CN_MAX:
        raise BadArgument(f"host name {name!r} is longer than {pki_limits.CN_MAX} "
                          "characters, the most a certificate's commonName holds")


def _check_server_name(name: str) -> None:
    import ipaddress
    try:
        ipaddress.ip_address(name)
    except ValueError:
        from provider.documents import valid_host
        if not valid_host(name):
            raise BadArgument(f"invalid --server-name {name!r}: neither an IP address nor a "
                              "DNS name") from None


def run(args: argparse.Namespace) -> int:
    """Raises BadArgument, pki.PkiExists (usage errors) and pki.PkiError (failures)."""
    from nbd import pki  # here: cryptography costs every other command ~50 ms of start-up
    if args.kcmd == "init":
        for n in args.server_names or ():
            _check_server_name(n)
        out = pki.init(args.dir, args.server_names, days=args.days, force=args.force)
    else:
        _check_host(args.name)
        out = pki.issue_host(args.name, args.dir, args.ca, days=args.days, force=args.force)
    views = [o.view() for o in out]
    if args.json:
        print_json({"files": views})
    else:
        rows: list[dict[str, Any]] = [
            {**v, "action": "wrote" if v["written"] else "kept",
             "expires": (v["not_after"] or "")[:10] or None} for v in views]
        print_table(rows, [("action", "ACTION"), ("mode", "MODE"), ("path", "FILE"),
                           ("what", "CONTENT"), ("subject", "SUBJECT"),
                           ("expires", "EXPIRES")])
    return 0
