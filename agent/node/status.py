"""Stack status (sync, health, rollout, pin) from what the state log recorded and what the engine shows, and the
cluster as `status`, `ps` and the page show it (nodes, every node's replicas, pending slots): pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.cluster.nodes import node_infos
from agent.cluster.orchestrate import stack_from_record
from agent.cluster.schema import schema_conflicts
from agent.cluster.snapshot import Snapshot
from bundles import InvalidBundles
from bundles.desired import DesiredState, service_targets, with_volume_names
from bundles.policy import narrowing
from reconcilers.loadbalancer import PortKey
from reconcilers.rollout import Rollout
from reconcilers.services import Replica
from schemas.output import (
    Health,
    HealthStatus,
    NodeSummary,
    PendingReplica,
    RolloutStatus,
    SchemaHold,
    ServiceHealth,
    StackStatus,
    SyncStatus,
)
from schemas.state import Pin, StackRecord

SlotKey = tuple[str, str, str]


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """What runs where, as one node sees it at one state revision.

    `replicas`: this node's containers (as its engine lists them) and, in a cluster, every other up node's as its
    slot reports say, each with `node` set to its node's id; `stale`: the last reports of down nodes (their slots
    move; shown, never counted); `names`: node id -> name; `nodes`: the cluster's nodes (empty on a node alone);
    `pending`: slots the leader placed on no node, and why."""

    own: str
    cluster: bool
    replicas: list[Replica] = field(default_factory=list)
    stale: list[Replica] = field(default_factory=list)
    names: Mapping[str, str] = field(default_factory=dict)
    nodes: list[NodeSummary] = field(default_factory=list)
    pending: Mapping[SlotKey, str] = field(default_factory=dict)
    schema_held: list[SchemaHold] = field(default_factory=list)

    def name_of(self, node_id: str) -> str:
        return self.names.get(node_id, node_id)


def fleet(snapshot: Snapshot, own: str, own_name: str, local: Sequence[Replica]) -> Fleet:
    """The fleet from `snapshot` and this node's own containers (`local`). `own` is this node's key in the
    assignments (its node id in a cluster, its name alone); a state with no node specs is a node alone."""
    mine = [replace(r, node=own) for r in local]
    if not snapshot.nodes:
        return Fleet(own=own, cluster=False, replicas=mine, names={own: own_name}, pending=dict(snapshot.pending))
    others: list[Replica] = []
    stale: list[Replica] = []
    for node_id, reports in sorted(snapshot.reports.items()):
        if node_id == own:
            continue  # this node's own slots are observed, not read
        for (stack, service, slot), rep in sorted(reports.items()):
            if not rep.container_id:
                continue
            replica = Replica.reported((stack, service, slot), rep, node_id)
            (others if node_id in snapshot.statuses else stale).append(replica)
    everyone = [*mine, *others]
    leader = snapshot.leader.node_id if snapshot.leader is not None else None
    nodes = [
        NodeSummary(
            id=n.node_id,
            name=n.name,
            role=n.role,
            availability=n.availability,
            state="up" if n.up else "down",
            leader=n.node_id == leader,
            address=n.address,
            replicas=sum(1 for r in everyone if r.node == n.node_id and r.state == "running"),
            certificate_expires_at=_expiry(snapshot, n.node_id),
            schemas_read=_reads(snapshot, n.node_id),
            narrows=narrows(snapshot, n.node_id),
        )
        for n in node_infos(snapshot.nodes, snapshot.statuses)
    ]
    return Fleet(
        own=own,
        cluster=True,
        replicas=everyone,
        stale=stale,
        names={**{i: s.name for i, s in snapshot.nodes.items()}, **({} if own in snapshot.nodes else {own: own_name})},
        nodes=nodes,
        pending=dict(snapshot.pending),
        schema_held=schema_held(snapshot),
    )


def _reads(snapshot: Snapshot, node_id: str) -> str:
    status = snapshot.statuses.get(node_id)
    if status is None:
        return ""
    oldest, newest = status.schema_oldest, status.schema_version
    return str(newest) if oldest == newest else f"{oldest}..{newest}"


def narrows(snapshot: Snapshot, node_id: str) -> list[str]:
    """Where node `node_id`'s own configured policy (its status says) refuses what the cluster's recorded policy
    allows; empty for a node that uses the cluster's, or while none is recorded."""
    status = snapshot.statuses.get(node_id)
    if snapshot.policy is None or status is None or status.policy is None:
        return []
    return narrowing(snapshot.policy, status.policy)


