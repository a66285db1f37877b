"""Load the agent configuration: defaults < YAML file < DABCTL_* environment < command-line flags."""

from __future__ import annotations

import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from bundles.documents import decode, field_path, read_file, read_yaml
from bundles.errors import InvalidBundles
from bundles.policy import ENGINE, BindAllow, Denied, Policy, normalise
from schemas.annotations import field_types
from schemas.config import AgentConfig
from schemas.errors import DabctlError
from schemas.quoting import printable

ENV_PREFIX = "DABCTL_"
# Settings that existed once and are refused now, with what replaces them (one line each).
REMOVED: dict[str, str] = {
    "cluster_insecure": "removed: cluster nodes talk only mutual TLS with certificates from the cluster CA; make "
    "the cluster with `dabctl cluster init` and add nodes with `dabctl cluster join`, then delete this setting",
}
MAX_CONFIG_BYTES = 1024 * 1024
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(DabctlError):
    """The configuration is invalid; the message names the file or variable, the field and the fix."""


def _json_array(key: str, raw: str) -> list[Any]:
    if not raw.strip():
        return []
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {key}: not a JSON array ({exc})") from None
    if not isinstance(value, list):
        raise ConfigError(f"environment variable {key}: not a JSON array of objects")
    return value


def _env_value(name: str, key: str, raw: str, model: type[BaseModel] = AgentConfig) -> Any:
    """Convert an environment string to the field's type; text fields stay text (`DABCTL_NODE_NAME=0042`); a
    section (`verify`) takes a JSON object, a list of sections (`notify`) a JSON array."""
    kinds = _kinds(model.model_fields[name].annotation)
    if any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds):
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"environment variable {key}: not a JSON object ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"environment variable {key}: not a JSON object")
        return value
    item_types = typing.get_args(model.model_fields[name].annotation)
    if (
        item_types and isinstance(item_types[0], type) and issubclass(item_types[0], BaseModel)
    ):  # notify: a JSON array of objects
        return _json_array(key, raw)
    if bool in kinds:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"environment variable {key}: {raw!r} is not true or false")
    if list in kinds:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not _list_of_ints(model.model_fields[name].annotation):
            return items
        try:
            return [int(item) for item in items]
        except ValueError:
            raise ConfigError(
                f"environment variable {key}: {raw!r} is not a list of whole numbers, e.g. 80,443"
            ) from None
    if int in kinds:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {key}: {raw!r} is not a whole number") from None
    if float in kinds:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"environment variable {key}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"environment variable {key}: {raw!r} is not a finite number")
        return value
    return raw


