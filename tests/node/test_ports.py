"""Published ports against the node's own listeners, on the fake engine and a fake ruleset: dabctl's own ports are
never handed out, and a host process that listens on a published port wins on every pass, not only at allocation."""

from __future__ import annotations

from agent.node.engine import Engine
from agent.state.records import Records
from reconcilers import loadbalancer
from reconcilers.loadbalancer import LoadBalancerReconciler, PortKey, PortRules
from tests.fakes import FakeRuleset, FakeRuntime
from tests.node.conftest import NODE, Clock, bundle, converge, desired, service

KEY = PortKey("web", "front", "tcp", 8080)


def engine_with(
    runtime: FakeRuntime, records: Records, clock: Clock, listening: set[tuple[str, int]], rules: PortRules
) -> tuple[Engine, FakeRuleset]:
    engine = Engine(runtime, records, NODE, clock=clock, ports=rules, listening=lambda: set(listening))
    ruleset = FakeRuleset()
    engine.balancer = LoadBalancerReconciler(ruleset)
    return engine, ruleset


def test_a_host_process_that_starts_later_wins_until_it_ends(
    runtime: FakeRuntime, records: Records, clock: Clock
) -> None:
    listening: set[tuple[str, int]] = set()
    engine, ruleset = engine_with(runtime, records, clock, listening, PortRules())
    state = desired(web=bundle({"front": service(Ports=[{"Port": 8080}])}))
    _, report = converge(engine, state)
    assert not report.failed and records.ports() == {KEY: 30000}

    listening.add(("tcp", 30000))  # a host service starts on the port dabctl publishes
    plan, report = converge(engine, state)
    error = plan.stacks["web"].error
    assert error is not None and "30000/tcp" in error and "a process on this node listens on it" in error
    assert [type(a) for a in plan.stacks["web"].balancer_actions] == [loadbalancer.Unpublish]
    assert ruleset.balance == {} and report.failed
    assert records.ports() == {KEY: 30000}, "the port stays the service's, to publish again"
    assert converge(engine, state)[0].stacks["web"].error == error  # Failed on every pass while it listens

    listening.clear()  # the host process ends
    plan, report = converge(engine, state)
    assert not report.failed and plan.stacks["web"].error is None
    assert [f.port for f in ruleset.balance] == [30000]


def test_the_agents_own_ports_are_never_allocated(runtime: FakeRuntime, records: Records, clock: Clock) -> None:
    engine, _ = engine_with(runtime, records, clock, set(), PortRules(range=(9420, 9421), reserved=(9420,)))
    _, report = converge(engine, desired(web=bundle({"front": service(Ports=[{"Port": 8080}])})))
    assert not report.failed and records.ports() == {KEY: 9421}


def test_give_way_is_pure_and_leaves_other_ports() -> None:
    other = PortKey("web", "front", "tcp", 9090)
    allocation = loadbalancer.Allocation({KEY: 30000, other: 30001})
    given = loadbalancer.give_way(allocation, {("tcp", 30000), ("udp", 30001)})
    assert given.ports == {other: 30001} and given.conflicts == {KEY: 30000}
    assert loadbalancer.give_way(allocation, set()) is allocation
