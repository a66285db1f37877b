"""Membership and the leader election on a real etcd, and the `dabctl node` commands against it.

Each test has its own key prefix on the session's etcd (tests/statelog/conftest.py).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.node.membership import Member
from agent.state.etcd import EtcdStateLog
from agent.state.log import Put
from agent.state.nodes import NodeRecords
from agent.state.records import Records, orchestrator_txn
from schemas.state import NodeStatus
from tests.support.etcd import EtcdServer
from tests.support.nodes import add_node, make_cluster, write_node_files
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
DABCTL = str(Path(sys.executable).parent / "dabctl")


@pytest.fixture
def prefix() -> str:
    return f"/test-{secrets.token_hex(6)}"


@pytest.fixture
def log(etcd_server: EtcdServer, prefix: str) -> Iterator[EtcdStateLog]:
    store = EtcdStateLog([etcd_server.url], prefix=prefix)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def members(log: EtcdStateLog) -> Iterator[Callable[[str, str], Member]]:
    made: list[Member] = []

    def make(name: str, node: str) -> Member:
        m = Member(
            log,
            node_id=node,
            name=name,
            status=lambda: NodeStatus(node_id=node, advertise_address="127.0.0.1", dabctl_version="test"),
            records=Records(log),
        )
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_a_crashed_leaders_lease_lapses_and_another_manager_leads_within_ttl_plus_2s(
    log: EtcdStateLog, members: Callable[[str, str], Member]
) -> None:
    make_cluster(log, lease_ttl=2)
    m1, m2, m3 = (members(n, add_node(log, n)) for n in ("m1", "m2", "m3"))
    for m in (m1, m2, m3):
        m.register()
    m2.start()
    m3.start()
    old = m1.fence()
    assert old is not None and not m2.is_leader and not m3.is_leader
    crashed = time.monotonic()  # m1 never keeps its lease alive: a leader whose process died
    wait_for(lambda: m2.is_leader or m3.is_leader, timeout=2 + 2, interval=0.02)
    took = time.monotonic() - crashed
    print(f"\nfailover on etcd, lease TTL 2 s: new leader after {took:.2f} s")
    assert took < 2 + 2
    new = m2.fence() or m3.fence()
    assert new is not None and new.term > old.term
    assert not (m2.is_leader and m3.is_leader)
    assert not orchestrator_txn(log, [], [Put("/assignments/s/a", b"old")], old).succeeded
    assert orchestrator_txn(log, [], [Put("/assignments/s/a", b"new")], new).succeeded
    # The crashed one comes back with the same id: it registers again and follows.
    m1.tick()
    assert not m1.is_leader and m1.lease_losses == 1


def test_a_lost_lease_is_granted_again_and_the_status_put_again(
    log: EtcdStateLog, members: Callable[[str, str], Member]
) -> None:
    make_cluster(log, lease_ttl=2)
    nid = add_node(log, "w1", role="worker")
    w1 = members("w1", nid)
    w1.register()
    w1.start()
    log.revoke(w1.lease)  # what etcd does to a node it did not hear from for the TTL (a network cut)
    wait_for(lambda: NodeRecords(log).status(nid) is not None and w1.lease_losses == 1, timeout=2 + 2)


def dabctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
    env["DABCTL_STATE_DIR"] = str(state)
    return subprocess.run([DABCTL, *args], capture_output=True, text=True, env=env, timeout=60)


def test_node_ls_inspect_update_and_rm(
    log: EtcdStateLog, members: Callable[[str, str], Member], etcd_server: EtcdServer, prefix: str, tmp_path: Path
) -> None:
    cluster = make_cluster(log)
    ids = {name: add_node(log, name, role=role) for name, role in (("m1", "manager"), ("w1", "worker"))}
    ids["w2"] = add_node(log, "w2", role="worker")  # joined, never started: down
    for name in ("m1", "w1"):
        m = members(name, ids[name])
        m.register()
        m.start()  # keeps its lease for as long as the test runs
    state = {name: tmp_path / name for name in ids}
    for name, nid in ids.items():
        write_node_files(state[name], cluster, nid, f"etcd://{etcd_server.url.removeprefix('http://')}", prefix)

    ls = dabctl(state["w1"], "node", "ls", "--json")  # reading works on any node
    assert ls.returncode == 0, ls.stderr
    rows = {r["name"]: r for r in json.loads(ls.stdout)}
    assert [(n, r["role"], r["state"], r["leader"]) for n, r in rows.items()] == [
        ("m1", "manager", "up", True),
        ("w1", "worker", "up", False),
        ("w2", "worker", "down", False),
    ]
    assert rows["m1"]["term"] and rows["w1"]["address"] == "127.0.0.1" and rows["w1"]["version"] == "test"
    text = dabctl(state["m1"], "node", "ls")
    assert text.returncode == 0 and "AVAILABILITY" in text.stdout and "*" in text.stdout, text

    inspect = dabctl(state["m1"], "node", "inspect", ids["w1"][:6])
    assert inspect.returncode == 0, inspect.stderr
    detail = json.loads(inspect.stdout)
    assert detail["name"] == "w1" and detail["state"] == "up" and detail["status"]["advertise_address"] == "127.0.0.1"
    missing = dabctl(state["m1"], "node", "inspect", "nosuch")
    assert missing.returncode == 1 and "no node 'nosuch'" in missing.stderr

    upd = dabctl(state["m1"], "node", "update", "w1", "--label-add", "zone=a", "--availability", "drain")
    assert upd.returncode == 0, upd.stderr
    spec = NodeRecords(log).spec(ids["w1"])
    assert spec is not None and spec.labels == {"zone": "a"} and spec.availability == "drain"
    assert dabctl(state["m1"], "node", "update", "w1", "--label-rm", "zone").returncode == 0
    spec = NodeRecords(log).spec(ids["w1"])
    assert spec is not None and spec.labels == {}

    worker = dabctl(state["w1"], "node", "update", "w2", "--availability", "pause")
    assert worker.returncode == 1 and "run this on a manager" in worker.stderr
    last = dabctl(state["m1"], "node", "update", "m1", "--role", "worker")
    assert last.returncode == 1 and "last manager" in last.stderr

    up = dabctl(state["m1"], "node", "rm", "w1")
    assert up.returncode == 1 and "is up" in up.stderr and "--force" in up.stderr
    down = dabctl(state["m1"], "node", "rm", "w2")
    assert down.returncode == 0, down.stderr
    forced = dabctl(state["m1"], "node", "rm", "--force", "w1")
    assert forced.returncode == 0, forced.stderr
    assert set(NodeRecords(log).membership().specs) == {ids["m1"]}
    alone = dabctl(tmp_path / "alone", "node", "ls")
    assert alone.returncode == 1 and "in no cluster" in alone.stderr
