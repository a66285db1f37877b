"""What a bundle may ask of the host. The agent drives the Docker socket — root on the host — from whatever lands
in a repository, so by default a bundle may bind-mount nothing, join no host network, and ask for no more
containers than the agent config's caps. The agent config names exceptions.

Bind mounts (as Nomad refuses host binds unless enabled and Kubernetes' baseline forbids hostPath): a source is
refused unless it lies under an entry of `allow_bind_mounts`. A built-in deny set — Docker's and containerd's
sockets and directories, `/`, `/etc`, `/root`, `/proc`, `/sys`, `/dev`, `/boot`, and whatever the node adds
(`Policy.protected`: the configured Docker socket, dabctl's state and config directories) — wins over a prefix
entry and yields only to an entry naming exactly that path. A source hits the deny set when it is a denied path,
lies under one, or contains one (`/var` contains `/var/lib/docker`).

These checks are lexical (`/var/run` is read as `/run`, as Debian links it). The node repeats them on the
resolved path right before every create and start (agent.node.admission), where symlinks can be seen.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass

from bundles.desired import DesiredState, StackBundle
from bundles.errors import BundleError, InvalidBundles
from schemas.bundle import Service
from schemas.state import BindEntry, PolicyRecord

# Paths that are links elsewhere on every supported host (Debian, Ubuntu, Fedora): compared as their target.
_ALIASES = (("/var/run", "/run"),)


@dataclass(frozen=True)
class Denied:
    """One entry of the deny set: a path (`prefix`: any name under `path`'s parent starting with its last part,
    as in `/run/docker*`), the rule it belongs to and what mounting it gives a container."""

    path: str
    rule: str
    gives: str
    prefix: bool = False


ENGINE = "control of the container engine (root on the host)"
BUILTIN_DENY: tuple[Denied, ...] = (
    Denied(
        "/run/docker", "no-docker-socket", "the Docker socket", prefix=True
    ),  # docker.sock, docker/, docker/containerd/...
    Denied("/run/containerd", "no-docker-socket", ENGINE),
    Denied("/run/runc", "no-docker-socket", ENGINE),
    Denied("/var/lib/docker", "no-docker-socket", "Docker's data: every container's files and the engine's state"),
    Denied("/var/lib/containerd", "no-docker-socket", "containerd's data: every container's files"),
    Denied("/etc/docker", "no-docker-socket", "the engine's configuration"),
    Denied("/proc", "no-host-proc", "the host's processes and, through /proc/1/root, the host's root"),
    Denied("/etc", "no-host-system", "the host's configuration"),
    Denied("/root", "no-host-system", "root's home"),
    Denied("/sys", "no-host-system", "the kernel's settings"),
    Denied("/dev", "no-host-system", "the host's devices"),
    Denied("/boot", "no-host-system", "the host's kernel and boot loader"),
    Denied("/var/lib/dabctl", "no-dabctl-state", "dabctl's state"),
    Denied("/etc/dabctl", "no-dabctl-state", "dabctl's configuration"),
)
HOST_ROOT = "no-host-root"
NOT_ALLOWED = "no-bind-mounts"
READ_ONLY = "read-only-bind-mount"


@dataclass(frozen=True)
class BindAllow:
    """An `allow_bind_mounts` entry: `path` and everything under it; `read_only`: only mounts with ReadOnly."""

    path: str
    read_only: bool = False


@dataclass(frozen=True)
class Policy:
    """Exceptions to the default refusals, what the node adds to the deny set, the caps on counts, and the
    ports dabctl itself listens on (`own_ports`: never published)."""

    allow_bind_mounts: tuple[str | BindAllow, ...] = ()
    allow_host_network: bool = False
    _: KW_ONLY
    protected: tuple[Denied, ...] = ()  # node paths: the Docker socket in use, dabctl's state and config dirs
    max_replicas_per_service: int = 500
    max_services_per_stack: int = 500
    max_stacks: int = 500
    max_containers_per_node: int = 2000
    allow_external_volumes: tuple[str, ...] = ()
    allow_external_networks: tuple[str, ...] = ()
    allow_published_ports: tuple[int, ...] = (80, 443)
    own_ports: tuple[int, ...] = ()

    @property
    def allows(self) -> tuple[BindAllow, ...]:
        return tuple(a if isinstance(a, BindAllow) else BindAllow(a) for a in self.allow_bind_mounts)

    @property
    def deny(self) -> tuple[Denied, ...]:
        return BUILTIN_DENY + self.protected


@dataclass(frozen=True)
class Refusal:
    """Why one bind-mount source is refused: the rule, what it would give the container, and the fix."""

    rule: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}"


PRIVILEGED_PORTS = 1024  # below this, a port is a system service's (ssh, dns, smtp, ...)


def normalise(path: str) -> str:
    """An absolute path with `.`, `..` and repeated slashes resolved lexically (`//var/./run/..` -> `/var`)."""
    out = posixpath.normpath("/" + path.lstrip("/"))
    return "/" + out.lstrip("/")


def canonical(path: str) -> str:
    """`normalise`, with the links every supported host has read as their target (`/var/run` -> `/run`)."""
    out = normalise(path)
    for link, target in _ALIASES:
        if out == link or out.startswith(link + "/"):
            out = target + out[len(link) :]
    return out


def under(path: str, directory: str) -> bool:
    """`path` is `directory` or lies below it (both normalised)."""
    return directory == "/" or path == directory or path.startswith(directory + "/")


def _inside(source: str, d: Denied) -> bool:
    """`source` is the denied path or lies under it."""
    if d.prefix:
        parent, stem = posixpath.split(d.path)
        return under(source, parent) and source != parent and source[len(parent) :].lstrip("/").startswith(stem)
    return under(source, d.path)


def denied(source: str, deny: Iterable[Denied]) -> Denied | None:
    """The deny-set entry a (canonical) source hits: `/` itself, the closest denied path it lies in, or else one
    it holds (`/var` holds `/var/lib/docker`)."""
    if source == "/":
        return Denied("/", HOST_ROOT, "the host's root")
    entries = list(deny)
    inside = [d for d in entries if _inside(source, d)]
    if inside:
        return max(inside, key=lambda d: len(d.path))
    return next((d for d in entries if under(d.path, source)), None)


def bind_rule(source: str, protected: Sequence[Denied] = ()) -> str | None:
    """The deny-set rule a bind-mount source breaks, or None."""
    hit = denied(canonical(source), BUILTIN_DENY + tuple(protected))
    return hit.rule if hit else None


def refuse_bind(
    source: str, read_only: bool, allows: Sequence[BindAllow], deny: Sequence[Denied], *, written: str | None = None
) -> Refusal | None:
    """Why a bind mount of `source` is refused, or None. `source`, the entries and the deny set are compared as
    given (the caller makes them canonical, or resolves them on the node); `written` is the source as the bundle
    wrote it, for the message and the entry to suggest."""
    written = written or source
    shown = written if canonical(written) == source else f"{written} (resolved: {source})"
    entry = normalise(written)
    exact = [a for a in allows if a.path == source]
    hit = denied(source, deny)
    if hit is not None and not exact:
        return Refusal(
            hit.rule,
            f"bind mount of {shown} (gives the container {hit.gives}) is refused by policy rule {hit.rule!r}",
            f"mount something narrower, or allow it in the agent config: allow_bind_mounts: [{entry}]",
        )
    matching = exact or [a for a in allows if under(source, a.path)]
    if not matching:
        return Refusal(
            NOT_ALLOWED,
            f"bind mount of {shown} is refused by policy rule {NOT_ALLOWED!r} (bind mounts are denied by default)",
            f"use a named volume, or allow it in the agent config: allow_bind_mounts: [{entry}] "
            f"(or [{{path: {entry}, read_only: true}}])",
        )
    closest = max(matching, key=lambda a: len(a.path))
    if closest.read_only and not read_only:
        return Refusal(
            READ_ONLY,
            f"bind mount of {shown} is refused by policy rule {READ_ONLY!r}: the agent config allows "
            f"{closest.path} read-only only",
            "set ReadOnly: true on the mount",
        )
    return None


def _canonical_allows(policy: Policy) -> list[BindAllow]:
    return [BindAllow(canonical(a.path), a.read_only) for a in policy.allows]


def _canonical_deny(policy: Policy) -> list[Denied]:
    return [Denied(canonical(d.path), d.rule, d.gives, d.prefix) for d in policy.deny]


def service_refusals(service: Service, policy: Policy) -> list[tuple[str, Refusal]]:
    """(field, refusal) for each thing one service asks that the policy refuses (lexically): bind mounts and the
    replica cap. The node's check at create/start (agent.node.admission) runs this first."""
    out: list[tuple[str, Refusal]] = []
    allows, deny = _canonical_allows(policy), _canonical_deny(policy)
    for i, m in enumerate(service.mounts or []):
        if m.type == "bind" and m.source:
            refusal = refuse_bind(canonical(m.source), m.read_only, allows, deny, written=m.source)
            if refusal:
                out.append((f"Mounts[{i}].Source", refusal))
    replicas = service.deploy.replica_count if service.deploy.mode == "replicated" else 1
    if replicas > policy.max_replicas_per_service:
        out.append(("Deploy.Replicas", _cap("max_replicas_per_service", replicas, policy.max_replicas_per_service)))
    return out


