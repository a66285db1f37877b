"""services.plan as tables: (desired slots, live replicas, surviving networks) -> actions, removes first."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from bundles import StackBundle, parse_bundle, service_targets
from bundles.desired import ServiceTarget, bundle_hash
from reconcilers.services import (
    CreateReplica,
    RemoveReplica,
    ReplaceReplica,
    Replica,
    ServiceAction,
    ServiceDesired,
    StartReplica,
    plan,
)

REV = "dir@sha256:1"


def targets(services: dict[str, Any], stack: str = "shop") -> dict[str, ServiceTarget]:
    """Real ServiceTargets, by service name, of a stack built from a parsed bundle."""
    doc = {"Services": services}
    b = parse_bundle(json.dumps(doc), f"{stack}.dab", ".dab")
    sb = StackBundle(name=stack, file=f"{stack}.dab", bundle=b, content="", revision=REV, bundle_hash=bundle_hash(b))
    return {t.name: t for t in service_targets(sb)}


def restart(condition: str) -> dict[str, Any]:
    return {"Image": "busybox:1", "Deploy": {"RestartPolicy": {"Condition": condition}}}


SHOP = targets(
    {
        "web": {"Image": "nginx:1.27", "Env": ["A=1"], "Deploy": {"Replicas": 3}},
        "any": restart("any"),
        "onfail": restart("on-failure"),
        "never": restart("none"),
    }
)
WEB, ANY, ONFAIL, NEVER = SHOP["web"], SHOP["any"], SHOP["onfail"], SHOP["never"]
# The same service after an edit of Image and Env: what a bundle commit does.
WEB_V2 = targets({"web": {"Image": "nginx:1.28", "Env": ["A=2"], "Deploy": {"Replicas": 3}}})["web"]
# The same service moved onto another network.
WEB_BACK = targets({"web": {"Image": "nginx:1.27", "Env": ["A=1"], "Deploy": {"Replicas": 3}, "Networks": ["back"]}})[
    "web"
]
OTHER = targets({"api": {"Image": "x"}}, stack="other")["api"]


def net_id(name: str) -> str:
    return f"id-{name}"


# Every network the targets above use exists, with a stable id.
NETWORK_IDS = {n: net_id(n) for n in ("shop_default", "shop_back", "other_default")}


def want(target: ServiceTarget, *slots: str, previous: ServiceTarget | None = None) -> ServiceDesired:
    """Desired state of one service: these slots on this node, optionally the spec last applied."""
    return ServiceDesired(
        target=target,
        slots=slots,
        revision=REV,
        previous_spec=previous.spec if previous else None,
        previous_hash=previous.spec_hash if previous else None,
    )


def rep(
    target: ServiceTarget,
    slot: str,
    state: str = "running",
    *,
    exit_code: int | None = None,
    spec_hash: str | None = None,
    networks: Mapping[str, str] | None = None,
    created: int = 100,
    cid: str | None = None,
) -> Replica:
    """A live replica of `target` in `slot`; by default of the current spec, on the target's networks."""
    return Replica(
        id=cid or f"c-{target.stack}-{target.name}-{slot}-{state}",
        name=f"{target.full_name}.{slot}.abc",
        stack=target.stack,
        service=target.name,
        slot=slot,
        spec_hash=target.spec_hash if spec_hash is None else spec_hash,
        state=state,
        exit_code=exit_code,
        networks={n: net_id(n) for n in target.networks} if networks is None else networks,
        created=created,
    )


# Replicas used in more than one case.
V1_ON_V2_1 = rep(WEB_V2, "1", spec_hash=WEB.spec_hash, cid="old-1")
DUP_RUNNING = rep(WEB, "1", "running", created=50, cid="run")
DUP_EXITED = rep(WEB, "1", "exited", exit_code=0, created=200, cid="exit")
STALE_OLD = rep(WEB_V2, "1", spec_hash="v1-0000000000000000", cid="stale")
EXTRA = {slot: rep(WEB, slot) for slot in ("1", "2", "3", "4", "9", "10")}
GONE_SVC = rep(targets({"gone": {"Image": "x"}})["gone"], "1")
GONE_STACK = rep(OTHER, "1")
MOVED_NET = rep(WEB, "1", networks={"shop_default": "id-old"})
EXTRA_NET = rep(WEB, "1", networks={"shop_default": net_id("shop_default"), "shop_back": net_id("shop_back")})
ON_BACK = rep(WEB_BACK, "1")
DEAD = rep(WEB, "2", "dead")

