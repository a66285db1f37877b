"""A large bundle's content goes to the state log in chunks that each fit one etcd 3.4 request (1.5 MiB, 128
operations): a 3 MiB bundle deploys, its record and history read back whole, and chunks no record names go."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.node.engine import Engine
from agent.state.log import Put
from agent.state.records import CONTENT, ContentMissing, Records, chunk_digest
from agent.state.sqlite import SqliteStateLog
from tests.fakes import FakeRuntime
from tests.node.conftest import NODE, Clock, bundle, converge, desired, service

ETCD_REQUEST = 1536 * 1024  # etcd 3.4's default --max-request-bytes
ETCD_OPS = 128  # and --max-txn-ops


class SizedLog:
    """A real state log that keeps the size and operation count of every write request."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.requests: list[tuple[int, int]] = []  # (bytes, operations)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self.requests.append((len(key) + len(value), 1))
        return int(self.log.put(key, value, lease))

    def txn(
        self, compares: Sequence[Any], then_ops: Sequence[Any], else_ops: Sequence[Any] = (), *, durable: bool = True
    ) -> Any:
        ops = [*then_ops, *else_ops]
        size = sum(len(op.key) + (len(op.value) if isinstance(op, Put) else 0) for op in ops)
        self.requests.append((size + sum(len(c.key) + 16 for c in compares), len(ops) + len(compares)))
        return self.log.txn(compares, then_ops, else_ops, durable=durable)


def big(v: int) -> Any:
    """A bundle of about 3 MiB (a large label), one per `v`."""
    return desired(web=bundle({"front": service(Labels={"blob": f"{v}" + "x" * (3 * 1024 * 1024)})}))


def test_a_3_mib_bundle_deploys_in_requests_that_fit_etcd(state_log: SqliteStateLog, clock: Clock) -> None:
    sized = SizedLog(state_log)
    records = Records(sized, history_limit=2)
    engine = Engine(FakeRuntime(clock=clock), records, NODE, clock=clock)
    state = big(1)
    assert len(state.stacks["web"].content) > 3 * 1024 * 1024

    plan, report = converge(engine, state)

    assert not report.failed and plan.changes == 2  # its network and its replica
    assert sized.requests and max(b for b, _ in sized.requests) < ETCD_REQUEST
    assert max(n for _, n in sized.requests) <= ETCD_OPS
    assert records.stacks()["web"].content == state.stacks["web"].content
    assert records.history("web")[0].content == state.stacks["web"].content
    snapshot = records.snapshot()
    assert snapshot.stacks["web"].content == state.stacks["web"].content
    stored = state_log.range("/stacks/")[0].value
    assert len(stored) < 64 * 1024, "the record itself stays small: the content is beside it"
    sized.requests.clear()
    plan, report = converge(engine, state)
    assert plan.changes == 0 and sized.requests == [], "a converged pass writes nothing"


def test_chunks_no_record_names_any_more_are_deleted(state_log: SqliteStateLog, clock: Clock) -> None:
    records = Records(state_log, history_limit=2)
    engine = Engine(FakeRuntime(clock=clock), records, NODE, clock=clock)
    for v in range(4):
        converge(engine, big(v))
    digests = {kv.key.removeprefix(CONTENT).split("/")[0] for kv in state_log.range(CONTENT)}
    named = {chunk_digest(kv.value) for prefix in ("/stacks/", "/history/") for kv in state_log.range(prefix)}
    assert digests == named and len(digests) == 2, "the two revisions history keeps, no more"
    assert [len(h.content) for h in records.history("web")] == [len(big(3).stacks["web"].content)] * 2

    converge(engine, desired(web=bundle({"front": service()})))
    converge(engine, desired(web=bundle({"front": service(Env=["A=1"])})))
    assert state_log.range(CONTENT) == [], "small bundles are inline; the big ones' chunks went with their history"


def test_a_record_whose_chunks_are_gone_says_so(state_log: SqliteStateLog, clock: Clock) -> None:
    records = Records(state_log)
    converge(Engine(FakeRuntime(clock=clock), records, NODE, clock=clock), big(1))
    first = state_log.range(CONTENT)[0].key
    state_log.delete(first)
    try:
        records.stacks()
    except ContentMissing as exc:
        assert "/stacks/web" in str(exc) and "deploy the stack again" in str(exc)
    else:
        raise AssertionError("a missing chunk went unnoticed")
