"""The certificates of the NBD port: a CA, the array's server certificate, a client
certificate per host -- `shadowplex pki init` and `shadowplex pki host` (tools/cli.py).

Files go where qemu, nbdkit and libnbd look for them (nbd/tls.py names the layout).
Built with the `cryptography` library; the choices, and why:

- Keys: EC P-256 (ECDSA with SHA-256). GnuTLS (qemu, nbdkit, libnbd), OpenSSL and every
  TLS 1.2/1.3 stack accept it; it is quick to make and small. Unencrypted PKCS#8 PEM,
  mode 0600: a daemon and qemu read them unattended (nbdkit and libnbd cannot ask for a
  passphrase).
- Validity: the CA CA_DAYS (10 years), the server and host certificates LEAF_DAYS
  (2 years) by default; none may outlive the CA that signs it. Every certificate starts
  CLOCK_SKEW before now, so a peer whose clock is a little behind does not see a "not
  yet valid" certificate (qemu refuses those when it loads them).
- Extensions: what RFC 5280 asks and OpenSSL's X509_STRICT checks (nbd/tls.py verifies
  in strict mode): basicConstraints and keyUsage critical, subject and authority key
  identifiers. Leaf keyUsage is digitalSignature + keyEncipherment: libvirt's and some
  qemu releases' sanity checks (crypto/tlscredsx509.c) refuse a critical keyUsage
  without keyEncipherment on a TLS end certificate, whatever the key type (Debian 12's
  qemu 7.2 checks digitalSignature only); nbdkit-tls(1)'s certtool templates set it
  too. An EC key never uses that bit, and no TLS stack we know minds it.
- No revocation list yet (nbdkit and qemu would read ca-crl.pem): a lost host key means a
  new CA for now (docs/network.md).

Nothing is written until everything has been checked and made; then each file is
written to a temporary name, synced, and renamed into place.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .pki_limits import CA_DAYS as CA_DAYS
from .pki_limits import CN_MAX as CN_MAX
from .pki_limits import LEAF_DAYS as LEAF_DAYS
from .tls import CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

CLOCK_SKEW = dt.timedelta(minutes=5)
ORGANIZATION = "shadowplex"
KEY_MODE = 0o600
CERT_MODE = 0o644

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


class PkiError(Exception):
    """A certificate operation that cannot be done; nothing was changed (one line)."""


class PkiExists(PkiError):
    """Files that the operation would replace exist (without force)."""


@dataclass(frozen=True)
class Authority:
    """A CA that can sign: its certificate and private key (they match), and the PEM
    file's bytes as read (what a host directory gets a copy of)."""

    cert: x509.Certificate
    key: PrivateKey
    pem: bytes = b""


@dataclass(frozen=True)
class Output:
    """One file to write (and, once written, what the CLI reports about it)."""

    path: str
    data: bytes
    mode: int
    what: str                 # "CA certificate", "server key", ...
    subject: str | None = None
    not_after: dt.datetime | None = None
    written: bool = False     # False: the file already held exactly these bytes

    def view(self) -> dict[str, Any]:
        return {"path": self.path, "what": self.what, "mode": f"{self.mode:04o}",
                "subject": self.subject,
                "not_after": self.not_after.isoformat() if self.not_after else None,
                "written": self.written}


# ------------------------------------------------------------------------ building blocks
def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    if not 1 <= len(cn) <= CN_MAX:
        raise PkiError(f"{cn!r} cannot be a certificate's commonName "
                       f"(1..{CN_MAX} characters)")
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey,
             not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False))


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=not sign_certs, data_encipherment=False,
                         key_agreement=False, key_cert_sign=sign_certs, crl_sign=sign_certs,
                         encipher_only=False, decipher_only=False)


def make_ca(key: PrivateKey, common_name: str, not_before: dt.datetime,
            not_after: dt.datetime) -> x509.Certificate:
    """A self-signed CA that signs end certificates only (pathlen 0)."""
    name = _name(common_name)
    b = (_builder(name, name, key, not_before, not_after)
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
         .add_extension(_key_usage(sign_certs=True), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             key.public_key()), critical=False))
    return b.sign(key, hashes.SHA256())


def _leaf(ca: Authority, key: PrivateKey, common_name: str, usage: x509.ObjectIdentifier,
          not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (_builder(_name(common_name), ca.cert.subject, key, not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign_certs=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ski), critical=False))


