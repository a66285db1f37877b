"""One control path: reconcile, rollback, suspend, resume and status, run here or by the agent holding the state.

`Control` is the interface every changing CLI command calls (parse -> one call -> render). `LocalControl` runs
the passes in the CLI's own process; `AgentControl` sends the same request to the running agent, which runs it
through its loop with the same meaning (`Agent` implements `Control` too). `open_control` picks one: the agent
when one holds this state directory, whatever the state backend, and the agent again when the state turns out to
be locked by an agent that started in between.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from agent.api.client import call, call_leader, get_status, running_agent
from agent.cluster.snapshot import Snapshot
from agent.config import policy_configured, policy_of
from agent.drivers.docker_engine import DockerEngine
from agent.node.engine import AnyResult, Engine, PassPlan, PassReport
from agent.node.rollback import pin_stack, unpin_stack
from agent.node.status import Fleet, fleet, fleet_statuses
from agent.pki.files import PkiPaths
from agent.sources.source import open_source
from agent.state.backends import open_log
from agent.state.log import StateLocked
from agent.state.membership import membership
from agent.state.records import Records
from bundles import DesiredState
from reconcilers.loadbalancer import PortRules
from reconcilers.outcome import Outcome
from schemas.config import AgentConfig
from schemas.control import (
    ReconcileRequest,
    ReconcileResult,
    RollbackRequest,
    RollbackResult,
    SuspendRequest,
    SuspendResult,
)
from schemas.errors import DabctlError
from schemas.output import StackStatus, StatusOutput

T = TypeVar("T")
Step = Callable[[], tuple[PassPlan, PassReport]]
# Shows one pass's progress: given the plan, a context yielding the callback each finished action is passed to.
Progress = Callable[[PassPlan], AbstractContextManager[Callable[[AnyResult], None]]]


class Control(Protocol):
    """What the CLI's changing commands (and `status`) ask of a node."""

    def reconcile(self, request: ReconcileRequest) -> ReconcileResult: ...

    def rollback(self, request: RollbackRequest) -> RollbackResult: ...

    def suspend(self, request: SuspendRequest) -> SuspendResult: ...

    def status(self) -> StatusOutput: ...


def converge(step: Step, unhealthy: Callable[[], list[str]], *, wait: bool, deadline: float) -> ReconcileResult:
    """Passes until nothing is left to roll (and, with `wait`, every service is healthy) or the deadline.

    Shared by the CLI's own passes and the agent's, so `--wait` and `--timeout` mean one thing on both paths."""
    done = dict.fromkeys(Outcome, 0)
    errors: list[str] = []
    notes: list[str] = []
    halted: list[str] = []
    while True:
        plan, report = step()
        for o in Outcome:
            done[o] += report.count(o)
        errors = report.errors + [f"{r.action}: {r.error}" for r in report.results if r.outcome is Outcome.FAILED]
        # A paused rollout or a slot given up on fails the call and stops its passes; other notes only inform.
        halted = [f"{name}: {n}" for name, sp in plan.stacks.items() for n in sp.notes if n.failing]
        notes = [f"{name}: {n}" for name, sp in plan.stacks.items() for n in sp.notes if not n.failing]
        if errors or halted:
            break
        waiting_for = unhealthy() if wait else []
        # Published ports lead to healthy replicas only: wait for those still starting, then add them.
        if not plan.rolling and not waiting_for and not plan.awaiting_health:
            break
        if time.monotonic() > deadline:
            names = ", ".join(waiting_for) or (
                "a rolling update" if plan.rolling else f"{plan.awaiting_health} replica(s) to pass their healthcheck"
            )
            errors.append(f"timed out waiting for {names}")
            break
        time.sleep(max(0.2, min(plan.recheck_in or 1.0, 2.0, deadline - time.monotonic())))
    return ReconcileResult(
        ok=not errors and not halted,
        stacks=len(plan.desired.stacks),
        created=done[Outcome.CREATED],
        updated=done[Outcome.UPDATED],
        removed=done[Outcome.REMOVED],
        failed=done[Outcome.FAILED],
        errors=errors + halted,
        notes=notes,
    )


