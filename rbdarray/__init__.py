"""Ceph RBD as the array (issue 18): ``RbdArray`` implements provider/array.py's Array
over an RBD pool through librbd in the daemon's own process. It shares no code with the
embedded pool (blockstore/): only the interface's vocabulary (blockstore.model records,
blockstore.errors, blockstore.names). docs/ceph.md: the mapping, how to point it at a
cluster, the limits. librados/librbd come from Debian's python3-rados/python3-rbd,
linked into the venv by `make ceph` (rbdarray/setup-ceph.sh); this package imports
them only when an RbdArray is opened."""

from .array import RbdArray

__all__ = ["RbdArray"]
