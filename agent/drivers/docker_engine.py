"""The Docker SDK side of the reconcilers' Protocols: containers, networks and images on one engine.

Uses docker-py's low-level APIClient so that every engine call is visible and counted: observing is exactly
one list call per kind, and nothing is inspected per object. (Outside passes, the agent inspects one container
after its exit event: `container_state`.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

import docker
import docker.auth
import docker.errors
import docker.types
import requests

from bundles.desired import ServiceTarget
from reconcilers.networks import NetworkRequest, ObservedNetwork
from reconcilers.outcome import one_line
from reconcilers.services import Replica, ReplicaRequest
from schemas.bundle import memory_bytes, nano_cpus
from schemas.errors import DabctlError

API_VERSION = "1.41"  # Docker 20.10; every later engine still serves it
_EXITED = re.compile(r"^Exited \((-?\d+)\)")
_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


class EngineError(DabctlError):
    """The Docker engine cannot be reached or refused a request."""

    retryable = True


SdkError = docker.errors.DockerException  # what docker-py raises where no driver method translated it


P = ParamSpec("P")
R = TypeVar("R")


def _reachable(method: Callable[Concatenate[DockerEngine, P], R]) -> Callable[Concatenate[DockerEngine, P], R]:
    """Turn a lost connection to the engine into one line that names the engine."""

    @functools.wraps(method)
    def call(self: DockerEngine, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            raise EngineError(f"no Docker engine answers at {self.url} ({one_line(exc)})") from None

    return call


class ImageUnavailable(EngineError):
    """An image is missing and could not be pulled."""


def _nanos(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e9)


class EventStream:
    """An iterator of Docker event documents; close() ends it from another thread."""

    def __init__(self, stream: Any, api: docker.APIClient) -> None:
        self._stream = stream
        self._api = api

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._stream)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        self._api.close()


class DockerEngine:
    """ContainerRuntime and NetworkRuntime on a Docker engine."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout: int = 120,
        docker_config: str | None = None,
        connections: int = 10,
    ) -> None:
        url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.url = url
        # One kept connection per concurrent caller (apply's pool and more): beyond the pool, urllib3 opens and
        # discards a connection per call and logs a warning each time.
        self.api = docker.APIClient(base_url=url, version=API_VERSION, timeout=timeout, max_pool_size=connections)
        if docker_config:
            # Registry credentials (and credential helpers) from the Docker client config; they are sent to the
            # engine with each pull and never stored by dabctl.
            path = os.path.join(docker_config, "config.json")
            # docker-py keeps the client config here and has no public way to load another file.
            self.api._auth_configs = docker.auth.load_config(config_path=path)  # type: ignore[attr-defined]
        self.default_pull_policy = "if-not-present"
        self._pull_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def close(self) -> None:
        self.api.close()

    def events(self, since: int) -> EventStream:
        """Container and network events from `since` (seconds); on its own connection, with no read timeout."""
        # types-docker says int; docker-py hands it to requests, where None means no read timeout.
        api = docker.APIClient(base_url=self.url, version=API_VERSION, timeout=None)  # type: ignore[arg-type]
        try:
            stream = api.events(since=since, decode=True, filters={"type": ["container", "network"]})
        except Exception:
            api.close()
            raise
        return EventStream(stream, api)

    def ping(self) -> None:
        """Raise EngineError with a fix when no engine answers."""
        try:
            self.api.ping()
        except Exception as exc:
            raise EngineError(
                f"no Docker engine answers at {self.url} ({one_line(exc)}); start dockerd or set DOCKER_HOST"
            ) from None

    # --- containers ----------------------------------------------------------------------------------------

    @_reachable
    def list_replicas(self, owner: str) -> list[Replica]:
        rows = self.api.containers(all=True, filters={"label": [f"dabctl.owner={owner}", "dabctl.slot"]})
        return [_replica(row) for row in rows]

    @_reachable
    def container_state(self, container_id: str) -> str:
        """One container's State.Status ("running", "exited", ...); "removed" when it is gone.

        The engine answers only once it has finished handling a pending exit of that container."""
        try:
            return str(self.api.inspect_container(container_id)["State"]["Status"])
        except docker.errors.NotFound:
            return "removed"

    @_reachable
    def create_replica(self, request: ReplicaRequest) -> str:
        kwargs = self._create_kwargs(request)
        try:
            cid = self._create(kwargs)
        except docker.errors.ImageNotFound:
            kwargs["image"] = self.prepare_image(request.target)
            cid = self._create(kwargs)
        aliases = [request.target.name]
        for network in request.target.networks[1:]:
            self.api.connect_container_to_network(cid, network, aliases=aliases)
        return cid

    def _create(self, kwargs: Mapping[str, Any]) -> str:
        return str(self.api.create_container(**kwargs)["Id"])

    def _create_kwargs(self, request: ReplicaRequest) -> dict[str, Any]:
        svc = request.target.service
        limits = svc.deploy.resources.limits
        reservations = svc.deploy.resources.reservations
        target = request.target
        mounts = [
            docker.types.Mount(
                target=m.target,
                source=target.volume(m.source) if m.type == "volume" and m.source else m.source or "",
                type=m.type,
                read_only=m.read_only,
            )
            for m in svc.mounts or []
        ]
        host_config = self.api.create_host_config(
            restart_policy={"Name": "no"},
            mounts=mounts or None,
            nano_cpus=nano_cpus(limits.cpus) if limits and limits.cpus else None,
            mem_limit=memory_bytes(limits.memory) if limits and limits.memory else None,
            mem_reservation=memory_bytes(reservations.memory) if reservations and reservations.memory else None,
        )
        first = request.target.networks[0]
        # types-docker wants one EndpointConfig; the engine (and docker-py) take a mapping network -> config.
        networking = self.api.create_networking_config(
            {first: self.api.create_endpoint_config(aliases=[request.target.name])}  # type: ignore[arg-type]
        )
        healthcheck = None
        if svc.healthcheck is not None:
            hc = svc.healthcheck
            healthcheck = {
                "Test": hc.test,
                "Interval": _nanos(hc.interval.total_seconds()) if hc.interval else None,
                "Timeout": _nanos(hc.timeout.total_seconds()) if hc.timeout else None,
                "Retries": hc.retries,
                "StartPeriod": _nanos(hc.start_period.total_seconds()) if hc.start_period else None,
            }
            healthcheck = {k: v for k, v in healthcheck.items() if v is not None}
        return {
            "image": request.target.image_id or svc.image,
            "name": request.name,
            "entrypoint": svc.command,
            "command": svc.args,
            "environment": svc.env,
            "labels": dict(request.labels),
            "working_dir": svc.working_dir,
            "user": svc.user or "",
            "healthcheck": healthcheck,
            "stop_signal": svc.stop_signal,
            "stop_timeout": max(0, round(svc.stop_grace_period.total_seconds())),
            "host_config": host_config,
            "networking_config": networking,
        }

    @_reachable
    def start_replica(self, container_id: str) -> None:
        self.api.start(container_id)

    @_reachable
    def remove_replica(self, replica: Replica) -> None:
        """Stop with the container's own signal and grace period, then remove; gone already is fine."""
        try:
            if replica.state in ("running", "restarting", "paused"):
                self.api.stop(replica.id)
            self.api.remove_container(replica.id, force=True)
        except docker.errors.NotFound:
            pass

    # --- images ----------------------------------------------------------------------------------------------

    @_reachable
    def prepare_image(self, target: ServiceTarget) -> str:
        """Make the image `target` runs present (pulling per its policy); the reference to create with.

        A recorded image ID that is gone falls back to the bundle's reference; a `repo@sha256:` reference (a tag's
        new digest) is pulled by digest."""
        svc = target.service
        policy = svc.pull_policy or self.default_pull_policy
        wanted = target.image_id or svc.image
        if self._present(wanted):
            return wanted
        if wanted.startswith("sha256:"):
            wanted = svc.image
        self.ensure_image(wanted, policy)
        return wanted

    def _present(self, ref: str) -> bool:
        try:
            self.api.inspect_image(ref)  # type: ignore[no-untyped-call]  # untyped in types-docker
            return True
        except docker.errors.ImageNotFound:
            return False

    @_reachable
    def registry_digest(self, ref: str) -> str:
        """The digest the registry serves for `ref` now (a read: GET /distribution/<ref>/json)."""
        try:
            info = self.api.inspect_distribution(ref)  # type: ignore[no-untyped-call]  # untyped in types-docker
            return str(info["Descriptor"]["digest"])
        except docker.errors.APIError as exc:
            raise ImageUnavailable(
                f"checking {ref} at its registry failed: {one_line(exc.explanation or exc)}"
            ) from None

    @_reachable
    def image_identity(self, ref: str) -> tuple[str, str]:
        """(image ID, repository digest) of a local image; empty strings when absent or never pulled."""
        try:
            info = self.api.inspect_image(ref)  # type: ignore[no-untyped-call]  # untyped in types-docker
        except docker.errors.ImageNotFound:
            return "", ""
        repo = _split_ref(ref)[0].split("@", 1)[0]
        digests = [d.split("@", 1)[1] for d in info.get("RepoDigests") or [] if d.split("@", 1)[0] == repo]
        return str(info["Id"]), digests[0] if digests else ""

    @_reachable
    def ensure_image(self, ref: str, policy: str) -> None:
        """Pull a missing image once, however many replicas ask for it at the same time."""
        with self._locks_guard:
            lock = self._pull_locks.setdefault(ref, threading.Lock())
        with lock:
            try:
                self.api.inspect_image(ref)  # type: ignore[no-untyped-call]  # untyped in types-docker
                return
            except docker.errors.ImageNotFound:
                pass
            if policy == "never":
                raise ImageUnavailable(f"image {ref} is not on this node and PullPolicy is never; load it first")
            self.pull(ref)

    def pull(self, ref: str) -> None:
        repo, tag = _split_ref(ref)
        try:
            for event in self.api.pull(repo, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise ImageUnavailable(f"pulling {ref} failed: {event['error']}")
        except docker.errors.APIError as exc:
            raise ImageUnavailable(f"pulling {ref} failed: {one_line(exc.explanation or exc)}") from None

    # --- networks -----------------------------------------------------------------------------------------

    # --- volumes -----------------------------------------------------------------------------------------------

    @_reachable
    def list_volumes(self) -> set[str]:
        return {v["Name"] for v in self.api.volumes().get("Volumes") or []}

    @_reachable
    def copy_volume(self, old: str, new: str, image: str) -> None:
        """Through a helper container that is created, never started, and has no network: the engine streams
        `old`'s files out as a tar archive and into `new` (owners and modes kept), without holding them in memory."""
        self.api.create_volume(new)
        host_config = self.api.create_host_config(
            mounts=[
                docker.types.Mount(target="/from", source=old, type="volume", read_only=True),
                docker.types.Mount(target="/to", source=new, type="volume"),
            ]
        )
        helper = self.api.create_container(
            image,
            name=f"dabctl-copy-{new}-{secrets.token_hex(4)}",
            entrypoint=["/dabctl-never-started"],
            host_config=host_config,
            network_disabled=True,
            labels={"dabctl.volume-copy": f"{old} -> {new}"},
        )["Id"]
        try:
            stream, _ = self.api.get_archive(helper, "/from/.")
            self.api.put_archive(helper, "/to", stream)
        except Exception:
            self.api.remove_container(helper, force=True)
            self.api.remove_volume(new)  # half a copy is not left behind to be mistaken for the data
            raise
        self.api.remove_container(helper, force=True)

    @_reachable
    def list_networks(self) -> list[ObservedNetwork]:
        return [ObservedNetwork(n["Id"], n["Name"], n.get("Labels") or {}) for n in self.api.networks()]

    @_reachable
    def create_network(self, request: NetworkRequest) -> str:
        result = self.api.create_network(
            request.name,
            driver=request.driver,
            internal=request.internal,
            labels=dict(request.labels),
            check_duplicate=True,
        )
        return str(result["Id"])

    @_reachable
    def remove_network(self, network_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.api.remove_network(network_id)


def _split_ref(ref: str) -> tuple[str, str | None]:
    if "@" in ref:
        return ref, None
    name, _, tag = ref.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return ref, "latest"


def _replica(row: Mapping[str, Any]) -> Replica:
    labels = row.get("Labels") or {}
    status = row.get("Status") or ""
    exited = _EXITED.match(status)
    health = _HEALTH.search(status)
    nets = (row.get("NetworkSettings") or {}).get("Networks") or {}
    return Replica(
        id=row["Id"],
        name=(row.get("Names") or ["/?"])[0].lstrip("/"),
        stack=labels.get("dabctl.stack", ""),
        service=labels.get("dabctl.service", ""),
        slot=labels.get("dabctl.slot", ""),
        spec_hash=labels.get("dabctl.spec", ""),
        state=row.get("State") or "",
        exit_code=int(exited.group(1)) if exited else None,
        health=health.group(1).replace("health: ", "") if health else None,
        image_id=row.get("ImageID") or "",
        revision=labels.get("dabctl.revision", ""),
        created=int(row.get("Created") or 0),
        networks={name: (n or {}).get("NetworkID", "") for name, n in nets.items()},
        addresses={name: (n or {}).get("IPAddress", "") for name, n in nets.items()},
    )
