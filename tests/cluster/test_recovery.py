"""Losing managers with workloads on a cluster `cluster init` made (TLS, the etcd dabctl runs), on the harness.

One formed cluster of three managers, a stack with replicas on every node, then in order:

1. one non-leader manager's agent and its etcd member SIGKILLed: the cluster keeps working (a scale converges on
   the other two nodes), `node ls` shows the node down, its containers keep running untouched; its agent
   restarted: the node is up again and its etcd member is back among the voting members;
2. `cluster backup`, then two managers destroyed (agent and etcd member SIGKILLed, the cluster files under their
   state directories wiped; node-id kept): the survivor recovers the cluster (`cluster recover`) and leads it,
   holding the down nodes' slots where they are; the two nodes join it again as themselves (workers: both at
   once); every container that ran before still runs, with the same id, on the same node, throughout: none is
   created or removed; a pass of the recovered leader completes and the stack is healthy.

Backup, recover and convergence times are printed. Every agent, etcd member and their data are removed afterwards,
whatever happens (the harness's reset removes the containers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.node.etcdmember import LocalMember
from agent.pki.files import PkiPaths
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT
from agent.state.etcdcluster import EtcdMembership
from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster, Node
from tests.support.dabcluster import TTL, DabCluster, formed
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

STACK = "shop"
CLUSTER_FILES = ("cluster.json", "cluster-secrets.json", "etcd", "pki")  # node-id stays: the same node joins again


def states(dab: DabCluster, on: Node) -> dict[str, str]:
    return {r["name"]: r["state"] for r in dab.nodes_json(on)}


def leader_of(dab: DabCluster, on: Node) -> str | None:
    return next((r["name"] for r in dab.nodes_json(on) if r["leader"]), None)


def deploy(dab: DabCluster, web: int) -> None:
    image = dab.cluster.image
    dab.deploy(
        STACK,
        {
            "web": {"Image": image, "Command": SLEEPER, "StopGracePeriod": "1s", "Deploy": {"Replicas": web}},
            "mon": {"Image": image, "Command": SLEEPER, "StopGracePeriod": "1s", "Deploy": {"Mode": "global"}},
        },
    )


def root_client(node: Node, endpoints: list[Node]) -> EtcdStateLog:
    """etcd's root user over TLS with `node`'s certificate, on `endpoints`' members."""
    password = json.loads((node.state_dir / "cluster-secrets.json").read_text())["etcd_root_password"]
    pki = PkiPaths.of(node.state_dir)
    return EtcdStateLog(
        [f"https://{n.address}:2379" for n in endpoints], prefix="/", user=ROOT, password=password,
        ca_file=str(pki.ca_cert), cert_file=str(pki.node_cert), key_file=str(pki.node_key), timeout=5,
    )  # fmt: skip


def voters(node: Node, endpoints: list[Node]) -> list[str]:
    root = root_client(node, endpoints)
    try:
        return sorted(m.name for m in EtcdMembership(root).members() if not m.learner and m.name)
    finally:
        root.close()


def node_id(node: Node) -> str:
    return (node.state_dir / "node-id").read_text().strip()


def containers(nodes: list[Node]) -> dict[str, dict[str, str]]:
    """The stack's containers (any state) on each node: `id[:12] service.slot` -> state."""
    return {
        n.name: {
            f"{c['Id'][:12]} {c['Labels']['dabctl.service']}.{c['Labels']['dabctl.slot'][:8]}": c["State"]
            for c in n.client.containers(all=True, filters={"label": f"dabctl.stack={STACK}"})
        }
        for n in nodes
    }


