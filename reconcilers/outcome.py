"""What applying one action did: the tiny result type every reconciler reports."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar


class Outcome(StrEnum):
    """The effect of one action on the engine."""

    CREATED = "created"
    UPDATED = "updated"
    REMOVED = "removed"
    UNCHANGED = "unchanged"
    FAILED = "failed"


A = TypeVar("A")


@dataclass(frozen=True)
class Result(Generic[A]):
    """An applied action, its outcome and, when it failed, one line saying why."""

    action: A
    outcome: Outcome
    error: str = ""
