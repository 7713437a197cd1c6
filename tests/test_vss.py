"""Tests for provider/vss.py (and hresults.py, snapshot_prop.py).

The literal numbers below are the spec: they were read from mingw-w64's vss.h, Wine's
vss.idl, Microsoft Learn's VSS pages and the Win32-metadata HRESULT tables (see the
comments in provider/vss.py). A test here must fail if a value drifts.
"""

from __future__ import annotations

import json
import pickle
import uuid

import pytest

from provider import vss
from provider.snapshot_prop import SnapshotProp
from provider.vss import (
    CONTEXT_BITS,
    CREATABLE_CONTEXTS,
    HRESULTS,
    MAX_VOLUMES_PER_SET,
    OPTION_BITS,
    PROVIDER_ID,
    SUCCESS_HRESULTS,
    Attr,
    Context,
    SnapshotState,
    VssError,
    attr_names,
    context_attributes,
    context_matches,
    hresult_name,
    hresult_signed,
    is_auto_release,
    is_persistent,
    parse_attr_names,
    parse_context,
    snapshot_context,
    split_context,
    uses_writers,
    validate_attributes,
)

# --------------------------------------------------------------------------- the spec

ATTR_SPEC = {
    "PERSISTENT": 0x1,
    "NO_AUTORECOVERY": 0x2,
    "CLIENT_ACCESSIBLE": 0x4,
    "NO_AUTO_RELEASE": 0x8,
    "NO_WRITERS": 0x10,
    "TRANSPORTABLE": 0x20,
    "NOT_SURFACED": 0x40,
    "NOT_TRANSACTED": 0x80,
    "HARDWARE_ASSISTED": 0x10000,
    "DIFFERENTIAL": 0x20000,
    "PLEX": 0x40000,
    "IMPORTED": 0x80000,
    "EXPOSED_LOCALLY": 0x100000,
    "EXPOSED_REMOTELY": 0x200000,
    "AUTORECOVER": 0x400000,
    "ROLLBACK_RECOVERY": 0x800000,
    "DELAYED_POSTSNAPSHOT": 0x1000000,
    "TXF_RECOVERY": 0x2000000,
    "FILE_SHARE": 0x4000000,
}

CONTEXT_SPEC = {
    "BACKUP": 0x0,
    "FILE_SHARE_BACKUP": 0x10,
    "NAS_ROLLBACK": 0x19,
    "APP_ROLLBACK": 0x9,
    "CLIENT_ACCESSIBLE": 0x1D,
    "CLIENT_ACCESSIBLE_WRITERS": 0xD,
    "ALL": 0xFFFFFFFF,
}

STATE_SPEC = {
    "UNKNOWN": 0,
    "PREPARING": 1,
    "PROCESSING_PREPARE": 2,
    "PREPARED": 3,
    "PROCESSING_PRECOMMIT": 4,
    "PRECOMMITTED": 5,
    "PROCESSING_COMMIT": 6,
    "COMMITTED": 7,
    "PROCESSING_POSTCOMMIT": 8,
    "PROCESSING_PREFINALCOMMIT": 9,
    "PREFINALCOMMITTED": 10,
    "PROCESSING_POSTFINALCOMMIT": 11,
    "CREATED": 12,
    "ABORTED": 13,
    "DELETED": 14,
    "POSTCOMMITTED": 15,
}

