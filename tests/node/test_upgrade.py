"""Upgrades: what the previous release (commit 6588d50) left behind loads with today's code and changes nothing.

tests/fixtures/upgrade/6588d50/ holds the state.db that release wrote (embedded state) and 6588d50-etcd/ the keys it
wrote under an etcd prefix, each with the engine's containers and networks as that release left them
(engine.json) and the source directory it ran from. Both runs: the sample stacks web-shop and ops deployed,
web-shop's worker changed (a second revision), then `dabctl rollback web-shop` (a pin to the first) and one more
pass; DABCTL_LOADBALANCER=none, node name fixture-node.

A copy of each is opened with today's code, every record is parsed, and a pass against the fake engine seeded with
exactly those containers and networks must plan nothing: no replica recreated, no network touched, no write to the
state log. A change to the records' format (to pydantic models, say) that loses old data fails here.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.node.engine import Engine
from agent.state.log import StateLog
from agent.state.records import (
    ASSIGNMENTS,
    AUDIT,
    HISTORY,
    OWNER_KEY,
    PINS,
    PORTS,
    RESTARTS,
    ROLLOUTS,
    STACKS,
    SUSPENDED,
    Records,
)
from agent.state.sqlite import SqliteStateLog
from bundles import load_directory
from tests.fakes import FakeRuntime

FIXTURES = Path(__file__).parent.parent / "fixtures" / "upgrade"
NODE = "fixture-node"


def seeded(engine_json: Path) -> tuple[FakeRuntime, str]:
    """The fake engine holding exactly what the old release left, and the owner its objects carry."""
    doc = json.loads(engine_json.read_text())
    runtime = FakeRuntime(images=())
    for ref, image in doc["images"].items():
        runtime.add_image(ref, image["id"])
    for n in doc["networks"]:
        runtime.seed_network(n["name"], n["labels"], n["driver"], n["internal"])
    for c in doc["containers"]:
        runtime.seed_container(
            c["name"],
            c["labels"],
            c["networks"],
            image=c["image"],
            state=c["state"],
            health=c["health"],
            image_id=c["image_id"],
        )
    (owner,) = {c["labels"]["dabctl.owner"] for c in doc["containers"]} | {
        n["labels"]["dabctl.owner"] for n in doc["networks"]
    }
    return runtime, owner


def parse_everything(log: StateLog) -> Records:
    """Every key the old release wrote, read through today's Records; a key of no known kind fails."""
    records = Records(log)
    kinds: dict[str, Callable[[], Any]] = {
        STACKS: records.stacks,
        ASSIGNMENTS: records.assignments,
        AUDIT: records.audit,
        ROLLOUTS: records.rollouts,
        RESTARTS: records.restarts,
        PINS: records.pins,
        PORTS: records.ports,
        SUSPENDED: records.suspended,
    }
    keys = [kv.key for kv in log.range("/")]
    assert keys, "the fixture holds records"
    unknown = [k for k in keys if k != OWNER_KEY and not k.startswith((*kinds, HISTORY))]
    assert unknown == [], f"keys of no known kind: {unknown}"
    counts = {prefix: len(read()) for prefix, read in kinds.items()}
    assert counts[STACKS] == 2 and counts[ASSIGNMENTS] == 3 and counts[PINS] == 1 and counts[AUDIT] >= 3
    for stack in records.stacks():
        history = records.history(stack)
        assert history and all(h.stack == stack and h.content for h in history)
    return records


def assert_a_pass_changes_nothing(log: StateLog, runtime: FakeRuntime, owner: str, source: Path) -> None:
    records = parse_everything(log)
    assert records.owner(create=False) == owner
    assert records.pins()["web-shop"].source_revision == records.history("web-shop")[1].revision

    engine = Engine(runtime, records, NODE)
    plan = engine.plan(load_directory(source))
    assert plan.errors == [] and plan.held == set()
    assert {name: [str(a) for a in s.actions] for name, s in plan.stacks.items()} == {"ops": [], "web-shop": []}
    assert plan.assignments_changed == {} and plan.assignments_removed == set()
    assert plan.pins == {}, "the pin holds: the source has not moved"

    revision = log.revision()
    runtime.calls.clear()
    report = engine.apply(plan)
    assert report.results == [] and not report.failed
    assert runtime.writes() == [], "nothing recreated"
    assert log.revision() == revision, "nothing rewritten"


def test_the_embedded_state_of_the_previous_release_loads_and_plans_no_change(tmp_path: Path) -> None:
    fixture = FIXTURES / "6588d50"
    shutil.copy(fixture / "state.db", tmp_path / "state.db")  # a copy: opening may migrate or lock the file
    runtime, owner = seeded(fixture / "engine.json")
    log = SqliteStateLog(tmp_path / "state.db")
    try:
        assert_a_pass_changes_nothing(log, runtime, owner, fixture / "source")
    finally:
        log.close()


def load_etcd_dump(log: StateLog) -> None:
    dump = json.loads((FIXTURES / "6588d50-etcd" / "etcd.json").read_text())
    for kv in dump["keys"]:
        log.put(kv["key"], kv["value"].encode())


def test_the_etcd_records_of_the_previous_release_load_and_plan_no_change(tmp_path: Path) -> None:
    # Records read the same from either backend: the keys and values etcd held, in an embedded log.
    fixture = FIXTURES / "6588d50-etcd"
    runtime, owner = seeded(fixture / "engine.json")
    log = SqliteStateLog(tmp_path / "state.db")
    try:
        load_etcd_dump(log)
        assert_a_pass_changes_nothing(log, runtime, owner, fixture / "source")
    finally:
        log.close()


@pytest.mark.integration
def test_the_etcd_records_of_the_previous_release_load_from_a_real_etcd(tmp_path: Path) -> None:
    from agent.state.etcd import EtcdStateLog
    from tests.support.etcd import EtcdServer

    fixture = FIXTURES / "6588d50-etcd"
    runtime, owner = seeded(fixture / "engine.json")
    with EtcdServer(tmp_path / "etcd") as server:
        log = EtcdStateLog([server.url], prefix=f"/upgrade-{secrets.token_hex(4)}")
        try:
            load_etcd_dump(log)
            assert_a_pass_changes_nothing(log, runtime, owner, fixture / "source")
        finally:
            log.close()
