"""Typed access to what the agent keeps in the state log: owner id, stack records, slot assignments, history
of applied revisions per stack, and the audit trail of passes."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import ValidationError

from agent.cluster.orchestrate import Intent
from agent.cluster.snapshot import Snapshot
from agent.cluster.tasks import task_order
from agent.state.log import Compare, Delete, KeyValue, Op, Put, StateLog, TxnResult
from reconcilers.loadbalancer import PortKey
from reconcilers.restarts import RestartRecord
from reconcilers.rollout import Rollout, SlotFailure
from schemas import state
from schemas.errors import DabctlError
from schemas.state import (
    Assignment,
    AuditEntry,
    Chunked,
    LeaderRecord,
    NodeSpec,
    NodeStatus,
    PendingSlot,
    Pin,
    PolicyRecord,
    SlotReport,
    StackRecord,
    TaskRecord,
)

T = TypeVar("T")

OWNER_KEY = "/meta/owner"
STACKS = "/stacks/"
ASSIGNMENTS = "/assignments/"
HISTORY = "/history/"
AUDIT = "/audit/"
SUSPENDED = "/suspended/"
ROLLOUTS = "/rollouts/"
RESTARTS = "/restarts/"
PINS = "/pins/"
PORTS = "/ports/"  # /ports/<stack>/<service>/<protocol>/<target port> -> published port
# Put by every orchestrator commit: a commit compares it to the snapshot's, so two orchestrators that read the same
# revision cannot both commit (a new key under a range, such as another stack's port, has no mod revision to compare).
INTENT_KEY = "/meta/intent"
TASKS = "/tasks/"  # /tasks/<stack>/<service>/<slot>/<task id> -> TaskRecord
PENDING = "/pending/"  # /pending/<stack>/<service>/<slot> -> PendingSlot: placed on no node, and why
# The cluster: /cluster (ClusterRecord), /nodes/<id> (NodeSpec, managers write), /leader (LeaderRecord, under the
# leader's lease; its create revision is the term). Everything a node writes is under /node/<id>/: its status
# under its lease (absent: down) and its slot reports.
CLUSTER_KEY = "/cluster"
# The cluster's bundle policy (PolicyRecord): what the managers' configuration allows, put by the leader with the
# stack records of the revisions it admitted under it (commit_pass), so a worker admits under the same rules.
POLICY_KEY = "/meta/policy"
NODES = "/nodes/"
NODE = "/node/"
LEADER_KEY = "/leader"
# A stack record larger than INLINE_RECORD (a large bundle: the record holds its content and each service's spec)
# is kept beside its key, content-addressed, in chunks of CHUNK bytes: /content/<sha256>/<index>, each written in
# its own transaction, so that every request fits etcd 3.4's default 1.5 MiB; the key holds a Chunked naming them,
# and a stack record and its history entry share them. Records stored inline (every record of the previous
# main's) read as they are.
CONTENT = "/content/"
INLINE_RECORD = 256 * 1024
CHUNK = 512 * 1024
# etcd 3.4's default --max-txn-ops: a transaction's compares, and each branch's operations, count separately.
MAX_TXN_OPS = 128


class ContentMissing(DabctlError):
    """A stack record names content chunks the state does not hold (all of them, at the revision read)."""


def node_prefix(node_id: str) -> str:
    """Every key node `node_id` may write."""
    return f"{NODE}{node_id}/"


def node_status_key(node_id: str) -> str:
    return f"{node_prefix(node_id)}status"


def slot_report_key(node_id: str, stack: str, service: str, slot: str) -> str:
    return f"{node_prefix(node_id)}reports/{stack}/{service}/{slot}"


def content_prefix(digest: str) -> str:
    return f"{CONTENT}{digest}/"


@dataclass(frozen=True)
class Fence:
    """The leader's term: the create revision of the leader key it holds. A commit carrying it holds only while that
    same key (not merely a key of that name, nor a lease id) is still there."""

    key: str
    term: int


def port_key(k: PortKey) -> str:
    return f"{PORTS}{k.stack}/{k.service}/{k.protocol}/{k.target}"


def orchestrator_txn(
    log: StateLog, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None, *, durable: bool = True
) -> TxnResult:
    """The one way an orchestrator writes: its compares, plus the leader's term when it runs fenced."""
    if fence is not None:
        compares = [*compares, Compare(fence.key, "create_revision", "==", fence.term)]
    return log.txn(compares, ops, durable=durable)


