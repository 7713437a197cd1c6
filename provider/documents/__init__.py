"""Backup Components Documents and Writer Metadata Documents (VSS XML), written and read.

A transportable snapshot set leaves its origin host as a *Backup Components Document*
(BCD) plus one *Writer Metadata Document* (WMD) per writer, in the element and attribute
names VSS uses, so the files read like the ones ``vshadow -t`` / ``diskshadow`` save:

* :func:`write_backup_components` / :func:`parse_backup_components`
* :func:`write_writer_metadata` / :func:`parse_writer_metadata`

docs/documents.md lists, element by element, the subset written and read, where each name
comes from, and what import verifies.

Documents are **hostile input**: parsed with defusedxml, DTDs forbidden, within size,
encoding, depth and element-count limits, their structure checked completely before
anything is returned; every rejection is a :class:`DocumentError` (a
:class:`provider.vss.VssError`) with a one-line message naming what was wrong.

Pure Python, no I/O: callers read and write the files. The package, by seam:

* ``xmlsafe``  the limits, DocumentError, the guarded loader (the hostile-input rules)
* ``model``    the names and values written, the parse results, SetLike/SnapshotLike,
               the small checks both directions share (GUID, naa, host, page 83)
* ``write``    the two writers (each parses its document back before returning it)
* ``parse``    the two parsers and their structure checks

Callers import from ``provider.documents`` (this module re-exports what they use).
"""

from __future__ import annotations

from .model import (
    BCD_NAMESPACE,
    PRODUCT_ID,
    SP_NAMESPACE,
    VENDOR_ID,
    WMD_NAMESPACE,
    ComponentRef,
    ParsedSet,
    ParsedSnapshot,
    SetLike,
    SnapshotLike,
    WriterComponents,
    valid_host,
)
from .model import _storage_device_id as _storage_device_id  # tests build page-83 ids
from .parse import parse_backup_components, parse_writer_metadata
from .write import write_backup_components, write_writer_metadata
from .xmlsafe import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_ELEMENTS, DocumentError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "BCD_NAMESPACE",
    "WMD_NAMESPACE",
    "SP_NAMESPACE",
    "VENDOR_ID",
    "PRODUCT_ID",
    "DocumentError",
    "ComponentRef",
    "WriterComponents",
    "ParsedSnapshot",
    "ParsedSet",
    "SetLike",
    "SnapshotLike",
    "valid_host",
    "write_backup_components",
    "parse_backup_components",
    "write_writer_metadata",
    "parse_writer_metadata",
]
