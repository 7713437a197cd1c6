"""Hostile input (issue 8, item 4): property tests of every parser a stranger can feed.

Pure Python: no kernel, no daemon, no network. Four parsers, one set of properties:

* no exception other than the module's documented error type
  (documents: DocumentError; scripts: ScriptError; protocol: ProtocolError / ValueError
  from encode(); client: ControlError; CLI: an exit code, never an exception);
* every error message is non-empty and ONE line (``str.splitlines`` finds one line: no
  LF, CR, VT, FF, FS/GS/RS, NEL, LS or PS in it);
* no hang: a hypothesis deadline per example and a pytest-timeout per test;
* the CLI exits 1 or 2 with exactly one line on stderr and no traceback.

Profiles: the CI default keeps the whole file under ~30 s on a 2-core machine;
``SHADOWPLEX_FUZZ_EXAMPLES=N`` runs N examples per property (the long profile, e.g.
20000; the per-test timeout grows with it). docs/reliability.md lists what this covers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from blockstore import SnapshotInfo
from provider import documents as D
from provider import protocol
from provider.client import Client, ControlError
from provider.vss import HRESULTS, Attr, VssError
from provider.writers.base import Component, FileSpec, UsageType, WriterMetadata, writer_guid
from tools import cli
from tools.script import VERBS, ScriptError, Stmt, parse_script, run_script

# ------------------------------------------------------------------------------ profiles
_LONG = int(os.environ.get("SHADOWPLEX_FUZZ_EXAMPLES", "0") or 0)


def fuzz(examples: int, deadline_ms: int = 2000) -> Callable[[Any], Any]:
    """hypothesis settings + a pytest timeout, scaled for the long profile."""
    n = _LONG or examples
    timeout = max(60, 60 * n // max(examples, 1))

    def wrap(fn: Any) -> Any:
        fn = settings(max_examples=n, deadline=deadline_ms, derandomize=not _LONG,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])(fn)
        return pytest.mark.timeout(timeout)(fn)
    return wrap


def one_line(msg: object, what: str = "message") -> None:
    text = str(msg)
    assert text.strip(), f"empty {what}"
    assert len(text.splitlines()) == 1, f"{what} is not one line: {text!r}"


# junk that breaks naive parsers: control characters, line separators, surrogates
# (undecodable argv bytes arrive as surrogate escapes), quotes, very long text
JUNK = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None), max_size=20),
    st.sampled_from(["", " ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028",
                     "\u2029", "\udcff", "\ufeff", "'", '"', "\\", "#", "%", "%%", "%A",
                     "\x00", "\x7f", "é", "日本", "🙂", "\u202e", "a" * 10_000]),
)


# =================================================================== (a) BCD / WMD documents
POOL = "0123456789abcdef0123456789abcdef"
BCD_NS = "{x-schema:#VssComponentMetadata}"
DOC_REASONS = {"type", "size", "encoding", "syntax", "dtd", "limits", "structure",
               "transportable", "context", "pool", "provider", "export"}


@dataclass
class _Set:
    set_id: str
    context: int
    attributes: int


def _naa(rng: random.Random) -> str:
    return "6" + "".join(rng.choice("0123456789abcdef") for _ in range(31))


def _valid_bcd(n: int = 2) -> bytes:
    rng = random.Random(n)
    set_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    attrs = int(Attr.TRANSPORTABLE | Attr.DIFFERENTIAL | Attr.HARDWARE_ASSISTED)
    snaps = [SnapshotInfo(
        id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), set_id=set_id,
        volume=f"vol{i}", origin_naa=_naa(rng), naa=_naa(rng), size=(i + 1) << 30,
        kind="differential", state="committed", created=1_700_000_000.5 + i,
        attributes=attrs, exposed_name=None, sync_done=0, sync_total=0, epoch=1,
        file_id=i + 1) for i in range(n)]
    return D.write_backup_components(_Set(set_id, 0, int(Attr.TRANSPORTABLE)), snaps,
                                     [_wmd_meta()], pool_id=POOL, host="host-a")


def _wmd_meta() -> WriterMetadata:
    return WriterMetadata(
        "SQLite Writer", writer_guid("SQLite Writer"), writer_guid("SQLite Writer", "/srv"),
        "/srv", UsageType.VSS_UT_USERDATA,
        [Component("app.db", "sqlite\\srv", "database", [FileSpec("/srv", "app.db*")],
                   ["/mnt/pool/volumes/data.img"]),
         Component("spool", "", "filegroup", [FileSpec("/srv/spool", "*", True)], [])])


BCD = _valid_bcd()
WMD = D.write_writer_metadata(_wmd_meta())


def check_document(data: bytes) -> None:
    """Both parsers on ``data``: a checked result, or a clean one-line DocumentError."""
    for parse in (lambda b: D.parse_backup_components(b, pool_id=POOL),
                  D.parse_writer_metadata):
        try:
            res = parse(data)
        except D.DocumentError as e:
            one_line(e.message)
            one_line(str(e))
            assert e.reason in DOC_REASONS, e.reason
            assert e.name in HRESULTS, e.name
            # no XML library exception leaks out as the cause
            assert e.__cause__ is None
            assert e.__context__ is None or e.__suppress_context__
            continue
        if isinstance(res, D.ParsedSet):
            assert res.pool_id == POOL and res.attributes & Attr.TRANSPORTABLE
            assert 1 <= len(res.snapshots) <= 64
            assert len({s.snapshot_id for s in res.snapshots}) == len(res.snapshots)
            assert len({s.volume for s in res.snapshots}) == len(res.snapshots)
            for s in res.snapshots:
                assert s.origin_naa != s.snapshot_naa and s.size >= 1
        else:
            assert isinstance(res, WriterMetadata)
            assert res.writer_name and uuid.UUID(res.writer_id) and uuid.UUID(res.instance_id)


def test_the_seed_documents_parse() -> None:
    assert len(D.parse_backup_components(BCD, pool_id=POOL).snapshots) == 2
    assert D.parse_writer_metadata(WMD).writer_name == "SQLite Writer"


@fuzz(300)
@given(st.binary(max_size=4096))
def test_documents_random_bytes(data: bytes) -> None:
    check_document(data)


@fuzz(200)
@given(st.sampled_from([BCD, WMD]), st.integers(0, max(len(BCD), len(WMD))))
def test_documents_truncated(doc: bytes, at: int) -> None:
    check_document(doc[:at])


_BYTE_EDIT = st.tuples(st.sampled_from(["flip", "delete", "insert", "splice", "repeat"]),
                       st.integers(0, 1 << 16), st.integers(1, 200), st.binary(max_size=24))


def _byte_edits(doc: bytes, edits: list[tuple[str, int, int, bytes]], other: bytes) -> bytes:
    for op, pos, length, blob in edits:
        pos %= max(len(doc), 1)
        if op == "flip":
            doc = doc[:pos] + bytes([doc[pos] ^ (1 << (length % 8))]) + doc[pos + 1:] \
                if doc else doc
        elif op == "delete":
            doc = doc[:pos] + doc[pos + length:]
        elif op == "insert":
            doc = doc[:pos] + blob + doc[pos:]
        elif op == "splice":   # a piece of the other document type
            start = pos % max(len(other), 1)
            doc = doc[:pos] + other[start:start + length] + doc[pos:]
        else:
            doc = doc[:pos] + doc[pos:pos + length] * 3 + doc[pos:]
    return doc


@fuzz(300)
@given(st.sampled_from([(BCD, WMD), (WMD, BCD)]), st.lists(_BYTE_EDIT, min_size=1, max_size=6))
def test_documents_byte_mutations(docs: tuple[bytes, bytes],
                                  edits: list[tuple[str, int, int, bytes]]) -> None:
    check_document(_byte_edits(docs[0], edits, docs[1]))


# structure-aware: edit the element tree of a valid document, re-serialise, parse
_TREE_OP = st.tuples(
    st.sampled_from(["drop", "duplicate", "duplicate_many", "move", "clear", "attr_huge",
                     "attr_junk", "attr_drop", "attr_copy", "text", "nest", "rename"]),
    st.integers(0, 10_000), st.integers(0, 10_000), JUNK)


def _tree_edit(doc: bytes, ops: list[tuple[str, int, int, str]]) -> bytes:
    root = ET.fromstring(doc)   # our own trusted document
    for op, a, b, junk in ops:
        elements = list(root.iter())
        parents = {c: p for p in elements for c in p}
        el = elements[a % len(elements)]
        other = elements[b % len(elements)]
        parent = parents.get(el)
        keys = sorted(el.attrib)
        key = keys[b % len(keys)] if keys else None
        if op == "drop" and parent is not None:
            parent.remove(el)
        elif op == "duplicate" and parent is not None:
            parent.insert(list(parent).index(el), copy.deepcopy(el))
        elif op == "duplicate_many" and parent is not None:
            parent.extend(copy.deepcopy(el) for _ in range(1 + b % 80))
        elif op == "move" and parent is not None and el is not other \
                and el not in other.iter():
            parent.remove(el)
            other.append(el)
        elif op == "clear":
            el.attrib.clear()
        elif op == "attr_huge" and key is not None:
            el.set(key, (junk or "A") * (1 + (1 << 20) // max(len(junk), 1)))
        elif op == "attr_junk" and key is not None:
            el.set(key, junk)
        elif op == "attr_drop" and key is not None:
            del el.attrib[key]
        elif op == "attr_copy" and key is not None and other.attrib:
            okeys = sorted(other.attrib)
            el.set(key, other.attrib[okeys[a % len(okeys)]])
        elif op == "text":
            el.text = junk
        elif op == "nest":
            cur = el
            for _ in range(1 + b % 40):
                cur = ET.SubElement(cur, el.tag)
        elif op == "rename":
            el.tag = BCD_NS + (junk if junk.isidentifier() else "X")
    # the stdlib serialiser refuses what XML cannot hold (lone surrogates...) or writes
    # control characters that are not XML; either is hostile input worth parsing
    try:
        return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
    except (ValueError, UnicodeError):
        assume(False)
        raise AssertionError("unreachable") from None


@fuzz(250, deadline_ms=5000)
@given(st.sampled_from([BCD, WMD]), st.lists(_TREE_OP, min_size=1, max_size=5))
def test_documents_structure_mutations(doc: bytes, ops: list[tuple[str, int, int, str]]
                                       ) -> None:
    check_document(_tree_edit(doc, ops))


@pytest.mark.parametrize("data", [
    b"<" * 200_000,                                                 # no element at all
    b"<a>" * (D.MAX_DEPTH + 1),                                     # too deep, unclosed
    b"<r>" + b"<a/>" * (D.MAX_ELEMENTS + 1) + b"</r>",              # too many elements
    b"<r " + b" ".join(b"a%d='1'" % i for i in range(100)) + b"/>",  # too many attributes
    b" " * (D.MAX_DOCUMENT_BYTES + 1),                              # over the size cap
    BCD.replace(b"host-a", b"h" * (1 << 20)),                        # a 1 MiB attribute
    b"\xef\xbb\xbf" + BCD,                                          # UTF-8 BOM: fine
    BCD.replace(b"UTF-8", b"latin-1", 1),
    b"\xff\xfe" + BCD.decode().encode("utf-16-le"),
], ids=["lt", "deep", "many", "attrs", "size", "huge-attr", "bom", "latin1", "utf16"])
@pytest.mark.timeout(60)
def test_documents_fixed_hostile_cases(data: bytes) -> None:
    check_document(data)


# ======================================================================= (b) diskshadow scripts
_GUID = "6a3f3b8e-0f62-4c43-9d0a-6c5e1c2b9a11"
SCRIPT_WORDS = sorted({w for v in VERBS for w in v.split()} | {
    "backup", "file-share-backup", "app-rollback", "nas-rollback", "volatile", "persistent",
    "nowriters", "clientaccessible", "VSS_CTX_BACKUP", "0x19", "0x10", "-1",
    "differential", "plex", "transportable", "rollbackrecover", "on", "off", "all", "oldest",
    "id", "exposed", "status", "metadata", "detailed", "writable", "restore", "reset",
    "writer", "mask", "simulate", "shadow", "alias", "shadows", "volume",
    "data", "logs", "vol0", "../etc", "/dev/loop7", "/mnt/snap", "snapname", "/tmp/meta.json",
    "%DATA%", "%data%", "%VSS_SHADOW_SET%", "%VSS_SHADOW_1%", "%VSS_SHADOW_99%", "%NOPE%",
    "DATA", "VSS_SHADOW_SET", _GUID, "{" + _GUID + "}", "#", "'", '"', "\\", "'a b'",
    '"/mnt/my snap"', "$(true)", ";", "|", "&&"})
_SEP = st.sampled_from([" ", "  ", "\t", " \t "])
_WORD = st.one_of(st.sampled_from(SCRIPT_WORDS), st.sampled_from(SCRIPT_WORDS).map(str.upper),
                  JUNK)


@st.composite
def script_line(draw: st.DrawFn) -> str:
    words = draw(st.lists(_WORD, min_size=0, max_size=8))
    if words and draw(st.booleans()):   # start with a real verb most of the time
        words = draw(st.sampled_from(VERBS)).split() + words[:4]
    seps = [draw(_SEP) for _ in words]
    return "".join(s + w for s, w in zip(seps, words, strict=True))


# a script that parses (from tests/test_script.py), to mutate line by line
VALID_SCRIPT = """\
set context volatile
set option differential transportable
set verbose on
begin backup
add volume data alias DATA
add volume logs
create
expose %DATA% /mnt/snap
expose %VSS_SHADOW_2% snapname
exec echo %DATA% "$DATA"
list shadows set %VSS_SHADOW_SET%
unexpose /mnt/snap
end backup
delete shadows exposed snapname
delete shadows set %VSS_SHADOW_SET%
exit
"""
VALID_LINES = VALID_SCRIPT.splitlines()
_NEWLINE = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\x0b", "\x85", "\u2028"])


def check_script(text: str) -> list[Stmt] | None:
    nlines = len(text.splitlines())
    try:
        stmts = parse_script(text)
    except ScriptError as e:
        one_line(e.message)
        assert isinstance(e.line, int) and 1 <= e.line <= max(nlines, 1), (e.line, nlines)
        return None
    lines = [s.line for s in stmts]
    assert lines == sorted(set(lines)) and all(1 <= n <= nlines for n in lines)
    assert all(s.verb in VERBS for s in stmts), [s.verb for s in stmts]
    return stmts


def test_the_seed_script_parses() -> None:
    stmts = check_script(VALID_SCRIPT)
    assert stmts is not None and len(stmts) == len(VALID_LINES)


@fuzz(400)
@given(st.lists(script_line(), max_size=12), _NEWLINE)
def test_script_random_lines(lines: list[str], nl: str) -> None:
    check_script(nl.join(lines))


@fuzz(300)
@given(st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap", "junk", "replace", "long"]),
                          st.integers(0, 100), st.integers(0, 100), JUNK),
                min_size=1, max_size=5),
       _NEWLINE)
def test_script_mutations_of_a_valid_script(ops: list[tuple[str, int, int, str]],
                                            nl: str) -> None:
    lines = list(VALID_LINES)
    for op, a, b, junk in ops:
        if not lines:
            break
        i, j = a % len(lines), b % len(lines)
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "junk":
            lines.insert(i, junk)
        elif op == "replace":   # one word of a line becomes junk
            words = lines[i].split(" ")
            words[b % len(words)] = junk
            lines[i] = " ".join(words)
        else:
            lines[i] = lines[i] + " " + junk * (1 + 100_000 // max(len(junk), 1))
    check_script(nl.join(lines) + "\n")


@fuzz(30, deadline_ms=5000)
@given(st.lists(script_line(), min_size=1, max_size=6))
def test_script_run_without_a_daemon(lines: list[str]) -> None:
    """The whole `shadowplex script` path up to connecting: exit 2 for a parse error
    (``FILE:LINE: reason``), else 1 (no daemon); one line on stderr, nothing on stdout."""
    text = "\n".join(lines)
    ok = check_script(text) is not None
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_script(text, "fuzz.dsh", socket=str(NO_SOCKET))
    assert rc == (1 if ok else 2), (rc, err.getvalue())
    one_line(err.getvalue().rstrip("\n"), "stderr")
    assert out.getvalue() == ""
    if not ok:
        assert err.getvalue().startswith("fuzz.dsh:")


@pytest.mark.parametrize("text", [
    "add volume data\x00\n", "\x00", "exec " + "x" * 1_000_000, "#" * 1_000_000,
    "add volume " + "a" * 1_000_000, "unexpose '" + "a" * 100_000,
    "set context " + " ".join(["volatile"] * 10_000), "\ufeffset context backup\n",
    "\n" * 100_000 + "bogus", "add volume d alias A\n" * 70 + "create\n",
])
@pytest.mark.timeout(60)
def test_script_fixed_hostile_cases(text: str) -> None:
    check_script(text)


# ======================================================================= (c) control protocol
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["\n", "\u2028", "\udc80", "import", "hello", "status"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20)


def _check_protocol_error(e: VssError) -> None:
    assert isinstance(e, protocol.ProtocolError)
    assert e.name == "E_INVALIDARG"
    one_line(e.message)


@fuzz(400)
@given(st.binary(max_size=512))
def test_protocol_decode_random_bytes(line: bytes) -> None:
    try:
        obj = protocol.decode(line)
    except protocol.ProtocolError as e:
        _check_protocol_error(e)
        return
    assert isinstance(obj, dict)


@fuzz(300)
@given(_JSON)
def test_protocol_decode_any_json_value(value: Any) -> None:
    try:
        line = json.dumps(value).encode()
    except (ValueError, UnicodeError):
        return
    try:
        obj = protocol.decode(line)
    except protocol.ProtocolError as e:
        _check_protocol_error(e)
        assert not isinstance(value, dict)
        return
    assert isinstance(value, dict) and isinstance(obj, dict)


@fuzz(300)
@given(st.dictionaries(st.sampled_from(["id", "op", "args", "x"]), _JSON, max_size=4),
       st.integers(0, protocol.MAX_DOCUMENT_LINE * 2))
def test_protocol_requests(obj: dict[str, Any], length: int) -> None:
    """parse_request + check_line_length on any object: a request, or one clean error."""
    try:
        rid, op, args = protocol.parse_request(obj)
        protocol.check_line_length(op, length)
    except protocol.ProtocolError as e:
        _check_protocol_error(e)
        return
    assert rid is None or (isinstance(rid, int | str) and not isinstance(rid, bool))
    assert isinstance(op, str) and op and isinstance(args, dict)
    assert length <= protocol.line_limit(op)


@fuzz(300)
@given(st.dictionaries(st.text(max_size=8), _JSON, max_size=5), st.integers(1, 400))
def test_protocol_encode_frames_one_line(msg: dict[str, Any], limit: int) -> None:
    """encode(): exactly one newline, at the end (framing), and decode() gives the
    message back; or ValueError (NaN, lone surrogate, over the limit) with one line."""
    try:
        data = protocol.encode(msg, limit)
    except ValueError as e:
        one_line(e)
        return
    assert data.endswith(b"\n") and data.count(b"\n") == 1 and len(data) <= limit
    assert protocol.decode(data) == msg


@pytest.mark.timeout(60)
def test_protocol_oversized_lines() -> None:
    for limit in (0, 1, 100, protocol.MAX_LINE):
        with pytest.raises(protocol.ProtocolError) as ei:
            protocol.decode(b"{" + b" " * limit + b"}", limit)
        one_line(ei.value.message)
    with pytest.raises(protocol.ProtocolError):
        protocol.check_line_length("status", protocol.MAX_LINE + 1)
    protocol.check_line_length("import", protocol.MAX_LINE + 1)
    with pytest.raises(protocol.ProtocolError):
        protocol.check_line_length("import", protocol.MAX_DOCUMENT_LINE + 1)
    for deep in (b"[" * 100_000, b'{"a":' * 100_000, b"1" * 100_000):
        with pytest.raises(protocol.ProtocolError) as ei:
            protocol.decode(deep)
        one_line(ei.value.message)


@fuzz(200)
@given(st.sampled_from([ValueError, KeyError, OSError, RuntimeError, TypeError, Exception]),
       JUNK)
def test_protocol_to_vss_error_is_one_line(cls: type[Exception], text: str) -> None:
    err = protocol.to_vss_error(cls(text))
    assert err.name in HRESULTS
    one_line(err.message)


# --- the server's framing: Connection._reader over a fake stream (trio, no socket)
class _FakeStream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def send_all(self, data: bytes) -> None:
        self.sent += data


def _run_reader(chunks: list[bytes]) -> tuple[list[Any], list[dict[str, Any]]]:
    from provider.control import Connection
    stream = _FakeStream(chunks)
    conn = Connection(type("Server", (), {"coord": None})(), stream)  # type: ignore[arg-type]
    queued: list[Any] = []

    async def main() -> None:
        send_q, recv_q = trio.open_memory_channel[Any](1000)
        await conn._reader(send_q)
        async with recv_q:
            async for req in recv_q:
                queued.append(req)
    trio.run(main)
    assert conn.gone   # EOF ends the reader and marks the connection lost
    replies = [json.loads(x) for x in bytes(stream.sent).split(b"\n") if x]
    return queued, replies


_WIRE = st.one_of(
    st.binary(max_size=64),
    _JSON.map(lambda v: json.dumps(v, allow_nan=True).encode(errors="surrogatepass")),
    st.builds(lambda op, args: json.dumps({"id": 1, "op": op, "args": args}).encode(),
              st.sampled_from([*protocol.OPS, "", "nope", "\n"]), _JSON),
    st.just(b"\n"), st.just(b"\r\n"), st.just(b" " * 1000),
)


@fuzz(150, deadline_ms=5000)
@given(st.lists(_WIRE, max_size=8), st.integers(1, 64))
def test_server_framing_of_garbage(pieces: list[bytes], chunk: int) -> None:
    """Any byte stream, split anywhere: every reply is an error object with a name and a
    one-line message, every queued request is well formed; the reader never crashes."""
    stream = b"\n".join(pieces) + b"\n"
    chunks = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    queued, replies = _run_reader(chunks)
    for _rid, op, args in queued:
        assert isinstance(op, str) and op and isinstance(args, dict)
    for r in replies:
        assert r["ok"] is False and r["error"]["name"] in HRESULTS
        one_line(r["error"]["message"])
    lines = [x for x in stream.split(b"\n") if x.strip()]
    assert len(queued) + len(replies) == len(lines)


@pytest.mark.timeout(120)
def test_server_framing_skips_an_oversized_line() -> None:
    big = b"x" * (protocol.MAX_DOCUMENT_LINE + 10)
    chunks = [big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]
    chunks += [b"\n", b'{"id": 2, "op": "status"}\n']
    queued, replies = _run_reader(chunks)
    assert [q[1] for q in queued] == ["status"]
    assert len(replies) == 1 and "longer than" in replies[0]["error"]["message"]


# --- the client's decoding: a fake daemon that answers garbage
@contextlib.contextmanager
def _fake_daemon(reply: bytes) -> Iterator[Client]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    c = Client.__new__(Client)
    c.socket_path, c._sock, c._buf, c._ids = "fake", a, bytearray(), itertools.count(1)

    def serve() -> None:
        with b:
            b.recv(1 << 16)   # the request
            b.sendall(reply)
            b.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield c
    finally:
        c.close()
        t.join(10)


_REPLY = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda k, v: json.dumps({"id": 1, k: v}).encode(),
              st.sampled_from(["ok", "error", "progress", "result"]), _JSON),
    st.builds(lambda ok, err, prog: json.dumps({"id": 1, "ok": ok, "error": err,
                                                "progress": prog}).encode(),
              _JSON, _JSON, _JSON),
    st.builds(lambda v: json.dumps({"id": 1, "ok": False, "error": v}).encode(),
              st.fixed_dictionaries({"name": _JSON | JUNK, "message": _JSON | JUNK,
                                     "hresult": _JSON})),
    st.builds(lambda v: json.dumps({"id": 1, "progress": v}).encode(),
              st.fixed_dictionaries({"done": _JSON, "total": _JSON, "what": _JSON})),
)


@fuzz(150, deadline_ms=5000)
@given(st.lists(_REPLY, min_size=1, max_size=4))
def test_client_decoding_of_garbage_replies(replies: list[bytes]) -> None:
    """A daemon that answers anything: the client returns a result or raises a
    ControlError with a one-line message (what the CLI prints), nothing else."""
    with _fake_daemon(b"\n".join(replies) + b"\n") as c:
        try:
            c.call("status", progress=lambda done, total, what: None)
        except ControlError as e:
            one_line(e.message)
            one_line(str(e))
            assert e.name and isinstance(e.name, str)


# =================================================================================== (d) CLI
TMP = Path(tempfile.mkdtemp(prefix="shadowplex-fuzz-"))
NO_SOCKET = TMP / "no-daemon.sock"


@pytest.fixture(scope="module", autouse=True)
def _remove_tmp() -> Iterator[None]:
    yield
    shutil.rmtree(TMP, ignore_errors=True)

# Words that start a daemon, a demo or a bench, write a pool, or print help (exit 0):
# never generated. Long options may be abbreviated (argparse), so prefixes count too.
_NEVER_COMMANDS = {"serve", "demo", "bench", "pool"}
_NEVER_OPTIONS = ("--debug", "--help", "--version", "--socket")

CLI_WORDS = [
    "volume", "create", "list", "resize", "delete", "present", "snapshot", "show",
    "expose", "unexpose", "revert", "promote", "split", "end-backup", "export", "import",
    "writers", "check", "scrub", "status", "script",
    "--host", "--json", "-q", "--quiet", "--to", "--context", "--differential", "--plex",
    "--transportable", "--set", "--volume", "--oldest", "--all", "--unexpose", "--name",
    "--mount", "--force", "-o", "--output", "--keep", "--", "-", "--x", "-z", "--name=",
    "data", "../etc", "a/b", "1G", "0", "-1", "1.5T", "99999999999999999999T", "0x19",
    "backup", "nas-rollback", "clientaccessible", _GUID, "{" + _GUID + "}", "%A%",
    "missing.xml", "missing.dsh", "out.xml", ".", "/", "host-a", "",
]
_ARG = st.one_of(st.sampled_from(CLI_WORDS), JUNK.filter(lambda s: "\x00" not in s))


def _forbidden(tok: str) -> bool:
    if tok in _NEVER_COMMANDS:
        return True
    if tok.startswith("--") and len(tok) > 2:
        name = tok.split("=", 1)[0]
        return any(opt.startswith(name) for opt in _NEVER_OPTIONS)
    return tok.startswith("-") and not tok.startswith("--") and "h" in tok


@contextlib.contextmanager
def _in_tmp() -> Iterator[None]:
    old = os.getcwd()
    os.chdir(TMP)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with _in_tmp(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(["--socket", str(NO_SOCKET), *argv])
            except SystemExit as e:   # argparse
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        sys.stdin = old_stdin
    return rc, out.getvalue(), err.getvalue()


def check_cli(argv: list[str], stdin: str = "") -> None:
    rc, out, err = run_cli(argv, stdin)
    assert rc in (1, 2), (rc, argv, err)
    assert "Traceback" not in err and "Traceback" not in out
    one_line(err.rstrip("\n"), "stderr")
    assert err.endswith("\n")


@fuzz(200, deadline_ms=5000)
@given(st.lists(_ARG, max_size=8))
def test_cli_random_argv(argv: list[str]) -> None:
    assume(not any(_forbidden(t) for t in argv))
    check_cli(argv)


@fuzz(200, deadline_ms=5000)
@given(st.sampled_from([
    ["volume", "create"], ["volume", "resize"], ["volume", "delete"], ["volume", "present"],
    ["volume", "list"], ["snapshot", "create"], ["snapshot", "list"], ["snapshot", "show"],
    ["snapshot", "delete"], ["expose"], ["unexpose"], ["revert"], ["promote"], ["split"],
    ["end-backup"], ["export"], ["import"], ["writers", "list"], ["check"], ["scrub"],
    ["status"], ["script"]]), st.lists(_ARG, max_size=6), st.sampled_from(["", "junk\n"]))
def test_cli_every_command_with_random_arguments(cmd: list[str], rest: list[str],
                                                 stdin: str) -> None:
    """Structure-aware: a real command, then random arguments (so that parsing gets past
    the command and into its checks, file reads and the connect)."""
    assume(not any(_forbidden(t) for t in rest))
    check_cli(cmd + rest, stdin)
    assert not any(p.name.endswith(".tmp") or ".tmp" in p.name for p in TMP.iterdir())


@pytest.mark.parametrize("argv", [
    ["volume", "list", "a\nb"], ["snapshot", "create", "v", "--context", "x\ny"],
    ["snapshot", "create", "v", "--context", "x\u2028y"], ["--host", "h\nx", "status"],
    ["expose", "id", "--name", "n\r\nx"], ["import", "nope\n.xml"], ["script", "a\nb"],
    ["volume", "create", "a\nb", "1\nG"], ["bogus\ncommand"], ["--bogus\nflag", "status"],
    ["import", "."], ["script", "."], ["script", "-"], ["import", "/"],
], ids=lambda a: repr(a)[:40])
@pytest.mark.timeout(60)
def test_cli_fixed_hostile_cases(argv: list[str]) -> None:
    check_cli(argv, "add volume x\x00\n")


@pytest.mark.timeout(60)
def test_cli_subprocess_has_no_traceback() -> None:
    """The real entry point, once: argv with a newline, a wrong context, no daemon."""
    import subprocess
    env = {**os.environ, "SHADOWPLEX_SOCKET": str(NO_SOCKET)}
    for argv in (["volume", "list", "x\ny"], ["snapshot", "create", "v", "--context", "a\nb"],
                 ["status"]):
        res = subprocess.run([sys.executable, "-m", "tools.cli", *argv], env=env, timeout=30,
                             capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parent.parent)
        assert res.returncode in (1, 2), res
        assert "Traceback" not in res.stderr
        one_line(res.stderr.rstrip("\n"), "stderr")


# ======================================================= (e) the server's per-op arguments
# Every op the server accepts, through Connection._dispatch (the handler, its Args checks,
# the coordinator and protocol.to_vss_error), in process: a real Pool and Coordinator in a
# temporary directory, no mountpoint (so expose --mount, loop devices and mounts are out
# of reach: nothing here touches the kernel), and a fake stream that collects the replies.
# The state every example starts from: volumes a and b, a committed app-rollback snapshot
# of a (exposed as "keep"; SNAP and SET in the vocabulary stand for its ids). A reply is
# a result or an error with a known name (never VSS_E_UNEXPECTED, i.e. no internal
# error), a one-line message, and when it is an error nothing changed (volumes,
# snapshots, sets, exposures, masking, the pool's files); nothing is logged as an error.
_ARG_GUID = "6a3f3b8e-0f62-4c43-9d0a-6c5e1c2b9a11"
# the pools of these examples: on tmpfs if there is one (fsync is free there), else TMP
_FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(TMP)


def _allowed_args() -> dict[str, tuple[str, ...]]:
    """Each op's argument names, as the server itself states them: the "(known: ...)"
    of its reply to an unknown argument (so a new argument is fuzzed without edits)."""
    from provider.control import HANDLERS

    out: dict[str, tuple[str, ...]] = {}
    for op, handler in HANDLERS.items():
        if op == "hello":     # checked in _dispatch before the session exists
            out[op] = ("host", "client", "protocol")
            continue
        try:
            trio.run(handler, None, {"\x00probe": 1}, lambda *a: None)  # type: ignore[arg-type]
        except VssError as e:
            known = e.message.rsplit("(known: ", 1)[1].rstrip(")")
            out[op] = () if known == "none" else tuple(known.split(", "))
        else:
            raise AssertionError(f"{op} accepted an unknown argument")
    return out


ALLOWED_ARGS = _allowed_args()

_HUGE = [2**63, 2**64 + 1, -(2**63) - 1, 10**40, -1, 0, 1, 511, 512, 2**31]
_ARG_VALUE = st.one_of(
    _JSON,
    JUNK,
    st.sampled_from(_HUGE),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5]),
    st.sampled_from(["a", "b", "keep", "nosuch", "SNAP", "SET", _ARG_GUID, "{SNAP}",
                     "backup", "app-rollback", "nas-rollback", "plex", "differential",
                     "transportable", "1M", "4096", "-1", "0x19", "1e3", "../a", "a/../b",
                     "..", ".", "", "/", "/etc/passwd", "/dev/loop0", "/dev/loop0\nx",
                     "a/\nb", "a\nb", "\u2028", "-rf", ".hidden", "x" * 65, "a\x00b",
                     "<?xml version='1.0'?><x/>", "hostA", "host\nB"]),
    st.lists(st.sampled_from(["a", "b", "a\nb", "", "/", "SNAP", "x" * 300]), max_size=4),
    st.dictionaries(st.sampled_from(["a", "\n", "name"]), _JSON, max_size=2),
)
_ARG_KEY_JUNK = st.sampled_from(["", " ", "\n", "name\n", "x\u2028y", "\x00", "é",
                                 "__proto__", "a" * 200, "Name", "args", "id"])


@st.composite
def op_request(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    op = draw(st.sampled_from(list(protocol.OPS)))
    known = ALLOWED_ARGS[op]
    keys = draw(st.lists(st.sampled_from(known), unique=True)) if known else []
    args: dict[str, Any] = {k: draw(_ARG_VALUE) for k in keys}
    if draw(st.integers(0, 4)) == 0:     # an unknown key now and then
        args[draw(_ARG_KEY_JUNK | JUNK)] = draw(_ARG_VALUE)
    return op, args


def _subst(v: Any, names: dict[str, str]) -> Any:
    """Put the example's real ids in place of the SNAP / SET placeholders."""
    if isinstance(v, str):
        for k, real in names.items():
            v = v.replace(k, real)
        return v
    if isinstance(v, list):
        return [_subst(x, names) for x in v]
    if isinstance(v, dict):
        return {_subst(k, names): _subst(x, names) for k, x in v.items()}
    return v


