"""Named volumes on the fake engine: stack-scoped for new stacks, as written for stacks whose record predates
scoped names, the explicit move between the two, and no replica ever started on a new, empty volume while one of
the old name exists."""

from __future__ import annotations

import json

from agent.node.engine import Engine
from agent.state.records import STACKS, Records
from agent.state.sqlite import SqliteStateLog
from bundles.desired import service_targets
from reconcilers import services, volumes
from reconcilers.outcome import Outcome
from tests.fakes import FakeRuntime, api_error
from tests.node.conftest import bundle, converge, desired, service, texts

DATA = {"Type": "volume", "Source": "data", "Target": "/data"}


def shop(**extra: object) -> dict[str, object]:
    doc = bundle({"db": service(Mounts=[DATA], Deploy={"Replicas": 2})})
    doc.update(extra)
    return doc


def make_legacy(state_log: SqliteStateLog, stack: str) -> None:
    """The stack's record as the release before scoped volume names wrote it: without `volume_names`."""
    key = STACKS + stack
    doc = json.loads(state_log.get(key).value)  # type: ignore[union-attr]
    del doc["volume_names"]
    state_log.put(key, json.dumps(doc).encode())


def deploy_legacy(engine: Engine, runtime: FakeRuntime, state_log: SqliteStateLog) -> None:
    """`shop` running on volume `data` (holding a file), recorded as the previous release recorded it."""
    runtime.volumes["data"] = {"/db.sqlite": "orders"}
    converge(engine, desired(shop=shop(Volumes={"data": {"External": True}})))  # runs on `data` itself
    make_legacy(state_log, "shop")
    converge(engine, desired(shop=shop()))  # the bundle as it was: replicas move to legacy specs (same volume)
    assert engine.plan(desired(shop=shop())).changes == 0
    runtime.calls.clear()


def test_a_new_stack_mounts_stack_scoped_volumes_and_external_ones_by_name(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    doc = bundle(
        {"db": service(Mounts=[DATA, {"Type": "volume", "Source": "certs", "Target": "/certs"}])},
    )
    doc["Volumes"] = {"certs": {"External": True}}
    _, report = converge(engine, desired(shop=doc))
    assert not report.failed
    assert set(runtime.volumes) == {"shop_data", "certs"}
    assert records.stacks()["shop"].volume_names == "scoped"
    (target,) = service_targets(desired(shop=doc).stacks["shop"])
    assert [m["Source"] for m in target.spec["Mounts"]] == ["shop_data", "certs"]


def test_a_stack_recorded_before_scoped_names_keeps_its_volumes_and_plans_nothing(
    engine: Engine, runtime: FakeRuntime, records: Records, state_log: SqliteStateLog
) -> None:
    deploy_legacy(engine, runtime, state_log)
    assert records.stacks()["shop"].volume_names == "legacy"
    assert set(runtime.volumes) == {"data"}
    # a replica that dies is recreated on the old volume, not on a new, empty one
    runtime.containers.pop(runtime.by_name("shop_db.1")[0].id)
    _, report = converge(engine, desired(shop=shop()))
    assert report.count(Outcome.CREATED) == 1 and set(runtime.volumes) == {"data"}


def test_no_replica_starts_on_a_new_empty_volume_while_the_old_one_exists(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    # `shop` was deployed by the previous release, pruned (its record gone, its volume kept), and comes back.
    runtime.volumes["data"] = {"/db.sqlite": "orders"}
    plan, report = converge(engine, desired(shop=shop()))
    error = plan.stacks["shop"].error
    assert error is not None and "volume data exists" in error and "--migrate-volumes shop" in error
    assert "shop" in plan.held and texts(plan) == []
    assert runtime.writes() == [] and set(runtime.volumes) == {"data"} and report.failed
    # a stack with no such volume is not held back by it
    logs = {"Type": "volume", "Source": "logs", "Target": "/logs"}
    other = desired(shop=shop(), web=bundle({"front": service(Mounts=[logs])}))
    plan = engine.plan(other)
    assert plan.stacks["web"].error is None and plan.stacks["shop"].error is not None


def test_migrate_volumes_stops_the_stack_copies_each_volume_then_starts_on_the_new_one(
    engine: Engine, runtime: FakeRuntime, records: Records, state_log: SqliteStateLog
) -> None:
    deploy_legacy(engine, runtime, state_log)
    plan = engine.plan(desired(shop=shop()), migrate_volumes={"shop"})
    lines = texts(plan)
    assert "~ shop volume data → shop_data (contents copied; data is kept)" in lines
    assert sum(1 for line in lines if "its volumes move to stack-scoped names" in line) == 2
    _, report = converge(engine, desired(shop=shop()), migrate_volumes={"shop"})
    assert not report.failed
    calls = [c[0] for c in runtime.writes()]
    assert calls.index("copy_volume") > max(i for i, c in enumerate(calls) if c == "remove_replica")
    assert calls.index("copy_volume") < calls.index("create_replica")
    assert runtime.volumes["shop_data"] == {"/db.sqlite": "orders"} and "data" in runtime.volumes
    assert records.stacks()["shop"].volume_names == "scoped"
    assert records.stacks()["shop"].services["db"].spec["Mounts"][0]["Source"] == "shop_data"
    assert engine.plan(desired(shop=shop())).changes == 0


def test_a_failed_copy_starts_nothing_and_keeps_the_old_names(
    engine: Engine, runtime: FakeRuntime, records: Records, state_log: SqliteStateLog
) -> None:
    deploy_legacy(engine, runtime, state_log)
    runtime.fail("copy_volume", api_error(500, "Server Error", "no space left on device", "/containers/x/archive"))
    _, report = converge(engine, desired(shop=shop()), migrate_volumes={"shop"})
    assert report.failed and not [c for c in runtime.writes() if c[0] == "create_replica"]
    assert records.stacks()["shop"].volume_names == "legacy"
    plan, report = converge(engine, desired(shop=shop()))  # back on the old volume
    assert not report.failed and report.count(Outcome.CREATED) == 2 and set(runtime.volumes) == {"data"}
    assert all(isinstance(a, services.CreateReplica) for a in plan.stacks["shop"].service_actions)


def test_migration_refuses_when_both_volumes_exist() -> None:
    actions, error = volumes.migrations("shop", {"data": "shop_data"}, {"data", "shop_data"}, "img")
    assert actions == [] and error is not None and "both exist" in error
    actions, error = volumes.migrations("shop", {"data": "shop_data"}, set(), "img")
    assert actions == [] and error is None  # nothing to copy


def test_refusals_name_the_stranded_volumes() -> None:
    assert volumes.refusals({"shop": {"data": "shop_data"}}, {"data", "shop_data"}) == {}
    assert volumes.refusals({"shop": {"data": "data"}}, {"data"}) == {}
    assert "volume data exists" in volumes.refusals({"shop": {"data": "shop_data"}}, {"data"})["shop"]
