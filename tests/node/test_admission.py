"""The policy at create and start: whatever revision a container comes from (the source's, a pin's), and however
its bind source looks on the node now, a refused container is never created or started, and the refusal is one
line naming the rule."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.admission import PolicyRefused, admit
from agent.node.engine import Engine
from agent.node.hostpaths import UntrustedPath, resolve
from agent.node.rollback import pin_stack
from agent.state.records import Records
from bundles.desired import service_targets
from bundles.policy import BindAllow, Policy
from reconcilers.outcome import Outcome
from tests.fakes import FakeRuntime
from tests.node.conftest import bundle, converge, desired, service

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="ownership checks need files owned by root and by others")


def bind(source: str, read_only: bool = False) -> dict[str, object]:
    return service(Mounts=[{"Type": "bind", "Source": source, "Target": "/m", "ReadOnly": read_only}])


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory whose every ancestor is root's alone (/run), as a trusted symlink needs."""
    if not ROOT or os.stat("/run").st_mode & 0o022:
        pytest.skip("needs root and a root-only /run")
    d = Path(tempfile.mkdtemp(prefix="dabctl-test-", dir="/run"))
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            p.unlink() if p.is_symlink() or not p.is_dir() else p.rmdir()
        d.rmdir()


# --- resolving on the node ---------------------------------------------------------------------------------------


def test_var_run_resolves_to_run() -> None:
    if os.path.realpath("/var/run") != "/run":
        pytest.skip("/var/run is not a link to /run here")
    assert resolve("/var/run/docker.sock") == "/run/docker.sock"
    assert resolve("/var/run/./x/../docker") == "/run/docker"


def test_a_root_only_chain_of_symlinks_is_followed(root_dir: Path) -> None:
    (root_dir / "data").mkdir()
    (root_dir / "a").symlink_to("b")
    (root_dir / "b").symlink_to(root_dir / "data")
    assert resolve(f"{root_dir}/a/sub") == f"{root_dir}/data/sub", "a missing tail is kept as written"
    (root_dir / "up").symlink_to("data/..")
    assert resolve(f"{root_dir}/up/data") == f"{root_dir}/data"


@needs_root
def test_a_symlink_owned_by_another_user_is_refused(root_dir: Path) -> None:
    (root_dir / "link").symlink_to("/")
    os.lchown(root_dir / "link", 65534, 65534)
    with pytest.raises(UntrustedPath, match=r"symlink owned by uid 65534, not root.*'no-untrusted-symlink'"):
        resolve(f"{root_dir}/link/etc")


@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_symlink_in_a_directory_others_can_write_is_refused(root_dir: Path, mode: int) -> None:
    loose = root_dir / "shared"
    loose.mkdir()
    (loose / "inner").mkdir()
    (loose / "inner" / "link").symlink_to("/etc")
    loose.chmod(mode)
    with pytest.raises(UntrustedPath, match=f"lies in {loose}, which someone other than root owns or can write"):
        resolve(f"{loose}/inner/link")


@needs_root
def test_a_symlink_under_a_directory_another_user_owns_is_refused(root_dir: Path) -> None:
    owned = root_dir / "home"
    owned.mkdir()
    (owned / "link").symlink_to("/etc")
    os.chown(owned, 1000, 1000)
    with pytest.raises(UntrustedPath, match=f"lies in {owned}"):
        resolve(f"{owned}/link")


def test_a_symlink_loop_is_refused(root_dir: Path) -> None:
    (root_dir / "a").symlink_to("b")
    (root_dir / "b").symlink_to("a")
    with pytest.raises(UntrustedPath, match="more than 40 symlinks"):
        resolve(f"{root_dir}/a")


def target_of(source: str, read_only: bool = False):  # type: ignore[no-untyped-def]
    [t] = service_targets(desired(web=bundle({"s": bind(source, read_only)})).stacks["web"])
    return t


@pytest.mark.parametrize(
    ("entry", "source", "rule"),
    [
        ("/var/run/docker.sock", "/run/docker.sock", None),
        ("/run/docker.sock", "/var/run/docker.sock", None),
        ("/var/run/docker.sock", "/var/run/docker", "no-docker-socket"),
        ("/var/run", "/var/run/docker/containerd/containerd.sock", "no-docker-socket"),
        ("/run", "/run/containerd", "no-docker-socket"),
    ],
)
def test_entries_and_sources_are_compared_resolved(entry: str, source: str, rule: str | None) -> None:
    if os.path.realpath("/var/run") != "/run":
        pytest.skip("/var/run is not a link to /run here")
    policy = Policy(allow_bind_mounts=(entry,))
    if rule is None:
        admit(target_of(source), policy)
        return
    with pytest.raises(PolicyRefused) as info:
        admit(target_of(source), policy)
    assert info.value.rule == rule and f"policy rule {rule!r}" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_planted_symlink_to_a_denied_path_is_refused_even_under_an_allowed_entry(root_dir: Path) -> None:
    (root_dir / "data").mkdir()
    (root_dir / "data" / "sock").symlink_to("/run/docker.sock")  # root's own link, in root's own directory
    policy = Policy(allow_bind_mounts=(str(root_dir / "data"),))
    with pytest.raises(PolicyRefused) as info:
        admit(target_of(f"{root_dir}/data/sock"), policy)
    assert info.value.rule == "no-docker-socket"
    assert f"{root_dir}/data/sock (resolved: /run/docker.sock)" in str(info.value)


