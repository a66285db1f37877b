"""networks.plan, conflicts and kept_network_ids as tables: (targets, live networks) -> actions (pure)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from bundles import StackBundle, desired_networks, parse_bundle
from bundles.desired import NetworkTarget, bundle_hash
from reconcilers.networks import (
    CreateNetwork,
    NetworkAction,
    NetworkRequest,
    ObservedNetwork,
    RemoveNetwork,
    conflicts,
    kept_network_ids,
    network_labels,
    network_spec_hash,
    plan,
)

OWNER = "owner-1"


def nets(doc: dict[str, Any], stack: str = "shop") -> dict[str, NetworkTarget]:
    """The network targets, by name in the bundle, of a stack built from a parsed bundle."""
    b = parse_bundle(json.dumps(doc), f"{stack}.dab", ".dab")
    sb = StackBundle(name=stack, file=f"{stack}.dab", bundle=b, content="", revision="r", bundle_hash=bundle_hash(b))
    return {t.name: t for t in desired_networks(sb)}


SHOP = nets(
    {
        "Services": {"web": {"Image": "x", "Networks": ["default", "back", "shared"]}},
        "Networks": {"back": {"Internal": True, "Labels": {"tier": "back"}}, "shared": {"External": True}},
    }
)
DEFAULT, BACK, SHARED = SHOP["default"], SHOP["back"], SHOP["shared"]
# The same network after an edit of its labels: it has to be recreated.
BACK_V2 = nets(
    {"Services": {"web": {"Image": "x", "Networks": ["back"]}}, "Networks": {"back": {"Labels": {"tier": "db"}}}}
)["back"]
OTHER_DEFAULT = nets({"Services": {"api": {"Image": "x"}}}, stack="other")["default"]


def ours(target: NetworkTarget, nid: str | None = None, spec: str | None = None) -> ObservedNetwork:
    """A live network this state created for `target` (optionally with another spec label)."""
    labels = network_labels(target, OWNER)
    if spec is not None:
        labels["dabctl.spec"] = spec
    return ObservedNetwork(nid or f"id-{target.full_name}", target.full_name, labels)


def owned_by(owner: str, name: str, stack: str = "shop", nid: str | None = None) -> ObservedNetwork:
    return ObservedNetwork(nid or f"id-{owner}-{name}", name, {"dabctl.owner": owner, "dabctl.stack": stack})


def foreign(name: str, nid: str | None = None) -> ObservedNetwork:
    """A network nobody labelled: someone's `docker network create`."""
    return ObservedNetwork(nid or f"id-foreign-{name}", name, {})


def create(target: NetworkTarget, reason: str = "missing") -> CreateNetwork:
    request = NetworkRequest(
        name=target.full_name,
        driver=target.spec.driver,
        internal=target.spec.internal,
        labels=network_labels(target, OWNER),
    )
    return CreateNetwork(target.stack, request, reason)


BRIDGE = foreign("bridge", "id-bridge")
STALE_BACK = ours(BACK_V2, spec=network_spec_hash(BACK))
ORPHAN = ours(OTHER_DEFAULT)
THEIRS = owned_by("owner-2", "shop_old", nid="id-theirs")
SQUATTER = foreign("shop_back", "id-squatter")
SHARED_LIVE = foreign("shared", "id-shared")

Case = tuple[Sequence[NetworkTarget], Sequence[ObservedNetwork], list[NetworkAction]]
PLAN_CASES: dict[str, Case] = {
    "empty": ([], [], []),
    "only-foreign-networks": ([], [BRIDGE, foreign("host"), THEIRS], []),
    "missing": ([DEFAULT, BACK], [], [create(BACK), create(DEFAULT)]),
    "present-same-spec": ([DEFAULT, BACK], [ours(DEFAULT), ours(BACK), BRIDGE], []),
    "spec-changed": (
        [BACK_V2],
        [STALE_BACK],
        [RemoveNetwork("shop", STALE_BACK, "definition changed: recreate"), create(BACK_V2, "definition changed")],
    ),
    "spec-label-missing": (
        [DEFAULT],
        [ObservedNetwork("id-x", "shop_default", {"dabctl.owner": OWNER, "dabctl.stack": "shop"})],
        [
            RemoveNetwork(
                "shop",
                ObservedNetwork("id-x", "shop_default", {"dabctl.owner": OWNER, "dabctl.stack": "shop"}),
                "definition changed: recreate",
            ),
            create(DEFAULT, "definition changed"),
        ],
    ),
    "orphan-owned": ([DEFAULT], [ours(DEFAULT), ORPHAN], [RemoveNetwork("other", ORPHAN, "no longer in any bundle")]),
    "every-stack-gone": (
        [],
        [ORPHAN, ours(DEFAULT)],
        [
            RemoveNetwork("other", ORPHAN, "no longer in any bundle"),
            RemoveNetwork("shop", ours(DEFAULT), "no longer in any bundle"),
        ],
    ),
    "another-owners-network-untouched": ([DEFAULT], [ours(DEFAULT), THEIRS], []),
    # planning alone would create it; conflicts() blocks the stack first (see below). Never removed.
    "foreign-same-name-not-removed": ([BACK], [SQUATTER], [create(BACK)]),
    "external-missing": ([SHARED], [], []),
    "external-present": ([SHARED], [SHARED_LIVE], []),
    "external-owned-by-nobody-never-removed": ([], [SHARED_LIVE], []),
}


@pytest.mark.parametrize(("targets", "actual", "expected"), list(PLAN_CASES.values()), ids=list(PLAN_CASES))
def test_plan(
    targets: Sequence[NetworkTarget], actual: Sequence[ObservedNetwork], expected: list[NetworkAction]
) -> None:
    assert plan(targets, actual, OWNER) == expected


