"""librbd's and librados's exceptions as blockstore.errors, in one place (the Array
interface: a backend raises those, never its own). ``mapped(exc, what)`` names what was
being done; ``translated(what)`` wraps a block of librbd calls.

    rbd ImageNotFound / ObjectNotFound, rados ObjectNotFound   -> NotFound
    rbd ImageExists / ObjectExists, rados ObjectExists        -> Exists
    rbd ImageBusy / ImageHasSnapshots                         -> Busy
    rbd NoSpace / DiskQuotaExceeded, ENOSPC / EDQUOT          -> NoSpace (pool full)
    rbd ReadOnlyImage, EROFS                                  -> ReadOnly
    rbd OperationCanceled, ECANCELED                          -> Cancelled
    rbd InvalidArgument / ArgumentOutOfRange                  -> InvalidState
    rbd FunctionNotSupported / OperationNotSupported          -> Unsupported
    anything else of rbd/rados (EIO, timeouts, a lost link)   -> StoreError, with errno
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

from blockstore import errors as bse

_BY_ERRNO: dict[int, type[bse.StoreError]] = {
    errno.ENOENT: bse.NotFound,
    errno.EEXIST: bse.Exists,
    errno.EBUSY: bse.Busy,
    errno.ENOTEMPTY: bse.Busy,
    errno.ENOSPC: bse.NoSpace,
    errno.EDQUOT: bse.NoSpace,
    errno.EROFS: bse.ReadOnly,
    errno.ECANCELED: bse.Cancelled,
    errno.EINVAL: bse.InvalidState,
    errno.ERANGE: bse.InvalidState,
    errno.EOPNOTSUPP: bse.Unsupported,
    errno.ENOSYS: bse.Unsupported,
}

_BY_NAME: dict[str, type[bse.StoreError]] = {
    "ImageNotFound": bse.NotFound, "ObjectNotFound": bse.NotFound,
    "ImageExists": bse.Exists, "ObjectExists": bse.Exists,
    "ImageBusy": bse.Busy, "ImageHasSnapshots": bse.Busy,
    "NoSpace": bse.NoSpace, "DiskQuotaExceeded": bse.NoSpace,
    "ReadOnlyImage": bse.ReadOnly,
    "OperationCanceled": bse.Cancelled,
    "InvalidArgument": bse.InvalidState, "ArgumentOutOfRange": bse.InvalidState,
    "InvalidArgumentError": bse.InvalidState,
    "FunctionNotSupported": bse.Unsupported, "OperationNotSupported": bse.Unsupported,
}


def is_ceph_error(exc: BaseException) -> bool:
    """An exception of the rbd or rados module (or an OSError they raised)."""
    return type(exc).__module__ in ("rbd", "rados") or isinstance(exc, OSError)


def errno_of(exc: BaseException) -> int | None:
    e: Any = getattr(exc, "errno", None)
    return abs(e) if isinstance(e, int) else None


def mapped(exc: BaseException, what: str) -> bse.StoreError:
    """The blockstore error for a librbd/librados exception raised while doing `what`."""
    if isinstance(exc, bse.StoreError):
        return exc
    cls: type[bse.StoreError] | None = None
    for klass in type(exc).__mro__:
        cls = _BY_NAME.get(klass.__name__) if klass.__module__ in ("rbd", "rados") else None
        if cls is not None:
            break
    code = errno_of(exc)
    if cls is None and code is not None:
        cls = _BY_ERRNO.get(code)
    detail = str(exc).strip() or type(exc).__name__
    if cls is bse.NoSpace:
        return bse.NoSpace(f"{what}: the Ceph pool is full ({detail}); free space or raise "
                           "the pool's quota")
    return (cls or bse.StoreError)(f"{what}: {detail}")


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a block of librbd/librados calls; their exceptions leave as blockstore ones."""
    try:
        yield
    except bse.StoreError:
        raise
    except Exception as e:
        if not is_ceph_error(e):
            raise
        raise mapped(e, what) from e