def schema_held(snapshot: Snapshot) -> list[SchemaHold]:
    """The live nodes that cannot read the state schema the leader writes (the leader's status says which): while
    there are any, the leader writes nothing for the cluster (agent.cluster.schema)."""
    leader = snapshot.statuses.get(snapshot.leader.node_id) if snapshot.leader is not None else None
    if leader is None:
        return []
    return [
        SchemaHold(node=c.name, node_id=c.node_id, reads=c.reads, leader_writes=c.writes, fix=c.fix, message=str(c))
        for c in schema_conflicts(leader.schema_version, snapshot.nodes, snapshot.statuses)
    ]


def recorded(snapshot: Snapshot) -> DesiredState:
    """The desired state as the leader recorded it (each stack's applied content); a record that no longer
    loads here is left out (its stack shows without services)."""
    stacks = {}
    for name, record in snapshot.stacks.items():
        try:
            stacks[name] = stack_from_record(record)
        except InvalidBundles:
            continue
    return DesiredState(stacks=stacks)


def _expiry(snapshot: Snapshot, node_id: str) -> str | None:
    value: object = getattr(snapshot.statuses.get(node_id), "certificate_expires_at", None)
    return str(value) if value else None


def alone(own_name: str, replicas: Sequence[Replica]) -> NodeSummary:
    """A node alone as the page's nodes panel shows it: a manager, up, active, its own leader."""
    running = sum(1 for r in replicas if r.state == "running")
    return NodeSummary(
        id=own_name, name=own_name, role="manager", availability="active", state="up", leader=True, replicas=running
    )


def fleet_statuses(
    desired: DesiredState | None,
    snapshot: Snapshot,
    seen: Fleet,
    *,
    errors: Mapping[str, str],
) -> list[StackStatus]:
    """Each stack's status over the fleet: on a node alone, its slots; in a cluster, every node's. A cluster node
    with no source of its own (a worker) shows the desired state the leader recorded, and a service whose image
    has no registry digest carries a warning."""
    if desired is None and seen.cluster:
        desired = recorded(snapshot)
    statuses = stack_statuses(
        desired,
        snapshot.stacks,
        seen.replicas,
        slots=Slots(snapshot.assignments, None if seen.cluster else seen.own, seen.pending),
        errors=errors,
        suspended=set(snapshot.suspended),
        rollouts=snapshot.rollouts,
        pins=snapshot.pins,
        ports=snapshot.ports,
    )
    return image_warnings(statuses, snapshot.stacks) if seen.cluster else statuses


def _ports(stack: str, service: str, spec: object, published: Mapping[PortKey, int]) -> list[str]:
    """`30000:8080/tcp` per port: the published port (fixed or allocated) and the container's."""
    out = []
    for p in getattr(spec, "ports", None) or []:
        port = published.get(PortKey(stack, service, p.protocol, p.port), p.published_port)
        out.append(f"{port}:{p.port}/{p.protocol}" if port else f"{p.port}/{p.protocol}")
    return out


def _rollout(stack: str, rollouts: Mapping[tuple[str, str], Rollout]) -> RolloutStatus:
    """The stack's rollout: paused beats rolling-back beats updating; the reason names service and replica."""
    mine = {svc: r for (st, svc), r in rollouts.items() if st == stack and r.state != "completed"}
    for state in ("paused", "rolling-back", "updating"):
        for svc, r in sorted(mine.items()):
            if r.state == state:
                return RolloutStatus(state=state, reason=f"{svc}: {r.reason}" if r.reason else f"{svc}: {state}")
    return RolloutStatus()


@dataclass(frozen=True)
class Slots:
    """The slots a status counts as desired: those `assignments` give `node` (None: every node) and the pending."""

    assignments: Mapping[tuple[str, str], Mapping[str, list[str]]]
    node: str | None
    pending: Mapping[SlotKey, str] = field(default_factory=dict)

    def assigned(self, key: tuple[str, str]) -> int:
        placed = self.assignments.get(key, {})
        return len(placed.get(self.node, [])) if self.node is not None else sum(len(v) for v in placed.values())

    def waiting(self) -> dict[tuple[str, str], list[PendingReplica]]:
        out: dict[tuple[str, str], list[PendingReplica]] = {}
        for (st, svc, slot), reason in sorted(self.pending.items()):
            out.setdefault((st, svc), []).append(PendingReplica(slot=slot, reason=reason))
        return out


