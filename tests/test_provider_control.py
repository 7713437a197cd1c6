"""The control API over a real Unix socket: protocol, error names, sessions.

The server (coordinator + ControlServer) runs on a trio loop in a background thread over a
real Pool; the tests talk to it with provider.client.Client and with raw sockets.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from provider_env import Env, FakeWriter, Raw, ServerThread, disk_state, wait_until

from provider import protocol
from provider.client import Client, ControlError
from provider.coordinator import SnapshotSet
from provider.vss import HRESULTS, SnapshotState

SS = SnapshotState


@pytest.fixture
def served(tmp_path: Path, sockdir: str) -> Iterator[tuple[Env, ServerThread]]:
    env = Env(tmp_path, writers=(FakeWriter("w"),))
    srv = ServerThread(env, os.path.join(sockdir, "ctl.sock")).start()
    try:
        yield env, srv
    finally:
        srv.stop()
        env.close()


# --------------------------------------------------------------------------- socket
def test_socket_mode_and_cleanup(tmp_path: Path, sockdir: str) -> None:
    env = Env(tmp_path)
    path = os.path.join(sockdir, "x.sock")
    with open(path, "w"):
        pass
    try:
        with pytest.raises(Exception, match="not a socket"):
            ServerThread(env, path).start()
        os.unlink(path)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)           # a stale socket file nobody listens on
        stale.close()
        srv = ServerThread(env, path).start()
        try:
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            # another daemon (of another pool: one pool's catalog is one daemon's)
            (tmp_path / "other").mkdir()
            other = Env(tmp_path / "other")
            try:
                with pytest.raises(Exception, match="another daemon"):
                    ServerThread(other, path).start()
            finally:
                other.close()
            assert os.listdir(sockdir) == ["x.sock"]   # no temporary leftovers
        finally:
            srv.stop()
        assert not os.path.exists(path)
    finally:
        env.close()


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(protocol.SOCKET_ENV, raising=False)
    p1 = protocol.default_socket_path(str(tmp_path / "pool"))
    assert p1.startswith("/run/shadowplex/") and p1.endswith(".sock")
    assert p1 == protocol.default_socket_path(str(tmp_path / "x" / ".." / "pool"))
    assert p1 != protocol.default_socket_path(str(tmp_path / "other"))
    monkeypatch.setenv(protocol.SOCKET_ENV, "/tmp/s.sock")
    assert protocol.default_socket_path(None) == "/tmp/s.sock"


def test_no_daemon(sockdir: str) -> None:
    with pytest.raises(ControlError) as ei:
        Client(os.path.join(sockdir, "nobody.sock"))
    assert ei.value.name == "VSS_E_PROVIDER_NOT_REGISTERED"
    assert "shadowplex serve" in ei.value.message


# --------------------------------------------------------------------------- protocol
def test_hello_first_and_garbage(served: tuple[Env, ServerThread]) -> None:
    env, srv = served
    r = Raw(srv.socket_path)
    try:
        rep = r.req(1, "status")
        assert rep == {"id": 1, "ok": False, "error": {
            "name": "VSS_E_BAD_STATE", "hresult": HRESULTS["VSS_E_BAD_STATE"],
            "message": rep["error"]["message"]}}
        assert "hello" in rep["error"]["message"]
        rep = r.req(2, "hello", {"host": "h", "client": "raw"})
        assert rep["ok"] and rep["result"]["server"] == "shadowplex"
        assert rep["result"]["ops"] == list(protocol.OPS)
        bad_lines = [b"this is not json\n", b"[1, 2]\n", b'"str"\n', b"\xff\xfe\n",
                     b'{"id": 5}\n', b'{"id": 6, "op": 7}\n',
                     b'{"id": 7, "op": "status", "args": [1]}\n',
                     b'{"id": {"x": 1}, "op": "status"}\n', b"{" * 100000 + b"\n",
                     b"[" * 100000 + b"\n", b'{"id": 8, "op": "status", "args": {"a": 1e999}}\n']
        for line in bad_lines:
            r.send(line)
            rep = r.recv()
            assert rep["ok"] is False and rep["error"]["name"] == "E_INVALIDARG", (line, rep)
            assert "\n" not in rep["error"]["message"]
        # a line over 1 MiB for an op that carries no document: one error (naming the
        # request: the line was read whole), then it goes on
        r.send(b'{"id": 9, "op": "status", "pad": "' + b"x" * (protocol.MAX_LINE + 10)
               + b'"}\n')
        rep = r.recv()
        assert rep["error"]["name"] == "E_INVALIDARG" and rep["id"] == 9
        assert "longer" in rep["error"]["message"] and "import" in rep["error"]["message"]
        # beyond the document limit: one error, the rest of the line is skipped unread
        r.send(b'{"id": 99, "op": "import", "args": {"document": "'
               + b"x" * (protocol.MAX_DOCUMENT_LINE + 10) + b'"}}\n')
        rep = r.recv()
        assert rep["error"]["name"] == "E_INVALIDARG" and rep["id"] is None
        assert "longer" in rep["error"]["message"]
        rep = r.req(10, "nosuch.op")
        assert rep["error"]["name"] == "E_INVALIDARG" and "unknown op" in rep["error"]["message"]
        rep = r.req(11, "volume.list", {"bogus": 1})
        assert rep["error"]["name"] == "E_INVALIDARG" and "bogus" in rep["error"]["message"]
        rep = r.req(12, "volume.create", {"name": 5, "size": "1M"})
        assert rep["error"]["name"] == "E_INVALIDARG"
        rep = r.req(13, "volume.create", {"name": "n", "size": True})
        assert rep["error"]["name"] == "E_INVALIDARG"
        rep = r.req(14, "hello", {})
        assert rep["error"]["name"] == "E_INVALIDARG"
        rep = r.req("str-id", "status")
        assert rep["ok"] and rep["id"] == "str-id"
        assert rep["result"]["sessions"] == 1
    finally:
        r.close()


def test_client_roundtrip_and_error_names(served: tuple[Env, ServerThread]) -> None:
    env, srv = served
    with Client(srv.socket_path, host="tester", client="pytest") as c:
        assert c.server["session"] >= 1
        v = c.volume_create("c", "8M")
        assert v["name"] == "c" and v["size"] == 8 << 20 and len(v["naa"]) == 32
        assert [x["name"] for x in c.volume_list()] == ["a", "b", "c"]
        assert c.volume_resize("c", 16 << 20)["size"] == 16 << 20
        expect = {
            "VSS_E_OBJECT_ALREADY_EXISTS": lambda: c.volume_create("c", "1M"),
            "E_INVALIDARG": lambda: c.volume_create("bad/name", "1M"),
            "VSS_E_OBJECT_NOT_FOUND": lambda: c.snapshot_show(
                "3f1c1a4e-0000-4000-8000-000000000000"),
        }
        for name, f in expect.items():
            with pytest.raises(ControlError) as ei:
                f()
            assert ei.value.name == name and ei.value.hresult == HRESULTS[name]
        with pytest.raises(ControlError) as ei:
            c.volume_resize("c", 1 << 20)
        assert ei.value.name == "E_INVALIDARG"

        progress: list[tuple[int, int, str]] = []
        res = c.snapshot_create(["a", "c"], context="app-rollback", kind="plex",
                                progress=lambda d, t, w: progress.append((d, t, w)))
        assert progress and progress[-1][2] == "plex sync"
        sids = [s["snapshot_id"] for s in res["snapshots"]]
        assert [s["snapshot_id"] for s in c.snapshot_list(set_id=res["set_id"])] == sids
        show = c.snapshot_show(sids[0])
        assert show["status"] == "CREATED" and show["originating_machine"] == "tester"
        assert len(c.snapshot_show(set_id=res["set_id"])) == 2
        with pytest.raises(ControlError) as ei:
            c.volume_delete("c")
        assert ei.value.name == "VSS_E_VOLUME_IN_USE"
        with pytest.raises(ControlError) as ei:
            c.promote(sids[0])
        assert ei.value.name == "VSS_E_NOT_SUPPORTED"
        with pytest.raises(ControlError) as ei:
            c.split(sids[0], "a")
        assert ei.value.name == "VSS_E_OBJECT_ALREADY_EXISTS"

        set_id = c.set_start("backup")
        c.set_add("b")
        with pytest.raises(ControlError) as ei:
            c.set_add("b")
        assert ei.value.name == "VSS_E_OBJECT_ALREADY_EXISTS"
        done = c.set_do()
        assert done["set_id"] == set_id and len(done["snapshots"]) == 1
        eb = c.end_backup()
        assert eb == {"set_id": set_id, "writers_notified": ["w"]}
        assert [w["name"] for w in c.writers_list()] == ["w"]
        chk = c.check()
        assert chk["ok"] and chk["problems"] == []
        assert chk["luns"] == len(c.volume_list()) + c.status()["snapshots"]
        scrub_prog: list[str] = []
        assert c.scrub(progress=lambda d, t, w: scrub_prog.append(w))["ok"]
        st = c.status()
        assert st["snapshots"] == 3 and st["creating"] is None
        assert {s["set_id"] for s in c.set_list()} == {res["set_id"], set_id}
        assert c.snapshot_delete(set_id=res["set_id"])["count"] == 2
        c.volume_delete("c")
    # the backup set was auto-release: gone with the session
    wait_until(lambda: env.pool.list_snapshots() == [])


# --------------------------------------------------------------------------- sessions
def test_two_requesters(served: tuple[Env, ServerThread]) -> None:
    env, srv = served
    with Client(srv.socket_path, host="one") as c1, Client(srv.socket_path, host="two") as c2:
        c1.set_start("nas-rollback")
        c1.set_add("a")
        with pytest.raises(ControlError) as ei:
            c2.set_start("backup")
        assert ei.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS" and "one" in ei.value.message
        with pytest.raises(ControlError) as ei:
            c2.snapshot_create(["b"])
        assert ei.value.name == "VSS_E_SNAPSHOT_SET_IN_PROGRESS"
        c1.set_do()
        c2.snapshot_create(["b"], context="nas-rollback")
    assert len(env.pool.list_snapshots()) == 2


def test_auto_release_on_disconnect(served: tuple[Env, ServerThread]) -> None:
    env, srv = served
    c = Client(srv.socket_path)
    keep = c.snapshot_create(["a"], context="nas-rollback")
    c.snapshot_create(["a", "b"], context="backup")
    c.snapshot_create(["b"], context="file-share-backup")
    assert len(env.pool.list_snapshots()) == 4
    c.close()   # returns once the daemon ended the session: no waiting needed after it
    assert [s.id for s in env.pool.list_snapshots()] == [keep["snapshots"][0]["snapshot_id"]]
    # a set started but not done is aborted with its session too
    c = Client(srv.socket_path)
    c.set_start("nas-rollback")
    c.set_add("b")
    c.close()
    assert srv.call(lambda: srv.coord._creating is None)  # type: ignore[union-attr]


@pytest.mark.parametrize("state", [SS.PROCESSING_PREPARE, SS.PRECOMMITTED,
                                   SS.PROCESSING_COMMIT, SS.COMMITTED, SS.POSTCOMMITTED],
                         ids=lambda s: s.name)
def test_disconnect_mid_creation_aborts_and_thaws(tmp_path: Path, sockdir: str,
                                                  state: SnapshotState) -> None:
    w = FakeWriter("w")
    env = Env(tmp_path, writers=(w,))
    before = disk_state(env.pool)
    srv = ServerThread(env, os.path.join(sockdir, "ctl.sock")).start()
    try:
        entered = threading.Event()

        async def hook(s: SnapshotSet, st: SnapshotState) -> None:
            if st == state:
                entered.set()
                await trio.sleep_forever()     # until the disconnect cancels set.do

        srv.call(lambda: setattr(srv.coord, "state_hook", hook))
        c = Client(srv.socket_path)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                c.snapshot_create(["a", "b"], context="backup", kind="plex")
            except ControlError as e:
                result["error"] = e
        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert entered.wait(20)
        c._sock.shutdown(socket.SHUT_RDWR)   # the requester dies mid-creation
        t.join(20)
        c.close()
        coord = srv.coord
        assert coord is not None
        wait_until(lambda: srv.call(lambda: coord._creating is None and not coord._sessions))
        assert env.pool.list_snapshots() == []
        assert disk_state(env.pool)["luns"] == before["luns"]
        assert not w.frozen
        if state not in (SS.PROCESSING_PREPARE,):
            assert w.events() == ["freeze", "abort"] or w.events() == ["freeze", "thaw",
                                                                        "abort"]
        assert srv.call(lambda: coord.barrier.holds) == []
        assert env.pool.check() == []
    finally:
        srv.stop()
        env.close()


def test_progress_events_on_the_wire(served: tuple[Env, ServerThread]) -> None:
    env, srv = served
    env.pool.create_volume("big", 64 << 20)
    env.pool.write("big", 0, b"z" * (48 << 20))
    r = Raw(srv.socket_path)
    try:
        assert r.req(1, "hello", {"host": "h"})["ok"]
        r.send(json.dumps({"id": 2, "op": "snapshot.create", "args": {
            "volumes": ["big"], "context": "nas-rollback", "kind": "plex"}}).encode() + b"\n")
        events = []
        while True:
            msg = r.recv()
            if "progress" in msg:
                assert msg["id"] == 2
                events.append(msg["progress"])
                continue
            break
        assert msg["ok"], msg
        assert events and set(events[-1]) == {"done", "total", "what"}
        assert events[-1]["what"] == "plex sync"
    finally:
        r.close()


def test_pipelined_requests_are_answered_in_order(served: tuple[Env, ServerThread]) -> None:
    env, srv = served
    r = Raw(srv.socket_path)
    try:
        lines = [json.dumps({"id": 1, "op": "hello", "args": {}})]
        lines += [json.dumps({"id": i, "op": "volume.list"}) for i in range(2, 40)]
        r.send(("\n".join(lines) + "\n").encode())
        ids = [r.recv()["id"] for _ in range(39)]
        assert ids == list(range(1, 40))
    finally:
        r.close()
