"""A node's certificate follows its role (agent/node/etcdroles.py `certificate_call`): a manager issues a node the
certificate of the role its spec has now, only for the key of the certificate the node holds, never to a node that
is no longer in the cluster or to one of another CA."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.node.etcdroles import certificate_call
from agent.pki.ca import LocalSigner, identify, key_pem, load_key, new_ca, new_csr, new_key
from agent.pki.files import PkiPaths
from agent.state.nodes import NodeRecords
from agent.state.sqlite import SqliteStateLog
from schemas.config import AgentConfig
from schemas.join import CertificateRequest, new_node_id
from schemas.state import NodeSpec

CLUSTER = "c" * 25


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[AgentConfig, SqliteStateLog, tuple[bytes, bytes]]]:
    """A manager's state directory with the cluster CA, and a state log holding node specs."""
    state = tmp_path / "manager"
    state.mkdir(mode=0o700)
    ca = new_ca(CLUSTER)
    paths = PkiPaths.of(state)
    paths.write(paths.ca_cert, ca[0])
    paths.write(paths.ca_key, ca[1])
    log = SqliteStateLog(state / "state.db", writer=True)
    try:
        yield AgentConfig.model_validate({"source": str(tmp_path), "state_dir": str(state)}), log, ca
    finally:
        log.close()


def _node(ca: tuple[bytes, bytes], role: str) -> tuple[str, bytes, bytes]:
    nid = new_node_id()
    key = new_key()
    cert = LocalSigner(*ca).sign(new_csr(key, nid), node_id=nid, role=role, address="10.0.0.7", days=90)  # type: ignore[arg-type]
    return nid, cert, key_pem(key)


def _ask(cfg: AgentConfig, log: SqliteStateLog, cert: bytes, key: bytes, nid: str) -> tuple[int, dict[str, Any]]:
    csr = new_csr(load_key(key, "key"), nid)
    body = CertificateRequest(certificate=cert.decode(), csr=csr.decode(), advertise_address="10.0.0.7")
    return certificate_call(cfg, log)(body.model_dump(), "10.0.0.7")


@pytest.mark.parametrize(("held", "spec_role"), [("worker", "manager"), ("manager", "worker"), ("worker", "worker")])
def test_the_new_certificate_names_the_role_of_the_spec(
    manager: tuple[AgentConfig, SqliteStateLog, tuple[bytes, bytes]], held: str, spec_role: str
) -> None:
    cfg, log, ca = manager
    nid, cert, key = _node(ca, held)
    NodeRecords(log).add_node(NodeSpec(node_id=nid, name="n2", role=spec_role, joined_at=datetime.now(UTC)))  # type: ignore[arg-type]
    status, body = _ask(cfg, log, cert, key, nid)
    assert status == 200, body
    me = identify(body["certificate"].encode(), ca[0])
    assert (me.node_id, me.role, body["role"]) == (nid, spec_role, spec_role)


def test_refused_for_another_key_a_removed_node_or_another_ca(
    manager: tuple[AgentConfig, SqliteStateLog, tuple[bytes, bytes]],
) -> None:
    cfg, log, ca = manager
    nid, cert, _key = _node(ca, "worker")
    NodeRecords(log).add_node(NodeSpec(node_id=nid, name="n2", role="manager", joined_at=datetime.now(UTC)))
    # Someone holding only the certificate (not its key) signs the CSR with a key of their own.
    status, body = _ask(cfg, log, cert, key_pem(new_key()), nid)
    assert (status, body["error"]) == (403, "the CSR is not for the key of the certificate sent with it")
    # A node that is not in the cluster (removed, or never joined).
    other, other_cert, other_key = _node(ca, "worker")
    status, body = _ask(cfg, log, other_cert, other_key, other)
    assert status == 403 and "not in the cluster" in body["error"]
    # A certificate of another cluster's CA.
    stranger_ca = new_ca("d" * 25)
    s_nid, s_cert, s_key = _node(stranger_ca, "manager")
    status, body = _ask(cfg, log, s_cert, s_key, s_nid)
    assert status == 403 and "not issued by this cluster's CA" in body["error"]
    # Not a request at all.
    assert certificate_call(cfg, log)({"certificate": 1}, "x")[0] == 400


def test_a_node_without_the_ca_key_sends_the_caller_elsewhere(
    manager: tuple[AgentConfig, SqliteStateLog, tuple[bytes, bytes]],
) -> None:
    cfg, log, ca = manager
    PkiPaths.of(cfg.state_path).ca_key.unlink()
    nid, cert, key = _node(ca, "worker")
    status, body = _ask(cfg, log, cert, key, nid)
    assert status == 503 and "ask another manager" in body["error"]
