"""The task model (SwarmKit's): each replica slot runs a task — a slot, a task id, a node, a target spec and a
desired state, `running` or `shutdown`. Pure: the orchestrator derives a pass's task changes from the rollout step,
the slot's reports and the tasks the snapshot holds.

At every revision a slot has at most one task desired running, except during a start-first replacement: then the
old and the new task both are, and the old one becomes `shutdown` in the same change that first records the new one
healthy (or the new one becomes `shutdown` if it fails). Stop-first: the new task is created and the old one shut
down in the same change. A slot keeps its last HISTORY ended tasks, so `ps` shows how they ended.

A slot the scheduler moves to another node (its node went down, was drained or no longer fits) gets a new task on
the new node, handed over by the service's update order: start-first keeps the old task running (and its node
keeps the slot: `TaskChanges.leaving`) until the new one is running and healthy; stop-first shuts it down in the
change that creates the new one. A pending slot (no node fits) keeps no task running.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.cluster.snapshot import SlotKey
from reconcilers import rollout
from reconcilers.services import Replica, ServiceDesired
from schemas.state import TaskRecord

HISTORY = 5


@dataclass(kw_only=True)
class TaskChanges:
    """Tasks to write (new or changed) and to delete, by slot."""

    put: dict[SlotKey, list[TaskRecord]] = field(default_factory=dict)
    deleted: dict[SlotKey, list[str]] = field(default_factory=dict)  # task ids
    # node -> service -> slots moving away from it whose old task stays running until the new one is healthy
    leaving: dict[str, dict[tuple[str, str], list[str]]] = field(default_factory=dict)
    recheck_in: float | None = None  # a moved slot's new container runs without a healthcheck: healthy after this

    def __bool__(self) -> bool:
        return bool(self.put or self.deleted)


def task_id(slot: SlotKey, target: str, revision: int) -> str:
    """A task's id: derived from what created it, so that planning stays pure and two plans agree."""
    return "t" + hashlib.sha256(f"{'/'.join(slot)}/{target}/{revision}".encode()).hexdigest()[:11]


@dataclass(frozen=True, kw_only=True)
class SlotInput:
    """What one slot's tasks are derived from."""

    key: SlotKey
    node: str
    target: str
    containers: Sequence[Replica]
    step: rollout.Step
    tasks: Sequence[TaskRecord]
    failed: bool  # the service's rollout stopped on a failure (paused or rolling back)
    start_first: bool = False  # the service's update order: how a slot moving to another node is handed over
    monitor: float = 0.0  # seconds a container without a healthcheck must run to count as healthy (UpdateConfig)


def _preference(c: Replica) -> tuple[bool, int]:
    return (c.state != "running", -c.created)


def _failure(c: Replica) -> str:
    if c.health == "unhealthy":
        return "unhealthy"
    return c.state + (f" (exit code {c.exit_code})" if c.exit_code is not None else "")


def _ended(task: TaskRecord, containers: Sequence[Replica], now: float, error: str = "") -> TaskRecord:
    mine = next((c for c in containers if c.spec_hash == task.target), None)
    exit_code = mine.exit_code if mine is not None and mine.state in ("exited", "dead") else None
    return task.model_copy(update={"desired": "shutdown", "ended_at": now, "exit_code": exit_code, "error": error})


def _ready(c: Replica, monitor: float, now: float) -> bool:
    """Healthy as a rollout counts it: the healthcheck passes, or none and running for the monitor period."""
    return c.state == "running" and (c.health == "healthy" or (c.health is None and now - c.created >= monitor))


def _touches(step: rollout.Step) -> bool:
    return bool(step.replace or step.start_beside or step.remove_old)


