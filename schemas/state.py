"""Records the agent keeps in the state log (internal JSON, snake_case)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PassOutcome(Record):
    """What the last pass that changed something did to a stack."""

    reconcile_id: str
    at: datetime
    created: int = 0
    updated: int = 0
    removed: int = 0
    failed: int = 0
    errors: list[str] = []


class ServiceRecord(Record):
    """The spec a service was last applied with and the image ID its reference resolved to."""

    spec_hash: str
    spec: dict[str, Any]
    image: str
    image_id: str = ""
    repo_digest: str = ""  # the registry digest the reference resolved to when pulled (sha256:...)


class StackRecord(Record):
    """A stack as this state last applied it: revision, bundle hash and content (for rollback), outcome, and how
    its named volumes are named on the engine: `<stack>_<name>` ("scoped", every stack first deployed since
    volumes were stack-scoped) or as written ("legacy": records written before the field existed, until
    `--migrate-volumes` moves the stack)."""

    stack: str
    revision: str
    file: str
    bundle_hash: str
    content: str
    services: dict[str, ServiceRecord] = {}
    applied_at: datetime
    outcome: PassOutcome
    volume_names: Literal["scoped", "legacy"] = "legacy"


class Assignment(Record):
    """Replica slots of one service by node, written by the scheduler (the only reader of Replicas)."""

    nodes: dict[str, list[str]]


class AuditAction(Record):
    """One applied action of a pass."""

    stack: str
    action: str
    outcome: str
    error: str = ""


class AuditEntry(Record):
    """What one pass that changed something did, for the audit trail."""

    reconcile_id: str
    at: datetime
    node: str
    actions: list[AuditAction]


class Pin(Record):
    """A stack held at a recorded revision (dabctl rollback, or an update's rollback FailureAction) until a commit
    changes the stack's bundle (its source revision moves past `source_revision`) or `rollback --unpin`."""

    stack: str
    revision: str
    reason: str
    automatic: bool = False
    source_revision: str | None = None
    at: datetime


class RolloutRecord(Record):
    """A service's rolling update between passes: the target it rolls to (spec hash, `@<image ID>` once
    recorded), its state, the batch in flight and when the last one finished (epoch seconds), the failures
    counted against MaxFailureRatio (each `slot <slot>: <what happened>`), the reason it paused or rolls back,
    and whether it is itself a rollback."""

    target: str
    state: Literal["updating", "paused", "rolling-back", "completed"] = "updating"
    batch: tuple[str, ...] = ()
    batch_done_at: float | None = None
    failed: tuple[str, ...] = ()
    reason: str = ""
    rollback: bool = False


class RestartRecord(Record):
    """When a slot was restarted (epoch seconds): the most recent attempts, the last start, and the restarts
    since the last reset (states written before `total` existed count their attempts)."""

    attempts: tuple[float, ...] = ()
    last_start: float | None = None
    total: int = 0


class TaskRecord(Record):
    """One task of a replica slot, as SwarmKit's: the spec it runs (`target`, a spec hash), the node it is assigned
    to, its desired state, when the orchestrator created it (epoch seconds), whether it was recorded healthy (a
    start-first handover: the old task is shut down in the same transaction), and how it ended (`ended_at`, the
    container's exit code, an error)."""

    task_id: str
    slot: str
    node: str
    target: str
    desired: Literal["running", "shutdown"] = "running"
    created_at: float
    created_revision: int = 0  # the state revision it was planned from: orders tasks created in the same second
    healthy: bool = False
    ended_at: float | None = None
    exit_code: int | None = None
    error: str = ""
