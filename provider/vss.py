"""VSS definitions with Microsoft's exact numeric values, and the context rules.

Everything here is plain data and pure functions (no I/O, no trio), so documents, logs,
the control API and the coordinator all speak the same numbers as Windows VSS:

* ``Context``        VSS_CTX_*           (_VSS_SNAPSHOT_CONTEXT)
* ``Attr``           VSS_VOLSNAP_ATTR_*  (_VSS_VOLUME_SNAPSHOT_ATTRIBUTES)
* ``SnapshotState``  VSS_SS_*            (_VSS_SNAPSHOT_STATE)
* ``HRESULTS``       VSS_E_* names -> HRESULT, raised as ``VssError(name, message)``
                     (defined in provider.hresults, re-exported here)

``SnapshotProp`` (VSS_SNAPSHOT_PROP, with snake_case field names and ``to_json()``) is
built on these in provider.snapshot_prop.

The context rules (which contexts shadowplex creates, which attribute bits a requester may
add) follow the Microsoft docs quoted next to each function.

Every numeric value below was read from the source named in the comment above its table;
none is inferred (the HRESULTs' sources are in provider/hresults.py).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterable

from .hresults import (
    HRESULTS,
    SUCCESS_HRESULTS,
    VssError,
    hresult_name,
    hresult_signed,
)

__all__ = [
    "PROVIDER_ID",
    "MAX_VOLUMES_PER_SET",
    "Context",
    "Attr",
    "SnapshotState",
    "HRESULTS",
    "SUCCESS_HRESULTS",
    "VssError",
    "hresult_signed",
    "hresult_name",
    "CREATABLE_CONTEXTS",
    "CONTEXT_BITS",
    "OPTION_BITS",
    "KNOWN_ATTR_BITS",
    "context_attributes",
    "is_auto_release",
    "is_persistent",
    "uses_writers",
    "parse_context",
    "split_context",
    "validate_attributes",
    "snapshot_context",
    "context_matches",
    "kind_attributes",
    "attr_names",
    "parse_attr_names",
    "GUID_RE",
    "guid",
    "CREATABLE_CLI_NAMES",
    "AUTO_RELEASE_CLI_NAMES",
    "context_label",
]

# shadowplex's provider id (VSS_ID of this provider, m_ProviderId of every snapshot it
# creates). Generated once with uuid4 and fixed forever: never change it, documents and
# other hosts identify our snapshots by it.
PROVIDER_ID = "42ad3edf-ef59-4b69-bcfd-9af026cb2cd2"

# Most volumes one snapshot set may hold; one more is refused with
# VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED. 64 is shadowplex's limit, fixed by the design
# (it is the figure commonly quoted for Windows VSS, but no Microsoft page read for this
# module states it, so treat it as ours).
MAX_VOLUMES_PER_SET = 64

_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- attributes
# Source: mingw-w64/mingw-w64 mingw-w64-headers/include/vss.h (enum
# _VSS_VOLUME_SNAPSHOT_ATTRIBUTES, explicit hex values); identical in the syntax block of
# Microsoft Learn "VSS_VOLUME_SNAPSHOT_ATTRIBUTES enumeration (vss.h)" and in docs.rs
# winapi::um::vss (VSS_VOLSNAP_ATTR_FILE_SHARE = 0x04000000). Member names drop the
# VSS_VOLSNAP_ATTR_ prefix; ``Attr.X.vss_name`` gives it back.
class Attr(enum.IntFlag):
    """VSS_VOLSNAP_ATTR_* bits (a shadow copy's m_lSnapshotAttributes)."""

    PERSISTENT = 0x00000001
    NO_AUTORECOVERY = 0x00000002
    CLIENT_ACCESSIBLE = 0x00000004
    NO_AUTO_RELEASE = 0x00000008
    NO_WRITERS = 0x00000010
    TRANSPORTABLE = 0x00000020
    NOT_SURFACED = 0x00000040
    NOT_TRANSACTED = 0x00000080
    HARDWARE_ASSISTED = 0x00010000
    DIFFERENTIAL = 0x00020000
    PLEX = 0x00040000
    IMPORTED = 0x00080000
    EXPOSED_LOCALLY = 0x00100000
    EXPOSED_REMOTELY = 0x00200000
    AUTORECOVER = 0x00400000
    ROLLBACK_RECOVERY = 0x00800000
    DELAYED_POSTSNAPSHOT = 0x01000000
    TXF_RECOVERY = 0x02000000
    FILE_SHARE = 0x04000000

    @property
    def vss_name(self) -> str:
        """``VSS_VOLSNAP_ATTR_<NAME>``; only for single-bit members."""
        if self.name is None or int(self) not in _ATTR_BY_VALUE:
            raise ValueError(f"0x{int(self):x} is not a single attribute bit")
        return "VSS_VOLSNAP_ATTR_" + self.name


# Single-bit members in bit order (the order attr_names() uses).
_ATTR_MEMBERS: tuple[Attr, ...] = tuple(sorted(Attr.__members__.values(), key=int))
_ATTR_BY_VALUE: dict[int, Attr] = {int(m): m for m in _ATTR_MEMBERS}

KNOWN_ATTR_BITS = 0
for _m in _ATTR_MEMBERS:
    KNOWN_ATTR_BITS |= int(_m)
del _m

# The bits a context is made of (see Context below): 0x1d.
CONTEXT_BITS = Attr.PERSISTENT | Attr.CLIENT_ACCESSIBLE | Attr.NO_AUTO_RELEASE | Attr.NO_WRITERS

# The only bits a requester may OR into a context. Microsoft Learn
# "VSS_VOLUME_SNAPSHOT_ATTRIBUTES enumeration (vss.h)", Remarks: "Currently,
# VSS_VOLSNAP_ATTR_DIFFERENTIAL, VSS_VOLSNAP_ATTR_PLEX, and VSS_VOLSNAP_ATTR_TRANSPORTABLE
# are the only values of the _VSS_VOLUME_SNAPSHOT_ATTRIBUTES enumeration that can be used
# to modify any context."
OPTION_BITS = Attr.TRANSPORTABLE | Attr.DIFFERENTIAL | Attr.PLEX

# How a snapshot's content is kept, as VSS names it: the block store's kind. A promote
# makes a differential snapshot a full copy -- VSS's PLEX ("a full copy of the
# original") -- while the mask stored with the snapshot is the one it was created with.
_KIND_BITS = {"differential": Attr.DIFFERENTIAL, "plex": Attr.PLEX, "full": Attr.PLEX}


def kind_attributes(attributes: int, kind: str) -> Attr:
    """``attributes`` with the DIFFERENTIAL/PLEX bit of ``kind`` (the store's kind is the
    truth: a promoted snapshot is PLEX, no longer DIFFERENTIAL). Every view of a
    snapshot's attributes (snapshot list/show, the BCD) goes through here."""
    bit = _KIND_BITS.get(str(kind))
    mask = int(attributes)
    if bit is None:
        return Attr(mask)
    return Attr(mask & ~int(Attr.DIFFERENTIAL | Attr.PLEX) | int(bit))


# --------------------------------------------------------------------------- contexts
# Source: mingw-w64/mingw-w64 mingw-w64-headers/include/vss.h (enum _VSS_SNAPSHOT_CONTEXT),
# where each context is an OR of attribute bits:
#   BACKUP                    = 0x0
#   FILE_SHARE_BACKUP         = NO_WRITERS                                         = 0x10
#   NAS_ROLLBACK              = PERSISTENT | NO_AUTO_RELEASE | NO_WRITERS          = 0x19
#   APP_ROLLBACK              = PERSISTENT | NO_AUTO_RELEASE                       = 0x09
#   CLIENT_ACCESSIBLE         = PERSISTENT | CLIENT_ACCESSIBLE | NO_AUTO_RELEASE
#                               | NO_WRITERS                                       = 0x1d
#   CLIENT_ACCESSIBLE_WRITERS = PERSISTENT | CLIENT_ACCESSIBLE | NO_AUTO_RELEASE   = 0x0d
#   ALL                       = 0xffffffff
# Trap: the syntax block of Microsoft Learn "VSS_SNAPSHOT_CONTEXT enumeration (vss.h)"
# lists them as BACKUP = 0, FILE_SHARE_BACKUP, NAS_ROLLBACK, ... (i.e. 0, 1, 2, ...),
# which is wrong; the header (and the attributes page: "This attribute is automatically
# set for ... VSS_CTX_NAS_ROLLBACK") define them as the bitmasks above.
class Context(enum.IntEnum):
    """VSS_CTX_* snapshot contexts. Values are attribute bitmasks, not an index."""

    BACKUP = 0x00000000
    FILE_SHARE_BACKUP = 0x00000010
    NAS_ROLLBACK = 0x00000019
    APP_ROLLBACK = 0x00000009
    CLIENT_ACCESSIBLE = 0x0000001D
    CLIENT_ACCESSIBLE_WRITERS = 0x0000000D
    ALL = 0xFFFFFFFF

    @property
    def vss_name(self) -> str:
        """``VSS_CTX_<NAME>``, as Windows logs and documents spell it."""
        return "VSS_CTX_" + self.name

    @property
    def cli_name(self) -> str:
        """The CLI spelling: ``nas-rollback``."""
        return self.name.lower().replace("_", "-")


# The contexts shadowplex creates snapshots in (it is a hardware provider, not the
# Windows system provider; see parse_context).
CREATABLE_CONTEXTS: tuple[Context, ...] = (
    Context.BACKUP,
    Context.FILE_SHARE_BACKUP,
    Context.NAS_ROLLBACK,
    Context.APP_ROLLBACK,
)


# --------------------------------------------------------------------------- states
# Source: mingw-w64/mingw-w64 mingw-w64-headers/include/vss.h (enum _VSS_SNAPSHOT_STATE,
# explicit values 0..16); same order in Wine include/vss.idl (willfaust/wine) and in
# Microsoft Learn "VSS_SNAPSHOT_STATE enumeration (vss.h)" (VSS_SS_UNKNOWN = 0, then
# implicit +1). VSS_SS_COUNT = 16 is a sentinel, not a state, and is left out.
class SnapshotState(enum.IntEnum):
    """VSS_SS_* states (a shadow copy's m_eStatus)."""

    UNKNOWN = 0
    PREPARING = 1
    PROCESSING_PREPARE = 2
    PREPARED = 3
    PROCESSING_PRECOMMIT = 4
    PRECOMMITTED = 5
    PROCESSING_COMMIT = 6
    COMMITTED = 7
    PROCESSING_POSTCOMMIT = 8
    PROCESSING_PREFINALCOMMIT = 9
    PREFINALCOMMITTED = 10
    PROCESSING_POSTFINALCOMMIT = 11
    CREATED = 12
    ABORTED = 13
    DELETED = 14
    POSTCOMMITTED = 15

    @property
    def vss_name(self) -> str:
        """``VSS_SS_<NAME>``."""
        return "VSS_SS_" + self.name


def _unsupported(message: str) -> VssError:
    return VssError("VSS_E_UNSUPPORTED_CONTEXT", message)


# --------------------------------------------------------------------------- context rules
# the contexts' CLI names (Context.cli_name), the one list the CLI, its completion and the
# script grammar offer: backup, file-share-backup, nas-rollback, app-rollback
CREATABLE_CLI_NAMES: tuple[str, ...] = tuple(c.cli_name for c in CREATABLE_CONTEXTS)
_CREATABLE_LIST = ", ".join(CREATABLE_CLI_NAMES[:-1]) + " or " + CREATABLE_CLI_NAMES[-1]


def _refusal(ctx: Context) -> VssError | None:
    """Why shadowplex does not create snapshots in ``ctx`` (None if it does)."""
    if ctx in (Context.CLIENT_ACCESSIBLE, Context.CLIENT_ACCESSIBLE_WRITERS):
        # Microsoft Learn "VSS_SNAPSHOT_CONTEXT enumeration (vss.h)": "Only the system
        # provider (the default provider available on the system) can create this type of
        # shadow copy."
        alt = "nas-rollback" if ctx is Context.CLIENT_ACCESSIBLE else "app-rollback"
        return _unsupported(
            f"{ctx.vss_name} (0x{int(ctx):x}) is not supported: only the Windows system "
            f"provider creates client-accessible shadow copies (Shadow Copies for Shared "
            f"Folders); use {alt} for a persistent snapshot "
            f"{'without' if ctx is Context.CLIENT_ACCESSIBLE else 'with'} writers"
        )
    if ctx is Context.ALL:
        return _unsupported(
            "VSS_CTX_ALL (0xffffffff) selects snapshots of every context for queries and "
            f"deletion; it cannot create snapshots: choose {_CREATABLE_LIST}"
        )
    return None


def _creatable(ctx: Context | int) -> Context:
    c = _to_context(ctx)
    refusal = _refusal(c)
    if refusal is not None:
        raise refusal
    return c


def _to_context(ctx: Context | int) -> Context:
    if isinstance(ctx, Context):
        return ctx
    value = int(ctx)
    if -(1 << 31) <= value < 0:  # the signed LONG form: -1 is VSS_CTX_ALL
        value &= _U32
    try:
        return Context(value)
    except ValueError:
        raise _unsupported(_unknown_context_message(value)) from None


def context_attributes(ctx: Context | int) -> Attr:
    """The attribute bits a context implies (a context *is* its bits).

    BACKUP -> 0, FILE_SHARE_BACKUP -> NO_WRITERS, NAS_ROLLBACK -> PERSISTENT |
    NO_AUTO_RELEASE | NO_WRITERS, APP_ROLLBACK -> PERSISTENT | NO_AUTO_RELEASE, and the
    CLIENT_ACCESSIBLE ones add CLIENT_ACCESSIBLE. VSS_CTX_ALL is a query filter with no
    bits of its own: VssError(VSS_E_UNSUPPORTED_CONTEXT).
    """
    c = _to_context(ctx)
    if c is Context.ALL:
        raise _unsupported("VSS_CTX_ALL is a query filter and implies no attributes")
    return Attr(int(c))


def is_auto_release(ctx: Context | int) -> bool:
    """True if the snapshots die with the requester's session (BACKUP, FILE_SHARE_BACKUP).

    NAS_ROLLBACK and APP_ROLLBACK carry NO_AUTO_RELEASE (and PERSISTENT): they live until
    deleted explicitly.
    """
    return not context_attributes(ctx) & Attr.NO_AUTO_RELEASE


# the creatable contexts whose snapshots end with the requester's session
AUTO_RELEASE_CLI_NAMES: tuple[str, ...] = tuple(
    c.cli_name for c in CREATABLE_CONTEXTS if is_auto_release(c))


def context_label(ctx: Context | int) -> str:
    """``VSS_CTX_FILE_SHARE_BACKUP 0x10``: the VSS name and value, for messages."""
    c = _to_context(ctx)
    return f"{c.vss_name} 0x{int(c):x}"


def is_persistent(ctx: Context | int) -> bool:
    """True if the context carries PERSISTENT (survives a daemon restart / reboot)."""
    return bool(context_attributes(ctx) & Attr.PERSISTENT)


def uses_writers(ctx: Context | int) -> bool:
    """True if writers (quiescers) take part: BACKUP and APP_ROLLBACK (no NO_WRITERS bit)."""
    return not context_attributes(ctx) & Attr.NO_WRITERS


_INT_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|[0-9]+)")


