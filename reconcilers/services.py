"""Services reconciler: one container per replica slot assigned to this node.

observe() is one labelled container list. plan() is a pure function of (desired, actual). apply() runs one
action through a ContainerRuntime. Only containers carrying this state's owner label are ever observed, so
foreign containers cannot be planned on, whatever their names.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any, ClassVar, Protocol

from bundles.desired import ServiceTarget
from reconcilers import restarts, rollout
from reconcilers.notes import Note, NoteKind
from reconcilers.outcome import ActionKind, Outcome, Result, one_line
from reconcilers.rollout import slot_order
from schemas.state import SlotReport

STARTABLE_STATES = ("created", "exited")


@dataclass(frozen=True, kw_only=True)
class Replica:
    """A managed container as the engine lists it."""

    id: str
    name: str
    stack: str
    service: str
    slot: str
    spec_hash: str
    state: str
    exit_code: int | None = None
    health: str | None = None
    image_id: str = ""
    revision: str = ""
    created: int = 0
    networks: Mapping[str, str] = field(default_factory=dict)  # network name -> network ID
    addresses: Mapping[str, str] = field(default_factory=dict)  # network name -> this replica's IPv4 address
    node: str = ""  # the node it runs on, when the reports of several nodes are merged ("": the observing node)

    @property
    def label(self) -> str:
        return f"{self.stack}_{self.service}.{self.slot}"

    @property
    def key(self) -> tuple[str, str, str]:
        """Its slot: (stack, service, slot)."""
        return (self.stack, self.service, self.slot)

    @classmethod
    def reported(
        cls, key: tuple[str, str, str], report: SlotReport, node: str, networks: Mapping[str, str] | None = None
    ) -> Replica:
        """Another node's replica of slot `key` (stack, service, slot) as that node's report says."""
        stack, service, slot = key
        return cls(
            id=report.container_id,
            name=f"{stack}_{service}.{slot}",
            stack=stack,
            service=service,
            slot=slot,
            spec_hash=report.spec_hash,
            state=report.state,
            exit_code=report.exit_code,
            health=report.health,
            image_id=report.image_id,
            created=report.created,
            networks=networks or {},
            node=node,
        )


@dataclass(frozen=True)
class ImageChange:
    """A tag that now resolves to another registry digest: the spec is the same, the image is not."""

    old_digest: str
    new_digest: str

    def __str__(self) -> str:
        return f"Image digest {_short(self.old_digest)} → {_short(self.new_digest)}"


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12] or "none"


def pending_image(digest: str) -> str:
    """The image ID expected of a tag's new digest before it is pulled: no replica has it yet."""
    return f"pending:{digest}"


@dataclass(frozen=True, kw_only=True)
class ServiceDesired:
    """A service's target spec, the slots the state log assigns to this node, and the last applied spec."""

    target: ServiceTarget
    slots: tuple[str, ...]
    revision: str
    previous_spec: Mapping[str, Any] | None = None
    previous_hash: str | None = None
    rollback: bool = False
    image_id: str | None = None  # the image ID replicas must run (None: any); others are replaced
    image_change: ImageChange | None = None  # the image moved while the spec did not (a tag's new digest)
    image_digest: str | None = None  # the registry digest of the image `image_id` names (pending or recorded)


@dataclass(frozen=True)
class ReplicaRequest:
    """Everything the engine needs to create one replica."""

    name: str
    target: ServiceTarget
    slot: str
    labels: Mapping[str, str]


class ContainerRuntime(Protocol):
    """The narrow engine interface this reconciler needs."""

    def list_replicas(self, owner: str) -> list[Replica]: ...

    def create_replica(self, request: ReplicaRequest) -> str: ...

    def start_replica(self, container_id: str) -> None: ...

    def prepare_image(self, target: ServiceTarget) -> str: ...

    def remove_replica(self, replica: Replica) -> None: ...


# --- actions: their text is the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class CreateReplica:
    """Create and start the container for an empty slot."""

    target: ServiceTarget
    slot: str
    revision: str
    reason: str = "missing"
    kind: ClassVar[ActionKind] = ActionKind.CREATE

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.target.stack, self.target.name, self.slot)

    def __str__(self) -> str:
        return f"{self.kind.sign} {self.target.full_name}.{self.slot} create ({self.reason})"


