"""One contract for every container runtime the node pass runs on: the in-memory fake (fast tier) and the real
Docker engine through `DockerEngine` (integration). The same assertions run on both, so that what the fast tests of
the pass runner and the loop learn from the fake holds on Docker: every Runtime method the pass calls, and the
errors the loop tells apart — a missing image, a name in use, an engine that does not answer, a network that still
has containers on it.

The real half uses the machine's Docker engine and the image dabctl/sample:1; every name is random and every
container and network a test made is removed afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import gc
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from agent.drivers.docker_engine import DockerEngine, EngineError, ImageUnavailable
from agent.node.runtime import Runtime
from bundles.desired import ServiceTarget, service_targets
from bundles.load import stack_bundle
from reconcilers.networks import NetworkRequest
from reconcilers.services import Replica, ReplicaRequest, replica_labels
from tests.fakes import FakeRuntime
from tests.support.polling import wait_for

pytestmark = [pytest.mark.timeout(120)]

IMAGE = "dabctl/sample:1"
# Runs until TERM; USR1 makes it exit with code 3 (how the real engine gets an exit the test chooses).
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; trap 'exit 3' USR1; while :; do sleep 1 & wait $!; done"]


@dataclass(kw_only=True)
class Harness:
    """A runtime, and how a test drives what only the engine decides: an exit, a healthcheck's verdict."""

    runtime: Runtime
    stack: str
    exit3: Callable[[str], None]
    healthy: Callable[[str], None]
    unreachable: Callable[[Path], Runtime]

    def target(self, service: str = "svc", **fields: Any) -> ServiceTarget:
        doc = {"Version": "0.1", "Services": {service: {"Image": IMAGE, "Command": SLEEPER, **fields}}}
        raw = json.dumps(doc).encode()
        stack = stack_bundle(self.stack, f"{self.stack}.dab", raw, ".dab", "dir@sha256:" + "0" * 64)
        return service_targets(stack)[0]

    def network(self, name: str = "default") -> str:
        labels = {"dabctl.stack": self.stack, "dabctl.owner": self.stack}
        return self.runtime.create_network(NetworkRequest(f"{self.stack}_{name}", "bridge", False, labels))

    def request(
        self, target: ServiceTarget, slot: str = "1", owner: str | None = None, name: str | None = None
    ) -> ReplicaRequest:
        labels = replica_labels(target, slot, owner or self.stack, "node-1", "r1")
        return ReplicaRequest(name or f"{target.full_name}.{slot}.{secrets.token_hex(6)}", target, slot, labels)

    def replica(self, owner: str, container_id: str) -> Replica:
        (found,) = [r for r in self.runtime.list_replicas(owner) if r.id == container_id]
        return found


def _fake(stack: str) -> Iterator[Harness]:
    fake = FakeRuntime()

    def down(_: Path) -> Runtime:
        other = FakeRuntime(url="unix:///nowhere/docker.sock")
        other.reachable = False
        return other

    yield Harness(
        runtime=fake,
        stack=stack,
        exit3=lambda cid: fake.exit(cid, 3),
        healthy=lambda cid: fake.set_health(cid, "healthy"),
        unreachable=down,
    )


def _docker(stack: str) -> Iterator[Harness]:
    api = docker.APIClient(base_url="unix:///var/run/docker.sock", version="1.41", timeout=60)
    try:
        api.inspect_image(IMAGE)
    except Exception as exc:
        pytest.fail(f"the runtime contract needs a Docker engine with {IMAGE} (bash .ci/setup builds it): {exc}")
    real = DockerEngine()

    def exit3(cid: str) -> None:
        api.kill(cid, signal="USR1")
        wait_for(lambda: real.container_state(cid) == "exited")

    def healthy(cid: str) -> None:
        wait_for(lambda: api.inspect_container(cid)["State"]["Health"]["Status"] == "healthy")

    try:
        yield Harness(
            runtime=real,
            stack=stack,
            exit3=exit3,
            healthy=healthy,
            unreachable=lambda tmp: DockerEngine(f"unix://{tmp}/nothing-listens.sock"),
        )
    finally:
        for c in api.containers(all=True, filters={"label": f"dabctl.stack={stack}"}):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(c["Id"], force=True)
        for n in api.networks(names=[stack]):
            if n["Name"].startswith(stack):
                with contextlib.suppress(docker.errors.NotFound):
                    api.remove_network(n["Id"])
        real.close()
        api.close()


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.integration)])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    stack = f"rt-{secrets.token_hex(5)}"
    yield from (_fake if request.param == "fake" else _docker)(stack)


# --- containers ---------------------------------------------------------------------------------------------------


