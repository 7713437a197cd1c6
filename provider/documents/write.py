"""Writing: :func:`write_backup_components` and :func:`write_writer_metadata`.

Every string is checked before it is written (it must survive the round trip and stay
one line), and each document is parsed back (provider/documents/parse.py) before it is
returned: whatever this writes imports, and a refusal is a DocumentError with reason
"export".
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from .. import vss
from ..vss import Attr
from ..writers.base import UsageType, WriterMetadata
from .model import (
    _HOST_RE,
    _SP,
    _USAGE_TO_XML,
    BCD_NAMESPACE,
    BUS_TYPE_FILE_BACKED_VIRTUAL,
    DEVICE_TYPE_DISK,
    DOCUMENT_VERSION,
    FILESPEC_BACKUP_TYPE,
    NIL_GUID,
    PRODUCT_ID,
    SP_NAMESPACE,
    VENDOR_ID,
    WMD_NAMESPACE,
    SetLike,
    SnapshotLike,
    _guid_or_none,
    _naa_or_none,
    _normalise_pool_id,
    _storage_device_id,
)
from .parse import parse_backup_components, parse_writer_metadata
from .xmlsafe import _CONTROL_RE, MAX_TEXT, DocumentError, _err, _show

# characters XML 1.0 cannot carry, refused in what we write
_XML_ILLEGAL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


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


def _writer_guids(meta: WriterMetadata, what: str) -> tuple[str, str]:
    """The writer's (writer id, instance id) as written, or the refusal of ``what``
    ("writer", "the metadata of writer") naming the writer."""
    wid = _guid_or_none(meta.writer_id)
    iid = _guid_or_none(meta.instance_id)
    if wid is None or iid is None:
        raise _err(f"cannot write {what} {_show(meta.writer_name)}: writer id "
                   f"{_show(meta.writer_id)} / instance id {_show(meta.instance_id)} "
                   "must be GUIDs", "export")
    return wid, iid


def _writer_components(parent: ET.Element, meta: WriterMetadata) -> None:
    wid, iid = _writer_guids(meta, "writer")
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
            "snapshotAttributes": str(int(vss.kind_attributes(s.attributes, s.kind))
                                      & 0xFFFFFFFF),
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
    wid, iid = _writer_guids(meta, "the metadata of writer")
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
