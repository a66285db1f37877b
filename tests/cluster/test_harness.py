"""The multi-node harness itself (tests/support/cluster.py): real engines on their own addresses, traffic between
nodes over the bridge, a 3-member etcd that keeps and loses quorum, pulls by digest from the bridge's registry,
cut and healed nodes, a Swarm across the nodes, a per-node agent, and nothing left behind — also after Ctrl-C and
after a SIGKILL, where the next start removes what the killed one left.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster, Node, traces
from tests.support.dockerd import alive
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST_POOLS = [ipaddress.ip_network("10.200.0.0/16"), ipaddress.ip_network("172.17.0.0/16")]
ROOT = Path(__file__).resolve().parents[2]


def run(node: Node, image: str, command: list[str] | None = None, **host_config: Any) -> str:
    """Pull `image` on the node if needed and start a container; its ID."""
    api = node.client
    if not any(image in (i.get("RepoDigests") or []) for i in api.images()):
        api.pull(image)
    created = api.create_container(
        image, command=command, ports=list(host_config.get("port_bindings", {})),
        host_config=api.create_host_config(**host_config),
    )  # fmt: skip
    api.start(created["Id"])
    return str(created["Id"])


def test_every_node_runs_its_own_engine_on_its_own_address_ranges(cluster: Cluster) -> None:
    subnets = []
    for node in cluster.nodes:
        info = node.client.info()
        assert node.client.ping()
        assert info["DockerRootDir"] == str(node.root / "docker" / "data")
        assert f"{cluster.registry_host}" in info["RegistryConfig"]["IndexConfigs"]
        bridge = node.client.inspect_network("bridge")["IPAM"]["Config"][0]["Subnet"]
        subnets += [ipaddress.ip_network(bridge), ipaddress.ip_network(node.address_pool)]
        eth0 = json.loads(node.sh("ip", "-j", "addr", "show", "eth0").stdout)[0]["addr_info"]
        assert [a["local"] for a in eth0 if a["family"] == "inet"] == [node.address]
    for i, a in enumerate(subnets):
        assert not any(a.overlaps(b) for b in HOST_POOLS), a
        assert not any(a.overlaps(b) for b in subnets[i + 1 :]), a


def test_a_container_on_node_1_reaches_a_published_port_on_node_2_over_the_bridge(cluster: Cluster) -> None:
    n1, n2, _ = cluster.nodes
    web = run(n2, cluster.image, port_bindings={8080: 18080})
    wait_for(lambda: n1.connects(n2.address, 18080), timeout=10)
    ask = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {n2.address} 18080 | tail -n 1"
    client = run(n1, cluster.image, ["/bin/sh", "-c", ask])
    assert n1.client.wait(client, timeout=30)["StatusCode"] == 0
    # The sample server answers with its container's hostname: node 2's replica answered node 1's container.
    assert n1.client.logs(client).decode().strip() == web[:12]


def test_etcd_keeps_quorum_through_one_kill9_and_loses_it_with_two(cluster: Cluster) -> None:
    etcd = cluster.etcd
    assert etcd is not None
    assert etcd.put("/k", "v1") and etcd.get("/k") == "v1"
    leader = etcd.leader()
    assert {m.name for m in etcd.members} == {"e1", "e2", "e3"}

    etcd.kill9(leader)
    wait_for(lambda: etcd.put("/k", "v2", timeout=1), timeout=10)
    assert etcd.get("/k") == "v2"
    assert etcd.leader() is not leader

    second = next(m for m in etcd.members if m.running())
    etcd.kill9(second)
    assert not etcd.has_quorum(timeout=2)
    assert etcd.get("/k", timeout=1) is None  # a linearizable read needs a quorum too

    etcd.restart_all()
    assert etcd.has_quorum() and etcd.get("/k") == "v2"


def test_every_node_pulls_the_sample_image_from_the_bridge_registry_by_digest(cluster: Cluster) -> None:
    assert cluster.registry is not None
    assert cluster.image.startswith(cluster.registry_host + "/") and "@sha256:" in cluster.image
    ids = set()
    for node in cluster.nodes:
        for image in node.client.images():
            node.client.remove_image(image["Id"], force=True)
        node.client.pull(cluster.image)
        image = node.client.inspect_image(cluster.image)
        assert cluster.image in image["RepoDigests"]
        ids.add(image["Id"])
    assert len(ids) == 1
    digest = cluster.image.rpartition("@")[2]
    fetched_by = {
        line.split()[0]
        for line in cluster.registry.log().splitlines()
        if f"GET /v2/dabctl/sample/manifests/{digest}" in line
    }
    assert {n.address for n in cluster.nodes} <= fetched_by


def test_a_cut_node_reaches_nobody_and_nobody_reaches_it_until_healed(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    assert cluster.etcd is not None
    run(n1, cluster.image, port_bindings={8080: 18080})
    run(n2, cluster.image, port_bindings={8080: 18080})
    registry, etcd = cluster.registry_host.split(":"), cluster.etcd.members[0]

    def reachable() -> dict[str, bool]:
        return {
            "n2->n1": n2.connects(n1.address, 18080),
            "n2->etcd": n2.connects(etcd.address, 2379),
            "n2->registry": n2.connects(registry[0], int(registry[1])),
            "n1->n2": n1.connects(n2.address, 18080),
            "n3->n2": n3.connects(n2.address, 18080),
        }

    wait_for(lambda: all(reachable().values()), timeout=10)
    n2.cut()
    assert not any(reachable().values())
    assert n3.connects(n1.address, 18080)  # only node 2 is cut off
    n2.heal()
    wait_for(lambda: all(reachable().values()), timeout=10)


def test_a_3_node_swarm_runs_a_6_replica_service_across_the_nodes(cluster: Cluster) -> None:
    with cluster.swarm() as swarm:
        assert len(swarm.ready_nodes()) == 3
        swarm.service("web", replicas=6)
        swarm.wait(lambda: sum(swarm.running("web").values()) == 6, "6 replicas running", timeout=90)
        per_node = swarm.running("web")
        assert all(count >= 1 for count in per_node.values()), per_node
    for node in cluster.nodes:
        assert node.client.info()["Swarm"]["LocalNodeState"] == "inactive"


def test_an_agent_runs_in_a_node_on_the_shared_etcd_and_comes_back_with_the_node(
    cluster: Cluster, tmp_path: Path
) -> None:
    n1 = cluster.nodes[0]
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    doc = {"Services": {"app": {"Image": cluster.image, "Command": SLEEPER[:2], "Args": SLEEPER[2:]}}}
    (stacks / "harness.dab").write_text(json.dumps(doc))
    agent = n1.start_agent(config={"source": str(stacks), "state": cluster.etcd_state})

    def app_running() -> bool:
        return any(c["State"] == "running" for c in n1.client.containers(filters={"label": "dabctl.stack=harness"}))

    wait_for(app_running, timeout=60)
    assert agent.stack("harness") is not None
    status = n1.dabctl("status", "--output", "json", env={"DABCTL_STATE": cluster.etcd_state})
    assert status.returncode == 0, status.stderr
    assert [s["stack"] for s in json.loads(status.stdout)["stacks"]] == ["harness"]

    n1.stop()
    assert not n1.running and not n1.agent_running
    n1.start()
    assert n1.running and n1.agent_running
    wait_for(app_running, timeout=60)


def _start_harness(log: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`python -m tests.support.cluster` in a subprocess (its stderr into `log`), once it reports the cluster up."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cluster", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    with proc.stdout:  # it prints one line
        line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"the harness exited {proc.returncode} before reporting:\n{log.read_text()[-3000:]}")
    return proc, json.loads(line)


def test_a_harness_killed_with_sigkill_leaves_things_that_the_next_start_removes(
    cluster: Cluster, tmp_path: Path
) -> None:
    proc, facts = _start_harness(tmp_path / "harness.log", "--nodes", "2")
    slot = facts["slot"]
    assert slot != cluster.slot
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    left = traces(slot)
    kinds = {entry.split()[0] for entry in left}
    assert {"netns", "link", "iptables", "process", "directory"} <= kinds, left
    pids = [int(entry.split()[1]) for entry in left if entry.startswith("process ")]

    with pytest.raises(RuntimeError, match="a failing test"), Cluster(nodes=1, etcd=False, registry=False) as nxt:
        # The next start swept the killed run's slot (and, being first free, took it).
        assert not any(alive(pid) for pid in pids)
        assert nxt.slot == slot
        assert sorted(e.split()[1] for e in traces(slot) if e.startswith("netns ")) == [nxt.nodes[0].netns]
        raise RuntimeError("a failing test")
    assert traces(slot) == []


def test_ctrl_c_on_a_running_harness_removes_everything(cluster: Cluster, tmp_path: Path) -> None:
    proc, facts = _start_harness(tmp_path / "harness.log", "--nodes", "1")
    slot = facts["slot"]
    assert len(traces(slot)) > 5 and facts["etcd"] and facts["image"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, (tmp_path / "harness.log").read_text()[-3000:]
    assert traces(slot) == []


def test_the_cluster_is_up_again_after_a_test_broke_it(cluster: Cluster) -> None:
    """Stopped and cut nodes, killed etcd members, containers and a swarm: reset() repairs all of it."""
    n1, n2, n3 = cluster.nodes
    assert cluster.etcd is not None
    run(n1, cluster.image)
    n2.kill()
    n3.cut()
    for m in cluster.etcd.members[:2]:
        cluster.etcd.kill9(m)
    cluster.etcd.put("/left", "over")
    t0 = time.monotonic()
    cluster.reset()
    assert time.monotonic() - t0 < 15
    assert all(n.running and not n.is_cut and n.client.containers(all=True) == [] for n in cluster.nodes)
    assert all(m.running() for m in cluster.etcd.members)
    assert n3.connects(cluster.etcd.members[0].address, 2379)
    assert cluster.etcd.has_quorum() and cluster.etcd.get("/left") is None
