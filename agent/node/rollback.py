"""`dabctl rollback`: pin a stack to a recorded revision (its stored bundle and image IDs), or lift the pin."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.state.records import Records
from schemas.errors import DabctlError
from schemas.state import Pin


class RollbackError(DabctlError):
    """The rollback cannot be done; the message says why and what to run instead."""


def pin_stack(records: Records, stack: str, to: str | None, reason: str = "dabctl rollback") -> Pin:
    """Pin `stack` to revision `to` (a full revision or a unique prefix of its digest), or to the one applied
    before the current one; the pin holds until the source's revision of the stack moves."""
    history = records.history(stack)
    if not history:
        raise RollbackError(f"no recorded revisions of stack {stack!r}; `dabctl history {stack}` lists them")
    current = records.stacks().get(stack)
    pins = records.pins()
    if to is None:
        now_at = current.revision if current else history[0].revision
        entry = next((h for h in history if h.revision != now_at), None)
        if entry is None:
            raise RollbackError(f"stack {stack!r} has no earlier revision than {now_at}")
    else:
        matches = {h.revision: h for h in history if h.revision == to or _digest(h.revision).startswith(to)}
        if len(matches) != 1:
            known = ", ".join(dict.fromkeys(h.revision for h in history))
            what = "matches several" if matches else "is not"
            raise RollbackError(f"revision {to!r} {what} in the history of {stack!r}; recorded: {known}")
        entry = next(iter(matches.values()))
    held = pins.get(stack)
    source_revision = held.source_revision if held else (current.revision if current else None)
    pin = Pin(
        stack=stack, revision=entry.revision, reason=reason, source_revision=source_revision, at=datetime.now(UTC)
    )
    records.set_pin(pin, stack)
    return pin


def unpin_stack(records: Records, stack: str) -> bool:
    """Let the source lead again; whether there was a pin."""
    if stack not in records.pins():
        return False
    records.set_pin(None, stack)
    return True


def _digest(revision: str) -> str:
    return revision.partition(":")[2]
