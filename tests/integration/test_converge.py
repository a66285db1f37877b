"""`plan` and `reconcile --once` against the real Docker engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import docker
import pytest

from agent.state.sqlite import SqliteStateLog
from tests.integration.conftest import IMAGE, SLEEPER, Workspace, service
from tests.support.dockerproxy import DockerProxy
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]


def shop(replicas: int = 3) -> dict[str, object]:
    return {
        "Services": {
            "web": service(replicas, Env=["COLOR=blue"]),
            "worker": service(1, Networks=["back"]),
        },
        "Networks": {"back": {"Labels": {"team": "shop"}}},
    }


def state_revision(ws: Workspace) -> int:
    log = SqliteStateLog(ws.state / "state.db")
    try:
        return log.revision()
    finally:
        log.close()


def test_converge_then_second_pass_makes_no_writes(ws: Workspace) -> None:
    ws.write("shop", shop())
    first = ws.reconcile(check=True)
    assert "6 created" in first.stdout  # 3 web + 1 worker + 2 networks
    assert len(ws.running("shop", "web")) == 3
    assert len(ws.running("shop", "worker")) == 1
    assert {f"{ws.stack('shop')}_default", f"{ws.stack('shop')}_back"} <= set(ws.networks())
    assert ws.plan("--detailed-exitcode").returncode == 0

    revision = state_revision(ws)
    with DockerProxy() as proxy:
        second = ws.reconcile(docker_host=proxy.url, check=True)
        calls = proxy.calls
    assert "nothing to do" in second.stdout
    assert [c.endpoint for c in calls if c.mutating] == []
    endpoints = [c.endpoint for c in calls]
    assert endpoints.count("GET /containers/json") == 1
    assert endpoints.count("GET /networks") == 1
    assert state_revision(ws) == revision, "a pass that changes nothing writes nothing"


def test_replicas_reach_each_other_by_service_name(ws: Workspace, docker_api: docker.APIClient) -> None:
    ws.write("mesh", {"Services": {"api": {"Image": IMAGE, "Deploy": {"Replicas": 2}}, "client": service()}})
    ws.reconcile(check=True)
    client = ws.running("mesh", "client")[0]
    wait_for(lambda: len(ws.running("mesh", "api")) == 2)

    def answered() -> bool:
        exec_id = docker_api.exec_create(client["Id"], ["wget", "-q", "-O", "-", "http://api:8080/"])
        out = docker_api.exec_start(exec_id).decode()
        return out.strip().startswith(tuple(c["Id"][:12] for c in ws.running("mesh", "api")))

    wait_for(answered, timeout=20)


def test_drift_shows_in_plan_and_is_repaired(ws: Workspace, docker_api: docker.APIClient) -> None:
    ws.write("shop", shop())
    ws.reconcile(check=True)
    web = sorted(ws.running("shop", "web"), key=lambda c: c["Labels"]["dabctl.slot"])
    docker_api.remove_container(web[0]["Id"], force=True)
    docker_api.kill(web[1]["Id"])
    worker = ws.running("shop", "worker")[0]
    back = ws.networks()[f"{ws.stack('shop')}_back"]
    docker_api.disconnect_container_from_network(worker["Id"], back["Id"], force=True)
    docker_api.remove_network(back["Id"])

    plan = ws.plan("--detailed-exitcode")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert f"+ {ws.stack('shop')}_web.1 create" in plan.stdout
    assert f"~ {ws.stack('shop')}_web.2 start" in plan.stdout
    assert f"+ network {ws.stack('shop')}_back" in plan.stdout
    assert f"- {ws.stack('shop')}_worker.1 remove (network gone or changed)" in plan.stdout

    ws.reconcile(check=True)
    assert len(ws.running("shop", "web")) == 3
    assert len(ws.running("shop", "worker")) == 1
    assert ws.plan("--detailed-exitcode").returncode == 0


def test_spec_change_replaces_and_plan_names_the_fields(ws: Workspace) -> None:
    ws.write("shop", shop(2))
    ws.reconcile(check=True)
    before = {c["Id"] for c in ws.running("shop", "web")}
    changed = shop(2)
    changed["Services"]["web"]["Env"] = ["COLOR=green"]  # type: ignore[index]
    # Both slots in one batch, and a short health gate (UpdateConfig is not in the spec hash: nothing else moves).
    changed["Services"]["web"]["Deploy"]["UpdateConfig"] = {"Parallelism": 2, "Monitor": "1s"}  # type: ignore[index]
    ws.write("shop", changed)
    plan = ws.plan("--output", "json")
    doc = json.loads(plan.stdout)
    replaces = [a for s in doc["stacks"] for a in s["actions"] if a["op"] == "replace"]
    assert [a["changes"] for a in replaces] == [["Env"], ["Env"]]
    ws.reconcile(check=True)
    after = ws.running("shop", "web")
    assert len(after) == 2 and not before & {c["Id"] for c in after}
    assert len({c["Labels"]["dabctl.spec"] for c in after}) == 1
    assert ws.plan("--detailed-exitcode").returncode == 0


def test_scale_down_removes_highest_slots(ws: Workspace) -> None:
    ws.write("shop", shop(3))
    ws.reconcile(check=True)
    ws.write("shop", shop(1))
    ws.reconcile(check=True)
    assert [c["Labels"]["dabctl.slot"] for c in ws.running("shop", "web")] == ["1"]


def test_foreign_objects_are_never_touched(ws: Workspace, docker_api: docker.APIClient) -> None:
    stack = ws.stack("shop")
    # Look-alike names without labels, and full labels under another state's owner id.
    lookalike = docker_api.create_container(IMAGE, name=f"{stack}_web.1.abc", command=SLEEPER)["Id"]
    other_owner = docker_api.create_container(
        IMAGE,
        name=f"{stack}_web.2.def",
        command=SLEEPER,
        labels={
            "dabctl.stack": stack,
            "dabctl.service": "web",
            "dabctl.slot": "2",
            "dabctl.owner": "someone-else",
            "dabctl.spec": "v1-0",
        },
    )["Id"]
    docker_api.start(other_owner)
    foreign_net = docker_api.create_network(f"{stack}_old")["Id"]
    ws.write("shop", shop(2))
    ws.reconcile(check=True)
    ws.remove("shop")
    ws.write("keep", {"Services": {"s": service()}})
    ws.reconcile(check=True)  # prunes stack shop: only what this state created

    assert docker_api.inspect_container(lookalike)["State"]["Status"] == "created"
    assert docker_api.inspect_container(other_owner)["State"]["Running"] is True
    assert docker_api.inspect_network(foreign_net)["Id"] == foreign_net
    assert ws.containers("shop") == [] or all(
        c["Labels"]["dabctl.owner"] == "someone-else" for c in ws.containers("shop")
    )


def test_foreign_network_with_a_managed_name_blocks_only_that_stack(
    ws: Workspace, docker_api: docker.APIClient
) -> None:
    squatter = docker_api.create_network(f"{ws.stack('blocked')}_default")["Id"]
    ws.write("blocked", {"Services": {"s": service()}})
    ws.write("fine", {"Services": {"s": service()}})
    result = ws.reconcile()
    assert result.returncode == 1
    assert f"{ws.stack('blocked')}_default" in result.stderr and "not managed" in result.stderr
    assert ws.containers("blocked") == []
    assert len(ws.running("fine")) == 1
    assert docker_api.inspect_network(squatter)["Labels"] in ({}, None)


def test_invalid_bundle_changes_nothing(ws: Workspace) -> None:
    ws.write("shop", shop(1))
    ws.reconcile(check=True)
    ws.write("shop", shop(3))  # a valid change that must not be applied either
    ws.write("broken", {"Services": {"s": {"Image": IMAGE, "Deploy": {"Replcas": 2}}}})
    with DockerProxy() as proxy:
        result = ws.reconcile(docker_host=proxy.url)
        mutating = proxy.mutating()
    assert result.returncode == 1
    assert (
        f"{ws.stack('broken')}.dab: Services.s.Deploy.Replcas: unknown field; did you mean 'Replicas'?" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert mutating == []
    assert len(ws.running("shop", "web")) == 1


def test_failed_pull_marks_only_that_service_failed(ws: Workspace) -> None:
    ws.write("pull", {"Services": {"bad": service(Image="127.0.0.1:9/missing:1"), "good": service(2)}})
    result = ws.reconcile()
    assert result.returncode == 1
    assert "127.0.0.1:9/missing:1" in result.stdout + result.stderr
    assert len(ws.running("pull", "good")) == 2
    assert ws.containers("pull", label="dabctl.service=bad") == []


def test_prune_and_the_empty_source_guard(ws: Workspace, docker_api: docker.APIClient) -> None:
    volume = f"{ws.prefix}-data"
    ws.write("a", {"Services": {"s": service(Mounts=[{"Type": "volume", "Source": volume, "Target": "/data"}])}})
    ws.write("b", {"Services": {"s": service(2)}})
    ws.reconcile(check=True)
    ws.remove("a")
    ws.reconcile(check=True)
    assert ws.containers("a") == []
    assert f"{ws.stack('a')}_default" not in ws.networks()
    scoped = f"{ws.stack('a')}_{volume}"  # named volumes are the stack's: <stack>_<name>
    assert docker_api.inspect_volume(scoped)["Name"] == scoped, "volumes are never removed"

    ws.remove("b")
    refused = ws.reconcile()
    assert refused.returncode == 1 and "--allow-empty" in refused.stderr
    assert len(ws.running("b")) == 2
    ws.reconcile("--allow-empty", check=True)
    assert ws.containers("b") == [] and ws.networks() == {}


def test_restart_condition_on_failure(ws: Workspace) -> None:
    ws.write(
        "jobs",
        {
            "Services": {
                "fails": service(Args=["exit 3"], Deploy={"RestartPolicy": {"Condition": "on-failure"}}),
                "succeeds": service(Args=["exit 0"], Deploy={"RestartPolicy": {"Condition": "on-failure"}}),
            }
        },
    )
    ws.reconcile(check=True)
    wait_for(lambda: all(c["State"] == "exited" for c in ws.containers("jobs")) and len(ws.containers("jobs")) == 2)
    plan = ws.plan()
    assert f"~ {ws.stack('jobs')}_fails.1 start (exited (3); restart condition on-failure)" in plan.stdout
    assert "succeeds" not in plan.stdout


def test_samples_converge(ws: Workspace) -> None:
    for sample in (ROOT / "samples" / "stacks").iterdir():
        shutil.copy(sample, ws.source / f"{ws.prefix}-{sample.name}")
    # The sample's named volume would be shared with a real deployment: point it at this test's own.
    ops = ws.source / f"{ws.prefix}-ops.yaml"
    ops.write_text(ops.read_text().replace("Source: ops-data", f"Source: {ws.prefix}-ops-data"))
    ws.reconcile(check=True)
    assert len(ws.running("web-shop", "frontend")) == 3
    assert len(ws.running("web-shop", "worker")) == 1
    assert len(ws.running("ops")) == 1
    ps = ws.run("ps", ws.stack("web-shop"), check=True)
    assert ps.stdout.count("running") == 4
    assert ws.plan("--detailed-exitcode").returncode == 0


def test_ps_shows_a_slots_previous_tasks_with_how_they_ended(ws: Workspace) -> None:
    ws.write("tasks", {"Services": {"s": service(1)}})
    ws.reconcile(check=True)
    ws.write("tasks", {"Services": {"s": service(1, Env=["V=2"])}})
    ws.reconcile(check=True)
    ps = ws.run("ps", ws.stack("tasks"), check=True).stdout
    assert ps.count("running") == 1 and ps.count("\\_ task t") == 1 and "shutdown" in ps
    rows = json.loads(ws.run("ps", ws.stack("tasks"), "--output", "json", check=True).stdout)
    assert [(r["state"], r["task"] is not None) for r in rows] == [("running", False), ("shutdown", True)]
    assert json.loads(ws.run("ps", ws.stack("tasks"), "--no-tasks", "--output", "json", check=True).stdout) == rows[:1]


def test_logs_prefix_every_line_with_its_slot(ws: Workspace) -> None:
    talker = service(2, Args=["echo hello from $(hostname); trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"])
    ws.write("talk", {"Services": {"s": talker}})
    ws.reconcile(check=True)

    def both_spoke() -> str | None:
        out = ws.run("logs", ws.stack("talk"), "s").stdout
        return out if out.count("hello from") == 2 else None

    out = wait_for(both_spoke, timeout=20)
    assert {line.split(" | ")[0].strip() for line in out.splitlines()} == {
        f"{ws.stack('talk')}_s.1",
        f"{ws.stack('talk')}_s.2",
    }