def _stamp() -> str:
    # Fixed width, so that keys sort in time order.
    return f"{time.time_ns():020d}"


class Records:
    """The agent's records on a StateLog; writes happen only when a value actually changes."""

    def __init__(self, log: StateLog, history_limit: int = 10, audit_limit: int = 500) -> None:
        self.log = log
        self.fence: Fence | None = None  # set by a cluster's leader: its commits then hold only in its term
        self.history_limit = history_limit
        self.audit_limit = audit_limit
        self._owner: str | None = None
        # The last snapshot, and each record it decoded by key with the mod revision it was decoded at: a record
        # is decoded again only when its key moved (records are frozen, so sharing them is safe).
        self._last: tuple[Snapshot | None, bool] = (None, False)
        self._decoded: dict[str, tuple[int, Any]] = {}

    def owner(self, create: bool = True) -> str:
        """This state's owner id (label dabctl.owner); created once, atomically, on first use."""
        if self._owner is None:
            kv = self.log.get(OWNER_KEY)
            if kv is None and not create:
                # A state that never applied anything owns nothing: an id no object carries.
                self._owner = "none-" + uuid.uuid4().hex[:11]
                return self._owner
            if kv is None:
                fresh = uuid.uuid4().hex[:16]
                self.log.txn([Compare(OWNER_KEY, "create_revision", "==", 0)], [Put(OWNER_KEY, fresh.encode())])
                kv = self.log.get(OWNER_KEY)
            assert kv is not None
            self._owner = kv.value.decode()
        return self._owner

    def stacks(self) -> dict[str, StackRecord]:
        return {r.stack: r for r in self._load(self.log.range(STACKS))}

    def reports(self, node_id: str) -> dict[tuple[str, str, str], SlotReport]:
        """The slot reports node `node_id` last wrote."""
        return dict(_node_keys(self.log.range(node_prefix(node_id)))[1].get(node_id, {}))

    def snapshot(self, *, restarts: bool = True) -> Snapshot:
        """Every kind of record at one revision, typed, with the mod revision of each key read. History is read
        for pinned stacks and stacks with a rollout in progress (what pins and automatic rollbacks need);
        restart records only when asked (a node keeps its own once loaded).

        A state at one revision is the same state: when the revision has not moved since the last snapshot, that
        snapshot is returned again (one revision read, no range). Otherwise only keys whose mod revision moved are
        decoded again; the others reuse their decoded (frozen) record."""
        revision = self.log.revision()
        last, had_restarts = self._last
        if last is not None and last.revision == revision and (had_restarts or not restarts):
            return last if restarts or not had_restarts else replace(last, restarts={})
        versions: dict[str, int] = {}
        seen: dict[str, tuple[int, Any]] = {}

        def read(prefix: str) -> list[KeyValue]:
            kvs = self.log.range(prefix, revision=revision)
            versions.update((kv.key, kv.mod_revision) for kv in kvs)
            return kvs

        def decoded(kvs: Sequence[KeyValue], parse: Callable[[KeyValue], T]) -> list[tuple[KeyValue, T]]:
            out = []
            for kv in kvs:
                hit = self._decoded.get(kv.key)
                if hit is None or hit[0] != kv.mod_revision:
                    hit = (kv.mod_revision, parse(kv))
                seen[kv.key] = hit
                out.append((kv, hit[1]))
            return out

        pins = {
            kv.key.removeprefix(PINS): pin
            for kv, pin in decoded(read(PINS), lambda kv: Pin.model_validate_json(kv.value))
        }
        rollouts = {
            _service_key(kv.key, ROLLOUTS): ro
            for kv, ro in decoded(read(ROLLOUTS), lambda kv: _parse_rollout(kv.value))
        }
        rolling = {stack for (stack, _), ro in rollouts.items() if ro.state != "completed"}
        chunks: dict[str, bytes] = {}

        def stack_of(kv: KeyValue) -> StackRecord:
            return self._stack(kv, revision, chunks)

        history = {
            stack: [
                rec
                for _, rec in decoded(list(reversed(self.log.range(f"{HISTORY}{stack}/", revision=revision))), stack_of)
            ]
            for stack in sorted(set(pins) | rolling)
        }
        intent = self.log.range(INTENT_KEY, revision=revision)
        versions.update((kv.key, kv.mod_revision) for kv in intent if kv.key == INTENT_KEY)
        statuses, reports = _node_keys(self.log.range(NODE, revision=revision))
        leader = [kv for kv in self.log.range(LEADER_KEY, revision=revision) if kv.key == LEADER_KEY]
        policy = [kv for kv in self.log.range(POLICY_KEY, revision=revision) if kv.key == POLICY_KEY]
        versions.update((kv.key, kv.mod_revision) for kv in policy)
        stacks = {rec.stack: rec for _, rec in decoded(read(STACKS), stack_of)}
        tasks: dict[tuple[str, str, str], list[TaskRecord]] = {}
        for kv, task in decoded(read(TASKS), lambda kv: TaskRecord.model_validate_json(kv.value)):
            stack, service, slot, _ = kv.key.removeprefix(TASKS).split("/", 3)
            tasks.setdefault((stack, service, slot), []).append(task)
        for slot_tasks in tasks.values():
            slot_tasks.sort(key=task_order)
        assignments = {
            _service_key(kv.key, ASSIGNMENTS): a.nodes
            for kv, a in decoded(read(ASSIGNMENTS), lambda kv: Assignment.model_validate_json(kv.value))
        }
        snapshot = Snapshot(
            revision=revision,
            stacks=stacks,
            suspended=frozenset(kv.key.removeprefix(SUSPENDED) for kv in read(SUSPENDED)),
            pins=pins,
            history=history,
            assignments=assignments,
            ports=_ports(read(PORTS)),
            rollouts=rollouts,
            restarts=_restarts(read(RESTARTS)) if restarts else {},
            tasks=tasks,
            pending=_pending(read(PENDING)),
            versions=versions,
            nodes={kv.key.removeprefix(NODES): NodeSpec.model_validate_json(kv.value) for kv in read(NODES)},
            statuses=statuses,
            leader=_leader(leader[0].value) if leader else None,
            reports=reports,
            policy=PolicyRecord.model_validate_json(policy[0].value) if policy else None,
        )
        self._decoded = seen
        self._last = (snapshot, restarts)
        return snapshot

    def _load(
        self, kvs: Sequence[KeyValue], revision: int = 0, cache: dict[str, bytes] | None = None
    ) -> list[StackRecord]:
        """Stack records as stored: inline, or chunked beside the key (read at `revision`)."""
        cache = {} if cache is None else cache
        return [self._stack(kv, revision, cache) for kv in kvs]

    def _stack(self, kv: KeyValue, revision: int, cache: dict[str, bytes]) -> StackRecord:
        """One stack record as stored: inline, or a Chunked naming its chunks (read at `revision`, once each)."""
        stored = _stored(kv.value)
        if not isinstance(stored, Chunked):
            return stored
        if stored.chunked not in cache:
            parts = self.log.range(content_prefix(stored.chunked), revision=revision)
            if len(parts) != stored.chunks:
                raise ContentMissing(
                    f"{kv.key}: {len(parts)} of its {stored.chunks} chunks under "
                    f"{content_prefix(stored.chunked)} are in the state; deploy the stack again"
                )
            cache[stored.chunked] = b"".join(p.value for p in parts)
        return StackRecord.model_validate_json(cache[stored.chunked])

    def _store(self, record: StackRecord, written: set[str]) -> bytes:
        """What a key holds for `record`: its JSON, or, above INLINE_RECORD, a Chunked naming its chunks (written
        first, one transaction each, once: they are content-addressed)."""
        raw = record.model_dump_json().encode()
        if len(raw) <= INLINE_RECORD:
            return raw
        digest = hashlib.sha256(raw).hexdigest()
        parts = [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]
        if digest not in written:
            for i, part in enumerate(parts):
                key = f"{content_prefix(digest)}{i:04d}"
                self.log.txn([Compare(key, "create_revision", "==", 0)], [Put(key, part)])
            written.add(digest)
        return Chunked(chunked=digest, chunks=len(parts)).model_dump_json().encode()

    def commit_intent(self, intent: Intent, snapshot: Snapshot, fence: Fence | None = None) -> bool:
        """Write what an orchestrator decided from `snapshot` in one transaction that holds only if nothing it
        read and writes changed since, and no other orchestrator committed since it read; whether it did.
        Nothing is written (and True returned) when the intent changes nothing. `fence`: the term the decision
        was made in (default `self.fence`); the commit holds only in that term.

        An intent too large for one etcd transaction (MAX_TXN_OPS, e.g. the first deploy of 300 services) is
        written in a chain of transactions, each with the same guards for its own keys, the fence, and a compare
        on INTENT_KEY as the previous one left it (so no other orchestrator's commit comes in between). Each
        holds whole services (a service's assignment, ports, rollout and tasks), or, for a service too large
        alone, whole slots with the service's other keys in its last part; a chain that stops part-way leaves
        whole services decided from this snapshot, which the next pass (planned from a fresh one) goes on from."""
        groups = _intent_groups(intent) + [[[op]] for op in _pending_ops(intent, snapshot)]
        if not groups:
            return True
        mod = snapshot.versions.get(INTENT_KEY, 0)
        for ops in _batches(groups, MAX_TXN_OPS - 2):  # room for INTENT_KEY's put and compare, and the fence
            compares = [Compare(op.key, "mod_revision", "==", snapshot.versions.get(op.key, 0)) for op in ops]
            compares.append(Compare(INTENT_KEY, "mod_revision", "==", mod))
            put = Put(INTENT_KEY, str(snapshot.revision).encode())
            done = orchestrator_txn(self.log, compares, [*ops, put], fence or self.fence)
            if not done.succeeded:
                return False
            mod = done.revision
        return True

    def fence_holds(self, fence: Fence) -> bool:
        """Whether `fence`'s term still stands (the leader key it names is the same key); a failed fenced commit
        whose fence no longer holds was refused for the term, not lost to a race."""
        kv = self.log.get(fence.key)
        return kv is not None and kv.create_revision == fence.term

    def pending(self) -> dict[tuple[str, str, str], str]:
        """Slots the leader could place on no node, with the reason."""
        return _pending(self.log.range(PENDING))

    def tasks(self) -> dict[tuple[str, str, str], list[TaskRecord]]:
        """Each slot's tasks, oldest first (what `ps` shows of a slot's previous tasks)."""
        return _tasks(self.log.range(TASKS))

    def history(self, stack: str) -> list[StackRecord]:
        """Applied revisions of a stack, newest first."""
        return self._load(list(reversed(self.log.range(f"{HISTORY}{stack}/"))))

    def audit(self) -> list[AuditEntry]:
        """Passes that changed something, newest first."""
        return [AuditEntry.model_validate_json(kv.value) for kv in reversed(self.log.range(AUDIT))]

    def rollouts(self) -> dict[tuple[str, str], Rollout]:
        return _rollouts(self.log.range(ROLLOUTS))

    def restarts(self) -> dict[tuple[str, str, str], RestartRecord]:
        return _restarts(self.log.range(RESTARTS))

    def pins(self) -> dict[str, Pin]:
        return {kv.key.removeprefix(PINS): Pin.model_validate_json(kv.value) for kv in self.log.range(PINS)}

    def set_pin(self, pin: Pin | None, stack: str) -> None:
        if pin is None:
            self.log.delete(PINS + stack)
        else:
            self.log.put(PINS + stack, pin.model_dump_json().encode())

    def commit_pass(
        self,
        records: Sequence[StackRecord],
        new_revisions: Sequence[StackRecord],
        pruned: Sequence[str],
        audit: AuditEntry | None,
        *,
        rollouts: Mapping[tuple[str, str], Rollout] | None = None,
        restarts: Mapping[tuple[str, str, str], RestartRecord] | None = None,
        node: str = "",
        reports: Mapping[tuple[str, str, str], SlotReport | None] | None = None,
        fence: Fence | None = None,
        policy: PolicyRecord | None = None,
    ) -> bool:
        """Write a pass's outcome in one transaction: stack records, history entries (trimmed to the limit),
        pruned stacks' records, assignments, rollouts, restarts and pins, rollout and restart progress, the
        audit entry, and node `node`'s slot reports that changed (None: the slot is gone).
        Nothing when there is nothing. Large bundle contents go first, in chunks (one transaction each).
        `fence`: a leader's pass commits only in the term it planned in; whether the commit held. `policy`: the
        cluster's bundle policy when it changed, put with the stack records."""
        written: set[str] = set()
        ops: list[Op] = [Put(STACKS + r.stack, self._store(r, written)) for r in records]
        if policy is not None:
            ops.append(Put(POLICY_KEY, policy.model_dump_json().encode()))
        for (stack, service, slot), report in sorted((reports or {}).items()):
            key = slot_report_key(node, stack, service, slot)
            ops.append(Put(key, report.model_dump_json().encode()) if report is not None else Delete(key))
        dropped: list[bytes] = []  # records deleted by this commit: content chunks only they used go too
        for (stack, service), ro in (rollouts or {}).items():
            ops.append(Put(f"{ROLLOUTS}{stack}/{service}", rollout_record(ro).model_dump_json().encode()))
        for (stack, service, slot), rr in (restarts or {}).items():
            rec = state.RestartRecord(attempts=rr.attempts, last_start=rr.last_start, total=rr.total, tried=rr.tried)
            # `tried` is written only while it names a container: otherwise the record keeps its earlier shape
            unset = None if rr.tried else {"tried"}
            ops.append(Put(f"{RESTARTS}{stack}/{service}/{slot}", rec.model_dump_json(exclude=unset).encode()))
        for r in new_revisions:
            ops.append(Put(f"{HISTORY}{r.stack}/{_stamp()}", self._store(r, written)))
            old = self.log.range(f"{HISTORY}{r.stack}/")
            trimmed = old[: max(0, len(old) + 1 - self.history_limit)]
            ops.extend(Delete(kv.key) for kv in trimmed)
            dropped += [kv.value for kv in trimmed]
        for stack in pruned:
            dropped += [kv.value for kv in self.log.range(STACKS + stack) if kv.key == STACKS + stack]
            ops += [
                Delete(STACKS + stack),
                Delete(f"{ASSIGNMENTS}{stack}/", prefix=True),
                Delete(f"{ROLLOUTS}{stack}/", prefix=True),
                Delete(f"{RESTARTS}{stack}/", prefix=True),
                Delete(PINS + stack),
                Delete(f"{TASKS}{stack}/", prefix=True),
                Delete(f"{PENDING}{stack}/", prefix=True),
            ]
        if audit is not None:
            ops.append(Put(f"{AUDIT}{_stamp()}-{audit.reconcile_id}", audit.model_dump_json().encode()))
            old = self.log.range(AUDIT)
            ops.extend(Delete(kv.key) for kv in old[: max(0, len(old) + 1 - self.audit_limit)])
        # Above etcd's MAX_TXN_OPS (a node's first report of a hundred slots) the commit goes in parts, each
        # fenced, the stack records, history and audit last: a stack is recorded as applied once the rest is.
        # Not fsynced on its own (durable=False): losing it to a power cut leaves the state a pass's intent committed
        # and its actions done but not recorded, exactly what kill -9 before this commit leaves, which the next pass
        # converges from (tests/integration/test_crash_consistency.py). The next durable commit (the next intent)
        # or checkpoint puts it on disk with everything before it.
        last = [op for op in ops if op.key.startswith((STACKS, HISTORY, AUDIT, POLICY_KEY))]
        ordered = [op for op in ops if not op.key.startswith((STACKS, HISTORY, AUDIT, POLICY_KEY))] + last
        for i in range(0, len(ordered), MAX_TXN_OPS):
            if not orchestrator_txn(self.log, [], ordered[i : i + MAX_TXN_OPS], fence, durable=False).succeeded:
                return False
        self._drop_contents(dropped)
        return True

    def _drop_contents(self, dropped: Sequence[bytes]) -> None:
        """Delete the content chunks of `dropped` records that no stack record or history entry still names."""
        digests = {chunk_digest(v) for v in dropped} - {""}
        if not digests:
            return
        kept = {chunk_digest(kv.value) for prefix in (STACKS, HISTORY) for kv in self.log.range(prefix)}
        for digest in sorted(digests - kept):
            self.log.delete(content_prefix(digest), prefix=True)

    def policy(self) -> PolicyRecord | None:
        """The cluster's bundle policy as the leader last recorded it (None: no cluster leader recorded one)."""
        kv = self.log.get(POLICY_KEY)
        return PolicyRecord.model_validate_json(kv.value) if kv is not None else None

    def suspended(self) -> set[str]:
        """Stacks an operator suspended: the agent leaves them exactly as they are."""
        return {kv.key.removeprefix(SUSPENDED) for kv in self.log.range(SUSPENDED)}

    def set_suspended(self, stack: str, suspended: bool) -> bool:
        """Suspend or resume a stack; whether anything changed."""
        key = SUSPENDED + stack
        if suspended:
            return self.log.txn([Compare(key, "create_revision", "==", 0)], [Put(key, b"1")]).succeeded
        return self.log.txn([Compare(key, "create_revision", ">", 0)], [Delete(key)]).succeeded

    def assignments(self) -> dict[tuple[str, str], dict[str, list[str]]]:
        return _assignments(self.log.range(ASSIGNMENTS))

    def ports(self) -> dict[PortKey, int]:
        """Published port per service port: allocated once, kept across passes and restarts."""
        return _ports(self.log.range(PORTS))

    def write_ports(self, changed: Mapping[PortKey, int], removed: set[PortKey]) -> None:
        """Record changed and forget removed published ports in one transaction (nothing when both are empty)."""
        ops: list[Op] = [
            Put(f"{PORTS}{k.stack}/{k.service}/{k.protocol}/{k.target}", str(p).encode())
            for k, p in sorted(changed.items())
        ]
        ops += [Delete(f"{PORTS}{k.stack}/{k.service}/{k.protocol}/{k.target}") for k in sorted(removed)]
        if ops:
            self.log.txn([], ops)

    def write_assignments(
        self, changed: dict[tuple[str, str], dict[str, list[str]]], removed: set[tuple[str, str]]
    ) -> None:
        """Write changed and delete removed assignments in one transaction (nothing when both are empty)."""
        ops: list[Op] = [
            Put(
                f"{ASSIGNMENTS}{stack}/{service}",
                Assignment(nodes=dict(sorted(nodes.items()))).model_dump_json().encode(),
            )
            for (stack, service), nodes in sorted(changed.items())
        ]
        ops += [Delete(f"{ASSIGNMENTS}{stack}/{service}") for stack, service in sorted(removed)]
        if ops:
            self.log.txn([], ops)


