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

With several `--parallelism` values (e.g. 8,32) dabctl and raw run at each; the order of the contenders is
shuffled in every round, so that none always runs first after the previous round's clean-up.

    sudo .venv/bin/python bench/converge.py [--replicas 10,40,100] [--runs 3] [--parallelism 8[,32]] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker
import docker.errors
from common import (
    IMAGE,
    TIMEOUT,
    dabctl_cmd,
    docker_cli,
    log,
    machine,
    median,
    netns_engine,
    print_table,
    ratio,
    remove_by_label,
    remove_service,
    stats,
    swarm,
    wait_until,
)

POLL_INTERVAL = 0.02
URL = ""  # the netns engine's unix:// URL, set in main()


def client(pool: int = 10) -> docker.APIClient:
    return docker.APIClient(base_url=URL, version="1.41", timeout=120, max_pool_size=pool)


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
    """Remove every container and network of the run (labelled dabctl.stack=prefix)."""
    remove_by_label(api, f"dabctl.stack={prefix}")


def run_dabctl(api: docker.APIClient, n: int, parallelism: int, tree: Path | None = None) -> tuple[float, float]:
    """One cold converge by the CLI (of this tree, or of the `--baseline` tree); returns (seconds to N running,
    seconds to CLI exit)."""
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
    argv = [
        *dabctl_cmd(tree),
        "reconcile",
        "--once",
        "--source",
        str(source),
        "--state-dir",
        str(state),
        "--docker-host",
        URL,
    ]
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


def run_swarm(engine: object, api: docker.APIClient, n: int) -> float:
    """`docker service create --replicas N --no-resolve-image --detach`; returns seconds to N running tasks."""
    name = f"bench-{secrets.token_hex(4)}"
    label = f"com.docker.swarm.service.name={name}"
    argv = docker_cli(engine, "service", "create", "--detach", "--no-resolve-image", "--quiet")  # type: ignore[arg-type]
    argv += ["--name", name, "--replicas", str(n), "--stop-grace-period", "1s", IMAGE]
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def check() -> None:
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"docker service create failed: {proc.stderr.read()!r}")  # type: ignore[union-attr]

        t1 = wait_until(
            lambda: len(api.containers(filters={"label": label, "status": "running"})) >= n,
            f"swarm {n} running",
            check=check,
        )
        proc.wait()
        return t1 - t0
    finally:
        remove_service(api, name)


def report(
    results: dict[int, dict[str, list[float]]],
    pools: list[int],
    tag: Callable[[str, int], str],
    *,
    baseline: bool,
    peers: bool,
) -> None:
    rows = []
    for n, res in results.items():
        for name, xs in res.items():
            row = [str(n), name, stats(xs)]
            if baseline:
                base = name.replace("dabctl", "dabctl baseline", 1) if "baseline" not in name else name
                row.append(ratio(xs, res[base]) if name.startswith("dabctl") else "-")
            if peers:
                row += [ratio(xs, res[tag("raw", pools[0])]), ratio(xs, res["swarm"])]
            rows.append(tuple(row))
    several = len(pools) > 1
    raw_col = f"÷ raw p={pools[0]}" if several else "÷ raw"
    if baseline:  # runs are interleaved in pairs: the median of each round's ratio is robust to load drift
        for n, res in results.items():
            for p in pools:
                pairs = [a / b for a, b in zip(res[tag("dabctl", p)], res[tag("dabctl baseline", p)], strict=True)]
                print(f"N={n} p={p}: median of the per-round ratios this/baseline {median(pairs):.2f}x")
        print()
    header = ["N", "contender", "seconds"] + (["÷ baseline"] if baseline else [])
    header += [] if not peers else [raw_col, "÷ swarm"]
    print_table(header, rows)


def main() -> None:
    global URL
    parser = argparse.ArgumentParser(
        description=(
            "Cold converge of N replicas of one service: dabctl reconcile --once vs docker service create "
            "(single-node Swarm) vs raw docker-py creates+starts, interleaved run by run, on one dockerd in its own "
            "network namespace. Clock: launch -> the engine, polled every 20 ms, reports N running."
        )
    )
    parser.add_argument("--replicas", default="10,40,100", help="comma-separated replica counts N (10,40,100)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender and N; median reported (3)")
    parser.add_argument(
        "--parallelism", default="8", help="engine calls in flight, dabctl and raw; comma-separated for several (8)"
    )
    parser.add_argument("--quick", action="store_true", help="N = 10,40 only")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another commit's tree (git archive <commit> | tar -x -C DIR): its dabctl runs as one more contender, "
        "interleaved with this tree's",
    )
    parser.add_argument("--no-peers", action="store_true", help="dabctl only (with --baseline: this vs baseline)")
    args = parser.parse_args()
    counts = [int(x) for x in ("10,40" if args.quick else args.replicas).split(",") if x.strip()]
    pools = [int(x) for x in args.parallelism.split(",") if x.strip()]
    several = len(pools) > 1

    def tag(name: str, p: int) -> str:
        return f"{name} p={p}" if several else name

    rng = random.Random(1)
    with netns_engine() as engine, swarm(engine):
        URL = engine.url
        api = client()
        raw_api = client(max(pools) + 2)
        results: dict[int, dict[str, list[float]]] = {}
        for n in counts:
            res = results[n] = {}
            for p in pools:
                res.update({tag("dabctl", p): [], tag("dabctl (CLI exit)", p): []})
                if args.baseline:
                    res.update({tag("dabctl baseline", p): [], tag("dabctl baseline (CLI exit)", p): []})
                if not args.no_peers:
                    res[tag("raw", p)] = []
            if not args.no_peers:
                res["swarm"] = []
            for i in range(args.runs):
                order = [("dabctl", p) for p in pools]
                order += [("dabctl baseline", p) for p in pools] if args.baseline else []
                order += [] if args.no_peers else [("raw", p) for p in pools] + [("swarm", 0)]
                rng.shuffle(order)
                for kind, p in order:
                    if kind.startswith("dabctl"):
                        conv, exit_s = run_dabctl(api, n, p, args.baseline if kind == "dabctl baseline" else None)
                        res[tag(kind, p)].append(conv)
                        res[tag(f"{kind} (CLI exit)", p)].append(exit_s)
                    elif kind == "raw":
                        res[tag("raw", p)].append(run_raw(raw_api, api, n, p))
                    else:
                        res["swarm"].append(run_swarm(engine, api, n))
                log(f"N={n} run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in res.items()))
        print(f"machine: {machine(engine)}")
    print(f"parallelism {args.parallelism} (dabctl and raw), image {IMAGE}, {args.runs} interleaved runs, ")
    print("clock: launch -> engine reports N running; seconds as median (min-max)")
    print()
    report(results, pools, tag, baseline=args.baseline is not None, peers=not args.no_peers)


if __name__ == "__main__":
    main()
