"""The state log as one reader saw it at one revision, typed: what `orchestrate` plans from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reconcilers.loadbalancer import PortKey
from reconcilers.restarts import RestartRecord
from reconcilers.rollout import Rollout
from schemas.state import LeaderRecord, NodeSpec, NodeStatus, Pin, PolicyRecord, SlotReport, StackRecord, TaskRecord

ServiceKey = tuple[str, str]
SlotKey = tuple[str, str, str]
Assignments = dict[ServiceKey, dict[str, list[str]]]


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Every kind of record at `revision`; `versions` holds the mod revision of each key read (a key absent from
    it was absent then), which is what a commit of decisions made from this snapshot compares against.
    `history` (newest first) is read for the stacks a pin or a rollout in progress may need it for."""

    revision: int
    stacks: Mapping[str, StackRecord] = field(default_factory=dict)
    suspended: frozenset[str] = frozenset()
    pins: Mapping[str, Pin] = field(default_factory=dict)
    history: Mapping[str, Sequence[StackRecord]] = field(default_factory=dict)
    assignments: Assignments = field(default_factory=dict)
    ports: Mapping[PortKey, int] = field(default_factory=dict)
    rollouts: Mapping[ServiceKey, Rollout] = field(default_factory=dict)
    restarts: Mapping[SlotKey, RestartRecord] = field(default_factory=dict)
    tasks: Mapping[SlotKey, Sequence[TaskRecord]] = field(default_factory=dict)  # each slot's, oldest first
    versions: Mapping[str, int] = field(default_factory=dict)
    # The cluster at the same revision: node specs, the statuses of live nodes (a node without one is down), the
    # leader, and every node's slot reports by node id (a down node's last reports stay; the leader ignores them).
    nodes: Mapping[str, NodeSpec] = field(default_factory=dict)
    statuses: Mapping[str, NodeStatus] = field(default_factory=dict)
    leader: LeaderRecord | None = None
    reports: Mapping[str, Mapping[SlotKey, SlotReport]] = field(default_factory=dict)
    pending: Mapping[SlotKey, str] = field(default_factory=dict)  # slots the leader placed nowhere, and why
    # The bundle policy the leader admitted the recorded stacks under (the managers' configuration); None until a
    # cluster's leader recorded one. Every node admits its slots under it and its own configuration's.
    policy: PolicyRecord | None = None