def _intent_groups(intent: Intent) -> list[list[list[Op]]]:
    """An intent's writes in groups that go to the state log together, each a list of units never split: one
    group per service (a unit per task slot, then one of its assignment, ports and rollout), one per pin."""
    own: dict[tuple[str, str], list[Op]] = {}
    slots: dict[tuple[str, str], list[list[Op]]] = {}
    for (stack, service, slot), changed in sorted(intent.tasks.put.items()):
        puts: list[Op] = [
            Put(f"{TASKS}{stack}/{service}/{slot}/{t.task_id}", t.model_dump_json().encode()) for t in changed
        ]
        slots.setdefault((stack, service), []).append(puts)
    for (stack, service, slot), ids in sorted(intent.tasks.deleted.items()):
        slots.setdefault((stack, service), []).append([Delete(f"{TASKS}{stack}/{service}/{slot}/{i}") for i in ids])
    for (stack, service), nodes in sorted(intent.assignments_changed.items()):
        value = Assignment(nodes=dict(sorted(nodes.items()))).model_dump_json().encode()
        own.setdefault((stack, service), []).append(Put(f"{ASSIGNMENTS}{stack}/{service}", value))
    for stack, service in sorted(intent.assignments_removed):
        own.setdefault((stack, service), []).append(Delete(f"{ASSIGNMENTS}{stack}/{service}"))
    for k, p in sorted(intent.ports_changed.items()):
        own.setdefault((k.stack, k.service), []).append(Put(port_key(k), str(p).encode()))
    for k in sorted(intent.ports_removed):
        own.setdefault((k.stack, k.service), []).append(Delete(port_key(k)))
    for (stack, service), ro in sorted(intent.rollouts.items()):
        put = Put(f"{ROLLOUTS}{stack}/{service}", rollout_record(ro).model_dump_json().encode())
        own.setdefault((stack, service), []).append(put)
    groups = [[*slots.get(svc, []), own.get(svc, [])] for svc in sorted(set(own) | set(slots))]
    groups += [
        [[Put(PINS + stack, pin.model_dump_json().encode()) if pin else Delete(PINS + stack)]]
        for stack, pin in sorted(intent.pins.items())
    ]
    return [[u for u in g if u] for g in groups if any(g)]


