"""The client's side of the NBD handshake (nbd/client.py uses it): fixed newstyle with
NO_ZEROES, STARTTLS when a TLS context is given (a server that does not agree ends the
attempt: never on in plain text, proto.md's advice against downgrades),
STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO asking for NBD_INFO_BLOCK_SIZE
(whose constraints the client then keeps: proto.md says a client that asks MUST) and
NBD_INFO_DESCRIPTION (kept in ExportInfo.description; host mode reads the LUN's naa
there), and
EXPORT_NAME for a server without GO. Every receive is within one deadline; every reply
length is bounded before it is read. Also the client's exceptions and ExportInfo.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass

from . import protocol as p

MAX_PAYLOAD = p.DEFAULT_MAX_PAYLOAD   # our cap on one READ/WRITE, whatever the server allows
MAX_OPTION_REPLY = p.MAX_OPTION_DATA  # option reply payloads
MAX_OPTION_REPLIES = 64               # replies to one option before we call it hostile


class HandshakeError(ConnectionError):
    """The server refused the connection during option haggling (`reply`: the
    NBD_REP_ERR_* it gave, 0 when it did not give one)."""

    def __init__(self, message: str, reply: int = 0) -> None:
        super().__init__(message)
        self.reply = reply


class NoSuchExport(HandshakeError):
    """NBD_REP_ERR_UNKNOWN: no such export -- or one this host may not see (LUN masking
    answers exactly as for a name that does not exist)."""


class NbdProtocolError(p.ProtocolError, ConnectionError):
    """The server broke the protocol; the connection is closed."""


class NbdTimeout(ConnectionError, TimeoutError):
    """No answer in time; the connection is closed (a late reply would be misread)."""



@dataclass(frozen=True)
class ExportInfo:
    """What GO (or EXPORT_NAME) said about the export, and what was negotiated."""

    name: str
    size: int
    flags: int                 # transmission flags (TF_*)
    min_block: int
    preferred_block: int
    max_payload: int           # the server's maximum, capped to MAX_PAYLOAD
    structured: bool
    status_context: int | None  # the id of base:allocation, if the server agreed
    tls: bool
    description: str = ""       # NBD_INFO_DESCRIPTION, if the server sent one (ours names
                                # the LUN's naa: host mode checks a connection's identity)


class ExportProperties:
    """The flags of an export as properties (NbdClient and NbdPool)."""

    info: ExportInfo

    @property
    def size(self) -> int:
        return self.info.size

    def _flag(self, bit: int) -> bool:
        return bool(self.info.flags & bit)

    @property
    def read_only(self) -> bool:
        return self._flag(p.TF_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._flag(p.TF_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._flag(p.TF_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._flag(p.TF_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return self._flag(p.TF_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(p.TF_CAN_MULTI_CONN)

    @property
    def can_block_status(self) -> bool:
        return self.info.status_context is not None


class _Handshake:
    """Option haggling on a fresh socket, every receive within one deadline."""

    def __init__(self, sock: socket.socket, where: str, deadline: float) -> None:
        self.sock = sock
        self.where = where
        self.deadline = deadline

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise NbdTimeout(f"{self.where}: the NBD handshake did not finish in time")
        return left

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            self.sock.settimeout(self._left())
            more = self.sock.recv(n - len(out))
            if not more:
                raise ConnectionError(f"{self.where}: the server closed the connection "
                                      "during the NBD handshake")
            out += more
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(data)

    def reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
        if magic != p.REPLY_MAGIC or ropt != opt:
            raise NbdProtocolError(f"{self.where}: bad option reply (magic {magic:#x}, "
                                   f"option {ropt}, expected {opt})")
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(f"{self.where}: option reply of {length} bytes")
        return rtype, self.recv(length)

    def refused(self, what: str, rtype: int, data: bytes) -> HandshakeError:
        msg = data[:p.MAX_NAME].decode(errors="replace")
        name = p.REP_NAMES.get(rtype, f"reply {rtype:#x}")
        if rtype == p.REP_ERR_TLS_REQD:
            return HandshakeError(f"{self.where}: the NBD server requires TLS (give the "
                                  f"client a TLS context / --tls-dir): {msg}", rtype)
        cls = NoSuchExport if rtype == p.REP_ERR_UNKNOWN else HandshakeError
        return cls(f"{self.where}: {what}: {name}" + (f": {msg}" if msg else ""), rtype)

    def run(self, host: str, export: str, tls: ssl.SSLContext | None,
            server_hostname: str | None, block_status: bool) -> ExportInfo:
        magic, ihave, hflags = p.SERVER_GREETING.unpack(self.recv(p.SERVER_GREETING.size))
        if magic != p.NBDMAGIC:
            raise NbdProtocolError(f"{self.where}: not an NBD server (magic {magic:#x})")
        if ihave != p.IHAVEOPT or not hflags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError(f"{self.where}: the server does not speak the fixed "
                                   "newstyle handshake (oldstyle servers are not supported)")
        no_zeroes = bool(hflags & p.FLAG_NO_ZEROES)
        self.send(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE
                                      | (p.FLAG_NO_ZEROES if no_zeroes else 0)))
        if tls is not None:
            self.send(p.option(p.OPT_STARTTLS))
            rtype, data = self.reply(p.OPT_STARTTLS)
            if rtype != p.REP_ACK:
                raise self.refused("the server refused STARTTLS; not going on in plain "
                                   "text", rtype, data)
            self.sock.settimeout(self._left())
            try:
                self.sock = tls.wrap_socket(self.sock,
                                            server_hostname=server_hostname or host)
            except TimeoutError:
                raise
            except OSError as e:   # SSLError (a certificate refused) or a reset
                raise HandshakeError(f"{self.where}: TLS handshake failed: {e}") from e
        structured = self._structured()
        context = self._meta_context(export) if structured and block_status else None
        size, flags, blocks, description = self._go(export, no_zeroes)
        return ExportInfo(export, size, flags, blocks[0], blocks[1],
                          min(blocks[2], MAX_PAYLOAD), structured, context, tls is not None,
                          description)

    def _structured(self) -> bool:
        self.send(p.option(p.OPT_STRUCTURED_REPLY))
        rtype, data = self.reply(p.OPT_STRUCTURED_REPLY)
        if rtype == p.REP_ACK:
            return True
        if rtype == p.REP_ERR_TLS_REQD or not p.is_error_reply(rtype):
            raise self.refused("STRUCTURED_REPLY", rtype, data)
        return False   # simple replies it is

    def _meta_context(self, export: str) -> int | None:
        self.send(p.option(p.OPT_SET_META_CONTEXT,
                           p.meta_context_data(export, [p.BASE_ALLOCATION])))
        context = None
        for _ in range(MAX_OPTION_REPLIES):
            rtype, data = self.reply(p.OPT_SET_META_CONTEXT)
            if rtype == p.REP_ACK:
                return context
            if rtype == p.REP_META_CONTEXT and len(data) >= 4:
                if data[4:] == p.BASE_ALLOCATION.encode():
                    (context,) = struct.unpack_from(">I", data)
            elif rtype == p.REP_ERR_TLS_REQD or not p.is_error_reply(rtype):
                raise self.refused("SET_META_CONTEXT", rtype, data)
            else:   # no block status then; GO says whether the export itself is there
                return None
        raise NbdProtocolError(f"{self.where}: endless replies to SET_META_CONTEXT")

    def _go(self, export: str, no_zeroes: bool
            ) -> tuple[int, int, tuple[int, int, int], str]:
        self.send(p.option(p.OPT_GO, p.go_data(export, [p.INFO_BLOCK_SIZE,
                                                        p.INFO_DESCRIPTION])))
        export_info: tuple[int, int] | None = None
        description = ""
        blocks = (p.DEFAULT_MIN_BLOCK, p.DEFAULT_PREFERRED_BLOCK, p.DEFAULT_MAX_PAYLOAD)
        for _ in range(MAX_OPTION_REPLIES):
            rtype, data = self.reply(p.OPT_GO)
            if rtype == p.REP_ACK:
                if export_info is None:
                    raise NbdProtocolError(f"{self.where}: GO {export!r} ended without "
                                           "the export's size")
                return export_info[0], export_info[1], blocks, description
            if rtype == p.REP_INFO and len(data) >= 2:
                (kind,) = struct.unpack_from(">H", data)
                if kind == p.INFO_EXPORT and len(data) == p.INFO_EXPORT_DATA.size:
                    _, size, flags = p.INFO_EXPORT_DATA.unpack(data)
                    export_info = (size, flags if flags & p.TF_HAS_FLAGS else 0)
                elif kind == p.INFO_BLOCK_SIZE and len(data) == p.INFO_BLOCK_SIZE_DATA.size:
                    blocks = self._blocks(*p.INFO_BLOCK_SIZE_DATA.unpack(data)[1:])
                elif kind == p.INFO_DESCRIPTION:   # bounded by MAX_OPTION_REPLY
                    description = data[2:].decode(errors="replace")
                elif kind in (p.INFO_EXPORT, p.INFO_BLOCK_SIZE):
                    raise NbdProtocolError(f"{self.where}: INFO {kind} of {len(data)} bytes")
            elif rtype == p.REP_ERR_UNSUP:
                return self._export_name(export, no_zeroes) + (blocks, "")
            elif p.is_error_reply(rtype):
                raise self.refused(f"cannot open export {export!r}", rtype, data)
            else:
                raise NbdProtocolError(f"{self.where}: reply {rtype:#x} to GO")
        raise NbdProtocolError(f"{self.where}: endless replies to GO")

    def _blocks(self, minimum: int, preferred: int, maximum: int) -> tuple[int, int, int]:
        """proto.md's rules for NBD_INFO_BLOCK_SIZE; a server breaking them is refused
        rather than guessed about (a wrong alignment could corrupt data)."""
        def pow2(n: int) -> bool:
            return n > 0 and not n & (n - 1)
        if not (pow2(minimum) and minimum <= 1 << 16 and pow2(preferred)
                and preferred >= max(minimum, 512) and maximum >= preferred
                and maximum % minimum == 0):
            raise NbdProtocolError(f"{self.where}: impossible block sizes {minimum}/"
                                   f"{preferred}/{maximum}")
        return minimum, preferred, maximum

    def _export_name(self, export: str, no_zeroes: bool) -> tuple[int, int]:
        """The fallback for a server without GO: no error reply exists, a refusal is a
        closed connection."""
        self.send(p.option(p.OPT_EXPORT_NAME, export.encode()))
        try:
            size, flags = struct.unpack(">QH", self.recv(10 if no_zeroes else 134)[:10])
        except ConnectionError as e:
            raise NoSuchExport(f"{self.where}: the server closed the connection at "
                               f"EXPORT_NAME {export!r} (no such export?)") from e
        return size, flags if flags & p.TF_HAS_FLAGS else 0