def test_a_symlink_out_of_an_allowed_entry_is_refused(root_dir: Path) -> None:
    (root_dir / "data").mkdir()
    (root_dir / "elsewhere").mkdir()
    (root_dir / "data" / "out").symlink_to(root_dir / "elsewhere")
    policy = Policy(allow_bind_mounts=(str(root_dir / "data"),))
    with pytest.raises(PolicyRefused) as info:
        admit(target_of(f"{root_dir}/data/out"), policy)
    assert info.value.rule == "no-bind-mounts"


# --- at create and start, in a pass ------------------------------------------------------------------------------


def refusals(report_results: list[object]) -> list[str]:
    return [r.error for r in report_results if getattr(r, "outcome", None) is Outcome.FAILED]  # type: ignore[attr-defined]


def test_a_container_the_policy_refuses_is_never_created(engine: Engine, runtime: FakeRuntime) -> None:
    # Engine.plan takes a desired state as given: the source's check is not what stands between it and the engine.
    state = desired(web=bundle({"s": bind("/var/run/docker.sock")}))
    _, report = converge(engine, state)
    [error] = refusals(report.results)  # type: ignore[arg-type]
    assert error.startswith("web_s: Mounts[0].Source: bind mount of /var/run/docker.sock")
    assert "policy rule 'no-docker-socket'" in error
    assert runtime.writes() == [] and runtime.containers == {}


def test_a_replacement_the_policy_refuses_leaves_the_old_replica_running(engine: Engine, runtime: FakeRuntime) -> None:
    converge(engine, desired(web=bundle({"s": service()})))
    before = dict(runtime.containers)
    runtime.calls.clear()
    _, report = converge(engine, desired(web=bundle({"s": bind("/etc")})))
    [error] = refusals(report.results)  # type: ignore[arg-type]
    assert "policy rule 'no-host-system'" in error
    assert runtime.writes() == [] and runtime.containers.keys() == before.keys()


def test_a_pinned_revision_passes_the_policy_again(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    # The socket was allowed when v1 ran; the config no longer allows it. `dabctl rollback` pins v1 again.
    engine.policy = Policy(allow_bind_mounts=("/var/run/docker.sock",))
    converge(engine, desired(web=bundle({"s": bind("/var/run/docker.sock")})))
    current = desired(web=bundle({"s": service()}))
    converge(engine, current)
    engine.policy = Policy()
    pin_stack(records, "web", None)
    runtime.calls.clear()
    plan, _ = converge(engine, current)
    assert plan.stacks["web"].error is not None
    assert "is refused by the policy" in plan.stacks["web"].error
    assert "policy rule 'no-docker-socket'" in plan.stacks["web"].error
    assert runtime.writes() == []


def test_a_pinned_revision_is_checked_at_create_even_when_planned(
    engine: Engine, runtime: FakeRuntime, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the plan's early check gone, the create/start check alone still stops it.
    engine.policy = Policy(allow_bind_mounts=("/var/run/docker.sock",))
    converge(engine, desired(web=bundle({"s": bind("/var/run/docker.sock")})))
    current = desired(web=bundle({"s": service()}))
    converge(engine, current)
    engine.policy = Policy()
    pin_stack(records, "web", None)
    monkeypatch.setattr("agent.cluster.orchestrate.stack_violations", lambda stack, policy: [])
    runtime.calls.clear()
    _, report = converge(engine, current)
    [error] = refusals(report.results)  # type: ignore[arg-type]
    assert "policy rule 'no-docker-socket'" in error
    assert [c[0] for c in runtime.writes()] == [], "the running replica of the current revision stays"


@needs_root
def test_a_restart_in_place_is_checked_again(engine: Engine, runtime: FakeRuntime, tmp_path: Path) -> None:
    # Docker resolves a bind source at each start: a container that could write its mount's parent plants a link.
    parent = tmp_path / "app"
    parent.mkdir()
    (parent / "data").mkdir()
    engine.policy = Policy(allow_bind_mounts=(str(parent),))
    state = desired(web=bundle({"s": bind(f"{parent}/data")}))
    converge(engine, state)
    [c] = runtime.containers.values()
    runtime.exit(c.id, 1)
    (parent / "data").rmdir()
    (parent / "data").symlink_to("/")
    runtime.calls.clear()
    _, report = converge(engine, state)
    [error] = refusals(report.results)  # type: ignore[arg-type]
    assert "start" in str(report.results[0].action)
    assert "'no-untrusted-symlink'" in error
    assert runtime.writes() == [] and c.state == "exited"


def test_a_read_only_entry_is_held_at_create(engine: Engine, runtime: FakeRuntime, tmp_path: Path) -> None:
    engine.policy = Policy(allow_bind_mounts=(BindAllow(str(tmp_path), read_only=True),))
    _, report = converge(engine, desired(web=bundle({"s": bind(str(tmp_path))})))
    assert "'read-only-bind-mount'" in refusals(report.results)[0]  # type: ignore[arg-type]
    _, report = converge(engine, desired(web=bundle({"s": bind(str(tmp_path), read_only=True)})))
    assert refusals(report.results) == [] and len(runtime.containers) == 1  # type: ignore[arg-type]


def test_a_pinned_revision_over_the_caps_is_not_planned(engine: Engine, runtime: FakeRuntime, records: Records) -> None:
    converge(engine, desired(web=bundle({"s": service(Deploy={"Replicas": 3})})))
    current = desired(web=bundle({"s": service()}))
    converge(engine, current)
    engine.policy = Policy(max_replicas_per_service=2)
    pin_stack(records, "web", None)
    runtime.calls.clear()
    plan, _ = converge(engine, current)
    assert "max_replicas_per_service" in (plan.stacks["web"].error or "")
    assert plan.stacks["web"].actions == [] and runtime.writes() == []
