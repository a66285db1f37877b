"""A cluster whose etcd dabctl runs keeps one voting etcd member per manager as roles change (issue 20 §3).

- The leader, every tick: `converge_cluster_members` compares etcd's member list with the managers' specs and
  liveness (the pure `reconcilers.etcdmembers.plan_members`) and promotes learners that caught up, removes the
  members of nodes that are no longer managers (quorum checked first) and learners whose join died (not up after
  LEARNER_GRACE). Adding a member is left to the node that starts it: its join, or its promotion below.
- A worker promoted (`dabctl node update --role manager`): its agent sees its spec's role change, asks a manager for
  a manager's certificate (`POST /cluster/v1/certificate` over mutual TLS with its worker certificate, the CSR
  signed by the same key), fetches the cluster's secrets and the CA key as a joining manager does, adds its member
  as a learner and starts it the join's way (`join.start_joining_member`: promoted once caught up).
- A node demoted (`--role worker`) or removed (`node rm`) whose member is no longer in etcd's list: the member is
  stopped, its data directory and pid file removed, and the CA key and cluster secrets (a worker holds neither);
  a demoted node then gets a worker's certificate. At an agent's start too, instead of starting a removed member.

All of it runs on a thread of the agent's own (`EtcdRoles.run`), never the membership thread: a promotion waits for
etcd, keepalives must not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from pydantic import ValidationError

from agent.api.join import JoinRefused, post
from agent.node.etcdmember import (
    PEER_PORT,
    LocalMember,
    MemberSpec,
    TlsFiles,
    endpoints_of,
    host_port,
    list_members,
    root_client,
)
from agent.node.join import (
    ClusterSetupError,
    add_learner,
    answering,
    cluster_root,
    default_address,
    fetch_manager_secrets,
    manager_only,
    node_tls,
    start_joining_member,
)
from agent.node.membership import Member as NodeMember
from agent.pki.ca import CertificateRefused, identify, load_key, new_csr, same_key
from agent.pki.files import PkiPaths
from agent.state.etcdauth import EtcdAuth
from agent.state.etcdcluster import EtcdMembership, MemberChangeRefused
from agent.state.log import StateLog, StateLogError
from agent.state.membership import SECRETS_FILE, cluster_secrets, membership, write_membership
from agent.state.nodes import NodeRecords
from reconcilers.etcdmembers import Member, Promote, Remove, plan_members, removal_refusal
from schemas.config import AgentConfig, ClusterMembership
from schemas.errors import DabctlError
from schemas.join import CertificateRequest, CertificateResponse, JoinResponse, Role
from schemas.state import ClusterRecord

log = logging.getLogger("dabctl.etcd")

CERTIFICATE_PATH = "certificate"  # POST /cluster/v1/certificate: a node's certificate for its current role
TICK = 5.0  # seconds between two looks at this node's role and, on the leader, at etcd's members
RETRY = 30.0  # after a failed promotion


# --- the leader: etcd's members follow the managers ---------------------------------------------------------------


class MemberApi(Protocol):
    """What converge_members needs of etcd's membership (agent.state.etcdcluster.EtcdMembership)."""

    def members(self) -> list[Member]: ...
    def promote(self, member_id: str, timeout: float = 60) -> None: ...
    def remove(self, member_id: str) -> None: ...


