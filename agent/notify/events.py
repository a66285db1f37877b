"""Events from two observations of the agent: a pure function, so repeated identical failures say nothing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel


class EventKind(StrEnum):
    ROLLOUT_STARTED = "rollout.started"
    ROLLOUT_COMPLETED = "rollout.completed"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_ROLLED_BACK = "rollout.rolled-back"
    PASS_FAILED = "pass.failed"
    PASS_RECOVERED = "pass.recovered"
    STACK_PINNED = "stack.pinned"
    STACK_UNPINNED = "stack.unpinned"


class Event(BaseModel):
    """One notification: what happened to which stack (and service), on which node, and why."""

    event: EventKind
    node: str
    stack: str
    service: str | None = None
    message: str
    revision: str | None = None
    file: str | None = None  # pass.failed from an invalid bundle: the file and field to fix
    field: str | None = None
    at: str

    def title(self) -> str:
        where = f"{self.stack}/{self.service}" if self.service else self.stack
        return f"dabctl {self.event.value}: {where} on {self.node}"


@dataclass(frozen=True)
class RolloutSeen:
    target: str
    state: str
    rollback: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Failure:
    message: str
    file: str | None = None
    field: str | None = None


@dataclass(frozen=True)
class Observed:
    """What notifications compare: rollouts per (stack, service), failures and pins per stack."""

    rollouts: Mapping[tuple[str, str], RolloutSeen] = field(default_factory=dict)
    failures: Mapping[str, Failure] = field(default_factory=dict)
    pins: Mapping[str, str] = field(default_factory=dict)  # stack -> pinned revision
    revisions: Mapping[str, str] = field(default_factory=dict)  # stack -> desired revision, for the messages


_ROLLOUT = {
    "paused": EventKind.ROLLOUT_PAUSED,
    "rolling-back": EventKind.ROLLOUT_ROLLED_BACK,
    "completed": EventKind.ROLLOUT_COMPLETED,
}


def _rollout_event(old: RolloutSeen | None, new: RolloutSeen) -> EventKind | None:
    if old is not None and (old.target, old.state) == (new.target, new.state):
        return None
    if old is None or old.target != new.target:
        if new.state == "completed":
            return None  # began and ended between two looks (or recorded before this agent started)
        return EventKind.ROLLOUT_ROLLED_BACK if new.rollback else EventKind.ROLLOUT_STARTED
    if new.state == "updating":  # resumed after a pause
        return EventKind.ROLLOUT_STARTED
    return _ROLLOUT.get(new.state)


def changes(before: Observed, after: Observed, *, node: str, at: str) -> list[Event]:
    """The events between two observations, in a stable order: rollouts, failures, pins."""
    out: list[Event] = []
    for (stack, service), new in sorted(after.rollouts.items()):
        kind = _rollout_event(before.rollouts.get((stack, service)), new)
        if kind is None:
            continue
        if kind is EventKind.ROLLOUT_COMPLETED and new.rollback:
            message = "rollback completed"
        else:
            message = new.reason or kind.value.split(".")[1].replace("-", " ")
        out.append(
            Event(event=kind, node=node, stack=stack, service=service, message=message, revision=new.target, at=at)
        )
    for stack in sorted(set(before.failures) | set(after.failures)):
        old, now = before.failures.get(stack), after.failures.get(stack)
        if now is not None and now != old:
            out.append(
                Event(
                    event=EventKind.PASS_FAILED,
                    node=node,
                    stack=stack,
                    message=now.message,
                    file=now.file,
                    field=now.field,
                    revision=after.revisions.get(stack),
                    at=at,
                )
            )
        elif now is None and old is not None:
            message = "recovered: the stack converges again"
            revision = after.revisions.get(stack)
            out.append(
                Event(event=EventKind.PASS_RECOVERED, node=node, stack=stack, message=message, revision=revision, at=at)
            )
    for stack in sorted(set(before.pins) | set(after.pins)):
        old_pin, new_pin = before.pins.get(stack), after.pins.get(stack)
        if new_pin is not None and new_pin != old_pin:
            message = f"pinned to {new_pin}"
            out.append(
                Event(event=EventKind.STACK_PINNED, node=node, stack=stack, message=message, revision=new_pin, at=at)
            )
        elif new_pin is None and old_pin is not None:
            message = "unpinned: following the source"
            out.append(Event(event=EventKind.STACK_UNPINNED, node=node, stack=stack, message=message, at=at))
    return out
