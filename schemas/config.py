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
    allow_empty: bool = Field(False, description="Allow a source with no stacks to prune every deployed stack")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)
