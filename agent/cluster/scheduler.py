"""The scheduler: the only code that reads Replicas. It assigns replica slots to nodes (pure).

Swarm's rules. Replicated services have slots "1".."N"; a slot stays on its node while that node keeps tasks
(up, not drained) and still satisfies the service's placement, so a converged cluster never moves a replica without
a reason. A slot without a node (new, or its node went down, was drained or no longer fits) goes to the eligible
schedulable node with the fewest replicas of that service, ties by fewest tasks overall, then by name (spread);
scaling down removes the highest slots. Global services get one slot per eligible node, named by the node id: a
paused node keeps its global task and gets no new one, a drained or down node loses it. A node that refused a
service (policy) never gets it. A slot that fits nowhere is pending, with a reason the user can act on.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.cluster.nodes import NodeInfo
from agent.cluster.snapshot import Assignments, ServiceKey, SlotKey
from bundles.desired import DesiredState
from schemas.bundle import Service
from schemas.constraints import Constraint, parse_constraint

Refused = Mapping[ServiceKey, Sequence[str]]


@dataclass(kw_only=True)
class Schedule:
    """Where each slot runs ({(stack, service): {node id: [slot, ...]}}, nodes without slots left out) and the
    slots that fit nowhere, each with why."""

    assignments: Assignments = field(default_factory=dict)
    pending: dict[SlotKey, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Placement:
    """One service's placement rules, parsed."""

    constraints: tuple[Constraint, ...]
    max_per_node: int  # 0: no limit
    refused: frozenset[str]


def _placement(service: Service, refused: Sequence[str], *, enforce: bool) -> _Placement:
    p = service.deploy.placement
    if not enforce:
        return _Placement(constraints=(), max_per_node=0, refused=frozenset(refused))
    return _Placement(
        constraints=tuple(parse_constraint(c) for c in p.constraints),
        max_per_node=p.max_replicas_per_node or 0,
        refused=frozenset(refused),
    )


def _fits(node: NodeInfo, rules: _Placement) -> bool:
    """The node satisfies every constraint and did not refuse the service."""
    if node.node_id in rules.refused:
        return False
    if not rules.constraints:
        return True
    return all(c.matches(node.node_id, node.name, node.role, node.labels) for c in rules.constraints)


def _slot_order(slot: str) -> tuple[int, str]:
    return (int(slot), slot) if slot.isdigit() else (1 << 62, slot)


def assign(
    desired: DesiredState,
    nodes: Sequence[NodeInfo],
    recorded: Assignments | None = None,
    refused: Refused | None = None,
    *,
    placement: bool = True,
) -> Schedule:
    """Every service's slots on nodes, keeping `recorded` placements that still hold (pure). Without `placement`
    (one node outside a cluster, as before clusters existed) Constraints and MaxReplicasPerNode are not applied."""
    recorded = recorded or {}
    refused = refused or {}
    by_id = {n.node_id: n for n in nodes}
    totals = dict.fromkeys(by_id, 0)  # tasks per node, all services: the spread's tie-break
    out = Schedule()
    todo: list[tuple[ServiceKey, _Placement, list[str], dict[str, list[str]]]] = []
    # First every slot that stays where it is (so the totals are right), then the ones that need a node.
    for stack_name in sorted(desired.stacks):
        for service_name, service in sorted(desired.stacks[stack_name].bundle.services.items()):
            key = (stack_name, service_name)
            rules = _placement(service, refused.get(key, ()), enforce=placement)
            before = recorded.get(key, {})
            if service.deploy.mode == "global":
                out.assignments[key] = _global(nodes, before, rules, totals)
                continue
            kept, free = _kept(service.deploy.replica_count, before, by_id, rules)
            for node_id, slots in kept.items():
                totals[node_id] += len(slots)
            out.assignments[key] = kept
            if free:
                todo.append((key, rules, free, kept))
    eligible: dict[tuple[tuple[Constraint, ...], frozenset[str]], list[NodeInfo]] = {}
    for key, rules, free, kept in todo:
        # Services with the same rules (most: none) share one scan of the nodes.
        candidates = eligible.get((rules.constraints, rules.refused))
        if candidates is None:
            candidates = [n for n in nodes if n.schedulable and _fits(n, rules)]
            eligible[(rules.constraints, rules.refused)] = candidates
        pending = _spread(free, kept, candidates, rules, totals)
        if pending:
            reason = pending_reason(nodes, rules)
            out.pending.update({(*key, slot): reason for slot in pending})
        for slots in kept.values():
            slots.sort(key=_slot_order)
    return out


