"""qemu:dirty-bitmap:<FROM-id> on the NBD port (issue 17, docs/network.md): the chunks
changed since snapshot FROM, as QEMU's dirty-bitmap context reports them, on a snapshot
export (changed up to it) and on a volume export (changed up to now).

In process (no kernel): the server of tests/nbd_thread.py over a real pool, read by
nbdinfo and qemu-img (clients nobody here wrote) and by a raw socket for the edges:
listing, several contexts in one reply, REQ_ONE, names that are not available (unknown,
hostile, another volume's, a newer snapshot, another host's) and too many at once. With
the kernel: `nbdinfo --map=qemu:dirty-bitmap:FROM` against `serve` equals `snapshot diff
--json`."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_thread import NbdThread

from blockstore import Pool
from fuse_mount.barrier import WriteBarrier
from fuse_mount.presentation import Presentation
from nbd import protocol as p
from nbd.server import DIRTY_BITMAP, MAX_CONTEXTS, NbdServer

MiB = 1 << 20
CS = 64 << 10


def _snap(pool: Pool, vol: str) -> str:
    s = pool.prepare_snapshot(vol)
    pool.commit_snapshots([s.id])
    return s.id


class Env:
    def __init__(self, pool: Pool, presentation: Presentation) -> None:
        self.pool = pool
        self.presentation = presentation
        self.thread = NbdThread(NbdServer(pool, WriteBarrier(pool), presentation, None,
                                          lambda _c: ""))
        self.uri = f"nbd://127.0.0.1:{self.thread.port}"
        self.snaps: list[str] = []


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """Volume db (16 MiB) with four snapshots and random writes between them; volume
    other with one snapshot."""
    pool = Pool.create(str(tmp_path / "pool"))
    pool.create_volume("db", 16 * MiB)
    pool.create_volume("other", 4 * MiB)
    rnd = random.Random(17)
    e = Env(pool, Presentation("here"))
    for _ in range(4):
        for _ in range(rnd.randrange(1, 6)):
            off = rnd.randrange(16 * MiB - 300_000)
            pool.write("db", off, os.urandom(rnd.randrange(1, 300_000)))
        e.snaps.append(_snap(pool, "db"))
    pool.write("db", 9 * MiB, b"live")
    e.other = _snap(pool, "other")   # type: ignore[attr-defined]
    try:
        yield e
    finally:
        e.thread.stop()
        assert pool.check() == []
        pool.close()


def _tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (make setup installs it)")


def nbdinfo_dirty(uri: str, from_id: str) -> list[tuple[int, int]]:
    """The dirty extents nbdinfo --map=qemu:dirty-bitmap:FROM reads, merged."""
    res = subprocess.run(["nbdinfo", "--json", f"--map={DIRTY_BITMAP}{from_id}", uri],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    out: list[tuple[int, int]] = []
    for e in json.loads(res.stdout):
        assert e["type"] in (0, 1) and e["description"] == ("dirty" if e["type"] else
                                                            "clean")
        if e["type"] == 1:
            if out and sum(out[-1]) == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def test_nbdinfo_map_is_the_changed_extents_of_every_pair(env: Env) -> None:
    _tool("nbdinfo")
    s = env.snaps
    for i, a in enumerate(s):
        for b in s[i + 1:]:
            want = env.pool.changed_extents(a, b)
            assert want, "random writes between every pair"
            assert nbdinfo_dirty(f"{env.uri}/.shadow/{b}", a) == want
        # the live volume: changed since a, up to now
        assert nbdinfo_dirty(f"{env.uri}/volumes/db", a) == env.pool.changed_extents(a)


def test_contexts_are_listed_per_export(env: Env) -> None:
    _tool("nbdinfo")
    s = env.snaps

    def contexts(name: str) -> list[str]:
        res = subprocess.run(["nbdinfo", "--json", f"{env.uri}/{name}"], capture_output=True,
                             text=True, timeout=60, check=True)
        return list(json.loads(res.stdout)["exports"][0]["contexts"])

    bitmaps = [DIRTY_BITMAP + x for x in s]
    assert contexts("volumes/db") == ["base:allocation", *bitmaps]
    assert contexts(f".shadow/{s[2]}") == ["base:allocation", *bitmaps[:2]]   # older only
    assert contexts(f".shadow/{s[0]}") == ["base:allocation"]
    assert contexts("volumes/other") == ["base:allocation", DIRTY_BITMAP + env.other]  # type: ignore[attr-defined]


def test_what_is_not_available_is_refused_cleanly(env: Env) -> None:
    _tool("nbdinfo")
    s = env.snaps
    bad = [s[3],                      # not older than the export's snapshot
           env.other,                 # type: ignore[attr-defined]  # another volume's
           "nope", "", "../../etc/passwd", "x" * 3000, "\u2028\x01", s[0].upper()]
    for from_id in bad:
        res = subprocess.run(["nbdinfo", f"--map={DIRTY_BITMAP}{from_id}",
                              f"{env.uri}/.shadow/{s[2]}"], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode != 0 and "does not support metadata context" in res.stderr
    # the server is fine after all that
    assert nbdinfo_dirty(f"{env.uri}/.shadow/{s[2]}", s[0]) == env.pool.changed_extents(
        s[0], s[2])


def test_a_snapshot_another_host_sees_is_no_context(env: Env) -> None:
    _tool("nbdinfo")
    s = env.snaps
    env.presentation.update("here", {s[0]: frozenset({"hostB"})}, ["hostB"])
    res = subprocess.run(["nbdinfo", f"--map={DIRTY_BITMAP}{s[0]}",
                          f"{env.uri}/.shadow/{s[2]}"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode != 0 and "does not support metadata context" in res.stderr
    assert nbdinfo_dirty(f"{env.uri}/.shadow/{s[2]}", s[1]) == env.pool.changed_extents(
        s[1], s[2])


def test_qemu_reads_the_bitmap(env: Env) -> None:
    """qemu's nbd driver (x-dirty-bitmap, what qemu-based backup tools use) accepts it;
    it shows dirty extents as not "data" (its inversion)."""
    _tool("qemu-img")
    a, b = env.snaps[0], env.snaps[3]
    res = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                          f"driver=nbd,host=127.0.0.1,port={env.thread.port},"
                          f"export=.shadow/{b},x-dirty-bitmap={DIRTY_BITMAP}{a}"],
                         capture_output=True, text=True, timeout=60, check=True)
    dirty = [(e["start"], e["length"]) for e in json.loads(res.stdout) if not e["data"]]
    assert dirty == env.pool.changed_extents(a, b)


# ------------------------------------------------------------------- the raw protocol
class Raw:
    def __init__(self, port: int) -> None:
        import socket
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert self.recv(18)[:16] == struct.pack(">QQ", p.NBDMAGIC, p.IHAVEOPT)
        self.s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.s.recv(n - len(out))
            assert more, "closed"
            out += more
        return out

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the ACK or an error."""
        self.s.sendall(p.option(opt, data))
        out = []
        while True:
            magic, _, rtype, length = p.OPTION_REPLY.unpack(self.recv(20))
            assert magic == p.REPLY_MAGIC
            out.append((rtype, self.recv(length)))
            if rtype == p.REP_ACK or p.is_error_reply(rtype):
                return out

    def contexts(self, opt: int, export: str, queries: list[str]) -> list[tuple[int, str]]:
        replies = self.option(opt, p.meta_context_data(export, queries))
        assert replies[-1][0] == p.REP_ACK, replies
        return [(struct.unpack_from(">I", d)[0], d[4:].decode()) for t, d in replies[:-1]]

    def status(self, offset: int, length: int, flags: int = 0
               ) -> list[tuple[int, list[tuple[int, int]]]]:
        self.s.sendall(p.request(p.CMD_BLOCK_STATUS, 9, offset, length, flags))
        out = []
        while True:
            _, rflags, rtype, cookie, n = p.STRUCTURED_REPLY.unpack(self.recv(20))
            assert cookie == 9 and rtype == p.REPLY_TYPE_BLOCK_STATUS, rtype
            body = self.recv(n)
            out.append((struct.unpack_from(">I", body)[0],
                        list(p.BLOCK_DESCRIPTOR.iter_unpack(body[4:]))))
            if rflags & p.REPLY_FLAG_DONE:
                return out

    def close(self) -> None:
        self.s.close()


