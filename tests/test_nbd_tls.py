"""The NBD port between machines: the array and each client host in a network namespace
of its own (tests/netns.py), TLS with certificates from `shadowplex pki`, a host's
identity its certificate's CN, LUN masking as the boundary. Clients: nbdinfo and
nbdcopy (libnbd, GnuTLS) and qemu-img (QEMU's TLS objects)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import xxhash
from nbd_net import Net, pki

pytestmark = pytest.mark.kernel


def test_a_host_sees_and_reads_exactly_what_is_presented_to_it(tls_array: Net,
                                                               tmp_path: Path) -> None:
    t = tls_array
    res = t.nbdinfo("hostB", "--list", "--json")
    assert res.returncode == 0, res.stderr
    assert {e["export-name"] for e in json.loads(res.stdout)["exports"]} == {"volumes/db"}
    out = tmp_path / "db.raw"
    # nbdcopy takes the certificates in the URI (tls-certificates=DIR query)
    uri = t.uri("volumes/db") + f"?tls-certificates={t.clients['hostB']}"
    res = t.net.run("hostB", "nbdcopy", uri, str(out), timeout=60)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(t.d.mount, "hosts", "hostB", "volumes", "db.img"), "rb") as f:
        assert xxhash.xxh3_64_intdigest(out.read_bytes()) == \
            xxhash.xxh3_64_intdigest(f.read())
    # hostC: nothing listed, and db cannot be opened even by its name
    res = t.nbdinfo("hostC", "--list", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["exports"] == []
    res = t.nbdinfo("hostC", export="volumes/db")
    assert res.returncode != 0
    # logs is the array's own host's only: hostB cannot open it
    res = t.nbdinfo("hostB", export="volumes/logs")
    assert res.returncode != 0


def test_plain_text_and_foreign_certificates_are_refused(tls_array: Net,
                                                         tmp_path: Path) -> None:
    t = tls_array
    res = t.net.run("hostB", "nbdinfo", t.uri("volumes/db", tls=False), timeout=30)
    assert res.returncode != 0 and "TLS" in (res.stderr + res.stdout)
    other = tmp_path / "other-ca"
    pki("init", str(other))
    pki("host", "hostB", str(tmp_path / "forged-B"), "--ca", str(other))
    res = t.nbdinfo("hostB", export="volumes/db", certs=tmp_path / "forged-B")
    assert res.returncode != 0
    assert "NBD port" in t.d.log_text()


def test_an_expired_certificate_is_refused(tls_array: Net, tmp_path: Path) -> None:
    t = tls_array
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_key = serialization.load_pem_private_key((t.pki / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((t.pki / "ca-cert.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostB")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(past - datetime.timedelta(days=1)).not_valid_after(past)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))   # type: ignore[arg-type]
    d = tmp_path / "expired"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes((t.pki / "ca-cert.pem").read_bytes())
    (d / "client-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "client-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(d / "client-key.pem", 0o600)
    res = t.nbdinfo("hostB", export="volumes/db", certs=d)
    assert res.returncode != 0


def test_qemu_img_reads_a_volume_over_tls(tls_array: Net, tmp_path: Path) -> None:
    """QEMU's own TLS client (tls-creds-x509, the same directory layout) as hostB."""
    t = tls_array
    res = t.net.run("hostB", "qemu-img", "convert", "-O", "raw",
                    "--object", f"tls-creds-x509,id=tls0,endpoint=client,"
                    f"dir={t.clients['hostB']}",
                    "--image-opts", f"driver=nbd,host={t.net.addr['array']},"
                    f"port={t.port},export=volumes/db,tls-creds=tls0",
                    str(tmp_path / "db.raw"), timeout=60)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(t.d.mount, "hosts", "hostB", "volumes", "db.img"), "rb") as f:
        assert (tmp_path / "db.raw").read_bytes() == f.read()