def _batches(groups: Sequence[Sequence[Sequence[Op]]], limit: int) -> list[list[Op]]:
    """Groups packed in order into batches of at most `limit` operations; a group larger than `limit` is split
    between its units (a service's own keys, its last unit, then go in its last part)."""
    out: list[list[Op]] = []
    current: list[Op] = []
    for group in groups:
        size = sum(len(u) for u in group)
        units = [[op for u in group for op in u]] if size <= limit else [list(u) for u in group]
        for unit in units:
            if len(current) + len(unit) > limit and current:
                out.append(current)
                current = []
            current += unit
    if current:
        out.append(current)
    return out


def _stored(value: bytes) -> StackRecord | Chunked:
    """A stack record's key as stored: the record itself (almost always: tried first, as fast as before), or the
    Chunked that names its chunks."""
    try:
        return StackRecord.model_validate_json(value)
    except ValidationError:
        return Chunked.model_validate_json(value)


def chunk_digest(value: bytes) -> str:
    """The digest of the chunks a stored record names, or "" for a record stored inline."""
    stored = _stored(value)
    return stored.chunked if isinstance(stored, Chunked) else ""


def _leader(value: bytes) -> LeaderRecord | None:
    """The leader key's record; None when it holds something else (a bare campaign value)."""
    try:
        return LeaderRecord.model_validate_json(value)
    except ValidationError:
        return None


