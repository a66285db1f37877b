"""The task model over a pass runner's whole history: every state-log revision of start-first updates (compaction
off: the SQLite log keeps every event) is read back, and no slot ever has two tasks desired running other than
the start-first overlap, nor one that outlives the transaction recording its successor healthy."""

from __future__ import annotations

from agent.cluster.tasks import task_order
from agent.node.engine import Engine
from agent.state.log import StateLog
from agent.state.records import TASKS, Records
from agent.state.sqlite import SqliteStateLog
from schemas.state import TaskRecord
from tests.fakes import FakeRuntime
from tests.node.conftest import Clock, bundle, converge, desired, service

HEALTHCHECK = {"Test": ["CMD", "true"], "Interval": "1s"}


def tasks_at(log: StateLog, revision: int) -> dict[str, list[TaskRecord]]:
    out: dict[str, list[TaskRecord]] = {}
    for kv in log.range(TASKS, revision=revision):
        out.setdefault(kv.key.rsplit("/", 1)[0], []).append(TaskRecord.model_validate_json(kv.value))
    return out


def check_history(log: StateLog, first: int) -> tuple[int, int]:
    """Every revision from `first`: (revisions with a start-first overlap, handovers seen); fails on a violation."""
    overlaps = handovers = 0
    for revision in range(first, log.revision() + 1):
        for slot, tasks in tasks_at(log, revision).items():
            running = [t for t in tasks if t.desired == "running"]
            assert len(running) <= 2, f"revision {revision}: {slot} has {len(running)} tasks desired running"
            if len(running) == 2:
                old, new = sorted(running, key=task_order)
                assert old.target != new.target, f"revision {revision}: {slot} runs two tasks of one spec"
                assert not new.healthy, f"revision {revision}: {slot}'s old task outlived its successor's healthy"
                overlaps += 1
            handovers += sum(1 for t in tasks if t.healthy and t.desired == "running")
    return overlaps, handovers


def test_start_first_updates_overlap_only_until_the_new_task_is_recorded_healthy(
    runtime: FakeRuntime, state_log: SqliteStateLog, records: Records, clock: Clock
) -> None:
    engine = Engine(runtime, records, "node-1", clock=clock)
    deploy = {"Replicas": 3, "UpdateConfig": {"Parallelism": 2, "Order": "start-first"}}
    svc = service(Healthcheck=HEALTHCHECK, Deploy=deploy)
    first = state_log.revision() + 1
    converge(engine, desired(web=bundle({"front": svc})))
    for version in ("V=2", "V=3"):
        changed = desired(web=bundle({"front": {**svc, "Env": [version]}}))
        for _ in range(12):
            for c in runtime.by_name("web_front"):
                if c.state == "running":
                    runtime.set_health(c.id, "healthy")
            plan, report = converge(engine, changed)
            assert not report.failed, report.errors
            if not plan.rolling and plan.changes == 0:
                break
        else:
            raise AssertionError("the update did not complete")

    overlaps, handovers = check_history(state_log, first)
    assert overlaps > 0 and handovers > 0, "the start-first overlap and its handover happened"
    final = records.tasks()
    assert sorted(final) == [("web", "front", s) for s in ("1", "2", "3")]
    for slot_tasks in final.values():
        assert [t.desired for t in slot_tasks] == ["shutdown", "shutdown", "running"]
        assert slot_tasks[-1].node == "node-1"


def test_a_stop_first_update_shuts_the_old_task_down_as_it_creates_the_new_one(
    runtime: FakeRuntime, state_log: SqliteStateLog, records: Records, clock: Clock
) -> None:
    engine = Engine(runtime, records, "node-1", clock=clock)
    first = state_log.revision() + 1
    converge(engine, desired(web=bundle({"front": service()})))
    changed = desired(web=bundle({"front": service(Env=["V=2"])}))
    converge(engine, changed)
    overlaps, _ = check_history(state_log, first)
    assert overlaps == 0
    (slot_tasks,) = records.tasks().values()
    assert [t.desired for t in slot_tasks] == ["shutdown", "running"]


def test_a_failed_start_first_task_is_shut_down_with_its_error(
    runtime: FakeRuntime, state_log: SqliteStateLog, records: Records, clock: Clock
) -> None:
    engine = Engine(runtime, records, "node-1", clock=clock)
    deploy = {"UpdateConfig": {"Order": "start-first"}}
    svc = service(Healthcheck=HEALTHCHECK, Deploy=deploy)
    first = state_log.revision() + 1
    converge(engine, desired(web=bundle({"front": svc})))
    (old,) = runtime.by_name("web_front")
    runtime.set_health(old.id, "healthy")
    changed = desired(web=bundle({"front": {**svc, "Env": ["V=2"]}}))
    converge(engine, changed)
    new = next(c for c in runtime.by_name("web_front") if c.id != old.id)
    runtime.set_health(new.id, "unhealthy")
    plan, _ = converge(engine, changed)
    assert plan.changes == 0 and not plan.rolling
    check_history(state_log, first)
    (slot_tasks,) = records.tasks().values()
    assert [(t.desired, t.error) for t in slot_tasks] == [("running", ""), ("shutdown", "unhealthy")]
