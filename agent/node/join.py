"""Making and joining a cluster: `cluster init` (optionally moving a single-node install into it), the manager's
side of `cluster join` (served on the cluster listener), the joining node's side, and the join tokens.

Who writes what is etcd's to enforce (agent/state/etcdauth.py): `init` turns on etcd auth for the cluster's prefix,
and every node that joins gets its own etcd user whose role writes only `/node/<its id>/`; managers' users write
the whole prefix. The cluster listener offers joining only: nothing on it writes intent.

Certificates (agent/pki): `init` makes the cluster CA and the first manager's certificate; the join token pins the
CA's digest. A joining node fetches the CA certificate, checks its digest against the token's before it sends
anything, makes its key (which never leaves it) and sends a CSR with the token over TLS; the manager answers with a
certificate naming the node's id and the token's role. A new manager then fetches the cluster's secrets and the CA
key over mutual TLS with that certificate (`POST /cluster/v1/secrets`, manager certificates only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.api.join import JoinRefused, fetch_ca, post, post_join
from agent.api.server import ClusterTls
from agent.node.etcdmember import (
    CLIENT_PORT,
    PEER_PORT,
    LocalMember,
    TlsFiles,
    endpoints_of,
    host_port,
    list_members,
    member_spec,
    root_client,
)
from agent.pki.ca import (
    CertificateRefused,
    LocalSigner,
    digest_matches,
    identify,
    key_pem,
    new_ca,
    new_csr,
    new_key,
)
from agent.pki.files import PkiPaths
from agent.state.backends import STATE_FILE, etcd_endpoints
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT, EtcdAuth, random_password
from agent.state.etcdcluster import EtcdMembership, MemberChangeRefused, follow_members, member_status
from agent.state.log import Compare, KeyValue, Op, Put, StateLog, StateLogError
from agent.state.membership import (
    MEMBERSHIP_FILE,
    SECRETS_FILE,
    cluster_secrets,
    membership,
    node_id,
    write_cluster_secrets,
    write_membership,
)
from agent.state.records import ASSIGNMENTS, CLUSTER_KEY, NODES, OWNER_KEY, TASKS, node_status_key
from agent.state.sqlite import SqliteStateLog
from reconcilers.etcdmembers import Member, removal_refusal
from schemas.config import AgentConfig, ClusterMembership, split_listen
from schemas.errors import DabctlError
from schemas.join import (
    ClusterSecrets,
    InvalidToken,
    JoinMessage,
    JoinRequest,
    JoinResponse,
    JoinToken,
    ManagerSecrets,
    Role,
    role_of,
)
from schemas.state import Assignment, ClusterRecord, NodeSpec, TaskRecord

log = logging.getLogger("dabctl.cluster")

JOIN_PATH = "join"  # POST /cluster/v1/join on the cluster listener
SECRETS_PATH = "secrets"  # POST /cluster/v1/secrets: managers' certificates only
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


def _address_towards(peer: str) -> str:
    """This host's address on its route to `peer` (host:port); "" when there is none (no packet is sent)."""
    host = peer.rsplit(":", 1)[0].strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return ""


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
    state: str | None  # etcd://host:2379,...; None: this node runs the cluster's first etcd member
    prefix: str
    advertise_address: str | None = None
    lease_ttl: int | None = None
    root_password: str | None = field(default=None, repr=False)
    from_state: Path | None = None
    certificate_days: int | None = None


@dataclass(frozen=True, kw_only=True)
class InitResult:
    membership: ClusterMembership
    secrets: ClusterSecrets
    moved: dict[str, int] = field(default_factory=dict)  # keys moved from a single-node state, by kind
    seconds: dict[str, float] = field(default_factory=dict)  # what init spent its time on, by step


