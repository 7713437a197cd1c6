"""VSS HRESULTs with Microsoft's exact numeric values, and ``VssError``, the one
exception that carries them.

* ``HRESULTS``          VSS_E_* (and the few COM E_*) names -> HRESULT, the error codes
* ``SUCCESS_HRESULTS``  VSS_S_* codes (severity bit clear): not errors
* ``VssError(name, message)``  a failure with a stable name, its HRESULT and a one-line
  message; every refusal of the provider layer is one (documents.DocumentError too)

HRESULTs are kept as *unsigned* 32-bit numbers (0x80042301), the way Windows prints
them; ``hresult_signed()`` gives the LONG form (-2147212543) some tools use. Every value
was read from the source named in the comment above its table; none is inferred.

Plain data, no imports of ours: provider.vss (the contexts, attributes and their rules)
raises these and re-exports every name here, so callers import them from there.
"""

from __future__ import annotations

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any

__all__ = [
    "HRESULTS",
    "SUCCESS_HRESULTS",
    "VssError",
    "hresult_signed",
    "hresult_name",
]

_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- HRESULTs
# Source: ynkdir/py-win32more win32more/Storage/Vss/__init__.py (generated from Microsoft's
# Win32 metadata; signed decimals, e.g. VSS_E_BAD_STATE = -2147212543 = 0x80042301).
# Cross-checked, all equal: a Go VSS binding's hex table (found by code search), the
# winapi crate src/um/vsserror.rs on docs.rs (hex, first entries), blat-blatnik/BeefWin32
# output/Storage.Vss.bf (signed decimals), and the hex codes printed on Microsoft Learn
# "IVssBackupComponents::AddToSnapshotSet method (vsbackup.h)" (0x80042301, 0x80042312,
# 0x80042317, 0x8004232C). Note the numbers are not in name order (0x8004230D is
# OBJECT_ALREADY_EXISTS, 0x8004230E VOLUME_NOT_SUPPORTED_BY_PROVIDER) and there are gaps
# (0x80042305, 0x8004231C).
HRESULTS: dict[str, int] = {
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
    "VSS_E_CORRUPT_XML_DOCUMENT": 0x80042310,
    "VSS_E_INVALID_XML_DOCUMENT": 0x80042311,
    "VSS_E_MAXIMUM_NUMBER_OF_VOLUMES_REACHED": 0x80042312,
    "VSS_E_FLUSH_WRITES_TIMEOUT": 0x80042313,
    "VSS_E_HOLD_WRITES_TIMEOUT": 0x80042314,
    "VSS_E_UNEXPECTED_WRITER_ERROR": 0x80042315,
    "VSS_E_SNAPSHOT_SET_IN_PROGRESS": 0x80042316,
    "VSS_E_MAXIMUM_NUMBER_OF_SNAPSHOTS_REACHED": 0x80042317,
    "VSS_E_WRITER_INFRASTRUCTURE": 0x80042318,
    "VSS_E_WRITER_NOT_RESPONDING": 0x80042319,
    "VSS_E_WRITER_ALREADY_SUBSCRIBED": 0x8004231A,
    "VSS_E_UNSUPPORTED_CONTEXT": 0x8004231B,
    "VSS_E_VOLUME_IN_USE": 0x8004231D,
    "VSS_E_MAXIMUM_DIFFAREA_ASSOCIATIONS_REACHED": 0x8004231E,
    "VSS_E_INSUFFICIENT_STORAGE": 0x8004231F,
    "VSS_E_NO_SNAPSHOTS_IMPORTED": 0x80042320,
    "VSS_E_SOME_SNAPSHOTS_NOT_IMPORTED": 0x80042321,
    "VSS_E_MAXIMUM_NUMBER_OF_REMOTE_MACHINES_REACHED": 0x80042322,
    "VSS_E_REMOTE_SERVER_UNAVAILABLE": 0x80042323,
    "VSS_E_REMOTE_SERVER_UNSUPPORTED": 0x80042324,
    "VSS_E_REVERT_IN_PROGRESS": 0x80042325,
    "VSS_E_REVERT_VOLUME_LOST": 0x80042326,
    "VSS_E_REBOOT_REQUIRED": 0x80042327,
    "VSS_E_TRANSACTION_FREEZE_TIMEOUT": 0x80042328,
    "VSS_E_TRANSACTION_THAW_TIMEOUT": 0x80042329,
    "VSS_E_UNSELECTED_VOLUME": 0x8004232A,
    "VSS_E_SNAPSHOT_NOT_IN_SET": 0x8004232B,
    "VSS_E_NESTED_VOLUME_LIMIT": 0x8004232C,
    "VSS_E_VOLUME_NOT_LOCAL": 0x8004232D,
    "VSS_E_CLUSTER_TIMEOUT": 0x8004232E,
    "VSS_E_NOT_SUPPORTED": 0x8004232F,
    "VSS_E_WRITERERROR_PARTIAL_FAILURE": 0x80042336,
    "VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT": 0x800423F0,
    "VSS_E_WRITERERROR_OUTOFRESOURCES": 0x800423F1,
    "VSS_E_WRITERERROR_TIMEOUT": 0x800423F2,
    "VSS_E_WRITERERROR_RETRYABLE": 0x800423F3,
    "VSS_E_WRITERERROR_NONRETRYABLE": 0x800423F4,
    "VSS_E_WRITERERROR_RECOVERY_FAILED": 0x800423F5,
    "VSS_E_BREAK_REVERT_ID_FAILED": 0x800423F6,
    "VSS_E_LEGACY_PROVIDER": 0x800423F7,
    "VSS_E_MISSING_DISK": 0x800423F8,
    "VSS_E_MISSING_HIDDEN_VOLUME": 0x800423F9,
    "VSS_E_MISSING_VOLUME": 0x800423FA,
    "VSS_E_AUTORECOVERY_FAILED": 0x800423FB,
    "VSS_E_DYNAMIC_DISK_ERROR": 0x800423FC,
    "VSS_E_NONTRANSPORTABLE_BCD": 0x800423FD,
    "VSS_E_CANNOT_REVERT_DISKID": 0x800423FE,
    "VSS_E_RESYNC_IN_PROGRESS": 0x800423FF,
    "VSS_E_CLUSTER_ERROR": 0x80042400,
    "VSS_E_WRITER_STATUS_NOT_AVAILABLE": 0x80042409,
    # Generic COM codes VSS methods return too. Source: Microsoft Learn
    # "IVssBackupComponents::AddToSnapshotSet method (vsbackup.h)" (E_ACCESSDENIED
    # 0x80070005L, E_INVALIDARG 0x80070057L, E_OUTOFMEMORY 0x8007000EL).
    "E_ACCESSDENIED": 0x80070005,
    "E_INVALIDARG": 0x80070057,
    "E_OUTOFMEMORY": 0x8007000E,
    # A request its requester cancelled, nothing changed. Source: winerror.h E_ABORT
    # 0x80004004L "Operation aborted" (Microsoft Learn, VSConstants.E_ABORT = -2147467260).
    "E_ABORT": 0x80004004,
}