Case = tuple[Sequence[ServiceDesired], Sequence[Replica], list[ServiceAction]]
CASES: dict[str, Case] = {
    "empty": ([], [], []),
    "nothing-assigned": ([want(WEB)], [], []),
    "three-slots-none-live": (
        [want(WEB, "1", "2", "3")],
        [],
        [CreateReplica(WEB, "1", REV), CreateReplica(WEB, "2", REV), CreateReplica(WEB, "3", REV)],
    ),
    "slots-in-number-order": (
        [want(WEB, "10", "9", "2")],
        [],
        [CreateReplica(WEB, "2", REV), CreateReplica(WEB, "9", REV), CreateReplica(WEB, "10", REV)],
    ),
    "global-slot-is-the-node": ([want(ANY, "node-a")], [], [CreateReplica(ANY, "node-a", REV)]),
    "converged": ([want(WEB, "1", "2", "3")], [rep(WEB, "1"), rep(WEB, "2"), rep(WEB, "3")], []),
    "converged-several-services": (
        [want(WEB, "1"), want(ANY, "1"), want(OTHER, "1")],
        [rep(WEB, "1"), rep(ANY, "1"), rep(OTHER, "1")],
        [],
    ),
    "converged-other-idle-states": (
        [want(WEB, "1", "2", "3")],
        [rep(WEB, "1", "paused"), rep(WEB, "2", "restarting"), rep(WEB, "3", "removing")],
        [],
    ),
    "spec-changed-previous-unknown": (
        [want(WEB_V2, "1")],
        [V1_ON_V2_1],
        [ReplaceReplica(V1_ON_V2_1, WEB_V2, REV, ("spec",))],
    ),
    "spec-changed-previous-known": (
        [want(WEB_V2, "1", previous=WEB)],
        [V1_ON_V2_1],
        [ReplaceReplica(V1_ON_V2_1, WEB_V2, REV, ("Env", "Image"))],
    ),
    "spec-changed-replica-older-than-previous": (
        [want(WEB_V2, "1", previous=WEB)],
        [STALE_OLD],
        [ReplaceReplica(STALE_OLD, WEB_V2, REV, ("spec",))],
    ),
    "exited-condition-any": (
        [want(ANY, "1")],
        [rep(ANY, "1", "exited", exit_code=0)],
        [StartReplica(rep(ANY, "1", "exited", exit_code=0), "exited (0); restart condition any")],
    ),
    "exit-0-on-failure": ([want(ONFAIL, "1")], [rep(ONFAIL, "1", "exited", exit_code=0)], []),
    "exit-1-on-failure": (
        [want(ONFAIL, "1")],
        [rep(ONFAIL, "1", "exited", exit_code=1)],
        [StartReplica(rep(ONFAIL, "1", "exited", exit_code=1), "exited (1); restart condition on-failure")],
    ),
    "exit-137-on-failure": (
        [want(ONFAIL, "1")],
        [rep(ONFAIL, "1", "exited", exit_code=137)],
        [StartReplica(rep(ONFAIL, "1", "exited", exit_code=137), "exited (137); restart condition on-failure")],
    ),
    "exit-1-condition-none": ([want(NEVER, "1")], [rep(NEVER, "1", "exited", exit_code=1)], []),
    "exit-0-condition-none": ([want(NEVER, "1")], [rep(NEVER, "1", "exited", exit_code=0)], []),
    "created-is-started": (
        [want(WEB, "1")],
        [rep(WEB, "1", "created")],
        [StartReplica(rep(WEB, "1", "created"), "never started")],
    ),
    "created-is-started-even-condition-none": (
        [want(NEVER, "1")],
        [rep(NEVER, "1", "created")],
        [StartReplica(rep(NEVER, "1", "created"), "never started")],
    ),
    "dead-is-recreated": (
        [want(WEB, "2")],
        [DEAD],
        [RemoveReplica(DEAD, "dead"), CreateReplica(WEB, "2", REV, "recreated")],
    ),
    "two-in-a-slot-keeps-running": (
        [want(WEB, "1")],
        [DUP_EXITED, DUP_RUNNING],
        [RemoveReplica(DUP_EXITED, "duplicate in slot")],
    ),
    "two-in-a-slot-keeps-current-spec": (
        [want(WEB, "1")],
        [rep(WEB, "1", spec_hash="v1-old", cid="old"), rep(WEB, "1", "exited", exit_code=0, cid="new")],
        # A start-first successor that is down: restarted per policy; the old one serves until it is healthy.
        [StartReplica(rep(WEB, "1", "exited", exit_code=0, cid="new"), "exited (0); restart condition any")],
    ),
    "two-in-a-slot-keeps-newest": (
        [want(WEB, "1")],
        [rep(WEB, "1", created=1, cid="older"), rep(WEB, "1", created=2, cid="newer")],
        [RemoveReplica(rep(WEB, "1", created=1, cid="older"), "duplicate in slot")],
    ),
    "extra-slots-highest-first": (
        [want(WEB, "1", "2")],
        list(EXTRA.values()),
        [
            RemoveReplica(EXTRA["10"], "slot not assigned to this node"),
            RemoveReplica(EXTRA["9"], "slot not assigned to this node"),
            RemoveReplica(EXTRA["4"], "slot not assigned to this node"),
            RemoveReplica(EXTRA["3"], "slot not assigned to this node"),
        ],
    ),
    "scale-to-zero": (
        [want(WEB)],
        [rep(WEB, "1"), rep(WEB, "2")],
        [
            RemoveReplica(rep(WEB, "2"), "slot not assigned to this node"),
            RemoveReplica(rep(WEB, "1"), "slot not assigned to this node"),
        ],
    ),
    "service-gone": (
        [want(WEB, "1")],
        [rep(WEB, "1"), GONE_SVC],
        [RemoveReplica(GONE_SVC, "service no longer in the bundle")],
    ),
    "stack-gone": (
        [want(WEB, "1")],
        [rep(WEB, "1"), GONE_STACK],
        [RemoveReplica(GONE_STACK, "stack pruned: its bundle is gone")],
    ),
    "every-stack-gone": ([], [GONE_STACK], [RemoveReplica(GONE_STACK, "stack pruned: its bundle is gone")]),
    "network-id-gone": (
        [want(WEB, "1")],
        [MOVED_NET],
        [RemoveReplica(MOVED_NET, "network gone or changed"), CreateReplica(WEB, "1", REV, "recreated")],
    ),
    "attached-to-an-extra-network": (
        [want(WEB, "1")],
        [EXTRA_NET],
        [RemoveReplica(EXTRA_NET, "network gone or changed"), CreateReplica(WEB, "1", REV, "recreated")],
    ),
    "network-missing-from-replica": (
        [want(WEB_BACK, "1")],
        [rep(WEB_BACK, "1", networks={"shop_default": net_id("shop_default")})],
        [
            RemoveReplica(
                rep(WEB_BACK, "1", networks={"shop_default": net_id("shop_default")}), "network gone or changed"
            ),
            CreateReplica(WEB_BACK, "1", REV, "recreated"),
        ],
    ),
    "on-the-right-network": ([want(WEB_BACK, "1")], [ON_BACK], []),
    # The engine lists a never-started container's networks without an ID: started, not taken for a moved network.
    "never-started-lists-no-network-id": (
        [want(WEB, "1")],
        [rep(WEB, "1", "created", networks={"shop_default": ""})],
        [StartReplica(rep(WEB, "1", "created", networks={"shop_default": ""}), "never started")],
    ),
    "never-started-on-the-wrong-networks": (
        [want(WEB_BACK, "1")],
        [rep(WEB_BACK, "1", "created", networks={"shop_default": ""})],
        [
            RemoveReplica(rep(WEB_BACK, "1", "created", networks={"shop_default": ""}), "network gone or changed"),
            CreateReplica(WEB_BACK, "1", REV, "recreated"),
        ],
    ),
    "an-exited-replica-without-a-network-id-is-recreated": (
        [want(WEB, "1")],
        [rep(WEB, "1", "exited", exit_code=0, networks={"shop_default": ""})],
        [
            RemoveReplica(
                rep(WEB, "1", "exited", exit_code=0, networks={"shop_default": ""}), "network gone or changed"
            ),
            CreateReplica(WEB, "1", REV, "recreated"),
        ],
    ),
}


