"""The bundle model: Docker's DAB 0.1 fields with Docker's meaning, plus dabctl's extensions (README.md: Bundle format).

Files use Docker's PascalCase names; Python code uses the snake_case attributes. Every model is strict
(no type coercion) and closed (an unknown field is an error), and immutable once loaded.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_pascal

from schemas.constraints import valid_constraint
from schemas.durations import Duration
from schemas.quoting import env_name, quoted

STACK_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
OBJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
VOLUME_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # Docker's rule for volume names
RESERVED_LABEL_PREFIXES = ("dabctl.", "com.docker.stack.")

StackName = Annotated[str, StringConstraints(pattern=STACK_NAME_PATTERN)]
ObjectName = Annotated[str, StringConstraints(pattern=OBJECT_NAME_PATTERN)]
VolumeName = Annotated[str, StringConstraints(pattern=VOLUME_NAME_PATTERN)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]

_MEMORY = re.compile(r"^(\d+)([bkmg]?)b?$", re.IGNORECASE)
_MEMORY_FACTOR = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MAX_CPUS = 4096
MAX_MEMORY = 1024**4  # 1 TiB
_CPUS = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")


class Model(BaseModel):
    """Base of every file model: PascalCase in files, strict, closed, immutable."""

    model_config = ConfigDict(
        alias_generator=to_pascal,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )


def memory_bytes(text: str) -> int:
    """Bytes in a memory size such as "512M", "1g" or "1048576"."""
    m = _MEMORY.fullmatch(text.strip())
    if not m:
        raise ValueError(
            f'invalid memory size {quoted(text)}: use a number with an optional unit b, k, m, g, e.g. "512M"'
        )
    size = int(m.group(1)) * _MEMORY_FACTOR[m.group(2).lower()]
    if size > MAX_MEMORY:
        raise ValueError(f"memory size {quoted(text)} is more than any host has: use at most 1024G")
    return size


def nano_cpus(text: str) -> int:
    """Docker's NanoCpus for a CPU count such as "0.5"."""
    if not _CPUS.fullmatch(text.strip()):
        raise ValueError(f'invalid CPU count {quoted(text)}: use a decimal number of CPUs, e.g. "0.5"')
    cpus = float(text)
    if not cpus <= MAX_CPUS:
        raise ValueError(f"CPU count {quoted(text)} is more than any host has: use at most {MAX_CPUS}")
    return round(cpus * 1e9)


def _user_labels(labels: dict[str, str]) -> dict[str, str]:
    """`labels` unchanged, or ValueError for an empty key or one under a prefix dabctl and Docker use."""
    for key in labels:
        if not key:
            raise ValueError("a label needs a non-empty key")
        if key.startswith(RESERVED_LABEL_PREFIXES):
            raise ValueError(f"label {quoted(key)} is reserved for dabctl and Docker; choose another key")
    return labels


UserLabels = Annotated[dict[str, str], AfterValidator(_user_labels)]


class Port(Model):
    """A port the service listens on; PublishedPort fixes the port published on every node."""

    protocol: Literal["tcp", "udp"] = "tcp"
    port: PortNumber
    published_port: PortNumber | None = None


class ResourceSpec(Model):
    """CPU and memory, written as strings: Cpus "0.5", Memory "512M"."""

    cpus: str | None = None
    memory: str | None = None

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: str | None) -> str | None:
        if v is not None and nano_cpus(v) <= 0:
            raise ValueError("Cpus must be greater than 0")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and memory_bytes(v) < 6 * 1024 * 1024:
            raise ValueError("Memory must be at least 6M (Docker's minimum)")
        return v


class Resources(Model):
    """Limits cap a replica; Reservations are what the scheduler sets aside for it."""

    limits: ResourceSpec | None = None
    reservations: ResourceSpec | None = None


class UpdateConfig(Model):
    """How replicas are replaced when the spec changes (Swarm's defaults)."""

    parallelism: Annotated[int, Field(ge=0)] = 1
    delay: Duration = timedelta(0)
    failure_action: Literal["pause", "continue", "rollback"] = "pause"
    monitor: Duration = timedelta(seconds=5)
    max_failure_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    order: Literal["stop-first", "start-first"] = "stop-first"


class RollbackConfig(UpdateConfig):
    """How replicas are replaced when an update rolls back; a rollback never rolls back."""

    failure_action: Literal["pause", "continue"] = "pause"


class RestartPolicy(Model):
    """When an exited replica is started again; enforced by the agent, not by Docker."""

    condition: Literal["none", "on-failure", "any"] = "any"
    delay: Duration = timedelta(seconds=5)
    max_attempts: Annotated[int, Field(ge=0)] | None = None
    window: Duration | None = None


class Placement(Model):
    """Where replicas may run: on nodes satisfying every constraint (node.id, node.hostname, node.role or
    node.labels.KEY, then == or != and a value), at most MaxReplicasPerNode per node (0 or unset: no limit)."""

    constraints: list[Annotated[str, AfterValidator(valid_constraint)]] = []
    max_replicas_per_node: Annotated[int, Field(ge=0)] | None = None


class Deploy(Model):
    """Replication mode and rollout settings; only the scheduler reads Replicas."""

    mode: Literal["replicated", "global"] = "replicated"
    replicas: Annotated[int, Field(ge=0, le=10_000)] | None = None
    update_config: UpdateConfig = UpdateConfig()
    rollback_config: RollbackConfig = RollbackConfig()
    restart_policy: RestartPolicy = RestartPolicy()
    placement: Placement = Placement()
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _replicas_only_when_replicated(self) -> Deploy:
        if self.mode == "global" and self.replicas is not None:
            raise ValueError("Replicas applies to replicated services only; remove it or set Mode: replicated")
        return self

    @property
    def replica_count(self) -> int:
        """Replicas with Swarm's default of 1."""
        return 1 if self.replicas is None else self.replicas


