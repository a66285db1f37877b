"""The agent configuration: one YAML file, every field overridable by DABCTL_* env and flags."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


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
    etcd_insecure: bool = Field(
        False,
        validate_default=True,
        description="Accept plain-HTTP etcd at an address other than loopback (whoever reaches it can run containers)",
    )
    ref: str | None = Field(None, description="Git branch, tag or commit SHA (default main for a git source)")
    path: str | None = Field(None, description="Subdirectory of the repository holding the bundles")
    git_token_file: str | None = Field(None, description="File holding an HTTP(S) token for the repository")
    git_token_env: str | None = Field(None, description="Environment variable holding that token")
    git_username: str | None = Field(None, description="User name sent with the token (default x-access-token)")
    git_ssh_key_file: str | None = Field(None, description="Private key for ssh:// repositories")
    git_known_hosts_file: str | None = Field(None, description="known_hosts checked for ssh:// host keys")
    git_max_object_bytes: Annotated[int, Field(ge=1024)] = Field(
        32 * 1024 * 1024,
        description="Largest git object (file, tree, commit) a fetch accepts; a larger one refuses the fetch "
        "before it is inflated",
    )
    poll_interval: Annotated[float, Field(ge=0)] = Field(60.0, description="Seconds between git polls (0: off)")
    resync_interval: Annotated[float, Field(ge=0)] = Field(300.0, description="Seconds between full resyncs (0: off)")
    listen: str = Field("127.0.0.1:9420", description="Agent HTTP: /healthz /readyz /metrics /status and the CLI API")
    webhook_listen: str | None = Field(None, description="Separate public listener serving only /webhook")
    webhook_secret_file: str | None = Field(None, description="GitHub HMAC secret or GitLab token, from a file")
    webhook_secret_env: str | None = Field(None, description="... or from an environment variable")
    log_format: Literal["console", "json"] = Field("console", description="Agent log format")
    backoff_max: Annotated[float, Field(ge=1)] = Field(300.0, description="Longest retry delay for a failing stack")
    pull_policy: Literal["if-not-present", "always", "never"] = Field(
        "if-not-present", description="Pull policy of services that set none"
    )
    docker_config: str | None = Field(
        None, description="Directory with a Docker client config.json (registry credentials; default DOCKER_CONFIG)"
    )
    allow_bind_mounts: list[str] = Field(
        default_factory=list, description="Bind-mount sources allowed despite the policy (Docker socket, /, ...)"
    )
    allow_host_network: bool = Field(False, description="Let bundles join the host's network (External: host)")
    history_limit: Annotated[int, Field(ge=1, le=1000)] = Field(10, description="Applied revisions kept per stack")
    audit_limit: Annotated[int, Field(ge=1, le=100_000)] = Field(500, description="Passes kept in the audit trail")
    allow_empty: bool = Field(False, description="Allow a source with no stacks to prune every deployed stack")
    loadbalancer: Literal["auto", "nftables", "ipvs", "none"] = Field(
        "auto",
        description="Routing mesh for published ports: auto (IPVS where the kernel has it, else nftables), "
        "nftables, ipvs, or none (ports are not published)",
    )
    published_port_range: Annotated[str, Field(pattern=r"^\d{1,5}-\d{1,5}$")] = Field(
        "30000-32767", description="Ports allocated to service ports that set no PublishedPort (low-high)"
    )

    @field_validator("source")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        # A URL is shown by `ps`, logs and lock files; the value is never repeated in the message.
        if value and value.lower().startswith(("http://", "https://")) and urlsplit(value).password is not None:
            raise ValueError(
                "the URL carries a password or token (user:TOKEN@), which `ps`, logs and lock files would show; "
                "remove it and put the token in a file (mode 0600) named by git_token_file, the user in git_username"
            )
        return value

    @field_validator("etcd_insecure")
    @classmethod
    def _etcd_not_open(cls, value: bool, info: ValidationInfo) -> bool:
        state = str(info.data.get("state", ""))
        tls = info.data.get("etcd_ca_file") or info.data.get("etcd_cert_file")
        if value or tls or not state.startswith("etcd://"):
            return value
        remote = [h for h in state.removeprefix("etcd://").split(",") if h and not is_loopback(h)]
        if remote:
            raise ValueError(
                f"state etcd://{remote[0]} is plain HTTP to an address other than loopback: whoever can reach it can "
                "write the state log and so run containers on this host; configure TLS with client certificates "
                "(etcd_ca_file, etcd_cert_file, etcd_key_file), or set etcd_insecure: true to accept the risk"
            )
        return value

    @field_validator("published_port_range")
    @classmethod
    def _port_range(cls, value: str) -> str:
        low, high = (int(p) for p in value.split("-"))
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"{value!r} is not a range of ports: write low-high with 1 <= low <= high <= 65535")
        return value

    @property
    def port_range(self) -> tuple[int, int]:
        low, high = self.published_port_range.split("-")
        return int(low), int(high)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


def is_loopback(host: str) -> bool:
    """`localhost`, `127.0.0.1:2379`, `[::1]:2379`, `::1` -> True; any other name or address -> False."""
    name = host.strip()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