HRESULT_SPEC = {
    "VSS_E_BAD_STATE": 0x80042301,
    "VSS_E_UNEXPECTED": 0x80042302,
    "VSS_E_PROVIDER_ALREADY_REGISTERED": 0x80042303,
    "VSS_E_PROVIDER_NOT_REGISTERED": 0x80042304,
    "VSS_E_PROVIDER_VETO": 0x80042306,
    "VSS_E_PROVIDER_IN_USE": 0x80042307,
    "VSS_E_OBJECT_NOT_FOUND": 0x80042308,
    "VSS_E_VOLUME_NOT_SUPPORTED": 0x8004230C,
    "VSS_E_OBJECT_ALREADY_EXISTS": 0x8004230D,
    "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER": 0x8004230E,
    "VSS_E_UNEXPECTED_PROVIDER_ERROR": 0x8004230F,
    "VSS_E_INVALID_XML_DOCUMENT": 0x80042311,
    "VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED": 0x80042312,
    "VSS_E_FLUSH_WRITES_TIMEOUT": 0x80042313,
    "VSS_E_HOLD_WRITES_TIMEOUT": 0x80042314,
    "VSS_E_SNAPSHOT_SET_IN_PROGRESS": 0x80042316,
    "VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED": 0x80042317,
    "VSS_E_UNSUPPORTED_CONTEXT": 0x8004231B,
    "VSS_E_VOLUME_IN_USE": 0x8004231D,
    "VSS_E_MAXIMUM_DIFFAREA_ASSOCIATIONS_REACHED": 0x8004231E,
    "VSS_E_INSUFFICIENT_STORAGE": 0x8004231F,
    "VSS_E_NO_SNAPSHOTS_IMPORTED": 0x80042320,
    "VSS_E_SOME_SNAPSHOTS_NOT_IMPORTED": 0x80042321,
    "VSS_E_NESTED_VOLUME_LIMIT": 0x8004232C,
    "VSS_E_NOT_SUPPORTED": 0x8004232F,
    "VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT": 0x800423F0,
    "VSS_E_WRITERERROR_OUTOFRESOURCES": 0x800423F1,
    "VSS_E_WRITERERROR_TIMEOUT": 0x800423F2,
    "VSS_E_WRITERERROR_RETRYABLE": 0x800423F3,
    "VSS_E_WRITERERROR_NONRETRYABLE": 0x800423F4,
    "E_ACCESSDENIED": 0x80070005,
    "E_INVALIDARG": 0x80070057,
    "E_OUTOFMEMORY": 0x8007000E,
    "E_ABORT": 0x80004004,
}


def test_attribute_values_match_spec() -> None:
    assert {m.name: int(m) for m in Attr.__members__.values()} == ATTR_SPEC


def test_attribute_bits_are_single_and_distinct() -> None:
    values = [int(m) for m in Attr.__members__.values()]
    assert all(v and v & (v - 1) == 0 for v in values)
    assert len(set(values)) == len(values)


def test_context_values_match_spec() -> None:
    assert {m.name: int(m) for m in Context} == CONTEXT_SPEC


def test_contexts_are_bitmasks_not_an_index() -> None:
    # The trap: a docs page lists the contexts as 0, 1, 2, ...
    assert int(Context.FILE_SHARE_BACKUP) != 1
    assert int(Context.FILE_SHARE_BACKUP) == int(Attr.NO_WRITERS)
    assert int(Context.NAS_ROLLBACK) == int(
        Attr.PERSISTENT | Attr.NO_AUTO_RELEASE | Attr.NO_WRITERS
    )
    assert int(Context.APP_ROLLBACK) == int(Attr.PERSISTENT | Attr.NO_AUTO_RELEASE)
    assert int(Context.CLIENT_ACCESSIBLE) == int(
        Attr.PERSISTENT | Attr.CLIENT_ACCESSIBLE | Attr.NO_AUTO_RELEASE | Attr.NO_WRITERS
    )
    assert int(Context.CLIENT_ACCESSIBLE_WRITERS) == int(
        Attr.PERSISTENT | Attr.CLIENT_ACCESSIBLE | Attr.NO_AUTO_RELEASE
    )
    assert int(CONTEXT_BITS) == 0x1D
    assert int(OPTION_BITS) == 0x20 | 0x20000 | 0x40000


def test_state_values_match_spec() -> None:
    assert {m.name: int(m) for m in SnapshotState} == STATE_SPEC
    with pytest.raises(ValueError):
        SnapshotState(16)  # VSS_SS_COUNT is a sentinel, not a state


def test_hresult_values_match_spec() -> None:
    for name, value in HRESULT_SPEC.items():
        assert HRESULTS[name] == value, name
    assert SUCCESS_HRESULTS["VSS_S_ASYNC_PENDING"] == 0x00042309
    assert SUCCESS_HRESULTS["VSS_S_ASYNC_FINISHED"] == 0x0004230A
    assert SUCCESS_HRESULTS["VSS_S_ASYNC_CANCELLED"] == 0x0004230B
    assert SUCCESS_HRESULTS["VSS_S_SOME_SNAPSHOTS_NOT_IMPORTED"] == 0x00042321


