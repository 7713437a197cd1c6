"""`shadowplex serve` and `pool init`: the commands that run the array on this machine
(no daemon is asked). serve's settings are its flags over the --config file over the
defaults (_serve_settings); a mistake in them exits EXIT_CONFIG (78) so that systemd
does not restart into it."""

from __future__ import annotations

import argparse
import os
import sys

from provider.config import (
    CONTROL_PORT,
    DEFAULT_HOST_STATE,
    DEFAULT_RBD_STATE,
    default_socket_path,
)

from . import listing
from .errors import EXIT_OK, UsageError
from .output import PROG, one_line

TYPE_CHECKING = False   # typing.TYPE_CHECKING, without importing typing: ~2.5 ms of
if TYPE_CHECKING:       # every CLI command's start-up, for annotations only
    from typing import Any


def _serve_settings(args: argparse.Namespace) -> tuple[str, str, str, bool, dict[str, Any]]:
    """(pool, mount, socket, allow_other, service config): command-line flags over the
    --config file over the defaults. The socket: --socket, the file's `socket`,
    $SHADOWPLEX_SOCKET, DEFAULT_SOCKET (the file was named on this command line; the
    environment variable is ambient)."""
    from provider.config import ConfigError, load_file, split
    try:
        opts, config = split(load_file(args.config)) if args.config else ({}, {})
    except ConfigError as e:
        raise UsageError(str(e)) from None
    array = getattr(args, "array", None) or opts.get("array")
    pool = args.pool or opts.get("pool")
    rbd = bool(array) and str(array).startswith("rbd:")
    ceph_conf = args.ceph_conf or opts.get("ceph_conf")
    if array:   # host mode or Ceph: no pool here; --state-dir holds the catalog
        if pool:
            raise UsageError(f"serve --array {array} serves that array's LUNs: drop "
                             "--pool (the provider's state goes to --state-dir)")
        pool = args.state_dir or opts.get("state_dir") or (
            DEFAULT_RBD_STATE if rbd else DEFAULT_HOST_STATE)
        config["array"] = array
        if rbd:
            if not str(array)[4:]:
                raise UsageError("serve --array rbd:POOL: name the RBD pool")
            if not ceph_conf:
                raise UsageError("serve --array rbd:POOL needs --ceph-conf FILE (the "
                                 "cluster's ceph.conf; docs/ceph.md)")
            host = args.ceph_host or opts.get("ceph_host")
            from provider.documents import valid_host
            if host is not None and not valid_host(host):
                raise UsageError(f"--ceph-host {host!r}: not a host name (letters, digits, "
                                 "'-', '_' in dot-separated labels, at most 253 "
                                 "characters)")
            config["ceph"] = (os.path.abspath(ceph_conf),
                              args.ceph_id or opts.get("ceph_id"), host)
    elif ceph_conf or args.ceph_id or args.ceph_host:
        raise UsageError("--ceph-conf/--ceph-id/--ceph-host are for serve --array "
                         "rbd:POOL")
    elif args.state_dir:
        raise UsageError("--state-dir is for host mode (serve --array HOST); a pool "
                         "keeps its state in the pool directory")
    mount = args.mount or opts.get("mount")
    for value, flag in ((pool, "pool"), (mount, "mount")):
        if not value:
            raise UsageError(f"serve needs --{flag} DIR (or '{flag} = \"DIR\"' in the "
                             "--config file)")
    sock = args.socket or opts.get("socket") or default_socket_path()
    allow_other = bool(opts.get("allow_other", False) if args.allow_other is None
                       else args.allow_other)
    if args.default_kind:
        config["default_kind"] = args.default_kind
    if args.hooks_dir is not None:
        config["hooks_dir"] = os.path.abspath(args.hooks_dir) if args.hooks_dir else None
    if args.sqlite_db:   # the flags replace the file's list (as for every other key)
        config["sqlite_databases"] = [os.path.abspath(p) for p in args.sqlite_db]
    # popped again by cmd_serve: not service keys
    level = args.log_level or opts.get("log_level")
    if level:
        config["log_level"] = level
    log_file = os.path.abspath(args.log_file) if args.log_file else opts.get("log_file")
    if log_file:
        config["log_file"] = log_file
    poll = args.poll_us if args.poll_us is not None else opts.get("poll_us")
    if poll is not None:
        config["poll_us"] = poll   # popped again by cmd_serve: not a service key
    tls_dir = getattr(args, "tls_dir", None) or opts.get("tls_dir")
    tls_dir = os.path.abspath(tls_dir) if tls_dir else None
    listen = args.nbd_listen or opts.get("nbd_listen")
    control = args.control_listen or opts.get("control_listen")
    from nbd.settings import SettingsError, parse_listen, settings
    try:
        if listen:   # popped again by cmd_serve: not a service key
            insecure = bool(opts.get("nbd_insecure", False) if args.nbd_insecure is None
                            else args.nbd_insecure)
            config["nbd"] = settings(listen, tls_dir, insecure)
        elif args.nbd_insecure:
            raise UsageError("--nbd-insecure configures the NBD port: give "
                             "--nbd-listen ADDR[:PORT] too")
        if control:
            if tls_dir is None:
                raise UsageError("--control-listen needs --tls-dir DIR: the network "
                                 "control port is TLS only")
            config["control_listen"] = (*parse_listen(control, CONTROL_PORT), tls_dir)
    except SettingsError as e:
        raise UsageError(str(e)) from None
    if array and not rbd and (listen or control):
        raise UsageError("a host daemon (serve --array) opens no network port: the "
                         "array's own daemon serves NBD and the control API")
    if tls_dir and not (listen or control or array):
        raise UsageError("--tls-dir configures the network ports: give --nbd-listen "
                         "and/or --control-listen too")
    if array and not rbd:
        if not tls_dir:
            raise UsageError("serve --array needs --tls-dir DIR: this host's certificate "
                             "('shadowplex pki host NAME DIR') is its identity at the array")
        config["tls_dir"] = tls_dir
    assert pool and mount   # (checked above)
    return str(pool), str(mount), str(sock), allow_other, config