def _etcd(
    cfg: AgentConfig,
    state: str,
    prefix: str,
    user: str | None = None,
    password: str | None = None,
    *,
    tls: TlsFiles | None = None,
) -> EtcdStateLog:
    """A client of the etcd at `state`: with `tls`, else this node's certificate when the cluster's etcd is
    dabctl's (cluster.json's etcd_tls), else the config's etcd_ca_file / etcd_cert_file / etcd_key_file."""
    member = membership(cfg.state_path)
    files = tls or (node_tls(cfg) if member is not None and member.etcd_tls else None)
    if files is not None:
        return EtcdStateLog(etcd_endpoints(state, True), prefix=prefix, user=user, password=password, **files.client())
    return EtcdStateLog(
        etcd_endpoints(state, bool(cfg.etcd_ca_file or cfg.etcd_cert_file)),
        prefix=prefix,
        ca_file=cfg.etcd_ca_file,
        cert_file=cfg.etcd_cert_file,
        key_file=cfg.etcd_key_file,
        user=user,
        password=password,
    )


def cluster_root(cfg: AgentConfig, member: ClusterMembership, password: str) -> EtcdStateLog:
    """etcd's root user on the cluster's prefix (a manager: to issue node users and change their roles)."""
    return _etcd(cfg, member.state, member.etcd_prefix, ROOT, password)


def node_tls(cfg: AgentConfig) -> TlsFiles | None:
    """The node's certificate from the cluster CA, its key and the CA certificate (`<state_dir>/pki/`): what its
    etcd member serves its ports with and what its etcd client presents. None for a node without one."""
    paths = PkiPaths.of(cfg.state_path)
    if not paths.has_node_certificate():
        return None
    return TlsFiles(ca=str(paths.ca_cert), cert=str(paths.node_cert), key=str(paths.node_key))


def _require_tls(cfg: AgentConfig) -> TlsFiles:
    tls = node_tls(cfg)
    if tls is None:
        raise ClusterSetupError(
            f"running the cluster's etcd on this node needs its certificate from the cluster CA, and "
            f"{PkiPaths.of(cfg.state_path).root} holds none: join the cluster again with a token from "
            "`dabctl cluster join-token`"
        )
    return tls


def _advertise_host(cfg: AgentConfig, advertise: str | None) -> str:
    return advertise or cfg.advertise_address or default_address()


def start_first_member(cfg: AgentConfig, nid: str, cluster_id: str, host: str) -> tuple[LocalMember, str]:
    """Start this node's etcd member as a new one-member cluster and wait until it serves: (member, state)."""
    tls = _require_tls(cfg)
    local = LocalMember(cfg.state_path)
    if local.spec() is not None:
        raise ClusterSetupError(
            f"{local.dir} holds an etcd member already (of a cluster this node left?): remove that directory first"
        )
    local.run(member_spec(tls, node_id=nid, host=host, cluster_id=cluster_id))
    return local, f"etcd://{host_port(host, CLIENT_PORT)}"


def init_cluster(cfg: AgentConfig, opts: InitOptions) -> InitResult:
    """Make a cluster with this node as its first manager (see `dabctl cluster init --help`); with no etcd given,
    this node runs the cluster's etcd (its first member, TLS with its certificate from the new cluster CA), removed
    again with the certificates when init fails."""
    existing = membership(cfg.state_path)
    if existing is not None:
        raise ClusterSetupError(
            f"this node already belongs to cluster {existing.cluster_id} ({cfg.state_path / MEMBERSHIP_FILE}); "
            "`dabctl cluster leave` it first"
        )
    nid = node_id(cfg.state_path)
    days = opts.certificate_days or ClusterRecord.model_fields["certificate_days"].default
    pki = _new_pki(_cluster_id(), nid, cluster_address(cfg, opts.advertise_address), days)
    if opts.state is not None:
        return _init_cluster(cfg, opts, opts.state, pki, None)
    paths = PkiPaths.of(cfg.state_path)
    pki.write(paths)  # the member serves its ports with this node's certificate from its first start
    try:
        tls = _require_tls(cfg)
        t0 = time.monotonic()
        local, state = start_first_member(cfg, nid, pki.cluster_id, _advertise_host(cfg, opts.advertise_address))
        started = time.monotonic() - t0
        try:
            result = _init_cluster(cfg, opts, state, pki, tls)
        except BaseException:
            local.destroy()
            raise
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)
        raise
    result.seconds["etcd"] = started
    return result


