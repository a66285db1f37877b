"""The agent loop on the fake engine, the real SQLite state log and a real directory source: passes, the work
queue's retries and backoff, source refresh, the CLI's API calls, status, and `run()` end to end."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.node.loop import Agent
from agent.state.records import INTENT_KEY, NODES, STACKS, node_status_key
from reconcilers.loadbalancer import LoadBalancerReconciler
from schemas.config import AgentConfig
from schemas.state import NodeSpec, NodeStatus, PassOutcome, StackRecord
from tests.fakes import FakeRuleset, FakeRuntime, unreachable
from tests.node.conftest import NODE, bundle, service

WEB = bundle({"front": service(Deploy={"Replicas": 2})})


def write(source: Path, stack: str, doc: dict[str, Any] | str) -> None:
    (source / f"{stack}.dab").write_text(doc if isinstance(doc, str) else json.dumps(doc))


def names(runtime: FakeRuntime, prefix: str) -> list[str]:
    return sorted(c.name.rsplit(".", 1)[0] for c in runtime.by_name(prefix) if c.state == "running")


def metric(agent: Agent, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    write(src, "web", WEB)
    return src


def config(tmp_path: Path, source: Path, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "source": str(source),
        "state_dir": str(tmp_path / "state"),
        "node_name": NODE,
        "listen": "127.0.0.1:0",  # ephemeral: tests never hold a fixed port
        "loadbalancer": "none",
        "poll_interval": 0.0,
        "resync_interval": 0.0,
        **overrides,
    }
    return AgentConfig(**settings)


@pytest.fixture
def make_agent(tmp_path: Path, source: Path) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(runtime: FakeRuntime, **overrides: Any) -> Agent:
        agent = Agent(config(tmp_path, source, **overrides), runtime=runtime)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.shutdown()
        agent._close()


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    return make_agent(FakeRuntime())


def runtime_of(agent: Agent) -> FakeRuntime:
    assert isinstance(agent.docker, FakeRuntime)
    return agent.docker


def drain(agent: Agent) -> set[str]:
    """Run one pass over every key that is ready now; the keys."""
    keys = agent.queue.next_batch(timeout=0)
    if keys:
        agent.run_pass(keys)
    return keys


# --- passes ---------------------------------------------------------------------------------------------------


def test_a_source_change_queues_its_stacks_and_a_pass_converges_them(agent: Agent) -> None:
    runtime = runtime_of(agent)
    assert agent.refresh_source()
    assert agent.queue.pending() == {"web": 0.0}
    assert drain(agent) == {"web"}
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"]
    assert agent.ready.is_set() and agent.pass_errors == {}
    assert metric(agent, "dabctl_reconcile_passes_total", result="success") == 1

    (status,) = agent.status().stacks
    assert (status.stack, status.sync.status, status.health.status) == ("web", "Synced", "Healthy")
    assert status.sync.revision == agent.desired.stacks["web"].revision  # type: ignore[union-attr]

    assert agent.refresh_source(), "an unchanged source is not loaded again"
    assert agent.queue.pending() == {}


def test_a_container_that_stops_is_corrected_and_counted_as_drift(agent: Agent) -> None:
    runtime = runtime_of(agent)
    agent.refresh_source()
    drain(agent)
    runtime.exit("web_front.1", 137)
    agent.queue.add(["web"])
    drain(agent)
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"]
    assert metric(agent, "dabctl_drift_corrections_total", stack="web") == 1


def test_a_broken_bundle_keeps_the_last_good_state_running(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    agent.refresh_source()
    drain(agent)
    good = agent.desired
    write(source, "web", '{"Version": "0.1", "Services": {"front": {"Imag": "x"}}}')

    assert agent.refresh_source()
    assert agent.desired is good and set(agent.load_errors) == {"web"}
    assert "Imag" in agent.load_errors["web"]
    (status,) = agent.status().stacks
    assert status.sync.status == "Failed" and "Imag" in str(status.sync.error)
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"]

    write(source, "web", bundle({"front": service(Deploy={"Replicas": 1})}))
    agent.refresh_source()
    assert agent.load_errors == {} and agent.queue.pending() == {"web": 0.0}
    drain(agent)
    assert names(runtime, "web_") == ["web_front.1"]


def test_an_unreachable_engine_fails_the_pass_and_retries_with_doubling_backoff(agent: Agent) -> None:
    runtime = runtime_of(agent)
    agent.refresh_source()
    agent.queue.next_batch(timeout=0)
    with unreachable(runtime):
        assert agent.run_pass({"web"}) is None
        assert agent.pass_errors["web"].startswith("no Docker engine answers at fake:///engine")
        assert agent.queue.pending()["web"] == pytest.approx(1.0, abs=0.1)
        agent.run_pass({"web"})
        assert agent.queue.pending()["web"] == pytest.approx(2.0, abs=0.1)
    assert agent.status().stacks[0].sync.status == "Failed"
    assert metric(agent, "dabctl_reconcile_passes_total", result="failure") == 2
    assert not agent.ready.is_set()

    agent.run_pass({"web"})
    assert agent.pass_errors == {} and agent.ready.is_set()
    assert agent.queue.failures("web") == 0, "success starts the backoff over"


def test_an_engine_error_in_apply_requeues_only_the_failing_stack(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    write(source, "bad", bundle({"srv": service(Image="dabctl/absent:1", PullPolicy="never")}))
    agent.refresh_source()
    assert drain(agent) == {"bad", "web"}
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"]
    assert "PullPolicy is never" in agent.pass_errors["bad"]
    assert set(agent.queue.pending()) == {"bad"}, "the good stack is done, the failing one waits its backoff"
    statuses = {s.stack: s.sync.status for s in agent.status().stacks}
    assert statuses == {"bad": "Failed", "web": "Synced"}


def test_a_ruleset_that_cannot_be_read_fails_the_stacks_that_publish_and_says_why(agent: Agent, source: Path) -> None:
    # Their ports stay as they are; the status and the log say so, rather than Synced with nothing published.
    rules = FakeRuleset()
    rules.unavailable = "a table ip dabctl exists that dabctl did not write (it records no owner)"
    agent.engine.balancer = LoadBalancerReconciler(rules)
    agent.engine.listening = set
    write(source, "pub", bundle({"srv": service(Ports=[{"Port": 8080, "PublishedPort": 30080}])}))
    agent.refresh_source()
    assert drain(agent) == {"pub", "web"}
    assert agent.pass_errors == {"pub": f"published ports: {rules.unavailable}"}
    statuses = {s.stack: s.sync.status for s in agent.status().stacks}
    assert statuses == {"pub": "Failed", "web": "Synced"}


def test_a_waiting_rollout_requeues_the_stack_for_its_recheck(agent: Agent, source: Path) -> None:
    agent.refresh_source()
    drain(agent)
    write(source, "web", bundle({"front": service(Env=["V=2"], Deploy={"Replicas": 2})}))
    agent.refresh_source()
    drain(agent)
    wait = agent.queue.pending()["web"]
    assert 0 < wait <= 5, "the next batch is looked at after the monitor period"


def test_an_unreadable_source_leaves_workloads_alone_and_is_reported(agent: Agent, source: Path) -> None:
    class Unreachable:
        kind, location, ref, path = "git", "https://git.example/ops.git", "main", ""

        def fingerprint(self) -> str:
            raise OSError("Could not resolve host: git.example")

        def load(self) -> Any:
            raise AssertionError("not reached")

        def close(self) -> None:
            pass

    agent.source = Unreachable()
    assert not agent.refresh_source()
    assert agent.source_error == "Could not resolve host: git.example"
    assert metric(agent, "dabctl_git_fetch_failures_total") == 1
    assert agent.run_pass({"web"}) is None, "no desired state yet: nothing to converge"
    assert agent.status().source.last_fetch_error == "Could not resolve host: git.example"


def test_an_empty_source_is_refused_while_stacks_are_deployed(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    agent.refresh_source()
    drain(agent)
    (source / "web.dab").unlink()
    agent.refresh_source()
    drain(agent)
    assert "--allow-empty" in agent.pass_errors["web"]
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"]


# --- the CLI's API ---------------------------------------------------------------------------------------------


def test_reconcile_through_the_api_reports_what_it_did(agent: Agent) -> None:
    code, body = agent.api("reconcile", {})
    assert code == 200 and body["ok"] and (body["created"], body["failed"]) == (3, 0)  # a network, 2 replicas
    code, body = agent.api("reconcile", {})
    assert body["ok"] and body["created"] == 0


def test_reconcile_through_the_api_with_the_engine_down(agent: Agent) -> None:
    with unreachable(runtime_of(agent)):
        code, body = agent.api("reconcile", {})
    assert code == 200 and not body["ok"]
    assert body["errors"][0].startswith("web: no Docker engine answers")


def test_rollback_and_unpin_through_the_api(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    # The rollback's rolling update runs to its end in the call: a short monitor keeps that quick.
    quick = {"Parallelism": 2, "Monitor": "50ms"}
    fast = {"Replicas": 2, "UpdateConfig": quick, "RollbackConfig": quick}
    write(source, "web", bundle({"front": service(Deploy=fast)}))
    agent.api("reconcile", {})
    first = agent.records.stacks()["web"].revision
    write(source, "web", bundle({"front": service(Env=["V=2"], Deploy=fast)}))
    agent.api("reconcile", {})

    code, body = agent.api("rollback", {"stack": "web"})
    assert code == 200 and body["message"] == f"web: pinned to {first}"
    assert body["passes"]["ok"] and body["passes"]["errors"] == [] and body["passes"]["updated"] == 2
    assert agent.records.stacks()["web"].revision == first
    assert agent.status().stacks[0].pinned == first
    assert {c.labels["dabctl.revision"] for c in runtime.by_name("web_front.1")} == {first}

    code, body = agent.api("rollback", {"stack": "web", "unpin": True})
    assert body["message"] == "web: unpinned: following the source"
    code, body = agent.api("rollback", {"stack": "web", "unpin": True})
    assert body["message"] == "web: was not pinned"


def test_rollback_without_history_is_one_clear_error(agent: Agent, source: Path) -> None:
    write(source, "fresh", WEB)
    agent.refresh_source()
    code, body = agent.api("rollback", {"stack": "fresh"})
    assert (code, body) == (409, {"error": "no recorded revisions of stack 'fresh'; `dabctl history fresh` lists them"})


@pytest.mark.parametrize("call", ["suspend", "resume", "rollback"])
def test_calls_naming_an_unknown_stack_are_refused_and_write_nothing(agent: Agent, call: str) -> None:
    code, body = agent.api(call, {"stack": "nope"})
    assert (code, body) == (
        404,
        {"error": "no stack named 'nope' on this node: it is neither in the source nor deployed"},
    )
    assert agent.records.suspended() == set() and "nope" not in agent.records.pins()


def test_suspend_and_resume_through_the_api(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    agent.api("reconcile", {})
    assert agent.api("suspend", {"stack": "web"}) == (200, {"stack": "web", "suspended": True, "changed": True})
    assert agent.api("suspend", {"stack": "web"}) == (200, {"stack": "web", "suspended": True, "changed": False})
    write(source, "web", bundle({"front": service(Deploy={"Replicas": 1})}))
    agent.api("reconcile", {})
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"], "a suspended stack is left as it is"
    assert agent.status().stacks[0].suspended

    assert agent.api("resume", {"stack": "web"}) == (200, {"stack": "web", "suspended": False, "changed": True})
    assert "web" in agent.queue.pending()
    drain(agent)
    assert names(runtime, "web_") == ["web_front.1"]


def test_api_calls_that_cannot_be_served(agent: Agent) -> None:
    assert agent.api("suspend", {}) == (400, {"error": "suspend: stack: Field required"})
    code, body = agent.api("suspend", {"stack": "x" * (1 << 20)})
    assert code == 400 and body["error"].startswith("suspend: stack: String should match pattern")
    code, body = agent.api("reconcile", {"source": {"location": "/elsewhere"}})
    assert code == 409 and "follows" in body["error"] and "/elsewhere" in body["error"]
    assert agent.api("explode", {}) == (404, {"error": "no such API call 'explode'"})


# --- run(): the whole loop ------------------------------------------------------------------------------------


@pytest.fixture
def signals() -> Iterator[None]:
    """run() installs SIGTERM/SIGINT handlers: put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def run_driven(agent: Agent, drive: Callable[[], None]) -> None:
    """`agent.run()` in this thread while `drive` acts on it from another; the agent is shut down when `drive`
    ends, and whatever `drive` raised is raised here."""
    failure: list[BaseException] = []

    def driver() -> None:
        try:
            drive()
        except BaseException as exc:
            failure.append(exc)
        finally:
            agent.shutdown()

    thread = threading.Thread(target=driver, daemon=True)
    thread.start()
    assert agent.run() == 0
    thread.join(timeout=10)
    if failure:
        raise failure[0]


