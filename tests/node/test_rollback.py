"""Pinning a stack to a recorded revision (`dabctl rollback`) on the real SQLite state log."""

from __future__ import annotations

import pytest

from agent.node.engine import Engine
from agent.node.rollback import RollbackError, pin_stack, unpin_stack
from agent.state.records import Records
from tests.node.conftest import bundle, converge, desired, service


def deploy(engine: Engine, *versions: str) -> list[str]:
    """Apply one revision per version; their revisions, oldest first."""
    revisions = []
    for v in versions:
        state = desired(web=bundle({"front": service(Env=[f"V={v}"])}))
        converge(engine, state)
        revisions.append(state.stacks["web"].revision)
    return revisions


def test_rollback_pins_the_revision_before_the_current_one(engine: Engine, records: Records) -> None:
    first, second = deploy(engine, "1", "2")
    pin = pin_stack(records, "web", None)
    assert (pin.revision, pin.source_revision, pin.automatic) == (first, second, False)
    assert records.pins()["web"] == pin


def test_a_revision_is_named_in_full_or_by_a_unique_digest_prefix(engine: Engine, records: Records) -> None:
    first, _, third = deploy(engine, "1", "2", "3")
    assert pin_stack(records, "web", third).revision == third
    digest = first.partition(":")[2]
    pin = pin_stack(records, "web", digest[:10])
    assert pin.revision == first
    assert pin.source_revision == third, "a second pin keeps the source revision the first one held at"


def test_an_unknown_or_ambiguous_revision_is_refused_with_the_known_ones(engine: Engine, records: Records) -> None:
    first, second = deploy(engine, "1", "2")
    with pytest.raises(RollbackError) as unknown:
        pin_stack(records, "web", "feedface")
    assert str(unknown.value) == f"revision 'feedface' is not in the history of 'web'; recorded: {second}, {first}"
    with pytest.raises(RollbackError, match="matches several"):
        pin_stack(records, "web", "")


def test_a_stack_with_one_revision_has_nothing_to_roll_back_to(engine: Engine, records: Records) -> None:
    (only,) = deploy(engine, "1")
    with pytest.raises(RollbackError, match=f"has no earlier revision than {only}"):
        pin_stack(records, "web", None)
    with pytest.raises(RollbackError, match="no recorded revisions of stack 'api'"):
        pin_stack(records, "api", None)


def test_unpin_lifts_a_pin_once(engine: Engine, records: Records) -> None:
    deploy(engine, "1", "2")
    pin_stack(records, "web", None)
    assert unpin_stack(records, "web") and records.pins() == {}
    assert not unpin_stack(records, "web")
