"""A node's certificates under its state directory, and the TLS contexts made from them.

`<state_dir>/pki/` (0700): `ca.crt` (the cluster CA's certificate), `node.crt` and `node.key` (this node's; the
key is made on the node and never leaves it), and on managers `ca.key` (the CA's key). Every file is 0600; the
keys are never written to the state log nor to a log line. `PkiPaths` is what other parts (the managed etcd
member, the etcd client) take their TLS file paths from.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.pki.ca import LocalSigner, NodeIdentity, identify, not_after
from agent.private import open_private, private_dir

PKI_DIR = "pki"


@dataclass(frozen=True)
class PkiPaths:
    """The files of one node's PKI (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, state_dir: Path) -> PkiPaths:
        return cls(state_dir / PKI_DIR)

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def node_cert(self) -> Path:
        return self.root / "node.crt"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    def has_node_certificate(self) -> bool:
        return self.ca_cert.exists() and self.node_cert.exists() and self.node_key.exists()

    def can_sign(self) -> bool:
        return self.ca_cert.exists() and self.ca_key.exists()

    def write(self, path: Path, content: bytes) -> None:
        """Replace `path` (one of ours) with `content`, 0600 from its first byte."""
        private_dir(self.root)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, content)
        finally:
            os.close(fd)
        tmp.replace(path)

    def read(self, path: Path) -> bytes:
        fd = open_private(path, os.O_RDONLY)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def signer(self) -> LocalSigner:
        return LocalSigner(self.read(self.ca_cert), self.read(self.ca_key))

    def identity(self) -> NodeIdentity:
        """This node's own identity, checked against the CA it holds (CertificateRefused when it does not hold)."""
        return identify(self.read(self.node_cert), self.read(self.ca_cert))

    def server_context(self) -> ssl.SSLContext:
        """The cluster listener's: this node's certificate; a client certificate is asked for and, when given,
        must be the cluster CA's (the routes a node without one may call — the CA fetch and joining — are the
        server's to allow; every other route requires one)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.node_cert), str(self.node_key))
        ctx.load_verify_locations(cafile=str(self.ca_cert))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self, *, with_certificate: bool = True) -> ssl.SSLContext:
        """To call another node's cluster listener: its certificate must be the cluster CA's (the peer's role is
        the caller's to check: `identify`); host names are not checked, the CA and the role are."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.ca_cert))
        if with_certificate:
            ctx.load_cert_chain(str(self.node_cert), str(self.node_key))
        return ctx


def certificate_expiry(state_dir: Path) -> datetime | None:
    """When this node's certificate expires, or None when it has none (a single node, or a CA-less cluster)."""
    paths = PkiPaths.of(state_dir)
    if not paths.node_cert.exists():
        return None
    return not_after(paths.read(paths.node_cert))


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
