"""The control path's choice of where a command runs, with real lock files, a real SQLite state and a real
control socket standing in for the agent's: an agent that takes the state after the CLI looked is still found, for
every changing command (rollback had no such fallback)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.api.client import AGENT_SOCKET, AgentRefused, running_agent
from agent.api.server import AgentHttp
from agent.metrics import Metrics
from agent.node.control import AgentControl, open_control
from agent.state.holder import AGENT_LOCK, Held, HolderLock
from agent.state.sqlite import SqliteStateLog
from schemas.config import AgentConfig
from schemas.control import ReconcileRequest, RollbackRequest, SuspendRequest
from schemas.output import StatusOutput

pytestmark = pytest.mark.timeout(30)


class FakeAgentApi:
    """The agent's side of the control calls: records each call and answers what a real agent would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.calls.append((name, body))
        if name in ("suspend", "resume"):
            return 200, {"stack": body["stack"], "suspended": name == "suspend", "changed": True}
        if name == "rollback":
            return 200, {"message": f"{body['stack']}: pinned to main@sha1:abc", "passes": {"ok": True, "stacks": 1}}
        if name == "reconcile":
            return 409, {"error": "the agent on this state follows /a, not /b"}
        return 404, {"error": "no such call"}


@pytest.fixture
def agent_api(cfg: AgentConfig) -> Iterator[tuple[AgentHttp, FakeAgentApi]]:
    api = FakeAgentApi()
    http = AgentHttp(
        status=lambda: StatusOutput(node="n1", ready=True, stacks=[]),
        ready=lambda: True,
        metrics=Metrics(),
        on_webhook=lambda: None,
        webhook=None,
        api={name: functools.partial(api, name) for name in ("reconcile", "rollback", "suspend", "resume")},
    )
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    http.add_unix(cfg.state_path / AGENT_SOCKET)
    http.start()
    try:
        yield http, api
    finally:
        http.stop()


@pytest.fixture
def cfg(tmp_path: Path) -> AgentConfig:
    source = tmp_path / "stacks"
    source.mkdir()
    return AgentConfig(state_dir=str(tmp_path / "state"), source=str(source), docker_host="unix:///nonexistent.sock")


def agent_takes_the_state(cfg: AgentConfig, http: AgentHttp) -> Callable[[], None]:
    """Hold the agent lock and the embedded state's write lock, as a starting agent does."""
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    lock = HolderLock(cfg.state_path / AGENT_LOCK, {"socket": str(cfg.state_path / AGENT_SOCKET)})
    lock.acquire()
    log = SqliteStateLog(cfg.state_path / "state.db", writer=True)

    def release() -> None:
        log.close()
        lock.release()

    return release


@pytest.mark.parametrize(
    ("call", "expected_call"),
    [
        (lambda c: c.suspend(SuspendRequest(stack="shop", suspended=True)), "suspend"),
        (lambda c: c.suspend(SuspendRequest(stack="shop", suspended=False)), "resume"),
        (lambda c: c.rollback(RollbackRequest(stack="shop")), "rollback"),
    ],
)
def test_a_command_falls_back_to_an_agent_that_took_the_state_after_the_cli_looked(
    cfg: AgentConfig, agent_api: tuple[AgentHttp, FakeAgentApi], call: Callable[[Any], Any], expected_call: str
) -> None:
    http, api = agent_api
    control = open_control(cfg)
    assert not isinstance(control, AgentControl), "no agent yet: the command would run here"
    release = agent_takes_the_state(cfg, http)
    try:
        call(control)
    finally:
        release()
    assert [name for name, _ in api.calls] == [expected_call]
    assert api.calls[0][1]["stack"] == "shop"


def test_the_agent_is_found_through_the_state_directory_whatever_the_backend(
    cfg: AgentConfig, agent_api: tuple[AgentHttp, FakeAgentApi]
) -> None:
    http, _ = agent_api
    on_etcd = cfg.model_copy(update={"state": "etcd://127.0.0.1:9"})  # nothing listens there: never contacted
    assert running_agent(on_etcd) is None
    release = agent_takes_the_state(cfg, http)
    try:
        assert running_agent(on_etcd) == cfg.state_path / AGENT_SOCKET
        assert isinstance(open_control(on_etcd), AgentControl)
    finally:
        release()
    assert running_agent(on_etcd) is None, "the lock goes with its holder"


def test_a_second_agent_lock_names_the_first_holder(tmp_path: Path) -> None:
    first = HolderLock(tmp_path / AGENT_LOCK, {"api": "http://127.0.0.1:1"})
    first.acquire()
    try:
        with pytest.raises(Held, match=r'"api": "http://127.0.0.1:1"'):
            HolderLock(tmp_path / AGENT_LOCK).acquire()
        first.describe(api="http://127.0.0.1:2")
        assert HolderLock.holder_of(tmp_path / AGENT_LOCK)["api"] == "http://127.0.0.1:2"  # type: ignore[index]
    finally:
        first.release()
    assert HolderLock.holder_of(tmp_path / AGENT_LOCK) is None


def test_an_agent_refusal_is_an_error_with_its_reason(
    cfg: AgentConfig, agent_api: tuple[AgentHttp, FakeAgentApi]
) -> None:
    with pytest.raises(AgentRefused, match="follows /a, not /b"):
        AgentControl(cfg.state_path / AGENT_SOCKET).reconcile(ReconcileRequest())


@pytest.mark.parametrize("stack", ["", "UPPER", "a_b", "x" * 64, "x" * (1 << 20)])
def test_control_requests_refuse_names_that_are_not_stack_names(stack: str) -> None:
    with pytest.raises(ValidationError):
        SuspendRequest(stack=stack, suspended=True)
    with pytest.raises(ValidationError):
        RollbackRequest(stack=stack)
