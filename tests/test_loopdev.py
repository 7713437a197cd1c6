"""fuse_mount.loopdev against the real kernel, with plain sparse files (no pool)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_mount import loopdev

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def _sparse(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _mkfs(path: Path, fstype: str = "ext4") -> Path:
    if shutil.which(f"mkfs.{fstype}") is None:
        pytest.skip(f"mkfs.{fstype} not installed")
    args = ["-q", "-F"] if fstype.startswith("ext") else ["-q", "-f"]
    subprocess.run([f"mkfs.{fstype}", *args, str(path)], check=True, capture_output=True)
    return path


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Paths to unmount and loop devices to detach, whatever happens."""
    items: list[str] = []
    yield items
    for item in reversed(items):
        if item.startswith("/dev/loop"):
            if loopdev.backing_file(item) is not None:
                subprocess.run(["losetup", "-d", item], capture_output=True, check=False)
        elif loopdev.is_mountpoint(item):
            res = subprocess.run(["umount", item], capture_output=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", item], capture_output=True, check=False)


def test_attach_detach_and_backing_lookup(tmp_path: Path, cleanup: list[str]) -> None:
    img = _sparse(tmp_path / "a.img")
    dev = loopdev.attach(img, read_only=True)
    cleanup.append(dev)
    assert dev.startswith("/dev/loop")
    assert loopdev.loops_backed_by(img) == [dev]
    assert loopdev.backing_file(dev) == str(img)
    assert Path(f"/sys/block/{os.path.basename(dev)}/ro").read_text().strip() == "1"
    assert loopdev.fs_type(dev) is None
    assert (dev, str(img)) in loopdev.loops_under(tmp_path)
    loopdev.detach(dev)
    assert loopdev.loops_backed_by(img) == []


def test_attach_direct_io_and_rw(tmp_path: Path, cleanup: list[str]) -> None:
    img = _sparse(tmp_path / "b.img")
    dev = loopdev.attach(img, read_only=False, direct_io=True)
    cleanup.append(dev)
    assert Path(f"/sys/block/{os.path.basename(dev)}/ro").read_text().strip() == "0"
    loopdev.detach(dev)


def test_attach_missing_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(loopdev.LoopError, match="not a regular file") as ei:
        loopdev.attach(tmp_path / "nope.img", read_only=True)
    assert "\n" not in str(ei.value)


def test_fs_type_and_readonly_mount_options(tmp_path: Path, cleanup: list[str]) -> None:
    img = _mkfs(_sparse(tmp_path / "fs.img"))
    target = tmp_path / "mnt"
    target.mkdir()
    dev = loopdev.attach(img, read_only=True)
    cleanup.append(dev)
    assert loopdev.fs_type(dev) == "ext4"
    cleanup.append(str(target))
    assert loopdev.mount_readonly(dev, target) == "ext4"
    opts = next(line.split()[3] for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1] == str(target))
    assert "ro" in opts.split(",")
    with pytest.raises(OSError):
        (target / "x").write_text("no")
    loopdev.unmount(target)
    loopdev.detach(dev)


@pytest.mark.parametrize("case", ["missing", "file", "nonempty", "mountpoint"])
def test_mount_target_refusals_change_nothing(
    tmp_path: Path, cleanup: list[str], case: str
) -> None:
    img = _mkfs(_sparse(tmp_path / "fs.img"))
    target = tmp_path / "t"
    if case == "file":
        target.write_text("x")
    elif case == "nonempty":
        target.mkdir()
        (target / "f").write_text("x")
    elif case == "mountpoint":
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
        cleanup.append(str(target))
    with pytest.raises(loopdev.MountTargetError) as ei:
        loopdev.expose_mount(img, target)
    assert "\n" not in str(ei.value) and str(target) in str(ei.value)
    assert loopdev.loops_backed_by(img) == []      # nothing was attached


def test_expose_and_unexpose(tmp_path: Path, cleanup: list[str]) -> None:
    img = _mkfs(_sparse(tmp_path / "fs.img"))
    target = tmp_path / "exposed"
    target.mkdir()
    rec = loopdev.expose_mount(img, target)
    cleanup += [rec.dev, str(target)]
    assert rec.fstype == "ext4" and rec.mountpoint == str(target)
    assert loopdev.is_mountpoint(target)
    assert (target / "lost+found").is_dir()
    loopdev.unexpose_mount(rec)
    assert not loopdev.is_mountpoint(target)
    assert loopdev.loops_backed_by(img) == []


def test_unexpose_leaves_what_is_no_longer_ours(tmp_path: Path, cleanup: list[str]) -> None:
    """Our mount unmounted by hand and a tmpfs mounted there, our loop device detached and
    reused for another file: unexpose touches neither; a filesystem mounted over ours is
    refused, ours stays."""
    img = _mkfs(_sparse(tmp_path / "fs.img"))
    other = _sparse(tmp_path / "other.img")
    target = tmp_path / "exposed"
    target.mkdir()
    rec = loopdev.expose_mount(img, target)
    cleanup += [rec.dev, str(target), str(target)]   # up to two mounts stacked there
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)  # over ours
    with pytest.raises(loopdev.LoopError, match="mounted over"):
        loopdev.unexpose_mount(rec, "/fs.img")
    assert [src for mp, _, src in loopdev.mountinfo() if mp == str(target)] == [rec.dev,
                                                                                "tmpfs"]
    subprocess.run(["umount", str(target)], check=True)     # the tmpfs
    subprocess.run(["umount", str(target)], check=True)     # ours, by hand
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    loopdev.detach(rec.dev)
    dev = loopdev.attach(other, read_only=True)
    cleanup.append(dev)
    assert dev == rec.dev or loopdev.backing_file(rec.dev) is None
    loopdev.unexpose_mount(rec, "/fs.img")
    assert [src for mp, _, src in loopdev.mountinfo() if mp == str(target)] == ["tmpfs"]
    assert loopdev.backing_file(dev) == str(other)   # not detached: not ours any more
    subprocess.run(["umount", str(target)], check=True)
    loopdev.detach(dev)


def test_expose_without_filesystem_leaves_no_loop(tmp_path: Path) -> None:
    img = _sparse(tmp_path / "blank.img")
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(loopdev.NoFilesystemError):
        loopdev.expose_mount(img, target)
    assert loopdev.loops_backed_by(img) == []
    assert not loopdev.is_mountpoint(target)


def test_expose_mount_failure_detaches(tmp_path: Path) -> None:
    # A filesystem signature blkid recognises but mount cannot mount: a truncated ext4.
    img = _mkfs(_sparse(tmp_path / "broken.img"))
    with open(img, "r+b") as f:
        f.seek(1024 + 4)            # s_blocks_count_lo: claim a huge filesystem
        f.write((0xFFFFFFF0).to_bytes(4, "little"))
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(loopdev.LoopError):
        loopdev.expose_mount(img, target)
    assert loopdev.loops_backed_by(img) == []
    assert not loopdev.is_mountpoint(target)