@pytest.mark.parametrize(("desired", "actual", "expected"), list(CASES.values()), ids=list(CASES))
def test_plan(desired: Sequence[ServiceDesired], actual: Sequence[Replica], expected: list[ServiceAction]) -> None:
    assert plan(desired, actual, NETWORK_IDS) == expected


@pytest.mark.parametrize(("desired", "actual"), [case[:2] for case in CASES.values()], ids=list(CASES))
def test_plan_is_pure(desired: Sequence[ServiceDesired], actual: Sequence[Replica]) -> None:
    # Same inputs, same plan, in any order of the engine's list; the inputs are left as they were.
    before = list(actual)
    assert plan(desired, list(reversed(actual)), NETWORK_IDS) == plan(desired, actual, NETWORK_IDS)
    assert list(actual) == before


def test_removes_come_before_everything_else() -> None:
    desired = [want(WEB_V2, "1", "2", "3", previous=WEB), want(ANY, "1")]
    actual = [
        rep(WEB_V2, "1", spec_hash=WEB.spec_hash),  # replace
        rep(WEB_V2, "2", "dead"),  # remove + create
        rep(WEB_V2, "7"),  # extra slot
        rep(ANY, "1", "exited", exit_code=3),  # start
        GONE_STACK,
    ]
    actions = plan(desired, actual, NETWORK_IDS)
    kinds = [type(a).__name__ for a in actions]
    assert kinds == [
        "RemoveReplica",
        "RemoveReplica",
        "RemoveReplica",
        "CreateReplica",
        "CreateReplica",
        "ReplaceReplica",  # rolling updates are planned after the slot-by-slot creates
        "StartReplica",
    ]
    first_other = next(i for i, a in enumerate(actions) if not isinstance(a, RemoveReplica))
    assert all(not isinstance(a, RemoveReplica) for a in actions[first_other:])


