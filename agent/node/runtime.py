"""The node pass's view of a container engine: what the pass runner and the loop call, and nothing more.

`agent.drivers.docker_engine.DockerEngine` implements it on a real Docker engine; the fast tests run the same
passes on the in-memory fake in `tests/fakes.py`, and one contract suite (`tests/runtime/`) holds both to the
same behaviour, errors included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from reconcilers.networks import NetworkRuntime
from reconcilers.services import ContainerRuntime
from reconcilers.volumes import VolumeRuntime


class Events(Protocol):
    """A stream of engine event documents (Docker's shape: Type, Action, Actor.ID, Actor.Attributes, time)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None:
        """End the stream; an iteration in another thread stops."""
        ...


class Runtime(ContainerRuntime, NetworkRuntime, VolumeRuntime, Protocol):
    """Containers, networks, volumes and images on one engine, as the node pass and the agent loop use them.

    Errors: `EngineError` when the engine cannot be reached, `ImageUnavailable` when an image is missing and
    cannot be had; a refused request (a name in use, a network with containers on it) raises what the engine's
    client raises (`SdkError`)."""

    url: str  # where the engine answers, for messages
    default_pull_policy: str  # the pull policy of services that set none

    def ping(self) -> None:
        """Raise EngineError when no engine answers."""
        ...

    def close(self) -> None: ...

    def events(self, since: int) -> Events:
        """Container and network events from `since` (seconds since the epoch) on."""
        ...

    def container_state(self, container_id: str) -> str:
        """One container's state ("running", "exited", ...); "removed" when it is gone."""
        ...

    def registry_digest(self, ref: str) -> str:
        """The digest the registry serves for `ref` now; ImageUnavailable when it cannot say."""
        ...

    def image_identity(self, ref: str) -> tuple[str, str]:
        """(image ID, repository digest) of a local image; empty strings when absent or never pulled."""
        ...