def stack_statuses(
    desired: DesiredState | None,
    records: Mapping[str, StackRecord],
    replicas: Sequence[Replica],
    *,
    slots: Slots,
    errors: Mapping[str, str],
    suspended: set[str],
    rollouts: Mapping[tuple[str, str], Rollout] | None = None,
    pins: Mapping[str, Pin] | None = None,
    ports: Mapping[PortKey, int] | None = None,
) -> list[StackStatus]:
    """One status per stack known to the source, the state or the engine.

    sync: Failed when the stack has an error (load or pass), Synced when the recorded revision is the desired
    one and every assigned slot runs the current spec, OutOfSync otherwise. health: per service, running
    replicas of the current spec that are not unhealthy or starting, against the slots assigned to `slots.node`
    (None: to every node, `replicas` then being every node's) plus its pending slots.
    """
    waiting = slots.waiting()
    by_service: dict[tuple[str, str], list[Replica]] = {}
    for r in replicas:
        by_service.setdefault((r.stack, r.service), []).append(r)
    names = set(records) | {r.stack for r in replicas} | set(errors) | set(desired.stacks if desired else {})
    out = []
    for name in sorted(names):
        stack = desired.stacks.get(name) if desired else None
        record = records.get(name)
        if stack is not None and record is not None:
            stack = with_volume_names(stack, record.volume_names)
        services: list[ServiceHealth] = []
        converged = True
        if stack is not None:
            for t in service_targets(stack):
                assigned = slots.assigned((name, t.name))
                unplaced = waiting.get((name, t.name), [])
                want = assigned + len(unplaced)
                current = [r for r in by_service.get((name, t.name), []) if r.spec_hash == t.spec_hash]
                running = [r for r in current if r.state == "running" and r.health not in ("unhealthy", "starting")]
                starting = [r for r in current if r.state == "running" and r.health == "starting"]
                health: Health
                if len(running) >= want:
                    health = "Healthy"
                elif starting:
                    health = "Progressing"
                else:
                    health = "Degraded"
                # Sync is about what was placed: a pending slot shows in health (running below desired), not here.
                converged &= len(current) >= assigned and len(by_service.get((name, t.name), [])) == assigned
                services.append(
                    ServiceHealth(
                        service=t.name,
                        mode=t.service.deploy.mode,
                        image=t.service.image,
                        ports=_ports(name, t.name, t.service, ports or {}),
                        running=len(running),
                        desired=want,
                        status=health,
                        pending=unplaced,
                    )
                )
        else:
            converged = False  # deployed but gone from the source: pruned by the next pass
        if name in errors:
            sync = SyncStatus(status="Failed", revision=record.revision if record else None, error=errors[name])
        elif record is not None and record.outcome.failed:
            sync = SyncStatus(status="Failed", revision=record.revision, error="; ".join(record.outcome.errors[:3]))
        elif stack is not None and record is not None and record.revision == stack.revision and converged:
            sync = SyncStatus(status="Synced", revision=record.revision)
        else:
            sync = SyncStatus(status="OutOfSync", revision=record.revision if record else None)
        if record is not None:
            sync.at = record.applied_at.isoformat()
        worst: Health = "Healthy"
        for s in services:
            if s.status == "Degraded":
                worst = "Degraded"
            elif s.status == "Progressing" and worst == "Healthy":
                worst = "Progressing"
        pin = (pins or {}).get(name)
        out.append(
            StackStatus(
                stack=name,
                sync=sync,
                health=HealthStatus(status=worst, services=services),
                rollout=_rollout(name, rollouts or {}),
                pinned=pin.revision if pin else None,
                suspended=name in suspended,
            )
        )
    return out


def _named_volumes(spec: Mapping[str, Any]) -> list[str]:
    """The engine names of the named volumes a recorded container spec mounts."""
    return sorted(str(m["Source"]) for m in spec.get("Mounts", []) if m.get("Type") == "volume" and m.get("Source"))


def image_warnings(statuses: Sequence[StackStatus], records: Mapping[str, StackRecord]) -> list[StackStatus]:
    """A cluster's statuses with a warning on each replicated service that mounts a named volume (a replica that
    moves finds another node's volume), and on each service whose image the leader recorded no registry digest
    for (built or imported locally, or never pulled where the leader resolved it): every node runs its own image
    of that reference, which may differ from node to node. (Every other image runs by the recorded digest.)"""
    for st in statuses:
        record = records.get(st.stack)
        for s in st.health.services:
            recorded = record.services.get(s.service) if record is not None else None
            volumes = _named_volumes(recorded.spec) if recorded is not None and s.mode != "global" else []
            if volumes:
                s.warnings.append(
                    f"named volumes are per node ({', '.join(volumes)}): a replica moved to another node gets that "
                    "node's volume of the same name, empty if new (as in Swarm); pin the service with a placement "
                    "constraint to keep its data"
                )
            if "@" in s.image or recorded is None or recorded.image != s.image or recorded.repo_digest:
                continue
            s.warnings.append(
                f"image {s.image} has no registry digest: each node runs its own image of that name, so replicas "
                "may differ between nodes (push it to a registry, or pin it by digest)"
            )
    return list(statuses)