def _new_task(s: SlotInput, now: float, revision: int) -> TaskRecord:
    # Built without validation (model_construct): every field is this module's own, typed value; a cold converge
    # creates one per slot. It is validated when read back.
    return TaskRecord.model_construct(
        task_id=task_id(s.key, s.target, revision),
        slot=s.key[2],
        node=s.node,
        target=s.target,
        desired="running",
        created_at=now,
        created_revision=revision,
        healthy=False,
        ended_at=None,
        exit_code=None,
        error="",
    )


def slot_tasks(s: SlotInput, now: float, revision: int) -> list[TaskRecord]:
    """The slot's tasks that change this pass (pure)."""
    if not s.tasks and not s.containers and s.key[2] not in s.step.remove_old:  # an empty slot: its first task
        return [_new_task(s, now, revision)]
    slot = s.key[2]
    running = [t for t in s.tasks if t.desired == "running"]
    here = [t for t in running if t.node == s.node]
    away = [t for t in running if t.node != s.node]  # the slot moved: these hand over to a task here
    current = next((t for t in here if t.target == s.target), None)
    # Containers on the slot's node (a report with no node is this node's: one node observing itself).
    containers = [c for c in s.containers if c.node in ("", s.node)]
    new = [c for c in containers if c.spec_hash == s.target]
    # As the services planner does, a slot keeps one older container (running first, then newest): its task.
    kept = sorted((c for c in containers if c.spec_hash != s.target and c.state != "dead"), key=_preference)
    olds = {kept[0].spec_hash} if kept else set()
    replacing = slot in s.step.replace or slot in s.step.start_beside
    known = any(t.target == s.target and t.node == s.node for t in s.tasks)
    out: list[TaskRecord] = []
    # A slot gets a task when the orchestrator decides a container for it: an empty slot, a replacement or a move.
    # (Slots whose containers a previous release started get theirs at their next replacement: an upgrade writes
    # nothing.)
    if current is None and (replacing or bool(away) or (not known and not new and not olds)):
        current = _new_task(s, now, revision)
        out.append(current)
    handover = slot in s.step.remove_old or slot in s.step.replace
    moved = current is not None and any(_ready(c, s.monitor, now) for c in new)  # the new task here runs healthy
    for t in away:
        if not s.start_first or moved:
            out.append(_ended(t, s.containers, now))
    if away and moved and current is not None and not current.healthy and s.start_first:
        out = [t for t in out if t.task_id != current.task_id]
        out.append(current.model_copy(update={"healthy": True}))
    for t in here:
        if t is current:
            continue
        if handover or t.target not in olds or (current is not None and not olds):
            out.append(_ended(t, s.containers, now))
    if current is not None and slot in s.step.remove_old and not current.healthy:
        out = [t for t in out if t.task_id != current.task_id]
        out.append(current.model_copy(update={"healthy": True}))
    if current is not None and s.failed and olds and any(rollout_failed(c) for c in new):
        failed = next(c for c in new if rollout_failed(c))
        out = [t for t in out if t.task_id != current.task_id]
        out.append(_ended(current, new, now, error=_failure(failed)))
    return out


def task_order(t: TaskRecord) -> tuple[float, int]:
    """Oldest first."""
    return (t.created_at, t.created_revision)


def rollout_failed(c: Replica) -> bool:
    return c.state in ("exited", "dead") or c.health == "unhealthy"


def _leaving(s: SlotInput, changed: Sequence[TaskRecord]) -> set[str]:
    """The other nodes where a task of the slot stays desired running after this pass's changes."""
    ended = {t.task_id for t in changed if t.desired == "shutdown"}
    return {t.node for t in s.tasks if t.desired == "running" and t.node != s.node and t.task_id not in ended}


