"""provider.documents: Backup Components / Writer Metadata Documents, round trips and
hostile input (every refusal is a one-line DocumentError, never an XML library error)."""

from __future__ import annotations

import base64
import copy
import random
import re
import struct
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore import SnapshotInfo
from provider import documents as D
from provider.catalog import SetRecord
from provider.vss import PROVIDER_ID, Attr, Context, VssError
from provider.writers.base import Component, FileSpec, UsageType, WriterMetadata, writer_guid

POOL = "0123456789abcdef0123456789abcdef"
OTHER_POOL = "fedcba9876543210fedcba9876543210"
BCD_NS = "{x-schema:#VssComponentMetadata}"
SP_NS = "{urn:shadowplex:vss-documents:1}"
T = int(Attr.TRANSPORTABLE)


# --------------------------------------------------------------------------- builders
def naa(rng: random.Random | None = None) -> str:
    r = rng or random
    return "6" + "".join(r.choice("0123456789abcdef") for _ in range(31))


@dataclass
class FakeSet:
    set_id: str
    context: int
    attributes: int


def make_snapshots(set_id: str, n: int, *, kind: str = "differential",
                   extra: int = int(Attr.DIFFERENTIAL | Attr.HARDWARE_ASSISTED),
                   context: int = 0) -> list[SnapshotInfo]:
    rng = random.Random(n * 7919 + len(kind))
    out = []
    for i in range(n):
        out.append(SnapshotInfo(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), set_id=set_id,
            volume=f"vol{i}", origin_naa=naa(rng), naa=naa(rng), size=(i + 1) << 30,
            kind=kind, state="committed", created=1_700_000_000.25 + i,
            attributes=context | T | extra, exposed_name=None, sync_done=0, sync_total=0,
            epoch=1, file_id=i + 1))
    return out


def sqlite_meta() -> WriterMetadata:
    return WriterMetadata(
        "SQLite Writer", writer_guid("SQLite Writer"), writer_guid("SQLite Writer", "/srv"),
        "/srv", UsageType.VSS_UT_USERDATA,
        [Component("app.db", "sqlite\\srv", "database", [FileSpec("/srv", "app.db*")],
                   ["/mnt/pool/volumes/data.img"]),
         Component("spool", "", "filegroup", [FileSpec("/srv/spool", "*", True),
                                               FileSpec("/srv/etc", "*.conf")], [])])


def fsfreeze_meta() -> WriterMetadata:
    return WriterMetadata("Filesystem Freeze Writer", writer_guid("Filesystem Freeze Writer"),
                          writer_guid("Filesystem Freeze Writer", ""), "",
                          UsageType.VSS_UT_SYSTEMSERVICE, [])


def valid_set(n: int = 2, writers: bool = True) -> tuple[FakeSet, list[SnapshotInfo],
                                                         list[WriterMetadata]]:
    set_id = str(uuid.UUID(int=12345 + n, version=4))
    return (FakeSet(set_id, 0, T), make_snapshots(set_id, n),
            [sqlite_meta(), fsfreeze_meta()] if writers else [])


def valid_doc(n: int = 2, writers: bool = True) -> bytes:
    s, snaps, metas = valid_set(n, writers)
    return D.write_backup_components(s, snaps, metas, pool_id=POOL, host="host-a")


def mutate(doc: bytes, fn: Callable[[ET.Element], object]) -> bytes:
    """Edit one of our own (trusted) documents with the stdlib parser."""
    root = ET.fromstring(doc)
    fn(root)
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)


def ssd(root: ET.Element) -> ET.Element:
    el = root.find(f"{BCD_NS}SNAPSHOT_SET_DESCRIPTION")
    assert el is not None
    return el


def descs(root: ET.Element) -> list[ET.Element]:
    return ssd(root).findall(f"{BCD_NS}SNAPSHOT_DESCRIPTION")


def lun_info(sd: ET.Element, side: str) -> ET.Element:
    el = sd.find(f"{BCD_NS}LUN_MAPPING/{BCD_NS}{side}/{BCD_NS}LUN_INFORMATION")
    assert el is not None
    return el


def refused(fn: Callable[[], object], reason: str | None = None,
            name: str | None = None, match: str | None = None) -> D.DocumentError:
    with pytest.raises(D.DocumentError) as info:
        fn()
    e = info.value
    assert isinstance(e, VssError)
    assert "\n" not in str(e) and "\n" not in e.message, str(e)
    assert e.__cause__ is None, "XML library error leaked"
    assert e.__context__ is None or e.__suppress_context__, "XML library error leaked"
    if reason is not None:
        assert e.reason == reason, (e.reason, str(e))
    if name is not None:
        assert e.name == name, str(e)
    if match is not None:
        assert re.search(match, e.message), e.message
    return e


