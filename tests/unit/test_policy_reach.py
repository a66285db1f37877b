"""What a bundle may reach beyond its own stack: External volumes, other stacks' networks, low and agent ports."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import policy_of
from bundles.policy import Policy, violations
from schemas.config import AgentConfig
from tests.unit.test_policy import stack

SVC = {"Image": "x"}


def web(**top: Any) -> dict[str, Any]:
    return {"Services": {"s": dict(SVC, **top.pop("svc", {}))}, **top}


def rules(doc: dict[str, Any], policy: Policy | None = None) -> list[str]:
    return [f"{e.field}: {e.message}" for e in violations(stack(doc), policy or Policy())]


def test_an_external_volume_is_refused_unless_allowed() -> None:
    doc = web(
        Volumes={"certs": {"External": True}, "data": {}},
        svc={"Mounts": [{"Type": "volume", "Source": "certs", "Target": "/c"}]},
    )
    (error,) = rules(doc)
    assert error.startswith("Volumes.certs:") and "'no-external-volume'" in error
    assert rules(doc, Policy(allow_external_volumes=("certs",))) == []


@pytest.mark.parametrize(
    ("network", "refused"),
    [("shop_backend", True), ("web_backend", False), ("proxy", False), ("myproject_default", True)],
)
def test_an_external_network_of_another_stack_is_refused_unless_allowed(network: str, refused: bool) -> None:
    doc = web(Networks={network: {"External": True}}, svc={"Networks": [network]})
    errors = rules(doc)
    assert bool(errors) == refused
    if refused:
        assert "'no-foreign-network'" in errors[0] and errors[0].startswith(f"Networks.{network}:")
        assert rules(doc, Policy(allow_external_networks=(network,))) == []


@pytest.mark.parametrize(
    ("port", "policy", "rule"),
    [
        (22, Policy(), "no-privileged-port"),
        (1023, Policy(), "no-privileged-port"),
        (80, Policy(), None),
        (443, Policy(), None),
        (1024, Policy(), None),
        (22, Policy(allow_published_ports=(22,)), None),
        (80, Policy(allow_published_ports=()), "no-privileged-port"),
        (9420, Policy(own_ports=(9420,)), "no-agent-port"),
        (443, Policy(own_ports=(443,)), "no-agent-port"),  # an own port is refused even where low ports are allowed
    ],
)
def test_published_ports(port: int, policy: Policy, rule: str | None) -> None:
    errors = rules(web(svc={"Ports": [{"Port": 80, "PublishedPort": port}]}), policy)
    assert [rule in e for e in errors] == ([True] if rule else [])
    if rule:
        assert errors[0].startswith("Services.s.Ports[0].PublishedPort:")


def test_the_config_names_the_exceptions_and_the_agent_ports() -> None:
    policy = policy_of(
        AgentConfig(
            listen="127.0.0.1:9420",
            webhook_listen="[::]:9443",
            allow_published_ports=[25],
            allow_external_volumes=["v"],
        )
    )
    assert policy.own_ports == (9420, 9443) and policy.allow_published_ports == (25,)
    assert policy.allow_external_volumes == ("v",)
    assert AgentConfig().allow_published_ports == [80, 443]
