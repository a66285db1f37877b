"""What a bundle may ask of the host: bind mounts of the Docker socket or /, and the host's network."""

from __future__ import annotations

import json

import pytest

from bundles.desired import DesiredState, StackBundle, bundle_hash
from bundles.errors import InvalidBundles
from bundles.load import parse_bundle
from bundles.policy import Policy, bind_rule, enforce, normalise, violations


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
    assert violations(mount("/var/run/docker.sock"), Policy(allow_bind_mounts=("/var/run/docker.sock",))) == []
    assert violations(mount("/var/run/./docker.sock"), Policy(allow_bind_mounts=("/var/run/docker.sock",))) == []
    assert violations(mount("/run/docker.sock"), Policy(allow_bind_mounts=("/var/run/docker.sock",))) != []


def test_volumes_and_tmpfs_are_not_bind_mounts() -> None:
    doc = {"Services": {"s": {"Image": "x", "Mounts": [{"Type": "volume", "Source": "run", "Target": "/run"}]}}}
    assert violations(stack(doc), Policy()) == []


def test_host_network_is_refused_unless_allowed() -> None:
    doc = {"Services": {"s": {"Image": "x", "Networks": ["host"]}}, "Networks": {"host": {"External": True}}}
    with pytest.raises(InvalidBundles) as info:
        enforce(stack(doc), Policy())
    assert "no-host-network" in str(info.value) and "Networks.host" in str(info.value)
    assert enforce(stack(doc), Policy(allow_host_network=True)) is not None
