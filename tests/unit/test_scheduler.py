"""The scheduler assigns replica slots to nodes: "1".."N" for replicated services, the node id for global (nodes
with no slot are left out). The cluster's rules are in tests/orchestrate/test_scheduler.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.cluster.nodes import NodeInfo
from agent.cluster.scheduler import Assignments, assign
from bundles import DesiredState, StackBundle, parse_bundle
from bundles.desired import bundle_hash


def desired(**stacks: dict[str, Any]) -> DesiredState:
    """A desired state of stacks, each given as {service name: service document}."""
    out = {}
    for name, services in stacks.items():
        b = parse_bundle(json.dumps({"Services": services}), f"{name}.dab", ".dab")
        out[name] = StackBundle(
            name=name, file=f"{name}.dab", bundle=b, content="", revision="r", bundle_hash=bundle_hash(b)
        )
    return DesiredState(stacks=out)


def replicated(n: int | None = None) -> dict[str, Any]:
    return {"Image": "x"} if n is None else {"Image": "x", "Deploy": {"Replicas": n}}


GLOBAL = {"Image": "x", "Deploy": {"Mode": "global"}}


@pytest.mark.parametrize(
    ("state", "nodes", "expected"),
    [
        pytest.param(desired(), ["n1"], {}, id="no-stacks"),
        pytest.param(desired(shop={"web": replicated()}), ["n1"], {("shop", "web"): {"n1": ["1"]}}, id="default-1"),
        pytest.param(
            desired(shop={"web": replicated(3)}), ["n1"], {("shop", "web"): {"n1": ["1", "2", "3"]}}, id="three"
        ),
        pytest.param(
            desired(shop={"web": replicated(12)}),
            ["n1"],
            {("shop", "web"): {"n1": [str(i) for i in range(1, 13)]}},
            id="twelve-in-order",
        ),
        pytest.param(desired(shop={"web": replicated(0)}), ["n1"], {("shop", "web"): {}}, id="zero"),
        pytest.param(desired(shop={"agent": GLOBAL}), ["n1"], {("shop", "agent"): {"n1": ["n1"]}}, id="global"),
        pytest.param(
            desired(shop={"agent": GLOBAL}),
            ["n1", "n2", "n3"],
            {("shop", "agent"): {"n1": ["n1"], "n2": ["n2"], "n3": ["n3"]}},
            id="global-every-node",
        ),
        pytest.param(
            desired(shop={"web": replicated(5)}),
            ["n1", "n2"],
            {("shop", "web"): {"n1": ["1", "3", "5"], "n2": ["2", "4"]}},
            id="round-robin",
        ),
        pytest.param(
            desired(shop={"web": replicated(1)}),
            ["n1", "n2", "n3"],
            {("shop", "web"): {"n1": ["1"]}},
            id="fewer-replicas-than-nodes",
        ),
        pytest.param(
            desired(shop={"web": replicated(2), "agent": GLOBAL}, ops={"log": replicated()}),
            ["n1"],
            {("shop", "web"): {"n1": ["1", "2"]}, ("shop", "agent"): {"n1": ["n1"]}, ("ops", "log"): {"n1": ["1"]}},
            id="several-stacks",
        ),
    ],
)
def test_assign(state: DesiredState, nodes: list[str], expected: Assignments) -> None:
    assert assign(state, infos(nodes)).assignments == expected


def infos(names: list[str]) -> tuple[NodeInfo, ...]:
    return tuple(NodeInfo(node_id=n, name=n) for n in names)


def test_every_slot_is_assigned_exactly_once() -> None:
    result = assign(desired(shop={"web": replicated(7)}), infos(["a", "b", "c"]))
    slots = [slot for per_node in result.assignments[("shop", "web")].values() for slot in per_node]
    assert sorted(slots, key=int) == [str(i) for i in range(1, 8)]


def test_no_live_nodes_assigns_nothing() -> None:
    # When every node's lease has expired the scheduler has nowhere to place replicas: an empty placement,
    # not a ZeroDivisionError out of the leader's loop.
    result = assign(desired(shop={"web": replicated(2), "agent": GLOBAL}), ())
    assert all(per_node == {} for per_node in result.assignments.values())
    assert result.pending == {
        ("shop", "web", "1"): "no node in the cluster",
        ("shop", "web", "2"): "no node in the cluster",
    }
