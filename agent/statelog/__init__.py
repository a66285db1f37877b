"""The state log: an etcd-shaped key-value interface (DESIGN §6) and its backends.

Keys carry create/mod revisions and a version; every write advances one global revision; `txn` applies
its `then` or `else` operations atomically depending on comparisons, which is how writes that depend on
what was read stay correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class KeyValue:
    """A stored key with etcd's metadata."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True)
class Compare:
    """A txn condition on one key: target is value, mod_revision, create_revision or version.

    A missing key has create/mod revision 0, version 0 and no value (compares as not equal to any value).
    """

    key: str
    target: Literal["value", "mod_revision", "create_revision", "version"]
    op: Literal["==", "!=", "<", ">"]
    operand: bytes | int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes


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


class StateLog(Protocol):
    """The operations every backend provides."""

    def get(self, key: str) -> KeyValue | None: ...

    def range(self, prefix: str) -> list[KeyValue]: ...

    def put(self, key: str, value: bytes) -> int: ...

    def delete(self, key: str, prefix: bool = False) -> int: ...

    def txn(self, compares: Sequence[Compare], then_ops: Sequence[Op], else_ops: Sequence[Op] = ()) -> TxnResult: ...

    def revision(self) -> int: ...

    def close(self) -> None: ...
