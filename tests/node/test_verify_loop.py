"""A revision refused by the signature checks, through the agent loop (fake engine, real SQLite, a real signed
git repository) and the CLI: nothing applied, what runs keeps running, and status, metrics, the log and
`reconcile --once` name the commit, the key (or its absence) and the rule in the same line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.node.loop import Agent
from schemas.config import AgentConfig
from schemas.control import ReconcileRequest
from tests.fakes import FakeRuntime
from tests.node.conftest import NODE, bundle, service
from tests.support.signing import Keys, Signer, git_commit

pytestmark = pytest.mark.timeout(60)


def doc(replicas: int) -> str:
    return json.dumps(bundle({"front": service(Deploy={"Replicas": replicas})}))


@pytest.fixture(scope="module")
def bob() -> Iterator[Signer]:
    with Keys() as keys:
        yield keys.ssh("bob")


@pytest.fixture
def repo(tmp_path: Path, bob: Signer) -> Path:
    repo = tmp_path / "repo"
    git_commit(repo, {"stacks/web.dab": doc(2)}, "web", bob)
    return repo


def settings(tmp_path: Path, repo: Path, bob: Signer) -> dict[str, Any]:
    return {
        "source": str(repo),
        "ref": "main",
        "path": "stacks",
        "state_dir": str(tmp_path / "state"),
        "node_name": NODE,
        "listen": "127.0.0.1:0",
        "loadbalancer": "none",
        "poll_interval": 0.0,
        "resync_interval": 0.0,
        "verify": {"mode": "every-commit", "keys": [str(bob.public)]},
    }


@pytest.fixture
def agent(tmp_path: Path, repo: Path, bob: Signer) -> Iterator[Agent]:
    agent = Agent(AgentConfig(**settings(tmp_path, repo, bob)), runtime=FakeRuntime())
    yield agent
    agent.shutdown()
    agent._close()


def running(agent: Agent) -> list[str]:
    assert isinstance(agent.docker, FakeRuntime)
    return sorted(c.name.rsplit(".", 1)[0] for c in agent.docker.by_name("web_") if c.state == "running")


def converge(agent: Agent) -> None:
    keys = agent.queue.next_batch(timeout=0)
    if keys:
        agent.run_pass(keys)


def test_a_refused_revision_is_not_applied_and_status_metrics_and_log_say_why(
    agent: Agent, repo: Path, bob: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    agent.refresh_source()
    converge(agent)
    signed_head = agent.fingerprint
    assert running(agent) == ["web_front.1", "web_front.2"]
    verify = agent.status().source.verify  # type: ignore[union-attr]
    assert verify is not None and verify.accepted == signed_head and verify.refused is None

    unsigned = git_commit(repo, {"stacks/web.dab": doc(1)}, "scale down, unsigned")
    with caplog.at_level(logging.ERROR, logger="dabctl.agent"):
        assert agent.refresh_source()
    assert agent.queue.pending() == {}, "nothing queued: the refused revision is not the desired state"
    converge(agent)
    assert running(agent) == ["web_front.1", "web_front.2"]

    refused = agent.status().source.verify.refused  # type: ignore[union-attr]
    assert refused is not None and refused.commit == unsigned
    assert refused.key == "no signature (on the commit or on a tag pointing at it)"
    assert refused.rule == "verify.mode every-commit needs 1 allowed key"
    assert [r.getMessage() for r in caplog.records] == ["source revision refused: not applied; what runs keeps running"]
    sample = agent.metrics.registry.get_sample_value
    assert sample("dabctl_source_verification_refusals_total") == 1
    assert sample("dabctl_source_verification_refused", {"commit": unsigned, "key": refused.key, "rule": refused.rule})
    result = agent.reconcile(ReconcileRequest())
    assert not result.ok and refused.message in result.errors
    assert sample("dabctl_source_verification_refusals_total") == 1, "one refusal, counted once"

    # A signed commit on top does not launder the unsigned one; fixing the history does.
    git_commit(repo, {"stacks/web.dab": doc(1)}, "again, signed", bob)
    agent.refresh_source()
    assert agent.status().source.verify.refused.commit == unsigned  # type: ignore[union-attr]


def test_refused_at_the_first_load_no_pass_runs(tmp_path: Path, repo: Path, bob: Signer) -> None:
    unsigned = git_commit(repo, {"stacks/web.dab": doc(1)}, "unsigned head")
    agent = Agent(AgentConfig(**settings(tmp_path, repo, bob)), runtime=FakeRuntime())
    try:
        assert agent.run_pass({"web"}) is None
        assert running(agent) == []
        result = agent.reconcile(ReconcileRequest())
        assert not result.ok and any(unsigned[:12] in e for e in result.errors)
    finally:
        agent.shutdown()
        agent._close()


def test_reconcile_once_exits_1_with_the_same_line(tmp_path: Path, repo: Path, bob: Signer) -> None:
    unsigned = git_commit(repo, {"stacks/web.dab": doc(1)}, "unsigned head")
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps(settings(tmp_path, repo, bob)))
    dabctl = Path(sys.executable).parent / "dabctl"
    done = subprocess.run([dabctl, "reconcile", "--once", "--config", config], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: commit {unsigned[:12]} on main refused by signature checks: no signature (on the commit or on a tag "
        "pointing at it); rule: verify.mode every-commit needs 1 allowed key; not applied: sign it (a signed "
        "annotated tag on it counts too) with keys in verify.keys"
    ]