def changes(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> str:
    """What differs, by node: containers gone, new or in another state."""
    out = []
    for node in sorted(before.keys() | after.keys()):
        b, a = before.get(node, {}), after.get(node, {})
        out += [f"{node}: removed {k}" for k in sorted(b.keys() - a.keys())]
        out += [f"{node}: created {k} ({a[k]})" for k in sorted(a.keys() - b.keys())]
        out += [f"{node}: {k} {b[k]} -> {a[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return "\n".join(out)


def running(nodes: list[Node], service: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        found = n.client.containers(
            filters={"label": [f"dabctl.stack={STACK}", f"dabctl.service={service}"], "status": "running"}
        )
        if found:
            out[n.name] = len(found)
    return out


def kill_manager(node: Node) -> None:
    """SIGKILL the node's agent and its etcd member (its engine and containers keep running)."""
    assert node.agent is not None
    node.agent.kill()
    node.agent = None
    local = LocalMember(node.state_dir)
    pid = local.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: local.pid() is None, timeout=10)


def stack_health(node: Node) -> str:
    stacks = node.agent.get("/status").json()["stacks"]
    return str(stacks[0]["health"]["status"]) if stacks else ""


def passes(node: Node) -> float:
    text = node.agent.get("/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("dabctl_reconcile_passes_total{") and 'result="failure"' not in line
    )


def test_a_killed_manager_and_a_recovered_quorum_loss_keep_every_container(cluster: Cluster, tmp_path: Path) -> None:
    with formed(cluster, tmp_path, managers=3) as dab:
        killed_and_recovered(dab, tmp_path)


def killed_and_recovered(dab: DabCluster, tmp_path: Path) -> None:
    t_form = time.monotonic()
    say = lambda what: print(f"{time.monotonic() - t_form:6.1f} s {what}", flush=True)  # noqa: E731
    n1, n2, n3 = dab.nodes
    formed_s = dab.seconds["total"]
    deploy(dab, web=6)
    dab.wait(lambda: running(dab.nodes, "web") == {"n1": 2, "n2": 2, "n3": 2}, what="web 2/2/2")
    dab.wait(lambda: running(dab.nodes, "mon") == {"n1": 1, "n2": 1, "n3": 1}, what="mon on every node")

    say("deployed")
    # --- 1. a non-leader manager killed (agent and etcd member) --------------------------------------------------
    leader = leader_of(dab, n1)
    assert leader is not None
    victim = next(n for n in (n3, n2) if n.name != leader)
    live = [n for n in dab.nodes if n is not victim]
    on_victim = containers([victim])[victim.name]
    kill_manager(victim)
    killed_at = time.monotonic()
    dab.wait(lambda: states(dab, live[0])[victim.name] == "down", timeout=TTL + 30, what=f"{victim.name} down")
    down_s = time.monotonic() - killed_at
    say("victim down")
    deploy(dab, web=8)  # the cluster keeps working: its slots and the new ones run on the other two nodes
    dab.wait(lambda: sum(running(live, "web").values()) == 8, what="web scaled to 8 on the live nodes")
    scaled_s = time.monotonic() - killed_at
    assert containers([victim])[victim.name] == on_victim  # static stability: untouched, all still running
    assert set(on_victim.values()) == {"running"}
    say("scaled")
    pid_before = LocalMember(victim.state_dir).pid()
    assert pid_before is None
    dab.start(victim)
    dab.wait(lambda: states(dab, live[0])[victim.name] == "up", what=f"{victim.name} up again")
    assert LocalMember(victim.state_dir).pid() is not None
    say("victim up")
    ids = {n.name: node_id(n) for n in dab.nodes}
    dab.wait(lambda: voters(live[0], live) == sorted(ids.values()), what="its etcd member a voter again")
    dab.wait(
        lambda: sum(running(dab.nodes, "web").values()) == 8 and len(running(dab.nodes, "mon")) == 3,
        what="converged with the node back",
    )
    back_s = time.monotonic() - killed_at

    say("step 1 converged")
    # --- 2. backup, two managers destroyed, recover on the survivor ----------------------------------------------
    survivor = n1
    lost = [n2, n3]
    before = containers(dab.nodes)
    assert all(set(c.values()) == {"running"} for c in before.values()), before
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    backup = tmp_path / "cluster.backup"
    t0 = time.monotonic()
    made = survivor.dabctl("cluster", "backup", "--passphrase-file", str(passphrase), str(backup))
    assert made.returncode == 0, made.stderr
    backup_s = time.monotonic() - t0

    say("backed up")
    for node in lost:
        kill_manager(node)
        for name in CLUSTER_FILES:
            path = node.state_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert survivor.stop_agent() == 0
    assert containers(dab.nodes) == before  # no agent anywhere: every container still runs
    t1 = time.monotonic()
    recovered = survivor.dabctl("cluster", "recover")
    assert recovered.returncode == 0, recovered.stderr + dab.etcd_logs()
    recover_s = time.monotonic() - t1
    assert voters(survivor, [survivor]) == [ids[survivor.name]]
    say("recovered")
    dab.start(survivor)
    dab.wait(lambda: leader_of(dab, survivor) == survivor.name, what="the survivor leads the recovered cluster")
    assert containers(dab.nodes) == before, changes(before, containers(dab.nodes))  # down nodes held: nothing moved
    # The lost nodes come back as themselves (node-id kept), as workers: at once, no etcd member to add one by one.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda n: dab.join(n, "worker"), lost))
    for node in lost:
        dab.start(node)
    say("rejoined")
    dab.wait(lambda: set(states(dab, survivor).values()) == {"up"}, what="every node up in the recovered cluster")
    assert voters(survivor, [survivor]) == [ids[survivor.name]]
    done = passes(survivor)
    dab.wait(
        lambda: passes(survivor) > done and stack_health(survivor) == "Healthy",
        what="a pass of the recovered leader, the stack healthy",
    )
    converged_s = time.monotonic() - t1
    say("converged")
    assert containers(dab.nodes) == before, changes(before, containers(dab.nodes))
    print(
        f"\nmanaged etcd, 3 managers: formed in {formed_s:.1f} s\n"
        f"manager killed: down in node ls after {down_s:.1f} s (TTL {TTL} s), scale converged after {scaled_s:.1f} s, "
        f"back (agent restarted, member a voter, converged) after {back_s:.1f} s\n"
        f"backup {backup_s:.2f} s ({backup.stat().st_size} bytes); recover {recover_s:.2f} s; "
        f"recover to converged (2 nodes rejoined, a leader pass, stack healthy) {converged_s:.1f} s; "
        f"{sum(len(c) for c in before.values())} containers kept, none created or removed"
    )
