"""Changing commands on a cluster: a worker refuses them (a role check: the managers' addresses, exit 1); a manager
sends them to the leader's cluster listener, which runs them only for a caller at a manager's recorded address and
only while it leads."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.api.client import AgentRefused
from agent.api.server import AgentHttp
from agent.cli import main
from agent.metrics import Metrics
from agent.node import control
from agent.node.control import LeaderControl, NoLeader, NotAManager, is_manager_peer, leader_of, manager_addresses
from agent.node.loop import Agent
from agent.state.records import LEADER_KEY, Records, node_status_key
from agent.state.sqlite import SqliteStateLog
from schemas.control import ReconcileRequest
from schemas.output import StatusOutput
from schemas.state import LeaderRecord, NodeStatus
from tests.node.conftest import Clock
from tests.node.test_cluster_split import IDS, Cluster

MANAGER = "10.0.9.1"

NO_PKI = Path("/nonexistent")  # a node without a certificate: plain HTTP (the TLS path: tests/unit/test_pki.py)


@pytest.fixture
def cluster(tmp_path: Path, clock: Clock) -> Iterator[Cluster]:
    log = SqliteStateLog(tmp_path / "state.db")
    c = Cluster(log, clock)
    for i, node_id in enumerate(IDS):  # node-1 (the manager, leading) and two workers, at their addresses
        address = MANAGER if i == 0 else f"10.0.9.{i + 1}"
        status = NodeStatus(node_id=node_id, advertise_address=address, cluster_address=f"{address}:9421")
        log.put(node_status_key(node_id), status.model_dump_json().encode())
    log.delete(LEADER_KEY)
    leader = LeaderRecord(node_id=IDS[0], name="node-1", cluster_address=f"{MANAGER}:9421")
    log.put(LEADER_KEY, leader.model_dump_json().encode())
    yield c
    log.close()


def test_a_worker_is_told_to_run_it_on_a_manager_and_a_manager_is_sent_to_the_leader(cluster: Cluster) -> None:
    snapshot = Records(cluster.log).snapshot()

    with pytest.raises(
        NotAManager, match=r"this node is a worker of the cluster: run this on a manager: 10.0.9.1:9421"
    ):
        leader_of(snapshot, IDS[1])
    assert leader_of(snapshot, IDS[0]) == f"{MANAGER}:9421"
    assert manager_addresses(snapshot) == [f"{MANAGER}:9421"]
    assert is_manager_peer(snapshot, MANAGER) and is_manager_peer(snapshot, f"::ffff:{MANAGER}")
    assert not is_manager_peer(snapshot, "10.0.9.2"), "a worker's address is no manager's"
    cluster.down(IDS[0])
    assert not is_manager_peer(Records(cluster.log).snapshot(), MANAGER), "a down manager's address counts no more"


def test_no_leader_is_a_retryable_error(cluster: Cluster) -> None:
    cluster.log.delete(LEADER_KEY)
    with pytest.raises(NoLeader) as caught:
        leader_of(Records(cluster.log).snapshot(), IDS[0])
    assert caught.value.retryable


@pytest.mark.parametrize(
    "args",
    [
        ["reconcile", "--once", "--source", "."],
        ["rollback", "web"],
        ["suspend", "web"],
        ["resume", "web"],
    ],
)
def test_changing_commands_on_a_worker_exit_1_naming_the_managers(
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
) -> None:
    @contextmanager
    def records(cfg: Any, writer: bool) -> Iterator[Records]:
        yield Records(cluster.log)

    monkeypatch.setattr(control, "membership", lambda state: SimpleNamespace(node_id=IDS[2]))
    monkeypatch.setattr(control, "open_records", records)

    monkeypatch.setattr(sys, "argv", ["dabctl", *args, "--state-dir", str(tmp_path / "state")])

    with pytest.raises(SystemExit) as done:
        main()

    assert done.value.code == 1
    assert capsys.readouterr().err == (
        "error: this node is a worker of the cluster: run this on a manager: 10.0.9.1:9421\n"
    )


# --- the leader's side: POST /cluster/v1/<call> ------------------------------------------------------------------


@pytest.fixture
def leader_http(cluster: Cluster) -> Iterator[tuple[AgentHttp, list[dict[str, Any]]]]:
    """The leader's cluster listener on loopback with Agent.from_manager in front of a recording control call."""
    ran: list[dict[str, Any]] = []

    def api(name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ran.append({"name": name, **body})
        return 200, {"ok": True, "stacks": 1}

    agent: Any = SimpleNamespace(records=Records(cluster.log), engine=SimpleNamespace(node=IDS[0]), api=api)
    http = AgentHttp(
        status=lambda: StatusOutput(node="n", ready=True),
        ready=lambda: True,
        metrics=Metrics(),
        on_webhook=lambda: None,
        webhook=None,
        cluster_api={"reconcile": lambda body, peer: Agent.from_manager(agent, "reconcile", body, peer)},
    )
    http.add_cluster("127.0.0.1", 0)
    http.start()
    try:
        yield http, ran
    finally:
        http.stop()


def address(http: AgentHttp) -> str:
    return http.listeners[0].url.removeprefix("http://")


def test_the_leader_runs_a_managers_reconcile_and_refuses_any_other_caller(
    cluster: Cluster, leader_http: tuple[AgentHttp, list[dict[str, Any]]]
) -> None:
    http, ran = leader_http
    request = ReconcileRequest(wait=True, timeout=5)

    with pytest.raises(AgentRefused, match=r"127\.0\.0\.1 is not the address of a manager"):
        LeaderControl(SimpleNamespace(state_path=NO_PKI), address(http)).reconcile(request)  # type: ignore[arg-type]
    assert ran == []

    # The manager's recorded address is loopback here: the call is its own.
    status = NodeStatus(node_id=IDS[0], advertise_address="127.0.0.1", cluster_address=address(http))
    cluster.log.put(node_status_key(IDS[0]), status.model_dump_json().encode())
    result = LeaderControl(SimpleNamespace(state_path=NO_PKI), address(http)).reconcile(request)  # type: ignore[arg-type]

    assert result.ok and result.by_agent == f"the leader at {address(http)}"
    assert [(r["name"], r["wait"]) for r in ran] == [("reconcile", True)]

    # Leadership moved: this node answers that it does not lead, and runs nothing.
    cluster.log.delete(LEADER_KEY)
    cluster.log.put(LEADER_KEY, LeaderRecord(node_id=IDS[1], name="node-2").model_dump_json().encode())
    with pytest.raises(AgentRefused, match="does not lead the cluster"):
        LeaderControl(SimpleNamespace(state_path=NO_PKI), address(http)).reconcile(request)  # type: ignore[arg-type]
    assert len(ran) == 1
