"""The ONE place where block-store exceptions become errno values.

Every FUSE handler in operations.py is wrapped by `fuse_errors` (or uses
`store_errors()`), so a handler raises only pyfuse3.FUSEError:

    blockstore.errors        errno       why
    -----------------------  ----------  ----------------------------------------------
    NotFound                 ENOENT      the LUN disappeared (deleted between calls)
    ReadOnly                 EROFS       snapshots are read-only at every layer
    OutOfRange (write)       ENOSPC      what a block device answers for I/O past its end
                                         (dd/fio then say "No space left on device",
                                         exactly as on a real LUN)
    OutOfRange (otherwise)   EINVAL      bad offset/length (negative, discard past end)
    SnapshotInvalid          EIO         its preserved data was lost: never served wrong
    CorruptData              EIO         checksum mismatch
    NoSpace                  ENOSPC
    Busy, InvalidState       EBUSY
    Unsupported              EOPNOTSUPP
    InvalidName, InvalidSize EINVAL
    Exists                   EEXIST
    any other StoreError     EIO
    view.ViewError           its errno   the view refuses (ENOENT, ENOTDIR, EROFS...):
                                         an answer, not logged
    OSError from below       its errno if ENOSPC/EDQUOT/EIO/EROFS, else EIO
    sqlite3 SQLITE_FULL      ENOSPC      a catalog write on a full pool filesystem
    anything else            EIO, logged with its traceback (a bug)

trio.Cancelled and other BaseExceptions pass through untouched.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pyfuse3

from blockstore import errors as bse

from .view import ViewError

log = logging.getLogger(__name__)

_MAP: tuple[tuple[type[BaseException], int], ...] = (
    (bse.NotFound, errno.ENOENT),
    (bse.ReadOnly, errno.EROFS),
    (bse.OutOfRange, errno.EINVAL),
    (bse.SnapshotInvalid, errno.EIO),
    (bse.CorruptData, errno.EIO),
    (bse.NoSpace, errno.ENOSPC),
    (bse.Busy, errno.EBUSY),
    (bse.InvalidState, errno.EBUSY),
    (bse.Unsupported, errno.EOPNOTSUPP),
    (bse.InvalidName, errno.EINVAL),
    (bse.InvalidSize, errno.EINVAL),
    (bse.Exists, errno.EEXIST),
)

# Errors that mean "the data is not there / not trustworthy": always logged loudly.
_LOUD = (bse.SnapshotInvalid, bse.CorruptData, bse.NoSpace)
_PASS_OSERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def errno_for(exc: BaseException, *, writing: bool = False) -> int:
    """errno for an exception raised below the FUSE layer."""
    if isinstance(exc, pyfuse3.FUSEError | ViewError):
        return exc.errno
    if isinstance(exc, bse.OutOfRange) and writing:
        return errno.ENOSPC
    for cls, code in _MAP:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, bse.StoreError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno in _PASS_OSERRORS:
        return exc.errno
    if bse.disk_full(exc):   # SQLITE_FULL: a catalog write on a full pool filesystem
        return errno.ENOSPC
    return errno.EIO


def to_fuse_error(exc: Exception, what: str, *, writing: bool = False) -> pyfuse3.FUSEError:
    """Map and log one exception; return the FUSEError to raise."""
    code = errno_for(exc, writing=writing)
    if isinstance(exc, ViewError):
        return pyfuse3.FUSEError(code)   # the view's refusal is an answer: nothing to log
    if isinstance(exc, bse.StoreError):
        if isinstance(exc, _LOUD):
            log.error("%s: %s -> %s", what, exc, errno.errorcode.get(code, code))
        else:
            log.debug("%s: %s -> %s", what, exc, errno.errorcode.get(code, code))
    elif isinstance(exc, OSError) or bse.disk_full(exc):
        log.error("%s: %s -> %s", what, exc, errno.errorcode.get(code, code))
    else:
        log.error("%s: unexpected error (bug) -> EIO", what, exc_info=exc)
    return pyfuse3.FUSEError(code)


@contextmanager
def store_errors(what: str, *, writing: bool = False) -> Iterator[None]:
    """Context manager form: everything but FUSEError/BaseException becomes a FUSEError."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except Exception as e:  # noqa: BLE001 - this is the mapping point
        raise to_fuse_error(e, what, writing=writing) from None


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(func: F | None = None, *, writing: bool = False) -> Any:
    """Decorator for async FUSE handlers: `@fuse_errors` or `@fuse_errors(writing=True)`."""

    def deco(fn: F) -> F:
        what = fn.__name__

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:  # noqa: BLE001 - this is the mapping point
                raise to_fuse_error(e, what, writing=writing) from None

        return wrapper  # type: ignore[return-value]

    if func is not None:
        return deco(func)
    return deco
