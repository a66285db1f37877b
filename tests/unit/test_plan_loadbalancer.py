"""The routing mesh's pure parts as tables: port allocation, the balance to program, and the plan."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from reconcilers.loadbalancer import (
    Allocation,
    Backend,
    Balance,
    BalancerAction,
    Endpoint,
    Frontend,
    LoadBalancerReconciler,
    PortKey,
    PortRequest,
    Publish,
    Rebalance,
    Unpublish,
    allocate,
    apply_to,
    forwarded,
    plan,
    wanted,
)
from reconcilers.outcome import Outcome

WEB = PortKey("shop", "web", "tcp", 8080)
API = PortKey("shop", "api", "tcp", 9000)
DNS = PortKey("shop", "dns", "udp", 53)
OTHER = PortKey("blog", "web", "tcp", 8080)
RANGE = (30000, 30002)


def req(key: PortKey, published: int | None = None) -> PortRequest:
    return PortRequest(key, published, f"{key.stack}.dab: Services.{key.service}.Ports[0]")


ALLOCATIONS: dict[str, tuple[list[PortRequest], dict[PortKey, int], set[tuple[str, int]], Allocation]] = {
    "nothing": ([], {}, set(), Allocation()),
    "first-free-in-range": ([req(WEB)], {}, set(), Allocation({WEB: 30000})),
    "recorded-is-kept": ([req(WEB), req(API)], {API: 30000}, set(), Allocation({API: 30000, WEB: 30001})),
    "fixed-port": ([req(WEB, 8080)], {}, set(), Allocation({WEB: 8080})),
    "busy-ports-are-skipped": ([req(WEB)], {}, {("tcp", 30000)}, Allocation({WEB: 30001})),
    "a-busy-udp-port-does-not-block-tcp": ([req(WEB)], {}, {("udp", 30000)}, Allocation({WEB: 30000})),
    "same-number-on-two-protocols": ([req(WEB, 53), req(DNS, 53)], {}, set(), Allocation({WEB: 53, DNS: 53})),
    "recorded-port-of-a-gone-key-is-freed": ([req(WEB)], {API: 30000}, set(), Allocation({WEB: 30000})),
    "a-fixed-port-replaces-the-allocated-one": ([req(WEB, 8081)], {WEB: 30000}, set(), Allocation({WEB: 8081})),
    "dropping-a-fixed-port-allocates-from-the-range": ([req(WEB)], {WEB: 8081}, set(), Allocation({WEB: 30000})),
    "a-programmed-port-is-not-busy-for-its-holder": ([req(WEB)], {WEB: 30001}, set(), Allocation({WEB: 30001})),
    "fixed-port-a-process-listens-on": (
        [req(WEB, 8080)],
        {},
        {("tcp", 8080)},
        Allocation(
            {},
            {
                "shop": "shop.dab: Services.web.Ports[0]: PublishedPort 8080/tcp is in use by a process on this "
                "node; stop that process or choose another PublishedPort"
            },
        ),
    ),
    "fixed-port-held-by-another-stack": (
        [req(WEB, 30000), req(OTHER)],
        {OTHER: 30000},
        set(),
        Allocation(
            {OTHER: 30000},
            {
                "shop": "shop.dab: Services.web.Ports[0]: PublishedPort 30000/tcp is already published for "
                "blog_web 8080/tcp; choose another"
            },
        ),
    ),
    "first-of-two-fixed-claims-wins-in-name-order": (
        [req(WEB, 8000), req(OTHER, 8000)],
        {},
        set(),
        Allocation(
            {OTHER: 8000},
            {
                "shop": "shop.dab: Services.web.Ports[0]: PublishedPort 8000/tcp is already published for "
                "blog_web 8080/tcp; choose another"
            },
        ),
    ),
    "a-stack-with-one-refused-port-gets-none": (
        [req(WEB, 8080), req(API)],
        {},
        {("tcp", 8080)},
        Allocation(
            {},
            {
                "shop": "shop.dab: Services.web.Ports[0]: PublishedPort 8080/tcp is in use by a process on this "
                "node; stop that process or choose another PublishedPort"
            },
        ),
    ),
    "range-exhausted": (
        [req(WEB), req(API), req(OTHER), req(DNS)],
        {},
        {("tcp", 30001)},
        Allocation(
            {OTHER: 30000},
            {
                "shop": "shop.dab: Services.web.Ports[0]: no free port left in 30000-30002 for shop_web 8080/tcp; "
                "set PublishedPort or widen published_port_range"
            },
        ),
    ),
}


@pytest.mark.parametrize(("requests", "recorded", "busy", "expected"), ALLOCATIONS.values(), ids=list(ALLOCATIONS))
def test_allocate(
    requests: list[PortRequest], recorded: dict[PortKey, int], busy: set[tuple[str, int]], expected: Allocation
) -> None:
    assert allocate(requests, recorded, busy, RANGE) == expected


def test_allocation_is_stable_when_a_service_is_added_before_the_others_in_name_order() -> None:
    first = allocate([req(WEB)], {}, set(), RANGE)
    second = allocate([req(API), req(WEB)], first.ports, set(), RANGE)
    assert second.ports[WEB] == first.ports[WEB]
    assert second.ports[API] != first.ports[WEB]


FE = Frontend(protocol="tcp", port=30000, stack="shop", service="web", target=8080)
FE_API = Frontend(protocol="tcp", port=30001, stack="shop", service="api", target=9000)
B1, B2, B3 = Backend("10.0.0.1", 8080), Backend("10.0.0.2", 8080), Backend("10.0.0.3", 8080)


def test_wanted_balances_each_port_over_ready_endpoints_only() -> None:
    endpoints = [
        Endpoint("shop", "web", "10.0.0.2", True),
        Endpoint("shop", "web", "10.0.0.1", True),
        Endpoint("shop", "web", "10.0.0.3", False),  # starting, unhealthy, stopped or about to stop
        Endpoint("shop", "web", "", True),  # no address (never started)
        Endpoint("blog", "web", "10.0.0.9", True),  # another service's
    ]
    assert wanted({WEB: 30000, API: 30001}, endpoints) == {FE: (B1, B2), FE_API: ()}


PLANS: dict[str, tuple[Balance, Balance, set[str], list[BalancerAction]]] = {
    "nothing": ({}, {}, set(), []),
    "converged": ({FE: (B1, B2)}, {FE: (B1, B2)}, set(), []),
    "publish": ({FE: (B1,)}, {}, set(), [Publish(FE, (B1,))]),
    "publish-before-any-replica-runs": ({FE: ()}, {}, set(), [Publish(FE, ())]),
    "backend-added-and-removed": ({FE: (B1, B3)}, {FE: (B1, B2)}, set(), [Rebalance(FE, (B1, B3), (B3,), (B2,))]),
    "last-backend-drained": ({FE: ()}, {FE: (B1,)}, set(), [Rebalance(FE, (), (), (B1,))]),
    "unpublish": ({}, {FE: (B1,)}, set(), [Unpublish(FE)]),
    "port-now-leads-to-another-service": (
        {Frontend(protocol="tcp", port=30000, stack="shop", service="api", target=9000): ()},
        {FE: (B1,)},
        set(),
        [Unpublish(FE), Publish(Frontend(protocol="tcp", port=30000, stack="shop", service="api", target=9000), ())],
    ),
    "held-stack-is-left-as-it-is": ({}, {FE: (B1,)}, {"shop"}, []),
    "held-stack-gets-nothing-new": ({FE: (B1,)}, {}, {"shop"}, []),
    "in-port-order": (
        {FE_API: (), FE: ()},
        {},
        set(),
        [Publish(FE, ()), Publish(FE_API, ())],
    ),
}


@pytest.mark.parametrize(("desired", "actual", "keep", "expected"), PLANS.values(), ids=list(PLANS))
def test_plan(desired: Balance, actual: Balance, keep: set[str], expected: list[BalancerAction]) -> None:
    actions = plan(desired, actual, keep)
    assert actions == expected
    # Applying the plan gives what was desired (for the stacks it may change).
    assert {f: b for f, b in apply_to(actual, actions).items() if f.stack not in keep} == {
        f: b for f, b in desired.items() if f.stack not in keep
    }


@pytest.mark.parametrize(
    ("action", "text"),
    [
        (Publish(FE, (B1, B2)), "+ shop_web publish 30000/tcp → 8080 (2 backends)"),
        (Publish(FE, ()), "+ shop_web publish 30000/tcp → 8080 (0 backends)"),
        (Rebalance(FE, (B1, B3), (B3,), (B2,)), "~ shop_web 30000/tcp backends +10.0.0.3 -10.0.0.2 (2 backends)"),
        (Rebalance(FE, (B1,), (), (B2,)), "~ shop_web 30000/tcp backends -10.0.0.2 (1 backend)"),
        (Unpublish(FE), "- shop_web unpublish 30000/tcp"),
    ],
)
def test_action_text_is_the_plan(action: BalancerAction, text: str) -> None:
    assert str(action) == text


class RecordingRuleset:
    """A Ruleset that keeps what it was told to hold, and fails when asked to."""

    name = "fake"

    def __init__(self, fail: str = "") -> None:
        self.held: dict[Frontend, tuple[Backend, ...]] = {}
        self.writes: list[Sequence[BalancerAction]] = []
        self.fail = fail

    def read(self) -> dict[Frontend, tuple[Backend, ...]]:
        return dict(self.held)

    def write(self, desired: Balance, actions: Sequence[BalancerAction]) -> None:
        self.writes.append(actions)
        if self.fail:
            raise RuntimeError(self.fail + "\nsecond line")
        self.held = dict(desired)


def test_reconciler_writes_once_for_all_actions_and_not_at_all_for_none() -> None:
    ruleset = RecordingRuleset()
    lb = LoadBalancerReconciler(ruleset)
    actions = plan({FE: (B1,), FE_API: ()}, lb.observe())
    results = lb.apply(lb.observe(), actions)
    assert [r.outcome for r in results] == [Outcome.CREATED, Outcome.CREATED]
    assert len(ruleset.writes) == 1 and ruleset.held == {FE: (B1,), FE_API: ()}
    assert lb.apply(lb.observe(), plan({FE: (B1,), FE_API: ()}, lb.observe())) == []
    assert len(ruleset.writes) == 1


def test_a_failed_write_fails_every_action_with_one_line() -> None:
    lb = LoadBalancerReconciler(RecordingRuleset(fail="nft: no such table"))
    results = lb.apply({}, [Publish(FE, ()), Publish(FE_API, ())])
    assert [(r.outcome, r.error) for r in results] == [(Outcome.FAILED, "nft: no such table")] * 2


def test_a_frontend_with_no_ready_replica_here_forwards_to_the_nodes_that_report_one() -> None:
    here = Frontend(protocol="tcp", port=30080, stack="shop", service="web", target=80)
    other = Frontend(protocol="tcp", port=30081, stack="shop", service="api", target=8080)
    balance = {here: (), other: (Backend("172.18.0.2", 8080),)}
    peers = {("shop", "web"): ["10.9.0.3", "10.9.0.2", ""], ("shop", "api"): ["10.9.0.3"]}

    out = forwarded(balance, peers)

    # The other nodes' same published port, never their replicas' addresses (those are on their own bridges).
    assert out[here] == (Backend("10.9.0.2", 30080), Backend("10.9.0.3", 30080))
    assert out[other] == (Backend("172.18.0.2", 8080),), "a node with a ready replica balances to its own only"
    assert forwarded({here: ()}, {}) == {here: ()}, "no peer either: nothing to forward to"
