"""Table tests of `follow_steps`: a node that does not lead takes the rollout batch the leader recorded for its
own slots, and never picks one itself (pure: no Docker, no state log)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.cluster.orchestrate import follow_steps
from bundles.desired import service_targets
from reconcilers.rollout import Rollout
from reconcilers.services import Replica, ServiceDesired
from tests.node.conftest import bundle, desired, service

NOW = 1_700_000_000.0


def wanted(**deploy: Any) -> ServiceDesired:
    state = desired(web=bundle({"front": service(Deploy={"Replicas": 6, **deploy})}))
    target = service_targets(state.stacks["web"])[0]
    return ServiceDesired(target=target, slots=("2", "5"), revision="r2")


def replica(slot: str, spec: str, *, state: str = "running", health: str | None = None, age: float = 60) -> Replica:
    return Replica(
        id=f"c{slot}{spec[:3]}",
        name=f"web_front.{slot}",
        stack="web",
        service="front",
        slot=slot,
        spec_hash=spec,
        state=state,
        health=health,
        created=int(NOW - age),
    )


@pytest.mark.parametrize(
    ("order", "batch", "mine", "expected"),
    [
        # Stop-first: of the recorded batch, the slots here that still run the old spec are replaced.
        ("stop-first", ("2", "3"), [("2", "old"), ("5", "old")], (("2",), (), ())),
        # A batch with none of this node's slots: nothing here, whatever runs old.
        ("stop-first", ("1", "3"), [("2", "old"), ("5", "old")], ((), (), ())),
        # Start-first: a successor beside the old one; the old one goes once the new one is healthy.
        ("start-first", ("2",), [("2", "old"), ("5", "old")], ((), ("2",), ())),
        ("start-first", ("5",), [("2", "old"), ("2", "new"), ("5", "old")], ((), ("5",), ("2",))),
    ],
)
def test_a_follower_takes_the_recorded_batch_for_its_own_slots(
    order: str,
    batch: tuple[str, ...],
    mine: list[tuple[str, str]],
    expected: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
) -> None:
    """`expected`: the slots replaced, started beside their old container, and whose old container goes."""
    d = wanted(UpdateConfig={"Order": order, "Monitor": "1s"})
    spec = d.target.spec_hash
    slots = [replica(slot, spec if which == "new" else "old-spec") for slot, which in mine]
    ro = Rollout(target=f"{spec}@sha256:leader", batch=batch)

    step = follow_steps([d], slots, {("web", "front"): ro}, NOW)[("web", "front")]

    assert (step.replace, step.start_beside, step.remove_old) == expected
    assert step.rollout == ro, "the leader's rollout, not a step of the follower's own"


@pytest.mark.parametrize("state", ["completed", "paused"])
def test_a_follower_steps_nowhere_without_a_rollout_moving(state: str) -> None:
    d = wanted()
    ro = Rollout(target=d.target.spec_hash, state=state, batch=("2",))  # type: ignore[arg-type]
    step = follow_steps([d], [replica("2", "old-spec")], {("web", "front"): ro}, NOW)[("web", "front")]
    assert (step.replace, step.start_beside, step.remove_old) == ((), (), ())


def test_a_follower_does_not_roll_to_a_spec_it_has_not_been_given() -> None:
    """The leader's rollout names a newer spec than the records this node read: it waits for them."""
    d = wanted()
    ro = Rollout(target="v1-newer@sha256:x", batch=("2",))
    step = follow_steps([d], [replica("2", "old-spec")], {("web", "front"): ro}, NOW)[("web", "front")]
    assert step.replace == () and step.start_beside == ()


@pytest.mark.parametrize(("order", "expected"), [("stop-first", (("2",), (), ())), ("start-first", ((), ("2",), ()))])
def test_a_follower_rolls_its_slots_to_a_tags_new_digest_the_spec_unchanged(
    order: str, expected: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
) -> None:
    """A tag moved (PullPolicy always): the spec hash is the same, the image the leader recorded is not."""
    d = replace(wanted(UpdateConfig={"Order": order, "Monitor": "1s"}), image_id="sha256:new")
    spec = d.target.spec_hash
    slots = [replace(replica("2", spec), image_id="sha256:old"), replace(replica("5", spec), image_id="sha256:new")]
    ro = Rollout(target=f"{spec}@sha256:new", batch=("2", "5"))

    step = follow_steps([d], slots, {("web", "front"): ro}, NOW)[("web", "front")]

    assert (step.replace, step.start_beside, step.remove_old) == expected
