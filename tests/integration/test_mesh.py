"""The routing mesh with real traffic: published ports on a node (a dockerd in its own network namespace that
started with ip_forward=0, so that Docker set FORWARD's policy to DROP), reached from the node itself (localhost
and its address), from a container, and from a second host (another namespace on a veth link).

dabctl runs inside the node's namespace, so its nftables table, sysctls and DOCKER-USER rule are the node's and
vanish with it; each test also checks that what it published is gone when its stack goes.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import IMAGE, Workspace
from tests.support.dockerd import NetnsDockerd
from tests.support.netns import Peer, fetch_in, run_in
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass
class Node:
    engine: NetnsDockerd
    peer: Peer

    @property
    def netns(self) -> str:
        return self.engine.netns

    def sh(self, *argv: str) -> str:
        proc = run_in(self.netns, *argv)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
        return proc.stdout

    def table(self) -> str:
        proc = run_in(self.netns, "nft", "list", "table", "ip", "dabctl")
        return proc.stdout if proc.returncode == 0 else ""

    def table_handle(self) -> int | None:
        proc = run_in(self.netns, "nft", "-j", "list", "table", "ip", "dabctl")
        if proc.returncode != 0:
            return None
        return next(int(i["table"]["handle"]) for i in json.loads(proc.stdout)["nftables"] if "table" in i)

    def route_localnet(self) -> str:
        return self.sh("cat", "/proc/sys/net/ipv4/conf/all/route_localnet").strip()

    def docker_user(self) -> str:
        return self.sh("iptables", "-S", "DOCKER-USER")


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    engine = NetnsDockerd(
        address_pool="base=10.202.0.0/16,size=24",
        sysctls={"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.route_localnet": "0"},
    )
    with engine, Peer(engine.netns) as peer:
        n = Node(engine, peer)
        # The case the issue names: dockerd turned ip_forward on itself, so FORWARD drops by default.
        assert "-P FORWARD DROP" in n.sh("iptables", "-S", "FORWARD")
        yield n


@pytest.fixture
def mws(node: Node, tmp_path: Path) -> Iterator[Workspace]:
    """A workspace whose dabctl runs in the node's namespace, against the node's engine."""
    wrapper = ("nsenter", f"--net={node.engine.netns_path}")
    ws = Workspace(node.engine.client, tmp_path, "m" + secrets.token_hex(4), wrapper=wrapper, loadbalancer="auto")
    try:
        yield ws
    finally:
        for name in [p.stem.removeprefix(ws.prefix + "-") for p in ws.source.glob("*.dab")]:
            ws.remove(name)
        ws.run("reconcile", "--once", "--allow-empty", "--source", str(ws.source), docker_host=node.engine.url)
        ws.cleanup()
        assert node.table() == "", "the stack is gone but dabctl's table is not"


def web(replicas: int, restart: str = "any", **port: Any) -> dict[str, Any]:
    """A service answering HTTP on 8080 with its container's hostname (the sample image's /bin/serve)."""
    return {"Image": IMAGE, "Deploy": {"Replicas": replicas, "RestartPolicy": {"Condition": restart}},
            "StopGracePeriod": "2s", "Ports": [{"Protocol": "tcp", "Port": 8080, **port}]}  # fmt: skip


def published(ws: Workspace, stack: str, engine: NetnsDockerd) -> int:
    status = ws.run("status", "--output", "json", "--source", str(ws.source), docker_host=engine.url, check=True)
    doc = json.loads(status.stdout)
    ports = next(s for s in doc["stacks"] if s["stack"] == ws.stack(stack))["health"]["services"][0]["ports"]
    return int(ports[0].split(":")[0])


def hostnames(ws: Workspace, stack: str) -> set[str]:
    return {c["Id"][:12] for c in ws.running(stack)}


def answers(fetch: Any, url: str, count: int) -> list[str | None]:
    return [fetch(url) for _ in range(count)]


def converge(ws: Workspace, node: Node) -> subprocess.CompletedProcess[str]:
    done = ws.reconcile(docker_host=node.engine.url)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_published_port_reaches_every_replica_from_the_node_a_container_and_another_host(
    node: Node, mws: Workspace
) -> None:
    mws.write("shop", {"Services": {"web": web(3)}})
    first = converge(mws, node)
    assert "publish" in first.stdout, first.stdout
    port = published(mws, "shop", node.engine)
    assert 30000 <= port <= 32767
    replicas = hostnames(mws, "shop")
    assert len(replicas) == 3

    origins = {
        "node localhost": lambda url: fetch_in(node.netns, url),
        "node address": lambda url: fetch_in(node.netns, url),
        "second host": node.peer.fetch,
    }
    urls = {
        "node localhost": f"http://localhost:{port}/",
        "node address": f"http://{node.peer.node_address}:{port}/",
        "second host": f"http://{node.peer.node_address}:{port}/",
    }
    for origin, fetch in origins.items():
        seen = answers(fetch, urls[origin], 6)
        assert set(seen) == replicas, f"{origin}: {seen} vs {replicas}"

    # From a container on the node: it reaches the node's address, balanced and masqueraded like the others.
    out = node.engine.client.create_container(
        IMAGE,
        # busybox nc, not wget: Debian's static busybox wget crashes (SIGSEGV) here.
        [
            "/bin/sh",
            "-c",
            f"for i in 1 2 3 4 5 6; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
            f"nc -w 3 {node.peer.node_address} {port} | tail -n 1; echo; done",
        ],
    )
    try:
        node.engine.client.start(out["Id"])
        assert node.engine.client.wait(out["Id"], timeout=60)["StatusCode"] == 0
        seen_by_container = node.engine.client.logs(out["Id"]).decode().split()
    finally:
        node.engine.client.remove_container(out["Id"], force=True)
    assert set(seen_by_container) == replicas

    # Node settings exist while a port is published.
    assert node.route_localnet() == "1"
    assert "dabctl routing mesh" in node.docker_user()
    assert 'iifname != "lo" ip daddr 127.0.0.0/8 drop' in node.table()

    # Converged: the next pass changes nothing, and the table is not rewritten.
    handle = node.table_handle()
    again = converge(mws, node)
    assert "(nothing to do)" in again.stdout, again.stdout
    assert node.table_handle() == handle

    # Gone with the last published port.
    mws.remove("shop")
    converge_all = mws.run("reconcile", "--once", "--allow-empty", "--source", str(mws.source),
                           docker_host=node.engine.url)  # fmt: skip
    assert converge_all.returncode == 0, converge_all.stdout + converge_all.stderr
    assert node.table() == ""
    assert "dabctl" not in node.docker_user()
    assert node.route_localnet() == "0"


def test_a_killed_replica_gets_no_request_after_one_pass_and_scaling_up_adds_backends(
    node: Node, mws: Workspace
) -> None:
    # Restart condition none: a killed replica stays dead, so every request it got would fail.
    mws.write("shop", {"Services": {"web": web(3, "none")}})
    converge(mws, node)
    port = published(mws, "shop", node.engine)
    url = f"http://{node.peer.node_address}:{port}/"
    victim = mws.running("shop")[0]["Id"]
    node.engine.client.kill(victim)
    wait_for(lambda: len(mws.running("shop")) == 2, timeout=20)

    plan = mws.plan(docker_host=node.engine.url)
    assert "backends -" in plan.stdout, plan.stdout  # the dead replica leaves the balancer
    converge(mws, node)
    alive = hostnames(mws, "shop")
    assert victim[:12] not in alive and len(alive) == 2
    seen = answers(node.peer.fetch, url, 8)
    assert None not in seen, seen
    assert set(seen) == alive

    mws.write("shop", {"Services": {"web": web(4)}})
    converge(mws, node)
    assert published(mws, "shop", node.engine) == port
    seen = answers(node.peer.fetch, url, 12)
    assert set(seen) == hostnames(mws, "shop") and len(set(seen)) == 4


def test_a_port_a_host_process_listens_on_is_refused_and_a_fixed_port_is_used(node: Node, mws: Workspace) -> None:
    listener = subprocess.Popen(
        ["nsenter", f"--net={node.engine.netns_path}", "/bin/busybox", "nc", "-l", "-p", "31999"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: ":31999" in node.sh("ss", "-ltn"), timeout=10)
        path = mws.write("busy", {"Services": {"web": web(1, PublishedPort=31999)}})
        refused = mws.reconcile(docker_host=node.engine.url)
        assert refused.returncode == 1
        line = next(ln for ln in (refused.stdout + refused.stderr).splitlines() if "31999" in ln)
        assert path.name in line and "Services.web.Ports[0]" in line and "in use by a process" in line, line
        assert mws.containers("busy") == []
        assert node.table() == ""
    finally:
        listener.kill()
        listener.wait()

    mws.write("busy", {"Services": {"web": web(1, PublishedPort=31998)}})
    converge(mws, node)
    assert published(mws, "busy", node.engine) == 31998
    assert fetch_in(node.netns, "http://127.0.0.1:31998/") in hostnames(mws, "busy")


def test_tables_and_rules_of_others_are_left_alone(node: Node, mws: Workspace) -> None:
    node.sh("nft", "add table inet othertest; add chain inet othertest c { type filter hook input priority 0; }; "
            "add rule inet othertest c tcp dport 9 accept")  # fmt: skip
    try:
        before = {t: _ruleset(node, t) for t in ("inet othertest", "ip nat", "ip filter")}
        mws.write("shop", {"Services": {"web": web(1)}})
        converge(mws, node)
        assert _ruleset(node, "inet othertest") == before["inet othertest"]
        mws.remove("shop")
        mws.run("reconcile", "--once", "--allow-empty", "--source", str(mws.source), docker_host=node.engine.url)
        after = {t: _ruleset(node, t) for t in before}
        assert after == before
    finally:
        node.sh("nft", "delete table inet othertest")


def _ruleset(node: Node, table: str) -> str:
    """A table's rules without handles and counters (which move with traffic)."""
    family, name = table.split()
    text = node.sh("nft", "list", "table", family, name)
    return "\n".join(ln for ln in text.splitlines() if "counter" not in ln)