def test_list_set_and_block_status_on_the_wire(env: Env) -> None:
    s = env.snaps
    export = f".shadow/{s[3]}"
    c = Raw(env.thread.port)
    try:
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        listed = c.contexts(p.OPT_LIST_META_CONTEXT, export, ["qemu:"])
        assert listed == [(0, DIRTY_BITMAP + x) for x in s[:3]]
        assert c.contexts(p.OPT_LIST_META_CONTEXT, export, [DIRTY_BITMAP]) == listed
        assert c.contexts(p.OPT_LIST_META_CONTEXT, export, [DIRTY_BITMAP + s[1], "x:y"]) \
            == [(0, DIRTY_BITMAP + s[1])]
        # SET: a namespace alone, an unknown name and a duplicate select nothing more
        chosen = c.contexts(p.OPT_SET_META_CONTEXT, export,
                            [DIRTY_BITMAP + s[0], "qemu:", DIRTY_BITMAP, p.BASE_ALLOCATION,
                             DIRTY_BITMAP + "nope", DIRTY_BITMAP + s[0],
                             DIRTY_BITMAP + s[1]])
        assert chosen == [(2, DIRTY_BITMAP + s[0]), (1, p.BASE_ALLOCATION),
                          (3, DIRTY_BITMAP + s[1])]
        c.option(p.OPT_GO, p.go_data(export, []))
        size = 16 * MiB
        replies = c.status(0, size)
        assert [cid for cid, _ in replies] == [2, 1, 3]   # one chunk per context
        for cid, descs in replies:
            assert sum(n for n, _ in descs) == size
            if cid == 1:
                continue
            pos, dirty = 0, []
            for n, f in descs:
                assert f in (0, 1)
                if f:
                    dirty.append((pos, n))
                pos += n
            want = env.pool.changed_extents(s[0] if cid == 2 else s[1], s[3])
            assert dirty == want
        # a range inside: cut at its ends; REQ_ONE: one descriptor per context
        a = env.pool.changed_extents(s[0], s[3])[0]
        part = c.status(a[0] + 100, CS)
        assert part[0][1][0] == (min(CS, a[1] - 100), 1)
        one = c.status(0, size, p.CMD_FLAG_REQ_ONE)
        assert [len(d) for _, d in one] == [1, 1, 1]
    finally:
        c.close()


