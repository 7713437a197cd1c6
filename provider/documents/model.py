"""What the documents hold, and the small checks writing and parsing share.

The names and values written (the namespaces, VDS_LUN_INFORMATION, the page-83
STORAGE_DEVICE_ID_DESCRIPTOR), the parse results (:class:`ParsedSet` and its parts), what
the writer needs of a set and a snapshot (:class:`SetLike`, :class:`SnapshotLike`), and
the checks of GUIDs, naa ids, host names and pool ids both directions use.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from .. import vss
from ..vss import Attr, Context
from ..writers.base import UsageType
from .xmlsafe import _err

# --------------------------------------------------------------------------- names
# Namespaces. The two VSS ones are the default xmlns Windows writes on the root of each
# document (seen in BCDs and WMDs saved by diskshadow: KevinGoode/vssbackup
# data/*/BCDocument.xml and data/*/WM*.xml). Ours holds shadowplex's additions.
BCD_NAMESPACE = "x-schema:#VssComponentMetadata"
WMD_NAMESPACE = "x-schema:#VssWriterMetadataInfo"
SP_NAMESPACE = "urn:shadowplex:vss-documents:1"
_SP = "sp"  # the prefix we write for SP_NAMESPACE

#: ``version`` we write on BACKUP_COMPONENTS and WRITER_METADATA (Windows Server 2012+
#: saves "1.2", see the samples above).
DOCUMENT_VERSION = "1.2"
#: filespecBackupType Windows writes for "every backup type needs these files" (0xF0F,
#: VSS_FSBT_ALL_BACKUP_REQUIRED | VSS_FSBT_ALL_SNAPSHOT_REQUIRED), as in the samples.
FILESPEC_BACKUP_TYPE = "3855"

# VDS_LUN_INFORMATION values we write (Microsoft Learn, vdslun.h).
VENDOR_ID = "SHADOWPX"        # == provider.hardware.VENDOR (a test checks they agree)
PRODUCT_ID = "shadowplex LUN"  # == provider.hardware.PRODUCT
BUS_TYPE_FILE_BACKED_VIRTUAL = 0xF  # VDS_STORAGE_BUS_TYPE VDSBusTypeFileBackedVirtual
DEVICE_TYPE_DISK = 0               # SCSI peripheral device type 0: direct access block
NIL_GUID = "00000000-0000-0000-0000-000000000000"

# STORAGE_DEVICE_ID_DESCRIPTOR / STORAGE_IDENTIFIER (MS-CSVP 2.2.9 and 2.2.10; the
# identifier codes are SPC-3 7.6.3.1: code set 1 = binary, designator type 3 = NAA,
# association 0 = the logical unit). Little-endian, as Windows stores them.
_SDID_VERSION = 13           # MS-CSVP 2.2.9: "MUST be set to 13"
_SDID_HEAD = struct.Struct("<III")      # Version, Size, NumberOfIdentifiers
_SID_HEAD = struct.Struct("<IIHHI")     # CodeSet, Type, IdentifierSize, NextOffset, Assoc.
_CODE_SET_BINARY, _ID_TYPE_NAA, _ASSOC_LU = 1, 3, 0

_KINDS = ("differential", "plex", "full")
_BACKUP_TYPES = ("full", "differential", "incremental", "log", "copy", "other")

# VSS_USAGE_TYPE <-> IDENTIFICATION usage. "BOOTABLE_SYSTEM_STATE" is what Windows writes
# (samples above); the others follow the same spelling of the enum member names.
_USAGE_TO_XML = {
    UsageType.VSS_UT_UNDEFINED: "UNDEFINED",
    UsageType.VSS_UT_BOOTABLESYSTEMSTATE: "BOOTABLE_SYSTEM_STATE",
    UsageType.VSS_UT_SYSTEMSERVICE: "SYSTEM_SERVICE",
    UsageType.VSS_UT_USERDATA: "USER_DATA",
    UsageType.VSS_UT_OTHER: "OTHER",
}
_USAGE_FROM_XML = {v: k for k, v in _USAGE_TO_XML.items()}

_NAA_RE = re.compile(r"6[0-9a-fA-F]{31}")
_POOL_ID_RE = re.compile(r"[0-9a-fA-F]{32}")
_DEC_RE = re.compile(r"-?[0-9]{1,20}")
_FLOAT_RE = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,9})?")
# Host names end up in paths (MOUNT/hosts/<host>/) and logs: RFC 1123 labels (plus '_').
_HOST_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
                      r"(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*")


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ComponentRef:
    """A COMPONENT of a WRITER_COMPONENTS element: a component included in the backup."""

    name: str
    logical_path: str
    component_type: str  # "filegroup" | "database"


@dataclass(frozen=True)
class WriterComponents:
    """A WRITER_COMPONENTS element: one writer instance and its included components."""

    writer_id: str
    instance_id: str
    instance_name: str
    components: tuple[ComponentRef, ...] = ()


@dataclass(frozen=True)
class ParsedSnapshot:
    """One SNAPSHOT_DESCRIPTION: a snapshot LUN and the origin LUN it was taken of."""

    snapshot_id: str
    origin_naa: str        # SOURCE_LUN
    snapshot_naa: str      # DESTINATION_LUN
    size: int
    kind: str              # "differential" | "plex" | "full"
    volume: str            # the origin volume's name in the pool
    attributes: Attr       # snapshotAttributes (VSS_VOLSNAP_ATTR_*)
    originating_machine: str
    service_machine: str
    provider_id: str
    created: float | None  # Unix seconds, None if the document does not say
    name: str | None = None          # sp:name (snapshot create --name), if any
    description: str | None = None   # sp:description, if any

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "origin_naa": self.origin_naa,
                "snapshot_naa": self.snapshot_naa, "size": self.size, "kind": self.kind,
                "volume": self.volume, "attributes": int(self.attributes),
                "originating_machine": self.originating_machine,
                "service_machine": self.service_machine, "provider_id": self.provider_id,
                "created": self.created, "name": self.name,
                "description": self.description}


@dataclass(frozen=True)
class ParsedSet:
    """A checked Backup Components Document of a transportable snapshot set."""

    set_id: str
    context: Context
    attributes: Attr      # the set's lContext: context bits | DIFFERENTIAL/PLEX/TRANSPORTABLE
    pool_id: str          # lower-case, equal to the pool_id given to the parser
    originating_machine: str
    snapshots: tuple[ParsedSnapshot, ...]
    writer_components: tuple[WriterComponents, ...] = ()

    @property
    def snapshot_ids(self) -> list[str]:
        return [s.snapshot_id for s in self.snapshots]

    @property
    def snapshot_naas(self) -> list[str]:
        return [s.snapshot_naa for s in self.snapshots]

    def to_json(self) -> dict[str, Any]:
        return {"set_id": self.set_id, "context": self.context.cli_name,
                "attributes": int(self.attributes), "pool_id": self.pool_id,
                "originating_machine": self.originating_machine,
                "snapshots": [s.to_json() for s in self.snapshots],
                "writer_components": [
                    {"writer_id": w.writer_id, "instance_id": w.instance_id,
                     "instance_name": w.instance_name,
                     "components": [{"name": c.name, "logical_path": c.logical_path,
                                     "component_type": c.component_type}
                                    for c in w.components]}
                    for w in self.writer_components]}


# --------------------------------------------------------------------------- inputs
class SetLike(Protocol):
    """What the writer needs of a set: provider.coordinator.SnapshotSet and
    provider.catalog.SetRecord both fit."""

    @property
    def set_id(self) -> str: ...
    @property
    def context(self) -> int: ...
    @property
    def attributes(self) -> int: ...


class SnapshotLike(Protocol):
    """What the writer needs of a snapshot: blockstore.SnapshotInfo fits."""

    @property
    def id(self) -> str: ...
    @property
    def set_id(self) -> str | None: ...
    @property
    def volume(self) -> str: ...
    @property
    def origin_naa(self) -> str: ...
    @property
    def naa(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def attributes(self) -> int: ...
    @property
    def created(self) -> float: ...


# --------------------------------------------------------------------------- small checks
def _guid_or_none(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    # documents are strict: only the written form (vss.GUID_RE), braces in pairs
    m = vss.GUID_RE.fullmatch(text.strip())
    if m is None or (text.strip().startswith("{") != text.strip().endswith("}")):
        return None
    return vss.guid(m.group(1))


def _naa_or_none(text: object) -> str | None:
    if not isinstance(text, str) or not _NAA_RE.fullmatch(text):
        return None
    return text.lower()


def valid_host(name: object) -> bool:
    """Whether ``name`` is a host name these documents (and LUN masking) accept."""
    return isinstance(name, str) and _HOST_RE.fullmatch(name) is not None


def _normalise_pool_id(pool_id: str) -> str:
    if not isinstance(pool_id, str) or not _POOL_ID_RE.fullmatch(pool_id):
        raise ValueError(f"pool_id {pool_id!r} is not 32 hex digits")
    return pool_id.lower()


def _storage_device_id(naa: str) -> str:
    """base64 of a STORAGE_DEVICE_ID_DESCRIPTOR holding the naa as its one NAA identifier
    (the page-83 device identification Windows puts in VDS_LUN_INFORMATION)."""
    ident = bytes.fromhex(naa)
    sid = _SID_HEAD.pack(_CODE_SET_BINARY, _ID_TYPE_NAA, len(ident),
                         _SID_HEAD.size + len(ident), _ASSOC_LU) + ident
    blob = _SDID_HEAD.pack(_SDID_VERSION, _SDID_HEAD.size + len(sid), 1) + sid
    return base64.b64encode(blob).decode("ascii")


def _naa_from_storage_device_id(text: str, where: str) -> str:
    """The NAA identifier of a base64 STORAGE_DEVICE_ID_DESCRIPTOR (bounds-checked)."""
    if len(text) > 1024:
        raise _err(f"{where}: deviceIdentification is {len(text)} characters, more than "
                   "a device identification descriptor needs")
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _err(f"{where}: deviceIdentification is not base64") from None
    if len(blob) < _SDID_HEAD.size:
        raise _err(f"{where}: deviceIdentification is too short for a "
                   "STORAGE_DEVICE_ID_DESCRIPTOR")
    _version, size, count = _SDID_HEAD.unpack_from(blob, 0)
    if size != len(blob) or not 1 <= count <= 16:
        raise _err(f"{where}: deviceIdentification has an inconsistent "
                   f"STORAGE_DEVICE_ID_DESCRIPTOR (Size {size}, {count} identifier(s), "
                   f"{len(blob)} bytes)")
    found: list[str] = []
    offset = _SDID_HEAD.size
    for _ in range(count):
        if offset + _SID_HEAD.size > len(blob):
            raise _err(f"{where}: deviceIdentification: STORAGE_IDENTIFIER past the end")
        code_set, id_type, id_size, next_offset, assoc = _SID_HEAD.unpack_from(blob, offset)
        start = offset + _SID_HEAD.size
        if start + id_size > len(blob) or next_offset < _SID_HEAD.size + id_size:
            raise _err(f"{where}: deviceIdentification: STORAGE_IDENTIFIER of "
                       f"{id_size} bytes does not fit")
        if (code_set, id_type, assoc, id_size) == (_CODE_SET_BINARY, _ID_TYPE_NAA,
                                                   _ASSOC_LU, 16):
            found.append(blob[start:start + 16].hex())
        offset += next_offset
    naas = [n for n in found if _NAA_RE.fullmatch(n)]
    if len(naas) != 1:
        raise _err(f"{where}: deviceIdentification holds {len(naas)} NAA type 6 "
                   "identifiers of the logical unit, expected exactly one")
    return naas[0]
