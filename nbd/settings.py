"""How `serve` is told to open the NBD port: `--nbd-listen ADDR[:PORT]`, `--tls-dir DIR`,
`--nbd-insecure` (and the config keys nbd_listen, tls_dir, nbd_insecure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 10809   # IANA's port for NBD


class SettingsError(ValueError):
    """A bad NBD setting: one line saying what is expected."""


@dataclass(frozen=True)
class NbdSettings:
    host: str               # address to bind (an IP address or a name)
    port: int
    tls_dir: str | None     # the pki directory (ca-cert.pem, server-cert.pem, ...)
    insecure: bool          # plain text, no TLS (loopback addresses only)


def parse_listen(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """ADDR, ADDR:PORT, [V6ADDR] or [V6ADDR]:PORT -> (address, port)."""
    t = text.strip()
    host, port_text = t, ""
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or (end + 1 < len(t) and t[end + 1] != ":"):
            raise SettingsError(f"{text!r}: expected [IPV6] or [IPV6]:PORT")
        host, port_text = t[1:end], t[end + 2:]
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    if not host:
        raise SettingsError(f"{text!r}: no address (e.g. 127.0.0.1:{DEFAULT_PORT})")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
            raise SettingsError(f"{text!r}: the port must be a number 0..65535 (0: any "
                                "free port, logged when open)")
        port = int(port_text)
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings(listen: str, tls_dir: str | None, insecure: bool) -> NbdSettings:
    """Checked settings: TLS unless insecure, and insecure only on loopback."""
    host, port = parse_listen(listen)
    if tls_dir is None and not insecure:
        raise SettingsError("the NBD port needs --tls-dir DIR (see 'shadowplex pki init'); "
                            "--nbd-insecure allows plain text on a loopback address")
    if insecure and tls_dir is not None:
        raise SettingsError("--nbd-insecure (plain text) and --tls-dir (TLS required) "
                            "exclude each other")
    if insecure and not is_loopback(host):
        raise SettingsError(f"--nbd-insecure serves plain text: only on a loopback address "
                            f"(127.0.0.1, ::1), not {host}")
    return NbdSettings(host, port, tls_dir, insecure)
