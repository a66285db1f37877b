"""Persisted records keep their JSON shapes: what the code before the schemas/state.py models wrote loads, and
what is written now is what that code read (same keys, same values), so a state moves both ways."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.state.log import Put
from agent.state.records import ASSIGNMENTS, RESTARTS, ROLLOUTS, Records
from agent.state.sqlite import SqliteStateLog
from reconcilers.restarts import RestartRecord
from reconcilers.rollout import Rollout, SlotFailure

# Byte for byte what json.dumps(dataclasses.asdict(...)) wrote for these records.
PAUSED = (
    b'{"target": "v1:0123@sha256:feed", "state": "paused", "batch": ["1"], "batch_done_at": null, '
    b'"failed": ["slot 1: exited (exit code 1)"], "reason": "paused: slot 1: exited (exit code 1)", "rollback": false}'
)
ROLLING_BACK = (
    b'{"target": "v1:4567", "state": "rolling-back", "batch": ["node-a"], "batch_done_at": 1712.5, '
    b'"failed": ["slot node-a: unhealthy"], "reason": "rolling back: slot node-a: unhealthy", "rollback": false}'
)
RESTARTED = b'{"attempts": [1700.0, 1710.5], "last_start": 1710.5, "total": 2}'
RESTARTED_BEFORE_TOTAL = b'{"attempts": [1700.0], "last_start": 1700.0}'  # written before `total` existed
ASSIGNED = b'{"nodes": {"node-a": ["1", "2"]}}'


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    log = SqliteStateLog(tmp_path / "state" / "state.db")
    log.txn(
        [],
        [
            Put(f"{ROLLOUTS}shop/web", PAUSED),
            Put(f"{ROLLOUTS}shop/api", ROLLING_BACK),
            Put(f"{RESTARTS}shop/web/1", RESTARTED),
            Put(f"{RESTARTS}shop/web/2", RESTARTED_BEFORE_TOTAL),
            Put(f"{ASSIGNMENTS}shop/web", ASSIGNED),
        ],
    )
    yield Records(log)
    log.close()


def stored(records: Records, key: str) -> Any:
    kv = records.log.get(key)
    assert kv is not None
    return json.loads(kv.value)


def test_earlier_rollouts_load(records: Records) -> None:
    assert records.rollouts() == {
        ("shop", "web"): Rollout(
            target="v1:0123@sha256:feed",
            state="paused",
            batch=("1",),
            failed=(SlotFailure("1", "exited (exit code 1)"),),
            reason="paused: slot 1: exited (exit code 1)",
        ),
        ("shop", "api"): Rollout(
            target="v1:4567",
            state="rolling-back",
            batch=("node-a",),
            batch_done_at=1712.5,
            failed=(SlotFailure("node-a", "unhealthy"),),
            reason="rolling back: slot node-a: unhealthy",
        ),
    }


def test_earlier_restart_records_load(records: Records) -> None:
    assert records.restarts() == {
        ("shop", "web", "1"): RestartRecord((1700.0, 1710.5), 1710.5, 2),
        ("shop", "web", "2"): RestartRecord((1700.0,), 1700.0, 0),
    }


def test_earlier_assignments_load(records: Records) -> None:
    assert records.assignments() == {("shop", "web"): {"node-a": ["1", "2"]}}


def test_what_is_written_has_the_earlier_shape(records: Records) -> None:
    rollouts, restarts = records.rollouts(), records.restarts()
    records.commit_pass([], [], [], None, rollouts=rollouts, restarts=restarts)
    records.write_assignments({("shop", "web"): {"node-a": ["1", "2"]}}, set())

    assert stored(records, f"{ROLLOUTS}shop/web") == json.loads(PAUSED)
    assert stored(records, f"{ROLLOUTS}shop/api") == json.loads(ROLLING_BACK)
    assert stored(records, f"{RESTARTS}shop/web/1") == json.loads(RESTARTED)
    assert stored(records, f"{RESTARTS}shop/web/2") == {**json.loads(RESTARTED_BEFORE_TOTAL), "total": 0}
    assert stored(records, f"{ASSIGNMENTS}shop/web") == json.loads(ASSIGNED)
    # and it reads back the same
    assert (records.rollouts(), records.restarts()) == (rollouts, restarts)
