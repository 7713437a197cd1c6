"""On-disk format constants and the small self-describing files of a pool.

The canonical description is docs/format.md; keep the two in step.

POOL/pool.json            format name + version, chunk size, pool id (written once)
POOL/lock                 flock'ed by the one process that owns the pool; holds its pid
POOL/catalog.sqlite       the catalog (WAL): volumes, snapshots, counters
POOL/luns/<id>.img        raw sparse image of a volume, plex or full snapshot
POOL/luns/<id>.hdr        the LUN header: the identity that travels with the LUN
POOL/luns/<id>.sum        xxh3 per chunk of a sealed full copy (0 = all-zero chunk)
POOL/diff/<id>.data       diff area of origin volume <id>: chunk-sized slots
POOL/diff/<id>.map        one 32-byte record per slot (see MapRecord)
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time

import xxhash

from .errors import FormatError
from .fileio import write_file_atomic

FORMAT_NAME = "shadowplex-pool"
FORMAT_VERSION = 1
HEADER_FORMAT = "shadowplex-lun"

MIN_CHUNK = 4096
MAX_CHUNK = 1 << 20
DEFAULT_CHUNK = 64 * 1024

# LUN flags (stored in the header and the catalog)
FLAG_READ_ONLY = 0x1
FLAG_HIDDEN = 0x2
FLAG_SHADOW = 0x4

# Diff-area map record: one per slot, at offset slot * MAP_RECORD_SIZE.
#   magic 4s | flags u16 | version u16 | epoch u32 | chunk u64 | xxh3 of slot data u64 | check u32
# check = xxh32 of the first 28 bytes. An all-zero record is a free slot; a record whose
# check fails is a torn write of a record that was never synced, hence also free.
MAP_MAGIC = b"SPXM"
MAP_STRUCT = struct.Struct("<4sHHIQQ")
MAP_RECORD_SIZE = 32
MAP_FLAG_ZERO = 0x1   # the preserved chunk was all zeros: no data stored in the slot
MAP_FLAG_NOSUM = 0x2  # preserved by reference (reflink): no digest yet (see seal records)
MAP_VERSION = 1

# Seal record of diff/<id>.sum: one per slot, at offset slot * SEAL_RECORD_SIZE, the
# digest a seal computed for a slot preserved without one (MAP_FLAG_NOSUM):
#   xxh3 of the slot data u64 | check u64 = xxh3_64 of (slot, epoch, chunk, digest)
# The check binds the digest to the record it was computed for: a torn entry or one
# left over from a slot freed and reused since does not match, and the slot is simply
# not sealed.
SEAL_RECORD_SIZE = 16
_SEAL_BODY = struct.Struct("<QIQQ")


def pack_map_record(flags: int, epoch: int, chunk: int, digest: int) -> bytes:
    body = MAP_STRUCT.pack(MAP_MAGIC, flags, MAP_VERSION, epoch, chunk, digest)
    return body + struct.pack("<I", xxhash.xxh32_intdigest(body))


def unpack_map_record(rec: bytes) -> tuple[int, int, int, int] | None:
    """(flags, epoch, chunk, digest) of a valid record, else None (free or torn)."""
    if len(rec) < MAP_RECORD_SIZE or rec[:4] != MAP_MAGIC:
        return None
    body = rec[:28]
    if struct.unpack_from("<I", rec, 28)[0] != xxhash.xxh32_intdigest(body):
        return None
    _magic, flags, _version, epoch, chunk, digest = MAP_STRUCT.unpack(body)
    return flags, epoch, chunk, digest


def pack_seal_record(slot: int, epoch: int, chunk: int, digest: int) -> bytes:
    check = xxhash.xxh3_64_intdigest(_SEAL_BODY.pack(slot, epoch, chunk, digest))
    return struct.pack("<QQ", digest, check)


def unpack_seal_record(rec: bytes, slot: int, epoch: int, chunk: int) -> int | None:
    """The digest of a seal record made for this (slot, epoch, chunk), else None."""
    if len(rec) < SEAL_RECORD_SIZE:
        return None
    digest, check = struct.unpack_from("<QQ", rec)
    if check != xxhash.xxh3_64_intdigest(_SEAL_BODY.pack(slot, epoch, chunk, digest)):
        return None
    return int(digest)


def check_chunk_size(chunk_size: object) -> int:
    """The chunk size if valid (any type is accepted: it may come from pool.json)."""
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
            or chunk_size < MIN_CHUNK or chunk_size > MAX_CHUNK
            or chunk_size & (chunk_size - 1)):
        raise FormatError(
            f"invalid chunk size {chunk_size!r}: must be a power of two from 4 KiB to 1 MiB")
    return chunk_size


def new_pool_id() -> str:
    return secrets.token_hex(16)


def new_naa() -> str:
    """A 128-bit NAA type 6 (IEEE Registered Extended) style identifier, 32 hex digits.

    The first nibble is 6; the rest is random. Uniqueness within the pool is enforced by
    the catalog's table of every naa ever issued, so an id is never reused.
    """
    return "6" + secrets.token_hex(16)[1:]


def write_pool_file(path: str, chunk_size: int, pool_id: str) -> None:
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "chunk_size": chunk_size,
           "pool_id": pool_id, "created": time.time()}
    write_file_atomic(os.path.join(path, "pool.json"), json.dumps(doc, indent=1).encode())


def read_pool_file(path: str) -> dict:
    fn = os.path.join(path, "pool.json")
    try:
        with open(fn, "rb") as f:
            doc = json.loads(f.read(65536))
    except FileNotFoundError:
        raise FormatError(f"{path} is not a shadowplex pool (no pool.json); "
                          "create one with 'shadowplex pool init'") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{fn} is unreadable or damaged: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not a shadowplex pool ({fn} names another format)")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{fn} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(f"pool {path} has format version {version}, newer than this "
                          f"shadowplex supports ({FORMAT_VERSION}); upgrade shadowplex")
    check_chunk_size(doc.get("chunk_size"))
    if not isinstance(doc.get("pool_id"), str):
        raise FormatError(f"{fn} has no pool_id")
    return doc


def header_doc(**fields: object) -> bytes:
    doc = {"format": HEADER_FORMAT, "version": FORMAT_VERSION}
    doc.update(fields)
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def write_header(path: str, **fields: object) -> None:
    write_file_atomic(path, header_doc(**fields))


def read_header(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(65536))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == HEADER_FORMAT else None
