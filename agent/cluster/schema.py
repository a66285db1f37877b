"""The schema-version guard: the leader never writes a record format that a live node cannot read.

Pure: from the node statuses one snapshot read (each live node records the state-schema versions it reads,
schemas.state.STATE_SCHEMA_OLDEST..STATE_SCHEMA) and the version the leader writes. While any live node cannot read
it, the leader writes nothing for the cluster: the intent stays as it is and every node keeps running its last
assignments. The check runs on every pass, and a pass runs on every membership change (a node upgraded and
restarted rewrites its status), so the leader goes on by itself once the node is upgraded or gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.state import NodeSpec, NodeStatus


@dataclass(frozen=True)
class SchemaConflict:
    """A live node that cannot read the state schema the leader writes: which node, what it reads, and the fix."""

    node_id: str
    name: str
    oldest: int
    newest: int
    writes: int

    @property
    def fix(self) -> str:
        if self.writes > self.newest:
            return f"upgrade dabctl on node {self.name}"
        return f"upgrade dabctl on the managers (node {self.name} no longer reads schema {self.writes})"

    @property
    def reads(self) -> str:
        """The schemas the node reads: `1`, or `1..2`."""
        return _range(self.oldest, self.newest)

    def __str__(self) -> str:
        return (
            f"the leader writes nothing for the cluster: node {self.name} ({self.node_id}) reads state schema "
            f"{self.reads}, the leader writes {self.writes}; every node keeps its last "
            f"assignments; {self.fix}"
        )


def _range(oldest: int, newest: int) -> str:
    return str(newest) if oldest == newest else f"{oldest}..{newest}"


def schema_conflicts(
    writes: int, specs: Mapping[str, NodeSpec], statuses: Mapping[str, NodeStatus]
) -> tuple[SchemaConflict, ...]:
    """Every live node (a status under its lease) that cannot read schema `writes`, by name then id; empty when
    the leader may write. A down node is not asked: it reads the state again when it returns, and a returning node
    of an older version stops the leader then."""
    out = []
    for node_id, status in statuses.items():
        if status.schema_oldest <= writes <= status.schema_version:
            continue
        spec = specs.get(node_id)
        name = spec.name if spec is not None else node_id
        out.append(SchemaConflict(node_id, name, status.schema_oldest, status.schema_version, writes))
    return tuple(sorted(out, key=lambda c: (c.name, c.node_id)))


def unreadable(record_schema: int, reads: tuple[int, int]) -> str | None:
    """Why a record written in `record_schema` is not read by a node that reads `reads` (oldest, newest), or None:
    a node refuses to act on a record it would misread."""
    oldest, newest = reads
    if record_schema > newest:
        return (
            f"it was recorded in state schema {record_schema} by a newer dabctl; this node reads "
            f"{_range(oldest, newest)}: its containers stay as they are; upgrade dabctl on this node"
        )
    if record_schema < oldest:
        return (
            f"it was recorded in state schema {record_schema}; this node reads {_range(oldest, newest)}: its "
            "containers stay as they are; deploy the stack again from a manager"
        )
    return None
