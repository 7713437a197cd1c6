"""The daemon's configuration: one set of keys for a TOML file and a JSON object.

`shadowplex serve --config FILE.toml` and `python -m provider.service --config FILE.toml`
(or `--config '{"hooks_dir": null}'`, a JSON object) read the same keys, checked here:

  serve keys (tools/serving.py / provider/service.py use them; command-line flags win):
    pool, mount, socket (str: paths), allow_other (bool), poll_us (microseconds the
    FUSE loop polls for the next request before it sleeps, 0..1000; 0: never),
    nbd_listen (str: ADDR[:PORT] of the NBD port), tls_dir (str: its certificates),
    nbd_insecure (bool: plain text on loopback), control_listen (str: ADDR[:PORT] of
    the TLS control port, with tls_dir); host mode (issue 16): array (str:
    HOST[:PORT] of the array's control port, with tls_dir: this host's certificate),
    state_dir (str: this host's catalog; default DEFAULT_HOST_STATE), log_level
    ("debug" | "info" | "warning" | "error"), log_file (str: append the log there
    instead of stderr); Ceph (issue 18): array "rbd:POOL" with ceph_conf (str:
    ceph.conf), ceph_id (str), ceph_host (str: this host's name in the images'
    presentation, default the hostname), state_dir (default DEFAULT_RBD_STATE)
  service keys (passed to provider.service.control_service(config=...), see
  docs/provider.md "Configuration"):
    default_kind ("differential" | "plex"), freeze_timeout, hold_deadline, writer_timeout,
    revert_hold, hook_timeout (seconds, > 0), socket_mode (int, 0..0o777),
    fsfreeze (bool), hooks_dir (str; "" or JSON null: no hook writers),
    sqlite_databases (list of str)

Relative paths in a TOML file are relative to the file's directory (a systemd unit runs
in /, so "relative to the current directory" would mean nothing useful); in a JSON
object given on the command line they are relative to the current directory.

Anything else (an unknown key, a wrong type, a TOML syntax error, an unreadable file) is
a ConfigError with ONE line naming the file, the key and what is expected; `shadowplex
serve` exits EXIT_CONFIG (78) then, `python -m provider.service` 2 (a usage error).

The control socket when none is named is default_socket_path()'s, the one rule every
entry point (the CLI, `python -m provider.service`, control_service, Client) follows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any

SERVE_KEYS = ("pool", "mount", "socket", "allow_other", "poll_us", "nbd_listen",
              "nbd_insecure", "tls_dir", "control_listen", "array", "state_dir",
              "ceph_conf", "ceph_id", "ceph_host", "log_level", "log_file")
PATH_KEYS = ("pool", "mount", "socket", "hooks_dir", "tls_dir", "state_dir", "ceph_conf",
             "log_file")
SECONDS_KEYS = ("freeze_timeout", "hold_deadline", "writer_timeout", "revert_hold",
                "hook_timeout")
KINDS = ("differential", "plex")

# `serve`'s exit status for a configuration error (sysexits.h EX_CONFIG): a bad or
# contradictory setting, a pool or mount directory that is missing or is not one. A
# restart cannot cure it: contrib/shadowplex.service has RestartPreventExitStatus=78.
EXIT_CONFIG = 78
LOG_LEVELS = ("debug", "info", "warning", "error")

CONTROL_PORT = 10810   # the network control port's default (the NBD port's + 1)
SOCKET_ENV = "SHADOWPLEX_SOCKET"
SOCKET_DIR = "/run/shadowplex"
DEFAULT_SOCKET = os.path.join(SOCKET_DIR, "shadowplex.sock")
DEFAULT_HOST_STATE = "/var/lib/shadowplex/host"   # a host daemon's catalog (serve --array)
DEFAULT_RBD_STATE = "/var/lib/shadowplex/rbd"     # the catalog with serve --array rbd:POOL
# Largest Backup Components / Writer Metadata Document accepted (the issue fixes 16 MiB;
# provider/documents/xmlsafe.py applies it). Here so that the control protocol and its
# client know it without importing the documents package (the CLI's start-up time).
MAX_DOCUMENT_BYTES = 16 << 20


def default_socket_path(pool_dir: str | None = None) -> str:
    """The control socket when none is named (``--socket``, a --config file's ``socket``,
    a Client's ``socket_path``), for the daemon and its requesters alike:

    1. ``$SHADOWPLEX_SOCKET`` if set;
    2. else, given the pool directory, that pool's own socket
       ``/run/shadowplex/<first 16 hex of sha256(realpath(pool))>.sock``: what
       `python -m provider.service --pool P`, control_service() and ``Client(pool=P)``
       use, so daemons of several pools started that way do not collide;
    3. else DEFAULT_SOCKET, ``/run/shadowplex/shadowplex.sock``: what the `shadowplex`
       CLI uses, `serve` included (its other commands do not know the pool, and the
       two must meet).
    """
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    if pool_dir is None:
        return DEFAULT_SOCKET
    import hashlib  # here: every CLI command imports this module (its start-up time)
    digest = hashlib.sha256(os.path.realpath(pool_dir).encode()).hexdigest()[:16]
    return os.path.join(SOCKET_DIR, f"{digest}.sock")


class ConfigError(ValueError):
    """A bad configuration: one line (file, key, what is expected)."""


def _is_number(v: Any) -> bool:
    # bool is an int in Python; `freeze_timeout = true` is a mistake, not 1 second
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check(key: str, v: Any) -> str | None:
    """None if v is a valid value for key, else what is expected."""
    if key in ("pool", "mount", "socket", "tls_dir", "state_dir", "ceph_conf", "log_file"):
        return None if isinstance(v, str) and v else "a non-empty path string"
    if key == "ceph_id":
        return None if isinstance(v, str) and v else "a Ceph client id string"
    if key == "ceph_host":
        return None if isinstance(v, str) and v else "a host name string"
    if key in ("nbd_listen", "control_listen", "array"):
        return None if isinstance(v, str) and v else "an address ADDR[:PORT] string"
    if key == "log_level":
        return None if v in LOG_LEVELS else " or ".join(f'"{x}"' for x in LOG_LEVELS)
    if key == "hooks_dir":
        return None if v is None or isinstance(v, str) else "a directory path string"
    if key in ("allow_other", "fsfreeze", "nbd_insecure"):
        return None if isinstance(v, bool) else "true or false"
    if key == "poll_us":
        return None if _is_number(v) and 0 <= v <= 1000 else "microseconds, 0..1000"
    if key in SECONDS_KEYS:
        return None if _is_number(v) and v > 0 else "a positive number of seconds"
    if key == "socket_mode":
        return (None if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o777
                else "an integer mode 0..0o777 (e.g. 0o660)")
    if key == "default_kind":
        return None if v in KINDS else "\"differential\" or \"plex\""
    if key == "sqlite_databases":
        return (None if isinstance(v, list) and all(isinstance(p, str) and p for p in v)
                else "a list of database path strings")
    raise AssertionError(f"no check for {key}")   # KNOWN_KEYS and _check disagree


KNOWN_KEYS = (*SERVE_KEYS, "default_kind", *SECONDS_KEYS, "socket_mode", "fsfreeze",
              "hooks_dir", "sqlite_databases")


def validate(data: Mapping[str, Any], source: str,
             base_dir: str | None = None) -> dict[str, Any]:
    """Check every key of ``data``; return a copy with paths made absolute (relative to
    ``base_dir``, default the current directory). ConfigError on the first problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table/object of settings, "
                          f"got {type(data).__name__}")
    base = base_dir or os.getcwd()
    out: dict[str, Any] = {}
    for key, v in data.items():
        if key not in KNOWN_KEYS:
            if isinstance(v, Mapping):
                hint = " (the file has no [sections]: write the keys at the top level)"
            else:
                hint = ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; known keys: "
                              f"{', '.join(KNOWN_KEYS)}")
        want = _check(key, v)
        if want is not None:
            raise ConfigError(f"{source}: {key} must be {want}, not {_show(v)}")
        if key in PATH_KEYS and isinstance(v, str):
            v = os.path.normpath(os.path.join(base, v)) if v else None
        elif key == "sqlite_databases":
            v = [os.path.normpath(os.path.join(base, p)) for p in v]
        elif key in SECONDS_KEYS:
            v = float(v)
        out[key] = v
    return out


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def load_file(path: str) -> dict[str, Any]:
    """Read and check a TOML configuration file (stdlib tomllib)."""
    import tomllib  # here, not at the top: only serve reads a file (the CLI's start-up)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:   # tomllib decodes as UTF-8 and raises this for bad bytes
        raise ConfigError(f"{path}: not a UTF-8 TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    return validate(data, path, os.path.dirname(os.path.abspath(path)))


def load_json(text: str, source: str = "--config") -> dict[str, Any]:
    """Parse and check a JSON object given on the command line."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{source}: not a JSON object: {e}") from None
    return validate(data, source)


def load(value: str) -> dict[str, Any]:
    """`--config VALUE`: a JSON object if it starts with `{`, else a TOML file path."""
    return load_json(value) if value.lstrip().startswith("{") else load_file(value)


def split(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(serve options, service config) of a validated configuration."""
    serve = {k: v for k, v in cfg.items() if k in SERVE_KEYS}
    service = {k: v for k, v in cfg.items() if k not in SERVE_KEYS}
    return serve, service