@dataclass(frozen=True)
class StartReplica:
    """Start an existing container of the current spec again (restart policy)."""

    replica: Replica
    reason: str
    # The spec the replica was created from, held to the policy again before the start (Docker resolves bind
    # sources at each start); not part of the action's identity.
    target: ServiceTarget | None = field(default=None, compare=False)
    kind: ClassVar[ActionKind] = ActionKind.START

    @property
    def key(self) -> tuple[str, str, str]:
        return self.replica.key

    def __str__(self) -> str:
        return f"{self.kind.sign} {self.replica.label} start ({self.reason})"


@dataclass(frozen=True)
class ReplaceReplica:
    """Stop and remove a container of another spec, then create the slot anew (stop-first). `changes` names
    the spec fields that differ; `image` is set instead when only the image moved."""

    replica: Replica
    target: ServiceTarget
    revision: str
    changes: tuple[str, ...]
    _: KW_ONLY
    image: ImageChange | None = None
    kind: ClassVar[ActionKind] = ActionKind.REPLACE

    @property
    def slot(self) -> str:
        return self.replica.slot

    @property
    def key(self) -> tuple[str, str, str]:
        return self.replica.key

    def __str__(self) -> str:
        what = str(self.image) if self.image else ", ".join(self.changes) + " changed"
        return f"{self.kind.sign} {self.replica.label} replace ({what})"


@dataclass(frozen=True)
class RemoveReplica:
    """Stop (with the container's own signal and grace period) and remove a container."""

    replica: Replica
    reason: str
    kind: ClassVar[ActionKind] = ActionKind.REMOVE

    @property
    def key(self) -> tuple[str, str, str]:
        return self.replica.key

    def __str__(self) -> str:
        return f"{self.kind.sign} {self.replica.label} remove ({self.reason})"


ServiceAction = CreateReplica | StartReplica | ReplaceReplica | RemoveReplica
SERVICE_ACTIONS = (CreateReplica, StartReplica, ReplaceReplica, RemoveReplica)


# --- planning ----------------------------------------------------------------------------------------------


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> tuple[str, ...]:
    """Top-level spec fields that differ, e.g. ("Env", "Image"); ("spec",) when the old spec is unknown."""
    if old is None:
        return ("spec",)
    keys = sorted(set(old) | set(new))
    return tuple(k for k in keys if old.get(k) != new.get(k)) or ("spec",)


def _stale_networks(replica: Replica, target: ServiceTarget, network_ids: Mapping[str, str]) -> bool:
    wanted = set(target.networks)
    if set(replica.networks) != wanted:
        return True
    # The engine lists a never-started container's networks without an ID; it joins them by name when started.
    return any(
        network_ids.get(name) != nid for name, nid in replica.networks.items() if nid or replica.state != "created"
    )


def _current(r: Replica, d: ServiceDesired) -> bool:
    """Of the target spec and, when the state recorded one, of the expected image."""
    return r.spec_hash == d.target.spec_hash and (d.image_id is None or r.image_id == d.image_id)


def _preference(replica: Replica) -> tuple[int, int]:
    # Keep the container most likely to be serving: running, then newest.
    return (replica.state != "running", -replica.created)


def _view(r: Replica | None) -> rollout.Container | None:
    if r is None:
        return None
    return rollout.Container(id=r.id, state=r.state, health=r.health, created=float(r.created), exit_code=r.exit_code)


def rollout_target(spec_hash: str, image_id: str | None) -> str:
    """A rollout's identity: the spec it rolls to and, once the state recorded it, the image ID."""
    return f"{spec_hash}@{image_id}" if image_id else spec_hash


def _continued(recorded: rollout.Rollout | None, d: ServiceDesired) -> rollout.Rollout | None:
    """The recorded rollout under `d`'s identity when it rolls to what `d` wants.

    A rollout's first pass may not know the image ID it rolls to: a new reference has none recorded, a tag's
    new digest only `pending:<digest>`; the pull in that pass records it. The rollout it started (with the
    failures of its first batch) goes on under the resolved ID."""
    target = rollout_target(d.target.spec_hash, d.image_id)
    if recorded is None or recorded.target == target or recorded.rollback != d.rollback:
        return recorded
    if d.image_id is None or recorded.state == "completed":
        return recorded
    first = {rollout_target(d.target.spec_hash, None)}
    if d.image_digest:
        first.add(rollout_target(d.target.spec_hash, pending_image(d.image_digest)))
    return replace(recorded, target=target) if recorded.target in first else recorded