def test_the_control_api_over_tls_acts_for_the_certificate_s_host(tls_array: Net) -> None:
    t = tls_array
    res = t.cli("hostB", "volume", "list", "--json")
    assert res.returncode == 0, res.stderr
    assert [v["name"] for v in json.loads(res.stdout)] == ["db"]   # logs is not its
    res = t.cli("hostB", "snapshot", "create", "db", "--json")
    assert res.returncode == 0, res.stderr
    sid = json.loads(res.stdout)["snapshots"][0]["id"]
    res = t.cli("hostB", "snapshot", "list", "--json")
    assert [s["id"] for s in json.loads(res.stdout)] == [sid]
    # administration and other hosts' LUNs: refused, one line, nothing changed
    res = t.cli("hostB", "volume", "create", "mine", "1M")
    assert res.returncode != 0 and "E_ACCESSDENIED" in res.stderr, res.stderr
    # every snapshot of a volume, even one presented to it: the array's own host's to do
    res = t.cli("hostB", "snapshot", "delete", "--volume", "db", "--yes")
    assert res.returncode == 1 and "E_ACCESSDENIED" in res.stderr, res.stderr
    res = t.cli("hostB", "snapshot", "create", "logs")
    assert res.returncode != 0 and "logs" in res.stderr
    res = t.cli("hostC", "snapshot", "show", sid)
    assert res.returncode != 0 and "VSS_E_OBJECT_NOT_FOUND" in res.stderr
    res = t.cli("hostC", "snapshot", "delete", sid)
    assert res.returncode != 0
    res = t.cli("hostC", "--host", "hostB", "snapshot", "list")   # a claim is no proof
    assert res.returncode != 0 and "E_ACCESSDENIED" in res.stderr
    assert [v["name"] for v in t.d.json("volume", "list")] == ["db", "logs"]
    assert [s["id"] for s in t.d.json("snapshot", "list")] == [sid]
    res = t.cli("hostB", "snapshot", "delete", sid)
    assert res.returncode == 0, res.stderr
    assert t.d.json("snapshot", "list") == []


def test_a_remote_host_cannot_escalate(tls_array: Net, tmp_path: Path) -> None:
    """What a review found open: set ids in another spelling, end_backup of another
    host's set, expose with a mount on the array, split/promote, revert of a volume
    not presented to the host, import of a set the array never exported."""
    t = tls_array
    d = t.d
    made = t.cli("hostB", "snapshot", "create", "db", "--json")
    assert made.returncode == 0, made.stderr
    b_set = json.loads(made.stdout)["set_id"]
    b_snap = json.loads(made.stdout)["snapshots"][0]["id"]
    for spelling in (b_set, f"urn:uuid:{b_set}", b_set.replace("-", ""), f" {b_set} "):
        res = t.cli("hostC", "snapshot", "delete", "--set", spelling)
        assert res.returncode != 0 and "VSS_E_OBJECT_NOT_FOUND" in res.stderr, \
            (spelling, res.stderr)
    res = t.cli("hostC", "end-backup", b_set)
    assert res.returncode != 0 and "VSS_E_OBJECT_NOT_FOUND" in res.stderr, res.stderr
    target = tmp_path / "empty"
    target.mkdir()
    res = t.cli("hostB", "expose", b_snap, "--mount", str(target))
    assert res.returncode != 0 and "E_ACCESSDENIED" in res.stderr, res.stderr
    for args in (("split", b_snap, "mine"), ("promote", b_snap)):
        res = t.cli("hostB", *args)
        assert res.returncode != 0 and "E_ACCESSDENIED" in res.stderr, (args, res.stderr)
    # a transportable set of the array's own volume logs, imported by nobody: hostB can
    # neither import it (never exported) nor revert logs through it
    own = d.json("snapshot", "create", "logs", "--transportable")
    doc = tmp_path / "set.xml"
    d.ok("export", own["set_id"], "-o", str(doc))
    d.ok("snapshot", "delete", "--set", own["set_id"])
    own = d.json("snapshot", "create", "logs", "--transportable")
    forged = doc.read_text().replace(json.dumps(own["set_id"])[1:-1], own["set_id"])
    (tmp_path / "forged.xml").write_text(forged)
    res = t.cli("hostB", "import", str(tmp_path / "forged.xml"))
    assert res.returncode != 0
    res = t.cli("hostB", "revert", own["snapshots"][0]["id"], "--force")
    assert res.returncode != 0 and "VSS_E_OBJECT_NOT_FOUND" in res.stderr, res.stderr
    assert os.listdir(target) == []
    assert [s["id"] for s in d.json("snapshot", "list", "db")] == [b_snap]
