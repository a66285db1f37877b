"""Failover benchmark: kill a node (its agent and dockerd, SIGKILL), time until all replicas run again elsewhere.

On the multi-node harness (tests/support/cluster.py: 3 nodes in their own network namespaces, each with its own
dockerd, a real 3-member etcd, a registry with the sample image by digest), the same service for both contenders:
6 replicas of the sample image running a sleeper command, spread 2/2/2, n1 the manager (and leader), n3 killed.

- dabctl: a cluster formed as an operator does (tests/support/dabcluster.py: `cluster init`, `cluster join`, an
  agent per node, the default lease TTL (5 s), the default `resync_interval` of 300 s so that only the product's
  own triggers count);
- Docker Swarm on the same nodes (`cluster.swarm()`: n1 the manager, n2 and n3 workers), default settings.

Runs are interleaved (dabctl, swarm, dabctl, ...), each on a freshly reset harness. Clock: starts just before the
kill and stops when the surviving engines, polled every 20 ms from outside, report 6 running containers of the
service. For dabctl the breakdown comes from a watch on the state log: when the killed node's status key went
(its lease lapsed), when the leader committed the moved tasks, and the rest (the survivors creating and starting
containers, observed by polling).

    sudo .venv/bin/python bench/failover.py [--runs 3] [--replicas 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import POLL, log, machine, print_table, ratio, stats

from agent.state.etcd import EtcdStateLog
from agent.state.records import TASKS, node_status_key
from schemas.state import TaskRecord
from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster, Node
from tests.support.dabcluster import formed

DEFAULT_RESYNC = 300.0


def running(nodes: list[Node], label: list[str]) -> int:
    return sum(len(n.client.containers(filters={"label": label, "status": "running"})) for n in nodes)


def wait_running(nodes: list[Node], label: list[str], count: int, timeout: float = 300) -> float:
    """Seconds (monotonic clock) at which `count` containers run on `nodes`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running(nodes, label) == count:
            return time.monotonic()
        time.sleep(POLL)
    raise TimeoutError(f"{count} running containers on {[n.name for n in nodes]} not reached in {timeout:.0f} s")


class Marks:
    """Watches the state log: when the killed node's status key is deleted, when a task for another node is put."""

    def __init__(self, log_: EtcdStateLog, node_id: str) -> None:
        self.down: float | None = None
        self.moved: float | None = None
        self._watch = log_.watch("/", log_.revision() + 1)
        self._status = node_status_key(node_id)
        self._node = node_id
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._watch.cancelled:
            ev = self._watch.next(timeout=0.5)
            if ev is None:
                continue
            now = time.monotonic()
            if ev.key == self._status and ev.type == "delete" and self.down is None:
                self.down = now
            elif ev.key.startswith(TASKS) and ev.type == "put" and self.moved is None:
                task = TaskRecord.model_validate_json(ev.value)
                if task.node != self._node and task.desired == "running" and self.down is not None:
                    self.moved = now

    def close(self) -> None:
        self._watch.cancel()


