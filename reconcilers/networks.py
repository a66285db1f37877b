"""Networks reconciler: stack networks exist as their bundles define them; orphans go after their containers.

observe() is one network list call. plan() is pure. Networks without this state's owner label are never changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from bundles.desired import NetworkTarget
from reconcilers.outcome import ActionKind, Outcome, Result, one_line

LABEL_PREFIX = "dabctl."


@dataclass(frozen=True)
class ObservedNetwork:
    """A network as the engine lists it."""

    id: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def owned_by(self, owner: str) -> bool:
        return self.labels.get("dabctl.owner") == owner

    @property
    def stack(self) -> str:
        return self.labels.get("dabctl.stack", "")


@dataclass(frozen=True)
class NetworkRequest:
    """Everything the engine needs to create one managed network."""

    name: str
    driver: str
    internal: bool
    labels: Mapping[str, str]


class NetworkRuntime(Protocol):
    """The narrow engine interface this reconciler needs."""

    def list_networks(self) -> list[ObservedNetwork]: ...

    def create_network(self, request: NetworkRequest) -> str: ...

    def remove_network(self, network_id: str) -> None: ...


@dataclass(frozen=True)
class CreateNetwork:
    """Create a managed network."""

    stack: str
    request: NetworkRequest
    reason: str = "missing"
    kind: ClassVar[ActionKind] = ActionKind.CREATE

    def __str__(self) -> str:
        return f"{self.kind.sign} network {self.request.name} ({self.reason})"


@dataclass(frozen=True)
class RemoveNetwork:
    """Remove a managed network (after the containers on it are gone)."""

    stack: str
    network: ObservedNetwork
    reason: str
    kind: ClassVar[ActionKind] = ActionKind.REMOVE

    def __str__(self) -> str:
        return f"{self.kind.sign} network {self.network.name} ({self.reason})"


NetworkAction = CreateNetwork | RemoveNetwork


def network_spec_hash(target: NetworkTarget) -> str:
    """Hash of what a network cannot change in place: driver, internal, labels."""
    doc = target.spec.model_dump(mode="json", exclude_defaults=True, exclude={"external"})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def network_labels(target: NetworkTarget, owner: str) -> dict[str, str]:
    """User labels plus dabctl's ownership labels."""
    labels = dict(target.spec.labels or {})
    labels.update(
        {
            "dabctl.stack": target.stack,
            "dabctl.network": target.name,
            "dabctl.owner": owner,
            "dabctl.spec": network_spec_hash(target),
            "com.docker.stack.namespace": target.stack,
        }
    )
    return labels


def conflicts(targets: Iterable[NetworkTarget], actual: Sequence[ObservedNetwork], owner: str) -> dict[str, str]:
    """Stacks that cannot converge because of networks, with the reason: a missing External network, or a
    network of a managed name that is not ours."""
    by_name: dict[str, list[ObservedNetwork]] = {}
    for n in actual:
        by_name.setdefault(n.name, []).append(n)
    problems: dict[str, str] = {}
    for t in targets:
        present = by_name.get(t.full_name, [])
        if t.external:
            if not present:
                problems.setdefault(
                    t.stack,
                    f"network {t.full_name!r} is External but does not exist; create it "
                    f"(docker network create {t.full_name}) or drop External",
                )
        elif any(not n.owned_by(owner) for n in present):
            problems.setdefault(
                t.stack,
                f"a network named {t.full_name!r} exists and is not managed by this dabctl state; "
                "rename or remove it, or rename the network in the bundle",
            )
    return problems


def plan(
    targets: Sequence[NetworkTarget],
    actual: Sequence[ObservedNetwork],
    owner: str,
    *,
    away: Collection[str] = frozenset(),
) -> list[NetworkAction]:
    """Creates for missing or changed managed networks, removes for changed and orphaned ones (pure).

    Stacks in `away` have no replica on this node (a cluster runs them elsewhere): their networks are not made here,
    and those made before are removed."""
    mine = {n.name: n for n in actual if n.owned_by(owner)}
    wanted: dict[str, NetworkTarget] = {t.full_name: t for t in targets if not t.external and t.stack not in away}
    actions: list[NetworkAction] = []
    for name, t in sorted(wanted.items()):
        labels = network_labels(t, owner)
        request = NetworkRequest(name=name, driver=t.spec.driver, internal=t.spec.internal, labels=labels)
        current = mine.get(name)
        if current is None:
            actions.append(CreateNetwork(t.stack, request))
        elif current.labels.get("dabctl.spec") != labels["dabctl.spec"]:
            actions.append(RemoveNetwork(t.stack, current, "definition changed: recreate"))
            actions.append(CreateNetwork(t.stack, request, "definition changed"))
    for name, n in sorted(mine.items()):
        if name not in wanted:
            reason = "no replica of its stack on this node" if n.stack in away else "no longer in any bundle"
            actions.append(RemoveNetwork(n.stack, n, reason))
    return actions


def kept_network_ids(actual: Sequence[ObservedNetwork], actions: Sequence[NetworkAction], owner: str) -> dict[str, str]:
    """Network name -> id for networks that survive the plan; a container attached elsewhere is stale."""
    removed = {a.network.id for a in actions if isinstance(a, RemoveNetwork)}
    return {n.name: n.id for n in actual if n.id not in removed}


class NetworksReconciler:
    """Applies network actions through a NetworkRuntime."""

    def __init__(self, runtime: NetworkRuntime, owner: str) -> None:
        self.runtime = runtime
        self.owner = owner

    def observe(self) -> list[ObservedNetwork]:
        """Every network on the engine (one list call): ours, foreign ones and External ones."""
        return self.runtime.list_networks()

    def apply(self, action: NetworkAction) -> Result[NetworkAction]:
        """Apply one action; an engine error becomes a failed result, never an exception."""
        try:
            if isinstance(action, CreateNetwork):
                self.runtime.create_network(action.request)
                return Result(action, Outcome.CREATED)
            self.runtime.remove_network(action.network.id)
            return Result(action, Outcome.REMOVED)
        except Exception as exc:
            return Result(action, Outcome.FAILED, one_line(exc))