def test_hresult_table_is_well_formed() -> None:
    values = list(HRESULTS.values()) + list(SUCCESS_HRESULTS.values())
    assert len(set(values)) == len(values), "two names share an HRESULT"
    assert all(v & 0x80000000 for v in HRESULTS.values()), "errors have the severity bit"
    assert not any(v & 0x80000000 for v in SUCCESS_HRESULTS.values())
    assert all(n.startswith(("VSS_E_", "E_")) for n in HRESULTS)
    # every VSS_E_ code sits in FACILITY_ITF (4), code range 0x23xx/0x24xx
    assert all((v >> 16) & 0x7FF == 4 for n, v in HRESULTS.items() if n.startswith("VSS_E_"))


def test_hresult_signed_and_names() -> None:
    assert hresult_signed(0x80042301) == -2147212543  # the Win32-metadata decimal
    assert hresult_signed(0x8004231B) == -2147212517
    assert hresult_signed(0x0004230A) == 271114
    assert hresult_name(0x80042316) == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
    assert hresult_name(-2147212516 + 1) == "VSS_E_VOLUME_IN_USE"  # 0x8004231D signed
    assert hresult_name(0x0004230A) == "VSS_S_ASYNC_FINISHED"
    assert hresult_name(0x8004231C) is None  # a gap in the table
    assert hresult_name(0x80042305) is None


def test_vss_names() -> None:
    assert Context.NAS_ROLLBACK.vss_name == "VSS_CTX_NAS_ROLLBACK"
    assert Context.FILE_SHARE_BACKUP.cli_name == "file-share-backup"
    assert Attr.NO_AUTO_RELEASE.vss_name == "VSS_VOLSNAP_ATTR_NO_AUTO_RELEASE"
    assert SnapshotState.CREATED.vss_name == "VSS_SS_CREATED"
    with pytest.raises(ValueError):
        (Attr.PERSISTENT | Attr.PLEX).vss_name  # noqa: B018


def test_constants() -> None:
    assert str(uuid.UUID(PROVIDER_ID)) == PROVIDER_ID
    assert PROVIDER_ID == "42ad3edf-ef59-4b69-bcfd-9af026cb2cd2"  # never changes
    assert MAX_VOLUMES_PER_SET == 64


# --------------------------------------------------------------------------- VssError


def test_vss_error_carries_name_hresult_message() -> None:
    e = VssError("VSS_E_SNAPSHOT_SET_IN_PROGRESS", "set 1234 is being created")
    assert e.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
    assert e.hresult == 0x80042316
    assert e.message == "set 1234 is being created"
    assert str(e) == "VSS_E_SNAPSHOT_SET_IN_PROGRESS (0x80042316): set 1234 is being created"
    assert e.to_json() == {
        "error": "VSS_E_SNAPSHOT_SET_IN_PROGRESS",
        "hresult": 0x80042316,
        "message": "set 1234 is being created",
    }
    again = pickle.loads(pickle.dumps(e))
    assert (again.name, again.hresult, again.message) == (e.name, e.hresult, e.message)


def test_vss_error_unknown_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown VSS error name"):
        VssError("VSS_E_NO_SUCH_THING", "x")
    with pytest.raises(ValueError, match="success code"):
        VssError("VSS_S_ASYNC_FINISHED", "x")


# --------------------------------------------------------------------------- context rules


@pytest.mark.parametrize(
    ("ctx", "bits", "auto_release", "persistent", "writers"),
    [
        (Context.BACKUP, Attr(0), True, False, True),
        (Context.FILE_SHARE_BACKUP, Attr.NO_WRITERS, True, False, False),
        (
            Context.NAS_ROLLBACK,
            Attr.PERSISTENT | Attr.NO_AUTO_RELEASE | Attr.NO_WRITERS,
            False,
            True,
            False,
        ),
        (Context.APP_ROLLBACK, Attr.PERSISTENT | Attr.NO_AUTO_RELEASE, False, True, True),
        (
            Context.CLIENT_ACCESSIBLE,
            Attr.PERSISTENT | Attr.CLIENT_ACCESSIBLE | Attr.NO_AUTO_RELEASE | Attr.NO_WRITERS,
            False,
            True,
            False,
        ),
        (
            Context.CLIENT_ACCESSIBLE_WRITERS,
            Attr.PERSISTENT | Attr.CLIENT_ACCESSIBLE | Attr.NO_AUTO_RELEASE,
            False,
            True,
            True,
        ),
    ],
)
def test_context_implied_bits(
    ctx: Context, bits: Attr, auto_release: bool, persistent: bool, writers: bool
) -> None:
    assert context_attributes(ctx) == bits
    assert context_attributes(int(ctx)) == bits
    assert is_auto_release(ctx) is auto_release
    assert is_persistent(ctx) is persistent
    assert uses_writers(ctx) is writers


