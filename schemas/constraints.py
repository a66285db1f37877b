"""Placement constraints (`Deploy.Placement.Constraints`), Swarm's syntax: `node.<attribute> == value` or `!=`.

Attributes: `node.id`, `node.hostname`, `node.role` (manager | worker) and `node.labels.KEY`. As in Swarm, values
compare case-insensitively, and a node without the label satisfies `!=` but not `==`. Parsed when a bundle loads
(a bad one is a bundle error naming the file and the field) and again by the scheduler, which matches them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from schemas.quoting import quoted

ATTRIBUTES = ("node.id", "node.hostname", "node.role", "node.labels.KEY")
_FORM = re.compile(r"^\s*(?P<key>[^=!\s]+)\s*(?P<op>==|!=)\s*(?P<value>\S(.*\S)?)\s*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_ROLES = ("manager", "worker")
Operator = Literal["==", "!="]


@dataclass(frozen=True)
class Constraint:
    """One parsed constraint; `key` is `node.id`, `node.hostname`, `node.role` or `node.labels.<name>`."""

    key: str
    op: Operator
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"

    def matches(self, node_id: str, hostname: str, role: str, labels: Mapping[str, str]) -> bool:
        """Whether a node with these attributes satisfies it."""
        if self.key == "node.id":
            have: str | None = node_id
        elif self.key == "node.hostname":
            have = hostname
        elif self.key == "node.role":
            have = role
        else:
            have = labels.get(self.key.removeprefix("node.labels."))
        equal = have is not None and have.casefold() == self.value.casefold()
        return equal if self.op == "==" else not equal


@lru_cache(maxsize=4096)
def parse_constraint(text: str) -> Constraint:
    """`text` as a Constraint; ValueError with the fix when it is not one (the bundle loader reports it)."""
    m = _FORM.match(text)
    if m is None:
        raise ValueError(
            f"invalid constraint {quoted(text)}: write ATTRIBUTE==VALUE or ATTRIBUTE!=VALUE, "
            'e.g. "node.labels.zone==eu"'
        )
    key, value = m.group("key"), m.group("value")
    op: Operator = "==" if m.group("op") == "==" else "!="
    if key.startswith("node.labels."):
        name = key.removeprefix("node.labels.")
        if not _LABEL_KEY.match(name):
            raise ValueError(
                f"invalid constraint {quoted(text)}: label name {quoted(name)} must start with a letter or digit "
                "and hold only letters, digits, '.', '_', '/' and '-'"
            )
    elif key not in ("node.id", "node.hostname", "node.role"):
        raise ValueError(
            f"invalid constraint {quoted(text)}: unknown attribute {quoted(key)}; use one of {', '.join(ATTRIBUTES)}"
        )
    if key == "node.role" and value.casefold() not in _ROLES:
        raise ValueError(f"invalid constraint {quoted(text)}: node.role is manager or worker")
    return Constraint(key, op, value)


def valid_constraint(text: str) -> str:
    """Pydantic validator of one entry: it must parse."""
    parse_constraint(text)
    return text
