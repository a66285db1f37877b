"""`dabctl agent` following a directory: changes, broken bundles, self-heal, the CLI through the agent, SIGTERM."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import IMAGE, Workspace, service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def agent(ws: Workspace) -> Iterator[AgentProcess]:
    ws.write("app", {"Services": {"web": service(2)}})
    proc = AgentProcess(ws.state, "--source", str(ws.source), "--resync-interval", "0", "--poll-interval", "0.5")
    try:
        yield proc.start()
    finally:
        proc.kill()


def test_directory_changes_converge_and_a_deleted_file_is_pruned(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 2, agent)
    ws.write("app", {"Services": {"web": service(2, Env=["V=2"])}})
    eventually(
        lambda: (
            {c["Labels"]["dabctl.spec"] for c in ws.running("app", "web")} != set()
            and len(ws.running("app", "web")) == 2
            and all("V=2" in ws.api.inspect_container(c["Id"])["Config"]["Env"] for c in ws.running("app", "web"))
        ),
        agent,
    )
    ws.write("extra", {"Services": {"s": service()}})
    eventually(lambda: len(ws.running("extra")) == 1, agent)
    ws.remove("extra")
    eventually(lambda: ws.containers("extra") == [] and f"{ws.stack('extra')}_default" not in ws.networks(), agent)
    st = agent.stack(ws.stack("app"))
    assert st is not None and st["sync"]["status"] == "Synced"
    assert st["health"]["services"][0]["running"] == 2


def test_broken_bundle_keeps_the_last_good_state_and_recovers(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 2, agent)
    before = {c["Id"] for c in ws.running("app", "web")}
    ws.write("app", {"Services": {"web": {"Image": IMAGE, "Deploy": {"Replicas": 3, "Mod": "global"}}}})

    def failed() -> bool:
        st = agent.stack(ws.stack("app"))
        return st is not None and st["sync"]["status"] == "Failed"

    eventually(failed, agent)
    st = agent.stack(ws.stack("app"))
    assert st is not None
    assert f"{ws.stack('app')}.dab" in st["sync"]["error"] and "Services.web.Deploy.Mod" in st["sync"]["error"]
    metrics = agent.get("/metrics").text
    assert 'dabctl_stack_error{error="' in metrics and "Services.web.Deploy.Mod" in metrics
    assert {c["Id"] for c in ws.running("app", "web")} == before, "the last good state keeps running"

    ws.write("app", {"Services": {"web": service(3)}})
    eventually(lambda: len(ws.running("app", "web")) == 3, agent)
    eventually(lambda: (agent.stack(ws.stack("app")) or {}).get("sync", {}).get("status") == "Synced", agent)
    assert "Services.web.Deploy.Mod" not in agent.get("/metrics").text


def test_killed_and_removed_replicas_heal_from_events_alone(
    ws: Workspace, agent: AgentProcess, docker_api: docker.APIClient
) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 2, agent)
    first, second = ws.running("app", "web")
    docker_api.kill(first["Id"])
    docker_api.remove_container(second["Id"], force=True)
    eventually(lambda: len(ws.running("app", "web")) == 2, agent, timeout=20)
    assert "drift_corrections_total" in agent.get("/metrics").text


def test_cli_changes_go_through_the_agent(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 2, agent)
    once = ws.reconcile()
    assert once.returncode == 0, once.stderr
    assert "the passes ran in it" in once.stderr and "reconciled by the agent" in once.stdout
    assert "suspended" in ws.run("suspend", ws.stack("app"), check=True).stdout
    ws.write("app", {"Services": {"web": service(3)}})
    eventually(lambda: (agent.stack(ws.stack("app")) or {}).get("suspended") is True, agent)
    status = ws.run("status", check=True).stdout
    assert "(suspended)" in status
    assert len(ws.running("app", "web")) == 2, "a suspended stack is left alone"
    ws.run("resume", ws.stack("app"), check=True)
    eventually(lambda: len(ws.running("app", "web")) == 3, agent)


def test_sigterm_stops_the_agent_and_never_the_workloads(ws: Workspace, agent: AgentProcess) -> None:
    eventually(lambda: len(ws.running("app", "web")) == 2, agent)
    assert agent.terminate() == 0
    assert len(ws.running("app", "web")) == 2
    assert "agent stopped" in agent.log()
