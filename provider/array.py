"""The Array interface: exactly what the provider layer needs from a storage backend.

A SAN array, seen from its VSS hardware provider: LUNs (volumes) with an identity that
travels with them, point-in-time snapshots committed a set at a time, a data path, space
figures and self-checks. ``blockstore.Pool`` (the embedded pool: sparse image files) is
the first implementation, structurally (no adapter: the data path stays one call deep);
tests/fake_array.py is a second one in memory that runs the provider suite
(tests/test_array_contract.py) to prove that nothing above this line knows the pool.
provider/remote_array.py (another shadowplex array, host mode, issue 16) and
rbdarray/ (Ceph RBD, issue 18) are the others.

Optional members, looked up with getattr by their one user (a backend without them
behaves as the embedded pool): ``blocking_io`` (fuse_mount/lunstore.py: the mount runs
the data path in worker threads), ``claim_set(set_id, context, attributes)`` /
``release_set(set_id, created)`` (Coordinator.start_set: a shared array's one
set-in-creation slot; a backend's blockstore.errors.Busy there is
VSS_E_SNAPSHOT_SET_IN_PROGRESS), ``mark_exported(set_id)`` / ``import_set(document,
parsed)`` (provider/transport.py: export and import decided by the shared array),
``present_volume(name, hosts)`` / ``presented_to(name)`` (provider/volumes.py: LUN
masking stored by the backend on the LUN, Ceph's images). RbdArray has all of them:
several hosts' daemons share one RBD pool (docs/ceph.md).

Who uses what:

    HardwareProvider (hardware.py)   volumes, snapshots, space, capabilities
    Coordinator (coordinator.py ...) the same, plus check/scrub and exposure names
    fuse_mount (view, operations,    only fuse_mount.lunstore.LunStore, which Array
      barrier, session)              extends: the tree's listing and the data path
    daemon.py                        opens and closes the concrete backend (the
                                     composition root; nothing else names Pool)

The vocabulary is the engine's public model (it has no engine internals in it):
records ``VolumeInfo``, ``SnapshotInfo``, ``Capabilities`` (blockstore.model) and the
errors of ``blockstore.errors`` (NotFound, Exists, InvalidState, Busy, NoSpace,
ReadOnly, Cancelled, ...), which the provider maps to VSS errors in one place
(provider/protocol.py) and fuse_mount to errno in one place (fuse_mount/errors.py). A
backend raises those, never its own exceptions.

Threads: every method is synchronous, may block on I/O, and may be called from any
thread at the same time (the FUSE handlers on the trio thread, flush/commit and long
operations from worker threads): an implementation is thread-safe by itself. Long
operations take ``progress(done, total)``, in bytes; a callback that raises
``blockstore.errors.Cancelled`` cancels the operation at its next cancellation point,
and an optional ``progress.point_of_no_return()`` is called once it can no longer be
undone (provider/jobs.py).

Keys: a LUN is named by a key: a volume's name or a snapshot's id (a GUID). Snapshot
ids are chosen by the caller (the coordinator gives VSS's ids).

The allocation map of a LUN (``allocation``) is here for NBD's BLOCK_STATUS (issue 15)
and sparse copies; the changed-block map between two snapshots (``changed_extents``,
issue 17) for incremental backups, where ``Capabilities.changed_blocks`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from blockstore.model import Capabilities, SnapshotInfo, Tally, VolumeInfo
from fuse_mount.lunstore import LunStore

Progress = Callable[[int, int], None] | None


class Array(LunStore, Protocol):
    """A storage array as the provider sees it (see the module docstring). From
    LunStore, what the mount needs too: ``path`` (also the local directory the provider
    keeps its catalog in), ``chunk_size``, ``generation``, list_volumes,
    list_snapshots, lun_size, read, write, flush (durable when it returns), discard
    (reads as zeros; snapshots keep their content), statfs ((total, free) bytes)."""

    # ---------------------------------------------------------------- identity
    @property
    def pool_id(self) -> str:
        """32 hex digits naming this array; BCD documents carry it, and an import
        refuses a document of another array (transport)."""

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def last_io(self) -> float:
        """time.monotonic() of the last read or write (background work yields to I/O)."""

    # ---------------------------------------------------------------- volumes
    def volume(self, name: str) -> VolumeInfo: ...
    def create_volume(self, name: str, size: int) -> VolumeInfo: ...
    def resize_volume(self, name: str, new_size: int) -> VolumeInfo: ...
    def delete_volume(self, name: str) -> None: ...

    # ---------------------------------------------------------------- snapshots
    def snapshot(self, snap_id: str) -> SnapshotInfo: ...

    def prepare_snapshot(self, volume: str, kind: str = ..., snapshot_id: str | None = None,
                         set_id: str | None = None, attributes: int = 0) -> SnapshotInfo:
        """A snapshot in state PREPARING, invisible to readers; kind differential or
        plex (a plex must then be synced with plex_sync_step)."""

    def plex_sync_step(self, snap_id: str, max_bytes: int = ...) -> tuple[int, int]:
        """Copy up to max_bytes more into a preparing plex; (done, total) bytes."""

    def commit_snapshots(self, snap_ids: Iterable[str]) -> None:
        """The instant: every snapshot given is committed at once, durably, or none is."""

    def abort_snapshot(self, snap_id: str) -> None:
        """Remove a PREPARING snapshot (InvalidState if committed: delete it instead)."""

    def delete_snapshot(self, snap_id: str) -> None: ...

    def promote(self, snap_id: str, progress: Progress = None) -> SnapshotInfo:
        """Make a differential snapshot a full copy with the same id and content."""

    def split(self, snap_id: str, new_name: str, progress: Progress = None) -> VolumeInfo:
        """A new read-write volume with the snapshot's content (new naa id); the
        snapshot is gone afterwards."""

    def revert(self, volume: str, snap_id: str, progress: Progress = None) -> None:
        """Make ``volume`` equal to the snapshot (ResyncLuns)."""

    def set_exposed(self, snap_id: str, name: str | None) -> SnapshotInfo:
        """Record (or clear) the name a snapshot is exposed under (it travels with it)."""

    # ---------------------------------------------------------------- data path
    # (read, write, flush, discard, lun_size: LunStore's)
    def allocation(self, key: str, offset: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) runs of the range that may hold data, sorted and merged;
        the rest reads as zeros (a listed run may too). Ask for bounded ranges: the
        cost may grow with the range (per chunk for a differential snapshot)."""

    def changed_extents(self, from_id: str, to_id: str | None = None
                        ) -> list[tuple[int, int]]:
        """(offset, length) extents of the chunks touched (written, discarded, rewritten
        by a revert; possibly with the same bytes) after differential snapshot from_id
        and before snapshot to_id -- None: up to now, the live volume. Sorted, merged,
        inside the newer side's size; everything else reads as it did in from_id
        (zeros past its end). Cost: the changes, not the volume size. Refused: from_id
        not a committed differential snapshot (Unsupported for a plex or a promoted
        copy: nothing records changes since it; SnapshotInvalid), to_id older, of
        another volume, or a plex (InvalidState, Unsupported); Unsupported everywhere
        unless ``capabilities.changed_blocks``."""

    def image_path(self, key: str) -> str | None:
        """A local file holding the LUN's data, if there is one (loop devices attached
        to it directly are users of the volume); None for a backend without one."""

    # ---------------------------------------------------------------- space
    # (+ statfs, and allocated_bytes: a full copy of the LUN needs that much; LunStore's)
    def available_bytes(self) -> int:
        """Free space snapshots may take: what a full copy may use."""


    # ---------------------------------------------------------------- integrity
    def close(self) -> None:
        """Release the backend (the daemon's last call: files, locks, connections)."""

    def check(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """Consistency of metadata and maps; problems as lines (none: []). ``volume``:
        that volume and its snapshots only (NotFound if there is none); ``tally``
        counts what was read (LUNs, chunks verified, bytes)."""

    def scrub(self, progress: Progress = None, volume: str | None = None,
              tally: Tally | None = None) -> list[str]:
        """check, plus every preserved or copied chunk read back and verified."""


if TYPE_CHECKING:
    # The embedded pool is an Array (mypy checks this line).
    from blockstore import Pool

    def _pool_is_an_array(pool: Pool) -> Array:
        return pool
