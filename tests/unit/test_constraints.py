"""Placement constraints: Swarm's syntax parsed, matched, and a bad one reported as a bundle error naming the file
and the field."""

from __future__ import annotations

import json

import pytest

from bundles import InvalidBundles
from bundles.load import parse_bundle
from schemas.constraints import Constraint, parse_constraint


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("node.labels.zone==eu", Constraint("node.labels.zone", "==", "eu")),
        ("node.labels.zone == eu", Constraint("node.labels.zone", "==", "eu")),
        ("  node.role != manager ", Constraint("node.role", "!=", "manager")),
        ("node.hostname==web-1", Constraint("node.hostname", "==", "web-1")),
        ("node.id!=abc", Constraint("node.id", "!=", "abc")),
        ("node.labels.com.example/tier==a b", Constraint("node.labels.com.example/tier", "==", "a b")),
    ],
)
def test_parse(text: str, parsed: Constraint) -> None:
    assert parse_constraint(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zone==eu", "unknown attribute 'zone'; use one of node.id, node.hostname, node.role, node.labels.KEY"),
        ("node.labels.zone=eu", "write ATTRIBUTE==VALUE or ATTRIBUTE!=VALUE"),
        ("node.labels.zone==", "write ATTRIBUTE==VALUE or ATTRIBUTE!=VALUE"),
        ("node.labels.==eu", "label name '' must start with a letter or digit"),
        ("node.role==boss", "node.role is manager or worker"),
        ("engine.labels.x==y", "unknown attribute 'engine.labels.x'"),
    ],
)
def test_a_bad_constraint_says_how_to_write_it(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid constraint") as exc:
        parse_constraint(text)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("text", "node", "expected"),
    [
        ("node.labels.zone==eu", {"labels": {"zone": "eu"}}, True),
        ("node.labels.zone==EU", {"labels": {"zone": "eu"}}, True),  # case-insensitive, as Swarm
        ("node.labels.zone==eu", {"labels": {}}, False),
        ("node.labels.zone!=eu", {"labels": {}}, True),  # no label satisfies !=
        ("node.labels.zone!=eu", {"labels": {"zone": "us"}}, True),
        ("node.role==manager", {"role": "worker"}, False),
        ("node.hostname!=n1", {"hostname": "n1"}, False),
        ("node.id==abc", {"node_id": "abc"}, True),
    ],
)
def test_matches(text: str, node: dict[str, object], expected: bool) -> None:
    attrs = {"node_id": "id", "hostname": "h", "role": "worker", "labels": {}} | node
    assert parse_constraint(text).matches(**attrs) is expected  # type: ignore[arg-type]


def test_a_bad_constraint_is_a_bundle_error_naming_file_and_field() -> None:
    doc = {
        "Version": "0.1",
        "Services": {
            "web": {"Image": "x", "Deploy": {"Placement": {"Constraints": ["node.role==manager", "node.zone==eu"]}}}
        },
    }
    with pytest.raises(InvalidBundles) as exc:
        parse_bundle(json.dumps(doc), "shop.dab", ".dab")
    [error] = exc.value.errors
    assert str(error).startswith("shop.dab: Services.web.Deploy.Placement.Constraints[1]: invalid constraint")
