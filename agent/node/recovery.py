"""Backup and disaster recovery of a cluster whose etcd dabctl runs (`dabctl cluster backup | recover | restore`).

- backup: etcd's snapshot through a manager plus that manager's files (`node-id`, `cluster.json`,
  `cluster-secrets.json`, and `pki/` when there is one), sealed with a passphrase (agent/state/backup.py);
- recover: a manager whose cluster lost quorum (two of three managers gone) restarts its member with
  `--force-new-cluster`: etcd keeps its data and forgets the other members, so the cluster goes on with one voting
  member (as `docker swarm init --force-new-cluster`); managers join again afterwards;
- restore: a node outside any cluster becomes the backed-up manager with a one-member etcd made from the snapshot
  (`etcdctl snapshot restore`), for when no member survived.

Containers never stop for any of this: a node that cannot reach the state log keeps its slots running. Both recover
and restore record a hold in the cluster record (`hold_down_until`): until then the leader keeps the slots of down
nodes where they are, so the nodes that rejoin as themselves find their containers theirs and none is recreated.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.node.etcdmember import CLIENT_PORT, LocalMember, host_port, member_spec
from agent.node.join import ClusterSetupError, _advertise_host, _require_tls, cluster_address, node_tls
from agent.pki.ca import CertificateRefused, LocalSigner, key_pem, new_csr, new_key
from agent.pki.files import PkiPaths
from agent.state.backends import etcd_endpoints
from agent.state.backup import MANIFEST, SNAPSHOT, BackupError, seal, snapshot, unseal
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT
from agent.state.membership import (
    MEMBERSHIP_FILE,
    NODE_ID_FILE,
    SECRETS_FILE,
    cluster_secrets,
    membership,
    write_cluster_secrets,
    write_membership,
    write_private,
)
from agent.state.nodes import NodeRecords
from schemas.config import AgentConfig, ClusterMembership
from schemas.join import ClusterSecrets
from schemas.state import ClusterRecord

ETCDCTL = "/usr/bin/etcdctl"
DEFAULT_HOLD = timedelta(minutes=10)  # how long a recovered cluster keeps the slots of down nodes where they are
PKI_DIR = "pki"  # the cluster CA's and the node's files, when the node has them (agent/pki/)


@dataclass(frozen=True)
class BackupResult:
    cluster_id: str
    snapshot_bytes: int
    files: int


def backup_cluster(cfg: AgentConfig, target: Path, passphrase: bytes) -> BackupResult:
    """Write the sealed backup of this manager's cluster to `target` (0600)."""
    state_dir = cfg.state_path
    member = membership(state_dir)
    secrets = cluster_secrets(state_dir)
    if member is None or secrets is None or not secrets.etcd_root_password:
        raise ClusterSetupError("back up on a manager: this node holds no cluster.json and cluster-secrets.json")
    tls = node_tls(cfg)
    root = EtcdStateLog(
        etcd_endpoints(member.state, tls is not None),
        prefix="/",
        user=ROOT,
        password=secrets.etcd_root_password,
        timeout=30,
        **(tls.client() if tls is not None else {"ca_file": None, "cert_file": None, "key_file": None}),
    )
    buf = io.BytesIO()
    try:
        size = snapshot(root, buf)
    finally:
        root.close()
    files = {SNAPSHOT: buf.getvalue()}
    for name in (NODE_ID_FILE, MEMBERSHIP_FILE, SECRETS_FILE):
        files[name] = (state_dir / name).read_bytes()
    pki = state_dir / PKI_DIR
    if pki.is_dir():
        for path in sorted(p for p in pki.rglob("*") if p.is_file()):
            files[f"{PKI_DIR}/{path.relative_to(pki)}"] = path.read_bytes()
    manifest = {"cluster_id": member.cluster_id, "node_id": member.node_id, "created_at": datetime.now(UTC).isoformat()}
    files[MANIFEST] = json.dumps(manifest).encode()
    write_private(target, "")  # 0600 before a byte of it is written
    with open(target, "wb") as out:
        out.write(seal(files, passphrase))
    return BackupResult(cluster_id=member.cluster_id, snapshot_bytes=size, files=len(files))


def recover_cluster(cfg: AgentConfig, hold: timedelta = DEFAULT_HOLD) -> str:
    """Make this manager's etcd member the cluster's only one (`--force-new-cluster`), keeping its data; the
    state setting it then has. For `hold` the leader keeps the slots of down nodes where they are (`_hold`)."""
    state_dir = cfg.state_path
    member = membership(state_dir)
    local = LocalMember(state_dir)
    spec = local.spec()
    if member is None or spec is None:
        raise ClusterSetupError(
            "recover on a manager that runs an etcd member (<state_dir>/etcd/member.json); with none left, "
            "use `dabctl cluster restore BACKUP` on a fresh node"
        )
    local.stop()
    local.run(spec, "--force-new-cluster", timeout=60, keep=True)
    state = f"etcd://{host_port(spec.address, spec.client_port)}"
    recovered = member.model_copy(update={"state": state})
    write_membership(state_dir, recovered)
    _hold(cfg, recovered, hold)
    return state


