"""The certificates of the NBD port (nbd/pki.py) and the TLS contexts built from them
(nbd/tls.py), for real: a CA, the array's certificate and two hosts' certificates are
made in temporary directories, and every check is a TLS handshake between the server
context and a client context over a socketpair (bounded timeouts): the host identity is
the client certificate's CN; another CA's certificate, an expired one, the server's own
certificate posing as a host, no certificate, and a server answering to another name are
refused. `openssl verify` (strict) agrees with the files, and the CLI (`shadowplex pki`)
writes them -- keys 0600 -- says what it wrote (also --json) and refuses bad input with
one line, changing nothing. GnuTLS peers (nbdkit, nbdinfo, qemu): test_pki_interop.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import need, one_line_error, run_cmd, spx

from nbd import pki, tls

TIMEOUT = 10.0
KEYS = {"ca-key.pem", "server-key.pem", "client-key.pem"}


@dataclass
class Dirs:
    array: Path                 # ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem
    host_a: Path                # client directory of hostA (ca-cert.pem copied in)
    host_b: Path
    other: Path                 # another CA (init), with a client directory other/hostA
    made: dict[str, list[pki.Output]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    base = tmp_path_factory.mktemp("pki")
    d = Dirs(base / "array", base / "hostA", base / "hostB", base / "other")
    d.made["init"] = pki.init(d.array)
    d.made["hostA"] = pki.issue_host("hostA", d.host_a, d.array)
    d.made["hostB"] = pki.issue_host("hostB", d.host_b, d.array)
    pki.init(d.other, ["localhost"])
    pki.issue_host("hostA", d.other / "hostA", d.other)   # same CN, the wrong CA
    return d


# ------------------------------------------------------------------------ a handshake
@dataclass
class Outcome:
    peer: dict[str, Any] | None = None      # the server's getpeercert()
    version: str | None = None
    server_error: BaseException | None = None
    client_error: BaseException | None = None


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              server_hostname: str = "localhost") -> Outcome:
    """One TLS connection over a socketpair: the server side in a thread, the client here.
    The server sends b"ok" after its handshake and the client reads it: under TLS 1.3
    the client's handshake completes before the server has judged the client's
    certificate, so a refusal reaches the client only on that read."""
    out = Outcome()
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                out.peer = s.getpeercert()
                out.version = s.version()
                s.sendall(b"ok")
        except Exception as e:   # noqa: BLE001 - the test looks at it
            out.server_error = e
    t = threading.Thread(target=serve, name="tls-server", daemon=True)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=server_hostname) as c:
            got = c.recv(2)
            if got != b"ok":
                raise ConnectionError(f"the server closed the connection ({got!r})")
    except Exception as e:   # noqa: BLE001 - the test looks at it
        out.client_error = e
    finally:
        b.close()
        t.join(TIMEOUT + 5)
        a.close()
    assert not t.is_alive(), "the server side of the handshake hangs"
    return out


def refused_by_server(o: Outcome, reason: str) -> None:
    assert o.peer is None, o.peer
    assert isinstance(o.server_error, ssl.SSLError), o.server_error
    assert reason in str(o.server_error), o.server_error
    assert o.client_error is not None   # the client learns it too: an alert or EOF


def refused_by_client(o: Outcome, reason: str) -> None:
    assert isinstance(o.client_error, ssl.SSLCertVerificationError), o.client_error
    assert reason in str(o.client_error), o.client_error
    assert o.peer is None


# ------------------------------------------------------------------------ the files
def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_and_host_write_the_layout_with_private_keys(dirs: Dirs) -> None:
    assert sorted(os.listdir(dirs.array)) == ["ca-cert.pem", "ca-key.pem",
                                              "server-cert.pem", "server-key.pem"]
    for d in (dirs.host_a, dirs.host_b):
        assert sorted(os.listdir(d)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
        assert (d / "ca-cert.pem").read_bytes() == (dirs.array / "ca-cert.pem").read_bytes()
    for d in (dirs.array, dirs.host_a):
        for f in d.iterdir():
            mode = stat.S_IMODE(f.stat().st_mode)
            assert mode == (0o600 if f.name in KEYS else 0o644), (f, oct(mode))
    assert all(o.written for o in dirs.made["init"] + dirs.made["hostA"])

    ca = _cert(dirs.array / "ca-cert.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(dirs.array / "server-cert.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) >= {socket.gethostname(), "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    host = _cert(dirs.host_a / "client-cert.pem")
    assert host.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hostA"
    eku = host.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(host.public_key(), ec.EllipticCurvePublicKey)
    assert host.public_key().curve.name == "secp256r1"
    host.verify_directly_issued_by(ca)
    days = (host.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    assert pki.LEAF_DAYS - 1 <= days <= pki.LEAF_DAYS


def test_openssl_verify_accepts_the_certificates_strictly(dirs: Dirs) -> None:
    need("openssl")
    ca = str(dirs.array / "ca-cert.pem")
    for purpose, cert in (("sslserver", dirs.array / "server-cert.pem"),
                          ("sslclient", dirs.host_a / "client-cert.pem"),
                          ("sslclient", dirs.host_b / "client-cert.pem")):
        res = run_cmd("openssl", "verify", "-x509_strict", "-purpose", purpose,
                      "-CAfile", ca, str(cert))
        assert res.stdout.strip() == f"{cert}: OK"
    res = run_cmd("openssl", "verify", "-CAfile", ca, str(dirs.other / "hostA" /
                                                          "client-cert.pem"), check=False)
    assert res.returncode != 0   # and another CA's is not


# ------------------------------------------------------------------------ handshakes
def test_the_host_identity_is_the_client_certificate_cn(dirs: Dirs) -> None:
    server = tls.server_context(dirs.array)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    for name, d in (("hostA", dirs.host_a), ("hostB", dirs.host_b)):
        o = handshake(server, tls.client_context(d))
        assert o.server_error is None and o.client_error is None, o
        assert o.version == "TLSv1.3"
        assert tls.peer_host_name(o.peer) == name


def test_tls_1_2_is_still_accepted(dirs: Dirs) -> None:
    client = tls.client_context(dirs.host_a)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    o = handshake(tls.server_context(dirs.array), client)
    assert o.version == "TLSv1.2", o
    assert tls.peer_host_name(o.peer) == "hostA"


def test_a_certificate_from_another_ca_is_refused(dirs: Dirs) -> None:
    # a host certificate the array's CA did not sign, though its CN is a known host's
    # (from a client that trusts the array: it gets as far as presenting it)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(dirs.array / "ca-cert.pem")
    client.load_cert_chain(dirs.other / "hostA" / "client-cert.pem",
                           dirs.other / "hostA" / "client-key.pem")
    refused_by_server(handshake(tls.server_context(dirs.array), client),
                      "unable to get local issuer certificate")
    # and a client does not accept a server of another CA
    refused_by_client(handshake(tls.server_context(dirs.other),
                                tls.client_context(dirs.host_a)),
                      "certificate verify failed")


def test_an_expired_certificate_is_refused(dirs: Dirs, tmp_path: Path) -> None:
    ca = pki.load_ca(dirs.array)
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = pki.make_client_cert(ca, key, "hostA", now - dt.timedelta(days=30),
                                now - dt.timedelta(days=1))
    (tmp_path / "ca-cert.pem").write_bytes(ca.pem)
    (tmp_path / "client-cert.pem").write_bytes(pki.cert_pem(cert))
    (tmp_path / "client-key.pem").write_bytes(pki.key_pem(key))
    refused_by_server(handshake(tls.server_context(dirs.array),
                                tls.client_context(tmp_path)),
                      "certificate has expired")


def test_the_servers_own_certificate_cannot_pose_as_a_host(dirs: Dirs) -> None:
    """serverAuth only: OpenSSL checks the clientAuth purpose on the server side."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(dirs.array / "ca-cert.pem")
    client.load_cert_chain(dirs.array / "server-cert.pem", dirs.array / "server-key.pem")
    refused_by_server(handshake(tls.server_context(dirs.array), client),
                      "unsuitable certificate purpose")


