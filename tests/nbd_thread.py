"""An NbdServer (nbd/server.py) on 127.0.0.1 in a trio loop of its own thread: the
in-process NBD port of tests/test_nbd_wire.py and tests/test_pki_nbd.py (no kernel)."""

from __future__ import annotations

import threading

import trio

from nbd.server import NbdServer


class NbdThread:
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.port = 0
        self.errors: list[BaseException] = []
        self._up = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.thread = threading.Thread(target=self._run, name="nbd", daemon=True)
        self.thread.start()
        assert self._up.wait(10), "the server did not start"

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as cs:
                self._cancel = cs
                async with trio.open_nursery() as n:
                    listeners = await n.start(self.server.serve, "127.0.0.1", 0)
                    self.port = listeners[0].socket.getsockname()[1]
                    self._up.set()
        try:
            trio.run(main)
        except BaseException as e:   # noqa: BLE001 - reported by stop()
            self.errors.append(e)
            self._up.set()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.errors

    def connections(self) -> int:
        return self.server.connections

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None and self.thread.is_alive():
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server did not stop"
        assert not self.errors, self.errors
