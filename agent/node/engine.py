"""One reconcile pass: observe (one list call per kind) -> plan (pure) -> apply (ordered phases, bounded
parallel) -> record. `dabctl plan` stops after planning; `reconcile --once` and the agent apply.

Phase order: the balancer first (replicas about to be stopped leave it: drain), then replica removals, network
removals, network creations, replica creates/replaces/starts — so a network is removed only after its containers
and created before the containers that join it — and, when replicas changed, the balancer again with what runs now.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Protocol

from agent.cluster.nodes import NodeInfo, held_down, node_infos, single_node
from agent.cluster.orchestrate import (
    Desired,
    Intent,
    Observations,
    Pinned,
    PlannedImage,
    ResolvedImage,
    apply_pins,
    follow_steps,
    orchestrate,
    stack_from_record,
    stacks_known,
)
from agent.cluster.schema import SchemaConflict, schema_conflicts, unreadable
from agent.cluster.snapshot import Assignments, SlotKey, Snapshot
from agent.drivers.balancer import listening_ports, open_balancer
from agent.drivers.docker_engine import ImageUnavailable
from agent.node.admission import PolicyRefused, admit
from agent.node.runtime import Runtime
from agent.state.log import Unavailable
from agent.state.records import Fence, Records
from bundles import InvalidBundles
from bundles.desired import (
    DesiredState,
    ServiceTarget,
    StackBundle,
    VolumeNames,
    desired_networks,
    service_targets,
    stack_volumes,
    with_volume_names,
)
from bundles.policy import Policy, policy_from_record, policy_record
from reconcilers import loadbalancer, networks, services, volumes
from reconcilers.loadbalancer import Balance, BalancerAction, BalancerUnavailable, LoadBalancerReconciler, PortKey
from reconcilers.networks import NetworkAction, NetworksReconciler, ObservedNetwork
from reconcilers.notes import Note, NoteKind
from reconcilers.outcome import Outcome, Result
from reconcilers.restarts import RestartRecord
from reconcilers.rollout import Rollout
from reconcilers.services import ImageChange, ServiceAction, ServicesReconciler, pending_image
from schemas.errors import DabctlError
from schemas.state import (
    STATE_SCHEMA,
    STATE_SCHEMA_OLDEST,
    AuditAction,
    AuditEntry,
    PassOutcome,
    Pin,
    PolicyRecord,
    ServiceRecord,
    SlotReport,
    StackRecord,
)

Action = ServiceAction | NetworkAction | BalancerAction | volumes.MigrateVolume
AnyResult = Result[ServiceAction] | Result[NetworkAction] | Result[BalancerAction] | Result[volumes.MigrateVolume]


REPLAN_ATTEMPTS = 5
LOST_RACE = "the state changed while this pass planned, every time it tried; the next pass plans again"
FENCED = "this node's term as leader ended while it planned: its decisions were refused; it follows the new leader"

log = logging.getLogger("dabctl.engine")


class EmptySourceRefused(DabctlError):
    """The source has no stacks while stacks are deployed: pruning everything needs --allow-empty."""


class Leadership(Protocol):
    """Whether this node leads the cluster now, and the fence its orchestrator commits carry
    (agent.node.membership implements it for a cluster node)."""

    @property
    def is_leader(self) -> bool: ...

    def fence(self) -> Fence | None: ...


class AlwaysLeader:
    """A node without a cluster: it always leads, unfenced (nobody else writes its state)."""

    is_leader = True

    def fence(self) -> Fence | None:
        return None


@dataclass
class StackPlan:
    """What one pass would do to one stack; `error` when the stack cannot converge and is left alone."""

    name: str
    revision: str | None
    _: KW_ONLY
    error: str | None = None
    network_actions: list[NetworkAction] = field(default_factory=list)
    service_actions: list[ServiceAction] = field(default_factory=list)
    balancer_actions: list[BalancerAction] = field(default_factory=list)
    volume_actions: list[volumes.MigrateVolume] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    @property
    def actions(self) -> list[Action]:
        return [*self.network_actions, *self.volume_actions, *self.service_actions, *self.balancer_actions]


@dataclass(kw_only=True)
class PassPlan:
    """The plan of one pass, with what it needs to record afterwards."""

    desired: DesiredState
    stacks: dict[str, StackPlan]
    assignments: Assignments
    assignments_changed: dict[tuple[str, str], dict[str, list[str]]]
    assignments_removed: set[tuple[str, str]]
    records: dict[str, StackRecord]
    suspended: list[str] = field(default_factory=list)
    replicas: list[services.Replica] = field(default_factory=list)
    rollouts: dict[tuple[str, str], Rollout] = field(default_factory=dict)
    restarts: dict[tuple[str, str, str], RestartRecord] = field(default_factory=dict)
    pins: dict[str, Pin | None] = field(default_factory=dict)
    recheck_in: float | None = None
    rolling: bool = False  # a rollout (or rollback) is still moving: another pass will continue it
    images: dict[tuple[str, str], PlannedImage] = field(default_factory=dict)  # the image each service runs
    ports: dict[PortKey, int] = field(default_factory=dict)  # published ports of the stacks this pass converges
    ports_changed: dict[PortKey, int] = field(default_factory=dict)  # of those, the ones the state has not recorded
    ports_removed: set[PortKey] = field(default_factory=set)
    balance: dict[loadbalancer.Frontend, tuple[loadbalancer.Backend, ...]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # stacks left exactly as they are
    balancer_error: str | None = None  # the balancer cannot be read or written: ports stay as they are
    awaiting_health: int = 0  # replicas of published services still starting: they join the balancer when healthy
    unmoved: set[str] = field(default_factory=set)  # stacks whose volume copy failed: they keep their old names
    intent: Intent | None = None  # the cluster's decisions this plan acts on, committed before anything acts
    snapshot: Snapshot | None = None  # the state they were made from
    leading: bool = True  # this node decided for the cluster (and records stacks); else it only followed
    offline: bool = False  # the state log did not answer: planned from the last snapshot, nothing is written
    fence: Fence | None = None  # the leader's term this plan was made in: its commits hold only in that term
    # Live nodes that cannot read the state schema this leader writes: it led, but planned as a follower (it writes
    # nothing for the cluster; every node keeps its last assignments).
    schema_held: tuple[SchemaConflict, ...] = ()
    inputs: tuple[DesiredState, bool, Collection[str] | None, Collection[str]] | None = None  # to plan again

    @property
    def changes(self) -> int:
        return sum(len(s.actions) for s in self.stacks.values())

    @property
    def errors(self) -> list[str]:
        errors = [f"{s.name}: {s.error}" for s in self.stacks.values() if s.error]
        errors += [f"cluster: {c}" for c in self.schema_held]
        return errors + ([f"published ports: {self.balancer_error}"] if self.balancer_error else [])


@dataclass
class PassReport:
    """What a pass did."""

    reconcile_id: str
    results: list[AnyResult]
    errors: list[str]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.count(Outcome.FAILED) > 0


def stack_of(action: Action) -> str:
    if isinstance(action, (networks.CreateNetwork, networks.RemoveNetwork)):
        return action.stack
    if isinstance(action, (loadbalancer.Publish, loadbalancer.Rebalance, loadbalancer.Unpublish)):
        return action.stack
    if isinstance(action, volumes.MigrateVolume):
        return action.stack
    return action.key[0]


class Engine:
    """Wires the reconcilers to a container runtime (a Docker engine) and the state log, and orders their passes."""

    def __init__(
        self,
        docker: Runtime,
        records: Records,
        node: str,
        *,
        parallelism: int = 8,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
        pull_policy: str = "if-not-present",
        balancer: str = "none",
        ports: loadbalancer.PortRules = loadbalancer.DEFAULT_RULES,
        listening: Callable[[], set[tuple[str, int]]] = listening_ports,
    ) -> None:
        # What a container may ask of this host, checked before every create and start: the default refusals
        # with no exceptions until the caller sets the config's (agent.config.policy_of).
        self.policy = Policy()
        # False when the config sets no policy setting of its own: a cluster node then admits under the cluster's
        # recorded policy alone (else under both: its own may only narrow the cluster's).
        self.policy_configured = True
        self._admission: tuple[tuple[str, Policy], ...] = (("", self.policy),)
        # The state schemas this node reads (oldest, newest); it writes the newest (schemas.state.STATE_SCHEMA).
        self.schema = (STATE_SCHEMA_OLDEST, STATE_SCHEMA)
        self.schema_held: tuple[SchemaConflict, ...] = ()  # the last pass's (see PassPlan.schema_held)
        self.ports = ports
        self.listening = listening
        self.pull_policy = pull_policy
        docker.default_pull_policy = pull_policy
        self.clock = clock
        self._pinned: set[str] = set()
        self._restarts: dict[tuple[str, str, str], RestartRecord] | None = None
        self.replans = 0  # passes planned again because another writer committed first
        self.on_replan: Callable[[], None] | None = None
        self.fenced = 0  # commits refused because this node's term as leader ended (a deposed leader's)
        self.on_fenced: Callable[[], None] | None = None
        self._named: dict[str, tuple[StackBundle, StackBundle]] = {}
        self.docker = docker
        self.records = records
        self.node = node
        self.parallelism = parallelism
        # On a cluster node every pass reads the cluster and plans this node's slots; only while it leads does it
        # decide for all nodes (orchestrate) and commit that, fenced. None: a node alone, its own leader. The
        # caller sets it (agent.node.membership) as it sets `policy`.
        self.cluster: Leadership | None = None
        # A cluster recovered from a lost quorum (`cluster recover`): until then, down nodes keep their slots.
        self.hold_down_until: datetime | None = None
        self._last: Snapshot | None = None  # the last snapshot read: a node cut off from the state log keeps to it
        self._from_records: dict[str, tuple[StackRecord, StackBundle]] = {}
        owner = records.owner(create=not read_only)
        self.owner = owner
        self.services = ServicesReconciler(docker, owner, node)
        self.networks = NetworksReconciler(docker, owner)
        self.balancer: LoadBalancerReconciler | None = open_balancer(balancer, owner)

    def plan(
        self,
        desired: DesiredState,
        allow_empty: bool = False,
        only: Collection[str] | None = None,
        *,
        migrate_volumes: Collection[str] = (),
    ) -> PassPlan:
        """Observe the engine and plan the stacks in `only` (default: all); pure apart from the two list calls
        and state reads. Suspended stacks and stacks outside `only` are left exactly as they are.

        Stacks in `migrate_volumes` whose volumes are still named as written move to `<stack>_<name>`: their
        replicas stop, each old volume is copied into its new one, replicas start again. A stack that would start
        replicas on a new, empty scoped volume while one of the old name exists is refused instead (one volume
        list, only when a pass creates replicas with scoped volumes)."""
        first = self._plan(desired, allow_empty, only, migrate_volumes, {})
        refused = self._volume_refusals(first)
        plan = self._plan(desired, allow_empty, only, migrate_volumes, refused) if refused else first
        plan.inputs = (desired, allow_empty, only, migrate_volumes)
        return plan

    def _volume_refusals(self, plan: PassPlan) -> dict[str, str]:
        """Stacks of `plan` about to create replicas on new, empty scoped volumes while old ones exist."""
        creating: dict[str, dict[str, str]] = {}
        for name, sp in plan.stacks.items():
            if sp.error or sp.volume_actions:
                continue
            for a in sp.service_actions:
                if isinstance(a, (services.CreateReplica, services.ReplaceReplica)):
                    scoped = {old: new for old, new in a.target.volumes.items() if old != new}
                    creating.setdefault(name, {}).update(scoped)
        creating = {k: v for k, v in creating.items() if v}
        if not creating:
            return {}
        return volumes.refusals(creating, self.docker.list_volumes())

    def _migrations(
        self, desired: DesiredState, names: Collection[str], replicas: Sequence[services.Replica]
    ) -> tuple[dict[str, list[volumes.MigrateVolume]], dict[str, str]]:
        """The volume copies that move stacks `names` to scoped names, or why one cannot move."""
        if not names:
            return {}, {}
        existing = self.docker.list_volumes()
        planned: dict[str, list[volumes.MigrateVolume]] = {}
        errors: dict[str, str] = {}
        for name in sorted(names):
            stack = desired.stacks[name]
            mounted = {r.service: r.image_id for r in replicas if r.stack == name and r.image_id}
            image = next(iter(mounted.values()), next(iter(stack.bundle.services.values())).image)
            actions, error = volumes.migrations(name, stack_volumes(stack), existing, image)
            if error:
                errors[name] = error
            elif actions:
                planned[name] = actions
        return planned, errors

    def _plan(
        self,
        desired: DesiredState,
        allow_empty: bool,
        only: Collection[str] | None,
        migrate: Collection[str],
        refused: Mapping[str, str],
    ) -> PassPlan:
        # One snapshot of the state at one revision; this node's observations (one list call per kind); then the
        # cluster's decisions (orchestrate, pure) and this node's part of them (the node pass).
        snapshot, offline = self._snapshot()
        if self._restarts is None:  # restart bookkeeping is the node's: loaded once, then kept here
            self._restarts = dict(snapshot.restarts)
        # The term is read once, with the decision to lead: a plan made as leader commits only in that term.
        fence = self.cluster.fence() if self.cluster is not None and not offline else None
        leading = not offline and (self.cluster is None or self.cluster.is_leader)
        held_by_schema: tuple[SchemaConflict, ...] = ()
        if leading and self.cluster is not None:
            held_by_schema = schema_conflicts(self.schema[1], snapshot.nodes, snapshot.statuses)
            leading = not held_by_schema  # it writes nothing for the cluster: it follows the recorded intent
        self.schema_held = held_by_schema
        self._admission = self._policies(snapshot, leading)
        unreadable_stacks = {
            name: f"the recorded revision {rec.revision} is not read here: {why}"
            for name, rec in snapshot.stacks.items()
            if (why := unreadable(rec.schema_version, self.schema)) is not None
        }
        records = dict(snapshot.stacks)
        suspended = set(snapshot.suspended)
        now = self.clock()
        if leading:
            pinned = apply_pins(desired, snapshot, self.policy)
        else:  # the leader's records are the desired state: what it applied, pins included
            desired, unloadable = self._recorded(snapshot, skip=unreadable_stacks)
            pinned, allow_empty = Pinned(desired=desired, errors={**unloadable, **unreadable_stacks}), True
        self._pinned = set(pinned.stacks)
        desired = pinned.desired
        moving = {n for n in migrate if n in desired.stacks and n in records and records[n].volume_names == "legacy"}
        desired = self._name_volumes(desired, records, moving)
        replicas = self.services.observe()
        observed_networks = self.networks.observe()

        deployed = set(records) | {r.stack for r in replicas}
        if not desired.stacks and deployed and not allow_empty:
            raise EmptySourceRefused(
                f"the source has no stacks but {len(deployed)} stack(s) are deployed ({', '.join(sorted(deployed))}); "
                "refusing to remove them all — pass --allow-empty if that is what you want"
            )

        names = stacks_known(desired, snapshot) | deployed
        in_scope = {n for n in names if (only is None or n in only) and n not in suspended}
        net_targets = [t for stack in desired.stacks.values() for t in desired_networks(stack)]
        # What this node cannot take this pass, whoever decides the rest: reported to the orchestrator as blocked.
        blocked = networks.conflicts(net_targets, observed_networks, self.owner)
        blocked.update(pinned.errors)
        blocked.update(unreadable_stacks)
        blocked.update(refused)
        held = (names - in_scope) | set(blocked)
        copies, migration_errors = self._migrations(desired, (moving & in_scope) - held, replicas)
        blocked.update(migration_errors)
        held |= set(migration_errors)
        balance, balancer_error = self._observe_balancer(desired, snapshot.ports)
        publishing = self.balancer is not None and balancer_error is None
        # A cluster's published ports are the cluster's (one number on every node): the leader allocates and records
        # them whatever its own node's ruleset says. A ruleset that cannot be read here leaves only this node's rules
        # as they are, with the reason in the pass's errors, as on any other node.
        allocating = publishing or (self.balancer is not None and self.cluster is not None)
        early_held = set(held)
        early = networks.plan(
            [t for t in net_targets if t.stack not in held], self._live(observed_networks, held), self.owner
        )
        network_ids = networks.kept_network_ids(observed_networks, early, self.owner)
        resolve = self._resolve_image if leading else _recorded_image
        images = {
            (name, t.name): resolve(t, _previous(records, name, t.name))
            for name, stack in desired.stacks.items()
            if name not in held
            for t in service_targets(stack)
        }
        listening = self._listening(desired, held) if allocating else set()
        programmed = {f.address for f in balance}
        local = [r for r in replicas if r.stack not in held and r.stack not in copies]
        nodes: tuple[NodeInfo, ...] = (single_node(self.node),)
        follow, slots, busy, orchestrated_ids = None, local, listening - programmed, network_ids
        if self.cluster is not None:
            nodes, follow = self._nodes(snapshot, leading)
            orchestrated_ids = {**{t.name: "" for t in net_targets}, **network_ids}
            # Every slot's containers name their node: a moved slot's old container here is not its new one there.
            mine = [replace(r, node=self.node) for r in local]
            slots = [*mine, *self._reported(snapshot, desired, orchestrated_ids, held | set(copies))]
            busy |= {(proto, port) for st in snapshot.statuses.values() for proto, port in st.busy_ports}
        intent = orchestrate(
            Desired(
                state=desired,
                images=images,
                nodes=nodes,
                placement=self.cluster is not None,  # one node outside a cluster: Placement is recorded, not applied
                scope=frozenset(in_scope),
                pinned=frozenset(pinned.stacks),
                lifted=pinned.lifted,
                port_rules=self.ports if allocating else None,
                follow=follow,
                refused=_refusals(snapshot, desired) if self.cluster is not None else {},
            ),
            snapshot,
            Observations(
                now=now,
                slots=slots,
                network_ids=orchestrated_ids,
                busy=frozenset(busy),
                listening=frozenset(listening),
                blocked=blocked,
            ),
        )
        if not leading:  # it follows what the leader recorded (ports, rollout batches) and commits no intent
            intent.ports = {k: p for k, p in snapshot.ports.items() if k.stack not in intent.held}
            intent.steps = follow_steps(intent.services, local, snapshot.rollouts, now)
            intent.rollouts, intent.pins, intent.notes = {}, {}, {}
        held = intent.held
        stacks = {
            name: StackPlan(
                name, desired.stacks[name].revision if name in desired.stacks else None, error=intent.errors.get(name)
            )
            for name in sorted(in_scope)
        }
        # The node pass: this node's slots of the intent, its containers, networks and ruleset -> actions.
        # A blocked stack is left exactly as it is: neither its objects nor its targets enter planning.
        wanted = intent.node_services(self.node)
        # A cluster node makes the networks of the stacks it has a replica of (a slot assigned here, or a container
        # still here): none of a stack's bridges, nor a subnet of the address pool, on nodes that run none of it.
        here = {d.target.stack for d in wanted if d.slots} | {r.stack for r in replicas}
        away = set(desired.stacks) - here if self.cluster is not None else set()
        net_actions = early
        if held != early_held or away:  # the orchestrator held more: their networks are left as they are too
            net_actions = networks.plan(
                [t for t in net_targets if t.stack not in held],
                self._live(observed_networks, held),
                self.owner,
                away=away,
            )
            network_ids = networks.kept_network_ids(observed_networks, net_actions, self.owner)
        for key, resolved in images.items():
            if resolved.note and key[0] not in held:
                stacks[key[0]].notes.append(resolved.note)
        # A stack whose volumes are copied stops every replica first: none may write to the old volume meanwhile.
        stopping = [r for r in replicas if r.stack in copies and r.stack not in held]
        live_replicas = [r for r in replicas if r.stack not in held and r.stack not in copies]
        sp = services.plan_pass(
            wanted,
            live_replicas,
            network_ids,
            now=now,
            rollouts=snapshot.rollouts,
            restart_records=self._restarts,
            steps=intent.steps,
        )
        for a in net_actions:
            stacks[stack_of(a)].network_actions.append(a)
        _plan_moves(stacks, stopping, copies)
        for s in sp.actions:
            stacks[stack_of(s)].service_actions.append(s)
        for key, note in {**sp.notes, **intent.notes}.items():
            notes = stacks[key[0]].notes
            notes[:] = [n for n in notes if not (key in intent.notes and n.service == key[1])]
            notes.append(note)
        if publishing:
            draining = {
                a.replica.id for a in sp.actions if isinstance(a, (services.RemoveReplica, services.ReplaceReplica))
            }
            endpoints = _endpoints(_first_networks(d.target for d in wanted), replicas, draining)
            wanted_balance = self._forwarded(loadbalancer.wanted(intent.ports, endpoints), snapshot)
            for b in loadbalancer.plan(wanted_balance, balance, keep=held):
                stacks.setdefault(b.stack, StackPlan(b.stack, None)).balancer_actions.append(b)
        sp.recheck(intent.recheck_in)
        return PassPlan(
            desired=desired,
            stacks=stacks,
            assignments=intent.assignments,
            assignments_changed=intent.assignments_changed,
            assignments_removed=intent.assignments_removed,
            records=records,
            suspended=sorted(suspended & names),
            replicas=replicas,
            rollouts=intent.rollouts,
            restarts=sp.restarts,
            pins=intent.pins,
            recheck_in=sp.recheck_in,
            rolling=bool(sp.rolling) or intent.rolling,
            images={k: r.image for k, r in images.items() if k[0] not in held},
            ports=intent.ports,
            ports_changed=intent.ports_changed,
            ports_removed=intent.ports_removed,
            balance=balance,
            held=held,
            balancer_error=balancer_error,
            awaiting_health=_starting(replicas, intent.ports) if publishing else 0,
            intent=intent if leading else None,
            snapshot=snapshot,
            leading=leading,
            offline=offline,
            fence=fence if leading else None,
            schema_held=held_by_schema,
        )

    def _snapshot(self) -> tuple[Snapshot, bool]:
        """This pass's snapshot, and whether it is the last one read because the state log does not answer: a
        cluster node cut off from it keeps healing what it was last assigned (static stability)."""
        try:
            snapshot = self.records.snapshot(restarts=self._restarts is None)
        except Unavailable:
            if self.cluster is None or self._last is None:
                raise
            return self._last, True
        self._last = snapshot
        return snapshot, False

    def _recorded(self, snapshot: Snapshot, skip: Collection[str] = ()) -> tuple[DesiredState, dict[str, str]]:
        """The desired state as the leader recorded it (each stack's applied bundle content): what a node that
        does not lead converges to, with no access to the source. Parsed once per recorded revision; a record that
        no longer loads (a bundle format this version refuses) holds its stack as it is, with the reason. Stacks
        in `skip` (records in a schema this node does not read) are not parsed at all."""
        stacks = {}
        errors = {}
        for name, record in snapshot.stacks.items():
            if name in skip:
                continue
            cached = self._from_records.get(name)
            if cached is None or cached[0].revision != record.revision or cached[0].bundle_hash != record.bundle_hash:
                try:
                    stack = stack_from_record(record)
                except InvalidBundles as exc:
                    errors[name] = f"the recorded revision {record.revision} does not load here: {exc.errors[0]}"
                    continue
                cached = (record, replace(stack, image_ids={}, volume_names=record.volume_names))
                self._from_records[name] = cached
            stacks[name] = cached[1]
        return DesiredState(stacks=stacks), errors

    def _policies(self, snapshot: Snapshot, leading: bool) -> tuple[tuple[str, Policy], ...]:
        """The policies this node admits its containers under this pass, each with whose it is: a node alone, and
        a leader (its configuration is the cluster's, recorded with what it applies), its own; any other cluster
        node the cluster's recorded policy and, when its config sets one, its own (which may only narrow it)."""
        if self.cluster is None or leading or snapshot.policy is None:
            return (("", self.policy),)
        cluster = policy_from_record(snapshot.policy, protected=self.policy.protected, own_ports=self.policy.own_ports)
        own = (("this node's own config", self.policy),) if self.policy_configured else ()
        return (("the cluster's policy, set in the managers' config", cluster), *own)

    def _nodes(self, snapshot: Snapshot, leading: bool) -> tuple[tuple[NodeInfo, ...], Assignments | None]:
        """Every node for the scheduler (it decides where slots may go), or the recorded assignments to follow: on a
        node that does not lead, and on a leader that sees no node up (none registered yet, or all down: nothing
        moves and nothing is removed). Until `hold_down_until` (a recovered cluster) down nodes keep their slots."""
        nodes = node_infos(snapshot.nodes, snapshot.statuses)
        if self.hold_down_until is not None and self.clock() < self.hold_down_until.timestamp():
            nodes = held_down(nodes)
        if leading and any(n.up for n in nodes):
            return nodes, None
        return nodes, {k: dict(v) for k, v in snapshot.assignments.items()}

    def _reported(
        self, snapshot: Snapshot, desired: DesiredState, network_ids: Mapping[str, str], skip: Collection[str]
    ) -> list[services.Replica]:
        """The other up nodes' slots as their reports say, in the shape the planners take (a replica counts on
        its own node's networks: that node's pass keeps them)."""
        networks_of = {
            (name, t.name): t.networks for name, stack in desired.stacks.items() for t in service_targets(stack)
        }
        out = []
        for node_id, reports in snapshot.reports.items():
            if node_id == self.node or node_id not in snapshot.statuses:
                continue  # this node's own slots are observed, not read; a down node's reports are ignored
            for (stack, service, slot), rep in reports.items():
                if stack in skip or not rep.container_id:
                    continue
                if slot not in snapshot.assignments.get((stack, service), {}).get(node_id, ()):
                    continue  # a container the node has yet to remove: the slot is someone else's now
                nets = {n: network_ids.get(n, "") for n in networks_of.get((stack, service), ())}
                out.append(services.Replica.reported((stack, service, slot), rep, node_id, networks=nets))
        return out

    def _forwarded(self, balance: Balance, snapshot: Snapshot) -> Balance:
        """On a cluster node, published ports with no ready replica here forward to the nodes that report one."""
        if self.cluster is None:
            return balance
        return loadbalancer.forwarded(balance, _ready_peers(snapshot, self.node))

    def _live(self, observed: Sequence[ObservedNetwork], held: Collection[str]) -> list[ObservedNetwork]:
        """Observed networks, but those of held stacks: they are left exactly as they are."""
        return [n for n in observed if not (n.owned_by(self.owner) and n.stack in held)]

    def _listening(self, desired: DesiredState, held: Collection[str]) -> set[tuple[str, int]]:
        """Host ports in use (one socket list), only when a stack this pass may change publishes one."""
        if any(t.service.ports for n, st in desired.stacks.items() if n not in held for t in service_targets(st)):
            return self.listening()
        return set()

    def _observe_balancer(
        self, desired: DesiredState, recorded: Mapping[PortKey, int]
    ) -> tuple[dict[loadbalancer.Frontend, tuple[loadbalancer.Backend, ...]], str | None]:
        """The programmed balance (one ruleset read), or why it cannot be read when a bundle publishes a port."""
        if self.balancer is None:
            return {}, None
        wants = any(t.service.ports for stack in desired.stacks.values() for t in service_targets(stack))
        if not wants and not recorded:
            return {}, None  # nothing of this state's is published, nor is anything to be
        try:
            return self.balancer.observe(), None
        except BalancerUnavailable as exc:
            return {}, str(exc)

    def _resolve_image(self, target: ServiceTarget, previous: ServiceRecord | None) -> ResolvedImage:
        """The image `target`'s replicas run this pass.

        The image enters the spec hash as written; the state records the ID (and digest) it resolved to. Under
        `always` the registry is asked for the tag's digest (a read); a new digest replaces replicas, rolling.
        A digest-pinned reference is used as it is and never checked again once present."""
        svc = target.service
        known = previous if previous is not None and previous.image == svc.image and previous.image_id else None
        if target.image_id:  # a pinned revision runs the image IDs it recorded
            return ResolvedImage(target, PlannedImage(target.image_id, image_id=target.image_id))
        policy = svc.pull_policy or self.pull_policy
        if policy == "always" and "@" not in svc.image:
            try:
                digest = self.docker.registry_digest(svc.image)
            except ImageUnavailable as exc:
                note = Note(target.name, NoteKind.IMAGE_CHECK_FAILED, f"image check failed: {exc}")
                if known is None:
                    return ResolvedImage(target, PlannedImage(svc.image), note=note)
                return replace(self._known(target, known), note=note)
            if known is None or digest != known.repo_digest:
                ref = f"{svc.image.rsplit(':', 1)[0] if ':' in svc.image.rsplit('/', 1)[-1] else svc.image}@{digest}"
                image = PlannedImage(ref, digest=digest)
                if known is None:
                    return ResolvedImage(replace(target, image_id=ref), image)
                change = ImageChange(known.repo_digest, digest)
                return ResolvedImage(
                    replace(target, image_id=ref), image, expected=pending_image(digest), digest=digest, change=change
                )
        if known is None:
            return ResolvedImage(target, PlannedImage(svc.image))
        return self._known(target, known)

    @staticmethod
    def _known(target: ServiceTarget, known: ServiceRecord) -> ResolvedImage:
        """Replicas run the image ID the state recorded for this reference."""
        image = PlannedImage(known.image_id, image_id=known.image_id)
        return ResolvedImage(
            replace(target, image_id=known.image_id), image, expected=known.image_id, digest=known.repo_digest or None
        )

    def _name_volumes(
        self, desired: DesiredState, records: Mapping[str, StackRecord], moving: Collection[str]
    ) -> DesiredState:
        """Each stack with its volumes named as its record says (a stack with none, or one `moving`, is scoped).
        The same loaded stack gets the same renamed one pass after pass, so its specs are computed once."""
        stacks = {}
        for name, stack in desired.stacks.items():
            record = records.get(name)
            names: VolumeNames = record.volume_names if record is not None and name not in moving else "scoped"
            cached = self._named.get(name)
            if cached is not None and cached[0] is stack and cached[1].volume_names == names:
                stacks[name] = cached[1]
                continue
            stacks[name] = with_volume_names(stack, names)
            self._named[name] = (stack, stacks[name])
        return DesiredState(stacks=stacks)

    def apply(
        self,
        plan: PassPlan,
        on_result: Callable[[AnyResult], None] | None = None,
        stop: threading.Event | None = None,
    ) -> PassReport:
        """Apply a plan in phases, then record each stack whose state changed. Never raises for engine errors.

        Once `stop` is set, actions not yet started are skipped (the next pass plans them again); those
        in flight finish and everything done is recorded."""
        reconcile_id = uuid.uuid4().hex[:12]
        if (lost := self._commit_intent(plan)) is not None:
            return PassReport(reconcile_id, [], [*plan.errors, lost])
        all_actions = [a for s in plan.stacks.values() for a in (*s.network_actions, *s.service_actions)]
        # A stack with a container the policy refuses gets no new network either: nothing of it is created. (Each
        # create and start is checked again right before it runs.)
        refused = {
            stack_of(a)
            for a in all_actions
            if isinstance(a, (services.CreateReplica, services.ReplaceReplica, services.StartReplica))
            and self._refused(a)
        }
        phases: list[list[ServiceAction | NetworkAction]] = [
            [a for a in all_actions if isinstance(a, services.RemoveReplica)],
            [a for a in all_actions if isinstance(a, networks.RemoveNetwork)],
            [a for a in all_actions if isinstance(a, networks.CreateNetwork) and a.stack not in refused],
            [
                a
                for a in all_actions
                if isinstance(a, (services.CreateReplica, services.ReplaceReplica, services.StartReplica))
            ],
        ]
        results: list[AnyResult] = []

        def report(done: Sequence[AnyResult]) -> None:
            results.extend(done)
            for result in done:
                if on_result:
                    on_result(result)

        balance = self._apply_balancer(
            plan.balance, [a for s in plan.stacks.values() for a in s.balancer_actions], report
        )
        copies = [a for s in plan.stacks.values() for a in s.volume_actions]
        with ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="apply") as pool:
            for i, phase in enumerate(phases):
                if i == len(phases) - 1 and copies:
                    # Volumes are copied once their replicas are gone; a stack whose copy failed starts nothing.
                    moved = [volumes.apply(self.docker, a) for a in copies if not (stop and stop.is_set())]
                    report(moved)
                    unmoved = {r.action.stack for r in moved if r.outcome is Outcome.FAILED}
                    unmoved |= {a.stack for a in copies} - {r.action.stack for r in moved}
                    plan.unmoved = unmoved
                    phase = [a for a in phase if stack_of(a) not in unmoved]
                report(
                    [r for r in pool.map(lambda a: None if stop and stop.is_set() else self._apply_one(a), phase) if r]
                )
        changed = any(
            isinstance(r.action, services.SERVICE_ACTIONS) and r.outcome is not Outcome.FAILED for r in results
        )
        # What runs now: this pass's observation, or one more container list when replicas changed and the balancer
        # or the cluster (the slot reports) needs it.
        rebalance = self.balancer is not None and plan.balancer_error is None
        after = self.services.observe() if changed and (rebalance or self.cluster) else plan.replicas
        if changed and rebalance:
            self._rebalance(plan, balance, report, after)
        self._record(plan, results, reconcile_id, self._reports(plan, after, results) if self.cluster else {})
        return PassReport(reconcile_id, results, plan.errors)

    def _reports(
        self, plan: PassPlan, after: Sequence[services.Replica], results: Sequence[AnyResult]
    ) -> dict[SlotKey, SlotReport | None]:
        """This node's slot reports that differ from what it last wrote (None: the slot is gone from here); a slot
        whose create or start failed this pass says why."""
        if plan.snapshot is None or plan.offline:
            return {}
        first = _first_networks(
            t for name, stack in plan.desired.stacks.items() if name not in plan.held for t in service_targets(stack)
        )
        tasks = {k: list(v) for k, v in plan.snapshot.tasks.items()}
        for k, put in (plan.intent.tasks.put if plan.intent else {}).items():
            ids = {t.task_id for t in put}
            tasks[k] = [*(t for t in tasks.get(k, []) if t.task_id not in ids), *put]
        by_slot: dict[SlotKey, services.Replica] = {}
        for r in sorted(after, key=lambda r: (r.state == "running", r.created)):
            by_slot[r.key] = r  # the running, newest one of a slot's containers
        now: dict[SlotKey, SlotReport] = {}
        for key, r in by_slot.items():
            network = first.get(key[:2])
            address = (r.addresses.get(network, "") if network else "") or next(
                (a for _, a in sorted(r.addresses.items()) if a), ""
            )
            mine = [t for t in tasks.get(key, []) if t.node == self.node and t.desired == "running"]
            task = next((t.task_id for t in reversed(mine) if t.target == r.spec_hash), "")
            now[key] = _report(r, address, task or (mine[-1].task_id if mine else ""))
        for res in results:
            if res.outcome is Outcome.FAILED and isinstance(res.action, services.SERVICE_ACTIONS):
                key = res.action.key
                if not isinstance(res.action, services.RemoveReplica):
                    update: dict[str, str] = {"error": res.error or ""}
                    rule = self._refused(res.action)  # this node's policy (the one check), not the error's text
                    if rule is not None and res.action.target is not None:
                        update.update(refused=rule, refused_spec=res.action.target.spec_hash)
                    now[key] = (now.get(key) or SlotReport()).model_copy(update=update)
        before = plan.snapshot.reports.get(self.node, {})
        # A refusal stays reported after the slot moved away, while its service's spec is the one refused.
        specs = {
            (name, t.name): t.spec_hash for name, stack in plan.desired.stacks.items() for t in service_targets(stack)
        }
        for k, old in before.items():
            if k not in now and old.refused and specs.get(k[:2]) == old.refused_spec:
                now[k] = old
        changed: dict[SlotKey, SlotReport | None] = {k: v for k, v in now.items() if before.get(k) != v}
        changed.update({k: None for k in before if k not in now and k[0] not in plan.held})
        return changed

    def _commit_intent(self, plan: PassPlan) -> str | None:
        """Commit the plan's intent before anything acts on it; when another writer committed since its snapshot,
        plan again from a fresh one (the plan is updated in place) rather than overwrite. None once committed;
        else why not: LOST_RACE after REPLAN_ATTEMPTS lost races, FENCED when this node's term ended."""
        for _ in range(REPLAN_ATTEMPTS):
            if plan.intent is None or plan.snapshot is None:
                return None
            # The term the plan was made in, never the one read now: a leader deposed since then (no fence now)
            # must not commit unfenced.
            if self.records.commit_intent(plan.intent, plan.snapshot, plan.fence):
                return None
            if self._fenced_out(plan.fence):
                return FENCED
            self.replans += 1
            if self.on_replan is not None:
                self.on_replan()
            if plan.inputs is None:
                return LOST_RACE
            fresh = self.plan(*plan.inputs[:2], plan.inputs[2], migrate_volumes=plan.inputs[3])
            for f in fields(PassPlan):
                setattr(plan, f.name, getattr(fresh, f.name))
        return LOST_RACE

    def _fenced_out(self, fence: Fence | None) -> bool:
        """After a failed commit: whether the fence refused it (this node's term ended), counted and logged."""
        if fence is None or self.records.fence_holds(fence):
            return False
        self.fenced += 1
        if self.on_fenced is not None:
            self.on_fenced()
        log.warning(
            "commit refused by the fence: this node's term %d as leader ended; it follows the new leader", fence.term
        )
        return True

    def _apply_balancer(
        self, balance: Balance, actions: Sequence[BalancerAction], report: Callable[[Sequence[AnyResult]], None]
    ) -> Balance:
        """One ruleset write for all of `actions`; the balance programmed afterwards."""
        if self.balancer is None or not actions:
            return balance
        done = self.balancer.apply(balance, actions)
        report(done)
        failed = any(r.outcome is Outcome.FAILED for r in done)
        return balance if failed else loadbalancer.apply_to(balance, actions)

    def _rebalance(
        self,
        plan: PassPlan,
        balance: Balance,
        report: Callable[[Sequence[AnyResult]], None],
        replicas: Sequence[services.Replica],
    ) -> None:
        """After replicas changed: backends follow what runs now (`replicas`, listed after the changes)."""
        targets = (
            t for name, stack in plan.desired.stacks.items() if name not in plan.held for t in service_targets(stack)
        )
        plan.awaiting_health = _starting(replicas, plan.ports)
        endpoints = _endpoints(_first_networks(targets), replicas, ())
        wanted: Balance = loadbalancer.wanted(plan.ports, endpoints)
        if plan.snapshot is not None:
            wanted = self._forwarded(wanted, plan.snapshot)
        actions = loadbalancer.plan(wanted, balance, keep=plan.held)
        for a in actions:
            plan.stacks.setdefault(a.stack, StackPlan(a.stack, None)).balancer_actions.append(a)
        self._apply_balancer(balance, actions, report)

    def _apply_one(self, action: ServiceAction | NetworkAction) -> AnyResult:
        if isinstance(action, (networks.CreateNetwork, networks.RemoveNetwork)):
            return self.networks.apply(action)
        refused = None if isinstance(action, services.RemoveReplica) else self._refused(action)
        if refused is not None:
            return Result[ServiceAction](action, Outcome.FAILED, refused)
        return self.services.apply(action)

    def _refused(self, action: services.CreateReplica | services.StartReplica | services.ReplaceReplica) -> str | None:
        """Why the policy refuses the container `action` creates or starts, or None. Every create and start passes
        here: the one place a desired container, from whatever revision, reaches the engine."""
        if action.target is None:  # a start planned without its spec cannot be checked: it is not made
            return f"{action}: no spec to hold to the policy; not started"
        for whose, policy in self._admission:
            try:
                admit(action.target, policy)
            except PolicyRefused as exc:
                return f"{exc} (by {whose})" if whose else str(exc)
        return None

    def _record(
        self,
        plan: PassPlan,
        results: Sequence[AnyResult],
        reconcile_id: str,
        reports: Mapping[SlotKey, SlotReport | None],
    ) -> None:
        """Write a stack's record only when something happened to it or its revision moved, and this node's slot
        reports that changed, in one commit. A node that does not lead writes only under its own key (its reports);
        one cut off from the state log writes nothing (its restart bookkeeping stays in memory)."""
        if self._restarts is not None:
            self._restarts.update(plan.restarts)
        if plan.offline:
            return
        if not plan.leading:
            self.records.commit_pass([], [], [], None, node=self.node, reports=reports)
            return
        by_stack: dict[str, list[AnyResult]] = {}
        for r in results:
            by_stack.setdefault(stack_of(r.action), []).append(r)
        now = datetime.now(UTC)
        records: list[StackRecord] = []
        new_revisions: list[StackRecord] = []
        pruned: list[str] = []
        for name, sp in plan.stacks.items():
            stack = plan.desired.stacks.get(name)
            done = by_stack.get(name, [])
            failures = [f"{r.action}: {r.error}" for r in done if r.outcome is Outcome.FAILED]
            if stack is None:
                if not failures and name in plan.records:
                    pruned.append(name)
                continue
            if sp.error and name in plan.held:
                continue
            old = plan.records.get(name)
            if not done and old is not None and old.revision == stack.revision and old.bundle_hash == stack.bundle_hash:
                continue
            targets = service_targets(stack)
            created = {_service_of(r.action) for r in done if r.outcome in (Outcome.CREATED, Outcome.UPDATED)}
            svc_records = {}
            for t in targets:
                prev = old.services.get(t.name) if old else None
                image_id, digest = (
                    (prev.image_id, prev.repo_digest) if prev and prev.image == t.service.image else ("", "")
                )
                used = plan.images.get((name, t.name)) or PlannedImage(t.service.image)
                if used.image_id:  # ran the recorded image ID: identity unchanged
                    image_id = used.image_id
                elif t.name in created or not image_id:
                    image_id, digest = self.docker.image_identity(used.reference)
                    digest = used.digest or digest
                svc_records[t.name] = ServiceRecord(
                    spec_hash=t.spec_hash,
                    spec=dict(t.spec),
                    image=t.service.image,
                    image_id=image_id,
                    repo_digest=digest,
                )
            outcome = PassOutcome(
                reconcile_id=reconcile_id,
                at=now,
                created=sum(1 for r in done if r.outcome is Outcome.CREATED),
                updated=sum(1 for r in done if r.outcome is Outcome.UPDATED),
                removed=sum(1 for r in done if r.outcome is Outcome.REMOVED),
                failed=len(failures),
                errors=failures,
            )
            record = StackRecord(
                stack=name,
                revision=stack.revision,
                file=stack.file,
                bundle_hash=stack.bundle_hash,
                content=stack.content,
                services=svc_records,
                applied_at=now,
                outcome=outcome,
                volume_names="legacy" if name in plan.unmoved else stack.volume_names,
                schema_version=self.schema[1],
            )
            records.append(record)
            if old is None or old.revision != stack.revision or old.bundle_hash != stack.bundle_hash:
                new_revisions.append(record)
        audit = None
        if results:
            audit = AuditEntry(
                reconcile_id=reconcile_id,
                at=now,
                node=self.node,
                actions=[
                    AuditAction(stack=stack_of(r.action), action=str(r.action), outcome=r.outcome.value, error=r.error)
                    for r in results
                ],
            )
        committed = self.records.commit_pass(
            records,
            new_revisions,
            pruned,
            audit,
            restarts=plan.restarts,
            node=self.node,
            reports=reports,
            fence=plan.fence,
            policy=self._cluster_policy(plan.snapshot),
        )
        committed or self._fenced_out(plan.fence)  # a deposed leader's records are refused, and counted

    def _cluster_policy(self, snapshot: Snapshot | None) -> PolicyRecord | None:
        """The policy a cluster's leader records with what it applied, when the recorded one differs."""
        if self.cluster is None or snapshot is None:
            return None
        mine = policy_record(self.policy)
        return None if snapshot.policy == mine else mine


def _plan_moves(
    stacks: Mapping[str, StackPlan],
    stopping: Iterable[services.Replica],
    copies: Mapping[str, list[volumes.MigrateVolume]],
) -> None:
    """Stacks moving to scoped volume names: every replica stops, then the volumes are copied."""
    for r in stopping:
        stacks[r.stack].service_actions.append(services.RemoveReplica(r, "its volumes move to stack-scoped names"))
    for name, moves in copies.items():
        stacks[name].volume_actions.extend(moves)


def _first_networks(targets: Iterable[ServiceTarget]) -> dict[tuple[str, str], str]:
    """(stack, service) -> the network whose address the balancer sends a replica's traffic to."""
    return {(t.stack, t.name): t.networks[0] for t in targets if t.networks}


def _endpoints(
    first_network: Mapping[tuple[str, str], str], replicas: Sequence[services.Replica], draining: Collection[str]
) -> list[loadbalancer.Endpoint]:
    """Replicas as balancer endpoints: ready when running (and healthy, if checked) and not about to stop."""
    out = []
    for r in replicas:
        network = first_network.get((r.stack, r.service))
        address = r.addresses.get(network, "") if network else ""
        address = address or next((a for a in r.addresses.values() if a), "")
        ready = r.state == "running" and r.health in (None, "healthy") and r.id not in draining
        out.append(loadbalancer.Endpoint(r.stack, r.service, address, ready))
    return out


def _refusals(snapshot: Snapshot, desired: DesiredState) -> dict[tuple[str, str], list[str]]:
    """(stack, service) -> the nodes whose own policy refused its current spec (their reports say so): the
    scheduler places it elsewhere until the spec changes."""
    specs = {(name, t.name): t.spec_hash for name, stack in desired.stacks.items() for t in service_targets(stack)}
    out: dict[tuple[str, str], list[str]] = {}
    for node_id, reports in sorted(snapshot.reports.items()):
        for (stack, service, _), rep in reports.items():
            if rep.refused and specs.get((stack, service)) == rep.refused_spec:
                nodes = out.setdefault((stack, service), [])
                if node_id not in nodes:
                    nodes.append(node_id)
    return out


def _ready_peers(snapshot: Snapshot, node: str) -> dict[tuple[str, str], set[str]]:
    """(stack, service) -> the addresses of the other up nodes that report a ready replica of it in a slot still
    assigned to them."""
    out: dict[tuple[str, str], set[str]] = {}
    for node_id, reports in snapshot.reports.items():
        status = snapshot.statuses.get(node_id)
        if node_id == node or status is None or not status.advertise_address:
            continue
        for (stack, service, slot), rep in reports.items():
            if rep.state != "running" or rep.health not in (None, "healthy"):
                continue
            if slot in snapshot.assignments.get((stack, service), {}).get(node_id, ()):
                out.setdefault((stack, service), set()).add(status.advertise_address)
    return out


def _starting(replicas: Sequence[services.Replica], ports: Collection[PortKey]) -> int:
    """Replicas of published services that run but have not passed their healthcheck yet."""
    published = {(k.stack, k.service) for k in ports}
    return sum(1 for r in replicas if (r.stack, r.service) in published and r.health == "starting")


def _recorded_image(target: ServiceTarget, previous: ServiceRecord | None) -> ResolvedImage:
    """The image a node that does not lead runs: the tag at the registry digest the leader recorded (so every
    node runs the same image), or, for an image with no registry digest (built or imported locally), the
    reference as written: each node runs and records its own."""
    svc = target.service
    if previous is None or previous.image != svc.image or not previous.repo_digest:
        return ResolvedImage(target, PlannedImage(svc.image))
    name = svc.image.split("@", 1)[0]
    repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    ref = f"{repo}@{previous.repo_digest}"
    return ResolvedImage(
        replace(target, image_id=ref),
        PlannedImage(ref, digest=previous.repo_digest),
        expected=previous.image_id or None,
        digest=previous.repo_digest,
    )


def _report(replica: services.Replica, address: str, task: str) -> SlotReport:
    return SlotReport(
        task_id=task,
        container_id=replica.id,
        state=replica.state,
        health=replica.health,
        address=address,
        exit_code=replica.exit_code,
        image_id=replica.image_id,
        spec_hash=replica.spec_hash,
        created=replica.created,
    )


def _previous(records: Mapping[str, StackRecord], stack: str, service: str) -> ServiceRecord | None:
    record = records.get(stack)
    return record.services.get(service) if record else None


def _service_of(action: object) -> str | None:
    key = getattr(action, "key", None)
    return key[1] if key else None
