"""The `dabctl` command line. Exit codes everywhere: 0 success, 1 any error (usage errors included),
2 only from `plan --detailed-exitcode` when changes are pending."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from agent.api.client import AgentUnreachable, call, get_status, running_agent
from agent.cli.render import plan_output, render_plan, result_line, short_revision
from agent.config import ConfigError, load_config
from agent.drivers.docker_engine import DockerEngine, EngineError
from agent.node.engine import AnyResult, EmptySourceRefused, Engine, PassPlan
from agent.node.rollback import RollbackError, pin_stack, unpin_stack
from agent.node.status import stack_statuses
from agent.sources.source import SourceConfigError, open_source
from agent.state.backends import open_log
from agent.state.log import StateLocked, StateLogError
from agent.state.records import Records
from bundles import DesiredState, InvalidBundles, load_paths
from bundles.errors import SourceError
from bundles.policy import Policy, enforce
from reconcilers.outcome import Outcome
from reconcilers.services import slot_order
from schemas.bundle import Bundle
from schemas.config import AgentConfig
from schemas.durations import parse_duration
from schemas.output import ReplicaRow, StatusOutput

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An error the user can fix; printed as one line, exit 1."""


def _out() -> Console:
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


def _config(config_path: Path | None = None, **flags: Any) -> AgentConfig:
    known = AgentConfig.model_fields
    try:
        return load_config(config_path, {k: v for k, v in flags.items() if k in known})
    except ConfigError as exc:
        raise UserError(str(exc)) from None


@contextmanager
def _records(cfg: AgentConfig, writer: bool) -> Iterator[Records]:
    log = open_log(cfg, writer=writer)
    try:
        yield Records(log, cfg.history_limit, cfg.audit_limit)
    finally:
        log.close()


@contextmanager
def _engine(cfg: AgentConfig, read_only: bool = False) -> Iterator[Engine]:
    docker = DockerEngine(cfg.docker_host, docker_config=cfg.docker_config, connections=cfg.parallelism + 2)
    try:
        docker.ping()
        with _records(cfg, writer=not read_only) as records:
            node = cfg.node_name or socket.gethostname()
            yield Engine(
                docker,
                records,
                node,
                cfg.parallelism,
                read_only,
                pull_policy=cfg.pull_policy,
                balancer=cfg.loadbalancer,
                port_range=cfg.port_range,
            )
    finally:
        docker.close()


def _desired(cfg: AgentConfig) -> DesiredState:
    source = open_source(cfg)
    try:
        return source.load()
    finally:
        source.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dabctl")
def cli() -> None:
    """dabctl: converge Docker hosts to Distributed Application Bundles kept in git.

    Each bundle file (.dab, .json, .yaml) is one stack named after the file. `plan` shows what would
    change, `reconcile --once` applies it, `ps` lists what runs.
    """


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Agent config YAML.")
def validate(paths: tuple[Path, ...], config_path: Path | None) -> None:
    """Check bundle files or directories; print every problem, one line each.

    Exit 0 when all are valid, 1 otherwise. Nothing is contacted or changed.
    """
    cfg = _config(config_path)
    try:
        state = enforce(load_paths(list(paths)), Policy(tuple(cfg.allow_bind_mounts), cfg.allow_host_network))
    except InvalidBundles as exc:
        for e in exc.errors:
            click.echo(str(e), err=True)
        raise UserError(f"{len(exc.errors)} problem(s) found") from None
    for name, stack in sorted(state.stacks.items()):
        services = len(stack.bundle.services)
        click.echo(f"ok  {stack.file}: stack {name}, {services} service(s)")


@cli.command()
@click.argument("kind", type=click.Choice(["bundle", "config"]), default="bundle")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Agent config YAML.")
def schema(kind: str, config_path: Path | None) -> None:
    """Print the JSON Schema of a bundle file (default) or of the agent config."""
    model = Bundle if kind == "bundle" else AgentConfig
    click.echo(json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True))


