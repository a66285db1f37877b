"""rollout.step as tables: (slots, UpdateConfig, rollout so far, time) -> the next step; then whole rollouts
simulated pass by pass, each step fed back, to show healthy capacity holds (Swarm's UpdateConfig semantics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from reconcilers.rollout import Container, Rollout, SlotFailure, SlotView, Step, new_health, step
from schemas.bundle import UpdateConfig

NOW = 10_000.0
LONG_AGO = NOW - 3600  # far past any Monitor used here
TARGET = "sha256:v2"
E1 = SlotFailure("1", "exited (exit code 1)")
E2 = SlotFailure("2", "exited (exit code 2)")


def cfg(**keys: Any) -> UpdateConfig:
    """UpdateConfig as a bundle spells it; Monitor 5s unless given."""
    return UpdateConfig.model_validate({"Monitor": "5s", **keys})


def ro(**fields: Any) -> Rollout:
    """A rollout to TARGET."""
    return Rollout(target=TARGET, **fields)


def old(slot: str, state: str = "running") -> SlotView:
    """A slot still on an older spec, with no successor yet."""
    return SlotView(slot, Container(id=f"old-{slot}", state=state, health=None, created=LONG_AGO), None)


def new(
    slot: str,
    health: str | None = None,
    *,
    created: float = LONG_AGO,
    state: str = "running",
    exit_code: int | None = None,
    beside: str | None = None,
) -> SlotView:
    """A slot with a container of the target spec; `beside` is the state of an old container still in the slot
    (start-first), None when it is gone. Defaults: running, no healthcheck, past Monitor, so healthy."""
    was = None if beside is None else Container(id=f"old-{slot}", state=beside, health=None, created=LONG_AGO)
    return SlotView(
        slot, was, Container(id=f"new-{slot}", state=state, health=health, created=created, exit_code=exit_code)
    )


def container(state: str = "running", health: str | None = None, created: float = LONG_AGO) -> Container:
    return Container(id="c", state=state, health=health, created=created)


# new_health: (container, monitor seconds) -> verdict at NOW.
HEALTH: dict[str, tuple[Container, float, str]] = {
    "healthcheck-healthy": (container(health="healthy", created=NOW), 5.0, "healthy"),
    "healthcheck-starting": (container(health="starting"), 5.0, "pending"),
    "healthcheck-unhealthy": (container(health="unhealthy"), 5.0, "failed"),
    "no-healthcheck-past-monitor": (container(created=NOW - 6), 5.0, "healthy"),
    "no-healthcheck-exactly-monitor": (container(created=NOW - 5), 5.0, "healthy"),
    "no-healthcheck-within-monitor": (container(created=NOW - 4.9), 5.0, "pending"),
    "no-healthcheck-monitor-0": (container(created=NOW), 0.0, "healthy"),
    "exited": (container("exited"), 5.0, "failed"),
    "exited-was-healthy": (container("exited", "healthy"), 5.0, "failed"),
    "dead": (container("dead"), 5.0, "failed"),
    "created-not-started": (container("created"), 5.0, "pending"),
    "restarting": (container("restarting"), 5.0, "pending"),
    "paused-with-healthy-check": (container("paused", "healthy"), 5.0, "pending"),
}


@pytest.mark.parametrize(("c", "monitor", "expected"), list(HEALTH.values()), ids=list(HEALTH))
def test_new_health(c: Container, monitor: float, expected: str) -> None:
    assert new_health(c, monitor, NOW) == expected


StepCase = tuple[UpdateConfig, Sequence[SlotView], Rollout | None, Step]

# Which slots a fresh rollout takes first: Parallelism of those on an old spec, stopped ones first, then by number.
BATCHES: dict[str, StepCase] = {
    "no-slots": (cfg(), [], None, Step(rollout=ro(state="completed"))),
    "all-on-target": (cfg(), [new("1"), new("2")], None, Step(rollout=ro(state="completed"))),
    "parallelism-1": (
        cfg(Parallelism=1),
        [old("1"), old("2"), old("3")],
        None,
        Step(replace=("1",), rollout=ro(batch=("1",)), recheck_in=5.0),
    ),
    "parallelism-2": (
        cfg(Parallelism=2),
        [old("1"), old("2"), old("3")],
        None,
        Step(replace=("1", "2"), rollout=ro(batch=("1", "2")), recheck_in=5.0),
    ),
    "parallelism-0-is-all": (
        cfg(Parallelism=0),
        [old("1"), old("2"), old("3")],
        None,
        Step(replace=("1", "2", "3"), rollout=ro(batch=("1", "2", "3")), recheck_in=5.0),
    ),
    "parallelism-above-count": (
        cfg(Parallelism=5),
        [old("1"), old("2")],
        None,
        Step(replace=("1", "2"), rollout=ro(batch=("1", "2")), recheck_in=5.0),
    ),
    "slots-in-number-order": (
        cfg(Parallelism=2),
        [old("10"), old("9"), old("2")],
        None,
        Step(replace=("2", "9"), rollout=ro(batch=("2", "9")), recheck_in=5.0),
    ),
    "stopped-old-first": (
        cfg(Parallelism=2),
        [old("1"), old("2"), old("3", "exited")],
        None,
        Step(replace=("3", "1"), rollout=ro(batch=("3", "1")), recheck_in=5.0),
    ),
    "every-not-running-state-first": (
        cfg(Parallelism=0),
        [old("1"), old("2", "created"), old("3", "dead"), old("4", "exited"), old("5", "restarting")],
        None,
        Step(replace=("2", "3", "4", "5", "1"), rollout=ro(batch=("2", "3", "4", "5", "1")), recheck_in=5.0),
    ),
    "only-slots-on-an-old-spec": (
        cfg(Parallelism=2),
        [new("1"), old("2"), new("3")],
        None,
        Step(replace=("2",), rollout=ro(batch=("2",)), recheck_in=5.0),
    ),
    "start-first-parallelism-1": (
        cfg(Parallelism=1, Order="start-first"),
        [old("1"), old("2")],
        None,
        Step(start_beside=("1",), rollout=ro(batch=("1",)), recheck_in=5.0),
    ),
    "start-first-parallelism-0": (
        cfg(Parallelism=0, Order="start-first"),
        [old("2"), old("1", "exited")],
        None,
        Step(start_beside=("1", "2"), rollout=ro(batch=("1", "2")), recheck_in=5.0),
    ),
    "recheck-is-monitor": (
        cfg(Monitor="30s"),
        [old("1")],
        None,
        Step(replace=("1",), rollout=ro(batch=("1",)), recheck_in=30.0),
    ),
}


@pytest.mark.parametrize(("config", "slots", "rollout", "expected"), list(BATCHES.values()), ids=list(BATCHES))
def test_batches(config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, expected: Step) -> None:
    assert step(slots, TARGET, config, rollout, NOW) == expected


START_FIRST = cfg(Parallelism=1, Order="start-first")

# start-first: an old container goes only once its slot's successor is healthy.
REMOVALS: dict[str, StepCase] = {
    "successor-within-monitor-keeps-old": (
        START_FIRST,
        [new("1", created=NOW - 2, beside="running"), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=3.0),
    ),
    "successor-past-monitor-removes-old": (
        START_FIRST,
        [new("1", created=NOW - 5, beside="running"), old("2")],
        ro(batch=("1",)),
        Step(start_beside=("2",), remove_old=("1",), rollout=ro(batch=("2",), batch_done_at=NOW), recheck_in=5.0),
    ),
    "healthcheck-starting-keeps-old": (
        START_FIRST,
        [new("1", "starting", created=NOW - 60, beside="running"), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=1.0),
    ),
    "healthcheck-healthy-removes-old": (
        START_FIRST,
        [new("1", "healthy", created=NOW - 1, beside="running"), old("2")],
        ro(batch=("1",)),
        Step(start_beside=("2",), remove_old=("1",), rollout=ro(batch=("2",), batch_done_at=NOW), recheck_in=5.0),
    ),
    "successor-not-started-keeps-old": (
        START_FIRST,
        [new("1", state="created", created=NOW - 60, beside="running")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=0.1),
    ),
    "successor-failed-keeps-old": (
        START_FIRST,
        [new("1", state="exited", exit_code=1, beside="running"), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",), failed=(E1,), state="paused", reason=f"paused: {E1}")),
    ),
    "stopped-old-removed-too": (
        START_FIRST,
        [new("1", beside="exited"), old("2")],
        ro(batch=("1",)),
        Step(start_beside=("2",), remove_old=("1",), rollout=ro(batch=("2",), batch_done_at=NOW), recheck_in=5.0),
    ),
    "whole-batch-at-once": (
        cfg(Parallelism=2, Order="start-first"),
        [new("1", beside="running"), new("2", "healthy", beside="running"), old("3")],
        ro(batch=("1", "2")),
        Step(start_beside=("3",), remove_old=("1", "2"), rollout=ro(batch=("3",), batch_done_at=NOW), recheck_in=5.0),
    ),
    "healthy-removed-while-other-pending": (
        cfg(Parallelism=2, Order="start-first"),
        [new("1", beside="running"), new("2", created=NOW - 1, beside="running"), old("3")],
        ro(batch=("1", "2")),
        Step(remove_old=("1",), rollout=ro(batch=("1", "2")), recheck_in=4.0),
    ),
}


@pytest.mark.parametrize(("config", "slots", "rollout", "expected"), list(REMOVALS.values()), ids=list(REMOVALS))
def test_start_first_removes_old_once_healthy(
    config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, expected: Step
) -> None:
    assert step(slots, TARGET, config, rollout, NOW) == expected


# While a new container is pending no batch starts; recheck_in is when Monitor runs out (1 s with a healthcheck).
GATES: dict[str, StepCase] = {
    "within-monitor": (
        cfg(Parallelism=1),
        [new("1", created=NOW - 2), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=3.0),
    ),
    "just-created": (
        cfg(Parallelism=1),
        [new("1", state="created", created=NOW), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=5.0),
    ),
    "not-started-past-monitor-floor": (
        cfg(Parallelism=1),
        [new("1", state="created", created=NOW - 60), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=0.1),
    ),
    "healthcheck-starting": (
        cfg(Parallelism=1),
        [new("1", "starting", created=NOW - 60), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch=("1",)), recheck_in=1.0),
    ),
    "soonest-of-several": (
        cfg(Parallelism=2),
        [new("1", created=NOW - 1), new("2", created=NOW - 3.5), old("3")],
        ro(batch=("1", "2")),
        Step(rollout=ro(batch=("1", "2")), recheck_in=1.5),
    ),
    "monitor-before-healthcheck-poll": (
        cfg(Parallelism=2),
        [new("1", "starting", created=NOW - 1), new("2", created=NOW - 4.5), old("3")],
        ro(batch=("1", "2")),
        Step(rollout=ro(batch=("1", "2")), recheck_in=0.5),
    ),
    "one-healthy-one-pending": (
        cfg(Parallelism=2),
        [new("1"), new("2", created=NOW - 4), old("3")],
        ro(batch=("1", "2")),
        Step(rollout=ro(batch=("1", "2")), recheck_in=1.0),
    ),
    "pending-outside-the-batch-holds-too": (
        cfg(Parallelism=1),
        [new("1", created=NOW - 1), old("2")],
        ro(),
        Step(rollout=ro(), recheck_in=4.0),
    ),
}


@pytest.mark.parametrize(("config", "slots", "rollout", "expected"), list(GATES.values()), ids=list(GATES))
def test_pending_holds_the_next_batch(
    config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, expected: Step
) -> None:
    assert step(slots, TARGET, config, rollout, NOW) == expected


DELAYED = cfg(Parallelism=1, Delay="10s")

# Delay runs from the pass that sees a batch through.
DELAYS: dict[str, StepCase] = {
    "first-batch-at-once": (
        DELAYED,
        [old("1"), old("2")],
        None,
        Step(replace=("1",), rollout=ro(batch=("1",)), recheck_in=5.0),
    ),
    "batch-through-starts-the-clock": (
        DELAYED,
        [new("1"), old("2")],
        ro(batch=("1",)),
        Step(rollout=ro(batch_done_at=NOW), recheck_in=10.0),
    ),
    "within-delay": (
        DELAYED,
        [new("1"), old("2")],
        ro(batch_done_at=NOW - 4),
        Step(rollout=ro(batch_done_at=NOW - 4), recheck_in=6.0),
    ),
    "delay-over": (
        DELAYED,
        [new("1"), old("2")],
        ro(batch_done_at=NOW - 10),
        Step(replace=("2",), rollout=ro(batch=("2",), batch_done_at=NOW - 10), recheck_in=5.0),
    ),
    "no-delay-next-batch-same-pass": (
        cfg(Parallelism=1),
        [new("1"), old("2")],
        ro(batch=("1",)),
        Step(replace=("2",), rollout=ro(batch=("2",), batch_done_at=NOW), recheck_in=5.0),
    ),
    "start-first-removes-old-during-delay": (
        cfg(Parallelism=1, Delay="10s", Order="start-first"),
        [new("1", beside="running"), old("2")],
        ro(batch=("1",)),
        Step(remove_old=("1",), rollout=ro(batch_done_at=NOW), recheck_in=10.0),
    ),
}


@pytest.mark.parametrize(("config", "slots", "rollout", "expected"), list(DELAYS.values()), ids=list(DELAYS))
def test_delay_between_batches(
    config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, expected: Step
) -> None:
    assert step(slots, TARGET, config, rollout, NOW) == expected


FailureCase = tuple[UpdateConfig, Sequence[SlotView], Rollout | None, bool, Step]
FOUR_AFTER_1_EXITED = [new("1", state="exited", exit_code=1), old("2"), old("3"), old("4")]

# A failed new container of the current batch is recorded once; past MaxFailureRatio, FailureAction applies.
FAILURES: dict[str, FailureCase] = {
    "exited-pauses": (
        cfg(Parallelism=1),
        FOUR_AFTER_1_EXITED,
        ro(batch=("1",)),
        False,
        Step(rollout=ro(batch=("1",), failed=(E1,), state="paused", reason=f"paused: {E1}")),
    ),
    "unhealthy-pauses": (
        cfg(Parallelism=1),
        [new("1", "unhealthy"), old("2")],
        ro(batch=("1",)),
        False,
        Step(
            rollout=ro(
                batch=("1",),
                failed=(SlotFailure("1", "unhealthy"),),
                state="paused",
                reason="paused: slot 1: unhealthy",
            )
        ),
    ),
    "dead-without-exit-code": (
        cfg(Parallelism=1),
        [new("1", state="dead"), old("2")],
        ro(batch=("1",)),
        False,
        Step(
            rollout=ro(batch=("1",), failed=(SlotFailure("1", "dead"),), state="paused", reason="paused: slot 1: dead")
        ),
    ),
    "start-first-failure-keeps-old": (
        cfg(Parallelism=1, Order="start-first"),
        [new("1", state="exited", exit_code=1, beside="running"), old("2")],
        ro(batch=("1",)),
        False,
        Step(rollout=ro(batch=("1",), failed=(E1,), state="paused", reason=f"paused: {E1}")),
    ),
    "failure-outside-the-batch-not-counted": (
        cfg(Parallelism=1),
        [new("1", state="exited", exit_code=1), old("2")],
        ro(),
        False,
        Step(replace=("2",), rollout=ro(batch=("2",)), recheck_in=5.0),
    ),
    "at-ratio-goes-on": (
        cfg(Parallelism=1, MaxFailureRatio=0.25),
        FOUR_AFTER_1_EXITED,
        ro(batch=("1",)),
        False,
        Step(replace=("2",), rollout=ro(batch=("2",), batch_done_at=NOW, failed=(E1,)), recheck_in=5.0),
    ),
    "past-ratio-pauses-naming-the-first": (
        cfg(Parallelism=1, MaxFailureRatio=0.25),
        [new("1", state="exited", exit_code=1), new("2", state="exited", exit_code=2), old("3"), old("4")],
        ro(batch=("2",), batch_done_at=NOW - 60, failed=(E1,)),
        False,
        Step(rollout=ro(batch=("2",), batch_done_at=NOW - 60, failed=(E1, E2), state="paused", reason=f"paused: {E1}")),
    ),
    "recorded-once": (
        cfg(Parallelism=2, MaxFailureRatio=0.5),
        [new("1", state="exited", exit_code=1), new("2", created=NOW - 1), old("3"), old("4")],
        ro(batch=("1", "2"), failed=(E1,)),
        False,
        Step(rollout=ro(batch=("1", "2"), failed=(E1,)), recheck_in=4.0),
    ),
    "continue-goes-on-past-ratio": (
        cfg(Parallelism=1, FailureAction="continue", Order="start-first"),
        [new("1", state="exited", exit_code=1, beside="running"), old("2")],
        ro(batch=("1",)),
        False,
        Step(start_beside=("2",), rollout=ro(batch=("2",), batch_done_at=NOW, failed=(E1,)), recheck_in=5.0),
    ),
    "continue-skips-a-failed-slot": (
        cfg(Parallelism=2, FailureAction="continue"),
        [old("1", "exited"), old("2"), old("3")],
        ro(failed=(E1,)),
        False,
        Step(replace=("2", "3"), rollout=ro(batch=("2", "3"), failed=(E1,)), recheck_in=5.0),
    ),
    "rollback": (
        cfg(Parallelism=1, FailureAction="rollback"),
        FOUR_AFTER_1_EXITED,
        ro(batch=("1",)),
        False,
        Step(rollout=ro(batch=("1",), failed=(E1,), state="rolling-back", reason=f"rolling back: {E1}")),
    ),
    "rollback-within-ratio-goes-on": (
        cfg(Parallelism=1, FailureAction="rollback", MaxFailureRatio=0.5),
        FOUR_AFTER_1_EXITED,
        ro(batch=("1",)),
        False,
        Step(replace=("2",), rollout=ro(batch=("2",), batch_done_at=NOW, failed=(E1,)), recheck_in=5.0),
    ),
    "a-rollback-is-never-rolled-back": (
        cfg(Parallelism=1, FailureAction="rollback"),
        FOUR_AFTER_1_EXITED,
        ro(batch=("1",), state="rolling-back", rollback=True),
        True,
        Step(
            rollout=ro(
                batch=("1",),
                failed=(E1,),
                state="paused",
                rollback=True,
                reason=f"paused: {E1} (during a rollback)",
            )
        ),
    ),
    "rollback-to-a-new-target-starts-fresh": (
        cfg(Parallelism=1, FailureAction="rollback"),
        FOUR_AFTER_1_EXITED,
        Rollout(target="sha256:v3", batch=("1",), state="rolling-back", reason="rolling back: slot 1: unhealthy"),
        True,
        # A fresh rollout: slot 1 is not in its batch, so its exited container is not counted.
        Step(replace=("2",), rollout=ro(batch=("2",), state="rolling-back", rollback=True), recheck_in=5.0),
    ),
}


@pytest.mark.parametrize(
    ("config", "slots", "rollout", "rollback", "expected"), list(FAILURES.values()), ids=list(FAILURES)
)
def test_failures(
    config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, rollback: bool, expected: Step
) -> None:
    assert step(slots, TARGET, config, rollout, NOW, rollback=rollback) == expected


PAUSED = ro(batch=("1",), failed=(E1,), state="paused", reason=f"paused: {E1}")
MIXED = [new("1", state="exited", exit_code=1), new("2", beside="running"), old("3"), old("4", "exited")]

# A paused rollout does nothing until the target changes; a new target starts a fresh rollout.
PAUSES: dict[str, StepCase] = {
    "paused-does-nothing": (cfg(Parallelism=1), MIXED, PAUSED, Step(rollout=PAUSED)),
    "paused-start-first-keeps-olds": (
        cfg(Parallelism=0, Order="start-first"),
        MIXED,
        PAUSED,
        Step(rollout=PAUSED),
    ),
    "paused-with-no-slots": (cfg(), [], PAUSED, Step(rollout=PAUSED)),
    "new-target-resumes": (
        cfg(Parallelism=1),
        [old("1"), old("2")],
        Rollout(target="sha256:v1", batch=("1",), failed=(E1,), state="paused", reason=f"paused: {E1}"),
        Step(replace=("1",), rollout=ro(batch=("1",)), recheck_in=5.0),
    ),
    "new-target-after-rolling-back": (
        cfg(Parallelism=1),
        [old("1"), old("2")],
        Rollout(target="sha256:v1", state="rolling-back", reason=f"rolling back: {E1}"),
        Step(replace=("1",), rollout=ro(batch=("1",)), recheck_in=5.0),
    ),
}


@pytest.mark.parametrize(("config", "slots", "rollout", "expected"), list(PAUSES.values()), ids=list(PAUSES))
def test_paused(config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, expected: Step) -> None:
    assert step(slots, TARGET, config, rollout, NOW) == expected


CompletionCase = tuple[UpdateConfig, Sequence[SlotView], Rollout | None, bool, str]

# "completed" once no slot has an old container left (the pass removing the last one counts).
COMPLETIONS: dict[str, CompletionCase] = {
    "no-slots": (cfg(), [], None, False, "completed"),
    "all-on-target": (cfg(), [new("1"), new("2")], ro(), False, "completed"),
    "last-batch-healthy": (cfg(), [new("1"), new("2")], ro(batch=("2",)), False, "completed"),
    "last-old-removed-this-pass": (
        cfg(Order="start-first"),
        [new("1"), new("2", beside="running")],
        ro(batch=("2",)),
        False,
        "completed",
    ),
    "nothing-left-during-delay": (
        cfg(Delay="10s"),
        [new("1"), new("2")],
        ro(batch_done_at=NOW - 1),
        False,
        "completed",
    ),
    "rollback-completes": (cfg(), [new("1")], ro(state="rolling-back", rollback=True), True, "completed"),
    "old-left-still-updating": (cfg(), [new("1"), old("2")], ro(), False, "updating"),
    "old-beside-pending-still-updating": (
        cfg(Order="start-first"),
        [new("1", created=NOW - 1, beside="running")],
        ro(batch=("1",)),
        False,
        "updating",
    ),
    "rollback-still-rolling-back": (cfg(), [new("1"), old("2")], None, True, "rolling-back"),
}


@pytest.mark.parametrize(
    ("config", "slots", "rollout", "rollback", "expected"), list(COMPLETIONS.values()), ids=list(COMPLETIONS)
)
def test_completion(
    config: UpdateConfig, slots: Sequence[SlotView], rollout: Rollout | None, rollback: bool, expected: str
) -> None:
    s = step(slots, TARGET, config, rollout, NOW, rollback=rollback)
    assert s.rollout is not None
    assert s.rollout.state == expected
    if expected == "completed":
        assert (s.replace, s.start_beside, s.recheck_in) == ((), (), None)


@dataclass
class Node:
    """The containers of every slot, changed by applying Steps the way the services reconciler does."""

    slots: dict[str, tuple[Container | None, Container | None]]
    healthcheck_after: float | None  # None: no healthcheck, Monitor decides; else "healthy" that long after start
    now: float = NOW
    started: list[tuple[str, ...]] = field(default_factory=list)

    def views(self) -> list[SlotView]:
        return [SlotView(slot, o, self._aged(n)) for slot, (o, n) in self.slots.items()]

    def _aged(self, c: Container | None) -> Container | None:
        if c is None or self.healthcheck_after is None:
            return c
        ok = self.now - c.created >= self.healthcheck_after
        return Container(id=c.id, state=c.state, health="healthy" if ok else "starting", created=c.created)

    def apply(self, s: Step) -> None:
        for slot in s.remove_old:
            self.slots[slot] = (None, self.slots[slot][1])
        for slot in s.replace:  # stop-first: the old one is stopped and removed, then its successor started
            self.slots[slot] = (None, Container(id=f"new-{slot}", state="running", health=None, created=self.now))
        for slot in s.start_beside:
            self.slots[slot] = (
                self.slots[slot][0],
                Container(id=f"new-{slot}", state="running", health=None, created=self.now),
            )
        if s.replace or s.start_beside:
            self.started.append(s.replace or s.start_beside)

    def serving(self, monitor: float) -> int:
        """Slots with a healthy container: an old one running or a new one healthy."""
        return sum(
            (v.old is not None and v.old.state == "running")
            or (v.new is not None and new_health(v.new, monitor, self.now) == "healthy")
            for v in self.views()
        )


def roll(node: Node, config: UpdateConfig, passes: int = 100) -> tuple[Rollout, list[int]]:
    """Run passes, feeding each Step back and moving time to its recheck_in; the serving count after each."""
    rollout: Rollout | None = None
    serving = [node.serving(config.monitor.total_seconds())]
    for _ in range(passes):
        s = step(node.views(), TARGET, config, rollout, node.now)
        node.apply(s)
        serving.append(node.serving(config.monitor.total_seconds()))
        assert s.rollout is not None
        rollout = s.rollout
        if rollout.state == "completed":
            return rollout, serving
        assert rollout.state == "updating", rollout.reason
        assert s.recheck_in is not None and s.recheck_in > 0, "a moving rollout says when to look again"
        node.now += s.recheck_in
        serving.append(node.serving(config.monitor.total_seconds()))
    raise AssertionError(f"not completed after {passes} passes: {rollout}")


def four_old() -> dict[str, tuple[Container | None, Container | None]]:
    return {
        slot: (Container(id=f"old-{slot}", state="running", health=None, created=LONG_AGO), None)
        for slot in ("1", "2", "3", "4")
    }


@pytest.mark.parametrize("healthcheck_after", [None, 3.0, 8.0], ids=["monitor", "healthcheck-3s", "healthcheck-8s"])
def test_start_first_never_drops_capacity(healthcheck_after: float | None) -> None:
    node = Node(four_old(), healthcheck_after)
    rollout, serving = roll(node, cfg(Parallelism=1, Order="start-first"))

    assert min(serving) == 4
    assert rollout.state == "completed"
    assert node.started == [("1",), ("2",), ("3",), ("4",)]
    assert all(o is None and n is not None for o, n in node.slots.values())


@pytest.mark.parametrize(
    ("parallelism", "most_down"), [(1, 1), (2, 2), (3, 3), (0, 4)], ids=["par-1", "par-2", "par-3", "par-0-all"]
)
@pytest.mark.parametrize("healthcheck_after", [None, 3.0], ids=["monitor", "healthcheck-3s"])
def test_stop_first_at_most_parallelism_down(parallelism: int, most_down: int, healthcheck_after: float | None) -> None:
    node = Node(four_old(), healthcheck_after)
    rollout, serving = roll(node, cfg(Parallelism=parallelism))

    assert 4 - min(serving) == most_down
    assert rollout.state == "completed"
    assert [len(b) for b in node.started] == [most_down] * (4 // most_down) + ([4 % most_down] if 4 % most_down else [])
    assert all(o is None and n is not None for o, n in node.slots.values())


def test_delay_spaces_batches() -> None:
    node = Node(four_old(), None)
    starts: list[float] = []
    rollout: Rollout | None = None
    config = cfg(Parallelism=2, Delay="20s", Monitor="5s")
    for _ in range(20):
        s = step(node.views(), TARGET, config, rollout, node.now)
        if s.replace:
            starts.append(node.now)
        node.apply(s)
        rollout = s.rollout
        assert rollout is not None
        if rollout.state == "completed" or s.recheck_in is None:
            break
        node.now += s.recheck_in

    # Each batch is healthy after Monitor (5 s); the next starts Delay (20 s) after that.
    assert [t - NOW for t in starts] == [0.0, 25.0]
    assert rollout is not None and rollout.state == "completed"