def _parse_int(text: str) -> int | None:
    s = text.strip().replace("_", "")
    if not _INT_RE.fullmatch(s):
        return None
    neg = s.startswith("-")
    body = s.lstrip("+-")
    value = int(body, 16) if body[:2].lower() == "0x" else int(body, 10)
    return -value if neg else value


def _unknown_context_message(value: object) -> str:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    shown = repr(value)
    if isinstance(value, int) and is_int and value >= 0:
        shown = f"0x{value:x}"
    hint = ""
    if isinstance(value, int) and is_int and 0 <= value <= _U32:
        base = value & int(CONTEXT_BITS)
        extra = value & ~int(CONTEXT_BITS) & _U32
        creatable = {int(c) for c in CREATABLE_CONTEXTS}
        if extra and not extra & ~KNOWN_ATTR_BITS and base in creatable:
            hint = (
                f" (it looks like {Context(base).vss_name} with attribute bits 0x{extra:x}: "
                "give the attribute options separately, or use split_context())"
            )
    return (
        f"unknown snapshot context {shown}{hint}; expected {_CREATABLE_LIST} "
        "(or VSS_CTX_* names, or their values 0x0, 0x10, 0x19, 0x9)"
    )


def parse_context(text: str | int, *, allow_all: bool = False) -> Context:
    """Parse a context from the CLI, a document or the control API.

    Accepts CLI names (``backup``, ``file-share-backup``, ``nas-rollback``,
    ``app-rollback``), VSS names (``VSS_CTX_BACKUP``; case and ``-``/``_`` are free) and
    integers (decimal, ``0x`` hex, or the negative LONG form, so ``-1`` is VSS_CTX_ALL).

    Refused with VssError("VSS_E_UNSUPPORTED_CONTEXT"): unknown names and values,
    CLIENT_ACCESSIBLE and CLIENT_ACCESSIBLE_WRITERS (only the Windows system provider
    creates them), and ALL unless ``allow_all`` (ALL is for queries and deletion only).
    """
    value: int | None
    if isinstance(text, bool):
        raise _unsupported(_unknown_context_message(text))
    value = text if isinstance(text, int) else _parse_int(text)
    if value is not None:
        if -(1 << 31) <= value < 0:
            value &= _U32
        try:
            ctx = Context(value)
        except ValueError:
            raise _unsupported(_unknown_context_message(value)) from None
    else:
        assert isinstance(text, str)
        key = text.strip().upper().replace("-", "_")
        if key.startswith("VSS_CTX_"):
            key = key[len("VSS_CTX_") :]
        found = Context.__members__.get(key)
        if found is None:
            raise _unsupported(_unknown_context_message(text))
        ctx = found
    if ctx is Context.ALL and allow_all:
        return ctx
    refusal = _refusal(ctx)
    if refusal is not None:
        raise refusal
    return ctx


