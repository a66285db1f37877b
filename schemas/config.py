"""The agent configuration: one YAML file, every field overridable by DABCTL_* env and flags."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

VerifyMode = Literal["none", "head", "every-commit"]


class VerifyRule(BaseModel):
    """Commits that change a file matching `path` need `signers` distinct allowed keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: Annotated[str, Field(min_length=1)] = Field(
        description="Glob over repository paths: `*` within a directory, `**` across them (stacks/prod/**)"
    )
    signers: Annotated[int, Field(ge=1, le=16)] = Field(
        description="Distinct allowed keys needed, among the commit's signature and signed tags pointing at it"
    )


class VerifyConfig(BaseModel):
    """Which commits of a git source must be signed, and by whom (no effect on a directory source)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: VerifyMode = Field(
        default="none",
        description="none; head: the commit being applied; every-commit: every commit since the last applied one",
    )
    keys: list[str] = Field(
        default_factory=list,
        description="Files of allowed public keys: OpenPGP (armored or binary) or SSH (`ssh-ed25519 AAAA... name`)",
    )
    since: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")] | None = Field(
        default=None,
        description="every-commit with no applied head recorded yet: check the commits after this trusted one "
        "(default: the head only)",
    )
    rules: list[VerifyRule] = Field(default_factory=list, description="Paths whose changes need more than one signer")

    @model_validator(mode="after")
    def _keys_when_on(self) -> VerifyConfig:
        if self.mode != "none" and not self.keys:
            raise ValueError(f"mode {self.mode} needs at least one key file in verify.keys")
        return self


class BindMountEntry(BaseModel):
    """An allow_bind_mounts entry written as a mapping: a path, and whether mounts of it must be read-only."""

    model_config = ConfigDict(extra="forbid", strict=True, title="allowed bind-mount source")

    path: Annotated[str, Field(min_length=1)] = Field(description="Host path; it and everything under it")
    read_only: bool = Field(False, description="Allow only mounts with ReadOnly: true")


NotifyEvent = Literal[
    "rollout.started",
    "rollout.completed",
    "rollout.paused",
    "rollout.rolled-back",
    "pass.failed",
    "pass.recovered",
    "stack.pinned",
    "stack.unpinned",
]


class NotifySink(BaseModel):
    """Where the agent sends events: a signed JSON webhook, a Slack-compatible webhook, or an Apprise URL."""

    model_config = ConfigDict(extra="forbid", strict=True, title="notification sink")

    kind: Literal["webhook", "slack", "apprise"] = Field(
        description="webhook: the event as JSON, signed; slack: a Slack-compatible incoming webhook; apprise: any "
        "service Apprise supports (mailto://, tgram://, ntfys://, ...)"
    )
    name: str | None = Field(None, description="Shown in the agent's log (default: the kind and its position)")
    url: str | None = Field(None, description="The sink's URL (webhook URLs often hold a token: prefer url_file)")
    url_file: str | None = Field(None, description="... or read the URL from this file")
    url_env: str | None = Field(None, description="... or from this environment variable")
    secret_file: str | None = Field(None, description="webhook: HMAC-SHA256 key of X-Dabctl-Signature-256, from a file")
    secret_env: str | None = Field(None, description="... or from an environment variable")
    events: list[NotifyEvent] = Field(default_factory=list, description="Events to send (default: all)")

    @model_validator(mode="after")
    def _one_url(self) -> NotifySink:
        given = [f for f in ("url", "url_file", "url_env") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError("a sink needs exactly one of url, url_file, url_env")
        if self.kind != "webhook" and (self.secret_file or self.secret_env):
            raise ValueError(f"secret_file/secret_env sign webhook sinks only, not {self.kind}")
        return self


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
    listen_public: bool = Field(
        False, description="Allow `listen` on a non-loopback address (the network can then read /status, /metrics)"
    )
    listen: str = Field("127.0.0.1:9420", description="Agent HTTP: /healthz /readyz /metrics /status /webhook")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names `listen` answers besides localhost, 127.0.0.1, [::1] and its own address "
        "(others are refused: DNS rebinding)",
    )
    control_group: str | None = Field(
        None,
        description="Group allowed to use the control socket <state_dir>/agent.sock (0660; the state "
        "directory becomes 0710 root:GROUP); default root only (0600)",
    )
    advertise_address: str | None = Field(
        None,
        description="The address other nodes reach this one at (cluster nodes; default: the first address of "
        "the interface holding the default route)",
    )
    cluster_listen: str = Field(
        "0.0.0.0:9421", description="Listener for traffic between cluster nodes (never the `listen` one)"
    )
    webhook_listen: str | None = Field(None, description="Separate public listener serving only /webhook")
    webhook_forge: Literal["github", "gitlab"] = Field(
        "github",
        description="How the webhook secret is checked: github (X-Hub-Signature-256 HMAC) or gitlab "
        "(X-Gitlab-Token); a secret is never accepted the other way",
    )
    webhook_secret_file: str | None = Field(None, description="The webhook secret (or GitLab token), from a file")
    webhook_secret_env: str | None = Field(None, description="... or from an environment variable")
    notify: list[NotifySink] = Field(
        default_factory=list, description="Notification sinks: rollouts, failures and recoveries, pins"
    )
    log_format: Literal["console", "json"] = Field("console", description="Agent log format")
    backoff_max: Annotated[float, Field(ge=1)] = Field(300.0, description="Longest retry delay for a failing stack")
    pull_policy: Literal["if-not-present", "always", "never"] = Field(
        "if-not-present", description="Pull policy of services that set none"
    )
    docker_config: str | None = Field(
        None, description="Directory with a Docker client config.json (registry credentials; default DOCKER_CONFIG)"
    )
    # --- what a bundle may ask of the host (bundles.policy; checked again on the node at create/start) ---
    allow_bind_mounts: list[str | BindMountEntry] = Field(
        default_factory=list,
        description="Bind-mount sources allowed (denied by default): a path allows it and everything under it; "
        "{path: P, read_only: true} allows read-only mounts only; a built-in deny set (Docker's sockets and "
        "directories, /, /etc, /root, /proc, /sys, /dev, /boot, dabctl's own) yields only to an exact entry",
    )
    allow_host_network: bool = Field(False, description="Let bundles join the host's network (External: host)")
    max_replicas_per_service: Annotated[int, Field(ge=1)] = Field(500, description="Replicas one service may ask for")
    max_services_per_stack: Annotated[int, Field(ge=1)] = Field(500, description="Services one stack may hold")
    max_stacks: Annotated[int, Field(ge=1)] = Field(500, description="Stacks the source may hold")
    max_containers_per_node: Annotated[int, Field(ge=1)] = Field(
        2000, description="Containers all stacks together may ask of one node"
    )

    @field_validator("allow_bind_mounts")
    @classmethod
    def _absolute_entries(cls, value: list[str | BindMountEntry]) -> list[str | BindMountEntry]:
        for entry in value:
            path = entry if isinstance(entry, str) else entry.path
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not an absolute path: write it from /, e.g. /srv/data")
        return value

    history_limit: Annotated[int, Field(ge=1, le=1000)] = Field(10, description="Applied revisions kept per stack")
    audit_limit: Annotated[int, Field(ge=1, le=100_000)] = Field(500, description="Passes kept in the audit trail")
    allow_empty: bool = Field(False, description="Allow a source with no stacks to prune every deployed stack")
    loadbalancer: Literal["auto", "nftables", "ipvs", "none"] = Field(
        "auto",
        description="Routing mesh for published ports: auto (IPVS where the kernel has it, else nftables), "
        "nftables, ipvs, or none (ports are not published)",
    )
    verify: VerifyConfig = Field(
        default_factory=lambda: VerifyConfig(),
        description="Signature checks of a git source's commits before they are applied",
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
        remote = [h for h in state.removeprefix("etcd://").split(",") if h and not is_loopback_endpoint(h)]
        if remote:
            raise ValueError(
                f"state etcd://{remote[0]} is plain HTTP to an address other than loopback: whoever can reach it can "
                "write the state log and so run containers on this host; configure TLS with client certificates "
                "(etcd_ca_file, etcd_cert_file, etcd_key_file), or set etcd_insecure: true to accept the risk"
            )
        return value

    # What a bundle may reach beyond its own stack: External volumes and other stacks' networks, low ports.
    allow_external_volumes: list[str] = Field(
        default_factory=list, description="External volumes bundles may mount (Volumes: {name: {External: true}})"
    )
    allow_external_networks: list[str] = Field(
        default_factory=list, description="Other stacks' networks (<stack>_<name>) bundles may join as External"
    )
    allow_published_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [80, 443], description="PublishedPorts below 1024 that bundles may publish"
    )

    @field_validator("listen", "webhook_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen(value)
        return value

    @field_validator("listen")
    @classmethod
    def _loopback_unless_public(cls, value: str, info: ValidationInfo) -> str:
        host, _ = split_listen(value)
        if not info.data.get("listen_public") and not is_loopback(host):
            raise ValueError(
                f"{value!r} is not a loopback address, so anyone on the network could read /status and /metrics "
                "and reach the agent; keep 127.0.0.1:PORT (a reverse proxy can publish it), or set "
                "listen_public: true (and allowed_hosts) if you mean it"
            )
        return value

    @field_validator("control_group")
    @classmethod
    def _group_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", value):
            raise ValueError(f"{value!r} is not a group name")
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
    def own_ports(self) -> tuple[int, ...]:
        """TCP ports dabctl itself listens on: never published for a bundle."""
        return tuple(sorted({_port_of(a) for a in (self.listen, self.webhook_listen) if a and _port_of(a)}))

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def config_file(self) -> str | None:
        """The file this config was read from, if any (agent.config.load_config notes it; not a setting, not
        compared: a config read from a file equals the same settings given otherwise)."""
        value = self.__dict__.get("_read_from")
        return value if isinstance(value, str) else None


def _port_of(address: str) -> int:
    """The port of `host:port` (`[::1]:9420` too); 0 when there is none."""
    port = address.rsplit(":", 1)[-1]
    return int(port) if ":" in address and port.isdigit() else 0


def split_listen(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) as (host, port); an empty host is 127.0.0.1. ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (for example 127.0.0.1:9420)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) means this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_endpoint(endpoint: str) -> bool:
    """`localhost:2379`, `127.0.0.1:2379`, `[::1]:2379`, `::1` -> True; any other name or address -> False."""
    name = endpoint.strip()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return is_loopback(name)


class ClusterMembership(BaseModel):
    """`<state_dir>/cluster.json` (0600), written by `cluster init` or `cluster join`: this node belongs to a
    cluster, and how it reaches the cluster's state log. Its presence makes the agent a cluster node."""

    model_config = ConfigDict(extra="forbid", strict=True, title="cluster membership")

    cluster_id: str
    node_id: str
    state: Annotated[str, Field(pattern=r"^etcd://[^/\s]+(,[^/\s]+)*$")]
    etcd_prefix: str = "/dabctl"
    etcd_user: str | None = None  # issued at join: may write only /node/<node_id>/ (managers: the whole prefix)
    etcd_password: str | None = Field(None, repr=False)
    managers: list[str] = []  # host:port of managers' cluster listeners, as last known
    advertise_address: str | None = None  # as given to init/join; the config's advertise_address overrides it
    # The cluster's etcd is the one dabctl runs (`cluster init` without --etcd): TLS on its ports, every node's
    # client certificate its node certificate from the cluster CA (<state_dir>/pki/).
    etcd_tls: bool = False
