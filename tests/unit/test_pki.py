"""The cluster CA, node certificates from CSRs, and what the other side checks (agent/pki), and the cluster
listener's mutual TLS (agent/api/server.py): who may call what, with which certificate."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.api.join import JoinRefused, call, fetch_ca
from agent.api.server import AgentHttp, ClusterTls, Kind
from agent.metrics import Metrics
from agent.pki.ca import (
    CertificateRefused,
    LocalSigner,
    ca_digest,
    digest_matches,
    identify,
    key_pem,
    new_ca,
    new_csr,
    new_key,
)
from agent.pki.files import PkiPaths, certificate_expiry
from reconcilers.certificates import Renewal, plan_renewal, renew_at
from schemas.join import JoinToken, new_node_id
from schemas.output import StatusOutput

CLUSTER = "c" * 25


@dataclass
class Issued:
    node_id: str
    cert: bytes
    key: bytes


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return new_ca(CLUSTER)


def issue(ca: tuple[bytes, bytes], role: str = "worker", *, days: int = 90, now: datetime | None = None) -> Issued:
    nid = new_node_id()
    key = new_key()
    cert = LocalSigner(*ca).sign(new_csr(key, nid), node_id=nid, role=role, address="10.0.0.7", days=days, now=now)  # type: ignore[arg-type]
    return Issued(nid, cert, key_pem(key))


def test_a_node_certificate_names_its_id_role_and_cluster(ca: tuple[bytes, bytes]) -> None:
    node = issue(ca, "manager")
    me = identify(node.cert, ca[0])
    assert (me.node_id, me.role, me.cluster_id) == (node.node_id, "manager", CLUSTER)
    assert timedelta(days=89) < me.not_after - datetime.now(UTC) <= timedelta(days=90)
    assert identify(node.cert, ca[0]).role == "manager"


def test_a_node_certificate_fits_etcd_no_common_name_both_usages_and_its_addresses(ca: tuple[bytes, bytes]) -> None:
    """The node certificate serves the managed etcd member's ports and is every agent's etcd client certificate:
    etcd 3.4's JSON gateway refuses (400) a client certificate with a Common Name once auth is on, a member checks
    a peer's address against its IP SANs, and the node's own clients reach its member on loopback."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    node = issue(ca, "manager")
    cert = x509.load_pem_x509_certificate(node.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [node.node_id]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
    ]


def test_the_token_pins_the_ca_certificate_digest(ca: tuple[bytes, bytes]) -> None:
    digest = ca_digest(ca[0])
    assert len(digest) == 64 and int(digest, 16) >= 0
    token = JoinToken.parse(str(JoinToken.new(digest)))
    assert token.ca_digest == digest and str(token).startswith(f"DABCTL-1-{digest}-")
    assert digest_matches(ca[0], digest)
    assert not digest_matches(new_ca(CLUSTER)[0], digest)


def test_a_certificate_from_another_ca_is_refused(ca: tuple[bytes, bytes]) -> None:
    other = new_ca(CLUSTER)  # the same cluster id and subject: only the key differs
    node = issue(other)
    with pytest.raises(CertificateRefused, match="signature is not this cluster's CA's"):
        identify(node.cert, ca[0])


def test_an_expired_certificate_is_refused(ca: tuple[bytes, bytes]) -> None:
    node = issue(ca, days=1, now=datetime.now(UTC) - timedelta(days=3))
    with pytest.raises(CertificateRefused, match="not now"):
        identify(node.cert, ca[0])


def test_no_certificate_for_a_role_the_cluster_does_not_have(ca: tuple[bytes, bytes]) -> None:
    key = new_key()
    nid = new_node_id()
    with pytest.raises(CertificateRefused, match="as 'admin'"):
        LocalSigner(*ca).sign(new_csr(key, nid), node_id=nid, role="admin", address="", days=1)  # type: ignore[arg-type]


