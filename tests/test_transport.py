"""Transportable shadow copies through the real daemon (kernel): the seed sequence
"Importing Transportable Shadow Copied Volumes" with two host identities.

hostA runs an ext4 filesystem on a volume (the local view, MOUNT/volumes/) under a write
load, creates a TRANSPORTABLE set, exports its Backup Components Document; hostB imports
it (its LUNs appear at MOUNT/hosts/hostB/.shadow/<id>.img only), mounts it read-only,
backs it up with tar, deletes it; hostA ends the backup (the hook writer hears
backup-complete). Plus the refusals: twice, onto the origin, garbled, another pool's.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_provider_e2e import _stop, mounted_ext4, need, sockdir, start_daemon  # noqa: F401

from fuse_mount import loopdev
from provider.client import Client, ControlError

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_content(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (64 + n % 64)


def _refused(name: str, fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ControlError) as ei:
        fn(*args, **kw)
    assert ei.value.name == name, (ei.value.name, ei.value.message)
    assert "\n" not in ei.value.message
    return ei.value.message


def test_transport_seed_sequence(tmp_path: Path, sockdir: str) -> None:  # noqa: F811
    need("mkfs.ext4")
    need("tar")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    trace = tmp_path / "hook.log"
    hook = hooks / "10-trace"
    hook.write_text(f"#!/bin/sh\necho \"$1 $SHADOWPLEX_SET_ID\" >> {trace}\nexit 0\n")
    hook.chmod(0o755)
    d = start_daemon(tmp_path, sockdir, {"data": 64 * MiB},
                     {"hooks_dir": str(hooks), "hook_timeout": 20})
    fs_a = tmp_path / "a"
    fs_b = tmp_path / "b"
    fs_b.mkdir()
    stop = threading.Event()
    snapped = threading.Event()
    errors: list[BaseException] = []
    rec = None
    try:
        with mounted_ext4(os.path.join(d.mount, "volumes", "data.img"), fs_a):
            static = fs_a / "static"
            static.mkdir()
            pit: dict[str, str] = {}
            for i in range(16):
                p = static / f"f{i:02d}.bin"
                with open(p, "wb") as f:
                    f.write(os.urandom(4096 * (i + 1)))
                    os.fsync(f.fileno())
                pit[p.name] = _sha(p)
            (fs_a / "load").mkdir()

            def load() -> None:   # hostA keeps writing during and after the snapshot
                try:
                    n = 0
                    while not stop.is_set():
                        with open(fs_a / "load" / f"{n:05d}.dat", "wb") as f:
                            f.write(_load_content(n))
                            os.fsync(f.fileno())
                        if snapped.is_set():   # and rewrites the snapshotted files
                            p = static / f"f{n % 16:02d}.bin"
                            with open(p, "r+b") as f:
                                f.write(os.urandom(4096))
                                os.fsync(f.fileno())
                        n += 1
                except BaseException as e:
                    errors.append(e)

            loader = threading.Thread(target=load)
            loader.start()
            try:
                with Client(d.socket, host="hostA") as a, Client(d.socket, host="hostB") as b:
                    created = a.snapshot_create(["data"], context="backup",
                                                attributes="transportable",
                                                kind="differential")
                    set_id = created["set_id"]
                    snap = created["snapshots"][0]
                    sid = snap["snapshot_id"]
                    snapped.set()
                    assert snap["presented_to"] == ["hostA"]
                    assert snap["device_object"] == os.path.join(
                        d.mount, "hosts", "hostA", ".shadow", f"{sid}.img")
                    assert "TRANSPORTABLE" in snap["attribute_names"]

                    exported = a.export(set_id)
                    doc_file = tmp_path / "set.xml"
                    doc_file.write_text(exported["document"])
                    assert "<BACKUP_COMPONENTS" in exported["document"]
                    assert snap["naa"].lower() in exported["document"].lower()
                    assert [w["name"] for w in exported["writers"]]

                    # onto its origin host: refused, nothing surfaced
                    msg = _refused("VSS_E_BAD_STATE", a.import_set, doc_file.read_text())
                    assert "hostA" in msg
                    assert not os.path.exists(
                        os.path.join(d.mount, "hosts", "hostB", ".shadow", f"{sid}.img"))

                    imported = b.import_set(doc_file.read_text())
                    assert imported["set_id"] == set_id and imported["origin"] == "hostA"
                    isnap = imported["snapshots"][0]
                    dev_b = os.path.join(d.mount, "hosts", "hostB", ".shadow", f"{sid}.img")
                    assert isnap["device_object"] == dev_b
                    assert "IMPORTED" in isnap["attribute_names"]
                    assert isnap["presented_to"] == ["hostB"]
                    # hostB only, hidden, read-only
                    assert os.path.exists(dev_b)
                    assert os.listdir(os.path.join(d.mount, "hosts", "hostB", ".shadow")) == []
                    assert not os.path.exists(os.path.join(d.mount, ".shadow", f"{sid}.img"))
                    assert not os.path.exists(
                        os.path.join(d.mount, "hosts", "hostA", ".shadow", f"{sid}.img"))
                    assert "hostB" in os.listdir(os.path.join(d.mount, "hosts"))
                    with pytest.raises(OSError):
                        os.open(dev_b, os.O_RDWR)
                    # twice: refused
                    _refused("VSS_E_OBJECT_ALREADY_EXISTS", b.import_set, doc_file.read_text())

                    # hostB mounts it read-only (its own view's device path) and backs up
                    rec = loopdev.expose_mount(dev_b, fs_b)
                    tarball = tmp_path / "backup.tar"
                    subprocess.run(["tar", "-C", str(fs_b), "-cf", str(tarball), "."],
                                   check=True, timeout=120)
                    loopdev.unexpose_mount(rec)
                    rec = None
                    restore = tmp_path / "restore"
                    restore.mkdir()
                    subprocess.run(["tar", "-C", str(restore), "-xf", str(tarball)],
                                   check=True, timeout=120)
                    got = {p.name: _sha(p) for p in (restore / "static").iterdir()}
                    assert got == pit
                    for p in (restore / "load").iterdir():   # each one complete, or the
                        content = _load_content(int(p.stem))   # one being written: a prefix
                        assert content.startswith(p.read_bytes()), p.name
                    # meanwhile hostA kept writing: its live files moved on
                    live = {p.name: _sha(p) for p in static.iterdir()}
                    assert live != pit

                    deleted = b.snapshot_delete(set_id=set_id)
                    assert deleted["deleted"] == [sid]
                    assert not os.path.exists(dev_b)
                    stop.set()
                    loader.join(60)
                    res = a.end_backup(set_id)
                    assert res["set_id"] == set_id
                    assert any("hook" in w for w in res["writers_notified"]), res
                    assert f"backup-complete {set_id}" in trace.read_text()
                    assert a.snapshot_list() == []
            finally:
                stop.set()
                loader.join(60)
        assert not errors, errors
    finally:
        if rec is not None:
            loopdev.unexpose_mount(rec)
        _stop(d)


def test_import_refusals_plex_and_lifetimes(tmp_path: Path, sockdir: str) -> None:  # noqa: F811
    d = start_daemon(tmp_path, sockdir, {"v": 8 * MiB}, {"fsfreeze": False})
    vol = os.path.join(d.mount, "volumes", "v.img")
    try:
        old = os.urandom(8 * MiB)
        with open(vol, "r+b") as f:
            f.write(old)
            os.fsync(f.fileno())
        with Client(d.socket, host="hostA") as a:
            pool_id = a.server["pool_id"]
            plain = a.snapshot_create(["v"], context="app-rollback")
            _refused("VSS_E_NONTRANSPORTABLE_BCD", a.export, plain["set_id"])
            a.snapshot_delete(set_id=plain["set_id"])

            # a persistent PLEX transportable set: independent of its origin
            made = a.snapshot_create(["v"], context="app-rollback",
                                     attributes="transportable", kind="plex")
            set_id, sid = made["set_id"], made["snapshots"][0]["snapshot_id"]
            doc = a.export(set_id)["document"]
            with open(vol, "r+b") as f:
                f.write(os.urandom(8 * MiB))
                os.fsync(f.fileno())

            def nothing_surfaced() -> None:
                s = a.snapshot_show(snapshot_id=sid)
                assert s["presented_to"] == ["hostA"] and s["imported_by"] is None
                assert "IMPORTED" not in s["attribute_names"]
                assert not os.path.exists(
                    os.path.join(d.mount, "hosts", "hostB", ".shadow", f"{sid}.img"))

            with Client(d.socket, host="hostB") as b:
                # garbled / truncated
                _refused("VSS_E_INVALID_XML_DOCUMENT", b.import_set, doc[: len(doc) // 2])
                _refused("VSS_E_INVALID_XML_DOCUMENT", b.import_set, "<x>" + doc)
                # hostile: billion laughs, XXE, external DTD
                laughs = ('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
                          '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                          '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
                          '<BACKUP_COMPONENTS>&c;</BACKUP_COMPONENTS>')
                xxe = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM '
                       '"file:///etc/passwd">]><BACKUP_COMPONENTS>&e;</BACKUP_COMPONENTS>')
                ext = ('<?xml version="1.0"?><!DOCTYPE x SYSTEM "http://example.invalid/x.dtd">'
                       '<BACKUP_COMPONENTS/>')
                for bad in (laughs, xxe, ext, "", "not xml at all"):
                    _refused("VSS_E_INVALID_XML_DOCUMENT", b.import_set, bad)
                # another pool's LUNs
                other = re.sub(pool_id, "0123456789abcdef0123456789abcdef", doc, flags=re.I)
                assert other != doc
                _refused("VSS_E_NO_SNAPSHOTS_IMPORTED", b.import_set, other)
                # a set this pool does not have (another set id)
                foreign = doc.replace(set_id, "11111111-2222-4333-8444-555555555555")
                with pytest.raises(ControlError):
                    b.import_set(foreign)
                nothing_surfaced()

                imp = b.import_set(doc)
                dev_b = imp["snapshots"][0]["device_object"]
                with open(dev_b, "rb") as f:
                    assert f.read() == old
            # persistent: survives hostB's session; explicit delete
            s = a.snapshot_show(snapshot_id=sid)
            assert s["imported_by"] == "hostB" and "IMPORTED" in s["attribute_names"]
            with Client(d.socket, host="hostB") as b:
                assert b.snapshot_delete(set_id=set_id)["count"] == 1

            # auto-release: deleted when the importing session ends
            made = a.snapshot_create(["v"], context="backup", attributes="transportable")
            doc = a.export(made["set_id"])["document"]
            with Client(d.socket, host="hostB") as b:
                b.import_set(doc)
            deadline = time.monotonic() + 20   # the daemon notices the disconnect
            while a.snapshot_list():
                assert time.monotonic() < deadline, d.log_text()
                time.sleep(0.05)
            # and a set that is gone cannot be imported
            with Client(d.socket, host="hostB") as b:
                _refused("VSS_E_NO_SNAPSHOTS_IMPORTED", b.import_set, doc)
        with pytest.raises(ControlError) as ei:
            Client(d.socket, host="bad host!")
        assert ei.value.name == "E_INVALIDARG"
    finally:
        _stop(d)


def test_cli_export_import_and_script(tmp_path: Path, sockdir: str,  # noqa: F811
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cli import main
    from tools.script import run_script_file
    d = start_daemon(tmp_path, sockdir, {"v": 8 * MiB}, {"fsfreeze": False})
    try:
        with Client(d.socket, host="hostA") as a:
            plain = a.snapshot_create(["v"], context="app-rollback")
            made = a.snapshot_create(["v"], context="app-rollback",
                                     attributes="transportable")
            set_id, sid = made["set_id"], made["snapshots"][0]["snapshot_id"]
            out = tmp_path / "set.xml"
            base = ["--socket", d.socket]
            assert main(["export", plain["set_id"], "-o", str(out), *base]) == 1
            assert "VSS_E_NONTRANSPORTABLE_BCD" in capsys.readouterr().err
            assert not out.exists()
            assert main(["export", set_id, "-o", str(out), *base]) == 0
            assert "<BACKUP_COMPONENTS" in out.read_text()
            assert main(["export", set_id, "-o", str(out), *base]) == 2   # exists
            assert "--force" in capsys.readouterr().err
            assert main(["export", set_id, "-o", str(out), "--force", *base]) == 0
            assert main(["import", str(out), "--host", "hostA", *base]) == 1
            assert "VSS_E_BAD_STATE" in capsys.readouterr().err
            assert main(["import", str(out), "--host", "hostC", *base]) == 0
            assert a.snapshot_show(snapshot_id=sid)["presented_to"] == ["hostC"]
            assert main(["import", str(out), "--host", "hostD", *base]) == 1
            assert "already imported on host hostC" in capsys.readouterr().err
            a.snapshot_delete(set_id=set_id)

            # the script verbs: load metadata + import, then use the aliases
            made = a.snapshot_create(["v"], context="app-rollback",
                                     attributes="transportable")
            out2 = tmp_path / "set2.xml"
            assert main(["export", made["set_id"], "-o", str(out2), *base]) == 0
            script = tmp_path / "import.dsh"
            dev = os.path.join(d.mount, "hosts", "hostS", ".shadow")
            script.write_text(f"load metadata {out2}\nimport\n"
                              f"exec test -r {dev}/%VSS_SHADOW_1%.img\n"
                              "delete shadows set %VSS_SHADOW_SET%\n")
            assert run_script_file(str(script), socket=d.socket, quiet=True,
                                   host="hostS") == 0, capsys.readouterr().err
            assert a.snapshot_list(set_id=made["set_id"]) == []
            a.snapshot_delete(set_id=plain["set_id"])
    finally:
        _stop(d)


def test_imported_persistent_set_survives_restart(tmp_path: Path,
                                                  sockdir: str) -> None:  # noqa: F811
    d = start_daemon(tmp_path, sockdir, {"v": 4 * MiB}, {"fsfreeze": False})
    try:
        with Client(d.socket, host="hostA") as a:
            made = a.snapshot_create(["v"], context="nas-rollback",
                                     attributes="transportable")
            set_id, sid = made["set_id"], made["snapshots"][0]["snapshot_id"]
            doc = a.export(set_id)["document"]
        with Client(d.socket, host="hostB") as b:
            b.import_set(doc)
    finally:
        _stop(d)
    d = start_daemon(tmp_path, sockdir, {}, {"fsfreeze": False})
    try:
        dev_b = os.path.join(d.mount, "hosts", "hostB", ".shadow", f"{sid}.img")
        assert os.path.getsize(dev_b) == 4 * MiB
        assert not os.path.exists(os.path.join(d.mount, ".shadow", f"{sid}.img"))
        with Client(d.socket, host="hostB") as b:
            s = b.snapshot_show(snapshot_id=sid)
            assert s["device_object"] == dev_b and "IMPORTED" in s["attribute_names"]
            _refused("VSS_E_OBJECT_ALREADY_EXISTS", b.import_set, doc)
            b.snapshot_delete(set_id=set_id)
        assert not os.path.exists(dev_b)
    finally:
        _stop(d)
