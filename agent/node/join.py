"""Making and joining a cluster: `cluster init` (optionally moving a single-node install into it), the manager's
side of `cluster join` (served on the cluster listener), the joining node's side, and the join tokens.

Who writes what is etcd's to enforce (agent/state/etcdauth.py): `init` turns on etcd auth for the cluster's prefix,
and every node that joins gets its own etcd user whose role writes only `/node/<its id>/`; managers' users write
the whole prefix. The cluster listener offers joining only: nothing on it writes intent.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.api.join import JoinRefused, post_join
from agent.state.backends import STATE_FILE, etcd_endpoints
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT, EtcdAuth, random_password
from agent.state.log import Compare, KeyValue, Op, Put, StateLog
from agent.state.membership import (
    cluster_secrets,
    membership,
    node_id,
    write_cluster_secrets,
    write_membership,
)
from agent.state.records import ASSIGNMENTS, CLUSTER_KEY, NODES, OWNER_KEY, TASKS, node_status_key
from agent.state.sqlite import SqliteStateLog
from schemas.config import AgentConfig, ClusterMembership, split_listen
from schemas.errors import DabctlError
from schemas.join import ClusterSecrets, InvalidToken, JoinRequest, JoinResponse, JoinToken, Role, role_of
from schemas.state import Assignment, ClusterRecord, NodeSpec, TaskRecord

log = logging.getLogger("dabctl.cluster")

JOIN_PATH = "join"  # POST /cluster/v1/join on the cluster listener
TXN_OPS = 100  # etcd 3.4 allows 128 operations per transaction
TXN_BYTES = 1 << 20  # and 1.5 MiB per request (base64 and JSON around the values)


class ClusterSetupError(DabctlError):
    """`cluster init`, `join` or `join-token` cannot do what was asked; the message says why and what to do."""


def node_name(cfg: AgentConfig) -> str:
    return cfg.node_name or socket.gethostname()


def cluster_address(cfg: AgentConfig, advertise: str | None) -> str:
    """host:port at which other nodes reach this node's cluster listener."""
    host = advertise or cfg.advertise_address or default_address()
    _, port = split_listen(cfg.cluster_listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_address() -> str:
    """The address this host sends from on its default route (no packet is sent: a UDP socket only routes)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
            return str(s.getsockname()[0])
    except OSError:
        raise ClusterSetupError(
            "this host has no default route to take its address from; pass --advertise-address ADDRESS "
            "(or set advertise_address in the config)"
        ) from None


# --- cluster init ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InitOptions:
    state: str  # etcd://host:2379,...
    prefix: str
    advertise_address: str | None = None
    lease_ttl: int | None = None
    root_password: str | None = field(default=None, repr=False)
    from_state: Path | None = None


@dataclass(frozen=True, kw_only=True)
class InitResult:
    membership: ClusterMembership
    secrets: ClusterSecrets
    moved: dict[str, int] = field(default_factory=dict)  # keys moved from a single-node state, by kind


def _etcd(
    cfg: AgentConfig, state: str, prefix: str, user: str | None = None, password: str | None = None
) -> EtcdStateLog:
    tls = bool(cfg.etcd_ca_file or cfg.etcd_cert_file)
    return EtcdStateLog(
        etcd_endpoints(state, tls),
        prefix=prefix,
        ca_file=cfg.etcd_ca_file,
        cert_file=cfg.etcd_cert_file,
        key_file=cfg.etcd_key_file,
        user=user,
        password=password,
    )


def init_cluster(cfg: AgentConfig, opts: InitOptions) -> InitResult:
    """Make a cluster with this node as its first manager (see `dabctl cluster init --help`)."""
    state_dir = cfg.state_path
    existing = membership(state_dir)
    if existing is not None:
        raise ClusterSetupError(
            f"this node already belongs to cluster {existing.cluster_id} ({state_dir / 'cluster.json'}); "
            "`dabctl cluster leave` it first"
        )
    nid = node_id(state_dir)
    name = node_name(cfg)
    address = cluster_address(cfg, opts.advertise_address)
    anonymous = _etcd(cfg, opts.state, opts.prefix)
    try:
        auth_on = EtcdAuth(anonymous).enabled()
    finally:
        anonymous.close()
    if auth_on and not opts.root_password:
        raise ClusterSetupError(
            f"etcd at {opts.state} already has authentication on: pass --etcd-root-password-file FILE (mode 0600) "
            "holding its root user's password, so that init can create this cluster's roles and users"
        )
    root_password = opts.root_password or random_password()
    admin = _etcd(cfg, opts.state, opts.prefix, *((ROOT, root_password) if auth_on else (None, None)))
    try:
        found = admin.get(CLUSTER_KEY)
        if found is not None:
            other = ClusterRecord.model_validate_json(found.value).cluster_id
            raise ClusterSetupError(
                f"etcd prefix {opts.prefix} already holds cluster {other}: join it with `dabctl cluster join`, or "
                "pass another --etcd-prefix"
            )
        moved: dict[str, int] = {}
        if opts.from_state is not None:
            if admin.get(OWNER_KEY) is not None:
                raise ClusterSetupError(
                    f"etcd prefix {opts.prefix} already holds dabctl state (an owner id): moving {opts.from_state} "
                    "there would mix two installs; pass an empty --etcd-prefix"
                )
            moved = move_state(opts.from_state, admin, nid)
        worker, manager = JoinToken.new(), JoinToken.new()
        now = datetime.now(UTC)
        record = ClusterRecord(
            cluster_id=_cluster_id(),
            created_at=now,
            worker_token_digest=worker.digest,
            manager_token_digest=manager.digest,
        )
        if opts.lease_ttl:
            record = record.model_copy(update={"lease_ttl": opts.lease_ttl})
        spec = NodeSpec(node_id=nid, name=name, role="manager", joined_at=now)
        done = admin.txn(
            [Compare(CLUSTER_KEY, "create_revision", "==", 0)],
            [
                Put(CLUSTER_KEY, record.model_dump_json().encode()),
                Put(f"{NODES}{nid}", spec.model_dump_json().encode()),
            ],
        )
        if not done.succeeded:
            raise ClusterSetupError(
                f"another `cluster init` on etcd prefix {opts.prefix} came first; join that cluster"
            )
        auth = EtcdAuth(admin)
        if not auth_on:
            auth.ensure_root(root_password)
        user, password = auth.issue_node_user(nid, manager=True)
        if not auth_on:
            auth.enable()
    finally:
        admin.close()
    secrets = ClusterSecrets(worker_token=str(worker), manager_token=str(manager), etcd_root_password=root_password)
    member = ClusterMembership(
        cluster_id=record.cluster_id,
        node_id=nid,
        state=opts.state,
        etcd_prefix=opts.prefix,
        etcd_user=user,
        etcd_password=password,
        managers=[address],
        advertise_address=address.rpartition(":")[0].strip("[]"),
    )
    write_cluster_secrets(state_dir, secrets)
    write_membership(state_dir, member)
    return InitResult(membership=member, secrets=secrets, moved=moved)


def _cluster_id() -> str:
    from schemas.join import new_node_id

    return new_node_id()


# --- moving a single-node install ------------------------------------------------------------------------------


def move_state(state_dir: Path, target: StateLog, nid: str) -> dict[str, int]:
    """Copy a single-node install's state (SQLite, `<state_dir>/state.db`) into `target`, every record as it is
    except that slots assigned to the node by name are assigned to it by id (`nid`), in assignments and tasks.
    The owner id moves with it, so the agent adopts every container (they carry it as a label): none is recreated.
    Takes the SQLite state's write lock, so no agent may run on it meanwhile."""
    path = state_dir / STATE_FILE
    if not path.exists():
        raise ClusterSetupError(f"--from-state {state_dir}: no {STATE_FILE} there; name a single-node state directory")
    source = SqliteStateLog(path, writer=True)
    try:
        revision = source.revision()
        kvs = [kv for kv in source.range("", revision=revision) if not kv.lease]
    finally:
        source.close()
    moved: dict[str, int] = {}
    batch: list[Op] = []
    size = 0
    for kv in kvs:
        value = _rekey(kv, nid)
        if batch and (len(batch) >= TXN_OPS or size + len(value) * 4 // 3 > TXN_BYTES):
            target.txn([], batch)
            batch, size = [], 0
        batch.append(Put(kv.key, value))
        size += len(value) * 4 // 3 + len(kv.key) + 64
        kind = kv.key.strip("/").split("/", 1)[0]
        moved[kind] = moved.get(kind, 0) + 1
    if batch:
        target.txn([], batch)
    return moved


def _rekey(kv: KeyValue, nid: str) -> bytes:
    if kv.key.startswith(ASSIGNMENTS):
        nodes = Assignment.model_validate_json(kv.value).nodes
        slots = sorted({slot for held in nodes.values() for slot in held})
        return Assignment(nodes={nid: slots} if slots else {}).model_dump_json().encode()
    if kv.key.startswith(TASKS):
        task = TaskRecord.model_validate_json(kv.value)
        return task.model_copy(update={"node": nid}).model_dump_json().encode()
    return kv.value


# --- the manager's side of a join ------------------------------------------------------------------------------


class Admission:
    """The manager's answer to `POST /cluster/v1/join`: check the token, admit the node, issue its etcd user."""

    def __init__(self, cfg: AgentConfig, log_: StateLog, member: ClusterMembership) -> None:
        self.cfg = cfg
        self.log = log_
        self.member = member

    def __call__(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            request = JoinRequest.model_validate(body)
        except ValidationError as exc:
            return 400, {"error": f"not a join request: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"}
        try:
            response = self.admit(request)
        except JoinRefused as exc:
            log.warning("join refused", extra={"node": request.name, "node_id": request.node_id, "error": str(exc)})
            return exc.status, {"error": str(exc)}
        log.info("node joined", extra={"node": request.name, "node_id": request.node_id, "role": response.role})
        return 200, json.loads(response.model_dump_json())

    def _own_role(self) -> Role | None:
        kv = self.log.get(f"{NODES}{self.member.node_id}")
        return NodeSpec.model_validate_json(kv.value).role if kv is not None else None

    def admit(self, request: JoinRequest) -> JoinResponse:
        if self._own_role() != "manager":
            raise JoinRefused(403, "this node is not a manager: send the join to a manager's cluster address")
        kv = self.log.get(CLUSTER_KEY)
        if kv is None:
            raise JoinRefused(503, "this node's cluster record is missing from the state log")
        record = ClusterRecord.model_validate_json(kv.value)
        try:
            token = JoinToken.parse(request.token)
        except InvalidToken as exc:
            raise JoinRefused(401, str(exc)) from None
        role = role_of(token, record.worker_token_digest, record.manager_token_digest)
        if role is None or token.ca_digest != record.ca_digest:
            raise JoinRefused(
                401, "invalid join token: print the current one with `dabctl cluster join-token` on a manager"
            )
        spec_kv = self._check_name(request)
        secrets = cluster_secrets(self.cfg.state_path)
        if secrets is None or not secrets.etcd_root_password:
            raise JoinRefused(503, "this manager holds no etcd root password (cluster-secrets.json); join via another")
        now = datetime.now(UTC)
        old = NodeSpec.model_validate_json(spec_kv.value) if spec_kv is not None else None
        spec = (old.model_copy(update={"role": role, "name": request.name}) if old is not None else None) or NodeSpec(
            node_id=request.node_id, name=request.name, role=role, joined_at=now
        )
        key = f"{NODES}{request.node_id}"
        version = spec_kv.mod_revision if spec_kv is not None else 0
        done = self.log.txn([Compare(key, "mod_revision", "==", version)], [Put(key, spec.model_dump_json().encode())])
        if not done.succeeded:
            raise JoinRefused(409, "the node's record changed while it joined; try again")
        root = _etcd(self.cfg, self.member.state, self.member.etcd_prefix, ROOT, secrets.etcd_root_password)
        try:
            user, password = EtcdAuth(root).issue_node_user(request.node_id, manager=role == "manager")
        finally:
            root.close()
        return JoinResponse(
            cluster_id=record.cluster_id,
            node_id=request.node_id,
            role=role,
            state=self.member.state,
            etcd_prefix=self.member.etcd_prefix,
            etcd_user=user,
            etcd_password=password,
            managers=self._managers(),
            secrets=secrets if role == "manager" else None,
        )

    def _check_name(self, request: JoinRequest) -> KeyValue | None:
        """The joining node's own spec (a node returning), refusing a name a live node of another id holds."""
        mine = None
        for kv in self.log.range(NODES):
            spec = NodeSpec.model_validate_json(kv.value)
            if spec.node_id == request.node_id:
                mine = kv
            elif spec.name == request.name and self.log.get(node_status_key(spec.node_id)) is not None:
                raise JoinRefused(
                    409,
                    f"node name {request.name!r} belongs to live node {spec.node_id}: give this node another "
                    "node_name, or stop that node and wait for its lease to lapse",
                )
        return mine

    def _managers(self) -> list[str]:
        from schemas.state import NodeStatus

        found = list(self.member.managers)
        for kv in self.log.range(NODES):
            spec = NodeSpec.model_validate_json(kv.value)
            status = self.log.get(node_status_key(spec.node_id)) if spec.role == "manager" else None
            if status is not None:
                address = NodeStatus.model_validate_json(status.value).cluster_address
                if address and address not in found:
                    found.append(address)
        return found


def cluster_api(
    cfg: AgentConfig, log_: StateLog, member: ClusterMembership
) -> dict[str, Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]]:
    """The cluster listener's joining call (`POST /cluster/v1/join`); the peer's address is not its check (the
    token is)."""
    admission = Admission(cfg, log_, member)
    return {JOIN_PATH: lambda body, _peer: admission(body)}


def cluster_membership(cfg: AgentConfig) -> ClusterMembership | None:
    """This node's cluster membership, refusing to run a cluster node whose cluster listener would have no TLS
    unless `cluster_insecure` says so (ClusterSetupError)."""
    member = membership(cfg.state_path)
    if member is not None and not cfg.cluster_insecure:
        raise ClusterSetupError(
            f"this node belongs to cluster {member.cluster_id} ({cfg.state_path / 'cluster.json'}), and its cluster "
            f"listener ({cfg.cluster_listen}) would carry join tokens and etcd credentials in plain HTTP: TLS for "
            "it comes with the cluster's certificate authority, which this dabctl does not have yet; set "
            "cluster_insecure: true to run it without (tests and isolated networks only)"
        )
    return member


# --- the joining node's side ------------------------------------------------------------------------------------


def join_cluster(cfg: AgentConfig, token_text: str, manager: str, advertise: str | None) -> JoinResponse:
    """Join the cluster whose manager's cluster listener is at `manager` (host:port) with a join token."""
    state_dir = cfg.state_path
    existing = membership(state_dir)
    if existing is not None:
        raise ClusterSetupError(
            f"this node already belongs to cluster {existing.cluster_id} ({state_dir / 'cluster.json'}); "
            "`dabctl cluster leave` it first"
        )
    try:
        token = JoinToken.parse(token_text)
    except InvalidToken as exc:
        raise ClusterSetupError(f"--token: {exc}") from None
    if token.ca_digest:
        raise ClusterSetupError(
            "the token pins a cluster CA, which this dabctl cannot check yet; upgrade dabctl on this node"
        )
    request = JoinRequest(
        token=str(token),
        node_id=node_id(state_dir),
        name=node_name(cfg),
        advertise_address=advertise or cfg.advertise_address or "",
    )
    response = post_join(manager, request)
    managers = [manager, *(m for m in response.managers if m != manager)]
    write_membership(
        state_dir,
        ClusterMembership(
            cluster_id=response.cluster_id,
            node_id=response.node_id,
            state=response.state,
            etcd_prefix=response.etcd_prefix,
            etcd_user=response.etcd_user,
            etcd_password=response.etcd_password,
            managers=managers,
            advertise_address=request.advertise_address or None,
        ),
    )
    if response.secrets is not None:
        write_cluster_secrets(state_dir, response.secrets)
    return response


# --- join tokens ----------------------------------------------------------------------------------------------


def join_token(cfg: AgentConfig, log_: StateLog, role: Role, rotate: bool) -> str:
    """The join token for `role`, from this manager's secrets; `rotate` makes a new one (the old one stops
    admitting nodes at once; nodes already joined are not affected)."""
    member = membership(cfg.state_path)
    secrets = cluster_secrets(cfg.state_path)
    if member is None or secrets is None:
        raise ClusterSetupError("this node is not a cluster manager (no cluster.json and cluster-secrets.json)")
    kv = log_.get(CLUSTER_KEY)
    if kv is None:
        raise ClusterSetupError("the cluster record is missing from the state log")
    record = ClusterRecord.model_validate_json(kv.value)
    field_name = f"{role}_token_digest"
    current = JoinToken.parse(getattr(secrets, f"{role}_token"))
    if not rotate:
        if current.digest != getattr(record, field_name):
            raise ClusterSetupError(
                f"the {role} token was rotated on another manager; print it there, or rotate it here with --rotate"
            )
        return str(current)
    fresh = JoinToken.new(record.ca_digest)
    updated = record.model_copy(update={field_name: fresh.digest})
    done = log_.txn(
        [Compare(CLUSTER_KEY, "mod_revision", "==", kv.mod_revision)],
        [Put(CLUSTER_KEY, updated.model_dump_json().encode())],
    )
    if not done.succeeded:
        raise ClusterSetupError("the cluster record changed meanwhile (another rotation?); try again")
    write_cluster_secrets(cfg.state_path, secrets.model_copy(update={f"{role}_token": str(fresh)}))
    return str(fresh)