def test_a_created_replica_is_listed_by_its_owner_only_and_joins_its_networks_on_start(h: Harness) -> None:
    network_id = h.network()
    h.network("extra")
    target = h.target(Networks=["default", "extra"])
    request = h.request(target)
    cid = h.runtime.create_replica(request)
    other = h.runtime.create_replica(h.request(target, "2", owner=f"{h.stack}-other"))

    created = h.replica(h.stack, cid)
    assert [r.id for r in h.runtime.list_replicas(h.stack)] == [cid]
    assert [r.id for r in h.runtime.list_replicas(f"{h.stack}-other")] == [other]
    assert (created.name, created.stack, created.service, created.slot) == (request.name, h.stack, "svc", "1")
    assert (created.spec_hash, created.revision, created.state) == (target.spec_hash, "r1", "created")
    assert created.exit_code is None and created.health is None
    assert created.image_id == h.runtime.image_identity(IMAGE)[0] != ""
    assert created.networks == {f"{h.stack}_default": "", f"{h.stack}_extra": ""}, "no IDs before start"
    assert h.runtime.container_state(cid) == "created"

    h.runtime.start_replica(cid)
    started = h.replica(h.stack, cid)
    assert started.state == "running" and h.runtime.container_state(cid) == "running"
    ids = {n.name: n.id for n in h.runtime.list_networks()}
    assert started.networks == {f"{h.stack}_default": network_id, f"{h.stack}_extra": ids[f"{h.stack}_extra"]}
    assert all(started.addresses.values()), started.addresses


def test_an_exit_is_listed_with_its_code(h: Harness) -> None:
    h.network()
    cid = h.runtime.create_replica(h.request(h.target()))
    h.runtime.start_replica(cid)
    h.exit3(cid)
    exited = h.replica(h.stack, cid)
    assert (exited.state, exited.exit_code) == ("exited", 3)
    assert h.runtime.container_state(cid) == "exited"
    h.runtime.start_replica(cid)  # a restart per the bundle's policy
    assert h.replica(h.stack, cid).state == "running"


def test_health_starts_as_starting_and_follows_the_check(h: Harness) -> None:
    h.network()
    target = h.target(Healthcheck={"Test": ["CMD", "true"], "Interval": "1s", "StartPeriod": "30s"})
    cid = h.runtime.create_replica(h.request(target))
    h.runtime.start_replica(cid)
    assert h.replica(h.stack, cid).health in ("starting", "healthy")  # the real check may have run already
    h.healthy(cid)
    assert wait_for(lambda: h.replica(h.stack, cid).health == "healthy")


def test_remove_stops_and_removes_and_gone_already_is_fine(h: Harness) -> None:
    h.network()
    cid = h.runtime.create_replica(h.request(h.target()))
    h.runtime.start_replica(cid)
    replica = h.replica(h.stack, cid)
    h.runtime.remove_replica(replica)
    assert h.runtime.list_replicas(h.stack) == []
    assert h.runtime.container_state(cid) == "removed"
    h.runtime.remove_replica(replica)


def test_a_name_in_use_is_refused_and_the_first_container_stays(h: Harness) -> None:
    h.network()
    target = h.target()
    first = h.request(target)
    cid = h.runtime.create_replica(first)
    with pytest.raises(docker.errors.APIError) as refused:
        h.runtime.create_replica(h.request(target, "2", name=first.name))
    assert refused.value.status_code == 409
    assert f'The container name "/{first.name}" is already in use' in str(refused.value)
    assert [r.id for r in h.runtime.list_replicas(h.stack)] == [cid]


def test_starting_a_container_that_is_gone_is_not_found(h: Harness) -> None:
    with pytest.raises(docker.errors.NotFound):
        h.runtime.start_replica("0" * 64)


# --- images -------------------------------------------------------------------------------------------------------


def test_a_missing_image_under_pull_policy_never_is_unavailable_and_nothing_is_created(h: Harness) -> None:
    h.network()
    missing = f"dabctl/absent-{secrets.token_hex(4)}:1"
    target = h.target(Image=missing, PullPolicy="never")
    with pytest.raises(ImageUnavailable) as unavailable:
        h.runtime.create_replica(h.request(target))
    assert str(unavailable.value) == f"image {missing} is not on this node and PullPolicy is never; load it first"
    assert h.runtime.list_replicas(h.stack) == []
    with pytest.raises(ImageUnavailable):
        h.runtime.prepare_image(target)


def test_image_identity_and_prepare_image(h: Harness) -> None:
    image_id, _ = h.runtime.image_identity(IMAGE)
    assert image_id.startswith("sha256:")
    assert h.runtime.image_identity(image_id)[0] == image_id
    assert h.runtime.image_identity(f"dabctl/absent-{secrets.token_hex(4)}:1") == ("", "")
    target = h.target()
    assert h.runtime.prepare_image(target) == IMAGE
    # A recorded image ID that is gone falls back to the bundle's reference.
    assert h.runtime.prepare_image(replace(target, image_id=image_id)) == image_id
    assert h.runtime.prepare_image(replace(target, image_id="sha256:" + "f" * 64)) == IMAGE


