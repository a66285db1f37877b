"""The scheduler: the only code that reads Replicas. It assigns replica slots to nodes.

On one node the agent is its own leader and every slot goes to it; spreading and constraints come with the
cluster, behind this same function.
"""

from __future__ import annotations

from collections.abc import Sequence

from bundles.desired import DesiredState

Assignments = dict[tuple[str, str], dict[str, list[str]]]


def assign(desired: DesiredState, nodes: Sequence[str]) -> Assignments:
    """Slots per (stack, service) per node: replicated slots "1".."N" spread round-robin; global: one per node."""
    out: Assignments = {}
    for stack_name, stack in desired.stacks.items():
        for service_name, service in stack.bundle.services.items():
            per_node: dict[str, list[str]] = {node: [] for node in nodes}
            if service.deploy.mode == "global":
                for node in nodes:
                    per_node[node].append(node)
            elif nodes:
                for i in range(service.deploy.replica_count):
                    per_node[nodes[i % len(nodes)]].append(str(i + 1))
            out[(stack_name, service_name)] = per_node
    return out
