"""The writer framework: VSS writers (application quiescers) and the set that drives them.

A *writer* makes the data of an application consistent on disk for the instant of a
snapshot: it is told to **freeze** just before the snapshot set is committed and to
**thaw** right after (VSS: OnFreeze / OnThaw), to **abort** when the set is cancelled, and
that the backup is over with **backup_complete** (OnBackupComplete). ``identify()`` returns
its Writer Metadata Document content (:class:`WriterMetadata`).

Everything here is plain synchronous Python. Every call blocks the calling thread (the
coordinator calls from worker threads via ``trio.to_thread``), and every call that can
wait on something outside (an ioctl, a process, a lock) is bounded by a timeout. Never
call a writer from the thread that serves the FUSE mount: freezing a filesystem on a loop
device backed by our own mount flushes through that mount.

:class:`WriterSet` runs the writers of one host in order and keeps a
:class:`WriterStatus` (VSS_WRITER_STATE + last error) for ``writers list``.
"""

from __future__ import annotations

import abc
import enum
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from provider.vss import VssError

log = logging.getLogger(__name__)

#: Namespace of every writer id (uuid5). Fixed forever: writer ids must stay stable.
WRITER_NAMESPACE = uuid.UUID("6f1c2a52-4d0e-5b8e-9c1a-73686164706c")

#: Default total time for freezing all writers of a set (VSS allows 60 s for Freeze).
DEFAULT_FREEZE_TIMEOUT = 60.0


class VssWriterState(enum.IntEnum):
    """VSS_WRITER_STATE, with the Windows numeric values."""

    VSS_WS_UNKNOWN = 0
    VSS_WS_STABLE = 1
    VSS_WS_WAITING_FOR_FREEZE = 2
    VSS_WS_WAITING_FOR_THAW = 3
    VSS_WS_WAITING_FOR_POST_SNAPSHOT = 4
    VSS_WS_WAITING_FOR_BACKUP_COMPLETE = 5
    VSS_WS_FAILED_AT_IDENTIFY = 6
    VSS_WS_FAILED_AT_PREPARE_BACKUP = 7
    VSS_WS_FAILED_AT_PREPARE_SNAPSHOT = 8
    VSS_WS_FAILED_AT_FREEZE = 9
    VSS_WS_FAILED_AT_THAW = 10
    VSS_WS_FAILED_AT_POST_SNAPSHOT = 11
    VSS_WS_FAILED_AT_BACKUP_COMPLETE = 12
    VSS_WS_FAILED_AT_PRE_RESTORE = 13
    VSS_WS_FAILED_AT_POST_RESTORE = 14
    VSS_WS_FAILED_AT_BACKUPSHUTDOWN = 15

    @property
    def failed(self) -> bool:
        return self.name.startswith("VSS_WS_FAILED_AT_")


class UsageType(enum.IntEnum):
    """VSS_USAGE_TYPE."""

    VSS_UT_UNDEFINED = 0
    VSS_UT_BOOTABLESYSTEMSTATE = 1
    VSS_UT_SYSTEMSERVICE = 2
    VSS_UT_USERDATA = 3
    VSS_UT_OTHER = 4


class WriterFailure(enum.IntEnum):
    """The writer error HRESULTs a writer can report (CVssWriter::SetWriterFailure)."""

    VSS_E_WRITERERROR_INCONSISTENTSNAPSHOT = 0x800423F0
    VSS_E_WRITERERROR_OUTOFRESOURCES = 0x800423F1
    VSS_E_WRITERERROR_TIMEOUT = 0x800423F2
    VSS_E_WRITERERROR_RETRYABLE = 0x800423F3
    VSS_E_WRITERERROR_NONRETRYABLE = 0x800423F4


ComponentType = Literal["filegroup", "database"]