ServiceKey = tuple[str, str]
SlotKey = tuple[str, str, str]


@dataclass(kw_only=True)
class ServicesPlan:
    """Actions, plus what the pass must remember: rollouts and restart records that changed, per-service notes
    (a paused rollout, a slot given up on), and when to look again for time-based progress."""

    actions: list[ServiceAction]
    rollouts: dict[ServiceKey, rollout.Rollout] = field(default_factory=dict)
    restarts: dict[SlotKey, restarts.RestartRecord] = field(default_factory=dict)
    notes: dict[ServiceKey, Note] = field(default_factory=dict)
    recheck_in: float | None = None
    rolling: set[ServiceKey] = field(default_factory=set)  # services with a rollout still moving
    steps: dict[ServiceKey, rollout.Step] = field(default_factory=dict)  # each rolling service's step this pass

    def recheck(self, seconds: float | None) -> None:
        if seconds is not None:
            self.recheck_in = seconds if self.recheck_in is None else min(self.recheck_in, seconds)


def plan(
    desired: Sequence[ServiceDesired],
    actual: Sequence[Replica],
    network_ids: Mapping[str, str],
    *,
    now: float = 0.0,
    rollouts: Mapping[ServiceKey, rollout.Rollout] | None = None,
    restart_records: Mapping[SlotKey, restarts.RestartRecord] | None = None,
) -> list[ServiceAction]:
    """Actions that take `actual` to `desired` (pure); see plan_pass for the state it also carries."""
    return plan_pass(desired, actual, network_ids, now=now, rollouts=rollouts, restart_records=restart_records).actions


def plan_pass(
    desired: Sequence[ServiceDesired],
    actual: Sequence[Replica],
    network_ids: Mapping[str, str],
    *,
    now: float = 0.0,
    rollouts: Mapping[ServiceKey, rollout.Rollout] | None = None,
    restart_records: Mapping[SlotKey, restarts.RestartRecord] | None = None,
    steps: Mapping[ServiceKey, rollout.Step] | None = None,
) -> ServicesPlan:
    """One pass's plan (pure).

    `desired` lists every service of every stack this node keeps; a replica of any other stack, service or slot
    in `actual` is removed. `network_ids` maps network names to the ids that survive this pass: a replica
    attached anywhere else is recreated. Replicas of an older spec are replaced in rolling batches
    (reconcilers.rollout) and exited ones restarted with backoff (reconcilers.restarts), both as of `now`.
    `steps` are rollout steps decided for the whole service elsewhere (the orchestrator): a service with one
    takes it instead of stepping its rollout here.
    """
    rollouts = rollouts or {}
    restart_records = restart_records or {}
    by_slot: dict[SlotKey, list[Replica]] = {}
    for r in actual:
        by_slot.setdefault(r.key, []).append(r)
    wanted_services = {(d.target.stack, d.target.name) for d in desired}
    wanted_stacks = {d.target.stack for d in desired}

    out = ServicesPlan(actions=[])
    removes: list[RemoveReplica] = []
    others: list[ServiceAction] = []
    for d in desired:
        t = d.target
        key = (t.stack, t.name)
        policy = t.service.deploy.restart_policy
        recorded = rollouts.get(key)
        current = _continued(recorded, d)
        target_id = rollout_target(t.spec_hash, d.image_id)
        batch = set(current.batch) if current is not None and current.target == target_id else set()
        views: list[rollout.SlotView] = []
        olds: dict[str, Replica] = {}
        given_up: list[str] = []
        for slot in sorted(d.slots, key=slot_order):
            new, old, duplicates = _pick(by_slot.pop((t.stack, t.name, slot), []), d)
            removes.extend(RemoveReplica(x, "duplicate in slot") for x in duplicates)
            record = restart_records.get((t.stack, t.name, slot), restarts.RestartRecord())
            if new is not None and (broken := _broken(new, t, network_ids, record)):
                # Removed in the first phase: a network this pass removes must lose its containers first.
                removes.append(RemoveReplica(new, broken))
                new = None
                if old is None:
                    others.append(CreateReplica(t, slot, d.revision, "recreated"))
                    continue
            if old is not None and new is None and _stale_networks(old, t, network_ids):
                removes.append(RemoveReplica(old, "network gone or changed"))
                others.append(CreateReplica(t, slot, d.revision, "recreated"))
                continue
            if new is None and old is None:
                others.append(CreateReplica(t, slot, d.revision))
                continue
            if old is not None or slot in batch:
                views.append(rollout.SlotView(slot, _view(old), _view(new)))
                if old is not None:
                    olds[slot] = old
                # A failed successor outside the current batch follows the restart policy; the old one stays
                # until its successor is healthy. A successor never started (a pass cut off between its create
                # and its start, after the batch was recorded) is started, in the batch too.
                if new is None or new.state not in ("exited", "created") or (slot in batch and new.state != "created"):
                    continue
            assert new is not None
            decision = restarts.decide(new.state, new.exit_code, policy, record, now, container=new.id)
            start = _follow(decision, new, t, out)
            if start is not None:
                others.append(start)
            elif decision.verdict == "give-up":
                given_up.append(f"slot {slot} failed: {decision.reason}")
        if given_up:
            out.notes[key] = Note(t.name, NoteKind.RESTART_GIVEN_UP, "; ".join(given_up))
        given = steps.get(key) if steps is not None else None
        rolled, retired = _roll(
            d, target_id, views, olds, recorded=recorded, current=current, now=now, out=out, given=given
        )
        others.extend(rolled)
        removes.extend(retired)

    leftovers = sorted(
        (r for reps in by_slot.values() for r in reps),
        key=lambda r: (r.stack, r.service, slot_order(r.slot)),
        reverse=True,
    )
    removes.extend(RemoveReplica(r, _why_unwanted(r, wanted_stacks, wanted_services)) for r in leftovers)
    out.actions = [*removes, *others]
    return out


