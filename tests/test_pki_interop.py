"""`shadowplex pki` directories in the hands of GnuTLS peers -- the TLS stack of qemu,
nbdkit and libnbd, which is what the array's NBD clients will use:

- nbdkit (GnuTLS server, --tls-verify-peer) serves our server directory and nbdinfo
  (libnbd, GnuTLS client) connects with a host directory, by IP address and by name; a
  host certificate from another CA is refused;
- qemu-nbd and qemu-img, whose tls-creds-x509 also runs qemu's own sanity checks of
  every certificate (basic constraints, key usage, purpose, validity) when it loads them;
- nbdinfo against nbd/tls.py's server context, behind a minimal NBD handshake
  (fixed newstyle, NBD_OPT_STARTTLS, NBD_OPT_GO): GnuTLS accepts our server, and the
  server takes the host name from the GnuTLS client's certificate.

Each tool is skipped when it is not installed (make setup installs them). Every server
runs on a free loopback port with bounded waits and is killed in `finally`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import need

from nbd import pki, tls

TIMEOUT = 20.0
SIZE = 1 << 20


@dataclass
class Dirs:
    array: Path
    host_a: Path
    foreign: Path     # hostA's certificate from another CA, beside the array's ca-cert.pem


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    base = tmp_path_factory.mktemp("pki-interop")
    d = Dirs(base / "array", base / "hostA", base / "foreign")
    pki.init(d.array)
    pki.issue_host("hostA", d.host_a, d.array)
    pki.init(base / "other", ["localhost"])
    pki.issue_host("hostA", d.foreign, base / "other")
    shutil.copy(d.array / "ca-cert.pem", d.foreign / "ca-cert.pem")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited {proc.returncode}: "
                                 f"{proc.communicate()[1]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"{proc.args[0]} does not listen on port {port}")


@contextlib.contextmanager
def server(*argv: str, port: int) -> Iterator[list[str]]:
    """A server process listening on 127.0.0.1:port; stopped whatever happens. Yields a
    list that holds the server's stderr once it has stopped."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log: list[str] = []
    try:
        wait_listening(port, proc)
        yield log
    finally:
        proc.terminate()
        try:
            log.append(proc.communicate(timeout=5)[1])
        except subprocess.TimeoutExpired:
            proc.kill()
            log.append(proc.communicate()[1])


def nbdinfo_size(host: str, port: int, certs: Path) -> subprocess.CompletedProcess[str]:
    # libnbd takes the certificate directory in the URI (nbdinfo has no option for it)
    uri = f"nbds://{host}:{port}?tls-certificates={certs}"
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


# ------------------------------------------------------------------------ nbdkit
def test_nbdkit_and_nbdinfo_accept_our_directories(dirs: Dirs) -> None:
    need("nbdkit")
    need("nbdinfo")
    port = free_port()
    with server("nbdkit", "--foreground", "--exit-with-parent", "--tls=require",
                f"--tls-certificates={dirs.array}", "--tls-verify-peer",
                "-i", "127.0.0.1", "-p", str(port), "memory", str(SIZE), port=port) as log:
        for host in ("127.0.0.1", "localhost"):
            res = nbdinfo_size(host, port, dirs.host_a)
            assert res.returncode == 0 and res.stdout.strip() == str(SIZE), res.stderr
        res = nbdinfo_size("127.0.0.1", port, dirs.foreign)
        assert res.returncode != 0 and res.stdout == "", res
    # refused by nbdkit's GnuTLS (the client trusts the array's CA, it did go on)
    assert "gnutls_handshake: Error in the certificate" in log[0], log