@cli.command()
@click.argument("compose_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bundle here (default: standard output).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Agent config YAML.")
def bundle(compose_file: Path, out: Path | None, config_path: Path | None) -> None:
    """Convert a Compose file to a bundle; report every Compose key it could not carry."""
    from bundles.compose import convert_compose

    _config(config_path)
    try:
        text = compose_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{compose_file}: cannot read: {exc}") from None
    try:
        conv = convert_compose(text, str(compose_file))
    except InvalidBundles as exc:
        for e in exc.errors:
            click.echo(str(e), err=True)
        raise UserError(f"{compose_file}: cannot convert") from None
    for line in conv.dropped:
        click.echo(f"warning: {line}", err=True)
    doc = json.dumps(conv.bundle.model_dump(mode="json", exclude_defaults=True), indent=2) + "\n"
    if out is None:
        click.echo(doc, nl=False)
    else:
        out.write_text(doc, encoding="utf-8")
        click.echo(f"wrote {out} ({len(conv.bundle.services)} services)", err=True)


@cli.command()
@source_options
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 2 when changes are pending, 0 when none.")
@click.option("--allow-empty", is_flag=True, default=None, help="Plan the removal of every stack for an empty source.")
def plan(config_path: Path | None, fmt: str, detailed_exitcode: bool, **opts: Any) -> int:
    """Show what `reconcile --once` would change, grouped by stack and service.

    `+` create, `~` replace or start (with the fields that changed), `-` remove, `!` cannot converge.
    """
    cfg = _config(config_path, **opts)
    desired = _desired(cfg)
    with _engine(cfg, read_only=True) as engine:
        p = engine.plan(desired, cfg.allow_empty)
    if fmt == "json":
        click.echo(plan_output(p).model_dump_json(indent=2))
    else:
        render_plan(p, _out())
    if p.errors:
        return 1
    return 2 if detailed_exitcode and p.changes else 0


@cli.command()
@click.option("--once", is_flag=True, required=True, help="Run one pass and exit (`dabctl agent` runs continuously).")
@source_options
@engine_options
@click.option("--dry-run", is_flag=True, help="Plan only: print the plan, change nothing.")
@click.option("--allow-empty", is_flag=True, default=None, help="Let an empty source remove every deployed stack.")
@click.option("--parallelism", type=int, default=None, help="Engine calls in flight at once [default: 8].")
@click.option("--wait", is_flag=True, help="Also wait until every service runs all its replicas, healthy.")
@click.option("--timeout", default="5m", show_default=True, help="Longest a rolling update or --wait may take.")
def reconcile(once: bool, config_path: Path | None, dry_run: bool, wait: bool, timeout: str, **opts: Any) -> int:
    """Converge this node to the source; exit 1 if anything failed.

    A source is a directory of bundle files, or a git repository (a URL, or a path with --ref/--path).
    Rolling updates run to the end (health-gated, per UpdateConfig) or until one pauses. With --wait the
    command returns only when every service runs its replicas healthy, and exits 1 naming the services that
    do not within --timeout. While `dabctl agent` runs on this state, the pass is run by the agent.
    """
    try:
        limit = parse_duration(timeout).total_seconds()
    except ValueError as exc:
        raise UserError(f"--timeout: {exc}") from None
    cfg = _config(config_path, **opts)
    out = _out()
    api = running_agent(cfg) if not dry_run else None
    if api:
        return _reconcile_through_agent(api, out)
    desired = _desired(cfg)
    try:
        with _engine(cfg, read_only=dry_run) as engine:
            if dry_run:
                p = engine.plan(desired, cfg.allow_empty)
                render_plan(p, out)
                return 1 if p.errors else 0
            return _converge(engine, desired, cfg, out, wait, time.monotonic() + limit)
    except StateLocked:
        api = running_agent(cfg)
        if not api:
            raise
        return _reconcile_through_agent(api, out)


