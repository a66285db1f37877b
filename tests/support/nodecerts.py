"""Test stand-ins for the cluster CA's node certificates (agent/pki/ makes the real ones): a CA and, per node, a
certificate for its address and loopback that serves etcd's ports and is its etcd client certificate.

    certs = make_node_certs(tmp_path, {"n1": "10.230.0.11", ...})
    certs["n1"].env()      # DABCTL_ETCD_CA_FILE, _CERT_FILE, _KEY_FILE
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NodeCert:
    ca: Path
    cert: Path
    key: Path

    def env(self) -> dict[str, str]:
        return {"DABCTL_ETCD_CA_FILE": str(self.ca), "DABCTL_ETCD_CERT_FILE": str(self.cert),
                "DABCTL_ETCD_KEY_FILE": str(self.key)}  # fmt: skip

    def config(self) -> dict[str, str]:
        return {"etcd_ca_file": str(self.ca), "etcd_cert_file": str(self.cert), "etcd_key_file": str(self.key)}


def make_node_certs(
    directory: Path, nodes: Mapping[str, str], ca_name: str = "dabctl test cluster CA"
) -> dict[str, NodeCert]:
    """A CA and one certificate per node (name -> IPv4 address), EC P-256, valid for a day, under `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str, common_name: bool = True) -> x509.Name:
        # etcd 3.4's JSON gateway refuses (400) a client certificate with a Common Name once auth is on: a node's
        # certificate names it in the Organizational Unit instead.
        oid = NameOID.COMMON_NAME if common_name else NameOID.ORGANIZATIONAL_UNIT_NAME
        return x509.Name([x509.NameAttribute(oid, cn)])

    def builder(subject: str, issuer: x509.Name, public: Any, common_name: bool = True) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject, common_name))
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder(ca_name, name(ca_name), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out = {}
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for node, address in nodes.items():
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [ipaddress.IPv4Address(address), ipaddress.IPv4Address("127.0.0.1")]
        cert = (
            builder(f"dabctl-node-{node}", ca_cert.subject, key.public_key(), common_name=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(a) for a in sans]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = directory / f"{node}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[node] = NodeCert(ca_path, cert_path, write_key(key, directory / f"{node}.key"))
    return out