def _broken(
    replica: Replica, target: ServiceTarget, network_ids: Mapping[str, str], record: restarts.RestartRecord
) -> str | None:
    """Why a container of the current spec must be replaced rather than started or kept, if it must."""
    if replica.state == "dead":
        return "dead"
    if replica.state == "created" and record.start_failed(replica.id):
        return "never started: its start failed"
    if _stale_networks(replica, target, network_ids):
        return "network gone or changed"
    return None


def _pick(replicas: Sequence[Replica], d: ServiceDesired) -> tuple[Replica | None, Replica | None, list[Replica]]:
    """A slot's container of the target spec and its container of an older one (each the one most likely serving),
    and the duplicates of either."""
    news = sorted((r for r in replicas if _current(r, d)), key=_preference)
    older = sorted((r for r in replicas if not _current(r, d)), key=_preference)
    return (news[0] if news else None), (older[0] if older else None), news[1:] + older[1:]


def _why_unwanted(r: Replica, wanted_stacks: Collection[str], wanted_services: Collection[ServiceKey]) -> str:
    if r.stack not in wanted_stacks:
        return "stack pruned: its bundle is gone"
    if (r.stack, r.service) not in wanted_services:
        return "service no longer in the bundle"
    return "slot not assigned to this node"


def _follow(
    decision: restarts.Decision, replica: Replica, target: ServiceTarget, out: ServicesPlan
) -> StartReplica | None:
    """The restart policy's decision for an exited replica: a start (recorded in `out`), or a time to look again."""
    if decision.verdict == "start":
        assert decision.record is not None
        out.restarts[replica.key] = decision.record
        return StartReplica(replica, decision.reason, target)
    if decision.verdict == "wait":
        out.recheck(decision.seconds)
    return None