def _node_keys(
    kvs: Sequence[KeyValue],
) -> tuple[dict[str, NodeStatus], dict[str, dict[tuple[str, str, str], SlotReport]]]:
    """Under /node/: each live node's status and every node's slot reports, by node id."""
    statuses: dict[str, NodeStatus] = {}
    reports: dict[str, dict[tuple[str, str, str], SlotReport]] = {}
    for kv in kvs:
        node_id, _, rest = kv.key.removeprefix(NODE).partition("/")
        if rest == "status":
            statuses[node_id] = NodeStatus.model_validate_json(kv.value)
        elif rest.startswith("reports/"):
            stack, service, slot = rest.removeprefix("reports/").split("/", 2)
            reports.setdefault(node_id, {})[(stack, service, slot)] = SlotReport.model_validate_json(kv.value)
    return statuses, reports


def _pending_ops(intent: Intent, snapshot: Snapshot) -> list[Op]:
    """The pending slots that changed against the snapshot: put when new or with another reason, deleted when
    placed (or gone); those of held stacks stay as recorded. None in a converged pass."""
    ops: list[Op] = []
    for (stack, service, slot), reason in sorted(intent.pending.items()):
        if snapshot.pending.get((stack, service, slot)) != reason:
            ops.append(Put(f"{PENDING}{stack}/{service}/{slot}", PendingSlot(reason=reason).model_dump_json().encode()))
    for key in sorted(snapshot.pending):
        if key not in intent.pending and key[0] not in intent.held:
            ops.append(Delete(f"{PENDING}{key[0]}/{key[1]}/{key[2]}"))
    return ops