def test_context_all_implies_nothing() -> None:
    with pytest.raises(VssError) as ei:
        context_attributes(Context.ALL)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"
    with pytest.raises(VssError):
        is_auto_release(-1)


def test_creatable_contexts() -> None:
    assert CREATABLE_CONTEXTS == (
        Context.BACKUP,
        Context.FILE_SHARE_BACKUP,
        Context.NAS_ROLLBACK,
        Context.APP_ROLLBACK,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backup", Context.BACKUP),
        ("file-share-backup", Context.FILE_SHARE_BACKUP),
        ("nas-rollback", Context.NAS_ROLLBACK),
        ("app-rollback", Context.APP_ROLLBACK),
        ("  NAS-Rollback ", Context.NAS_ROLLBACK),
        ("file_share_backup", Context.FILE_SHARE_BACKUP),
        ("VSS_CTX_BACKUP", Context.BACKUP),
        ("VSS_CTX_FILE_SHARE_BACKUP", Context.FILE_SHARE_BACKUP),
        ("vss_ctx_app_rollback", Context.APP_ROLLBACK),
        ("0", Context.BACKUP),
        ("16", Context.FILE_SHARE_BACKUP),
        ("0x10", Context.FILE_SHARE_BACKUP),
        ("0x19", Context.NAS_ROLLBACK),
        ("25", Context.NAS_ROLLBACK),
        ("0X9", Context.APP_ROLLBACK),
        ("9", Context.APP_ROLLBACK),
        (0x19, Context.NAS_ROLLBACK),
        (Context.APP_ROLLBACK, Context.APP_ROLLBACK),
    ],
)
def test_parse_context_accepts(text: str | int, expected: Context) -> None:
    assert parse_context(text) is expected


@pytest.mark.parametrize("ctx", CREATABLE_CONTEXTS)
def test_parse_context_round_trips(ctx: Context) -> None:
    assert parse_context(ctx.cli_name) is ctx
    assert parse_context(ctx.vss_name) is ctx
    assert parse_context(ctx.name) is ctx
    assert parse_context(hex(ctx)) is ctx
    assert parse_context(str(int(ctx))) is ctx


@pytest.mark.parametrize(
    "text",
    [
        "client-accessible",
        "client-accessible-writers",
        "VSS_CTX_CLIENT_ACCESSIBLE",
        "VSS_CTX_CLIENT_ACCESSIBLE_WRITERS",
        "0x1d",
        "0xd",
        "29",
        "13",
        0x1D,
    ],
)
def test_parse_context_refuses_client_accessible(text: str | int) -> None:
    with pytest.raises(VssError) as ei:
        parse_context(text)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"
    assert ei.value.hresult == 0x8004231B
    assert "system provider" in ei.value.message


@pytest.mark.parametrize("text", ["all", "VSS_CTX_ALL", "0xffffffff", "4294967295", "-1"])
def test_parse_context_all_only_for_queries(text: str) -> None:
    with pytest.raises(VssError) as ei:
        parse_context(text)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"
    assert "quer" in ei.value.message
    assert parse_context(text, allow_all=True) is Context.ALL


def test_parse_context_allow_all_still_refuses_client_accessible() -> None:
    with pytest.raises(VssError):
        parse_context("client-accessible", allow_all=True)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "bogus", "backups", "VSS_CTX_", "1", "2", "3", "0x20", "0x100000000", "-2",
     "0xg", "1.0", "VSS_CTX_NAS"],
)
def test_parse_context_refuses_unknown(text: str) -> None:
    with pytest.raises(VssError) as ei:
        parse_context(text)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"
    assert "unknown snapshot context" in ei.value.message
    assert "nas-rollback" in ei.value.message  # tells the user what is valid


