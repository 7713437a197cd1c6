"""Validation of user-supplied names, sizes and ids (one place, clear messages)."""

import re
import uuid

from .errors import InvalidName, InvalidSize, NotFound

# The one volume-name rule (exposure and split-target names follow it too). The characters:
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SECTOR = 512
# the largest size a file can have on Linux (off_t is 64-bit signed), in whole sectors;
# a filesystem may allow less (ext4 with 4 KiB blocks: 16 TiB)
MAX_SIZE = (1 << 63) - SECTOR


def is_name(name: object) -> bool:
    """Can ``name`` be the name of an existing volume: NAME_RE, not starting with '.'.

    A leading '-' passes here: check_name refuses it for NEW names, but names made before
    that rule still open, so what refers to an existing volume (an exported document's
    volume, a script's `add volume NAME`) accepts them. The provider layer and tools use
    this and check_name, not copies of the pattern."""
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) \
        and not name.startswith(".")


def is_new_name(name: object) -> bool:
    """Can ``name`` be given to a new volume, exposure or split target (check_name)."""
    return is_name(name) and not str(name).startswith("-")


def check_name(name: str, what: str = "volume") -> str:
    """A new name (volume, exposure, split target). Not starting with '.' (hidden, and
    '.'/'..') nor with '-' (every command line, ours and losetup's, would take it for an
    option; lvm and zfs refuse such names too). Names made before that rule still open."""
    if not is_new_name(name):
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-'"
        )
    return name


def check_size(size: int, what: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % SECTOR:
        raise InvalidSize(f"invalid {what} {size!r}: must be a positive multiple of {SECTOR} bytes")
    if size > MAX_SIZE:
        raise InvalidSize(f"invalid {what} {size}: more than {MAX_SIZE} bytes (8 EiB), the "
                          "largest file Linux allows")
    return size


def check_guid(text: str, what: str = "snapshot id") -> str:
    """Canonical lower-case GUID without braces; NotFound for anything else."""
    if isinstance(text, str):
        try:
            return str(uuid.UUID(text.strip("{}")))
        except ValueError:
            pass
    raise NotFound(f"no {what} {text!r}: ids are GUIDs like 8c3e...-....")


SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'10G', '512M', '4096', '1T', '64KiB' -> bytes (binary units, like qemu-img)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InvalidSize(f"invalid size {text!r}: use a number with an optional K/M/G/T suffix")
    return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