def test_the_agent_keeps_ports_across_restarts_and_drains_a_killed_replica(node: Node, mws: Workspace) -> None:
    mws.write("shop", {"Services": {"web": web(3, "none")}})
    args = ["--source", str(mws.source), "--docker-host", node.engine.url, "--resync-interval", "0"]
    agent = AgentProcess(mws.state, *args, netns=node.netns).start()
    try:
        wait_for(lambda: len(mws.running("shop")) == 3, timeout=60)
        port = wait_for(lambda: _port_in_table(node), timeout=30)
        url = f"http://{node.peer.node_address}:{port}/"
        wait_for(lambda: set(answers(node.peer.fetch, url, 6)) == hostnames(mws, "shop"), timeout=30)

        victim = mws.running("shop")[0]["Id"]
        node.engine.client.kill(victim)
        # The die event triggers a pass: the dead replica (restart condition none) leaves the balancer.
        wait_for(lambda: _backends_in_table(node) == 2, timeout=30)
        seen = answers(node.peer.fetch, url, 6)
        assert None not in seen and set(seen) == hostnames(mws, "shop"), seen
        assert agent.terminate() == 0
        table = node.table()

        agent = AgentProcess(mws.state, *args, netns=node.netns).start()
        time.sleep(1)  # a pass after a restart that found nothing to do
        assert _port_in_table(node) == port
        assert node.table() == table
        assert set(answers(node.peer.fetch, url, 6)) == hostnames(mws, "shop")
    finally:
        agent.terminate()


