"""TLS for the array's NBD port: the ssl.SSLContext of the server (`shadowplex serve`) and
of our own client, built from a certificate directory, and the host name of a verified
peer.

The directory layout is the one qemu (tls-creds-x509,dir=DIR), nbdkit
(--tls-certificates=DIR) and libnbd/nbdinfo (--tls-certificates=DIR) read, so one
directory serves our tools and theirs alike (nbd/pki.py writes it):

    ca-cert.pem                       the CA every peer is checked against
    server-cert.pem, server-key.pem   the array's certificate (serverAuth, SAN: its names)
    client-cert.pem, client-key.pem   a host's certificate (clientAuth, CN = host name)

A connection's host identity is the CN of its client certificate (peer_host_name); LUN
masking decides what that host sees. So the server must never accept a peer it has not
verified: CERT_REQUIRED, and only our CA is trusted (no system store -- any public CA's
customer would otherwise be a "host").

Only the standard library here: the server and the client need no certificate parsing
beyond what the ssl module does during the handshake.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

# TLS 1.3 is what both ends negotiate when they can (the ssl module offers the highest
# version first); 1.2 stays allowed for GnuTLS/OpenSSL builds of older distributions
# (qemu, nbdkit, libnbd on an LTS release). Below 1.2 there is no AEAD-only suite.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(ValueError):
    """A certificate directory that cannot make a context (the message is one line and
    names the file). A ValueError, as `serve` expects of a bad --tls-dir."""


class PeerIdentityError(ValueError):
    """A peer whose certificate does not name exactly one acceptable host."""


def _file(cert_dir: str | os.PathLike[str], name: str) -> str:
    path = os.path.join(os.fspath(cert_dir), name)
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.lexists(path) else "is missing"
        raise TlsConfigError(f"{path} {what} (create the directory with `shadowplex pki`)")
    if not os.access(path, os.R_OK):
        raise TlsConfigError(f"{path} is not readable by this user")
    return path


def _harden(ctx: ssl.SSLContext, cafile: str) -> None:
    """What the server and the client contexts share: the version floor, our CA alone as
    the trust anchor, RFC 5280-strict chain checks (our own certificates comply; a
    sloppy hand-made one is refused here rather than by some GnuTLS peer later)."""
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=cafile)
    except ssl.SSLError as e:
        raise TlsConfigError(f"{cafile} is not a PEM certificate ({e.reason or e})") from e


def _load_pair(ctx: ssl.SSLContext, certfile: str, keyfile: str) -> None:
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(f"{keyfile} is not the key of {certfile}") from e
        raise TlsConfigError(f"{certfile} / {keyfile}: not a PEM certificate and "
                             f"unencrypted key ({e.reason or e})") from e


def server_context(cert_dir: str | os.PathLike[str]) -> ssl.SSLContext:
    """The NBD server's context (for NBD_OPT_STARTTLS: ``ctx.wrap_socket(sock,
    server_side=True)``): server-cert.pem/server-key.pem, and every client must present
    a certificate that ca-cert.pem signed, valid now, with the clientAuth purpose (OpenSSL
    checks the purpose on the server side: the array's own serverAuth-only certificate
    cannot pose as a host). Raises TlsConfigError naming the file at fault."""
    ca, cert, key = (_file(cert_dir, n) for n in (CA_CERT, SERVER_CERT, SERVER_KEY))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, ca)
    _load_pair(ctx, cert, key)
    # No session tickets: an NBD connection is one long session, resumption saves
    # nothing, and a resumed session would carry its identity over from an earlier
    # handshake instead of a certificate checked now.
    ctx.num_tickets = 0
    return ctx


def client_context(cert_dir: str | os.PathLike[str]) -> ssl.SSLContext:
    """Our client's context: presents client-cert.pem/client-key.pem and accepts only a
    server that ca-cert.pem signed and whose certificate names the host we dial -- pass
    it as ``ctx.wrap_socket(sock, server_hostname=NAME)`` (a DNS name or an IP address,
    matched against the server certificate's subjectAltName). Raises TlsConfigError."""
    ca, cert, key = (_file(cert_dir, n) for n in (CA_CERT, CLIENT_CERT, CLIENT_KEY))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # check_hostname is on by default
    _harden(ctx, ca)
    ctx.check_hostname = True
    _load_pair(ctx, cert, key)
    return ctx


def peer_host_name(peercert: Mapping[str, object] | None,
                   valid: Callable[[str], bool] | None = None) -> str:
    """The host a verified peer is: the commonName of its certificate's subject, from
    ``sslsock.getpeercert()`` (the dict form). ``valid``, when given, is the host-name
    rule of the layer that uses the name (provider.documents.valid_host for LUN
    masking: the name becomes a path under MOUNT/hosts/); `shadowplex pki host` applies
    the same rule when it issues, but a certificate made by hand with the CA key may
    carry anything.

    Raises PeerIdentityError when there is no verified certificate (getpeercert() gives
    None without a handshake and {} when verification was off), no CN, more than one CN
    (which would be ambiguous), or a CN that ``valid`` refuses."""
    if not peercert:
        raise PeerIdentityError("the peer presented no verified certificate")
    subject = peercert.get("subject", ())
    names: list[str] = []
    if isinstance(subject, tuple):
        for rdn in subject:   # ((("commonName", "hostA"),), (("organizationName", ..),))
            for attr in rdn if isinstance(rdn, tuple) else ():
                if isinstance(attr, tuple) and len(attr) == 2 and attr[0] == "commonName":
                    names.append(str(attr[1]))
    if len(names) != 1:
        raise PeerIdentityError(f"the peer's certificate names {len(names)} hosts "
                                "(commonName); it must name exactly one")
    name = names[0]
    if valid is not None and not valid(name):
        raise PeerIdentityError(f"the peer's certificate names {name!r}, which is not a "
                                "valid host name")
    return name
