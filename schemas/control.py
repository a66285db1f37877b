"""The control calls: what the CLI asks of the node (locally, or through the running agent) and what it answers.

One shape for both paths, so `reconcile --wait`, `rollback`, `suspend` and `resume` mean the same thing whether
the CLI runs the pass itself or the agent runs it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.bundle import STACK_NAME_PATTERN

StackName = Annotated[str, Field(pattern=STACK_NAME_PATTERN)]


class SourceRef(BaseModel):
    """Where bundles come from, as the caller names them: a directory, or a git location with ref and path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    location: str
    ref: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        extra = [f"{k} {v}" for k, v in (("ref", self.ref), ("path", self.path)) if v]
        return self.location + (f" ({', '.join(extra)})" if extra else "")


class ReconcileRequest(BaseModel):
    """`dabctl reconcile --once`: one pass, then more passes while a rollout moves (or, with `wait`, until
    every service is healthy), for at most `timeout` seconds."""

    model_config = ConfigDict(extra="forbid")

    source: SourceRef | None = Field(
        default=None, description="The source the caller expects; None: whatever is configured"
    )
    wait: bool = False
    timeout: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    allow_empty: bool | None = Field(default=None, description="None: the node's configured allow_empty")
    migrate_volumes: list[StackName] = Field(
        default=[], description="Stacks to move to stack-scoped volume names (their volumes are copied)"
    )


class ReconcileResult(BaseModel):
    """What the passes of one reconcile call did; `errors` decide the exit code, `notes` only inform."""

    ok: bool
    stacks: int = 0
    created: int = 0
    updated: int = 0
    removed: int = 0
    failed: int = 0
    errors: list[str] = []
    notes: list[str] = []
    by_agent: str | None = Field(default=None, description="The control socket of the agent that ran the passes")

    @property
    def changed(self) -> int:
        return self.created + self.updated + self.removed + self.failed


class RollbackRequest(BaseModel):
    """`dabctl rollback STACK [--to REV | --unpin]`, then passes as a reconcile without `wait`."""

    model_config = ConfigDict(extra="forbid")

    stack: StackName
    to: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    unpin: bool = False
    timeout: Annotated[float, Field(gt=0, le=86_400)] = 300.0


class RollbackResult(BaseModel):
    """The pin set or lifted (`message`), and the passes that followed."""

    message: str
    passes: ReconcileResult


class SuspendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stack: StackName
    suspended: bool


class SuspendResult(BaseModel):
    stack: str
    suspended: bool
    changed: bool
