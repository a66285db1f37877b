"""Load-balancer reconciler (the routing mesh): every published port of a service balanced across its running,
healthy replicas, from any local address of the node.

observe() is one ruleset read. allocate() and plan() are pure. A backend (`Ruleset`) programs the kernel: nftables
rewrites dabctl's own table in one transaction; IPVS changes its services over netlink. Either way the ruleset holds
only what dabctl wrote (its table, or IPVS services with marks from dabctl's range), so ownership is the ruleset
itself, and node-wide settings (route_localnet with its guard, the forward accept) exist exactly while a port is
published.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from reconcilers.outcome import ActionKind, Outcome, Result, one_line
from schemas.errors import DabctlError

PORT_RANGE = (30000, 32767)  # Swarm's and Kubernetes' node-port range


@dataclass(frozen=True)
class PortRules:
    """Where allocated ports come from, and ports never handed to a bundle (dabctl's own listeners)."""

    range: tuple[int, int] = PORT_RANGE
    reserved: tuple[int, ...] = ()


DEFAULT_RULES = PortRules()


@dataclass(frozen=True, order=True)
class PortKey:
    """A port a service exposes: its published port is fixed by the bundle or allocated and recorded."""

    stack: str
    service: str
    protocol: str
    target: int

    def __str__(self) -> str:
        return f"{self.stack}_{self.service} {self.target}/{self.protocol}"


@dataclass(frozen=True)
class PortRequest:
    """A port to publish, with the PublishedPort the bundle fixes (None: allocate) and where the bundle says so."""

    key: PortKey
    published: int | None = None
    where: str = ""


@dataclass(frozen=True)
class Allocation:
    """Published port per key, and the stacks that cannot publish (with one line saying why and how to fix)."""

    ports: dict[PortKey, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    conflicts: dict[PortKey, int] = field(default_factory=dict)  # given up to a host process, kept recorded


def give_way(allocation: Allocation, listening: Collection[tuple[str, int]]) -> Allocation:
    """`allocation` without the ports a process on the node listens on (pure): the host process wins, and the
    port is published again once it has ended. dabctl's own rules open no socket, so any listener is a host's."""
    conflicts = {k: p for k, p in allocation.ports.items() if (k.protocol, p) in listening}
    if not conflicts:
        return allocation
    ports = {k: p for k, p in allocation.ports.items() if k not in conflicts}
    return Allocation(ports, allocation.errors, conflicts)


def conflict_error(key: PortKey, port: int) -> str:
    """One line for a published port given up to a host process."""
    return (
        f"published port {port}/{key.protocol} of {key.stack}_{key.service}: a process on this node listens on it, "
        "so dabctl stopped publishing it until that process ends; stop the process or choose another PublishedPort"
    )


def allocate(
    requests: Sequence[PortRequest],
    recorded: Mapping[PortKey, int],
    busy: Collection[tuple[str, int]],
    port_range: tuple[int, int] = PORT_RANGE,
) -> Allocation:
    """Published ports for `requests` (pure). A recorded port stays with its key; a fixed port recorded for
    another key, or one a host process listens on (`busy`, (protocol, port)), is refused; new ports are the
    lowest free in `port_range`, skipping busy ones. Ports of keys no longer requested are simply not returned."""
    wanted = {r.key: r for r in requests}
    holder: dict[tuple[str, int], PortKey] = {}
    ports: dict[PortKey, int] = {}
    errors: dict[str, str] = {}

    def refuse(r: PortRequest, why: str) -> None:
        where = f"{r.where}: " if r.where else ""
        errors.setdefault(r.key.stack, f"{where}{why}")

    # Ports already programmed keep their holder, so a newcomer can never take a port over.
    for key, port in sorted(recorded.items()):
        r = wanted.get(key)
        if r is not None and r.published in (None, port) and (r.published is not None or _in(port, port_range)):
            holder[(key.protocol, port)] = key
            ports[key] = port
    for key in sorted(wanted):
        r = wanted[key]
        fixed = r.published
        if key in ports or fixed is None:
            continue
        taken = holder.get((key.protocol, fixed))
        if taken is not None:
            refuse(r, f"PublishedPort {fixed}/{key.protocol} is already published for {taken}; choose another")
        elif (key.protocol, fixed) in busy:
            refuse(
                r,
                f"PublishedPort {fixed}/{key.protocol} is in use by a process on this node; "
                "stop that process or choose another PublishedPort",
            )
        else:
            holder[(key.protocol, fixed)] = key
            ports[key] = fixed
    span = range(port_range[0], port_range[1] + 1)
    for key in sorted(wanted):
        if key in ports or wanted[key].published is not None:
            continue
        found = next((p for p in span if (key.protocol, p) not in holder and (key.protocol, p) not in busy), None)
        if found is None:
            refuse(
                wanted[key],
                f"no free port left in {port_range[0]}-{port_range[1]} for {key}; "
                "set PublishedPort or widen published_port_range",
            )
            continue
        holder[(key.protocol, found)] = key
        ports[key] = found
    # A stack that cannot publish one port publishes none of its new ones: it is held as it is.
    return Allocation({k: p for k, p in ports.items() if k.stack not in errors}, errors)


def _in(port: int, port_range: tuple[int, int]) -> bool:
    return port_range[0] <= port <= port_range[1]


# --- the balancer as data ------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, kw_only=True)
class Frontend:
    """A published port on every local address of the node, and the service it leads to."""

    protocol: str
    port: int
    stack: str
    service: str
    target: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.protocol, self.port)

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class Backend:
    """One replica's address and port."""

    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


Balance = Mapping[Frontend, tuple[Backend, ...]]  # backends sorted, so that equal sets compare equal


@dataclass(frozen=True)
class Endpoint:
    """A replica as the balancer sees it: where it answers and whether it may take traffic."""

    stack: str
    service: str
    address: str
    ready: bool  # running, and healthy when it has a health check; False while it is drained


def wanted(ports: Mapping[PortKey, int], endpoints: Iterable[Endpoint]) -> dict[Frontend, tuple[Backend, ...]]:
    """The balance to program: each published port to its service's ready endpoints (pure)."""
    by_service: dict[tuple[str, str], set[str]] = {}
    for e in endpoints:
        if e.ready and e.address:
            by_service.setdefault((e.stack, e.service), set()).add(e.address)
    out: dict[Frontend, tuple[Backend, ...]] = {}
    for key, port in ports.items():
        frontend = Frontend(protocol=key.protocol, port=port, stack=key.stack, service=key.service, target=key.target)
        addresses = by_service.get((key.stack, key.service), set())
        out[frontend] = tuple(sorted(Backend(a, key.target) for a in addresses))
    return out


def forwarded(
    balance: Mapping[Frontend, tuple[Backend, ...]], peers: Mapping[tuple[str, str], Iterable[str]]
) -> dict[Frontend, tuple[Backend, ...]]:
    """A cluster's published port answers on every node: a frontend with no ready replica on this node forwards to
    the same published port on the nodes (`peers`: their addresses by service) that report a ready one (pure).

    Only a node with no local backend forwards, and only to nodes whose own replicas are ready, so a connection
    crosses at most one node on its way when the reports are current."""
    out = dict(balance)
    for frontend, backends in balance.items():
        if backends:
            continue
        addresses = set(peers.get((frontend.stack, frontend.service), ()))
        out[frontend] = tuple(sorted(Backend(a, frontend.port) for a in addresses if a))
    return out


# --- actions: their text is the plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish a port on the node, balanced across the given backends."""

    frontend: Frontend
    backends: tuple[Backend, ...]
    kind: ClassVar[ActionKind] = ActionKind.CREATE

    @property
    def stack(self) -> str:
        return self.frontend.stack

    def __str__(self) -> str:
        f = self.frontend
        return f"{self.kind.sign} {f.stack}_{f.service} publish {f} → {f.target} ({_count(self.backends)})"


@dataclass(frozen=True)
class Rebalance:
    """Change the backends behind a published port."""

    frontend: Frontend
    backends: tuple[Backend, ...]
    added: tuple[Backend, ...]
    removed: tuple[Backend, ...]
    kind: ClassVar[ActionKind] = ActionKind.UPDATE

    @property
    def stack(self) -> str:
        return self.frontend.stack

    def __str__(self) -> str:
        f = self.frontend
        change = " ".join([*(f"+{b.address}" for b in self.added), *(f"-{b.address}" for b in self.removed)])
        return f"{self.kind.sign} {f.stack}_{f.service} {f} backends {change} ({_count(self.backends)})"


@dataclass(frozen=True)
class Unpublish:
    """Stop publishing a port."""

    frontend: Frontend
    kind: ClassVar[ActionKind] = ActionKind.REMOVE

    @property
    def stack(self) -> str:
        return self.frontend.stack

    def __str__(self) -> str:
        f = self.frontend
        return f"{self.kind.sign} {f.stack}_{f.service} unpublish {f}"


BalancerAction = Publish | Rebalance | Unpublish


def _count(backends: Sequence[Backend]) -> str:
    return "1 backend" if len(backends) == 1 else f"{len(backends)} backends"


def plan(desired: Balance, actual: Balance, keep: Collection[str] = ()) -> list[BalancerAction]:
    """Actions that turn `actual` into `desired` (pure); frontends of stacks in `keep` stay as they are.

    A frontend is identified by its (protocol, port): one that now leads elsewhere (another service or target
    port) is unpublished and published again."""
    now = {f.address: (f, b) for f, b in actual.items()}
    then = {f.address: (f, b) for f, b in desired.items() if f.stack not in keep}
    actions: list[BalancerAction] = []
    for address in sorted(set(now) | set(then)):
        old, new = now.get(address), then.get(address)
        if old is not None and old[0].stack in keep:
            continue
        if new is None:
            assert old is not None
            actions.append(Unpublish(old[0]))
        elif old is None or old[0] != new[0]:
            if old is not None:
                actions.append(Unpublish(old[0]))
            actions.append(Publish(*new))
        elif old[1] != new[1]:
            before, after = set(old[1]), set(new[1])
            actions.append(Rebalance(new[0], new[1], tuple(sorted(after - before)), tuple(sorted(before - after))))
    return actions


def apply_to(actual: Balance, actions: Iterable[BalancerAction]) -> dict[Frontend, tuple[Backend, ...]]:
    """`actual` with `actions` applied: what the ruleset holds after a successful write (pure)."""
    out = dict(actual)
    for a in actions:
        if isinstance(a, Unpublish):
            out.pop(a.frontend, None)
        else:
            out[a.frontend] = a.backends
    return out


# --- applying ------------------------------------------------------------------------------------------------


class BalancerUnavailable(DabctlError):
    """The ruleset cannot be read or written here (tool missing, no privilege, kernel lacks a feature)."""


class Ruleset(Protocol):
    """What a balancing backend (nftables, IPVS) offers this reconciler."""

    @property
    def name(self) -> str:
        """The backend's name, as the agent config spells it."""
        ...

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        """What is programmed now (dabctl's own rules only). Raises BalancerUnavailable."""
        ...

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        """Make the ruleset hold exactly `desired` (the result of `actions`), node-wide settings included."""
        ...


class LoadBalancerReconciler:
    """Applies balancer actions through a Ruleset: one write per apply, whatever the number of actions."""

    def __init__(self, ruleset: Ruleset) -> None:
        self.ruleset = ruleset

    def observe(self) -> dict[Frontend, tuple[Backend, ...]]:
        """The programmed balance (one ruleset read)."""
        return self.ruleset.read()

    def apply(self, actual: Balance, actions: Sequence[BalancerAction]) -> list[Result[BalancerAction]]:
        """Write `actual` changed by `actions` in one go; every action shares the write's outcome."""
        if not actions:
            return []
        try:
            self.ruleset.write(apply_to(actual, actions), actions)
        except Exception as exc:
            return [Result(a, Outcome.FAILED, one_line(exc)) for a in actions]
        return [Result(a, _outcome(a)) for a in actions]


def _outcome(action: BalancerAction) -> Outcome:
    if isinstance(action, Publish):
        return Outcome.CREATED
    if isinstance(action, Unpublish):
        return Outcome.REMOVED
    return Outcome.UPDATED
