"""Desired state derived from bundles: stacks, resolved networks, and the container spec each replica gets.

The spec hash covers only what changes a container: canonical JSON without defaults, prefixed with a
format version, so that a new optional field never restarts every container on upgrade.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from schemas.bundle import Bundle, Network, Service

SPEC_FORMAT = "v1"
# How a stack's named volumes are named on the engine: `<stack>_<name>` (stacks first deployed with scoped names),
# or the name as written (stacks whose state predates them, until they are migrated).
VolumeNames = Literal["scoped", "legacy"]
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
    volume_names: VolumeNames = "scoped"  # the stack's record decides; see with_volume_names

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
    volumes: Mapping[str, str] = field(default_factory=dict)  # a named volume's Source -> the engine's name

    @property
    def full_name(self) -> str:
        return f"{self.stack}_{self.name}"

    def volume(self, source: str) -> str:
        """The engine's name of the named volume the bundle calls `source`."""
        return self.volumes.get(source, source)


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


def volume_name(stack: str, name: str, bundle: Bundle, names: VolumeNames = "scoped") -> str:
    """The engine's name for a named volume a stack mounts: `<stack>_<name>`, or the name itself when External
    or when the stack keeps the names it had before volumes were stack-scoped."""
    spec = (bundle.volumes or {}).get(name)
    return name if names == "legacy" or (spec is not None and spec.external) else f"{stack}_{name}"


def stack_volumes(stack: StackBundle) -> dict[str, str]:
    """Every named volume the stack's services mount (not the External ones): the bundle's name -> the engine's."""
    return {
        m.source: volume_name(stack.name, m.source, stack.bundle, stack.volume_names)
        for svc in stack.bundle.services.values()
        for m in svc.mounts or []
        if m.type == "volume" and m.source and not _external_volume(stack.bundle, m.source)
    }


def _external_volume(bundle: Bundle, name: str) -> bool:
    spec = (bundle.volumes or {}).get(name)
    return spec is not None and spec.external


def with_volume_names(stack: StackBundle, names: VolumeNames) -> StackBundle:
    """`stack` with its volumes named by `names` (itself when they already are)."""
    return stack if stack.volume_names == names else replace(stack, volume_names=names)


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


def container_spec(
    stack: str, name: str, service: Service, bundle: Bundle, volumes: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The canonical document of everything that changes a replica's container, without defaults.

    Mounts name volumes as the engine does (`volumes`: the bundle's name -> the engine's); a volume named as
    written leaves the document, and so the hash of a stack that predates scoped volume names, as it was."""
    doc: dict[str, Any] = service.model_dump(mode="json", exclude_defaults=True, include=_CONTAINER_FIELDS)
    for mount in doc.get("Mounts", []):
        if mount.get("Type") == "volume" and mount.get("Source") in (volumes or {}):
            mount["Source"] = (volumes or {})[mount["Source"]]
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
    volumes = stack_volumes(stack)
    for name in sorted(stack.bundle.services):
        svc = stack.bundle.services[name]
        spec = container_spec(stack.name, name, svc, stack.bundle, volumes)
        out.append(
            ServiceTarget(
                stack=stack.name,
                name=name,
                service=svc,
                networks=tuple(spec["Networks"]),
                spec=spec,
                spec_hash=spec_hash(spec),
                image_id=stack.image_ids.get(name, ""),
                volumes=volumes,
            )
        )
    return out