def _server_state(coord: Any) -> Any:
    pool = coord.pool
    return (repr(pool.list_volumes()), repr(pool.list_snapshots()),
            json.dumps(coord.set_list(), sort_keys=True, default=str),
            repr(sorted(coord.catalog.sets())), repr(coord.catalog.mounts()),
            repr({v.name: sorted(coord.hosts_of(v.name)) for v in pool.list_volumes()}),
            repr(coord._creating), repr(coord._marks),
            sorted(os.listdir(os.path.join(pool.path, "luns"))))


def run_ops(requests: list[tuple[str, dict[str, Any]]], first_hello: bool = False,
            where: str = _FAST_TMP) -> list[dict[str, Any]]:
    """Run ``requests`` on a fresh pool + coordinator; check every reply; return them."""
    import logging

    from blockstore import Pool
    from fuse_mount.barrier import WriteBarrier
    from provider.control import Connection
    from provider.coordinator import Coordinator

    base = Path(tempfile.mkdtemp(prefix="spx-args-", dir=where))
    pool = Pool.create(str(base / "pool"), chunk_size=65536)
    replies: list[dict[str, Any]] = []
    errors: list[logging.LogRecord] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)
    catcher = _Catch()
    logging.getLogger("provider").addHandler(catcher)
    try:
        for v in ("a", "b"):
            pool.create_volume(v, 1 << 20)
            pool.write(v, 0, v.encode() * 4096)

        async def main() -> None:
            coord = Coordinator(pool, WriteBarrier(pool), None, [], {})
            await coord.start()
            try:
                stream = _FakeStream([])
                server = type("Server", (), {"coord": coord})()
                conn = Connection(server, stream)  # type: ignore[arg-type]
                names: dict[str, str] = {}
                if not first_hello:
                    await conn._dispatch(0, "hello", {"host": "host-a", "client": "fuzz"})
                    keep = await coord.create(conn.session, ["a"], "app-rollback")
                    names["SNAP"] = keep["snapshots"][0]["snapshot_id"]
                    await coord.expose(names["SNAP"], "keep")
                    names["SET"] = keep["snapshots"][0]["snapshot_set_id"]
                for i, (op, args) in enumerate(requests, 1):
                    args = _subst(args, names)
                    before = _server_state(coord)
                    stream.sent.clear()
                    await conn._dispatch(i, op, args)
                    lines = [json.loads(x) for x in bytes(stream.sent).split(b"\n") if x]
                    lines = [r for r in lines if "progress" not in r]
                    assert len(lines) == 1, (op, args, lines)
                    r = lines[0]
                    assert r["id"] == i
                    if r["ok"] is False:
                        err = r["error"]
                        assert err["name"] in HRESULTS, (op, args, err)
                        assert err["name"] != "VSS_E_UNEXPECTED", (op, args, err)
                        one_line(err["message"], f"{op} error message")
                        assert _server_state(coord) == before, (op, args, err)
                    replies.append(r)
            finally:
                await coord.stop()
        trio.run(main)
        assert not errors, [e.getMessage() for e in errors]
        assert pool.check() == []
    finally:
        logging.getLogger("provider").removeHandler(catcher)
        pool.close()
        shutil.rmtree(base, ignore_errors=True)
    return replies


