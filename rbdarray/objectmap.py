"""Which objects of an image changed since one of its snapshots, from the object maps
themselves -- so that revert costs what changed, not the volume's size (issue 18).

librbd answers the same question (diff_iterate with fast-diff, whole objects), but it
walks the image object by object, ~1 us per object: 0.5-1 s for 64 GiB of our 64 KiB
objects whatever changed (docs/ceph.md "Performance"). The maps are small -- 2 bits per
object, 256 KiB for 64 GiB -- so here they are read with one class call each
(`rbd.object_map_load`, which checks their CRCs on the OSD) and compared as whole
integers, a few milliseconds for 64 GiB.

The rule is librbd's own (librbd/object_map/DiffRequest.cc): walking the maps from the
snapshot's to the head's, through every snapshot taken after it, an object changed if
in a later map it is EXISTS (written since the snapshot before), or its state differs
from the previous map's other than EXISTS -> EXISTS_CLEAN (what taking a snapshot does
to a written object); but not if it exists neither in the snapshot nor in the head
(zeros on both sides). A map shorter than the next is padded with NONEXISTENT.
tests/test_rbd_revert.py checks the answer is diff_iterate's.

It answers None -- the caller then does what librbd does -- whenever it cannot be sure:
the image lacks fast-diff or is striped, it has a clone parent (it or any of its
snapshots: its maps say nothing of what it reads from the parent -- a clone not
flattened yet, a v2 clone made elsewhere -- so "absent" there is not zeros; librbd's
diff_iterate and rollback_to_snap include the parent), a map is flagged invalid, a
snapshot of another namespace (group, trash, mirror) lies in the range (its map would
be needed and we do not list it), or a map cannot be read or parsed. Only reading;
nothing is changed.
"""

from __future__ import annotations

import re
import struct
from typing import Any

# object states (librbd/object_map/Types.h, include/rbd/object_map_types.h)
NONEXISTENT, EXISTS, PENDING, EXISTS_CLEAN = 0, 1, 2, 3
OBJECT_MAP_PREFIX = "rbd_object_map."
HEADER_PREFIX = "rbd_header."
NOSNAP = (1 << 64) - 2          # CEPH_NOSNAP: the head
FLAG_INVALID = 0x3              # RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID
BITVECTOR_HEADER = 18           # u32 length, 6-byte encoding header, u64 element count
CRC_BLOCK = 4096                # BitVector's data CRC block
_NONZERO = re.compile(rb"[^\x00]")


def map_name(image_id: str, snap_id: int = NOSNAP) -> str:
    return OBJECT_MAP_PREFIX + image_id + ("" if snap_id == NOSNAP else f".{snap_id:016x}")


def _exec(io: Any, oid: str, method: str, data: bytes, length: int) -> bytes | None:
    try:
        ret, out = io.execute(oid, "rbd", method, data, length=length)
    except Exception:   # noqa: BLE001 - any failure: the caller falls back to librbd
        return None
    return bytes(out) if ret >= 0 else None


def _flags(io: Any, image_id: str, snap_id: int) -> int | None:
    out = _exec(io, HEADER_PREFIX + image_id, "get_flags", struct.pack("<Q", snap_id), 64)
    return struct.unpack_from("<Q", out)[0] if out is not None and len(out) >= 8 else None


def _all_snap_ids(io: Any, image_id: str) -> set[int] | None:
    """Every snapshot id of the image, all namespaces (its snap context)."""
    out = _exec(io, HEADER_PREFIX + image_id, "get_snapcontext", b"", 1 << 20)
    if out is None or len(out) < 12:
        return None
    (n,) = struct.unpack_from("<I", out, 8)
    if len(out) < 12 + 8 * n:
        return None
    return set(struct.unpack_from(f"<{n}Q", out, 12))


def _has_parent(io: Any, image: Any, rbd: Any, image_id: str) -> bool | None:
    """Whether the image -- its head or any of its snapshots -- has a clone parent; None
    when that cannot be said. librbd's parent_info() of the open image (its head, or
    the snapshot it is opened at), then the header's `parent_get` class call, which
    also answers for the snapshots: the parent link stays on the header while a
    snapshot still reads through it, after its head was flattened (cls_rbd.cc). An
    image being live-migrated (`rbd migration prepare`) reads what is not copied yet
    through its source, which neither of those names (librbd's get_parent skips it, the
    header keeps it under `migration`): its migrating feature bit counts as a
    parent."""
    if image.features() & rbd.RBD_FEATURE_MIGRATING:
        return True
    try:
        image.parent_info()
        return True
    except rbd.ImageNotFound:   # no parent here
        pass
    out = _exec(io, HEADER_PREFIX + image_id, "parent_get", b"", 4096)
    # ParentImageSpec: the encoding's header (u8 version, u8 compat, u32 length), then
    # the parent's pool id, -1 for none
    if out is None or len(out) < 14:
        return None
    return bool(struct.unpack_from("<q", out, 6)[0] >= 0)


