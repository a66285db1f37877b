"""Rolling-update benchmark: 20 replicas move to another image reference, at parallelism 1 and 5.

Contenders on one dockerd in its own network namespace (Swarm initialised by this script), interleaved run by run,
each run flipping `dabctl/sample:1` <-> `dabctl/sample:bench2` (same image, another reference):

- dabctl: a running `dabctl agent` on a directory source (polling and resync off); bundle with UpdateConfig
  Parallelism P, Monitor 1s, Delay 0s, stop-first, no healthcheck; the timed trigger is the bundle file change
  followed by POST /api/reconcile on the control socket (what `dabctl reconcile --once` sends to a running agent);
- swarm: `docker service update --detach --no-resolve-image --image NEW --update-parallelism P --update-monitor 1s
  --update-delay 0s --update-order stop-first` on a service created with the same settings.

Clock: starts before the command is launched, stops when the engine, polled every 20 ms from outside, reports 20
running containers that did not run before the trigger, and none of those that did.

    sudo .venv/bin/python bench/rollout.py [--parallelism 1,5] [--runs 3] [--replicas 20] [--baseline DIR] [--no-swarm]

With `--baseline DIR` (another commit's tree: `git archive <commit> | tar -x -C DIR`) that tree's agent, on a
stack of its own, is one more contender, interleaved run by run with this tree's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    IMAGE,
    IMAGE2,
    Agent,
    dab,
    docker_cli,
    log,
    machine,
    netns_engine,
    print_table,
    ratio,
    remove_by_label,
    remove_service,
    running,
    stats,
    swarm,
    wait_until,
)

N = 20
QUIET = ("--poll-interval", "0", "--resync-interval", "0")


def done(api: Any, label: str, before: set[str], n: int) -> bool:
    # New = a container that did not run before the trigger (dabctl names replicas by image ID after resolving the
    # reference, so the listed Image is not a usable criterion).
    ids = {c["Id"] for c in running(api, label)}
    return len(ids - before) >= n and not ids & before


class DabctlContender:
    """One agent (of this tree or the baseline's) following its own stack directory."""

    def __init__(self, work: Path, stack: str, engine_url: str, tree: Path | None) -> None:
        self.stack = stack
        self.src = work / stack / "stacks"
        self.src.mkdir(parents=True)
        self.agent = Agent(work / stack, "--source", str(self.src), "--docker-host", engine_url, *QUIET, tree=tree)

    def write(self, image: str, n: int, upd: dict[str, object]) -> None:
        spec = {"Image": image, "StopGracePeriod": "1s", "Deploy": {"Replicas": n, "UpdateConfig": upd}}
        (self.src / f"{self.stack}.dab").write_text(dab({"web": spec}))

    def update(self, api: Any, image: str, n: int, upd: dict[str, object]) -> float:
        """Seconds from the file change + trigger to all new replicas running and none old."""
        label = f"dabctl.stack={self.stack}"
        before = {c["Id"] for c in running(api, label)}
        t0 = time.perf_counter()
        self.write(image, n, upd)
        self.agent.post("/api/reconcile", json={})
        return wait_until(lambda: done(api, label, before, n), f"{self.stack} updated", timeout=600) - t0


def swarm_update(engine: Any, api: Any, svc: str, image: str, *, swopts: list[str], n: int) -> float:
    argv = docker_cli(engine, "service", "update", "--detach", "--quiet", "--no-resolve-image")
    argv += ["--image", image, *swopts, svc]
    label = f"com.docker.swarm.service.name={svc}"
    before = {c["Id"] for c in running(api, label)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t1 = wait_until(lambda: done(api, label, before, n), f"swarm {svc}", timeout=600)
    proc.wait(timeout=60)
    return t1 - t0


def report(
    res: dict[tuple[int, str], list[float]], ps: list[int], contenders: list[str], *, baseline: bool, with_swarm: bool
) -> None:
    rows = []
    for p in ps:
        for c in contenders:
            row = [str(p), c, stats(res[(p, c)])]
            if baseline:
                row.append(ratio(res[(p, c)], res[(p, "dabctl baseline")]) if c.startswith("dabctl") else "-")
            if with_swarm:
                row.append(ratio(res[(p, c)], res[(p, "swarm")]))
            rows.append(tuple(row))
    header = ["parallelism", "contender", "seconds"] + ["÷ baseline"] * bool(baseline)
    print_table(header + ["÷ swarm"] * (with_swarm), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallelism", default="1,5", help="comma-separated update parallelism (1,5)")
    parser.add_argument("--runs", type=int, default=3, help="updates per contender and P; median reported (3)")
    parser.add_argument("--quick", action="store_true", help="same as the defaults (kept for symmetry)")
    parser.add_argument("--replicas", type=int, default=N, help=f"replicas of the service ({N})")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another commit's tree: its agent, on a stack of its own, is one more contender, interleaved",
    )
    parser.add_argument("--no-swarm", action="store_true", help="dabctl only (with --baseline: this vs baseline)")
    args = parser.parse_args()
    n = args.replicas
    ps = [int(x) for x in args.parallelism.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    trees: dict[str, Path | None] = {"dabctl": None, **({"dabctl baseline": args.baseline} if args.baseline else {})}
    contenders = [*trees, *([] if args.no_swarm else ["swarm"])]
    res: dict[tuple[int, str], list[float]] = {(p, c): [] for p in ps for c in contenders}
    with netns_engine() as engine, swarm(engine):
        api = engine.client
        agents: list[Agent] = []
        try:
            for p in ps:
                svc = f"swroll{p}"
                upd: dict[str, object] = {"Parallelism": p, "Monitor": "1s", "Delay": "0s", "Order": "stop-first"}
                mine = {
                    name: DabctlContender(work, f"roll{p}" + ("b" if tree else ""), engine.url, tree)
                    for name, tree in trees.items()
                }
                for c in mine.values():
                    c.write(IMAGE, n, upd)
                    agents.append(c.agent.start(timeout=300))
                swopts = ["--update-parallelism", str(p), "--update-monitor", "1s", "--update-delay", "0s"]
                swopts += ["--update-order", "stop-first"]
                labels = [f"dabctl.stack={c.stack}" for c in mine.values()]
                if not args.no_swarm:
                    argv = docker_cli(engine, "service", "create", "--detach", "--quiet", "--no-resolve-image")
                    argv += ["--name", svc, "--replicas", str(n), "--stop-grace-period", "1s", *swopts, IMAGE]
                    subprocess.run(argv, check=True, capture_output=True)
                    labels.append(f"com.docker.swarm.service.name={svc}")
                for label in labels:
                    wait_until(lambda label=label: len(running(api, label)) >= n, f"{label} up", timeout=300)
                image = IMAGE
                for i in range(args.runs):
                    image = IMAGE2 if image == IMAGE else IMAGE
                    for name, c in mine.items():
                        time.sleep(0.5)
                        res[(p, name)].append(c.update(api, image, n, upd))
                    if not args.no_swarm:
                        time.sleep(0.5)
                        res[(p, "swarm")].append(swarm_update(engine, api, svc, image, swopts=swopts, n=n))
                    log(
                        f"P={p} run {i + 1}/{args.runs}: "
                        + ", ".join(f"{c} {res[(p, c)][-1]:.3f}s" for c in contenders)
                    )
                while agents:
                    agents.pop().stop()
                remove_service(api, svc)
                for c in mine.values():
                    remove_by_label(api, f"dabctl.stack={c.stack}")
        finally:
            for agent in agents:
                agent.stop()
            for p in ps:
                remove_by_label(api, f"dabctl.stack=roll{p}")
                remove_by_label(api, f"dabctl.stack=roll{p}b")
                remove_service(api, f"swroll{p}")
            shutil.rmtree(work, ignore_errors=True)
        print(f"machine: {machine(engine)}")
    print(f"{n} replicas, stop-first, Monitor 1s, Delay 0s, no healthcheck; {args.runs} interleaved runs;")
    print("seconds from launch to all new running and none old, median (min-max)")
    print()
    report(res, ps, contenders, baseline=bool(args.baseline), with_swarm=not args.no_swarm)


if __name__ == "__main__":
    main()