def _global(
    nodes: Sequence[NodeInfo], before: Mapping[str, list[str]], rules: _Placement, totals: dict[str, int]
) -> dict[str, list[str]]:
    """One slot per node that fits: kept where it runs while the node keeps tasks, new where it is schedulable."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        if not _fits(node, rules):
            continue
        if node.schedulable or (node.keeps_tasks and node.node_id in before.get(node.node_id, ())):
            out[node.node_id] = [node.node_id]
            totals[node.node_id] += 1
    return out


def _kept(
    replicas: int, before: Mapping[str, list[str]], by_id: Mapping[str, NodeInfo], rules: _Placement
) -> tuple[dict[str, list[str]], list[str]]:
    """The recorded slots that stay on their nodes, and the slots ("1".."replicas") that need one, lowest first."""
    kept: dict[str, list[str]] = {}
    placed: set[str] = set()
    for node_id, slots in before.items():
        node = by_id.get(node_id)
        if node is None or not node.keeps_tasks or not _fits(node, rules):
            continue
        stay = sorted({s for s in slots if s.isdigit() and 0 < int(s) <= replicas and s not in placed}, key=int)
        if rules.max_per_node:
            stay = stay[: rules.max_per_node]  # MaxReplicasPerNode lowered: the highest slots move
        if stay:
            kept[node_id] = stay
            placed.update(stay)
    free = [str(i) for i in range(1, replicas + 1) if str(i) not in placed]
    return kept, free


def _spread(
    free: Sequence[str],
    kept: dict[str, list[str]],
    nodes: Sequence[NodeInfo],
    rules: _Placement,
    totals: dict[str, int],
) -> list[str]:
    """Place `free` slots (into `kept`) on the eligible `nodes` with the fewest replicas of the service, then the
    fewest tasks, then by name; the slots no node can take are returned."""
    heap = [(len(kept.get(n.node_id, ())), totals[n.node_id], n.name, n.node_id) for n in nodes]
    heapq.heapify(heap)
    limit = rules.max_per_node
    for i, slot in enumerate(free):
        while heap and limit and heap[0][0] >= limit:
            heapq.heappop(heap)  # full: every other node in the heap has at least as many
        if not heap:
            return list(free[i:])
        count, total, name, node_id = heap[0]
        kept.setdefault(node_id, []).append(slot)
        totals[node_id] = total + 1
        heapq.heapreplace(heap, (count + 1, total + 1, name, node_id))
    return []


def pending_reason(nodes: Sequence[NodeInfo], rules: _Placement) -> str:
    """Why a slot of a service with these rules fits on no node, counting each node's reason."""
    down = drained = paused = refused = unmatched = eligible = 0
    for n in nodes:
        if not n.up:
            down += 1
        elif n.availability == "drain":
            drained += 1
        elif n.availability == "pause":
            paused += 1
        elif n.node_id in rules.refused:
            refused += 1
        elif not _fits(n, rules):
            unmatched += 1
        else:
            eligible += 1
    parts = [
        f"{count} {what}"
        for count, what in (
            (down, "down"),
            (drained, "drained"),
            (paused, "paused"),
            (refused, "refused it (policy)"),
            (unmatched, "does not match" if unmatched == 1 else "do not match"),
        )
        if count
    ]
    if eligible:
        text = f"max {rules.max_per_node} per node and {_nodes(eligible)} eligible"
        return text + (f" (others: {', '.join(parts)})" if parts else "")
    if not nodes:
        return "no node in the cluster"
    what = " and ".join(str(c) for c in rules.constraints)
    head = f"no node satisfies {what}" if what and unmatched else "no node can take it"
    return f"{head} ({_nodes(len(nodes))}: {', '.join(parts)})"


def _nodes(count: int) -> str:
    return f"{count} node" + ("" if count == 1 else "s")
