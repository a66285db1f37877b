"""Who may write what in a cluster's etcd: users and roles over the JSON gateway (`/v3/auth/...`).

The cluster's prefix P (keys `P/...`) is guarded by etcd's own authorization, so that a worker holding everything it
was given (its `cluster.json`) still cannot write intent:

- role `dabctl-manager:P`: read and write on `P/` (managers write cluster and node specs; the leader writes intent);
- role `dabctl-node:P:<id>`: read on `P/`, write only on `P/node/<id>/` (its status and slot reports);
- one user per node, `dabctl-node-<id>`, with a random password issued at join and the role its token granted;
- etcd's `root` user (root role): needed to enable auth and to add users, so managers hold its password.

etcd's JSON gateway ignores a client certificate's Common Name, so certificates cannot name the etcd user: the
password is the node's identity to etcd, the certificate (when the cluster has a CA) its key to the connection.
"""

from __future__ import annotations

import secrets
import string

from agent.state.etcd import EtcdStateLog, PermissionDenied, _b64, prefix_end
from agent.state.records import node_prefix

ROOT = "root"
_ALPHABET = string.ascii_letters + string.digits


def random_password(length: int = 32) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def node_user(node_id: str) -> str:
    return f"dabctl-node-{node_id}"


def manager_role(prefix: str) -> str:
    return f"dabctl-manager:{prefix.rstrip('/')}"


def node_role(prefix: str, node_id: str) -> str:
    return f"dabctl-node:{prefix.rstrip('/')}:{node_id}"


class EtcdAuth:
    """etcd's users, roles and auth switch, through a client that is root (or that talks to etcd with auth off)."""

    def __init__(self, log: EtcdStateLog) -> None:
        self.log = log

    def _range(self, key: str) -> tuple[bytes, bytes]:
        start = (self.log.prefix + key).encode()
        return start, prefix_end(start)

    def enabled(self) -> bool:
        """Whether etcd checks credentials: with auth on, an anonymous user list is refused."""
        tls = self.log.tls_args
        probe = EtcdStateLog(
            self.log.endpoints,
            prefix=self.log.prefix,
            timeout=self.log.timeout,
            ca_file=tls["ca_file"],
            cert_file=tls["cert_file"],
            key_file=tls["key_file"],
        )
        try:
            probe._call("/auth/user/list", {})
        except PermissionDenied:  # an anonymous client is refused only with auth on
            return True
        finally:
            probe.close()
        return False

    def users(self) -> list[str]:
        return [str(u) for u in self.log._call("/auth/user/list", {}).get("users") or []]

    def roles(self) -> list[str]:
        return [str(r) for r in self.log._call("/auth/role/list", {}).get("roles") or []]

    def add_user(self, name: str, password: str) -> None:
        """Create `name`, or set its password when it exists."""
        if name in self.users():
            self.log._call("/auth/user/changepw", {"name": name, "password": password}, retry_reads=False)
        else:
            self.log._call("/auth/user/add", {"name": name, "password": password}, retry_reads=False)

    def grant_role(self, user: str, role: str) -> None:
        self.log._call("/auth/user/grant", {"user": user, "role": role}, retry_reads=False)

    def add_role(self, role: str) -> None:
        if role not in self.roles():
            self.log._call("/auth/role/add", {"name": role}, retry_reads=False)

    def permit(self, role: str, key: str, perm: str) -> None:
        """Give `role` READ, WRITE or READWRITE on every key under `<prefix><key>`."""
        start, end = self._range(key)
        body = {"name": role, "perm": {"permType": perm, "key": _b64(start), "range_end": _b64(end)}}
        self.log._call("/auth/role/grant", body, retry_reads=False)

    def enable(self) -> None:
        self.log._call("/auth/enable", {}, retry_reads=False)

    def disable(self) -> None:
        self.log._call("/auth/disable", {}, retry_reads=False)

    def delete_user(self, name: str) -> None:
        if name in self.users():
            self.log._call("/auth/user/delete", {"name": name}, retry_reads=False)

    def delete_role(self, role: str) -> None:
        if role in self.roles():
            self.log._call("/auth/role/delete", {"role": role}, retry_reads=False)

    # --- what dabctl sets up ------------------------------------------------------------------------------------

    def ensure_root(self, password: str) -> None:
        """The root user with the root role (etcd refuses to enable auth without it)."""
        self.add_user(ROOT, password)
        self.grant_role(ROOT, ROOT)

    def ensure_manager_role(self) -> str:
        role = manager_role(self.log.prefix)
        self.add_role(role)
        self.permit(role, "/", "READWRITE")
        return role

    def issue_node_user(self, node_id: str, manager: bool) -> tuple[str, str]:
        """The node's user with a fresh password and its role: (user, password)."""
        user, password = node_user(node_id), random_password()
        self.add_user(user, password)
        self.set_node_role(node_id, manager)
        return user, password

    def set_node_role(self, node_id: str, manager: bool) -> None:
        """Give the node's user (which exists) the rights of its role, and only those: its password stays."""
        user = node_user(node_id)
        if manager:
            role = self.ensure_manager_role()
        else:
            role = node_role(self.log.prefix, node_id)
            self.add_role(role)
            self.permit(role, "/", "READ")
            self.permit(role, node_prefix(node_id), "READWRITE")
        # A node that changes role keeps only the new one's rights.
        held = self.log._call("/auth/user/get", {"name": user}).get("roles") or []
        for old in held:
            if old != role:
                self.log._call("/auth/user/revoke", {"name": user, "role": old}, retry_reads=False)
        self.grant_role(user, role)

    def remove_node_user(self, node_id: str) -> None:
        self.delete_user(node_user(node_id))
        self.delete_role(node_role(self.log.prefix, node_id))