class WriterError(VssError):
    """A writer failed. ``retryable``: the same operation may well succeed if the whole
    snapshot is tried again; ``timed_out``: it did not finish within its time.

    It is a :class:`provider.vss.VssError` whose name is the VSS writer error:
    VSS_E_WRITERERROR_TIMEOUT if timed out, else VSS_E_WRITERERROR_RETRYABLE or
    VSS_E_WRITERERROR_NONRETRYABLE. ``writer`` names the writer (set by :class:`WriterSet`
    when the writer did not).
    """

    def __init__(self, message: str, *, retryable: bool = False, timed_out: bool = False,
                 writer: str | None = None) -> None:
        self.retryable = retryable or timed_out
        self.timed_out = timed_out
        self.writer = writer
        super().__init__(self._failure().name, message)

    def _failure(self) -> WriterFailure:
        if self.timed_out:
            return WriterFailure.VSS_E_WRITERERROR_TIMEOUT
        if self.retryable:
            return WriterFailure.VSS_E_WRITERERROR_RETRYABLE
        return WriterFailure.VSS_E_WRITERERROR_NONRETRYABLE

    @property
    def failure(self) -> WriterFailure:
        return self._failure()

    def __str__(self) -> str:
        who = f"writer {self.writer}: " if self.writer else ""
        return f"{who}{self.message} [{self.name}]"


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class FileSpec:
    """Files of a component: ``filespec`` (a glob such as ``*`` or ``app.db``) in the
    directory ``path``, and in its subdirectories if ``recursive``."""

    path: str
    filespec: str
    recursive: bool = False


@dataclass
class Component:
    """A component of the Writer Metadata Document. ``volumes``: the volume image paths
    the files live on (empty if not on one of ours)."""

    name: str
    logical_path: str
    component_type: ComponentType
    files: list[FileSpec] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)


@dataclass
class WriterMetadata:
    """What ``identify()`` returns: the content of the Writer Metadata Document."""

    writer_name: str
    writer_id: str
    instance_id: str
    instance_name: str
    usage_type: UsageType
    components: list[Component] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["usage_type"] = self.usage_type.name
        return out


# --------------------------------------------------------------------------- the writer


def writer_guid(*parts: str) -> str:
    """A stable GUID string: uuid5 of :data:`WRITER_NAMESPACE` and the parts."""
    return str(uuid.uuid5(WRITER_NAMESPACE, "\x00".join(parts)))


class Writer(abc.ABC):
    """One quiescer.

    ``writer_id`` is the writer class id (VSS: the same for every instance of a writer
    kind, stable across restarts): uuid5(WRITER_NAMESPACE, name). ``instance_id``
    identifies this instance (its name plus ``instance_name``, e.g. the hooks directory).

    ``freeze_order``: :class:`WriterSet` freezes writers with lower numbers first (and
    thaws in reverse). Application writers (hooks 10, SQLite 50) must come before the
    filesystem freeze (90): once the filesystem is frozen they could not write.

    Contract for implementations:

    * ``freeze(volumes, timeout)`` returns within about ``timeout`` seconds, frozen, or
      raises :class:`WriterError` having undone whatever it had done.
    * ``thaw()`` and ``abort()`` are idempotent: with nothing frozen they do nothing and
      do not raise. They undo everything ``freeze`` did even if some step fails, and raise
      WriterError afterwards if something did fail.
    * ``involved(volumes)`` is cheap and never raises for ordinary conditions.
    """

    usage_type: UsageType = UsageType.VSS_UT_USERDATA
    freeze_order: int = 50

    def __init__(self, name: str, instance_name: str = "") -> None:
        self.name = name
        self.instance_name = instance_name
        self.writer_id = writer_guid(name)
        self.instance_id = writer_guid(name, instance_name)
        #: The snapshot set being frozen for, when known (see :meth:`prepare_snapshot`).
        self.set_id: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.instance_name!r}>"

    def prepare_snapshot(self, set_id: str | None) -> None:
        """Called by :class:`WriterSet` before ``freeze`` (VSS: OnPrepareSnapshot).
        The default remembers the set id."""
        self.set_id = set_id

    def _metadata(self, components: Sequence[Component]) -> WriterMetadata:
        return WriterMetadata(self.name, self.writer_id, self.instance_id, self.instance_name,
                              self.usage_type, list(components))

    @abc.abstractmethod
    def identify(self) -> WriterMetadata:
        """The Writer Metadata Document content."""

    @abc.abstractmethod
    def involved(self, volumes: Sequence[str]) -> bool:
        """True if this writer has something to quiesce on any of these volume images."""

    @abc.abstractmethod
    def freeze(self, volumes: Sequence[str], timeout: float) -> None:
        """Quiesce what lives on ``volumes`` (absolute image paths) within ``timeout`` s."""

    @abc.abstractmethod
    def thaw(self) -> None:
        """Resume what ``freeze`` quiesced. Idempotent."""

    @abc.abstractmethod
    def abort(self) -> None:
        """The set was cancelled: undo ``freeze`` if still frozen, drop any state.
        Idempotent."""

    def backup_complete(self, set_id: str, succeeded: bool) -> None:  # noqa: B027
        """The backup of ``set_id`` is over (VSS: OnBackupComplete). Default: nothing."""