class LearnerClock:
    """How long each learner has been seen waiting, by this leader (in memory: a new leader counts afresh, so a
    learner is never removed sooner than LEARNER_GRACE after a leader first saw it)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._since: dict[str, float] = {}

    def ages(self, members: Collection[Member]) -> dict[str, float]:
        t = self._now()
        self._since = {m.id: self._since.get(m.id, t) for m in members if m.learner}
        return {mid: t - since for mid, since in self._since.items()}


def converge_members(
    api: MemberApi,
    wanted: Mapping[str, str],
    answering_: Callable[[list[Member]], list[str]],
    *,
    live: Collection[str] | None = None,
    clock: LearnerClock | None = None,
) -> list[str]:
    """One step towards one voting etcd member per manager of `wanted` (node id -> peer URL, "" when unknown):
    the actions of reconcilers.etcdmembers.plan_members, each removal checked for quorum against the members
    answering now. Additions are not made here (the node that starts a member adds it). What was done or refused,
    one line each."""
    found = api.members()
    ages = clock.ages(found) if clock is not None else None
    done: list[str] = []
    for action in plan_members(wanted, found, live=live, learner_age=ages):
        if isinstance(action, Promote):
            try:
                api.promote(action.member_id, timeout=5)
                done.append(str(action))
            except MemberChangeRefused as exc:
                done.append(f"{action}: not yet ({exc})")
        elif isinstance(action, Remove):
            refusal = removal_refusal(found, action.member_id, answering_(found))
            if refusal is not None:
                done.append(f"{action}: refused: {refusal}")
                continue
            api.remove(action.member_id)
            done.append(str(action))
    return done


def peer_url(address: str) -> str:
    return f"https://{host_port(address, PEER_PORT)}" if address else ""


def converge_cluster_members(cfg: AgentConfig, log_: StateLog, clock: LearnerClock | None = None) -> list[str]:
    """converge_members for this manager's cluster, from the managers' specs and statuses in the state log (the
    leader's tick); nothing when this node runs no member of the cluster's etcd."""
    member = membership(cfg.state_path)
    secrets = cluster_secrets(cfg.state_path)
    tls = node_tls(cfg)
    if member is None or secrets is None or tls is None or LocalMember(cfg.state_path).spec() is None:
        return []
    nodes = NodeRecords(log_).membership()
    managers = {nid for nid, spec in nodes.specs.items() if spec.role == "manager"}
    wanted = {nid: peer_url(nodes.statuses[nid].advertise_address) if nid in nodes.statuses else "" for nid in managers}
    root = root_client(tls, member.state, secrets.etcd_root_password)
    try:
        return converge_members(
            EtcdMembership(root),
            wanted,
            lambda found: answering(found, tls),
            live=managers & set(nodes.statuses),
            clock=clock,
        )
    finally:
        root.close()


def set_etcd_role(cfg: AgentConfig, node_id: str, role: Role) -> bool:
    """Give node `node_id`'s etcd user the rights of `role` (`node update --role`), its password unchanged: a
    demoted manager may no longer write the cluster's keys, a promoted worker may. False when this manager holds
    no etcd root password (a cluster on an etcd without auth)."""
    member = membership(cfg.state_path)
    secrets = cluster_secrets(cfg.state_path)
    if member is None or secrets is None or not secrets.etcd_root_password:
        return False
    root = cluster_root(cfg, member, secrets.etcd_root_password)
    try:
        EtcdAuth(root).set_node_role(node_id, manager=role == "manager")
    finally:
        root.close()
    return True


# --- certificates for a changed role -------------------------------------------------------------------------------


def certificate_call(cfg: AgentConfig, log_: StateLog) -> Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]:
    """`POST /cluster/v1/certificate` on a manager: a new certificate, for the role the node's spec has now, for a
    node that proves it holds the key of its current certificate (the CSR is signed by that key)."""

    def answer(body: dict[str, Any], _peer: str) -> tuple[int, dict[str, Any]]:
        try:
            request = CertificateRequest.model_validate(body)
        except ValidationError as exc:
            return 400, {"error": f"not a certificate request: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"}
        paths = PkiPaths.of(cfg.state_path)
        if not paths.can_sign():
            return 503, {"error": "this node holds no CA key: ask another manager"}
        try:
            who = identify(request.certificate.encode(), paths.read(paths.ca_cert))
            if not same_key(request.certificate.encode(), request.csr.encode()):
                return 403, {"error": "the CSR is not for the key of the certificate sent with it"}
        except CertificateRefused as exc:
            return 403, {"error": f"certificate refused: {exc}"}
        nodes = NodeRecords(log_)
        spec = nodes.spec(who.node_id)
        if spec is None:
            return 403, {"error": f"node {who.node_id} is not in the cluster (removed?): join it again"}
        record = nodes.cluster()
        days = record.certificate_days if record else ClusterRecord.model_fields["certificate_days"].default
        try:
            cert = paths.signer().sign(
                request.csr.encode(),
                node_id=who.node_id,
                role=spec.role,
                address=request.advertise_address,
                days=days,
            )
        except CertificateRefused as exc:
            return 400, {"error": f"CSR refused: {exc}"}
        log.info("certificate issued for a role", extra={"node_id": who.node_id, "role": spec.role})
        return 200, json.loads(CertificateResponse(certificate=cert.decode(), role=spec.role).model_dump_json())

    return answer


def renew_certificate(cfg: AgentConfig, member: ClusterMembership, host: str) -> tuple[str, Role]:
    """This node's certificate for the role its spec has now, from the first manager that answers (its key
    stays): (that manager's cluster address, the role)."""
    paths = PkiPaths.of(cfg.state_path)
    ca_pem = paths.read(paths.ca_cert)
    key = load_key(paths.read(paths.node_key), str(paths.node_key))
    request = CertificateRequest(
        certificate=paths.read(paths.node_cert).decode(),
        csr=new_csr(key, member.node_id).decode(),
        advertise_address=host,
    )
    errors: list[str] = []
    for manager in member.managers:
        try:
            reply: CertificateResponse = post(
                manager,
                CERTIFICATE_PATH,
                request,
                CertificateResponse,
                tls=paths.client_context(),
                check_peer=manager_only(manager, ca_pem),
            )
        except (JoinRefused, OSError) as exc:
            errors.append(str(exc))
            continue
        try:
            me = identify(reply.certificate.encode(), ca_pem)
        except CertificateRefused as exc:
            raise ClusterSetupError(f"{manager} answered with a certificate this node cannot use: {exc}") from None
        if me.node_id != member.node_id or me.role != reply.role:
            raise ClusterSetupError(f"{manager} issued a certificate for {me.node_id} as {me.role}: not this node")
        paths.write(paths.node_cert, reply.certificate.encode())
        return manager, reply.role
    raise ClusterSetupError(f"no manager issued this node's certificate: {'; '.join(errors) or 'none is known'}")


# --- a worker promoted -----------------------------------------------------------------------------------------


def _drop_manager_files(cfg: AgentConfig) -> None:
    """What only managers hold: the CA key and the cluster's secrets (join tokens, etcd's root password)."""
    for path in (PkiPaths.of(cfg.state_path).ca_key, cfg.state_path / SECRETS_FILE):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def promote_member(cfg: AgentConfig, member: ClusterMembership, host: str) -> str:
    """Make this node, promoted to manager, a manager of the cluster's etcd (see the module's docstring): its
    member added as a learner, started and promoted once caught up. The state setting it then has (written to
    cluster.json). On failure it holds no manager's files and no member."""
    manager, role = renew_certificate(cfg, member, host)
    if role != "manager":
        raise ClusterSetupError(f"{manager} says this node is a {role} now: nothing to start")
    try:
        secrets = fetch_manager_secrets(cfg.state_path, manager, PkiPaths.of(cfg.state_path))
        tls = node_tls(cfg)
        assert tls is not None  # renew_certificate wrote it
        root = root_client(tls, member.state, secrets.etcd_root_password)
        try:
            members = add_learner(root, member.node_id, host)
        finally:
            root.close()
        response = JoinResponse(
            cluster_id=member.cluster_id,
            node_id=member.node_id,
            role="manager",
            state=member.state,
            etcd_prefix=member.etcd_prefix,
            etcd_user=member.etcd_user,
            etcd_password=member.etcd_password,
            etcd_members=members,
            etcd_tls=True,
        )
        state = start_joining_member(cfg, response, host)
    except BaseException:
        _drop_manager_files(cfg)
        raise
    write_membership(cfg.state_path, member.model_copy(update={"state": state}))
    return state


# --- a node demoted or removed ---------------------------------------------------------------------------------


def member_removed(member: ClusterMembership, spec: MemberSpec, tls: TlsFiles) -> bool:
    """Whether the cluster's etcd, asked through the other members, no longer lists this node's member; False when
    none of them answers (nothing is known: the member stays)."""
    own = host_port(spec.address, spec.client_port)
    others = [h for h in endpoints_of(member.state) if h != own]
    if not others:
        return False
    try:
        found = list_members(tls, "etcd://" + ",".join(others), timeout=3)
    except StateLogError:
        return False
    return bool(found) and not any(m.name == spec.name or spec.peer_url in m.peer_urls for m in found)


def retire_member(cfg: AgentConfig) -> bool:
    """When this node's etcd member was removed from the cluster's etcd (demoted, removed): stop it, remove its
    data, pid file, the CA key and the cluster secrets, with one info line. True when it did."""
    member = membership(cfg.state_path)
    local = LocalMember(cfg.state_path)
    spec = local.spec()
    tls = node_tls(cfg)
    if member is None or spec is None or tls is None or not member_removed(member, spec, tls):
        return False
    local.destroy()
    _drop_manager_files(cfg)
    own = host_port(spec.address, spec.client_port)
    others = [h for h in endpoints_of(member.state) if h != own]
    write_membership(cfg.state_path, member.model_copy(update={"state": "etcd://" + ",".join(others)}))
    log.info(
        "etcd member retired: it is no longer in the cluster's etcd, so its process, data and this node's CA key "
        "and cluster secrets are gone",
        extra={"data_dir": str(local.data_dir)},
    )
    return True


# --- the agent's thread ------------------------------------------------------------------------------------------


class EtcdRoles:
    """This node's part in the etcd membership of a cluster whose etcd dabctl runs (see the module docstring)."""

    def __init__(
        self, cfg: AgentConfig, log_: StateLog, node: NodeMember, reload: Callable[[], None] = lambda: None
    ) -> None:
        """`reload`: the node's certificate changed (its cluster listener serves the new one)."""
        self.cfg = cfg
        self.log = log_
        self.node = node
        self.reload = reload
        self.clock = LearnerClock()
        self._next_try = 0.0  # after a failed promotion or certificate renewal
        self._said: list[str] = []

    def tick(self) -> None:
        member = membership(self.cfg.state_path)
        if member is None or not member.etcd_tls or not self.node.registered:
            return
        runs_member = LocalMember(self.cfg.state_path).spec() is not None
        if self.node.role == "manager" and not self.node.removed:
            if not runs_member:
                self._promote(member)
            elif self.node.is_leader:
                self._converge()
            return
        if runs_member and not retire_member(self.cfg):
            return  # its member is still one of etcd's: `node update` or the leader removes it first
        if not self.node.removed and PkiPaths.of(self.cfg.state_path).identity().role == "manager":
            self._demote(member)

    def _host(self, member: ClusterMembership) -> str:
        return self.cfg.advertise_address or member.advertise_address or default_address()

    def _promote(self, member: ClusterMembership) -> None:
        if time.monotonic() < self._next_try:
            return
        try:
            state = promote_member(self.cfg, member, self._host(member))
            self.reload()
        except (DabctlError, OSError) as exc:
            self._next_try = time.monotonic() + RETRY
            log.error("promoted to manager, but its etcd member did not start; retrying", extra={"error": str(exc)})
            return
        log.info("promoted to manager: etcd member started and voting", extra={"state": state})

    def _demote(self, member: ClusterMembership) -> None:
        """A worker holding a manager's certificate (demoted): a worker's in its place."""
        if time.monotonic() < self._next_try:
            return
        try:
            renew_certificate(self.cfg, member, self._host(member))
            self.reload()
        except (DabctlError, OSError) as exc:
            self._next_try = time.monotonic() + RETRY
            log.warning("demoted to worker, but no worker's certificate yet; retrying", extra={"error": str(exc)})

    def _converge(self) -> None:
        lines = converge_cluster_members(self.cfg, self.log, self.clock)
        for line in lines:
            if line not in self._said:  # a learner not yet caught up is said once, not every tick
                log.info("etcd membership: %s", line)
        self._said = lines

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(TICK):
            try:
                self.tick()
            except (DabctlError, OSError) as exc:
                log.warning("etcd membership step failed", extra={"error": str(exc)})
            except Exception:  # a bug must not end the thread: the next tick tries again
                log.exception("etcd membership step failed")
