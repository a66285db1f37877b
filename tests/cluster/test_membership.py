"""Membership on the harness, on a cluster formed by `cluster init` with 3 managers (so the etcd they run has 3
voting members, TLS from the cluster CA): three agents register under leases, `node ls` shows them, a killed
agent's node is `down` within the lease TTL, a killed leader is replaced within TTL + 2 s, a second agent with a
live node's name and another id is refused, and an etcd leader election (its member SIGKILLed) takes no node down
and keeps the cluster's leader.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from agent.node.etcdmember import LocalMember
from agent.state.etcdcluster import EtcdMembership, member_ready, member_status
from agent.state.membership import write_membership
from agent.state.nodes import NodeRecords
from schemas.config import ClusterMembership
from schemas.join import new_node_id
from tests.support.cluster import Cluster, Node
from tests.support.dabcluster import TTL, DabCluster, formed
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def node_ls(node: Node) -> dict[str, dict[str, object]]:
    out = node.dabctl("node", "ls", "--json")
    assert out.returncode == 0, out.stderr
    return {row["name"]: row for row in json.loads(out.stdout)}


@pytest.fixture(scope="module")
def dab(cluster_session: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DabCluster]:
    """One cluster for the module's tests (in order: the etcd election, then the agents killed)."""
    cluster_session.reset()
    with formed(cluster_session, tmp_path_factory.mktemp("membership"), managers=3) as formed_cluster:
        yield formed_cluster


def _etcd_leader(dab: DabCluster) -> Node:
    """The node whose etcd member leads etcd now (member names are node ids)."""
    log = dab.root_log()
    tls = EtcdMembership(log).log_tls()
    status = next(s for e in dab.etcd_endpoints if (s := member_status(e, tls)) is not None)
    leader_id = str(status["leader"])
    name = next(m.name for m in EtcdMembership(log).members() if m.id == leader_id)
    return next(n for n in dab.nodes if dab.node_id(n) == name)


def test_an_etcd_leader_election_takes_no_node_down_and_keeps_the_cluster_leader(dab: DabCluster) -> None:
    """What the 6 s TTL is for: a SIGKILLed etcd leader (a new etcd election) costs no node its lease. First of the
    module: the other test kills agents."""
    log = dab.root_log()
    records = NodeRecords(log)
    ids = [dab.node_id(n) for n in dab.nodes]
    wait_for(lambda: all(records.status(i) for i in ids) and records.leader(), timeout=30)
    leader = records.leader()
    assert leader is not None
    victim = _etcd_leader(dab)
    tls = EtcdMembership(log).log_tls()
    others = [e for n, e in zip(dab.nodes, dab.etcd_endpoints, strict=True) if n is not victim]
    watching = dab.root_log(endpoints=others)  # the watch's stream is to a member that stays
    changes = watching.watch("/", start_revision=watching.revision() + 1)
    try:
        pid = LocalMember(victim.state_dir).pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: any(member_ready(e, tls, timeout=1) for e in others), timeout=15)
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
    assert all(records.status(i) for i in ids)


def test_three_agents_register_a_killed_node_goes_down_a_killed_leader_is_replaced_a_namesake_is_refused(
    dab: DabCluster,
) -> None:
    n1, _, n3 = dab.nodes
    ids = {n.name: dab.node_id(n) for n in dab.nodes}
    rows = wait_for(lambda: (r := node_ls(n3)) and all(x["state"] == "up" for x in r.values()) and r, timeout=30)
    assert {name: (r["role"], r["address"]) for name, r in rows.items()} == {
        n.name: ("manager", n.address) for n in dab.nodes
    }
    leaders = [name for name, r in rows.items() if r["leader"]]
    assert len(leaders) == 1, rows
    text = n1.dabctl("node", "ls")
    assert text.returncode == 0 and "LEADER" in text.stdout and ids["n3"] in text.stdout, text

    log = dab.root_log()
    records = NodeRecords(log)
    before = records.leader()
    assert before is not None
    # Kill an agent that does not lead: its status key lapses with its lease.
    lost = next(n for n in dab.nodes if n.name != before.record.name)
    killed = time.monotonic()
    lost.agent.kill()
    lost.agent = None
    wait_for(lambda: records.status(ids[lost.name]) is None, timeout=TTL + 2, interval=0.02)
    down_after = time.monotonic() - killed
    assert down_after < TTL + 1  # the TTL, plus etcd's lease expiry check (every 500 ms) and this poll
    assert node_ls(dab.cluster.node(before.record.name))[lost.name]["state"] == "down"

    # Kill the leader's agent: the manager left leads within TTL + 2 s, in a later term.
    leader_node = dab.cluster.node(before.record.name)
    killed = time.monotonic()
    leader_node.agent.kill()
    leader_node.agent = None
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

    # A second agent named like the live node, with another id (the lost node's state directory, its
    # certificate and etcd user, under a new id whose spec carries that name): refused, exit 1.
    live = dab.cluster.node(after.record.name)
    other = new_node_id()
    spec = records.spec(ids[live.name])
    assert spec is not None  # written directly: a manager's join refuses the name
    log.put(f"/nodes/{other}", spec.model_copy(update={"node_id": other}).model_dump_json().encode())
    member = ClusterMembership.model_validate_json((lost.state_dir / "cluster.json").read_text())
    write_membership(lost.state_dir, member.model_copy(update={"node_id": other}))
    (lost.state_dir / "node-id").write_text(other + "\n")
    with pytest.raises(AssertionError, match=rf"(?s)agent exited 1:.*node name '{live.name}' is held by live node"):
        dab.start(lost, node_name=live.name)