def bcd(data: bytes, pool: str = POOL) -> D.ParsedSet:
    return D.parse_backup_components(data, pool_id=pool)


# --------------------------------------------------------------------------- round trips
def test_bcd_round_trip() -> None:
    s, snaps, metas = valid_set(3)
    doc = D.write_backup_components(s, snaps, metas, pool_id=POOL, host="host-a",
                                    service_machine="array1")
    p = bcd(doc)
    assert p.set_id == s.set_id and p.pool_id == POOL
    assert p.context is Context.BACKUP and p.attributes == Attr.TRANSPORTABLE
    assert p.originating_machine == "host-a"
    assert len(p.snapshots) == 3
    for got, want in zip(p.snapshots, snaps):
        assert got.snapshot_id == want.id
        assert got.origin_naa == want.origin_naa and got.snapshot_naa == want.naa
        assert got.size == want.size and got.kind == want.kind and got.volume == want.volume
        assert int(got.attributes) == want.attributes
        assert got.originating_machine == "host-a" and got.service_machine == "array1"
        assert got.provider_id == PROVIDER_ID
        assert got.created == pytest.approx(want.created, abs=1e-5)
    assert [w.writer_id for w in p.writer_components] == [m.writer_id for m in metas]
    wc = p.writer_components[0]
    assert wc.instance_id == metas[0].instance_id and wc.instance_name == "/srv"
    assert [(c.name, c.logical_path, c.component_type) for c in wc.components] == [
        ("app.db", "sqlite\\srv", "database"), ("spool", "", "filegroup")]
    assert p.writer_components[1].components == ()
    assert p.snapshot_ids == [x.id for x in snaps]
    assert p.to_json()["snapshots"][0]["origin_naa"] == snaps[0].origin_naa
    # writing the parsed content again gives the same document
    assert bcd(doc) == p


def test_bcd_round_trip_with_catalog_record_and_coordinator_set() -> None:
    from provider.coordinator import SnapshotSet

    set_id = str(uuid.uuid4())
    ctx = int(Context.NAS_ROLLBACK)
    lctx = ctx | T | int(Attr.PLEX)
    snaps = make_snapshots(set_id, 1, kind="plex",
                           extra=int(Attr.PLEX | Attr.HARDWARE_ASSISTED), context=ctx)
    rec = SetRecord(set_id, ctx, lctx, 12, time.time(), "host-a", "cli", 1, False)
    live = SnapshotSet(set_id, Context.NAS_ROLLBACK, Attr(lctx), None)
    docs = [D.write_backup_components(x, snaps, [], pool_id=POOL.upper(), host="host-a")
            for x in (rec, live)]
    assert docs[0] == docs[1]
    p = bcd(docs[0])
    assert p.context is Context.NAS_ROLLBACK
    assert p.attributes == Attr(lctx)
    assert p.snapshots[0].kind == "plex" and p.writer_components == ()


def test_bcd_uses_vss_names() -> None:
    text = valid_doc(1).decode()
    assert text.startswith("<?xml version='1.0' encoding='UTF-8'?>")
    for needle in ('<BACKUP_COMPONENTS xmlns="x-schema:#VssComponentMetadata"',
                   'version="1.2"', 'selectComponents="yes"', 'backupType="full"',
                   "<WRITER_COMPONENTS ", "<COMPONENT ", "<SNAPSHOT_SET_DESCRIPTION ",
                   "<SNAPSHOT_DESCRIPTION ", "<LUN_MAPPING>", "<SOURCE_LUN>",
                   "<DESTINATION_LUN>", "<LUN_INFORMATION ", "snapshotSetId=",
                   "snapshotId=", "originatingMachine=", "serviceMachine=",
                   "snapshotAttributes=", 'context="32"', "deviceIdentification=",
                   'xmlns:sp="urn:shadowplex:vss-documents:1"', "sp:poolId="):
        assert needle in text, needle


def test_device_identification_is_a_storage_device_id_descriptor() -> None:
    doc = valid_doc(1)
    root = ET.fromstring(doc)
    info = lun_info(descs(root)[0], "DESTINATION_LUN")
    blob = base64.b64decode(info.get("deviceIdentification", ""))
    version, size, count = struct.unpack_from("<III", blob)
    assert (version, size, count) == (13, len(blob), 1)
    code_set, id_type, id_size, next_off, assoc = struct.unpack_from("<IIHHI", blob, 12)
    assert (code_set, id_type, id_size, next_off, assoc) == (1, 3, 16, 32, 0)
    assert blob[28:44].hex() == info.get("serialNumber")