def passes(agent: Agent) -> float:
    return sum(metric(agent, "dabctl_reconcile_passes_total", result=r) for r in ("noop", "success", "failure"))


def test_run_converges_follows_events_and_file_changes_and_serves_http(
    make_agent: Callable[..., Agent], source: Path, signals: None
) -> None:
    runtime = FakeRuntime()  # real time: the agent asks for events since now
    agent = make_agent(runtime, resync_interval=0.2)
    seen: dict[str, Any] = {}

    def drive() -> None:
        until(lambda: len(names(runtime, "web_")) == 2)
        # An exit event: the loop waits for the engine to list the container as exited, then restarts it.
        old = runtime.by_name("web_front.1")[0]
        runtime.exit(old.id, 1)
        until(lambda: runtime.by_name("web_front.1")[0].state == "running")
        # A new file in the source directory: watchdog wakes the poller, the new stack converges.
        write(source, "api", bundle({"srv": service()}))
        until(lambda: names(runtime, "api_") == ["api_srv.1"])
        host, port = agent.listener.address
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as reply:
            seen["status"] = json.load(reply)
        until(lambda: metric(agent, "dabctl_reconcile_passes_total", result="noop") > 0)  # the resync ran

    run_driven(agent, drive)
    assert sorted(s["stack"] for s in seen["status"]["stacks"]) == ["api", "web"]
    assert metric(agent, "dabctl_drift_corrections_total", stack="web") >= 1
    assert runtime.closed and names(runtime, "") == ["api_srv.1", "web_front.1", "web_front.2"], (
        "stopping the agent stops no workload"
    )


