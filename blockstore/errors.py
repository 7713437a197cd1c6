"""Exceptions raised by the block store.

Every user-facing failure is a StoreError subclass whose message is one clear line
(what was wrong and, where it helps, what to do). The FUSE layer maps these to errno in
one place (fuse_mount/errors.py); the control API maps them to stable error names.
"""


class StoreError(Exception):
    """Base of every error the block store raises on purpose."""


class NotFound(StoreError):
    """No volume, snapshot or pool by that name or id."""


class Exists(StoreError):
    """A volume, snapshot or exposure of that name already exists."""


class InvalidName(StoreError):
    """A name breaks the naming rules."""


class InvalidSize(StoreError):
    """A size is zero, negative, not a multiple of 512, or shrinks a volume."""


class OutOfRange(StoreError):
    """I/O past the end of a LUN, or a negative offset or length."""


class ReadOnly(StoreError):
    """A write to a snapshot (snapshots are read-only at every layer)."""


class Busy(StoreError):
    """The object is in use (a volume with snapshots, a snapshot being exposed...)."""


class PoolLocked(StoreError):
    """Another process holds the pool's exclusive lock."""


class FormatError(StoreError):
    """Not a pool, a damaged pool header, or a pool of a newer format version."""


class SnapshotInvalid(StoreError):
    """The snapshot lost preserved data (overflow, I/O error): it is never served."""


class CorruptData(StoreError):
    """Stored data failed its checksum."""


class NoSpace(StoreError):
    """Not enough space in the pool for the requested operation."""


class InvalidState(StoreError):
    """The operation does not fit the object's state (commit of an unsynced plex...)."""


class Unsupported(StoreError):
    """The operation is not supported for this kind of object (promote of a plex...)."""


class Cancelled(StoreError):
    """The caller cancelled a long operation: its progress callback raised this between
    two steps, and the operation passes it on. Each operation's docstring says what a
    cancellation leaves (promote, split: nothing changed; revert: once started it rolls
    forward and ignores it, as after a crash)."""


class SimulatedCrash(BaseException):
    """Raised by a fault-injection hook at a named step.

    A BaseException on purpose: no `except Exception` on the way up may swallow it,
    exactly as no code runs after a real kill -9. Tests then abandon the Pool object
    (without close) and reopen the directory.
    """


def disk_full(exc: BaseException) -> bool:
    """The filesystem ran out of room: ENOSPC or EDQUOT from the kernel, SQLITE_FULL from
    a catalog. Not a bug: the upper layers map it to ENOSPC / VSS_E_INSUFFICIENT_STORAGE
    without a traceback."""
    import errno
    import sqlite3
    if isinstance(exc, NoSpace):
        return True
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
