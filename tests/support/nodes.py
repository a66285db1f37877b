"""Cluster membership records for tests, before `cluster init`/`cluster join` write them: a ClusterRecord, node
specs, and a node's cluster.json and node-id."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

from agent.private import private_dir
from agent.state.log import StateLog
from agent.state.membership import NODE_ID_FILE, write_membership
from agent.state.nodes import NodeRecords
from schemas.config import ClusterMembership
from schemas.join import new_node_id
from schemas.state import ClusterRecord, NodeRole, NodeSpec


def make_cluster(log: StateLog, lease_ttl: int = 6) -> str:
    """Write a ClusterRecord (as `cluster init` does); the cluster id."""
    cluster_id = secrets.token_hex(12)
    NodeRecords(log).init_cluster(
        ClusterRecord(cluster_id=cluster_id, created_at=datetime.now(UTC), lease_ttl=lease_ttl)
    )
    return cluster_id


def add_node(log: StateLog, name: str, role: NodeRole = "manager", node_id: str | None = None) -> str:
    """Write a node's spec (as a manager does at join); its id."""
    node_id = node_id or new_node_id()
    NodeRecords(log).add_node(NodeSpec(node_id=node_id, name=name, role=role, joined_at=datetime.now(UTC)))
    return node_id


def write_node_files(state_dir: Path, cluster_id: str, node_id: str, state: str, prefix: str = "/dabctl") -> None:
    """A node's <state_dir>/node-id and cluster.json (0600), as `cluster join` leaves them."""
    private_dir(state_dir)
    path = state_dir / NODE_ID_FILE
    path.write_text(node_id + "\n")
    path.chmod(0o600)
    write_membership(
        state_dir,
        ClusterMembership(cluster_id=cluster_id, node_id=node_id, state=state, etcd_prefix=prefix, etcd_password=None),
    )