def validate_attributes(ctx: Context | int, extra: int) -> Attr:
    """Check the option bits a requester asks for on top of ``ctx``; return the full mask.

    Allowed in ``extra``: DIFFERENTIAL, PLEX, TRANSPORTABLE (the only modifiers Microsoft
    allows, see OPTION_BITS) and the context's own bits (redundant, harmless). Refused:

    * a context shadowplex does not create, unknown bits, or known bits a requester may
      not set (other contexts' bits, or bits the provider sets itself such as
      HARDWARE_ASSISTED, EXPOSED_LOCALLY, IMPORTED): VSS_E_UNSUPPORTED_CONTEXT, because
      the combined lContext (context | extra) is then not a supported context;
    * DIFFERENTIAL together with PLEX: VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER (see below).

    Returns ``context_attributes(ctx) | extra`` as an Attr. The provider adds its own
    bits (HARDWARE_ASSISTED, the mechanism it chose, EXPOSED_*) when it creates the
    snapshot.
    """
    c = _creatable(ctx)
    if isinstance(extra, bool) or not 0 <= int(extra) <= _U32:
        raise _unsupported(f"attribute mask {extra!r} is not a 32-bit unsigned value")
    extra = int(extra)
    unknown = extra & ~KNOWN_ATTR_BITS
    if unknown:
        raise _unsupported(
            f"unknown attribute bits 0x{unknown:x} requested with {c.vss_name}; "
            "the options are DIFFERENTIAL, PLEX and TRANSPORTABLE"
        )
    own = context_attributes(c)
    bad = extra & ~(int(own) | int(OPTION_BITS))
    if bad & int(CONTEXT_BITS):
        names = ", ".join(attr_names(bad & int(CONTEXT_BITS)))
        raise _unsupported(
            f"{names} cannot be added to {c.vss_name}: these bits select the context; "
            "choose the context instead (nas-rollback = persistent without writers, "
            "app-rollback = persistent with writers, file-share-backup = no writers)"
        )
    if bad:
        raise _unsupported(
            f"{', '.join(attr_names(bad))} cannot be requested: only DIFFERENTIAL, PLEX and "
            "TRANSPORTABLE modify a context (the provider sets the other bits itself)"
        )
    if extra & int(Attr.DIFFERENTIAL) and extra & int(Attr.PLEX):
        # Name choice: both bits are legal modifiers on their own, so the context value
        # is well formed; what fails is that no shadow copy can be both. Microsoft Learn
        # (VSS_VOLUME_SNAPSHOT_ATTRIBUTES, Remarks): "While a provider can support both
        # mechanisms, they are mutually exclusive for a given shadow copy." Its entries
        # for DIFFERENTIAL and PLEX say a request no provider can satisfy fails in
        # AddToSnapshotSet as "volume not supported"; when the requester names the
        # provider (shadowplex always is the provider), AddToSnapshotSet's code for that
        # case is VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER ("The volume is not supported by
        # the specified provider"). So a Windows requester would see this name.
        raise VssError(
            "VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER",
            "DIFFERENTIAL and PLEX are mutually exclusive for one shadow copy: ask for "
            "DIFFERENTIAL (copy-on-write) or PLEX (full-copy mirror), or neither to let "
            "shadowplex choose",
        )
    return Attr(int(own) | extra)


