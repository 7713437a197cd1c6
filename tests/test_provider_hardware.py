"""The hardware provider (VSS hardware-provider methods) over a real Pool."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockstore import Pool
from blockstore import errors as bse
from provider import hardware
from provider.hardware import HardwareProvider
from provider.vss import Attr, Context, VssError

PLEX, DIFF = int(Attr.PLEX), int(Attr.DIFFERENTIAL)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(str(tmp_path / "pool"), chunk_size=65536)
    p.create_volume("a", 8 << 20)
    p.create_volume("b", 8 << 20)
    p.write("a", 0, b"A" * (1 << 20))
    p.write("b", 4 << 20, b"B" * 65536)
    yield p
    p.close()


@pytest.fixture
def hw(pool: Pool) -> HardwareProvider:
    return HardwareProvider(pool, "/mnt/spx")


def ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def test_are_luns_supported(hw: HardwareProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hw.AreLunsSupported(["a", "b"], 0)
    assert hw.AreLunsSupported(["a"], int(Context.NAS_ROLLBACK) | PLEX)
    assert hw.AreLunsSupported(["a"], int(Context.APP_ROLLBACK) | DIFF | int(Attr.TRANSPORTABLE))
    bad: list[Any] = [
        (["a"], DIFF | PLEX),                 # mutually exclusive
        (["a"], 0x1234),                      # not a context
        (["a"], int(Context.CLIENT_ACCESSIBLE)),
        (["nosuch"], 0),                      # not in the pool
        (["a", "a"], 0),
        ([], 0),
        (None, 0),                            # garbage: still no exception
        (["a"], "backup"),
    ]
    for vols, ctx in bad:
        assert hw.AreLunsSupported(vols, ctx) is False, (vols, ctx)
    monkeypatch.setattr(hw, "available_bytes", lambda: 100)
    assert not hw.AreLunsSupported(["a"], PLEX)               # no room for a full copy
    err = hw.why_not_supported(["a"], PLEX)
    assert err is not None and err.name == "VSS_E_INSUFFICIENT_STORAGE"
    assert hw.AreLunsSupported(["a"], DIFF)                   # differential needs no room
    assert hw.AreLunsSupported(["a"], 0)                      # automagic: differential


def test_fill_in_lun_info(hw: HardwareProvider, pool: Pool) -> None:
    info = hw.FillInLunInfo("a")
    assert info.naa == pool.volume("a").naa and info.size == 8 << 20
    assert info.device_path == "/mnt/spx/volumes/a.img" and info.volume == "a"
    assert info.to_json()["vendor"] == hardware.VENDOR
    with pytest.raises(bse.NotFound):
        hw.FillInLunInfo("zz")


def test_differential_sequence(hw: HardwareProvider, pool: Pool) -> None:
    set_id, s1 = ids()
    _, s2 = ids()
    info = hw.BeginPrepareSnapshot(set_id, s1, "a", int(Context.BACKUP))
    assert info.kind == "differential" and info.state == "preparing"
    assert info.attributes & DIFF and info.attributes & Attr.HARDWARE_ASSISTED
    hw.BeginPrepareSnapshot(set_id, s2, "b", DIFF)
    hw.EndPrepareSnapshots(set_id)
    hw.PreCommitSnapshots(set_id)
    t0 = time.monotonic()
    hw.CommitSnapshots(set_id)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(VssError) as ei:
        hw.PostCommitSnapshots(set_id, 3)
    assert ei.value.name == "VSS_E_BAD_STATE"
    hw.PostCommitSnapshots(set_id, 2)
    hw.PreFinalCommitSnapshots(set_id)
    hw.PostFinalCommitSnapshots(set_id)
    assert {s.state for s in pool.list_snapshots()} == {"committed"}
    luns = hw.GetTargetLuns([s1, s2])
    assert [lun.snapshot_id for lun in luns] == [s1, s2]
    assert luns[0].device_path == f"/mnt/spx/.shadow/{s1}.img"
    assert luns[0].naa != pool.volume("a").naa
    assert hw.LocateLuns([luns[1].naa.upper()])[0].snapshot_id == s2
    with pytest.raises(VssError) as ei:
        hw.LocateLuns(["0" * 32])
    assert ei.value.name == "VSS_E_OBJECT_NOT_FOUND"
    pool.write("a", 0, b"new")
    hw.ResyncLuns(s1)
    assert pool.read("a", 0, 3) == b"AAA"
    hw.OnLunEmpty(s1)
    hw.OnLunEmpty(s2)
    assert pool.list_snapshots() == []


def test_plex_syncs_in_background_with_progress(hw: HardwareProvider, pool: Pool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "SYNC_STEP", 256 << 10)
    pool.create_volume("big", 32 << 20)
    pool.write("big", 0, b"x" * (16 << 20))
    set_id, sid = ids()
    t0 = time.monotonic()
    info = hw.BeginPrepareSnapshot(set_id, sid, "big", PLEX)
    assert time.monotonic() - t0 < 2
    assert info.kind == "plex" and info.attributes & PLEX and not info.attributes & DIFF
    pool.write("big", 8 << 20, b"during sync")        # mirrored while syncing
    seen: list[tuple[int, int]] = []
    hw.EndPrepareSnapshots(set_id, lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] >= 16 << 20
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    hw.PreCommitSnapshots(set_id)
    hw.CommitSnapshots(set_id)
    pool.write("big", 8 << 20, b"after commit")
    assert pool.read(sid, 8 << 20, 11) == b"during sync"
    assert pool.read(sid, 0, 4) == b"xxxx"


def test_precommit_refuses_unsynced_plex(hw: HardwareProvider, pool: Pool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = pool.plex_sync_step

    def slow_step(sid: str, n: int) -> tuple[int, int]:
        gate.wait(10)
        return real(sid, n)
    monkeypatch.setattr(pool, "plex_sync_step", slow_step)
    set_id, sid = ids()
    hw.BeginPrepareSnapshot(set_id, sid, "a", PLEX)
    with pytest.raises(VssError) as ei:
        hw.PreCommitSnapshots(set_id)
    assert ei.value.name == "VSS_E_BAD_STATE"
    gate.set()
    hw.EndPrepareSnapshots(set_id)
    hw.PreCommitSnapshots(set_id)
    hw.AbortSnapshots(set_id)
    assert pool.list_snapshots() == []


@pytest.mark.parametrize("stage", ["syncing", "prepared", "committed", "final"])
def test_abort_at_any_point(hw: HardwareProvider, pool: Pool, stage: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "SYNC_STEP", 64 << 10)
    set_id, s1 = ids()
    _, s2 = ids()
    hw.BeginPrepareSnapshot(set_id, s1, "a", PLEX)
    hw.BeginPrepareSnapshot(set_id, s2, "b", DIFF)
    if stage != "syncing":
        hw.EndPrepareSnapshots(set_id)
        hw.PreCommitSnapshots(set_id)
    if stage in ("committed", "final"):
        hw.CommitSnapshots(set_id)
        pool.write("b", 4 << 20, b"cow")      # copy-before-write into the diff area
        assert pool.volume("b").diff_bytes > 0
    if stage == "final":
        hw.PostCommitSnapshots(set_id, 2)
        hw.PreFinalCommitSnapshots(set_id)
    removed = hw.AbortSnapshots(set_id)
    assert sorted(removed) == sorted([s1, s2])
    assert pool.list_snapshots() == []
    assert pool.volume("b").diff_bytes == 0
    assert hw.AbortSnapshots(set_id) == []                    # idempotent
    with pytest.raises(VssError) as ei:
        hw.EndPrepareSnapshots(set_id)
    assert ei.value.name == "VSS_E_OBJECT_NOT_FOUND"
    assert pool.check() == []


def test_sync_failure_is_reported(hw: HardwareProvider, pool: Pool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sid: str, n: int) -> tuple[int, int]:
        raise bse.SnapshotInvalid(f"plex {sid} failed while syncing: EIO")
    monkeypatch.setattr(pool, "plex_sync_step", broken)
    set_id, sid = ids()
    hw.BeginPrepareSnapshot(set_id, sid, "a", PLEX)
    with pytest.raises(bse.SnapshotInvalid):
        hw.EndPrepareSnapshots(set_id)
    hw.AbortSnapshots(set_id)
    assert pool.list_snapshots() == []


def test_end_prepare_wakes_up_on_abort(hw: HardwareProvider, pool: Pool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = pool.plex_sync_step

    def slow_step(sid: str, n: int) -> tuple[int, int]:
        gate.wait(10)
        return real(sid, n)
    monkeypatch.setattr(pool, "plex_sync_step", slow_step)
    set_id, sid = ids()
    hw.BeginPrepareSnapshot(set_id, sid, "a", PLEX)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            hw.EndPrepareSnapshots(set_id)
        except BaseException as e:   # noqa: BLE001 - checked by the main thread
            errors.append(e)
    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    aborter = threading.Thread(target=hw.AbortSnapshots, args=(set_id,))
    aborter.start()
    time.sleep(0.1)
    gate.set()
    aborter.join(10)
    t.join(10)
    assert not t.is_alive() and errors and isinstance(errors[0], VssError)
    assert pool.list_snapshots() == []


def test_automagic_policy(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    hw = HardwareProvider(pool, None, default_kind="plex")
    assert hw.choose_kind(0, ["a"]) == "plex"
    assert hw.choose_kind(DIFF, ["a"]) == "differential"
    monkeypatch.setattr(hw, "available_bytes", lambda: 0)
    assert hw.choose_kind(0, ["a"]) == "differential"        # no room: differential
    with pytest.raises(ValueError):
        HardwareProvider(pool, None, default_kind="mirror")