def engine_fleet(engine: Engine) -> tuple[Snapshot, Fleet]:
    """The state at one revision and what runs where: this engine's containers and, in a cluster, every other
    node's as reported."""
    snapshot = engine.records.snapshot(restarts=False)
    return snapshot, fleet(snapshot, engine.node, engine.node, engine.services.observe())


def engine_statuses(engine: Engine, desired: DesiredState | None) -> list[StackStatus]:
    """Each stack's status from the state and the containers (no source errors: a local view); in a cluster,
    counted over every node."""
    snapshot, seen = engine_fleet(engine)
    return fleet_statuses(desired, snapshot, seen, errors={})


def unhealthy(engine: Engine, desired: DesiredState) -> list[str]:
    """Services that do not run all their replicas healthy, as `stack_service (running/desired status)`."""
    statuses = engine_statuses(engine, desired)
    return [
        f"{st.stack}_{s.service} ({s.running}/{s.desired} {s.status.lower()})"
        for st in statuses
        if not st.suspended
        for s in st.health.services
        if s.status != "Healthy"
    ]


@contextmanager
def open_records(cfg: AgentConfig, writer: bool) -> Iterator[Records]:
    log = open_log(cfg, writer=writer)
    try:
        yield Records(log, cfg.history_limit, cfg.audit_limit)
    finally:
        log.close()


def node_key(cfg: AgentConfig) -> str:
    """This node in the assignments: its node id on a cluster node (`cluster.json`), else its name."""
    member = membership(cfg.state_path)
    return member.node_id if member is not None else cfg.node_name or socket.gethostname()


@contextmanager
def open_engine(cfg: AgentConfig, read_only: bool = False) -> Iterator[Engine]:
    """The pass runner on the configured engine and state; `read_only` plans without the state's write lock."""
    # The state first: when an agent holds it, the caller falls back to the agent before any engine call.
    with open_records(cfg, writer=not read_only) as records:
        docker = DockerEngine(cfg.docker_host, docker_config=cfg.docker_config, connections=cfg.parallelism + 2)
        try:
            docker.ping()
            engine = Engine(
                docker,
                records,
                node_key(cfg),
                parallelism=cfg.parallelism,
                read_only=read_only,
                pull_policy=cfg.pull_policy,
                balancer=cfg.loadbalancer,
                ports=PortRules(cfg.port_range, cfg.own_ports),
            )
            engine.policy = policy_of(cfg)
            engine.policy_configured = policy_configured(cfg)
            yield engine
        finally:
            docker.close()


def load_desired(cfg: AgentConfig) -> DesiredState:
    source = open_source(cfg)
    try:
        return source.load()
    finally:
        source.close()


