"""Membership on the embedded state log: nodes under leases, the name rule, and the fenced leader election.

A lapsed lease is made by revoking it (what the server does when keepalives stop); one test lets a 1 s lease
lapse on its own to time a failover.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.node.membership import Member, NotJoined, cluster_config, status_source
from agent.state.log import Compare, Put, Unavailable
from agent.state.membership import membership as read_membership
from agent.state.membership import node_id
from agent.state.nodes import NodeConflict, NodeRecords
from agent.state.records import LEADER_KEY, Fence, Records, node_status_key, orchestrator_txn
from agent.state.sqlite import SqliteStateLog
from schemas.config import AgentConfig, ClusterMembership
from schemas.state import STATE_SCHEMA, STATE_SCHEMA_OLDEST, NodeStatus
from tests.support.nodes import add_node, make_cluster, write_node_files
from tests.support.polling import wait_for


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteStateLog]:
    store = SqliteStateLog(tmp_path / "state.db")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def members(log: SqliteStateLog) -> Iterator[Callable[..., Member]]:
    """Make members on the log (each with its own Records and Metrics); closed after the test."""
    made: list[Member] = []

    def make(name: str, node: str, ports: set[tuple[str, int]] | None = None) -> Member:
        busy = ports if ports is not None else set()

        def status() -> NodeStatus:
            return NodeStatus(node_id=node, advertise_address="10.0.0.1", busy_ports=sorted(busy))

        m = Member(log, node_id=node, name=name, status=status, records=Records(log), metrics=Metrics())
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def revoke(log: SqliteStateLog, m: Member) -> None:
    """The server ends the member's lease, as when its keepalives stop reaching it."""
    log.revoke(m.lease)


def test_the_node_id_is_random_persisted_private_and_stable(tmp_path: Path) -> None:
    first = node_id(tmp_path)
    assert len(first) == 25 and int(first, 16) >= 0
    assert node_id(tmp_path) == first
    assert stat.S_IMODE(os.stat(tmp_path / "node-id").st_mode) == 0o600
    (tmp_path / "other").mkdir()
    assert node_id(tmp_path / "other") != first


def test_cluster_json_is_written_private_and_read_back(tmp_path: Path) -> None:
    write_node_files(tmp_path, "c1", "abc", "etcd://10.0.0.1:2379")
    m = read_membership(tmp_path)
    assert m is not None and m.node_id == "abc" and m.state == "etcd://10.0.0.1:2379"
    assert stat.S_IMODE(os.stat(tmp_path / "cluster.json").st_mode) == 0o600
    assert read_membership(tmp_path / "nowhere") is None


def test_a_node_registers_under_its_lease_and_is_down_when_it_lapses_then_registers_again(
    log: SqliteStateLog, members: Callable[..., Member]
) -> None:
    make_cluster(log, lease_ttl=5)
    nid = add_node(log, "n1", role="worker")
    m = members("n1", nid)
    m.register()
    assert m.ttl == 5 and m.role == "worker" and not m.is_leader
    kv = log.get(node_status_key(nid))
    assert kv is not None and kv.lease == m.lease
    assert [(n.name, n.up) for n in NodeRecords(log).membership().infos()] == [("n1", True)]

    revoke(log, m)
    assert [(n.name, n.up) for n in NodeRecords(log).membership().infos()] == [("n1", False)]
    m.tick()  # keepalive says the lease is gone: a new lease, the status put again
    assert m.lease_losses == 1
    kv = log.get(node_status_key(nid))
    assert kv is not None and kv.lease == m.lease
    assert NodeRecords(log).membership().infos()[0].up


def test_the_status_is_rewritten_only_when_it_changes(log: SqliteStateLog, members: Callable[..., Member]) -> None:
    make_cluster(log)
    nid = add_node(log, "n1", role="worker")
    ports = {("tcp", 22)}
    m = members("n1", nid, ports)
    m.register()
    before = log.revision()
    m.tick()
    m.tick()
    assert log.revision() == before  # keepalives renew the lease without a write
    ports.add(("tcp", 8080))
    m.tick()
    kv = log.get(node_status_key(nid))
    assert kv is not None and NodeStatus.model_validate_json(kv.value).busy_ports == [("tcp", 22), ("tcp", 8080)]
    assert log.revision() == before + 1


