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

    sudo .venv/bin/python bench/rollout.py [--parallelism 1,5] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallelism", default="1,5", help="comma-separated update parallelism (1,5)")
    parser.add_argument("--runs", type=int, default=3, help="updates per contender and P; median reported (3)")
    parser.add_argument("--quick", action="store_true", help="same as the defaults (kept for symmetry)")
    args = parser.parse_args()
    ps = [int(x) for x in args.parallelism.split(",") if x.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    res: dict[tuple[int, str], list[float]] = {(p, c): [] for p in ps for c in ("dabctl", "swarm")}
    with netns_engine() as engine, swarm(engine):
        api = engine.client
        agents: list[Agent] = []
        try:
            for p in ps:
                stack, svc = f"roll{p}", f"swroll{p}"
                src = work / stack / "stacks"
                src.mkdir(parents=True)
                upd = {"Parallelism": p, "Monitor": "1s", "Delay": "0s", "Order": "stop-first"}

                def write(image: str, src: Path = src, stack: str = stack, upd: dict[str, object] = upd) -> None:
                    spec = {"Image": image, "StopGracePeriod": "1s", "Deploy": {"Replicas": N, "UpdateConfig": upd}}
                    (src / f"{stack}.dab").write_text(dab({"web": spec}))

                write(IMAGE)
                agent = Agent(work / stack, "--source", str(src), "--docker-host", engine.url, *QUIET)
                agents.append(agent.start(timeout=300))
                swopts = ["--update-parallelism", str(p), "--update-monitor", "1s", "--update-delay", "0s"]
                swopts += ["--update-order", "stop-first"]
                argv = docker_cli(engine, "service", "create", "--detach", "--quiet", "--no-resolve-image")
                argv += ["--name", svc, "--replicas", str(N), "--stop-grace-period", "1s", *swopts, IMAGE]
                subprocess.run(argv, check=True, capture_output=True)
                dlabel, slabel = f"dabctl.stack={stack}", f"com.docker.swarm.service.name={svc}"
                for label in (dlabel, slabel):
                    wait_until(lambda label=label: len(running(api, label)) >= N, f"{label} up", timeout=300)
                image = IMAGE
                for i in range(args.runs):
                    image = IMAGE2 if image == IMAGE else IMAGE

                    def done(label: str, before: set[str]) -> bool:
                        # New = a container that did not run before the trigger (dabctl names replicas by image ID
                        # after resolving the reference, so the listed Image is not a usable criterion).
                        ids = {c["Id"] for c in running(api, label)}
                        return len(ids - before) >= N and not ids & before

                    time.sleep(0.5)
                    dbefore = {c["Id"] for c in running(api, dlabel)}
                    t0 = time.perf_counter()
                    write(image)
                    agent.post("/api/reconcile", json={})
                    t1 = wait_until(lambda dlabel=dlabel, b=dbefore: done(dlabel, b), f"dabctl P={p}", timeout=600)
                    res[(p, "dabctl")].append(dabctl_s := t1 - t0)
                    time.sleep(0.5)
                    argv = docker_cli(engine, "service", "update", "--detach", "--quiet", "--no-resolve-image")
                    argv += ["--image", image, *swopts, svc]
                    sbefore = {c["Id"] for c in running(api, slabel)}
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    t2 = wait_until(lambda slabel=slabel, b=sbefore: done(slabel, b), f"swarm P={p}", timeout=600)
                    proc.wait(timeout=60)
                    res[(p, "swarm")].append(t2 - t0)
                    log(f"P={p} run {i + 1}/{args.runs}: dabctl {dabctl_s:.3f}s, swarm {t2 - t0:.3f}s")
                agents.pop().stop()
                remove_service(api, svc)
                remove_by_label(api, dlabel)
        finally:
            for agent in agents:
                agent.stop()
            for p in ps:
                remove_by_label(api, f"dabctl.stack=roll{p}")
                remove_service(api, f"swroll{p}")
            shutil.rmtree(work, ignore_errors=True)
        print(f"machine: {machine(engine)}")
    print(f"{N} replicas, stop-first, Monitor 1s, Delay 0s, no healthcheck; {args.runs} interleaved runs;")
    print("seconds from launch to all new running and none old, median (min-max)")
    print()
    rows = []
    for p in ps:
        for c in ("dabctl", "swarm"):
            rows.append((str(p), c, stats(res[(p, c)]), ratio(res[(p, c)], res[(p, "swarm")])))
    print_table(("parallelism", "contender", "seconds", "÷ swarm"), rows)


if __name__ == "__main__":
    main()
