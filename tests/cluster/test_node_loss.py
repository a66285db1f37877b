"""Scheduling, node loss, pause, drain and a cut network on the harness (3 nodes), one cluster formed by `cluster init` (n1 the
manager running the cluster's TLS etcd member, n2 and n3 workers):

- `Replicas: 6` runs 2/2/2 and a global service one per node; `ps` on the manager shows every node's slots and a
  changing command on a worker points at the managers;
- pause: new slots avoid the paused node, its tasks stay;
- drain: its replicated tasks run elsewhere, a start-first service never drops below its healthy count (all
  nodes polled every ~100 ms), its global task stops;
- kill (agent and dockerd): its replicas run elsewhere; back, it gets nothing moved back and removes its stale
  containers;
- cut: its containers keep running throughout; the leader moves its slots after the lease TTL; healed, each slot
  has exactly one task desired running and one container cluster-wide.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from agent.state.records import Records
from schemas.state import STATE_SCHEMA, STATE_SCHEMA_OLDEST
from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster, Node
from tests.support.dabcluster import ENV, DabCluster, formed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

STACK = "shop"
HEALTHY_SCRIPT = "touch /tmp/healthy; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
HEALTHCHECK = {"Test": ["CMD", "test", "-f", "/tmp/healthy"], "Interval": "250ms", "Timeout": "1s", "Retries": 2}


def services(web: int) -> dict[str, dict[str, Any]]:
    return {
        "web": {"Image": "", "Command": SLEEPER, "StopGracePeriod": "2s", "Deploy": {"Replicas": web}},
        "api": {
            "Image": "",
            "Command": ["/bin/sh", "-c", HEALTHY_SCRIPT],
            "Healthcheck": HEALTHCHECK,
            "StopGracePeriod": "2s",
            "Deploy": {"Replicas": 3, "UpdateConfig": {"Parallelism": 1, "Order": "start-first"}},
        },
        "mon": {"Image": "", "Command": SLEEPER, "StopGracePeriod": "2s", "Deploy": {"Mode": "global"}},
    }


class Checks:
    """What the judged checks look at: containers on every node's engine, tasks in the state log."""

    def __init__(self, dab: DabCluster) -> None:
        self.dab = dab
        self.log = dab.root_log()
        self.records = Records(self.log)

    def deploy(self, web: int) -> None:
        svcs = services(web)
        for spec in svcs.values():
            spec["Image"] = self.dab.cluster.image
        self.dab.deploy(STACK, svcs)

    def running(self, service: str, nodes: list[Node] | None = None) -> dict[str, int]:
        return self.dab.running(STACK, service, nodes)

    def total(self, service: str) -> int:
        return sum(self.running(service).values())

    def healthy(self, service: str) -> int:
        n = 0
        for node in self.dab.nodes:
            if node.engine.running:
                found = node.client.containers(
                    filters={"label": [f"dabctl.stack={STACK}", f"dabctl.service={service}"], "health": "healthy"}
                )
                n += len(found)
        return n

    def container_slots(self, service: str) -> Counter[str]:
        """Containers (any state) of a service by slot, cluster-wide."""
        out: Counter[str] = Counter()
        for node in self.dab.nodes:
            for c in node.client.containers(
                all=True, filters={"label": [f"dabctl.stack={STACK}", f"dabctl.service={service}"]}
            ):
                out[c["Labels"]["dabctl.slot"]] += 1
        return out

    def desired_running(self, service: str) -> Counter[str]:
        """Tasks desired running of a service by slot, in the state log."""
        out: Counter[str] = Counter()
        for (stack, svc, slot), tasks in self.records.tasks().items():
            if (stack, svc) == (STACK, service):
                out[slot] = sum(1 for t in tasks if t.desired == "running")
        return out

    def one_each(self, service: str, replicas: int) -> bool:
        """Each slot has exactly one task desired running and one container cluster-wide, all running."""
        running = self.desired_running(service)
        slots = {s for s, n in running.items() if n}
        return (
            len(slots) == replicas
            and all(running[s] == 1 for s in slots)
            and self.container_slots(service) == Counter(dict.fromkeys(slots, 1))
            and self.total(service) == replicas
        )

    def node_update(self, node: str, *flags: str) -> None:
        out = self.dab.nodes[0].dabctl("node", "update", node, *flags, env=ENV)
        assert out.returncode == 0, out.stderr