def test_a_stack_away_from_this_node_gets_no_network_and_loses_the_one_it_had() -> None:
    """In a cluster, a node makes the networks of the stacks it runs a replica of."""
    assert plan([DEFAULT, BACK], [], OWNER, away={"shop"}) == []
    assert plan([DEFAULT, BACK], [], OWNER, away={"other"}) == [create(BACK), create(DEFAULT)]
    assert plan([DEFAULT], [ours(DEFAULT), THEIRS], OWNER, away={"shop"}) == [
        RemoveNetwork("shop", ours(DEFAULT), "no replica of its stack on this node")
    ]


@pytest.mark.parametrize(("targets", "actual", "expected"), list(PLAN_CASES.values()), ids=list(PLAN_CASES))
def test_plan_removes_only_owned_networks(
    targets: Sequence[NetworkTarget], actual: Sequence[ObservedNetwork], expected: list[NetworkAction]
) -> None:
    for action in plan(targets, actual, OWNER):
        if isinstance(action, RemoveNetwork):
            assert action.network.owned_by(OWNER)


CONFLICT_CASES: dict[str, tuple[Sequence[NetworkTarget], Sequence[ObservedNetwork], dict[str, str]]] = {
    "empty": ([], [], {}),
    "ours": ([DEFAULT, BACK], [ours(DEFAULT), ours(BACK)], {}),
    "missing-managed-is-fine": ([DEFAULT], [], {}),
    "foreign-same-name": ([DEFAULT, BACK], [ours(DEFAULT), SQUATTER], {"shop": "shop_back"}),
    "another-owners-same-name": ([DEFAULT], [owned_by("owner-2", "shop_default")], {"shop": "shop_default"}),
    "ours-and-a-foreign-twin": ([DEFAULT], [ours(DEFAULT), foreign("shop_default")], {"shop": "shop_default"}),
    "another-owner-other-name": ([DEFAULT], [ours(DEFAULT), THEIRS], {}),
    "external-missing": ([DEFAULT, SHARED], [ours(DEFAULT)], {"shop": "External"}),
    "external-present": ([SHARED], [SHARED_LIVE], {}),
    "one-stack-blocked-other-fine": ([BACK, OTHER_DEFAULT], [SQUATTER], {"shop": "shop_back"}),
}


@pytest.mark.parametrize(("targets", "actual", "expected"), list(CONFLICT_CASES.values()), ids=list(CONFLICT_CASES))
def test_conflicts(
    targets: Sequence[NetworkTarget], actual: Sequence[ObservedNetwork], expected: dict[str, str]
) -> None:
    found = conflicts(targets, actual, OWNER)
    assert set(found) == set(expected)
    for stack, fragment in expected.items():
        assert fragment in found[stack]
        assert "\n" not in found[stack]


def test_missing_external_says_how_to_fix() -> None:
    reason = conflicts([SHARED], [], OWNER)["shop"]
    assert "docker network create shared" in reason


KEPT_CASES: dict[str, tuple[Sequence[NetworkTarget], Sequence[ObservedNetwork], dict[str, str]]] = {
    "empty": ([], [], {}),
    "converged": (
        [DEFAULT, BACK],
        [ours(DEFAULT), ours(BACK), BRIDGE],
        {"shop_default": "id-shop_default", "shop_back": "id-shop_back", "bridge": "id-bridge"},
    ),
    "recreated-is-left-out": ([BACK_V2], [STALE_BACK, BRIDGE], {"bridge": "id-bridge"}),
    "orphan-is-left-out": ([DEFAULT], [ours(DEFAULT), ORPHAN], {"shop_default": "id-shop_default"}),
    "external-and-foreign-kept": ([SHARED], [SHARED_LIVE, THEIRS], {"shared": "id-shared", "shop_old": "id-theirs"}),
}


@pytest.mark.parametrize(("targets", "actual", "expected"), list(KEPT_CASES.values()), ids=list(KEPT_CASES))
def test_kept_network_ids(
    targets: Sequence[NetworkTarget], actual: Sequence[ObservedNetwork], expected: dict[str, str]
) -> None:
    actions = plan(targets, actual, OWNER)
    assert kept_network_ids(actual, actions, OWNER) == expected


def test_request_carries_ownership_and_user_labels() -> None:
    [action] = plan([BACK], [], OWNER)
    assert isinstance(action, CreateNetwork)
    assert (action.request.name, action.request.driver, action.request.internal) == ("shop_back", "bridge", True)
    assert action.request.labels == {
        "tier": "back",
        "dabctl.stack": "shop",
        "dabctl.network": "back",
        "dabctl.owner": OWNER,
        "dabctl.spec": network_spec_hash(BACK),
        "com.docker.stack.namespace": "shop",
    }


def test_network_spec_hash_ignores_explicit_defaults() -> None:
    explicit = nets(
        {
            "Services": {"web": {"Image": "x", "Networks": ["back"]}},
            "Networks": {"back": {"Driver": "bridge", "Internal": False, "External": False}},
        }
    )["back"]
    implicit = nets({"Services": {"web": {"Image": "x", "Networks": ["back"]}}})["back"]
    assert network_spec_hash(explicit) == network_spec_hash(implicit)
    assert network_spec_hash(explicit) != network_spec_hash(BACK)


@pytest.mark.parametrize(
    ("action", "text"),
    [
        (create(DEFAULT), "+ network shop_default (missing)"),
        (
            RemoveNetwork("other", ORPHAN, "no longer in any bundle"),
            "- network other_default (no longer in any bundle)",
        ),
    ],
)
def test_action_text_is_the_plan(action: NetworkAction, text: str) -> None:
    assert str(action) == text