def test_too_many_contexts_and_hostile_queries(env: Env) -> None:
    export = "volumes/db"
    c = Raw(env.thread.port)
    try:
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        # more snapshots than one SET may select
        for _ in range(MAX_CONTEXTS):
            env.snaps.append(_snap(env.pool, "db"))
        many = [DIRTY_BITMAP + x for x in env.snaps] + [p.BASE_ALLOCATION]
        assert c.option(p.OPT_SET_META_CONTEXT, p.meta_context_data(export, many)
                        )[-1][0] == p.REP_ERR_TOO_BIG
        # a query that is not UTF-8, or longer than a name may be
        bad = p.name_data(export) + struct.pack(">II", 1, 3) + b"\xff\xfe\xfd"
        assert c.option(p.OPT_SET_META_CONTEXT, bad)[-1][0] == p.REP_ERR_INVALID
        long = p.name_data(export) + struct.pack(">II", 1, 5000) + b"q" * 5000
        assert c.option(p.OPT_LIST_META_CONTEXT, long)[-1][0] == p.REP_ERR_INVALID
        # the session goes on: a valid SET, GO, BLOCK_STATUS
        assert c.contexts(p.OPT_SET_META_CONTEXT, export, [DIRTY_BITMAP + env.snaps[0]]) \
            == [(2, DIRTY_BITMAP + env.snaps[0])]
        c.option(p.OPT_GO, p.go_data(export, []))
        ((cid, descs),) = c.status(0, 16 * MiB)
        assert cid == 2 and sum(n for n, _ in descs) == 16 * MiB
    finally:
        c.close()


def test_a_deleted_from_is_an_error_reply_on_a_volume(env: Env) -> None:
    """The live volume's map is asked for at each BLOCK_STATUS: FROM deleted meanwhile
    is an error reply to that request, and the connection goes on."""
    s = env.snaps
    c = Raw(env.thread.port)
    try:
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        c.contexts(p.OPT_SET_META_CONTEXT, "volumes/db", [DIRTY_BITMAP + s[0]])
        c.option(p.OPT_GO, p.go_data("volumes/db", []))
        assert c.status(0, MiB)[0][0] == 2
        env.pool.delete_snapshot(s[0])
        c.s.sendall(p.request(p.CMD_BLOCK_STATUS, 9, 0, MiB))
        _, rflags, rtype, cookie, n = p.STRUCTURED_REPLY.unpack(c.recv(20))
        assert rtype == p.REPLY_TYPE_ERROR and rflags & p.REPLY_FLAG_DONE
        assert struct.unpack_from(">I", c.recv(n))[0] == p.EINVAL
        c.s.sendall(p.request(p.CMD_READ, 10, 0, 4096))
        _, _, rtype, cookie, n = p.STRUCTURED_REPLY.unpack(c.recv(20))
        assert cookie == 10 and rtype == p.REPLY_TYPE_OFFSET_DATA
    finally:
        c.close()