def cmd_serve(args: argparse.Namespace) -> int:
    """Configuration errors exit EXIT_CONFIG (78), not 2: systemd's Restart=on-failure
    must not retry what a restart cannot cure (contrib/shadowplex.service)."""
    from provider.config import EXIT_CONFIG
    try:
        pool, mount, sock, allow_other, config = _serve_settings(args)
    except UsageError as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_CONFIG
    from provider.daemon import serve
    from provider.service import make_service
    # No directory is made here: the control service creates the socket's directory
    # (/run/shadowplex by default) when it binds, i.e. only after serve() has checked the
    # mount directory and opened the pool, so a mistyped command leaves nothing behind.
    # resolved now, before the mount exists: later lookups stay lexical (make_service)
    mount = os.path.realpath(mount)
    poll = config.pop("poll_us", None)
    nbd = config.pop("nbd", None)
    array, tls_dir = config.pop("array", None), config.pop("tls_dir", None)
    ceph = config.pop("ceph", None)
    log_level, log_file = config.pop("log_level", None), config.pop("log_file", None)
    svc = make_service(sock, mount, config)
    return serve(pool, mount, sock, True, services=[svc], debug=args.debug,
                 allow_other=allow_other, nbd=nbd, array=array, tls_dir=tls_dir, ceph=ceph,
                 log_level=log_level, log_file=log_file,
                 **({} if poll is None else {"poll_us": poll}))


def cmd_pool_init(args: argparse.Namespace) -> int:
    from blockstore import Pool, parse_size
    pool = Pool.create(args.dir, chunk_size=parse_size(args.chunk_size))
    info = {"path": pool.path, "pool_id": pool.pool_id, "chunk_size": pool.chunk_size,
            # how snapshots preserve overwritten chunks: by reference on xfs (reflink=1)
            # and btrfs, else by copying (docs/format.md)
            "preserve": pool.preserve_mode}
    pool.close()
    listing.emit(args, info)
    return EXIT_OK
