"""Choose and open the state log the configuration names: embedded SQLite or etcd."""

from __future__ import annotations

from collections.abc import Mapping

from agent.pki.files import PkiPaths
from agent.private import check_secret_file
from agent.state.etcd import EtcdStateLog
from agent.state.log import StateLog, StateLogError
from agent.state.membership import membership
from agent.state.sqlite import SqliteStateLog
from schemas.config import AgentConfig, is_loopback_endpoint

STATE_FILE = "state.db"


def etcd_endpoints(state: str, tls: bool) -> list[str]:
    """`etcd://h1:2379,h2:2379` -> endpoint URLs (https when TLS files are configured)."""
    scheme = "https" if tls else "http"
    return [f"{scheme}://{host}" for host in state.removeprefix("etcd://").split(",") if host]


def open_log(cfg: AgentConfig, writer: bool, holder: Mapping[str, str] | None = None) -> StateLog:
    """The configured state log; `writer` takes the embedded state's exclusive write lock. A cluster node
    (`<state_dir>/cluster.json`) opens the cluster's etcd with the credentials it was issued."""
    member = membership(cfg.state_path)
    if member is not None:
        if member.etcd_tls:  # dabctl's etcd: this node's certificate from the cluster CA
            paths = PkiPaths.of(cfg.state_path)
            cfg = cfg.model_copy(
                update={
                    "etcd_ca_file": str(paths.ca_cert),
                    "etcd_cert_file": str(paths.node_cert),
                    "etcd_key_file": str(paths.node_key),
                }
            )
        tls = bool(cfg.etcd_ca_file or cfg.etcd_cert_file)
        if not tls and not cfg.etcd_insecure:
            remote = [h for h in member.state.removeprefix("etcd://").split(",") if not is_loopback_endpoint(h)]
            if remote:
                raise StateLogError(
                    f"{cfg.state_path / 'cluster.json'}: the cluster's etcd {remote[0]} is plain HTTP to an address "
                    "other than loopback; configure etcd_ca_file/etcd_cert_file/etcd_key_file, or set "
                    "etcd_insecure: true to accept the risk"
                )
        if cfg.etcd_key_file:
            check_secret_file(cfg.etcd_key_file, "etcd_key_file")
        return EtcdStateLog(
            etcd_endpoints(member.state, tls),
            prefix=member.etcd_prefix,
            ca_file=cfg.etcd_ca_file,
            cert_file=cfg.etcd_cert_file,
            key_file=cfg.etcd_key_file,
            user=member.etcd_user,
            password=member.etcd_password,
        )
    if cfg.state.startswith("etcd://"):
        tls = bool(cfg.etcd_ca_file or cfg.etcd_cert_file)
        if cfg.etcd_key_file:
            check_secret_file(cfg.etcd_key_file, "etcd_key_file")
        return EtcdStateLog(
            etcd_endpoints(cfg.state, tls),
            prefix=cfg.etcd_prefix,
            ca_file=cfg.etcd_ca_file,
            cert_file=cfg.etcd_cert_file,
            key_file=cfg.etcd_key_file,
        )
    return SqliteStateLog(cfg.state_path / STATE_FILE, writer=writer, holder=holder)
