"""What a bundle may ask of the host. The agent drives the Docker socket — root on the host — from whatever lands
in a repository, so by default a bundle may not bind-mount the Docker socket, the host's `/`, or a directory that
contains either, nor `/proc` or anything under it (`/proc/1/root` is the host's `/`), nor join the host's network.
The agent config names exceptions."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from bundles.desired import DesiredState
from bundles.errors import BundleError, InvalidBundles

DOCKER_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock")
# What a refused bind mount gives the container, by rule.
_GIVES = {
    "no-host-root": "the host's root",
    "no-docker-socket": "the Docker socket",
    "no-host-proc": "the host's processes and, through /proc/1/root, the host's root",
}


@dataclass(frozen=True)
class Policy:
    """Exceptions to the default refusals."""

    allow_bind_mounts: tuple[str, ...] = ()
    allow_host_network: bool = False


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
    return out


def enforce(desired: DesiredState, policy: Policy) -> DesiredState:
    """`desired` unchanged, or InvalidBundles naming every refusal."""
    errors = violations(desired, policy)
    if errors:
        raise InvalidBundles(errors)
    return desired