def test_a_second_node_with_a_live_nodes_name_is_refused_until_that_lease_lapses(
    log: SqliteStateLog, members: Callable[..., Member]
) -> None:
    make_cluster(log)
    first = members("web1", add_node(log, "web1", role="worker"))
    first.register()
    other_id = add_node(log, "web2", role="worker")
    second = members("web1", other_id)
    with pytest.raises(NodeConflict, match=f"node name 'web1' is held by live node {first.node_id}"):
        second.register()
    with pytest.raises(NodeConflict):  # a manager's join is refused the same way
        add_node(log, "web1")
    revoke(log, first)
    second.register()
    # The same name and the same id is the same node returning: registered again, its old lease ended.
    old = second.lease
    returning = members("web1", other_id)
    returning.register()
    assert returning.lease != old and log.keepalive(old) == 0


def test_a_node_without_a_spec_is_told_to_join(log: SqliteStateLog, members: Callable[..., Member]) -> None:
    make_cluster(log)
    with pytest.raises(NotJoined, match=r"not a member of the cluster .*`dabctl cluster join`"):
        members("lost", "f" * 25).register()


def test_one_manager_leads_its_fence_holds_and_a_deposed_leader_cannot_write(
    log: SqliteStateLog, members: Callable[..., Member]
) -> None:
    make_cluster(log)
    m1 = members("m1", add_node(log, "m1"))
    m2 = members("m2", add_node(log, "m2"))
    w1 = members("w1", add_node(log, "w1", role="worker"))
    for m in (m1, m2, w1):
        m.register()
    leader = NodeRecords(log).leader()
    assert m1.is_leader and not m2.is_leader and not w1.is_leader
    assert leader is not None and leader.record.name == "m1" and leader.lease == m1.lease
    assert m1.fence() == Fence(LEADER_KEY, leader.term) and m1._records is not None
    assert m1._records.fence == m1.fence()
    assert m1._metrics is not None and m1._metrics.leader._value.get() == 1
    old_fence = m1.fence()
    assert orchestrator_txn(log, [], [Put("/assignments/s/a", b"1")], old_fence).succeeded

    revoke(log, m1)  # m1 stops reaching the state log: its lease (and the leader key) lapse
    events = log.watch(LEADER_KEY, start_revision=leader.term + 1)
    deleted = events.next(timeout=5)
    assert deleted is not None and deleted.type == "delete"
    events.cancel()
    m2.on_leader_event(deleted)
    assert m2.is_leader and m2.fence() != old_fence
    new = m2.fence()
    assert new is not None and new.term > leader.term
    assert m1.is_leader  # it has not noticed yet: the fence is what keeps it out
    assert not orchestrator_txn(log, [], [Put("/assignments/s/a", b"2")], old_fence).succeeded
    assert orchestrator_txn(log, [], [Put("/assignments/s/a", b"3")], new).succeeded
    m1.tick()
    assert not m1.is_leader and m1._records is not None and m1._records.fence is None
    assert m1._metrics is not None and m1._metrics.leader._value.get() == 0
    assert m1._metrics.term._value.get() == new.term
    w1.tick()
    assert not w1.is_leader


def test_a_demoted_leader_resigns_and_a_closing_one_hands_over_at_once(
    log: SqliteStateLog, members: Callable[..., Member]
) -> None:
    make_cluster(log)
    ids = [add_node(log, name) for name in ("m1", "m2", "m3")]
    m1, m2, m3 = (members(f"m{i + 1}", nid) for i, nid in enumerate(ids))
    for m in (m1, m2, m3):
        m.register()
    assert m1.is_leader
    records = NodeRecords(log)
    spec = records.spec(ids[0])
    assert spec is not None and records.update_spec(spec, spec.model_copy(update={"role": "worker"}))
    m1.tick()
    assert not m1.is_leader and records.leader() is None
    m2.tick()
    assert m2.is_leader
    m2.close()
    assert records.leader() is None
    m3.tick()
    assert m3.is_leader


@pytest.mark.integration  # waits for a real lease to lapse (2 s): kept out of the fast tier
def test_when_a_leader_stops_keeping_its_lease_another_manager_leads_within_the_ttl(
    log: SqliteStateLog, members: Callable[..., Member]
) -> None:
    make_cluster(log, lease_ttl=2)
    m1 = members("m1", add_node(log, "m1"))
    m2 = members("m2", add_node(log, "m2"))
    m1.register()
    m2.register()
    m2.start()
    assert m1.is_leader and not m2.is_leader
    stopped = time.monotonic()  # m1 never keeps its lease alive (its thread never runs): a crashed leader
    wait_for(lambda: m2.is_leader, timeout=2 + 2, interval=0.02)
    took = time.monotonic() - stopped
    assert took < 2 + 2, took
    assert not orchestrator_txn(log, [Compare("/x", "version", "==", 0)], [Put("/x", b"1")], m1.fence()).succeeded