def _init_cluster(cfg: AgentConfig, opts: InitOptions, state: str, pki: _NewPki, tls: TlsFiles | None) -> InitResult:
    """init on the etcd at `state`; `tls`: it is the member this node runs (its client certificate)."""
    state_dir = cfg.state_path
    nid = node_id(state_dir)
    name = node_name(cfg)
    address = cluster_address(cfg, opts.advertise_address)
    anonymous = _etcd(cfg, state, opts.prefix, tls=tls)
    try:
        auth_on = EtcdAuth(anonymous).enabled()
    finally:
        anonymous.close()
    if auth_on and not opts.root_password:
        raise ClusterSetupError(
            f"etcd at {state} already has authentication on: pass --etcd-root-password-file FILE (mode 0600) "
            "holding its root user's password, so that init can create this cluster's roles and users"
        )
    root_password = opts.root_password or random_password()
    admin = _etcd(cfg, state, opts.prefix, *((ROOT, root_password) if auth_on else (None, None)), tls=tls)
    try:
        found = admin.get(CLUSTER_KEY)
        if found is not None:
            other = ClusterRecord.model_validate_json(found.value).cluster_id
            raise ClusterSetupError(
                f"etcd prefix {opts.prefix} already holds cluster {other}: join it with `dabctl cluster join`, or "
                "pass another --etcd-prefix"
            )
        moved: dict[str, int] = {}
        seconds: dict[str, float] = {}
        if opts.from_state is not None:
            if admin.get(OWNER_KEY) is not None:
                raise ClusterSetupError(
                    f"etcd prefix {opts.prefix} already holds dabctl state (an owner id): moving {opts.from_state} "
                    "there would mix two installs; pass an empty --etcd-prefix"
                )
            moved = move_state(opts.from_state, admin, nid)
        seconds["pki"] = pki.seconds
        worker, manager = JoinToken.new(pki.digest), JoinToken.new(pki.digest)
        now = datetime.now(UTC)
        record = ClusterRecord(
            cluster_id=pki.cluster_id,
            created_at=now,
            worker_token_digest=worker.digest,
            manager_token_digest=manager.digest,
            ca_digest=pki.digest,
        )
        if opts.lease_ttl:
            record = record.model_copy(update={"lease_ttl": opts.lease_ttl})
        if opts.certificate_days:
            record = record.model_copy(update={"certificate_days": opts.certificate_days})
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
        state=state,
        etcd_prefix=opts.prefix,
        etcd_user=user,
        etcd_password=password,
        managers=[address],
        advertise_address=address.rpartition(":")[0].strip("[]"),
        etcd_tls=tls is not None,
    )
    pki.write(PkiPaths.of(state_dir))
    write_cluster_secrets(state_dir, secrets)
    write_membership(state_dir, member)
    return InitResult(membership=member, secrets=secrets, moved=moved, seconds=seconds)


@dataclass(frozen=True, kw_only=True)
class _NewPki:
    cluster_id: str
    seconds: float  # the time it took to make
    ca_cert: bytes
    ca_key: bytes = field(repr=False)
    node_cert: bytes
    node_key: bytes = field(repr=False)
    digest: str

    def write(self, paths: PkiPaths) -> None:
        paths.write(paths.ca_key, self.ca_key)
        paths.write(paths.node_key, self.node_key)
        paths.write(paths.node_cert, self.node_cert)
        paths.write(paths.ca_cert, self.ca_cert)


