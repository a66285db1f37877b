"""The agent's use of the state log: history per stack, audit trail, etcd selected by --state, exclusivity."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state.etcd import EtcdStateLog
from agent.state.records import Records
from agent.state.sqlite import SqliteStateLog
from tests.integration.conftest import DABCTL, Workspace, service
from tests.support.dockerproxy import DockerProxy
from tests.support.etcd import EtcdServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


def test_history_keeps_applied_revisions_newest_first(ws: Workspace) -> None:
    for replicas in (1, 2, 3):
        ws.write("app", {"Services": {"s": service(replicas)}})
        ws.reconcile(check=True)
    ws.reconcile(check=True)  # converged: no new history entry
    doc = json.loads(ws.run("history", ws.stack("app"), "--output", "json", check=True).stdout)
    assert [e["outcome"]["created"] for e in doc] == [1, 1, 2]  # 3rd, 2nd, 1st apply (1st: network + container)
    assert len({e["revision"] for e in doc}) == 3
    text = ws.run("history", ws.stack("app"), check=True).stdout
    assert text.splitlines()[0].split()[:2] == ["APPLIED", "REVISION"]


def test_history_is_trimmed_to_the_limit_and_survives_prune(ws: Workspace) -> None:
    env_limit = {"DABCTL_HISTORY_LIMIT": "2"}
    for replicas in (1, 2, 3):
        ws.write("app", {"Services": {"s": service(replicas)}})
        subprocess.run(
            [DABCTL, "reconcile", "--once", "--source", str(ws.source), "--state-dir", str(ws.state)],
            env={"PATH": "/usr/bin:/bin", **env_limit},
            check=True,
            capture_output=True,
        )
    log = SqliteStateLog(ws.state / "state.db", writer=False)
    try:
        records = Records(log)
        assert len(records.history(ws.stack("app"))) == 2
        audit = records.audit()
        assert len(audit) == 3 and all(entry.actions for entry in audit)
        assert any(a.action.startswith("+ network") for a in audit[-1].actions)
    finally:
        log.close()


def test_a_second_writer_is_refused_naming_the_holder(ws: Workspace) -> None:
    ws.write("app", {"Services": {"s": service()}})
    holder = SqliteStateLog(ws.state / "state.db", writer=True)
    try:
        refused = ws.reconcile()
        assert refused.returncode == 1
        assert "held for writing by" in refused.stderr and '"pid"' in refused.stderr
        assert ws.containers("app") == []
        # Readers are never blocked.
        assert ws.plan().returncode == 0
    finally:
        holder.close()
    ws.reconcile(check=True)


def test_reconcile_on_etcd_converges_and_a_second_pass_writes_nothing(ws: Workspace, etcd: EtcdServer) -> None:
    state = f"etcd://{etcd.url.removeprefix('http://')}"
    ws.write("app", {"Services": {"s": service(2)}})
    ws.run("reconcile", "--once", "--source", str(ws.source), "--state", state, check=True)
    assert len(ws.running("app")) == 2
    log = EtcdStateLog([etcd.url])
    try:
        revision = log.revision()
        assert log.get("/meta/owner") is not None
        with DockerProxy() as proxy:
            second = ws.run(
                "reconcile", "--once", "--source", str(ws.source), "--state", state, docker_host=proxy.url, check=True
            )
            assert proxy.mutating() == []
        assert "nothing to do" in second.stdout
        assert log.revision() == revision
    finally:
        log.close()
    plan = ws.run("plan", "--source", str(ws.source), "--state", state, "--detailed-exitcode")
    assert plan.returncode == 0
    # To the embedded state these objects are another owner's: it plans nothing on them.
    assert "is not managed by this dabctl state" in ws.plan().stdout


def test_unreachable_etcd_is_one_clear_error(ws: Workspace) -> None:
    ws.write("app", {"Services": {"s": service()}})
    result = ws.run("plan", "--source", str(ws.source), "--state", "etcd://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no etcd endpoint answers") and "Traceback" not in result.stderr