# ------------------------------------------------------------------------ qemu
def test_qemu_nbd_and_qemu_img_accept_our_directories(dirs: Dirs, tmp_path: Path) -> None:
    need("qemu-nbd")
    need("qemu-img")
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    port = free_port()
    with server("qemu-nbd", "--object", f"tls-creds-x509,id=tls0,dir={dirs.array},"
                "endpoint=server,verify-peer=on", "--tls-creds", "tls0", "-b", "127.0.0.1",
                "-p", str(port), "-t", "-f", "raw", str(image), port=port):
        res = subprocess.run(
            ["qemu-img", "info", "--output=json", "--object",
             f"tls-creds-x509,id=tls0,dir={dirs.host_a},endpoint=client",
             "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert res.returncode == 0, res.stderr
        assert f'"virtual-size": {SIZE}' in res.stdout, res.stdout


# ------------------------------------------------------------------------ our server
NBDMAGIC, IHAVEOPT, REPLY_MAGIC, REQUEST_MAGIC = b"NBDMAGIC", b"IHAVEOPT", 0x3E889045565A9, \
    0x25609513
OPT_ABORT, OPT_STARTTLS, OPT_INFO, OPT_GO = 2, 5, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP, REP_ERR_TLS_REQD = 1, 3, 0x80000001, 0x80000005
CMD_DISC = 2


@dataclass
class Seen:
    peer: dict[str, Any] | None = None
    version: str | None = None
    error: BaseException | None = None


def _exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError(f"the client closed the connection ({len(buf)} of {n} bytes)")
        buf += got
    return buf


def _reply(s: socket.socket, opt: int, kind: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, kind, len(data)) + data)


def nbd_starttls_once(listener: socket.socket, ctx: ssl.SSLContext, seen: Seen) -> None:
    """Serve one NBD client the way the array's server will start: fixed newstyle, TLS
    required (NBD_OPT_STARTTLS, then our context), one read-only export of SIZE bytes
    (NBD_OPT_GO), then wait for NBD_CMD_DISC. No data is served."""
    try:
        conn, _ = listener.accept()
        sock: socket.socket = conn
        try:
            sock.settimeout(TIMEOUT)
            sock.sendall(NBDMAGIC + IHAVEOPT + struct.pack(">H", 1 | 2))   # FIXED, NO_ZEROES
            _exact(sock, 4)                                                # client flags
            while True:
                magic, opt, length = struct.unpack(">8sII", _exact(sock, 16))
                assert magic == IHAVEOPT, magic
                _exact(sock, length)
                if opt == OPT_STARTTLS and not isinstance(sock, ssl.SSLSocket):
                    _reply(sock, opt, REP_ACK)
                    sock = ctx.wrap_socket(sock, server_side=True)
                    seen.peer, seen.version = sock.getpeercert(), sock.version()
                elif not isinstance(sock, ssl.SSLSocket):
                    _reply(sock, opt, REP_ERR_TLS_REQD)
                elif opt in (OPT_INFO, OPT_GO):
                    _reply(sock, opt, REP_INFO, struct.pack(">HQH", 0, SIZE, 1 | 2))
                    _reply(sock, opt, REP_ACK)
                    if opt == OPT_GO:
                        break
                elif opt == OPT_ABORT:
                    _reply(sock, opt, REP_ACK)
                    return
                else:
                    _reply(sock, opt, REP_ERR_UNSUP)
            while True:                                                    # transmission
                magic, _flags, kind, _h, _o, _n = struct.unpack(">IHHQQI", _exact(sock, 28))
                assert magic == REQUEST_MAGIC, hex(magic)
                if kind == CMD_DISC:
                    return
        finally:
            sock.close()
    except Exception as e:   # noqa: BLE001 - the test looks at it
        seen.error = e


def _nbdinfo_against_our_server(ctx: ssl.SSLContext, certs: Path, host: str
                                ) -> tuple[subprocess.CompletedProcess[str], Seen]:
    seen = Seen()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        t = threading.Thread(target=nbd_starttls_once, args=(listener, ctx, seen),
                             name="nbd-stub", daemon=True)
        t.start()
        try:
            res = nbdinfo_size(host, port, certs)
        finally:
            t.join(TIMEOUT + 5)
        assert not t.is_alive(), "the NBD stub hangs"
    return res, seen


def test_nbdinfo_accepts_our_server_and_we_take_its_host_name(dirs: Dirs) -> None:
    need("nbdinfo")
    ctx = tls.server_context(dirs.array)
    for host in ("127.0.0.1", "localhost"):
        res, seen = _nbdinfo_against_our_server(ctx, dirs.host_a, host)
        assert seen.error is None, (seen.error, res.stderr)
        assert res.returncode == 0 and res.stdout.strip() == str(SIZE), res.stderr
        assert tls.peer_host_name(seen.peer) == "hostA"
        assert seen.version == "TLSv1.3"


def test_our_server_refuses_a_gnutls_client_of_another_ca(dirs: Dirs) -> None:
    need("nbdinfo")
    res, seen = _nbdinfo_against_our_server(tls.server_context(dirs.array), dirs.foreign,
                                            "127.0.0.1")
    assert res.returncode != 0
    assert isinstance(seen.error, ssl.SSLError), seen.error
    assert "certificate verify failed" in str(seen.error), seen.error
    assert seen.peer is None