def test_a_client_without_a_certificate_is_refused(dirs: Dirs) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(dirs.array / "ca-cert.pem")
    o = handshake(tls.server_context(dirs.array), client)
    assert o.peer is None and isinstance(o.server_error, ssl.SSLError), o
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(o.server_error) or \
        "certificate required" in str(o.server_error), o.server_error


@pytest.mark.parametrize("name, ok", [("localhost", True), ("127.0.0.1", True),
                                      ("::1", True), ("other.example", False),
                                      ("10.9.9.9", False)])
def test_the_client_checks_the_servers_name(dirs: Dirs, name: str, ok: bool) -> None:
    o = handshake(tls.server_context(dirs.array), tls.client_context(dirs.host_a), name)
    if ok:
        assert o.client_error is None and tls.peer_host_name(o.peer) == "hostA", o
    else:
        refused_by_client(o, "mismatch")


def test_peer_host_name_needs_exactly_one_valid_cn() -> None:
    cn = (("commonName", "hostA"),)
    org = (("organizationName", "shadowplex"),)
    assert tls.peer_host_name({"subject": (org, cn)}) == "hostA"
    for bad in (None, {}, {"subject": (org,)}, {"subject": (cn, (("commonName", "x"),))}):
        with pytest.raises(tls.PeerIdentityError):
            tls.peer_host_name(bad)
    with pytest.raises(tls.PeerIdentityError, match="not a valid host name"):
        tls.peer_host_name({"subject": ((("commonName", "../etc"),),)},
                           valid=lambda n: "/" not in n)


