"""The cluster CA, node keys, CSRs and certificates (see the package docstring for what a certificate names)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.errors import DabctlError
from schemas.join import NODE_ID, Role

CA_DAYS = 20 * 365
NODE_DAYS = 90  # the default of ClusterRecord.certificate_days
BACKDATE = timedelta(minutes=5)  # clocks of two nodes differ a little: a fresh certificate is valid on both
ROLES: tuple[Role, ...] = ("manager", "worker")


class CertificateRefused(DabctlError):
    """A certificate or CSR that the cluster does not accept (wrong CA, expired, no role, a CA where a node's
    certificate belongs, a CSR for another node); the message says which."""


@dataclass(frozen=True)
class NodeIdentity:
    """What a node certificate says: who, in which role, of which cluster, until when."""

    node_id: str
    role: Role
    cluster_id: str
    not_before: datetime
    not_after: datetime


class Signer(Protocol):
    """Issues node certificates from CSRs. A manager's `LocalSigner` holds the CA key; rotation, an external CA
    or revocation checks come in behind this."""

    def ca_certificate(self) -> bytes: ...

    def sign(self, csr_pem: bytes, *, node_id: str, role: Role, address: str, days: int) -> bytes: ...


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise CertificateRefused(f"{what} is not a PEM private key without a passphrase") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateRefused(f"{what} is not an ECDSA key")
    return key


def load_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateRefused(f"{what} is not a PEM certificate") from None


def ca_digest(ca_pem: bytes) -> str:
    """What a join token pins: the SHA-256 of the CA certificate's DER, 64 hex characters."""
    der = load_certificate(ca_pem, "the CA certificate").public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def digest_matches(ca_pem: bytes, expected: str) -> bool:
    return hmac.compare_digest(ca_digest(ca_pem).encode(), expected.encode())


def new_ca(cluster_id: str, now: datetime | None = None) -> tuple[bytes, bytes]:
    """A root CA for the cluster: (certificate PEM, key PEM)."""
    now = now or datetime.now(UTC)
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
            x509.NameAttribute(NameOID.COMMON_NAME, "dabctl cluster CA"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def new_csr(key: ec.EllipticCurvePrivateKey, node_id: str) -> bytes:
    """The CSR a node sends with its join token: its id as CN; the manager sets role, cluster and addresses."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _san(node_id: str, address: str) -> x509.SubjectAlternativeName:
    """The node id (a DNS name: the certificate's only place for it), the advertise address (etcd checks a peer's
    address against its certificate; clients check the member's) and loopback (the node's own clients)."""
    names: list[x509.GeneralName] = [x509.DNSName(node_id)]
    host = address.strip("[]")
    ips = [LOOPBACK]
    if host:
        try:
            ip = ipaddress.ip_address(host)
            ips = [ip, *(a for a in ips if a != ip)]
        except ValueError:
            names.append(x509.DNSName(host))
    names.extend(x509.IPAddress(ip) for ip in ips)
    return x509.SubjectAlternativeName(names)


class LocalSigner:
    """Signs with the CA key this manager holds (`<state_dir>/pki/ca.key`)."""

    def __init__(self, ca_pem: bytes, ca_key_pem: bytes) -> None:
        self._ca_pem = ca_pem
        self._ca = load_certificate(ca_pem, "the CA certificate")
        self._key = load_key(ca_key_pem, "the CA key")
        if not _is_ca(self._ca):
            raise CertificateRefused("this certificate is not a CA: a node's certificate cannot sign certificates")
        if self._key.public_key().public_numbers() != _ec_public(self._ca).public_numbers():
            raise CertificateRefused("the CA key does not belong to the CA certificate")

    def ca_certificate(self) -> bytes:
        return self._ca_pem

    def sign(
        self, csr_pem: bytes, *, node_id: str, role: Role, address: str, days: int, now: datetime | None = None
    ) -> bytes:
        """A node certificate for the key of `csr_pem`, naming `node_id` and `role` (the CSR's own subject is only
        checked: it must name the same node id)."""
        if role not in ROLES or not NODE_ID.fullmatch(node_id):
            raise CertificateRefused(f"cannot issue a certificate for node {node_id!r} as {role!r}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CertificateRefused("the CSR is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise CertificateRefused("the CSR's signature does not verify: its sender does not hold the key")
        cn = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cn != [node_id]:
            raise CertificateRefused(f"the CSR names node {cn[0] if cn else 'nothing'!r}, not {node_id}")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise CertificateRefused("the CSR's key is not an ECDSA key")
        now = now or datetime.now(UTC)
        cluster_id = self._ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(cluster_id)),
                        # No Common Name: with authentication on, etcd 3.4 takes a client certificate's CN for
                        # the user, and its JSON gateway then refuses the request (400); the node id is the SAN's.
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    ]
                )
            )
            .issuer_name(self._ca.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + timedelta(days=days), self._ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(_san(node_id, address), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(self._ca)), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertificateRefused("the certificate's key is not an ECDSA key")
    return public


def identify(cert: bytes, ca_pem: bytes, now: datetime | None = None) -> NodeIdentity:
    """The identity a node certificate (PEM, or DER as TLS hands it over) proves, refusing one the cluster CA did
    not sign itself, one outside its validity window, a CA certificate, or one without a node id and a role."""
    try:
        found = (
            x509.load_pem_x509_certificate(cert)
            if cert.lstrip().startswith(b"-----")
            else (x509.load_der_x509_certificate(cert))
        )
    except ValueError:
        raise CertificateRefused("not a certificate") from None
    ca = load_certificate(ca_pem, "the CA certificate")
    if found.issuer != ca.subject:
        raise CertificateRefused("the certificate was not issued by this cluster's CA")
    try:
        found.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateRefused("the certificate's signature is not this cluster's CA's") from None
    now = now or datetime.now(UTC)
    if not found.not_valid_before_utc <= now <= found.not_valid_after_utc:
        raise CertificateRefused(
            f"the certificate is valid from {found.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{found.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
    if _is_ca(found):
        raise CertificateRefused("a CA certificate is not a node's certificate")
    subject = found.subject
    ou = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    org = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    ids = _dns_names(found)[:1]  # the node id is the first DNS name (an advertised host name may follow)
    if len(ou) != 1 or ou[0] not in ROLES or not ids or not NODE_ID.fullmatch(ids[0]) or len(org) != 1:
        raise CertificateRefused("the certificate names no node id and role (its first SAN DNS name, the OU)")
    role: Role = "manager" if ou[0] == "manager" else "worker"
    return NodeIdentity(
        node_id=ids[0],
        role=role,
        cluster_id=org[0],
        not_before=found.not_valid_before_utc,
        not_after=found.not_valid_after_utc,
    )


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        return []


def same_key(cert_pem: bytes, csr_pem: bytes) -> bool:
    """Whether a CSR is for the key of a certificate (its signature, checked when it is signed, proves that the
    sender holds that key)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = load_certificate(cert_pem, "the certificate")
    return bool(cert.public_key().public_bytes(*fmt) == csr.public_key().public_bytes(*fmt))


def not_after(cert_pem: bytes) -> datetime:
    """When a certificate expires (read without checking who issued it)."""
    return load_certificate(cert_pem, "the certificate").not_valid_after_utc
