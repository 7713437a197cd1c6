"""The hostile-input side of the documents: the limits, the refusal type, the one loader.

Documents are **hostile input**: they are parsed with defusedxml, DTDs forbidden (so no
entity expansion and no external fetch is ever possible), after a 16 MiB size cap and a
UTF-8-only check, with limits on nesting depth and element count (the tree builder
refuses them as the elements arrive, before the tree grows), and their structure is
checked completely (provider/documents/parse.py) before anything is returned. Every
rejection is a :class:`DocumentError` (a :class:`provider.vss.VssError`) with a one-line
message naming what was wrong; :func:`_load` is the one place a document is parsed, so no
exception of an XML library ever leaves the package.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import defusedxml  # type: ignore[import-untyped]
import defusedxml.ElementTree as DET  # type: ignore[import-untyped]

from ..config import MAX_DOCUMENT_BYTES as MAX_DOCUMENT_BYTES
from ..vss import VssError

# --------------------------------------------------------------------------- limits
#: Largest document accepted, checked before any parsing: MAX_DOCUMENT_BYTES (16 MiB,
#: defined in provider/config.py, which the control protocol's client imports cheaply).
#: Deepest element nesting accepted. A BCD needs 6 levels (BACKUP_COMPONENTS >
#: SNAPSHOT_SET_DESCRIPTION > SNAPSHOT_DESCRIPTION > LUN_MAPPING > SOURCE_LUN >
#: LUN_INFORMATION), a WMD 4; Windows documents nest a little deeper in places we skip.
MAX_DEPTH = 32
#: Most elements accepted in one document (a full 64-volume set is under 500).
MAX_ELEMENTS = 100_000
#: Most attributes on one element, and longest attribute value kept.
MAX_ATTRIBUTES = 64
MAX_TEXT = 4096


# characters refused in attribute values (and in the text we write)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_ENCODING_DECL_RE = re.compile(rb"""encoding[ \t\r\n]*=[ \t\r\n]*(["'])([^"']{0,40})\1""")
_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"),
         (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16"))


# --------------------------------------------------------------------------- errors
class DocumentError(VssError):
    """A document was refused (or could not be written).

    ``name`` is the VSS error name (see docs/documents.md):

    * VSS_E_INVALID_XML_DOCUMENT: not a well-formed, UTF-8, DTD-free document within the
      limits, or its structure is wrong (the name Microsoft documents for "the load
      operation of the specified XML document failed");
    * VSS_E_NONTRANSPORTABLE_BCD: the BCD describes no transportable set (no
      SNAPSHOT_SET_DESCRIPTION, or TRANSPORTABLE missing from the attributes);
    * VSS_E_UNSUPPORTED_CONTEXT: the set's context is not one shadowplex creates;
    * VSS_E_NO_SNAPSHOTS_IMPORTED: the LUNs belong to another pool or another provider.

    ``reason`` is a short stable key for programs and tests: "type", "size",
    "encoding", "syntax", "dtd", "limits", "structure", "transportable", "context",
    "pool", "provider", "export".
    """

    reason: str

    def __init__(self, message: str, *, name: str = "VSS_E_INVALID_XML_DOCUMENT",
                 reason: str = "structure") -> None:
        super().__init__(name, message)
        self.reason = reason


def _err(message: str, reason: str = "structure",
         name: str = "VSS_E_INVALID_XML_DOCUMENT") -> DocumentError:
    return DocumentError(message, name=name, reason=reason)


def _show(value: object, limit: int = 60) -> str:
    """A value for a one-line message: repr, control characters escaped, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# --------------------------------------------------------------------------- parsing
class _LimitExceeded(Exception):
    pass


class _LimitedTreeBuilder:
    """A TreeBuilder target that refuses deep nesting and too many elements as they
    arrive (before the tree grows), so nothing downstream ever recurses deeply."""

    def __init__(self) -> None:
        self._tb = ET.TreeBuilder()
        self._depth = 0
        self._count = 0

    def start(self, tag: str, attrs: dict[str, str]) -> ET.Element:
        self._depth += 1
        self._count += 1
        if self._depth > MAX_DEPTH:
            raise _LimitExceeded(f"elements are nested deeper than {MAX_DEPTH} levels")
        if self._count > MAX_ELEMENTS:
            raise _LimitExceeded(f"more than {MAX_ELEMENTS} elements")
        if len(attrs) > MAX_ATTRIBUTES:
            raise _LimitExceeded(f"an element has {len(attrs)} attributes, more than "
                                 f"{MAX_ATTRIBUTES}")
        return self._tb.start(tag, attrs)

    def end(self, tag: str) -> ET.Element:
        self._depth -= 1
        return self._tb.end(tag)

    def data(self, data: str) -> None:
        self._tb.data(data)

    def close(self) -> ET.Element:
        return self._tb.close()


def _load(data: object, what: str) -> ET.Element:
    """Checks before parsing, then a defused parse. Returns the root element."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _err(f"{what}: expected bytes, got {type(data).__name__}", "type")
    raw = bytes(data)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _err(f"{what} is {len(raw)} bytes, more than the {MAX_DOCUMENT_BYTES >> 20} "
                   "MiB limit: this is not a document shadowplex wrote", "size")
    if not raw.strip():
        raise _err(f"{what} is empty", "syntax")
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            raise _err(f"{what} is {enc}-encoded: shadowplex reads UTF-8 only (convert it "
                       f"with: iconv -f {enc} -t UTF-8)", "encoding")
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    if b"\x00" in body:
        raise _err(f"{what} contains NUL bytes: it is not UTF-8 text (UTF-16? convert it "
                   "with: iconv -f UTF-16 -t UTF-8)", "encoding")
    try:
        body.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise _err(f"{what} is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                   f"{e.start})", "encoding") from None
    if body.startswith(b"<?xml"):
        end = body.find(b"?>", 0, 512)
        decl = body[: end if end >= 0 else 512]
        m = _ENCODING_DECL_RE.search(decl)
        if m is not None and m.group(2).lower() not in (b"utf-8", b"utf8"):
            raise _err(f"{what} declares encoding {m.group(2).decode('ascii', 'replace')!r}:"
                       " shadowplex reads UTF-8 only", "encoding")
    target = _LimitedTreeBuilder()
    parser = DET.XMLParser(target=target, forbid_dtd=True, forbid_entities=True,
                           forbid_external=True)
    try:
        parser.feed(raw)
        root = parser.close()
    except defusedxml.DTDForbidden:
        raise _err(f"{what} has a DOCTYPE: DTDs are refused (they allow entity expansion "
                   "and external references)", "dtd") from None
    except defusedxml.EntitiesForbidden:
        raise _err(f"{what} declares entities: refused", "dtd") from None
    except defusedxml.ExternalReferenceForbidden:
        raise _err(f"{what} references an external resource: refused", "dtd") from None
    except defusedxml.DefusedXmlException as e:
        raise _err(f"{what} was refused by the XML guard: {type(e).__name__}",
                   "dtd") from None
    except _LimitExceeded as e:
        raise _err(f"{what} exceeds the parser limits: {e}", "limits") from None
    except ET.ParseError as e:
        raise _err(f"{what} is not well-formed XML ({_one_line(str(e))}): truncated or "
                   "damaged?", "syntax") from None
    except (UnicodeError, ValueError, LookupError) as e:
        raise _err(f"{what} cannot be decoded: {_one_line(str(e))}", "encoding") from None
    except RecursionError:
        raise _err(f"{what} is nested too deeply", "limits") from None
    if not isinstance(root, ET.Element):
        raise _err(f"{what} has no root element", "syntax")
    return root


def _one_line(text: str) -> str:
    return _CONTROL_RE.sub(" ", text)[:200]


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag
