"""The NBD protocol's numbers and wire structures (fixed newstyle handshake, simple and
structured replies), as the upstream specification (doc/proto.md of the NBD project)
defines them. Pure: no I/O; the server (nbd/server.py,
transmission.py) and nbd/client.py speak it.

Only what our server and client use is here. Names follow proto.md without the NBD_
prefix.
"""

from __future__ import annotations

import errno as _errno
import struct

# -- handshake --------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253      # where IHAVEOPT would be: an oldstyle server
REPLY_MAGIC = 0x3E889045565A9          # option replies
FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server) / client flags
FLAG_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_ERR = 1 << 31
REP_ERR_UNSUP = _ERR + 1
REP_ERR_POLICY = _ERR + 2
REP_ERR_INVALID = _ERR + 3
REP_ERR_PLATFORM = _ERR + 4
REP_ERR_TLS_REQD = _ERR + 5
REP_ERR_UNKNOWN = _ERR + 6
REP_ERR_SHUTDOWN = _ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _ERR + 8
REP_ERR_TOO_BIG = _ERR + 9
REP_NAMES = {REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO",
             REP_META_CONTEXT: "META_CONTEXT", REP_ERR_UNSUP: "ERR_UNSUP",
             REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
             REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
             REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
             REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG"}


def is_error_reply(reply_type: int) -> bool:
    return bool(reply_type & _ERR)


# NBD_OPT_INFO / NBD_OPT_GO information types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

# -- transmission -----------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# error values on the wire (proto.md: Linux numbers, a fixed subset)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# errno -> the subset of error values NBD puts on the wire (the server's answer; a
# read-only LUN's EROFS is EPERM there, as proto.md asks for writes to read-only exports)
ERRNO_TO_WIRE = {_errno.EPERM: EPERM, _errno.EROFS: EPERM, _errno.EIO: EIO,
                 _errno.ENOMEM: ENOMEM, _errno.EINVAL: EINVAL, _errno.ENOSPC: ENOSPC,
                 _errno.EDQUOT: ENOSPC, _errno.EFBIG: ENOSPC, _errno.EOVERFLOW: EOVERFLOW,
                 _errno.EOPNOTSUPP: ENOTSUP, _errno.ESHUTDOWN: ESHUTDOWN}
# wire -> errno (the client's side); proto.md: "The client SHOULD treat an unexpected
# error value as if it had been NBD_EINVAL" (wire_errno does)
WIRE_TO_ERRNO = {EPERM: _errno.EPERM, EIO: _errno.EIO, ENOMEM: _errno.ENOMEM,
                 EINVAL: _errno.EINVAL, ENOSPC: _errno.ENOSPC, EOVERFLOW: _errno.EOVERFLOW,
                 ENOTSUP: _errno.EOPNOTSUPP, ESHUTDOWN: _errno.ESHUTDOWN}


def wire_errno(value: int) -> int:
    return WIRE_TO_ERRNO.get(value, _errno.EINVAL)


# -- structures -------------------------------------------------------------------------
SERVER_GREETING = struct.Struct(">QQH")        # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")          # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")          # REPLY_MAGIC, option, type, length
REQUEST = struct.Struct(">IHHQQI")             # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")           # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")     # magic, flags, type, cookie, length
# the rest of a reply after its 4-byte magic (a client reads the magic first to know which)
SIMPLE_REPLY_REST = struct.Struct(">IQ")        # error, cookie
STRUCTURED_REPLY_REST = struct.Struct(">HHQI")  # flags, type, cookie, length
INFO_EXPORT_DATA = struct.Struct(">HQH")        # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_DATA = struct.Struct(">HIII")   # INFO_BLOCK_SIZE, minimum, preferred, max
ERROR_CHUNK_HEAD = struct.Struct(">IH")         # error, message length
OFFSET_HOLE = struct.Struct(">QI")              # offset, hole size
BLOCK_DESCRIPTOR = struct.Struct(">II")         # extent length, status flags

MAX_OPTION_DATA = 64 * 1024                    # no option of ours needs more
MAX_NAME = 4096                                # proto.md: names up to 4096 bytes
# proto.md's size constraints without NBD_INFO_BLOCK_SIZE: minimum 1, preferred 4096,
# and a maximum payload of 32 MiB that every server must accept
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_PAYLOAD = 1 << 25
MAX_STATUS_DESCRIPTORS = 1 << 20               # proto.md: a server SHOULD NOT send more


def option(opt: int, data: bytes = b"") -> bytes:
    """An option request (the client's side of option haggling)."""
    return OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def name_data(name: str) -> bytes:
    """A u32 length + UTF-8 export name: how GO, INFO and the META_CONTEXT options start."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def go_data(name: str, info_requests: list[int]) -> bytes:
    """NBD_OPT_GO / NBD_OPT_INFO data (parse_names + parse_info_requests read it)."""
    return name_data(name) + struct.pack(f">H{len(info_requests)}H", len(info_requests),
                                         *info_requests)


def meta_context_data(name: str, queries: list[str]) -> bytes:
    """LIST/SET_META_CONTEXT data (parse_names + parse_meta_queries read it)."""
    return name_data(name) + struct.pack(">I", len(queries)) + b"".join(
        name_data(q) for q in queries)


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply_type, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT_DATA.pack(INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_DATA.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


# a READ's one structured chunk (OFFSET_DATA): the reply header and the data's offset
_DATA_CHUNK = struct.Struct(STRUCTURED_REPLY.format + "Q")


def read_reply_head(structured: bool, cookie: int, offset: int, length: int) -> bytes:
    """What goes before a READ's `length` bytes of data: one OFFSET_DATA chunk with
    REPLY_FLAG_DONE, or a simple reply."""
    if structured:
        return _DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)


def structured_header(cookie: int, reply_type: int, length: int, done: bool) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                 reply_type, cookie, length)


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:4096]
    payload = ERROR_CHUNK_HEAD.pack(error, len(msg)) + msg
    return structured_header(cookie, REPLY_TYPE_ERROR, len(payload), True) + payload


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is closed (after a reply if one can
    still be given)."""


def parse_names(data: bytes) -> tuple[str, bytes]:
    """An export name (u32 length + bytes, UTF-8) at the start of option data, and the
    rest. ProtocolError if the lengths do not add up or the name is not UTF-8."""
    if len(data) < 4:
        raise ProtocolError("option data too short for an export name")
    (n,) = struct.unpack_from(">I", data)
    if n > MAX_NAME or 4 + n > len(data):
        raise ProtocolError("export name length beyond the option data")
    try:
        name = data[4:4 + n].decode()
    except UnicodeDecodeError:
        raise ProtocolError("export name is not UTF-8") from None
    return name, data[4 + n:]


def parse_info_requests(rest: bytes) -> list[int]:
    """The information types a GO/INFO asks for (u16 count + u16 each)."""
    if len(rest) < 2:
        raise ProtocolError("GO/INFO without its information request count")
    (n,) = struct.unpack_from(">H", rest)
    if len(rest) != 2 + 2 * n:
        raise ProtocolError("GO/INFO information requests do not match their count")
    return list(struct.unpack_from(f">{n}H", rest, 2))


def parse_meta_queries(rest: bytes) -> list[str]:
    """The queries of LIST/SET_META_CONTEXT (u32 count, then u32 length + string)."""
    if len(rest) < 4:
        raise ProtocolError("meta context option without its query count")
    (n,) = struct.unpack_from(">I", rest)
    pos, out = 4, []
    for _ in range(n):
        if pos + 4 > len(rest):
            raise ProtocolError("meta context query beyond the option data")
        (length,) = struct.unpack_from(">I", rest, pos)
        pos += 4
        if length > MAX_NAME or pos + length > len(rest):
            raise ProtocolError("meta context query length beyond the option data")
        try:
            out.append(rest[pos:pos + length].decode())
        except UnicodeDecodeError:
            raise ProtocolError("meta context query is not UTF-8") from None
        pos += length
    if pos != len(rest):
        raise ProtocolError("trailing bytes after the meta context queries")
    return out
