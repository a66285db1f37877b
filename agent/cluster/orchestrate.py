"""`orchestrate`: the decisions a cluster makes once for all nodes, as one pure function.

In: the desired state (pins applied and images resolved by the caller's drivers), one state snapshot at one
revision, and what the nodes report (each slot's containers with their state and health, the host ports in use,
the stacks a node cannot take). Out: an `Intent` — slot assignments (the scheduler is the only reader of
Replicas), published ports, each service's next rollout step over all its slots, and automatic rollback pins.
The caller commits the intent in one guarded transaction before any node acts on it (agent.state.records).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import UTC, datetime

from agent.cluster.nodes import NodeInfo
from agent.cluster.scheduler import Refused, assign
from agent.cluster.snapshot import Assignments, ServiceKey, SlotKey, Snapshot
from agent.cluster.tasks import TaskChanges, plan_tasks
from bundles import InvalidBundles, parse_bundle
from bundles.desired import DesiredState, ServiceTarget, StackBundle, service_targets
from bundles.policy import Policy, count_violations, stack_violations
from reconcilers import loadbalancer, rollout, services
from reconcilers.loadbalancer import PortKey
from reconcilers.notes import Note, NoteKind
from reconcilers.services import ImageChange, Replica, ServiceDesired
from schemas.state import Pin, StackRecord


@dataclass(frozen=True)
class PlannedImage:
    """What a service's replicas are created from this pass: `reference` is the bundle's, one pinned to a
    registry `digest`, or a recorded `image_id` (then nothing is looked up when the pass is recorded)."""

    reference: str
    image_id: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class ResolvedImage:
    """A service's image for this pass: the target to create from, the image ID its replicas must have (with
    the digest it was pulled by), why it moved while the spec did not, and an image check that failed."""

    target: ServiceTarget
    image: PlannedImage
    _: KW_ONLY
    expected: str | None = None
    digest: str | None = None
    change: ImageChange | None = None
    note: Note | None = None


@dataclass(frozen=True, kw_only=True)
class Pinned:
    """The desired state with pins applied: stacks running a pinned revision, pins lifted, pins that fail."""

    desired: DesiredState
    stacks: frozenset[str] = frozenset()
    lifted: Mapping[str, Pin | None] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)


def stack_from_record(record: StackRecord) -> StackBundle:
    """A recorded revision as a stack again: its stored bundle content and the image IDs it ran."""
    suffix = "." + record.file.rsplit(".", 1)[-1] if "." in record.file else ".dab"
    bundle = parse_bundle(record.content, record.file, suffix.lower())
    return StackBundle(
        name=record.stack,
        file=record.file,
        bundle=bundle,
        content=record.content,
        revision=record.revision,
        bundle_hash=record.bundle_hash,
        image_ids={name: s.image_id for name, s in record.services.items() if s.image_id},
    )


def apply_pins(desired: DesiredState, snapshot: Snapshot, policy: Policy) -> Pinned:
    """The desired state with pinned stacks at their pinned revisions (bundle content and image IDs from the
    snapshot's history); pins whose stack's source revision moved on are lifted."""
    stacks = dict(desired.stacks)
    lifted: dict[str, Pin | None] = {}
    errors: dict[str, str] = {}
    pinned: set[str] = set()
    for name, pin in snapshot.pins.items():
        source = desired.stacks.get(name)
        if source is None or source.revision != pin.source_revision:
            lifted[name] = None  # a commit changed (or removed) this stack's bundle: it leads again
            continue
        entry = next((h for h in snapshot.history.get(name, ()) if h.revision == pin.revision), None)
        if entry is None:
            errors[name] = (
                f"pinned to {pin.revision}, which is no longer in the history; dabctl rollback --unpin {name}"
            )
            continue
        try:
            stacks[name] = stack_from_record(entry)
        except InvalidBundles as exc:
            errors[name] = f"pinned revision {pin.revision} no longer loads: {exc.errors[0]}"
            continue
        refused = stack_violations(stacks[name], policy)
        if refused:
            # Caught here so that no replica of it is planned; its containers are also refused one by one
            # at create/start (admit) whatever the plan says.
            errors[name] = f"pinned revision {pin.revision} is refused by the policy: {refused[0]}"
            stacks[name] = source
            continue
        pinned.add(name)
    if pinned:
        for e in count_violations(list(stacks.values()), policy):
            for name in pinned:
                errors.setdefault(name, f"pinned revision {snapshot.pins[name].revision} is refused by the policy: {e}")
    return Pinned(desired=DesiredState(stacks=stacks), stacks=frozenset(pinned), lifted=lifted, errors=errors)


@dataclass(frozen=True, kw_only=True)
class Desired:
    """What the cluster should run this pass, prepared by the caller: `state` with pins applied and volumes
    named, each service's resolved image, the nodes (one: `agent.cluster.nodes.single_node`), the stacks this
    pass may change (`scope`), the stacks running a pinned revision, pins lifted, the published-port rules (None:
    nothing is published), the nodes that refused a service (the scheduler never places it there), and whether
    placement rules apply (False: one node outside a cluster, which runs every slot as before clusters existed)."""

    state: DesiredState
    images: Mapping[ServiceKey, ResolvedImage]
    nodes: tuple[NodeInfo, ...]
    scope: frozenset[str]
    pinned: frozenset[str] = frozenset()
    lifted: Mapping[str, Pin | None] = field(default_factory=dict)
    port_rules: loadbalancer.PortRules | None = None
    # Assignments to follow instead of scheduling: a node that does not lead plans its part of the recorded ones.
    follow: Assignments | None = None
    refused: Refused = field(default_factory=dict)
    placement: bool = True


@dataclass(frozen=True, kw_only=True)
class Observations:
    """What the nodes report: the time, each slot's containers (state, health, spec, image, exit code), the
    networks replicas may stay attached to, host ports in use by something other than the balancer (`busy`)
    and all that listen, and stacks a node cannot take this pass (why, by stack)."""

    now: float
    slots: Sequence[Replica] = ()
    network_ids: Mapping[str, str] = field(default_factory=dict)
    busy: frozenset[tuple[str, int]] = frozenset()
    listening: frozenset[tuple[str, int]] = frozenset()
    blocked: Mapping[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class Intent:
    """The cluster's decisions of one pass, and the changes against the snapshot a commit writes."""

    assignments: Assignments
    pending: dict[SlotKey, str] = field(default_factory=dict)  # slots that fit on no node, and why
    assignments_changed: Assignments = field(default_factory=dict)
    assignments_removed: set[ServiceKey] = field(default_factory=set)
    ports: dict[PortKey, int] = field(default_factory=dict)
    ports_changed: dict[PortKey, int] = field(default_factory=dict)
    ports_removed: set[PortKey] = field(default_factory=set)
    conflicts: dict[PortKey, int] = field(default_factory=dict)  # recorded ports a host process took
    held: set[str] = field(default_factory=set)  # stacks left exactly as they are
    errors: dict[str, str] = field(default_factory=dict)  # why a stack in scope is held or failed
    services: list[ServiceDesired] = field(default_factory=list)  # every slot of every service not held
    steps: dict[ServiceKey, rollout.Step] = field(default_factory=dict)
    rollouts: dict[ServiceKey, rollout.Rollout] = field(default_factory=dict)  # rollouts that moved
    rolling: bool = False
    notes: dict[ServiceKey, Note] = field(default_factory=dict)  # rollouts paused with nothing to roll back to
    recheck_in: float | None = None
    pins: dict[str, Pin | None] = field(default_factory=dict)  # pins set (automatic rollbacks) or lifted
    tasks: TaskChanges = field(default_factory=TaskChanges)

    def node_services(self, node: str) -> list[ServiceDesired]:
        """`node`'s part: each service with the slots assigned to it, and the slots moving away from it whose
        task there is still desired running (a start-first handover: it stops when the new one is healthy)."""
        out = []
        for d in self.services:
            key = (d.target.stack, d.target.name)
            slots = tuple(self.assignments.get(key, {}).get(node, []))
            leaving = self.tasks.leaving.get(node, {}).get(key)
            if leaving:
                slots = (*slots, *leaving)
            out.append(d if slots == d.slots else replace(d, slots=slots))
        return out

    @property
    def changed(self) -> bool:
        return bool(
            self.assignments_changed or self.assignments_removed or self.ports_changed or self.ports_removed
        ) or bool(self.rollouts or self.pins or self.tasks)


def orchestrate(desired: Desired, snapshot: Snapshot, observations: Observations) -> Intent:
    """The cluster's decisions for one pass (pure)."""
    held = {n for n in _names(desired, snapshot) if n not in desired.scope} | set(observations.blocked)
    errors = {k: v for k, v in observations.blocked.items() if k in desired.scope}
    allocation = _allocate(desired, snapshot, observations, held)
    errors.update({k: v for k, v in allocation.errors.items() if k in desired.scope and k not in errors})
    held |= set(allocation.errors)
    for key, port in sorted(allocation.conflicts.items()):
        errors.setdefault(key.stack, loadbalancer.conflict_error(key, port))  # Failed, but not held

    if desired.follow is not None:  # following the recorded assignments: what is pending stays as recorded
        assignments, pending = desired.follow, dict(snapshot.pending)
    else:
        schedule = assign(
            desired.state, desired.nodes, snapshot.assignments, desired.refused, placement=desired.placement
        )
        assignments, pending = schedule.assignments, schedule.pending
    recorded = snapshot.assignments
    intent = Intent(
        assignments=assignments,
        pending={k: v for k, v in pending.items() if k[0] not in held},
        assignments_changed={
            k: v for k, v in assignments.items() if k[0] not in held and not _same(recorded.get(k), v)
        },
        assignments_removed={k for k in set(recorded) - set(assignments) if k[0] not in held},
        held=held,
        errors=errors,
        pins=dict(desired.lifted),
        conflicts=dict(allocation.conflicts),
    )
    if desired.port_rules is not None:
        intent.ports = allocation.ports
        intent.ports_changed = {k: p for k, p in allocation.ports.items() if snapshot.ports.get(k) != p}
        intent.ports_removed = {
            k
            for k in snapshot.ports
            if k.stack not in held and k not in allocation.ports and k not in allocation.conflicts
        }
    intent.services = _services(desired, snapshot, assignments, held)
    _roll(intent, desired, snapshot, observations)
    slot_nodes: dict[SlotKey, str] = {
        (*key, slot): node for key, nodes in assignments.items() for node, slots in nodes.items() for slot in slots
    }
    intent.tasks = plan_tasks(
        intent.services,
        slot_nodes,
        [r for r in observations.slots if r.stack not in held],
        steps=intent.steps,
        pending=intent.pending,
        rollouts={**snapshot.rollouts, **intent.rollouts},
        tasks={k: v for k, v in snapshot.tasks.items() if k[0] not in held},
        now=observations.now,
        revision=snapshot.revision,
    )
    if intent.tasks.recheck_in is not None:  # a start-first move waits for its new task's monitor period
        wait = intent.tasks.recheck_in
        intent.recheck_in = wait if intent.recheck_in is None else min(intent.recheck_in, wait)
    return intent


def _same(recorded: Mapping[str, list[str]] | None, new: Mapping[str, list[str]]) -> bool:
    """The recorded assignment says the same (a node recorded with no slot counts as absent)."""
    if recorded is None:
        return False
    if recorded == new:
        return True
    return {n: s for n, s in recorded.items() if s} == new


def _names(desired: Desired, snapshot: Snapshot) -> set[str]:
    """Every stack the desired state or the snapshot knows (one may have ports and slots before its record)."""
    return stacks_known(desired.state, snapshot)


def stacks_known(desired: DesiredState, snapshot: Snapshot) -> set[str]:
    """Every stack the desired state or the snapshot knows (one may have ports and slots before its record)."""
    return (
        set(desired.stacks)
        | set(snapshot.stacks)
        | {stack for stack, _ in snapshot.assignments}
        | {k.stack for k in snapshot.ports}
    )


def _allocate(
    desired: Desired, snapshot: Snapshot, observations: Observations, held: Collection[str]
) -> loadbalancer.Allocation:
    """Published ports of the stacks this pass may change; held stacks keep theirs as recorded."""
    rules = desired.port_rules
    if rules is None:
        return loadbalancer.Allocation()
    requests = [
        loadbalancer.PortRequest(
            PortKey(name, t.name, p.protocol, p.port),
            p.published_port,
            f"{stack.file}: Services.{t.name}.Ports[{i}]",
        )
        for name, stack in desired.state.stacks.items()
        if name not in held
        for t in service_targets(stack)
        for i, p in enumerate(t.service.ports or [])
    ]
    # dabctl's own ports are never handed out, whether or not the agent listens on them right now.
    busy = set(observations.busy) | {("tcp", p) for p in rules.reserved}
    # Ports recorded for held stacks stay theirs: nobody else may take them.
    keep = {k: p for k, p in snapshot.ports.items() if k.stack in held}
    allocation = loadbalancer.allocate(
        [*requests, *(loadbalancer.PortRequest(k, p) for k, p in keep.items())], snapshot.ports, busy, rules.range
    )
    ports = {k: p for k, p in allocation.ports.items() if k.stack not in held}
    # Checked on every pass, not only when a port is first allocated: a host service started later wins.
    return loadbalancer.give_way(loadbalancer.Allocation(ports, allocation.errors), observations.listening)


def _services(
    desired: Desired, snapshot: Snapshot, assignments: Assignments, held: Collection[str]
) -> list[ServiceDesired]:
    """Every service not held, with all its slots (on every node) and the image it runs."""
    out = []
    for name, stack in desired.state.stacks.items():
        if name in held:
            continue
        record = snapshot.stacks.get(name)
        for target in service_targets(stack):
            previous = record.services.get(target.name) if record else None
            resolved = desired.images[(name, target.name)]
            slots = [s for node_slots in assignments.get((name, target.name), {}).values() for s in node_slots]
            out.append(
                ServiceDesired(
                    target=resolved.target,
                    image_id=resolved.expected,
                    image_change=resolved.change,
                    image_digest=resolved.digest,
                    slots=tuple(slots),
                    revision=stack.revision,
                    previous_spec=previous.spec if previous else None,
                    previous_hash=previous.spec_hash if previous else None,
                    rollback=name in desired.pinned,
                )
            )
    return out


def _roll(intent: Intent, desired: Desired, snapshot: Snapshot, observations: Observations) -> None:
    """Each service's next rollout step over all its slots, from the slots' reports; a rollout that fails into
    `rollback` pins its stack to the revision applied before."""
    live = [r for r in observations.slots if r.stack not in intent.held]
    moving = _moving(intent.services, live, snapshot)
    sp = services.plan_pass(
        [d for d in intent.services if (d.target.stack, d.target.name) in moving],
        [r for r in live if (r.stack, r.service) in moving],
        observations.network_ids,
        now=observations.now,
        rollouts=snapshot.rollouts,
    )
    intent.steps = sp.steps
    intent.rollouts = dict(sp.rollouts)
    intent.rolling = bool(sp.rolling)
    intent.recheck_in = sp.recheck_in
    for (stack, service), ro in sp.rollouts.items():
        if ro.state != "rolling-back" or ro.rollback or stack in desired.pinned:
            continue
        pin = _rollback_pin(stack, desired.state, snapshot, ro.reason, observations.now)
        if pin is None:
            stopped = rollout.paused(ro, "no earlier revision to roll back to")
            intent.rollouts[(stack, service)] = stopped
            intent.notes[(stack, service)] = Note(service, NoteKind.ROLLOUT_PAUSED, stopped.reason)
        else:
            intent.pins[stack] = pin
            intent.recheck_in = 0.0
            intent.rolling = True


def follow_steps(
    wanted: Sequence[ServiceDesired],
    slots: Sequence[Replica],
    rollouts: Mapping[ServiceKey, rollout.Rollout],
    now: float,
) -> dict[ServiceKey, rollout.Step]:
    """The rollout steps a node that does not lead takes: the batch the leader recorded, never one it chooses
    itself (pure). Its own `slots` of the batch are replaced (or, start-first, get a successor beside them), and an
    old container goes once its successor is healthy; a service with no rollout in progress steps nowhere."""
    out: dict[ServiceKey, rollout.Step] = {}
    for d in wanted:
        key = (d.target.stack, d.target.name)
        ro = rollouts.get(key)
        if ro is None or ro.state not in ("updating", "rolling-back") or ro.target.split("@")[0] != d.target.spec_hash:
            out[key] = rollout.Step(rollout=ro)
            continue
        cfg = d.target.service.deploy.rollback_config if d.rollback else d.target.service.deploy.update_config
        monitor = cfg.monitor.total_seconds()
        mine = [r for r in slots if (r.stack, r.service) == key]
        # Current: the target spec on the image the leader recorded (a tag's new digest changes no spec hash).
        current = {r.id for r in mine if r.spec_hash == d.target.spec_hash and d.image_id in (None, r.image_id)}
        healthy = {
            r.slot
            for r in mine
            if r.id in current
            and rollout.new_health(
                rollout.Container(
                    id=r.id, state=r.state, health=r.health, created=float(r.created), exit_code=r.exit_code
                ),
                monitor,
                now,
            )
            == "healthy"
        }
        stale = {r.slot for r in mine if r.id not in current}
        remove_old = tuple(sorted(healthy & stale))
        batch = tuple(x for x in ro.batch if x in stale)
        if cfg.order == "start-first":
            out[key] = rollout.Step(start_beside=batch, remove_old=remove_old, rollout=ro, recheck_in=monitor or None)
        else:
            out[key] = rollout.Step(replace=batch, remove_old=remove_old, rollout=ro, recheck_in=monitor or None)
    return out


def _moving(wanted: Sequence[ServiceDesired], slots: Sequence[Replica], snapshot: Snapshot) -> set[ServiceKey]:
    """Services a rollout step may concern: a slot reports a container of another spec or image, or a rollout
    recorded for it is not complete. The others have nothing to step (and a converged pass stays cheap)."""
    by_key = {(d.target.stack, d.target.name): d for d in wanted}
    out = {k for k, ro in snapshot.rollouts.items() if ro.state != "completed" and k in by_key}
    for r in slots:
        d = by_key.get((r.stack, r.service))
        if d is not None and (
            r.spec_hash != d.target.spec_hash or (d.image_id is not None and r.image_id != d.image_id)
        ):
            out.add((r.stack, r.service))
    return out


def _rollback_pin(stack: str, desired: DesiredState, snapshot: Snapshot, reason: str, now: float) -> Pin | None:
    """A pin to the revision applied before the current one, or None when there is none."""
    current = desired.stacks[stack].revision
    earlier = next((h for h in snapshot.history.get(stack, ()) if h.revision != current), None)
    if earlier is None:
        return None
    return Pin(
        stack=stack,
        revision=earlier.revision,
        reason=f"automatic rollback of {current}: {reason}",
        automatic=True,
        source_revision=current,
        at=datetime.fromtimestamp(now, UTC),
    )
