"""Records the agent keeps in the state log (internal JSON, snake_case)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# The state schema: the version of the record formats this code writes (STATE_SCHEMA), and the oldest version it
# still reads (STATE_SCHEMA_OLDEST; it reads every version in between). Every node records both in its NodeStatus;
# a leader writes nothing while a live node cannot read STATE_SCHEMA (agent.cluster.schema), and a node holds a stack
# whose record says it was written in a newer schema than it reads. Raise STATE_SCHEMA when a record changes
# meaning (a field an older reader would misread, not one it may ignore: records ignore unknown fields); raise
# STATE_SCHEMA_OLDEST when this code stops reading a format.
STATE_SCHEMA = 1
STATE_SCHEMA_OLDEST = 1


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
    schema_version: int = 1  # the state schema it was written in (STATE_SCHEMA of the leader that wrote it)


class Chunked(BaseModel):
    """What a key holds instead of a record too large for one state-log request: the sha256 of the record's JSON,
    kept beside it in `chunks` pieces (agent.state.records)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunked: str
    chunks: int


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
    since the last reset (states written before `total` existed count their attempts), and the never-started
    container whose start was last tried."""

    attempts: tuple[float, ...] = ()
    last_start: float | None = None
    total: int = 0
    tried: str = ""


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


# The cluster: who the nodes are, which of them is alive, what each reports, and who leads.

NodeRole = Literal["manager", "worker"]
Availability = Literal["active", "pause", "drain"]


# Seconds a silent node stays `up`: keepalives every TTL/3 leave two to be lost, and an etcd endpoint that does not
# answer costs a keepalive 1.5 s at most (agent/state/etcd.py); the README's "Failure detection" has the measurements.
DEFAULT_LEASE_TTL = 5


class ClusterRecord(Record):
    """The cluster, written once by `cluster init` (managers change its settings): its id, when it was made, the
    lease TTL every node registers under, and the digests of the join tokens' secrets (never the secrets)."""

    cluster_id: str
    created_at: datetime
    lease_ttl: int = DEFAULT_LEASE_TTL
    worker_token_digest: str = ""
    manager_token_digest: str = ""
    ca_digest: str = ""  # sha256 of the cluster CA certificate's DER ("" for a cluster made without a CA)
    certificate_days: int = 90  # life of a node certificate issued at join
    # Set by `cluster recover` / `cluster restore`: until then the leader keeps the slots of down nodes where they
    # are (their containers run on, and the nodes rejoining find them theirs) instead of moving them.
    hold_down_until: datetime | None = None


class NodeSpec(Record):
    """A node as the managers keep it: durable (a down node keeps its spec), changed by `node update`."""

    node_id: str
    name: str
    role: NodeRole = "worker"
    labels: dict[str, str] = {}
    availability: Availability = "active"
    joined_at: datetime


class BindEntry(Record):
    """An `allow_bind_mounts` entry as recorded: the path and everything under it; `read_only`: ReadOnly only."""

    path: str
    read_only: bool = False


class PolicyRecord(Record):
    """A bundle policy as recorded (bundles.policy.Policy, without a node's own protected paths): the cluster's, put
    by the leader with the stack records of the revisions it admitted under it (`/meta/policy`), and each node's own
    in its NodeStatus. A node admits its slots under both: its own configuration may only narrow the cluster's."""

    allow_bind_mounts: list[BindEntry] = []
    allow_host_network: bool = False
    max_replicas_per_service: int = 500
    max_services_per_stack: int = 500
    max_stacks: int = 500
    max_containers_per_node: int = 2000
    allow_external_volumes: list[str] = []
    allow_external_networks: list[str] = []
    allow_published_ports: list[int] = [80, 443]


class NodeStatus(Record):
    """What a live node says of itself, put under its lease (absent: the node is down); rewritten only when it
    changes."""

    node_id: str
    advertise_address: str = ""
    cluster_address: str = ""  # host:port of its cluster listener
    cpus: int = 0
    memory_bytes: int = 0
    busy_ports: list[tuple[str, int]] = []  # (protocol, port) in use by something other than dabctl's balancer
    dabctl_version: str = ""
    schema_version: int = 1  # the state schema it writes and the newest it reads (STATE_SCHEMA)
    schema_oldest: int = 1  # the oldest state schema it reads (STATE_SCHEMA_OLDEST)
    # This node's own configured bundle policy (None: its config sets none, it admits under the cluster's alone):
    # it only narrows the cluster's (agent.node.admission); `status` and `node inspect` show where.
    policy: PolicyRecord | None = None
    certificate_expires_at: datetime | None = None  # this node's certificate (agent.pki.files.certificate_expiry)


class SlotReport(Record):
    """One replica slot as its node last saw it: the task it runs and the container's state."""

    task_id: str = ""
    container_id: str = ""
    state: str = ""  # the engine's: created | running | exited | ...
    health: str | None = None  # starting | healthy | unhealthy, or None without a healthcheck
    address: str = ""
    exit_code: int | None = None
    error: str = ""
    image_id: str = ""
    spec_hash: str = ""
    # The node's policy refused this slot's container of spec `refused_spec` (the rule, one line): the scheduler
    # places that service elsewhere until its spec changes.
    refused: str = ""
    refused_spec: str = ""
    created: int = 0  # when the container was created (epoch seconds): a rollout's monitor period counts from it


class PendingSlot(Record):
    """A replica slot the leader could place on no node, and why (`/pending/<stack>/<service>/<slot>`): written by
    the leader's orchestrator commit only when the pending set changes, read by `status`, `ps` and the page."""

    reason: str


class LeaderRecord(Record):
    """The manager that leads, put under its lease; the key's create revision is its term (the fence)."""

    node_id: str
    name: str
    cluster_address: str = ""
