"""The mount's view without FUSE (fuse_mount/view.py, presentation.py, lunstore.py): the
tree, inode numbers, attributes and LUN masking over a real Pool in a temporary
directory, with no pyfuse3 in sight. The FUSE handlers on top are tests/test_fuse_unit.py;
the kernel's side is tests/test_fuse_mount.py."""

from __future__ import annotations

import errno
import inspect
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockstore import Pool
from fuse_mount import view as view_mod
from fuse_mount.lunstore import LunStore
from fuse_mount.presentation import Presentation
from fuse_mount.view import (
    DIR_TIMEOUT,
    EXPOSED_INO,
    HOST_INO_BASE,
    HOSTS_INO,
    LUN_TIMEOUT,
    ROOT_INO,
    SHADOW_INO,
    SNAP_INO_BIT,
    VOLUME_INO_BASE,
    VOLUMES_INO,
    MountView,
    ViewError,
    snapshot_inode,
)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(str(tmp_path / "pool"), chunk_size=65536)
    try:
        yield p
    finally:
        p.close()


def _snapshot(pool: Pool, volume: str) -> str:
    s = pool.prepare_snapshot(volume)
    pool.commit_snapshots([s.id])
    return s.id


def _refused(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(ViewError) as ei:
        fn(*args)
    return ei.value.errno


def _names(v: MountView, ino: int) -> list[bytes]:
    return [name for _, name, _ in v.listing(v.tree, ino)]


# --------------------------------------------------------------------------- the seam


def test_pure_modules_import_neither_pyfuse3_nor_trio() -> None:
    code = ("import sys, fuse_mount.view, fuse_mount.presentation, fuse_mount.lunstore;"
            "print(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.strip() == "[]"


def test_pool_has_every_lunstore_member_with_its_signature() -> None:
    """The runtime twin of lunstore.py's static check (mypy): same names, same
    parameters; the properties are attributes of an open pool."""
    members = {n for n in vars(LunStore) if not n.startswith("_")}
    assert members == {"generation", "path", "chunk_size", "list_volumes", "list_snapshots",
                       "lun_size", "read", "write", "discard", "flush", "statfs",
                       "allocated_bytes"}
    for name in sorted(members):
        proto = vars(LunStore)[name]
        if isinstance(proto, property):
            assert name in ("generation", "path", "chunk_size")
            continue
        want = [(p.name, p.kind, p.default) for p in inspect.signature(proto).parameters.values()]
        got = [(p.name, p.kind, p.default)
               for p in inspect.signature(getattr(Pool, name)).parameters.values()]
        assert got == want, name


def test_pool_attributes_satisfy_the_properties(pool: Pool) -> None:
    store: LunStore = pool
    assert isinstance(store.generation, int)
    assert store.path == pool.path and store.chunk_size == 65536


# --------------------------------------------------------------------------- the tree


def test_inodes_are_stable_and_one_per_lun(pool: Pool) -> None:
    v = pool.create_volume("v", 4 * MiB)
    sid = _snapshot(pool, "v")
    pool.set_exposed(sid, "monday")
    view = MountView(pool, Presentation("here"))
    t = view.tree
    assert t.generation == pool.generation
    assert t.volumes[b"v.img"].ino == VOLUME_INO_BASE + v.id
    sino = t.shadow[f"{sid}.img".encode()].ino
    assert sino == snapshot_inode(sid) and sino & SNAP_INO_BIT
    assert t.exposed[b"monday.img"].ino == sino            # one LUN, one inode
    assert t.by_ino[sino].key == sid and t.by_ino[sino].snapshot
    # a new view (= a daemon restart) numbers everything the same
    again = MountView(pool, Presentation("here")).tree
    assert {i: lun.key for i, lun in again.by_ino.items()} == \
        {i: lun.key for i, lun in t.by_ino.items()}


def test_snapshot_inode_collisions_probe_in_creation_order(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    pool.create_volume("v", MiB)
    first, second = _snapshot(pool, "v"), _snapshot(pool, "v")
    monkeypatch.setattr(view_mod, "snapshot_inode", lambda sid: SNAP_INO_BIT | 7)
    t = MountView(pool).tree
    assert t.shadow[f"{first}.img".encode()].ino == SNAP_INO_BIT | 7
    assert t.shadow[f"{second}.img".encode()].ino == SNAP_INO_BIT | 8


def test_lookup_and_listing(pool: Pool) -> None:
    pool.create_volume("b", MiB)
    pool.create_volume("a", MiB)
    sid = _snapshot(pool, "a")
    view = MountView(pool)
    t = view.tree
    assert _names(view, ROOT_INO) == [b"volumes", b"exposed", b".shadow", b"hosts"]
    assert _names(view, VOLUMES_INO) == [b"b.img", b"a.img"]   # by inode: creation order
    assert _names(view, SHADOW_INO) == []                        # hidden
    assert _names(view, HOSTS_INO) == []                         # nobody else
    ino = view.lookup(t, SHADOW_INO, f"{sid}.img".encode()).ino  # exact name: found
    assert ino == snapshot_inode(sid)
    assert view.lookup(t, ROOT_INO, b"exposed").ino == EXPOSED_INO
    assert view.lookup(t, VOLUMES_INO, b".").ino == VOLUMES_INO
    assert view.lookup(t, VOLUMES_INO, b"..").ino == ROOT_INO
    assert _refused(view.lookup, t, ROOT_INO, b"nope") == errno.ENOENT
    assert _refused(view.lookup, t, SHADOW_INO, b"nope.img") == errno.ENOENT
    assert _refused(view.lookup, t, ino, b"x") == errno.ENOTDIR   # under a file
    assert _refused(view.lookup, t, 999, b"x") == errno.ENOENT
    assert _refused(view.lookup, t, HOSTS_INO, b"hostB") == errno.ENOENT
    view.opendir(t, SHADOW_INO)
    assert _refused(view.opendir, t, ino) == errno.ENOTDIR
    assert _refused(view.open_lun, t, VOLUMES_INO, False) == errno.EISDIR
    assert _refused(view.open_lun, t, ino, True) == errno.EROFS
    assert view.open_lun(t, ino, False).key == sid
    assert view.namespace_errno(VOLUMES_INO) == errno.EPERM
    assert view.namespace_errno(SHADOW_INO) == errno.EROFS
    assert view.namespace_errno(EXPOSED_INO) == errno.EROFS
    assert view.file_count(t) == 3 + 5


def test_attributes(pool: Pool) -> None:
    v = pool.create_volume("v", 4 * MiB)
    sid = _snapshot(pool, "v")
    view = MountView(pool)
    t = view.tree
    vs = view.lookup(t, VOLUMES_INO, b"v.img")
    assert stat.S_ISREG(vs.mode) and stat.S_IMODE(vs.mode) == 0o644
    # st_blocks: what the image really holds (du), not its size (issue 19 #3)
    assert vs.size == 4 * MiB and vs.blocks == 0 and vs.nlink == 1
    assert vs.blksize == 65536
    assert vs.mtime_ns == int(float(v.mtime or v.created) * 1e9)
    assert vs.entry_timeout == vs.attr_timeout == LUN_TIMEOUT
    ss = view.lookup(t, SHADOW_INO, f"{sid}.img".encode())
    assert stat.S_IMODE(ss.mode) == 0o444
    assert ss.blocks == 4 * MiB // 512   # a differential snapshot: its size (no file)
    pool.write("v", 0, b"x" * 200_000)
    pool.flush("v")   # held writes (copy-before-write) count once written back
    held = view.lookup(t, VOLUMES_INO, b"v.img").blocks * 512
    assert held >= 200_000 and held == pool.allocated_bytes("v")
    assert ss.mtime_ns == int(pool.snapshot(sid).created * 1e9)
    root = view.stat(ROOT_INO, t)
    assert stat.S_ISDIR(root.mode) and root.nlink == 6 and root.entry_timeout == DIR_TIMEOUT
    assert stat.S_IMODE(view.stat(SHADOW_INO, t).mode) == 0o711   # traversable, not listable
    assert root.mtime_ns == max(t.dir_mtime_ns.values())
    # a write through the mount moves the mtime; the size is read fresh on request
    view.write_mtime_ns[vs.ino] = 10**18
    pool.resize_volume("v", 8 * MiB)
    assert view.stat(vs.ino, t).size == 4 * MiB                  # cached
    fresh = view.stat(vs.ino, t, fresh_size=True)
    assert fresh.size == 8 * MiB and fresh.mtime_ns == 10**18
    assert _refused(view.stat, 12345, t) == errno.ENOENT


def test_vanished_entries_after_a_rebuild(pool: Pool) -> None:
    pool.create_volume("v", MiB)
    pool.create_volume("w", MiB)
    sid = _snapshot(pool, "v")
    pool.set_exposed(sid, "monday")
    view = MountView(pool)
    old = view.tree
    pool.delete_volume("w")
    pool.set_exposed(sid, "tuesday")
    new = view.rebuild(pool.generation)
    assert view.tree is new and new.generation == pool.generation
    assert sorted(view.vanished(old, new)) == [(VOLUMES_INO, b"w.img"),
                                               (EXPOSED_INO, b"monday.img")]
    assert view.vanished(new, view.rebuild(pool.generation)) == []


# --------------------------------------------------------------------------- masking


def test_presentation_update_replaces_and_notifies() -> None:
    p = Presentation("here")
    assert p.hosts_of("lun") == frozenset({"here"})   # default: the local host only
    seen: list[tuple[str, dict[str, frozenset[str]], frozenset[str]]] = []
    p.subscribe(lambda: seen.append((p.local_host, dict(p.presented), p.known_hosts)))
    presented = {"lun": frozenset({"hostB", "here"})}
    p.update("here", presented, ["hostA"])
    presented["other"] = frozenset({"hostC"})           # a copy was taken
    assert seen == [("here", {"lun": frozenset({"hostB", "here"})}, frozenset({"hostA"}))]
    assert p.hosts_of("lun") == frozenset({"hostB", "here"})
    assert p.other_hosts() == ["hostA", "hostB"]

    def broken() -> None:
        raise RuntimeError("the mount did not follow")
    p.subscribe(broken)
    with pytest.raises(RuntimeError):
        p.update("there", {}, ())
    assert p.local_host == "there" and p.presented == {} and p.known_hosts == frozenset()
    assert len(seen) == 2                                # notified before the failure


def test_masking_splits_the_local_and_the_other_hosts_views(pool: Pool) -> None:
    pool.create_volume("v", MiB)
    sid = _snapshot(pool, "v")
    pool.set_exposed(sid, "monday")
    p = Presentation("here")
    view = MountView(pool, p)
    p.subscribe(lambda: view.rebuild(pool.generation))
    p.update("here", {sid: frozenset({"hostB"})}, {"hostA"})
    t = view.tree
    img = f"{sid}.img".encode()
    assert _names(view, HOSTS_INO) == [b"hostA", b"hostB"]
    assert t.hosts == {b"hostA": HOST_INO_BASE, b"hostB": HOST_INO_BASE + 4}
    assert img not in t.shadow and b"monday.img" not in t.exposed    # not ours any more
    assert b"v.img" in t.volumes
    hb = view.lookup(t, HOSTS_INO, b"hostB").ino
    assert _names(view, hb) == [b"volumes", b"exposed", b".shadow"]
    shadow_b = view.lookup(t, hb, b".shadow").ino
    assert t.kind(shadow_b) == SHADOW_INO and _names(view, shadow_b) == []
    assert view.lookup(t, shadow_b, img).ino == snapshot_inode(sid)   # same inode
    assert view.namespace_errno(shadow_b) == errno.EROFS
    assert _names(view, view.lookup(t, hb, b"exposed").ino) == [b"monday.img"]
    assert _names(view, view.lookup(t, hb, b"volumes").ino) == []     # volumes: local
    ha = view.lookup(t, HOSTS_INO, b"hostA").ino
    assert _refused(view.lookup, t, ha + 3, img) == errno.ENOENT
    assert _refused(view.lookup, t, ha, b"nope") == errno.ENOENT
    # presented to the local host too: both views show it
    p.update("here", {sid: frozenset({"hostB", "here"})}, ())
    assert img in view.tree.shadow and list(view.tree.hosts) == [b"hostB"]
    # back to the default: a host seen again keeps its inode (this run)
    p.update("here", {}, {"hostB", "hostA"})
    t = view.tree
    assert img in t.shadow and t.hosts == {b"hostA": HOST_INO_BASE,
                                           b"hostB": HOST_INO_BASE + 4}
