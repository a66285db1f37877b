"""Commands that plan or change what runs: `plan`, `reconcile --once`, `rollback`, `suspend`, `resume`.

Each changing command is parse -> one call on the node's Control (this process, or the agent holding the state,
with the same meaning) -> render.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from agent.cli.options import console, engine_options, load, seconds, source_options
from agent.cli.render import plan_output, render_plan, result_line
from agent.node.control import load_desired, open_changing, open_engine
from agent.node.engine import AnyResult, PassPlan
from agent.sources.source import source_ref
from reconcilers.outcome import Outcome
from schemas.control import ReconcileRequest, ReconcileResult, RollbackRequest, SuspendRequest

MIGRATE_HELP = (
    "Move STACK (deployed before volumes were stack-scoped) to <stack>_<name> volumes: its replicas stop, each "
    "volume is copied to its new name (the old one is kept), replicas start on the new ones. Repeatable."
)


@click.command()
@source_options
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 2 when changes are pending, 0 when none.")
@click.option("--allow-empty", is_flag=True, default=None, help="Plan the removal of every stack for an empty source.")
@click.option("--migrate-volumes", "migrate", multiple=True, metavar="STACK", help=MIGRATE_HELP)
def plan(config_path: Path | None, fmt: str, detailed_exitcode: bool, migrate: tuple[str, ...], **opts: Any) -> int:
    """Show what `reconcile --once` would change, grouped by stack and service.

    `+` create, `~` replace or start (with the fields that changed), `-` remove, `!` cannot converge.
    """
    cfg = load(config_path, **opts)
    desired = load_desired(cfg)
    with open_engine(cfg, read_only=True) as engine:
        p = engine.plan(desired, cfg.allow_empty, migrate_volumes=migrate)
    if fmt == "json":
        click.echo(plan_output(p).model_dump_json(indent=2))
    else:
        render_plan(p, console())
    if p.errors:
        return 1
    return 2 if detailed_exitcode and p.changes else 0


@click.command()
@click.option("--once", is_flag=True, required=True, help="Run one pass and exit (`dabctl agent` runs continuously).")
@source_options
@engine_options
@click.option("--dry-run", is_flag=True, help="Plan only: print the plan, change nothing.")
@click.option("--allow-empty", is_flag=True, default=None, help="Let an empty source remove every deployed stack.")
@click.option("--parallelism", type=int, default=None, help="Engine calls in flight at once [default: 8].")
@click.option("--wait", is_flag=True, help="Also wait until every service runs all its replicas, healthy.")
@click.option("--timeout", default="5m", show_default=True, help="Longest a rolling update or --wait may take.")
@click.option("--migrate-volumes", "migrate", multiple=True, metavar="STACK", help=MIGRATE_HELP)
def reconcile(once: bool, config_path: Path | None, dry_run: bool, wait: bool, timeout: str, **opts: Any) -> int:
    """Converge this node to the source; exit 1 if anything failed.

    A source is a directory of bundle files, or a git repository (a URL, or a path with --ref/--path).
    Rolling updates run to the end (health-gated, per UpdateConfig) or until one pauses. With --wait the
    command returns only when every service runs its replicas healthy, and exits 1 naming the services that
    do not within --timeout. While `dabctl agent` runs on this state directory (any state backend), the passes
    run in the agent with the same meaning of --wait, --timeout and --allow-empty; a --source other than the
    agent's is refused. On a cluster node: a manager asks the leader to fetch and converge (with --wait, until
    every node's slots run the new spec); a worker refuses, naming the managers.
    """
    limit = seconds("--timeout", timeout)
    migrate: tuple[str, ...] = opts.pop("migrate")
    cfg = load(config_path, **opts)
    out = console()
    if dry_run:
        desired = load_desired(cfg)
        with open_engine(cfg, read_only=True) as engine:
            p = engine.plan(desired, cfg.allow_empty, migrate_volumes=migrate)
        render_plan(p, out)
        return 1 if p.errors else 0
    request = ReconcileRequest(
        source=source_ref(cfg),
        wait=wait,
        timeout=limit,
        allow_empty=opts.get("allow_empty"),
        migrate_volumes=list(migrate),
    )
    result = open_changing(cfg, _progress(out)).reconcile(request)
    return _report(result, out)


@click.command()
@click.argument("stack")
@source_options
@engine_options
@click.option(
    "--to", "to", default=None, help="Revision to restore (as `dabctl history` shows it; a digest prefix works)."
)
@click.option("--unpin", is_flag=True, help="Lift the pin: follow the source again.")
@click.option("--timeout", default="5m", show_default=True, help="Longest the rollback's rolling update may take.")
def rollback(stack: str, config_path: Path | None, to: str | None, unpin: bool, timeout: str, **opts: Any) -> int:
    """Re-apply a recorded revision of STACK (default: the one before the current) from the stored bundle and
    image IDs, and pin the stack there until a commit changes its bundle or `rollback --unpin`.

    Works after the git history that held the revision is gone. Runs through the agent when one runs.
    """
    limit = seconds("--timeout", timeout)
    cfg = load(config_path, **opts)
    out = console()
    control = open_changing(cfg, _progress(out))
    result = control.rollback(RollbackRequest(stack=stack, to=to, unpin=unpin, timeout=limit))
    out.print(result.message, markup=False)
    return _report(result.passes, out)


@click.command()
@click.argument("stack")
@engine_options
def suspend(stack: str, config_path: Path | None, **opts: Any) -> None:
    """Leave STACK exactly as it is: no pass changes it until `dabctl resume STACK`."""
    _suspension(stack, True, load(config_path, **opts))


@click.command()
@click.argument("stack")
@engine_options
def resume(stack: str, config_path: Path | None, **opts: Any) -> None:
    """Let passes converge STACK again (at once, when an agent runs)."""
    _suspension(stack, False, load(config_path, **opts))


def _suspension(stack: str, suspended: bool, cfg: Any) -> None:
    result = open_changing(cfg).suspend(SuspendRequest(stack=stack, suspended=suspended))
    verb = "suspended" if suspended else "resumed"
    click.echo(f"{stack}: {verb}" if result.changed else f"{stack}: already {verb}")


def _report(result: ReconcileResult, out: Console) -> int:
    """Errors and notes on stderr, the summary on stdout; the exit code."""
    if result.by_agent:
        click.echo(f"an agent holds this state: the passes ran in it ({result.by_agent})", err=True)
    for line in result.errors:
        click.echo(f"error: {line}", err=True)
    for line in result.notes:
        click.echo(f"note: {line}", err=True)
    who = "by the agent, " if result.by_agent else ""
    out.print(
        f"reconciled {who}{result.stacks} stack(s): {result.created} created, {result.updated} updated, "
        f"{result.removed} removed, {result.failed} failed" + ("" if result.changed else " (nothing to do)")
    )
    return 0 if result.ok else 1


def _progress(out: Console) -> Callable[[PassPlan], Any]:
    """A bar on a terminal; elsewhere one line per finished action."""

    @contextmanager
    def show(plan: PassPlan) -> Iterator[Callable[[AnyResult], None]]:
        if not (out.is_terminal and plan.changes):
            yield lambda r: out.print(result_line(r))
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("converging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=out
        ) as progress:
            task = progress.add_task("apply", total=plan.changes)

            def tick(result: AnyResult) -> None:
                progress.advance(task)
                if result.outcome is Outcome.FAILED:
                    progress.console.print(result_line(result))

            yield tick

    return show
