"""Two orchestrators on one etcd prefix: both read one snapshot, wait for each other (a barrier between the read and
the commit), then commit — 50 rounds, each a new stack per orchestrator needing a published port from the same
range. The guarded commit lets one win; the loser plans again from a fresh snapshot and never overwrites."""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from pathlib import Path

import pytest

from agent.node.engine import Engine
from agent.state.etcd import EtcdStateLog
from agent.state.records import Records
from reconcilers.loadbalancer import LoadBalancerReconciler, PortRules
from tests.fakes import FakeRuleset, FakeRuntime
from tests.node.conftest import NODE, Clock, bundle, desired, service
from tests.support.etcd import EtcdServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROUNDS = 50


def test_two_orchestrators_never_give_one_port_twice_and_the_loser_plans_again(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd") as etcd:
        prefix = f"/race-{secrets.token_hex(4)}"
        logs = [EtcdStateLog([etcd.url], prefix=prefix) for _ in range(2)]
        try:
            clock = Clock()
            engines = []
            for log in logs:
                engine = Engine(
                    FakeRuntime(clock=clock), Records(log), NODE, clock=clock, ports=PortRules((31000, 31999))
                )
                engine.balancer = LoadBalancerReconciler(FakeRuleset())
                engine.listening = set
                engines.append(engine)
            errors: list[BaseException] = []

            def run(k: int, name: str, barrier: threading.Barrier) -> None:
                try:
                    state = desired(**{name: bundle({"web": service(Ports=[{"Port": 80}], Deploy={"Replicas": 2})})})
                    plan = engines[k].plan(state, only={name})
                    barrier.wait(timeout=30)  # both have read their snapshot; now both commit
                    report = engines[k].apply(plan)
                    assert not report.failed, report.errors
                except BaseException as exc:
                    errors.append(exc)

            for i in range(ROUNDS):
                barrier = threading.Barrier(2)
                threads = [threading.Thread(target=run, args=(k, f"s{k}-{i}", barrier)) for k in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=60)
                assert not errors, errors

            records = Records(logs[0])
            ports = records.ports()
            stacks = {f"s{k}-{i}" for k in range(2) for i in range(ROUNDS)}
            assert {k.stack for k in ports} == stacks, "every service has a port"
            taken = Counter(ports.values())
            assert all(n == 1 for n in taken.values()), f"ports given twice: {[p for p, n in taken.items() if n > 1]}"
            assignments = records.assignments()
            assert set(assignments) == {(s, "web") for s in stacks}
            assert all(a == {NODE: ["1", "2"]} for a in assignments.values()), "every slot has one task"
            replans = sum(e.replans for e in engines)
            assert replans >= ROUNDS, f"the loser of each round plans again (counted: {replans})"
        finally:
            for log in logs:
                log.close()
