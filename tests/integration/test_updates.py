"""Rolling updates gated on health, failure actions, --wait, restart backoff and rollback, on the real engine.

The test controls health: a replica is healthy once /tmp/healthy exists, and its command creates that file
only when told to (HEALTHY=1).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import IMAGE, Workspace
from tests.support.gitserver import GitServer, commit, force_push_reset, init_repo
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCRIPT = "if [ \"$HEALTHY\" = 1 ]; then touch /tmp/healthy; fi; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
HEALTHCHECK = {"Test": ["CMD", "test", "-f", "/tmp/healthy"], "Interval": "250ms", "Timeout": "1s", "Retries": 2}


def web(
    version: str, replicas: int = 4, healthy: bool = True, order: str = "stop-first", action: str = "pause"
) -> dict[str, Any]:
    return {
        "Services": {
            "web": {
                "Image": IMAGE,
                "Command": ["/bin/sh", "-c"],
                "Args": [SCRIPT],
                "Env": [f"VERSION={version}", f"HEALTHY={1 if healthy else 0}"],
                "Healthcheck": HEALTHCHECK,
                "StopGracePeriod": "2s",
                "Deploy": {
                    "Replicas": replicas,
                    "UpdateConfig": {"Parallelism": 1, "Monitor": "1s", "Order": order, "FailureAction": action},
                },
            }
        }
    }


def healthy(ws: Workspace, stack: str = "app") -> list[dict[str, Any]]:
    return [c for c in ws.running(stack, "web") if "(healthy)" in c["Status"]]


def versions(ws: Workspace, api: docker.APIClient, stack: str = "app") -> list[str]:
    out = []
    for c in ws.running(stack, "web"):
        env = api.inspect_container(c["Id"])["Config"]["Env"]
        out.append(next(e for e in env if e.startswith("VERSION=")))
    return sorted(out)


def test_start_first_update_never_drops_below_the_desired_healthy_count(ws: Workspace) -> None:
    ws.write("app", web("1", order="start-first"))
    ws.reconcile("--wait", "--timeout", "60s", check=True)
    assert len(healthy(ws)) == 4

    ws.write("app", web("2", order="start-first"))
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(len(healthy(ws)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = ws.reconcile("--timeout", "120s")
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(samples) > 20 and min(samples) >= 4, f"healthy replicas dropped to {min(samples)}"
    assert ws.plan("--detailed-exitcode").returncode == 0
    assert len({c["Labels"]["dabctl.spec"] for c in ws.running("app", "web")}) == 1


def test_an_unhealthy_update_pauses_after_the_first_batch(ws: Workspace, docker_api: docker.APIClient) -> None:
    ws.write("app", web("1"))
    ws.reconcile("--wait", "--timeout", "60s", check=True)
    ws.write("app", web("2", healthy=False))
    result = ws.reconcile("--timeout", "60s")
    assert result.returncode == 1
    assert "paused: slot 1: unhealthy" in result.stderr
    # The old replicas keep serving; only the first batch (one slot) was touched.
    assert versions(ws, docker_api).count("VERSION=1") == 3
    status = ws.run("status", "--output", "json", check=True).stdout
    assert '"state": "paused"' in status and "slot 1: unhealthy" in status
    assert "paused: slot 1: unhealthy" in ws.plan().stdout
    # A new revision resumes.
    ws.write("app", web("3"))
    ws.reconcile("--timeout", "120s", check=True)
    assert versions(ws, docker_api) == ["VERSION=3"] * 4


def test_failure_action_rollback_restores_the_previous_revision(ws: Workspace, docker_api: docker.APIClient) -> None:
    ws.write("app", web("1", action="rollback"))
    ws.reconcile("--wait", "--timeout", "60s", check=True)
    good = {c["Labels"]["dabctl.spec"] for c in ws.running("app", "web")}
    ws.write("app", web("2", healthy=False, action="rollback"))
    ws.reconcile("--timeout", "120s")
    wait_for(lambda: versions(ws, docker_api) == ["VERSION=1"] * 4, timeout=60)
    assert {c["Labels"]["dabctl.spec"] for c in ws.running("app", "web")} == good
    status = ws.run("status", "--output", "json", check=True).stdout
    assert '"pinned": "dir@sha256:' in status


def test_wait_exits_0_when_healthy_and_1_within_the_timeout_when_not(ws: Workspace) -> None:
    ws.write("app", web("1", replicas=2))
    assert ws.reconcile("--wait", "--timeout", "60s").returncode == 0
    ws.write("sick", {"Services": {"web": web("1", replicas=1, healthy=False)["Services"]["web"]}})
    began = time.monotonic()
    result = ws.reconcile("--wait", "--timeout", "6s")
    assert result.returncode == 1
    assert time.monotonic() - began < 30
    assert f"{ws.stack('sick')}_web" in result.stderr and "timed out" in result.stderr
    assert f"{ws.stack('app')}_web" not in result.stderr


def test_a_crash_loop_backs_off_and_gives_up_after_max_attempts(ws: Workspace, docker_api: docker.APIClient) -> None:
    crash = {
        "Image": IMAGE,
        "Command": ["/bin/sh", "-c"],
        "Args": ["exit 3"],
        "Deploy": {"RestartPolicy": {"Condition": "on-failure", "Delay": "1s", "MaxAttempts": 3, "Window": "2m"}},
    }
    ws.write("loop", {"Services": {"crash": crash}})
    since = int(time.time()) - 1
    agent = AgentProcess(ws.state, "--source", str(ws.source), "--resync-interval", "0", "--poll-interval", "0.5")
    try:
        agent.start(ready=False)

        def reported() -> str | None:
            st = agent.stack(ws.stack("loop")) or {}
            error = st.get("sync", {}).get("error") or ""
            return error if "after 3 restarts" in error else None

        error = eventually(reported, agent, timeout=60)
        assert "slot 1 failed" in error
        starts = [
            e["time"] if "timeNano" not in e else e["timeNano"] / 1e9
            for e in docker_api.events(
                since=since,
                until=int(time.time()) + 1,
                decode=True,
                filters={"type": "container", "event": "start", "label": f"dabctl.stack={ws.stack('loop')}"},
            )
        ]
        assert len(starts) == 4, starts  # the first start and 3 restarts, then no more
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert gaps[0] < 1.5 and gaps[1] >= 0.9 and gaps[2] >= 1.8, gaps  # at once, then 1 s, then 2 s
    finally:
        agent.kill()


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[tuple[Path, GitServer]]:
    repo = init_repo(tmp_path / "repo")
    commit(repo, {"README.md": "x\n"}, "init")
    with GitServer(repo) as server:
        yield repo, server


def test_rollback_to_restores_a_revision_whose_history_was_force_pushed_away(
    ws: Workspace, repo: tuple[Path, GitServer], docker_api: docker.APIClient
) -> None:
    path, server = repo
    base = commit(path, {"README.md": "base\n"}, "base")
    v1 = commit(path, {f"stacks/{ws.stack('app')}.dab": json.dumps(web("1", replicas=2))}, "v1")
    args = ("--source", server.url, "--ref", "main", "--path", "stacks")
    ws.run("reconcile", "--once", *args, "--wait", "--timeout", "60s", check=True)
    v1_specs = {c["Labels"]["dabctl.spec"] for c in ws.running("app", "web")}
    commit(path, {f"stacks/{ws.stack('app')}.dab": json.dumps(web("2", replicas=2))}, "v2")
    ws.run("reconcile", "--once", *args, "--timeout", "60s", check=True)
    force_push_reset(path, base)  # v1 and v2 are gone from the repository
    v3 = commit(path, {f"stacks/{ws.stack('app')}.dab": json.dumps(web("3", replicas=2))}, "v3")
    ws.run("reconcile", "--once", *args, "--timeout", "60s", check=True)
    assert versions(ws, docker_api) == ["VERSION=3"] * 2

    rolled = ws.run("rollback", ws.stack("app"), "--to", v1[:10], *args, check=True)
    assert f"pinned to main@sha1:{v1}" in rolled.stdout
    assert versions(ws, docker_api) == ["VERSION=1"] * 2
    assert {c["Labels"]["dabctl.spec"] for c in ws.running("app", "web")} == v1_specs
    # The pin holds while the source still says v3 ...
    ws.run("reconcile", "--once", *args, check=True)
    assert versions(ws, docker_api) == ["VERSION=1"] * 2
    assert ws.run("status", "--output", "json", *args, check=True).stdout.count(f"main@sha1:{v1}") >= 1
    # ... and a commit that changes this stack's bundle leads again.
    commit(path, {f"stacks/{ws.stack('app')}.dab": json.dumps(web("4", replicas=2))}, "v4")
    ws.run("reconcile", "--once", *args, "--timeout", "60s", check=True)
    assert versions(ws, docker_api) == ["VERSION=4"] * 2
    assert v3


def test_rollback_of_an_unknown_revision_is_one_clear_error(ws: Workspace) -> None:
    ws.write("app", web("1", replicas=1))
    ws.reconcile(check=True)
    result = ws.run("rollback", ws.stack("app"), "--to", "deadbeef", "--source", str(ws.source))
    assert result.returncode == 1 and "is not in the history" in result.stderr and "Traceback" not in result.stderr