def _converge(
    engine: Engine, desired: DesiredState, cfg: AgentConfig, out: Console, wait: bool, deadline: float
) -> int:
    """Passes until nothing is left to roll (and, with `wait`, every service is healthy) or the deadline."""
    done = dict.fromkeys(Outcome, 0)
    errors: list[str] = []
    notes: list[str] = []
    while True:
        p = engine.plan(desired, cfg.allow_empty)
        report = _apply_with_progress(engine, p, out)
        for o in Outcome:
            done[o] += report.count(o)
        errors = report.errors + [f"{r.action}: {r.error}" for r in report.results if r.outcome is Outcome.FAILED]
        notes = [f"{name}: {n}" for name, sp in p.stacks.items() for n in sp.notes]
        paused = [n for n in notes if "paused" in n or "failed" in n]
        if errors or paused:
            break
        unhealthy = _unhealthy(engine, desired) if wait else []
        # Published ports lead to healthy replicas only: wait for those still starting, then add them.
        if not p.rolling and not unhealthy and not p.awaiting_health:
            break
        if time.monotonic() > deadline:
            names = ", ".join(unhealthy) or (
                "a rolling update" if p.rolling else f"{p.awaiting_health} replica(s) to pass their healthcheck"
            )
            errors.append(f"timed out waiting for {names}")
            break
        time.sleep(max(0.2, min(p.recheck_in or 1.0, 2.0, deadline - time.monotonic())))
    for line in errors + notes:
        serious = line in errors or "failed" in line or "paused" in line
        click.echo(f"error: {line}" if serious else f"note: {line}", err=True)
    out.print(
        f"reconciled {len(desired.stacks)} stack(s): {done[Outcome.CREATED]} created, {done[Outcome.UPDATED]} updated, "
        f"{done[Outcome.REMOVED]} removed, {done[Outcome.FAILED]} failed"
        + ("" if any(done.values()) else " (nothing to do)")
    )
    paused = [n for n in notes if "paused" in n or "failed" in n]
    return 1 if errors or paused else 0


def _unhealthy(engine: Engine, desired: DesiredState) -> list[str]:
    """Services that do not run all their replicas healthy, as `stack_service (running/desired)`."""
    statuses = stack_statuses(
        desired,
        engine.records.stacks(),
        engine.services.observe(),
        engine.records.assignments(),
        engine.node,
        {},
        engine.records.suspended(),
    )
    return [
        f"{st.stack}_{s.service} ({s.running}/{s.desired} {s.status.lower()})"
        for st in statuses
        if not st.suspended
        for s in st.health.services
        if s.status != "Healthy"
    ]


def _reconcile_through_agent(api: str, out: Console) -> int:
    click.echo(f"an agent holds this state: the pass runs in it ({api})", err=True)
    doc = call(api, "reconcile", {})
    for line in doc.get("errors", []):
        click.echo(f"error: {line}", err=True)
    out.print(
        f"reconciled by the agent: {doc.get('created', 0)} created, {doc.get('updated', 0)} updated, "
        f"{doc.get('removed', 0)} removed, {doc.get('failed', 0)} failed"
    )
    return 0 if doc.get("ok") else 1


def _apply_with_progress(engine: Engine, p: PassPlan, out: Console) -> Any:
    total = p.changes
    if out.is_terminal and total:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("converging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=out
        ) as progress:
            task = progress.add_task("apply", total=total)

            def tick(result: AnyResult) -> None:
                progress.advance(task)
                if result.outcome is Outcome.FAILED:
                    progress.console.print(result_line(result))

            return engine.apply(p, tick)
    return engine.apply(p, lambda r: out.print(result_line(r)))