def test_a_pass_that_crashes_is_logged_and_retried(
    make_agent: Callable[..., Agent], signals: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(FakeRuntime())
    calls: list[set[str]] = []

    def crash(keys: Any) -> None:
        calls.append(set(keys))
        agent.shutdown()
        raise RuntimeError("bug")

    monkeypatch.setattr(agent, "run_pass", crash)
    agent.refresh_source()
    assert agent.run() == 0
    assert calls == [{"web"}]
    assert agent.queue.failures("web") == 1, "the crashed keys are retried with backoff"


# --- the control path: the same meaning of wait, timeout and allow-empty as locally ------------------------------

HEALTH = {"Test": ["CMD", "true"], "Interval": "1s", "Retries": 1}


def test_reconcile_with_wait_returns_once_every_replica_is_healthy(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    write(source, "web", bundle({"front": service(Healthcheck=HEALTH, Deploy={"Replicas": 2})}))
    timer = threading.Timer(0.5, lambda: [runtime.set_health(c.name, "healthy") for c in runtime.by_name("web_")])
    timer.start()
    try:
        code, body = agent.api("reconcile", {"wait": True, "timeout": 20})
    finally:
        timer.cancel()
    assert code == 200 and body["ok"], body
    assert all(c.health == "healthy" for c in runtime.by_name("web_front.")), "returned before healthy"


def test_reconcile_with_wait_times_out_naming_the_services(agent: Agent, source: Path) -> None:
    write(source, "web", bundle({"front": service(Healthcheck=HEALTH, Deploy={"Replicas": 2})}))
    started = time.monotonic()
    code, body = agent.api("reconcile", {"wait": True, "timeout": 1})
    assert code == 200 and not body["ok"]
    assert body["errors"] == ["timed out waiting for web_front (0/2 progressing)"], body["errors"]
    assert time.monotonic() - started < 5


def test_reconcile_allow_empty_is_per_call(agent: Agent, source: Path) -> None:
    runtime = runtime_of(agent)
    assert agent.api("reconcile", {})[1]["ok"]
    (source / "web.dab").unlink()
    code, body = agent.api("reconcile", {})
    assert code == 200 and not body["ok"] and "--allow-empty" in body["errors"][0]
    assert names(runtime, "web_") == ["web_front.1", "web_front.2"], "nothing removed without allow_empty"
    code, body = agent.api("reconcile", {"allow_empty": True})
    assert code == 200 and body["ok"] and body["removed"] == 3  # two replicas and the stack network
    assert names(runtime, "web_") == []


def test_an_upgrade_that_refuses_bundles_names_each_one_and_its_rule(
    make_agent: Callable[..., Agent], source: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Bundles the old defaults let through: the first pass says which ones the new defaults refuse and why.
    write(source, "ops", bundle({"agent": service(Mounts=[{"Type": "bind", "Source": "/srv/x", "Target": "/x"}])}))
    write(source, "big", bundle({"s": service(Deploy={"Replicas": 3})}))
    agent = make_agent(FakeRuntime(), max_replicas_per_service=2)
    with caplog.at_level("ERROR", logger="dabctl.agent"):
        assert agent.refresh_source()
    [record] = [r for r in caplog.records if "invalid bundles" in r.getMessage()]
    assert record.bundles == "big, ops"  # type: ignore[attr-defined]
    assert "policy rule 'no-bind-mounts'" in record.errors  # type: ignore[attr-defined]
    assert "policy rule 'max_replicas_per_service'" in record.errors  # type: ignore[attr-defined]
    assert set(agent.load_errors) == {"ops", "big"}
    assert runtime_of(agent).writes() == []


def _record(stack: str) -> StackRecord:
    content = json.dumps(bundle({"srv": service()}))
    now = datetime.now(UTC)
    outcome = PassOutcome(reconcile_id="r", at=now)
    return StackRecord(
        stack=stack,
        revision="r1",
        file=f"{stack}.dab",
        bundle_hash="h",
        content=content,
        applied_at=now,
        outcome=outcome,
    )


class _Follower:
    """A cluster node that does not lead."""

    is_leader = False

    def fence(self) -> None:
        return None


def test_a_cluster_node_passes_as_soon_as_the_leader_commits(make_agent: Callable[..., Agent], signals: None) -> None:
    runtime = FakeRuntime()
    agent = make_agent(runtime)
    agent.engine.cluster = _Follower()

    def drive() -> None:
        until(lambda: passes(agent) >= 1)  # the first pass (a worker: it follows the records, empty here)
        before = passes(agent)
        agent.log.put(INTENT_KEY, b"1")  # an orchestrator commit
        until(lambda: passes(agent) > before)
        before = passes(agent)
        agent.log.put(STACKS + "other", _record("other").model_dump_json().encode())  # a stack record: watched too
        until(lambda: passes(agent) > before)

    run_driven(agent, drive)


class _Leader:
    is_leader = True

    def fence(self) -> None:
        return None


def test_the_leader_passes_as_soon_as_a_node_changes(make_agent: Callable[..., Agent], signals: None) -> None:
    """A lapsed lease (the node's status key deleted), a node record changed (`node update`): the leader moves
    slots at once, not at the next resync (300 s by default)."""
    runtime = FakeRuntime()
    agent = make_agent(runtime)
    agent.engine.cluster = _Leader()

    def drive() -> None:
        agent.log.put(node_status_key("n2"), NodeStatus(node_id="n2").model_dump_json().encode())
        until(lambda: passes(agent) >= 1)
        before = passes(agent)
        agent.log.delete(node_status_key("n2"))  # its lease lapsed
        until(lambda: passes(agent) > before)
        before = passes(agent)
        spec = NodeSpec(node_id="n2", name="n2", role="worker", availability="drain", joined_at=datetime.now(UTC))
        agent.log.put(NODES + "n2", spec.model_dump_json().encode())  # node update
        until(lambda: passes(agent) > before)

    run_driven(agent, drive)


def test_a_leader_held_by_a_nodes_schema_says_so_and_goes_on_when_the_nodes_status_changes(
    make_agent: Callable[..., Agent], signals: None
) -> None:
    """The check runs at every pass, and a node's status change (an upgraded node's restart) runs one at once."""
    runtime = FakeRuntime()
    agent = make_agent(runtime)
    agent.engine.cluster = _Leader()
    agent.engine.schema = (1, 2)  # a newer build
    held = {"node": "n2", "reads": "1", "writes": "2"}
    old = NodeStatus(node_id="n2", schema_oldest=1, schema_version=1)
    agent.log.put(node_status_key("n2"), old.model_dump_json().encode())  # live before the first pass

    def drive() -> None:
        until(lambda: metric(agent, "dabctl_cluster_schema_held", **held) == 1)
        assert agent.log.get(STACKS + "web") is None, "the held leader recorded nothing"
        upgraded = old.model_copy(update={"schema_version": 2})
        agent.log.put(node_status_key("n2"), upgraded.model_dump_json().encode())
        until(lambda: agent.log.get(STACKS + "web") is not None)
        assert metric(agent, "dabctl_cluster_schema_held", **held) == 0

    run_driven(agent, drive)
