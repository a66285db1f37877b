"""The state log: an etcd-shaped key-value interface and its backends.

Keys carry create/mod revisions and a version; every transaction that changes something advances one global
revision; `txn` applies its `then` or `else` operations atomically depending on comparisons, which is how writes
that depend on what was read stay correct. `watch` delivers every change after a revision, in order. Leases
expire keys that are no longer kept alive. `compact` drops history older than a revision.

    StateLogError          anything the state log cannot do
    ├── Unavailable        no backend endpoint answers (retry later)
    ├── Compacted          a watch asked for history that compaction removed
    ├── LeaseNotFound      a put or keepalive named a lease that expired or was revoked
    ├── StateLocked        another process holds the embedded state for writing
    └── ReadOnly           a write on a state opened for reading
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from schemas.errors import DabctlError


class StateLogError(DabctlError):
    """The state log cannot do what was asked; the message says what and how to fix it."""

    retryable = True


class Unavailable(StateLogError):
    """No endpoint of the state log answers."""


class Compacted(StateLogError):
    """Watch history before `compact_revision` is gone."""

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"history before revision {compact_revision} was compacted; resync from a fresh read")


class LeaseNotFound(StateLogError):
    """The lease expired or was revoked."""


class StateLocked(StateLogError):
    """Another process holds the state for writing."""

    retryable = False


class ReadOnly(StateLogError):
    """The state was opened for reading only."""

    retryable = False


@dataclass(frozen=True, kw_only=True)
class KeyValue:
    """A stored key with etcd's metadata."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, kw_only=True)
class Event:
    """One change: a put (with the key's new metadata) or a delete (value empty), at `revision`."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int
    create_revision: int = 0
    version: int = 0


@dataclass(frozen=True)
class Compare:
    """A txn condition on one key: target is value, mod_revision, create_revision or version.

    A missing key has create/mod revision 0 and version 0; a value comparison on a missing key never holds
    (as in etcd).
    """

    key: str
    target: Literal["value", "mod_revision", "create_revision", "version"]
    op: Literal["==", "!=", "<", ">"]
    operand: bytes | int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held (then_ops ran) and the revision after the transaction."""

    succeeded: bool
    revision: int


def compare_holds(c: Compare, kv: KeyValue | None) -> bool:
    """Evaluate one compare against a key's current state (shared by backends that evaluate locally)."""
    if c.target == "value":
        if kv is None:
            return False
        left: bytes | int = kv.value
    else:
        left = getattr(kv, c.target) if kv else 0
    right = c.operand
    if c.op == "==":
        return left == right
    if c.op == "!=":
        return left != right
    if isinstance(left, bytes) and isinstance(right, bytes):
        return left < right if c.op == "<" else left > right
    if isinstance(left, int) and isinstance(right, int):
        return left < right if c.op == "<" else left > right
    raise TypeError(f"cannot order {c.target} against {right!r}: compare a value with bytes, a revision with an int")


_END = object()


class Watch:
    """A cancellable iterator of events, fed by a backend thread; errors surface from the iterator."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._cancelled = threading.Event()
        self.on_cancel: list[Callable[[], None]] = []  # backends release streams here

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the watch; a consumer blocked in iteration ends."""
        self._cancelled.set()
        self._queue.put(_END)
        for release in self.on_cancel:
            release()

    def _deliver(self, item: Event | BaseException) -> None:
        self._queue.put(item)

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds or once cancelled."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._queue.put(_END)
            return None
        if isinstance(item, BaseException):
            self.cancel()
            raise item
        assert isinstance(item, Event)
        return item

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.next()
            if event is None:
                return
            yield event


class StateLog(Protocol):
    """The operations every backend provides."""

    def get(self, key: str) -> KeyValue | None: ...

    def range(self, prefix: str, revision: int = 0) -> list[KeyValue]:
        """Keys under `prefix` in key order, as they were at `revision` (0: now). A snapshot of several
        prefixes reads `revision()` once and every range at it; history before the compaction raises Compacted."""
        ...

    def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    def delete(self, key: str, prefix: bool = False) -> int: ...

    def txn(
        self, compares: Sequence[Compare], then_ops: Sequence[Op], else_ops: Sequence[Op] = (), *, durable: bool = True
    ) -> TxnResult:
        """Check every compare and run then_ops (or else_ops) atomically. `durable=False` lets a backend
        acknowledge before the write reaches the disk (it survives the process being killed, and is on disk with
        the next durable write); a backend that always syncs ignores it."""
        ...

    def revision(self) -> int: ...

    def watch(self, prefix: str, start_revision: int = 0) -> Watch: ...

    def grant(self, ttl: int) -> int: ...

    def keepalive(self, lease: int) -> int: ...

    def revoke(self, lease: int) -> None: ...

    def compact(self, revision: int) -> None: ...

    def close(self) -> None: ...