def test_contexts_name_the_file_at_fault(dirs: Dirs, tmp_path: Path) -> None:
    with pytest.raises(tls.TlsConfigError, match=r"hostA/server-cert\.pem is missing"):
        tls.server_context(dirs.host_a)
    for f in ("ca-cert.pem", "server-cert.pem"):
        (tmp_path / f).write_bytes((dirs.array / f).read_bytes())
    (tmp_path / "server-key.pem").write_bytes((dirs.other / "server-key.pem").read_bytes())
    with pytest.raises(tls.TlsConfigError, match=r"server-key\.pem is not the key of"):
        tls.server_context(tmp_path)
    (tmp_path / "ca-cert.pem").write_text("not a certificate\n")
    with pytest.raises(tls.TlsConfigError, match=r"ca-cert\.pem is not a PEM certificate"):
        tls.server_context(tmp_path)


# ------------------------------------------------------------------------ the CLI
def _digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.iterdir()) if f.is_file()}


def test_cli_writes_the_files_and_says_so(tmp_path: Path) -> None:
    array = tmp_path / "array"
    res = spx("pki", "init", str(array), "--server-name", "array.example",
              "--server-name", "192.0.2.7", "--days", "90")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["ACTION", "MODE", "FILE", "CONTENT"]
    for f in ("ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem"):
        mode = "0600" if f in KEYS else "0644"
        assert any(ln.split()[:3] == ["wrote", mode, str(array / f)] for ln in lines), lines
        assert stat.S_IMODE((array / f).stat().st_mode) == int(mode, 8)
    server = _cert(array / "server-cert.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["array.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 90

    host = tmp_path / "hostA"
    res = spx("pki", "host", "hostA", str(host), "--ca", str(array), "--json")
    assert res.returncode == 0, res.stderr
    files = {Path(f["path"]).name: f for f in json.loads(res.stdout)["files"]}
    assert set(files) == {"client-cert.pem", "client-key.pem", "ca-cert.pem"}
    assert files["client-key.pem"]["mode"] == "0600"
    assert files["client-cert.pem"]["subject"] == "CN=hostA,O=shadowplex"
    assert all(f["written"] for f in files.values())
    for f, v in files.items():
        assert stat.S_IMODE((host / f).stat().st_mode) == int(v["mode"], 8)

    # DIR defaults to the CA's own directory: ca-cert.pem is there already, kept
    res = spx("pki", "host", "hostB", str(array), "--json")
    assert res.returncode == 0, res.stderr
    kept = {Path(f["path"]).name: f["written"] for f in json.loads(res.stdout)["files"]}
    assert kept == {"client-cert.pem": True, "client-key.pem": True, "ca-cert.pem": False}


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    array = tmp_path / "array"
    assert spx("pki", "init", str(array)).returncode == 0
    before = _digests(array)
    one_line_error(spx("pki", "init", str(array)), 2, "use --force")
    assert spx("pki", "host", "hostA", str(array)).returncode == 0
    after_host = _digests(array)
    one_line_error(spx("pki", "host", "hostA", str(array)), 2, "client-key.pem")
    assert _digests(array) == after_host
    assert {k: v for k, v in after_host.items() if k in before} == before
    res = spx("pki", "host", "hostA", str(array), "--force", "--json")
    assert res.returncode == 0, res.stderr
    assert _digests(array)["client-key.pem"] != after_host["client-key.pem"]
    res = spx("pki", "init", str(array), "--force")
    assert res.returncode == 0, res.stderr
    assert _digests(array)["ca-key.pem"] != before["ca-key.pem"]


@pytest.mark.parametrize("name, fragment", [
    ("bad/name", "invalid host name"), ("a..b", "invalid host name"),
    ("a" * 63 + "." + "b" * 10, "longer than 64"), ("", "invalid host name")])
def test_cli_bad_host_names_exit_2_and_write_nothing(tmp_path: Path, name: str,
                                                     fragment: str) -> None:
    array = tmp_path / "array"
    assert spx("pki", "init", str(array)).returncode == 0
    one_line_error(spx("pki", "host", name, str(tmp_path / "h"), "--ca", str(array)), 2,
                   fragment)
    assert not (tmp_path / "h").exists()


def test_cli_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    array, other = tmp_path / "array", tmp_path / "other"
    assert spx("pki", "init", str(array)).returncode == 0
    assert spx("pki", "init", str(other)).returncode == 0
    h = str(tmp_path / "h")
    one_line_error(spx("pki", "host", "hostA", h, "--ca", str(tmp_path / "none")), 1,
                   "cannot read")
    one_line_error(spx("pki", "host", "hostA", h), 1, "ca-cert.pem")   # DIR has no CA
    one_line_error(spx("pki", "init", str(tmp_path / "x"), "--days", "0"), 2, "--days")
    one_line_error(spx("pki", "init", str(tmp_path / "x"), "--server-name", "a b"), 2,
                   "--server-name")
    assert not (tmp_path / "h").exists() and not (tmp_path / "x").exists()

    mixed = tmp_path / "mixed"                  # a CA whose key is another CA's
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes((array / "ca-cert.pem").read_bytes())
    (mixed / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    one_line_error(spx("pki", "host", "hostA", h, "--ca", str(mixed)), 1, "is not the key of")
    (mixed / "ca-cert.pem").write_bytes((array / "server-cert.pem").read_bytes())
    (mixed / "ca-key.pem").write_bytes((array / "server-key.pem").read_bytes())
    one_line_error(spx("pki", "host", "hostA", h, "--ca", str(mixed)), 1,
                   "not a CA certificate")
    assert not (tmp_path / "h").exists()

    afile = tmp_path / "afile"                  # DIR is not a directory
    afile.write_text("x")
    one_line_error(spx("pki", "init", str(afile)), 1, "is not a directory")
    one_line_error(spx("pki", "host", "hostA", str(afile), "--ca", str(array)), 1,
                   "is not a directory")
    assert afile.read_text() == "x"

    host = tmp_path / "host"                    # an entry that is a directory: not
    (host / "client-key.pem").mkdir(parents=True)   # replaced, even with --force
    one_line_error(spx("pki", "host", "hostA", str(host), "--ca", str(array), "--force"), 1,
                   "is not a regular file")
    assert sorted(os.listdir(host)) == ["client-key.pem"]

    ca_copy = tmp_path / "stale"                # another CA's certificate in DIR
    ca_copy.mkdir()
    (ca_copy / "ca-cert.pem").write_bytes((other / "ca-cert.pem").read_bytes())
    one_line_error(spx("pki", "host", "hostA", str(ca_copy), "--ca", str(array)), 2,
                   "ca-cert.pem exists")
    assert sorted(os.listdir(ca_copy)) == ["ca-cert.pem"]


def test_a_certificate_may_not_outlive_its_ca(tmp_path: Path) -> None:
    pki.init(tmp_path)
    with pytest.raises(pki.PkiError, match="would outlive it"):
        pki.issue_host("hostA", tmp_path / "h", tmp_path, days=pki.CA_DAYS + 1)
    assert not (tmp_path / "h").exists()


def test_an_rsa_ca_signs_hosts_too(tmp_path: Path) -> None:
    """`pki host --ca` with a CA made elsewhere (RSA 2048): the host's key is still
    P-256, the handshake and the identity work the same."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    ca = pki.make_ca(key, "site CA", now - dt.timedelta(hours=1), now + dt.timedelta(days=90))
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca-cert.pem").write_bytes(pki.cert_pem(ca))
    (ca_dir / "ca-key.pem").write_bytes(pki.key_pem(key))
    pki.issue_host("hostR", tmp_path / "h", ca_dir, days=30)
    authority = pki.load_ca(ca_dir)
    server_key = pki.new_key()
    cert = pki.make_server_cert(authority, server_key, ["localhost"], now, now +
                                dt.timedelta(days=30))
    (ca_dir / "server-cert.pem").write_bytes(pki.cert_pem(cert))
    (ca_dir / "server-key.pem").write_bytes(pki.key_pem(server_key))
    o = handshake(tls.server_context(ca_dir), tls.client_context(tmp_path / "h"))
    assert tls.peer_host_name(o.peer) == "hostR", o


def test_leaf_key_usage_suits_gnutls_and_qemu(dirs: Dirs) -> None:
    """Critical keyUsage: digitalSignature (ECDHE-ECDSA) and keyEncipherment, which
    some qemu releases' and libvirt's sanity checks demand of a TLS end certificate
    whose keyUsage is critical; the CA: keyCertSign."""
    for f in (dirs.array / "server-cert.pem", dirs.host_a / "client-cert.pem"):
        ext = _cert(f).extensions.get_extension_for_class(x509.KeyUsage)
        assert ext.critical and ext.value.digital_signature and ext.value.key_encipherment
        assert not ext.value.key_cert_sign
    ca = _cert(dirs.array / "ca-cert.pem").extensions.get_extension_for_class(x509.KeyUsage)
    assert ca.critical and ca.value.key_cert_sign and ca.value.crl_sign
