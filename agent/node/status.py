"""Stack status (sync, health, rollout, pin) from what the state log recorded and what the engine shows: a pure
function."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bundles.desired import DesiredState, service_targets, with_volume_names
from reconcilers.loadbalancer import PortKey
from reconcilers.rollout import Rollout
from reconcilers.services import Replica
from schemas.output import Health, HealthStatus, RolloutStatus, ServiceHealth, StackStatus, SyncStatus
from schemas.state import Pin, StackRecord


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


def stack_statuses(
    desired: DesiredState | None,
    records: Mapping[str, StackRecord],
    replicas: Sequence[Replica],
    *,
    assignments: Mapping[tuple[str, str], Mapping[str, list[str]]],
    node: str,
    errors: Mapping[str, str],
    suspended: set[str],
    rollouts: Mapping[tuple[str, str], Rollout] | None = None,
    pins: Mapping[str, Pin] | None = None,
    ports: Mapping[PortKey, int] | None = None,
) -> list[StackStatus]:
    """One status per stack known to the source, the state or the engine.

    sync: Failed when the stack has an error (load or pass), Synced when the recorded revision is the desired
    one and every assigned slot runs the current spec, OutOfSync otherwise. health: per service, running
    replicas of the current spec that are not unhealthy or starting, against the slots assigned to this node.
    """
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
                want = len(assignments.get((name, t.name), {}).get(node, []))
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
                converged &= len(current) >= want and len(by_service.get((name, t.name), [])) == want
                services.append(
                    ServiceHealth(
                        service=t.name,
                        mode=t.service.deploy.mode,
                        image=t.service.image,
                        ports=_ports(name, t.name, t.service, ports or {}),
                        running=len(running),
                        desired=want,
                        status=health,
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


def image_warnings(statuses: Sequence[StackStatus], records: Mapping[str, StackRecord]) -> list[StackStatus]:
    """A cluster's statuses with a warning on each service whose image the leader recorded no registry digest
    for (built or imported locally, or never pulled where the leader resolved it): every node runs its own image
    of that reference, which may differ from node to node. (Every other image runs by the recorded digest.)"""
    for st in statuses:
        record = records.get(st.stack)
        for s in st.health.services:
            recorded = record.services.get(s.service) if record is not None else None
            if "@" in s.image or recorded is None or recorded.image != s.image or recorded.repo_digest:
                continue
            s.warnings.append(
                f"image {s.image} has no registry digest: each node runs its own image of that name, so replicas "
                "may differ between nodes (push it to a registry, or pin it by digest)"
            )
    return list(statuses)