def _cap(name: str, asked: int, cap: int) -> Refusal:
    return Refusal(
        name,
        f"{asked} is more than the agent config's {name} ({cap}): refused by policy rule {name!r}",
        f"ask for fewer, or raise {name} in the agent config",
    )


def containers(stack: StackBundle) -> int:
    """The containers a stack asks of one node at most (a global service runs one per node)."""
    return sum(s.deploy.replica_count if s.deploy.mode == "replicated" else 1 for s in stack.bundle.services.values())


def stack_violations(stack: StackBundle, policy: Policy) -> list[BundleError]:
    """Every refusal in one stack, one error each."""
    out = []
    services = stack.bundle.services
    if len(services) > policy.max_services_per_stack:
        r = _cap("max_services_per_stack", len(services), policy.max_services_per_stack)
        out.append(BundleError(stack.file, f"{len(services)} services: {r.message}", field="Services", fix=r.fix))
    for name, svc in services.items():
        for where, refusal in service_refusals(svc, policy):
            out.append(BundleError(stack.file, refusal.message, field=f"Services.{name}.{where}", fix=refusal.fix))
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


def count_violations(stacks: Sequence[StackBundle], policy: Policy) -> list[BundleError]:
    """The caps over all stacks: how many stacks, and how many containers one node would run."""
    out = []
    ordered = sorted(stacks, key=lambda s: s.name)
    if len(ordered) > policy.max_stacks:
        r = _cap("max_stacks", len(ordered), policy.max_stacks)
        first = ordered[policy.max_stacks]
        out.append(BundleError(first.file, f"the source holds {len(ordered)} stacks: {r.message}", fix=r.fix))
    total = sum(containers(s) for s in ordered)
    if total > policy.max_containers_per_node and ordered:
        r = _cap("max_containers_per_node", total, policy.max_containers_per_node)
        largest = max(ordered, key=containers)
        out.append(
            BundleError(
                largest.file,
                f"the stacks ask for {total} containers on this node ({containers(largest)} in this one): {r.message}",
                fix=r.fix,
            )
        )
    return out


