"""What the agent's web page shows: the fleet and one stack, built from status, records and the last pass.

No field carries a bundle's content, an Env value or a secret's digest: the page shows what runs and why, never
what the containers are told.
"""

from __future__ import annotations

from pydantic import BaseModel

from schemas.output import NodeSummary, StatusOutput


class SlotView(BaseModel):
    """One replica slot as the engine showed it when the view was built."""

    service: str
    slot: str
    node: str
    container: str
    id: str
    state: str
    health: str | None = None
    exit_code: int | None = None
    spec: str
    image: str
    error: str = ""  # a pending slot: why no node takes it


class RolloutView(BaseModel):
    """A service's rollout: the batch in flight and the failures counted against it."""

    service: str
    state: str
    target: str
    batch: list[str] = []
    failed: list[str] = []
    reason: str = ""
    rollback: bool = False


class PinView(BaseModel):
    stack: str
    revision: str
    reason: str
    automatic: bool
    at: str


class HistoryEntry(BaseModel):
    """An applied revision (never its content)."""

    revision: str
    applied_at: str
    ok: bool
    errors: list[str] = []


class AuditView(BaseModel):
    reconcile_id: str
    at: str
    node: str
    actions: list[str] = []


class FleetView(BaseModel):
    """The fleet page: the node's status, every slot, rollouts in progress, pins and the nodes (one row for a node
    alone)."""

    generation: int
    built_at: str
    status: StatusOutput
    slots: dict[str, list[SlotView]] = {}  # per stack
    rollouts: dict[str, list[RolloutView]] = {}  # per stack, only those not completed
    pins: list[PinView] = []
    nodes: list[NodeSummary] = []


class StackView(BaseModel):
    """One stack's page."""

    generation: int
    built_at: str
    node: str
    stack: str
    status: StatusOutput  # with this stack only
    slots: list[SlotView] = []
    rollouts: list[RolloutView] = []
    pin: PinView | None = None
    error: str | None = None
    plan: list[str] = []  # the last pass's plan for this stack, as `dabctl plan` prints it
    plan_at: str | None = None
    history: list[HistoryEntry] = []
    audit: list[AuditView] = []