# Success codes (severity bit clear): not errors, so VssError refuses them.
# Source: ynkdir/py-win32more win32more/Storage/Vss/__init__.py (271113, 271114, 271115,
# 271137) and winapi src/um/vsserror.rs (0x00042309, 0x0004230A, 0x0004230B).
SUCCESS_HRESULTS: dict[str, int] = {
    "VSS_S_ASYNC_PENDING": 0x00042309,
    "VSS_S_ASYNC_FINISHED": 0x0004230A,
    "VSS_S_ASYNC_CANCELLED": 0x0004230B,
    "VSS_S_SOME_SNAPSHOTS_NOT_IMPORTED": 0x00042321,
}

_NAME_BY_HRESULT: dict[int, str] = {v: k for k, v in {**HRESULTS, **SUCCESS_HRESULTS}.items()}


def hresult_signed(value: int) -> int:
    """The HRESULT as a signed 32-bit LONG (0x80042301 -> -2147212543)."""
    value &= _U32
    return value - (1 << 32) if value & 0x80000000 else value


def hresult_name(value: int) -> str | None:
    """The name of a known VSS/COM HRESULT (signed or unsigned form), else None."""
    return _NAME_BY_HRESULT.get(value & _U32)


class VssError(Exception):
    """A failure with a stable VSS error name, its HRESULT and a one-line message.

    ``VssError("VSS_E_OBJECT_NOT_FOUND", "no snapshot {…}")``. The name must be a key of
    HRESULTS: an unknown name is a programming error and raises ValueError at once.
    """

    name: str
    message: str
    hresult: int

    def __init__(self, name: str, message: str) -> None:
        try:
            hresult = HRESULTS[name]
        except KeyError:
            hint = " (a success code, not an error)" if name in SUCCESS_HRESULTS else ""
            raise ValueError(f"unknown VSS error name {name!r}{hint}") from None
        super().__init__(name, message)
        self.name = name
        self.message = message
        self.hresult = hresult

    def __str__(self) -> str:
        return f"{self.name} (0x{self.hresult:08X}): {self.message}"

    def to_json(self) -> dict[str, Any]:
        """Stable wire form for the control API."""
        return {"error": self.name, "hresult": self.hresult, "message": self.message}
