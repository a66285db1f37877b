"""The nodes as the orchestrator sees them: each node's spec joined with whether it is alive and what it reports.

Pure: built from the records one snapshot read (`/nodes/`, `/node/<id>/status`, `/leader`). A single-node install
has one node, itself, always up and always its own leader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from schemas.state import Availability, NodeRole, NodeSpec, NodeStatus


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """One node for scheduling and display: `up` while its status key (under its lease) exists."""

    node_id: str
    name: str
    role: NodeRole = "worker"
    labels: Mapping[str, str] = field(default_factory=dict)
    availability: Availability = "active"
    up: bool = True
    cpus: int = 0
    memory_bytes: int = 0
    busy_ports: frozenset[tuple[str, int]] = frozenset()
    address: str = ""
    held: bool = False  # down, but its tasks stay (a recovered cluster waiting for its nodes: `held_down`)

    @property
    def schedulable(self) -> bool:
        """New tasks may be placed here."""
        return self.up and self.availability == "active"

    @property
    def keeps_tasks(self) -> bool:
        """Tasks already here stay (pause keeps them; drain and down do not, unless the node is held)."""
        return (self.up or self.held) and self.availability != "drain"


def node_infos(specs: Mapping[str, NodeSpec], statuses: Mapping[str, NodeStatus]) -> tuple[NodeInfo, ...]:
    """Every node with a spec, ordered by name then id; up when its status is present."""
    out = []
    for node_id, spec in specs.items():
        status = statuses.get(node_id)
        out.append(
            NodeInfo(
                node_id=node_id,
                name=spec.name,
                role=spec.role,
                labels=dict(spec.labels),
                availability=spec.availability,
                up=status is not None,
                cpus=status.cpus if status else 0,
                memory_bytes=status.memory_bytes if status else 0,
                busy_ports=frozenset(status.busy_ports) if status else frozenset(),
                address=status.advertise_address if status else "",
            )
        )
    return tuple(sorted(out, key=lambda n: (n.name, n.node_id)))


def held_down(nodes: tuple[NodeInfo, ...]) -> tuple[NodeInfo, ...]:
    """The nodes with every down one held: it keeps its tasks (none are moved off it, its global task stays) and
    gets no new one. For a cluster just recovered from a lost quorum, whose nodes are down because its managers
    were, not because they failed: they come back to their containers."""
    return tuple(n if n.up else replace(n, held=True) for n in nodes)


def single_node(name: str) -> NodeInfo:
    """The one node of an install without a cluster: itself, a manager, up, active; its id is its name (the
    assignments a single-node state recorded are keyed by it)."""
    return NodeInfo(node_id=name, name=name, role="manager")