def make_server_cert(ca: Authority, key: PrivateKey, names: Sequence[str],
                     not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    """The array's certificate: serverAuth; every name (DNS name or IP address) in the
    subjectAltName, which is what clients match (CN: the first DNS name, for people)."""
    sans = [_general_name(n) for n in names]
    if not sans:
        raise PkiError("a server certificate needs at least one name")
    dns = [n for n in names if not _is_ip(n) and len(n) <= CN_MAX]
    cn = dns[0] if dns else names[0]
    b = (_leaf(ca, key, cn, ExtendedKeyUsageOID.SERVER_AUTH, not_before, not_after)
         .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    return b.sign(ca.key, hashes.SHA256())


def make_client_cert(ca: Authority, key: PrivateKey, host: str, not_before: dt.datetime,
                     not_after: dt.datetime) -> x509.Certificate:
    """A host's certificate: clientAuth, CN = the host name (the identity the server
    takes from it, nbd/tls.py peer_host_name)."""
    b = _leaf(ca, key, host, ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after)
    return b.sign(ca.key, hashes.SHA256())


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _general_name(name: str) -> x509.GeneralName:
    if _is_ip(name):
        return x509.IPAddress(ipaddress.ip_address(name))
    if not name or not name.isascii():
        raise PkiError(f"server name {name!r} is neither an IP address nor an ASCII DNS "
                       "name (give an IDN in its xn-- form)")
    return x509.DNSName(name)


def default_server_names() -> list[str]:
    """This machine's host name and the loopback names (what a local client dials)."""
    names = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------------ loading the CA
def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e.strerror or e}") from e


def _same_public_key(a: Any, b: Any) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(a.public_bytes(*fmt) == b.public_bytes(*fmt))


def _extension(cert: x509.Certificate, kind: type[_Ext], path: str) -> _Ext:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        raise PkiError(f"{path} is not a CA certificate (it has no {kind.__name__} "
                       "extension)") from None


def load_ca(ca_dir: str | os.PathLike[str], now: dt.datetime | None = None) -> Authority:
    """The CA in ca_dir (ca-cert.pem + ca-key.pem), checked: both parse, the key is the
    certificate's, the certificate is a CA that may sign certificates, self-signed, and
    valid now. Raises PkiError with the file at fault."""
    now = now or dt.datetime.now(dt.UTC)
    cert_path = os.path.join(os.fspath(ca_dir), CA_CERT)
    key_path = os.path.join(os.fspath(ca_dir), CA_KEY)
    pem = _read(cert_path)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PkiError(f"{cert_path} is not a PEM certificate") from e
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as e:   # TypeError: it is encrypted
        raise PkiError(f"{key_path} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{key_path}: only EC and RSA CA keys are supported")
    if not _same_public_key(cert.public_key(), key.public_key()):
        raise PkiError(f"{key_path} is not the key of {cert_path}")
    bc = _extension(cert, x509.BasicConstraints, cert_path)
    ku = _extension(cert, x509.KeyUsage, cert_path)
    _extension(cert, x509.SubjectKeyIdentifier, cert_path)   # what our leaves' AKI names
    if not bc.ca or not ku.key_cert_sign:
        raise PkiError(f"{cert_path} is not a CA certificate that may sign certificates")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise PkiError(f"{cert_path} is not a self-signed CA certificate") from e
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"{cert_path} is valid {cert.not_valid_before_utc:%Y-%m-%d} .. "
                       f"{cert.not_valid_after_utc:%Y-%m-%d}, not now")
    return Authority(cert, key, pem)


def _validity(days: int, now: dt.datetime, ca: Authority | None = None
              ) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise PkiError(f"a certificate must be valid for at least 1 day, not {days}")
    not_after = now + dt.timedelta(days=days)
    if ca is not None and not_after > ca.cert.not_valid_after_utc:
        left = (ca.cert.not_valid_after_utc - now).days
        raise PkiError(f"the CA expires {ca.cert.not_valid_after_utc:%Y-%m-%d}: a "
                       f"certificate for {days} days would outlive it (at most {left} "
                       "days, or a new CA)")
    return now - CLOCK_SKEW, not_after


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


