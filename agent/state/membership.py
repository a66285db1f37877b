"""This node's membership of a cluster, in its state directory (every file 0600):

- `node-id`: the node's random id (25 lower-case hex characters), made once and kept: the same name with the same id
  is the same node returning;
- `cluster.json` (`schemas.config.ClusterMembership`): written by `cluster init` or `cluster join`; its presence
  makes the agent a cluster node, and the state log is then the cluster's etcd, reached with the user and
  password the cluster issued to this node;
- `cluster-secrets.json` (`schemas.join.ClusterSecrets`, managers only): the join tokens' secrets and etcd's root
  password.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agent.private import PrivateFileRefused, open_private, private_dir, read_secret_file
from schemas.config import ClusterMembership
from schemas.errors import DabctlError
from schemas.join import NODE_ID, ClusterSecrets, new_node_id

NODE_ID_FILE = "node-id"
MEMBERSHIP_FILE = "cluster.json"
SECRETS_FILE = "cluster-secrets.json"


class MembershipError(DabctlError):
    """A membership file that cannot be used (the message names it and the fix)."""


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, 0600 from its first byte, through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def node_id(state_dir: Path) -> str:
    """This node's id: read from `<state_dir>/node-id`, or made and written (0600) on first use."""
    private_dir(state_dir)
    path = state_dir / NODE_ID_FILE
    if path.exists():
        value = read_secret_file(str(path), "node-id")
        if not NODE_ID.fullmatch(value):
            raise MembershipError(f"{path} does not hold a node id (25 characters 0-9a-z); remove it to make a new one")
        return value
    value = new_node_id()
    write_private(path, value + "\n")
    return value


def _read(path: Path, model: type[BaseModel]) -> BaseModel | None:
    if not path.exists():
        return None
    text = read_secret_file(str(path), path.name)
    try:
        return model.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise MembershipError(f"{path} cannot be read ({str(exc).splitlines()[0]}); restore it or join again") from None


def membership(state_dir: Path) -> ClusterMembership | None:
    """This node's cluster membership, or None for a single-node install."""
    try:
        found = _read(state_dir / MEMBERSHIP_FILE, ClusterMembership)
    except PrivateFileRefused:
        raise
    assert found is None or isinstance(found, ClusterMembership)
    return found


def write_membership(state_dir: Path, value: ClusterMembership) -> None:
    private_dir(state_dir)
    write_private(state_dir / MEMBERSHIP_FILE, value.model_dump_json(indent=2) + "\n")


def cluster_secrets(state_dir: Path) -> ClusterSecrets | None:
    found = _read(state_dir / SECRETS_FILE, ClusterSecrets)
    assert found is None or isinstance(found, ClusterSecrets)
    return found


def write_cluster_secrets(state_dir: Path, value: ClusterSecrets) -> None:
    private_dir(state_dir)
    write_private(state_dir / SECRETS_FILE, value.model_dump_json(indent=2) + "\n")