def test_vendor_and_product_match_the_hardware_provider() -> None:
    from provider import hardware

    assert D.VENDOR_ID == hardware.VENDOR and D.PRODUCT_ID == hardware.PRODUCT


@pytest.mark.parametrize("meta", [sqlite_meta(), fsfreeze_meta()], ids=["sqlite", "empty"])
def test_wmd_round_trip(meta: WriterMetadata) -> None:
    doc = D.write_writer_metadata(meta)
    assert doc.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<WRITER_METADATA "
                          b'xmlns="x-schema:#VssWriterMetadataInfo"')
    assert D.parse_writer_metadata(doc) == meta


def test_wmd_element_names() -> None:
    text = D.write_writer_metadata(sqlite_meta()).decode()
    for needle in ("<IDENTIFICATION ", 'friendlyName="SQLite Writer"', 'usage="USER_DATA"',
                   "<BACKUP_LOCATIONS>", "<DATABASE ", "<DATABASE_FILES ", "<FILE_GROUP ",
                   "<FILE_LIST ", 'recursive="yes"', 'filespecBackupType="3855"',
                   '<sp:VOLUME path="/mnt/pool/volumes/data.img"'):
        assert needle in text, needle


def test_wmd_reads_windows_style_document() -> None:
    # shaped like a WMD diskshadow saves (upper-case GUIDs, RESTORE_METHOD, no instance name)
    doc = b"""<WRITER_METADATA xmlns="x-schema:#VssWriterMetadataInfo" version="1.2">
\t<IDENTIFICATION writerId="75DFB225-E2E4-4d39-9AC9-FFAFF65DDF06"
 instanceId="088E7A7D-09A8-4cc6-A609-AD90E75DDC93" friendlyName="VSS Metadata Store Writer"
 usage="BOOTABLE_SYSTEM_STATE" dataSource="OTHER" majorVersion="0" minorVersion="0"/>
\t<RESTORE_METHOD method="REPLACE_AT_REBOOT_IF_CANNOT_REPLACE" writerRestore="never"
 rebootRequired="no"/>
\t<BACKUP_LOCATIONS>
\t\t<FILE_GROUP componentName="WriterMetadataStore" caption="VSS Express Writer Metadata Store"
 restoreMetadata="no" notifyOnBackupComplete="no" selectable="yes" selectableForRestore="no"
 componentFlags="0">
\t\t\t<FILE_LIST path="%SystemRoot%\\Vss\\Writers" filespec="*.xml" recursive="yes"
 filespecBackupType="3855"/>
\t\t</FILE_GROUP>
\t\t<DATABASE logicalPath="C:_Windows_NTDS" componentName="ntds" caption=""
 restoreMetadata="no" notifyOnBackupComplete="no" selectable="no" selectableForRestore="no"
 componentFlags="3">
\t\t\t<DATABASE_FILES path="C:\\Windows\\NTDS" filespec="ntds.dit" filespecBackupType="3855"/>
\t\t\t<DATABASE_LOGFILES path="C:\\Windows\\NTDS" filespec="edb*.log"
 filespecBackupType="3855"/>
\t\t</DATABASE>
\t</BACKUP_LOCATIONS>
</WRITER_METADATA>"""
    m = D.parse_writer_metadata(doc)
    assert m.writer_id == "75dfb225-e2e4-4d39-9ac9-ffaff65ddf06"
    assert m.usage_type is UsageType.VSS_UT_BOOTABLESYSTEMSTATE and m.instance_name == ""
    assert m.components[0] == Component("WriterMetadataStore", "", "filegroup",
                                        [FileSpec("%SystemRoot%\\Vss\\Writers", "*.xml", True)])
    assert [f.filespec for f in m.components[1].files] == ["ntds.dit", "edb*.log"]


_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs"),
                              blacklist_characters="\ufffe\uffff"), max_size=40)
_NAME = _TEXT.filter(bool)


@settings(max_examples=150, deadline=1000)
@given(name=_NAME, iname=_TEXT,
       usage=st.sampled_from(list(UsageType)),
       comps=st.lists(st.tuples(_NAME, _TEXT, st.sampled_from(["filegroup", "database"]),
                                st.lists(st.tuples(_NAME, _NAME, st.booleans()), max_size=3),
                                st.lists(_NAME, max_size=2)),
                      max_size=4, unique_by=lambda c: (c[1], c[0])))
