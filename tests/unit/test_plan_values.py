"""A plan's typed values and their text: action kinds (the sign that starts each plan line, the JSON `op`), an
image that moved while the spec did not, notes, and a rollout's failures per slot. The text is what `dabctl
plan` printed before these were typed, byte for byte."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from agent.cli.render import plan_output, render_plan
from agent.node.engine import PassPlan, StackPlan
from bundles import DesiredState, StackBundle, parse_bundle, service_targets
from bundles.desired import ServiceTarget, bundle_hash
from reconcilers import loadbalancer, networks
from reconcilers.notes import Note, NoteKind
from reconcilers.outcome import ActionKind
from reconcilers.restarts import RestartRecord
from reconcilers.rollout import Rollout, SlotFailure
from reconcilers.services import (
    CreateReplica,
    ImageChange,
    RemoveReplica,
    ReplaceReplica,
    Replica,
    ServiceDesired,
    StartReplica,
    pending_image,
    plan_pass,
)

REV = "dir@sha256:1"
D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def target(service: dict[str, Any]) -> ServiceTarget:
    b = parse_bundle(json.dumps({"Services": {"web": service}}), "shop.dab", ".dab")
    sb = StackBundle(name="shop", file="shop.dab", bundle=b, content="", revision=REV, bundle_hash=bundle_hash(b))
    return service_targets(sb)[0]


WEB = target({"Image": "web:1", "Deploy": {"Replicas": 2}})


def replica(t: ServiceTarget, slot: str, state: str = "running", *, cid: str = "", **fields: Any) -> Replica:
    return Replica(
        id=cid or f"c{slot}",
        name=f"shop_web.{slot}.abc",
        stack="shop",
        service="web",
        slot=slot,
        spec_hash=t.spec_hash,
        state=state,
        networks={"shop_default": "net"},
        **fields,
    )


def plan_of(stack: StackPlan) -> PassPlan:
    """A pass's plan with one stack and nothing else."""
    return PassPlan(
        desired=DesiredState(stacks={}),
        stacks={stack.name: stack},
        assignments={},
        assignments_changed={},
        assignments_removed=set(),
        records={},
    )


FRONT = loadbalancer.Frontend(protocol="tcp", port=30080, stack="shop", service="web", target=8080)
BACK = loadbalancer.Backend("10.0.0.2", 8080)
REQUEST = networks.NetworkRequest("shop_default", "bridge", False, {})
OBSERVED = networks.ObservedNetwork("n1", "shop_old", {})
ACTIONS = {
    "create-replica": (CreateReplica(WEB, "1", REV), ActionKind.CREATE, "+ shop_web.1 create (missing)"),
    "start-replica": (
        StartReplica(replica(WEB, "1", "created"), "never started"),
        ActionKind.START,
        "~ shop_web.1 start (never started)",
    ),
    "replace-replica": (
        ReplaceReplica(replica(WEB, "1"), WEB, REV, ("Env",)),
        ActionKind.REPLACE,
        "~ shop_web.1 replace (Env changed)",
    ),
    "remove-replica": (
        RemoveReplica(replica(WEB, "3"), "slot not assigned to this node"),
        ActionKind.REMOVE,
        "- shop_web.3 remove (slot not assigned to this node)",
    ),
    "create-network": (networks.CreateNetwork("shop", REQUEST), ActionKind.CREATE, "+ network shop_default (missing)"),
    "remove-network": (
        networks.RemoveNetwork("shop", OBSERVED, "orphan"),
        ActionKind.REMOVE,
        "- network shop_old (orphan)",
    ),
    "publish": (
        loadbalancer.Publish(FRONT, (BACK,)),
        ActionKind.CREATE,
        "+ shop_web publish 30080/tcp → 8080 (1 backend)",
    ),
    "rebalance": (
        loadbalancer.Rebalance(FRONT, (BACK,), (BACK,), ()),
        ActionKind.UPDATE,
        "~ shop_web 30080/tcp backends +10.0.0.2 (1 backend)",
    ),
    "unpublish": (loadbalancer.Unpublish(FRONT), ActionKind.REMOVE, "- shop_web unpublish 30080/tcp"),
}


@pytest.mark.parametrize(("action", "kind", "text"), list(ACTIONS.values()), ids=list(ACTIONS))
def test_an_action_kind_gives_its_sign_and_json_op(action: Any, kind: ActionKind, text: str) -> None:
    assert action.kind is kind
    assert str(action) == text
    plan = plan_of(StackPlan("shop", REV, service_actions=[action]))
    assert plan_output(plan).stacks[0].actions[0].op == kind.value


def test_the_summary_counts_by_kind() -> None:
    sp = StackPlan(
        "shop",
        REV,
        network_actions=[networks.CreateNetwork("shop", REQUEST)],
        service_actions=[CreateReplica(WEB, "1", REV), StartReplica(replica(WEB, "2", "created"), "never started")],
        balancer_actions=[loadbalancer.Unpublish(FRONT)],
    )
    out = io.StringIO()
    render_plan(
        plan_of(sp),
        Console(file=out, width=200),
    )
    assert out.getvalue().splitlines()[-1] == "Plan: 2 to create, 1 to replace or start, 1 to remove."


