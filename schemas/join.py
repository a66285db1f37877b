"""Joining a cluster: the join token's shape and the messages of `POST /cluster/v1/join` (pure; no I/O).

A join token is `DABCTL-1-<CA digest, or "none">-<secret>`, as Swarm's `SWMTKN-1-<CA digest>-<secret>`: the
version, the digest of the cluster's certificate authority (a joining node checks the CA it is shown against it
before it sends anything; "none" until the cluster has a CA), and a random secret whose SHA-256 digest the cluster
record keeps (the secret itself never enters the state log). The role (worker or manager) is the token's: each
role has its own secret. `dabctl cluster join --token T MANAGER:9421` sends it with the node's name and id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import DabctlError

TOKEN_PREFIX = "DABCTL-1-"
SECRET_ALPHABET = string.ascii_lowercase + string.digits
SECRET_LENGTH = 32  # base36 characters: 165 bits
NO_CA = "none"
_TOKEN = re.compile(r"^DABCTL-1-(?P<ca>none|[0-9a-f]{64})-(?P<secret>[0-9a-z]{25,64})$")
NODE_ID = re.compile(r"^[0-9a-z]{25}$")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

Role = Literal["manager", "worker"]


class InvalidToken(DabctlError):
    """A string that is not a join token (the message says what is wrong, never the secret)."""


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token: the CA digest it pins ("" for none) and its secret."""

    ca_digest: str
    secret: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}{self.ca_digest or NO_CA}-{self.secret}"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"JoinToken(ca_digest={self.ca_digest or NO_CA!r}, secret=...)"

    @property
    def digest(self) -> str:
        return secret_digest(self.secret)

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        m = _TOKEN.match(text.strip())
        if m is None:
            raise InvalidToken(
                "not a dabctl join token: expected DABCTL-1-<CA digest or none>-<secret>; print one with "
                "`dabctl cluster join-token worker` on a manager"
            )
        ca = m.group("ca")
        return cls("" if ca == NO_CA else ca, m.group("secret"))

    @classmethod
    def new(cls, ca_digest: str = "") -> JoinToken:
        return cls(ca_digest, "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH)))


def secret_digest(secret: str) -> str:
    """What the cluster record keeps of a token's secret."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def role_of(token: JoinToken, worker_digest: str, manager_digest: str) -> Role | None:
    """The role a token grants under the recorded digests, compared in constant time; None when it grants none."""
    digest = token.digest.encode()
    manager = bool(manager_digest) and hmac.compare_digest(digest, manager_digest.encode())
    worker = bool(worker_digest) and hmac.compare_digest(digest, worker_digest.encode())
    return "manager" if manager else "worker" if worker else None


def new_node_id() -> str:
    """A node id: 25 lower-case hex characters of a random UUID, like Swarm's 25-character ids."""
    return uuid.uuid4().hex[:25]


class JoinMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class JoinRequest(JoinMessage):
    """What a joining node sends to a manager's cluster listener."""

    token: str = Field(repr=False)
    node_id: str = Field(pattern=NODE_ID.pattern)
    name: str = Field(pattern=NODE_NAME.pattern)
    advertise_address: str = ""
    csr: str = ""  # PEM: the node's key stays on the node; the manager signs this (required once the cluster has a CA)


class ClusterSecrets(JoinMessage):
    """What only managers hold (`<state_dir>/cluster-secrets.json`, 0600): the join tokens' secrets (the cluster
    record keeps only their digests) and the password of etcd's root user, which creates a user for each node that
    joins. The cluster CA's key is kept beside them, in `<state_dir>/pki/ca.key`."""

    worker_token: str = Field(repr=False)
    manager_token: str = Field(repr=False)
    etcd_root_password: str | None = Field(None, repr=False)


class JoinResponse(JoinMessage):
    """What the manager answers a node it admitted: everything the node needs to reach the cluster's state log."""

    cluster_id: str
    node_id: str
    role: Role
    state: str  # etcd://host:2379,...
    etcd_prefix: str
    etcd_user: str | None = None
    etcd_password: str | None = Field(None, repr=False)
    managers: list[str] = []
    secrets: ClusterSecrets | None = None  # managers of a cluster without a CA only (with one: ManagerSecrets)
    # A manager joining a cluster that runs its own etcd: the members (node id -> peer URL), its own already added
    # as a learner; it starts its member with these and `initial-cluster-state existing`.
    etcd_members: dict[str, str] = {}
    etcd_tls: bool = False  # the cluster's etcd is dabctl's: TLS, the node's certificate as its client certificate
    certificate: str = ""  # PEM: the node's certificate, naming its id and role
    ca_certificate: str = ""  # PEM: the cluster CA's (the node checked its digest against the token's)


class ManagerSecrets(JoinMessage):
    """What a manager hands a new manager over mutual TLS (`POST /cluster/v1/secrets`, manager certificates only):
    the cluster's secrets and the CA's key, so that every manager can admit nodes and sign their certificates."""

    secrets: ClusterSecrets
    ca_key: str = Field(repr=False)


class CertificateRequest(JoinMessage):
    """A node asks a manager for a certificate for the role its spec has now (`POST /cluster/v1/certificate`,
    over mutual TLS with its current certificate): a worker promoted to manager, or a manager demoted. `csr` is
    signed by the key of `certificate`, which proves the sender holds it; the key stays the node's."""

    certificate: str  # PEM: the node's current certificate from the cluster CA
    csr: str  # PEM
    advertise_address: str = ""


class CertificateResponse(JoinMessage):
    """The manager's answer: the node's new certificate, naming its id and the role of its spec."""

    certificate: str
    role: Role