@cli.command()
@click.argument("stack", required=False)
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
def ps(stack: str | None, config_path: Path | None, fmt: str, **opts: Any) -> None:
    """List managed containers per slot (all stacks, or STACK) with state and spec revision."""
    cfg = _config(config_path, **opts)
    with _engine(cfg, read_only=True) as engine:
        replicas = engine.services.observe()
    rows = [
        ReplicaRow(
            stack=r.stack,
            service=r.service,
            slot=r.slot,
            container=r.name,
            id=r.id[:12],
            state=r.state,
            health=r.health,
            exit_code=r.exit_code,
            spec=r.spec_hash,
            revision=r.revision,
        )
        for r in sorted(replicas, key=lambda r: (r.stack, r.service, slot_order(r.slot), r.name))
        if stack is None or r.stack == stack
    ]
    if stack is not None and not rows:
        raise UserError(f"no containers of stack {stack!r} on this node; `dabctl ps` lists every stack")
    if fmt == "json":
        click.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("STACK", "SERVICE", "SLOT", "CONTAINER", "STATE", "SPEC", "REVISION"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        state = (
            r.state + (f" ({r.exit_code})" if r.exit_code is not None else "") + (f" {r.health}" if r.health else "")
        )
        table.add_row(r.stack, r.service, r.slot, r.container, state, r.spec, short_revision(r.revision))
    _out().print(table)


@cli.command()
@click.argument("stack")
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
def history(stack: str, config_path: Path | None, fmt: str, **opts: Any) -> None:
    """Applied revisions of STACK, newest first, with what each pass did (kept: history_limit, default 10)."""
    cfg = _config(config_path, **opts)
    with _records(cfg, writer=False) as records:
        entries = records.history(stack)
    if not entries:
        raise UserError(f"no history for stack {stack!r} in this state; `dabctl ps` lists deployed stacks")
    if fmt == "json":
        click.echo(json.dumps([e.model_dump(mode="json", exclude={"content"}) for e in entries], indent=2))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("APPLIED", "REVISION", "BUNDLE", "CREATED", "UPDATED", "REMOVED", "FAILED", "PASS"):
        table.add_column(col, no_wrap=True)
    for e in entries:
        o = e.outcome
        table.add_row(
            e.applied_at.strftime("%Y-%m-%d %H:%M:%S"),
            short_revision(e.revision),
            e.bundle_hash.removeprefix("sha256:")[:12],
            str(o.created),
            str(o.updated),
            str(o.removed),
            str(o.failed),
            o.reconcile_id,
        )
    _out().print(table)


@cli.command()
@source_options
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
def status(config_path: Path | None, fmt: str, **opts: Any) -> None:
    """Stacks and services like `docker service ls`: replicas running/desired, image, ports, revision, sync.

    Asks the running agent when there is one; otherwise reads the state and the engine (and the source, when
    --source is given, to tell Synced from OutOfSync).
    """
    cfg = _config(config_path, **opts)
    api = running_agent(cfg)
    if api:
        result = StatusOutput.model_validate(get_status(api))
    else:
        desired = _desired(cfg) if cfg.source else None
        node = cfg.node_name or socket.gethostname()
        with _engine(cfg, read_only=True) as engine:
            records = engine.records
            stacks = stack_statuses(
                desired,
                records.stacks(),
                engine.services.observe(),
                records.assignments(),
                node,
                {},
                records.suspended(),
                records.rollouts(),
                records.pins(),
                records.ports(),
            )
        result = StatusOutput(node=node, ready=True, stacks=stacks)
    if fmt == "json":
        click.echo(result.model_dump_json(indent=2))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("STACK", "SERVICE", "MODE", "REPLICAS", "IMAGE", "PORTS", "REVISION", "SYNC"):
        table.add_column(col, no_wrap=True)
    for st in result.stacks:
        sync = st.sync.status + (" (suspended)" if st.suspended else "")
        rev = short_revision(st.sync.revision) if st.sync.revision else "-"
        if not st.health.services:
            table.add_row(st.stack, "-", "-", "-", "-", "-", rev, sync)
        for s in st.health.services:
            table.add_row(
                st.stack, s.service, s.mode, f"{s.running}/{s.desired}", s.image, ",".join(s.ports) or "-", rev, sync
            )
    out = _out()
    out.print(table)
    for st in result.stacks:
        if st.sync.error:
            out.print(f"{st.stack}: {st.sync.error}", markup=False)
        if st.rollout.state != "idle":
            out.print(f"{st.stack}: rollout {st.rollout.state}: {st.rollout.reason}", markup=False)
        if st.pinned:
            out.print(
                f"{st.stack}: pinned to {st.pinned} (dabctl rollback --unpin {st.stack} to follow the source)",
                markup=False,
            )


@cli.command()
@click.argument("stack")
@click.argument("service")
@engine_options
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new output.")
@click.option("--tail", default="all", help="Lines from the end of each replica's log [default: all].")
def logs(stack: str, service: str, config_path: Path | None, follow: bool, tail: str, **opts: Any) -> None:
    """Output of every replica of STACK's SERVICE, each line prefixed by its slot."""
    cfg = _config(config_path, **opts)
    with _engine(cfg, read_only=True) as engine:
        replicas = [r for r in engine.services.observe() if r.stack == stack and r.service == service]
        if not replicas:
            raise UserError(f"no containers of {stack}_{service} on this node; `dabctl ps {stack}` lists them")
        width = max(len(r.slot) for r in replicas)
        lock = threading.Lock()
        assert isinstance(engine.docker, DockerEngine)  # logs are read through the Docker API itself
        api = engine.docker.api

        def stream(slot: str, container: str) -> None:
            buffered = b""
            count: Any = int(tail) if tail.isdigit() else "all"
            for chunk in api.logs(container, stream=True, follow=follow, tail=count):
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                with lock:
                    for line in lines:
                        click.echo(f"{stack}_{service}.{slot:<{width}} | {line.decode(errors='replace')}")
            if buffered:
                with lock:
                    click.echo(f"{stack}_{service}.{slot:<{width}} | {buffered.decode(errors='replace')}")

        threads = [
            threading.Thread(target=stream, args=(r.slot, r.id), daemon=True)
            for r in sorted(replicas, key=lambda r: slot_order(r.slot))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            pass


def _suspension(stack: str, config_path: Path | None, suspend: bool, opts: dict[str, Any]) -> None:
    cfg = _config(config_path, **opts)
    name = "suspend" if suspend else "resume"
    api = running_agent(cfg)
    if api:
        changed = bool(call(api, name, {"stack": stack}).get("changed"))
    else:
        try:
            with _records(cfg, writer=True) as records:
                changed = records.set_suspended(stack, suspend)
        except StateLocked:
            api = running_agent(cfg)
            if not api:
                raise
            changed = bool(call(api, name, {"stack": stack}).get("changed"))
    verb = "suspended" if suspend else "resumed"
    click.echo(f"{stack}: {verb}" if changed else f"{stack}: already {verb}")


@cli.command()
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
    cfg = _config(config_path, **opts)
    out = _out()
    api = running_agent(cfg)
    if api:
        doc = call(api, "rollback", {"stack": stack, "to": to, "unpin": unpin})
        for line in doc.get("errors", []):
            click.echo(f"error: {line}", err=True)
        out.print(doc.get("message", ""), markup=False)
        return 0 if doc.get("ok") else 1
    desired = _desired(cfg)
    with _engine(cfg) as engine:
        try:
            if unpin:
                lifted = unpin_stack(engine.records, stack)
                out.print(f"{stack}: " + ("unpinned: following the source" if lifted else "was not pinned"))
            else:
                pin = pin_stack(engine.records, stack, to)
                out.print(f"{stack}: pinned to {pin.revision}")
        except RollbackError as exc:
            raise UserError(str(exc)) from None
        return _converge(engine, desired, cfg, out, False, time.monotonic() + parse_duration(timeout).total_seconds())


@cli.command()
@click.argument("stack")
@engine_options
def suspend(stack: str, config_path: Path | None, **opts: Any) -> None:
    """Leave STACK exactly as it is: no pass changes it until `dabctl resume STACK`."""
    _suspension(stack, config_path, True, opts)


@cli.command()
@click.argument("stack")
@engine_options
def resume(stack: str, config_path: Path | None, **opts: Any) -> None:
    """Let passes converge STACK again (at once, when an agent runs)."""
    _suspension(stack, config_path, False, opts)


@cli.command()
@source_options
@engine_options
@click.option("--listen", default=None, help="Agent HTTP address [default: 127.0.0.1:9420].")
@click.option("--poll-interval", type=float, default=None, help="Seconds between git polls [default: 60; 0 off].")
@click.option("--resync-interval", type=float, default=None, help="Seconds between full resyncs [default: 300; 0 off].")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None, help="Log format.")
@click.option("--allow-empty", is_flag=True, default=None, help="Let an empty source remove every deployed stack.")
def agent(config_path: Path | None, **opts: Any) -> int:
    """Run continuously: follow the source (git polls, webhook, directory changes), Docker events and a
    periodic resync, and keep this node converged. Serves /healthz /readyz /metrics /status on --listen.

    SIGTERM finishes the actions in flight, records them and exits; workloads keep running.
    """
    from agent.logs import setup_logging
    from agent.node.loop import run_agent

    cfg = _config(config_path, **opts)
    if not cfg.source:
        raise UserError("no source: pass --source DIR or a git URL (or set source in the config file)")
    setup_logging(cfg.log_format)
    return run_agent(cfg)


def main() -> None:
    """Entry point: run the CLI and map every outcome to DESIGN §8's exit codes."""
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
    except (
        UserError,
        EngineError,
        StateLogError,
        EmptySourceRefused,
        AgentUnreachable,
        SourceError,
        SourceConfigError,
    ) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
