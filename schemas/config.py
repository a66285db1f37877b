"""The agent configuration: one YAML file, every field overridable by DABCTL_* env and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class AgentConfig(BaseModel):
    """Settings shared by every command; precedence flag > env > file > default."""

    model_config = ConfigDict(extra="forbid", strict=True, title="dabctl agent configuration")

    source: str | None = Field(None, description="Directory of bundle files (one stack per file)")
    state_dir: Annotated[str, Field(min_length=1)] = Field(
        "/var/lib/dabctl", description="Where the embedded state lives"
    )
    node_name: str | None = Field(None, description="This node's name (default: the host name)")
    docker_host: str | None = Field(None, description="Docker endpoint (default: DOCKER_HOST or the local socket)")
    parallelism: Annotated[int, Field(ge=1, le=64)] = Field(8, description="Engine calls in flight at once")
    state: Annotated[str, Field(pattern=r"^(embedded|etcd://[^/\s]+(,[^/\s]+)*)$")] = Field(
        "embedded", description="State log: embedded (SQLite in state_dir) or etcd://host:2379[,host2:2379]"
    )
    etcd_prefix: str = Field("/dabctl", description="Key prefix of this deployment's state in etcd")
    etcd_ca_file: str | None = Field(None, description="CA bundle for etcd over TLS (switches to https)")
    etcd_cert_file: str | None = Field(None, description="Client certificate for etcd")
    etcd_key_file: str | None = Field(None, description="Client key for etcd")
    history_limit: Annotated[int, Field(ge=1, le=1000)] = Field(10, description="Applied revisions kept per stack")
    audit_limit: Annotated[int, Field(ge=1, le=100_000)] = Field(500, description="Passes kept in the audit trail")
    allow_empty: bool = Field(False, description="Allow a source with no stacks to prune every deployed stack")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)
