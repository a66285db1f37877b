"""The policy on the real engine: what only the node can see (a symlink planted in an allowed directory) is
refused right before the start Docker would make, and the container is not started."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import docker
import pytest

from tests.integration.conftest import IMAGE, Workspace
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.skipif(os.geteuid() != 0, reason="dabctl drives the engine as root")
def test_a_symlink_planted_for_a_restart_is_refused_and_nothing_starts(
    ws: Workspace, docker_api: docker.APIClient, tmp_path: Path
) -> None:
    allowed = tmp_path / "app"
    (allowed / "data").mkdir(parents=True)
    env = {"DABCTL_ALLOW_BIND_MOUNTS": str(allowed)}
    ws.write(
        "pol",
        {
            "Services": {
                "s": {
                    "Image": IMAGE,
                    "Command": ["/bin/sh", "-c", "exit 3"],
                    "Mounts": [{"Type": "bind", "Source": f"{allowed}/data", "Target": "/data"}],
                    "Deploy": {"RestartPolicy": {"Condition": "on-failure", "Delay": "0s"}},
                }
            }
        },
    )
    ws.reconcile(env=env)  # creates and starts it; it exits 3 at once
    [first] = ws.containers("pol")
    wait_for(lambda: docker_api.inspect_container(first["Id"])["State"]["Status"] == "exited")
    started = docker_api.inspect_container(first["Id"])["State"]["StartedAt"]

    # What a container that can write the allowed directory could do: make its mount a link to the host's root.
    shutil.rmtree(allowed / "data")
    (allowed / "data").symlink_to("/")
    result = ws.reconcile(env=env)
    assert result.returncode == 1
    refusals = [line for line in (result.stdout + result.stderr).splitlines() if "no-untrusted-symlink" in line]
    assert refusals, result.stdout + result.stderr
    assert f"{allowed}/data" in refusals[0]
    [after] = ws.containers("pol")
    state = docker_api.inspect_container(after["Id"])["State"]
    assert after["Id"] == first["Id"] and state["Status"] == "exited" and state["StartedAt"] == started


def test_a_bundle_that_mounts_the_engine_is_refused_before_any_engine_call(ws: Workspace) -> None:
    for i, source in enumerate(
        ["/var/run/docker/containerd/containerd.sock", "/run/docker", "/var/lib/docker", "/etc", "/boot", str(ws.state)]
    ):
        ws.write(
            f"h{i}",
            {"Services": {"s": {"Image": IMAGE, "Mounts": [{"Type": "bind", "Source": source, "Target": "/m"}]}}},
        )
    result = ws.reconcile(env={"DABCTL_ALLOW_BIND_MOUNTS": "/"})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "policy rule" in line]
    assert len(lines) == 6, result.stderr
    assert ws.containers() == [] and ws.networks() == {}