def test_wmd_round_trip_any_text(name: str, iname: str, usage: UsageType,
                                 comps: list[tuple[str, str, str, list[tuple[str, str, bool]],
                                                   list[str]]]) -> None:
    meta = WriterMetadata(name, writer_guid(name), writer_guid(name, iname), iname, usage,
                          [Component(c, lp, t, [FileSpec(*f) for f in fs], list(vs))  # type: ignore[arg-type]
                           for c, lp, t, fs, vs in comps])
    assert D.parse_writer_metadata(D.write_writer_metadata(meta)) == meta


# --------------------------------------------------------------------------- export refusals
def test_export_refuses_non_transportable_set() -> None:
    s, snaps, metas = valid_set(1)
    s.attributes = 0
    refused(lambda: D.write_backup_components(s, snaps, metas, pool_id=POOL, host="a"),
            "transportable", "VSS_E_NONTRANSPORTABLE_BCD", "not created TRANSPORTABLE")


@pytest.mark.parametrize("case", ["host", "empty", "too-many", "other-set", "bad-naa",
                                  "bad-kind", "bad-id", "control-char"])
def test_export_refusals(case: str) -> None:
    s, snaps, metas = valid_set(1)
    host = "host-a"
    if case == "host":
        host = "../../etc"
    elif case == "empty":
        snaps = []
    elif case == "too-many":
        snaps = make_snapshots(s.set_id, 65)
    elif case == "other-set":
        snaps = make_snapshots(str(uuid.uuid4()), 1)
    elif case == "bad-naa":
        snaps = [SnapshotInfo(**{**snaps[0].__dict__, "naa": "5" * 32})]
    elif case == "bad-kind":
        snaps = [SnapshotInfo(**{**snaps[0].__dict__, "kind": "thin"})]
    elif case == "bad-id":
        snaps = [SnapshotInfo(**{**snaps[0].__dict__, "id": "snap-1"})]
    elif case == "control-char":
        metas = [WriterMetadata("w", writer_guid("w"), writer_guid("w"), "a\nb",
                                UsageType.VSS_UT_OTHER, [Component("c", "", "filegroup")])]
    refused(lambda: D.write_backup_components(s, snaps, metas, pool_id=POOL, host=host),
            match="cannot")


def test_write_wmd_refuses_bad_input() -> None:
    bad = WriterMetadata("w", "not-a-guid", writer_guid("w"), "", UsageType.VSS_UT_OTHER)
    refused(lambda: D.write_writer_metadata(bad), "export", match="GUID")
    bad = WriterMetadata("w", writer_guid("w"), writer_guid("w"), "", UsageType.VSS_UT_OTHER,
                         [Component("c\x01", "", "filegroup")])
    refused(lambda: D.write_writer_metadata(bad), "export", match="control")