# --------------------------------------------------------------------------- the set


@dataclass
class WriterStatus:
    """A writer's state for ``writers list`` (VSS: IVssBackupComponents::GetWriterStatus)."""

    writer_name: str
    writer_id: str
    instance_id: str
    instance_name: str
    state: VssWriterState = VssWriterState.VSS_WS_STABLE
    last_error: str | None = None
    failure: str | None = None  # the VSS_E_WRITERERROR_* name of the last error

    @property
    def state_name(self) -> str:
        return self.state.name

    def to_json(self) -> dict[str, Any]:
        return {"writer_name": self.writer_name, "writer_id": self.writer_id,
                "instance_id": self.instance_id, "instance_name": self.instance_name,
                "state": self.state.name, "state_value": int(self.state),
                "last_error": self.last_error, "failure": self.failure}


def _as_writer_error(w: Writer, e: BaseException) -> WriterError:
    if isinstance(e, WriterError):
        if e.writer is None:
            e.writer = w.name
        return e
    err = WriterError(f"{type(e).__name__}: {e}", writer=w.name)
    err.__cause__ = e
    return err


class WriterSet:
    """The writers of this host, driven in order.

    * ``freeze_all`` freezes every involved writer in ``freeze_order`` (stable: ties keep
      the order they were added in) within one deadline; if one fails or the deadline
      passes, the ones already frozen are thawed in reverse order and the error is raised.
    * ``thaw_all`` / ``abort_all`` / ``backup_complete_all`` go on past failures and return
      them (each a :class:`WriterError` naming its writer).

    Calls are serialised by a lock: a second call waits for the first (each is bounded by
    its writers' timeouts). So an ``abort_all`` issued while ``freeze_all`` is still
    running (e.g. from a caller that gave up waiting) takes effect after it, and nothing is
    left frozen.

    For the coordinator's event-style calls (``freeze(event)`` ... with an event carrying
    ``set_id`` and ``volume_paths``) see :meth:`freeze` and friends.
    """

    name = "writers"

    def __init__(self, writers: Iterable[Writer] = (), *,
                 freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT) -> None:
        self._lock = threading.RLock()
        self._writers: list[Writer] = []
        self._status: dict[str, WriterStatus] = {}
        self._frozen: list[Writer] = []        # frozen now, in freeze order
        self._participants: list[Writer] = []  # involved in the last freeze_all
        self._set_id: str | None = None
        self.freeze_timeout = freeze_timeout
        for w in writers:
            self.add(w)

    # ------------------------------------------------------------------ bookkeeping
    def add(self, writer: Writer) -> None:
        with self._lock:
            if writer.instance_id in self._status:
                raise ValueError(f"writer {writer.name} ({writer.instance_name}) is already "
                                 "in the set")
            self._writers.append(writer)
            self._status[writer.instance_id] = WriterStatus(
                writer.name, writer.writer_id, writer.instance_id, writer.instance_name)

    @property
    def writers(self) -> list[Writer]:
        """The writers in freeze order."""
        return sorted(self._writers, key=lambda w: w.freeze_order)

    @property
    def frozen(self) -> list[Writer]:
        return list(self._frozen)

    def status(self, writer: Writer) -> WriterStatus:
        return self._status[writer.instance_id]

    def statuses(self) -> list[WriterStatus]:
        return [self._status[w.instance_id] for w in self.writers]

    def _set_state(self, w: Writer, state: VssWriterState,
                   error: WriterError | None = None) -> None:
        st = self._status[w.instance_id]
        st.state = state
        if error is not None:
            st.last_error = error.message
            st.failure = error.name

    # ------------------------------------------------------------------ events
    def identify_all(self) -> list[WriterMetadata]:
        """Metadata of every writer that answers; a failing one is logged and marked
        VSS_WS_FAILED_AT_IDENTIFY (its status says why)."""
        out = []
        with self._lock:
            for w in self.writers:
                try:
                    out.append(w.identify())
                except Exception as e:   # noqa: BLE001 - a writer's failure is its state, reported
                    err = _as_writer_error(w, e)
                    log.error("writer %s failed at identify: %s", w.name, err.message)
                    self._set_state(w, VssWriterState.VSS_WS_FAILED_AT_IDENTIFY, err)
        return out

    def involved(self, volumes: Sequence[str]) -> list[Writer]:
        out = []
        for w in self.writers:
            try:
                if w.involved(volumes):
                    out.append(w)
            except Exception as e:   # noqa: BLE001 - asked to freeze instead, which says what is wrong
                # a writer that cannot tell is asked to freeze: it will say what is wrong
                log.warning("writer %s: cannot tell whether it is involved (%s)", w.name, e)
                out.append(w)
        return out

    def freeze_all(self, volumes: Sequence[str], timeout: float | None = None,
                   set_id: str | None = None) -> list[Writer]:
        """Freeze every involved writer, in order, all within ``timeout`` seconds (default
        ``freeze_timeout``). Returns the frozen writers. On failure the frozen ones are
        thawed (reverse order), the failing one gets ``abort()``, and the WriterError is
        raised."""
        total = self.freeze_timeout if timeout is None else timeout
        with self._lock:
            if self._frozen:
                raise WriterError(
                    f"writers are still frozen for snapshot set {self._set_id}: thaw or "
                    "abort that set first", retryable=True)
            deadline = time.monotonic() + total
            volumes = list(volumes)
            todo = self.involved(volumes)
            self._participants = list(todo)
            self._set_id = set_id
            for w in todo:
                st = self._status[w.instance_id]
                st.state, st.last_error, st.failure = (
                    VssWriterState.VSS_WS_WAITING_FOR_FREEZE, None, None)
            for w in todo:
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise WriterError(f"the writers did not freeze within {total:g} s "
                                          f"(no time left for {w.name})", timed_out=True)
                    w.prepare_snapshot(set_id)
                    w.freeze(volumes, remaining)
                    if time.monotonic() > deadline:
                        self._frozen.append(w)  # it is frozen: thawed by the rollback
                        raise WriterError(f"freeze took longer than the {total:g} s allowed "
                                          "for all writers", timed_out=True)
                except BaseException as e:
                    err = _as_writer_error(w, e)
                    log.error("writer %s failed to freeze: %s", w.name, err.message)
                    self._set_state(w, VssWriterState.VSS_WS_FAILED_AT_FREEZE, err)
                    if w not in self._frozen:
                        self._quiet(w, "abort")
                    self._rollback(err, todo)
                    if err is e or not isinstance(e, Exception):
                        raise
                    raise err from e
                self._frozen.append(w)
                self._set_state(w, VssWriterState.VSS_WS_WAITING_FOR_THAW)
            return list(self._frozen)

    def _quiet(self, w: Writer, method: str) -> BaseException | None:
        try:
            getattr(w, method)()
        except Exception as e:   # noqa: BLE001 - returned to the caller, logged
            log.error("writer %s failed to %s: %s", w.name, method, e)
            return e
        return None

    def _rollback(self, err: WriterError, todo: list[Writer]) -> None:
        for w in reversed(self._frozen):
            e = self._quiet(w, "thaw")
            if e is None:
                if not self._status[w.instance_id].state.failed:
                    self._set_state(w, VssWriterState.VSS_WS_STABLE)
            else:
                self._set_state(w, VssWriterState.VSS_WS_FAILED_AT_THAW,
                                _as_writer_error(w, e))
                err.add_note(f"rolling back: writer {w.name} failed to thaw: {e}")
        self._frozen = []
        for w in todo:  # never reached
            if self._status[w.instance_id].state is VssWriterState.VSS_WS_WAITING_FOR_FREEZE:
                self._set_state(w, VssWriterState.VSS_WS_STABLE)

    def thaw_all(self) -> list[WriterError]:
        """Thaw the frozen writers in reverse order; returns the failures."""
        errors = []
        with self._lock:
            frozen, self._frozen = self._frozen, []
            for w in reversed(frozen):
                try:
                    w.thaw()
                except Exception as e:   # noqa: BLE001 - every writer is thawed; the failure is reported
                    err = _as_writer_error(w, e)
                    log.error("writer %s failed to thaw: %s", w.name, err.message)
                    self._set_state(w, VssWriterState.VSS_WS_FAILED_AT_THAW, err)
                    errors.append(err)
                else:
                    self._set_state(w, VssWriterState.VSS_WS_WAITING_FOR_BACKUP_COMPLETE)
        return errors

    def abort_all(self) -> list[WriterError]:
        """Abort every writer (reverse order; idempotent); returns the failures. States go
        back to VSS_WS_STABLE, except failures, which stay visible until the next set."""
        errors = []
        with self._lock:
            self._frozen = []
            for w in reversed(self.writers):
                try:
                    w.abort()
                except Exception as e:   # noqa: BLE001 - every writer gets its abort; logged
                    err = _as_writer_error(w, e)
                    log.error("writer %s failed to abort: %s", w.name, err.message)
                    st = self._status[w.instance_id]
                    st.last_error, st.failure = err.message, err.name
                    errors.append(err)
                else:
                    if not self._status[w.instance_id].state.failed:
                        self._set_state(w, VssWriterState.VSS_WS_STABLE)
            self._participants = []
            self._set_id = None
        return errors

    def backup_complete_all(self, set_id: str, succeeded: bool = True) -> list[WriterError]:
        """Tell the writers that took part in the last freeze that the backup of
        ``set_id`` is over (if there was none, e.g. after a restart: every writer)."""
        errors = []
        with self._lock:
            targets = self._participants or self.writers
            for w in targets:
                try:
                    w.backup_complete(set_id, succeeded)
                except Exception as e:   # noqa: BLE001 - every writer hears it; logged
                    err = _as_writer_error(w, e)
                    log.error("writer %s failed at backup-complete: %s", w.name, err.message)
                    self._set_state(w, VssWriterState.VSS_WS_FAILED_AT_BACKUP_COMPLETE, err)
                    errors.append(err)
                else:
                    self._set_state(w, VssWriterState.VSS_WS_STABLE)
            self._participants = []
            self._set_id = None
        return errors

    # ------------------------------------------------------------------ coordinator face
    # provider.coordinator calls each "writer" it was given as method(event), where the
    # event has .set_id and .volume_paths. A WriterSet given to it as its one writer keeps
    # the order and the rollback above.
    def freeze(self, event: Any) -> None:
        self.freeze_all(list(event.volume_paths), set_id=getattr(event, "set_id", None))

    def thaw(self, event: Any = None) -> None:
        errors = self.thaw_all()
        if errors:
            raise errors[0]

    def abort(self, event: Any = None) -> None:
        errors = self.abort_all()
        if errors:
            raise errors[0]

    def backup_complete(self, event: Any) -> None:
        errors = self.backup_complete_all(str(event.set_id), True)
        if errors:
            raise errors[0]

    def identify(self) -> dict[str, Any]:
        """Every writer's metadata and status, as JSON (for ``writers list``)."""
        metas = {m.instance_id: m for m in self.identify_all()}
        out = []
        for st in self.statuses():
            entry = st.to_json()
            meta = metas.get(st.instance_id)
            if meta is not None:
                entry.update(meta.to_json())
            out.append(entry)
        return {"name": self.name, "writers": out}
