"""Transportable shadow copies through the real daemon (kernel): the seed sequence
"Importing Transportable Shadow Copied Volumes" with two host identities.

hostA runs an ext4 filesystem on its volume -- presented to hostA only, so it is
MOUNT/hosts/hostA/volumes/data.img -- under a write load, creates a TRANSPORTABLE set
(fsfreeze freezes the filesystem through hostA's view), exports its Backup Components
Document; hostB imports it (its LUNs appear at MOUNT/hosts/hostB/.shadow/<id>.img only),
mounts it read-only, backs it up with tar, deletes it; hostA ends the backup (the hook
writer hears backup-complete). Plus: volume LUN masking, the refusals (twice, onto the
origin, garbled, another pool's, foreign naa ids), plex independence, documents over
1 MiB and over the 16 MiB cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from harness import start_daemon
from support import mounted_ext4, need

from fuse_mount import loopdev
from provider import documents
from provider.client import Client, ControlError

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_content(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (64 + n % 64)


def _gone(path: str, timeout: float = 5.0) -> bool:
    """True once ``path`` no longer resolves. A name that went away through the API
    (delete, LUN masking) may stay in the kernel's dentry cache until the daemon's
    asynchronous invalidation lands or its 1 s entry timeout ends."""
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _with_naa(doc: str, old: str, new: str) -> str:
    """``doc`` with the LUN id ``old`` replaced by ``new``: serialNumber and the page-83
    descriptor (deviceIdentification), so the document stays self-consistent."""
    out = re.sub(old, new.lower(), doc, flags=re.I)
    out = out.replace(documents._storage_device_id(old.lower()),
                      documents._storage_device_id(new.lower()))
    assert out != doc and old.lower() not in out.lower()
    documents.parse_backup_components(out.encode(), pool_id=re.search(
        r'poolId="([0-9a-f]{32})"', doc).group(1))   # type: ignore[union-attr]
    return out


def _with_components(doc: str, n: int, name_len: int = 200) -> str:
    """``doc`` with one more writer listing ``n`` components (a writer with many files):
    a valid Backup Components Document of any size."""
    comps = "".join(f'<COMPONENT logicalPath="bulk\\{i:06d}" componentName="'
                    f'{"f" * name_len}-{i:06d}" componentType="filegroup" />'
                    for i in range(n))
    wc = (f'<WRITER_COMPONENTS instanceId="{uuid.uuid4()}" writerId="{uuid.uuid4()}" '
          f'instanceName="bulk" backupSchema="0">{comps}</WRITER_COMPONENTS>')
    i = doc.index("<SNAPSHOT_SET_DESCRIPTION")
    return doc[:i] + wc + doc[i:]


def _refused(name: str, fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ControlError) as ei:
        fn(*args, **kw)
    assert ei.value.name == name, (ei.value.name, ei.value.message)
    assert "\n" not in ei.value.message
    return ei.value.message


def test_transport_seed_sequence(tmp_path: Path, sockdir: str) -> None:
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
        with Client(d.socket, host="hostA") as adm:   # hostA's LUN, masked to hostA
            vol = adm.volume_present("data", ["hostA"])
        vol_a = os.path.join(d.mount, "hosts", "hostA", "volumes", "data.img")
        assert vol["presented_to"] == ["hostA"] and vol["path"] == vol_a
        assert os.listdir(os.path.join(d.mount, "volumes")) == []
        with mounted_ext4(vol_a, fs_a) as dev_a:
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
                except BaseException as e:   # noqa: BLE001 - re-raised by the main thread
                    errors.append(e)

            loader = threading.Thread(target=load)
            loader.start()
            try:
                with Client(d.socket, host="hostA") as a, Client(d.socket, host="hostB") as b:
                    # by hostA's device: a loop device on hostA's view of the volume
                    created = a.snapshot_create([dev_a], context="backup",
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
                    assert snap["volume"] == "data" and snap["original_volume_name"] == vol_a
                    # fsfreeze froze hostA's filesystem, found through hostA's view
                    assert f"froze {fs_a} " in d.log_text()

                    exported = a.export(set_id)
                    doc_file = tmp_path / "set.xml"
                    doc_file.write_text(exported["document"])
                    assert "<BACKUP_COMPONENTS" in exported["document"]
                    assert snap["naa"].lower() in exported["document"].lower()
                    assert [w["name"] for w in exported["writers"]]
                    wmd = {w["name"]: w["document"] for w in exported["writers"]}
                    assert f'path="{fs_a}"' in wmd["fsfreeze"], wmd.keys()

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
                    assert _gone(dev_b)
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
        d.stop()


def test_import_refusals_plex_and_lifetimes(tmp_path: Path, sockdir: str) -> None:
    d = start_daemon(tmp_path, sockdir, {"v": 8 * MiB, "w": MiB}, {"fsfreeze": False})
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
                assert os.path.exists(
                    os.path.join(d.mount, "hosts", "hostA", ".shadow", f"{sid}.img"))
                assert all(x["imported_by"] is None for x in a.snapshot_list())

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
                # this pool's id, but a LUN id (naa) that is not the snapshot's: a foreign
                # LUN, an edited document, another LUN of this pool. The page-83
                # descriptor is edited along, so only the array can tell.
                snap = made["snapshots"][0]
                w_naa = next(v["naa"] for v in a.volume_list() if v["name"] == "w")
                foreign_naa = "6" + uuid.uuid4().hex[1:]
                for old_naa, new_naa in ((snap["naa"], foreign_naa),
                                         (snap["origin_naa"], foreign_naa),
                                         (snap["naa"], w_naa)):
                    edited = _with_naa(doc, old_naa, new_naa)
                    msg = _refused("VSS_E_NO_SNAPSHOTS_IMPORTED", b.import_set, edited)
                    assert new_naa.lower() in msg and "nothing imported" in msg, msg
                    nothing_surfaced()
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
        d.stop()


def test_cli_export_import_and_script(tmp_path: Path, sockdir: str,
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
        d.stop()


def test_imported_persistent_set_survives_restart(tmp_path: Path,
                                                  sockdir: str) -> None:
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
        d.stop()
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
        assert _gone(dev_b)
    finally:
        d.stop()


def test_volume_lun_masking(tmp_path: Path, sockdir: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """volume.present (CLI `volume present NAME --to HOST ...`): a volume presented to
    hostA only is MOUNT/hosts/hostA/volumes/<name>.img and gone from the root; to hostA
    and hostB, in both views; kept across a restart; bad requests change nothing."""
    from tools.cli import main
    d = start_daemon(tmp_path, sockdir, {"v": 4 * MiB, "w": 4 * MiB}, {"fsfreeze": False})
    root_v = os.path.join(d.mount, "volumes", "v.img")

    def view(host: str) -> str:
        return os.path.join(d.mount, "hosts", host, "volumes", "v.img")

    def names(host: str | None = None) -> list[str]:
        where = (os.path.join(d.mount, "volumes") if host is None
                 else os.path.join(d.mount, "hosts", host, "volumes"))
        return sorted(os.listdir(where))

    def presented(c: Client) -> list[str]:
        return next(v for v in c.volume_list() if v["name"] == "v")["presented_to"]

    base = ["--socket", d.socket]
    data = os.urandom(MiB)
    try:
        with Client(d.socket, host="hostA") as a:
            local = a.server["service_machine"]
            assert presented(a) == [local]
            assert names() == ["v.img", "w.img"] and names("hostA") == []

            res = a.volume_present("v", ["hostA"])
            assert res["presented_to"] == ["hostA"] and res["path"] == view("hostA")
            assert names() == ["w.img"] and names("hostA") == ["v.img"]
            assert _gone(root_v)
            assert "hostB" not in os.listdir(os.path.join(d.mount, "hosts"))
            fd = os.open(view("hostA"), os.O_RDWR)   # hostA uses it read-write
            try:
                os.pwrite(fd, data, 0)
                os.fsync(fd)
                assert main(["volume", "present", "v", "--to", "hostA", "--to", "hostB",
                             "--json", *base]) == 0
                assert json.loads(capsys.readouterr().out)["presented_to"] == ["hostA",
                                                                                "hostB"]
                assert names() == ["w.img"]
                assert names("hostA") == ["v.img"] and names("hostB") == ["v.img"]
                assert os.stat(view("hostA")).st_ino == os.stat(view("hostB")).st_ino
                with open(view("hostB"), "rb") as f:
                    assert f.read(MiB) == data
                # hostA's name goes; its open file goes on (one LUN, one inode)
                a.volume_present("v", ["hostB"])
                assert names("hostA") == [] and _gone(view("hostA"))
                assert os.pread(fd, 4096, 0) == data[:4096]
            finally:
                os.close(fd)

            # refusals: one line, nothing changed
            sid = a.snapshot_create(["w"], context="app-rollback")["snapshots"][0][
                "snapshot_id"]
            for name, target, hosts in (("VSS_E_OBJECT_NOT_FOUND", "nosuch", ["hostA"]),
                                        ("E_INVALIDARG", "v", []),
                                        ("E_INVALIDARG", "v", ["bad host!"]),
                                        ("VSS_E_VOLUME_NOT_SUPPORTED", sid, ["hostA"])):
                _refused(name, a.volume_present, target, hosts)
            assert presented(a) == ["hostB"] and names() == ["w.img"]
            with pytest.raises(SystemExit) as ex:   # --to is required: a usage error
                main(["volume", "present", "v", *base])
            assert ex.value.code == 2 and "--to" in capsys.readouterr().err
            assert main(["volume", "present", "nosuch", "--to", "hostA", *base]) == 1
            err = capsys.readouterr().err
            assert "VSS_E_OBJECT_NOT_FOUND" in err and err.count("\n") == 1
    finally:
        d.stop()
    d = start_daemon(tmp_path, sockdir, {}, {"fsfreeze": False})   # persisted
    try:
        assert names() == ["w.img"] and names("hostB") == ["v.img"]
        with open(view("hostB"), "rb") as f:
            assert f.read(MiB) == data
        with Client(d.socket, host="hostA") as a:
            res = a.volume_present("v", [local])   # back to the daemon's own host
            assert res["presented_to"] == [local] and res["path"] == root_v
            assert names() == ["v.img", "w.img"]
            assert _gone(view("hostB"))
    finally:
        d.stop()


def test_plex_transportable_is_independent(tmp_path: Path, sockdir: str) -> None:
    """A plex transportable set imported on hostB holds its own full copy: hostA
    rewrites every byte of the origin and the origin's diff area stays empty (where a
    differential snapshot must keep the old data: the control half shows the check
    tells them apart), while hostB reads the point in time."""
    d = start_daemon(tmp_path, sockdir, {"v": 8 * MiB}, {"fsfreeze": False})
    vol = os.path.join(d.mount, "volumes", "v.img")

    def rewrite() -> bytes:
        data = os.urandom(8 * MiB)
        with open(vol, "r+b") as f:
            f.write(data)
            os.fsync(f.fileno())
        return data

    def diff_bytes(c: Client) -> int:
        return int(next(v for v in c.volume_list() if v["name"] == "v")["diff_bytes"])

    def sha_of(path: str) -> str:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    try:
        pit = hashlib.sha256(rewrite()).hexdigest()
        with Client(d.socket, host="hostA") as a, Client(d.socket, host="hostB") as b:
            made = a.snapshot_create(["v"], context="app-rollback",
                                     attributes="transportable", kind="plex")
            set_id = made["set_id"]
            assert made["snapshots"][0]["kind"] == "plex"
            dev_b = b.import_set(a.export(set_id)["document"])["snapshots"][0][
                "device_object"]
            rewrite()
            live = hashlib.sha256(rewrite()).hexdigest()
            assert sha_of(vol) == live != pit
            assert diff_bytes(a) == 0   # nothing of the old data went to the diff area
            assert sha_of(dev_b) == pit
            assert a.check()["ok"]
            b.snapshot_delete(set_id=set_id)

            # the control: a differential one keeps its point in time in the diff area
            made = a.snapshot_create(["v"], context="app-rollback",
                                     attributes="transportable", kind="differential")
            dev_b = b.import_set(a.export(made["set_id"])["document"])["snapshots"][0][
                "device_object"]
            rewrite()
            assert diff_bytes(a) >= 8 * MiB
            assert sha_of(dev_b) == live
            b.snapshot_delete(set_id=made["set_id"])
    finally:
        d.stop()


def test_documents_over_1_mib_and_the_16_mib_cap(
        tmp_path: Path, sockdir: str) -> None:
    """A Backup Components Document of a few MiB (a writer with many components) is
    imported over the control socket; one over 16 MiB is refused, by the daemon and by
    the client, with a clear error and nothing imported."""
    d = start_daemon(tmp_path, sockdir, {"v": MiB}, {"fsfreeze": False})
    try:
        with Client(d.socket, host="hostA") as a, Client(d.socket, host="hostB") as b:
            made = a.snapshot_create(["v"], context="app-rollback",
                                     attributes="transportable")
            set_id, sid = made["set_id"], made["snapshots"][0]["snapshot_id"]
            doc = a.export(set_id)["document"]
            huge = _with_components(doc, 4 * 8192)   # ~ 8 MiB of JSON on the wire
            over = huge + "<!--" + "x" * (documents.MAX_DOCUMENT_BYTES - len(huge)) + "-->"
            assert len(over.encode()) > documents.MAX_DOCUMENT_BYTES
            for call in (lambda: b.call("import", {"document": over}),   # the daemon
                         lambda: b.import_set(over)):                     # the client
                msg = _refused("VSS_E_INVALID_XML_DOCUMENT", call)
                assert "16 MiB" in msg, msg
            assert a.snapshot_show(snapshot_id=sid)["imported_by"] is None

            big = _with_components(doc, 6000)
            assert 1 * MiB < len(big.encode()) < 2 * MiB
            imp = b.import_set(big)
            assert imp["snapshots"][0]["snapshot_id"] == sid
            assert os.path.exists(imp["snapshots"][0]["device_object"])
            b.snapshot_delete(set_id=set_id)
            with pytest.raises(ControlError) as ei:   # other ops stay within 1 MiB
                b.call("status", {"pad": "x" * (2 * MiB)})
            assert ei.value.name == "E_INVALIDARG" and "1 MiB" in ei.value.message
            assert b.status()["sessions"] == 2   # the session goes on
    finally:
        d.stop()


def test_freeze_follows_a_volume_presented_away(
        tmp_path: Path, sockdir: str) -> None:
    """A filesystem mounted from MOUNT/volumes/v.img before v was presented to hostA
    only (its loop device now reports "... (deleted)") is still frozen for a snapshot
    of v, and v cannot be deleted under it."""
    need("mkfs.ext4")
    d = start_daemon(tmp_path, sockdir, {"v": 32 * MiB}, {})
    fs = tmp_path / "fs"
    try:
        with mounted_ext4(os.path.join(d.mount, "volumes", "v.img"), fs) as dev:
            (fs / "x").write_bytes(b"x" * 4096)
            with Client(d.socket, host="hostA") as a:
                a.volume_present("v", ["hostA"])
                back = Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
                deadline = time.monotonic() + 5   # once the kernel dropped the name
                while not back.read_text().strip().endswith(" (deleted)"):
                    assert time.monotonic() < deadline, back.read_text()
                    time.sleep(0.05)
                made = a.snapshot_create(["v"], context="app-rollback")
                assert f"froze {fs} " in d.log_text()
                _refused("VSS_E_VOLUME_IN_USE", a.volume_delete, "v")
                a.snapshot_delete(set_id=made["set_id"])
    finally:
        d.stop()
