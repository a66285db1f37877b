"""Fakes for fast tests of the node pass and the agent loop: an in-memory container engine and a ruleset.

As SwarmKit's fakes do, each records its calls (`calls`) and raises the errors a test puts in its table
(`fail(method, error)`). `FakeRuntime` implements `agent.node.runtime.Runtime` and behaves like the Docker engine
in everything the contract suite (`tests/runtime/test_contract.py`) checks on both: the container state machine
(created -> running -> exited), health (starting until the test says healthy or unhealthy), images present or
missing (pulled from a fake registry), name conflicts, a network with running containers that cannot be removed,
and an engine that does not answer. Errors are the real driver's types (`EngineError`, `ImageUnavailable`, and
docker-py's `APIError` for what the engine refuses).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import docker.errors
import requests

from agent.drivers.docker_engine import EngineError, ImageUnavailable
from bundles.desired import ServiceTarget
from reconcilers.loadbalancer import Backend, Balance, BalancerAction, BalancerUnavailable, Frontend
from reconcilers.networks import NetworkRequest, ObservedNetwork
from reconcilers.services import Replica, ReplicaRequest

BUILTIN_NETWORKS = ("bridge", "host", "none")  # every Docker engine lists these


def image_id_of(ref: str) -> str:
    """A stable image ID for a reference, as a fake registry builds it."""
    return "sha256:" + hashlib.sha256(ref.encode()).hexdigest()


def api_error(status: int, reason: str, explanation: str, path: str) -> docker.errors.APIError:
    """The error docker-py raises when the engine answers `status` (its message reads the same)."""
    response = requests.Response()
    response.status_code = status
    response.reason = reason
    response.url = f"http+docker://localhost/v1.41{path}"
    kind = docker.errors.NotFound if status == 404 else docker.errors.APIError
    return kind(requests.HTTPError(response=response), response=response, explanation=explanation)


@dataclass(kw_only=True)
class FakeContainer:
    id: str
    name: str
    image: str  # the reference it was created with
    image_id: str
    labels: dict[str, str]
    networks: list[str]
    created: int
    healthcheck: bool = False
    state: str = "created"  # created | running | exited | dead
    exit_code: int | None = None
    health: str | None = None  # starting | healthy | unhealthy while running with a healthcheck


@dataclass
class FakeNetwork:
    id: str
    name: str
    _: KW_ONLY
    labels: dict[str, str] = field(default_factory=dict)
    driver: str = "bridge"
    internal: bool = False


class FakeEvents:
    """A live event stream: what happened since `since`, then new events as they come, until close()."""

    def __init__(self, runtime: FakeRuntime, since: int) -> None:
        self._runtime = runtime
        self._since = since
        self._closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seen = 0
        cond = self._runtime._cond
        while True:
            with cond:
                while not self._closed and seen >= len(self._runtime.event_log):
                    cond.wait()
                if self._closed:
                    return
                batch = self._runtime.event_log[seen:]
                seen = len(self._runtime.event_log)
            yield from (ev for ev in batch if ev["time"] >= self._since)

    def close(self) -> None:
        with self._runtime._cond:
            self._closed = True
            self._runtime._cond.notify_all()


class FakeRuntime:
    """An in-memory Docker engine (see the module docstring); thread-safe, since a pass applies in a pool."""

    def __init__(
        self,
        images: Iterable[str] = ("dabctl/sample:1",),
        registry: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        url: str = "fake:///engine",
    ) -> None:
        self.url = url
        self.default_pull_policy = "if-not-present"
        self.clock = clock
        self.reachable = True
        self.containers: dict[str, FakeContainer] = {}
        self.networks: dict[str, FakeNetwork] = {}
        self.volumes: dict[str, dict[str, str]] = {}  # name -> its files (path -> content), as copies see them
        self.images: dict[str, tuple[str, str]] = {ref: (image_id_of(ref), "") for ref in images}  # ref -> (id, digest)
        self.registry: dict[str, str] = dict(registry or {})  # what a pull can fetch: ref -> repository digest
        self.calls: list[tuple[str, ...]] = []
        self.event_log: list[dict[str, Any]] = []
        self.closed = False
        self._errors: dict[str, list[BaseException]] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        for name in BUILTIN_NETWORKS:
            nid = self._id()
            self.networks[nid] = FakeNetwork(nid, name, driver=name if name != "none" else "null")

    # --- what tests drive -----------------------------------------------------------------------------------

    def fail(self, method: str, error: BaseException, times: int = 1) -> None:
        """The next `times` calls of `method` raise `error` (before doing anything)."""
        self._errors.setdefault(method, []).extend([error] * times)

    def writes(self) -> list[tuple[str, ...]]:
        """Calls that change the engine."""
        reads = {
            "list_replicas",
            "list_networks",
            "list_volumes",
            "container_state",
            "image_identity",
            "registry_digest",
            "ping",
        }
        return [c for c in self.calls if c[0] not in reads and c[0] not in ("events", "close")]

    def set_health(self, ref: str, health: str) -> None:
        with self._cond:
            c = self._find(ref)
            assert c.state == "running" and c.healthcheck, f"{c.name} runs no healthcheck"
            c.health = health
            self._event("container", f"health_status: {health}", c.id, self._attrs(c))

    def exit(self, ref: str, code: int = 0) -> None:
        """The container's process ends with `code`."""
        with self._cond:
            c = self._find(ref)
            assert c.state == "running", f"{c.name} is {c.state}"
            c.state, c.exit_code, c.health = "exited", code, None
            self._event("container", "die", c.id, {**self._attrs(c), "exitCode": str(code)})

    def add_image(self, ref: str, image_id: str | None = None, digest: str = "") -> str:
        with self._cond:
            self.images[ref] = (image_id or image_id_of(ref), digest)
            return self.images[ref][0]

    def remove_image(self, ref: str) -> None:
        with self._cond:
            self.images.pop(ref, None)

    def seed_container(
        self,
        name: str,
        labels: Mapping[str, str],
        networks: Sequence[str],
        *,
        image: str = "dabctl/sample:1",
        state: str = "running",
        health: str | None = None,
        image_id: str | None = None,
    ) -> str:
        """A container as another dabctl (an older version, say) left it; its networks must exist."""
        with self._cond:
            by_name = {n.name for n in self.networks.values()}
            missing = [n for n in networks if n not in by_name]
            assert not missing, f"seed the networks first: {missing}"
            cid = self._id()
            c = FakeContainer(
                id=cid,
                name=name,
                image=image,
                image_id=image_id or self.images.get(image, (image_id_of(image), ""))[0],
                labels=dict(labels),
                networks=list(networks),
                created=int(self.clock()),
                healthcheck=health is not None,
                state=state,
                health=health,
            )
            self.containers[cid] = c
            return cid

    def seed_network(self, name: str, labels: Mapping[str, str], driver: str = "bridge", internal: bool = False) -> str:
        with self._cond:
            n = FakeNetwork(self._id(), name, labels=dict(labels), driver=driver, internal=internal)
            self.networks[n.id] = n
            return n.id

    def by_name(self, prefix: str) -> list[FakeContainer]:
        """Containers whose name starts with `prefix`, oldest first."""
        with self._cond:
            return sorted((c for c in self.containers.values() if c.name.startswith(prefix)), key=lambda c: c.name)

    def network_named(self, name: str) -> FakeNetwork | None:
        with self._cond:
            return next((n for n in self.networks.values() if n.name == name), None)

    # --- the Runtime ---------------------------------------------------------------------------------------

    def ping(self) -> None:
        self._call("ping")

    def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True

    def events(self, since: int) -> FakeEvents:
        self._call("events", str(since))
        return FakeEvents(self, since)

    def list_replicas(self, owner: str) -> list[Replica]:
        self._call("list_replicas", owner)
        with self._cond:
            return [
                self._replica(c)
                for c in self.containers.values()
                if c.labels.get("dabctl.owner") == owner and "dabctl.slot" in c.labels
            ]

    def container_state(self, container_id: str) -> str:
        self._call("container_state", container_id)
        with self._cond:
            c = self.containers.get(container_id)
            return c.state if c else "removed"

    def create_replica(self, request: ReplicaRequest) -> str:
        self._call("create_replica", request.name)
        ref = request.target.image_id or request.target.service.image
        with self._cond:
            present = ref in self.images or any(i == ref for i, _ in self.images.values())
        if not present:
            ref = self.prepare_image(request.target)
        with self._cond:
            if any(c.name == request.name for c in self.containers.values()):
                raise api_error(
                    409,
                    "Conflict",
                    f'Conflict. The container name "/{request.name}" is already in use by container '
                    f'"{next(c.id for c in self.containers.values() if c.name == request.name)}". '
                    "You have to remove (or rename) that container to be able to reuse that name.",
                    f"/containers/create?name={request.name}",
                )
            first, *more = request.target.networks
            if self._network(first) is None:
                raise api_error(404, "Not Found", f"network {first} not found", "/containers/create")
            image_id = ref if ref.startswith("sha256:") else self.images[ref][0]
            c = FakeContainer(
                id=self._id(),
                name=request.name,
                image=ref,
                image_id=image_id,
                labels=dict(request.labels),
                networks=[first],
                created=int(self.clock()),
                healthcheck=request.target.service.healthcheck is not None,
            )
            for m in request.target.service.mounts or []:
                if m.type == "volume" and m.source:  # the engine creates a missing named volume, empty
                    self.volumes.setdefault(request.target.volume(m.source), {})
            self.containers[c.id] = c
            self._event("container", "create", c.id, self._attrs(c))
            for name in more:  # joined one by one after the create, as the driver does
                if self._network(name) is None:
                    raise api_error(404, "Not Found", f"network {name} not found", f"/networks/{name}/connect")
                c.networks.append(name)
            return c.id

    def start_replica(self, container_id: str) -> None:
        self._call("start_replica", container_id)
        with self._cond:
            c = self.containers.get(container_id)
            if c is None:
                raise api_error(
                    404, "Not Found", f"No such container: {container_id}", f"/containers/{container_id}/start"
                )
            if c.state == "running":
                return
            c.state, c.exit_code = "running", None
            c.health = "starting" if c.healthcheck else None
            self._event("container", "start", c.id, self._attrs(c))

    def remove_replica(self, replica: Replica) -> None:
        self._call("remove_replica", replica.id)
        with self._cond:
            c = self.containers.pop(replica.id, None)
            if c is None:
                return  # gone already is fine
            if c.state == "running":
                self._event("container", "kill", c.id, self._attrs(c))
                self._event("container", "die", c.id, {**self._attrs(c), "exitCode": "0"})
            self._event("container", "destroy", c.id, self._attrs(c))

    def prepare_image(self, target: ServiceTarget) -> str:
        self._call("prepare_image", target.full_name)
        svc = target.service
        policy = svc.pull_policy or self.default_pull_policy
        wanted = target.image_id or svc.image
        with self._cond:
            if wanted in self.images or any(i == wanted for i, _ in self.images.values()):
                return wanted
        if wanted.startswith("sha256:"):
            wanted = svc.image
        self.ensure_image(wanted, policy)
        return wanted

    def ensure_image(self, ref: str, policy: str) -> None:
        with self._cond:
            if ref in self.images:
                return
        if policy == "never":
            raise ImageUnavailable(f"image {ref} is not on this node and PullPolicy is never; load it first")
        self.pull(ref)

    def pull(self, ref: str) -> None:
        self.calls.append(("pull", ref))
        with self._cond:
            digest = self.registry.get(ref.split("@", 1)[0]) or (ref.split("@", 1)[1] if "@" in ref else None)
            if digest is None:
                raise ImageUnavailable(f"pulling {ref} failed: repository does not exist or may require 'docker login'")
            self.images[ref] = (image_id_of(f"{ref}@{digest}"), digest)

    def registry_digest(self, ref: str) -> str:
        self._call("registry_digest", ref)
        with self._cond:
            digest = self.registry.get(ref)
        if digest is None:
            raise ImageUnavailable(f"checking {ref} at its registry failed: no such image in the fake registry")
        return digest

    def image_identity(self, ref: str) -> tuple[str, str]:
        self._call("image_identity", ref)
        with self._cond:
            if ref in self.images:
                return self.images[ref]
            by_id = [v for v in self.images.values() if v[0] == ref]
            return by_id[0] if by_id else ("", "")

    def list_volumes(self) -> set[str]:
        self._call("list_volumes")
        with self._cond:
            return set(self.volumes)

    def copy_volume(self, old: str, new: str, image: str) -> None:
        self._call("copy_volume", old, new)
        with self._cond:
            if old not in self.volumes:
                raise api_error(404, "Not Found", f"get {old}: no such volume", "/volumes/create")
            self.volumes.setdefault(new, {}).update(self.volumes[old])

    def list_networks(self) -> list[ObservedNetwork]:
        self._call("list_networks")
        with self._cond:
            return [ObservedNetwork(n.id, n.name, dict(n.labels)) for n in self.networks.values()]

    def create_network(self, request: NetworkRequest) -> str:
        self._call("create_network", request.name)
        with self._cond:
            if self._network(request.name) is not None:
                raise api_error(409, "Conflict", f"network with name {request.name} already exists", "/networks/create")
            n = FakeNetwork(
                self._id(), request.name, labels=dict(request.labels), driver=request.driver, internal=request.internal
            )
            self.networks[n.id] = n
            self._event("network", "create", n.id, {"name": n.name, "type": n.driver})
            return n.id

    def remove_network(self, network_id: str) -> None:
        self._call("remove_network", network_id)
        with self._cond:
            n = self.networks.get(network_id)
            if n is None:
                return
            if any(c.state == "running" and n.name in c.networks for c in self.containers.values()):
                raise api_error(
                    403,
                    "Forbidden",
                    f"error while removing network: network {n.name} id {n.id} has active endpoints",
                    f"/networks/{n.id}",
                )
            del self.networks[network_id]
            self._event("network", "destroy", n.id, {"name": n.name, "type": n.driver})

    # --- inside ----------------------------------------------------------------------------------------------

    def _call(self, method: str, *args: str) -> None:
        with self._cond:
            self.calls.append((method, *args))
            queued = self._errors.get(method)
            error = queued.pop(0) if queued else None
        if not self.reachable:
            raise EngineError(f"no Docker engine answers at {self.url} (Connection refused)")
        if error is not None:
            raise error

    def _id(self) -> str:
        return hashlib.sha256(f"fake-{next(self._ids)}".encode()).hexdigest()

    def _find(self, ref: str) -> FakeContainer:
        matches = [c for c in self.containers.values() if c.id == ref or c.name == ref or c.name.startswith(ref)]
        assert len(matches) == 1, f"{ref!r} names {len(matches)} containers"
        return matches[0]

    def _network(self, name_or_id: str) -> FakeNetwork | None:
        return next((n for n in self.networks.values() if name_or_id in (n.name, n.id)), None)

    def _attrs(self, c: FakeContainer) -> dict[str, str]:
        return {**c.labels, "name": c.name, "image": c.image}

    def _event(self, kind: str, action: str, actor: str, attributes: Mapping[str, str]) -> None:
        now = self.clock()
        self.event_log.append(
            {
                "Type": kind,
                "Action": action,
                "Actor": {"ID": actor, "Attributes": dict(attributes)},
                "time": int(now),
                "timeNano": int(now * 1e9),
            }
        )
        self._cond.notify_all()

    def _replica(self, c: FakeContainer) -> Replica:
        running = c.state == "running"
        nets = {name: self._network(name) for name in c.networks}
        return Replica(
            id=c.id,
            name=c.name,
            stack=c.labels.get("dabctl.stack", ""),
            service=c.labels.get("dabctl.service", ""),
            slot=c.labels.get("dabctl.slot", ""),
            spec_hash=c.labels.get("dabctl.spec", ""),
            state=c.state,
            exit_code=c.exit_code if c.state == "exited" else None,
            health=c.health if running else None,
            image_id=c.image_id,
            revision=c.labels.get("dabctl.revision", ""),
            created=c.created,
            # A never-started container lists its networks without an ID (it joins them by name on start).
            networks={name: (n.id if n and c.state != "created" else "") for name, n in nets.items()},
            addresses={name: (_address(c.id, i) if running else "") for i, name in enumerate(c.networks)},
        )


