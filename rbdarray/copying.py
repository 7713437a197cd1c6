"""The copy behind split on RBD (rbdarray/array.py), done by us instead of librbd's
clone + flatten so that its cost follows the data, not the volume's size: flatten
visits every object of the image -- measured with `python -m tools.bench.rbd`: a 2 GiB
volume with 8 MiB of data took 3.7x as long as a 32 MiB one with the same data
(docs/ceph.md "Performance"). Here the snapshot's object map says which objects to
copy, read in one go (rbdarray/objectmap.py: a few ms for 64 GiB; librbd's own answer,
diff_iterate, walks the map at ~1 us per object, 0.5-0.9 s for 64 GiB of 64 KiB
objects, and is what runs when the map cannot be used), and holes stay holes.

It runs with the images open (the source under its gate); a split cancelled midway is
removed by the caller. (Revert copies back the same way: rbdarray/revert.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COPY_STEP = 4 << 20      # bytes per read/write of a copy
Extents = Callable[[Any, int, int, str | None], list[tuple[int, int]]]


def copy_allocated(src: Any, dst: Any, size: int, extents: Extents,
                   step: Callable[[int, int], object], cancelled: list[BaseException]
                   ) -> None:
    """Every allocated object of `src` (an Image opened at a snapshot) written into
    `dst` (a new, empty image of `size`); step(done, total) after each request; stops
    when `cancelled` gets an entry."""
    runs = extents(src, 0, size, None) if size else []
    total = max(1, sum(n for _, n in runs))
    done = 0
    for o, n in runs:
        for off in range(o, o + n, COPY_STEP):
            k = min(COPY_STEP, o + n - off)
            dst.write(bytes(src.read(off, k)), off)
            done += k
            step(done, total)
            if cancelled:
                return
    dst.flush()