def test_a_registry_that_does_not_serve_the_image_is_unavailable(h: Harness) -> None:
    with pytest.raises(ImageUnavailable, match="at its registry failed"):
        h.runtime.registry_digest(f"dabctl/absent-{secrets.token_hex(4)}:1")


# --- networks -----------------------------------------------------------------------------------------------------


def test_networks_are_created_listed_with_their_labels_and_removed(h: Harness) -> None:
    names = {n.name for n in h.runtime.list_networks()}
    assert {"bridge", "host", "none"} <= names, "the engine's own networks are listed too"
    labels = {"dabctl.stack": h.stack, "dabctl.owner": h.stack, "k": "v"}
    nid = h.runtime.create_network(NetworkRequest(f"{h.stack}_n", "bridge", True, labels))
    (listed,) = [n for n in h.runtime.list_networks() if n.id == nid]
    assert (listed.name, dict(listed.labels), listed.owned_by(h.stack), listed.stack) == (
        f"{h.stack}_n",
        labels,
        True,
        h.stack,
    )

    with pytest.raises(docker.errors.APIError) as refused:
        h.runtime.create_network(NetworkRequest(f"{h.stack}_n", "bridge", False, labels))
    assert refused.value.status_code == 409 and "already exists" in str(refused.value)

    h.runtime.remove_network(nid)
    assert nid not in {n.id for n in h.runtime.list_networks()}
    h.runtime.remove_network(nid)  # gone already is fine


def test_a_network_with_a_running_container_cannot_be_removed(h: Harness) -> None:
    nid = h.network()
    cid = h.runtime.create_replica(h.request(h.target()))
    h.runtime.start_replica(cid)
    with pytest.raises(docker.errors.APIError) as refused:
        h.runtime.remove_network(nid)
    assert refused.value.status_code == 403 and "has active endpoints" in str(refused.value)
    h.runtime.remove_replica(h.replica(h.stack, cid))
    h.runtime.remove_network(nid)
    assert nid not in {n.id for n in h.runtime.list_networks()}


def test_a_container_never_started_does_not_hold_its_network(h: Harness) -> None:
    nid = h.network()
    h.runtime.create_replica(h.request(h.target()))
    h.runtime.remove_network(nid)
    assert nid not in {n.id for n in h.runtime.list_networks()}


# --- an engine that does not answer --------------------------------------------------------------------------------


def _engine_error(call: Callable[[], object]) -> str:
    """The EngineError's message; the exception (and the socket its context holds) goes with this frame."""
    with pytest.raises(EngineError) as error:
        call()
    return str(error.value)


# docker-py's unix-socket connection drops, without closing it, a socket whose connect failed: the garbage collector
# closes it and warns. Not ours to fix here; the warning is not the contract.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_engine_that_does_not_answer_is_one_engine_error_naming_it(h: Harness, tmp_path: Path) -> None:
    down = h.unreachable(tmp_path)
    calls: list[Callable[[], object]] = [
        down.ping,
        lambda: down.list_replicas(h.stack),
        down.list_networks,
        lambda: down.create_network(NetworkRequest(f"{h.stack}_x", "bridge", False, {})),
        lambda: down.create_replica(h.request(h.target())),
        lambda: down.container_state("0" * 64),
    ]
    messages = [_engine_error(call) for call in calls]
    assert all(m.startswith(f"no Docker engine answers at {down.url} (") and "\n" not in m for m in messages), messages
    down.close()
    gc.collect()  # those sockets are collected now, while their warnings are ignored, not in a later test


# --- events -------------------------------------------------------------------------------------------------------


def test_events_name_the_container_and_carry_its_labels(h: Harness) -> None:
    since = int(time.time())
    h.network()
    cid = h.runtime.create_replica(h.request(h.target()))
    h.runtime.start_replica(cid)
    h.runtime.remove_replica(h.replica(h.stack, cid))

    stream = h.runtime.events(since)
    seen: list[dict[str, Any]] = []

    def read() -> None:
        for ev in stream:
            if (ev.get("Actor") or {}).get("ID") == cid:
                seen.append(ev)
                if ev.get("Action") == "destroy":
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    stream.close()
    actions = [ev["Action"] for ev in seen]
    assert actions[0] == "create" and "start" in actions and "die" in actions and actions[-1] == "destroy", actions
    assert all(ev["Type"] == "container" for ev in seen)
    attributes = seen[0]["Actor"]["Attributes"]
    assert (attributes["dabctl.owner"], attributes["dabctl.stack"], attributes["dabctl.slot"]) == (
        h.stack,
        h.stack,
        "1",
    )
