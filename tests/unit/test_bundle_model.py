"""The bundle model: Swarm's defaults, every extension field, strict errors that say where and how."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from bundles import BundleError, InvalidBundles, parse_bundle
from schemas.bundle import Bundle

Doc = dict[str, Any]


def service(**fields: Any) -> Doc:
    """A valid service document with `fields` added or replaced."""
    return {"Image": "nginx:1.27", **fields}


def bundle(**fields: Any) -> Doc:
    """A one-service bundle document (service `web`) with service `fields`."""
    return {"Version": "0.1", "Services": {"web": service(**fields)}}


def parse(doc: Doc) -> Bundle:
    return parse_bundle(json.dumps(doc), "f.dab", ".dab")


def errors_of(doc: Doc) -> list[BundleError]:
    """The errors the loader reports for `doc`; fails the test when it loads."""
    with pytest.raises(InvalidBundles) as info:
        parse(doc)
    assert info.value.errors, "InvalidBundles without errors"
    return info.value.errors


# --- defaults -------------------------------------------------------------------------------------------------


def test_defaults_are_swarms() -> None:
    svc = parse(bundle()).services["web"]
    deploy = svc.deploy
    assert deploy.mode == "replicated"
    assert deploy.replicas is None
    assert deploy.replica_count == 1
    assert deploy.update_config.parallelism == 1
    assert deploy.update_config.delay == timedelta(0)
    assert deploy.update_config.monitor == timedelta(seconds=5)
    assert deploy.update_config.failure_action == "pause"
    assert deploy.update_config.order == "stop-first"
    assert deploy.update_config.max_failure_ratio == 0
    assert deploy.rollback_config.failure_action == "pause"
    assert deploy.rollback_config.parallelism == 1
    assert deploy.restart_policy.condition == "any"
    assert deploy.restart_policy.delay == timedelta(seconds=5)
    assert deploy.restart_policy.max_attempts is None
    assert deploy.placement.constraints == []
    assert deploy.resources.limits is None
    assert svc.stop_grace_period == timedelta(seconds=10)
    assert svc.stop_signal is None
    assert svc.pull_policy is None
    assert svc.networks is None
    assert svc.ports is None


def test_version_defaults_to_0_1() -> None:
    assert parse({"Services": {"web": service()}}).version == "0.1"


def test_port_protocol_defaults_to_tcp() -> None:
    port = parse(bundle(Ports=[{"Port": 80}])).services["web"].ports
    assert port is not None
    assert (port[0].protocol, port[0].port, port[0].published_port) == ("tcp", 80, None)


def test_network_defaults() -> None:
    net = parse({"Services": {"web": service()}, "Networks": {"back": {}}}).networks
    assert net is not None
    assert (net["back"].driver, net["back"].internal, net["back"].external, net["back"].labels) == (
        "bridge",
        False,
        False,
        None,
    )


# --- every extension field is accepted --------------------------------------------------------------------------


# (fields added to service `web`, what to read back from the parsed Service, the value expected there)
FIELD_CASES: list[tuple[Doc, Any, Any]] = [
    ({"Command": ["/bin/sh", "-c"]}, lambda s: s.command, ["/bin/sh", "-c"]),
    ({"Args": ["echo", "hi"]}, lambda s: s.args, ["echo", "hi"]),
    ({"Env": ["A=1", "B=", "C"]}, lambda s: s.env, ["A=1", "B=", "C"]),
    ({"Labels": {"shop.tier": "web"}}, lambda s: s.labels, {"shop.tier": "web"}),
    ({"WorkingDir": "/srv"}, lambda s: s.working_dir, "/srv"),
    ({"User": "1000:1000"}, lambda s: s.user, "1000:1000"),
    ({"Networks": ["front", "back_2"]}, lambda s: s.networks, ["front", "back_2"]),
    (
        {"Ports": [{"Protocol": "udp", "Port": 53, "PublishedPort": 5353}]},
        lambda s: (s.ports[0].protocol, s.ports[0].port, s.ports[0].published_port),
        ("udp", 53, 5353),
    ),
    ({"Ports": [{"Port": 1}, {"Port": 65535}]}, lambda s: [p.port for p in s.ports], [1, 65535]),
    ({"Ports": [{"Port": 53}, {"Port": 53, "Protocol": "udp"}]}, lambda s: len(s.ports), 2),
    ({"Deploy": {"Mode": "global"}}, lambda s: s.deploy.mode, "global"),
    ({"Deploy": {"Replicas": 0}}, lambda s: s.deploy.replica_count, 0),
    ({"Deploy": {"Replicas": 3}}, lambda s: s.deploy.replica_count, 3),
    (
        {
            "Deploy": {
                "UpdateConfig": {
                    "Parallelism": 2,
                    "Delay": "10s",
                    "FailureAction": "rollback",
                    "Monitor": "30s",
                    "MaxFailureRatio": 0.5,
                    "Order": "start-first",
                }
            }
        },
        lambda s: s.deploy.update_config.model_dump(),
        {
            "Parallelism": 2,
            "Delay": "10s",
            "FailureAction": "rollback",
            "Monitor": "30s",
            "MaxFailureRatio": 0.5,
            "Order": "start-first",
        },
    ),
    ({"Deploy": {"UpdateConfig": {"MaxFailureRatio": 1}}}, lambda s: s.deploy.update_config.max_failure_ratio, 1),
    (
        {"Deploy": {"RollbackConfig": {"Parallelism": 0, "FailureAction": "continue"}}},
        lambda s: (s.deploy.rollback_config.parallelism, s.deploy.rollback_config.failure_action),
        (0, "continue"),
    ),
    (
        {"Deploy": {"RestartPolicy": {"Condition": "on-failure", "Delay": "2s", "MaxAttempts": 3, "Window": "1m"}}},
        lambda s: s.deploy.restart_policy.model_dump(),
        {"Condition": "on-failure", "Delay": "2s", "MaxAttempts": 3, "Window": "1m0s"},
    ),
    ({"Deploy": {"RestartPolicy": {"Condition": "none"}}}, lambda s: s.deploy.restart_policy.condition, "none"),
    (
        {"Deploy": {"Placement": {"Constraints": ["node.role==manager"], "MaxReplicasPerNode": 2}}},
        lambda s: (s.deploy.placement.constraints, s.deploy.placement.max_replicas_per_node),
        (["node.role==manager"], 2),
    ),
    (
        {"Deploy": {"Resources": {"Limits": {"Cpus": "0.5", "Memory": "512M"}, "Reservations": {"Memory": "64m"}}}},
        lambda s: (s.deploy.resources.limits.cpus, s.deploy.resources.reservations.memory),
        ("0.5", "64m"),
    ),
    (
        {
            "Healthcheck": {
                "Test": ["CMD", "wget", "-q", "http://127.0.0.1/"],
                "Interval": "5s",
                "Timeout": "2s",
                "Retries": 3,
                "StartPeriod": "1s",
            }
        },
        lambda s: (s.healthcheck.test[0], s.healthcheck.interval, s.healthcheck.retries),
        ("CMD", timedelta(seconds=5), 3),
    ),
    ({"Healthcheck": {"Test": ["CMD-SHELL", "true"]}}, lambda s: s.healthcheck.test, ["CMD-SHELL", "true"]),
    ({"Healthcheck": {"Test": ["NONE"]}}, lambda s: s.healthcheck.test, ["NONE"]),
    (
        {
            "Mounts": [
                {"Type": "volume", "Source": "data", "Target": "/data"},
                {"Type": "volume", "Target": "/anon"},
                {"Type": "bind", "Source": "/etc/hosts", "Target": "/hosts", "ReadOnly": True},
                {"Type": "tmpfs", "Target": "/scratch"},
            ]
        },
        lambda s: [(m.type, m.source, m.target, m.read_only) for m in s.mounts],
        [
            ("volume", "data", "/data", False),
            ("volume", None, "/anon", False),
            ("bind", "/etc/hosts", "/hosts", True),
            ("tmpfs", None, "/scratch", False),
        ],
    ),
    ({"StopGracePeriod": "1m30s"}, lambda s: s.stop_grace_period, timedelta(seconds=90)),
    ({"StopGracePeriod": "0"}, lambda s: s.stop_grace_period, timedelta(0)),
    ({"StopSignal": "SIGINT"}, lambda s: s.stop_signal, "SIGINT"),
    ({"StopSignal": "9"}, lambda s: s.stop_signal, "9"),
    ({"PullPolicy": "if-not-present"}, lambda s: s.pull_policy, "if-not-present"),
    ({"PullPolicy": "always"}, lambda s: s.pull_policy, "always"),
    ({"PullPolicy": "never"}, lambda s: s.pull_policy, "never"),
]


@pytest.mark.parametrize(
    ("fields", "attribute", "expected"),
    FIELD_CASES,
    ids=[json.dumps(case[0], separators=(",", ":"))[:60] for case in FIELD_CASES],
)
def test_service_field_accepted(fields: Doc, attribute: Any, expected: Any) -> None:
    assert attribute(parse(bundle(**fields)).services["web"]) == expected


@pytest.mark.parametrize(
    ("network", "without_defaults"),
    [
        ({"Driver": "bridge"}, {}),
        (
            {"Driver": "macvlan", "Internal": True, "Labels": {"team": "ops"}},
            {"Driver": "macvlan", "Internal": True, "Labels": {"team": "ops"}},
        ),
        ({"External": True}, {"External": True}),
        ({"External": False, "Driver": "overlay"}, {"Driver": "overlay"}),
    ],
)
def test_top_level_network_accepted(network: Doc, without_defaults: Doc) -> None:
    parsed = parse({"Services": {"web": service(Networks=["n"])}, "Networks": {"n": network}})
    assert parsed.networks is not None
    assert parsed.networks["n"].model_dump(exclude_defaults=True) == without_defaults


@pytest.mark.parametrize("name", ["a", "web_1", "Web-API", "x" * 63, "1st"])
def test_valid_service_and_network_names(name: str) -> None:
    parsed = parse({"Services": {name: service(Networks=[name])}, "Networks": {name: {}}})
    assert list(parsed.services) == [name]


# --- invalid documents: one line naming the field and the fix -----------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "field", "hint"),
    [
        # unknown and misspelt fields name the nearest valid one
        (bundle(Imge="nginx"), "Services.web.Imge", "did you mean 'Image'?"),
        (bundle(Replicas=3), "Services.web.Replicas", "did you mean 'Deploy.Replicas'?"),
        (bundle(Deploy={"Replica": 3}), "Services.web.Deploy.Replica", "did you mean 'Replicas'?"),
        (
            bundle(Deploy={"UpdateConfig": {"Paralelism": 2}}),
            "Services.web.Deploy.UpdateConfig.Paralelism",
            "did you mean 'Parallelism'?",
        ),
        (
            bundle(Deploy={"Placement": {"MaxReplicas": 1}}),
            "Services.web.Deploy.Placement.MaxReplicas",
            "did you mean 'MaxReplicasPerNode'?",
        ),
        (bundle(image="nginx"), "Services.web.image", "did you mean 'Image'?"),
        (bundle(Frobnicate=True), "Services.web.Frobnicate", "valid fields here: Image, Command"),
        (
            {"Services": {"web": service()}, "Configs": {}},
            "Configs",
            "valid fields here: Version, Services, Networks, Volumes",
        ),
        ({"Services": {"web": service()}, "Networks": {"n": {"Drvier": "x"}}}, "Networks.n.Drvier", "'Driver'"),
        # strict types: no coercion either way
        (bundle(Deploy={"Replicas": "3"}), "Services.web.Deploy.Replicas", "expected an integer, got string '3'"),
        (bundle(Deploy={"Replicas": 1.0}), "Services.web.Deploy.Replicas", "expected an integer"),
        (bundle(Deploy={"Replicas": True}), "Services.web.Deploy.Replicas", "expected an integer"),
        (bundle(Ports=[{"Port": "80"}]), "Services.web.Ports[0].Port", "expected an integer"),
        (bundle(Image=5), "Services.web.Image", "expected a string, got int 5"),
        (bundle(User=1000), "Services.web.User", "expected a string"),
        (bundle(Env=["A=1", 2]), "Services.web.Env[1]", "expected a string"),
        (bundle(Labels={"a": 1}), "Services.web.Labels.a", "expected a string"),
        (bundle(Command="sleep 1"), "Services.web.Command", "expected a list"),
        (
            bundle(Mounts=[{"Type": "tmpfs", "Target": "/t", "ReadOnly": "yes"}]),
            "Services.web.Mounts[0].ReadOnly",
            "true or false",
        ),
        (
            bundle(Deploy={"Resources": {"Limits": {"Cpus": 0.5}}}),
            "Services.web.Deploy.Resources.Limits.Cpus",
            "expected a string",
        ),
        (bundle(Deploy=[]), "Services.web.Deploy", "expected a mapping"),
        # ranges
        (bundle(Ports=[{"Port": 0}]), "Services.web.Ports[0].Port", "1 to 65535"),
        (bundle(Ports=[{"Port": 70000}]), "Services.web.Ports[0].Port", "1 to 65535"),
        (bundle(Ports=[{"Port": 80, "PublishedPort": 0}]), "Services.web.Ports[0].PublishedPort", "1 to 65535"),
        (bundle(Ports=[{"Port": 80, "PublishedPort": 65536}]), "Services.web.Ports[0].PublishedPort", "1 to 65535"),
        (bundle(Deploy={"Replicas": -1}), "Services.web.Deploy.Replicas", "out of range"),
        (
            bundle(Deploy={"UpdateConfig": {"MaxFailureRatio": 1.5}}),
            "Services.web.Deploy.UpdateConfig.MaxFailureRatio",
            "out of range",
        ),
        # mode and literals
        (bundle(Deploy={"Mode": "global", "Replicas": 2}), "Services.web.Deploy", "set Mode: replicated"),
        (bundle(Deploy={"Mode": "Global"}), "Services.web.Deploy.Mode", "use one of 'replicated' or 'global'"),
        (bundle(Ports=[{"Port": 80, "Protocol": "sctp"}]), "Services.web.Ports[0].Protocol", "'tcp' or 'udp'"),
        (bundle(PullPolicy="missing"), "Services.web.PullPolicy", "'if-not-present'"),
        (
            bundle(Deploy={"RollbackConfig": {"FailureAction": "rollback"}}),
            "Services.web.Deploy.RollbackConfig.FailureAction",
            "'pause' or 'continue'",
        ),
        (bundle(Deploy={"UpdateConfig": {"Order": "random"}}), "Services.web.Deploy.UpdateConfig.Order", "stop-first"),
        ({"Version": "0.2", "Services": {"web": service()}}, "Version", "'0.1'"),
        # durations
        (bundle(StopGracePeriod="5"), "Services.web.StopGracePeriod", 'e.g. "5s"'),
        (bundle(StopGracePeriod=5), "Services.web.StopGracePeriod", 'such as "5s"'),
        (bundle(StopGracePeriod="-5s"), "Services.web.StopGracePeriod", "non-negative"),
        (bundle(Deploy={"UpdateConfig": {"Monitor": "5x"}}), "Services.web.Deploy.UpdateConfig.Monitor", 'e.g. "5s"'),
        (bundle(Healthcheck={"Test": ["NONE"], "Interval": "1m30"}), "Services.web.Healthcheck.Interval", 'e.g. "5s"'),
        # healthcheck Test forms
        (bundle(Healthcheck={"Test": []}), "Services.web.Healthcheck.Test", "give at least one entry"),
        (bundle(Healthcheck={"Test": ["CMD"]}), "Services.web.Healthcheck.Test", "needs a command"),
        (bundle(Healthcheck={"Test": ["CMD-SHELL"]}), "Services.web.Healthcheck.Test", "needs a command"),
        (bundle(Healthcheck={"Test": ["NONE", "x"]}), "Services.web.Healthcheck.Test", "takes no arguments"),
        (
            bundle(Healthcheck={"Test": ["curl", "-f", "x"]}),
            "Services.web.Healthcheck.Test",
            '"CMD", "CMD-SHELL" or "NONE"',
        ),
        (bundle(Healthcheck={"Test": "curl -f x"}), "Services.web.Healthcheck.Test", "expected a list"),
        (bundle(Healthcheck={"Interval": "5s"}), "Services.web.Healthcheck.Test", "add Test"),
        # mounts
        (bundle(Mounts=[{"Type": "bind", "Target": "/d"}]), "Services.web.Mounts[0]", "absolute path on the host"),
        (
            bundle(Mounts=[{"Type": "bind", "Source": "data", "Target": "/d"}]),
            "Services.web.Mounts[0]",
            "absolute path",
        ),
        (
            bundle(Mounts=[{"Type": "tmpfs", "Source": "x", "Target": "/d"}]),
            "Services.web.Mounts[0]",
            "takes no Source",
        ),
        (
            bundle(Mounts=[{"Type": "volume", "Source": "d", "Target": "data"}]),
            "Services.web.Mounts[0].Target",
            "absolute path",
        ),
        (
            bundle(Mounts=[{"Type": "volume", "Source": "a b", "Target": "/d"}]),
            "Services.web.Mounts[0]",
            "invalid volume name",
        ),
        (bundle(Mounts=[{"Type": "npipe", "Target": "/d"}]), "Services.web.Mounts[0].Type", "'volume'"),
        (bundle(Mounts=[{"Type": "volume", "Source": "d"}]), "Services.web.Mounts[0].Target", "add Target"),
        (
            bundle(Mounts=[{"Type": "tmpfs", "Target": "/d"}, {"Type": "volume", "Source": "v", "Target": "/d"}]),
            "Services.web",
            "own Target",
        ),
        # labels and env
        (bundle(Labels={"dabctl.x": "1"}), "Services.web.Labels", "reserved"),
        (bundle(Labels={"dabctl.stack": "other"}), "Services.web.Labels", "reserved"),
        (bundle(Labels={"com.docker.stack.namespace": "x"}), "Services.web.Labels", "reserved"),
        (bundle(Labels={"": "x"}), "Services.web.Labels", "non-empty key"),
        (bundle(Env=["=value"]), "Services.web.Env", '"NAME=value"'),
        (bundle(Env=[""]), "Services.web.Env", '"NAME=value"'),
        (bundle(Env=["MY VAR=1"]), "Services.web.Env", '"NAME=value"'),
        # ports
        (bundle(Ports=[{"Port": 80}, {"Port": 80, "Protocol": "tcp"}]), "Services.web", "listed twice"),
        (
            bundle(Ports=[{"Port": 80, "PublishedPort": 8080}, {"Port": 81, "PublishedPort": 8080}]),
            "Services.web",
            "used twice",
        ),
        # names
        ({"Services": {"bad name": service()}}, "Services", "invalid service name 'bad name'"),
        ({"Services": {"-web": service()}}, "Services", "invalid service name"),
        ({"Services": {"x" * 64: service()}}, "Services", "at most 63"),
        ({"Services": {"web.1": service()}}, "Services", "invalid service name"),
        ({"Services": {"web": service()}, "Networks": {"bad.net": {}}}, "Networks", "invalid network name"),
        (bundle(Networks=["bad net"]), "Services.web.Networks[0]", "network name must match"),
        (bundle(Image="nginx latest"), "Services.web.Image", "no spaces"),
        (bundle(Image=""), "Services.web.Image", "fill it in"),
        (bundle(StopSignal="term"), "Services.web.StopSignal", '"SIGTERM"'),
        # networks
        (
            {"Services": {"web": service()}, "Networks": {"n": {"External": True, "Driver": "overlay"}}},
            "Networks.n",
            "remove Driver",
        ),
        (
            {"Services": {"web": service()}, "Networks": {"n": {"External": True, "Labels": {"a": "b"}}}},
            "Networks.n",
            "remove Driver, Internal and Labels",
        ),
        # resources
        (
            bundle(Deploy={"Resources": {"Limits": {"Cpus": "half"}}}),
            "Services.web.Deploy.Resources.Limits.Cpus",
            '"0.5"',
        ),
        (
            bundle(Deploy={"Resources": {"Limits": {"Cpus": "0"}}}),
            "Services.web.Deploy.Resources.Limits.Cpus",
            "greater than 0",
        ),
        (
            bundle(Deploy={"Resources": {"Limits": {"Memory": "lots"}}}),
            "Services.web.Deploy.Resources.Limits.Memory",
            '"512M"',
        ),
        (
            bundle(Deploy={"Resources": {"Limits": {"Memory": "1k"}}}),
            "Services.web.Deploy.Resources.Limits.Memory",
            "at least 6M",
        ),
        # shape
        ({"Services": {}}, "Services", "give at least one entry"),
        ({"Version": "0.1"}, "Services", "add Services"),
        ({"Services": {"web": {}}}, "Services.web.Image", "add Image"),
    ],
)
def test_invalid_field(doc: Doc, field: str, hint: str) -> None:
    first = errors_of(doc)[0]
    assert (first.file, first.field) == ("f.dab", field)
    assert hint in str(first)
    assert str(first).startswith(f"f.dab: {field}: ")
    assert "\n" not in str(first)


@pytest.mark.parametrize("text", ["100000000000h", "9" * 400 + "s"], ids=["past-timedelta-max", "float-inf"])
def test_huge_duration_is_a_field_error_not_a_traceback(text: str) -> None:
    # Go refuses durations past ~292 years; here the overflow must still become one line naming the field.
    [err] = errors_of(bundle(StopGracePeriod=text))
    assert err.field == "Services.web.StopGracePeriod"


def test_published_port_used_by_two_services_names_both() -> None:
    doc = {
        "Services": {
            "a": service(Ports=[{"Port": 80, "PublishedPort": 8080}]),
            "b": service(Ports=[{"Port": 81, "PublishedPort": 8080}]),
        }
    }
    [err] = errors_of(doc)
    assert "8080/tcp" in err.message
    assert "'a'" in err.message and "'b'" in err.message


def test_same_published_port_on_other_protocol_is_fine() -> None:
    doc = {
        "Services": {
            "a": service(Ports=[{"Port": 53, "PublishedPort": 53}]),
            "b": service(Ports=[{"Port": 53, "Protocol": "udp", "PublishedPort": 53}]),
        }
    }
    assert set(parse(doc).services) == {"a", "b"}


def test_every_problem_in_a_document_is_reported() -> None:
    errs = errors_of(bundle(Imge="x", Deploy={"Replicas": "2"}, Ports=[{"Port": 0}]))
    assert {e.field for e in errs} >= {
        "Services.web.Imge",
        "Services.web.Deploy.Replicas",
        "Services.web.Ports[0].Port",
    }


@pytest.mark.parametrize(
    "doc",
    [
        bundle(Imge="nginx"),
        bundle(Deploy={"Replicas": "3"}),
        bundle(Ports=[{"Port": 70000}]),
        {"Services": {"web": service()}, "Extra": 1},
    ],
)
def test_model_alone_raises_validation_error(doc: Doc) -> None:
    with pytest.raises(ValidationError):
        Bundle.model_validate(doc)


def test_model_is_immutable() -> None:
    parsed = parse(bundle())
    with pytest.raises(ValidationError):
        parsed.services["web"].image = "other"


def test_snake_case_names_are_not_accepted_in_files() -> None:
    with pytest.raises(ValidationError):
        Bundle.model_validate({"services": {"web": {"image": "x"}}})


# --- round trip ------------------------------------------------------------------------------------------------

FULL: Doc = {
    "Version": "0.1",
    "Services": {
        "frontend": {
            "Image": "dabctl/sample:1",
            "Command": ["/bin/serve"],
            "Args": ["--port", "8080"],
            "Env": ["PORT=8080", "EMPTY="],
            "Labels": {"shop.tier": "web"},
            "Ports": [{"Protocol": "tcp", "Port": 8080, "PublishedPort": 80}, {"Protocol": "udp", "Port": 53}],
            "WorkingDir": "/srv",
            "User": "nobody",
            "Networks": ["default", "backend"],
            "Healthcheck": {"Test": ["CMD", "true"], "Interval": "5s", "Timeout": "1.5s", "Retries": 3},
            "Deploy": {
                "Replicas": 3,
                "UpdateConfig": {"Parallelism": 2, "Delay": "1m30s", "Order": "start-first", "MaxFailureRatio": 0.25},
                "RollbackConfig": {"FailureAction": "continue", "Monitor": "300ms"},
                "RestartPolicy": {"Condition": "on-failure", "Delay": "2s", "MaxAttempts": 5, "Window": "2h45m"},
                "Placement": {"Constraints": ["node.labels.zone==a"], "MaxReplicasPerNode": 1},
                "Resources": {"Limits": {"Cpus": "0.5", "Memory": "64M"}, "Reservations": {"Cpus": "0.1"}},
            },
            "Mounts": [
                {"Type": "volume", "Source": "data", "Target": "/data"},
                {"Type": "bind", "Source": "/etc/hosts", "Target": "/etc/hosts", "ReadOnly": True},
                {"Type": "tmpfs", "Target": "/tmp"},
            ],
            "StopGracePeriod": "10us",
            "StopSignal": "SIGINT",
            "PullPolicy": "never",
        },
        "agent": {"Image": "busybox", "Deploy": {"Mode": "global"}, "StopGracePeriod": "0"},
    },
    "Networks": {
        "backend": {"Driver": "bridge", "Internal": True, "Labels": {"shop.net": "backend"}},
        "shared": {"External": True},
    },
}


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(bundle(), id="minimal"),
        pytest.param(bundle(Deploy={"Replicas": 0}, StopGracePeriod="10s"), id="explicit-defaults"),
        pytest.param(bundle(Healthcheck={"Test": ["NONE"]}, Mounts=[{"Type": "tmpfs", "Target": "/t"}]), id="small"),
        pytest.param(FULL, id="full"),
    ],
)
def test_round_trip(doc: Doc) -> None:
    b = parse(doc)
    assert Bundle.model_validate_json(b.model_dump_json(exclude_defaults=True)) == b
    assert Bundle.model_validate(json.loads(b.model_dump_json())) == b
    assert parse(json.loads(b.model_dump_json(exclude_defaults=True))) == b


def test_dump_uses_file_names_and_go_durations() -> None:
    dumped = json.loads(parse(FULL).model_dump_json(exclude_defaults=True))
    front = dumped["Services"]["frontend"]
    assert front["Deploy"]["UpdateConfig"]["Delay"] == "1m30s"
    assert front["Deploy"]["RestartPolicy"]["Window"] == "2h45m0s"
    assert front["StopGracePeriod"] == "10us"
    assert (
        "StopGracePeriod" not in dumped["Services"]["agent"] or dumped["Services"]["agent"]["StopGracePeriod"] == "0s"
    )