class LocalControl:
    """The passes run in this process, on the state's write lock."""

    def __init__(self, cfg: AgentConfig, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress

    def _step(self, engine: Engine, desired: DesiredState, allow_empty: bool, migrate: Sequence[str] = ()) -> Step:
        def step() -> tuple[PassPlan, PassReport]:
            plan = engine.plan(desired, allow_empty, migrate_volumes=migrate)
            if self.progress is None:
                return plan, engine.apply(plan)
            with self.progress(plan) as on_result:
                return plan, engine.apply(plan, on_result)

        return step

    def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        desired = load_desired(self.cfg)
        allow_empty = self.cfg.allow_empty if request.allow_empty is None else request.allow_empty
        with open_engine(self.cfg) as engine:
            return converge(
                self._step(engine, desired, allow_empty, request.migrate_volumes),
                lambda: unhealthy(engine, desired),
                wait=request.wait,
                deadline=time.monotonic() + request.timeout,
            )

    def rollback(self, request: RollbackRequest) -> RollbackResult:
        desired = load_desired(self.cfg)
        with open_engine(self.cfg) as engine:
            message = _pin(engine.records, request)
            passes = converge(
                self._step(engine, desired, self.cfg.allow_empty),
                lambda: [],
                wait=False,
                deadline=time.monotonic() + request.timeout,
            )
        return RollbackResult(message=message, passes=passes)

    def suspend(self, request: SuspendRequest) -> SuspendResult:
        with open_records(self.cfg, writer=True) as records:
            changed = records.set_suspended(request.stack, request.suspended)
        return SuspendResult(stack=request.stack, suspended=request.suspended, changed=changed)

    def status(self) -> StatusOutput:
        desired = load_desired(self.cfg) if self.cfg.source else None
        with open_engine(self.cfg, read_only=True) as engine:
            snapshot, seen = engine_fleet(engine)
        stacks = fleet_statuses(desired, snapshot, seen, errors={})
        name = self.cfg.node_name or socket.gethostname()
        return StatusOutput(
            node=seen.names.get(seen.own, name),
            ready=True,
            stacks=stacks,
            nodes=seen.nodes,
            schema_held=seen.schema_held,
        )


def _pin(records: Records, request: RollbackRequest) -> str:
    """Set or lift the pin `request` asks for; the line that says which (RollbackError when it cannot)."""
    if request.unpin:
        lifted = unpin_stack(records, request.stack)
        return f"{request.stack}: " + ("unpinned: following the source" if lifted else "was not pinned")
    pin = pin_stack(records, request.stack, request.to)
    return f"{request.stack}: pinned to {pin.revision}"


class AgentControl:
    """The running agent runs the request through its loop; the answer has the same shape as a local one.

    The calls go over the agent's control socket (`<state_dir>/agent.sock`), which only root may use."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        doc = call(self.socket, "reconcile", request.model_dump(mode="json"), timeout=request.timeout + 60)
        return ReconcileResult.model_validate(doc).model_copy(update={"by_agent": str(self.socket)})

    def rollback(self, request: RollbackRequest) -> RollbackResult:
        doc = call(self.socket, "rollback", request.model_dump(mode="json"), timeout=request.timeout + 60)
        result = RollbackResult.model_validate(doc)
        return result.model_copy(update={"passes": result.passes.model_copy(update={"by_agent": str(self.socket)})})

    def suspend(self, request: SuspendRequest) -> SuspendResult:
        name = "suspend" if request.suspended else "resume"
        return SuspendResult.model_validate(call(self.socket, name, {"stack": request.stack}))

    def status(self) -> StatusOutput:
        return StatusOutput.model_validate(get_status(self.socket))


class _AgentOrLocal:
    """Local passes, unless an agent holds the state by the time the state is opened: then through it."""

    def __init__(self, cfg: AgentConfig, local: LocalControl) -> None:
        self.cfg = cfg
        self.local = local

    def _either(self, local: Callable[[], T], through: Callable[[AgentControl], T]) -> T:
        try:
            return local()
        except StateLocked:
            agent = running_agent(self.cfg)
            if agent is None:
                raise
            return through(AgentControl(agent))

    def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        return self._either(lambda: self.local.reconcile(request), lambda a: a.reconcile(request))

    def rollback(self, request: RollbackRequest) -> RollbackResult:
        return self._either(lambda: self.local.rollback(request), lambda a: a.rollback(request))

    def suspend(self, request: SuspendRequest) -> SuspendResult:
        return self._either(lambda: self.local.suspend(request), lambda a: a.suspend(request))

    def status(self) -> StatusOutput:
        return self._either(self.local.status, lambda a: a.status())


def open_control(cfg: AgentConfig, progress: Progress | None = None) -> Control:
    """The agent holding this state directory when one runs (any state backend), else this process."""
    agent = running_agent(cfg)
    if agent is not None:
        return AgentControl(agent)
    return _AgentOrLocal(cfg, LocalControl(cfg, progress))


# --- a cluster node: changing calls are the managers', and run on the leader -----------------------------------


class NotAManager(DabctlError):
    """A changing command on a cluster worker: only managers may change what the cluster runs."""

    retryable = False


class NoLeader(DabctlError):
    """No manager leads the cluster now (an election is under way, or no manager is up)."""

    retryable = True


def manager_addresses(snapshot: Snapshot) -> list[str]:
    """The cluster addresses of the managers that are up (the leader first)."""
    leader = snapshot.leader.node_id if snapshot.leader is not None else None
    found = [
        st.cluster_address or st.advertise_address
        for node_id, spec in sorted(snapshot.nodes.items(), key=lambda kv: (kv[0] != leader, kv[1].name))
        if spec.role == "manager" and (st := snapshot.statuses.get(node_id)) is not None
    ]
    return [a for a in found if a]


def is_manager_peer(snapshot: Snapshot, peer: str) -> bool:
    """Whether `peer` (the address a cluster call came from) is one a manager that is up records as its own."""
    peer = peer.removeprefix("::ffff:")
    for node_id, spec in snapshot.nodes.items():
        status = snapshot.statuses.get(node_id)
        if spec.role != "manager" or status is None:
            continue
        hosts = {status.advertise_address, status.cluster_address.rpartition(":")[0].strip("[]")}
        if peer in hosts - {""}:
            return True
    return False


def leader_of(snapshot: Snapshot, node_id: str) -> str:
    """The leader's cluster address, for a changing call made on node `node_id`; NotAManager on a worker (or a
    node the cluster does not know), NoLeader when no manager leads."""
    spec = snapshot.nodes.get(node_id)
    if spec is None or spec.role != "manager":
        managers = ", ".join(manager_addresses(snapshot)) or "none is up now"
        what = f"a {spec.role}" if spec is not None else "not a known node"
        raise NotAManager(f"this node is {what} of the cluster: run this on a manager: {managers}")
    leader = snapshot.leader
    if leader is None or not leader.cluster_address:
        raise NoLeader("no manager leads the cluster now (an election takes up to the lease TTL); try again")
    return leader.cluster_address


class LeaderControl:
    """A manager's changing calls, sent to the leader's cluster listener and run there through its loop (so one
    orchestrator acts, fenced); `reconcile --wait` then waits for every node's slots. `status` stays local."""

    def __init__(self, cfg: AgentConfig, address: str) -> None:
        self.cfg = cfg
        self.address = address

    def _call(self, name: str, body: dict[str, object], timeout: float = 60) -> dict[str, object]:
        paths = PkiPaths.of(self.cfg.state_path)
        tls = paths.client_context() if paths.has_node_certificate() else None
        return call_leader(self.address, name, dict(body), timeout=timeout, tls=tls)

    def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        doc = self._call("reconcile", request.model_dump(mode="json"), timeout=request.timeout + 60)
        return ReconcileResult.model_validate(doc).model_copy(update={"by_agent": f"the leader at {self.address}"})

    def rollback(self, request: RollbackRequest) -> RollbackResult:
        doc = self._call("rollback", request.model_dump(mode="json"), timeout=request.timeout + 60)
        result = RollbackResult.model_validate(doc)
        by = f"the leader at {self.address}"
        return result.model_copy(update={"passes": result.passes.model_copy(update={"by_agent": by})})

    def suspend(self, request: SuspendRequest) -> SuspendResult:
        name = "suspend" if request.suspended else "resume"
        return SuspendResult.model_validate(self._call(name, {"stack": request.stack}))

    def status(self) -> StatusOutput:
        return open_control(self.cfg).status()


def open_changing(cfg: AgentConfig, progress: Progress | None = None) -> Control:
    """Where a changing command runs: on a node alone, as `open_control` says; on a cluster node, on the leader
    (asked over the cluster listener), and never on a worker (NotAManager: the managers' addresses)."""
    member = membership(cfg.state_path)
    if member is None:
        return open_control(cfg, progress)
    with open_records(cfg, writer=False) as records:
        snapshot = records.snapshot(restarts=False)
    return LeaderControl(cfg, leader_of(snapshot, member.node_id))
