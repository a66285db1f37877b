"""This node in a cluster: its id, its status under a lease, and — for managers — the leader election.

A node registers once at start (`Member.register`): it refuses to run when another live node holds its name,
takes a lease of the cluster's TTL and puts its NodeStatus under it. `Member.run` then keeps the lease alive every
TTL/3, rewrites the status only when it changes, and grants a new lease (status put again) when the old one is
gone — after a network cut, say. A manager also campaigns for `/leader` (a transaction that holds only while the
key is absent) with the same lease, watches the key while another manager leads, and campaigns again as soon as it
is deleted. While it leads, `fence()` is its term (the key's create revision) and `Records.fence` carries it, so
every orchestrator transaction holds only in that term: a leader that lost its lease without noticing cannot write.

    NotJoined      this node has no spec in the cluster (terminal: join it first)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from importlib import metadata

from agent.config import ConfigError, policy_configured, policy_of
from agent.drivers.balancer import listening_ports
from agent.metrics import Metrics
from agent.pki.files import PkiPaths, certificate_expiry
from agent.state.log import Event, LeaseNotFound, StateLog, StateLogError, Watch
from agent.state.membership import MEMBERSHIP_FILE
from agent.state.nodes import Leader, NodeConflict, NodeRecords
from agent.state.records import LEADER_KEY, Fence, Records
from bundles.policy import policy_record
from schemas.config import AgentConfig, ClusterMembership, is_loopback_endpoint, split_listen
from schemas.errors import DabctlError
from schemas.state import DEFAULT_LEASE_TTL, STATE_SCHEMA, STATE_SCHEMA_OLDEST, LeaderRecord, NodeRole, NodeStatus

log = logging.getLogger("dabctl.membership")


class NotJoined(DabctlError):
    """This node id has no spec in the cluster's state log."""

    retryable = False


# --- this node's identity and membership file: agent.state.membership keeps them (node-id, cluster.json) ---------


def cluster_config(cfg: AgentConfig, membership: ClusterMembership) -> AgentConfig:
    """The config with the cluster's state log (endpoints and prefix from cluster.json) in place of `state`."""
    update: dict[str, object] = {"state": membership.state, "etcd_prefix": membership.etcd_prefix}
    if membership.etcd_tls:  # dabctl's etcd: this node's certificate from the cluster CA is its client certificate
        paths = PkiPaths.of(cfg.state_path)
        update |= {
            "etcd_ca_file": str(paths.ca_cert),
            "etcd_cert_file": str(paths.node_cert),
            "etcd_key_file": str(paths.node_key),
        }
    remote = [h for h in membership.state.removeprefix("etcd://").split(",") if not is_loopback_endpoint(h)]
    tls = membership.etcd_tls or cfg.etcd_ca_file or cfg.etcd_cert_file
    if remote and not tls and not cfg.etcd_insecure:
        raise ConfigError(
            f"{cfg.state_path / MEMBERSHIP_FILE}: the cluster's state etcd://{remote[0]} is plain HTTP to an address "
            "other than loopback; configure etcd_ca_file/etcd_cert_file/etcd_key_file, or set etcd_insecure: true"
        )
    if cfg.advertise_address is None and membership.advertise_address:
        update["advertise_address"] = membership.advertise_address  # the address init/join was given
    return cfg.model_copy(update=update)


# --- what this node says of itself --------------------------------------------------------------------------------


def default_address() -> str:
    """The address of the interface holding the default route ("" without one); no packet is sent."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: a UDP connect only picks the route
        return str(s.getsockname()[0])
    return ""


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def dabctl_version() -> str:
    try:
        return metadata.version("dabctl")
    except metadata.PackageNotFoundError:
        return "unknown"


def status_source(
    cfg: AgentConfig, node: str, listening: Callable[[], set[tuple[str, int]]] = listening_ports
) -> Callable[[], NodeStatus]:
    """A function that reads this node's status now (addresses fixed, busy ports read each call)."""
    address = cfg.advertise_address or default_address()
    cluster_port = split_listen(cfg.cluster_listen)[1]
    version = dabctl_version()
    cpus = os.cpu_count() or 0
    memory = memory_bytes()
    certificate = certificate_expiry(cfg.state_path)  # renewal (a later issue) will make this a read per call
    policy = policy_record(policy_of(cfg)) if policy_configured(cfg) else None

    def read() -> NodeStatus:
        return NodeStatus(
            node_id=node,
            advertise_address=address,
            cluster_address=f"{address}:{cluster_port}" if address else "",
            cpus=cpus,
            memory_bytes=memory,
            busy_ports=sorted(listening()),
            dabctl_version=version,
            schema_version=STATE_SCHEMA,
            schema_oldest=STATE_SCHEMA_OLDEST,
            policy=policy,
            certificate_expires_at=certificate,
        )

    return read