def _address(container_id: str, index: int) -> str:
    return f"172.{20 + index}.{int(container_id[:2], 16)}.{int(container_id[2:4], 16) or 1}"


class FakeRuleset:
    """A balancer backend in memory: what was written is what is read back."""

    name = "fake"

    def __init__(self) -> None:
        self.balance: dict[Frontend, tuple[Backend, ...]] = {}
        self.writes: list[list[BalancerAction]] = []
        self.unavailable: str | None = None  # set: reads and writes raise BalancerUnavailable with this text
        self.write_errors: list[BaseException] = []

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        if self.unavailable:
            raise BalancerUnavailable(self.unavailable)
        return dict(self.balance)

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        if self.unavailable:
            raise BalancerUnavailable(self.unavailable)
        if self.write_errors:
            raise self.write_errors.pop(0)
        self.writes.append(list(actions))
        self.balance = dict(desired)


@contextlib.contextmanager
def unreachable(runtime: FakeRuntime) -> Iterator[None]:
    """The engine stops answering for the duration."""
    runtime.reachable = False
    try:
        yield
    finally:
        runtime.reachable = True


class CountingLog:
    """A real state log that counts the write calls made on it (put, delete, txn); reads pass through."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self.writes.append(f"put {key}")
        return int(self.log.put(key, value, lease))

    def delete(self, key: str, prefix: bool = False) -> int:
        self.writes.append(f"delete {key}")
        return int(self.log.delete(key, prefix))

    def txn(
        self, compares: Sequence[Any], then_ops: Sequence[Any], else_ops: Sequence[Any] = (), *, durable: bool = True
    ) -> Any:
        self.writes.append("txn " + ", ".join(getattr(op, "key", "?") for op in then_ops))
        return self.log.txn(compares, then_ops, else_ops, durable=durable)