def test_parse_context_refuses_bool() -> None:
    with pytest.raises(VssError):
        parse_context(True)


def test_parse_context_hints_at_option_bits() -> None:
    with pytest.raises(VssError) as ei:
        parse_context("0x20019")
    assert "VSS_CTX_NAS_ROLLBACK" in ei.value.message
    assert "0x20000" in ei.value.message


# --------------------------------------------------------------------------- validate_attributes


@pytest.mark.parametrize("ctx", CREATABLE_CONTEXTS)
@pytest.mark.parametrize(
    "extra",
    [
        Attr(0),
        Attr.DIFFERENTIAL,
        Attr.PLEX,
        Attr.TRANSPORTABLE,
        Attr.TRANSPORTABLE | Attr.DIFFERENTIAL,
        Attr.TRANSPORTABLE | Attr.PLEX,
    ],
)
def test_validate_attributes_allows_options(ctx: Context, extra: Attr) -> None:
    got = validate_attributes(ctx, extra)
    assert isinstance(got, Attr)
    assert got == context_attributes(ctx) | extra


@pytest.mark.parametrize("ctx", CREATABLE_CONTEXTS)
def test_validate_attributes_allows_context_own_bits(ctx: Context) -> None:
    own = context_attributes(ctx)
    assert validate_attributes(ctx, own) == own
    assert validate_attributes(ctx, int(own) | 0x20000) == own | Attr.DIFFERENTIAL


@pytest.mark.parametrize("ctx", CREATABLE_CONTEXTS)
def test_validate_attributes_refuses_differential_with_plex(ctx: Context) -> None:
    for extra in (0x20000 | 0x40000, 0x20000 | 0x40000 | 0x20):
        with pytest.raises(VssError) as ei:
            validate_attributes(ctx, extra)
        assert ei.value.name == "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER"
        assert ei.value.hresult == 0x8004230E
        assert "mutually exclusive" in ei.value.message


@pytest.mark.parametrize("bit", [0x100, 0x8000, 0x8000000, 0x80000000, 0x100 | 0x20000])
def test_validate_attributes_refuses_unknown_bits(bit: int) -> None:
    with pytest.raises(VssError) as ei:
        validate_attributes(Context.BACKUP, bit)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"
    assert "unknown attribute bits" in ei.value.message


@pytest.mark.parametrize(
    ("ctx", "extra"),
    [
        (Context.BACKUP, Attr.PERSISTENT),
        (Context.BACKUP, Attr.NO_AUTO_RELEASE),
        (Context.BACKUP, Attr.NO_WRITERS),
        (Context.APP_ROLLBACK, Attr.NO_WRITERS),
        (Context.FILE_SHARE_BACKUP, Attr.PERSISTENT),
        (Context.NAS_ROLLBACK, Attr.CLIENT_ACCESSIBLE),
        (Context.BACKUP, Attr.HARDWARE_ASSISTED),
        (Context.BACKUP, Attr.EXPOSED_LOCALLY),
        (Context.BACKUP, Attr.IMPORTED),
        (Context.NAS_ROLLBACK, Attr.NOT_SURFACED),
        (Context.NAS_ROLLBACK, Attr.FILE_SHARE),
    ],
)
def test_validate_attributes_refuses_non_option_bits(ctx: Context, extra: Attr) -> None:
    with pytest.raises(VssError) as ei:
        validate_attributes(ctx, extra)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"
    assert str(extra.name) in ei.value.message


@pytest.mark.parametrize(
    "ctx", [Context.CLIENT_ACCESSIBLE, Context.CLIENT_ACCESSIBLE_WRITERS, Context.ALL, 0x1D, -1]
)
def test_validate_attributes_refuses_uncreatable_context(ctx: Context | int) -> None:
    with pytest.raises(VssError) as ei:
        validate_attributes(ctx, 0)
    assert ei.value.name == "VSS_E_UNSUPPORTED_CONTEXT"


@pytest.mark.parametrize("extra", [-1, 1 << 32])
def test_validate_attributes_refuses_out_of_range(extra: int) -> None:
    with pytest.raises(VssError):
        validate_attributes(Context.BACKUP, extra)


