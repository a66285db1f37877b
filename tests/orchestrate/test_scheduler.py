"""Table tests of the scheduler: spread, stable slots, node loss, drain and pause, global services, placement
constraints, MaxReplicasPerNode, refused nodes and the reasons of pending slots; and a property test of its
invariants over random clusters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cluster.nodes import NodeInfo, held_down
from agent.cluster.scheduler import Schedule, assign
from agent.cluster.snapshot import Assignments
from bundles import DesiredState
from schemas.constraints import parse_constraint
from tests.node.conftest import bundle, desired, service

KEY = ("web", "front")


def nodes(*specs: str, **attrs: dict[str, Any]) -> tuple[NodeInfo, ...]:
    """Nodes n1.. named as given; `attrs` by name sets fields (up, availability, role, labels)."""
    return tuple(NodeInfo(node_id=f"id-{n}", name=n, **attrs.get(n, {})) for n in specs)


def replicated(replicas: int, **deploy: Any) -> DesiredState:
    return desired(web=bundle({"front": service(Deploy={"Replicas": replicas, **deploy})}))


def placed(schedule: Schedule, key: tuple[str, str] = KEY) -> dict[str, list[str]]:
    """Slots by node name (ids are id-<name>)."""
    return {n.removeprefix("id-"): s for n, s in schedule.assignments[key].items()}


def counts(schedule: Schedule, key: tuple[str, str] = KEY) -> dict[str, int]:
    return {n: len(s) for n, s in placed(schedule, key).items()}


def rec(**by_name: list[str]) -> Assignments:
    return {KEY: {f"id-{n}": s for n, s in by_name.items()}}


THREE = nodes("n1", "n2", "n3")


# --- replicated ----------------------------------------------------------------------------------------------------


def test_six_over_three_nodes_is_two_each() -> None:
    s = assign(replicated(6), THREE)
    assert counts(s) == {"n1": 2, "n2": 2, "n3": 2} and not s.pending
    assert placed(s) == {"n1": ["1", "4"], "n2": ["2", "5"], "n3": ["3", "6"]}


def test_a_converged_cluster_moves_nothing() -> None:
    recorded = rec(n1=["1", "5", "6"], n2=["2"], n3=["3", "4"])  # uneven, but nothing is wrong with it
    s = assign(replicated(6), THREE, recorded)
    assert s.assignments == recorded


def test_spread_counts_the_service_first_then_all_tasks_then_the_name() -> None:
    other = desired(
        web=bundle({"front": service(Deploy={"Replicas": 2}), "back": service(Deploy={"Replicas": 1})}),
    )
    recorded: Assignments = {("web", "back"): {"id-n1": ["1"]}}
    s = assign(other, nodes("n1", "n2", "n3"), recorded)
    assert placed(s) == {"n2": ["1"], "n3": ["2"]}  # n1 already runs a task of another service


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"n2": {"up": False}}, {"n1": ["1", "2", "4"], "n3": ["3", "5", "6"]}),
        ({"n2": {"availability": "drain"}}, {"n1": ["1", "2", "4"], "n3": ["3", "5", "6"]}),
        ({"n2": {"availability": "pause"}}, {"n1": ["1", "4"], "n2": ["2", "5"], "n3": ["3", "6"]}),
        ({"n2": {"up": False, "held": True}}, {"n1": ["1", "4"], "n2": ["2", "5"], "n3": ["3", "6"]}),
        ({"n2": {"up": False, "held": True, "availability": "drain"}}, {"n1": ["1", "2", "4"], "n3": ["3", "5", "6"]}),
    ],
    ids=["node-down-moves", "drain-moves", "pause-keeps", "held-down-keeps", "held-drained-moves"],
)
def test_slots_leave_a_node_that_is_down_or_drained(attrs: dict[str, Any], expected: dict[str, list[str]]) -> None:
    recorded = rec(n1=["1", "4"], n2=["2", "5"], n3=["3", "6"])
    s = assign(replicated(6), nodes("n1", "n2", "n3", **attrs), recorded)
    assert placed(s) == expected and not s.pending


def test_pause_places_nothing_new() -> None:
    s = assign(replicated(4), nodes("n1", "n2", n2={"availability": "pause"}))
    assert placed(s) == {"n1": ["1", "2", "3", "4"]}


def test_a_held_down_node_keeps_its_slots_and_gets_no_new_one() -> None:
    recorded = rec(n1=["1"], n2=["2"], n3=["3"])
    held = held_down(nodes("n1", "n2", "n3", n2={"up": False}, n3={"up": False}))
    assert [n.held for n in held] == [False, True, True]
    s = assign(replicated(5), held, recorded)
    assert placed(s) == {"n1": ["1", "4", "5"], "n2": ["2"], "n3": ["3"]} and not s.pending


def test_a_returning_node_gets_nothing_moved_back() -> None:
    recorded = rec(n1=["1", "3", "4"], n3=["2", "5", "6"])
    s = assign(replicated(6), THREE, recorded)
    assert s.assignments == recorded


def test_scale_down_removes_the_highest_slots_and_scale_up_fills_the_emptiest() -> None:
    recorded = rec(n1=["1", "4"], n2=["2", "5"], n3=["3", "6"])
    assert placed(assign(replicated(4), THREE, recorded)) == {"n1": ["1", "4"], "n2": ["2"], "n3": ["3"]}
    assert placed(assign(replicated(8), THREE, rec(n1=["1", "4"], n2=["2"], n3=["3"]))) == {
        "n1": ["1", "4", "7"],
        "n2": ["2", "5", "8"],
        "n3": ["3", "6"],
    }


# --- global --------------------------------------------------------------------------------------------------------

GLOBAL = desired(web=bundle({"front": service(Deploy={"Mode": "global"})}))


@pytest.mark.parametrize(
    ("attrs", "recorded", "expected"),
    [
        ({}, {}, {"n1", "n2", "n3"}),
        ({"n3": {"availability": "pause"}}, {}, {"n1", "n2"}),  # pause: no new task
        ({"n3": {"availability": "pause"}}, {"n1": 1, "n2": 1, "n3": 1}, {"n1", "n2", "n3"}),  # pause keeps it
        ({"n3": {"availability": "drain"}}, {"n1": 1, "n2": 1, "n3": 1}, {"n1", "n2"}),  # drain stops it
        ({"n3": {"up": False}}, {"n1": 1, "n2": 1, "n3": 1}, {"n1", "n2"}),  # down: dropped
        ({"n3": {"up": False, "held": True}}, {"n1": 1, "n2": 1, "n3": 1}, {"n1", "n2", "n3"}),  # held: kept
        ({"n3": {"up": False, "held": True}}, {"n1": 1, "n2": 1}, {"n1", "n2"}),  # held: no new task
        ({}, {"n1": 1, "n2": 1}, {"n1", "n2", "n3"}),  # a node that joins later gets one
        ({"n2": {"role": "manager"}}, {}, {"n2"}),  # constraint below
    ],
    ids=["all", "pause-new", "pause-keeps", "drain", "down", "held-keeps", "held-new", "late-join", "constraint"],
)
def test_global_is_one_slot_named_by_the_node_on_every_eligible_node(
    attrs: dict[str, Any], recorded: dict[str, int], expected: set[str]
) -> None:
    state = GLOBAL
    if "n2" in attrs and attrs["n2"].get("role") == "manager":
        state = desired(
            web=bundle(
                {"front": service(Deploy={"Mode": "global", "Placement": {"Constraints": ["node.role==manager"]}})}
            )
        )
    before: Assignments = {KEY: {f"id-{n}": [f"id-{n}"] for n in recorded}}
    s = assign(state, nodes("n1", "n2", "n3", **attrs), before)
    assert placed(s) == {n: [f"id-{n}"] for n in sorted(expected)} and not s.pending


# --- constraints, MaxReplicasPerNode, refused ----------------------------------------------------------------------

LABELLED = nodes("n1", "n2", "n3", n1={"labels": {"zone": "eu"}}, n2={"labels": {"zone": "us"}}, n3={"role": "manager"})


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        (["node.labels.zone==eu"], {"n1": 4}),
        (["node.labels.zone==EU"], {"n1": 4}),  # values compare case-insensitively, as in Swarm
        (["node.labels.zone!=eu"], {"n2": 2, "n3": 2}),  # no label satisfies !=
        (["node.role==manager"], {"n3": 4}),
        (["node.role!=manager"], {"n1": 2, "n2": 2}),
        (["node.hostname==n2"], {"n2": 4}),
        (["node.id!=id-n1", "node.hostname!=n2"], {"n3": 4}),
    ],
)
def test_constraints(constraints: list[str], expected: dict[str, int]) -> None:
    s = assign(replicated(4, Placement={"Constraints": constraints}), LABELLED)
    assert counts(s) == expected and not s.pending


def test_a_node_that_no_longer_matches_loses_its_slots() -> None:
    state = replicated(2, Placement={"Constraints": ["node.labels.zone==eu"]})
    s = assign(state, LABELLED, rec(n2=["1"], n1=["2"]))
    assert placed(s) == {"n1": ["1", "2"]}


def test_max_replicas_per_node() -> None:
    s = assign(replicated(5, Placement={"MaxReplicasPerNode": 2}), THREE)
    assert sorted(counts(s).values()) == [1, 2, 2] and not s.pending
    s = assign(replicated(3, Placement={"MaxReplicasPerNode": 1}), THREE, rec(n1=["1", "2", "3"]))
    assert counts(s) == {"n1": 1, "n2": 1, "n3": 1} and placed(s)["n1"] == ["1"]  # lowered: the highest slots move


def test_refused_nodes_are_never_used() -> None:
    s = assign(replicated(4), THREE, rec(n1=["1", "2"], n2=["3", "4"]), {KEY: ["id-n1"]})
    assert counts(s) == {"n2": 2, "n3": 2}
    g = assign(GLOBAL, THREE, refused={KEY: ["id-n2"]})
    assert set(placed(g)) == {"n1", "n3"}


# --- pending -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "cluster", "pending", "reason"),
    [
        (
            replicated(2, Placement={"Constraints": ["node.labels.zone==eu"]}),
            nodes("n1", "n2", "n3", n1={"up": False}, n2={"up": False}),
            {"1", "2"},
            "no node satisfies node.labels.zone==eu (3 nodes: 2 down, 1 does not match)",
        ),
        (
            replicated(4, Placement={"MaxReplicasPerNode": 1}),
            THREE,
            {"4"},
            "max 1 per node and 3 nodes eligible",
        ),
        (
            replicated(3, Placement={"MaxReplicasPerNode": 1}),
            nodes("n1", "n2", "n3", n3={"availability": "drain"}),
            {"3"},
            "max 1 per node and 2 nodes eligible (others: 1 drained)",
        ),
        (
            replicated(1),
            nodes("n1", "n2", n1={"availability": "pause"}, n2={"up": False}),
            {"1"},
            "no node can take it (2 nodes: 1 down, 1 paused)",
        ),
        (replicated(1), (), {"1"}, "no node in the cluster"),
    ],
    ids=["constraint", "max-per-node", "max-and-drained", "paused-and-down", "no-nodes"],
)
def test_a_slot_that_fits_nowhere_is_pending_with_its_reason(
    state: DesiredState, cluster: tuple[NodeInfo, ...], pending: set[str], reason: str
) -> None:
    s = assign(state, cluster)
    assert s.pending == {("web", "front", slot): reason for slot in pending}
    assert {slot for slots in s.assignments[KEY].values() for slot in slots} | pending == {
        str(i) for i in range(1, state.stacks["web"].bundle.services["front"].deploy.replica_count + 1)
    }


def test_refused_everywhere_says_so() -> None:
    s = assign(replicated(1), nodes("n1"), refused={KEY: ["id-n1"]})
    assert s.pending == {("web", "front", "1"): "no node can take it (1 node: 1 refused it (policy))"}


# --- invariants ----------------------------------------------------------------------------------------------------

node_strategy = st.builds(
    lambda up, availability, zone, role: {
        "up": up,
        "availability": availability,
        "labels": {"zone": zone} if zone else {},
        "role": role,
    },
    st.booleans(),
    st.sampled_from(["active", "active", "pause", "drain"]),
    st.sampled_from(["", "eu", "us"]),
    st.sampled_from(["manager", "worker"]),
)


@settings(max_examples=150, deadline=None)
@given(
    cluster=st.lists(node_strategy, min_size=0, max_size=7),
    replicas=st.integers(0, 12),
    max_per_node=st.integers(0, 3),
    constraint=st.sampled_from([[], ["node.labels.zone==eu"], ["node.role!=manager"], ["node.labels.zone!=us"]]),
    recorded_seed=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 14)), max_size=14),
    refused=st.sets(st.integers(0, 6), max_size=3),
)
def test_scheduler_invariants(  # noqa: PLR0917 - hypothesis draws each input
    cluster: list[dict[str, Any]],
    replicas: int,
    max_per_node: int,
    constraint: list[str],
    recorded_seed: list[tuple[int, int]],
    refused: set[int],
) -> None:
    infos = tuple(NodeInfo(node_id=f"id-{i}", name=f"n{i}", **attrs) for i, attrs in enumerate(cluster))
    state = replicated(replicas, Placement={"Constraints": constraint, "MaxReplicasPerNode": max_per_node})
    recorded: Assignments = {KEY: {}}
    for node, slot in recorded_seed:
        recorded[KEY].setdefault(f"id-{node}", []).append(str(slot))
    refused_ids = [f"id-{i}" for i in refused]
    s = assign(state, infos, recorded, {KEY: refused_ids})
    slots = [slot for node_slots in s.assignments[KEY].values() for slot in node_slots]
    # No slot on two nodes, no slot both placed and pending, every slot 1..N accounted for.
    assert len(slots) == len(set(slots))
    pending = {slot for (_, _, slot) in s.pending}
    assert not pending & set(slots)
    assert set(slots) | pending == {str(i) for i in range(1, replicas + 1)}
    by_id = {n.node_id: n for n in infos}
    for node_id, node_slots in s.assignments[KEY].items():
        node = by_id[node_id]
        if max_per_node:
            assert len(node_slots) <= max_per_node
        assert node.keeps_tasks and node_id not in refused_ids
        assert all(parse_constraint(c).matches(node.node_id, node.name, node.role, node.labels) for c in constraint)
        # A slot placed on a node that does not take new tasks was already there.
        if not node.schedulable:
            assert set(node_slots) <= set(recorded[KEY].get(node_id, []))
    # Stable: without a limit, a recorded slot stays while its node keeps tasks, fits and did not refuse.
    if not max_per_node and len(recorded_seed) == len({slot for _, slot in recorded_seed}):
        for node_id, node_slots in recorded[KEY].items():
            node = by_id.get(node_id)
            if node is None or not node.keeps_tasks or node_id in refused_ids:
                continue
            if all(parse_constraint(c).matches(node.node_id, node.name, node.role, node.labels) for c in constraint):
                stay = {slot for slot in node_slots if int(slot) <= replicas}
                assert stay <= set(s.assignments[KEY].get(node_id, []))


def test_one_node_outside_a_cluster_runs_every_slot_as_before() -> None:
    state = replicated(3, Placement={"Constraints": ["node.labels.disk==ssd"], "MaxReplicasPerNode": 2})
    s = assign(state, nodes("n1"), placement=False)
    assert placed(s) == {"n1": ["1", "2", "3"]} and not s.pending