def _new_pki(cluster_id: str, nid: str, address: str, days: int) -> _NewPki:
    """The cluster's CA and the first manager's key and certificate (in memory: written once init succeeded)."""
    from agent.pki.ca import ca_digest

    t0 = time.monotonic()
    ca_cert, ca_key = new_ca(cluster_id)
    key = new_key()
    cert = LocalSigner(ca_cert, ca_key).sign(
        new_csr(key, nid), node_id=nid, role="manager", address=_host_of(address), days=days
    )
    return _NewPki(
        cluster_id=cluster_id,
        seconds=time.monotonic() - t0,
        ca_cert=ca_cert,
        ca_key=ca_key,
        node_cert=cert,
        node_key=key_pem(key),
        digest=ca_digest(ca_cert),
    )


def _host_of(address: str) -> str:
    """The host of host:port (or [v6]:port)."""
    return address.rpartition(":")[0].strip("[]") if ":" in address else address


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
        certificate = self._sign(request, record, role)
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
        root = cluster_root(self.cfg, self.member, secrets.etcd_root_password)
        try:
            user, password = EtcdAuth(root).issue_node_user(request.node_id, manager=role == "manager")
            etcd_members = self._add_member(root, request) if role == "manager" else {}
        finally:
            root.close()
        state = self.member.state
        tls = node_tls(self.cfg)
        if LocalMember(self.cfg.state_path).spec() is not None and tls is not None:
            state = member_endpoints(tls, state)
        return JoinResponse(
            cluster_id=record.cluster_id,
            node_id=request.node_id,
            role=role,
            state=state,
            etcd_prefix=self.member.etcd_prefix,
            etcd_user=user,
            etcd_password=password,
            managers=self._managers(),
            secrets=secrets if role == "manager" and not record.ca_digest else None,
            etcd_members=etcd_members,
            etcd_tls=self.member.etcd_tls,
            certificate=certificate.decode(),
            ca_certificate=self._ca_pem(record).decode(),
        )

    def _add_member(self, root: EtcdStateLog, request: JoinRequest) -> dict[str, str]:
        """When this cluster runs its own etcd, add the joining manager's member as a learner: the members it
        starts with (node id -> peer URL). A node returning with its member still there is not added twice."""
        if LocalMember(self.cfg.state_path).spec() is None:
            return {}
        if not request.advertise_address:
            raise JoinRefused(
                400, "a manager joins this cluster's etcd at its advertise address: pass --advertise-address"
            )
        try:
            return add_learner(root, request.node_id, request.advertise_address)
        except MemberChangeRefused as exc:
            raise JoinRefused(503, f"etcd did not take the new member: {exc}") from None

    def _ca_pem(self, record: ClusterRecord) -> bytes:
        paths = PkiPaths.of(self.cfg.state_path)
        return paths.read(paths.ca_cert) if record.ca_digest else b""

    def _sign(self, request: JoinRequest, record: ClusterRecord, role: Role) -> bytes:
        """The joining node's certificate from its CSR (b"" for a cluster without a CA)."""
        if not record.ca_digest:
            return b""
        if not request.csr:
            raise JoinRefused(400, "this cluster issues certificates: the join must carry a CSR (upgrade dabctl)")
        paths = PkiPaths.of(self.cfg.state_path)
        if not paths.can_sign():
            raise JoinRefused(503, f"this manager holds no CA key ({paths.ca_key}); join via another manager")
        try:
            return paths.signer().sign(
                request.csr.encode(),
                node_id=request.node_id,
                role=role,
                address=request.advertise_address,
                days=record.certificate_days,
            )
        except CertificateRefused as exc:
            raise JoinRefused(400, f"CSR refused: {exc}") from None

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


def add_learner(root: EtcdStateLog, nid: str, host: str) -> dict[str, str]:
    """Add node `nid`'s member at `host` to the cluster's etcd as a learner (through etcd's root user), unless a
    member is there already (a node returning): the members it starts with (node id -> peer URL)."""
    peer = f"https://{host_port(host, PEER_PORT)}"
    members = EtcdMembership(root)
    found = members.members()
    if not any(peer in m.peer_urls for m in found):
        members.add_learner(peer)
        found = members.members()
    return {(m.name or nid): m.peer_urls[0] for m in found if m.peer_urls}


