"""Parsing: :func:`parse_backup_components` and :func:`parse_writer_metadata`.

The tree the guarded loader returns (xmlsafe._load) is walked with :class:`_Doc`, whose
helpers check each attribute as it is read (present, length, no control characters, the
expected form and range) and name the document, the element and the attribute in every
refusal. Nothing is returned unless the whole document checks out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from blockstore import names

from .. import snapshot_refs, vss
from ..vss import Attr, Context, VssError
from ..writers.base import Component, FileSpec, UsageType, WriterMetadata
from .model import (
    _BACKUP_TYPES,
    _DEC_RE,
    _FLOAT_RE,
    _HOST_RE,
    _KINDS,
    _POOL_ID_RE,
    _SP,
    _USAGE_FROM_XML,
    BCD_NAMESPACE,
    SP_NAMESPACE,
    VENDOR_ID,
    WMD_NAMESPACE,
    ComponentRef,
    ParsedSet,
    ParsedSnapshot,
    WriterComponents,
    _guid_or_none,
    _naa_from_storage_device_id,
    _naa_or_none,
    _normalise_pool_id,
)
from .xmlsafe import _CONTROL_RE, MAX_TEXT, _err, _load, _show, _split


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
    label = doc.attr(sd, "name", where, optional=True, ns=SP_NAMESPACE)
    description = doc.attr(sd, "description", where, optional=True, empty=True,
                           ns=SP_NAMESPACE)
    try:   # the rules of snapshot create --name/--description
        if label is not None:
            snapshot_refs.check_name(label)
        if description is not None:
            snapshot_refs.check_description(description)
    except VssError as e:
        raise _err(f"{doc.what}: {where}: {e.message}") from None
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
        provider_id=provider, created=created, name=label, description=description)


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
