"""The control-socket service of `shadowplex serve`: coordinator + control server.

provider/daemon.py starts extra services in its nursery as ``svc(pool, barrier, nursery,
mount)`` once the FUSE mount is up; bind the rest with functools.partial:

    from provider.service import control_service
    svc = functools.partial(control_service, socket_path=path, mountpoint=mount,
                            config={"default_kind": "differential"})
    serve(pool_dir, mount, path, services=[svc])

or use ``make_service(socket_path, mountpoint, config)`` which does exactly that.

`python -m provider.service --pool DIR --mount DIR [--socket PATH] [--config FILE|JSON]`
runs the daemon with this service (what `shadowplex serve` does); --config takes the keys
checked by provider/config.py, from a TOML file or a JSON object.

config keys (all optional): default_kind ("differential" | "plex"), freeze_timeout (s),
hold_deadline (s), writer_timeout (s), revert_hold (s), socket_mode (int, default 0o600),
writers (a list of writer objects; default: provider.writers.default_writers(config),
which reads fsfreeze, hooks_dir, hook_timeout, sqlite_databases).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from fuse_mount.presentation import LiveMount

from .array import Array
from .config import CONTROL_PORT
from .control import ControlServer
from .coordinator import Coordinator
from .protocol import default_socket_path
from .writers import default_writers

if TYPE_CHECKING:   # daemon.py loads pyfuse3: not needed to import this module
    from .daemon import Service

log = logging.getLogger(__name__)


async def control_service(pool: Array, barrier: Any, nursery: trio.Nursery,
                          mount: LiveMount | None = None,
                          socket_path: str | None = None, mountpoint: str | None = None,
                          config: dict[str, Any] | None = None,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the coordinator and the control socket until cancelled.

    On the way out every requester session ends (auto-release sets are deleted) and the
    socket file is removed. ``nursery`` is the daemon's (unused: everything here lives in
    this task's own nursery, so it stops as one piece).
    """
    cfg = dict(config or {})
    writers = cfg.pop("writers", None)
    if writers is None:
        writers = default_writers({**cfg, "mount": mountpoint})
    mode = int(cfg.pop("socket_mode", 0o600))
    listen = cfg.pop("control_listen", None)         # (host, port, tls_dir) or None
    path = socket_path or default_socket_path(pool.path)
    coord = Coordinator(pool, barrier, mountpoint, writers, cfg, mount=mount)
    try:   # a start that fails closes the catalog too (it holds it exclusively)
        await coord.start()
        server = ControlServer(coord, path, mode)
        await server.open()
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            n.start_soon(_expire_host_leases, coord)
            if listen is not None:
                await _serve_network(n, server, *listen)
            task_status.started(coord)
    finally:
        with trio.CancelScope(shield=True):
            await coord.stop()


async def _expire_host_leases(coord: Coordinator) -> None:
    """A host daemon that stops renewing its claim on the set-in-creation slot (hung,
    or cut off by the network) loses it within a second of its lease's end."""
    while True:
        await trio.sleep(1.0)
        await coord.host_sets.expire()


async def _serve_network(nursery: trio.Nursery, server: ControlServer, host: str, port: int,
                         tls_dir: str) -> None:
    from nbd.tls import peer_host_name, server_context

    from .documents import valid_host
    own = server.coord.service_machine

    def identify(cert: dict) -> str:
        name = peer_host_name(cert, valid_host)
        if name == own:   # the administrator's name: never a remote identity
            raise ValueError(f"a client certificate names the array's own host {own}")
        return name
    listeners = await nursery.start(server.serve_tls, host, port, server_context(tls_dir),
                                    identify)
    log.info("control port open on %s (TLS, client certificates)", ", ".join(
        "{}:{}".format(*ln.socket.getsockname()[:2]) for ln in listeners))


def make_service(socket_path: str | None, mountpoint: str | None,
                 config: dict[str, Any] | None = None) -> Service:
    """Call it before the mount is up: the mount point is realpath'ed here, once, because
    the writers and in-use checks compare paths below it as text (a stat there would be
    a request to the daemon itself; an unresolved path would silently match nothing)."""
    real = os.path.realpath(mountpoint) if mountpoint else None
    return functools.partial(control_service, socket_path=socket_path,
                             mountpoint=real, config=config)


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError, load, split
    from .daemon import build_parser, serve

    p: argparse.ArgumentParser = build_parser(paths_required=False)
    p.prog = "python -m provider.service"
    p.add_argument("--default-kind", choices=("differential", "plex"),
                   help="automagic snapshot kind (default differential)")
    p.add_argument("--config", metavar="FILE|JSON",
                   help="a TOML file (contrib/shadowplex.toml) or a JSON object of the same "
                        "keys (provider/config.py), e.g. '{\"hooks_dir\": null}'; "
                        "command-line flags win")
    args = p.parse_args(argv)
    try:
        serve_opts, config = split(load(args.config)) if args.config else ({}, {})
    except ConfigError as e:
        p.error(str(e))
    pool = args.pool or serve_opts.get("pool")
    mount = args.mount or serve_opts.get("mount")
    if not pool or not mount:
        p.error("--pool and --mount are required (as options or in the --config file)")
    if args.default_kind:
        config["default_kind"] = args.default_kind
    sock = args.socket or serve_opts.get("socket") or default_socket_path(pool)
    if serve_opts.get("control_listen"):
        from nbd.settings import SettingsError, parse_listen
        if not serve_opts.get("tls_dir"):
            p.error("control_listen needs tls_dir (the control port is TLS only)")
        try:
            host, port = parse_listen(serve_opts["control_listen"], CONTROL_PORT)
        except SettingsError as e:
            p.error(str(e))
        config["control_listen"] = (host, port, serve_opts["tls_dir"])
    nbd = None
    if serve_opts.get("nbd_listen"):
        from nbd.settings import SettingsError, settings
        try:
            nbd = settings(serve_opts["nbd_listen"], serve_opts.get("tls_dir"),
                           bool(serve_opts.get("nbd_insecure")))
        except SettingsError as e:
            p.error(str(e))
    svc = make_service(sock, mount, config)   # realpath'ed there, before the mount is up
    return serve(pool, mount, sock, args.foreground, services=[svc], debug=args.debug,
                 allow_other=args.allow_other or bool(serve_opts.get("allow_other")),
                 nbd=nbd, log_level=args.log_level or serve_opts.get("log_level"),
                 log_file=args.log_file or serve_opts.get("log_file"))


if __name__ == "__main__":
    sys.exit(main())
