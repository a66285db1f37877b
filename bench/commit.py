"""Commit-to-converged benchmark: a git commit changes the image of a 10-replica service.

Two `dabctl agent`s run side by side on one dockerd in its own network namespace, each following its own repository
served over smart HTTP on loopback (dulwich, tests/support/gitserver.py), each with its own stack:

- webhook: `--poll-interval 0`; after the commit the script sends the signed GitHub-style push webhook
  (X-Hub-Signature-256, secret via DABCTL_WEBHOOK_SECRET_ENV);
- polling: `--poll-interval P` (default 1 s here; the agent's default is 60 s, whose expected detection is P/2).

Each run commits `dabctl/sample:1` <-> `dabctl/sample:bench2` (the same image under another reference) for the
service `web` (10 replicas, UpdateConfig Parallelism 0 = all at once, Monitor 0s). Clock: starts before the commit;
detection ends when the agent's /status reports the new commit as its source revision; execution ends when the
engine, polled from outside every 20 ms, reports 10 running containers of the new image and none of the old.
No peer: Swarm and docker-compose do not follow a git repository (a table with no peer says so).

    sudo .venv/bin/python bench/commit.py [--runs 3] [--poll-interval 1]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import shutil
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
    log,
    machine,
    netns_engine,
    print_table,
    remove_by_label,
    running,
    stats,
    wait_until,
)

from tests.support.gitserver import GitServer, commit

N = 10
SECRET = "bench-secret"


def bundle(image: str) -> str:
    deploy = {"Replicas": N, "UpdateConfig": {"Parallelism": 0, "Monitor": "0s"}}
    return dab({"web": {"Image": image, "StopGracePeriod": "1s", "Deploy": deploy}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="commits per mode; median reported (3)")
    parser.add_argument("--poll-interval", default="1", help="the polling agent's --poll-interval seconds (1)")
    parser.add_argument("--quick", action="store_true", help="same as the defaults (kept for symmetry)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-commit-"))
    modes = {"webhook": "cwh", "polling": "cpl"}
    res: dict[str, dict[str, list[float]]] = {m: {"detect": [], "exec": [], "total": []} for m in modes}
    with netns_engine() as engine:
        api = engine.client
        agents: dict[str, Agent] = {}
        servers: dict[str, GitServer] = {}
        try:
            for mode, stack in modes.items():
                repo = work / f"repo-{stack}"
                commit(repo, {f"stacks/{stack}.dab": bundle(IMAGE)}, "first")
                servers[mode] = GitServer(repo).start()
                poll = "0" if mode == "webhook" else args.poll_interval
                agents[mode] = Agent(
                    work,
                    *("--source", servers[mode].url, "--ref", "main", "--path", "stacks"),
                    *("--poll-interval", poll, "--resync-interval", "0", "--docker-host", engine.url),
                    env={"DABCTL_WEBHOOK_SECRET_ENV": "HOOK", "HOOK": SECRET},
                ).start(timeout=300)
                label = f"dabctl.stack={stack}"
                wait_until(lambda label=label: len(running(api, label)) >= N, f"{stack} up", timeout=300)
            image = IMAGE
            for i in range(args.runs):
                old, image = image, (IMAGE2 if image == IMAGE else IMAGE)
                for mode, stack in modes.items():
                    agent, label = agents[mode], f"dabctl.stack={stack}"
                    time.sleep(0.5)
                    t0 = time.perf_counter()
                    sha = commit(work / f"repo-{stack}", {f"stacks/{stack}.dab": bundle(image)}, f"run {i}")
                    if mode == "webhook":
                        body = b'{"ref": "refs/heads/main"}'
                        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                        headers = {"X-Hub-Signature-256": sig, "Content-Type": "application/json"}
                        reply = agent.post("/webhook", data=body, headers=headers)
                        if reply.status_code != 202:
                            raise RuntimeError(f"webhook answered {reply.status_code}: {reply.text}")
                    t1 = wait_until(
                        lambda agent=agent, sha=sha: sha in str((agent.status().get("source") or {}).get("revision")),
                        f"{mode}: revision {sha}",
                        timeout=120,
                    )

                    def done(label: str = label, new: str = image, old: str = old) -> bool:
                        cs = running(api, label)
                        return sum(c["Image"] == new for c in cs) >= N and not any(c["Image"] == old for c in cs)

                    t2 = wait_until(done, f"{mode}: {N} running {image}", timeout=300)
                    res[mode]["detect"].append(t1 - t0)
                    res[mode]["exec"].append(t2 - t1)
                    res[mode]["total"].append(t2 - t0)
                    log(f"run {i + 1}/{args.runs} {mode}: detect {t1 - t0:.3f}s, execute {t2 - t1:.3f}s")
        finally:
            for agent in agents.values():
                agent.stop()
            for server in servers.values():
                server.stop()
            for stack in modes.values():
                remove_by_label(api, f"dabctl.stack={stack}")
            shutil.rmtree(work, ignore_errors=True)
        print(f"machine: {machine(engine)}")
    print(f"{N} replicas, image reference change, UpdateConfig Parallelism 0 / Monitor 0s; {args.runs} interleaved")
    print(f"runs; polling agent --poll-interval {args.poll_interval}; seconds, median (min-max).")
    print("No peer: Swarm and docker-compose have no git source; this table has dabctl only.")
    print()
    rows = []
    for mode in modes:
        r = res[mode]
        rows.append((mode, stats(r["detect"]), stats(r["exec"]), stats(r["total"])))
    print_table(("trigger", "detection (commit -> revision seen)", "execution (-> all new running)", "total"), rows)


if __name__ == "__main__":
    main()