def split_context(value: int) -> tuple[Context, Attr]:
    """Split a Windows-style lContext (context | options, as given to SetContext).

    Returns ``(context, validate_attributes(context, options))``; refuses what
    parse_context / validate_attributes refuse.
    """
    if isinstance(value, bool) or not -(1 << 31) <= int(value) <= _U32:
        raise _unsupported(f"context value {value!r} is not a 32-bit value")
    v = int(value) & _U32
    if v == int(Context.ALL):
        _creatable(Context.ALL)  # raises: ALL creates nothing
    try:
        ctx = _creatable(Context(v & int(CONTEXT_BITS)))
    except ValueError:
        raise _unsupported(_unknown_context_message(v)) from None
    return ctx, validate_attributes(ctx, v & ~int(CONTEXT_BITS))


def snapshot_context(attributes: int) -> Context:
    """The context a snapshot was created in, read back from its attribute mask."""
    base = int(attributes) & int(CONTEXT_BITS)
    try:
        return Context(base)
    except ValueError:
        raise ValueError(
            f"attribute mask 0x{int(attributes):x} does not hold a valid context "
            f"(context bits 0x{base:x})"
        ) from None


def context_matches(query: Context | int, attributes: int) -> bool:
    """Whether a snapshot with ``attributes`` is selected by a query in context ``query``.

    VSS_CTX_ALL selects every snapshot (Microsoft Learn, VSS_SNAPSHOT_CONTEXT: "All types
    of currently live shadow copies are available for administrative operations, such as
    shadow copy queries"); any other context selects the snapshots created in it.
    """
    q = _to_context(query)
    if q is Context.ALL:
        return True
    return int(attributes) & int(CONTEXT_BITS) == int(q)


