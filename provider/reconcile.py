"""Reconciliation at start: the catalog (provider/catalog.py) loaded and made to agree
with the block store and the kernel before any request is served.

- a mount record whose filesystem is no longer mounted (or its loop device gone) is
  forgotten;
- a set that was being created when the daemon stopped (its row is not CREATED) is
  removed, with whatever snapshots it had: no trace;
- an auto-release set is deleted: the session that owned it is gone;
- snapshots without a set row: an unfinished or auto-release set is deleted, a
  persistent one is adopted (a row is written for it);
- presentations of LUNs that no longer exist and imports of sets that no longer exist
  are dropped; then the FUSE view learns the masking.

Runs once, as Coordinator.start, on the trio thread before the control socket accepts
anything; the block store's listings run in worker threads. It owns no state: it writes
through the catalog and deletes through provider/deletion.py (the same paths a
requester's delete takes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from blockstore import SnapshotInfo
from fuse_mount import loopdev

from . import vss
from .catalog import SetRecord
from .model import SS, in_thread
from .vss import Context, VssError

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger("provider.coordinator")   # the service's log, as before the split


async def reconcile_at_start(c: Coordinator) -> None:
    """Load the catalog and reconcile it with the pool (see the module docstring)."""
    c.catalog.load()
    mounted = {mp for mp, _, _ in loopdev.mountinfo()}
    for sid, m in list(c.catalog.mounted.items()):
        # as text (the record holds the resolved path): a stat of a mount point on
        # a filesystem stacked on one of our volumes is I/O through our own mount
        alive = m.mountpoint in mounted and loopdev.backing_file(m.dev) is not None
        if not alive:
            log.info("snapshot %s is no longer mounted at %s: forgetting the mount",
                     sid, m.mountpoint)
            c.exposure.forget_mount(sid)
    snaps = await in_thread(c.pool.list_snapshots)
    by_set: dict[str, list[SnapshotInfo]] = {}
    for s in snaps:
        by_set.setdefault(s.set_id or s.id, []).append(s)
    for set_id, rec in list(c.catalog.records.items()):
        members = by_set.pop(set_id, [])
        if rec.state != SS.CREATED:
            log.warning("snapshot set %s was being created when the daemon stopped "
                        "(state %s): removing it", set_id, SS(rec.state).name)
        elif rec.auto_release:
            log.info("snapshot set %s (%s) is auto-release and its requester session "
                     "ended: deleting it", set_id, Context(rec.context).vss_name)
        else:
            continue
        await c.deletion.remove_snapshots(
            [s.id for s in members], force=True,
            reason="unfinished-at-start" if rec.state != SS.CREATED else "auto-release")
        c.deletion.drop_record(set_id)
    for set_id, members in by_set.items():
        attrs = members[0].attributes
        try:
            ctx = vss.snapshot_context(attrs)
            auto = vss.is_auto_release(ctx)
        except (ValueError, VssError):
            ctx, auto = Context.BACKUP, True
        preparing = any(s.state == "preparing" for s in members)
        if auto or preparing:
            log.warning("snapshot set %s has no provider record and is %s: deleting "
                        "its %d snapshot(s)", set_id,
                        "unfinished" if preparing else "auto-release", len(members))
            await c.deletion.remove_snapshots(
                [s.id for s in members], force=True,
                reason="unfinished-at-start" if preparing else "auto-release")
            continue
        log.info("adopting persistent snapshot set %s (%d snapshot(s))", set_id,
                 len(members))
        rec = SetRecord(set_id, int(ctx), int(attrs) & int(vss.CONTEXT_BITS | vss.OPTION_BITS),
                        int(SS.CREATED), min(s.created for s in members), "", "",
                        max(1, min(len(members), vss.MAX_VOLUMES_PER_SET)), False)
        c.catalog.put_set(rec)
    luns = {v.name for v in c.pool.list_volumes()}
    luns |= {s.id for s in await in_thread(c.pool.list_snapshots)}
    for lun in [x for x in c.catalog.presented if x not in luns]:
        c.catalog.set_presentation(lun, None)
    for sid in [x for x in c.catalog.imported if x not in c.catalog.records]:
        c.catalog.delete_import(sid)
    c.masking.push()