def _roll(
    d: ServiceDesired,
    target_id: str,
    views: Sequence[rollout.SlotView],
    olds: Mapping[str, Replica],
    *,
    recorded: rollout.Rollout | None,
    current: rollout.Rollout | None,
    now: float,
    out: ServicesPlan,
    given: rollout.Step | None = None,
) -> tuple[list[ServiceAction], list[RemoveReplica]]:
    """The rollout's next step for one service's slots on an older spec: replacements and starts, the old
    containers to remove; the rollout's progress and notes go to `out`. With no such slot left, the rollout
    (`current`: the `recorded` one, if this pass continues it) is complete."""
    t = d.target
    key = (t.stack, t.name)
    if not views:
        if current is not None and current.state != "completed" and current.target == target_id:
            out.rollouts[key] = replace(current, state="completed", batch=())
        return [], []
    cfg = t.service.deploy.rollback_config if d.rollback else t.service.deploy.update_config
    s = given or rollout.step(views, target_id, cfg, current, now, rollback=d.rollback, replicas=len(d.slots))
    out.steps[key] = s
    fields = {
        slot: changed_fields(d.previous_spec if old.spec_hash == d.previous_hash else None, t.spec)
        for slot, old in olds.items()
    }
    # Of the same spec, only the image can differ: the plan names its digests instead of fields.
    image = {slot: d.image_change if old.spec_hash == t.spec_hash else None for slot, old in olds.items()}
    actions: list[ServiceAction] = [
        ReplaceReplica(olds[slot], t, d.revision, () if image[slot] else fields[slot], image=image[slot])
        for slot in s.replace
        if slot in olds  # a step over all of a service's slots names other nodes' too
    ]
    for slot in (x for x in s.start_beside if x in olds):
        why = f"start-first update ({image[slot] or ', '.join(fields[slot])} changed)"
        actions.append(CreateReplica(t, slot, d.revision, why))
    removes = [RemoveReplica(olds[slot], "replaced: its successor is healthy") for slot in s.remove_old if slot in olds]
    if s.rollout is not None and s.rollout != recorded:
        out.rollouts[key] = s.rollout
    if s.rollout is not None and s.rollout.state in ("paused", "rolling-back"):
        kind = NoteKind.ROLLOUT_PAUSED if s.rollout.state == "paused" else NoteKind.ROLLING_BACK
        out.notes[key] = Note(t.name, kind, s.rollout.reason)
    if s.rollout is not None and s.rollout.state in ("updating", "rolling-back"):
        out.rolling.add(key)
    out.recheck(s.recheck_in)
    return actions, removes


def replica_labels(target: ServiceTarget, slot: str, owner: str, node: str, revision: str) -> dict[str, str]:
    """The bundle's labels plus dabctl's: ownership, slot, spec hash and the revision that created it."""
    labels = dict(target.service.labels or {})
    labels.update(
        {
            "dabctl.stack": target.stack,
            "dabctl.service": target.name,
            "dabctl.slot": slot,
            "dabctl.spec": target.spec_hash,
            "dabctl.owner": owner,
            "dabctl.node": node,
            "dabctl.revision": revision,
            "com.docker.stack.namespace": target.stack,
        }
    )
    return labels


def container_name(target: ServiceTarget, slot: str) -> str:
    """`<stack>_<service>.<slot>.<id>` with a fresh random id, as Swarm names tasks."""
    return f"{target.full_name}.{slot}.{secrets.token_hex(6)}"


# --- applying ----------------------------------------------------------------------------------------------


class ServicesReconciler:
    """Applies service actions through a ContainerRuntime; never raises for an engine error."""

    def __init__(self, runtime: ContainerRuntime, owner: str, node: str) -> None:
        self.runtime = runtime
        self.owner = owner
        self.node = node

    def observe(self) -> list[Replica]:
        """This state's containers (one labelled list call)."""
        return self.runtime.list_replicas(self.owner)

    def _create(self, target: ServiceTarget, slot: str, revision: str) -> None:
        labels = replica_labels(target, slot, self.owner, self.node, revision)
        request = ReplicaRequest(container_name(target, slot), target, slot, labels)
        cid = self.runtime.create_replica(request)
        self.runtime.start_replica(cid)

    def apply(self, action: ServiceAction) -> Result[ServiceAction]:
        """Apply one action and report what it did."""
        try:
            if isinstance(action, CreateReplica):
                self._create(action.target, action.slot, action.revision)
                return Result(action, Outcome.CREATED)
            if isinstance(action, StartReplica):
                self.runtime.start_replica(action.replica.id)
                return Result(action, Outcome.UPDATED)
            if isinstance(action, ReplaceReplica):
                # No replica is stopped before its replacement's image is here.
                self.runtime.prepare_image(action.target)
                self.runtime.remove_replica(action.replica)
                self._create(action.target, action.slot, action.revision)
                return Result(action, Outcome.UPDATED)
            self.runtime.remove_replica(action.replica)
            return Result(action, Outcome.REMOVED)
        except Exception as exc:
            return Result(action, Outcome.FAILED, one_line(exc))
