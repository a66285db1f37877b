"""Stack status from the state log's records and what the engine lists (a pure function, fed by real passes)."""

from __future__ import annotations

from agent.node.engine import Engine
from agent.node.status import Slots, image_warnings, stack_statuses
from agent.state.records import Records
from reconcilers.loadbalancer import PortKey
from reconcilers.rollout import Rollout
from schemas.output import StackStatus
from tests.fakes import FakeRuntime
from tests.node.conftest import NODE, bundle, converge, desired, service

HEALTHCHECK = {"Test": ["CMD", "true"]}


def statuses(
    engine: Engine, runtime: FakeRuntime, records: Records, state: object, **extra: object
) -> dict[str, StackStatus]:
    out = stack_statuses(
        state,  # type: ignore[arg-type]
        records.stacks(),
        runtime.list_replicas(engine.owner),
        slots=Slots(records.assignments(), NODE),
        errors=extra.pop("errors", {}),  # type: ignore[arg-type]
        suspended=records.suspended(),
        rollouts=records.rollouts(),
        pins=records.pins(),
        **extra,  # type: ignore[arg-type]
    )
    return {s.stack: s for s in out}


def test_health_follows_the_replicas_healthchecks(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    state = desired(web=bundle({"front": service(Healthcheck=HEALTHCHECK, Deploy={"Replicas": 2})}))
    converge(engine, state)
    web = statuses(engine, runtime, records, state)["web"]
    assert web.health.status == "Progressing" and web.health.services[0].running == 0
    assert web.sync.status == "Synced", "every slot runs the current spec; health is a separate field"

    runtime.set_health("web_front.1", "healthy")
    runtime.set_health("web_front.2", "unhealthy")
    web = statuses(engine, runtime, records, state)["web"]
    assert (web.health.status, web.health.services[0].running, web.health.services[0].desired) == ("Degraded", 1, 2)
    runtime.set_health("web_front.2", "healthy")
    assert statuses(engine, runtime, records, state)["web"].health.status == "Healthy"


def test_sync_says_what_is_out_of_step(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    v1 = desired(web=bundle({"front": service()}), api=bundle({"srv": service()}))
    converge(engine, v1)
    runtime.exit("web_front.1", 1)
    v2 = desired(web=bundle({"front": service(Env=["V=2"])}))
    out = statuses(engine, runtime, records, v2, errors={"web": "boom"})
    assert (out["web"].sync.status, out["web"].sync.error) == ("Failed", "boom")
    assert out["api"].sync.status == "OutOfSync", "deployed but gone from the source: the next pass prunes it"
    assert out["api"].health.services == []
    out = statuses(engine, runtime, records, v2)
    assert out["web"].sync.status == "OutOfSync" and out["web"].sync.revision == v1.stacks["web"].revision


def test_a_recorded_failure_is_reported_until_a_pass_succeeds(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    state = desired(web=bundle({"front": service(Image="dabctl/absent:1", PullPolicy="never")}))
    converge(engine, state)
    web = statuses(engine, runtime, records, state)["web"]
    assert web.sync.status == "Failed" and "PullPolicy is never" in str(web.sync.error)


def test_rollout_pin_suspension_and_ports_are_shown(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    state = desired(web=bundle({"front": service(Ports=[{"Port": 80}, {"Port": 53, "Protocol": "udp"}])}))
    converge(engine, state)
    records.set_suspended("web", True)
    records.commit_pass(
        [],
        [],
        [],
        None,
        rollouts={
            ("web", "a"): Rollout(target="x", state="updating", reason="batch 1"),
            ("web", "b"): Rollout(target="x", state="paused", reason="unhealthy"),
            ("web", "c"): Rollout(target="x", state="completed"),
        },
    )
    web = statuses(engine, runtime, records, state, ports={PortKey("web", "front", "tcp", 80): 30000})["web"]
    assert (web.rollout.state, web.rollout.reason) == ("paused", "b: unhealthy")
    assert web.suspended and web.pinned is None
    assert web.health.services[0].ports == ["30000:80/tcp", "53/udp"]


def test_on_a_cluster_an_image_with_no_registry_digest_is_warned_about(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    state = desired(web=bundle({"front": service(), "back": service(Image="dabctl/sample@sha256:" + "a" * 64)}))
    converge(engine, state)
    stacks = records.stacks()
    assert stacks["web"].services["front"].repo_digest == ""  # the fake engine's images come from no registry
    web = image_warnings(list(statuses(engine, runtime, records, state).values()), stacks)[0]
    front, back = sorted(web.health.services, key=lambda s: s.service != "front")
    assert len(front.warnings) == 1 and "has no registry digest" in front.warnings[0]
    assert "may differ between nodes" in front.warnings[0]
    assert back.warnings == [], "a reference pinned by digest is the same image everywhere"
    # The leader recorded the registry digest it resolved: every node runs that, nothing to warn about.
    front_rec = stacks["web"].services["front"].model_copy(update={"repo_digest": "sha256:" + "b" * 64})
    stacks["web"].services["front"] = front_rec
    web = image_warnings(list(statuses(engine, runtime, records, state).values()), stacks)[0]
    assert all(s.warnings == [] for s in web.health.services)
    # A node alone shows no such warning (`image_warnings` applies on a cluster node only).
    assert all(s.warnings == [] for s in statuses(engine, runtime, records, state)["web"].health.services)


def test_on_a_cluster_a_replicated_service_with_a_named_volume_is_warned_that_it_can_move(
    engine: Engine, runtime: FakeRuntime, records: Records
) -> None:
    digest = "dabctl/sample@sha256:" + "a" * 64
    mount = {"Type": "volume", "Source": "data", "Target": "/data"}
    state = desired(
        db=bundle(
            {
                "pg": service(Image=digest, Mounts=[mount]),
                "agent": service(Image=digest, Mounts=[mount], Deploy={"Mode": "global"}),
                "web": service(Image=digest, Mounts=[{"Type": "tmpfs", "Target": "/tmp"}]),
            }
        )
    )
    converge(engine, state)
    db = image_warnings(list(statuses(engine, runtime, records, state).values()), records.stacks())[0]
    warned = {s.service: s.warnings for s in db.health.services}
    assert len(warned["pg"]) == 1 and "named volumes are per node (db_data)" in warned["pg"][0]
    assert warned["agent"] == [], "a global service's tasks never move"
    assert warned["web"] == [], "no named volume"