# ------------------------------------------------------------------------ writing
def _check_targets(directory: str, outputs: Sequence[Output], force: bool) -> list[Output]:
    """The outputs that need writing. A directory that is not one, or an entry that
    is not a regular file, is an error even with force (we replace files, nothing
    else); an existing file is one without force -- unless it already holds exactly
    these bytes (the CA certificate copied to a host directory)."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise PkiError(f"{directory} exists and is not a directory")
    todo, existing = [], []
    for o in outputs:
        if os.path.lexists(o.path):
            if not os.path.isfile(o.path):   # a directory, a dangling link, a device
                raise PkiError(f"{o.path} exists and is not a regular file")
            if o.path.endswith(os.sep + CA_CERT) and _read(o.path) == o.data:
                continue
            existing.append(o.path)
        todo.append(o)
    if existing and not force:
        ca = any(p.endswith(os.sep + CA_KEY) for p in existing)
        raise PkiExists(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; "
                        "use --force to replace" + (" (a new CA invalidates every "
                                                    "certificate the old one signed)"
                                                    if ca else ""))
    return todo


def _commit(directory: str, outputs: Sequence[Output], force: bool) -> list[Output]:
    """Check, then write what needs writing; the outputs, each saying if it was."""
    todo = _check_targets(directory, outputs, force)
    _write_all(directory, todo)
    written = {o.path for o in todo}
    return [replace(o, written=o.path in written) for o in outputs]


def _write_all(directory: str, outputs: Sequence[Output]) -> None:
    """Write every output to a temporary name (its final mode from the start: a key is
    never readable by others, not even for a moment), sync, then rename them all into
    place and sync the directory. A failure before the renames leaves nothing behind."""
    os.makedirs(directory, exist_ok=True)
    tmps: list[tuple[str, str]] = []
    try:
        for o in outputs:
            tmp = os.path.join(directory, f".{os.path.basename(o.path)}.tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, o.mode)
            tmps.append((tmp, o.path))
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), o.mode)   # the umask may have taken bits of 0644
                f.write(o.data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in tmps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in tmps:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ------------------------------------------------------------------------ the commands
def init(directory: str | os.PathLike[str], server_names: Sequence[str] | None = None, *,
         days: int = LEAF_DAYS, force: bool = False, now: dt.datetime | None = None
         ) -> list[Output]:
    """`shadowplex pki init DIR`: a new CA (ca-cert.pem, ca-key.pem) and the array's
    certificate (server-cert.pem, server-key.pem) for server_names (default
    default_server_names()). The CA lasts CA_DAYS, or `days` if longer. Returns the
    outputs (each says whether it was written); raises PkiExists if any of the files
    exists (unless force), PkiError for anything else, having changed nothing."""
    d = os.path.abspath(os.fspath(directory))
    names = list(dict.fromkeys(server_names or default_server_names()))
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)   # X.509 keeps seconds
    ca_key, server_key = new_key(), new_key()
    ca_start, ca_end = _validity(max(days, CA_DAYS), now)
    host = next((n for n in names if not _is_ip(n)), socket.gethostname())
    ca_cn = f"shadowplex CA {host[:CN_MAX - 23]} {secrets.token_hex(4)}"   # unique subject
    ca_cert = make_ca(ca_key, ca_cn, ca_start, ca_end)
    ca = Authority(ca_cert, ca_key, cert_pem(ca_cert))
    start, end = _validity(days, now, ca)
    server = make_server_cert(ca, server_key, names, start, end)
    outputs = [
        Output(os.path.join(d, CA_CERT), ca.pem, CERT_MODE, "CA certificate",
               _subject(ca.cert), ca_end),
        Output(os.path.join(d, CA_KEY), key_pem(ca_key), KEY_MODE, "CA key (EC P-256)"),
        Output(os.path.join(d, SERVER_CERT), cert_pem(server), CERT_MODE,
               f"server certificate ({', '.join(names)})", _subject(server), end),
        Output(os.path.join(d, SERVER_KEY), key_pem(server_key), KEY_MODE,
               "server key (EC P-256)"),
    ]
    return _commit(d, outputs, force)


def issue_host(host: str, directory: str | os.PathLike[str],
               ca_dir: str | os.PathLike[str] | None = None, *, days: int = LEAF_DAYS,
               force: bool = False, now: dt.datetime | None = None) -> list[Output]:
    """`shadowplex pki host NAME DIR`: client-cert.pem (CN=host, clientAuth) and
    client-key.pem signed by the CA in ca_dir (default: directory itself), plus a copy
    of ca-cert.pem, so that the directory is complete for a client (nbdinfo
    --tls-certificates=DIR, qemu tls-creds-x509,endpoint=client). The caller checks
    that `host` is a valid host name (provider.documents.valid_host; this layer is
    below it). Returns the outputs (the CA copy included, also when it was already
    there); raises PkiExists / PkiError, having changed nothing."""
    d = os.path.abspath(os.fspath(directory))
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)   # X.509 keeps seconds
    if os.path.lexists(d) and not os.path.isdir(d):   # before the CA: the first fault
        raise PkiError(f"{d} exists and is not a directory")
    ca = load_ca(d if ca_dir is None else ca_dir, now)
    start, end = _validity(days, now, ca)
    key = new_key()
    cert = make_client_cert(ca, key, host, start, end)
    outputs = [
        Output(os.path.join(d, CLIENT_CERT), cert_pem(cert), CERT_MODE,
               f"client certificate for host {host}", _subject(cert), end),
        Output(os.path.join(d, CLIENT_KEY), key_pem(key), KEY_MODE, "client key (EC P-256)"),
        Output(os.path.join(d, CA_CERT), ca.pem, CERT_MODE, "CA certificate",
               _subject(ca.cert), ca.cert.not_valid_after_utc),
    ]
    return _commit(d, outputs, force)