class Flaky:
    """The log, or no answer at all while `down` is set."""

    def __init__(self, log: SqliteStateLog) -> None:
        self.log = log
        self.down = False

    def __getattr__(self, name: str) -> object:
        if self.down:
            raise Unavailable("no endpoint answers")
        return getattr(self.log, name)


def test_a_node_that_cannot_reach_the_state_log_at_start_registers_when_it_answers(log: SqliteStateLog) -> None:
    make_cluster(log)
    nid = add_node(log, "n1")
    flaky = Flaky(log)
    m = Member(flaky, node_id=nid, name="n1", status=lambda: NodeStatus(node_id=nid))  # type: ignore[arg-type]
    flaky.down = True
    with pytest.raises(Unavailable):
        m.register()
    with pytest.raises(Unavailable):
        m.tick()
    assert not m.registered and not m.is_leader
    flaky.down = False
    m.tick()
    assert m.registered and m.is_leader and log.get(node_status_key(nid)) is not None
    m.close()


def test_a_stale_delete_seen_after_a_tick_campaigned_does_not_depose_the_new_leader(
    log: SqliteStateLog, members: Callable[..., Member]
) -> None:
    """The tick's check and the watch both see the old leader go: whichever campaigns first, the other's late
    view of the deletion must not take the new term away (it did: the leader then held the key without leading)."""
    make_cluster(log)
    m1 = members("m1", add_node(log, "m1"))
    m2 = members("m2", add_node(log, "m2"))
    m1.register()
    m2.register()
    old = NodeRecords(log).leader()
    assert old is not None
    events = log.watch(LEADER_KEY, start_revision=old.term + 1)
    revoke(log, m1)
    m2.tick()  # the tick saw no leader first and campaigned
    assert m2.is_leader
    stale = events.next(timeout=5)
    events.cancel()
    assert stale is not None and stale.type == "delete"
    m2.on_leader_event(stale)  # the watch's view of the same deletion, delivered late
    assert m2.is_leader and m2.fence() == NodeRecords(log).leader().fence  # type: ignore[union-attr]


def test_the_address_given_to_cluster_init_or_join_is_what_the_agent_advertises(tmp_path: Path) -> None:
    member = ClusterMembership(cluster_id="c", node_id="n", state="etcd://127.0.0.1:2379", advertise_address="10.0.0.7")
    cfg = cluster_config(AgentConfig(state_dir=str(tmp_path)), member)
    status = status_source(cfg, "n", listening=set)()
    assert (status.advertise_address, status.cluster_address) == ("10.0.0.7", "10.0.0.7:9421")
    # The config's own advertise_address wins; a cluster.json written before this field still loads.
    cfg = cluster_config(AgentConfig(state_dir=str(tmp_path), advertise_address="10.0.0.8"), member)
    assert cfg.advertise_address == "10.0.0.8"
    old = ClusterMembership.model_validate_json('{"cluster_id": "c", "node_id": "n", "state": "etcd://127.0.0.1:2379"}')
    assert old.advertise_address is None


def test_a_node_status_records_the_state_schemas_it_reads_and_its_own_policy_only_when_its_config_sets_one(
    tmp_path: Path,
) -> None:
    member = ClusterMembership(cluster_id="c", node_id="n", state="etcd://127.0.0.1:2379", advertise_address="10.0.0.7")
    bare = status_source(cluster_config(AgentConfig(state_dir=str(tmp_path)), member), "n", listening=set)()
    assert (bare.schema_oldest, bare.schema_version) == (STATE_SCHEMA_OLDEST, STATE_SCHEMA)
    assert bare.policy is None, "no policy setting: the node uses the cluster's"

    cfg = cluster_config(AgentConfig(state_dir=str(tmp_path), allow_bind_mounts=["/srv"]), member)
    own = status_source(cfg, "n", listening=set)().policy

    assert own is not None and [e.path for e in own.allow_bind_mounts] == ["/srv"]
