"""RemoteArray: the Array interface (provider/array.py) of a shadowplex array on another
machine, for host mode (`serve --array HOST[:PORT] --tls-dir DIR`, issue 16).

    metadata   the array's TLS control port (provider/array_service.py): array.info
               once, array.list for the LUNs presented to this host (its certificate's
               CN), array.watch in a thread of its own to follow changes
    data       the array's NBD port, TLS with the same certificate (nbd/client.py):
               one connection per LUN and worker, opened on first use

The FUSE mount reads ``generation``, ``lun_size`` and the listings on its trio thread,
per request: they come from the copy of the array's listing held here, never from the
network. The watcher thread replaces that copy (and bumps ``generation``) when the
array's listing for this host changes; an operation of this host that changes the
listing refreshes it before it returns, so the mount shows its effect at once.

Reads and writes block on the network: ``blocking_io`` tells the mount to run them in
worker threads (fuse_mount/operations.py), where they would otherwise stall every
other request on the trio thread for a round trip.

Errors: an NBD error reply is an OSError with its errno (EPERM on a read-only LUN, EIO,
ENOSPC...), which fuse_mount/errors.py maps like a pool's. The data path's connections,
its path-loss retries (PATH_TIMEOUT, then EIO) and its honest flushes are
provider/san_paths.py's. The control connection is reopened when it broke; only
queries are asked again (docs/hosts.md, "Failures").

Set creation: the host's coordinator claims the array's one set-in-creation slot
(``claim_set``, a lease renewed by a thread), prepares and commits through the array
(array.prepare / array.commit: the array's barrier holds every host's writers while it
commits) and releases the slot (``release_set``). Deletion, exposure, export/import,
snapshot diff and revert go through the array too. Not (each raises
blockstore.errors.Unsupported with a line saying so): promote, split, volume
administration (the array's own host does it), check and scrub (the array's own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from blockstore import errors as bse
from blockstore.model import Capabilities, Kind, SnapshotInfo, State, VolumeInfo
from nbd.exports import SHADOW, VOLUMES

from .client import Client, ControlError
from .san_paths import RETRY_PAUSE, SanPaths, seconds_from_env
from .vss import VssError

log = logging.getLogger(__name__)


LEASE = seconds_from_env("SHADOWPLEX_SET_LEASE", 30.0)   # s the array keeps this host's
                            # set-in-creation slot unrenewed (it takes 5..300)
WATCH_TIMEOUT = 25.0        # s an array.watch long poll waits at the array
ALLOC_TTL = 2.0             # s a host trusts the array's allocation figures (du, listings)
                            # before it fetches them again, in the background
# control ops that only ask: repeated once on a new connection if the first one broke
QUERIES = frozenset({"array.info", "array.list", "array.watch"})
# a control connection that is gone (the client's names for it)
_LOST = frozenset({"VSS_E_REMOTE_SERVER_UNAVAILABLE", "VSS_E_PROVIDER_NOT_REGISTERED"})


def _volume(d: dict[str, Any]) -> VolumeInfo:
    return VolumeInfo(**d)


def _snapshot(d: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(**{**d, "kind": Kind(d["kind"]), "state": State(d["state"])})


class RemoteArray:
    """An array reached over the network (see the module docstring)."""

    blocking_io = True

    def __init__(self, array: str, tls_dir: str, state_dir: str,
                 client: str = "shadowplex host") -> None:
        self.array, self.tls_dir = array, tls_dir
        self._state_dir = os.path.abspath(state_dir)
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        self._client_name = client
        self._lock = threading.Lock()          # the control connection, one call at a time
        self._control = self._connect()
        self._control_ok = True   # False: it broke; _call opens a new one before using it
        self.host: str = self._control.server.get("host", "")
        info = self._call("array.info")
        self._pool_id = str(info["pool_id"])
        self._chunk_size = int(info["chunk_size"])
        self._capabilities = Capabilities(**info["capabilities"])
        self.service_machine = str(info.get("service_machine", ""))
        if not info.get("nbd_port"):
            raise bse.Unsupported(f"the array at {array} has no NBD port open (serve "
                                  "--nbd-listen ADDR --tls-dir DIR): host mode reads and "
                                  "writes through it")
        if not info.get("nbd_tls"):
            raise bse.Unsupported(f"the array at {array} serves NBD in plain text: host "
                                  "mode needs its TLS port (the host's certificate is its "
                                  "identity)")
        from nbd.tls import client_context
        nbd_addr = (self._control_host(), int(info["nbd_port"]))
        self._generation = 0
        self._applying = threading.Lock()      # one listing applied at a time (_apply)
        self._listed: tuple[Any, Any] = (None, None)   # (boot_id, seq) last applied
        self._token: str | None = None
        self._volumes: dict[str, VolumeInfo] = {}
        self._snapshots: dict[str, SnapshotInfo] = {}
        self._space = (0, 0)
        # allocated bytes per LUN (volumes, full copies) from the last listing, and when
        self._allocated: dict[str, int] = {}
        self._alloc_at = 0.0
        self._alloc_lock = threading.Lock()
        self._alloc_fetching = False   # a thread is fetching them (_fetch_soon)
        self._apply(self._call("array.list"))
        # the data path (provider/san_paths.py: NBD connections, path-loss retries,
        # honest flushes)
        self.paths = SanPaths(array, nbd_addr, client_context(tls_dir), info.get("boot_id"),
                              self._export, self._naa_of,
                              lambda timeout: Client(array=self.array, tls_dir=self.tls_dir,
                                                     client=self._client_name,
                                                     timeout=timeout))
        self._renewing: tuple[str, threading.Event] | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="array-watch",
                                         daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ control port
    def _connect(self) -> Client:
        return Client(array=self.array, tls_dir=self.tls_dir, client=self._client_name,
                      timeout=WATCH_TIMEOUT + 30)

    def _control_host(self) -> str:
        from nbd.settings import parse_listen

        from .config import CONTROL_PORT
        return parse_listen(self.array, CONTROL_PORT)[0]

    def _call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return self._request(op, lambda c: c.call(op, args or {}), op in QUERIES)

    def _request(self, op: str, send: Callable[[Client], Any], query: bool) -> Any:
        """One control request, ``send(client)``. A connection found lost (the array restarted, the
        network dropped it) is reopened; a query (``query``) is then asked again, once --
        any other op is not: it may have been applied before the connection broke, and
        asking again could apply it twice (a second prepare, a commit after an abort).
        It fails with VSS_E_REMOTE_SERVER_UNAVAILABLE, so the set it belongs to aborts;
        the array drops this host's set in creation when the host's session ends."""
        with self._lock:
            if not self._control_ok:   # lost by an earlier call: reopen, nothing sent yet
                self._control = self._reconnect()
                self._control_ok = True
            try:
                return send(self._control)
            except ControlError as e:
                if e.name not in _LOST:
                    raise _store_error(e) from None
                lost = e.message
            except OSError as e:
                lost = str(e) or type(e).__name__
            with contextlib.suppress(Exception):
                self._control.close(wait=0)
            self._control_ok = False
            if not query:
                log.error("the control connection to the array at %s broke during %s "
                          "(%s); not repeated: it may have been applied", self.array, op,
                          lost)
                raise VssError("VSS_E_REMOTE_SERVER_UNAVAILABLE",
                               f"the connection to the array at {self.array} broke during "
                               f"{op} ({lost}); not repeated, as it may have been applied "
                               "(the array drops this host's set in creation when its "
                               "session ends)")
            self._control = self._reconnect()
            self._control_ok = True
            try:
                return send(self._control)
            except ControlError as e:
                if e.name in _LOST:
                    with contextlib.suppress(Exception):
                        self._control.close(wait=0)
                    self._control_ok = False
                raise _store_error(e) from None

    def _reconnect(self) -> Client:
        try:
            return self._connect()
        except ControlError as e:
            raise _store_error(e) from None

    def _apply(self, listing: dict[str, Any]) -> None:
        vols = {v["name"]: _volume(v) for v in listing["volumes"]}
        snaps = {s["id"]: _snapshot(s) for s in listing["snapshots"]}
        with self._applying:
            self._apply_newer(listing, vols, snaps)

    def _apply_newer(self, listing: dict[str, Any], vols: dict[str, VolumeInfo],
                     snaps: dict[str, SnapshotInfo]) -> None:
        # the watch thread, the allocation fetcher and an operation's refresh each get
        # listings on their own connection: one made before the last applied (same
        # array daemon: same boot_id, lower seq) must not take the tree back
        made = (listing.get("boot_id"), listing.get("seq"))
        if made[1] is not None:
            if made[0] == self._listed[0] and int(made[1]) <= int(self._listed[1] or 0):
                return
            self._listed = made
        self._space = (int(listing["space_total"]), int(listing["space_free"]))
        self._allocated = {k: int(n) for k, n in listing.get("allocated", {}).items()}
        self._alloc_at = time.monotonic()
        if listing["token"] != self._token:
            self._volumes, self._snapshots = vols, snaps
            self._token = listing["token"]
            self._generation += 1
        else:   # the same tree; figures such as a volume's mtime may have moved
            self._volumes, self._snapshots = vols, snaps

    def refresh(self) -> None:
        """Fetch the listing now (after an operation of this host that changed it)."""
        self._apply(self._call("array.list"))

    def _watch(self) -> None:
        """Follow the array's listing for this host (its own connection: a long poll
        must not hold up this host's requests)."""
        conn: Client | None = None
        while not self._stopping.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                self._apply(conn.call("array.watch", {"after": self._token,
                                                      "timeout": WATCH_TIMEOUT}))
            except Exception as e:   # noqa: BLE001 - an array away for a while: retry
                log.warning("following the array at %s: %s; retrying", self.array, e)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close(wait=0)
                conn = None
                self._stopping.wait(RETRY_PAUSE)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close(wait=0)

    def close(self) -> None:
        self._stopping.set()
        self.paths.close()
        with contextlib.suppress(Exception):
            self._control.close(wait=0)

    # ------------------------------------------------------------------ identity
    @property
    def path(self) -> str:
        """This host's state directory (its coordinator's catalog); not the array's."""
        return self._state_dir

    @property
    def pool_id(self) -> str:
        return self._pool_id

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def last_io(self) -> float:
        return self.paths.last_io

    # ------------------------------------------------------------------ listings
    def list_volumes(self) -> list[VolumeInfo]:
        return sorted(self._volumes.values(), key=lambda v: v.name)

    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        snaps = sorted(self._snapshots.values(), key=lambda s: (s.created, s.id))
        return [s for s in snaps if volume is None or s.volume == volume]

    def volume(self, name: str) -> VolumeInfo:
        try:
            return self._volumes[name]
        except KeyError:
            raise bse.NotFound(f"no volume {name!r} presented to host {self.host}") from None

    def snapshot(self, snap_id: str) -> SnapshotInfo:
        try:
            return self._snapshots[snap_id]
        except KeyError:
            raise bse.NotFound(f"no snapshot {snap_id} presented to host "
                               f"{self.host}") from None

    def lun_size(self, key: str) -> int:
        if key in self._volumes:
            return self._volumes[key].size
        return self.snapshot(key).size

    def statfs(self) -> tuple[int, int]:
        return self._space

    def available_bytes(self) -> int:
        return self._space[1]

    def allocated_bytes(self, key: str) -> int:
        """The array's figure from its last listing (the mount asks on every getattr, on
        its trio thread: never a round trip here). A figure older than ALLOC_TTL is
        answered all the same and fetched again by a thread of its own; a LUN the
        listing has no figure for (a differential snapshot, one just made) shows its
        size."""
        value = self._allocated.get(key)
        if time.monotonic() - self._alloc_at > ALLOC_TTL:
            self._fetch_soon()
        return value if value is not None else self.lun_size(key)

    def _fetch_soon(self) -> None:
        with self._alloc_lock:
            if self._alloc_fetching:
                return
            self._alloc_fetching = True
        threading.Thread(target=self._fetch_allocation, name="array-alloc",
                         daemon=True).start()

    def _fetch_allocation(self) -> None:
        try:
            self.refresh()
        except Exception as e:   # noqa: BLE001 - the array away: the old figures stay
            log.debug("fetching the array's allocation figures: %s", e)
            self._alloc_at = time.monotonic()   # not again before ALLOC_TTL
        finally:
            with self._alloc_lock:
                self._alloc_fetching = False

    def image_path(self, key: str) -> str | None:
        return None   # no local file: the LUN lives on the array

    # ------------------------------------------------------------------ data path
    def _export(self, key: str) -> str:
        if key in self._volumes:
            return VOLUMES + key
        self.snapshot(key)
        return SHADOW + key

    def _naa_of(self, key: str) -> str | None:
        """The LUN's identity as this host's listing knows it (None: not listed)."""
        lun = self._volumes.get(key) or self._snapshots.get(key)
        return lun.naa if lun is not None else None

    def read(self, key: str, offset: int, length: int) -> bytes:
        size = self.lun_size(key)
        if offset >= size or length <= 0:
            return b""
        return bytes(self.paths.io(key, "pread", offset, min(length, size - offset)))

    def write(self, name: str, offset: int, data: bytes | memoryview) -> int:
        self.paths.io(name, "pwrite", data, offset, writes=True)
        return len(data)

    def discard(self, name: str, offset: int, length: int) -> None:
        # NBD_CMD_TRIM may leave anything behind (proto.md); a discard reads as zeros
        self.paths.io(name, "zero", offset, length, writes=True)

    def flush(self, name: str) -> None:
        self.paths.flush(name)

    def allocation(self, key: str, offset: int, length: int) -> list[tuple[int, int]]:
        runs = self.paths.io(key, "block_status", offset, length)
        return [(o, n) for o, n, flags in runs if not flags & 1]   # NBD_STATE_HOLE

    # ------------------------------------------------------------------ set creation
    def claim_set(self, set_id: str, context: int, attributes: int) -> None:
        """Take the array's one set-in-creation slot for this host's set (VssError
        VSS_E_SNAPSHOT_SET_IN_PROGRESS naming the holder if another host, or the array's
        own requester, has it). A thread renews the lease until release_set."""
        self._call("array.set.claim", {"set_id": set_id, "lease": LEASE,
                                       "context": context, "attributes": attributes})
        stop = threading.Event()
        self._renewing = (set_id, stop)
        threading.Thread(target=self._renew, args=(set_id, stop), daemon=True,
                         name="array-lease").start()

    def _renew(self, set_id: str, stop: threading.Event) -> None:
        while not stop.wait(LEASE / 4):
            try:
                self._call("array.set.renew", {"set_id": set_id, "lease": LEASE})
            except Exception as e:   # noqa: BLE001 - the set fails at its next call
                log.error("renewing the array's lease on set %s: %s", set_id, e)
                return

    def release_set(self, set_id: str, created: bool) -> None:
        """Give the slot back: the set was created (its snapshots stay) or not (the
        array removes them)."""
        renewing, self._renewing = self._renewing, None
        if renewing is not None:
            renewing[1].set()
        try:
            self._call("array.set.release", {"set_id": set_id, "created": created})
        finally:
            self.refresh()

    def prepare_snapshot(self, volume: str, kind: str = "differential",
                         snapshot_id: str | None = None, set_id: str | None = None,
                         attributes: int = 0) -> SnapshotInfo:
        if snapshot_id is None or set_id is None:
            raise bse.InvalidState("a host prepares snapshots of a claimed set, with ids")
        info = _snapshot(self._call("array.prepare", {
            "volume": volume, "kind": str(kind), "new_id": snapshot_id, "set_id": set_id,
            "attributes": int(attributes)}))
        self.refresh()
        return info

    def plex_sync_step(self, snap_id: str, max_bytes: int = 64 << 20) -> tuple[int, int]:
        r = self._call("array.plex_sync_step", {"snapshot_id": snap_id,
                                                "max_bytes": int(max_bytes)})
        return int(r["done"]), int(r["total"])

    def commit_snapshots(self, snap_ids: Iterable[str]) -> None:
        """The instant, at the array (its barrier holds every host's writes); this
        host's own writes were flushed to it by the host's barrier before."""
        self._call("array.commit", {"snapshot_ids": list(snap_ids)})
        self.refresh()

    def abort_snapshot(self, snap_id: str) -> None:
        self._call("array.abort", {"snapshot_id": snap_id})

    def delete_snapshot(self, snap_id: str) -> None:
        self._call("array.delete", {"snapshot_id": snap_id})
        self.refresh()

    def set_exposed(self, snap_id: str, name: str | None) -> SnapshotInfo:
        info = _snapshot(self._call("array.expose", {"snapshot_id": snap_id,
                                                     "name": name}))
        self.refresh()
        return info

    # ------------------------------------------------------------------ transport
    def mark_exported(self, set_id: str) -> None:
        """Tell the array this host exported its TRANSPORTABLE set (another host's
        import of the document needs that)."""
        self._call("array.export", {"set_id": set_id})

    def import_set(self, document: str, parsed: Any = None) -> dict[str, Any]:
        """LocateLuns at the array: it checks the document and presents the set's LUNs
        to this host only; the listing follows before this returns. (``parsed``, the
        document as provider/documents parsed it, is for backends that check it
        themselves: the array here parses the text.)"""
        res: dict[str, Any] = self._call("array.import", {"document": document})
        self.refresh()
        return res

    # ------------------------------------------------------------------ changed blocks
    def changed_extents(self, from_id: str, to_id: str | None = None
                        ) -> list[tuple[int, int]]:
        """The array's own snapshot.diff (its access rules: this host must see both
        LUNs), every page of it."""
        res = self._request("snapshot.diff", lambda c: c.snapshot_diff(from_id, to_id),
                            query=True)
        return [(int(o), int(n)) for o, n in res["extents"]]

    def revert(self, volume: str, snap_id: str, progress: Any = None) -> None:
        """ResyncLuns at the array: its own revert (its barrier holds every host's
        writers of the volume; it refuses while the array's machine has the volume
        attached). This host's coordinator checked this host's users and holds its own
        writers; once begun it completes (the array rolls a revert forward)."""
        report = None if progress is None else (lambda done, total, _what: progress(
            done, total))
        self._request("revert", lambda c: c.revert(snap_id, progress=report), query=False)
        self.refresh()

    # ------------------------------------------------------------------ not yet
    def _not_yet(self, what: str) -> bse.Unsupported:
        return bse.Unsupported(f"{what} from a host daemon is not built yet (issue 16); "
                               f"ask the array's own daemon ({self.service_machine})")

    def create_volume(self, name: str, size: int) -> VolumeInfo:
        raise self._not_yet("creating a volume")

    def resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        raise self._not_yet("resizing a volume")

    def delete_volume(self, name: str) -> None:
        raise self._not_yet("deleting a volume")



    def promote(self, snap_id: str, progress: Any = None) -> SnapshotInfo:
        raise self._not_yet("promote")

    def split(self, snap_id: str, new_name: str, progress: Any = None) -> VolumeInfo:
        raise self._not_yet("split")



    def check(self, progress: Any = None, volume: str | None = None,
              tally: Any = None) -> list[str]:
        raise self._not_yet("check")

    def scrub(self, progress: Any = None, volume: str | None = None,
              tally: Any = None) -> list[str]:
        raise self._not_yet("scrub")


def _store_error(e: ControlError) -> Exception:
    """The array's refusal as the block store's error where there is one (the code
    above the Array interface catches those), else as the array's VSS error itself
    (VSS_E_SNAPSHOT_SET_IN_PROGRESS, VSS_E_HOLD_WRITES_TIMEOUT... reach the requester
    by name)."""
    kinds: dict[str, type[bse.StoreError]] = {
        "VSS_E_OBJECT_NOT_FOUND": bse.NotFound, "VSS_E_OBJECT_ALREADY_EXISTS": bse.Exists,
        "VSS_E_NOT_SUPPORTED": bse.Unsupported, "VSS_E_INSUFFICIENT_STORAGE": bse.NoSpace}
    kind = kinds.get(e.name)
    if kind is not None:
        return kind(f"the array: {e.message}")
    return VssError(e.name, f"the array: {e.message}")
