"""`dabctl agent`: run the node's control loop until stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent.cli.options import UserError, engine_options, load, source_options


@click.command()
@source_options
@engine_options
@click.option(
    "--listen", default=None, help="Agent HTTP address, loopback unless listen_public [default: 127.0.0.1:9420]."
)
@click.option("--poll-interval", type=float, default=None, help="Seconds between git polls [default: 60; 0 off].")
@click.option("--resync-interval", type=float, default=None, help="Seconds between full resyncs [default: 300; 0 off].")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None, help="Log format.")
@click.option("--allow-empty", is_flag=True, default=None, help="Let an empty source remove every deployed stack.")
def agent(config_path: Path | None, **opts: Any) -> int:
    """Run continuously: follow the source (git polls, webhook, directory changes), Docker events and a
    periodic resync, and keep this node converged. Serves /healthz /readyz /metrics /status /webhook on --listen,
    and the CLI's changing commands on the root-only socket <state_dir>/agent.sock.

    SIGTERM finishes the actions in flight, records them and exits; workloads keep running.
    """
    from agent.logs import setup_logging
    from agent.node.loop import run_agent

    cfg = load(config_path, **opts)
    if not cfg.source:
        raise UserError("no source: pass --source DIR or a git URL (or set source in the config file)")
    setup_logging(cfg.log_format)
    return run_agent(cfg)
