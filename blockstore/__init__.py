"""blockstore: the array engine. Plain synchronous Python; imports nothing of ours.

See docs/blockstore-api.md for the API and docs/format.md for the on-disk format.
"""

from . import errors
from .fileio import Faults
from .format import DEFAULT_CHUNK, FORMAT_VERSION
from .model import (
    COMMITTED,
    DIFFERENTIAL,
    FULL,
    INVALID,
    MAX_SNAPSHOTS_PER_VOLUME,
    PLEX,
    PREPARING,
    Capabilities,
    SnapshotInfo,
    Tally,
    VolumeInfo,
)
from .names import parse_size
from .pool import Pool

__all__ = [
    "COMMITTED", "Capabilities", "DEFAULT_CHUNK", "DIFFERENTIAL", "FORMAT_VERSION", "FULL",
    "INVALID", "MAX_SNAPSHOTS_PER_VOLUME", "PLEX", "PREPARING", "Faults", "Pool", "SnapshotInfo",
    "Tally", "VolumeInfo", "errors", "parse_size",
]
