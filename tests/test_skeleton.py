"""Skeleton checks: the installed console script, usage errors, and the kernel guard."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # .venv/bin when run via `make test`


def shadowplex(*args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / "shadowplex"
    assert exe.exists(), f"{exe} missing: the console script is not installed (run `make setup`)"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_version() -> None:
    res = shadowplex("--version")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"shadowplex \d+\.\d+\S*\n", res.stdout), res.stdout
    assert res.stdout.split()[1] == version("shadowplex")


@pytest.mark.parametrize("argv", [["nosuchcmd"], [], ["demo", "--bogus"]])
def test_usage_error_is_one_line_exit_2(argv: list[str]) -> None:
    res = shadowplex(*argv)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("shadowplex") and "error" in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.kernel
def test_demo_runs_end_to_end() -> None:
    """The README's first command: the whole product, verified, cleaned up."""
    res = subprocess.run([str(BIN / "shadowplex"), "demo"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith("-> PASS") and " 0 mismatches" in last, last
    m = re.search(r"database: (\d+) rows \(expected (\d+)\)", last)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, last
    assert "integrity_check ok" in last


def _run(*cmd: str) -> str:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()


@pytest.mark.kernel
def test_loop_ext4_roundtrip(tmp_path: Path) -> None:
    """Sparse image -> loop device -> ext4 -> mount -> write/read -> unmount -> detach."""
    image = tmp_path / "vol.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    assert image.stat().st_blocks == 0, "image should start fully sparse"
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    dev = _run("losetup", "--find", "--show", str(image))
    mounted = False
    try:
        assert dev.startswith("/dev/loop"), dev
        _run("mkfs.ext4", "-q", "-E", "nodiscard", dev)
        _run("mount", "-t", "ext4", dev, str(mnt))
        mounted = True
        payload = os.urandom(100_000)
        with open(mnt / "hello.bin", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # never os.sync(): it waits on every fs, incl. others' FUSE
        assert (mnt / "hello.bin").read_bytes() == payload
        _run("umount", str(mnt))
        mounted = False
        # Remount read-only and read it back from the filesystem, not the page cache.
        _run("mount", "-t", "ext4", "-o", "ro,noload", dev, str(mnt))
        mounted = True
        assert (mnt / "hello.bin").read_bytes() == payload
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False, timeout=60)
        subprocess.run(["losetup", "-d", dev], check=False, timeout=60)

    assert not os.path.ismount(mnt)
    listed = _run("losetup", "--list", "--noheadings", "--output", "BACK-FILE")
    assert str(image) not in listed.splitlines()
    assert 0 < image.stat().st_blocks * 512 < 16 * 1024 * 1024, "image should still be sparse"


def test_broken_pipe_is_quiet() -> None:
    """`shadowplex snapshot list | head`: the reader leaving is not an error to print."""
    code = ("import sys, tools.cli as c, tools.parser as p\n"
            "def boom(args):\n"
            "    raise BrokenPipeError(32, 'Broken pipe')\n"
            "p.cmd_status = boom   # what the parser dispatches to\n"
            "sys.exit(c.main(['status']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 141 and res.stderr == "", res.stderr
