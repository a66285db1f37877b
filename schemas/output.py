"""Machine-readable output shapes (`--output json`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from schemas.state import Availability, NodeRole, NodeSpec, NodeStatus

Health = Literal["Healthy", "Progressing", "Degraded"]
SourceKind = Literal["directory", "git"]


class PlannedAction(BaseModel):
    """One planned change: what, on which object, and why."""

    op: Literal["create", "start", "replace", "update", "remove"]
    kind: Literal["container", "network", "port"]
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
    """One container of `dabctl ps --output json`; with `--tasks`, also each slot's previous tasks (`task` set,
    no container: desired state `shutdown`, the container's exit code and the error it ended with)."""

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
    task: str | None = None
    error: str = ""
    node: str = ""  # the name of the node the container runs on ("" for a pending slot: it runs nowhere)


class SyncStatus(BaseModel):
    """Whether the node matches the stack's bundle; `error` is the last failure, naming file and field."""

    status: Literal["Synced", "OutOfSync", "Failed"]
    revision: str | None = None
    error: str | None = None
    at: str | None = None


class PendingReplica(BaseModel):
    """A slot of a service that fits on no node, with the scheduler's reason (what to change to place it)."""

    slot: str
    reason: str


class ServiceHealth(BaseModel):
    """Replicas running (and healthy, where a healthcheck exists) against those desired: on a node alone, on this
    node; in a cluster, on every node (from the nodes' slot reports), pending slots counted as desired."""

    service: str
    mode: str
    image: str
    ports: list[str] = []
    running: int
    desired: int
    status: Health
    pending: list[PendingReplica] = []
    warnings: list[str] = []  # e.g. an image with no registry digest on a cluster: nodes may run different images


class HealthStatus(BaseModel):
    status: Health
    services: list[ServiceHealth] = []


class RolloutStatus(BaseModel):
    state: Literal["idle", "updating", "paused", "rolling-back"] = "idle"
    reason: str | None = None


class StackStatus(BaseModel):
    """One stack's status, with separate fields for sync, health, rollout and pin."""

    stack: str
    sync: SyncStatus
    health: HealthStatus
    rollout: RolloutStatus = RolloutStatus()
    pinned: str | None = None
    suspended: bool = False


class VerifyRefusal(BaseModel):
    """Why the source's newest revision is not applied: the commit, the key (or its absence) and the rule."""

    commit: str
    key: str
    rule: str
    message: str
    at: str | None = None


class VerifyStatus(BaseModel):
    """The signature checks of a git source: the mode, the last accepted head, and the current refusal if any."""

    mode: Literal["none", "head", "every-commit"]
    accepted: str | None = None
    refused: VerifyRefusal | None = None


class SourceStatus(BaseModel):
    """Where bundles come from and how the last fetch went (no credentials, ever)."""

    kind: SourceKind
    location: str
    ref: str | None = None
    path: str | None = None
    revision: str | None = None
    last_fetch_at: str | None = None
    last_fetch_error: str | None = None
    verify: VerifyStatus | None = None


class NodeSummary(BaseModel):
    """One node of a cluster as `status` and the web page show it: `state` up while its lease holds, `leader` for
    the one that leads, `replicas` the containers its reports (or, for this node, its engine) say run there.
    `certificate_expires_at` stays None until nodes report their certificate."""

    id: str
    name: str
    role: Literal["manager", "worker"]
    availability: Literal["active", "pause", "drain"]
    state: Literal["up", "down"]
    leader: bool = False
    address: str = ""
    replicas: int = 0
    certificate_expires_at: str | None = None
    schemas_read: str = ""  # the state schemas it reads: `1`, or `1..2`
    # Where its own configured policy refuses what the cluster's allows (it may only narrow it), one line each.
    narrows: list[str] = []


class SchemaHold(BaseModel):
    """A live node that cannot read the state schema the leader writes: while one is listed the leader writes
    nothing for the cluster (every node keeps its last assignments)."""

    node: str
    node_id: str
    reads: str
    leader_writes: int
    fix: str
    message: str


class StatusOutput(BaseModel):
    """`dabctl status --output json` and the agent's `/status`; `nodes` and `schema_held` only on a cluster
    node."""

    node: str
    ready: bool
    source: SourceStatus | None = None
    stacks: list[StackStatus] = []
    nodes: list[NodeSummary] = []
    schema_held: list[SchemaHold] = []


class NodeRow(BaseModel):
    """One node of `dabctl node ls --output json`: `state` up while its lease holds; `leader` for the one that
    leads (its term beside it)."""

    id: str
    name: str
    role: NodeRole
    availability: Availability
    state: Literal["up", "down"]
    leader: bool
    term: int | None = None
    address: str
    version: str
    labels: dict[str, str] = {}
    certificate_expires_at: datetime | None = None  # the node's cluster certificate, as it last reported it


class NodeDetail(BaseModel):
    """`dabctl node inspect NODE`: the node's spec (what managers keep), its status (what it says of itself,
    None while down) and whether it leads."""

    id: str
    name: str
    state: Literal["up", "down"]
    leader: bool
    term: int | None = None
    spec: NodeSpec
    status: NodeStatus | None
    narrows: list[str] = []  # where its own configured policy refuses what the cluster's allows
