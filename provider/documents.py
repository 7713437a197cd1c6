"""Backup Components Documents and Writer Metadata Documents (VSS XML), written and read.

A transportable snapshot set leaves its origin host as a *Backup Components Document*
(BCD) plus one *Writer Metadata Document* (WMD) per writer, in the element and attribute
names VSS uses, so the files read like the ones ``vshadow -t`` / ``diskshadow`` save:

* :func:`write_backup_components` / :func:`parse_backup_components`
* :func:`write_writer_metadata` / :func:`parse_writer_metadata`

docs/documents.md lists, element by element, the subset written and read, where each name
comes from, and what import verifies.

Documents are **hostile input**: they are parsed with defusedxml, DTDs forbidden (so no
entity expansion and no external fetch is ever possible), after a 16 MiB size cap and a
UTF-8-only check, with limits on nesting depth and element count, and their structure is
checked completely before anything is returned. Every rejection is a
:class:`DocumentError` (a :class:`provider.vss.VssError`) with a one-line message naming
what was wrong; no exception of an XML library ever leaves this module.

Pure Python, no I/O: callers read and write the files.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import defusedxml  # type: ignore[import-untyped]
import defusedxml.ElementTree as DET  # type: ignore[import-untyped]

from blockstore import names

from . import vss
from .vss import Attr, Context, VssError
from .writers.base import Component, FileSpec, UsageType, WriterMetadata

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "BCD_NAMESPACE",
    "WMD_NAMESPACE",
    "SP_NAMESPACE",
    "DocumentError",
    "ComponentRef",
    "WriterComponents",
    "ParsedSnapshot",
    "ParsedSet",
    "write_backup_components",
    "parse_backup_components",
    "write_writer_metadata",
    "parse_writer_metadata",
]

# --------------------------------------------------------------------------- limits
#: Largest document accepted, checked before any parsing (the issue fixes 16 MiB).
MAX_DOCUMENT_BYTES = 16 << 20
#: Deepest element nesting accepted. A BCD needs 6 levels (BACKUP_COMPONENTS >
#: SNAPSHOT_SET_DESCRIPTION > SNAPSHOT_DESCRIPTION > LUN_MAPPING > SOURCE_LUN >
#: LUN_INFORMATION), a WMD 4; Windows documents nest a little deeper in places we skip.
MAX_DEPTH = 32
#: Most elements accepted in one document (a full 64-volume set is under 500).
MAX_ELEMENTS = 100_000
#: Most attributes on one element, and longest attribute value kept.
MAX_ATTRIBUTES = 64
MAX_TEXT = 4096

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
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_XML_ILLEGAL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ENCODING_DECL_RE = re.compile(rb"""encoding[ \t\r\n]*=[ \t\r\n]*(["'])([^"']{0,40})\1""")
_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"),
         (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16"))

# --------------------------------------------------------------------------- errors
class DocumentError(VssError):
    """A document was refused (or could not be written).

    ``name`` is the VSS error name (see docs/documents.md):

    * VSS_E_INVALID_XML_DOCUMENT: not a well-formed, UTF-8, DTD-free document within the
      limits, or its structure is wrong (the name Microsoft documents for "the load
      operation of the specified XML document failed");
    * VSS_E_NONTRANSPORTABLE_BCD: the BCD describes no transportable set (no
      SNAPSHOT_SET_DESCRIPTION, or TRANSPORTABLE missing from the attributes);
    * VSS_E_UNSUPPORTED_CONTEXT: the set's context is not one shadowplex creates;
    * VSS_E_NO_SNAPSHOTS_IMPORTED: the LUNs belong to another pool or another provider.

    ``reason`` is a short stable key for programs and tests: "type", "size",
    "encoding", "syntax", "dtd", "limits", "structure", "transportable", "context",
    "pool", "provider", "export".
    """

    reason: str

    def __init__(self, message: str, *, name: str = "VSS_E_INVALID_XML_DOCUMENT",
                 reason: str = "structure") -> None:
        super().__init__(name, message)
        self.reason = reason


def _err(message: str, reason: str = "structure",
         name: str = "VSS_E_INVALID_XML_DOCUMENT") -> DocumentError:
    return DocumentError(message, name=name, reason=reason)


def _show(value: object, limit: int = 60) -> str:
    """A value for a one-line message: repr, control characters escaped, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


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

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "origin_naa": self.origin_naa,
                "snapshot_naa": self.snapshot_naa, "size": self.size, "kind": self.kind,
                "volume": self.volume, "attributes": int(self.attributes),
                "originating_machine": self.originating_machine,
                "service_machine": self.service_machine, "provider_id": self.provider_id,
                "created": self.created}


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


# --------------------------------------------------------------------------- writing
def _check_text(value: object, what: str, *, empty: bool = True) -> str:
    """A string we are about to write: must survive the round trip and stay one line."""
    if not isinstance(value, str):
        raise _err(f"cannot write {what}: {_show(value)} is not a string", "export")
    if not value and not empty:
        raise _err(f"cannot write {what}: it is empty", "export")
    if len(value) > MAX_TEXT or _CONTROL_RE.search(value) or _XML_ILLEGAL_RE.search(value):
        raise _err(f"cannot write {what} {_show(value)}: use at most {MAX_TEXT} characters "
                   "and no control characters", "export")
    return value


def _serialise(root: ET.Element) -> bytes:
    ET.indent(root, space="  ")
    data: bytes = ET.tostring(root, encoding="UTF-8", xml_declaration=True)
    return data + b"\n"


def _lun_information(parent: ET.Element, naa: str) -> None:
    ET.SubElement(parent, "LUN_INFORMATION", {
        "busType": str(BUS_TYPE_FILE_BACKED_VIRTUAL),
        "deviceType": str(DEVICE_TYPE_DISK),
        "vendorId": VENDOR_ID,
        "productId": PRODUCT_ID,
        "serialNumber": naa,
        "diskSignature": NIL_GUID,
        "deviceIdentification": _storage_device_id(naa),
    })


def _writer_components(parent: ET.Element, meta: WriterMetadata) -> None:
    wid = _guid_or_none(meta.writer_id)
    iid = _guid_or_none(meta.instance_id)
    if wid is None or iid is None:
        raise _err(f"cannot write writer {_show(meta.writer_name)}: writer id "
                   f"{_show(meta.writer_id)} / instance id {_show(meta.instance_id)} "
                   "must be GUIDs", "export")
    attrs = {"instanceId": iid, "writerId": wid}
    if meta.instance_name:
        attrs["instanceName"] = _check_text(meta.instance_name, "writer instance name")
    attrs["backupSchema"] = "0"
    wc = ET.SubElement(parent, "WRITER_COMPONENTS", attrs)
    for c in meta.components:
        cattrs = {}
        if c.logical_path:
            cattrs["logicalPath"] = _check_text(c.logical_path, "component logical path")
        cattrs["componentName"] = _check_text(c.name, "component name", empty=False)
        if c.component_type not in ("filegroup", "database"):
            raise _err(f"cannot write component {_show(c.name)}: type "
                       f"{_show(c.component_type)} is not filegroup or database", "export")
        cattrs["componentType"] = c.component_type
        ET.SubElement(wc, "COMPONENT", cattrs)


def write_backup_components(set_info: SetLike, snapshots: Sequence[SnapshotLike],
                            writers_metadata: Sequence[WriterMetadata], *, pool_id: str,
                            host: str, service_machine: str | None = None) -> bytes:
    """The Backup Components Document of a committed transportable set, UTF-8 bytes.

    ``set_info``: the set (set_id, context, attributes = context bits | options).
    ``snapshots``: its snapshots (blockstore.SnapshotInfo or alike), one per volume.
    ``writers_metadata``: the metadata of the writers that took part (their components
    are listed as WRITER_COMPONENTS). ``pool_id``: the pool the LUNs live in. ``host``:
    the requester host that created the set (originatingMachine); ``service_machine``
    (default ``host``): the machine that ran the coordinator.

    Refuses (DocumentError) a set without TRANSPORTABLE (VSS_E_NONTRANSPORTABLE_BCD),
    snapshots of another set, an empty or oversized set, and anything the parser would
    refuse: the document is parsed back before it is returned, so whatever this writes
    imports.
    """
    pool = _normalise_pool_id(pool_id)
    set_id = _guid_or_none(str(set_info.set_id))
    if set_id is None:
        raise _err(f"cannot export: set id {_show(set_info.set_id)} is not a GUID", "export")
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise _err(f"cannot export: host name {_show(host)} is not a valid host name "
                   "(letters, digits, '-', '_' in dot-separated labels)", "export")
    service = host if service_machine is None else service_machine
    if not isinstance(service, str) or not _HOST_RE.fullmatch(service):
        raise _err(f"cannot export: service machine {_show(service)} is not a valid "
                   "host name", "export")
    lcontext = int(set_info.attributes) & int(vss.CONTEXT_BITS | vss.OPTION_BITS)
    if lcontext & int(vss.CONTEXT_BITS) != int(set_info.context) & 0xFFFFFFFF:
        raise _err(f"cannot export set {set_id}: its attributes 0x{lcontext:x} do not "
                   f"hold its context 0x{int(set_info.context):x}", "export")
    if not lcontext & int(Attr.TRANSPORTABLE):
        raise _err(f"cannot export set {set_id}: it was not created TRANSPORTABLE "
                   f"(attributes 0x{lcontext:x}); create the set with the transportable "
                   "option to move it to another host", "transportable",
                   "VSS_E_NONTRANSPORTABLE_BCD")
    if not 1 <= len(snapshots) <= vss.MAX_VOLUMES_PER_SET:
        raise _err(f"cannot export set {set_id}: it has {len(snapshots)} snapshot(s), "
                   f"expected 1..{vss.MAX_VOLUMES_PER_SET}", "export")
    for s in snapshots:
        if s.set_id is not None and _guid_or_none(str(s.set_id)) != set_id:
            raise _err(f"cannot export set {set_id}: snapshot {_show(s.id)} belongs to set "
                       f"{_show(s.set_id)}", "export")

    root = ET.Element("BACKUP_COMPONENTS", {
        "xmlns": BCD_NAMESPACE,
        f"xmlns:{_SP}": SP_NAMESPACE,
        "version": DOCUMENT_VERSION,
        "bootableSystemStateBackup": "no",
        "selectComponents": "yes",
        "backupType": "full",
        "partialFileSupport": "no",
        "snapshotSetId": set_id,
    })
    for meta in writers_metadata:
        _writer_components(root, meta)
    ssd = ET.SubElement(root, "SNAPSHOT_SET_DESCRIPTION", {
        "snapshotSetId": set_id,
        "context": str(lcontext),
        f"{_SP}:poolId": pool,
    })
    for s in snapshots:
        created = float(s.created)
        attrs = {
            "snapshotId": str(s.id),
            "providerId": vss.PROVIDER_ID,
            "snapshotAttributes": str(int(s.attributes) & 0xFFFFFFFF),
            "originatingMachine": host,
            "serviceMachine": service,
            f"{_SP}:volume": _check_text(s.volume, "volume name"),
            f"{_SP}:kind": _check_text(s.kind, "snapshot kind"),
            f"{_SP}:size": str(int(s.size)),
        }
        if math.isfinite(created) and 0 <= created < 1e15:
            attrs[f"{_SP}:created"] = f"{created:.6f}"
        sd = ET.SubElement(ssd, "SNAPSHOT_DESCRIPTION", attrs)
        mapping = ET.SubElement(sd, "LUN_MAPPING")
        for side, naa in (("SOURCE_LUN", s.origin_naa), ("DESTINATION_LUN", s.naa)):
            if _naa_or_none(naa) is None:
                raise _err(f"cannot export set {set_id}: snapshot {_show(s.id)} has naa id "
                           f"{_show(naa)}, not 32 hex digits starting with 6", "export")
            _lun_information(ET.SubElement(mapping, side), str(naa).lower())
    data = _serialise(root)
    try:
        parse_backup_components(data, pool_id=pool)
    except DocumentError as e:
        raise _err(f"cannot export set {set_id}: {e.message}", "export", e.name) from None
    return data


def write_writer_metadata(meta: WriterMetadata) -> bytes:
    """The Writer Metadata Document of one writer (what ``identify()`` returned), UTF-8.

    Components become FILE_GROUP (file lists in FILE_LIST) or DATABASE (files in
    DATABASE_FILES); the volume images a component lives on are kept in sp:VOLUME
    elements. parse_writer_metadata(write_writer_metadata(m)) == m.
    """
    wid = _guid_or_none(meta.writer_id)
    iid = _guid_or_none(meta.instance_id)
    if wid is None or iid is None:
        raise _err(f"cannot write the metadata of writer {_show(meta.writer_name)}: writer "
                   f"id {_show(meta.writer_id)} / instance id {_show(meta.instance_id)} "
                   "must be GUIDs", "export")
    try:
        usage = _USAGE_TO_XML[UsageType(meta.usage_type)]
    except (ValueError, KeyError):
        raise _err(f"cannot write writer {_show(meta.writer_name)}: usage type "
                   f"{_show(meta.usage_type)} is not a VSS_USAGE_TYPE", "export") from None
    root = ET.Element("WRITER_METADATA", {
        "xmlns": WMD_NAMESPACE,
        f"xmlns:{_SP}": SP_NAMESPACE,
        "version": DOCUMENT_VERSION,
    })
    ident = {"writerId": wid, "instanceId": iid}
    if meta.instance_name:
        ident["instanceName"] = _check_text(meta.instance_name, "writer instance name")
    ident.update({
        "friendlyName": _check_text(meta.writer_name, "writer name", empty=False),
        "usage": usage,
        "dataSource": "OTHER",
    })
    ET.SubElement(root, "IDENTIFICATION", ident)
    locations = ET.SubElement(root, "BACKUP_LOCATIONS")
    for c in meta.components:
        if c.component_type == "filegroup":
            tag, files_tag = "FILE_GROUP", "FILE_LIST"
        elif c.component_type == "database":
            tag, files_tag = "DATABASE", "DATABASE_FILES"
        else:
            raise _err(f"cannot write component {_show(c.name)}: type "
                       f"{_show(c.component_type)} is not filegroup or database", "export")
        cattrs = {}
        if c.logical_path:
            cattrs["logicalPath"] = _check_text(c.logical_path, "component logical path")
        cattrs.update({
            "componentName": _check_text(c.name, "component name", empty=False),
            "caption": "",
            "restoreMetadata": "no",
            "notifyOnBackupComplete": "no",
            "selectable": "yes",
            "selectableForRestore": "no",
            "componentFlags": "0",
        })
        comp = ET.SubElement(locations, tag, cattrs)
        for f in c.files:
            ET.SubElement(comp, files_tag, {
                "path": _check_text(f.path, "file path", empty=False),
                "filespec": _check_text(f.filespec, "filespec", empty=False),
                "recursive": "yes" if f.recursive else "no",
                "filespecBackupType": FILESPEC_BACKUP_TYPE,
            })
        for v in c.volumes:
            ET.SubElement(comp, f"{_SP}:VOLUME",
                          {"path": _check_text(v, "volume path", empty=False)})
    data = _serialise(root)
    try:
        parse_writer_metadata(data)
    except DocumentError as e:
        raise _err(f"cannot write the metadata of writer {_show(meta.writer_name)}: "
                   f"{e.message}", "export", e.name) from None
    return data


# --------------------------------------------------------------------------- parsing
class _LimitExceeded(Exception):
    pass


class _LimitedTreeBuilder:
    """A TreeBuilder target that refuses deep nesting and too many elements as they
    arrive (before the tree grows), so nothing downstream ever recurses deeply."""

    def __init__(self) -> None:
        self._tb = ET.TreeBuilder()
        self._depth = 0
        self._count = 0

    def start(self, tag: str, attrs: dict[str, str]) -> ET.Element:
        self._depth += 1
        self._count += 1
        if self._depth > MAX_DEPTH:
            raise _LimitExceeded(f"elements are nested deeper than {MAX_DEPTH} levels")
        if self._count > MAX_ELEMENTS:
            raise _LimitExceeded(f"more than {MAX_ELEMENTS} elements")
        if len(attrs) > MAX_ATTRIBUTES:
            raise _LimitExceeded(f"an element has {len(attrs)} attributes, more than "
                                 f"{MAX_ATTRIBUTES}")
        return self._tb.start(tag, attrs)

    def end(self, tag: str) -> ET.Element:
        self._depth -= 1
        return self._tb.end(tag)

    def data(self, data: str) -> None:
        self._tb.data(data)

    def close(self) -> ET.Element:
        return self._tb.close()


def _load(data: object, what: str) -> ET.Element:
    """Checks before parsing, then a defused parse. Returns the root element."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _err(f"{what}: expected bytes, got {type(data).__name__}", "type")
    raw = bytes(data)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _err(f"{what} is {len(raw)} bytes, more than the {MAX_DOCUMENT_BYTES >> 20} "
                   "MiB limit: this is not a document shadowplex wrote", "size")
    if not raw.strip():
        raise _err(f"{what} is empty", "syntax")
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            raise _err(f"{what} is {enc}-encoded: shadowplex reads UTF-8 only (convert it "
                       f"with: iconv -f {enc} -t UTF-8)", "encoding")
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    if b"\x00" in body:
        raise _err(f"{what} contains NUL bytes: it is not UTF-8 text (UTF-16? convert it "
                   "with: iconv -f UTF-16 -t UTF-8)", "encoding")
    try:
        body.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise _err(f"{what} is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                   f"{e.start})", "encoding") from None
    if body.startswith(b"<?xml"):
        end = body.find(b"?>", 0, 512)
        decl = body[: end if end >= 0 else 512]
        m = _ENCODING_DECL_RE.search(decl)
        if m is not None and m.group(2).lower() not in (b"utf-8", b"utf8"):
            raise _err(f"{what} declares encoding {m.group(2).decode('ascii', 'replace')!r}:"
                       " shadowplex reads UTF-8 only", "encoding")
    target = _LimitedTreeBuilder()
    parser = DET.XMLParser(target=target, forbid_dtd=True, forbid_entities=True,
                           forbid_external=True)
    try:
        parser.feed(raw)
        root = parser.close()
    except defusedxml.DTDForbidden:
        raise _err(f"{what} has a DOCTYPE: DTDs are refused (they allow entity expansion "
                   "and external references)", "dtd") from None
    except defusedxml.EntitiesForbidden:
        raise _err(f"{what} declares entities: refused", "dtd") from None
    except defusedxml.ExternalReferenceForbidden:
        raise _err(f"{what} references an external resource: refused", "dtd") from None
    except defusedxml.DefusedXmlException as e:
        raise _err(f"{what} was refused by the XML guard: {type(e).__name__}",
                   "dtd") from None
    except _LimitExceeded as e:
        raise _err(f"{what} exceeds the parser limits: {e}", "limits") from None
    except ET.ParseError as e:
        raise _err(f"{what} is not well-formed XML ({_one_line(str(e))}): truncated or "
                   "damaged?", "syntax") from None
    except (UnicodeError, ValueError, LookupError) as e:
        raise _err(f"{what} cannot be decoded: {_one_line(str(e))}", "encoding") from None
    except RecursionError:
        raise _err(f"{what} is nested too deeply", "limits") from None
    if not isinstance(root, ET.Element):
        raise _err(f"{what} has no root element", "syntax")
    return root


def _one_line(text: str) -> str:
    return _CONTROL_RE.sub(" ", text)[:200]


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


class _Doc:
    """Structure helpers bound to one document's VSS namespace and its name in messages."""

    def __init__(self, ns: str, what: str) -> None:
        self.ns = ns
        self.what = what

    def q(self, name: str) -> str:
        return f"{{{self.ns}}}{name}" if self.ns else name

    def children(self, el: ET.Element, name: str) -> list[ET.Element]:
        tag = self.q(name)
        return [c for c in el if c.tag == tag]

    def one(self, el: ET.Element, name: str, where: str, *, optional: bool = False
            ) -> ET.Element | None:
        found = self.children(el, name)
        if len(found) > 1:
            raise _err(f"{self.what}: {where} has {len(found)} {name} elements, expected one")
        if not found:
            if optional:
                return None
            raise _err(f"{self.what}: {where} has no {name} element")
        return found[0]

    def need(self, el: ET.Element, name: str, where: str) -> ET.Element:
        found = self.one(el, name, where)
        assert found is not None
        return found

    def attr(self, el: ET.Element, name: str, where: str, *, optional: bool = False,
             empty: bool = False, ns: str = "") -> str | None:
        key = f"{{{ns}}}{name}" if ns else name
        shown = f"{_SP}:{name}" if ns == SP_NAMESPACE else name
        value = el.get(key)
        if value is None:
            if optional:
                return None
            raise _err(f"{self.what}: {where} has no {shown} attribute")
        if len(value) > MAX_TEXT:
            raise _err(f"{self.what}: {where} {shown} is {len(value)} characters long "
                       f"(at most {MAX_TEXT})")
        if _CONTROL_RE.search(value):
            raise _err(f"{self.what}: {where} {shown} {_show(value)} contains control "
                       "characters")
        if not value and not empty:
            raise _err(f"{self.what}: {where} {shown} is empty")
        return value

    def text(self, el: ET.Element, name: str, where: str, *, empty: bool = False,
             ns: str = "") -> str:
        value = self.attr(el, name, where, empty=empty, ns=ns)
        assert value is not None
        return value

    def guid(self, el: ET.Element, name: str, where: str) -> str:
        value = self.text(el, name, where)
        g = _guid_or_none(value)
        if g is None:
            raise _err(f"{self.what}: {where} {name} {_show(value)} is not a GUID")
        return g

    def yes_no(self, el: ET.Element, name: str, where: str, default: bool) -> bool:
        value = self.attr(el, name, where, optional=True)
        if value is None:
            return default
        if value not in ("yes", "no"):
            raise _err(f"{self.what}: {where} {name} is {_show(value)}, expected yes or no")
        return value == "yes"

    def integer(self, el: ET.Element, name: str, where: str, lo: int, hi: int,
                ns: str = "") -> int:
        value = self.text(el, name, where, ns=ns)
        shown = f"{_SP}:{name}" if ns == SP_NAMESPACE else name
        if not _DEC_RE.fullmatch(value):
            raise _err(f"{self.what}: {where} {shown} {_show(value)} is not a decimal number")
        number = int(value)
        if not lo <= number <= hi:
            raise _err(f"{self.what}: {where} {shown} {number} is out of range {lo}..{hi}")
        return number

    def host(self, el: ET.Element, name: str, where: str) -> str:
        value = self.text(el, name, where)
        if not _HOST_RE.fullmatch(value):
            raise _err(f"{self.what}: {where} {name} {_show(value)} is not a host name")
        return value


def _check_root(root: ET.Element, expected: str, namespace: str, what: str) -> _Doc:
    ns, local = _split(root.tag)
    if local != expected or ns not in (namespace, ""):
        shown = f"{{{ns}}}{local}" if ns else local
        raise _err(f"{what}: root element is {_show(shown)}, expected {expected} "
                   f"(xmlns {namespace})")
    return _Doc(ns, what)


def _writer_components_of(doc: _Doc, root: ET.Element) -> tuple[WriterComponents, ...]:
    out: list[WriterComponents] = []
    seen: set[str] = set()
    for i, wc in enumerate(doc.children(root, "WRITER_COMPONENTS"), 1):
        where = f"WRITER_COMPONENTS #{i}"
        wid = doc.guid(wc, "writerId", where)
        iid = doc.guid(wc, "instanceId", where)
        if iid in seen:
            raise _err(f"{doc.what}: {where}: writer instance {iid} is listed twice")
        seen.add(iid)
        iname = doc.attr(wc, "instanceName", where, optional=True, empty=True) or ""
        comps: list[ComponentRef] = []
        for j, c in enumerate(doc.children(wc, "COMPONENT"), 1):
            cwhere = f"{where} COMPONENT #{j}"
            ctype = doc.text(c, "componentType", cwhere)
            if ctype not in ("filegroup", "database"):
                raise _err(f"{doc.what}: {cwhere} componentType {_show(ctype)} is not "
                           "filegroup or database")
            comps.append(ComponentRef(
                name=doc.text(c, "componentName", cwhere),
                logical_path=doc.attr(c, "logicalPath", cwhere, optional=True,
                                      empty=True) or "",
                component_type=ctype))
        out.append(WriterComponents(wid, iid, iname, tuple(comps)))
    return tuple(out)


def _lun_naa(doc: _Doc, mapping: ET.Element, side: str, where: str) -> str:
    lun = doc.need(mapping, side, where)
    info = doc.need(lun, "LUN_INFORMATION", f"{where} {side}")
    lwhere = f"{where} {side} LUN_INFORMATION"
    vendor = doc.text(info, "vendorId", lwhere)
    if vendor != VENDOR_ID:
        raise _err(f"{doc.what}: {lwhere} vendorId is {_show(vendor)}: not a shadowplex LUN "
                   f"(vendor {VENDOR_ID})", "provider", "VSS_E_NO_SNAPSHOTS_IMPORTED")
    serial = doc.text(info, "serialNumber", lwhere)
    naa = _naa_or_none(serial)
    if naa is None:
        raise _err(f"{doc.what}: {lwhere} serialNumber {_show(serial)} is not a naa id "
                   "(32 hex digits starting with 6)")
    page83 = _naa_from_storage_device_id(doc.text(info, "deviceIdentification", lwhere),
                                         lwhere)
    if page83 != naa:
        raise _err(f"{doc.what}: {lwhere}: deviceIdentification names naa {page83} but "
                   f"serialNumber is {naa}")
    return naa


def _snapshot_of(doc: _Doc, sd: ET.Element, index: int, set_ctx: Context
                 ) -> ParsedSnapshot:
    where = f"SNAPSHOT_DESCRIPTION #{index}"
    sid = doc.guid(sd, "snapshotId", where)
    where = f"SNAPSHOT_DESCRIPTION {sid}"
    provider = doc.guid(sd, "providerId", where)
    if provider != vss.PROVIDER_ID:
        raise _err(f"{doc.what}: {where} was made by provider {provider}, not by shadowplex "
                   f"({vss.PROVIDER_ID})", "provider", "VSS_E_NO_SNAPSHOTS_IMPORTED")
    attrs = doc.integer(sd, "snapshotAttributes", where, 0, 0xFFFFFFFF)
    unknown = attrs & ~vss.KNOWN_ATTR_BITS
    if unknown:
        raise _err(f"{doc.what}: {where} snapshotAttributes 0x{attrs:x} has unknown bits "
                   f"0x{unknown:x}")
    if not attrs & int(Attr.TRANSPORTABLE):
        raise _err(f"{doc.what}: {where} is not transportable (snapshotAttributes "
                   f"0x{attrs:x} lacks TRANSPORTABLE 0x20)", "transportable",
                   "VSS_E_NONTRANSPORTABLE_BCD")
    if attrs & int(Attr.DIFFERENTIAL) and attrs & int(Attr.PLEX):
        raise _err(f"{doc.what}: {where} snapshotAttributes 0x{attrs:x} has both "
                   "DIFFERENTIAL and PLEX")
    if attrs & int(vss.CONTEXT_BITS) != int(set_ctx):
        raise _err(f"{doc.what}: {where} snapshotAttributes 0x{attrs:x} are of another "
                   f"context than the set ({set_ctx.vss_name})", "context")
    kind = doc.text(sd, "kind", where, ns=SP_NAMESPACE)
    if kind not in _KINDS:
        raise _err(f"{doc.what}: {where} {_SP}:kind {_show(kind)} is not one of "
                   f"{', '.join(_KINDS)}")
    volume = doc.text(sd, "volume", where, ns=SP_NAMESPACE)
    if not names.is_name(volume):   # an existing volume's name (a leading '-' may be old)
        raise _err(f"{doc.what}: {where} {_SP}:volume {_show(volume)} is not a volume name")
    size = doc.integer(sd, "size", where, 1, (1 << 63) - 1, ns=SP_NAMESPACE)
    created_text = doc.attr(sd, "created", where, optional=True, ns=SP_NAMESPACE)
    created: float | None = None
    if created_text is not None:
        if not _FLOAT_RE.fullmatch(created_text):
            raise _err(f"{doc.what}: {where} {_SP}:created {_show(created_text)} is not "
                       "Unix seconds")
        created = float(created_text)
    mappings = doc.children(sd, "LUN_MAPPING")
    if len(mappings) != 1:
        raise _err(f"{doc.what}: {where} has {len(mappings)} LUN_MAPPING elements, "
                   "expected one (a shadowplex volume is one LUN)")
    origin_naa = _lun_naa(doc, mappings[0], "SOURCE_LUN", f"{where} LUN_MAPPING")
    snap_naa = _lun_naa(doc, mappings[0], "DESTINATION_LUN", f"{where} LUN_MAPPING")
    if origin_naa == snap_naa:
        raise _err(f"{doc.what}: {where}: SOURCE_LUN and DESTINATION_LUN are the same "
                   f"LUN {origin_naa}")
    return ParsedSnapshot(
        snapshot_id=sid, origin_naa=origin_naa, snapshot_naa=snap_naa, size=size,
        kind=kind, volume=volume, attributes=Attr(attrs),
        originating_machine=doc.host(sd, "originatingMachine", where),
        service_machine=doc.host(sd, "serviceMachine", where),
        provider_id=provider, created=created)


def parse_backup_components(data: bytes, *, pool_id: str) -> ParsedSet:
    """Parse and check a Backup Components Document of a transportable set of this pool.

    ``pool_id``: the pool the importing array serves; a document naming LUNs of another
    pool is refused (VSS_E_NO_SNAPSHOTS_IMPORTED, "document names LUNs of another pool").
    Every other refusal is a DocumentError too (see the class for the names); nothing is
    returned unless the whole document checks out. See docs/documents.md.
    """
    pool = _normalise_pool_id(pool_id)
    what = "backup components document"
    root = _load(data, what)
    doc = _check_root(root, "BACKUP_COMPONENTS", BCD_NAMESPACE, what)
    doc.text(root, "version", "BACKUP_COMPONENTS")
    for flag in ("selectComponents", "bootableSystemStateBackup", "partialFileSupport"):
        doc.yes_no(root, flag, "BACKUP_COMPONENTS", False)
    btype = doc.attr(root, "backupType", "BACKUP_COMPONENTS", optional=True)
    if btype is not None and btype not in _BACKUP_TYPES:
        raise _err(f"{what}: BACKUP_COMPONENTS backupType {_show(btype)} is not one of "
                   f"{', '.join(_BACKUP_TYPES)}")
    writers = _writer_components_of(doc, root)

    ssd = doc.one(root, "SNAPSHOT_SET_DESCRIPTION", "BACKUP_COMPONENTS", optional=True)
    if ssd is None:
        raise _err(f"{what} has no SNAPSHOT_SET_DESCRIPTION: it describes no transportable "
                   "snapshot set (was the set created TRANSPORTABLE, and the document "
                   "saved after the set was created?)", "transportable",
                   "VSS_E_NONTRANSPORTABLE_BCD")
    where = "SNAPSHOT_SET_DESCRIPTION"
    set_id = doc.guid(ssd, "snapshotSetId", where)
    root_set = doc.attr(root, "snapshotSetId", "BACKUP_COMPONENTS", optional=True)
    if root_set is not None and _guid_or_none(root_set) != set_id:
        raise _err(f"{what}: BACKUP_COMPONENTS snapshotSetId {_show(root_set)} differs from "
                   f"SNAPSHOT_SET_DESCRIPTION snapshotSetId {set_id}")
    doc_pool = doc.text(ssd, "poolId", where, ns=SP_NAMESPACE)
    if not _POOL_ID_RE.fullmatch(doc_pool):
        raise _err(f"{what}: {where} {_SP}:poolId {_show(doc_pool)} is not a pool id "
                   "(32 hex digits)")
    if doc_pool.lower() != pool:
        raise _err(f"document names LUNs of another pool ({doc_pool.lower()}); this array "
                   f"serves pool {pool}: import it through the array that exported it",
                   "pool", "VSS_E_NO_SNAPSHOTS_IMPORTED")
    lcontext = doc.integer(ssd, "context", where, -(1 << 31), 0xFFFFFFFF) & 0xFFFFFFFF
    unknown = lcontext & ~vss.KNOWN_ATTR_BITS
    if unknown:
        raise _err(f"{what}: {where} context 0x{lcontext:x} has unknown attribute bits "
                   f"0x{unknown:x}")
    if not lcontext & int(Attr.TRANSPORTABLE):
        raise _err(f"{what}: snapshot set {set_id} is not transportable (context "
                   f"0x{lcontext:x} lacks TRANSPORTABLE 0x20)", "transportable",
                   "VSS_E_NONTRANSPORTABLE_BCD")
    try:
        ctx, set_attrs = vss.split_context(lcontext)
    except VssError as e:
        raise _err(f"{what}: {where} context 0x{lcontext:x}: {e.message}", "context",
                   "VSS_E_UNSUPPORTED_CONTEXT") from None

    descriptions = doc.children(ssd, "SNAPSHOT_DESCRIPTION")
    if not 1 <= len(descriptions) <= vss.MAX_VOLUMES_PER_SET:
        raise _err(f"{what}: {where} has {len(descriptions)} SNAPSHOT_DESCRIPTION elements, "
                   f"expected 1..{vss.MAX_VOLUMES_PER_SET}")
    snaps = [_snapshot_of(doc, sd, i, ctx) for i, sd in enumerate(descriptions, 1)]
    _check_unique(what, "snapshot id", [s.snapshot_id for s in snaps])
    _check_unique(what, "naa id", [n for s in snaps for n in (s.origin_naa, s.snapshot_naa)])
    _check_unique(what, "volume", [s.volume for s in snaps])
    if set_id in {s.snapshot_id for s in snaps}:
        raise _err(f"{what}: snapshot set id {set_id} is also used as a snapshot id")
    machines = {s.originating_machine for s in snaps}
    if len(machines) != 1:
        raise _err(f"{what}: the snapshots come from different machines "
                   f"({', '.join(sorted(machines))}); one set is created on one host")
    return ParsedSet(set_id=set_id, context=ctx, attributes=set_attrs, pool_id=pool,
                     originating_machine=machines.pop(), snapshots=tuple(snaps),
                     writer_components=writers)


def _check_unique(what: str, label: str, values: list[str]) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise _err(f"{what}: {label} {v} appears more than once")
        seen.add(v)


def parse_writer_metadata(data: bytes) -> WriterMetadata:
    """Parse and check a Writer Metadata Document (same hostility rules as the BCD).

    Reads IDENTIFICATION (ids, friendlyName, instanceName, usage) and the FILE_GROUP /
    DATABASE components of BACKUP_LOCATIONS with their FILE_LIST / DATABASE_FILES /
    DATABASE_LOGFILES and sp:VOLUME children; other elements (RESTORE_METHOD,
    EXCLUDE_FILES, ...) are ignored.
    """
    what = "writer metadata document"
    root = _load(data, what)
    doc = _check_root(root, "WRITER_METADATA", WMD_NAMESPACE, what)
    doc.text(root, "version", "WRITER_METADATA")
    ident = doc.need(root, "IDENTIFICATION", "WRITER_METADATA")
    where = "IDENTIFICATION"
    wid = doc.guid(ident, "writerId", where)
    iid = doc.guid(ident, "instanceId", where)
    name = doc.text(ident, "friendlyName", where)
    iname = doc.attr(ident, "instanceName", where, optional=True, empty=True) or ""
    usage_text = doc.attr(ident, "usage", where, optional=True)
    usage = UsageType.VSS_UT_UNDEFINED
    if usage_text is not None:
        if usage_text not in _USAGE_FROM_XML:
            raise _err(f"{what}: {where} usage {_show(usage_text)} is not one of "
                       f"{', '.join(_USAGE_FROM_XML)}")
        usage = _USAGE_FROM_XML[usage_text]
    components: list[Component] = []
    locations = doc.one(root, "BACKUP_LOCATIONS", "WRITER_METADATA", optional=True)
    if locations is not None:
        seen: set[tuple[str, str]] = set()
        for i, el in enumerate(locations, 1):
            _ns, local = _split(el.tag)
            if _ns != doc.ns or local not in ("FILE_GROUP", "DATABASE"):
                continue
            cwhere = f"BACKUP_LOCATIONS {local} #{i}"
            cname = doc.text(el, "componentName", cwhere)
            lpath = doc.attr(el, "logicalPath", cwhere, optional=True, empty=True) or ""
            if (lpath, cname) in seen:
                raise _err(f"{what}: component {_show(cname)} (logical path "
                           f"{_show(lpath)}) appears more than once")
            seen.add((lpath, cname))
            file_tags = (("FILE_LIST",) if local == "FILE_GROUP"
                         else ("DATABASE_FILES", "DATABASE_LOGFILES"))
            files: list[FileSpec] = []
            volumes: list[str] = []
            for j, f in enumerate(el, 1):
                fns, flocal = _split(f.tag)
                fwhere = f"{cwhere} {flocal} #{j}"
                if fns == doc.ns and flocal in file_tags:
                    files.append(FileSpec(
                        path=doc.text(f, "path", fwhere),
                        filespec=doc.text(f, "filespec", fwhere),
                        recursive=doc.yes_no(f, "recursive", fwhere, False)))
                elif fns == SP_NAMESPACE and flocal == "VOLUME":
                    volumes.append(doc.text(f, "path", fwhere))
            components.append(Component(
                name=cname, logical_path=lpath,
                component_type="filegroup" if local == "FILE_GROUP" else "database",
                files=files, volumes=volumes))
    return WriterMetadata(writer_name=name, writer_id=wid, instance_id=iid,
                          instance_name=iname, usage_type=usage, components=components)
