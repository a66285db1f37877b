"""What a bundle may ask of the host. The agent drives the Docker socket — root on the host — from whatever lands
in a repository, so by default a bundle may not bind-mount the Docker socket, the host's `/`, or a directory that
contains either, nor `/proc` or anything under it (`/proc/1/root` is the host's `/`), nor join the host's network.
The agent config names exceptions."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from bundles.desired import DesiredState, StackBundle
from bundles.errors import BundleError, InvalidBundles
from schemas.config import AgentConfig

DOCKER_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock")
# What a refused bind mount gives the container, by rule.
_GIVES = {
    "no-host-root": "the host's root",
    "no-docker-socket": "the Docker socket",
    "no-host-proc": "the host's processes and, through /proc/1/root, the host's root",
}


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Exceptions to the default refusals, and the ports dabctl itself listens on (`own_ports`: never published)."""

    allow_bind_mounts: tuple[str, ...] = ()
    allow_host_network: bool = False
    allow_external_volumes: tuple[str, ...] = ()
    allow_external_networks: tuple[str, ...] = ()
    allow_published_ports: tuple[int, ...] = (80, 443)
    own_ports: tuple[int, ...] = ()


PRIVILEGED_PORTS = 1024  # below this, a port is a system service's (ssh, dns, smtp, ...)


def from_config(cfg: AgentConfig) -> Policy:
    """The policy an agent config sets."""
    return Policy(
        allow_bind_mounts=tuple(cfg.allow_bind_mounts),
        allow_host_network=cfg.allow_host_network,
        allow_external_volumes=tuple(cfg.allow_external_volumes),
        allow_external_networks=tuple(cfg.allow_external_networks),
        allow_published_ports=tuple(cfg.allow_published_ports),
        own_ports=cfg.own_ports,
    )


def normalise(path: str) -> str:
    """An absolute path with `.`, `..` and repeated slashes resolved lexically (`//var/./run/..` -> `/var`)."""
    out = posixpath.normpath("/" + path.lstrip("/"))
    return "/" + out.lstrip("/")


def _contains(directory: str, path: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory + "/")


def bind_rule(source: str) -> str | None:
    """The rule a bind-mount source breaks, or None."""
    src = normalise(source)
    if src == "/":
        return "no-host-root"
    for sock in DOCKER_SOCKETS:
        if _contains(src, sock):
            return "no-docker-socket"
    if _contains("/proc", src):
        return "no-host-proc"
    return None


def violations(desired: DesiredState, policy: Policy) -> list[BundleError]:
    """Every place in `desired` the policy refuses, one error each."""
    allowed = {normalise(p) for p in policy.allow_bind_mounts}
    out = []
    for stack in desired.stacks.values():
        for name, svc in stack.bundle.services.items():
            for i, m in enumerate(svc.mounts or []):
                if m.type != "bind" or not m.source:
                    continue
                rule = bind_rule(m.source)
                if rule and normalise(m.source) not in allowed:
                    out.append(
                        BundleError(
                            stack.file,
                            f"bind mount of {m.source} (gives the container {_GIVES[rule]}) "
                            f"is refused by policy rule {rule!r}",
                            field=f"Services.{name}.Mounts[{i}].Source",
                            fix=f"mount something narrower, or allow it in the agent config: "
                            f"allow_bind_mounts: [{normalise(m.source)}]",
                        )
                    )
        for net, spec in (stack.bundle.networks or {}).items():
            if spec.external and net == "host" and not policy.allow_host_network:
                out.append(
                    BundleError(
                        stack.file,
                        "joining the host's network is refused by policy rule 'no-host-network'",
                        field=f"Networks.{net}",
                        fix="use a stack network, or allow it in the agent config: allow_host_network: true",
                    )
                )
        out.extend(_reach_violations(stack, policy))
    return out


def _reach_violations(stack: StackBundle, policy: Policy) -> list[BundleError]:
    """External volumes, other stacks' networks and ports a bundle may not reach without the config's leave."""
    out = []
    for name, vol in (stack.bundle.volumes or {}).items():
        if vol.external and name not in policy.allow_external_volumes:
            out.append(
                BundleError(
                    stack.file,
                    f"External volume {name} (data outside this stack) is refused by policy rule 'no-external-volume'",
                    field=f"Volumes.{name}",
                    fix=f"use a stack volume, or allow it in the agent config: allow_external_volumes: [{name}]",
                )
            )
    for net, spec in (stack.bundle.networks or {}).items():
        owner = net.split("_", 1)[0] if "_" in net else None
        if spec.external and owner not in (None, stack.name) and net not in policy.allow_external_networks:
            out.append(
                BundleError(
                    stack.file,
                    f"External network {net} is stack {owner}'s network; joining it is refused by policy rule "
                    "'no-foreign-network'",
                    field=f"Networks.{net}",
                    fix=f"use a stack network, or allow it in the agent config: allow_external_networks: [{net}]",
                )
            )
    for svc_name, svc in stack.bundle.services.items():
        for i, p in enumerate(svc.ports or []):
            error = _port_violation(p.published_port, p.protocol, policy)
            if error:
                out.append(
                    BundleError(
                        stack.file, error[0], field=f"Services.{svc_name}.Ports[{i}].PublishedPort", fix=error[1]
                    )
                )
    return out


def _port_violation(port: int | None, protocol: str, policy: Policy) -> tuple[str, str] | None:
    """(what, fix) when a fixed PublishedPort is refused."""
    if port is None:
        return None
    if port in policy.own_ports and protocol == "tcp":
        return (
            f"PublishedPort {port}/tcp is dabctl's own port (listen or webhook_listen); "
            "it is refused by policy rule 'no-agent-port'",
            "choose another PublishedPort",
        )
    if port < PRIVILEGED_PORTS and port not in policy.allow_published_ports:
        return (
            f"PublishedPort {port}/{protocol} is below 1024 (a system service's port); it is refused by policy "
            "rule 'no-privileged-port'",
            f"choose a port from 1024 up, or allow it in the agent config: allow_published_ports: [80, 443, {port}]",
        )
    return None


def enforce(desired: DesiredState, policy: Policy) -> DesiredState:
    """`desired` unchanged, or InvalidBundles naming every refusal."""
    errors = violations(desired, policy)
    if errors:
        raise InvalidBundles(errors)
    return desired
