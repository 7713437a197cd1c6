"""`shadowplex pki` directories on the array's own NBD port: the NbdServer (nbd/server.py)
in-process over a real pool, its TLS context from nbd/tls.py and its host identity the
daemon's (provider.daemon._peer_host: the CN, checked as LUN masking checks host names),
with nbdinfo (libnbd, GnuTLS) as the client. Each host lists exactly the LUNs presented
to its CN; a certificate whose CN is not a host name (made by hand with the CA key) is
refused on its own connection while the server goes on serving; a bad --tls-dir is one
line naming the file. No kernel needed."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_thread import NbdThread
from support import need

from blockstore import Pool
from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import Presentation
from nbd import pki, tls
from nbd.server import NbdServer
from nbd.settings import NbdSettings
from provider import daemon

MiB = 1 << 20
TIMEOUT = 20.0


class Running(NbdThread):
    """An NbdServer with TLS on 127.0.0.1, in a trio loop of its own thread."""

    def __init__(self, pool: Pool, presentation: Presentation, tls_dir: Path) -> None:
        super().__init__(NbdServer(pool, WriteBarrier(pool), presentation,
                                   tls.server_context(tls_dir), daemon._peer_host))


@pytest.fixture
def array(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    need("nbdinfo")
    certs = tmp_path / "pki"
    pki.init(certs, ["localhost", "127.0.0.1"])
    for host in ("hostA", "hostB"):
        pki.issue_host(host, tmp_path / host, certs)
    pool = Pool.create(str(tmp_path / "pool"))
    for name in ("a", "b", "shared"):
        pool.create_volume(name, 4 * MiB)
    presentation = Presentation("here")
    presentation.update("here", {"a": frozenset({"hostA"}), "b": frozenset({"hostB"}),
                                 "shared": frozenset({"hostA", "hostB"})}, ())
    r = Running(pool, presentation, certs)
    try:
        yield r, tmp_path
    finally:
        r.stop()
        pool.close()


def nbdinfo_list(port: int, certs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", "--list", "--json",
                           f"nbds://127.0.0.1:{port}/?tls-certificates={certs}"],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def exports(res: subprocess.CompletedProcess[str]) -> set[str]:
    assert res.returncode == 0, res.stderr
    return {e["export-name"] for e in json.loads(res.stdout)["exports"]}


def test_each_host_lists_what_is_presented_to_its_cn(array: tuple[Running, Path]) -> None:
    r, base = array
    assert exports(nbdinfo_list(r.port, base / "hostA")) == {"volumes/a", "volumes/shared"}
    assert exports(nbdinfo_list(r.port, base / "hostB")) == {"volumes/b", "volumes/shared"}


def test_a_cn_that_is_no_host_name_is_refused_and_the_server_goes_on(
        array: tuple[Running, Path], caplog: pytest.LogCaptureFixture) -> None:
    r, base = array
    ca = pki.load_ca(base / "pki")
    key = pki.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = pki.make_client_cert(ca, key, "../hostA", now - dt.timedelta(minutes=5),
                                now + dt.timedelta(days=1))
    odd = base / "odd"
    odd.mkdir()
    shutil.copy(base / "pki" / "ca-cert.pem", odd / "ca-cert.pem")
    (odd / "client-cert.pem").write_bytes(pki.cert_pem(cert))
    (odd / "client-key.pem").write_bytes(pki.key_pem(key))
    with caplog.at_level(logging.WARNING, logger="nbd"):
        res = nbdinfo_list(r.port, odd)
    assert res.returncode != 0 and res.stdout == "", res
    assert any("refused" in m and "not a valid host name" in m for m in caplog.messages), \
        caplog.messages
    assert r.alive()
    assert exports(nbdinfo_list(r.port, base / "hostA")) == {"volumes/a", "volumes/shared"}


def test_a_bad_tls_dir_is_one_line_naming_the_file(tmp_path: Path) -> None:
    pki.init(tmp_path / "pki", ["localhost"])
    (tmp_path / "pki" / "server-key.pem").unlink()
    with pytest.raises(daemon.ServeError, match=r"server-key\.pem is missing") as e:
        daemon._nbd_tls(NbdSettings("127.0.0.1", 0, str(tmp_path / "pki"), False))
    assert "\n" not in str(e.value)
