"""Seeded invalid bundles through `dabctl reconcile --once` behind the recording proxy: zero Docker writes.

Each case puts one invalid file next to one valid stack in a fresh source directory. The pass must exit 1, print
one line naming the file and the field (or the line and column), no traceback, and make no mutating Docker call:
an invalid source changes nothing, the valid stack beside it included. One proxy serves every case.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.quoting import printable
from tests.integration.conftest import IMAGE, Workspace, service
from tests.support.dockerproxy import DockerProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Bad:
    """An invalid file `<prefix>-<name><suffix>` and what its one error line must contain after the path."""

    id: str
    content: dict[str, Any] | str | bytes
    where: str
    _: KW_ONLY
    name: str = "bad"
    suffix: str = ".dab"


VALID = {"Services": {"s": service()}}


def svc(**fields: Any) -> dict[str, Any]:
    return {"Services": {"s": {"Image": IMAGE, **fields}}}


CASES = [
    Bad("misspelt field", svc(Comand=["sh"]), ": Services.s.Comand: unknown field; did you mean 'Command'?"),
    Bad("wrong type", svc(Deploy={"Replicas": "2"}), ": Services.s.Deploy.Replicas: expected an integer"),
    Bad("port 70000", svc(Ports=[{"Port": 70000}]), ": Services.s.Ports[0].Port: 70000 is not a valid port"),
    Bad("bad duration", svc(StopGracePeriod="5x"), ": Services.s.StopGracePeriod: invalid duration '5x'"),
    Bad("global with replicas", svc(Deploy={"Mode": "global", "Replicas": 2}), ": Services.s.Deploy: Replicas"),
    Bad("reserved label", svc(Labels={"dabctl.stack": "other"}), ": Services.s.Labels: label 'dabctl.stack'"),
    Bad("bind without source", svc(Mounts=[{"Type": "bind", "Target": "/d"}]), ": Services.s.Mounts[0]: a bind"),
    Bad("json syntax", '{\n  "Services": {\n    "s": {"Image": "x",}\n  }\n}\n', ":3:24: invalid JSON"),
    Bad("yaml tab", f"Services:\n  s:\n\tImage: {IMAGE}\n", ":3:1: invalid YAML: found character", suffix=".yaml"),
    Bad("duplicate stack file", svc(), ": stack '{prefix}-ok' is also defined by", name="ok", suffix=".yaml"),
    Bad("invalid stack file name", svc(), ": invalid stack name '{prefix}-bad_name'", name="bad_name"),
    Bad("unknown top-level key", {"Servics": {"s": {"Image": IMAGE}}}, ": Servics: unknown field; did you mean"),
    Bad("empty services", {"Services": {}}, ": Services: is empty"),
    Bad("env without name", svc(Env=["=value"]), ": Services.s.Env: invalid Env entry '=...' (value not shown)"),
    Bad("healthcheck form", svc(Healthcheck={"Test": ["curl", "-f", "x"]}), ": Services.s.Healthcheck.Test: Test"),
    Bad(
        "duplicate published port",
        svc(Ports=[{"Port": 80, "PublishedPort": 8080}, {"Port": 81, "PublishedPort": 8080}]),
        ": Services.s: PublishedPort 8080/tcp is used twice",
    ),
    Bad(
        "external network with driver",
        {"Services": {"s": {"Image": IMAGE}}, "Networks": {"n": {"External": True, "Driver": "overlay"}}},
        ": Networks.n: an External network is not configured by dabctl",
    ),
    Bad(
        "rollback of a rollback",
        svc(Deploy={"RollbackConfig": {"FailureAction": "rollback"}}),
        ": Services.s.Deploy.RollbackConfig.FailureAction: 'rollback' is not allowed",
    ),
    Bad("replicas 10001", svc(Deploy={"Replicas": 10_001}), ": Services.s.Deploy.Replicas: 10001 is out of range"),
    Bad("not utf-8", b'{"Services": {"s": {"Image": "caf\xe9"}}}', ":1: byte 0xe9 is not UTF-8"),
    # The bundle policy (agent config exceptions unset).
    Bad(
        "docker socket",
        svc(Mounts=[{"Type": "bind", "Source": "/var/run/docker.sock", "Target": "/s"}]),
        ": Services.s.Mounts[0].Source: bind mount of /var/run/docker.sock",
    ),
    Bad(
        "host network",
        {"Services": {"s": {"Image": IMAGE, "Networks": ["host"]}}, "Networks": {"host": {"External": True}}},
        ": Networks.host: joining the host's network is refused",
    ),
    # Found by the property and hostile-file tests.
    Bad("trailing newline in a stack name", svc(), ": invalid stack name", name="bad\n"),
    Bad(
        "trailing newline in a volume name",
        svc(Mounts=[{"Type": "volume", "Source": "{prefix}-v\n", "Target": "/d"}]),
        ": Services.s.Mounts[0]: invalid volume name",
    ),
    Bad(
        "huge cpu count",
        svc(Deploy={"Resources": {"Limits": {"Cpus": "9" * 400}}}),
        ": Services.s.Deploy.Resources.Limits.Cpus: CPU count",
    ),
    Bad("lone surrogate", '{"Services": {"s": {"Image": "nginx", "Command": ["\\ud800"]}}}', ": Services.s.Command[0]"),
    Bad(
        "yaml control character",
        f"Services: {{s: {{Image: {IMAGE}, User: a\x07b}}}}\n",
        ": invalid YAML",
        suffix=".yaml",
    ),
]


@pytest.fixture(scope="module")
def proxy() -> Iterator[DockerProxy]:
    with DockerProxy() as p:
        yield p


def write_case(ws: Workspace, case: Bad) -> Path:
    path = ws.source / f"{ws.prefix}-{case.name}{case.suffix}"
    content = case.content
    if isinstance(content, dict):
        content = json.dumps(content, indent=2).replace("{prefix}", ws.prefix)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def test_the_proxy_sees_the_writes_of_a_valid_source(ws: Workspace, proxy: DockerProxy) -> None:
    """The control: without the invalid file the same pass does write, through this proxy."""
    ws.write("ok", VALID)
    proxy.reset()
    ws.reconcile(docker_host=proxy.url, check=True)
    assert "POST /containers/create" in proxy.endpoints(mutating_only=True)
    assert proxy.errors == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_an_invalid_bundle_makes_no_docker_write(ws: Workspace, proxy: DockerProxy, case: Bad) -> None:
    ws.write("ok", VALID)
    path = write_case(ws, case)
    proxy.reset()
    result = ws.reconcile(docker_host=proxy.url)
    mutating = proxy.mutating()

    assert result.returncode == 1, result.stdout + result.stderr
    assert mutating == []
    assert proxy.errors == []
    assert ws.containers() == []
    assert ws.networks() == {}
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert lines[-1] == "error: invalid bundles; nothing was changed", result.stderr
    for line in lines[:-1]:
        assert line.startswith(f"{ws.source}/"), f"not one line per problem: {result.stderr!r}"
    shown = printable(str(path))  # a newline in the file name is printed escaped
    naming = [line for line in lines if line.startswith(shown)]
    assert len(naming) == 1, result.stderr
    assert case.where.replace("{prefix}", ws.prefix) in naming[0].removeprefix(shown), naming[0]