# --- an image that moved while the spec did not ---------------------------------------------------------------


def test_a_new_digest_replaces_with_the_digests_as_its_reason() -> None:
    moved = ServiceDesired(
        target=WEB,
        slots=("1", "2"),
        revision=REV,
        image_id=pending_image(D2),
        image_digest=D2,
        image_change=ImageChange(D1, D2),
    )
    running = [replica(WEB, s, image_id="sha256:id1", created=1) for s in ("1", "2")]

    p = plan_pass([moved], running, {"shop_default": "net"}, now=10_000.0)

    assert p.actions == [ReplaceReplica(running[0], WEB, REV, (), image=ImageChange(D1, D2))]
    assert str(p.actions[0]) == "~ shop_web.1 replace (Image digest aaaaaaaaaaaa → bbbbbbbbbbbb)"
    plan = plan_of(StackPlan("shop", REV, service_actions=p.actions))
    planned = plan_output(plan).stacks[0].actions[0]
    assert (planned.op, planned.reason, planned.changes) == (
        "replace",
        "Image digest aaaaaaaaaaaa → bbbbbbbbbbbb",
        ["Image digest aaaaaaaaaaaa → bbbbbbbbbbbb"],
    )


def test_a_start_first_update_names_the_digests_too() -> None:
    web = target({"Image": "web:1", "Deploy": {"Replicas": 1, "UpdateConfig": {"Order": "start-first"}}})
    moved = ServiceDesired(
        target=web, slots=("1",), revision=REV, image_id=pending_image(D2), image_change=ImageChange(D1, D2)
    )

    p = plan_pass([moved], [replica(web, "1", image_id="sha256:id1", created=1)], {"shop_default": "net"}, now=10_000.0)

    assert [str(a) for a in p.actions] == [
        "+ shop_web.1 create (start-first update (Image digest aaaaaaaaaaaa → bbbbbbbbbbbb changed))"
    ]


# --- notes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "failing"),
    [
        (NoteKind.ROLLOUT_PAUSED, True),
        (NoteKind.RESTART_GIVEN_UP, True),
        (NoteKind.IMAGE_CHECK_FAILED, True),
        (NoteKind.ROLLING_BACK, False),
    ],
)
def test_which_notes_fail_their_stack(kind: NoteKind, failing: bool) -> None:
    assert kind.failing is failing
    assert Note("web", kind, "text").failing is failing


def test_a_slot_given_up_on_is_a_typed_note() -> None:
    web = target({"Image": "web:1", "Deploy": {"RestartPolicy": {"MaxAttempts": 1}}})
    exited = replica(web, "1", "exited", exit_code=3, created=1)
    record = RestartRecord(attempts=(9_000.0,), last_start=9_000.0, total=1)

    p = plan_pass(
        [ServiceDesired(target=web, slots=("1",), revision=REV)],
        [exited],
        {"shop_default": "net"},
        now=9_500.0,
        restart_records={("shop", "web", "1"): record},
    )

    note = p.notes[("shop", "web")]
    assert note.kind is NoteKind.RESTART_GIVEN_UP and note.failing
    assert str(note) == "web: slot 1 failed: exited (3) after 1 restarts; not restarted"


def test_a_rollback_under_way_on_a_node_named_paused_is_not_a_failure() -> None:
    """The slot of a global service is its node's name: free text that once made a rollback look paused."""
    web = target({"Image": "web:2", "Deploy": {"Mode": "global", "UpdateConfig": {"FailureAction": "rollback"}}})
    failed = replica(web, "paused-1", "exited", exit_code=1, created=1)
    old = replica(WEB, "paused-1", cid="old")  # of the spec before: the rollback goes back to it
    rollout = Rollout(target=web.spec_hash, batch=("paused-1",))
    p = plan_pass(
        [ServiceDesired(target=web, slots=("paused-1",), revision=REV)],
        [old, failed],
        {"shop_default": "net"},
        now=10_000.0,
        rollouts={("shop", "web"): rollout},
    )

    note = p.notes[("shop", "web")]
    assert note.kind is NoteKind.ROLLING_BACK and not note.failing
    assert str(note) == "web: rolling back: slot paused-1: exited (exit code 1)"


# --- a rollout's failures per slot -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        (SlotFailure("1", "exited (exit code 1)"), "slot 1: exited (exit code 1)"),
        (SlotFailure("2", "unhealthy"), "slot 2: unhealthy"),
        (SlotFailure("node-a", "dead"), "slot node-a: dead"),
    ],
)
def test_a_slot_failure_reads_back_from_its_text(failure: SlotFailure, text: str) -> None:
    assert str(failure) == text
    assert SlotFailure.parse(text) == failure
