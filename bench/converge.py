"""Cold-converge benchmark: dabctl against the engine's own limit.

For each replica count N this measures how long it takes from nothing to N running replicas of one service
(`web` on `dabctl/sample:1`) on the local Docker engine, with two contenders interleaved run by run:

- dabctl: `dabctl reconcile --once --source DIR --state-dir S` on a fresh bundle and a fresh state directory.
  The CLI process's own exit time is recorded too.
- raw: docker-py's APIClient with the same pool size: create one labelled bridge network, then N x
  (create_container on that network with an alias + start) from a ThreadPoolExecutor — what the engine allows.

Timing rule: the clock starts before the command is launched and stops when the engine, polled from outside,
reports the end state (N containers with the run's `dabctl.stack` label in status `running`, polled every 20 ms).

Every object a run creates is named with a `bench-<random>` prefix and removed (containers force-removed, networks
removed) before the next run starts, also when the run fails.

    .venv/bin/python bench/converge.py [--replicas 10,40] [--runs 3] [--parallelism 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors

IMAGE = "dabctl/sample:1"
SOCKET = "unix:///var/run/docker.sock"
DABCTL = str(Path(sys.executable).parent / "dabctl")
POLL_INTERVAL = 0.02
TIMEOUT = 300.0


def client(pool: int = 10) -> docker.APIClient:
    return docker.APIClient(base_url=SOCKET, timeout=120, max_pool_size=pool)


def running(api: docker.APIClient, stack: str) -> int:
    return len(api.containers(filters={"label": f"dabctl.stack={stack}", "status": "running"}))


def wait_running(api: docker.APIClient, stack: str, n: int, failed: Callable[[], str | None]) -> float:
    """Poll until the engine reports n running containers of the stack; return perf_counter() at that moment."""
    deadline = time.perf_counter() + TIMEOUT
    while True:
        if running(api, stack) >= n:
            return time.perf_counter()
        problem = failed()
        if problem:
            raise RuntimeError(problem)
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{stack}: {n} running not reached within {TIMEOUT:.0f}s")
        time.sleep(POLL_INTERVAL)


def cleanup(api: docker.APIClient, prefix: str) -> None:
    """Force-remove every container and remove every network whose name starts with prefix."""
    for c in api.containers(all=True):
        if any(name.lstrip("/").startswith(prefix) for name in c["Names"]):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(c["Id"], force=True, v=True)
    for net in api.networks():
        if net["Name"].startswith(prefix):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_network(net["Id"])


def run_dabctl(api: docker.APIClient, n: int, parallelism: int) -> tuple[float, float]:
    """One cold converge by the CLI; returns (seconds to N running, seconds to CLI exit)."""
    stack = f"bench-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix=f"{stack}-"))
    source, state = work / "stacks", work / "state"
    source.mkdir()
    bundle = {
        "Version": "0.1",
        "Services": {"web": {"Image": IMAGE, "Deploy": {"Replicas": n}, "StopGracePeriod": "1s"}},
    }
    (source / f"{stack}.dab").write_text(json.dumps(bundle, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
    argv = [DABCTL, "reconcile", "--once", "--source", str(source), "--state-dir", str(state)]
    argv += ["--parallelism", str(parallelism)]
    proc: subprocess.Popen[bytes] | None = None
    exited: list[float] = []
    try:
        with open(work / "out.log", "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            waiter = threading.Thread(target=lambda p=proc: (p.wait(), exited.append(time.perf_counter())))
            waiter.start()

            def failed() -> str | None:
                if exited and proc is not None and proc.returncode != 0:
                    return f"dabctl exited {proc.returncode}: {(work / 'out.log').read_text()[-2000:]}"
                return None

            t_running = wait_running(api, stack, n, failed)
            waiter.join(TIMEOUT)
            if not exited:
                raise RuntimeError(f"dabctl did not exit within {TIMEOUT:.0f}s")
            if proc.returncode != 0:
                raise RuntimeError(f"dabctl exited {proc.returncode}: {(work / 'out.log').read_text()[-2000:]}")
        return t_running - t0, exited[0] - t0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup(api, stack)
        shutil.rmtree(work, ignore_errors=True)


def run_raw(api: docker.APIClient, poller: docker.APIClient, n: int, parallelism: int) -> float:
    """N creates + starts straight through docker-py; returns seconds to N running."""
    stack = f"bench-{secrets.token_hex(4)}"
    network = f"{stack}_default"
    labels = {"dabctl.stack": stack, "dabctl.service": "web", "bench": "raw"}

    def replica(slot: int) -> None:
        name = f"{stack}_web.{slot}"
        cid = api.create_container(
            image=IMAGE,
            name=name,
            labels={**labels, "dabctl.slot": str(slot)},
            stop_timeout=1,
            host_config=api.create_host_config(restart_policy={"Name": "no"}),
            networking_config=api.create_networking_config(
                {network: api.create_endpoint_config(aliases=[name])}  # type: ignore[arg-type]
            ),
        )["Id"]
        api.start(cid)

    try:
        with ThreadPoolExecutor(parallelism) as pool:
            t0 = time.perf_counter()
            api.create_network(network, driver="bridge", labels=labels, check_duplicate=True)
            futures: list[Future[None]] = [pool.submit(replica, slot) for slot in range(1, n + 1)]

            all_done: list[float] = []

            def failed() -> str | None:
                for f in futures:
                    if f.done() and f.exception() is not None:
                        return f"raw create/start failed: {f.exception()}"
                if not all_done and all(f.done() for f in futures):
                    all_done.append(time.perf_counter())
                if all_done and time.perf_counter() - all_done[0] > 10:
                    return f"all {n} starts returned 10s ago but fewer than {n} running"
                return None

            t_running = wait_running(poller, stack, n, failed)
            for f in futures:
                f.result()
        return t_running - t0
    finally:
        cleanup(poller, stack)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(
            "Measure a cold converge of N replicas of one service: dabctl reconcile --once against raw docker-py "
            "creates+starts (the engine's limit), interleaved run by run. The clock starts before the command is "
            "launched and stops when the engine, polled from outside every 20 ms, reports N running."
        )
    )
    parser.add_argument("--replicas", default="10,40", help="comma-separated replica counts N (default: 10,40)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender and N; median reported (default: 3)")
    parser.add_argument("--parallelism", type=int, default=8, help="engine calls in flight, both contenders (8)")
    args = parser.parse_args()
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]

    api = client()
    raw_api = client(args.parallelism + 2)
    api.inspect_image(IMAGE)
    server = api.version()

    results: dict[int, dict[str, list[float]]] = {}
    for n in counts:
        res = results[n] = {"dabctl": [], "dabctl (CLI exit)": [], "raw": []}
        for i in range(args.runs):
            conv, exit_s = run_dabctl(api, n, args.parallelism)
            res["dabctl"].append(conv)
            res["dabctl (CLI exit)"].append(exit_s)
            res["raw"].append(run_raw(raw_api, api, n, args.parallelism))
            print(
                f"# N={n} run {i + 1}/{args.runs}: dabctl {conv:.3f}s (exit {exit_s:.3f}s), raw {res['raw'][-1]:.3f}s",
                file=sys.stderr,
            )

    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Docker server {server.get('Version')}")
    print(f"parallelism {args.parallelism}, image {IMAGE}, clock: launch -> engine reports N running")
    header = ("N", "contender", "median s", "min s", "max s", "runs", "dabctl/raw")
    rows = [header]
    for n, res in results.items():
        raw_median = statistics.median(res["raw"])
        for name, xs in res.items():
            med = statistics.median(xs)
            ratio = f"{med / raw_median:.2f}" if name != "raw" else ""
            rows.append((str(n), name, f"{med:.3f}", f"{min(xs):.3f}", f"{max(xs):.3f}", str(len(xs)), ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    main()
