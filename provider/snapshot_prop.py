"""``SnapshotProp``: VSS_SNAPSHOT_PROP, one shadow copy's properties, with snake_case
field names and a stable JSON form (``to_json()`` / ``from_json()``), the shape the
control API returns for a snapshot (provider.views builds it from the pool's records).

Apart from provider.vss because it is a record built on the definitions there (GUIDs,
attribute masks and names, snapshot states), not one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .vss import (
    MAX_VOLUMES_PER_SET,
    PROVIDER_ID,
    Attr,
    SnapshotState,
    attr_names,
    guid,
    parse_attr_names,
)

__all__ = ["SnapshotProp"]


def _guid(value: str, field_name: str) -> str:
    try:
        return guid(value)
    except ValueError:
        raise ValueError(f"{field_name}: {value!r} is not a GUID") from None


# Field order and meaning: VSS_SNAPSHOT_PROP in mingw-w64/mingw-w64
# mingw-w64-headers/include/vss.h and Wine include/vss.idl (willfaust/wine):
# m_SnapshotId, m_SnapshotSetId, m_lSnapshotsCount, m_pwszSnapshotDeviceObject,
# m_pwszOriginalVolumeName, m_pwszOriginatingMachine, m_pwszServiceMachine,
# m_pwszExposedName, m_pwszExposedPath, m_ProviderId, m_lSnapshotAttributes,
# m_tsCreationTimestamp, m_eStatus.
@dataclass(kw_only=True)
class SnapshotProp:
    """One shadow copy's properties (VSS_SNAPSHOT_PROP), pythonic names.

    GUIDs are normalised to lowercase ``xxxxxxxx-xxxx-...`` without braces.
    ``creation_timestamp`` is Unix time in seconds (float), not VSS_TIMESTAMP.
    ``exposed_name`` / ``exposed_path`` are None while the snapshot is not exposed.
    """

    snapshot_id: str  # m_SnapshotId
    snapshot_set_id: str  # m_SnapshotSetId
    snapshots_count: int  # m_lSnapshotsCount: volumes in the set when it was created
    device_object: str  # m_pwszSnapshotDeviceObject: MOUNT/.shadow/<id>.img
    original_volume_name: str  # m_pwszOriginalVolumeName
    originating_machine: str  # m_pwszOriginatingMachine
    service_machine: str  # m_pwszServiceMachine
    exposed_name: str | None = None  # m_pwszExposedName
    exposed_path: str | None = None  # m_pwszExposedPath
    provider_id: str = PROVIDER_ID  # m_ProviderId
    attributes: Attr  # m_lSnapshotAttributes
    creation_timestamp: float  # m_tsCreationTimestamp (here: Unix seconds)
    status: SnapshotState  # m_eStatus

    def __post_init__(self) -> None:
        self.snapshot_id = _guid(self.snapshot_id, "snapshot_id")
        self.snapshot_set_id = _guid(self.snapshot_set_id, "snapshot_set_id")
        self.provider_id = _guid(self.provider_id, "provider_id")
        if isinstance(self.snapshots_count, bool) or not (
            1 <= int(self.snapshots_count) <= MAX_VOLUMES_PER_SET
        ):
            raise ValueError(
                f"snapshots_count {self.snapshots_count!r} is not in 1..{MAX_VOLUMES_PER_SET}"
            )
        self.snapshots_count = int(self.snapshots_count)
        attr_names(self.attributes)  # ValueError on unknown bits
        self.attributes = Attr(int(self.attributes))
        self.status = SnapshotState(self.status)
        self.creation_timestamp = float(self.creation_timestamp)

    @property
    def is_exposed(self) -> bool:
        return bool(self.attributes & (Attr.EXPOSED_LOCALLY | Attr.EXPOSED_REMOTELY))

    def to_json(self) -> dict[str, Any]:
        """Stable JSON form (key names and meanings never change; new keys may appear).

        ``attributes`` is the int mask, ``attribute_names`` its names in bit order,
        ``status`` the state's short name (``"CREATED"``).
        """
        return {
            "snapshot_id": self.snapshot_id,
            "snapshot_set_id": self.snapshot_set_id,
            "snapshots_count": self.snapshots_count,
            "device_object": self.device_object,
            "original_volume_name": self.original_volume_name,
            "originating_machine": self.originating_machine,
            "service_machine": self.service_machine,
            "exposed_name": self.exposed_name,
            "exposed_path": self.exposed_path,
            "provider_id": self.provider_id,
            "attributes": int(self.attributes),
            "attribute_names": attr_names(self.attributes),
            "creation_timestamp": self.creation_timestamp,
            "status": self.status.name,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SnapshotProp:
        """Inverse of to_json. Unknown keys are ignored (written by a newer version).

        ``attribute_names``, if present, must agree with ``attributes``; ``status`` may be
        a name (``"CREATED"`` or ``"VSS_SS_CREATED"``) or its number.
        """
        attributes = int(data["attributes"])
        names = data.get("attribute_names")
        if names is not None and int(parse_attr_names(names)) != attributes:
            raise ValueError(
                f"attribute_names {names!r} disagree with attributes 0x{attributes:x}"
            )
        raw_status = data["status"]
        status: SnapshotState
        if isinstance(raw_status, str):
            key = raw_status.strip().upper()
            if key.startswith("VSS_SS_"):
                key = key[len("VSS_SS_") :]
            if key not in SnapshotState.__members__:
                raise ValueError(f"unknown snapshot status {raw_status!r}")
            status = SnapshotState[key]
        else:
            status = SnapshotState(int(raw_status))
        return cls(
            snapshot_id=data["snapshot_id"],
            snapshot_set_id=data["snapshot_set_id"],
            snapshots_count=data["snapshots_count"],
            device_object=data["device_object"],
            original_volume_name=data["original_volume_name"],
            originating_machine=data["originating_machine"],
            service_machine=data["service_machine"],
            exposed_name=data.get("exposed_name"),
            exposed_path=data.get("exposed_path"),
            provider_id=data.get("provider_id", PROVIDER_ID),
            attributes=Attr(attributes),
            creation_timestamp=data["creation_timestamp"],
            status=status,
        )