class Poller:
    """Polls `probe` every ~100 ms in a thread for the block; `samples` holds what it returned."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.samples: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.probe())
            self._stop.wait(0.1)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def checks(cluster: Cluster, tmp_path: Any) -> Iterator[Checks]:
    # The default resync (300 s): what moves replicas here is the product's own triggers, not a periodic pass.
    with formed(cluster, tmp_path, resync_interval=300) as dab:
        yield Checks(dab)


def test_pause_drain_kill_and_cut_move_replicas_and_leave_one_task_and_one_container_per_slot(checks: Checks) -> None:
    dab = checks.dab
    n1, n2, n3 = dab.nodes
    checks.deploy(web=6)
    dab.wait(lambda: checks.running("web") == {"n1": 2, "n2": 2, "n3": 2}, what="web 2/2/2")
    dab.wait(lambda: checks.running("mon") == {"n1": 1, "n2": 1, "n3": 1}, what="mon on every node")
    dab.wait(lambda: checks.healthy("api") == 3 and checks.running("api") == {"n1": 1, "n2": 1, "n3": 1}, what="api")
    # Operating it: `ps` on the manager shows every node's slots; changing commands on a worker point at managers.
    ps = n1.dabctl("ps", STACK, env=ENV)
    assert ps.returncode == 0, ps.stderr
    assert "NODE" in ps.stdout.splitlines()[0]
    rows = [line.split() for line in ps.stdout.splitlines()[1:] if line.strip()]
    assert {cell for row in rows for cell in row if cell in ("n1", "n2", "n3")} == {"n1", "n2", "n3"}
    refused = n2.dabctl("reconcile", "--once", env=ENV)
    assert refused.returncode == 1 and "run this on a manager" in refused.stderr, refused.stderr
    assert n1.address in refused.stderr
    # Guards: every node records the state schemas it reads; the same config everywhere narrows nothing.
    inspect = n1.dabctl("node", "inspect", "n2", env=ENV)
    assert inspect.returncode == 0, inspect.stderr
    detail = json.loads(inspect.stdout)
    assert (detail["status"]["schema_oldest"], detail["status"]["schema_version"]) == (
        STATE_SCHEMA_OLDEST,
        STATE_SCHEMA,
    )
    assert detail["narrows"] == []

    # pause: a scale-up places nothing on n2; what n2 runs stays.
    checks.node_update("n2", "--availability", "pause")
    checks.deploy(web=9)
    dab.wait(lambda: checks.total("web") == 9, what="web scaled to 9")
    assert checks.running("web")["n2"] == 2, checks.running("web")
    assert checks.running("mon").get("n2") == 1 and checks.running("api").get("n2") == 1
    checks.node_update("n2", "--availability", "active")

    # drain: n3's replicated tasks run elsewhere, its global task stops, api never below 3 healthy.
    with Poller(lambda: checks.healthy("api")) as healthy:
        checks.node_update("n3", "--availability", "drain")
        drained = time.monotonic()
        dab.wait(lambda: "n3" not in checks.running("web") and checks.total("web") == 9, what="web off n3")
        dab.wait(lambda: "n3" not in checks.running("api") and checks.healthy("api") == 3, what="api off n3")
        dab.wait(lambda: checks.running("mon") == {"n1": 1, "n2": 1}, what="mon stopped on n3")
        drain_s = time.monotonic() - drained
    assert len(healthy.samples) > 20 and min(healthy.samples) >= 3, healthy.samples
    checks.node_update("n3", "--availability", "active")
    dab.wait(lambda: checks.running("mon") == {"n1": 1, "n2": 1, "n3": 1}, what="mon back on n3")

    # kill n2 (agent and dockerd): its replicas run on n1 and n3; back, it gets nothing moved back.
    on_n2 = checks.running("web")["n2"]
    assert on_n2 > 0
    n2.kill()
    t0 = time.monotonic()
    dab.wait(lambda: checks.total("web") == 9 and checks.total("api") == 3, what="replicas after the kill")
    moved = time.monotonic() - t0
    n2.start()
    dab.wait(lambda: "n2" in dab.up(), what="n2 up again")
    dab.wait(lambda: checks.running("mon").get("n2") == 1, what="mon back on n2")
    dab.wait(lambda: checks.one_each("web", 9) and checks.one_each("api", 3), what="one task and container per slot")
    assert "n2" not in checks.running("web") and "n2" not in checks.running("api"), "moved back to n2"

    # cut n3: its containers keep running; the leader moves its slots; healed, one task and one container per slot.
    cut_at = time.monotonic()
    on_n3 = lambda: {c["Id"] for c in n3.client.containers(filters={"label": f"dabctl.stack={STACK}"})}  # noqa: E731
    before = on_n3()
    assert before
    n3.cut()
    try:
        with Poller(on_n3) as kept:  # the whole cut, ending before the heal
            dab.wait(lambda: "n3" not in dab.up(), what="n3 down")
            dab.wait(lambda: sum(checks.running("web", [n1, n2]).values()) == 9, what="web on n1 and n2")
            cut_s = time.monotonic() - cut_at
    finally:
        n3.heal()
    assert len(kept.samples) > 20 and all(s >= before for s in kept.samples), "a container on the cut node stopped"
    dab.wait(lambda: "n3" in dab.up(), what="n3 up again")
    dab.wait(lambda: checks.one_each("web", 9) and checks.one_each("api", 3), what="one task and container per slot")
    dab.wait(lambda: checks.running("mon") == {"n1": 1, "n2": 1, "n3": 1}, what="mon on every node")
    print(f"drain -> moved: {drain_s:.1f} s; kill -> all running again: {moved:.1f} s; cut -> moved: {cut_s:.1f} s")
