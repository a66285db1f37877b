"""Engine faults on a dockerd of the test's own, in its own network namespace (tests/support/dockerd.py):
restarted in the middle of an agent's pass, stopped when the agent starts, stopped under `reconcile --once`, and
slow to list a container that died.

The issue's expectations: a pass the engine drops fails with a clear error (no traceback), the agent keeps
running (/healthz) and converges once the engine is back (its event stream reconnects); an engine that does not
answer at start gets a clear error and retries with backoff; `reconcile --once` says in one line that no engine
answers, and exits 1.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import Workspace, service
from tests.support.dockerd import NetnsDockerd
from tests.support.dockerproxy import DockerProxy
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# urllib3's text for a connection that failed or died, as str(exc) shows it: an error that says this and no more
# does not tell an operator that the Docker engine is down, nor which one.
RAW_CONNECTION_ERROR = "('Connection aborted.'"


@pytest.fixture
def engine() -> Iterator[NetnsDockerd]:
    with NetnsDockerd() as e:
        print(
            f"\nnetns dockerd {e.netns}: _ping answered {e.start_seconds:.2f}s after start, image in {e.load_seconds:.2f}s"
        )
        yield e


@pytest.fixture
def nws(engine: NetnsDockerd, tmp_path: Path) -> Workspace:
    """A workspace whose helpers look at the netns engine (the engine's close removes what it holds)."""
    return Workspace(engine.client, tmp_path, "f" + secrets.token_hex(4))


def agent_on(ws: Workspace, engine: NetnsDockerd, **env: str) -> AgentProcess:
    args = ["--source", str(ws.source), "--docker-host", engine.url, "--resync-interval", "0", "--poll-interval", "0.5"]
    return AgentProcess(ws.state, *args, env=env)


def status_code(agent: AgentProcess, path: str) -> int | None:
    try:
        return agent.get(path).status_code
    except requests.RequestException:
        return None


def show(lines: list[str]) -> None:
    for line in lines:
        print("  agent: " + line[:300])


def test_harness_starts_quickly_and_leaves_nothing_behind() -> None:
    t0 = time.monotonic()
    engine = NetnsDockerd()
    try:
        engine.start()
        ready = time.monotonic() - t0
        assert engine.client.inspect_image("dabctl/sample:1")
        cid = engine.client.create_container("dabctl/sample:1", ["/bin/sh", "-c", "sleep 600"])["Id"]
        engine.client.start(cid)
        engine.client.create_network("harness-check")
        engine.kill9()  # the worst case for close(): shims, containers and mounts outlive dockerd
        assert engine.leftovers(), "after kill -9 the container and its mounts are still there"
    finally:
        engine.close()
    print(f"\nnetns dockerd: ready with the image {ready:.2f}s after start() (_ping after {engine.start_seconds:.2f}s)")
    assert engine.leftovers() == []
    assert ready < 10


@pytest.mark.parametrize("how", ["restart", "kill9"])
def test_engine_restarted_mid_pass_fails_the_pass_cleanly_and_the_agent_converges_after(
    engine: NetnsDockerd, nws: Workspace, how: str
) -> None:
    nws.write("app", {"Services": {"web": service(2)}})
    # One engine call at a time, so that the pass the restart hits is still creating when dockerd goes down.
    agent = agent_on(nws, engine, DABCTL_PARALLELISM="1")
    try:
        agent.start()
        eventually(lambda: len(nws.running("app", "web")) == 2, agent)
        before = {c["Id"] for c in nws.containers("app")}
        lines_before = len(agent.log().splitlines())

        nws.write("app", {"Services": {"web": service(6)}})
        t0 = time.monotonic()
        wait_for(lambda: {c["Id"] for c in nws.containers("app")} - before, timeout=30, interval=0.005)
        if how == "restart":
            engine.restart()  # SIGTERM: dockerd stops every container, then starts again
        else:
            engine.kill9()
            engine.start()  # without live-restore the new dockerd stops what the old one ran
        back = time.monotonic() - t0
        assert status_code(agent, "/healthz") == 200, agent.log()[-3000:]

        eventually(lambda: len(nws.running("app", "web")) == 6, agent, timeout=60)
        converged = time.monotonic() - t0
        slots = sorted(c["Labels"]["dabctl.slot"] for c in nws.containers("app"))
        assert slots == [str(i) for i in range(1, 7)], slots
        after = agent.log().splitlines()[lines_before:]
        print(f"\n{how}: dockerd back {back:.1f}s after the pass's first create; 6/6 running after {converged:.1f}s")
        show(after)
        assert "Traceback" not in agent.log(), agent.log()[-4000:]
        failures = [line for line in after if "pass failed" in line or "stack failed" in line]
        assert failures, "the pass the restart hit must fail with an error in the log"
        assert any("docker event stream dropped" in line for line in after)

        # The event stream is back: with no resync, only its events tell the agent that a replica was removed.
        victim = nws.running("app", "web")[0]
        nws.api.remove_container(victim["Id"], force=True)
        slot = victim["Labels"]["dabctl.slot"]
        eventually(
            lambda: (
                len(nws.running("app", "web")) == 6 and victim["Id"] not in {c["Id"] for c in nws.containers("app")}
            ),
            agent,
            timeout=30,
        )
        assert agent.proc is not None and agent.proc.poll() is None
        print(f"  slot {slot}, removed behind the agent's back after the restart, was created again")

        # A clear error says that the engine at this address does not answer (as a failed plan and `reconcile
        # --once` say it), not only urllib3's "('Connection aborted.', FileNotFoundError(2, ...))".
        unclear = [line for line in failures if RAW_CONNECTION_ERROR in line and engine.url not in line]
        assert not unclear, "failures that do not say which engine is unreachable:\n" + "\n".join(unclear)
    finally:
        agent.kill()


def test_agent_started_while_the_engine_is_down_retries_with_backoff_and_converges_when_it_answers(
    engine: NetnsDockerd, nws: Workspace
) -> None:
    nws.write("app", {"Services": {"web": service(2)}})
    engine.stop()
    agent = agent_on(nws, engine)
    try:
        agent.start(ready=False)  # fails if the agent exits or never answers /healthz
        t0 = time.monotonic()
        time.sleep(6)  # long enough for a few retries: 1 + 2 + 4 s apart with backoff
        assert agent.proc is not None and agent.proc.poll() is None, f"the agent exited:\n{agent.log()}"
        assert status_code(agent, "/healthz") == 200
        assert status_code(agent, "/readyz") == 503
        down = agent.log().splitlines()
        print()
        show(down)

        engine.start()
        eventually(lambda: len(nws.running("app", "web")) == 2, agent, timeout=60)
        eventually(lambda: status_code(agent, "/readyz") == 200, agent)
        print(f"  converged {time.monotonic() - t0:.1f}s after the agent started, the engine started at 6s")
        assert "Traceback" not in agent.log(), agent.log()

        assert any(f"no Docker engine answers at {engine.url}" in line for line in down)
        # Backoff, not a hot loop: 1, 2, 4 s apart makes three or four attempts in six seconds.
        passes = [line for line in down if "pass failed" in line]
        assert 2 <= len(passes) <= 4, f"{len(passes)} failed passes in 6s"
        stream = [line for line in down if "event stream" in line]
        assert len(stream) <= 4, f"the event stream retried {len(stream)} times in 6s: every second, no backoff"
    finally:
        agent.kill()


def test_a_killed_replica_restarts_when_the_engine_lists_it_as_exited_late(
    engine: NetnsDockerd, nws: Workspace
) -> None:
    """Docker emits `kill` and `die` before it lists the container as exited: first it disconnects the container's
    networks (tens of milliseconds each here). A pass that these events trigger must not conclude that nothing
    died; six networks make the window wider than the agent's 0.1 s debounce on any machine."""
    nws.write("app", {"Services": {"web": service(2, Networks=["a", "b", "c", "d", "e", "f"])}})
    agent = agent_on(nws, engine)
    try:
        agent.start()
        eventually(lambda: len(nws.running("app", "web")) == 2, agent)
        victim = nws.running("app", "web")[0]["Id"]
        started_at = engine.client.inspect_container(victim)["State"]["StartedAt"]
        engine.client.kill(victim)

        def restarted() -> bool:
            state = engine.client.inspect_container(victim)["State"] if _exists(nws, victim) else None
            return len(nws.running("app", "web")) == 2 and (state is None or state["StartedAt"] != started_at)

        try:
            eventually(restarted, agent, timeout=30)
        finally:
            show(agent.log().splitlines()[-6:])
            print("  containers: " + ", ".join(f"{c['Names'][0]} {c['Status']}" for c in nws.containers("app")))
    finally:
        agent.kill()


def _exists(ws: Workspace, cid: str) -> bool:
    return cid in {c["Id"] for c in ws.containers("app")}


def test_a_replica_whose_start_failed_is_started_by_the_next_pass_not_recreated(
    engine: NetnsDockerd, nws: Workspace
) -> None:
    """A pass that dies (or whose start call fails) between create and start leaves a container in state
    `created`; the planner has a "never started" restart for it. But the engine lists a never-started container's
    networks without a NetworkID, so it must not be taken for one whose network is gone."""
    nws.write("app", {"Services": {"web": service(1)}})
    with DockerProxy(upstream=str(engine.socket_path)) as proxy:
        proxy.fail_when(lambda c: c.endpoint == "POST /containers/{id}/start", times=1)
        first = nws.reconcile(docker_host=proxy.url)
    assert first.returncode == 1, first
    created = nws.containers("app")
    assert [c["State"] for c in created] == ["created"], created

    plan = nws.plan(docker_host=engine.url)
    second = nws.reconcile(docker_host=engine.url)
    print(f"\n  plan after the failed start:\n{plan.stdout.rstrip()}")
    assert second.returncode == 0, second
    running = [c["Id"] for c in nws.running("app", "web")]
    assert len(running) == 1
    assert "never started" in plan.stdout and "network gone or changed" not in plan.stdout, plan.stdout
    assert running == [created[0]["Id"]], "the created container was removed and recreated instead of started"


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_reconcile_once_against_a_stopped_engine_says_so_in_one_line(
    engine: NetnsDockerd, nws: Workspace, how: str
) -> None:
    nws.write("app", {"Services": {"web": service(2)}})
    if how == "stopped":
        engine.stop()  # dockerd removes its socket
    else:
        engine.kill9()  # the socket file stays: connection refused instead of no such file
    proc = nws.reconcile("--docker-host", engine.url)
    print(f"\n  {how}: exit {proc.returncode}: {proc.stderr.strip()}")
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: no Docker engine answers at {engine.url}"), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
