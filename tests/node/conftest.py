"""Fixtures for fast tests of the node pass and the agent loop: the fake engine, the real SQLite state log."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.node.engine import Engine, PassPlan, PassReport
from agent.state.records import Records
from agent.state.sqlite import SqliteStateLog
from bundles import DesiredState
from bundles.load import stack_bundle
from tests.fakes import FakeRuntime

NODE = "node-1"
IMAGE = "dabctl/sample:1"
SLEEP = ["/bin/sh", "-c", "sleep 1000"]


class Clock:
    """Time as the test moves it; the engine plans and the fake stamps containers with it."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def service(**fields: Any) -> dict[str, Any]:
    """A service document: the sample image running a sleeper, plus `fields`."""
    return {"Image": IMAGE, "Command": SLEEP, **fields}


def bundle(services: dict[str, dict[str, Any]], networks: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"Version": "0.1", "Services": copy.deepcopy(services)}
    if networks is not None:
        doc["Networks"] = networks
    return doc


def desired(**stacks: dict[str, Any]) -> DesiredState:
    """Stacks from bundle documents, each at the revision of its content (as a directory source names it)."""
    out = {}
    for name, doc in stacks.items():
        raw = json.dumps(doc, indent=1).encode()
        revision = f"dir@sha256:{hashlib.sha256(raw).hexdigest()}"
        out[name] = stack_bundle(name, f"{name}.dab", raw, ".dab", revision)
    return DesiredState(stacks=out)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def runtime(clock: Clock) -> FakeRuntime:
    return FakeRuntime(clock=clock)


@pytest.fixture
def state_log(tmp_path: Path) -> Iterator[SqliteStateLog]:
    log = SqliteStateLog(tmp_path / "state.db")
    yield log
    log.close()


@pytest.fixture
def records(state_log: SqliteStateLog) -> Records:
    return Records(state_log, history_limit=3, audit_limit=5)


@pytest.fixture
def engine(runtime: FakeRuntime, records: Records, clock: Clock) -> Engine:
    return Engine(runtime, records, NODE, parallelism=4, clock=clock)


def converge(engine: Engine, state: DesiredState, **plan_args: Any) -> tuple[PassPlan, PassReport]:
    """One pass: plan and apply."""
    plan = engine.plan(state, **plan_args)
    return plan, engine.apply(plan)


def texts(plan: PassPlan) -> list[str]:
    """The plan as `dabctl plan` prints it, one line per action (container ids stripped)."""
    return [str(a) for s in plan.stacks.values() for a in s.actions]


@pytest.fixture(autouse=True)
def _no_dabctl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands these tests run in-process read DABCTL_* settings from the environment, and the test command
    exports one of its own (DABCTL_REQUIRE_GUEST, which the config refuses): each test starts without any."""
    for name in [k for k in os.environ if k.startswith("DABCTL_")]:
        monkeypatch.delenv(name)
