"""One read of the pool's records -- our images, their spx.* metadata, their RBD
snapshots (rbdarray/records.py) -- and the repair of a commit or delete a crash
interrupted.

RbdArray's catalog in memory is rebuilt from a scan when it opens and whenever the pool
may have changed under it (another host's notify, or the poll: rbdarray/follow.py). A
scan only reads: images are opened read-only (that registers no watch) and closed
again, so a scan never keeps another host from removing an image.

The repair changes the pool, and only runs while this array holds the set-in-creation
lock (rbdarray/setlock.py): every commit of every host runs under that lock, so a record
that is not done is then a crash's leftover, never another host's commit in flight.
Without the lock a scan leaves such records alone, and nobody sees them (a snapshot is
listed once its record is done and its RBD snapshot exists).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

from .errors import translated
from .records import (
    RBD_SNAP_PREFIX,
    REVERT_KEY,
    SNAP_PREFIX,
    VOLUME_KEY,
    SnapRecord,
    VolumeRecord,
    rbd_snap_name,
    snap_key,
)

log = logging.getLogger(__name__)


@dataclass
class ImageScan:
    """One of our images as the scan read it."""
    name: str
    id: int                                   # the image id (hex) as an integer
    rec: VolumeRecord
    size: int
    mtime: float
    records: dict[str, SnapRecord]            # spx.snap.<id> on the image
    rbd: dict[str, tuple[int, int]]           # our RBD snapshots: id -> (RBD id, size)
    revert: str | None = None                 # spx.revert's snapshot (revert.py)

    def committed(self) -> dict[str, SnapRecord]:
        """The snapshots a reader may see: record done and RBD snapshot there."""
        return {sid: r for sid, r in self.records.items() if r.done and sid in self.rbd}


def text_of(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def timestamp_of(value: Any) -> float:
    try:
        return float(value.timestamp())
    except (AttributeError, ValueError, OSError):
        return 0.0


def revert_of(text: Any) -> str | None:
    """The snapshot of an ``spx.revert`` record (None: no record); an unreadable
    record still marks the image as being reverted ("?": it cannot be finished)."""
    if text is None:
        return None
    try:
        return str(json.loads(text_of(text))["snapshot"])
    except (ValueError, KeyError, TypeError):
        return "?"


def scan_pool(io: Any, rbd: Any, pool: str) -> dict[str, ImageScan]:
    """Every image of the pool carrying our volume record, by name."""
    with translated(f"listing pool {pool}"):
        names = sorted(rbd.RBD().list(io))
    out: dict[str, ImageScan] = {}
    for name in names:
        with translated(f"reading image {name}"):
            try:
                image = rbd.Image(io, name, read_only=True)
            except rbd.ImageNotFound:
                continue                    # removed meanwhile
            try:
                meta = dict(image.metadata_list())
                if VOLUME_KEY not in meta:
                    continue                # not ours
                snaps = list(image.list_snaps())
                image_id, size = int(image.id(), 16), int(image.size())
                mtime = timestamp_of(image.modify_timestamp())
            finally:
                image.close()
        try:
            rec = VolumeRecord.load(meta[VOLUME_KEY])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("image %s: unreadable %s record (%s); ignored", name, VOLUME_KEY, e)
            continue
        records: dict[str, SnapRecord] = {}
        for key, text in meta.items():
            if key.startswith(SNAP_PREFIX):
                try:
                    records[key[len(SNAP_PREFIX):]] = SnapRecord.load(text)
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("image %s: unreadable record %s (%s); ignored", name, key, e)
        rbd_snaps = {}
        for s in snaps:
            sname = text_of(s["name"])
            if sname.startswith(RBD_SNAP_PREFIX):
                rbd_snaps[sname[len(RBD_SNAP_PREFIX):]] = (int(s["id"]), int(s["size"]))
        out[name] = ImageScan(name, image_id, rec, size, mtime or rec.created, records,
                              rbd_snaps, revert_of(meta.get(REVERT_KEY)))
    return out


def repair(scans: dict[str, ImageScan], image_of: Callable[[str], ContextManager[Any]],
           rbd: Any) -> None:
    """Finish or undo what a crash interrupted (records.py's rules), and bring ``scans``
    in line. Call only under the set-in-creation lock (see the module docstring).
    ``image_of(name)`` gives a writable Image of a volume for the duration."""
    present = {sid for sc in scans.values() for sid in sc.rbd}
    for sc in scans.values():
        for sid, rec in sorted(sc.records.items()):
            if sid not in sc.rbd:
                log.warning("snapshot %s of %s: its RBD snapshot is gone (a delete or a "
                            "commit was interrupted); removing its record", sid, sc.name)
                _forget(image_of, sc, sid, rbd)
                continue
            if rec.done:
                continue
            if all(m in present for m in rec.members):
                rec.done = True
                with translated(f"finishing the commit of snapshot {sid}"), \
                        image_of(sc.name) as image:
                    image.metadata_set(snap_key(sid), rec.dump())
                continue
            log.warning("snapshot %s of %s: its set's commit was interrupted before every "
                        "volume had its snapshot; removing it", sid, sc.name)
            with translated(f"removing the RBD snapshot of {sid}"), \
                    image_of(sc.name) as image, contextlib.suppress(rbd.ImageNotFound):
                image.remove_snap(rbd_snap_name(sid))
            sc.rbd.pop(sid, None)
            _forget(image_of, sc, sid, rbd)


def _forget(image_of: Callable[[str], ContextManager[Any]], sc: ImageScan, sid: str,
            rbd: Any) -> None:
    with translated(f"removing the record of snapshot {sid}"), image_of(sc.name) as image, \
            contextlib.suppress(KeyError, rbd.ImageNotFound):
        image.metadata_remove(snap_key(sid))
    sc.records.pop(sid, None)