class Healthcheck(Model):
    """Docker's HEALTHCHECK: Test is ["CMD", ...], ["CMD-SHELL", "..."] or ["NONE"]."""

    test: Annotated[list[str], Field(min_length=1)]
    interval: Duration | None = None
    timeout: Duration | None = None
    retries: Annotated[int, Field(ge=0)] | None = None
    start_period: Duration | None = None

    @field_validator("test")
    @classmethod
    def _test_form(cls, v: list[str]) -> list[str]:
        if v[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise ValueError(f'Test must start with "CMD", "CMD-SHELL" or "NONE", not {quoted(v[0])}')
        if v[0] == "NONE" and len(v) > 1:
            raise ValueError('Test ["NONE"] takes no arguments')
        if v[0] != "NONE" and len(v) < 2:
            raise ValueError(f"Test [{quoted(v[0])}] needs a command after it")
        return v


class Mount(Model):
    """A volume, bind or tmpfs mount. A named volume is the stack's (`<stack>_<Source>` on the engine) unless the
    top-level Volumes declares it External; Docker creates named volumes itself and dabctl never removes them."""

    type: Literal["volume", "bind", "tmpfs"]
    source: str | None = None
    target: str
    read_only: bool = False

    @field_validator("target")
    @classmethod
    def _absolute_target(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f'Target must be an absolute path inside the container, e.g. "/data", not {quoted(v)}')
        return v

    @model_validator(mode="after")
    def _source_fits_type(self) -> Mount:
        if self.type == "bind" and not (self.source and self.source.startswith("/")):
            raise ValueError("a bind mount needs Source: an absolute path on the host")
        if self.type == "tmpfs" and self.source is not None:
            raise ValueError("a tmpfs mount takes no Source; remove it")
        if self.type == "volume" and self.source is not None and not re.fullmatch(VOLUME_NAME_PATTERN, self.source):
            raise ValueError(f"invalid volume name {quoted(self.source)}: use letters, digits, '_', '.', '-'")
        return self


class Service(Model):
    """One service of a stack: DAB 0.1's fields (Command replaces ENTRYPOINT, Args replaces CMD) plus extensions."""

    image: Annotated[str, StringConstraints(min_length=1, pattern=r"^\S+$")]
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[str] | None = None
    labels: UserLabels | None = None
    ports: list[Port] | None = None
    working_dir: str | None = None
    user: str | None = None
    networks: list[ObjectName] | None = None
    deploy: Deploy = Deploy()
    healthcheck: Healthcheck | None = None
    mounts: list[Mount] | None = None
    stop_grace_period: Duration = timedelta(seconds=10)
    stop_signal: Annotated[str, StringConstraints(pattern=r"^(SIG[A-Z0-9]+|[A-Z0-9]+|\d+)$")] | None = None
    pull_policy: Literal["if-not-present", "always", "never"] | None = None

    @field_validator("env")
    @classmethod
    def _env_entries(cls, v: list[str] | None) -> list[str] | None:
        for entry in v or []:
            name = entry.split("=", 1)[0]
            if not name or any(c.isspace() for c in name):
                raise ValueError(f'invalid Env entry {env_name(entry)}: write it as "NAME=value"')
        return v

    @model_validator(mode="after")
    def _unique_ports(self) -> Service:
        seen: set[tuple[str, int]] = set()
        published: set[tuple[str, int]] = set()
        for p in self.ports or []:
            if (p.protocol, p.port) in seen:
                raise ValueError(f"port {p.port}/{p.protocol} is listed twice; list each port once")
            seen.add((p.protocol, p.port))
            if p.published_port is not None:
                if (p.protocol, p.published_port) in published:
                    raise ValueError(f"PublishedPort {p.published_port}/{p.protocol} is used twice")
                published.add((p.protocol, p.published_port))
        targets = [m.target for m in self.mounts or []]
        if len(targets) != len(set(targets)):
            raise ValueError("two mounts share a Target; give each mount its own Target")
        return self


class Network(Model):
    """A stack network; External networks must already exist and are never created or removed."""

    driver: str = "bridge"
    internal: bool = False
    labels: UserLabels | None = None
    external: bool = False

    @model_validator(mode="after")
    def _external_is_bare(self) -> Network:
        if self.external and (self.driver != "bridge" or self.internal or self.labels):
            raise ValueError("an External network is not configured by dabctl: remove Driver, Internal and Labels")
        return self


class Volume(Model):
    """A named volume of the stack; an External one exists outside it, keeps its name and is only mounted."""

    external: bool = False


class Bundle(Model):
    """A Distributed Application Bundle: one file, one stack."""

    model_config = ConfigDict(title="dabctl bundle (DAB 0.1 with extensions)")

    version: Literal["0.1"] = "0.1"
    services: Annotated[dict[ObjectName, Service], Field(min_length=1)]
    networks: dict[ObjectName, Network] | None = None
    volumes: dict[VolumeName, Volume] | None = None

    @model_validator(mode="after")
    def _cross_service_ports(self) -> Bundle:
        owner: dict[tuple[str, int], str] = {}
        for name, svc in self.services.items():
            for p in svc.ports or []:
                if p.published_port is None:
                    continue
                key = (p.protocol, p.published_port)
                if key in owner:
                    raise ValueError(
                        f"PublishedPort {p.published_port}/{p.protocol} is used by both {owner[key]!r} and {name!r}"
                    )
                owner[key] = name
        return self