def _port_in_table(node: Node) -> int | None:
    table = node.table()
    for line in table.splitlines():
        if "elements = {" in line and "tcp . " in line:
            return int(line.split("tcp . ")[1].split()[0])
    return None


def _backends_in_table(node: Node) -> int:
    return sum(line.count(" . 8080") for line in node.table().splitlines() if "dnat" in line)


def test_a_rolling_update_drains_each_replica_before_stopping_it(node: Node, mws: Workspace) -> None:
    """Stop-first, one at a time: each old replica leaves the balancer before it is stopped, so a client that
    keeps asking during the whole update is never refused."""
    service = web(3)
    service["Deploy"]["UpdateConfig"] = {"Parallelism": 1, "Monitor": "300ms"}
    mws.write("shop", {"Services": {"web": service}})
    converge(mws, node)
    url = f"http://{node.peer.node_address}:{published(mws, 'shop', node.engine)}/"
    before = hostnames(mws, "shop")

    seen: list[str | None] = []
    done = threading.Event()

    def keep_asking() -> None:
        # A request sent to a stopped replica stalls (its address is gone or reused only later): with a 1 s
        # timeout it fails instead of waiting out a SYN retransmission.
        while not done.is_set():
            seen.append(node.peer.fetch(url, timeout=1))

    client = threading.Thread(target=keep_asking)
    client.start()
    try:
        service["Env"] = ["REVISION=2"]
        mws.write("shop", {"Services": {"web": service}})
        update = converge(mws, node)
    finally:
        done.set()
        client.join()
    after = hostnames(mws, "shop")
    assert len(after) == 3 and not after & before, update.stdout
    print(f"\n  {len(seen)} requests during the update, {seen.count(None)} failed")
    assert len(seen) >= 10
    assert None not in seen, seen
    assert set(seen) <= before | after
