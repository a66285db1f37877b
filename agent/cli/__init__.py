"""The `dabctl` command line, one module per theme: files.py (validate, schema, bundle), changes.py (plan,
reconcile, rollback, suspend, resume), views.py (ps, history, status, logs), serve.py (agent),
cluster.py (node ls, inspect, update, rm); options.py holds
what they share and render.py the plan and result views.

Exit codes everywhere: 0 success, 1 any error (usage errors included), 2 only from `plan --detailed-exitcode`
when changes are pending.
"""

from __future__ import annotations

import sys

import click

from agent.cli import changes, cluster, files, join, serve, views
from bundles import InvalidBundles
from schemas.errors import DabctlError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dabctl")
def cli() -> None:
    """dabctl: converge Docker hosts to Distributed Application Bundles kept in git.

    Each bundle file (.dab, .json, .yaml) is one stack named after the file. `plan` shows what would
    change, `reconcile --once` applies it, `ps` lists what runs.
    """


for command in (
    files.validate,
    files.schema,
    files.bundle,
    changes.plan,
    changes.reconcile,
    views.ps,
    views.history,
    views.status,
    views.logs,
    changes.rollback,
    changes.suspend,
    changes.resume,
    serve.agent,
    join.cluster,
    cluster.node,
):
    cli.add_command(command)


def main() -> None:
    """Entry point: run the CLI and map every outcome to an exit code (0, 1, or 2 from plan)."""
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except InvalidBundles as exc:
        for e in exc.errors:
            click.echo(str(e), err=True)
        click.echo("error: invalid bundles; nothing was changed", err=True)
        sys.exit(1)
    except DabctlError as exc:  # retryable or terminal, a command that failed exits 1 with one line
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
