"""A slot the scheduler moves to another node (drain, node down) is handed over through the task model: a new
task on the new node; start-first keeps the old task running, and its node keeps the slot, until the new one runs
healthy; stop-first shuts the old one down in the same change. A slot that fits nowhere keeps no task running."""

from __future__ import annotations

from typing import Any

import pytest

from agent.cluster.nodes import NodeInfo
from agent.cluster.snapshot import Snapshot
from bundles import DesiredState
from bundles.desired import service_targets
from schemas.state import TaskRecord
from tests.node.conftest import bundle, desired, service
from tests.orchestrate.test_orchestrate import NOW, plan, record, replica

KEY = ("web", "front")
SLOT2 = ("web", "front", "2")


def state(order: str, **deploy: Any) -> DesiredState:
    return desired(web=bundle({"front": service(Deploy={"Replicas": 2, "UpdateConfig": {"Order": order}, **deploy})}))


def spec(d: DesiredState) -> str:
    return next(t for t in service_targets(d.stacks["web"])).spec_hash


def task(d: DesiredState, slot: str, node: str, task_id: str, **kw: Any) -> TaskRecord:
    return TaskRecord(task_id=task_id, slot=slot, node=node, target=spec(d), created_at=NOW - 100, **kw)


def snapshot(d: DesiredState, assigned: dict[str, list[str]], tasks: dict[str, list[TaskRecord]]) -> Snapshot:
    return Snapshot(
        revision=7,
        stacks={"web": record("web", "r0")},
        assignments={KEY: assigned},
        tasks={("web", "front", slot): ts for slot, ts in tasks.items()},
    )


N1 = NodeInfo(node_id="n1", name="n1")
N2_DRAIN = NodeInfo(node_id="n2", name="n2", availability="drain")
N2_DOWN = NodeInfo(node_id="n2", name="n2", up=False)


def test_drain_start_first_keeps_the_old_task_until_the_new_one_is_healthy() -> None:
    d = state("start-first")
    old = {"1": [task(d, "1", "n1", "t1")], "2": [task(d, "2", "n2", "t2")]}
    running = (replica(d, "web", "front", "1", node="n1"), replica(d, "web", "front", "2", node="n2"))

    # Pass 1: the slot moves to n1, a new task there; the old one stays desired running and n2 keeps the slot.
    first = plan(d, snapshot(d, {"n1": ["1"], "n2": ["2"]}, old), nodes=(N1, N2_DRAIN), slots=running)
    assert first.assignments == {KEY: {"n1": ["1", "2"]}}
    [new] = first.tasks.put[SLOT2]
    assert (new.node, new.desired, new.healthy) == ("n1", "running", False)
    assert first.tasks.leaving == {"n2": {KEY: ["2"]}}
    assert [d_.slots for d_ in first.node_services("n2")] == [("2",)]
    assert [d_.slots for d_ in first.node_services("n1")] == [("1", "2")]

    # Pass 2: the new container is starting: nothing changes, the old task still runs.
    tasks = {**old, "2": [*old["2"], new]}
    after = snapshot(d, {"n1": ["1", "2"]}, tasks)
    starting = replica(d, "web", "front", "2", node="n1", health="starting")
    second = plan(d, after, nodes=(N1, N2_DRAIN), slots=(*running, starting))
    assert SLOT2 not in second.tasks.put and second.tasks.leaving == {"n2": {KEY: ["2"]}}

    # Pass 3: healthy: in one change the new task is recorded healthy and the old one shut down.
    healthy = replica(d, "web", "front", "2", node="n1", health="healthy")
    third = plan(d, after, nodes=(N1, N2_DRAIN), slots=(*running, healthy))
    put = {t.task_id: t for t in third.tasks.put[SLOT2]}
    assert put["t2"].desired == "shutdown" and put[new.task_id].healthy and put[new.task_id].desired == "running"
    assert not third.tasks.leaving and [d_.slots for d_ in third.node_services("n2")] == [()]


@pytest.mark.parametrize(("order", "n2"), [("stop-first", N2_DRAIN), ("stop-first", N2_DOWN)], ids=["drain", "down"])
def test_stop_first_shuts_the_old_task_down_in_the_change_that_creates_the_new_one(order: str, n2: NodeInfo) -> None:
    d = state(order)
    old = {"1": [task(d, "1", "n1", "t1")], "2": [task(d, "2", "n2", "t2")]}
    intent = plan(d, snapshot(d, {"n1": ["1"], "n2": ["2"]}, old), nodes=(N1, n2))
    put = {t.task_id: t for t in intent.tasks.put[SLOT2]}
    assert put["t2"].desired == "shutdown"
    [new] = [t for t in put.values() if t.task_id != "t2"]
    assert (new.node, new.desired) == ("n1", "running") and not intent.tasks.leaving


def test_a_converged_cluster_writes_no_task() -> None:
    d = state("start-first")
    old = {"1": [task(d, "1", "n1", "t1")], "2": [task(d, "2", "n2", "t2")]}
    running = (replica(d, "web", "front", "1", node="n1"), replica(d, "web", "front", "2", node="n2"))
    intent = plan(
        d, snapshot(d, {"n1": ["1"], "n2": ["2"]}, old), nodes=(N1, NodeInfo(node_id="n2", name="n2")), slots=running
    )
    assert not intent.changed and not intent.pending


def test_a_slot_that_fits_nowhere_is_pending_and_its_task_ends() -> None:
    d = state("stop-first", Placement={"Constraints": ["node.hostname==n2"]})
    old = {"1": [task(d, "1", "n2", "t1")], "2": [task(d, "2", "n2", "t2")]}
    intent = plan(d, snapshot(d, {"n2": ["1", "2"]}, old), nodes=(N1, N2_DOWN))
    reason = "no node satisfies node.hostname==n2 (2 nodes: 1 down, 1 does not match)"
    assert intent.pending == {("web", "front", "1"): reason, SLOT2: reason}
    assert intent.assignments == {KEY: {}} and intent.assignments_changed == {KEY: {}}
    [ended] = intent.tasks.put[SLOT2]
    assert ended.desired == "shutdown" and ended.error == f"pending: {reason}"
    assert not intent.tasks.deleted  # the slot still exists: its history stays
