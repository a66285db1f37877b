"""The pass runner (plan -> apply -> record) on the fake engine and the real SQLite state log."""

from __future__ import annotations

import threading

import pytest

from agent.cluster.orchestrate import Intent, stack_from_record
from agent.drivers.docker_engine import EngineError
from agent.node.engine import EmptySourceRefused, Engine
from agent.node.rollback import pin_stack
from agent.state.records import Records
from agent.state.sqlite import SqliteStateLog
from bundles import DesiredState
from bundles.desired import service_targets
from reconcilers import loadbalancer, networks, services
from reconcilers.loadbalancer import LoadBalancerReconciler, PortKey
from reconcilers.notes import NoteKind
from reconcilers.outcome import Outcome
from tests.fakes import CountingLog, FakeRuleset, FakeRuntime, api_error, unreachable
from tests.node.conftest import NODE, Clock, bundle, converge, desired, service, texts

HEALTHCHECK = {"Test": ["CMD", "true"], "Interval": "1s"}


def running(runtime: FakeRuntime, prefix: str) -> list[str]:
    """Names (without the random suffix) of the running containers whose name starts with `prefix`."""
    return sorted(c.name.rsplit(".", 1)[0] for c in runtime.by_name(prefix) if c.state == "running")


# --- first pass, steady state ------------------------------------------------------------------------------------


