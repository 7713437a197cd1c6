"""LunStore: exactly what fuse_mount needs from the array behind the mount.

The FUSE view (view.py), its protocol adapter (operations.py), the write barrier
(barrier.py) and the session (session.py) use these members and nothing else of the
array. `blockstore.Pool` is the first implementation, structurally: mypy checks it where
the daemon (the composition root, the one module that names Pool) hands its pool to
WriteBarrier and ShadowOperations, and tests/test_fuse_view.py compares the signatures
at run time. provider/'s wider Array interface extends this one, so any backend the
provider can drive can be mounted. Signatures are Pool's, names included (a caller may
pass them by keyword).

    generation      bumped on every change of names (a LUN appears, disappears, is
                    renamed, exposed...): the view rebuilds its tree when it moves
    path            the pool directory: the directories' mtime when they hold no LUN,
                    the mount's log line
    chunk_size      the mount reports it as st_blksize (the I/O size worth doing)
    list_volumes / list_snapshots   the tree (names, ids, sizes, times, flags)
    lun_size        a LUN's current size (getattr, writes near the end, truncate checks)
    read / write / discard / flush  the data path (flush: fsync and the write barrier)
    statfs          (total, free) bytes for statfs(2)
    allocated_bytes a volume's or full copy's real allocation (st_blocks: du, ls -s)

Optional: ``blocking_io = True`` on a store whose read/write/discard wait on the
network (host mode's provider.remote_array.RemoteArray): the mount runs those in worker
threads. A local pool's page-cache I/O is faster inline than a thread hand-off. Such a
store may also offer ``read_async(key, offset, length, done) -> bool``: start the read
without blocking and call ``done(data, None)`` or ``done(None, error)`` from any thread
when it ends, or return False at once when it cannot start without waiting; the mount
then parks the request's task instead of handing the read to a worker thread
(RbdArray: librbd's aio_read, docs/ceph.md "Where the time goes").
"""

from __future__ import annotations

from typing import Protocol

from blockstore.model import SnapshotInfo, VolumeInfo


class LunStore(Protocol):
    """The array as the mount uses it. LUN keys: a volume name or a snapshot id."""

    @property
    def generation(self) -> int: ...

    @property
    def path(self) -> str: ...

    @property
    def chunk_size(self) -> int: ...

    def list_volumes(self) -> list[VolumeInfo]: ...

    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]: ...

    def lun_size(self, key: str) -> int: ...

    def read(self, key: str, offset: int, length: int) -> bytes: ...

    def write(self, name: str, offset: int, data: bytes | memoryview) -> int: ...

    def discard(self, name: str, offset: int, length: int) -> None: ...

    def flush(self, name: str) -> None: ...

    def statfs(self) -> tuple[int, int]: ...

    def allocated_bytes(self, key: str) -> int: ...