# --------------------------------------------------------------------------- attribute names
def attr_names(mask: int) -> list[str]:
    """Names of the bits set in ``mask``, in bit order: ``["PERSISTENT", "DIFFERENTIAL"]``.

    ValueError if ``mask`` holds bits VSS does not define.
    """
    m = int(mask)
    if m < 0 or m & ~KNOWN_ATTR_BITS:
        unknown = m & ~KNOWN_ATTR_BITS & _U32
        raise ValueError(f"attribute mask 0x{m & _U32:x} has unknown bits 0x{unknown:x}")
    return [str(a.name) for a in _ATTR_MEMBERS if m & int(a)]


def parse_attr_names(text: str | Iterable[str]) -> Attr:
    """Inverse of attr_names: ``"differential,transportable"`` -> Attr mask.

    Accepts a string split on commas, ``|`` or spaces, or an iterable of tokens. A token
    is a name (``DIFFERENTIAL``, ``differential``, ``no-auto-release``,
    ``VSS_VOLSNAP_ATTR_PLEX``) or a number (``0x20000``). Empty -> Attr(0). Unknown names
    or bits raise ValueError. This only parses; validate_attributes decides what is
    allowed.
    """
    tokens = re.split(r"[\s,|]+", text) if isinstance(text, str) else list(text)
    mask = 0
    for raw in tokens:
        tok = raw.strip()
        if not tok:
            continue
        number = _parse_int(tok)
        if number is not None:
            if number < 0 or number & ~KNOWN_ATTR_BITS:
                raise ValueError(f"unknown attribute bits in {tok!r}")
            mask |= number
            continue
        key = tok.upper().replace("-", "_")
        if key.startswith("VSS_VOLSNAP_ATTR_"):
            key = key[len("VSS_VOLSNAP_ATTR_") :]
        member = Attr.__members__.get(key)
        if member is None:
            raise ValueError(
                f"unknown snapshot attribute {tok!r}; known: "
                + ", ".join(str(a.name).lower().replace("_", "-") for a in _ATTR_MEMBERS)
            )
        mask |= int(member)
    return Attr(mask)


# --------------------------------------------------------------------------- GUIDs
# A GUID as people and documents write it: hyphenated, braces optional (the group is the
# GUID without them). Documents and scripts recognise ids with it; guid() normalises.
GUID_RE = re.compile(r"\{?([0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12})\}?")


def guid(value: object) -> str:
    """The one canonical form of a snapshot, set, provider or writer id: lower-case
    ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` without braces, the form every record, reply
    and document carries, so ids compare as text. Accepts what ``uuid.UUID`` does after
    surrounding blanks are stripped (braces, ``urn:uuid:``, no hyphens); ValueError for
    anything else. (blockstore.names.check_guid is the engine's own: it imports nothing
    of ours.)"""
    return str(uuid.UUID(str(value).strip()))