@fuzz(150, deadline_ms=10000)
@given(st.lists(op_request(), min_size=1, max_size=5))
def test_server_args_of_every_op(requests: list[tuple[str, dict[str, Any]]]) -> None:
    run_ops(requests)


@fuzz(60, deadline_ms=10000)
@given(st.dictionaries(st.sampled_from(["host", "client", "protocol"]) | _ARG_KEY_JUNK,
                       _ARG_VALUE, max_size=4), st.lists(op_request(), max_size=2))
def test_server_hello_args(args: dict[str, Any],
                           then: list[tuple[str, dict[str, Any]]]) -> None:
    """The first request of a connection: hello with hostile arguments, then anything
    (refused with "say hello first" unless the hello was accepted)."""
    run_ops([("hello", args), *then], first_hello=True)


def test_server_args_fixed_hostile_cases() -> None:
    """Every op with each argument of a wrong type, an unknown key holding line breaks,
    every key missing, and NaN / huge numbers where numbers are expected."""
    reqs: list[tuple[str, dict[str, Any]]] = []
    for op, known in ALLOWED_ARGS.items():
        reqs.append((op, {}))
        for bad_key in ("a\nb", "x\u2028y", "k\r", "\x1c", "é" * 100):
            reqs.append((op, {bad_key: 1}))
        for k in known:
            values: list[Any] = [True, 1.5, float("nan"), 2**64, -1, [], {}, {"a": [1]},
                                 "\n", "x" * 100_000]
            for v in values:
                reqs.append((op, {k: v}))
    # line breaks inside values that end up in messages (names, paths, contexts, ids)
    reqs += [("snapshot.create", {"volumes": ["a/\nb"]}),
             ("snapshot.create", {"volumes": ["/dev/loop\nx"]}),
             ("set.add", {"volume": "x/\u2028y"}),
             ("volume.present", {"name": "a/\nb", "hosts": ["h"]}),
             ("volume.present", {"name": "a", "hosts": ["h\nx"]}),
             ("volume.delete", {"name": "/a\nb"}), ("volume.create", {"name": "z\nz", "size": 512}),
             ("volume.create", {"name": "q", "size": "99999999999999999999999T"}),
             ("volume.create", {"name": "q", "size": 2**64}),
             ("volume.resize", {"name": "b", "size": "9999999T"}),
             ("snapshot.create", {"volumes": ["a"], "context": "x\ny"}),
             ("snapshot.create", {"volumes": ["a"], "attributes": ["x\ny"]}),
             ("snapshot.create", {"volumes": ["a"], "kind": "x\ny"}),
             ("expose", {"snapshot_id": "SNAP", "name": "a\nb"}),
             ("expose", {"snapshot_id": "SNAP", "mount": "/\n"}),
             ("expose", {"snapshot_id": "x\ny"}),
             ("split", {"snapshot_id": "SNAP", "name": "a\nb"}),
             ("snapshot.delete", {"oldest": "a/\nb"}), ("snapshot.list", {"volume": "a/\nb"}),
             ("snapshot.list", {"context": "\n"}), ("import", {"document": "\n"}),
             ("export", {"set_id": "\n"}), ("revert", {"snapshot_id": "{\nSNAP}"})]
    for i in range(0, len(reqs), 40):
        replies = run_ops(reqs[i:i + 40])
        for (op, args), r in zip(reqs[i:i + 40], replies):
            if op != "hello" and any(k not in ALLOWED_ARGS[op] for k in args):
                assert r["ok"] is False and "unknown argument" in r["error"]["message"]


def test_server_volume_too_large_for_the_filesystem() -> None:
    """A size Linux allows but the pool's filesystem does not (ext4: 16 TiB per file):
    one clean error, and the pool can still create volumes afterwards (it used to leave
    luns/N.img behind, and every later create failed with FileExistsError)."""
    with tempfile.TemporaryFile(dir=TMP) as f:
        try:
            os.ftruncate(f.fileno(), 64 << 40)
        except OSError:
            pass
        else:
            pytest.skip(f"the filesystem of {TMP} allows 64 TiB files")
    replies = run_ops([("volume.create", {"name": "big", "size": "64T"}),
                       ("volume.create", {"name": "small", "size": "1M"}),
                       ("volume.resize", {"name": "b", "size": "64T"})], where=str(TMP))
    assert replies[1]["ok"], replies[1]
    for r in (replies[0], replies[2]):
        assert r["ok"] is False and r["error"]["name"] == "E_INVALIDARG", r
        assert "larger than a file of the pool's file system" in r["error"]["message"]