def load_map(io: Any, image_id: str, snap_id: int, objects: int) -> int | None:
    """The map of the head or a snapshot as an integer, 2 bits per object, object 0 in
    the top bits (BitVector's order: element i of byte i // 4 at shift 6 - 2 * (i % 4)),
    cut to `objects` elements. None if it cannot be read or is too small (librbd
    refuses those too)."""
    nbytes = (objects + 3) // 4
    # room for a map a little larger than the image (librbd rounds it) and the footer
    length = BITVECTOR_HEADER + 2 * nbytes + 4 * (2 * nbytes // CRC_BLOCK + 4) + 4096
    out = _exec(io, map_name(image_id, snap_id), "object_map_load", b"", length)
    if out is None or len(out) < BITVECTOR_HEADER:
        return None
    (count,) = struct.unpack_from("<Q", out, 10)
    have = (count + 3) // 4
    if count < objects or len(out) < BITVECTOR_HEADER + have:
        return None
    data = out[BITVECTOR_HEADER:BITVECTOR_HEADER + have]
    value = int.from_bytes(data, "big") >> (2 * (4 * have - count))    # count elements
    return int(value >> (2 * (count - objects)))


def _pairs(value: int, objects: int) -> tuple[int, int]:
    """(high bits, low bits) of every 2-bit element, each at the element's low bit."""
    lo_mask = int.from_bytes(b"\x55" * ((objects + 3) // 4), "big") >> (
        2 * (4 * ((objects + 3) // 4) - objects))
    return (value >> 1) & lo_mask, value & lo_mask


def changed_since(prev: int, cur: int, objects: int) -> int:
    """The objects (one bit each, at the element's low bit) that changed from map `prev`
    to the next map `cur` (DiffRequest's rule, the module docstring)."""
    ph, pl = _pairs(prev, objects)
    ch, cl = _pairs(cur, objects)
    cur_exists = cl & ~ch                       # cur == EXISTS
    differ = (ph ^ ch) | (pl ^ cl)
    cleaned = pl & ~ph & cl & ch                # EXISTS -> EXISTS_CLEAN
    return cur_exists | (differ & ~cleaned)


def object_numbers(bits: int, objects: int) -> list[int]:
    """The object numbers set in a changed_since result, ascending."""
    if not bits:
        return []
    nbytes = (objects + 3) // 4
    data = (bits << (2 * (4 * nbytes - objects))).to_bytes(nbytes, "big")
    out = []
    for m in _NONZERO.finditer(data):
        i, b = m.start(), data[m.start()]
        for k in range(4):
            if b & (1 << (6 - 2 * k)):
                out.append(4 * i + k)
    return out


def _mappable(io: Any, image: Any, rbd: Any) -> tuple[int, str] | None:
    """(object order, image id) when the image's object maps can be read our way (fast
    diff on, no striping, no clone parent); None when not, or librbd cannot say: do it
    librbd's way."""
    try:
        order = int(image.stat()["order"])
        if not image.features() & rbd.RBD_FEATURE_FAST_DIFF or \
                image.stripe_count() != 1 or image.stripe_unit() != 1 << order:
            return None
        image_id = str(image.id())
        if _has_parent(io, image, rbd, image_id) is not False:
            return None
        return order, image_id
    except Exception:   # noqa: BLE001 - librbd itself will do it
        return None


def changed_objects(io: Any, image: Any, rbd: Any, snap_id: int, limit: int,
                    end: int | None = None) -> list[int] | None:
    """The numbers of the objects that may differ between RBD snapshot ``snap_id`` and
    the head -- or the later RBD snapshot ``end`` --, among the objects below ``limit``
    bytes, ascending; None when the maps cannot be trusted (the module docstring: do it
    librbd's way then). ``image``: an open Image of the volume (the head or a snapshot);
    a write in flight meanwhile may or may not be seen (as with librbd's diff)."""
    mappable = _mappable(io, image, rbd)
    if mappable is None:
        return None
    order, image_id = mappable
    try:
        listed = {int(s["id"]): int(s["size"]) for s in image.list_snaps()}
        head_size = int(image.size())
    except Exception:   # noqa: BLE001 - librbd itself will do it
        return None
    if snap_id not in listed or (end is not None and end not in listed) or \
            _all_snap_ids(io, image_id) != set(listed):
        return None
    unit = 1 << order
    chain = [(i, -(-listed[i] // unit)) for i in sorted(listed)
             if i >= snap_id and (end is None or i <= end)]
    if end is None:
        chain.append((NOSNAP, -(-head_size // unit)))
    objects = max(n for _, n in chain)
    maps: list[int] = []
    for sid, n in chain:
        flags = _flags(io, image_id, sid)
        if flags is None or flags & FLAG_INVALID:
            return None
        m = load_map(io, image_id, sid, n)
        if m is None:
            return None
        maps.append(m << (2 * (objects - n)))   # padded with NONEXISTENT at the end
    changed = 0
    for prev, cur in zip(maps, maps[1:]):
        changed |= changed_since(prev, cur, objects)
    # absent in the snapshot and in the head: zeros on both sides, whatever came and went
    # in between (librbd does not report those either)
    sh, sl = _pairs(maps[0], objects)
    hh, hl = _pairs(maps[-1], objects)
    changed &= sh | sl | hh | hl
    n = -(-limit // unit)
    return [i for i in object_numbers(changed, objects) if i < n]


def allocated_objects(io: Any, image: Any, rbd: Any, snap_id: int | None, size: int
                      ) -> list[int] | None:
    """The numbers of the objects that exist in RBD snapshot ``snap_id`` (None: the
    head) among its first ``size`` bytes, ascending -- one map read instead of librbd's
    walk of every object; None when the map cannot be trusted (as changed_objects)."""
    mappable = _mappable(io, image, rbd)
    if mappable is None:
        return None
    order, image_id = mappable
    sid = NOSNAP if snap_id is None else snap_id
    n = -(-size // (1 << order))
    flags = _flags(io, image_id, sid)
    if flags is None or flags & FLAG_INVALID or not n:
        return None if flags is None or flags & FLAG_INVALID else []
    m = load_map(io, image_id, sid, n)
    if m is None:
        return None
    high, low = _pairs(m, n)
    return object_numbers(high | low, n)