def _list_of_ints(annotation: Any) -> bool:
    """Whether a list setting holds whole numbers (allow_published_ports)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    item = typing.get_args(args[0])[0] if args and typing.get_origin(args[0]) is list else (args[0] if args else None)
    return item is int or (typing.get_origin(item) is typing.Annotated and typing.get_args(item)[0] is int)


def _kinds(annotation: Any) -> set[Any]:
    """The plain types a field accepts, list[str] as list."""
    return {typing.get_origin(t) or t for t in field_types(annotation)}


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {}
    fields = AgentConfig.model_fields
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == "DABCTL_CONFIG":
            continue
        name, _, inner = key.removeprefix(ENV_PREFIX).lower().partition("__")
        if name in REMOVED:
            raise ConfigError(f"environment variable {key}: {REMOVED[name]}")
        if name not in fields:
            valid = ", ".join(ENV_PREFIX + f.upper() for f in fields)
            raise ConfigError(f"environment variable {key}: no such setting; valid: {valid}")
        if not inner:
            out[name] = (f"environment variable {key}", _env_value(name, key, raw))
            continue
        section = next((k for k in _kinds(fields[name].annotation) if isinstance(k, type)), None)
        if section is None or not issubclass(section, BaseModel) or inner not in section.model_fields:
            raise ConfigError(f"environment variable {key}: no such setting")
        where, value = out.get(name, (f"environment variable {key}", {}))
        out[name] = (where, {**value, inner: _env_value(inner, key, raw, section)})
    return out


def load_config(path: Path | None, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The effective configuration; raise ConfigError with one line naming where a bad value came from."""
    environ = os.environ if environ is None else environ
    layers: dict[str, tuple[str, Any]] = {}
    if path is None and environ.get("DABCTL_CONFIG"):
        path = Path(environ["DABCTL_CONFIG"])
    if path is not None:
        loaded = _read_config_file(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(printable(f"{path}: expected a mapping of settings at the top level"))
        for name in REMOVED.keys() & (loaded or {}).keys():
            raise ConfigError(printable(f"{path}: {name}: {REMOVED[name]}"))
        layers.update({str(k): (str(path), v) for k, v in (loaded or {}).items()})
    for name, (where, value) in _from_env(environ).items():
        below = layers.get(name, (where, None))[1]
        if isinstance(value, dict) and isinstance(below, dict):  # DABCTL_VERIFY__MODE over the file's verify:
            value = {**below, **value}
        layers[name] = (where, value)
    layers.update({k: (f"--{k.replace('_', '-')}", v) for k, v in flags.items() if v is not None})
    try:
        cfg = AgentConfig.model_validate({k: v for k, (_, v) in layers.items()})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = field_path(err["loc"])
        where = layers.get(str(err["loc"][0]), ("configuration", None))[0] if err["loc"] else "configuration"
        msg = str(err["msg"]).removeprefix("Value error, ")
        fix = "remove it" if err["type"] == "extra_forbidden" else "see `dabctl schema config`"
        raise ConfigError(printable(f"{where}: {field}: {msg}; {fix}")) from None
    if path is not None:
        cfg.__dict__["_read_from"] = str(path)  # see AgentConfig.config_file
    return cfg


def _read_config_file(path: Path) -> Any:
    """The YAML document in the config file, read as strictly and within the same limits as a bundle."""
    try:
        raw = read_file(
            path, str(path), MAX_CONFIG_BYTES, fix="a config file holds a few settings", what="the config file"
        )
        text = decode(raw, str(path))
        return read_yaml(text, str(path), allow_empty=True)
    except InvalidBundles as exc:
        raise ConfigError(str(exc.errors[0])) from None


# The settings that make up a bundle policy (policy_of): a config that sets none of them has no policy of its own.
POLICY_SETTINGS = frozenset(
    {
        "allow_bind_mounts",
        "allow_host_network",
        "max_replicas_per_service",
        "max_services_per_stack",
        "max_stacks",
        "max_containers_per_node",
        "allow_external_volumes",
        "allow_external_networks",
        "allow_published_ports",
    }
)


def policy_configured(cfg: AgentConfig) -> bool:
    """Whether `cfg` sets any policy setting: a cluster worker whose config sets none admits under the cluster's
    policy alone; one that sets some admits under both (its own may only narrow the cluster's)."""
    return bool(cfg.model_fields_set & POLICY_SETTINGS)


def policy_of(cfg: AgentConfig) -> Policy:
    """What bundles may ask of this host under `cfg`: its exceptions and caps, with the Docker socket it drives and
    dabctl's own state and config directories added to the deny set."""
    protected = [
        Denied(normalise(cfg.state_dir), "no-dabctl-state", "dabctl's state"),
    ]
    if cfg.config_file:
        config_dir = os.path.dirname(os.path.abspath(cfg.config_file))
        protected.append(Denied(normalise(config_dir), "no-dabctl-state", "dabctl's configuration"))
    docker_host = cfg.docker_host or os.environ.get("DOCKER_HOST") or ""
    if docker_host.startswith("unix://"):
        protected.append(Denied(normalise(docker_host.removeprefix("unix://")), "no-docker-socket", ENGINE))
    return Policy(
        tuple(e if isinstance(e, str) else BindAllow(e.path, e.read_only) for e in cfg.allow_bind_mounts),
        cfg.allow_host_network,
        protected=tuple(protected),
        max_replicas_per_service=cfg.max_replicas_per_service,
        max_services_per_stack=cfg.max_services_per_stack,
        max_stacks=cfg.max_stacks,
        max_containers_per_node=cfg.max_containers_per_node,
        allow_external_volumes=tuple(cfg.allow_external_volumes),
        allow_external_networks=tuple(cfg.allow_external_networks),
        allow_published_ports=tuple(cfg.allow_published_ports),
        own_ports=cfg.own_ports,
    )
