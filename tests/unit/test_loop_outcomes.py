"""The one place that decides what a pass's outcome means (agent.node.loop.Agent.run_pass), with an engine
stand-in: an error is retried by its type (retryable with backoff, terminal not at all, a bug left to the
worker), and a note fails its stack by its kind, never by its text."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from agent.drivers.docker_engine import EngineError
from agent.metrics import Metrics
from agent.node.engine import EmptySourceRefused, PassPlan, PassReport, StackPlan
from agent.node.loop import Agent
from agent.node.workqueue import WorkQueue
from agent.notify.dispatch import Notifier
from agent.state.log import StateLocked, Unavailable
from bundles import DesiredState
from bundles.errors import BundleError, InvalidBundles
from reconcilers.notes import Note, NoteKind
from schemas.config import AgentConfig


class StandInEngine:
    """What run_pass needs of an engine: planning raises `exc`, or returns `plan`; applying does nothing."""

    def __init__(self, exc: BaseException | None = None, plan: PassPlan | None = None) -> None:
        self.exc = exc
        self.planned = plan
        self.owner = "test"

    def plan(self, *args: object, **kwargs: object) -> PassPlan:
        if self.exc is not None:
            raise self.exc
        assert self.planned is not None
        return self.planned

    def apply(self, plan: PassPlan, **kwargs: object) -> PassReport:
        return PassReport("r1", [], plan.errors)


def agent_with(engine: StandInEngine, clock: list[float]) -> Agent:
    """An agent around `engine`, without sources, HTTP or Docker."""
    shell = Agent.__new__(Agent)
    shell.cfg = AgentConfig()
    shell.queue = WorkQueue(clock=lambda: clock[0])
    shell.metrics = Metrics()
    shell.desired = DesiredState(stacks={})
    shell.pass_errors = {}
    shell.load_errors = {}
    shell.stop = threading.Event()
    shell.ready = threading.Event()
    shell._pass_lock = threading.Lock()
    shell._source_changed = set()
    shell._held = ()
    shell.engine = engine  # type: ignore[assignment]
    shell.docker = SimpleNamespace(url="unix:///run/docker.sock")  # type: ignore[assignment]
    shell.page = SimpleNamespace(pass_ended=lambda plan: 0)  # type: ignore[assignment]
    shell.http = SimpleNamespace(changed=lambda: None)  # type: ignore[assignment]
    shell.notifier = Notifier([])
    return shell


def failures(a: Agent) -> float:
    value: float = a.metrics.passes.labels(result="failure")._value.get()
    return value


# --- errors ------------------------------------------------------------------------------------------------------

RAISED = {
    "engine-unreachable": (EngineError("no Docker engine answers at unix:///run/docker.sock"), True),
    "state-log-unavailable": (Unavailable("no etcd endpoint answers"), True),
    "socket-lost": (ConnectionResetError(104, "Connection reset by peer"), True),
    "empty-source-refused": (EmptySourceRefused("the source has no stacks; pass --allow-empty"), False),
    "state-locked": (StateLocked("another dabctl holds the state"), False),
    "invalid-bundle": (InvalidBundles([BundleError("shop.dab", "bad")]), False),
}


@pytest.mark.parametrize(("exc", "retried"), list(RAISED.values()), ids=list(RAISED))
def test_a_pass_error_is_retried_by_its_type(exc: BaseException, retried: bool) -> None:
    clock = [100.0]
    a = agent_with(StandInEngine(exc), clock)

    assert a.run_pass({"shop", "blog"}) is None

    assert set(a.pass_errors) == {"shop", "blog"}
    assert failures(a) == 1
    if retried:
        assert a.queue.pending() == {"shop": 1.0, "blog": 1.0}  # the first backoff step
        clock[0] += 1.0
        assert a.queue.next_batch(timeout=0) == {"shop", "blog"}
    else:
        assert a.queue.pending() == {}  # nothing spins: a commit or the resync queues the stacks again


def test_a_retryable_error_backs_off_further_each_time() -> None:
    clock = [100.0]
    a = agent_with(StandInEngine(EngineError("no Docker engine answers")), clock)
    delays = []
    for _ in range(4):
        a.run_pass({"shop"})
        delays.append(a.queue.pending()["shop"])
        clock[0] += delays[-1]
        a.queue.next_batch(timeout=0)
    assert delays == [1.0, 2.0, 4.0, 8.0]


def test_an_unexpected_error_is_left_to_the_worker() -> None:
    """A bug is no DabctlError: it leaves run_pass; the worker logs it and retries with backoff."""
    a = agent_with(StandInEngine(KeyError("bug")), [100.0])
    with pytest.raises(KeyError):
        a.run_pass({"shop"})


# --- notes -------------------------------------------------------------------------------------------------------


def plan_with(*notes: Note) -> PassPlan:
    stack = StackPlan("shop", "dir@sha256:1", notes=list(notes))
    return PassPlan(
        desired=DesiredState(stacks={}),
        stacks={"shop": stack},
        assignments={},
        assignments_changed={},
        assignments_removed=set(),
        records={},
    )


# Service and slot names are free text: "failed-jobs", a node named "paused-1". Only the kind may decide.
NOTES = {
    "rollout-paused": (Note("web", NoteKind.ROLLOUT_PAUSED, "paused: slot 1: exited (exit code 1)"), True),
    "restart-given-up": (Note("web", NoteKind.RESTART_GIVEN_UP, "slot 2 failed: exited (1) after 3 restarts"), True),
    "image-check-failed": (Note("web", NoteKind.IMAGE_CHECK_FAILED, "image check failed: registry down"), True),
    "rolling-back": (Note("failed-jobs", NoteKind.ROLLING_BACK, "rolling back: slot paused-1: unhealthy"), False),
}


@pytest.mark.parametrize(("note", "failing"), list(NOTES.values()), ids=list(NOTES))
def test_a_note_fails_its_stack_by_kind(note: Note, failing: bool) -> None:
    clock = [100.0]
    a = agent_with(StandInEngine(plan=plan_with(note)), clock)

    assert a.run_pass({"shop"}) is not None

    if failing:
        assert a.pass_errors == {"shop": str(note)}
        assert a.queue.pending() == {"shop": 1.0}
        assert failures(a) == 1
    else:
        assert a.pass_errors == {}
        assert a.queue.pending() == {}
        assert a.ready.is_set()