# --- the member --------------------------------------------------------------------------------------------------


class Member:
    """One node's registration and, for a manager, its part in the leader election.

    Thread-safe reads (`fence`, `is_leader`, `leader`) for the pass runner; `run` is the member's own thread.
    """

    def __init__(
        self,
        log: StateLog,
        *,
        node_id: str,
        name: str,
        status: Callable[[], NodeStatus],
        records: Records | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.nodes = NodeRecords(log)
        self.log = log
        self.node_id = node_id
        self.name = name
        self._read_status = status
        self._records = records
        self._metrics = metrics
        self.ttl = DEFAULT_LEASE_TTL
        self.hold_down_until: datetime | None = None  # the cluster record's, read at registration
        self.role: NodeRole = "worker"
        self.lease = 0
        self._status: NodeStatus | None = None
        self._leading: Leader | None = None
        self._seen_leader: Leader | None = None
        self._last_renewed = 0.0
        self._lock = threading.Lock()
        self._watch: Watch | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease_losses = 0  # leases found gone and granted again (tests and logs)
        self.removed = False  # `node rm --force` took this node out while it ran
        self.registered = False

    # --- what the pass runner reads ---

    def fence(self) -> Fence | None:
        """The fence of this node's term while it leads, else None."""
        with self._lock:
            return self._leading.fence if self._leading else None

    @property
    def is_leader(self) -> bool:
        return self.fence() is not None

    @property
    def interval(self) -> float:
        """Seconds between keepalives: a third of the TTL, so two can be lost before the lease lapses."""
        return self.ttl / 3

    # --- registration ---

    def register(self) -> None:
        """Join the live members: refuse a name another live node holds, then take a lease and put the status."""
        other = self.nodes.live_namesake(self.name, self.node_id)
        if other is not None:
            raise NodeConflict(
                f"node name {self.name!r} is held by live node {other.node_id} (this node is {self.node_id}); set "
                "another node_name, or stop the other agent and wait for its lease to lapse"
            )
        spec = self.nodes.spec(self.node_id)
        if spec is None:
            raise NotJoined(
                f"node {self.node_id} ({self.name}) is not a member of the cluster in "
                f"{MEMBERSHIP_FILE}; join it with `dabctl cluster join`, or remove {MEMBERSHIP_FILE} to run alone"
            )
        self.role = spec.role
        cluster = self.nodes.cluster()
        self.ttl = cluster.lease_ttl if cluster else DEFAULT_LEASE_TTL
        self.hold_down_until = cluster.hold_down_until if cluster else None
        # This node returning (same id) after a crash: end its previous lease now rather than wait for it, which
        # also frees the leader key a previous run of this manager held.
        old = self.nodes.status(self.node_id)
        if old is not None and old.lease:
            with contextlib.suppress(LeaseNotFound):
                self.log.revoke(old.lease)
        self._renew_lease()
        self.registered = True
        if self.role == "manager":
            self._campaign()
        log.info("node registered", extra={"node": self.name, "id": self.node_id, "role": self.role, "ttl": self.ttl})

    def _renew_lease(self) -> None:
        """A new lease with this node's status under it (the old lease is gone)."""
        self._lose_leadership("lease lost")
        self.lease = self.log.grant(self.ttl)
        self._last_renewed = time.monotonic()
        self._status = None
        self._put_status()

    def _put_status(self) -> None:
        status = self._read_status()
        if status != self._status:
            self.nodes.put_status(status, self.lease)
            self._status = status

    # --- leadership ---

    def _campaign(self) -> None:
        won = self.nodes.campaign(
            LeaderRecord(node_id=self.node_id, name=self.name, cluster_address=self._address()), self.lease
        )
        if won is None:
            # The key may be this node's own, put under its current lease by an earlier campaign: that is a win.
            held = self.nodes.leader()
            if held is not None and held.record.node_id == self.node_id and held.lease == self.lease:
                won = held
        if won is not None:
            with self._lock:
                self._leading = won
            if self._records is not None:
                self._records.fence = won.fence
            log.info("leading the cluster", extra={"node": self.name, "term": won.term})
        self._seen_leader = won or self.nodes.leader()
        self._count_leader()

    def _address(self) -> str:
        return self._status.cluster_address if self._status else ""

    def _lose_leadership(self, why: str) -> None:
        with self._lock:
            was, self._leading = self._leading, None
        if was is not None:
            if self._records is not None:
                self._records.fence = None
            log.warning("no longer leading", extra={"node": self.name, "term": was.term, "why": why})
            self._count_leader()

    def _count_leader(self) -> None:
        if self._metrics is None:
            return
        leading = self._leading
        self._metrics.leader.set(1 if leading else 0)
        seen = leading or self._seen_leader
        self._metrics.term.set(seen.term if seen else 0)

    def on_leader_event(self, event: Event) -> None:
        """A change of `/leader`: campaign when it is gone, step down when another term holds it."""
        if event.key != LEADER_KEY:
            return
        current = self.fence()
        if current is not None and event.revision < current.term:
            return  # an earlier term's change, delivered after this node's own term began (a tick campaigned first)
        if event.type == "delete":
            self._lose_leadership("leader key deleted")
            if self.role == "manager":
                self._campaign()
            return
        if current is not None and event.create_revision != current.term:
            self._lose_leadership(f"term {event.create_revision} began")
        if current is None or event.create_revision != current.term:
            self._seen_leader = Leader(LeaderRecord.model_validate_json(event.value), event.create_revision, 0)
            self._count_leader()

    # --- the periodic part ---

    def tick(self) -> None:
        """Keep the lease alive (or take a new one), rewrite a changed status, follow the spec's role."""
        if not self.registered:  # the state log did not answer at start
            self.register()
            return
        try:
            alive = self.log.keepalive(self.lease) > 0
        except LeaseNotFound:
            alive = False
        except StateLogError:
            if time.monotonic() - self._last_renewed > self.ttl:
                self._lose_leadership("state log unreachable for longer than the lease TTL")
            raise
        if not alive:
            self.lease_losses += 1
            log.warning("lease lapsed; registering again", extra={"node": self.name, "id": self.node_id})
            self._renew_lease()
        else:
            self._last_renewed = time.monotonic()
            self._put_status()
        spec = self.nodes.spec(self.node_id)
        if spec is None:
            self._removed()
            return
        role: NodeRole = spec.role
        if role != self.role:
            log.info("role changed", extra={"node": self.name, "role": role})
            self.role = role
            if role == "worker" and self._leading is not None:
                leading = self._leading
                self._lose_leadership("demoted to worker")
                self.nodes.resign(leading)
        if self.role == "manager" and self._leading is None:
            current = self.nodes.leader()
            if current is None:
                self._campaign()
            elif current != self._seen_leader:
                self._seen_leader = current
                self._count_leader()
        if self._leading is not None and self._metrics is not None:
            self._count_nodes()

    def _removed(self) -> None:
        """`node rm --force` took this node out: leave (resign, end the lease) and stay out until joined again."""
        log.error(
            "this node was removed from the cluster; join it again to take part",
            extra={"node": self.name, "id": self.node_id},
        )
        with self._lock:
            leading, self._leading = self._leading, None
        if leading is not None:
            if self._records is not None:
                self._records.fence = None
            self.nodes.resign(leading)
            self._count_leader()
        with contextlib.suppress(LeaseNotFound):
            self.log.revoke(self.lease)
        self.role = "worker"
        self.removed = True
        self._stop.set()

    def _count_nodes(self) -> None:
        assert self._metrics is not None
        infos = self.nodes.membership().infos()
        self._metrics.set_nodes(sum(n.up for n in infos), sum(not n.up for n in infos))

    def run(self) -> None:
        """Until `close()`: keepalives every TTL/3 and, on a manager, the leader key's changes in between."""
        next_tick = time.monotonic() + self.interval
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.interval
                try:
                    self.tick()
                except StateLogError as exc:
                    log.warning("membership: state log error", extra={"node": self.name, "error": str(exc)})
                except (NodeConflict, NotJoined) as exc:  # found when registering late: this node takes no part
                    log.error("membership: %s", exc, extra={"node": self.name})
                    return
            wait = max(0.0, next_tick - time.monotonic())
            if self.role != "manager":
                self._drop_watch()
                self._stop.wait(wait)
                continue
            try:
                event = self._leader_watch().next(timeout=wait)
                if event is not None:
                    self.on_leader_event(event)
            except StateLogError as exc:  # compacted history or a failed campaign: read afresh on the next turn
                log.warning("membership: leader watch", extra={"node": self.name, "error": str(exc)})
                self._drop_watch()
                self._stop.wait(min(wait, 0.5))

    def _leader_watch(self) -> Watch:
        if self._watch is None:
            # From the revision the leader was read at: a deletion between that read and now is not missed.
            revision = self.log.revision()
            leader = self.nodes.leader()
            if leader is None and self._leading is None:
                self._campaign()
            self._watch = self.log.watch(LEADER_KEY, start_revision=revision + 1)
        return self._watch

    def _drop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def start(self) -> None:
        """Run the member on a thread of its own (after `register`)."""
        self._thread = threading.Thread(target=self.run, name="membership", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; a leader resigns so that another manager takes over at once. The node's lease is left
        to lapse: a restarting agent keeps its replicas where they are."""
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drop_watch()
        with self._lock:
            leading, self._leading = self._leading, None
        if leading is not None:
            if self._records is not None:
                self._records.fence = None
            with contextlib.suppress(StateLogError):
                self.nodes.resign(leading)
