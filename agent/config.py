"""Load the agent configuration: defaults < YAML file < DABCTL_* environment < command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.config import AgentConfig

ENV_PREFIX = "DABCTL_"


class ConfigError(Exception):
    """The configuration is invalid; the message names the file or variable, the field and the fix."""


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = AgentConfig.model_fields
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == "DABCTL_CONFIG":
            continue
        path = key.removeprefix(ENV_PREFIX).lower().split("__")
        if path[0] not in fields:
            raise ConfigError(
                f"environment variable {key}: no such setting; valid: "
                + ", ".join(ENV_PREFIX + f.upper() for f in fields)
            )
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return out


def load_config(path: Path | None, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AgentConfig:
    """The effective configuration; raise ConfigError with one clear line when it is invalid."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    where = "configuration"
    if path is None and environ.get("DABCTL_CONFIG"):
        path = Path(environ["DABCTL_CONFIG"])
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}".splitlines()[0]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data.update(loaded or {})
    data.update(_from_env(environ))
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        fix = "remove it" if err["type"] == "extra_forbidden" else "see `dabctl schema config`"
        raise ConfigError(f"{where}: {field}: {msg}; {fix}") from None
