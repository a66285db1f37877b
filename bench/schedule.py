"""`orchestrate` (the whole pure function: scheduler, services, rollout steps, tasks) for a large simulated cluster.

    .venv/bin/python bench/schedule.py [--nodes 1000] [--services 100] [--replicas 100] [--runs 5]

No engine and no state log: nodes, snapshots and reports are built in memory. 1,000 nodes (3 managers, a `zone`
label over three values), 100 replicated services of 100 replicas (every tenth with a zone constraint, every
seventh with MaxReplicasPerNode 1) in 10 stacks, and 3 global services. Cases: a cold snapshot (nothing assigned:
every slot placed, every task created), a converged one (every slot assigned, its task recorded and its container
reported running: nothing to do), and the converged one with 1 % of the nodes down (their slots move). Each case is
timed `--runs` times in this process; the table gives median (min-max) in milliseconds, wall clock and CPU time
(on a shared machine the wall clock includes waiting for a core), with the scheduler's share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.cluster import scheduler  # noqa: E402
from agent.cluster.nodes import NodeInfo  # noqa: E402
from agent.cluster.orchestrate import Desired, Intent, Observations, PlannedImage, ResolvedImage, orchestrate  # noqa: E402
from agent.cluster.snapshot import Snapshot  # noqa: E402
from bench.common import machine, print_table, stats  # noqa: E402
from bundles import DesiredState  # noqa: E402
from bundles.desired import service_targets  # noqa: E402
from bundles.load import stack_bundle  # noqa: E402
from reconcilers.services import Replica  # noqa: E402

NOW = 1_700_000_000.0
ZONES = ("eu", "us", "ap")


def cluster(count: int) -> tuple[NodeInfo, ...]:
    return tuple(
        NodeInfo(
            node_id=f"{i:025x}",
            name=f"node-{i:04d}",
            role="manager" if i < 3 else "worker",
            labels={"zone": ZONES[i % 3]},
        )
        for i in range(count)
    )


def state(services: int, replicas: int, stacks: int = 10) -> DesiredState:
    out = {}
    per_stack = max(1, services // stacks)
    for s in range(stacks):
        docs = {}
        for j in range(per_stack):
            n = s * per_stack + j
            deploy: dict[str, object] = {"Replicas": replicas}
            placement: dict[str, object] = {}
            if n % 10 == 0:
                placement["Constraints"] = ["node.labels.zone==eu"]
            if n % 7 == 0:
                placement["MaxReplicasPerNode"] = 1
            if placement:
                deploy["Placement"] = placement
            docs[f"svc{j}"] = {"Image": "dabctl/sample:1", "Env": [f"N={n}"], "Deploy": deploy}
        out[f"s{s}"] = docs
    out["infra"] = {
        name: {"Image": "dabctl/sample:1", "Deploy": {"Mode": "global"}} for name in ("logs", "metrics", "proxy")
    }
    stacks_ = {}
    for name, docs in out.items():
        raw = json.dumps({"Version": "0.1", "Services": docs}).encode()
        stacks_[name] = stack_bundle(name, f"{name}.dab", raw, ".dab", f"rev-{name}")
    return DesiredState(stacks=stacks_)


def desired_for(d: DesiredState, nodes: tuple[NodeInfo, ...]) -> Desired:
    images = {
        (name, t.name): ResolvedImage(t, PlannedImage(t.service.image))
        for name, stack in d.stacks.items()
        for t in service_targets(stack)
    }
    return Desired(state=d, images=images, nodes=nodes, scope=frozenset(d.stacks))


def converged(d: Desired, cold: Intent) -> tuple[Snapshot, Observations]:
    """The snapshot and reports after the cold intent was committed and every node ran its part."""
    tasks = {key: list(ts) for key, ts in cold.tasks.put.items()}
    hashes = {key: r.target.spec_hash for key, r in d.images.items()}
    slots = [
        Replica(
            id=f"c-{stack}-{service}-{slot}",
            name=f"{stack}_{service}.{slot}",
            stack=stack,
            service=service,
            slot=slot,
            spec_hash=hashes[(stack, service)],
            state="running",
            created=int(NOW),
            node=node,
        )
        for (stack, service), per_node in cold.assignments.items()
        for node, node_slots in per_node.items()
        for slot in node_slots
    ]
    snapshot = Snapshot(revision=2, assignments=cold.assignments, tasks=tasks)
    return snapshot, Observations(now=NOW + 10, slots=slots)


def timed(fn: Callable[[], object], runs: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU milliseconds of each run (the CPU time is what the code costs on a shared, loaded machine)."""
    wall: list[float] = []
    cpu: list[float] = []
    result: object = None
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    nodes = cluster(args.nodes)
    d = desired_for(state(args.services, args.replicas), nodes)
    cold_snapshot, cold_obs = Snapshot(revision=1), Observations(now=NOW)
    cold = orchestrate(d, cold_snapshot, cold_obs)
    slots = sum(len(s) for per in cold.assignments.values() for s in per.values())
    snapshot, obs = converged(d, cold)
    down_ids = {n.node_id for n in nodes[:: max(1, 100)]}  # 1 % of the nodes
    down_nodes = tuple(replace(n, up=False) if n.node_id in down_ids else n for n in nodes)
    d_down = replace(d, nodes=down_nodes)
    live = Observations(now=obs.now, slots=[r for r in obs.slots if r.node not in down_ids])

    rows = []
    for case, dd, snap, ob in (
        ("cold snapshot (nothing assigned)", d, cold_snapshot, cold_obs),
        ("converged", d, snapshot, obs),
        ("converged, 1 % of nodes down", d_down, snapshot, live),
    ):
        whole, whole_cpu, intent = timed(lambda dd=dd, snap=snap, ob=ob: orchestrate(dd, snap, ob), args.runs)
        _, sched, _ = timed(
            lambda dd=dd, snap=snap: scheduler.assign(dd.state, dd.nodes, snap.assignments, dd.refused), args.runs
        )
        assert isinstance(intent, Intent)
        moved = sum(len(v) for v in intent.tasks.put.values())
        rows.append(
            [
                case,
                str(len(dd.nodes)),
                str(slots),
                stats(whole),
                stats(whole_cpu),
                stats(sched),
                f"{len(intent.assignments_changed)} services, {moved} task records, {len(intent.pending)} pending",
            ]
        )
    print(machine())
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    print_table(
        ["case", "nodes", "slots", "orchestrate wall ms", "orchestrate CPU ms", "scheduler CPU ms", "intent written"],
        rows,
    )


if __name__ == "__main__":
    main()