def manager_secrets(cfg: AgentConfig) -> Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]:
    """`POST /cluster/v1/secrets`: the cluster's secrets and the CA key, for a new manager. The listener lets only
    a manager's certificate call it (`ClusterTls.manager_calls`)."""

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        paths = PkiPaths.of(cfg.state_path)
        secrets = cluster_secrets(cfg.state_path)
        if secrets is None or not paths.can_sign():
            return 503, {"error": "this node holds no cluster secrets or CA key: ask another manager"}
        reply = ManagerSecrets(secrets=secrets, ca_key=paths.read(paths.ca_key).decode())
        log.info("cluster secrets handed to a manager")
        return 200, json.loads(reply.model_dump_json())

    return answer


def cluster_api(
    cfg: AgentConfig, log_: StateLog, member: ClusterMembership
) -> dict[str, Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]]:
    """The cluster listener's calls (`POST /cluster/v1/<name>`): joining, and a new manager's secrets (the peer's
    address is not their check: the token is, and the certificate's role)."""
    admission = Admission(cfg, log_, member)
    calls: dict[str, Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]] = {
        JOIN_PATH: lambda body, _peer: admission(body)
    }
    if PkiPaths.of(cfg.state_path).has_node_certificate():
        secrets = manager_secrets(cfg)
        calls[SECRETS_PATH] = lambda body, _peer: secrets(body)
    return calls


def cluster_tls(cfg: AgentConfig, manager_calls: frozenset[str] = frozenset()) -> ClusterTls:
    """TLS for this node's cluster listener from its certificate (a cluster node without one does not start:
    `cluster_membership`). `manager_calls` (with the secrets) need a manager's certificate."""
    paths = PkiPaths.of(cfg.state_path)
    if not paths.has_node_certificate():
        raise _no_certificate(cfg)
    try:
        paths.identity()
        context = paths.server_context()
    except (CertificateRefused, ssl.SSLError, OSError) as exc:
        raise ClusterSetupError(f"this node's certificate ({paths.node_cert}) cannot be used: {exc}") from None
    ca_pem = paths.read(paths.ca_cert)

    def role_of_certificate(der: bytes) -> str:
        return identify(der, ca_pem).role

    return ClusterTls(
        context=context,
        ca_pem=ca_pem,
        role_of=role_of_certificate,
        open_calls=frozenset({JOIN_PATH}),
        manager_calls=frozenset({SECRETS_PATH, *manager_calls}),
    )


def cluster_membership(cfg: AgentConfig) -> ClusterMembership | None:
    """This node's cluster membership. A cluster node serves its cluster listener with mutual TLS from its
    certificate, always: one without a certificate does not start (ClusterSetupError)."""
    member = membership(cfg.state_path)
    if member is not None and not PkiPaths.of(cfg.state_path).has_node_certificate():
        raise _no_certificate(cfg, member)
    return member