def test_split_context() -> None:
    assert split_context(0x19) == (Context.NAS_ROLLBACK, Attr(0x19))
    assert split_context(0x20019) == (Context.NAS_ROLLBACK, Attr(0x20019))
    assert split_context(0x40029) == (Context.APP_ROLLBACK, Attr(0x40029))
    assert split_context(0) == (Context.BACKUP, Attr(0))
    for bad, name in [
        (0x1D, "VSS_E_UNSUPPORTED_CONTEXT"),
        (0xFFFFFFFF, "VSS_E_UNSUPPORTED_CONTEXT"),
        (-1, "VSS_E_UNSUPPORTED_CONTEXT"),
        (0x1, "VSS_E_UNSUPPORTED_CONTEXT"),  # PERSISTENT alone is no context
        (0x100, "VSS_E_UNSUPPORTED_CONTEXT"),
        (0x60000, "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER"),
    ]:
        with pytest.raises(VssError) as ei:
            split_context(bad)
        assert ei.value.name == name, hex(bad)


def test_snapshot_context_and_matching() -> None:
    mask = Attr.PERSISTENT | Attr.NO_AUTO_RELEASE | Attr.NO_WRITERS | Attr.DIFFERENTIAL
    mask |= Attr.HARDWARE_ASSISTED | Attr.EXPOSED_LOCALLY
    assert snapshot_context(mask) is Context.NAS_ROLLBACK
    assert snapshot_context(Attr.DIFFERENTIAL) is Context.BACKUP
    with pytest.raises(ValueError):
        snapshot_context(Attr.PERSISTENT)
    assert context_matches(Context.NAS_ROLLBACK, mask)
    assert not context_matches(Context.APP_ROLLBACK, mask)
    assert not context_matches(Context.BACKUP, mask)
    assert context_matches(Context.ALL, mask)
    assert context_matches(-1, 0)
    assert context_matches(Context.BACKUP, Attr.PLEX)


# --------------------------------------------------------------------------- attribute names


def test_attr_names_in_bit_order() -> None:
    mask = Attr.DIFFERENTIAL | Attr.PERSISTENT | Attr.EXPOSED_LOCALLY | Attr.NO_WRITERS
    assert attr_names(mask) == ["PERSISTENT", "NO_WRITERS", "DIFFERENTIAL", "EXPOSED_LOCALLY"]
    assert attr_names(0) == []
    assert attr_names(0x19) == ["PERSISTENT", "NO_AUTO_RELEASE", "NO_WRITERS"]
    assert attr_names(vss.KNOWN_ATTR_BITS) == list(ATTR_SPEC)


def test_attr_names_refuses_unknown_bits() -> None:
    with pytest.raises(ValueError):
        attr_names(0x100)
    with pytest.raises(ValueError):
        attr_names(-1)


def test_parse_attr_names_forms() -> None:
    assert parse_attr_names("") == Attr(0)
    assert parse_attr_names("differential") == Attr.DIFFERENTIAL
    assert parse_attr_names("DIFFERENTIAL, transportable") == Attr(0x20020)
    assert parse_attr_names("no-auto-release|VSS_VOLSNAP_ATTR_PERSISTENT") == Attr(0x9)
    assert parse_attr_names("plex 0x20") == Attr(0x40020)
    assert parse_attr_names(["PERSISTENT", "NO_WRITERS"]) == Attr(0x11)
    for bad in ["bogus", "0x100", "differential,nope", "-1"]:
        with pytest.raises(ValueError):
            parse_attr_names(bad)


def test_attr_names_round_trip_every_bit_and_some_masks() -> None:
    for m in Attr.__members__.values():
        assert parse_attr_names(attr_names(m)) == m
        assert parse_attr_names(m.vss_name) == m
        assert parse_attr_names(str(m.name).lower().replace("_", "-")) == m
    for mask in (0, 0x19, 0x20029, vss.KNOWN_ATTR_BITS, 0x4000000 | 0x1):
        assert int(parse_attr_names(",".join(attr_names(mask)))) == mask


# --------------------------------------------------------------------------- SnapshotProp

SNAP_ID = "6f1c2b7e-8d4a-4a43-9b1e-2f0d6a3c5e71"
SET_ID = "0b6e3a52-1c2d-4e8f-a7b9-c0d1e2f3a4b5"


