"""Membership on the harness: three agents (real 3-member etcd) register under leases, `node ls` shows them, a
killed agent's node is `down` within the lease TTL, a killed leader is replaced within TTL + 2 s, and a second
agent with a live node's name and another id is refused.

Until `cluster join` exists, the test writes what init/join leave behind: the ClusterRecord and NodeSpecs in etcd
and each node's cluster.json and node-id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.membership import DEFAULT_LEASE_TTL
from agent.state.etcd import EtcdStateLog
from agent.state.nodes import NodeRecords
from schemas.join import new_node_id
from schemas.state import NodeRole
from tests.support.cluster import Cluster, Node
from tests.support.nodes import add_node, make_cluster, write_node_files
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
TTL = DEFAULT_LEASE_TTL


@pytest.fixture
def log(cluster: Cluster) -> Iterator[EtcdStateLog]:
    assert cluster.etcd is not None
    store = EtcdStateLog(cluster.etcd.endpoints, prefix="/dabctl")
    try:
        yield store
    finally:
        store.close()


def start(node: Node, source: Path, **extra: object) -> None:
    try:
        _start(node, source, **extra)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{node.name}'s agent log:\n{node.agent.log()[-3000:]}") from None


def _start(node: Node, source: Path, **extra: object) -> None:
    node.start_agent(
        config={
            "source": str(source),
            "advertise_address": node.address,
            "etcd_insecure": True,  # the harness's etcd is plain HTTP on the bridge (cluster.json names it)
            "cluster_insecure": True,
            **extra,
        },
        ready=False,  # an empty source runs no pass, so /readyz stays 503; /healthz answers once registered
    )


def node_ls(node: Node) -> dict[str, dict[str, object]]:
    out = node.dabctl("node", "ls", "--json", env={"DABCTL_ETCD_INSECURE": "true"})
    assert out.returncode == 0, out.stderr
    return {row["name"]: row for row in json.loads(out.stdout)}


ROLES: dict[str, NodeRole] = {"n1": "manager", "n2": "manager", "n3": "worker"}


def three_agents(cluster: Cluster, log: EtcdStateLog, source: Path) -> tuple[str, dict[str, str]]:
    """The cluster record, a spec and files per node, an agent on each: the cluster id and the node ids by name."""
    source.mkdir()
    cluster_id = make_cluster(log, lease_ttl=TTL)
    ids = {}
    for node in cluster.nodes:
        ids[node.name] = add_node(log, node.name, role=ROLES[node.name])
        write_node_files(node.state_dir, cluster_id, ids[node.name], cluster.etcd_state)
        start(node, source)
    return cluster_id, ids


def test_three_agents_register_a_killed_node_goes_down_a_killed_leader_is_replaced_a_namesake_is_refused(
    cluster: Cluster, log: EtcdStateLog, tmp_path: Path
) -> None:
    n1, n2, n3 = cluster.nodes
    roles = ROLES
    source = tmp_path / "stacks"
    cluster_id, ids = three_agents(cluster, log, source)

    rows = wait_for(lambda: (r := node_ls(n3)) and all(x["state"] == "up" for x in r.values()) and r, timeout=30)
    assert {name: (r["role"], r["address"]) for name, r in rows.items()} == {
        n.name: (roles[n.name], n.address) for n in cluster.nodes
    }
    leaders = [name for name, r in rows.items() if r["leader"]]
    assert len(leaders) == 1 and roles[leaders[0]] == "manager", rows
    text = n1.dabctl("node", "ls", env={"DABCTL_ETCD_INSECURE": "true"})
    assert text.returncode == 0 and "LEADER" in text.stdout and ids["n3"] in text.stdout, text

    # Kill a node's agent: its status key lapses with its lease.
    records = NodeRecords(log)
    killed = time.monotonic()
    n3.agent.kill()
    wait_for(lambda: records.status(ids["n3"]) is None, timeout=TTL + 2, interval=0.02)
    down_after = time.monotonic() - killed
    assert down_after < TTL + 1  # the TTL, plus etcd's lease expiry check (every 500 ms) and this poll
    assert node_ls(n1)["n3"]["state"] == "down"

    # Kill the leader's agent: the other manager leads within TTL + 2 s, in a later term.
    before = records.leader()
    assert before is not None
    leader_node = cluster.node(before.record.name)
    killed = time.monotonic()
    leader_node.agent.kill()
    wait_for(
        lambda: (now := records.leader()) is not None and now.record.node_id != before.record.node_id,
        timeout=TTL + 2,
        interval=0.02,
    )
    failover = time.monotonic() - killed
    after = records.leader()
    assert after is not None and after.term > before.term
    print(f"\nlease TTL {TTL} s: killed node down after {down_after:.2f} s, new leader after {failover:.2f} s")
    assert failover < TTL + 2

    # A second agent named like a live node (the surviving manager), with another id: refused, exit 1.
    live = next(n for n in (n1, n2) if n is not leader_node)
    other = new_node_id()
    spec = records.spec(ids[live.name])
    assert spec is not None  # written directly: a manager's join refuses the name (as add_node does)
    log.put(f"/nodes/{other}", spec.model_copy(update={"node_id": other}).model_dump_json().encode())
    write_node_files(n3.state_dir, cluster_id, other, cluster.etcd_state)
    with pytest.raises(AssertionError, match=rf"(?s)agent exited 1:.*node name '{live.name}' is held by live node"):
        start(n3, source, node_name=live.name)


def test_an_etcd_leader_election_takes_no_node_down_and_keeps_the_cluster_leader(
    cluster: Cluster, log: EtcdStateLog, tmp_path: Path
) -> None:
    """What the 6 s TTL is for: a SIGKILLed etcd leader (a new etcd election) costs no node its lease."""
    assert cluster.etcd is not None
    _, ids = three_agents(cluster, log, tmp_path / "stacks")
    records = NodeRecords(log)
    wait_for(lambda: all(records.status(i) for i in ids.values()) and records.leader(), timeout=30)
    leader = records.leader()
    assert leader is not None
    changes = log.watch("/", start_revision=log.revision() + 1)
    try:
        cluster.etcd.kill9(cluster.etcd.leader())
        wait_for(lambda: cluster.etcd is not None and cluster.etcd.has_quorum(timeout=1), timeout=15)
        deadline = time.monotonic() + 2 * TTL  # two full leases after the election
        deleted = []
        while (left := deadline - time.monotonic()) > 0:
            event = changes.next(timeout=left)
            if event is not None and event.type == "delete":
                deleted.append(event.key)
    finally:
        changes.cancel()
    assert deleted == []
    now = records.leader()
    assert now is not None and now.term == leader.term
    assert all(records.status(i) for i in ids.values())
