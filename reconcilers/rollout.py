"""Rolling updates as a pure function: given each slot's old and new container, the update settings, the
rollout so far and the time, which slots change next (Swarm's UpdateConfig semantics).

A rollout moves in batches of `Parallelism` slots (0: all). stop-first replaces a slot's container; start-first
starts the new container beside the old one and removes the old one once the new one is healthy, so healthy
capacity never drops. A batch is done when every new container is healthy (its healthcheck says so, or — with
no healthcheck — it has run for `Monitor`); `Delay` separates batches. A new container that exits or turns
unhealthy is a failure; past `MaxFailureRatio` the `FailureAction` applies: pause, continue, or rollback
(a rollback's own failure pauses: a rollback is never rolled back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from schemas.bundle import UpdateConfig

State = Literal["updating", "paused", "rolling-back", "completed"]


@dataclass(frozen=True, kw_only=True)
class Container:
    """What the rollout needs to know of one container."""

    id: str
    state: str
    health: str | None
    created: float
    exit_code: int | None = None


@dataclass(frozen=True)
class SlotView:
    """One slot: its container of an older spec and its container of the target spec (either may be absent)."""

    slot: str
    old: Container | None
    new: Container | None


@dataclass(frozen=True)
class SlotFailure:
    """A new container of a rollout's batch that failed, and how: `unhealthy`, `exited (exit code 1)`, `dead`."""

    slot: str
    reason: str

    def __str__(self) -> str:
        return f"slot {self.slot}: {self.reason}"

    @classmethod
    def parse(cls, text: str) -> SlotFailure:
        """A failure from its text, as the state log keeps it (`slot 2: exited (exit code 1)`)."""
        slot, _, reason = text.removeprefix("slot ").partition(": ")
        return cls(slot, reason)


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """The progress of rolling one service to `target`; persisted between passes."""

    target: str
    state: State = "updating"
    batch: tuple[str, ...] = ()
    batch_done_at: float | None = None
    failed: tuple[SlotFailure, ...] = ()
    reason: str = ""
    rollback: bool = False


@dataclass(frozen=True, kw_only=True)
class Step:
    """What to do now: slots to replace (stop-first), to start beside the old one (start-first), old containers
    to remove, the rollout to record, and when to look again (seconds; None when nothing is pending)."""

    replace: tuple[str, ...] = ()
    start_beside: tuple[str, ...] = ()
    remove_old: tuple[str, ...] = ()
    rollout: Rollout | None = None
    recheck_in: float | None = None
    notes: tuple[str, ...] = field(default=())


def new_health(c: Container, monitor: float, now: float) -> Literal["healthy", "pending", "failed"]:
    """healthy: the healthcheck passes, or no healthcheck and running for `monitor`; failed: exited, dead or
    unhealthy; pending otherwise."""
    if c.state in ("exited", "dead") or c.health == "unhealthy":
        return "failed"
    if c.state != "running":
        return "pending"
    if c.health == "healthy":
        return "healthy"
    if c.health is None and now - c.created >= monitor:
        return "healthy"
    return "pending"


def _failure(view: SlotView) -> SlotFailure:
    c = view.new
    assert c is not None
    if c.health == "unhealthy":
        return SlotFailure(view.slot, "unhealthy")
    return SlotFailure(view.slot, c.state + (f" (exit code {c.exit_code})" if c.exit_code is not None else ""))


def paused(rollout: Rollout, why: str) -> Rollout:
    """`rollout` stopped where it is, for `why` (said before its first failure, if any)."""
    first = f": {rollout.failed[0]}" if rollout.failed else ""
    return replace(rollout, state="paused", reason=f"paused ({why}){first}")


def slot_order(slot: str) -> tuple[int, int, str]:
    """Numeric slots in number order, named (global) slots after them."""
    return (0, int(slot), "") if slot.isdigit() else (1, 0, slot)


def step(
    slots: Sequence[SlotView],
    target: str,
    cfg: UpdateConfig,
    rollout: Rollout | None,
    now: float,
    *,
    rollback: bool = False,
    replicas: int | None = None,
) -> Step:
    """The next step of rolling `slots` to `target` (pure); `replicas` (default: len(slots)) is the service's
    whole count, against which MaxFailureRatio is measured."""
    if rollout is None or rollout.target != target:
        rollout = Rollout(target=target, rollback=rollback)
    if rollout.state == "paused":
        return Step(rollout=rollout)
    monitor = cfg.monitor.total_seconds()
    health = {v.slot: new_health(v.new, monitor, now) for v in slots if v.new is not None}
    remove_old = tuple(v.slot for v in slots if v.old is not None and health.get(v.slot) == "healthy")

    failed = list(rollout.failed)
    counted = {f.slot for f in failed}
    for v in slots:
        if health.get(v.slot) == "failed" and v.slot in rollout.batch and v.slot not in counted:
            failed.append(_failure(v))
    rollout = replace(rollout, failed=tuple(failed))
    if (
        failed
        and len(failed) / max(1, replicas or len(slots)) > cfg.max_failure_ratio
        and cfg.failure_action != "continue"
    ):
        if cfg.failure_action == "rollback" and not rollout.rollback:
            state: State = "rolling-back"
            why = f"rolling back: {failed[0]}"
        else:
            state = "paused"
            why = f"paused: {failed[0]}" + (" (during a rollback)" if rollout.rollback else "")
        return Step(remove_old=remove_old, rollout=replace(rollout, state=state, reason=why))

    pending = [v for v in slots if health.get(v.slot) == "pending"]
    if pending:
        waits = [max(0.1, monitor - (now - v.new.created)) for v in pending if v.new and v.new.health is None]
        return Step(remove_old=remove_old, rollout=rollout, recheck_in=min(waits) if waits else 1.0)

    if rollout.batch:  # the batch is through: its clock for Delay starts now
        rollout = replace(rollout, batch=(), batch_done_at=now)
    failed_slots = {f.slot for f in rollout.failed}
    candidates = sorted(
        (v for v in slots if v.old is not None and v.new is None and v.slot not in failed_slots),
        key=lambda v: (v.old is not None and v.old.state == "running", slot_order(v.slot)),
    )
    if not candidates:
        done = not any(v.old is not None and v.slot not in remove_old for v in slots)
        return Step(remove_old=remove_old, rollout=replace(rollout, state="completed" if done else rollout.state))
    delay = cfg.delay.total_seconds()
    if rollout.batch_done_at is not None and now < rollout.batch_done_at + delay:
        return Step(remove_old=remove_old, rollout=rollout, recheck_in=rollout.batch_done_at + delay - now)
    batch = tuple(v.slot for v in candidates[: cfg.parallelism or len(candidates)])
    rollout = replace(rollout, batch=batch, state="rolling-back" if rollout.rollback else "updating")
    if cfg.order == "start-first":
        return Step(start_beside=batch, remove_old=remove_old, rollout=rollout, recheck_in=monitor)
    return Step(replace=batch, remove_old=remove_old, rollout=rollout, recheck_in=monitor)