def _prop(**overrides: object) -> SnapshotProp:
    fields: dict[str, object] = dict(
        snapshot_id=SNAP_ID,
        snapshot_set_id=SET_ID,
        snapshots_count=2,
        device_object="/mnt/sp/.shadow/" + SNAP_ID + ".img",
        original_volume_name="db",
        originating_machine="host-a",
        service_machine="host-a",
        attributes=validate_attributes(Context.NAS_ROLLBACK, Attr.DIFFERENTIAL)
        | Attr.HARDWARE_ASSISTED,
        creation_timestamp=1700000000.25,
        status=SnapshotState.CREATED,
    )
    fields.update(overrides)
    return SnapshotProp(**fields)  # type: ignore[arg-type]


def test_snapshot_prop_to_json_is_stable() -> None:
    p = _prop()
    assert p.to_json() == {
        "snapshot_id": SNAP_ID,
        "snapshot_set_id": SET_ID,
        "snapshots_count": 2,
        "device_object": "/mnt/sp/.shadow/" + SNAP_ID + ".img",
        "original_volume_name": "db",
        "originating_machine": "host-a",
        "service_machine": "host-a",
        "exposed_name": None,
        "exposed_path": None,
        "provider_id": PROVIDER_ID,
        "attributes": 0x19 | 0x20000 | 0x10000,
        "attribute_names": [
            "PERSISTENT",
            "NO_AUTO_RELEASE",
            "NO_WRITERS",
            "HARDWARE_ASSISTED",
            "DIFFERENTIAL",
        ],
        "creation_timestamp": 1700000000.25,
        "status": "CREATED",
    }
    # key order is part of the stable form (diffable logs and documents)
    assert list(p.to_json()) == [
        "snapshot_id",
        "snapshot_set_id",
        "snapshots_count",
        "device_object",
        "original_volume_name",
        "originating_machine",
        "service_machine",
        "exposed_name",
        "exposed_path",
        "provider_id",
        "attributes",
        "attribute_names",
        "creation_timestamp",
        "status",
    ]
    # plain JSON types only
    assert json.loads(json.dumps(p.to_json())) == p.to_json()
    assert type(p.to_json()["attributes"]) is int


def test_snapshot_prop_json_round_trip() -> None:
    p = _prop(
        exposed_name="db-snap",
        exposed_path="/mnt/sp/exposed/db-snap.img",
        attributes=Attr(0x19 | 0x20000 | 0x100000),
        status=SnapshotState.COMMITTED,
    )
    assert p.is_exposed
    q = SnapshotProp.from_json(json.loads(json.dumps(p.to_json())))
    assert q == p
    assert q.to_json() == p.to_json()
    assert isinstance(q.attributes, Attr) and isinstance(q.status, SnapshotState)


def test_snapshot_prop_from_json_status_forms_and_extra_keys() -> None:
    d = _prop().to_json()
    d["future_field"] = 1
    for status in ("CREATED", "VSS_SS_CREATED", "created", 12):
        d["status"] = status
        assert SnapshotProp.from_json(d).status is SnapshotState.CREATED


def test_snapshot_prop_from_json_refuses_inconsistent_names() -> None:
    d = _prop().to_json()
    d["attribute_names"] = ["PERSISTENT"]
    with pytest.raises(ValueError, match="disagree"):
        SnapshotProp.from_json(d)
    d = _prop().to_json()
    d["status"] = "FROZEN"
    with pytest.raises(ValueError):
        SnapshotProp.from_json(d)


def test_snapshot_prop_normalises_and_validates() -> None:
    p = _prop(snapshot_id="{" + SNAP_ID.upper() + "}", status=12, attributes=0x19)
    assert p.snapshot_id == SNAP_ID
    assert p.status is SnapshotState.CREATED
    assert p.attributes == Attr(0x19) and isinstance(p.attributes, Attr)
    assert not p.is_exposed
    for bad in (
        dict(snapshot_id="not-a-guid"),
        dict(snapshot_set_id=""),
        dict(provider_id="x"),
        dict(snapshots_count=0),
        dict(snapshots_count=MAX_VOLUMES_PER_SET + 1),
        dict(attributes=0x100),
        dict(status=16),
    ):
        with pytest.raises(ValueError):
            _prop(**bad)
