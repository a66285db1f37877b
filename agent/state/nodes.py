"""The cluster's membership records on the state log: `/cluster`, `/nodes/<id>` (specs, written by managers),
`/node/<id>/status` (under the node's lease: absent means down) and `/leader` (under the leader's lease; its
create revision is the term). Keys come from `agent.state.records`; this module only reads and writes them.

    NodeConflict    a node name is held by another live node id (terminal: pick another name or remove it)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent.cluster.nodes import NodeInfo, node_infos
from agent.state.log import Compare, Delete, KeyValue, Put, StateLog
from agent.state.records import CLUSTER_KEY, LEADER_KEY, NODES, Fence, node_prefix, node_status_key
from schemas.errors import DabctlError
from schemas.state import ClusterRecord, LeaderRecord, NodeSpec, NodeStatus


class NodeConflict(DabctlError):
    """Another live node already goes by this name."""

    retryable = False


@dataclass(frozen=True)
class Leader:
    """Who leads and in which term (the create revision of the leader key)."""

    record: LeaderRecord
    term: int
    lease: int

    @property
    def fence(self) -> Fence:
        return Fence(LEADER_KEY, self.term)


@dataclass(frozen=True)
class Membership:
    """Every node with its spec and status, and the leader, read at one revision."""

    cluster: ClusterRecord | None
    specs: dict[str, NodeSpec]
    statuses: dict[str, NodeStatus]
    leader: Leader | None
    revision: int

    def infos(self) -> tuple[NodeInfo, ...]:
        return node_infos(self.specs, self.statuses)

    def find(self, ref: str) -> NodeSpec:
        """A node by exact id, exact name, or unique id prefix; NodeNotFound otherwise."""
        if ref in self.specs:
            return self.specs[ref]
        named = [s for s in self.specs.values() if s.name == ref]
        if len(named) == 1:
            return named[0]
        prefixed = [s for s in self.specs.values() if s.node_id.startswith(ref)] if ref else []
        if len(prefixed) == 1 and not named:
            return prefixed[0]
        matches = named or prefixed
        if matches:
            ids = ", ".join(sorted(s.node_id for s in matches))
            raise NodeNotFound(f"node {ref!r} is ambiguous ({ids}); give more of the id")
        raise NodeNotFound(f"no node {ref!r} in the cluster; `dabctl node ls` lists them")


class NodeNotFound(DabctlError):
    """No node (or more than one) matches the name or id given."""

    retryable = False


def _leader(kv: KeyValue | None) -> Leader | None:
    if kv is None:
        return None
    return Leader(LeaderRecord.model_validate_json(kv.value), kv.create_revision, kv.lease)


class NodeRecords:
    """Reads and writes of the membership keys; the caller decides who may write what (the layout's rules)."""

    def __init__(self, log: StateLog) -> None:
        self.log = log

    # --- reads ---

    def cluster(self) -> ClusterRecord | None:
        kv = self.log.get(CLUSTER_KEY)
        return ClusterRecord.model_validate_json(kv.value) if kv else None

    def spec(self, node_id: str) -> NodeSpec | None:
        kv = self.log.get(NODES + node_id)
        return NodeSpec.model_validate_json(kv.value) if kv else None

    def status(self, node_id: str) -> KeyValue | None:
        return self.log.get(node_status_key(node_id))

    def leader(self) -> Leader | None:
        return _leader(self.log.get(LEADER_KEY))

    def membership(self) -> Membership:
        """Cluster, specs, statuses and leader at one revision."""
        revision = self.log.revision()
        cluster = self.log.range(CLUSTER_KEY, revision=revision)
        specs = {}
        for kv in self.log.range(NODES, revision=revision):
            spec = NodeSpec.model_validate_json(kv.value)
            specs[spec.node_id] = spec
        statuses = {}
        for node_id in specs:
            # One status key per node: a range of /node/ would also read every slot report.
            for kv in self.log.range(node_status_key(node_id), revision=revision):
                if kv.key == node_status_key(node_id):
                    statuses[node_id] = NodeStatus.model_validate_json(kv.value)
        leader = [kv for kv in self.log.range(LEADER_KEY, revision=revision) if kv.key == LEADER_KEY]
        return Membership(
            cluster=next(
                (ClusterRecord.model_validate_json(kv.value) for kv in cluster if kv.key == CLUSTER_KEY), None
            ),
            specs=specs,
            statuses=statuses,
            leader=_leader(leader[0] if leader else None),
            revision=revision,
        )

    def live_namesake(self, name: str, node_id: str) -> NodeSpec | None:
        """Another node id with this name whose status key lives (its lease holds), if any."""
        for kv in self.log.range(NODES):
            spec = NodeSpec.model_validate_json(kv.value)
            if spec.name == name and spec.node_id != node_id and self.status(spec.node_id) is not None:
                return spec
        return None

    # --- writes by managers ---

    def init_cluster(self, record: ClusterRecord) -> bool:
        """Write the cluster record once; whether this call created it."""
        return self.log.txn(
            [Compare(CLUSTER_KEY, "create_revision", "==", 0)], [Put(CLUSTER_KEY, _json(record))]
        ).succeeded

    def hold_down_nodes(self, until: datetime) -> bool:
        """Set the cluster record's `hold_down_until` (after a recovery); whether there is a cluster record."""
        kv = self.log.get(CLUSTER_KEY)
        if kv is None:
            return False
        record = ClusterRecord.model_validate_json(kv.value).model_copy(update={"hold_down_until": until})
        self.log.put(CLUSTER_KEY, _json(record))
        return True

    def add_node(self, spec: NodeSpec) -> None:
        """Record a node (at join); refused when another live node holds the name."""
        other = self.live_namesake(spec.name, spec.node_id)
        if other is not None:
            raise NodeConflict(
                f"node name {spec.name!r} is held by live node {other.node_id}; choose another node_name, "
                f"or stop that node and wait for its lease to lapse"
            )
        self.log.put(NODES + spec.node_id, _json(spec))

    def update_spec(self, before: NodeSpec, after: NodeSpec) -> bool:
        """Replace a spec only if it is still `before` (no lost update between two managers); whether it did."""
        key = NODES + before.node_id
        kv = self.log.get(key)
        if kv is None or NodeSpec.model_validate_json(kv.value) != before:
            return False
        return self.log.txn([Compare(key, "mod_revision", "==", kv.mod_revision)], [Put(key, _json(after))]).succeeded

    def remove_node(self, node_id: str) -> None:
        """Forget a node: its spec and everything it wrote (status and reports)."""
        self.log.txn([], [Delete(NODES + node_id), Delete(node_prefix(node_id), prefix=True)])

    # --- writes by the node itself and by the leader ---

    def put_status(self, status: NodeStatus, lease: int) -> None:
        self.log.put(node_status_key(status.node_id), _json(status), lease=lease)

    def campaign(self, record: LeaderRecord, lease: int) -> Leader | None:
        """Take the leader key if nobody holds it; the new term, or None when another manager leads."""
        result = self.log.txn(
            [Compare(LEADER_KEY, "create_revision", "==", 0)], [Put(LEADER_KEY, _json(record), lease)]
        )
        if not result.succeeded:
            return None
        return Leader(record, result.revision, lease)

    def resign(self, leader: Leader) -> None:
        """Give the leader key up, only if it is still this term's."""
        self.log.txn([Compare(LEADER_KEY, "create_revision", "==", leader.term)], [Delete(LEADER_KEY)])


def _json(record: ClusterRecord | NodeSpec | NodeStatus | LeaderRecord) -> bytes:
    return record.model_dump_json().encode()