# --------------------------------------------------------------------------- hostile BCDs
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<BACKUP_COMPONENTS xmlns="x-schema:#VssComponentMetadata" version="&lol9;"/>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE BACKUP_COMPONENTS [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<BACKUP_COMPONENTS xmlns="x-schema:#VssComponentMetadata" version="1.2">
 <SNAPSHOT_SET_DESCRIPTION snapshotSetId="&xxe;" context="32"/>
</BACKUP_COMPONENTS>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE BACKUP_COMPONENTS SYSTEM "http://attacker.invalid/vss.dtd">
<BACKUP_COMPONENTS xmlns="x-schema:#VssComponentMetadata" version="1.2"/>"""


def with_doctype(doc: bytes, doctype: bytes = b"<!DOCTYPE BACKUP_COMPONENTS>") -> bytes:
    decl, _, rest = doc.partition(b"\n")
    return decl + b"\n" + doctype + b"\n" + rest


def nested(depth: int) -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?>\n<BACKUP_COMPONENTS '
            b'xmlns="x-schema:#VssComponentMetadata" version="1.2">' + b"<a>" * depth
            + b"</a>" * depth + b"</BACKUP_COMPONENTS>")


def set_attr(path: Callable[[ET.Element], ET.Element], key: str, value: str
             ) -> Callable[[bytes], bytes]:
    def edit(doc: bytes) -> bytes:
        return mutate(doc, lambda r: path(r).set(key, value))
    return edit


def drop_ssd(root: ET.Element) -> None:
    root.remove(ssd(root))


def dup_first(root: ET.Element) -> None:
    ssd(root).append(copy.deepcopy(descs(root)[0]))


def dup_naa(root: ET.Element) -> None:
    extra = copy.deepcopy(descs(root)[0])
    extra.set("snapshotId", str(uuid.uuid4()))
    extra.set(f"{SP_NS}volume", "other")
    ssd(root).append(extra)


def two_mappings(root: ET.Element) -> None:
    sd = descs(root)[0]
    m = sd.find(f"{BCD_NS}LUN_MAPPING")
    assert m is not None
    sd.append(copy.deepcopy(m))


def to_65(root: ET.Element) -> None:
    while len(descs(root)) < 65:
        ssd(root).append(copy.deepcopy(descs(root)[0]))


def mismatched_page83(root: ET.Element) -> None:
    info = lun_info(descs(root)[0], "SOURCE_LUN")
    info.set("deviceIdentification", D._storage_device_id(naa()))


FIRST = lambda r: descs(r)[0]
SSD = ssd

HOSTILE: dict[str, tuple[Callable[[], bytes], str, str, str]] = {
    # case: (document, reason, VSS name, message pattern)
    "billion-laughs": (lambda: BILLION_LAUGHS, "dtd", "VSS_E_INVALID_XML_DOCUMENT", "DOCTYPE"),
    "xxe-etc-passwd": (lambda: XXE, "dtd", "VSS_E_INVALID_XML_DOCUMENT", "DOCTYPE"),
    "external-dtd": (lambda: EXTERNAL_DTD, "dtd", "VSS_E_INVALID_XML_DOCUMENT", "DOCTYPE"),
    "any-doctype": (lambda: with_doctype(valid_doc()), "dtd", "VSS_E_INVALID_XML_DOCUMENT",
                    "DTDs are refused"),
    "garbled": (lambda: random.Random(5).randbytes(3000), "encoding",
                "VSS_E_INVALID_XML_DOCUMENT", "UTF-8"),
    "garbled-ascii": (lambda: b"<<<>>> not xml at all &&& " * 20, "syntax",
                      "VSS_E_INVALID_XML_DOCUMENT", "not well-formed"),
    "empty": (lambda: b"", "syntax", "VSS_E_INVALID_XML_DOCUMENT", "empty"),
    "17-mib": (lambda: b"<BACKUP_COMPONENTS>" + b" " * (17 << 20) + b"</BACKUP_COMPONENTS>",
               "size", "VSS_E_INVALID_XML_DOCUMENT", "16 MiB"),
    "deep-100k": (lambda: nested(100_000), "limits", "VSS_E_INVALID_XML_DOCUMENT",
                  "nested deeper"),
    "latin-1-declared": (lambda: valid_doc().replace(b"encoding='UTF-8'",
                                                     b"encoding='ISO-8859-1'"),
                         "encoding", "VSS_E_INVALID_XML_DOCUMENT", "ISO-8859-1"),
    "utf-16": (lambda: valid_doc().decode().replace("UTF-8", "UTF-16").encode("utf-16"),
               "encoding", "VSS_E_INVALID_XML_DOCUMENT", "UTF-16"),
    "invalid-utf-8": (lambda: valid_doc().replace(b'"host-a"', b'"host-\xff"'), "encoding",
                      "VSS_E_INVALID_XML_DOCUMENT", "not valid UTF-8"),
    "wrong-root": (lambda: D.write_writer_metadata(sqlite_meta()), "structure",
                   "VSS_E_INVALID_XML_DOCUMENT", "root element .*WRITER_METADATA"),
    "wrong-namespace": (lambda: valid_doc().replace(b"x-schema:#VssComponentMetadata",
                                                    b"urn:evil"), "structure",
                        "VSS_E_INVALID_XML_DOCUMENT", "root element"),
    "no-snapshot-set": (lambda: mutate(valid_doc(), drop_ssd), "transportable",
                        "VSS_E_NONTRANSPORTABLE_BCD", "no SNAPSHOT_SET_DESCRIPTION"),
    "set-id-not-guid": (lambda: set_attr(SSD, "snapshotSetId", "x; rm -rf /")(valid_doc()),
                        "structure", "VSS_E_INVALID_XML_DOCUMENT", "snapshotSetId .* GUID"),
    "snapshot-id-not-guid": (lambda: set_attr(FIRST, "snapshotId", "123")(valid_doc()),
                             "structure", "VSS_E_INVALID_XML_DOCUMENT",
                             "snapshotId '123' is not a GUID"),
    "writer-id-not-guid": (lambda: mutate(valid_doc(), lambda r: r[0].set("writerId", "w")),
                           "structure", "VSS_E_INVALID_XML_DOCUMENT", "writerId 'w'"),
    "naa-not-6": (lambda: set_attr(lambda r: lun_info(FIRST(r), "SOURCE_LUN"), "serialNumber",
                                   "5" + "0" * 31)(valid_doc()), "structure",
                  "VSS_E_INVALID_XML_DOCUMENT", "not a naa id"),
    "naa-short": (lambda: set_attr(lambda r: lun_info(FIRST(r), "DESTINATION_LUN"),
                                   "serialNumber", "6abc")(valid_doc()), "structure",
                  "VSS_E_INVALID_XML_DOCUMENT", "serialNumber '6abc'"),
    "page83-mismatch": (lambda: mutate(valid_doc(), mismatched_page83), "structure",
                        "VSS_E_INVALID_XML_DOCUMENT", "deviceIdentification names naa"),
    "page83-garbage": (lambda: set_attr(lambda r: lun_info(FIRST(r), "SOURCE_LUN"),
                                        "deviceIdentification", "QUFBQQ==")(valid_doc()),
                       "structure", "VSS_E_INVALID_XML_DOCUMENT", "too short"),
    "unknown-attr-bits": (lambda: set_attr(FIRST, "snapshotAttributes",
                                           str(0x80000000 | T))(valid_doc()), "structure",
                          "VSS_E_INVALID_XML_DOCUMENT", "unknown bits 0x80000000"),
    "unknown-context-bits": (lambda: set_attr(SSD, "context", str(0x100 | T))(valid_doc()),
                             "structure", "VSS_E_INVALID_XML_DOCUMENT", "unknown attribute"),
    "set-not-transportable": (lambda: set_attr(SSD, "context", "0")(valid_doc()),
                              "transportable", "VSS_E_NONTRANSPORTABLE_BCD", "TRANSPORTABLE"),
    "snapshot-not-transportable": (lambda: set_attr(FIRST, "snapshotAttributes",
                                                    str(0x30000))(valid_doc()),
                                   "transportable", "VSS_E_NONTRANSPORTABLE_BCD",
                                   "lacks TRANSPORTABLE"),
    "client-accessible-context": (lambda: set_attr(SSD, "context", str(0x1D | T))(valid_doc()),
                                  "context", "VSS_E_UNSUPPORTED_CONTEXT", "CLIENT_ACCESSIBLE"),
    "context-not-number": (lambda: set_attr(SSD, "context", "0x20")(valid_doc()), "structure",
                           "VSS_E_INVALID_XML_DOCUMENT", "not a decimal number"),
    "snapshot-other-context": (lambda: set_attr(FIRST, "snapshotAttributes",
                                                str(0x19 | T))(valid_doc()),
                               "context", "VSS_E_INVALID_XML_DOCUMENT", "another context"),
    "other-provider": (lambda: set_attr(FIRST, "providerId", str(uuid.uuid4()))(valid_doc()),
                       "provider", "VSS_E_NO_SNAPSHOTS_IMPORTED", "not by shadowplex"),
    "other-vendor": (lambda: set_attr(lambda r: lun_info(FIRST(r), "SOURCE_LUN"), "vendorId",
                                      "EMC")(valid_doc()),
                     "provider", "VSS_E_NO_SNAPSHOTS_IMPORTED", "not a shadowplex LUN"),
    "no-pool-id": (lambda: mutate(valid_doc(), lambda r: ssd(r).attrib.pop(f"{SP_NS}poolId")),
                   "structure", "VSS_E_INVALID_XML_DOCUMENT", "no sp:poolId"),
    "duplicate-snapshot-ids": (lambda: mutate(valid_doc(), dup_first), "structure",
                               "VSS_E_INVALID_XML_DOCUMENT", "snapshot id .* more than once"),
    "duplicate-naa": (lambda: mutate(valid_doc(), dup_naa), "structure",
                      "VSS_E_INVALID_XML_DOCUMENT", "naa id .* more than once"),
    "65-snapshots": (lambda: mutate(valid_doc(1), to_65), "structure",
                     "VSS_E_INVALID_XML_DOCUMENT", "65 SNAPSHOT_DESCRIPTION"),
    "no-snapshots": (lambda: mutate(valid_doc(1), lambda r: ssd(r).remove(descs(r)[0])),
                     "structure", "VSS_E_INVALID_XML_DOCUMENT", "0 SNAPSHOT_DESCRIPTION"),
    "two-lun-mappings": (lambda: mutate(valid_doc(1), two_mappings), "structure",
                         "VSS_E_INVALID_XML_DOCUMENT", "2 LUN_MAPPING"),
    "host-path-traversal": (lambda: set_attr(FIRST, "originatingMachine", "../../x")(
        valid_doc(1)), "structure", "VSS_E_INVALID_XML_DOCUMENT", "not a host name"),
    "volume-path-traversal": (lambda: set_attr(FIRST, f"{SP_NS}volume", "../v")(valid_doc(1)),
                              "structure", "VSS_E_INVALID_XML_DOCUMENT", "not a volume name"),
    "bad-kind": (lambda: set_attr(FIRST, f"{SP_NS}kind", "thin")(valid_doc(1)), "structure",
                 "VSS_E_INVALID_XML_DOCUMENT", "sp:kind 'thin'"),
    "negative-size": (lambda: set_attr(FIRST, f"{SP_NS}size", "-1")(valid_doc(1)), "structure",
                      "VSS_E_INVALID_XML_DOCUMENT", "out of range"),
    "newline-in-value": (lambda: set_attr(FIRST, "serviceMachine", "a\nb")(valid_doc(1)),
                         "structure", "VSS_E_INVALID_XML_DOCUMENT", "control characters"),
    "two-roots": (lambda: valid_doc(1) + b"<BACKUP_COMPONENTS/>", "syntax",
                  "VSS_E_INVALID_XML_DOCUMENT", "not well-formed"),
    "unbound-prefix": (lambda: b'<BACKUP_COMPONENTS xmlns="x-schema:#VssComponentMetadata" '
                                b'evil:x="1"/>', "syntax", "VSS_E_INVALID_XML_DOCUMENT",
                       "not well-formed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_backup_components(case: str) -> None:
    make, reason, name, pattern = HOSTILE[case]
    data = make()
    start = time.monotonic()
    e = refused(lambda: bcd(data), reason, name, pattern)
    assert time.monotonic() - start < 2.0, f"{case} took too long"
    assert "root:" not in str(e)  # nothing of /etc/passwd


def test_another_pool() -> None:
    refused(lambda: bcd(valid_doc(), pool=OTHER_POOL), "pool", "VSS_E_NO_SNAPSHOTS_IMPORTED",
            f"document names LUNs of another pool \\({POOL}\\).*{OTHER_POOL}")


def test_not_bytes() -> None:
    refused(lambda: bcd(valid_doc().decode()), "type")  # type: ignore[arg-type]
    refused(lambda: D.parse_writer_metadata(None), "type")  # type: ignore[arg-type]


def test_bad_pool_id_argument_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        bcd(valid_doc(), pool="nope")


def test_every_truncation_is_refused() -> None:
    doc = valid_doc(1, writers=False)
    whole = doc.rstrip()
    for cut in range(len(doc)):
        part = doc[:cut]
        if part.rstrip() == whole:  # only trailing whitespace cut: still the whole document
            assert bcd(part).set_id
            continue
        refused(lambda p=part: bcd(p))


def test_utf8_bom_and_no_declaration_are_fine() -> None:
    doc = valid_doc(1)
    assert bcd(b"\xef\xbb\xbf" + doc).set_id
    assert bcd(doc.partition(b"\n")[2]).set_id
    assert bcd(doc.replace(b"encoding='UTF-8'", b'encoding="utf8"')).set_id


def test_unknown_elements_and_attributes_are_ignored() -> None:
    def extra(root: ET.Element) -> None:
        ET.SubElement(root, "{urn:vendor}EXTRA", {"x": "1"})
        descs(root)[0].set("{urn:vendor}note", "hello")
    p = bcd(mutate(valid_doc(1), extra))
    assert len(p.snapshots) == 1


# --------------------------------------------------------------------------- hostile WMDs
WMD_HOSTILE: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "billion-laughs": (lambda: BILLION_LAUGHS.replace(b"BACKUP_COMPONENTS", b"WRITER_METADATA"),
                       "dtd", "DOCTYPE"),
    "xxe": (lambda: XXE.replace(b"BACKUP_COMPONENTS", b"WRITER_METADATA"), "dtd", "DOCTYPE"),
    "wrong-root": (valid_doc, "structure", "root element"),
    "17-mib": (lambda: b" " * (17 << 20), "size", "16 MiB"),
    "truncated": (lambda: D.write_writer_metadata(sqlite_meta())[:-30], "syntax",
                  "not well-formed"),
    "no-identification": (lambda: mutate(D.write_writer_metadata(sqlite_meta()),
                                         lambda r: r.remove(r[0])), "structure",
                          "no IDENTIFICATION"),
    "bad-writer-id": (lambda: mutate(D.write_writer_metadata(sqlite_meta()),
                                     lambda r: r[0].set("writerId", "{nope}")), "structure",
                      "not a GUID"),
    "bad-usage": (lambda: mutate(D.write_writer_metadata(sqlite_meta()),
                                 lambda r: r[0].set("usage", "EVIL")), "structure",
                  "usage 'EVIL'"),
    "bad-recursive": (lambda: D.write_writer_metadata(sqlite_meta()).replace(
        b'recursive="yes"', b'recursive="maybe"'), "structure", "expected yes or no"),
    "deep": (lambda: b"<WRITER_METADATA>" + b"<x>" * 100_000 + b"</x>" * 100_000
             + b"</WRITER_METADATA>", "limits", "nested deeper"),
    "many-elements": (lambda: b'<WRITER_METADATA version="1">' + b"<x/>" * 200_000
                      + b"</WRITER_METADATA>", "limits", "more than 100000 elements"),
}


@pytest.mark.parametrize("case", list(WMD_HOSTILE))
def test_hostile_writer_metadata(case: str) -> None:
    make, reason, pattern = WMD_HOSTILE[case]
    data = make()
    refused(lambda: D.parse_writer_metadata(data), reason, "VSS_E_INVALID_XML_DOCUMENT",
            pattern)


# --------------------------------------------------------------------------- fuzz
VALID = valid_doc(2)
VALID_WMD = D.write_writer_metadata(sqlite_meta())
_ATTR_RE = re.compile(rb'([A-Za-z:]+)="([^"]*)"')
_ATTR_SPANS = [m.span(2) for m in _ATTR_RE.finditer(VALID)]


def check_bcd(data: bytes) -> None:
    try:
        p = bcd(data)
    except D.DocumentError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(p, D.ParsedSet) and p.pool_id == POOL
    assert 1 <= len(p.snapshots) <= 64 and p.attributes & Attr.TRANSPORTABLE
    assert len(set(p.snapshot_ids)) == len(p.snapshots)


def check_wmd(data: bytes) -> None:
    try:
        m = D.parse_writer_metadata(data)
    except D.DocumentError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(m, WriterMetadata)


FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_bcd(data)
    check_wmd(data)


_EDIT = st.tuples(st.sampled_from(["delete", "insert", "replace", "duplicate"]),
                  st.integers(0, len(VALID)), st.integers(1, 64), st.binary(max_size=16))


def apply_edits(doc: bytes, edits: list[tuple[str, int, int, bytes]]) -> bytes:
    for op, pos, length, blob in edits:
        pos = min(pos, len(doc))
        if op == "delete":
            doc = doc[:pos] + doc[pos + length:]
        elif op == "insert":
            doc = doc[:pos] + blob + doc[pos:]
        elif op == "replace":
            doc = doc[:pos] + blob + doc[pos + len(blob):]
        else:
            doc = doc[:pos] + doc[pos:pos + length] + doc[pos:]
    return doc


@FUZZ
@given(st.lists(_EDIT, min_size=1, max_size=4))
def test_fuzz_byte_mutations_of_a_valid_document(edits: list[tuple[str, int, int, bytes]]
                                                 ) -> None:
    check_bcd(apply_edits(VALID, edits))
    check_wmd(apply_edits(VALID_WMD, edits))


@FUZZ
@given(st.integers(0, len(_ATTR_SPANS) - 1),
       st.one_of(st.text(max_size=40), st.integers(-(2**64), 2**64).map(str),
                 st.sampled_from(["", "0", "32", "yes", "no", "6" * 32, str(uuid.uuid4()),
                                  "4294967295", "-1", "1e3", "NaN", "AAAA", "=="])))
def test_fuzz_attribute_values(index: int, value: str) -> None:
    start, end = _ATTR_SPANS[index]
    escaped = quoteattr(value)[1:-1].encode("utf-8", "surrogatepass")
    check_bcd(VALID[:start] + escaped + VALID[end:])


@FUZZ
@given(st.sampled_from(["SNAPSHOT_DESCRIPTION", "LUN_MAPPING", "SOURCE_LUN", "DESTINATION_LUN",
                        "LUN_INFORMATION", "WRITER_COMPONENTS", "COMPONENT",
                        "SNAPSHOT_SET_DESCRIPTION"]),
       st.sampled_from(["drop", "double", "empty"]), st.integers(0, 3))
def test_fuzz_structure(tag: str, op: str, which: int) -> None:
    def edit(root: ET.Element) -> None:
        parents = {c: p for p in root.iter() for c in p}
        found = [e for e in root.iter() if e.tag == BCD_NS + tag]
        if not found:
            return
        el = found[which % len(found)]
        parent = parents.get(el)
        if op == "drop" and parent is not None:
            parent.remove(el)
        elif op == "double" and parent is not None:
            parent.append(copy.deepcopy(el))
        else:
            el.attrib.clear()
    check_bcd(mutate(VALID, edit))
