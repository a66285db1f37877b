"""Services reconciler: one container per replica slot assigned to this node.

observe() is one labelled container list. plan() is a pure function of (desired, actual). apply() runs one
action through a ContainerRuntime. Only containers carrying this state's owner label are ever observed, so
foreign containers cannot be planned on, whatever their names.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bundles.desired import ServiceTarget
from reconcilers.outcome import Outcome, Result

STARTABLE_STATES = ("created", "exited")


@dataclass(frozen=True)
class Replica:
    """A managed container as the engine lists it."""

    id: str
    name: str
    stack: str
    service: str
    slot: str
    spec_hash: str
    state: str
    exit_code: int | None = None
    health: str | None = None
    image_id: str = ""
    revision: str = ""
    created: int = 0
    networks: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.stack}_{self.service}.{self.slot}"


@dataclass(frozen=True)
class ServiceDesired:
    """A service's target spec, the slots the state log assigns to this node, and the last applied spec."""

    target: ServiceTarget
    slots: tuple[str, ...]
    revision: str
    previous_spec: Mapping[str, Any] | None = None
    previous_hash: str | None = None


@dataclass(frozen=True)
class ReplicaRequest:
    """Everything the engine needs to create one replica."""

    name: str
    target: ServiceTarget
    slot: str
    labels: Mapping[str, str]


class ContainerRuntime(Protocol):
    """The narrow engine interface this reconciler needs."""

    def list_replicas(self, owner: str) -> list[Replica]: ...

    def create_replica(self, request: ReplicaRequest) -> str: ...

    def start_replica(self, container_id: str) -> None: ...

    def remove_replica(self, replica: Replica) -> None: ...


# --- actions: their text is the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class CreateReplica:
    """Create and start the container for an empty slot."""

    target: ServiceTarget
    slot: str
    revision: str
    reason: str = "missing"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.target.stack, self.target.name, self.slot)

    def __str__(self) -> str:
        return f"+ {self.target.full_name}.{self.slot} create ({self.reason})"


@dataclass(frozen=True)
class StartReplica:
    """Start an existing container of the current spec again (restart policy)."""

    replica: Replica
    reason: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.replica.stack, self.replica.service, self.replica.slot)

    def __str__(self) -> str:
        return f"~ {self.replica.label} start ({self.reason})"


@dataclass(frozen=True)
class ReplaceReplica:
    """Stop and remove a container of another spec, then create the slot anew (stop-first)."""

    replica: Replica
    target: ServiceTarget
    revision: str
    changes: tuple[str, ...]

    @property
    def slot(self) -> str:
        return self.replica.slot

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.replica.stack, self.replica.service, self.replica.slot)

    def __str__(self) -> str:
        return f"~ {self.replica.label} replace ({', '.join(self.changes)} changed)"


@dataclass(frozen=True)
class RemoveReplica:
    """Stop (with the container's own signal and grace period) and remove a container."""

    replica: Replica
    reason: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.replica.stack, self.replica.service, self.replica.slot)

    def __str__(self) -> str:
        return f"- {self.replica.label} remove ({self.reason})"


ServiceAction = CreateReplica | StartReplica | ReplaceReplica | RemoveReplica


# --- planning ----------------------------------------------------------------------------------------------


def slot_order(slot: str) -> tuple[int, int, str]:
    """Numeric slots in number order, named (global) slots after them."""
    return (0, int(slot), "") if slot.isdigit() else (1, 0, slot)


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> tuple[str, ...]:
    """Top-level spec fields that differ, e.g. ("Env", "Image"); ("spec",) when the old spec is unknown."""
    if old is None:
        return ("spec",)
    keys = sorted(set(old) | set(new))
    return tuple(k for k in keys if old.get(k) != new.get(k)) or ("spec",)


def restart_reason(replica: Replica, condition: str) -> str | None:
    """Why an idle container of the current spec should start again, or None to leave it down."""
    if replica.state == "created":
        return "never started"
    if replica.state != "exited":
        return None
    code = replica.exit_code
    if condition == "any":
        return f"exited ({code}); restart condition any"
    if condition == "on-failure" and code != 0:
        return f"exited ({code}); restart condition on-failure"
    return None


def _stale_networks(replica: Replica, target: ServiceTarget, network_ids: Mapping[str, str]) -> bool:
    wanted = set(target.networks)
    if set(replica.networks) != wanted:
        return True
    return any(network_ids.get(name) != nid for name, nid in replica.networks.items())


def _preference(replica: Replica, spec_hash: str) -> tuple[int, int, int]:
    # Keep the container most likely to be serving: current spec, then running, then newest.
    return (replica.spec_hash != spec_hash, replica.state != "running", -replica.created)


