"""A rollout keeps one identity across its passes, so that a failure in its first batch counts.

Its first pass does not know the image ID it rolls to: a new image reference has none recorded yet, and a tag's
new digest is only `pending:<digest>` until the pull. The pass after it plans with the ID the pull recorded. Each
case plans two passes, feeding the first one's rollout into the second, as the state log does between passes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from bundles import StackBundle, parse_bundle, service_targets
from bundles.desired import ServiceTarget, bundle_hash
from reconcilers.notes import NoteKind
from reconcilers.rollout import Rollout, SlotFailure
from reconcilers.services import (
    ImageChange,
    ReplaceReplica,
    Replica,
    ServiceDesired,
    pending_image,
    plan_pass,
    rollout_target,
)

REV = "dir@sha256:1"
NOW = 10_000.0
SLOTS = ("1", "2", "3")
KEY = ("shop", "web")


def target(image: str) -> ServiceTarget:
    """shop_web, 3 replicas, Swarm's default UpdateConfig: one at a time, pause on the first failure."""
    doc: dict[str, Any] = {"Services": {"web": {"Image": image, "Deploy": {"Replicas": 3}}}}
    b = parse_bundle(json.dumps(doc), "shop.dab", ".dab")
    sb = StackBundle(name="shop", file="shop.dab", bundle=b, content="", revision=REV, bundle_hash=bundle_hash(b))
    return service_targets(sb)[0]


V1, V2 = target("web:1"), target("web:2")


def replica(
    t: ServiceTarget, slot: str, image_id: str, state: str = "running", exit_code: int | None = None
) -> Replica:
    return Replica(
        id=f"{slot}-{image_id}",
        name=f"shop_web.{slot}.abc",
        stack="shop",
        service="web",
        slot=slot,
        spec_hash=t.spec_hash,
        state=state,
        exit_code=exit_code,
        image_id=image_id,
        created=int(NOW) - 3600,
        networks={"shop_default": "net"},
    )


def want(
    t: ServiceTarget, image_id: str | None, digest: str | None = None, change: ImageChange | None = None
) -> ServiceDesired:
    return ServiceDesired(
        target=t, slots=SLOTS, revision=REV, image_id=image_id, image_digest=digest, image_change=change
    )


@dataclass(frozen=True)
class TwoPasses:
    first: ServiceDesired  # what the first pass plans with
    before: Sequence[Replica]  # the replicas it sees
    second: ServiceDesired  # what the pass after the pull plans with
    after: Sequence[Replica]  # the replicas it sees: slot 1's successor exited


OLD = [replica(V1, s, "sha256:id1") for s in SLOTS]
CASES = {
    # A commit changes the image reference: no image ID is recorded for web:2 until slot 1's replacement pulls it.
    "new-reference": TwoPasses(
        first=want(V2, None),
        before=OLD,
        second=want(V2, "sha256:id2", "sha256:d2"),
        after=[replica(V2, "1", "sha256:id2", "exited", 1), *OLD[1:]],
    ),
    # Under PullPolicy always, the tag's digest moved: the spec is the same, the image is not.
    "new-digest": TwoPasses(
        first=want(V1, pending_image("sha256:d2"), "sha256:d2", ImageChange("sha256:d1", "sha256:d2")),
        before=OLD,
        second=want(V1, "sha256:id2", "sha256:d2"),
        after=[replica(V1, "1", "sha256:id2", "exited", 1), *OLD[1:]],
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_failure_in_the_first_batch_pauses_the_rollout(case: TwoPasses) -> None:
    first = plan_pass([case.first], case.before, {"shop_default": "net"}, now=NOW)
    assert [type(a) for a in first.actions] == [ReplaceReplica]
    assert first.rollouts[KEY].batch == ("1",)

    second = plan_pass([case.second], case.after, {"shop_default": "net"}, now=NOW, rollouts=first.rollouts)

    rollout = second.rollouts[KEY]
    assert rollout.state == "paused"
    assert rollout.failed == (SlotFailure("1", "exited (exit code 1)"),)
    assert rollout.target == rollout_target(case.second.target.spec_hash, "sha256:id2")
    assert second.actions == []  # slot 2 is not replaced, and slot 1 is not restarted: the rollout waits
    assert second.notes[KEY].kind is NoteKind.ROLLOUT_PAUSED
    assert str(second.notes[KEY]) == "web: paused: slot 1: exited (exit code 1)"


def test_a_completed_rollout_is_not_continued_by_a_new_image() -> None:
    """A rollout that finished under the spec alone is over: a later image move starts a fresh one."""
    done = Rollout(target=V2.spec_hash, state="completed", failed=(SlotFailure("2", "dead"),))
    replicas = [replica(V2, s, "sha256:id1") for s in SLOTS]

    p = plan_pass([want(V2, "sha256:id2")], replicas, {"shop_default": "net"}, now=NOW, rollouts={KEY: done})

    assert p.rollouts[KEY] == Rollout(target=rollout_target(V2.spec_hash, "sha256:id2"), batch=("1",))
    assert [a.key for a in p.actions] == [("shop", "web", "1")]


def test_a_rollout_to_another_image_id_is_a_new_rollout() -> None:
    """An image ID that moves again (a rebuilt local image) is not the rollout the state recorded."""
    paused = Rollout(
        target=rollout_target(V2.spec_hash, "sha256:id2"),
        state="paused",
        batch=("1",),
        failed=(SlotFailure("1", "exited (exit code 1)"),),
        reason="paused: slot 1: exited (exit code 1)",
    )
    replicas = [replica(V2, s, "sha256:id2") for s in SLOTS]

    p = plan_pass(
        [want(V2, "sha256:id3", "sha256:d3")], replicas, {"shop_default": "net"}, now=NOW, rollouts={KEY: paused}
    )

    assert p.rollouts[KEY].state == "updating"
    assert p.rollouts[KEY].failed == ()