def plan_tasks(
    services: Sequence[ServiceDesired],
    slot_nodes: Mapping[SlotKey, str],
    reports: Sequence[Replica],
    *,
    steps: Mapping[tuple[str, str], rollout.Step],
    pending: Mapping[SlotKey, str] | None = None,
    rollouts: Mapping[tuple[str, str], rollout.Rollout],
    tasks: Mapping[SlotKey, Sequence[TaskRecord]],
    now: float,
    revision: int,
) -> TaskChanges:
    """Every slot's task changes this pass, and ended tasks beyond the history kept (pure)."""
    pending = pending or {}
    by_slot: dict[SlotKey, list[Replica]] = {}
    for r in reports:
        by_slot.setdefault(r.key, []).append(r)
    out = TaskChanges()
    wanted: set[SlotKey] = set()
    for d in services:
        service = (d.target.stack, d.target.name)
        ro = rollouts.get(service)
        failed = ro is not None and ro.state in ("paused", "rolling-back")
        step = steps.get(service, rollout.Step())
        update = d.target.service.deploy.update_config
        start_first = update.order == "start-first"
        quiet = not _touches(step)
        for slot in d.slots:
            key = (*service, slot)
            wanted.add(key)
            node = slot_nodes.get(key, "")
            known = tasks.get(key, ())
            if quiet and len(known) <= HISTORY and _settled(known, node, d.target.spec_hash, by_slot.get(key, ())):
                continue  # the converged case, most slots of a large cluster: nothing can change
            s = SlotInput(
                key=key,
                node=node,
                target=d.target.spec_hash,
                containers=by_slot.get(key, []),
                step=step,
                tasks=known,
                failed=failed,
                start_first=start_first,
                monitor=update.monitor.total_seconds(),
            )
            changed = slot_tasks(s, now, revision)
            if changed:
                out.put[key] = changed
            if any(t.node != s.node and t.desired == "running" for t in s.tasks):
                leaving = _leaving(s, changed)
                for other in leaving:
                    out.leaving.setdefault(other, {}).setdefault(service, []).append(slot)
                wait = _monitor_left(s, now) if leaving else None
                if wait is not None:
                    out.recheck_in = wait if out.recheck_in is None else min(out.recheck_in, wait)
            _trim(out, key, s.tasks, changed)
    for key, reason in pending.items():
        old = tasks.get(key, ())
        wanted.add(key)
        error = f"pending: {reason}"
        changed = [_ended(t, by_slot.get(key, []), now, error=error) for t in old if t.desired == "running"]
        if changed:
            out.put[key] = changed
        _trim(out, key, old, changed)
    stacks = {d.target.stack for d in services}
    for key, old in tasks.items():
        if key[0] in stacks and key not in wanted:  # a slot scaled away, or a service gone from the bundle
            out.deleted[key] = [t.task_id for t in old]
    return out


def _settled(tasks: Sequence[TaskRecord], node: str, target: str, containers: Sequence[Replica]) -> bool:
    """The slot's one task desired running runs `target` on its node and every container reported for it runs that
    spec (ended tasks are history: they change nothing)."""
    running = [t for t in tasks if t.desired == "running"]
    if len(running) != 1:
        return False
    t = running[0]
    return (
        t.desired == "running"
        and t.node == node
        and t.target == target
        and all(c.spec_hash == target and c.node in ("", node) for c in containers)
    )


def _monitor_left(s: SlotInput, now: float) -> float | None:
    """Seconds until the new container of a moved slot without a healthcheck has run for the monitor period."""
    waits = [
        max(0.1, s.monitor - (now - c.created))
        for c in s.containers
        if c.node in ("", s.node) and c.spec_hash == s.target and c.state == "running" and c.health is None
    ]
    return min(waits) if waits else None


def _trim(out: TaskChanges, key: SlotKey, tasks: Sequence[TaskRecord], changed: Sequence[TaskRecord]) -> None:
    """Delete the slot's ended tasks beyond the HISTORY kept."""
    if not changed and len(tasks) <= HISTORY:
        return
    merged = {t.task_id: t for t in (*tasks, *changed)}
    ended = sorted((t for t in merged.values() if t.desired == "shutdown"), key=task_order)
    if len(ended) > HISTORY:
        out.deleted[key] = [t.task_id for t in ended[: len(ended) - HISTORY]]
