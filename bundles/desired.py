"""Desired state derived from bundles: stacks, resolved networks, and the container spec each replica gets.

The spec hash covers only what changes a container: canonical JSON without defaults, prefixed with a
format version, so that a new optional field never restarts every container on upgrade.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.bundle import Bundle, Network, Service

SPEC_FORMAT = "v1"
_CONTAINER_FIELDS = {
    "image",
    "command",
    "args",
    "env",
    "labels",
    "mounts",
    "user",
    "working_dir",
    "healthcheck",
    "stop_grace_period",
    "stop_signal",
}


@dataclass(frozen=True, kw_only=True)
class StackBundle:
    """One stack as loaded: its bundle, the file's text and the revision at which that file last changed."""

    name: str
    file: str
    bundle: Bundle
    content: str
    revision: str
    bundle_hash: str
    image_ids: Mapping[str, str] = field(default_factory=dict)  # service -> image ID to run (a pinned revision)

    @functools.cached_property
    def _targets(self) -> tuple[ServiceTarget, ...]:
        # A loaded stack never changes (a new load makes a new StackBundle), and an agent plans the same one pass
        # after pass: computing every service's spec and hash once saves most of a no-op pass's planning.
        return tuple(_service_targets(self))


@dataclass(frozen=True)
class DesiredState:
    """Every stack the source describes, by name."""

    stacks: Mapping[str, StackBundle] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class NetworkTarget:
    """A network a stack needs: managed ones are created by dabctl, external ones must exist."""

    stack: str
    name: str
    full_name: str
    spec: Network
    external: bool


@dataclass(frozen=True, kw_only=True)
class ServiceTarget:
    """One service's container spec, its hash and the canonical document the hash covers."""

    stack: str
    name: str
    service: Service
    networks: tuple[str, ...]
    spec: Mapping[str, Any]
    spec_hash: str
    image_id: str = ""  # a recorded image ID to run instead of resolving the reference (rollback); not hashed

    @property
    def full_name(self) -> str:
        return f"{self.stack}_{self.name}"


def canonical_json(doc: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def bundle_hash(bundle: Bundle) -> str:
    """Hash of the whole bundle as validated (not the file's bytes): formatting changes do not change it."""
    doc = bundle.model_dump(mode="json", exclude_defaults=True)
    return "sha256:" + hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def network_name(stack: str, name: str, bundle: Bundle) -> str:
    """The engine's name for a network a stack refers to: `<stack>_<name>`, or the name itself when External."""
    spec = (bundle.networks or {}).get(name)
    return name if spec is not None and spec.external else f"{stack}_{name}"


def desired_networks(stack: StackBundle) -> list[NetworkTarget]:
    """Networks the stack defines or its services name; a service naming none joins `default`."""
    defined = dict(stack.bundle.networks or {})
    used = {n for svc in stack.bundle.services.values() for n in (svc.networks or ["default"])}
    out = []
    for name in sorted(set(defined) | used):
        spec = defined.get(name, Network())
        out.append(
            NetworkTarget(
                stack=stack.name,
                name=name,
                full_name=network_name(stack.name, name, stack.bundle),
                spec=spec,
                external=spec.external,
            )
        )
    return out


def container_spec(stack: str, name: str, service: Service, bundle: Bundle) -> dict[str, Any]:
    """The canonical document of everything that changes a replica's container, without defaults."""
    doc: dict[str, Any] = service.model_dump(mode="json", exclude_defaults=True, include=_CONTAINER_FIELDS)
    resources = service.deploy.resources.model_dump(mode="json", exclude_defaults=True)
    if resources:
        doc["Resources"] = resources
    doc["Networks"] = {network_name(stack, n, bundle): [name] for n in (service.networks or ["default"])}
    return doc


def spec_hash(spec: Mapping[str, Any]) -> str:
    """Stable, versioned hash of a container spec document."""
    text = f"{SPEC_FORMAT}:{canonical_json(spec)}"
    return f"{SPEC_FORMAT}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def service_targets(stack: StackBundle) -> list[ServiceTarget]:
    """Every service of a stack with its resolved networks and spec hash, in name order (computed once a stack)."""
    return list(stack._targets)


def _service_targets(stack: StackBundle) -> list[ServiceTarget]:
    out = []
    for name in sorted(stack.bundle.services):
        svc = stack.bundle.services[name]
        spec = container_spec(stack.name, name, svc, stack.bundle)
        out.append(
            ServiceTarget(
                stack=stack.name,
                name=name,
                service=svc,
                networks=tuple(spec["Networks"]),
                spec=spec,
                spec_hash=spec_hash(spec),
                image_id=stack.image_ids.get(name, ""),
            )
        )
    return out
