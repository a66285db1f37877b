"""Operating a cluster, on the simulated 3-node cluster of test_cluster_split (three engines with fake Docker engines
on one real SQLite state log): pending slots recorded by the leader only when they change, `status` counting every
node's replicas with the pending slots and the nodes, and `ps` listing each container with its node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import cli, views
from agent.node.control import engine_fleet
from agent.node.engine import Engine
from agent.node.status import fleet_statuses
from agent.state.records import PENDING, Records
from agent.state.sqlite import SqliteStateLog
from schemas.output import StackStatus
from tests.node.conftest import Clock, bundle, desired, service
from tests.node.test_cluster_split import IDS, Cluster

FOUR_ONE_EACH = desired(web=bundle({"front": service(Deploy={"Replicas": 4, "Placement": {"MaxReplicasPerNode": 1}})}))
THREE_ONE_EACH = desired(web=bundle({"front": service(Deploy={"Replicas": 3, "Placement": {"MaxReplicasPerNode": 1}})}))


@pytest.fixture
def cluster(tmp_path: Path, clock: Clock) -> Iterator[Cluster]:
    log = SqliteStateLog(tmp_path / "state.db")
    yield Cluster(log, clock)
    log.close()


def status_of(engine: Engine) -> StackStatus:
    snapshot, seen = engine_fleet(engine)
    (web,) = fleet_statuses(None, snapshot, seen, errors={})
    return web


def test_a_slot_that_fits_nowhere_is_recorded_pending_once_and_cleared_when_placed(cluster: Cluster) -> None:
    cluster.converge(FOUR_ONE_EACH)  # a converged round writes nothing: the pending record is not rewritten

    pending = Records(cluster.log).pending()
    assert list(pending) == [("web", "front", "4")]
    assert pending[("web", "front", "4")] == "max 1 per node and 3 nodes eligible"
    assert [len(n.running()) for n in cluster.nodes] == [1, 1, 1]

    cluster.converge(THREE_ONE_EACH)

    assert Records(cluster.log).pending() == {}
    assert cluster.log.range(PENDING) == []


def test_the_pending_record_is_written_only_when_the_pending_set_changes(cluster: Cluster) -> None:
    cluster.round(FOUR_ONE_EACH)
    leader = cluster.nodes[0]
    leader.log.writes.clear()

    leader.pass_(FOUR_ONE_EACH)
    leader.pass_(FOUR_ONE_EACH)

    assert not any(PENDING in w for w in leader.log.writes), leader.log.writes


def test_status_counts_every_nodes_replicas_and_the_pending_slot_on_any_node(cluster: Cluster) -> None:
    cluster.converge(FOUR_ONE_EACH)

    for node in cluster.nodes:  # a worker has no source: it shows what the leader recorded
        web = status_of(node.engine)
        (front,) = web.health.services
        assert (front.running, front.desired, front.status) == (3, 4, "Degraded")
        assert [(p.slot, bool(p.reason)) for p in front.pending] == [("4", True)]
        assert web.sync.status == "Synced", "every placed slot runs the current spec; pending shows in health"


def test_status_shows_the_nodes_with_the_leader_and_a_down_node(cluster: Cluster) -> None:
    six = desired(web=bundle({"front": service(Deploy={"Replicas": 6})}))
    cluster.converge(six)
    cluster.down(IDS[2])

    _, seen = engine_fleet(cluster.nodes[1].engine)

    assert [(n.name, n.role, n.state, n.leader, n.replicas) for n in seen.nodes] == [
        ("node-1", "manager", "up", True, 2),
        ("node-2", "worker", "up", False, 2),
        ("node-3", "worker", "down", False, 0),
    ]
    assert {r.slot for r in seen.stale} == {"3", "6"}, "a down node's last reports are shown apart, never counted"
    (front,) = status_of(cluster.nodes[1].engine).health.services
    assert (front.running, front.desired) == (4, 6)


def test_a_single_node_status_is_as_before(engine: Engine, records: Records) -> None:
    from tests.node.conftest import converge

    converge(engine, desired(web=bundle({"front": service(Deploy={"Replicas": 2})})))

    snapshot, seen = engine_fleet(engine)
    assert not seen.cluster and seen.nodes == []
    (web,) = fleet_statuses(None, snapshot, seen, errors={})
    assert web.health.services == [], "no source and no cluster: the stack shows without services, as before"
    state = desired(web=bundle({"front": service(Deploy={"Replicas": 2})}))
    (web,) = fleet_statuses(state, snapshot, seen, errors={})
    assert (web.health.services[0].running, web.health.services[0].desired) == (2, 2)


# --- the CLI: ps and status render what the fleet shows ------------------------------------------------------------


@pytest.fixture
def on_node(monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> Iterator[Cluster]:
    """`dabctl ps` and `status` on node-2 (a worker) of the simulated cluster."""
    worker = cluster.nodes[1]

    @contextmanager
    def open_engine(cfg: Any, read_only: bool = False) -> Iterator[Engine]:
        yield worker.engine

    monkeypatch.setattr(views, "open_engine", open_engine)
    yield cluster


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_ps_lists_every_nodes_containers_with_a_node_column_and_the_pending_slot(on_node: Cluster) -> None:
    on_node.converge(FOUR_ONE_EACH)

    result = run("ps", "--output", "json")

    rows = json.loads(result.output)
    containers = [(r["slot"], r["node"], r["state"]) for r in rows if r["task"] is None]
    assert containers == [
        ("1", "node-1", "running"),
        ("2", "node-2", "running"),
        ("3", "node-3", "running"),
        ("4", "", "pending"),
    ]
    assert rows[-1]["error"], "a pending slot says why"
    text = run("ps").output
    assert "NODE" in text.splitlines()[0] and "pending: " in text and "node-3" in text
