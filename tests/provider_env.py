"""Shared helpers for the provider tests that run the coordinator in this process
(test_provider_*.py, test_cancel.py, test_transport_unit.py, the concurrency soak);
tests/test_provider_support.py checks the helpers themselves.

* FakeWriter: a writer recording every event; can fail or hang in one of them.
* Env: a real Pool in tmp_path with a few volumes, and `env.run(fn)` which runs
  ``await fn(coordinator)`` on a fresh trio loop with a real WriteBarrier. With
  SHADOWPLEX_TEST_ARRAY=fake the array is tests/fake_array.FakeArray instead (in memory;
  it outlives a "restart" as an array outlives its host's daemon): the same suites then
  prove the provider needs nothing of the pool but the Array interface
  (tests/test_array_contract.py runs them so).
* ServerThread: the control server over an Env, on a trio loop in a thread.
* Raw: a raw protocol connection to it (no Client helpers).
* assert_no_trace(): what "an aborted set leaves nothing behind" means, checked on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from fake_array import FakeArray

from blockstore import Pool
from fuse_mount.barrier import WriteBarrier
from provider.coordinator import Coordinator
from provider.vss import VssError
from provider.writers import Component, FileSpec, Writer, WriterMetadata


class FakeWriter(Writer):
    """A Writer recording its events; ``fail`` names an event that raises, ``hang`` one
    that blocks until ``release`` is set (or 30 s). The coordinator groups such writers
    into a real WriterSet (order, rollback, status)."""

    def __init__(self, name: str = "fake", fail: str | None = None,
                 hang: str | None = None, error: BaseException | None = None) -> None:
        super().__init__(name, "test")
        self.fail = fail
        self.hang = hang
        self.error = error
        self.release = threading.Event()
        self.calls: list[tuple[str, Any]] = []
        self.frozen = False
        self._lock = threading.Lock()

    def _event(self, what: str, arg: Any = None) -> None:
        with self._lock:
            self.calls.append((what, arg))
        if self.hang == what:
            self.release.wait(30)
        if self.fail == what:
            raise self.error or RuntimeError(f"{self.name}: {what} failed on purpose")

    def identify(self) -> WriterMetadata:
        self._event("identify")
        return self._metadata([Component("db", "app", "database",
                                         [FileSpec("/x", "db")])])

    def involved(self, volumes: Sequence[str]) -> bool:
        return True

    def freeze(self, volumes: Sequence[str], timeout: float) -> None:
        self._event("freeze", list(volumes))
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            self._event("thaw")
        self.frozen = False

    def abort(self) -> None:
        self.frozen = False
        self._event("abort")

    def backup_complete(self, set_id: str, succeeded: bool) -> None:
        self._event("backup_complete", set_id)

    def events(self) -> list[str]:
        return [c for c, _ in self.calls]


class Env:
    """A pool with volumes, and a way to run the coordinator over it."""

    def __init__(self, tmp_path: Path, volumes: tuple[str, ...] = ("a", "b"),
                 size: int = 4 << 20, writers: tuple[Any, ...] = (),
                 config: dict[str, Any] | None = None) -> None:
        self.path = str(tmp_path / "pool")
        self.pool: Any
        if os.environ.get("SHADOWPLEX_TEST_ARRAY", "pool") == "fake":
            os.makedirs(self.path)
            self.pool = FakeArray(self.path)
        else:
            self.pool = Pool.create(self.path, chunk_size=65536)
        for v in volumes:
            self.pool.create_volume(v, size)
            self.pool.write(v, 0, v.encode() * 4096)   # some allocated data
        self.writers = list(writers)
        self.config = dict(config or {})
        self.coord: Coordinator | None = None

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, stop: bool = True,
            mountpoint: str | None = None) -> Any:
        async def main() -> Any:
            barrier = WriteBarrier(self.pool)
            coord = Coordinator(self.pool, barrier, mountpoint, self.writers, self.config)
            self.coord = coord
            await coord.start()
            try:
                return await fn(coord, *args)
            finally:
                if stop:
                    await coord.stop()
                else:   # a "crash": the catalog stays as it is
                    coord.catalog.close()
        return trio.run(main)

    def reopen(self) -> None:
        """Close and reopen the pool (a daemon restart)."""
        if isinstance(self.pool, Pool):
            self.pool.close()
            self.pool = Pool.open(self.path)

    def close(self) -> None:
        if isinstance(self.pool, Pool):
            self.pool.close()


def disk_state(pool: Any) -> dict[str, Any]:
    """Files of the pool's luns/ and allocated bytes of its diff areas (of a fake
    array: its LUNs and their allocated bytes)."""
    if not isinstance(pool, Pool):
        luns = [v.name for v in pool.list_volumes()] + [s.id for s in pool.list_snapshots()]
        return {"luns": sorted(luns), "diff_blocks": {},
                "diff_bytes": {v.name: v.diff_bytes for v in pool.list_volumes()}}
    luns = sorted(os.listdir(os.path.join(pool.path, "luns")))
    diff = {}
    ddir = os.path.join(pool.path, "diff")
    for fn in sorted(os.listdir(ddir)):
        if fn.endswith(".data"):
            diff[fn] = os.stat(os.path.join(ddir, fn)).st_blocks
    return {"luns": luns, "diff_blocks": diff,
            "diff_bytes": {v.name: v.diff_bytes for v in pool.list_volumes()}}


def assert_no_trace(env: Env, before: dict[str, Any], writers: tuple[FakeWriter, ...] = ()
                    ) -> None:
    pool = env.pool
    assert pool.list_snapshots() == []
    after = disk_state(pool)
    assert after["luns"] == before["luns"]
    assert all(b == 0 for b in after["diff_bytes"].values()), after
    for fn, blocks in after["diff_blocks"].items():
        assert blocks <= before["diff_blocks"].get(fn, 0), (fn, blocks, before)
    assert pool.check() == []
    coord = env.coord
    assert coord is not None
    assert coord.set_list() == []
    assert coord.catalog.sets() == {}
    assert coord._creating is None and coord._marks == {}
    for w in writers:
        assert not w.frozen, (w.name, w.calls)
        ev = w.events()
        if "freeze" in ev:
            assert "abort" in ev or "thaw" in ev, ev


def vss_name(exc_info: pytest.ExceptionInfo[VssError]) -> str:
    return exc_info.value.name


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class ServerThread:
    """The control server over an Env's pool, on a trio loop in a background thread
    (the test's client is synchronous, as the CLI is)."""

    def __init__(self, env: Env, socket_path: str, mode: int = 0o600) -> None:
        self.env = env
        self.socket_path = socket_path
        self.mode = mode
        self.coord: Coordinator | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from provider.control import ControlServer

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            barrier = WriteBarrier(self.env.pool)
            coord = Coordinator(self.env.pool, barrier, None, self.env.writers,
                                self.env.config)
            self.coord = self.env.coord = coord
            await coord.start()
            server = ControlServer(coord, self.socket_path, self.mode)
            try:
                await server.open()
                with trio.CancelScope() as self._scope:
                    async with trio.open_nursery() as n:
                        await n.start(server.serve)
                        self._ready.set()
            finally:
                await coord.stop()
        try:
            trio.run(main)
        except BaseException as e:   # noqa: BLE001 - reported by start()/stop()
            self.error = e
        finally:
            self._ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the trio thread (sync) and return its result."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(30)
        assert not self._thread.is_alive()


class Raw:
    """A raw protocol connection (no Client helpers)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            assert chunk, "server closed the connection"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def req(self, rid: Any, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.send(json.dumps({"id": rid, "op": op, "args": args or {}}).encode() + b"\n")
        return self.recv()

    def close(self) -> None:
        self.s.close()