def _no_certificate(cfg: AgentConfig, member: ClusterMembership | None = None) -> ClusterSetupError:
    member = member or membership(cfg.state_path)
    which = f"cluster {member.cluster_id}" if member is not None else "a cluster"
    return ClusterSetupError(
        f"this node belongs to {which} ({cfg.state_path / 'cluster.json'}) but holds no certificate "
        f"({PkiPaths.of(cfg.state_path).node_cert}), and its cluster listener ({cfg.cluster_listen}) serves only "
        "mutual TLS: join the cluster again with a token from `dabctl cluster join-token`, or make a new one with "
        "`dabctl cluster init`"
    )


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
    nid = node_id(state_dir)
    request = JoinRequest(
        token=str(token),
        node_id=nid,
        name=node_name(cfg),
        advertise_address=advertise or cfg.advertise_address or _address_towards(manager),
    )
    if not token.ca_digest:
        raise ClusterSetupError(
            "--token: the token names no cluster CA (DABCTL-1-none-...), and a node joins only over TLS checked "
            "against the CA's digest: make the cluster with `dabctl cluster init` and use a token from "
            "`dabctl cluster join-token`"
        )
    response = _join_with_ca(state_dir, manager, token, request)
    managers = [manager, *(m for m in response.managers if m != manager)]
    state = response.state
    if response.etcd_members:
        try:
            state = start_joining_member(cfg, response, request.advertise_address)
        except BaseException:
            # Nothing of a join that did not happen stays: the certificates and the secrets go with the member.
            shutil.rmtree(PkiPaths.of(state_dir).root, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (state_dir / SECRETS_FILE).unlink()
            raise
    write_membership(
        state_dir,
        ClusterMembership(
            cluster_id=response.cluster_id,
            node_id=response.node_id,
            state=state,
            etcd_prefix=response.etcd_prefix,
            etcd_user=response.etcd_user,
            etcd_password=response.etcd_password,
            managers=managers,
            advertise_address=request.advertise_address or None,
            etcd_tls=response.etcd_tls,
        ),
    )
    if response.secrets is not None:
        write_cluster_secrets(state_dir, response.secrets)
    return response


def start_joining_member(cfg: AgentConfig, response: JoinResponse, host: str) -> str:
    """Start this manager's etcd member (a learner the admitting manager added), promote it once it has caught up,
    and wait until it serves: the state setting with its own endpoint first. On failure the learner is removed
    from the cluster and its files from this node."""
    tls = _require_tls(cfg)
    secrets = response.secrets or cluster_secrets(cfg.state_path)  # with a CA: fetched over mutual TLS
    if secrets is None or not secrets.etcd_root_password:
        raise ClusterSetupError("the manager sent no etcd root password: this node cannot join the cluster's etcd")
    local = LocalMember(cfg.state_path)
    spec = member_spec(
        tls, node_id=response.node_id, host=host, cluster_id=response.cluster_id, members=response.etcd_members
    )
    root = root_client(tls, response.state, secrets.etcd_root_password)
    members = EtcdMembership(root)
    try:
        local.run(spec, ready=False)
        me = next((m for m in members.members() if spec.peer_url in m.peer_urls), None)
        if me is None:
            raise ClusterSetupError(f"the cluster's etcd has no member at {spec.peer_url}: join again")
        if me.learner:
            members.promote(me.id, timeout=120)
        local.wait_started(ready=True)
    except BaseException:
        with contextlib.suppress(Exception):
            mine = [m for m in members.members() if spec.peer_url in m.peer_urls]
            for m in mine:
                members.remove(m.id)
        local.destroy()
        raise
    finally:
        root.close()
    own = host_port(host, CLIENT_PORT)
    return "etcd://" + ",".join([own, *(h for h in endpoints_of(response.state) if h != own)])


def member_endpoints(tls: TlsFiles, state: str, first: str | None = None) -> str:
    """The state setting naming every voting member's client address (`first` first), as the cluster's etcd
    lists them now; `state` when none answers."""
    try:
        found = list_members(tls, state)
    except StateLogError:
        return state
    hosts = [u.removeprefix("https://") for m in found if not m.learner for u in m.client_urls]
    return _state_setting(hosts, first) if hosts else state


def _state_setting(hosts: Sequence[str], first: str | None) -> str:
    """`etcd://` with `hosts`, `first` (this node's own member) first when it is one of them."""
    ordered = [first] if first is not None and first in hosts else []
    return "etcd://" + ",".join([*ordered, *(h for h in hosts if h not in ordered)])


def _own_endpoint(cfg: AgentConfig) -> str | None:
    """host:port of this node's etcd member's client port (None on a node that runs none)."""
    spec = LocalMember(cfg.state_path).spec()
    return host_port(spec.address, spec.client_port) if spec is not None else None


def _keep_state(cfg: AgentConfig, member: ClusterMembership, fresh: str) -> None:
    if fresh != member.state:
        write_membership(cfg.state_path, member.model_copy(update={"state": fresh}))
        log.info("etcd endpoints updated", extra={"state": fresh})


def refresh_endpoints(cfg: AgentConfig) -> None:
    """A manager running an etcd member: bring cluster.json's endpoints up to the cluster's voting members (its
    own first), so that its agent fails over to every member, not only to those known when it joined."""
    member = membership(cfg.state_path)
    own = _own_endpoint(cfg)
    tls = node_tls(cfg)
    if member is None or own is None or tls is None:
        return
    _keep_state(cfg, member, member_endpoints(tls, member.state, own))


def follow_endpoints(cfg: AgentConfig, client: EtcdStateLog) -> bool:
    """On a cluster whose etcd dabctl runs: point the agent's running client at the voting members etcd lists now
    (a node that joined when there was one manager learns of those added since, and loses a removed one), and keep
    them in cluster.json for the next start (its own member first). True when the endpoints changed."""
    member = membership(cfg.state_path)
    if member is None or not member.etcd_tls or not follow_members(client):
        return False
    hosts = [e.removeprefix("https://").removeprefix("http://") for e in client.endpoints]
    _keep_state(cfg, member, _state_setting(hosts, _own_endpoint(cfg)))
    return True


# --- leaving ---------------------------------------------------------------------------------------------------


def remove_member(cfg: AgentConfig, member: ClusterMembership, target: str) -> bool:
    """Remove node `target`'s etcd member from the cluster's etcd, refusing (ClusterSetupError, with the reason)
    when the members left would lose quorum. False when it has none (a worker, or an etcd not run by dabctl).
    For `cluster leave`, `node rm` and `node update --role worker` of a manager."""
    secrets = cluster_secrets(cfg.state_path)
    tls = node_tls(cfg)
    if secrets is None or not secrets.etcd_root_password or tls is None:
        raise ClusterSetupError(
            "changing etcd's members needs a manager's etcd root password (cluster-secrets.json) and certificate"
        )
    # Listing members needs no user and no quorum (each member answers from its own copy): the quorum check comes
    # before anything that would need a leader, such as authenticating as root.
    found = list_members(tls, member.state)
    theirs = next((m for m in found if m.name == target), None)
    if theirs is None:
        return False
    refusal = removal_refusal(found, theirs.id, answering(found, tls))
    if refusal is not None:
        raise ClusterSetupError(f"node {target}'s etcd member stays: removing it now would lose quorum: {refusal}")
    root = root_client(tls, member.state, secrets.etcd_root_password)
    try:
        members = EtcdMembership(root)
        try:
            members.remove(theirs.id)
        except MemberChangeRefused as exc:
            raise ClusterSetupError(str(exc)) from None
        return True
    finally:
        root.close()


def remove_manager_member(cfg: AgentConfig, target: str) -> bool:
    """Before a manager is demoted (`node update --role worker`) or removed (`node rm`): remove its etcd member
    when the cluster's etcd is dabctl's (remove_member, refused when quorum would go). False when there is none
    to remove (an etcd given with --etcd, or a node without a member)."""
    member = membership(cfg.state_path)
    if member is None or not member.etcd_tls:
        return False
    return remove_member(cfg, member, target)


def answering(members: list[Member], tls: TlsFiles) -> list[str]:
    """The ids of the members that answer now (each asked directly, with this node's certificate)."""
    return [m.id for m in members if any(member_status(u, tls.client()) is not None for u in m.client_urls)]


def leave_cluster(cfg: AgentConfig, force: bool = False) -> bool:
    """This node leaves its cluster: its etcd member (if it runs one) is removed from the cluster's members and
    stopped, its data deleted; the membership files go (node-id stays). The agent must not be running.
    True when it ran an etcd member. `force`: without asking the cluster's etcd (this node's member was removed,
    or the cluster recovered without it)."""
    member = membership(cfg.state_path)
    if member is None:
        raise ClusterSetupError(f"this node is in no cluster (no {cfg.state_path / MEMBERSHIP_FILE})")
    local = LocalMember(cfg.state_path)
    ran = local.spec() is not None
    if ran and not force:
        remove_member(cfg, member, member.node_id)
    if ran:
        local.destroy()
    for name in (MEMBERSHIP_FILE, SECRETS_FILE):
        with contextlib.suppress(FileNotFoundError):
            (cfg.state_path / name).unlink()
    return ran


def _default_or_none() -> str:
    try:
        return default_address()
    except ClusterSetupError:
        return ""  # the certificate then names no address: peers check the CA and the role, not the address


def manager_only(manager: str, ca_pem: bytes) -> Callable[[bytes], None]:
    """A check of the peer's certificate (DER): it must be a manager's of the cluster CA `ca_pem`."""

    def check(der: bytes) -> None:
        try:
            if identify(der, ca_pem).role != "manager":
                raise JoinRefused(0, f"{manager} is not a manager of that cluster (its certificate says worker)")
        except CertificateRefused as exc:
            raise JoinRefused(0, f"{manager}'s certificate: {exc}") from None

    return check


def fetch_manager_secrets(state_dir: Path, manager: str, paths: PkiPaths) -> ClusterSecrets:
    """A new manager (joining, or a worker promoted) fetches the cluster's secrets and the CA key over mutual TLS
    with its manager certificate (in `paths`); the CA key goes to `paths`, the secrets to cluster-secrets.json."""
    ca_pem = paths.read(paths.ca_cert)
    secrets: ManagerSecrets = post(
        manager,
        SECRETS_PATH,
        JoinMessage(),
        ManagerSecrets,
        tls=paths.client_context(),
        check_peer=manager_only(manager, ca_pem),
    )
    LocalSigner(ca_pem, secrets.ca_key.encode())  # the key is the CA's, or this fails here
    paths.write(paths.ca_key, secrets.ca_key.encode())
    write_cluster_secrets(state_dir, secrets.secrets)
    return secrets.secrets


def _join_with_ca(state_dir: Path, manager: str, token: JoinToken, request: JoinRequest) -> JoinResponse:
    """Fetch the CA, check it against the token BEFORE sending anything, then send the CSR and the token over TLS
    to a manager certificate of that CA; write the key, the certificates and (a manager) the CA key."""
    try:
        ca_pem = fetch_ca(manager)
    except JoinRefused as exc:
        raise ClusterSetupError(str(exc)) from None
    if not digest_matches(ca_pem, token.ca_digest):
        raise ClusterSetupError(
            f"the CA certificate {manager} shows does not match the token's CA digest: refusing to join that "
            "cluster (a wrong address or token, or someone in between); check both on a manager with "
            "`dabctl cluster join-token`"
        )
    paths = PkiPaths(state_dir / ".pki-joining")  # written into place only once the join succeeded
    paths.write(paths.ca_cert, ca_pem)
    try:
        key = new_key()
        request = request.model_copy(update={"csr": new_csr(key, request.node_id).decode()})
        tls = paths.client_context(with_certificate=False)

        response = post_join(manager, request, tls=tls, check_peer=manager_only(manager, ca_pem))
        cert = response.certificate.encode()
        try:
            me = identify(cert, ca_pem)
        except CertificateRefused as exc:
            raise ClusterSetupError(f"{manager} answered with a certificate this node cannot use: {exc}") from None
        if me.node_id != request.node_id or me.role != response.role:
            raise ClusterSetupError(f"{manager} issued a certificate for {me.node_id} as {me.role}: not this node")
        paths.write(paths.node_key, key_pem(key))
        paths.write(paths.node_cert, cert)
        if response.role == "manager":
            fetch_manager_secrets(state_dir, manager, paths)
        final = PkiPaths.of(state_dir)
        if final.root.exists():
            shutil.rmtree(final.root)
        paths.root.replace(final.root)
    finally:
        if paths.root.exists():
            shutil.rmtree(paths.root)
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
