"""Heal benchmark: kill k of 40 replicas, time until all 40 run again.

Four contenders on one dockerd in its own network namespace, all deployed side by side and killed one at a time,
interleaved run by run:

- dabctl agent, service with RestartPolicy Delay 0s;
- dabctl agent, service with the default RestartPolicy (Delay 5s);
- Swarm (single-node, `docker swarm init` by this script), service with its default restart delay (5s);
- Swarm, service created with `--restart-delay 0s`.

Clock: starts just before the kills (docker-py `kill`, SIGKILL, k in parallel) and stops when the engine, polled
every 20 ms from outside, reports 40 running containers of the service again.

    sudo .venv/bin/python bench/heal.py [--kills 1,10] [--runs 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    IMAGE,
    Agent,
    dab,
    docker_cli,
    log,
    machine,
    netns_engine,
    print_table,
    ratio,
    remove_by_label,
    stats,
    swarm,
    wait_until,
)

N = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", default="1,10", help="comma-separated k (1,10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender and k; median reported (3)")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds after which a heal counts as missed (30)")
    parser.add_argument("--quick", action="store_true", help="same as the defaults (kept for symmetry)")
    args = parser.parse_args()
    ks = [int(x) for x in args.kills.split(",") if x.strip()]

    contenders = {
        "dabctl agent, restart delay 0s": "dabctl.service=d0",
        "dabctl agent, restart delay default (5s)": "dabctl.service=d5",
        "swarm, restart delay default (5s)": "com.docker.swarm.service.name=sw5",
        "swarm, --restart-delay 0s": "com.docker.swarm.service.name=sw0",
    }
    results: dict[tuple[int, str], list[float]] = {(k, c): [] for k in ks for c in contenders}
    rng = random.Random(1)
    work = Path(tempfile.mkdtemp(prefix="bench-heal-"))
    with netns_engine() as engine, swarm(engine):
        api = engine.client
        agent: Agent | None = None
        try:
            src = work / "stacks"
            src.mkdir()
            base = {"Image": IMAGE, "StopGracePeriod": "1s"}
            services = {
                "d0": {**base, "Deploy": {"Replicas": N, "RestartPolicy": {"Delay": "0s"}}},
                "d5": {**base, "Deploy": {"Replicas": N}},
            }
            (src / "heal.dab").write_text(dab(services))
            agent = Agent(work, "--source", str(src), "--docker-host", engine.url, "--poll-interval", "0")
            agent.start(timeout=300)
            for name, extra in (("sw5", []), ("sw0", ["--restart-delay", "0s"])):
                argv = docker_cli(engine, "service", "create", "--detach", "--quiet", "--no-resolve-image")
                argv += ["--name", name, "--replicas", str(N), "--stop-grace-period", "1s", *extra, IMAGE]
                subprocess.run(argv, check=True, capture_output=True)

            def live(label: str) -> list[str]:
                filt = ["dabctl.stack=heal", label] if label.startswith("dabctl") else [label]
                return [c["Id"] for c in api.containers(filters={"label": filt, "status": "running"})]

            for label in contenders.values():
                wait_until(lambda label=label: len(live(label)) >= N, f"{label}: {N} running", timeout=300)
            with ThreadPoolExecutor(16) as pool:
                for i in range(args.runs):
                    for k in ks:
                        for name, label in contenders.items():
                            wait_until(lambda label=label: len(live(label)) >= N, f"{label} settled", timeout=120)
                            time.sleep(0.5)
                            victims = rng.sample(live(label), k)
                            t0 = time.perf_counter()
                            list(pool.map(api.kill, victims))
                            try:
                                t1 = wait_until(
                                    lambda label=label: len(live(label)) >= N, f"{name}: healed", timeout=args.limit
                                )
                                results[(k, name)].append(t1 - t0)
                            except RuntimeError:
                                # Not healed within the limit: recorded as such, then restored by an explicit pass.
                                results[(k, name)].append(float("inf"))
                                agent.post("/api/reconcile", json={})
                            log(f"run {i + 1}/{args.runs} k={k} {name}: {results[(k, name)][-1]:.3f}s")
        finally:
            if agent is not None:
                agent.stop()
            remove_by_label(api, "dabctl.stack=heal")
            shutil.rmtree(work, ignore_errors=True)
        print(f"machine: {machine(engine)}")
    print(f"{N} replicas per service; {args.runs} interleaved runs; seconds from kill to {N} running, median (min-max)")
    print()
    rows = []
    for k in ks:
        base_sw = results[(k, "swarm, restart delay default (5s)")]
        base_sw0 = results[(k, "swarm, --restart-delay 0s")]
        for name in contenders:
            xs = results[(k, name)]
            missed = sum(x == float("inf") for x in xs)
            if missed:
                cell = f"not healed within {args.limit:.0f}s in {missed}/{len(xs)} runs"
                if missed < len(xs):
                    cell += f"; others {stats([x for x in xs if x != float('inf')])}"
                rows.append((str(k), name, cell, "-", "-"))
                continue
            rows.append((str(k), name, stats(xs), ratio(xs, base_sw0), ratio(xs, base_sw)))
    print_table(("k killed", "contender", "seconds", "÷ swarm delay 0s", "÷ swarm default"), rows)


if __name__ == "__main__":
    main()
