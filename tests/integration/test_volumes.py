"""Named volumes on the real engine: stack-scoped names, and the copy that moves a stack to them."""

from __future__ import annotations

import docker
import pytest

from agent.drivers.docker_engine import DockerEngine
from tests.integration.conftest import IMAGE, SLEEPER, Workspace

pytestmark = pytest.mark.integration


def files_of(api: docker.APIClient, volume: str) -> str:
    """`ls -lnR` of a volume, through a throwaway container."""
    cid = api.create_container(
        IMAGE, command=["ls", "-lnR", "/v"], host_config=api.create_host_config(binds=[f"{volume}:/v:ro"])
    )["Id"]
    try:
        api.start(cid)
        api.wait(cid, timeout=60)
        return api.logs(cid).decode()  # type: ignore[no-any-return]
    finally:
        api.remove_container(cid, force=True)


def test_copy_volume_moves_contents_with_owners_and_leaves_the_old_one(ws: Workspace) -> None:
    old, new = f"{ws.prefix}-data", f"{ws.prefix}-stack_data"
    cid = ws.api.create_container(
        IMAGE,
        command=["sh", "-c", "echo orders > /v/db; mkdir /v/sub; echo x > /v/sub/f; chown 123:45 /v/db"],
        host_config=ws.api.create_host_config(binds=[f"{old}:/v"]),
    )["Id"]
    ws.api.start(cid)
    ws.api.wait(cid, timeout=60)
    ws.api.remove_container(cid)
    before = files_of(ws.api, old)

    engine = DockerEngine()
    try:
        engine.copy_volume(old, new, IMAGE)
        assert {old, new} <= engine.list_volumes()
    finally:
        engine.close()
    assert files_of(ws.api, new) == before and " 123 " in before
    assert not [c for c in ws.api.containers(all=True) if "dabctl.volume-copy" in (c["Labels"] or {})]


def test_a_new_stack_mounts_its_volume_as_stack_name(ws: Workspace) -> None:
    ws.write(
        "vol",
        {
            "Services": {
                "db": {
                    "Image": IMAGE,
                    "Command": SLEEPER,
                    "Mounts": [{"Type": "volume", "Source": "data", "Target": "/data"}],
                }
            }
        },
    )
    ws.reconcile(check=True)
    (c,) = ws.running("vol")
    mounts = ws.api.inspect_container(c["Id"])["Mounts"]
    assert [m["Name"] for m in mounts] == [f"{ws.stack('vol')}_data"]
