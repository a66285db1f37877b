"""What an action does and what applying it did: the tiny types every reconciler shares."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar


class ActionKind(StrEnum):
    """What a planned action does to its object; its sign starts the action's plan line."""

    CREATE = "create"
    START = "start"
    REPLACE = "replace"
    UPDATE = "update"
    REMOVE = "remove"

    @property
    def sign(self) -> str:
        """`+` create, `-` remove, `~` any other change."""
        return "+" if self is ActionKind.CREATE else "-" if self is ActionKind.REMOVE else "~"


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


def one_line(error: object) -> str:
    """The first line of an error's text (engines and libraries write several), or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
