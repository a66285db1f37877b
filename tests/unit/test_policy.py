"""What a bundle may ask of the host: bind mounts of the Docker socket or /, and the host's network."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bundles.desired import DesiredState, StackBundle, bundle_hash
from bundles.errors import InvalidBundles
from bundles.load import parse_bundle
from bundles.policy import BindAllow, Denied, Policy, bind_rule, enforce, normalise, violations


def stack(doc: dict[str, object]) -> DesiredState:
    bundle = parse_bundle(json.dumps(doc), "web.dab", ".dab")
    return DesiredState(
        {
            "web": StackBundle(
                name="web",
                file="web.dab",
                bundle=bundle,
                content="",
                revision="dir@sha256:0",
                bundle_hash=bundle_hash(bundle),
            )
        }
    )


def mount(source: str) -> DesiredState:
    return stack({"Services": {"s": {"Image": "x", "Mounts": [{"Type": "bind", "Source": source, "Target": "/m"}]}}})


@pytest.mark.parametrize(
    ("source", "normal", "rule"),
    [
        ("/", "/", "no-host-root"),
        ("//", "/", "no-host-root"),
        ("/var/..", "/", "no-host-root"),
        ("/var/run/docker.sock", "/var/run/docker.sock", "no-docker-socket"),
        ("/run/docker.sock", "/run/docker.sock", "no-docker-socket"),
        ("/var/run", "/var/run", "no-docker-socket"),
        ("/run", "/run", "no-docker-socket"),
        ("/var", "/var", "no-docker-socket"),
        ("//var/./run/..", "/var", "no-docker-socket"),
        ("/var/run/../run/./docker.sock", "/var/run/docker.sock", "no-docker-socket"),
        ("/srv/data", "/srv/data", None),
        ("/var/lib/app", "/var/lib/app", None),
        ("/run/user/1000", "/run/user/1000", None),
        ("/var/run-other", "/var/run-other", None),
        ("/proc", "/proc", "no-host-proc"),
        ("/proc/1/root", "/proc/1/root", "no-host-proc"),
        ("/proc/self/../1/root/etc", "/proc/1/root/etc", "no-host-proc"),
        ("/srv/../proc/sys", "/proc/sys", "no-host-proc"),
        ("/process", "/process", None),
    ],
)
def test_bind_rules_after_normalising(source: str, normal: str, rule: str | None) -> None:
    assert normalise(source) == normal
    assert bind_rule(source) == rule


def test_refusals_name_file_field_rule_and_the_exception_to_write() -> None:
    errors = violations(mount("/var/run/docker.sock"), Policy())
    assert [str(e) for e in errors] == [
        "web.dab: Services.s.Mounts[0].Source: bind mount of /var/run/docker.sock (gives the container the Docker "
        "socket) is refused by policy rule 'no-docker-socket'; mount something narrower, or allow it in the agent "
        "config: allow_bind_mounts: [/var/run/docker.sock]"
    ]


def test_proc_is_refused_naming_the_rule_unless_allowed() -> None:
    [error] = violations(mount("/proc/1/root"), Policy())
    assert error.field == "Services.s.Mounts[0].Source"
    assert "policy rule 'no-host-proc'" in error.message
    assert error.fix.endswith("allow_bind_mounts: [/proc/1/root]")
    assert violations(mount("/proc/1/root"), Policy(allow_bind_mounts=("/proc/1/root",))) == []
    assert violations(mount("/proc/1/root"), Policy(allow_bind_mounts=("/proc",))) != []


def test_named_exceptions_allow_exactly_that_path() -> None:
    # Existing configs keep their meaning: this entry still allows the socket, and only the socket. /var/run is
    # read as /run (a link on every supported host), so both spellings name the one file.
    socket = Policy(allow_bind_mounts=("/var/run/docker.sock",))
    assert violations(mount("/var/run/docker.sock"), socket) == []
    assert violations(mount("/var/run/./docker.sock"), socket) == []
    assert violations(mount("/run/docker.sock"), socket) == []
    for other in ("/var/run", "/run/docker", "/var/run/docker/containerd/containerd.sock", "/srv/data"):
        assert violations(mount(other), socket) != [], other


def test_volumes_and_tmpfs_are_not_bind_mounts() -> None:
    doc = {"Services": {"s": {"Image": "x", "Mounts": [{"Type": "volume", "Source": "run", "Target": "/run"}]}}}
    assert violations(stack(doc), Policy()) == []


def test_host_network_is_refused_unless_allowed() -> None:
    doc = {"Services": {"s": {"Image": "x", "Networks": ["host"]}}, "Networks": {"host": {"External": True}}}
    with pytest.raises(InvalidBundles) as info:
        enforce(stack(doc), Policy())
    assert "no-host-network" in str(info.value) and "Networks.host" in str(info.value)
    assert enforce(stack(doc), Policy(allow_host_network=True)) is not None


def mounts(source: str, read_only: bool = False) -> DesiredState:
    m = {"Type": "bind", "Source": source, "Target": "/m", "ReadOnly": read_only}
    return stack({"Services": {"s": {"Image": "x", "Mounts": [m]}}})


def rules(state: DesiredState, policy: Policy) -> list[str]:
    """The rule each refusal names (the text quotes it: 'policy rule 'NAME'')."""
    return [e.message.split("policy rule '", 1)[1].split("'", 1)[0] for e in violations(state, policy)]


STATE_AND_CONFIG = Policy(
    allow_bind_mounts=("/",),
    protected=(
        Denied("/srv/dabctl-state", "no-dabctl-state", "dabctl's state"),
        Denied("/opt/dabctl", "no-dabctl-state", "dabctl's configuration"),
        Denied("/srv/engine/docker.sock", "no-docker-socket", "the Docker socket"),
    ),
)


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("/var/run/docker/containerd/containerd.sock", "no-docker-socket"),
        ("/run/docker/containerd/containerd.sock", "no-docker-socket"),
        ("/run/docker", "no-docker-socket"),
        ("/run/docker.sock", "no-docker-socket"),
        ("/run/dockershim.sock", "no-docker-socket"),
        ("/run/containerd/containerd.sock", "no-docker-socket"),
        ("/run/runc", "no-docker-socket"),
        ("/var/lib/docker", "no-docker-socket"),
        ("/var/lib/docker/volumes/x/_data", "no-docker-socket"),
        ("/var/lib/containerd", "no-docker-socket"),
        ("/etc/docker/daemon.json", "no-docker-socket"),
        ("/var/lib", "no-docker-socket"),  # holds /var/lib/docker
        ("/var", "no-docker-socket"),
        ("/run", "no-docker-socket"),
        ("/var/run", "no-docker-socket"),
        ("/etc", "no-host-system"),
        ("/etc/shadow", "no-host-system"),
        ("/root", "no-host-system"),
        ("/root/.ssh", "no-host-system"),
        ("/sys", "no-host-system"),
        ("/sys/fs/cgroup", "no-host-system"),
        ("/dev", "no-host-system"),
        ("/dev/sda", "no-host-system"),
        ("/boot", "no-host-system"),
        ("/", "no-host-root"),
        ("/srv/..", "no-host-root"),
        ("/proc", "no-host-proc"),
        ("/proc/1/root", "no-host-proc"),
        ("/var/lib/dabctl", "no-dabctl-state"),
        ("/etc/dabctl", "no-dabctl-state"),
        ("/srv/dabctl-state/state.db", "no-dabctl-state"),
        ("/srv", "no-dabctl-state"),  # holds the state directory
        ("/opt/dabctl/agent.yaml", "no-dabctl-state"),
        ("/srv/engine/docker.sock", "no-docker-socket"),
        ("/srv/engine", "no-docker-socket"),
    ],
)
def test_the_deny_set_wins_over_a_prefix_entry(source: str, rule: str) -> None:
    # (An entry of `/` names `/` exactly: only for `/` itself is another prefix entry needed.)
    policy = STATE_AND_CONFIG if normalise(source) != "/" else replace(STATE_AND_CONFIG, allow_bind_mounts=("/srv",))
    assert rules(mounts(source), policy) == [rule]
    assert rules(mounts(source, read_only=True), policy) == [rule], "read-only does not make it safe"


@pytest.mark.parametrize(
    "source", ["/srv/data", "/home/app", "/opt/app/conf", "/run/user/1000", "/var/lib/app", "/mnt/x", "/tmp/x"]
)
def test_bind_mounts_are_denied_by_default(source: str) -> None:
    [error] = violations(mounts(source), Policy())
    assert "policy rule 'no-bind-mounts'" in error.message
    assert error.fix.endswith(f"allow_bind_mounts: [{source}] (or [{{path: {source}, read_only: true}}])")


def test_an_entry_allows_its_path_and_everything_under_it_and_nothing_beside() -> None:
    policy = Policy(allow_bind_mounts=("/srv/data",))
    assert violations(mounts("/srv/data"), policy) == []
    assert violations(mounts("/srv/data/sub/dir"), policy) == []
    assert violations(mounts("/srv/data/../data/x"), policy) == []
    assert rules(mounts("/srv/database"), policy) == ["no-bind-mounts"]
    assert rules(mounts("/srv"), policy) == ["no-bind-mounts"]
    assert rules(mounts("/srv/data/../other"), policy) == ["no-bind-mounts"]


def test_a_read_only_entry_allows_read_only_mounts_only() -> None:
    policy = Policy(allow_bind_mounts=("/srv", BindAllow("/srv/secrets", read_only=True)))
    assert violations(mounts("/srv/secrets/tls", read_only=True), policy) == []
    [error] = violations(mounts("/srv/secrets/tls"), policy)
    assert (
        "policy rule 'read-only-bind-mount'" in error.message and "allows /srv/secrets read-only only" in error.message
    )
    assert error.fix == "set ReadOnly: true on the mount"
    assert violations(mounts("/srv/app"), policy) == [], "the closest entry decides"


def test_only_an_exact_entry_opens_the_deny_set() -> None:
    assert violations(mounts("/etc/ssl/certs"), Policy(allow_bind_mounts=("/etc/ssl/certs",))) == []
    assert rules(mounts("/etc/ssl/certs/x"), Policy(allow_bind_mounts=("/etc/ssl/certs",))) == ["no-host-system"]
    assert rules(mounts("/etc/ssl"), Policy(allow_bind_mounts=("/etc",))) == ["no-host-system"]
    ro = Policy(allow_bind_mounts=(BindAllow("/var/run/docker.sock", read_only=True),))
    assert rules(mounts("/var/run/docker.sock"), ro) == ["read-only-bind-mount"]
    assert violations(mounts("/var/run/docker.sock", read_only=True), ro) == []


def counts(services: int, replicas: int, stacks: int = 1) -> DesiredState:
    out = {}
    for i in range(stacks):
        name = f"s{i}"
        doc = {"Services": {f"v{j}": {"Image": "x", "Deploy": {"Replicas": replicas}} for j in range(services)}}
        bundle = parse_bundle(json.dumps(doc), f"{name}.dab", ".dab")
        out[name] = StackBundle(
            name=name, file=f"{name}.dab", bundle=bundle, content="", revision="r", bundle_hash=bundle_hash(bundle)
        )
    return DesiredState(out)


CAPS = Policy(max_replicas_per_service=5, max_services_per_stack=3, max_stacks=2, max_containers_per_node=20)


@pytest.mark.parametrize(
    ("state", "refused"),
    [
        (counts(3, 5, 1), []),
        (counts(1, 6), ["max_replicas_per_service"]),
        (counts(4, 1), ["max_services_per_stack"]),
        (counts(1, 1, 3), ["max_stacks"]),
        (counts(3, 4, 2), ["max_containers_per_node"]),
        (counts(3, 5, 2), ["max_containers_per_node"]),
        (
            counts(4, 6, 3),
            [
                *["max_services_per_stack", *["max_replicas_per_service"] * 4] * 3,
                "max_stacks",
                "max_containers_per_node",
            ],
        ),
    ],
)
def test_counts_are_capped_before_anything_is_planned(state: DesiredState, refused: list[str]) -> None:
    assert rules(state, CAPS) == refused


def test_a_million_containers_are_refused_in_one_line_each() -> None:
    # The 5.8 KB bundle: 100 services of 10,000 replicas.
    errors = violations(counts(100, 10_000), Policy())
    assert len(errors) == 100 + 1  # each service, the containers cap
    assert str(errors[0]).startswith("s0.dab: Services.v0.Deploy.Replicas: 10000 is more than the agent config's")
    assert any("1000000 is more than the agent config's max_containers_per_node (2000)" in str(e) for e in errors)
    assert all("\n" not in str(e) for e in errors)
