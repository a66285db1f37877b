"""Load the agent configuration: defaults < YAML file < DABCTL_* environment < command-line flags."""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bundles.documents import decode, field_path, read_file, read_yaml
from bundles.errors import InvalidBundles
from schemas.annotations import field_types
from schemas.config import AgentConfig
from schemas.errors import DabctlError
from schemas.quoting import printable

ENV_PREFIX = "DABCTL_"
MAX_CONFIG_BYTES = 1024 * 1024
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(DabctlError):
    """The configuration is invalid; the message names the file or variable, the field and the fix."""


def _env_value(name: str, key: str, raw: str) -> Any:
    """Convert an environment string to the field's type; text fields stay text (`DABCTL_NODE_NAME=0042`)."""
    kinds = _kinds(AgentConfig.model_fields[name].annotation)
    if bool in kinds:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"environment variable {key}: {raw!r} is not true or false")
    if list in kinds:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not _list_of_ints(AgentConfig.model_fields[name].annotation):
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
        name = key.removeprefix(ENV_PREFIX).lower()
        if name not in fields:
            valid = ", ".join(ENV_PREFIX + f.upper() for f in fields)
            raise ConfigError(f"environment variable {key}: no such setting; valid: {valid}")
        out[name] = (f"environment variable {key}", _env_value(name, key, raw))
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
        layers.update({str(k): (str(path), v) for k, v in (loaded or {}).items()})
    layers.update(_from_env(environ))
    layers.update({k: (f"--{k.replace('_', '-')}", v) for k, v in flags.items() if v is not None})
    try:
        return AgentConfig.model_validate({k: v for k, (_, v) in layers.items()})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = field_path(err["loc"])
        where = layers.get(str(err["loc"][0]), ("configuration", None))[0] if err["loc"] else "configuration"
        msg = str(err["msg"]).removeprefix("Value error, ")
        fix = "remove it" if err["type"] == "extra_forbidden" else "see `dabctl schema config`"
        raise ConfigError(printable(f"{where}: {field}: {msg}; {fix}")) from None


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