def _pending(kvs: Sequence[KeyValue]) -> dict[tuple[str, str, str], str]:
    out = {}
    for kv in kvs:
        stack, service, slot = kv.key.removeprefix(PENDING).split("/", 2)
        out[(stack, service, slot)] = PendingSlot.model_validate_json(kv.value).reason
    return out


def _service_key(key: str, prefix: str) -> tuple[str, str]:
    stack, _, service = key.removeprefix(prefix).partition("/")
    return (stack, service)


def _parse_rollout(value: bytes) -> Rollout:
    return rollout_from_record(state.RolloutRecord.model_validate_json(value))


def _tasks(kvs: Sequence[KeyValue]) -> dict[tuple[str, str, str], list[TaskRecord]]:
    out: dict[tuple[str, str, str], list[TaskRecord]] = {}
    for kv in kvs:
        stack, service, slot, _ = kv.key.removeprefix(TASKS).split("/", 3)
        out.setdefault((stack, service, slot), []).append(TaskRecord.model_validate_json(kv.value))
    for tasks in out.values():
        tasks.sort(key=task_order)
    return out


def _rollouts(kvs: Sequence[KeyValue]) -> dict[tuple[str, str], Rollout]:
    out = {}
    for kv in kvs:
        stack, _, service = kv.key.removeprefix(ROLLOUTS).partition("/")
        out[(stack, service)] = rollout_from_record(state.RolloutRecord.model_validate_json(kv.value))
    return out


