"""Writers: application quiescers (VSS writers). See :mod:`provider.writers.base`.

Built-in writers, in the order a :class:`WriterSet` freezes them:

* :class:`HookScriptWriter` (10): executables in a hooks directory;
* :class:`SQLiteWriter` (50): checkpoint + write lock on SQLite databases;
* :class:`FsFreezeWriter` (90): FIFREEZE of the filesystems mounted from the volumes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .base import (
    DEFAULT_FREEZE_TIMEOUT,
    WRITER_NAMESPACE,
    Component,
    ComponentType,
    FileSpec,
    UsageType,
    VssWriterState,
    Writer,
    WriterError,
    WriterFailure,
    WriterMetadata,
    WriterSet,
    WriterStatus,
    writer_guid,
)
from .fsfreeze import FIFREEZE, FITHAW, FsFreezeWriter, thaw_mount_point
from .hooks import DEFAULT_HOOK_TIMEOUT, HookResult, HookScriptWriter
from .mounts import (
    LoopDevice,
    MountEntry,
    VolumeMount,
    find_volume_mounts,
    list_loop_devices,
    mount_of_path,
    parse_mountinfo,
    writable_filesystems,
)
from .sqlite import SQLiteWriter

__all__ = [
    "DEFAULT_FREEZE_TIMEOUT",
    "DEFAULT_HOOK_TIMEOUT",
    "DEFAULT_HOOKS_DIR",
    "FIFREEZE",
    "FITHAW",
    "WRITER_NAMESPACE",
    "Component",
    "ComponentType",
    "FileSpec",
    "FsFreezeWriter",
    "HookResult",
    "HookScriptWriter",
    "LoopDevice",
    "MountEntry",
    "SQLiteWriter",
    "UsageType",
    "VolumeMount",
    "VssWriterState",
    "Writer",
    "WriterError",
    "WriterFailure",
    "WriterMetadata",
    "WriterSet",
    "WriterStatus",
    "default_writers",
    "find_volume_mounts",
    "list_loop_devices",
    "mount_of_path",
    "parse_mountinfo",
    "thaw_mount_point",
    "writable_filesystems",
    "writer_guid",
]

DEFAULT_HOOKS_DIR = "/etc/shadowplex/hooks.d"


def default_writers(config: Mapping[str, Any]) -> list[WriterSet]:
    """The built-in writers for ``shadowplex serve``, as ONE :class:`WriterSet` (which
    the coordinator calls like a writer: freeze(event) / thaw / abort / backup_complete /
    identify), so the freeze order and rollback hold.

    Config keys (all optional): ``fsfreeze`` (bool, default True), ``hooks_dir`` (default
    /etc/shadowplex/hooks.d, used if it exists), ``hook_timeout`` (s, 30),
    ``sqlite_databases`` (list of paths), ``freeze_timeout`` (s, 60; the set uses 2 s less
    so that it fails, and rolls back, before its caller gives up), ``mount`` (the FUSE
    mount point: fsfreeze's identify then lists only filesystems on MOUNT/volumes).
    """
    writers: list[Writer] = []
    hooks_dir = config.get("hooks_dir", DEFAULT_HOOKS_DIR)
    if hooks_dir and os.path.isdir(hooks_dir):
        writers.append(HookScriptWriter(
            hooks_dir, timeout=float(config.get("hook_timeout", DEFAULT_HOOK_TIMEOUT))))
    mount = config.get("mount")   # realpath'ed by the service: compared as text
    dbs = config.get("sqlite_databases") or []
    if dbs:
        writers.append(SQLiteWriter(list(dbs), own_mount=mount))
    if config.get("fsfreeze", True):
        writers.append(FsFreezeWriter(os.path.join(mount, "volumes") if mount else None,
                                      own_mount=mount))
    timeout = float(config.get("freeze_timeout", DEFAULT_FREEZE_TIMEOUT))
    return [WriterSet(writers, freeze_timeout=max(1.0, timeout - 2.0))]
