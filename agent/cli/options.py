"""What every command shares: the --config and engine/source options, loading the config, the console, UserError."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from agent.config import ConfigError, load_config
from schemas.config import AgentConfig
from schemas.durations import parse_duration
from schemas.errors import DabctlError

F = TypeVar("F", bound=Callable[..., Any])


class UserError(DabctlError):
    """An error the user can fix; printed as one line, exit 1."""


def console() -> Console:
    # Off a terminal (pipes, CI logs) nothing is truncated to a guessed width.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 400)


def config_option(f: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Agent config YAML (also DABCTL_CONFIG); flags > DABCTL_* env > file > defaults.",
    )(f)


def engine_options(f: F) -> F:
    """--config and the settings every engine command shares."""
    for opt in reversed(
        [
            click.option("--state-dir", default=None, help="Embedded state directory [default: /var/lib/dabctl]."),
            click.option("--state", default=None, help="State log: embedded, or etcd://host:2379[,host:2379]."),
            click.option("--node-name", default=None, help="This node's name [default: the host name]."),
            click.option("--docker-host", default=None, help="Docker endpoint [default: DOCKER_HOST or the socket]."),
            click.option("--docker-config", default=None, help="Directory with a Docker config.json (credentials)."),
            click.option(
                "--pull-policy",
                type=click.Choice(["if-not-present", "always", "never"]),
                default=None,
                help="Pull policy of services that set none [default: if-not-present].",
            ),
        ]
    ):
        f = opt(f)
    return config_option(f)


def source_options(f: F) -> F:
    for opt in reversed(
        [
            click.option("--source", default=None, help="Directory of bundle files, or a git URL / repository path."),
            click.option("--ref", default=None, help="Git branch, tag or commit SHA (a git source; default main)."),
            click.option("--path", default=None, help="Subdirectory of the repository holding the bundles."),
        ]
    ):
        f = opt(f)
    return f


def load(config_path: Path | None = None, **flags: Any) -> AgentConfig:
    """The config file merged with DABCTL_* env and the flags given (flags that are not config fields ignored)."""
    known = AgentConfig.model_fields
    try:
        return load_config(config_path, {k: v for k, v in flags.items() if k in known})
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def seconds(option: str, value: str) -> float:
    """A Go-style duration flag (`90s`, `5m`) in seconds, or a UserError naming the flag."""
    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None