def test_a_first_pass_creates_networks_before_the_replicas_that_join_them(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    state = desired(
        web=bundle(
            {"front": service(Deploy={"Replicas": 2}), "back": service(Networks=["db", "default"])},
            {"db": {"Labels": {"tier": "db"}}},
        )
    )
    plan, report = converge(engine, state)
    assert texts(plan) == [
        "+ network web_db (missing)",
        "+ network web_default (missing)",
        "+ web_back.1 create (missing)",
        "+ web_front.1 create (missing)",
        "+ web_front.2 create (missing)",
    ]
    assert not report.failed and report.count(Outcome.CREATED) == 5
    creates = [c[0] for c in runtime.writes()]
    assert creates.index("create_network") < creates.index("create_replica")
    assert running(runtime, "web_") == ["web_back.1", "web_front.1", "web_front.2"]
    back = runtime.by_name("web_back.1")[0]
    assert back.networks == ["web_db", "web_default"]
    assert back.labels["dabctl.owner"] == engine.owner and back.labels["dabctl.node"] == NODE
    assert runtime.network_named("web_db").labels["tier"] == "db"  # type: ignore[union-attr]

    record = records.stacks()["web"]
    assert record.revision == state.stacks["web"].revision
    assert record.outcome.created == 5 and record.outcome.failed == 0
    assert record.services["front"].image_id == runtime.images["dabctl/sample:1"][0]
    assert [h.revision for h in records.history("web")] == [record.revision]
    assert [a.outcome for a in records.audit()[0].actions] == ["created"] * 5
    assert records.assignments()[("web", "front")] == {NODE: ["1", "2"]}


def test_a_converged_pass_makes_one_list_call_per_kind_and_writes_nothing(
    engine: Engine, runtime: FakeRuntime, state_log: SqliteStateLog
) -> None:
    state = desired(web=bundle({"front": service(Deploy={"Replicas": 3})}))
    converge(engine, state)
    runtime.calls.clear()
    revision = state_log.revision()

    plan, report = converge(engine, state)

    assert plan.changes == 0 and report.results == [] and not report.failed
    assert runtime.calls == [("list_replicas", engine.owner), ("list_networks",)]
    assert state_log.revision() == revision, "a converged pass writes nothing to the state log"


def test_a_converged_pass_makes_no_state_log_write_call(
    runtime: FakeRuntime, state_log: SqliteStateLog, clock: Clock
) -> None:
    counting = CountingLog(state_log)
    engine = Engine(runtime, Records(counting), NODE, clock=clock)
    state = desired(web=bundle({"front": service(Deploy={"Replicas": 3})}), api=bundle({"a": service()}))
    converge(engine, state)
    assert counting.writes, "the first pass writes"
    counting.writes.clear()
    runtime.calls.clear()

    plan, report = converge(engine, state)

    assert plan.changes == 0 and not report.failed
    assert runtime.calls == [("list_replicas", engine.owner), ("list_networks",)] and runtime.writes() == []
    assert counting.writes == [], "no put, delete or txn on a converged pass"


def test_a_pass_that_lost_the_race_plans_again_and_never_overwrites(
    runtime: FakeRuntime, records: Records, clock: Clock
) -> None:
    engine = Engine(runtime, records, NODE, clock=clock)
    engine.balancer = LoadBalancerReconciler(FakeRuleset())
    engine.listening = set
    state = desired(web=bundle({"front": service(Ports=[{"Port": 80}])}))
    plan = engine.plan(state, only={"web"})
    assert plan.ports == {PortKey("web", "front", "tcp", 80): 30000}
    # Another orchestrator commits in between: it took that port for its own stack.
    other = PortKey("api", "a", "tcp", 80)
    snapshot = records.snapshot()
    assert records.commit_intent(Intent(assignments={}, ports_changed={other: 30000}), snapshot)

    report = engine.apply(plan)

    assert not report.failed and engine.replans == 1
    assert records.ports() == {other: 30000, PortKey("web", "front", "tcp", 80): 30001}
    assert plan.ports == {PortKey("web", "front", "tcp", 80): 30001}, "the plan was made again"


def test_plan_alone_changes_nothing(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    plan = engine.plan(desired(web=bundle({"front": service()})))
    assert plan.changes == 2
    assert runtime.writes() == [] and records.stacks() == {}


def test_a_read_only_engine_on_a_fresh_state_owns_nothing_and_creates_no_owner(
    runtime: FakeRuntime, records: Records, state_log: SqliteStateLog
) -> None:
    engine = Engine(runtime, records, NODE, read_only=True)
    assert engine.owner.startswith("none-")
    assert state_log.get("/meta/owner") is None


# --- changes -----------------------------------------------------------------------------------------------------


def test_a_spec_change_replaces_replicas_one_batch_per_monitor_period(
    engine: Engine, runtime: FakeRuntime, clock: Clock, records: Records
) -> None:
    converge(engine, desired(web=bundle({"front": service(Deploy={"Replicas": 2})})))
    old_ids = {c.id for c in runtime.by_name("web_front")}
    changed = desired(web=bundle({"front": service(Env=["MODE=new"], Deploy={"Replicas": 2})}))

    plan, _ = converge(engine, changed)
    assert texts(plan) == ["~ web_front.1 replace (Env changed)"]
    assert plan.rolling and plan.recheck_in is not None and 0 < plan.recheck_in <= 5
    assert records.rollouts()[("web", "front")].state == "updating"

    plan, _ = converge(engine, changed)
    assert plan.changes == 0, "the next batch waits for the monitor period"
    clock.advance(6)
    plan, _ = converge(engine, changed)
    # (Later batches say "spec changed": the record already holds the new spec, so the old one is unknown.)
    assert [a.key for a in plan.stacks["web"].service_actions] == [("web", "front", "2")]
    clock.advance(6)
    plan, _ = converge(engine, changed)
    assert plan.changes == 0 and not plan.rolling
    assert records.rollouts()[("web", "front")].state == "completed"
    assert not old_ids & {c.id for c in runtime.by_name("web_front")}
    assert len(records.history("web")) == 2


def test_a_health_gated_rollout_waits_for_healthy_and_pauses_on_unhealthy(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    svc = service(Healthcheck=HEALTHCHECK, Deploy={"Replicas": 2})
    converge(engine, desired(web=bundle({"front": svc})))
    for c in runtime.by_name("web_front"):
        runtime.set_health(c.id, "healthy")
    changed = desired(web=bundle({"front": {**svc, "Env": ["V=2"]}}))

    plan, _ = converge(engine, changed)
    assert texts(plan) == ["~ web_front.1 replace (Env changed)"]
    assert converge(engine, changed)[0].changes == 0, "starting: the rollout waits"
    runtime.set_health("web_front.1", "healthy")
    plan, _ = converge(engine, changed)
    assert [a.key for a in plan.stacks["web"].service_actions] == [("web", "front", "2")]

    # A third revision whose first replica turns unhealthy: the default failure action pauses the rollout.
    third = desired(web=bundle({"front": {**svc, "Env": ["V=3"]}}))
    runtime.set_health("web_front.2", "healthy")
    converge(engine, third)
    runtime.set_health("web_front.1", "unhealthy")
    plan, _ = converge(engine, third)
    assert plan.changes == 0
    rollout = records.rollouts()[("web", "front")]
    assert rollout.state == "paused"
    assert [(n.service, n.kind) for n in plan.stacks["web"].notes] == [("front", NoteKind.ROLLOUT_PAUSED)]


def test_an_unhealthy_update_rolls_back_to_the_previous_revision(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    svc = service(Healthcheck=HEALTHCHECK, Deploy={"UpdateConfig": {"FailureAction": "rollback"}})
    first = desired(web=bundle({"front": svc}))
    converge(engine, first)
    runtime.set_health("web_front.1", "healthy")
    second = desired(web=bundle({"front": {**svc, "Env": ["V=2"]}}))
    converge(engine, second)
    runtime.set_health("web_front.1", "unhealthy")

    plan, _ = converge(engine, second)
    pin = records.pins()["web"]
    assert pin.automatic and pin.revision == first.stacks["web"].revision
    assert pin.source_revision == second.stacks["web"].revision
    assert plan.rolling and plan.recheck_in == 0.0

    plan, _ = converge(engine, second)  # the pinned (first) revision is what runs now
    assert [str(a) for a in plan.stacks["web"].service_actions] == ["~ web_front.1 replace (Env changed)"]
    assert runtime.by_name("web_front.1")[0].labels["dabctl.spec"] == service_targets(first.stacks["web"])[0].spec_hash


def test_an_exited_replica_is_restarted_with_backoff(engine: Engine, runtime: FakeRuntime, clock: Clock) -> None:
    state = desired(web=bundle({"front": service(Deploy={"RestartPolicy": {"Delay": "5s"}})}))
    converge(engine, state)
    runtime.exit("web_front.1", 3)

    plan, report = converge(engine, state)
    assert texts(plan) == ["~ web_front.1 start (exited (3); restart condition any)"]
    assert report.count(Outcome.UPDATED) == 1 and running(runtime, "web_front") == ["web_front.1"]

    runtime.exit("web_front.1", 3)
    plan, _ = converge(engine, state)
    assert plan.changes == 0 and plan.recheck_in == pytest.approx(5.0), "backoff: the second start waits"
    clock.advance(5)
    assert texts(converge(engine, state)[0]) == ["~ web_front.1 start (exited (3); restart condition any)"]


def test_a_container_whose_start_fails_twice_is_replaced_not_started_a_third_time(
    engine: Engine, runtime: FakeRuntime
) -> None:
    """containerd can keep a task through a dockerd restart: every start of that container then answers "task
    already exists". The first pass creates and starts; the next starts once more; the one after replaces it."""
    state = desired(web=bundle({"front": service()}))
    stuck = api_error(500, "Server Error", "task abc already exists: unknown", "/containers/abc/start")
    runtime.fail("start_replica", stuck, times=2)

    _, report = converge(engine, state)
    assert report.count(Outcome.FAILED) == 1
    [first] = runtime.containers.values()
    assert first.state == "created"

    plan, report = converge(engine, state)
    assert texts(plan) == ["~ web_front.1 start (never started)"] and report.count(Outcome.FAILED) == 1

    plan, report = converge(engine, state)
    assert texts(plan) == [
        "- web_front.1 remove (never started: its start failed)",
        "+ web_front.1 create (recreated)",
    ]
    assert report.count(Outcome.FAILED) == 0 and running(runtime, "web_front") == ["web_front.1"]
    assert first.id not in runtime.containers
    assert converge(engine, state)[0].changes == 0


def test_an_exit_under_on_failure_with_code_0_is_left_alone(engine: Engine, runtime: FakeRuntime) -> None:
    state = desired(web=bundle({"job": service(Deploy={"RestartPolicy": {"Condition": "on-failure"}})}))
    converge(engine, state)
    runtime.exit("web_job.1", 0)
    assert converge(engine, state)[0].changes == 0


def test_scaling_down_removes_the_highest_slots(engine: Engine, runtime: FakeRuntime) -> None:
    converge(engine, desired(web=bundle({"front": service(Deploy={"Replicas": 3})})))
    plan, report = converge(engine, desired(web=bundle({"front": service(Deploy={"Replicas": 1})})))
    assert texts(plan) == [
        "- web_front.3 remove (slot not assigned to this node)",
        "- web_front.2 remove (slot not assigned to this node)",
    ]
    assert report.count(Outcome.REMOVED) == 2 and running(runtime, "web_front") == ["web_front.1"]


def test_a_changed_network_is_recreated_after_its_containers_are_gone(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    converge(engine, desired(web=bundle({"front": service(Networks=["db"])}, {"db": {}})))
    old = runtime.network_named("web_db")
    assert old is not None

    plan, report = converge(
        engine, desired(web=bundle({"front": service(Networks=["db"])}, {"db": {"Internal": True}}))
    )

    assert texts(plan) == [
        "- network web_db (definition changed: recreate)",
        "+ network web_db (definition changed)",
        "- web_front.1 remove (network gone or changed)",
        "+ web_front.1 create (recreated)",
    ]
    assert not report.failed
    new = runtime.network_named("web_db")
    assert new is not None and new.id != old.id and new.internal
    writes = [c[0] for c in runtime.writes()][3:]  # after the first pass's
    assert writes.index("remove_replica") < writes.index("remove_network") < writes.index("create_network")


# --- pruning ------------------------------------------------------------------------------------------------------


def test_a_stack_gone_from_the_source_is_pruned_with_its_records(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    both = desired(web=bundle({"front": service()}), api=bundle({"srv": service()}))
    converge(engine, both)
    plan, report = converge(engine, desired(api=bundle({"srv": service()})))
    assert texts(plan) == [
        "- network web_default (no longer in any bundle)",
        "- web_front.1 remove (stack pruned: its bundle is gone)",
    ]
    assert not report.failed
    assert set(records.stacks()) == {"api"} and ("web", "front") not in records.assignments()
    assert runtime.by_name("web_") == [] and runtime.network_named("web_default") is None


def test_an_empty_source_prunes_nothing_unless_allowed(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    converge(engine, desired(web=bundle({"front": service()})))
    with pytest.raises(EmptySourceRefused, match="--allow-empty"):
        engine.plan(desired())
    assert running(runtime, "web_") == ["web_front.1"]
    converge(engine, desired(), allow_empty=True)
    assert runtime.by_name("web_") == [] and records.stacks() == {}


def test_suspended_and_out_of_scope_stacks_are_left_exactly_as_they_are(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    converge(engine, desired(web=bundle({"front": service()}), api=bundle({"srv": service()})))
    records.set_suspended("web", True)
    changed = desired(web=bundle({"front": service(Env=["A=1"])}), api=bundle({"srv": service(Env=["A=1"])}))
    plan = engine.plan(changed)
    assert set(plan.stacks) == {"api"} and plan.suspended == ["web"]
    plan = engine.plan(changed, only={"web"})
    assert plan.stacks == {}, "suspended beats `only`"
    records.set_suspended("web", False)
    plan = engine.plan(changed, only={"web"})
    assert texts(plan) == ["~ web_front.1 replace (Env changed)"] and "api" in plan.held


# --- failures -----------------------------------------------------------------------------------------------------


def test_a_missing_image_fails_the_create_and_is_recorded(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    state = desired(web=bundle({"front": service(Image="dabctl/absent:1", PullPolicy="never")}))
    _, report = converge(engine, state)
    assert report.failed and report.count(Outcome.FAILED) == 1
    failure = next(r for r in report.results if r.outcome is Outcome.FAILED)
    assert failure.error == "image dabctl/absent:1 is not on this node and PullPolicy is never; load it first"
    outcome = records.stacks()["web"].outcome
    assert outcome.failed == 1 and "PullPolicy is never" in outcome.errors[0]
    assert records.audit()[0].actions[-1].outcome == "failed"


def test_a_missing_image_is_pulled_when_the_registry_has_it(engine: Engine, runtime: FakeRuntime) -> None:
    runtime.registry["dabctl/other:2"] = "sha256:" + "b" * 64
    _, report = converge(engine, desired(web=bundle({"front": service(Image="dabctl/other:2")})))
    assert not report.failed and ("pull", "dabctl/other:2") in runtime.calls


def test_a_name_conflict_fails_only_that_replica(engine: Engine, runtime: FakeRuntime) -> None:
    conflict = api_error(409, "Conflict", 'Conflict. The container name "/x" is already in use', "/containers/create")
    runtime.fail("create_replica", conflict)
    _, report = converge(engine, desired(web=bundle({"front": service(Deploy={"Replicas": 2})})))
    failed = [r for r in report.results if r.outcome is Outcome.FAILED]
    assert len(failed) == 1 and failed[0].error.startswith("409 Client Error")
    assert len(running(runtime, "web_front")) == 1


def test_a_foreign_network_with_a_managed_name_holds_the_stack(engine: Engine, runtime: FakeRuntime) -> None:
    runtime.seed_network("web_default", {})
    plan, report = converge(engine, desired(web=bundle({"front": service()}), api=bundle({"srv": service()})))
    assert plan.stacks["web"].error is not None and "not managed by this dabctl state" in plan.stacks["web"].error
    assert plan.stacks["web"].actions == [] and report.errors == [f"web: {plan.stacks['web'].error}"]
    assert running(runtime, "api_") == ["api_srv.1"] and runtime.by_name("web_") == []


def test_a_missing_external_network_holds_the_stack(engine: Engine) -> None:
    plan = engine.plan(desired(web=bundle({"front": service(Networks=["ext"])}, {"ext": {"External": True}})))
    assert "is External but does not exist" in str(plan.stacks["web"].error)


def test_a_network_with_active_endpoints_fails_its_removal(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    converge(engine, desired(web=bundle({"front": service()}), api=bundle({"srv": service()})))
    network = runtime.network_named("web_default")
    assert network is not None
    runtime.seed_container("intruder", {}, ["web_default"])  # not dabctl's: it keeps the network busy
    _, report = converge(engine, desired(api=bundle({"srv": service()})))
    failed = [r for r in report.results if r.outcome is Outcome.FAILED]
    assert [str(r.action) for r in failed] == ["- network web_default (no longer in any bundle)"]
    assert "has active endpoints" in failed[0].error
    assert "web" in records.stacks(), "a stack whose removal failed stays recorded and is pruned again later"


def test_an_unreachable_engine_fails_the_plan(engine: Engine, runtime: FakeRuntime) -> None:
    with unreachable(runtime), pytest.raises(EngineError, match="no Docker engine answers"):
        engine.plan(desired(web=bundle({"front": service()})))


def test_a_stop_request_skips_actions_not_yet_started(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    stop = threading.Event()
    stop.set()
    state = desired(web=bundle({"front": service()}))
    report = engine.apply(engine.plan(state), stop=stop)
    assert report.results == [] and runtime.writes() == []
    assert records.stacks()["web"].outcome.created == 0, "the revision is recorded; the next pass plans the rest"
    assert converge(engine, state)[0].changes == 2


# --- images -------------------------------------------------------------------------------------------------------


def test_pull_policy_always_replaces_replicas_when_the_tag_moves(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    first, second = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    runtime.registry["dabctl/app:1"] = first
    state = desired(web=bundle({"front": service(Image="dabctl/app:1", PullPolicy="always")}))
    _, report = converge(engine, state)
    assert not report.failed
    assert records.stacks()["web"].services["front"].repo_digest == first
    assert converge(engine, state)[0].changes == 0, "same digest: nothing to do"

    runtime.registry["dabctl/app:1"] = second
    plan, report = converge(engine, state)
    assert texts(plan) == ["~ web_front.1 replace (Image digest 111111111111 → 222222222222)"]
    assert not report.failed and records.stacks()["web"].services["front"].repo_digest == second


def test_a_registry_that_cannot_be_asked_keeps_the_recorded_image(engine: Engine, runtime: FakeRuntime) -> None:
    runtime.registry["dabctl/app:1"] = "sha256:" + "1" * 64
    state = desired(web=bundle({"front": service(Image="dabctl/app:1", PullPolicy="always")}))
    converge(engine, state)
    del runtime.registry["dabctl/app:1"]
    plan, _ = converge(engine, state)
    assert plan.changes == 0
    assert [str(n) for n in plan.stacks["web"].notes] == [
        "front: image check failed: checking dabctl/app:1 at its registry failed: no such image in the fake registry"
    ]
    assert [n.kind for n in plan.stacks["web"].notes] == [NoteKind.IMAGE_CHECK_FAILED]


def test_a_replica_running_another_image_id_than_recorded_is_replaced(engine: Engine, runtime: FakeRuntime) -> None:
    state = desired(web=bundle({"front": service()}))
    converge(engine, state)
    runtime.add_image("dabctl/sample:1", "sha256:" + "9" * 64)  # the tag now names another image
    runtime.remove_replica(
        services.Replica(
            id=runtime.by_name("web_front.1")[0].id,
            name="",
            stack="",
            service="",
            slot="",
            spec_hash="",
            state="running",
        )
    )
    runtime.seed_container(
        "web_front.1.x",
        {**_labels(engine, state), "dabctl.slot": "1"},
        ["web_default"],
        image_id="sha256:" + "9" * 64,
    )
    plan, _ = converge(engine, state)
    assert [type(a) for a in plan.stacks["web"].service_actions] == [services.ReplaceReplica]


def _labels(engine: Engine, state: DesiredState) -> dict[str, str]:
    stack = state.stacks["web"]
    target = service_targets(stack)[0]
    return services.replica_labels(target, "1", engine.owner, NODE, stack.revision)


# --- pins ---------------------------------------------------------------------------------------------------------


def test_a_pinned_stack_runs_its_recorded_revision_until_the_source_moves(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    v1 = desired(web=bundle({"front": service(Env=["V=1"])}))
    v2 = desired(web=bundle({"front": service(Env=["V=2"])}))
    converge(engine, v1)
    converge(engine, v2)
    pin = pin_stack(records, "web", None)
    assert pin.revision == v1.stacks["web"].revision

    plan, _ = converge(engine, v2)
    assert texts(plan) == ["~ web_front.1 replace (Env changed)"]
    assert records.stacks()["web"].revision == v1.stacks["web"].revision
    assert converge(engine, v2)[0].changes == 0, "pinned: the source's revision does not lead"

    v3 = desired(web=bundle({"front": service(Env=["V=3"])}))
    plan, _ = converge(engine, v3)
    assert plan.pins == {"web": None} and records.pins() == {}
    assert texts(plan) == ["~ web_front.1 replace (Env changed)"]


def test_a_pin_to_a_revision_gone_from_the_history_holds_the_stack(engine: Engine, records: Records) -> None:
    v1 = desired(web=bundle({"front": service(Env=["V=1"])}))
    converge(engine, v1)
    pin = pin_stack(records, "web", v1.stacks["web"].revision)
    for n in range(2, 6):  # the history keeps 3 revisions
        converge(engine, desired(web=bundle({"front": service(Env=[f"V={n}"])})))
    current = desired(web=bundle({"front": service(Env=["V=5"])}))
    records.set_pin(pin.model_copy(update={"source_revision": current.stacks["web"].revision}), "web")
    plan = engine.plan(current)
    assert "no longer in the history" in str(plan.stacks["web"].error)


def test_a_record_turns_back_into_the_stack_it_was(engine: Engine, records: Records) -> None:
    state = desired(web=bundle({"front": service(Env=["V=1"])}))
    converge(engine, state)
    again = stack_from_record(records.stacks()["web"])
    assert again.bundle == state.stacks["web"].bundle and again.revision == state.stacks["web"].revision
    assert again.image_ids == {"front": records.stacks()["web"].services["front"].image_id}


# --- published ports (through a fake ruleset) ---------------------------------------------------------------------


@pytest.fixture
def ruleset(engine: Engine) -> FakeRuleset:
    rules = FakeRuleset()
    engine.balancer = LoadBalancerReconciler(rules)
    engine.listening = lambda: {("tcp", 30000)}  # a host process holds the first port of the range
    return rules


def test_a_published_port_is_allocated_recorded_and_balanced_over_running_replicas(
    engine: Engine, runtime: FakeRuntime, records: Records, ruleset: FakeRuleset
) -> None:
    state = desired(web=bundle({"front": service(Ports=[{"Port": 8080}], Deploy={"Replicas": 2})}))
    plan, report = converge(engine, state)
    assert not report.failed
    assert records.ports() == {PortKey("web", "front", "tcp", 8080): 30001}
    ((frontend, backends),) = ruleset.balance.items()
    assert frontend.port == 30001 and len(backends) == 2
    assert converge(engine, state)[0].changes == 0

    plan, _ = converge(engine, desired(), allow_empty=True)
    assert any(isinstance(a, loadbalancer.Unpublish) for a in plan.stacks["web"].balancer_actions)
    assert ruleset.balance == {} and records.ports() == {}


def test_replicas_still_starting_are_counted_and_kept_out_of_the_balancer(
    engine: Engine, runtime: FakeRuntime, ruleset: FakeRuleset
) -> None:
    state = desired(web=bundle({"front": service(Ports=[{"Port": 80}], Healthcheck=HEALTHCHECK)}))
    plan, _ = converge(engine, state)
    assert plan.awaiting_health == 1
    assert list(ruleset.balance.values()) == [()]
    runtime.set_health("web_front.1", "healthy")
    plan, _ = converge(engine, state)
    assert [type(a) for a in plan.stacks["web"].balancer_actions] == [loadbalancer.Rebalance]
    assert len(next(iter(ruleset.balance.values()))) == 1


def test_an_unavailable_balancer_is_a_pass_error_and_ports_stay(engine: Engine, ruleset: FakeRuleset) -> None:
    ruleset.unavailable = "nft: command not found"
    plan, report = converge(engine, desired(web=bundle({"front": service(Ports=[{"Port": 80}])})))
    assert plan.balancer_error == "nft: command not found"
    assert report.errors == ["published ports: nft: command not found"] and report.failed


def test_a_failed_ruleset_write_fails_the_balancer_actions(engine: Engine, ruleset: FakeRuleset) -> None:
    ruleset.write_errors.append(OSError("netlink: permission denied"))
    _, report = converge(engine, desired(web=bundle({"front": service(Ports=[{"Port": 80}])})))
    failed = [r for r in report.results if r.outcome is Outcome.FAILED]
    assert failed and all(r.error == "netlink: permission denied" for r in failed)


def test_a_port_taken_by_another_stack_holds_the_newcomer(engine: Engine, ruleset: FakeRuleset) -> None:
    converge(engine, desired(web=bundle({"front": service(Ports=[{"Port": 80, "PublishedPort": 8080}])})))
    both = desired(
        web=bundle({"front": service(Ports=[{"Port": 80, "PublishedPort": 8080}])}),
        api=bundle({"srv": service(Ports=[{"Port": 80, "PublishedPort": 8080}])}),
    )
    plan = engine.plan(both)
    assert plan.stacks["api"].error is not None and "8080" in plan.stacks["api"].error
    assert "api" in plan.held and plan.stacks["web"].error is None


def test_network_actions_name_their_stack(engine: Engine) -> None:
    plan = engine.plan(desired(web=bundle({"front": service()})))
    assert all(isinstance(a, networks.CreateNetwork) and a.stack == "web" for a in plan.stacks["web"].network_actions)
