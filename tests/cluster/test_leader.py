"""Leader loss during a rolling update across nodes, on the harness: a cluster formed by `cluster init` with 3
managers (the 3-member etcd they run, TLS from the cluster CA).

One formed cluster checks, in order:
- a start-first rolling update of 6 replicas over 3 nodes (Parallelism 2, health-gated) counts its batches
  cluster-wide: polling every node's engine, never more than 2 slots are being replaced at once;
- SIGKILL of the leader's agent mid-update: the other manager leads within the lease TTL + 2 s and finishes it;
- a history check over every state-log revision since the update began (the managed etcd members run without
  auto-compaction, etcd's default): no slot ever has two tasks desired `running` except a start-first overlap,
  and none outlives the transaction that records the new task healthy;
- a leader stopped (SIGSTOP) past its TTL and continued (SIGCONT) cannot write: its commits fail the fence (counted
  by dabctl_orchestrator_fenced_total) and it follows the new leader.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from agent.state.etcd import EtcdStateLog
from agent.state.nodes import NodeRecords
from agent.state.records import TASKS
from schemas.state import TaskRecord
from tests.support.cluster import Cluster, Node
from tests.support.dabcluster import DabCluster, formed
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TTL = 6  # formed() inits the cluster with --lease-ttl 6
PARALLELISM = 2
SCRIPT = "touch /tmp/healthy; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
HEALTHCHECK = {"Test": ["CMD", "test", "-f", "/tmp/healthy"], "Interval": "250ms", "Timeout": "1s", "Retries": 2}


def web(version: str) -> dict[str, Any]:
    return {
        "Image": "",  # set by the test (the harness's image by digest)
        "Command": ["/bin/sh", "-c"],
        "Args": [SCRIPT],
        "Env": [f"VERSION={version}"],
        "Healthcheck": HEALTHCHECK,
        "StopGracePeriod": "1s",
        "Deploy": {
            "Replicas": 6,
            "UpdateConfig": {"Parallelism": PARALLELISM, "Monitor": "1s", "Order": "start-first"},
        },
    }


def deploy(dab: DabCluster, version: str) -> None:
    dab.deploy("shop", {"web": {**web(version), "Image": dab.cluster.image}})


def containers(nodes: list[Node]) -> list[dict[str, Any]]:
    """Running containers of shop_web on `nodes` (engines up)."""
    found = []
    for node in nodes:
        if node.engine.running:
            found += node.client.containers(
                filters={"label": ["dabctl.stack=shop", "dabctl.service=web"], "status": "running"}
            )
    return found


def healthy_specs(nodes: list[Node]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in containers(nodes):
        if "(healthy)" in c["Status"]:
            out[c["Labels"]["dabctl.spec"]] = out.get(c["Labels"]["dabctl.spec"], 0) + 1
    return out


def replacing(nodes: list[Node], old: str) -> int:
    """Slots being replaced now, cluster-wide: a slot with a container of a new spec that is not healthy yet, or
    with more than one container."""
    by_slot: dict[str, list[dict[str, Any]]] = {}
    for c in containers(nodes):
        by_slot.setdefault(c["Labels"]["dabctl.slot"], []).append(c)
    return sum(
        1
        for cs in by_slot.values()
        if len(cs) > 1 or any(c["Labels"]["dabctl.spec"] != old and "(healthy)" not in c["Status"] for c in cs)
    )


def history(log: EtcdStateLog, start: int, end: int) -> list[tuple[int, dict[str, TaskRecord]]]:
    """The task keys at every revision in (start, end] that changed one: a range read at each revision (etcd
    keeps them all: the managed members run without auto-compaction)."""
    out: list[tuple[int, dict[str, TaskRecord]]] = []
    last: dict[str, int] = {}
    for revision in range(start + 1, end + 1):
        kvs = log.range(TASKS, revision=revision)
        seen = {kv.key: kv.mod_revision for kv in kvs}
        if seen != last:
            out.append((revision, {kv.key: TaskRecord.model_validate_json(kv.value) for kv in kvs}))
            last = seen
    return out


def check_history(revisions: list[tuple[int, dict[str, TaskRecord]]]) -> tuple[int, list[str]]:
    """The start-first overlaps seen over the revisions, and every pair of tasks of one slot desired running that
    is not one (more than two, or one that outlives the revision recording the newer task healthy)."""
    overlaps, wrong = 0, []
    for revision, tasks in revisions:
        slots: dict[str, list[TaskRecord]] = {}
        for key, t in tasks.items():
            if t.desired == "running":
                slots.setdefault(key.removeprefix(TASKS).rsplit("/", 1)[0], []).append(t)
        for slot, running in slots.items():
            if len(running) == 1:
                continue
            running.sort(key=lambda t: (t.created_revision, t.created_at))
            if len(running) == 2 and not running[-1].healthy:
                overlaps += 1
                continue
            wrong.append(
                f"revision {revision}: slot {slot} has {len(running)} tasks desired running "
                f"({', '.join(f'{t.task_id} healthy={t.healthy}' for t in running)})"
            )
    return overlaps, wrong


def metric(node: Node, name: str) -> float:
    text = node.agent.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_killed_leader_is_replaced_within_the_ttl_and_the_new_one_finishes_the_rolling_update(
    cluster: Cluster, tmp_path: Any
) -> None:
    with formed(cluster, tmp_path, managers=3) as dab:
        log = dab.root_log()
        leaders = NodeRecords(log)
        deploy(dab, "1")
        dab.wait(lambda: sum(healthy_specs(dab.nodes).values()) == 6, timeout=120, what="6 healthy replicas")
        assert dab.running("shop", "web") == {"n1": 2, "n2": 2, "n3": 2}
        (old,) = healthy_specs(dab.nodes)
        start = log.revision()

        # --- the update, sampled on every node until the leader dies ---
        first = leaders.leader()
        assert first is not None
        victim = cluster.node(first.record.name)
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(replacing(dab.nodes, old))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        deploy(dab, "2")
        sampler.start()
        try:
            wait_for(lambda: samples and samples[-1] > 0, timeout=60, interval=0.05)  # a batch is under way
            wait_for(lambda: sum(v for k, v in healthy_specs(dab.nodes).items() if k != old) >= 2, timeout=60)
        finally:
            stop.set()
            sampler.join()
        assert max(samples) <= PARALLELISM, f"up to {max(samples)} slots replaced at once (Parallelism 2)"

        # --- SIGKILL the leader's agent mid-update ---
        killed = time.monotonic()
        victim.agent.kill()
        wait_for(
            lambda: (now := leaders.leader()) is not None and now.record.node_id != first.record.node_id,
            timeout=TTL + 4,
            interval=0.02,
        )
        failover = time.monotonic() - killed
        second = leaders.leader()
        assert second is not None and second.term > first.term
        live = [n for n in dab.nodes if n is not victim]
        dab.wait(
            lambda: (h := healthy_specs(live)) and old not in h and sum(h.values()) == 6 and len(containers(live)) == 6,
            timeout=120,
            what="the new leader finishes the update on the live nodes",
        )
        finished = time.monotonic() - killed
        print(
            f"\nleader killed: new leader after {failover:.2f} s (TTL {TTL} s); update finished after {finished:.1f} s"
        )
        assert failover < TTL + 2

        # The killed node returns: it leads nothing, gets nothing moved back and removes what is not its own.
        dab.restart(victim)
        dab.wait(lambda: containers([victim]) == [], timeout=60, what="the returning node removes its old replicas")

        # --- SIGSTOP the new leader past its TTL, then SIGCONT: fenced out, it follows ---
        stopped = cluster.node(second.record.name)
        deploy(dab, "3")  # the stopped leader has a pass to commit when it wakes
        pid = stopped.agent.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: (now := leaders.leader()) is not None and now.term != second.term,
                timeout=TTL + 4,
                interval=0.05,
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        third = leaders.leader()
        assert third is not None and third.record.node_id != second.record.node_id
        wait_for(lambda: metric(stopped, "dabctl_cluster_leader") == 0, timeout=TTL + 2)
        wait_for(lambda: metric(stopped, "dabctl_cluster_leader_term") == third.term, timeout=TTL + 2)
        fenced = metric(stopped, "dabctl_orchestrator_fenced_total")
        dab.wait(
            lambda: (
                (h := healthy_specs(dab.nodes))
                and len(h) == 1
                and sum(h.values()) == 6
                and len(containers(dab.nodes)) == 6
            ),
            timeout=120,
            what="version 3 everywhere after the stop",
        )
        print(f"deposed leader woke: {fenced:.0f} commit(s) refused by the fence")

        # --- every revision since the update began ---
        end = log.revision()
        revisions = history(log, start, end)
        overlaps, wrong = check_history(revisions)
        print(f"history: {len(revisions)} task revisions of {end - start}, {overlaps} start-first overlaps")
        assert not wrong, "\n".join(wrong[:10])
        assert overlaps > 0  # the check saw the start-first handovers it is about
