"""`dabctl agent` following a git repository served on loopback by dulwich's HTTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import Workspace, service
from tests.support.gitserver import GitServer, commit, force_push_reset, init_repo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SECRET = "hook-secret"


def bundle(replicas: int = 1, **fields: object) -> str:
    return json.dumps({"Services": {"web": service(replicas, **fields)}})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "repo")


@pytest.fixture
def server(repo: Path, ws: Workspace) -> Iterator[GitServer]:
    commit(repo, {"stacks/README.md": "bundles live here\n", f"stacks/{ws.stack('app')}.dab": bundle(2)}, "first")
    with GitServer(repo) as srv:
        yield srv


def start_agent(ws: Workspace, server: GitServer, poll: str) -> AgentProcess:
    return AgentProcess(
        ws.state,
        "--source",
        server.url,
        "--ref",
        "main",
        "--path",
        "stacks",
        "--poll-interval",
        poll,
        "--resync-interval",
        "0",
        env={"DABCTL_WEBHOOK_SECRET_ENV": "HOOK", "HOOK": SECRET},
    )


def revisions(ws: Workspace, stack: str) -> set[str]:
    return {c["Labels"]["dabctl.revision"] for c in ws.running(stack)}


def test_commits_converge_and_containers_carry_the_revision(ws: Workspace, server: GitServer, repo: Path) -> None:
    agent = start_agent(ws, server, "0.5")
    try:
        agent.start()
        eventually(lambda: len(ws.running("app")) == 2, agent)
        first = revisions(ws, "app")
        assert len(first) == 1 and next(iter(first)).startswith("main@sha1:")

        other = commit(repo, {f"stacks/{ws.stack('other')}.dab": bundle(1)}, "add other")
        eventually(lambda: len(ws.running("other")) == 1, agent)
        assert revisions(ws, "other") == {f"main@sha1:{other}"}
        assert revisions(ws, "app") == first, "a commit touching another stack changes nothing here"

        change = commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(2, Env=["V=2"])}, "change app")
        eventually(lambda: revisions(ws, "app") == {f"main@sha1:{change}"} and len(ws.running("app")) == 2, agent)

        commit(repo, {f"stacks/{ws.stack('other')}.dab": None}, "remove other")
        eventually(lambda: ws.containers("other") == [], agent)

        running = {c["Id"] for c in ws.running("app")}
        commit(repo, {f"stacks/{ws.stack('app')}.dab": '{"Services": {"web": {"Image": 7}}}'}, "broken")

        def failed() -> str | None:
            sync = (agent.stack(ws.stack("app")) or {}).get("sync", {})
            return sync.get("error") if sync.get("status") == "Failed" else None

        error = eventually(failed, agent)
        assert f"main:stacks/{ws.stack('app')}.dab" in error and "Services.web.Image" in error
        assert "Services.web.Image" in agent.get("/metrics").text
        assert {c["Id"] for c in ws.running("app")} == running, "the last good state keeps running"
        fixed = commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(1, Env=["V=2"])}, "fixed")
        eventually(
            lambda: (
                (agent.stack(ws.stack("app")) or {}).get("sync", {}).get("revision") == f"main@sha1:{fixed}"
                and len(ws.running("app")) == 1
            ),
            agent,
        )
    finally:
        agent.kill()


def test_server_outage_leaves_workloads_and_force_push_is_followed(
    ws: Workspace, server: GitServer, repo: Path
) -> None:
    agent = start_agent(ws, server, "0.5")
    try:
        agent.start()
        eventually(lambda: len(ws.running("app")) == 2, agent)
        good = commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(3)}, "three")
        eventually(lambda: len(ws.running("app")) == 3, agent)
        ids = {c["Id"] for c in ws.running("app")}

        server.stop()
        eventually(lambda: agent.status()["source"]["last_fetch_error"], agent)
        assert {c["Id"] for c in ws.running("app")} == ids, "workloads untouched while git is down"
        assert "dabctl_git_fetch_failures_total" in agent.get("/metrics").text
        server.start()
        eventually(lambda: agent.status()["source"]["last_fetch_error"] is None, agent)

        parent = commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(1)}, "one")
        eventually(lambda: len(ws.running("app")) == 1, agent)
        force_push_reset(repo, good)  # history rewritten: "one" is gone
        rewritten = commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(2)}, "two, after a force-push")
        assert rewritten != parent
        # Replicas keep the revision that created them; the stack's current revision is in the state (status).
        eventually(
            lambda: (
                (agent.stack(ws.stack("app")) or {}).get("sync", {}).get("revision") == f"main@sha1:{rewritten}"
                and len(ws.running("app")) == 2
            ),
            agent,
        )
    finally:
        agent.kill()


def test_webhook_signature_gates_an_immediate_fetch(ws: Workspace, server: GitServer, repo: Path) -> None:
    agent = start_agent(ws, server, "0")  # no polling: only the webhook fetches
    try:
        agent.start()
        eventually(lambda: len(ws.running("app")) == 2, agent)
        commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(3)}, "three")
        body = b'{"ref": "refs/heads/main"}'
        bad = agent.post(
            "/webhook",
            data=body,
            headers={"X-Hub-Signature-256": "sha256=" + "0" * 64, "Content-Type": "application/json"},
        )
        assert bad.status_code == 401
        assert len(ws.running("app")) == 2
        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        good = agent.post(
            "/webhook", data=body, headers={"X-Hub-Signature-256": signature, "Content-Type": "application/json"}
        )
        assert good.status_code == 202
        eventually(lambda: len(ws.running("app")) == 3, agent, timeout=20)
    finally:
        agent.kill()


def test_reconcile_once_from_a_git_url_as_a_ci_step(ws: Workspace, server: GitServer, repo: Path) -> None:
    head = commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(2, Env=["CI=1"])}, "ci")
    args = ("--source", server.url, "--ref", "main", "--path", "stacks")
    once = ws.run("reconcile", "--once", *args, check=True)
    assert "created" in once.stdout
    assert revisions(ws, "app") == {f"main@sha1:{head}"}
    assert ws.run("plan", *args, "--detailed-exitcode").returncode == 0
    broken = commit(repo, {f"stacks/{ws.stack('app')}.dab": '{"Services": {"web": {"Imag": "x"}}}'}, "typo")
    failed = ws.run("reconcile", "--once", *args)
    assert failed.returncode == 1 and "main:stacks/" in failed.stderr and "did you mean 'Image'" in failed.stderr
    assert broken and revisions(ws, "app") == {f"main@sha1:{head}"}


def test_deleting_every_bundle_is_an_empty_source_that_prunes_only_with_allow_empty(
    ws: Workspace, server: GitServer, repo: Path
) -> None:
    args = ("--source", server.url, "--ref", "main", "--path", "stacks")
    ws.run("reconcile", "--once", *args, check=True)
    assert len(ws.running("app")) == 2
    # The last files go, and with them the directory (git keeps no empty directories).
    commit(repo, {"stacks/README.md": None, f"stacks/{ws.stack('app')}.dab": None}, "every stack removed")
    refused = ws.run("reconcile", "--once", *args)
    assert refused.returncode == 1 and "--allow-empty" in refused.stderr and "does not exist" not in refused.stderr
    assert len(ws.running("app")) == 2
    ws.run("reconcile", "--once", *args, "--allow-empty", check=True)
    assert ws.running("app") == []


def test_token_from_a_file_reaches_a_protected_repository(ws: Workspace, repo: Path, tmp_path: Path) -> None:
    commit(repo, {f"stacks/{ws.stack('app')}.dab": bundle(1)}, "one")
    token = tmp_path / "token"
    token.write_text("t0ken-value\n")
    token.chmod(0o600)  # a token file others may read is refused
    with GitServer(repo, token="t0ken-value") as protected:
        args = ("--source", protected.url, "--path", "stacks")
        denied = ws.run("plan", *args)
        assert denied.returncode == 1 and "t0ken" not in denied.stderr
        ok = ws.run("reconcile", "--once", *args, "--config", str(_config(tmp_path, token)), check=True)
        assert "created" in ok.stdout and "t0ken" not in ok.stdout + ok.stderr
    assert len(ws.running("app")) == 1


def _config(tmp_path: Path, token: Path) -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"git_token_file: {token}\n")
    return cfg
