"""The agent's typed records on the real SQLite state log: owner, history and audit limits, suspension, ports,
rollouts and restarts round-trip."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from agent.cluster.orchestrate import Intent
from agent.cluster.tasks import TaskChanges
from agent.node.engine import Engine
from agent.state.log import Compare, KeyValue, Op, TxnResult
from agent.state.records import INTENT_KEY, MAX_TXN_OPS, Fence, Records
from agent.state.sqlite import SqliteStateLog
from reconcilers.loadbalancer import PortKey
from reconcilers.restarts import RestartRecord
from reconcilers.rollout import Rollout, SlotFailure
from schemas.state import AuditAction, AuditEntry, SlotReport, TaskRecord
from tests.fakes import FakeRuntime
from tests.node.conftest import Clock, bundle, converge, desired, service


def test_the_owner_is_created_once_and_shared(state_log: SqliteStateLog) -> None:
    first = Records(state_log).owner()
    assert len(first) == 16
    assert Records(state_log).owner() == first


def test_history_and_audit_keep_their_limits_newest_first(engine: Engine, records: Records) -> None:
    revisions = []
    for v in range(5):
        state = desired(web=bundle({"front": service(Env=[f"V={v}"])}))
        converge(engine, state)
        revisions.append(state.stacks["web"].revision)
    assert [h.revision for h in records.history("web")] == revisions[::-1][:3]
    assert len(records.audit()) == 5
    records.commit_pass(
        [],
        [],
        [],
        AuditEntry(
            reconcile_id="x",
            at=datetime.now(UTC),
            node="n",
            actions=[AuditAction(stack="web", action="a", outcome="created")],
        ),
    )
    audit = records.audit()
    assert len(audit) == 5 and audit[0].reconcile_id == "x"


def test_nothing_to_commit_writes_nothing(records: Records, state_log: SqliteStateLog) -> None:
    revision = state_log.revision()
    records.commit_pass([], [], [], None)
    records.write_ports({}, set())
    records.write_assignments({}, set())
    assert state_log.revision() == revision


def test_suspension_reports_whether_it_changed_anything(records: Records) -> None:
    assert records.set_suspended("web", True) and not records.set_suspended("web", True)
    assert records.suspended() == {"web"}
    assert records.set_suspended("web", False) and not records.set_suspended("web", False)
    assert records.suspended() == set()


def test_ports_rollouts_and_restarts_read_back_as_written(records: Records) -> None:
    key = PortKey("web", "front", "tcp", 8080)
    records.write_ports({key: 30001}, set())
    assert records.ports() == {key: 30001}
    records.write_ports({}, {key})
    assert records.ports() == {}

    rollout = Rollout(
        target="v1-abc", state="paused", batch=("1", "2"), failed=(SlotFailure("1", "unhealthy"),), reason="unhealthy"
    )
    restart = RestartRecord((1.0, 2.0), 2.0, 2, tried="c0ffee")
    records.commit_pass(
        [], [], [], None, rollouts={("web", "front"): rollout}, restarts={("web", "front", "1"): restart}
    )
    assert records.rollouts() == {("web", "front"): rollout}
    assert records.restarts() == {("web", "front", "1"): restart}


def test_an_orchestrator_commit_under_a_fence_holds_only_in_the_leaders_term(records: Records) -> None:
    key = PortKey("web", "front", "tcp", 80)
    records.log.put("/leader", b"node-1")
    term = records.log.get("/leader")
    assert term is not None
    records.fence = Fence("/leader", term.create_revision)
    assert records.commit_intent(Intent(assignments={}, ports_changed={key: 30000}), records.snapshot())
    # A new leader key (another term), even under the same name and value: the old leader's commits fail.
    records.log.delete("/leader")
    records.log.put("/leader", b"node-1")
    assert not records.commit_intent(Intent(assignments={}, ports_changed={key: 30001}), records.snapshot())
    assert records.ports() == {key: 30000}


class _Ranges:
    """A real state log that counts range reads."""

    def __init__(self, log: SqliteStateLog) -> None:
        self.log = log
        self.ranges = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)

    def range(self, prefix: str, revision: int = 0) -> list[KeyValue]:
        self.ranges += 1
        return self.log.range(prefix, revision)


def test_a_snapshot_at_an_unmoved_revision_is_reused_and_only_moved_records_are_decoded_again(
    state_log: SqliteStateLog, runtime: FakeRuntime, clock: Clock
) -> None:
    counting = _Ranges(state_log)
    records = Records(counting)  # type: ignore[arg-type]
    engine = Engine(runtime, records, "node-1", clock=clock)
    converge(engine, desired(a=bundle({"web": service()}), b=bundle({"web": service(Deploy={"Replicas": 2})})))
    first = records.snapshot()
    reads = counting.ranges
    assert records.snapshot() is first and counting.ranges == reads  # nothing moved: no range read at all
    assert records.snapshot(restarts=False).restarts == {} and counting.ranges == reads

    converge(
        engine, desired(a=bundle({"web": service(Env=["V=2"])}), b=bundle({"web": service(Deploy={"Replicas": 2})}))
    )
    second = records.snapshot()
    assert second.revision > first.revision and counting.ranges > reads
    assert second.stacks["b"] is first.stacks["b"]  # unchanged key: the decoded record is reused
    assert second.stacks["a"] is not first.stacks["a"] and second.stacks["a"].revision != first.stacks["a"].revision
    assert second.tasks[("b", "web", "2")] == first.tasks[("b", "web", "2")]
    # A fresh reader decodes everything and sees the same state.
    fresh = Records(state_log).snapshot()
    assert fresh.stacks == second.stacks and fresh.tasks == second.tasks and fresh.assignments == second.assignments
    assert fresh.versions == second.versions


def test_a_pass_outcome_is_committed_without_its_own_fsync_and_an_intent_with_one(
    records: Records, state_log: SqliteStateLog
) -> None:
    seen: list[bool] = []
    txn = state_log.txn

    def spy(*args: Any, durable: bool = True, **kw: Any) -> Any:
        seen.append(durable)
        return txn(*args, durable=durable, **kw)

    state_log.txn = spy  # type: ignore[method-assign]
    records.commit_pass([], [], [], AuditEntry(reconcile_id="x", at=datetime.now(UTC), node="n", actions=[]))
    records.set_suspended("web", True)
    assert seen == [False, True]
    assert [a.reconcile_id for a in records.audit()] == ["x"]


class _Limited:
    """A state log that refuses a transaction above etcd 3.4's default 128 operations, as etcd does, and keeps
    the size of each one it ran."""

    def __init__(self, log: SqliteStateLog) -> None:
        self.log = log
        self.sizes: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.log, name)

    def txn(self, compares: Sequence[Compare], ops: Sequence[Op], *, durable: bool = True) -> TxnResult:
        if max(len(compares), len(ops)) > MAX_TXN_OPS:
            raise AssertionError(f"etcd refuses a transaction of {len(compares)} compares and {len(ops)} ops")
        self.sizes.append((len(compares), len(ops)))
        return self.log.txn(compares, ops, durable=durable)


def _big_intent(services: int, replicas: int) -> Intent:
    changes = TaskChanges()
    assignments: dict[tuple[str, str], dict[str, list[str]]] = {}
    for i in range(services):
        slots = [str(s) for s in range(1, replicas + 1)]
        assignments[("big", f"s{i:03d}")] = {"n1": slots}
        for s in slots:
            task = TaskRecord(task_id=f"t{i}-{s}", slot=s, node="n1", target="h", created_at=0.0)
            changes.put[("big", f"s{i:03d}", s)] = [task]
    return Intent(assignments=assignments, assignments_changed=assignments, tasks=changes)


def test_an_intent_above_etcds_128_operations_commits_in_fenced_chained_parts_of_whole_services(
    state_log: SqliteStateLog,
) -> None:
    limited = _Limited(state_log)
    records = Records(limited)  # type: ignore[arg-type]  # a StateLog by duck typing
    state_log.put("/leader", b"n1")
    term = state_log.get("/leader")
    assert term is not None
    records.fence = Fence("/leader", term.create_revision)
    intent = _big_intent(300, 1)  # 600 writes: 300 assignments and 300 tasks
    assert records.commit_intent(intent, records.snapshot())
    assert len(records.assignments()) == 300 and len(records.tasks()) == 300
    assert len(limited.sizes) == 5 and all(c <= MAX_TXN_OPS and o <= MAX_TXN_OPS for c, o in limited.sizes)
    # One service with more slots than a transaction holds goes in parts too, its assignment in its last.
    limited.sizes.clear()
    assert records.commit_intent(_big_intent(1, 200), records.snapshot())
    assert len(limited.sizes) == 2 and len(records.tasks()) == 300 + 200 - 1
    # A commit that stops part-way: another orchestrator's commit (INTENT_KEY moved) fails the next part.
    snapshot = records.snapshot()
    state_log.put(INTENT_KEY, b"someone else")
    assert not records.commit_intent(_big_intent(300, 2), snapshot)
    # ... and the leader's term ends: its commits fail whatever their size.
    state_log.delete("/leader")
    assert not records.commit_intent(_big_intent(300, 2), records.snapshot())


def test_a_pass_commit_above_128_operations_goes_in_parts_the_stack_records_last(state_log: SqliteStateLog) -> None:
    limited = _Limited(state_log)
    records = Records(limited)  # type: ignore[arg-type]
    reports = {("big", f"s{i:03d}", "1"): SlotReport(state="running") for i in range(300)}
    records.commit_pass([], [], [], None, node="n1", reports=reports)
    assert len(records.reports("n1")) == 300
    assert [o for _, o in limited.sizes] == [128, 128, 44]
