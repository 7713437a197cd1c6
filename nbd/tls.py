"""TLS for the NBD port: the server's context from a pki directory, a peer's host."""

from __future__ import annotations

import os
import ssl


def server_context(tls_dir: str) -> ssl.SSLContext:
    """TLS 1.2+, the array's certificate, client certificates required (our CA)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.path.join(tls_dir, "server-cert.pem"),
                        os.path.join(tls_dir, "server-key.pem"))
    ctx.load_verify_locations(os.path.join(tls_dir, "ca-cert.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_host(cert: dict) -> str:
    """The host a verified client certificate names: its subject's CN."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise ValueError("the client certificate has no CN")
