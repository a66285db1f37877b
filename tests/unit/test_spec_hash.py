"""The spec hash covers only what changes a container; networks resolve to engine names."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from bundles import StackBundle, desired_networks, parse_bundle, service_targets
from bundles.desired import ServiceTarget, bundle_hash, canonical_json

Doc = dict[str, Any]
BASE: Doc = {"Image": "nginx:1.27"}


def stack(doc: Doc, name: str = "shop") -> StackBundle:
    """A StackBundle as the loader would build it from the bundle document `doc`."""
    b = parse_bundle(json.dumps(doc), f"{name}.dab", ".dab")
    return StackBundle(
        name=name, file=f"{name}.dab", bundle=b, content="", revision="dir@sha256:0", bundle_hash=bundle_hash(b)
    )


def target(service: Doc, networks: Doc | None = None, name: str = "shop") -> ServiceTarget:
    """The ServiceTarget of service `web` in a one-service stack."""
    doc: Doc = {"Services": {"web": service}}
    if networks is not None:
        doc["Networks"] = networks
    [t] = service_targets(stack(doc, name))
    return t


def with_fields(**fields: Any) -> Doc:
    return {**BASE, **fields}


# --- what is in the hash and what is not ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"Image": "nginx:1.28"},
        {"Image": "nginx@sha256:" + "0" * 64},
        {"Command": ["/bin/sh", "-c"]},
        {"Args": ["sleep", "1"]},
        {"Env": ["A=1"]},
        {"Labels": {"shop.tier": "web"}},
        {"Mounts": [{"Type": "tmpfs", "Target": "/t"}]},
        {"Mounts": [{"Type": "volume", "Source": "data", "Target": "/data"}]},
        {"User": "nobody"},
        {"WorkingDir": "/srv"},
        {"Healthcheck": {"Test": ["NONE"]}},
        {"Healthcheck": {"Test": ["CMD", "true"], "Interval": "5s"}},
        {"Deploy": {"Resources": {"Limits": {"Cpus": "0.5"}}}},
        {"Deploy": {"Resources": {"Limits": {"Memory": "64M"}}}},
        {"Deploy": {"Resources": {"Reservations": {"Memory": "64M"}}}},
        {"Networks": ["back"]},
        {"Networks": ["default", "back"]},
        {"StopGracePeriod": "5s"},
        {"StopGracePeriod": "0"},
        {"StopSignal": "SIGINT"},
    ],
    ids=lambda fields: json.dumps(fields, separators=(",", ":"))[:60],
)
def test_field_changes_the_hash(fields: Doc) -> None:
    assert target(with_fields(**fields)).spec_hash != target(BASE).spec_hash


@pytest.mark.parametrize(
    "fields",
    [
        {"Deploy": {"Replicas": 3}},
        {"Deploy": {"Replicas": 0}},
        {"Deploy": {"Mode": "global"}},
        {"Deploy": {"UpdateConfig": {"Parallelism": 2, "Order": "start-first", "Monitor": "1m"}}},
        {"Deploy": {"RollbackConfig": {"Parallelism": 0, "FailureAction": "continue"}}},
        {"Deploy": {"RestartPolicy": {"Condition": "on-failure", "Delay": "1s", "MaxAttempts": 3}}},
        {"Deploy": {"Placement": {"Constraints": ["node.role==manager"], "MaxReplicasPerNode": 1}}},
        {"PullPolicy": "always"},
        {"PullPolicy": "never"},
        {"Ports": [{"Port": 80}]},
        {"Ports": [{"Port": 80, "PublishedPort": 8080, "Protocol": "tcp"}]},
        # Defaults written out do not restart anything.
        {"StopGracePeriod": "10s"},
        {"StopGracePeriod": "10000ms"},
        {"Networks": ["default"]},
        {"Deploy": {"Mode": "replicated", "Resources": {}}},
        {"Deploy": {"RestartPolicy": {"Condition": "any", "Delay": "5s"}}},
    ],
    ids=lambda fields: json.dumps(fields, separators=(",", ":"))[:60],
)
def test_field_does_not_change_the_hash(fields: Doc) -> None:
    assert target(with_fields(**fields)).spec_hash == target(BASE).spec_hash


@pytest.mark.parametrize(
    ("written", "implicit"),
    [
        (
            {"Mounts": [{"Type": "tmpfs", "Target": "/t", "ReadOnly": False}]},
            {"Mounts": [{"Type": "tmpfs", "Target": "/t"}]},
        ),
        ({"Ports": [{"Port": 80, "Protocol": "tcp"}], "Env": ["A=1"]}, {"Env": ["A=1"]}),
        ({"Healthcheck": {"Test": ["NONE"], "Retries": None}}, {"Healthcheck": {"Test": ["NONE"]}}),
    ],
)
def test_defaults_inside_nested_fields_do_not_change_the_hash(written: Doc, implicit: Doc) -> None:
    assert target(with_fields(**written)).spec_hash == target(with_fields(**implicit)).spec_hash


def test_top_level_network_settings_do_not_change_the_container_hash() -> None:
    # A network's Driver/Labels recreate the network, not the container spec: the network reconciler handles them.
    plain = target(with_fields(Networks=["back"]))
    labelled = target(with_fields(Networks=["back"]), {"back": {"Labels": {"a": "b"}, "Internal": True}})
    assert plain.spec_hash == labelled.spec_hash


def test_network_order_does_not_change_the_hash() -> None:
    a = target(with_fields(Networks=["default", "back"]))
    b = target(with_fields(Networks=["back", "default"]))
    assert a.spec_hash == b.spec_hash


@pytest.mark.parametrize(
    ("other_stack", "other_service"),
    [("shop2", "web"), ("shop", "api")],
)
def test_stack_and_service_names_are_in_the_hash(other_stack: str, other_service: str) -> None:
    # Network names and aliases derive from them, and those change the container.
    [moved] = service_targets(stack({"Services": {other_service: BASE}}, other_stack))
    assert moved.spec_hash != target(BASE).spec_hash


def test_spec_document_holds_only_container_fields() -> None:
    full = with_fields(
        Command=["/bin/serve"],
        Args=["-v"],
        Env=["A=1"],
        Labels={"a": "b"},
        Ports=[{"Port": 80, "PublishedPort": 8080}],
        WorkingDir="/srv",
        User="nobody",
        Networks=["back"],
        Deploy={
            "Replicas": 2,
            "UpdateConfig": {"Parallelism": 2},
            "RestartPolicy": {"Condition": "none"},
            "Placement": {"Constraints": ["node.labels.x==y"]},
            "Resources": {"Limits": {"Cpus": "1"}},
        },
        Healthcheck={"Test": ["NONE"]},
        Mounts=[{"Type": "tmpfs", "Target": "/t"}],
        StopGracePeriod="1m30s",
        StopSignal="SIGINT",
        PullPolicy="always",
    )
    assert set(target(full).spec) == {
        "Image",
        "Command",
        "Args",
        "Env",
        "Labels",
        "Mounts",
        "User",
        "WorkingDir",
        "Healthcheck",
        "Resources",
        "Networks",
        "StopGracePeriod",
        "StopSignal",
    }


# --- format and stability ---------------------------------------------------------------------------------------------


def test_minimal_spec_document() -> None:
    t = target(with_fields(Env=["A=1"]))
    assert dict(t.spec) == {"Image": "nginx:1.27", "Env": ["A=1"], "Networks": {"shop_default": ["web"]}}


def test_hash_is_versioned_and_derived_from_canonical_json() -> None:
    t = target(with_fields(Env=["A=1"], StopGracePeriod="1m30s"))
    text = "v1:" + canonical_json(t.spec)
    assert t.spec_hash == "v1-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    assert canonical_json(t.spec) == (
        '{"Env":["A=1"],"Image":"nginx:1.27","Networks":{"shop_default":["web"]},"StopGracePeriod":"1m30s"}'
    )


def test_hash_value_is_stable() -> None:
    # A literal: an accidental change to the document or its encoding would restart every container on upgrade.
    assert target(with_fields(Env=["A=1"])).spec_hash == "v1-5aaed62c55a523d3"


def test_hash_is_deterministic_across_key_order() -> None:
    a = target({"Image": "x", "Env": ["A=1"], "Labels": {"a": "1", "b": "2"}})
    b = target({"Labels": {"b": "2", "a": "1"}, "Env": ["A=1"], "Image": "x"})
    assert a.spec_hash == b.spec_hash


# --- networks -----------------------------------------------------------------------------------------------------


def network_names(doc: Doc, name: str = "shop") -> list[tuple[str, str, bool]]:
    """(name in bundle, engine name, external) of every network the stack needs."""
    return [(n.name, n.full_name, n.external) for n in desired_networks(stack(doc, name))]


@pytest.mark.parametrize(
    ("doc", "networks", "per_service"),
    [
        pytest.param(
            {"Services": {"web": BASE}},
            [("default", "shop_default", False)],
            {"web": ("shop_default",)},
            id="none-named-joins-default",
        ),
        pytest.param(
            {"Services": {"web": with_fields(Networks=["back"])}},
            [("back", "shop_back", False)],
            {"web": ("shop_back",)},
            id="undefined-name-is-created",
        ),
        pytest.param(
            {"Services": {"web": with_fields(Networks=["shared"])}, "Networks": {"shared": {"External": True}}},
            [("shared", "shared", True)],
            {"web": ("shared",)},
            id="external-keeps-its-name",
        ),
        pytest.param(
            {
                "Services": {"web": with_fields(Networks=["front", "shared"]), "db": BASE},
                "Networks": {"shared": {"External": True}, "unused": {}},
            },
            [
                ("default", "shop_default", False),
                ("front", "shop_front", False),
                ("shared", "shared", True),
                ("unused", "shop_unused", False),
            ],
            {"db": ("shop_default",), "web": ("shop_front", "shared")},
            id="mixed",
        ),
        pytest.param(
            {"Services": {"web": with_fields(Networks=["b", "a"])}},
            [("a", "shop_a", False), ("b", "shop_b", False)],
            {"web": ("shop_b", "shop_a")},
            id="service-keeps-its-order",
        ),
    ],
)
def test_network_resolution(
    doc: Doc, networks: list[tuple[str, str, bool]], per_service: dict[str, tuple[str, ...]]
) -> None:
    assert network_names(doc) == networks
    assert {t.name: t.networks for t in service_targets(stack(doc))} == per_service


def test_undefined_network_gets_default_settings() -> None:
    [net] = desired_networks(stack({"Services": {"web": with_fields(Networks=["back"])}}))
    assert (net.spec.driver, net.spec.internal, net.spec.labels, net.stack) == ("bridge", False, None, "shop")


def test_aliases_are_the_service_name_on_every_network() -> None:
    t = target(with_fields(Networks=["front", "shared"]), {"shared": {"External": True}})
    assert t.spec["Networks"] == {"shop_front": ["web"], "shared": ["web"]}


def test_external_network_changes_the_engine_name_and_hash() -> None:
    managed = target(with_fields(Networks=["shared"]))
    external = target(with_fields(Networks=["shared"]), {"shared": {"External": True}})
    assert managed.networks == ("shop_shared",)
    assert external.networks == ("shared",)
    assert managed.spec_hash != external.spec_hash


def test_service_targets_are_in_name_order() -> None:
    doc = {"Services": {"web": BASE, "api": BASE, "db": BASE}}
    targets = service_targets(stack(doc))
    assert [t.name for t in targets] == ["api", "db", "web"]
    assert [t.full_name for t in targets] == ["shop_api", "shop_db", "shop_web"]
