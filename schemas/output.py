"""Machine-readable output shapes (`--output json`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class PlannedAction(BaseModel):
    """One planned change: what, on which object, and why."""

    op: Literal["create", "start", "replace", "remove"]
    kind: Literal["container", "network"]
    name: str
    service: str | None = None
    slot: str | None = None
    reason: str = ""
    changes: list[str] = []


class StackPlan(BaseModel):
    """The plan for one stack; `error` set when the stack cannot converge (nothing is planned for it)."""

    stack: str
    revision: str | None = None
    error: str | None = None
    actions: list[PlannedAction] = []


class PlanOutput(BaseModel):
    """`dabctl plan --output json`."""

    changes: int
    stacks: list[StackPlan]


class ReplicaRow(BaseModel):
    """One container of `dabctl ps --output json`."""

    stack: str
    service: str
    slot: str
    container: str
    id: str
    state: str
    health: str | None
    exit_code: int | None
    spec: str
    revision: str