def _hold(cfg: AgentConfig, member: ClusterMembership, hold: timedelta) -> None:
    """Record in the cluster record until when the leader keeps the slots of down nodes where they are: the other
    nodes are down because the managers were, and the ones that come back (rejoining as the same node) find their
    containers theirs, none recreated. Nodes that stay away longer lose their slots then (or at `node rm`)."""
    secrets = cluster_secrets(cfg.state_path)
    if secrets is None or not secrets.etcd_root_password:
        raise ClusterSetupError("this node holds no cluster-secrets.json (etcd's root password): recover on a manager")
    tls = _require_tls(cfg)
    log = EtcdStateLog(
        etcd_endpoints(member.state, True),
        prefix=member.etcd_prefix,
        user=ROOT,
        password=secrets.etcd_root_password,
        timeout=30,
        **tls.client(),
    )
    try:
        NodeRecords(log).hold_down_nodes(datetime.now(UTC) + hold)
    finally:
        log.close()


def restore_cluster(
    cfg: AgentConfig, source: Path, passphrase: bytes, advertise: str | None, hold: timedelta = DEFAULT_HOLD
) -> ClusterMembership:
    """Make this node (in no cluster) the backed-up manager, with a one-member etcd restored from the backup;
    down nodes keep their slots for `hold` (as after `recover_cluster`)."""
    state_dir = cfg.state_path
    if membership(state_dir) is not None:
        raise ClusterSetupError(f"this node belongs to a cluster ({state_dir / MEMBERSHIP_FILE}): leave it first")
    local = LocalMember(state_dir)
    if local.dir.exists():
        raise ClusterSetupError(f"{local.dir} exists (an etcd member of a cluster this node left?): remove it first")
    try:
        files = unseal(source.read_bytes(), passphrase, str(source))
    except OSError as exc:
        raise BackupError(f"{source}: {exc.strerror}") from None
    old = ClusterMembership.model_validate_json(files[MEMBERSHIP_FILE])
    secrets = ClusterSecrets.model_validate_json(files[SECRETS_FILE])
    host = _advertise_host(cfg, advertise)
    paths = _restore_pki(state_dir, files, old.node_id, host)
    try:
        restored = _restore(cfg, files, old, secrets, host)
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)
        raise
    _hold(cfg, restored, hold)
    return restored


def _restore_pki(state_dir: Path, files: dict[str, bytes], nid: str, host: str) -> PkiPaths:
    """The backed-up CA and a new certificate of the backed-up manager for this node's address (the old one names
    the address of the node that made the backup, which etcd's peers and clients check)."""
    paths = PkiPaths.of(state_dir)
    ca_pem, ca_key = files.get(f"{PKI_DIR}/ca.crt"), files.get(f"{PKI_DIR}/ca.key")
    if not ca_pem or not ca_key:
        raise ClusterSetupError(
            "the backup holds no cluster CA (pki/ca.crt and pki/ca.key): restore a backup made on a manager"
        )
    try:
        signer = LocalSigner(ca_pem, ca_key)
        key = new_key()
        days = ClusterRecord.model_fields["certificate_days"].default
        cert = signer.sign(new_csr(key, nid), node_id=nid, role="manager", address=host, days=days)
    except CertificateRefused as exc:
        raise ClusterSetupError(f"the backup's cluster CA cannot issue this node's certificate: {exc}") from None
    for path, content in ((paths.ca_cert, ca_pem), (paths.ca_key, ca_key), (paths.node_key, key_pem(key))):
        paths.write(path, content)
    paths.write(paths.node_cert, cert)
    return paths


def _restore(
    cfg: AgentConfig, files: dict[str, bytes], old: ClusterMembership, secrets: ClusterSecrets, host: str
) -> ClusterMembership:
    state_dir = cfg.state_path
    local = LocalMember(state_dir)
    tls = _require_tls(cfg)
    spec = member_spec(tls, node_id=old.node_id, host=host, cluster_id=old.cluster_id)
    peer = spec.peer_url
    local.write_spec(spec)
    snap = local.dir / SNAPSHOT
    write_private(snap, "")
    snap.write_bytes(files[SNAPSHOT])
    try:
        argv = [ETCDCTL, "snapshot", "restore", str(snap), f"--data-dir={local.data_dir}", f"--name={old.node_id}",
                f"--initial-cluster={old.node_id}={peer}", f"--initial-cluster-token={old.cluster_id}",
                f"--initial-advertise-peer-urls={peer}"]  # fmt: skip
        restored = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            timeout=120,
        )
        if restored.returncode != 0:
            raise ClusterSetupError(f"etcdctl snapshot restore failed: {restored.stderr.strip()[-400:]}")
        snap.unlink()
        local.run(spec, timeout=60)
    except BaseException:
        local.destroy()
        raise
    write_private(state_dir / NODE_ID_FILE, old.node_id + "\n")
    write_cluster_secrets(state_dir, secrets)
    restored_member = old.model_copy(
        update={
            "state": f"etcd://{host_port(host, CLIENT_PORT)}",
            "managers": [cluster_address(cfg, host)],
            "etcd_tls": True,
        }
    )
    write_membership(state_dir, restored_member)
    return restored_member