def run_dabctl(cluster: Cluster, replicas: int) -> Times:
    """How long one kill took, and its parts, in seconds."""
    cluster.reset()
    n1, n2, n3 = cluster.nodes
    label = ["dabctl.stack=bench", "dabctl.service=web"]
    with (
        tempfile.TemporaryDirectory() as tmp,
        formed(cluster, Path(tmp), lease_ttl=None, resync_interval=DEFAULT_RESYNC) as dab,
    ):
        dab.deploy("bench", {"web": {"Image": cluster.image, "Command": SLEEPER, "Deploy": {"Replicas": replicas}}})
        per = replicas // 3
        dab.wait(lambda: dab.running("bench", "web") == {"n1": per, "n2": per, "n3": per}, what="spread")
        state = dab.root_log()  # the cluster's own etcd (TLS, on n1), as root
        n3_id = next(r["id"] for r in dab.nodes_json() if r["name"] == "n3")
        marks = Marks(state, n3_id)
        old = {c["Id"] for n in (n1, n2) for c in n.client.containers(all=True, filters={"label": label})}
        try:
            t0, wall0 = time.monotonic(), time.time()
            n3.kill()
            t1 = wait_running([n1, n2], label, replicas)
        finally:
            marks.close()
            state.close()
        created: dict[str, list[float]] = {}  # node -> its new containers' creation times (monotonic)
        started: list[float] = []
        for n in (n1, n2):
            for c in n.client.containers(filters={"label": label}):
                if c["Id"] not in old:
                    info = n.client.inspect_container(c["Id"])
                    created.setdefault(n.name, []).append(t0 + _epoch(info["Created"]) - wall0)
                    started.append(t0 + _epoch(info["State"]["StartedAt"]) - wall0)
    down = (marks.down or t1) - t0
    moved = (marks.moved or t1) - (marks.down or t0)
    # The nodes' passes: from the commit until each survivor created its first new container (the slower one).
    create = max((min(ts) for ts in created.values()), default=t1) - (marks.moved or t0)
    start = max(started, default=t1) - (t0 + down + moved + create)
    return Times(total=t1 - t0, down=down, moved=moved, create=create, start=start)


def _epoch(stamp: str) -> float:
    """Docker's RFC 3339 time with nanoseconds -> epoch seconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp() + float(f"0.{frac or 0}")


@dataclass(frozen=True, kw_only=True)
class Times:
    total: float
    down: float  # kill -> the node's status key deleted (the lease lapsed)
    moved: float  # -> the leader's commit of the moved tasks
    create: float  # -> each survivor created its first new container (the nodes' passes)
    start: float  # -> the last new container started (docker create + start)


def run_swarm(cluster: Cluster, replicas: int) -> float:
    cluster.reset()
    n1, n2, n3 = cluster.nodes
    label = ["com.docker.swarm.service.name=web"]
    with cluster.swarm() as swarm:
        swarm.service("web", replicas, command=SLEEPER)
        per = replicas // 3
        swarm.wait(lambda: swarm.running("web") == {"n1": per, "n2": per, "n3": per}, "spread", timeout=120)
        t0 = time.monotonic()
        n3.kill()
        t1 = wait_running([n1, n2], label, replicas)
        n3.start()  # its engine back, so that it can leave the swarm with the others
    return t1 - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=6)
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    dab: list[Times] = []
    sw: list[float] = []
    with Cluster(nodes=3) as cluster:
        desc = machine(cluster.nodes[0].engine)
        for i in range(args.runs):
            order = ("dabctl", "swarm") if i % 2 == 0 else ("swarm", "dabctl")
            for who in order:
                if who == "dabctl":
                    t = run_dabctl(cluster, args.replicas)
                    dab.append(t)
                    parts = ", ".join(f"{k} {v:.2f}" for k, v in vars(t).items())
                    log(f"run {i + 1} dabctl: {parts}")
                else:
                    sw.append(run_swarm(cluster, args.replicas))
                    log(f"run {i + 1} swarm: {sw[-1]:.2f} s")
        cluster.reset()
    total = [t.total for t in dab]
    poll = [t.total - t.down - t.moved - t.create - t.start for t in dab]
    print(f"\n{desc}\nload average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {args.runs} runs\n")
    print_table(
        ["replicas", "contender", "seconds", "÷ swarm"],
        [
            [str(args.replicas), "dabctl", stats(total), ratio(total, sw)],
            ["", "  lease lapse (kill -> status key gone)", stats([t.down for t in dab]), ""],
            ["", "  -> leader's commit of the moved tasks", stats([t.moved for t in dab]), ""],
            ["", "  -> each survivor's first create (node passes)", stats([t.create for t in dab]), ""],
            ["", "  -> the last one started (docker create/start)", stats([t.start for t in dab]), ""],
            ["", "  -> seen running (the 20 ms poll)", stats(poll), ""],
            [str(args.replicas), "swarm", stats(sw), "1.00x"],
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
