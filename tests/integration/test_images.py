"""Images from a real registry: PullPolicy, digest tracking, credentials, an unreachable registry, on the real engine.

A registry (Debian's docker-registry, tests/support/registry.py) runs on loopback per test. Images are made locally
(`build_variant`: the sample image plus a marker file and label, so every variant has its own image ID) and pushed
to it; a push leaves the engine's references into the registry as they were, like a push from another host, so
dabctl has to pull to see what was pushed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import pytest

from agent.state.records import Records
from agent.state.sqlite import SqliteStateLog
from tests.integration.conftest import DABCTL, Workspace, service
from tests.support.dockerproxy import DockerProxy
from tests.support.registry import Registry, build_variant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DISTRIBUTION = "GET /distribution/{id}/json"
PULL = "POST /images/create"


@dataclass
class Images:
    """Registries and local images of one test; `close()` removes them all (after the test's containers)."""

    api: docker.APIClient
    ws: Workspace
    registries: list[Registry] = field(default_factory=list)
    built: list[str] = field(default_factory=list)

    def registry(self, auth: tuple[str, str] | None = None) -> Registry:
        reg = Registry(auth=auth)
        self.registries.append(reg)
        return reg.start()

    def variant(self, marker: str) -> tuple[str, str]:
        """A new local image: (tag, image ID)."""
        tag = f"{self.ws.prefix}-src/app:{marker}"
        image_id = build_variant(self.api, tag, marker)
        self.built.append(image_id)
        return tag, image_id

    def close(self) -> None:
        self.ws.cleanup()  # containers first: an image a container uses cannot be removed
        for reg in self.registries:
            reg.remove_images(self.api, also=self.built)
            reg.close()
        for image_id in self.built:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_image(image_id, force=True)


@pytest.fixture
def images(ws: Workspace, docker_api: docker.APIClient) -> Iterator[Images]:
    imgs = Images(docker_api, ws)
    try:
        yield imgs
    finally:
        imgs.close()


def app(
    image: str, policy: str | None = None, replicas: int = 2, order: str | None = None, **extra: dict[str, Any]
) -> dict[str, Any]:
    """A bundle with service `app` on `image` (fast updates: all replicas in one batch, 1s monitor), plus `extra`."""
    svc = service(Image=image, StopGracePeriod="1s")
    update: dict[str, Any] = {"Parallelism": 0, "Monitor": "1s"}
    if order:
        update["Order"] = order
    svc["Deploy"] = {"Replicas": replicas, "UpdateConfig": update}
    if policy:
        svc["PullPolicy"] = policy
    return {"Services": {"app": svc, **extra}}


def running_images(ws: Workspace, stack: str = "app", svc: str = "app") -> list[str]:
    return sorted(c["ImageID"] for c in ws.running(stack, svc))


def container_ids(ws: Workspace, stack: str = "app") -> list[str]:
    return sorted(c["Id"] for c in ws.containers(stack))


def output(proc: Any) -> str:
    return str(proc.stdout) + str(proc.stderr)


def history(ws: Workspace, stack: str = "app") -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(ws.run("history", ws.stack(stack), "--output", "json", check=True).stdout)
    return doc


def stack_record(ws: Workspace, stack: str = "app") -> dict[str, Any]:
    """The stack's current record in the state (what the last pass applied)."""
    log = SqliteStateLog(ws.state / "state.db", writer=False)
    try:
        record = Records(log).stacks()[ws.stack(stack)]
    finally:
        log.close()
    return record.model_dump(mode="json", exclude={"content"})


def digest_of(record: dict[str, Any], svc: str = "app") -> str:
    """The service's recorded repository digest, as "sha256:..." (a "repo@sha256:..." form is accepted)."""
    value = str(record["services"][svc].get("repo_digest") or "")
    return value.rpartition("@")[2]


def hex12(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


# --- 1. PullPolicy always follows the tag --------------------------------------------------------------------------


def test_always_follows_a_moved_tag_and_records_the_digest(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    src2, v2 = images.variant("v2")
    ref = f"{reg.host}/app:latest"
    d1 = reg.push(images.api, src1, ref)
    ws.write("app", app(ref, "always"))
    ws.reconcile(check=True)
    assert running_images(ws) == [v1, v1]

    newest = history(ws)[0]
    assert newest["services"]["app"]["image_id"] == v1
    assert digest_of(newest) == d1, f"history: {newest['services']['app']}"

    before = container_ids(ws)
    d2 = reg.push(images.api, src2, ref)
    assert d2 != d1
    plan = ws.plan("--detailed-exitcode")
    assert plan.returncode == 2, output(plan)
    assert "replace" in plan.stdout.lower(), plan.stdout
    assert hex12(d1) in squeeze(plan.stdout) and hex12(d2) in squeeze(plan.stdout), (
        f"plan should name the old and new digest ({hex12(d1)} -> {hex12(d2)}):\n{plan.stdout}"
    )

    ws.reconcile(check=True)
    assert running_images(ws) == [v2, v2]
    assert set(container_ids(ws)).isdisjoint(before), "every replica is replaced"
    recorded = [digest_of(history(ws)[0]), digest_of(stack_record(ws))]
    assert d2 in recorded, f"the new digest {d2} is recorded (history, stack record): {recorded}"
    assert stack_record(ws)["services"]["app"]["image_id"] == v2
    assert ws.plan("--detailed-exitcode").returncode == 0


# --- 2. if-not-present ignores a moved tag until the reference changes ---------------------------------------------


def test_if_not_present_ignores_a_moved_tag_until_the_reference_changes(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    src2, v2 = images.variant("v2")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref)
    ws.write("app", app(ref, "if-not-present"))
    ws.reconcile(check=True)
    assert running_images(ws) == [v1, v1]
    before = container_ids(ws)

    reg.push(images.api, src2, ref)
    plan = ws.plan("--detailed-exitcode")
    assert plan.returncode == 0, output(plan)
    ws.reconcile(check=True)
    assert container_ids(ws) == before
    assert running_images(ws) == [v1, v1]

    reg.push(images.api, src2, f"{reg.host}/app:v2")
    ws.write("app", app(f"{reg.host}/app:v2", "if-not-present"))
    ws.reconcile(check=True)
    assert running_images(ws) == [v2, v2]
    assert set(container_ids(ws)).isdisjoint(before)


# --- 3. a digest-pinned reference never goes back to the registry --------------------------------------------------


def test_digest_pinned_image_is_not_resolved_again_once_present(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    d1 = reg.push(images.api, src1, f"{reg.host}/app:latest")
    ws.write("app", app(f"{reg.host}/app@{d1}"))
    ws.reconcile(check=True)
    assert running_images(ws) == [v1, v1]
    before = container_ids(ws)

    with DockerProxy() as proxy:
        second = ws.reconcile(docker_host=proxy.url)
        calls = proxy.calls
    assert second.returncode == 0, output(second)
    endpoints = [c.endpoint for c in calls]
    assert PULL not in endpoints, endpoints
    assert DISTRIBUTION not in endpoints, endpoints
    assert [c.endpoint for c in calls if c.mutating] == []
    assert container_ids(ws) == before

    reg.stop()  # and so it works with the registry gone
    third = ws.reconcile()
    assert third.returncode == 0, output(third)
    assert container_ids(ws) == before


# --- 4. a converged pass under always writes nothing -----------------------------------------------------------------


def test_second_pass_over_unchanged_images_makes_no_docker_writes(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    src2, v2 = images.variant("w1")
    reg.push(images.api, src1, f"{reg.host}/app:latest")
    reg.push(images.api, src2, f"{reg.host}/worker:latest")
    worker = app(f"{reg.host}/worker:latest", "always")["Services"]["app"]
    ws.write("app", app(f"{reg.host}/app:latest", "always", worker=worker))
    ws.reconcile(check=True)
    assert running_images(ws) == [v1, v1]
    assert running_images(ws, svc="worker") == [v2, v2]
    before = container_ids(ws)

    with DockerProxy() as proxy:
        second = ws.reconcile(docker_host=proxy.url)
        calls = proxy.calls
    assert second.returncode == 0, output(second)
    assert [c.endpoint for c in calls if c.mutating] == []
    lookups: dict[str, int] = {}
    for c in calls:
        if c.endpoint == DISTRIBUTION:
            lookups[c.path] = lookups.get(c.path, 0) + 1
    assert all(n <= 1 for n in lookups.values()), f"registry lookups per image: {lookups}"
    assert sum(lookups.values()) <= 2, f"registry lookups: {lookups}"
    assert container_ids(ws) == before


# --- 5. credentials ---------------------------------------------------------------------------------------------------


def test_private_registry_needs_credentials_and_never_leaks_them(ws: Workspace, images: Images) -> None:
    password = "pw-" + secrets.token_hex(12)
    reg = images.registry(auth=("dabctl", password))
    src1, v1 = images.variant("v1")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref, auth=reg.credentials)
    ws.write("app", app(ref, "always", other=service()))
    secrets_seen: list[tuple[str, str]] = []

    def no_secret(where: str, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        secrets_seen.extend((where, s) for s in (password,) if s.encode() in data)

    denied = ws.reconcile()
    no_secret("reconcile without credentials", output(denied))
    assert denied.returncode == 1, output(denied)
    lines = [line for line in output(denied).splitlines() if ref in line]
    assert any(re.search(r"auth|denied|unauthori[sz]ed|credentials", line, re.I) for line in lines), (
        f"an error naming {ref} and authentication:\n{output(denied)}"
    )
    assert len(ws.running("app", "other")) == 1, "the other service converges"
    assert ws.running("app", "app") == []

    config_dir = reg.docker_config()
    allowed = ws.reconcile("--docker-config", str(config_dir))
    no_secret("reconcile with credentials", output(allowed))
    assert allowed.returncode == 0, output(allowed)
    assert running_images(ws) == [v1, v1]
    assert len(ws.running("app", "other")) == 1

    status = ws.run("status", "--output", "json")
    no_secret("status --output json", output(status))
    plan = ws.plan("--docker-config", str(config_dir))
    no_secret("plan", output(plan))
    for name in ("state.db", "state.db-wal"):
        path = ws.state / name
        if path.exists():
            no_secret(name, path.read_bytes())
    assert secrets_seen == [], f"the registry password appears in: {[w for w, _ in secrets_seen]}"


# --- 6. an unreachable registry leaves running replicas alone ----------------------------------------------------


def test_registry_down_fails_the_pass_and_keeps_running_replicas(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref)
    ws.write("app", app(ref, "always"))
    ws.reconcile(check=True)
    before = container_ids(ws)
    assert running_images(ws) == [v1, v1]

    reg.stop()
    failed = ws.reconcile()
    assert failed.returncode == 1, output(failed)
    assert reg.host in output(failed), f"the error names the registry:\n{output(failed)}"
    assert container_ids(ws) == before
    assert running_images(ws) == [v1, v1]

    reg.start()
    ok = ws.reconcile()
    assert ok.returncode == 0, output(ok)
    assert container_ids(ws) == before
    assert running_images(ws) == [v1, v1]


# --- 7. no replica stops before its replacement image is present -------------------------------------------------


def test_stop_first_update_keeps_replicas_when_the_registry_is_down(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    src2, _ = images.variant("v2")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref)
    ws.write("app", app(ref, "always", order="stop-first"))
    ws.reconcile(check=True)
    before = container_ids(ws)

    reg.push(images.api, src2, ref)
    reg.stop()
    failed = ws.reconcile()
    assert failed.returncode == 1, output(failed)
    assert container_ids(ws) == before
    assert running_images(ws) == [v1, v1]


def test_stop_first_update_keeps_replicas_when_the_new_image_cannot_be_pulled(
    ws: Workspace, images: Images, docker_api: docker.APIClient
) -> None:
    """The registry knows the new digest (the plan sees a change) but cannot serve the image's config blob."""
    reg = images.registry()
    src1, v1 = images.variant("v1")
    src2, v2 = images.variant("v2")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref)
    ws.write("app", app(ref, "always", order="stop-first"))
    ws.reconcile(check=True)
    before = container_ids(ws)

    reg.push(images.api, src2, ref)
    docker_api.remove_image(v2, force=True)  # not on this node: a pull has to fetch it
    reg.drop_blob(v2)  # the image ID is the config blob's digest
    failed = ws.reconcile()
    assert failed.returncode == 1, output(failed)
    assert container_ids(ws) == before
    assert running_images(ws) == [v1, v1]
    assert all(c["State"] == "running" for c in ws.containers("app"))


# --- the agent's default pull policy, and never ----------------------------------------------------------------------


def test_agent_pull_policy_applies_to_services_that_set_none(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, v1 = images.variant("v1")
    src2, v2 = images.variant("v2")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref)
    fixed = app(ref, "if-not-present")["Services"]["app"]
    ws.write("app", app(ref, fixed=fixed))  # app: no PullPolicy; fixed: if-not-present
    ws.reconcile(check=True)
    assert running_images(ws) == [v1, v1] and running_images(ws, svc="fixed") == [v1, v1]
    fixed_ids = sorted(c["Id"] for c in ws.running("app", "fixed"))

    reg.push(images.api, src2, ref)
    assert ws.plan("--detailed-exitcode").returncode == 0, "the default default is if-not-present"
    plan = ws.plan("--detailed-exitcode", "--pull-policy", "always")
    assert plan.returncode == 2, output(plan)

    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
    env.update(DABCTL_STATE_DIR=str(ws.state), DABCTL_PULL_POLICY="always")
    cmd = [DABCTL, "reconcile", "--once", "--source", str(ws.source)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, output(result)
    assert running_images(ws) == [v2, v2]
    assert running_images(ws, svc="fixed") == [v1, v1], "a service's own PullPolicy wins"
    assert sorted(c["Id"] for c in ws.running("app", "fixed")) == fixed_ids


def test_never_does_not_pull_a_missing_image(ws: Workspace, images: Images) -> None:
    reg = images.registry()
    src1, _ = images.variant("v1")
    ref = f"{reg.host}/app:latest"
    reg.push(images.api, src1, ref)  # in the registry, not on this node
    ws.write("app", app(ref, "never", other=service()))
    with DockerProxy() as proxy:
        result = ws.reconcile(docker_host=proxy.url)
        endpoints = [c.endpoint for c in proxy.calls]
    assert result.returncode == 1, output(result)
    assert PULL not in endpoints and DISTRIBUTION not in endpoints, endpoints
    assert any(ref in line and "never" in line.lower() for line in output(result).splitlines()), output(result)
    assert ws.running("app", "app") == []
    assert len(ws.running("app", "other")) == 1