def test_a_worker_certificate_cannot_sign(ca: tuple[bytes, bytes]) -> None:
    worker = issue(ca)
    with pytest.raises(CertificateRefused, match="not a CA"):
        LocalSigner(worker.cert, worker.key)
    # Nor is a certificate signed with a worker's key (the issuer set to the CA's name) accepted.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    worker_cert = x509.load_pem_x509_certificate(worker.cert)
    worker_key = serialization.load_pem_private_key(worker.key, None)
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    forged_key = new_key()
    forged = (
        x509.CertificateBuilder()
        .subject_name(worker_cert.subject.__class__([*worker_cert.subject]))
        .issuer_name(ca_cert.subject)
        .public_key(forged_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .sign(worker_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    with pytest.raises(CertificateRefused):
        identify(forged.public_bytes(serialization.Encoding.PEM), ca[0])


def test_a_ca_certificate_is_not_a_node_certificate(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(CertificateRefused, match="CA certificate is not a node's"):
        identify(ca[0], ca[0])


def test_a_csr_for_another_node_or_with_a_bad_signature_is_refused(ca: tuple[bytes, bytes]) -> None:
    key = new_key()
    mine, other = new_node_id(), new_node_id()
    with pytest.raises(CertificateRefused, match="names node"):
        LocalSigner(*ca).sign(new_csr(key, other), node_id=mine, role="worker", address="", days=1)
    with pytest.raises(CertificateRefused, match="not a PEM"):
        LocalSigner(*ca).sign(b"junk", node_id=mine, role="worker", address="", days=1)


def test_the_ca_key_must_be_the_ca_certificates(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(CertificateRefused, match="does not belong"):
        LocalSigner(ca[0], new_ca(CLUSTER)[1])


def test_renewal_at_two_thirds_of_life() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = start + timedelta(days=90)
    assert renew_at(start, end) == start + timedelta(days=60)
    assert plan_renewal(start, end, start + timedelta(days=59)).action is Renewal.KEEP
    assert plan_renewal(start, end, start + timedelta(days=60)).action is Renewal.RENEW
    late = plan_renewal(start, end, end + timedelta(seconds=1))
    assert late.action is Renewal.EXPIRED and late.expires_in < timedelta(0)


def _write(paths: PkiPaths, ca: tuple[bytes, bytes], node: Issued, *, ca_key: bool) -> PkiPaths:
    paths.write(paths.ca_cert, ca[0])
    paths.write(paths.node_cert, node.cert)
    paths.write(paths.node_key, node.key)
    if ca_key:
        paths.write(paths.ca_key, ca[1])
    return paths


def test_files_are_private_and_give_the_expiry(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    assert certificate_expiry(tmp_path) is None
    node = issue(ca, "manager")
    paths = _write(PkiPaths.of(tmp_path), ca, node, ca_key=True)
    assert paths.root.stat().st_mode & 0o777 == 0o700
    for f in (paths.ca_cert, paths.ca_key, paths.node_cert, paths.node_key):
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert certificate_expiry(tmp_path) == identify(node.cert, ca[0]).not_after
    assert paths.identity().node_id == node.node_id
    assert paths.signer().ca_certificate() == ca[0]


# --- the cluster listener's mutual TLS --------------------------------------------------------------------------


@dataclass
class Listening:
    address: str
    ca: tuple[bytes, bytes]
    manager: PkiPaths
    worker: PkiPaths
    stranger: PkiPaths


@pytest.fixture
def listening(ca: tuple[bytes, bytes], tmp_path: Path) -> Iterator[Listening]:
    server = _write(PkiPaths(tmp_path / "server"), ca, issue(ca, "manager"), ca_key=True)
    manager = _write(PkiPaths(tmp_path / "manager"), ca, issue(ca, "manager"), ca_key=False)
    worker = _write(PkiPaths(tmp_path / "worker"), ca, issue(ca, "worker"), ca_key=False)
    other = new_ca(CLUSTER)
    stranger = _write(PkiPaths(tmp_path / "stranger"), other, issue(other, "manager"), ca_key=False)
    stranger.write(stranger.ca_cert, ca[0])  # it trusts our CA, but its own certificate is another CA's
    http = AgentHttp(
        status=lambda: StatusOutput(node="n", ready=True, source=None, stacks=[]),  # type: ignore[arg-type]
        ready=lambda: True,
        metrics=Metrics(),
        on_webhook=lambda: None,
        webhook=None,
        cluster_api={
            "join": lambda body, peer: (200, {"joined": True}),
            "secrets": lambda body, peer: (200, {"secret": 1}),
            "ping": lambda body, peer: (200, {}),
        },
    )
    tls = ClusterTls(
        context=server.server_context(),
        ca_pem=ca[0],
        role_of=lambda der: identify(der, ca[0]).role,
        open_calls=frozenset({"join"}),
        manager_calls=frozenset({"secrets"}),
    )
    listener = http.add_cluster("127.0.0.1", 0, tls=tls)
    http.start()
    try:
        host, port = listener.address
        yield Listening(f"{host}:{port}", ca, manager, worker, stranger)
    finally:
        http.stop()


def _post(at: Listening, name: str, ctx: ssl.SSLContext | None) -> tuple[int, dict[str, object]]:
    status, body = call(at.address, "POST", f"/cluster/v1/{name}", b"{}", tls=ctx)
    return status, json.loads(body)


def test_the_listener_routes_and_the_ca_fetch(listening: Listening) -> None:
    assert fetch_ca(listening.address) == listening.ca[0]


def test_a_plain_http_call_is_refused(listening: Listening) -> None:
    host, port = listening.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("POST", "/cluster/v1/join", body=b"{}", headers={"Content-Type": "application/json"})
            conn.getresponse()
    finally:
        conn.close()


def test_join_is_open_everything_else_needs_a_cluster_certificate(listening: Listening) -> None:
    anonymous = listening.worker.client_context(with_certificate=False)
    assert _post(listening, "join", anonymous) == (200, {"joined": True})
    status, doc = _post(listening, "ping", anonymous)
    assert status == 401 and "client certificate" in str(doc["error"])
    assert _post(listening, "ping", listening.worker.client_context())[0] == 200


def test_a_worker_certificate_cannot_call_a_manager_call(listening: Listening) -> None:
    status, doc = _post(listening, "secrets", listening.worker.client_context())
    assert status == 403 and "managers only" in str(doc["error"])
    assert _post(listening, "secrets", listening.manager.client_context()) == (200, {"secret": 1})


def test_a_certificate_of_another_ca_fails_the_handshake(listening: Listening) -> None:
    # TLS 1.3: the server's alert may come after the client sent its request; either way nothing is answered.
    with pytest.raises(JoinRefused, match="cannot reach"):
        _post(listening, "ping", listening.stranger.client_context())


def test_a_server_of_another_ca_is_not_trusted(listening: Listening, tmp_path: Path) -> None:
    other = new_ca(CLUSTER)
    paths = PkiPaths(tmp_path / "elsewhere")
    paths.write(paths.ca_cert, other[0])
    with pytest.raises(JoinRefused, match="TLS"):
        _post(listening, "join", paths.client_context(with_certificate=False))


def test_the_ca_route_is_listed_only_with_tls() -> None:
    http = AgentHttp(
        status=lambda: StatusOutput(node="n", ready=True, source=None, stacks=[]),  # type: ignore[arg-type]
        ready=lambda: True,
        metrics=Metrics(),
        on_webhook=lambda: None,
        webhook=None,
        cluster_api={"join": lambda body, peer: (200, {})},
    )
    http.add_cluster("127.0.0.1", 0)
    assert [r.path for r in http.routes() if r.kind is Kind.CLUSTER] == ["/cluster/v1/join"]