def plan(
    desired: Sequence[ServiceDesired],
    actual: Sequence[Replica],
    network_ids: Mapping[str, str],
) -> list[ServiceAction]:
    """Actions that take `actual` to `desired` (pure).

    `desired` lists every service of every stack this node keeps; a replica of any other stack, service or slot
    in `actual` is removed. `network_ids` maps network names to the ids that survive this pass: a replica
    attached anywhere else is recreated.
    """
    by_slot: dict[tuple[str, str, str], list[Replica]] = {}
    for r in actual:
        by_slot.setdefault((r.stack, r.service, r.slot), []).append(r)
    wanted_services = {(d.target.stack, d.target.name): d for d in desired}
    wanted_stacks = {d.target.stack for d in desired}

    removes: list[RemoveReplica] = []
    others: list[ServiceAction] = []
    for d in desired:
        t = d.target
        condition = t.service.deploy.restart_policy.condition
        for slot in sorted(d.slots, key=slot_order):
            reps = sorted(by_slot.pop((t.stack, t.name, slot), []), key=lambda r: _preference(r, t.spec_hash))
            if not reps:
                others.append(CreateReplica(t, slot, d.revision))
                continue
            keep, extras = reps[0], reps[1:]
            removes.extend(RemoveReplica(x, "duplicate in slot") for x in extras)
            if keep.state == "dead" or _stale_networks(keep, t, network_ids):
                # Removed in the first phase: a network this pass removes must lose its containers first.
                removes.append(RemoveReplica(keep, "network gone or changed" if keep.state != "dead" else "dead"))
                others.append(CreateReplica(t, slot, d.revision, "recreated"))
            elif keep.spec_hash != t.spec_hash:
                old = d.previous_spec if keep.spec_hash == d.previous_hash else None
                others.append(ReplaceReplica(keep, t, d.revision, changed_fields(old, t.spec)))
            elif (why := restart_reason(keep, condition)) is not None:
                others.append(StartReplica(keep, why))

    leftovers = sorted(
        (r for reps in by_slot.values() for r in reps),
        key=lambda r: (r.stack, r.service, slot_order(r.slot)),
        reverse=True,
    )
    for r in leftovers:
        if r.stack not in wanted_stacks:
            reason = "stack pruned: its bundle is gone"
        elif (r.stack, r.service) not in wanted_services:
            reason = "service no longer in the bundle"
        else:
            reason = "slot not assigned to this node"
        removes.append(RemoveReplica(r, reason))
    return [*removes, *others]


def replica_labels(target: ServiceTarget, slot: str, owner: str, node: str, revision: str) -> dict[str, str]:
    """The bundle's labels plus dabctl's: ownership, slot, spec hash and the revision that created it."""
    labels = dict(target.service.labels or {})
    labels.update(
        {
            "dabctl.stack": target.stack,
            "dabctl.service": target.name,
            "dabctl.slot": slot,
            "dabctl.spec": target.spec_hash,
            "dabctl.owner": owner,
            "dabctl.node": node,
            "dabctl.revision": revision,
            "com.docker.stack.namespace": target.stack,
        }
    )
    return labels


def container_name(target: ServiceTarget, slot: str) -> str:
    """`<stack>_<service>.<slot>.<id>` with a fresh random id, as Swarm names tasks."""
    return f"{target.full_name}.{slot}.{secrets.token_hex(6)}"


# --- applying ----------------------------------------------------------------------------------------------


class ServicesReconciler:
    """Applies service actions through a ContainerRuntime; never raises for an engine error."""

    def __init__(self, runtime: ContainerRuntime, owner: str, node: str) -> None:
        self.runtime = runtime
        self.owner = owner
        self.node = node

    def observe(self) -> list[Replica]:
        """This state's containers (one labelled list call)."""
        return self.runtime.list_replicas(self.owner)

    def _create(self, target: ServiceTarget, slot: str, revision: str) -> None:
        labels = replica_labels(target, slot, self.owner, self.node, revision)
        request = ReplicaRequest(container_name(target, slot), target, slot, labels)
        cid = self.runtime.create_replica(request)
        self.runtime.start_replica(cid)

    def apply(self, action: ServiceAction) -> Result[ServiceAction]:
        """Apply one action and report what it did."""
        try:
            if isinstance(action, CreateReplica):
                self._create(action.target, action.slot, action.revision)
                return Result(action, Outcome.CREATED)
            if isinstance(action, StartReplica):
                self.runtime.start_replica(action.replica.id)
                return Result(action, Outcome.UPDATED)
            if isinstance(action, ReplaceReplica):
                self.runtime.remove_replica(action.replica)
                self._create(action.target, action.slot, action.revision)
                return Result(action, Outcome.UPDATED)
            self.runtime.remove_replica(action.replica)
            return Result(action, Outcome.REMOVED)
        except Exception as exc:
            return Result(action, Outcome.FAILED, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
