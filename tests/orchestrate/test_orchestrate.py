"""Table tests of `orchestrate`: assignments, published ports, rollout steps and rollback pins, from desired state,
a snapshot and the nodes' reports alone — no Docker and no state log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from agent.cluster.nodes import NodeInfo
from agent.cluster.orchestrate import Desired, Intent, Observations, PlannedImage, ResolvedImage, orchestrate
from agent.cluster.snapshot import Snapshot
from bundles import DesiredState
from bundles.desired import service_targets
from reconcilers.loadbalancer import PortKey, PortRules
from reconcilers.rollout import Rollout, Step
from reconcilers.services import Replica
from schemas.state import PassOutcome, StackRecord
from tests.node.conftest import bundle, desired, service

NOW = 1_700_000_000.0
RULES = PortRules(range=(30000, 30010), reserved=(30001,))


def plan(
    state: DesiredState,
    snapshot: Snapshot | None = None,
    *,
    nodes: tuple[str | NodeInfo, ...] = ("n1",),
    slots: tuple[Replica, ...] = (),
    busy: frozenset[tuple[str, int]] = frozenset(),
    scope: set[str] | None = None,
    blocked: dict[str, str] | None = None,
) -> Intent:
    images = {
        (name, t.name): ResolvedImage(t, PlannedImage(t.service.image))
        for name, stack in state.stacks.items()
        for t in service_targets(stack)
    }
    snap = snapshot or Snapshot(revision=1)
    return orchestrate(
        Desired(
            state=state,
            images=images,
            nodes=tuple(n if isinstance(n, NodeInfo) else NodeInfo(node_id=n, name=n) for n in nodes),
            scope=frozenset(scope if scope is not None else set(state.stacks) | set(snap.stacks)),
            port_rules=RULES,
        ),
        snap,
        Observations(
            now=NOW,
            slots=slots,
            network_ids={n: f"id-{n}" for t in images.values() for n in t.target.networks},
            busy=busy,
            listening=busy,
            blocked=blocked or {},
        ),
    )


def record(name: str, revision: str) -> StackRecord:
    at = datetime.fromtimestamp(NOW, UTC)
    return StackRecord(
        stack=name,
        revision=revision,
        file=f"{name}.dab",
        bundle_hash="h",
        content="{}",
        applied_at=at,
        outcome=PassOutcome(reconcile_id="r", at=at),
    )


def replica(desired_: DesiredState, stack: str, svc: str, slot: str, *, spec: str | None = None, **kw: Any) -> Replica:
    target = next(t for t in service_targets(desired_.stacks[stack]) if t.name == svc)
    fields: dict[str, Any] = {
        "state": "running",
        "created": int(NOW - 100),
        "networks": {n: f"id-{n}" for n in target.networks},
    } | kw
    return Replica(
        id=f"{stack}-{svc}-{slot}-{spec or 'new'}",
        name=f"{stack}_{svc}.{slot}",
        stack=stack,
        service=svc,
        slot=slot,
        spec_hash=spec or target.spec_hash,
        **fields,
    )


WEB3 = desired(web=bundle({"front": service(Deploy={"Replicas": 3})}))
GLOBAL = desired(web=bundle({"agent": service(Deploy={"Mode": "global"})}))


# --- assignments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "nodes", "recorded", "assigned", "changed", "removed"),
    [
        (WEB3, ("n1",), {}, {("web", "front"): {"n1": ["1", "2", "3"]}}, {("web", "front")}, set()),
        (
            WEB3,
            ("n1", "n2"),
            {},
            {("web", "front"): {"n1": ["1", "3"], "n2": ["2"]}},
            {("web", "front")},
            set(),
        ),
        (GLOBAL, ("n1", "n2"), {}, {("web", "agent"): {"n1": ["n1"], "n2": ["n2"]}}, {("web", "agent")}, set()),
        (
            WEB3,
            ("n1",),
            {("web", "front"): {"n1": ["1", "2", "3"]}},
            {("web", "front"): {"n1": ["1", "2", "3"]}},
            set(),
            set(),
        ),
        (DesiredState(stacks={}), ("n1",), {("web", "front"): {"n1": ["1"]}}, {}, set(), {("web", "front")}),
    ],
    ids=["one-node", "round-robin", "global", "unchanged-writes-nothing", "gone-is-removed"],
)
def test_assignments(  # noqa: PLR0917 - one parameter per table column
    state: DesiredState,
    nodes: tuple[str, ...],
    recorded: dict[tuple[str, str], dict[str, list[str]]],
    assigned: dict[tuple[str, str], dict[str, list[str]]],
    changed: set[tuple[str, str]],
    removed: set[tuple[str, str]],
) -> None:
    stacks = {"web": record("web", "r0")} if recorded else {}
    intent = plan(state, Snapshot(revision=1, assignments=recorded, stacks=stacks), nodes=nodes)
    assert intent.assignments == assigned
    assert set(intent.assignments_changed) == changed and intent.assignments_removed == removed


def test_a_held_stack_keeps_its_assignments() -> None:
    snap = Snapshot(revision=1, assignments={("web", "front"): {"n1": ["1"]}}, stacks={"web": record("web", "r0")})
    intent = plan(WEB3, snap, scope=set())
    assert intent.held == {"web"} and not intent.assignments_changed and not intent.assignments_removed


# --- published ports ---------------------------------------------------------------------------------------------

PORTED = desired(
    a=bundle({"s": service(Ports=[{"Port": 80}])}),
    b=bundle({"s": service(Ports=[{"Port": 80}])}),
)
A, B = PortKey("a", "s", "tcp", 80), PortKey("b", "s", "tcp", 80)


@pytest.mark.parametrize(
    ("recorded", "busy", "scope", "ports", "changed", "errors"),
    [
        ({}, set(), None, {A: 30000, B: 30002}, {A: 30000, B: 30002}, set()),  # 30001 is reserved
        ({B: 30000}, set(), None, {A: 30002, B: 30000}, {A: 30002}, set()),  # a recorded port stays its holder's
        ({}, {("tcp", 30000)}, None, {A: 30002, B: 30003}, {A: 30002, B: 30003}, set()),  # a node's busy port
        ({B: 30000}, set(), {"a"}, {A: 30002}, {A: 30002}, set()),  # a held stack's port is nobody else's
    ],
    ids=["lowest-free", "recorded-kept", "busy-skipped", "held-kept"],
)
def test_port_allocation(  # noqa: PLR0917 - one parameter per table column
    recorded: dict[PortKey, int],
    busy: set[tuple[str, int]],
    scope: set[str] | None,
    ports: dict[PortKey, int],
    changed: dict[PortKey, int],
    errors: set[str],
) -> None:
    intent = plan(PORTED, Snapshot(revision=1, ports=recorded), busy=frozenset(busy), scope=scope)
    assert intent.ports == ports and intent.ports_changed == changed and set(intent.errors) == errors


def test_a_full_range_holds_the_stack_that_cannot_publish() -> None:
    many = desired(**{f"s{i}": bundle({"s": service(Ports=[{"Port": 80}])}) for i in range(11)})
    intent = plan(many)
    assert len(intent.ports) == 10 and intent.held == {"s9"}
    assert "no free port left in 30000-30010" in intent.errors["s9"]


def test_a_stack_a_node_reports_blocked_is_held_with_its_reason() -> None:
    intent = plan(PORTED, blocked={"a": "network web_net belongs to someone else"})
    assert intent.held == {"a"} and intent.errors == {"a": "network web_net belongs to someone else"}
    assert set(intent.ports) == {B}


# --- rollout steps over all slots of a service -------------------------------------------------------------------

ROLLING = desired(
    web=bundle({"front": service(Env=["V=2"], Deploy={"Replicas": 3, "UpdateConfig": {"Parallelism": 1}})})
)


def test_a_spec_change_starts_a_rollout_one_batch_over_every_slot_on_every_node() -> None:
    olds = tuple(replica(ROLLING, "web", "front", s, spec="old") for s in ("1", "2", "3"))
    intent = plan(ROLLING, nodes=("n1", "n2"), slots=olds)
    step = intent.steps[("web", "front")]
    assert step.replace == ("1",) and step.rollout is not None and step.rollout.batch == ("1",)
    assert intent.rollouts[("web", "front")].state == "updating" and intent.rolling
    # Each node acts on its own slots of the same step.
    assert [d.slots for d in intent.node_services("n1")] == [("1", "3")]
    assert [d.slots for d in intent.node_services("n2")] == [("2",)]


def test_a_healthy_batch_moves_the_rollout_on_to_the_next_slot() -> None:
    target = next(iter(service_targets(ROLLING.stacks["web"]))).spec_hash
    slots = (
        replica(ROLLING, "web", "front", "1"),
        replica(ROLLING, "web", "front", "2", spec="old"),
        replica(ROLLING, "web", "front", "3", spec="old"),
    )
    recorded = Rollout(target=target, batch=("1",))
    intent = plan(ROLLING, Snapshot(revision=1, rollouts={("web", "front"): recorded}), slots=slots)
    assert intent.steps[("web", "front")].replace == ("2",)


def test_converged_slots_make_no_step_and_no_rollout_write() -> None:
    slots = tuple(replica(WEB3, "web", "front", s) for s in ("1", "2", "3"))
    snap = Snapshot(
        revision=1, assignments={("web", "front"): {"n1": ["1", "2", "3"]}}, stacks={"web": record("web", "r")}
    )
    intent = plan(WEB3, snap, slots=slots)
    assert intent.steps == {} and not intent.changed


# --- automatic rollback pins -------------------------------------------------------------------------------------

FAILING = desired(
    web=bundle(
        {
            "front": service(
                Env=["V=2"], Deploy={"Replicas": 1, "UpdateConfig": {"FailureAction": "rollback", "Monitor": "1s"}}
            )
        }
    )
)


def failing(history: list[StackRecord]) -> Intent:
    target = next(iter(service_targets(FAILING.stacks["web"]))).spec_hash
    slots = (
        replica(FAILING, "web", "front", "1", spec="old"),
        replica(FAILING, "web", "front", "1", state="exited", exit_code=1),
    )
    snap = Snapshot(
        revision=1,
        rollouts={("web", "front"): Rollout(target=target, batch=("1",))},
        history={"web": history},
        stacks={"web": record("web", "r0")},
    )
    return plan(FAILING, snap, slots=slots)


def test_a_failed_update_with_rollback_pins_the_stack_to_the_revision_before() -> None:
    current = FAILING.stacks["web"].revision
    intent = failing([record("web", current), record("web", "r0")])
    pin = intent.pins["web"]
    assert pin is not None and pin.revision == "r0" and pin.automatic and pin.source_revision == current
    assert intent.rollouts[("web", "front")].state == "rolling-back" and intent.recheck_in == 0.0


def test_a_failed_update_with_nothing_to_roll_back_to_pauses() -> None:
    intent = failing([record("web", FAILING.stacks["web"].revision)])
    assert "web" not in intent.pins
    assert intent.rollouts[("web", "front")].state == "paused"
    assert "no earlier revision" in intent.notes[("web", "front")].text


def test_a_step_is_a_plain_value() -> None:
    assert Step() == Step()