def violations(desired: DesiredState, policy: Policy) -> list[BundleError]:
    """Every place in `desired` the policy refuses, one error each."""
    out = [e for stack in desired.stacks.values() for e in stack_violations(stack, policy)]
    out += [e for stack in desired.stacks.values() for e in _reach_violations(stack, policy)]
    return out + count_violations(list(desired.stacks.values()), policy)


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


def policy_record(policy: Policy) -> PolicyRecord:
    """`policy` as the state log records it (the node's own protected paths stay the node's)."""
    return PolicyRecord(
        allow_bind_mounts=[BindEntry(path=a.path, read_only=a.read_only) for a in policy.allows],
        allow_host_network=policy.allow_host_network,
        max_replicas_per_service=policy.max_replicas_per_service,
        max_services_per_stack=policy.max_services_per_stack,
        max_stacks=policy.max_stacks,
        max_containers_per_node=policy.max_containers_per_node,
        allow_external_volumes=list(policy.allow_external_volumes),
        allow_external_networks=list(policy.allow_external_networks),
        allow_published_ports=list(policy.allow_published_ports),
    )


def policy_from_record(
    record: PolicyRecord, *, protected: Sequence[Denied] = (), own_ports: Sequence[int] = ()
) -> Policy:
    """A recorded policy, with this node's protected paths and own ports added (they only ever refuse more)."""
    return Policy(
        tuple(BindAllow(e.path, e.read_only) for e in record.allow_bind_mounts),
        record.allow_host_network,
        protected=tuple(protected),
        max_replicas_per_service=record.max_replicas_per_service,
        max_services_per_stack=record.max_services_per_stack,
        max_stacks=record.max_stacks,
        max_containers_per_node=record.max_containers_per_node,
        allow_external_volumes=tuple(record.allow_external_volumes),
        allow_external_networks=tuple(record.allow_external_networks),
        allow_published_ports=tuple(record.allow_published_ports),
        own_ports=tuple(own_ports),
    )


def narrowing(cluster: PolicyRecord, own: PolicyRecord) -> list[str]:
    """Where a node's own policy refuses what the cluster's allows, one line each, for the settings a node
    enforces on its containers (bind mounts, the host network, the replica cap); empty when it narrows nothing.
    Where it is broader nothing is said: the cluster's rule holds there anyway."""
    out = []
    for c in cluster.allow_bind_mounts:
        path = canonical(c.path)
        covered = any(
            under(path, canonical(a.path)) and (c.read_only or not a.read_only) for a in own.allow_bind_mounts
        )
        if not covered:
            how = "read-only" if c.read_only else "read-write"
            out.append(f"allow_bind_mounts: {c.path} ({how}) is not allowed by this node's config")
    if cluster.allow_host_network and not own.allow_host_network:
        out.append("allow_host_network: false in this node's config")
    if own.max_replicas_per_service < cluster.max_replicas_per_service:
        out.append(
            f"max_replicas_per_service: {own.max_replicas_per_service} in this node's config "
            f"(the cluster's: {cluster.max_replicas_per_service})"
        )
    return out
