"""No-op pass benchmark: a converged node with S services, one more pass that must change nothing.

For each S (services of 1 or 2 replicas, alternating, in one stack) a `dabctl agent` (git polling and periodic
resync off) converges the stack through a recording DockerProxy; then each run times one pass inside the running
agent, from the trigger (POST /api/reconcile on the control socket, what `dabctl reconcile --once` sends to a
running agent; the agent answers after the pass) to the end of the pass, and records the Docker API calls by
endpoint (proxy), the agent's CPU time (/proc/PID/stat) and its peak RSS (VmHWM). The agent's own histogram
dabctl_reconcile_duration_seconds (pass only, without the HTTP round trip) is shown too, and so is the engine's
floor: the same container list (all containers of the stack, label-filtered) timed from the bench process right
after each pass.

Peer: re-running `docker-compose up -d` (Debian's 1.29) on the equivalent Compose project (same services, `scale`,
same image) against the same engine through its own recording proxy; the clock runs from launch to exit (the end
state, everything running, holds throughout). CLI start-up (`dabctl --help`, `docker-compose version`) is timed
apart. Runs are interleaved.

    sudo .venv/bin/python bench/noop.py [--services 10,100,300] [--runs 5] [--quick] [--baseline DIR]

With `--baseline DIR` (another commit's tree: `git archive <commit> | tar -x -C DIR`) the peer is that tree's
agent instead: two agents, each on its own stack of S services and behind its own recording proxy, their passes
interleaved one by one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DABCTL,
    IMAGE,
    Agent,
    dab,
    log,
    machine,
    median,
    netns_engine,
    print_table,
    remove_by_label,
    running,
    stats,
    wait_until,
)

from tests.support.dockerproxy import DockerProxy


def compose_file(s: int) -> str:
    lines = ['version: "2.4"', "services:"]
    for i in range(s):
        lines += [f"  s{i}:", f"    image: {IMAGE}", f"    scale: {1 + i % 2}", "    stop_grace_period: 1s"]
    return "\n".join(lines) + "\n"


def replicas(s: int) -> int:
    return sum(1 + i % 2 for i in range(s))


def cli_startup(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def calls_summary(counter: Counter[str]) -> str:
    return ", ".join(f"{n}x {ep}" for ep, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


class Side:
    """One contender of a --baseline run: an agent of one tree on its own stack, behind its own recording proxy."""

    def __init__(self, engine: Any, work: Path, stack: str, s: int, tree: Path | None) -> None:
        self.stack = stack
        self.proxy = DockerProxy(upstream=str(engine.socket_path)).start()
        src = work / stack / "stacks"
        src.mkdir(parents=True)
        services = {
            f"s{i}": {"Image": IMAGE, "StopGracePeriod": "1s", "Deploy": {"Replicas": 1 + i % 2}} for i in range(s)
        }
        (src / f"{stack}.dab").write_text(dab(services))
        args = ("--source", str(src), "--docker-host", self.proxy.url, "--poll-interval", "0", "--resync-interval", "0")
        self.agent = Agent(work / stack, *args, tree=tree)
        self.wall: list[float] = []
        self.inner: list[float] = []
        self.writes = 0
        self.calls = 0

    def one_pass(self) -> None:
        self.proxy.reset()
        h0 = self.agent.metric("dabctl_reconcile_duration_seconds_sum")
        t0 = time.perf_counter()
        doc = self.agent.post("/api/reconcile", json={}).json()
        self.wall.append(time.perf_counter() - t0)
        self.inner.append(self.agent.metric("dabctl_reconcile_duration_seconds_sum") - h0)
        if not doc.get("ok") or any(doc.get(k) for k in ("created", "updated", "removed")):
            raise RuntimeError(f"{self.stack}: not a no-op pass: {doc}")
        self.calls = len(self.proxy.calls)
        self.writes = sum(1 for c in self.proxy.calls if not c.endpoint.startswith(("GET", "HEAD")))

    def stop(self, api: Any) -> None:
        self.agent.stop()
        self.proxy.stop()
        remove_by_label(api, f"dabctl.stack={self.stack}")


def against_baseline(baseline: Path, counts: list[int], runs: int) -> None:
    """This tree's agent vs the baseline tree's, each converged on its own stack of S services; passes interleaved."""
    rows = []
    with netns_engine() as engine:
        api = engine.client
        for s in counts:
            work = Path(tempfile.mkdtemp(prefix=f"bench-noop{s}-"))
            sides: dict[str, Side] = {}
            try:
                for name, tree in (("dabctl", None), ("dabctl baseline", baseline)):
                    sides[name] = side = Side(engine, work, f"noop{s}" + ("b" if tree else ""), s, tree)
                    side.agent.start(timeout=600)
                    label, n = f"dabctl.stack={side.stack}", replicas(s)
                    wait_until(lambda label=label, n=n: len(running(api, label)) >= n, f"{label}: {n}", timeout=600)
                    side.agent.post("/api/reconcile", json={})  # settle: the pass after the first converge
                for i in range(runs):
                    for side in sides.values():
                        side.one_pass()
                    log(
                        f"S={s} run {i + 1}/{runs}: "
                        + ", ".join(f"{k} {v.wall[-1] * 1000:.1f} ms" for k, v in sides.items())
                    )
                base = sides["dabctl baseline"]
                for name, side in sides.items():
                    rows.append(
                        (
                            str(s),
                            name,
                            f"{median(side.wall) * 1000:.1f} ({min(side.wall) * 1000:.1f}-{max(side.wall) * 1000:.1f})",
                            f"{median(side.inner) * 1000:.1f}",
                            f"{side.calls} ({side.writes} writes)",
                            f"{median(side.wall) / median(base.wall):.2f}x",
                        )
                    )
            finally:
                for side in sides.values():
                    side.stop(api)
                shutil.rmtree(work, ignore_errors=True)
        print(f"machine: {machine(engine)}")
    print(f"{runs} interleaved passes per S and tree; ms as median (min-max); writes = API calls other than GET/HEAD")
    print()
    header = ("S", "contender", "pass ms (trigger->end)", "pass ms (histogram)", "API calls", "÷ baseline")
    print_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", default="10,100,300", help="comma-separated service counts S (10,100,300)")
    parser.add_argument("--runs", type=int, default=5, help="passes per contender and S; median reported (5)")
    parser.add_argument("--quick", action="store_true", help="3 runs")
    parser.add_argument(
        "--compose-max", type=int, default=10**6, help="run the docker-compose peer only for S up to this (all)"
    )
    parser.add_argument("--baseline", type=Path, help="compare with another commit's tree (no compose peer)")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    counts = [int(x) for x in args.services.split(",") if x.strip()]
    if args.baseline:
        against_baseline(args.baseline, counts, runs)
        return

    rows = []
    calls_rows = []
    with netns_engine() as engine:
        api = engine.client
        agent_proxy = DockerProxy(upstream=str(engine.socket_path)).start()
        compose_proxy = DockerProxy(upstream=str(engine.socket_path)).start()
        try:
            for s in counts:
                stack, project = f"noop{s}", f"cnoop{s}"
                work = Path(tempfile.mkdtemp(prefix=f"bench-{stack}-"))
                agent: Agent | None = None
                try:
                    src = work / "stacks"
                    src.mkdir()
                    services = {f"s{i}": {"Image": IMAGE, "Deploy": {"Replicas": 1 + i % 2}} for i in range(s)}
                    for svc in services.values():
                        svc["StopGracePeriod"] = "1s"
                    (src / f"{stack}.dab").write_text(dab(services))
                    (work / "docker-compose.yml").write_text(compose_file(s))
                    n = replicas(s)
                    label = f"dabctl.stack={stack}"
                    agent = Agent(
                        work,
                        "--source",
                        str(src),
                        "--docker-host",
                        agent_proxy.url,
                        "--poll-interval",
                        "0",
                        "--resync-interval",
                        "0",
                    )
                    agent.start(timeout=600)
                    wait_until(
                        lambda label=label, n=n: len(running(api, label)) >= n, f"{stack}: {n} running", timeout=600
                    )
                    agent.post("/api/reconcile", json={})  # settle: the pass after the first converge
                    cenv = {"DOCKER_HOST": compose_proxy.url, "PATH": "/usr/bin:/bin"}
                    compose = ["docker-compose", "-p", project, "-f", str(work / "docker-compose.yml"), "up", "-d"]
                    peer = s <= args.compose_max
                    if peer:
                        subprocess.run(compose, env=cenv, check=True, capture_output=True, timeout=900)
                    clabel = f"com.docker.compose.project={project}"
                    if peer:
                        wait_until(
                            lambda clabel=clabel, n=n: len(running(api, clabel)) >= n,
                            f"{project}: {n} running",
                            timeout=600,
                        )
                    wall, inner, cpu, dcalls, ccalls, cwall = [], [], [], Counter(), Counter(), []
                    floor = []
                    for i in range(runs):
                        agent_proxy.reset()
                        c0, h0 = agent.cpu_seconds(), agent.metric("dabctl_reconcile_duration_seconds_sum")
                        t0 = time.perf_counter()
                        doc = agent.post("/api/reconcile", json={}).json()
                        t1 = time.perf_counter()
                        c1, h1 = agent.cpu_seconds(), agent.metric("dabctl_reconcile_duration_seconds_sum")
                        if not doc.get("ok") or any(doc.get(k) for k in ("created", "updated", "removed")):
                            raise RuntimeError(f"not a no-op pass: {doc}")
                        calls = Counter(c.endpoint for c in agent_proxy.calls)
                        wall.append(t1 - t0)
                        inner.append(h1 - h0)
                        cpu.append(c1 - c0)
                        dcalls = calls
                        t0 = time.perf_counter()
                        api.containers(all=True, filters={"label": [label, "dabctl.slot"]})
                        floor.append(time.perf_counter() - t0)
                        if peer:
                            compose_proxy.reset()
                            t0 = time.perf_counter()
                            subprocess.run(compose, env=cenv, check=True, capture_output=True, timeout=900)
                            cwall.append(time.perf_counter() - t0)
                            ccalls = Counter(c.endpoint for c in compose_proxy.calls)
                        log(f"S={s} run {i + 1}/{runs}: dabctl {wall[-1] * 1000:.1f} ms, compose {cwall[-1:]} s")
                    if len(running(api, label)) != n:
                        raise RuntimeError(f"{stack}: fewer than {n} running after the passes")
                    hwm, rss = agent.mem_kb("VmHWM"), agent.mem_kb("VmRSS")
                    dwrites = sum(v for k, v in dcalls.items() if not k.startswith(("GET", "HEAD")))
                    cwrites = sum(v for k, v in ccalls.items() if not k.startswith(("GET", "HEAD")))
                    rows.append(
                        (
                            str(s),
                            str(n),
                            f"{median(wall) * 1000:.1f} ({min(wall) * 1000:.1f}-{max(wall) * 1000:.1f})",
                            f"{median(inner) * 1000:.1f}",
                            f"{median(floor) * 1000:.1f}",
                            f"{median(cpu) * 1000:.0f}",
                            f"{sum(dcalls.values())} ({dwrites} writes)",
                            f"{hwm / 1024:.1f} / {rss / 1024:.1f}",
                            f"{median(cwall) * 1000:.0f} ({min(cwall) * 1000:.0f}-{max(cwall) * 1000:.0f})"
                            if peer
                            else "not run (--compose-max)",
                            f"{sum(ccalls.values())} ({cwrites} writes)" if peer else "-",
                            f"{median(wall) / median(cwall):.3f}x" if peer else "no peer",
                        )
                    )
                    log(" | ".join(rows[-1]))
                    calls_rows.append((str(s), "dabctl", calls_summary(dcalls)))
                    if peer:
                        calls_rows.append((str(s), "docker-compose", calls_summary(ccalls)))
                finally:
                    if agent is not None:
                        agent.stop()
                    remove_by_label(api, f"dabctl.stack={stack}")
                    remove_by_label(api, f"com.docker.compose.project={project}")
                    shutil.rmtree(work, ignore_errors=True)
        finally:
            agent_proxy.stop()
            compose_proxy.stop()
        print(f"machine: {machine(engine)}")
    dab_cli = cli_startup([DABCTL, "--help"], 5)
    # The peer's CLI is timed only where it is installed (Debian's docker-compose; `--compose-max 0` needs none).
    dc_cli = cli_startup(["docker-compose", "version"], 5) if shutil.which("docker-compose") else []
    print(f"{runs} interleaved runs per S; ms as median (min-max); writes = API calls other than GET/HEAD")
    print()
    print_table(
        (
            "S",
            "replicas",
            "dabctl pass ms (trigger->end)",
            "pass ms (histogram)",
            "engine list ms",
            "agent CPU ms",
            "dabctl API calls",
            "agent peak / now RSS MiB",
            "compose up -d ms",
            "compose API calls",
            "dabctl/compose",
        ),
        rows,
    )
    print()
    print_table(("S", "contender", "Docker API calls in one no-op pass, by endpoint"), calls_rows)
    print()
    startup = [("dabctl --help", stats(dab_cli), f"{median(dab_cli) / median(dc_cli):.2f}x" if dc_cli else "-")]
    if dc_cli:
        startup.append(("docker-compose version", stats(dc_cli), "1.00x"))
    print_table(("CLI start-up", "seconds", "ratio"), startup)


if __name__ == "__main__":
    main()
