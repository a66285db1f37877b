"""The pure halves of the cluster's guards: which live nodes stop a leader's writes (the schema-version guard), which
records a node refuses to read, and how a node's own policy narrows the cluster's."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.cluster.schema import schema_conflicts, unreadable
from agent.config import policy_configured
from agent.metrics import Metrics
from bundles.policy import BindAllow, Policy, narrowing, policy_from_record, policy_record
from schemas.config import AgentConfig
from schemas.state import STATE_SCHEMA, STATE_SCHEMA_OLDEST, NodeSpec, NodeStatus, PolicyRecord

NOW = datetime.now(UTC)


def specs(*names: str) -> dict[str, NodeSpec]:
    return {f"id-{n}": NodeSpec(node_id=f"id-{n}", name=n, joined_at=NOW) for n in names}


def status(name: str, oldest: int, newest: int) -> tuple[str, NodeStatus]:
    return f"id-{name}", NodeStatus(node_id=f"id-{name}", schema_oldest=oldest, schema_version=newest)


@pytest.mark.parametrize(
    ("writes", "nodes", "held"),
    [
        (1, {"a": (1, 1), "b": (1, 1)}, []),
        (2, {"a": (1, 2), "b": (1, 2)}, []),
        (2, {"a": (1, 2), "b": (1, 1)}, ["b"]),  # b is older: it cannot read 2
        (2, {"a": (1, 2), "c": (1, 1), "b": (1, 1)}, ["b", "c"]),  # every such node, by name
        (1, {"a": (1, 1), "b": (2, 3)}, ["b"]),  # b no longer reads 1: the leader is too old
        (2, {}, []),  # no live node
    ],
)
def test_a_leader_is_held_by_every_live_node_that_cannot_read_what_it_writes(
    writes: int, nodes: dict[str, tuple[int, int]], held: list[str]
) -> None:
    statuses = dict(status(n, lo, hi) for n, (lo, hi) in nodes.items())

    conflicts = schema_conflicts(writes, specs("a", "b", "c"), statuses)

    assert [c.name for c in conflicts] == held


def test_a_conflict_names_the_node_its_versions_and_the_fix() -> None:
    (conflict,) = schema_conflicts(2, specs("a", "b"), dict([status("a", 1, 2), status("b", 1, 1)]))

    assert conflict.node_id == "id-b" and conflict.reads == "1" and conflict.writes == 2
    assert conflict.fix == "upgrade dabctl on node b"
    assert "node b (id-b) reads state schema 1, the leader writes 2" in str(conflict)
    (old_leader,) = schema_conflicts(1, specs("b"), dict([status("b", 2, 3)]))
    assert old_leader.reads == "2..3" and "upgrade dabctl on the managers" in old_leader.fix


def test_a_down_node_does_not_hold_the_leader() -> None:
    """Only live nodes (a status under their lease) are asked; an old node that returns stops the leader then."""
    assert schema_conflicts(2, specs("a", "b"), dict([status("a", 1, 2)])) == ()


def test_a_node_status_says_which_schemas_this_code_reads() -> None:
    legacy = NodeStatus.model_validate_json('{"node_id": "x"}')  # written before the fields existed
    assert (legacy.schema_oldest, legacy.schema_version) == (1, 1)
    assert STATE_SCHEMA_OLDEST <= STATE_SCHEMA


@pytest.mark.parametrize(
    ("record", "reads", "refused"),
    [(1, (1, 1), None), (2, (1, 2), None), (2, (1, 1), "upgrade dabctl on this node"), (1, (2, 3), "deploy")],
)
def test_a_node_refuses_a_record_in_a_schema_it_does_not_read(
    record: int, reads: tuple[int, int], refused: str | None
) -> None:
    why = unreadable(record, reads)
    assert (why is None) == (refused is None)
    assert refused is None or (why is not None and refused in why and "containers stay as they are" in why)


def test_a_policy_goes_through_the_state_log_unchanged_but_the_nodes_protected_paths() -> None:
    policy = Policy(
        ("/srv", BindAllow("/data", read_only=True)),
        True,
        max_replicas_per_service=7,
        allow_external_volumes=("shared",),
        allow_published_ports=(80,),
    )
    record = PolicyRecord.model_validate_json(policy_record(policy).model_dump_json())

    back = policy_from_record(record)

    assert back.allows == policy.allows and back.allow_host_network
    assert (back.max_replicas_per_service, back.allow_external_volumes, back.allow_published_ports) == (
        7,
        ("shared",),
        (80,),
    )


@pytest.mark.parametrize(
    ("cluster", "own", "narrows"),
    [
        (Policy(), Policy(), []),
        (Policy(("/srv",)), Policy(("/srv",)), []),
        (Policy(("/srv/data",)), Policy(("/srv",)), []),  # broader: the cluster's rule holds anyway
        (Policy(("/srv",)), Policy(), ["allow_bind_mounts: /srv (read-write) is not allowed by this node's config"]),
        (
            Policy(("/srv",)),
            Policy((BindAllow("/srv", read_only=True),)),
            ["allow_bind_mounts: /srv (read-write) is not allowed by this node's config"],
        ),
        (Policy((BindAllow("/srv", read_only=True),)), Policy(("/srv",)), []),
        (Policy(allow_host_network=True), Policy(), ["allow_host_network: false in this node's config"]),
        (
            Policy(max_replicas_per_service=10),
            Policy(max_replicas_per_service=3),
            ["max_replicas_per_service: 3 in this node's config (the cluster's: 10)"],
        ),
    ],
)
def test_narrowing_lists_what_a_nodes_own_policy_refuses_that_the_clusters_allows(
    cluster: Policy, own: Policy, narrows: list[str]
) -> None:
    assert narrowing(policy_record(cluster), policy_record(own)) == narrows


def test_a_config_with_no_policy_setting_has_no_policy_of_its_own() -> None:
    assert not policy_configured(AgentConfig.model_validate({}))
    assert policy_configured(AgentConfig.model_validate({"allow_bind_mounts": ["/srv"]}))
    assert policy_configured(AgentConfig.model_validate({"max_stacks": 3}))


def test_the_schema_held_metric_follows_the_last_pass() -> None:
    metrics = Metrics()
    metrics.set_schema_held([("n3", "1", "2")])
    text = metrics.render()[0].decode()
    assert 'dabctl_cluster_schema_held{node="n3",reads="1",writes="2"} 1.0' in text

    metrics.set_schema_held([])

    assert 'node="n3"' not in metrics.render()[0].decode()