@pytest.mark.parametrize(
    ("target", "replica", "network_ids"),
    [
        pytest.param(
            WEB_V2,
            rep(WEB_V2, "1", spec_hash=WEB.spec_hash, networks={"shop_default": "id-being-recreated"}),
            NETWORK_IDS,
            id="network-recreated-and-image-changed",
        ),
        pytest.param(
            WEB_BACK,
            rep(WEB_BACK, "1", spec_hash=WEB.spec_hash, networks={"shop_default": net_id("shop_default")}),
            # kept_network_ids leaves out shop_default: it is an orphan this pass removes.
            {"shop_back": net_id("shop_back")},
            id="moved-off-an-orphaned-network",
        ),
    ],
)
def test_replica_on_a_network_this_pass_removes_is_removed_first(
    target: ServiceTarget, replica: Replica, network_ids: dict[str, str]
) -> None:
    # The engine removes networks after the RemoveReplica phase and before Create/Replace. A replica still
    # attached to a network this pass removes must leave in the RemoveReplica phase: as a ReplaceReplica it is
    # still attached when the network is removed, and Docker refuses ("network has active endpoints").
    actions = plan([want(target, "1", previous=WEB)], [replica], network_ids)
    assert actions[0] == RemoveReplica(replica, "network gone or changed")
    assert CreateReplica(target, "1", REV, "recreated") in actions


@pytest.mark.parametrize(
    ("action", "text"),
    [
        (CreateReplica(WEB, "1", REV), "+ shop_web.1 create (missing)"),
        (StartReplica(rep(WEB, "2", "created"), "never started"), "~ shop_web.2 start (never started)"),
        (ReplaceReplica(V1_ON_V2_1, WEB_V2, REV, ("Env", "Image")), "~ shop_web.1 replace (Env, Image changed)"),
        (
            RemoveReplica(GONE_STACK, "stack pruned: its bundle is gone"),
            "- other_api.1 remove (stack pruned: its bundle is gone)",
        ),
    ],
)
def test_action_text_is_the_plan(action: ServiceAction, text: str) -> None:
    assert str(action) == text


def test_a_successor_created_but_never_started_in_a_recorded_batch_is_started() -> None:
    """A pass cut off between a start-first successor's create and its start, after the orchestrator recorded the
    batch: the next pass starts it (else the batch waits for a container that never runs, forever)."""
    from reconcilers.rollout import Rollout
    from reconcilers.services import plan_pass, rollout_target

    old = rep(WEB_V2, "1", spec_hash=WEB.spec_hash, cid="old")
    created = rep(WEB_V2, "1", "created", cid="new", created=200)
    recorded = Rollout(target=rollout_target(WEB_V2.spec_hash, None), state="updating", batch=("1",))
    out = plan_pass(
        [want(WEB_V2, "1", previous=WEB)],
        [old, created],
        NETWORK_IDS,
        now=1000.0,
        rollouts={("shop", "web"): recorded},
    )
    starts = [a for a in out.actions if isinstance(a, StartReplica)]
    assert [a.replica.id for a in starts] == ["new"], out.actions
    assert not any(isinstance(a, RemoveReplica) and a.replica.id == "old" for a in out.actions)


def test_a_never_started_container_is_started_once_then_replaced() -> None:
    """The restart record names the never-started container a start was tried on: found still never started, its
    start failed, and the same start would fail again (containerd's "task already exists"): it is replaced."""
    from reconcilers.restarts import RestartRecord
    from reconcilers.services import plan_pass

    stuck = rep(WEB, "1", "created", cid="stuck")
    first = plan_pass([want(WEB, "1")], [stuck], NETWORK_IDS, now=1000.0)
    assert first.actions == [StartReplica(stuck, "never started")]
    assert first.restarts[stuck.key] == RestartRecord((), 1000.0, tried="stuck")

    again = plan_pass([want(WEB, "1")], [stuck], NETWORK_IDS, now=1001.0, restart_records=first.restarts)
    assert again.actions == [
        RemoveReplica(stuck, "never started: its start failed"),
        CreateReplica(WEB, "1", REV, "recreated"),
    ]
    other = rep(WEB, "1", "created", cid="another")  # a record of another container says nothing about this one
    assert plan([want(WEB, "1")], [other], NETWORK_IDS, restart_records=first.restarts) == [
        StartReplica(other, "never started")
    ]
