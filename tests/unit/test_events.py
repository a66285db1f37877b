"""Docker events as triggers (a table), and waiting out a container's exit with a fake engine and clock."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from agent.node.triggers import ExitWatch, Trigger, event_trigger

OWNER = "o1"


def container_event(action: str, owner: str = OWNER, stack: str = "app", cid: str = "c1") -> dict[str, Any]:
    attrs = {"dabctl.owner": owner, "dabctl.stack": stack, "name": f"{stack}_web.1.abc"}
    return {"Type": "container", "Action": action, "id": cid, "Actor": {"ID": cid, "Attributes": attrs}}


@pytest.mark.parametrize(
    ("event", "trigger"),
    [
        (container_event("die"), Trigger("app", "c1")),
        (container_event("kill"), Trigger("app", "c1")),
        (container_event("oom"), Trigger("app", "c1")),
        (container_event("stop"), Trigger("app")),
        (container_event("destroy"), Trigger("app")),
        (container_event("health_status: unhealthy"), Trigger("app")),
        (container_event("start"), None),
        (container_event("create"), None),
        (container_event("die", owner="someone-else"), None),
        ({"Type": "container", "Action": "die", "Actor": {"ID": "c2", "Attributes": {}}}, None),
        (
            {"Type": "network", "Action": "destroy", "Actor": {"Attributes": {"name": "app_default"}}},
            Trigger("app", network=True),
        ),
        ({"Type": "network", "Action": "create", "Actor": {"Attributes": {"name": "app_default"}}}, None),
        ({"Type": "image", "Action": "delete"}, None),
        (
            {
                "status": "die",
                "Type": "container",
                "id": "c3",
                "Actor": {"Attributes": {"dabctl.owner": OWNER, "dabctl.stack": "s"}},
            },
            Trigger("s", "c3"),
        ),
    ],
)
def test_event_trigger(event: dict[str, Any], trigger: Trigger | None) -> None:
    assert event_trigger(event, OWNER) == trigger


class FakeEngine:
    """Answers container states from a script, one per call; records the calls."""

    def __init__(self, states: list[str | Exception]) -> None:
        self.states = iter(states)
        self.calls: list[str] = []

    def state_of(self, container: str) -> str:
        self.calls.append(container)
        state = next(self.states)
        if isinstance(state, Exception):
            raise state
        return state


class StepClock:
    """Each reading advances by `step` seconds: a fake clock for a loop that polls."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class RecordingExecutor:
    """Records submissions and runs them only when told to."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self.shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        self.pending.append((fn, args))
        return Future()

    def run_all(self) -> None:
        pending, self.pending = self.pending, []
        for fn, args in pending:
            fn(*args)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.shut = True


@pytest.fixture
def queued() -> list[str]:
    return []


def watch_with(engine: FakeEngine, queued: list[str], step: float = 0.01, limit: float = 2.0) -> ExitWatch:
    return ExitWatch(
        engine.state_of, queued.append, poll=0.0, limit=limit, executor=RecordingExecutor(), clock=StepClock(step)
    )


@pytest.mark.parametrize(
    ("states", "looks"),
    [
        (["exited"], 1),  # the usual case: the inspect waited for the exit to be handled
        (["running", "running", "exited"], 3),  # a kill event before the process died
        (["removed"], 1),
        (["dead"], 1),
        (["created"], 1),
        ([OSError("engine gone")], 1),  # engine trouble: the pass finds out and backs off
    ],
)
def test_the_stack_is_queued_once_the_container_no_longer_runs(
    states: list[str | Exception], looks: int, queued: list[str]
) -> None:
    engine = FakeEngine(states)
    watch_with(engine, queued).await_exit("c1", "app")
    assert queued == ["app"]
    assert engine.calls == ["c1"] * looks


def test_a_container_that_keeps_running_is_given_up_on_after_the_limit(queued: list[str]) -> None:
    engine = FakeEngine(["running"] * 1000)
    watch_with(engine, queued, step=0.1, limit=2.0).await_exit("c1", "app")
    assert queued == ["app"], "the stack is still looked at"
    assert len(engine.calls) == 20, "one look per poll (the fake clock moves 0.1 s a reading) for 2 s"


def test_one_wait_per_container_at_a_time(queued: list[str]) -> None:
    engine = FakeEngine(["exited", "exited"])
    executor = RecordingExecutor()
    watch = ExitWatch(engine.state_of, queued.append, poll=0.0, executor=executor, clock=StepClock(0.01))
    watch.watch("c1", "app")  # kill
    watch.watch("c1", "app")  # its die, while the first wait is still pending
    assert len(executor.pending) == 1
    executor.run_all()
    assert queued == ["app"]
    watch.watch("c1", "app")  # a later exit of the same container (restarted since) is waited for again
    assert len(executor.pending) == 1


def test_after_close_nothing_is_watched_or_queued(queued: list[str]) -> None:
    engine = FakeEngine(["running"] * 10)
    executor = RecordingExecutor()
    watch = ExitWatch(engine.state_of, queued.append, poll=0.0, executor=executor, clock=StepClock(0.01))
    watch.watch("c1", "app")
    watch.close()
    watch.watch("c2", "app")
    assert len(executor.pending) == 1
    executor.run_all()  # a wait already running stops at its next poll
    assert queued == []
    assert engine.calls == ["c1"]