def _restarts(kvs: Sequence[KeyValue]) -> dict[tuple[str, str, str], RestartRecord]:
    out = {}
    for kv in kvs:
        stack, service, slot = kv.key.removeprefix(RESTARTS).split("/", 2)
        rec = state.RestartRecord.model_validate_json(kv.value)
        out[(stack, service, slot)] = RestartRecord(rec.attempts, rec.last_start, rec.total, rec.tried)
    return out


def _assignments(kvs: Sequence[KeyValue]) -> dict[tuple[str, str], dict[str, list[str]]]:
    out = {}
    for kv in kvs:
        stack, _, service = kv.key.removeprefix(ASSIGNMENTS).partition("/")
        out[(stack, service)] = Assignment.model_validate_json(kv.value).nodes
    return out


def _ports(kvs: Sequence[KeyValue]) -> dict[PortKey, int]:
    out = {}
    for kv in kvs:
        stack, service, protocol, target = kv.key.removeprefix(PORTS).split("/")
        out[PortKey(stack, service, protocol, int(target))] = int(kv.value)
    return out


def rollout_record(ro: Rollout) -> state.RolloutRecord:
    """The planner's rollout as the state log keeps it."""
    return state.RolloutRecord(
        target=ro.target,
        state=ro.state,
        batch=ro.batch,
        batch_done_at=ro.batch_done_at,
        failed=tuple(str(f) for f in ro.failed),
        reason=ro.reason,
        rollback=ro.rollback,
    )


def rollout_from_record(rec: state.RolloutRecord) -> Rollout:
    """A recorded rollout for the planner."""
    return Rollout(
        target=rec.target,
        state=rec.state,
        batch=rec.batch,
        batch_done_at=rec.batch_done_at,
        failed=tuple(SlotFailure.parse(f) for f in rec.failed),
        reason=rec.reason,
        rollback=rec.rollback,
    )
