"""With an agent running, the CLI's changing commands go through it with the same meaning as locally, on the
embedded state and on etcd alike: another --source is refused, --wait waits for healthy replicas, --timeout
bounds it, --allow-empty is what lets an empty source remove stacks."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import IMAGE, Workspace, service
from tests.support.etcd import EtcdServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Healthy a little while after it starts, so that a command that does not wait returns before it is.
SLOW = "sleep 3; touch /tmp/healthy; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
NEVER = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
HEALTHCHECK = {
    "Test": ["CMD", "test", "-f", "/tmp/healthy"],
    "Interval": "250ms",
    "Timeout": "1s",
    "Retries": 2,
    "StartPeriod": "20s",  # failures while the file is not there yet do not count
}


def gated(script: str, replicas: int = 2) -> dict[str, object]:
    return {
        "Services": {
            "web": {
                "Image": IMAGE,
                "Command": ["/bin/sh", "-c"],
                "Args": [script],
                "Healthcheck": HEALTHCHECK,
                "StopGracePeriod": "2s",
                "Deploy": {"Replicas": replicas},
            }
        }
    }


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture(params=["embedded", "etcd"])
def state_args(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The state flags both the agent and the CLI get: the embedded default, or a fresh etcd prefix."""
    if request.param == "embedded":
        return ()
    server: EtcdServer = request.getfixturevalue("etcd")
    return ("--state", f"etcd://{server.url.removeprefix('http://')}")


@pytest.fixture
def agent(ws: Workspace, state_args: tuple[str, ...]) -> Iterator[AgentProcess]:
    ws.write("app", {"Services": {"web": service(1)}})
    env = {"DABCTL_LOADBALANCER": "none", "DABCTL_ETCD_PREFIX": f"/t-{secrets.token_hex(4)}"}
    args = ("--source", str(ws.source), "--resync-interval", "0", "--poll-interval", "0.5", *state_args)
    proc = AgentProcess(ws.state, *args, env=env)
    try:
        yield proc.start()
    finally:
        proc.kill()


def cli(ws: Workspace, agent: AgentProcess, *args: str) -> tuple[int, str, str]:
    """dabctl with the agent's state flags and etcd prefix."""
    state = [a for a in agent.cmd if a.startswith("etcd://")]
    extra = ("--state", state[0]) if state else ()
    prefix = agent.env["DABCTL_ETCD_PREFIX"]
    proc = ws.run(*args, *extra, env={"DABCTL_ETCD_PREFIX": prefix})
    return proc.returncode, proc.stdout, proc.stderr


def test_another_source_is_refused_and_nothing_is_applied(ws: Workspace, agent: AgentProcess, tmp_path: Path) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 1, agent)
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{ws.stack('other')}.dab").write_text(json.dumps({"Services": {"s": {"Image": IMAGE}}}))
    rc, out, err = cli(ws, agent, "reconcile", "--once", "--source", str(other))
    assert rc == 1, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"follows {ws.source}" in lines[0] and str(other) in lines[0], err
    assert ws.containers("other") == []
    # The agent's own source, named the same way, is accepted.
    rc, out, err = cli(ws, agent, "reconcile", "--once", "--source", str(ws.source))
    assert rc == 0 and "by the agent" in out, (out, err)


def test_wait_and_timeout_mean_through_the_agent_what_they_mean_locally(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 1, agent)
    ws.write("app", gated(SLOW))
    rc, out, err = cli(ws, agent, "reconcile", "--once", "--source", str(ws.source), "--wait", "--timeout", "60s")
    assert rc == 0, (out, err)
    web = ws.running("app", "web")
    assert len(web) == 2 and all("(healthy)" in c["Status"] for c in web), web

    ws.write("app", gated(NEVER))
    started = time.monotonic()
    rc, out, err = cli(ws, agent, "reconcile", "--once", "--source", str(ws.source), "--wait", "--timeout", "4s")
    took = time.monotonic() - started
    assert rc == 1 and "timed out waiting for" in err, (out, err)
    assert took < 30, f"--timeout 4s took {took:.1f}s"


def test_allow_empty_through_the_agent(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 1, agent)
    ws.remove("app")
    rc, out, err = cli(ws, agent, "reconcile", "--once")
    assert rc == 1 and "--allow-empty" in err, (out, err)
    assert len(ws.running("app", "web")) == 1, "an empty source removes nothing without --allow-empty"
    rc, out, err = cli(ws, agent, "reconcile", "--once", "--allow-empty")
    assert rc == 0, (out, err)
    assert ws.containers("app") == []


def test_suspend_resume_and_rollback_find_the_agent(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 1, agent)
    rc, out, _ = cli(ws, agent, "suspend", ws.stack("app"))
    assert (rc, out.strip()) == (0, f"{ws.stack('app')}: suspended")
    eventually(lambda: (agent.stack(ws.stack("app")) or {}).get("suspended") is True, agent)
    rc, out, _ = cli(ws, agent, "resume", ws.stack("app"))
    assert (rc, out.strip()) == (0, f"{ws.stack('app')}: resumed")
    rc, out, err = cli(ws, agent, "rollback", ws.stack("app"))
    assert rc == 1 and "no earlier revision" in err, (out, err)
