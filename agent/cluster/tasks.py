"""The task model (SwarmKit's): each replica slot runs a task — a slot, a task id, a node, a target spec and a
desired state, `running` or `shutdown`. Pure: the orchestrator derives a pass's task changes from the rollout step,
the slot's reports and the tasks the snapshot holds.

At every revision a slot has at most one task desired running, except during a start-first replacement: then the
old and the new task both are, and the old one becomes `shutdown` in the same change that first records the new one
healthy (or the new one becomes `shutdown` if it fails). Stop-first: the new task is created and the old one shut
down in the same change. A slot keeps its last HISTORY ended tasks, so `ps` shows how they ended.
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


def _settled(tasks: Sequence[TaskRecord], target: str, containers: Sequence[Replica]) -> bool:
    """With no rollout step touching the slot, nothing can change for it: one task is desired running, of the
    current spec, and every container is of that spec (or dead). The common case of a converged pass."""
    running = [t for t in tasks if t.desired == "running"]
    return (
        len(running) == 1
        and running[0].target == target
        and all(c.spec_hash == target or c.state == "dead" for c in containers)
    )


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
    if not _touches(s.step) and _settled(s.tasks, s.target, s.containers):
        return []
    slot = s.key[2]
    running = [t for t in s.tasks if t.desired == "running"]
    current = next((t for t in running if t.target == s.target), None)
    new = [c for c in s.containers if c.spec_hash == s.target]
    # As the services planner does, a slot keeps one older container (running first, then newest): its task.
    kept = sorted((c for c in s.containers if c.spec_hash != s.target and c.state != "dead"), key=_preference)
    olds = {kept[0].spec_hash} if kept else set()
    replacing = slot in s.step.replace or slot in s.step.start_beside
    known = any(t.target == s.target for t in s.tasks)
    out: list[TaskRecord] = []
    # A slot gets a task when the orchestrator decides a container for it: an empty slot, or a replacement. (Slots
    # whose containers a previous release started get theirs at their next replacement: an upgrade writes nothing.)
    if current is None and (replacing or (not known and not new and not olds)):
        current = _new_task(s, now, revision)
        out.append(current)
    handover = slot in s.step.remove_old or slot in s.step.replace
    for t in running:
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


def plan_tasks(
    services: Sequence[ServiceDesired],
    slot_nodes: Mapping[SlotKey, str],
    reports: Sequence[Replica],
    *,
    steps: Mapping[tuple[str, str], rollout.Step],
    rollouts: Mapping[tuple[str, str], rollout.Rollout],
    tasks: Mapping[SlotKey, Sequence[TaskRecord]],
    now: float,
    revision: int,
) -> TaskChanges:
    """Every slot's task changes this pass, and ended tasks beyond the history kept (pure)."""
    by_slot: dict[SlotKey, list[Replica]] = {}
    for r in reports:
        by_slot.setdefault((r.stack, r.service, r.slot), []).append(r)
    out = TaskChanges()
    wanted: set[SlotKey] = set()
    for d in services:
        service = (d.target.stack, d.target.name)
        ro = rollouts.get(service)
        failed = ro is not None and ro.state in ("paused", "rolling-back")
        step = steps.get(service, rollout.Step())
        quiet = not _touches(step)
        for slot in d.slots:
            key = (*service, slot)
            wanted.add(key)
            old, containers = tasks.get(key, ()), by_slot.get(key, [])
            if quiet and len(old) <= HISTORY and _settled(old, d.target.spec_hash, containers):
                continue  # O(changed): a settled slot with no more tasks than the history keeps is skipped
            s = SlotInput(
                key=key,
                node=slot_nodes.get(key, ""),
                target=d.target.spec_hash,
                containers=containers,
                step=step,
                tasks=old,
                failed=failed,
            )
            changed = slot_tasks(s, now, revision)
            if changed:
                out.put[key] = changed
            merged = {t.task_id: t for t in (*s.tasks, *changed)}
            ended = sorted((t for t in merged.values() if t.desired == "shutdown"), key=task_order)
            if len(ended) > HISTORY:
                out.deleted[key] = [t.task_id for t in ended[: len(ended) - HISTORY]]
    stacks = {d.target.stack for d in services}
    for key, old in tasks.items():
        if key[0] in stacks and key not in wanted:  # a slot scaled away, or a service gone from the bundle
            out.deleted[key] = [t.task_id for t in old]
    return out
