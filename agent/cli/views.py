"""Commands that show what runs and what was applied: `ps`, `history`, `status`, `logs`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from agent.cli.options import UserError, console, engine_options, load, source_options
from agent.cli.render import short_revision
from agent.drivers.docker_engine import DockerEngine
from agent.node.control import engine_fleet, open_control, open_engine, open_records
from agent.node.status import Fleet
from reconcilers.rollout import slot_order
from schemas.output import NodeSummary, ReplicaRow, StatusOutput


@click.command()
@click.argument("stack", required=False)
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@click.option(
    "--tasks/--no-tasks",
    "show_tasks",
    default=True,
    help="Also list each slot's previous tasks with how they ended: exit code and error (default: on; in JSON, "
    "rows with `task` set).",
)
def ps(stack: str | None, config_path: Path | None, fmt: str, show_tasks: bool, **opts: Any) -> None:
    """List managed containers per slot (all stacks, or STACK) with their node, state and spec revision, the slots
    pending on no node with the reason, and each slot's previous tasks (as `docker service ps` does).

    On a cluster node: every node's containers, as the nodes report them (a down node's last report is marked
    `node down`)."""
    cfg = load(config_path, **opts)
    with open_engine(cfg, read_only=True) as engine:
        _, seen = engine_fleet(engine)
        tasks = engine.records.tasks() if show_tasks else {}
    rows = _container_rows(seen, stack) + [
        ReplicaRow(
            stack=key[0],
            service=key[1],
            slot=key[2],
            container="",
            id="",
            state="pending",
            health=None,
            exit_code=None,
            spec="",
            revision="",
            error=reason,
        )
        for key, reason in seen.pending.items()
        if stack is None or key[0] == stack
    ]
    rows += [
        ReplicaRow(
            stack=key[0],
            service=key[1],
            slot=key[2],
            container="",
            id="",
            state=t.desired,
            health=None,
            exit_code=t.exit_code,
            spec=t.target,
            revision="",
            task=t.task_id,
            error=t.error,
            node=seen.name_of(t.node),
        )
        for key, slot_tasks in tasks.items()
        if stack is None or key[0] == stack
        for t in reversed(slot_tasks)
        if t.desired == "shutdown"
    ]
    # Each slot's containers, then its previous tasks, newest first (the sort is stable).
    rows.sort(key=lambda r: (r.stack, r.service, slot_order(r.slot), r.task is not None, r.container))
    if stack is not None and not rows:
        where = "in the cluster" if seen.cluster else "on this node"
        raise UserError(f"no containers of stack {stack!r} {where}; `dabctl ps` lists every stack")
    if fmt == "json":
        click.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("STACK", "SERVICE", "SLOT", "NODE", "CONTAINER", "STATE", "SPEC", "REVISION"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        state = (
            r.state + (f" ({r.exit_code})" if r.exit_code is not None else "") + (f" {r.health}" if r.health else "")
        )
        if r.task is not None:
            line = state + (f": {r.error}" if r.error else "")
            table.add_row("", "", "", r.node, f" \\_ task {r.task}", line, r.spec, "")
            continue
        if r.state == "pending":
            table.add_row(r.stack, r.service, r.slot, "-", "-", f"pending: {r.error}", "-", "-")
            continue
        table.add_row(r.stack, r.service, r.slot, r.node, r.container, state, r.spec, short_revision(r.revision))
    console().print(table)


def _container_rows(seen: Fleet, stack: str | None) -> list[ReplicaRow]:
    """Every node's containers as rows; a down node's marked (its slots move elsewhere)."""
    listed = [(r, False) for r in seen.replicas] + [(r, True) for r in seen.stale]
    return [
        ReplicaRow(
            stack=r.stack,
            service=r.service,
            slot=r.slot,
            container=r.name,
            id=r.id[:12],
            state=r.state + (" (node down)" if stale else ""),
            health=r.health,
            exit_code=r.exit_code,
            spec=r.spec_hash,
            revision=r.revision,
            node=seen.name_of(r.node),
        )
        for r, stale in listed
        if stack is None or r.stack == stack
    ]


@click.command()
@click.argument("stack")
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
def history(stack: str, config_path: Path | None, fmt: str, **opts: Any) -> None:
    """Applied revisions of STACK, newest first, with what each pass did (kept: history_limit, default 10)."""
    cfg = load(config_path, **opts)
    with open_records(cfg, writer=False) as records:
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
    console().print(table)


@click.command()
@source_options
@engine_options
@click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")
def status(config_path: Path | None, fmt: str, **opts: Any) -> None:
    """Stacks and services like `docker service ls`: replicas running/desired, image, ports, revision, sync; slots
    pending on no node with the reason.

    On a cluster node, replicas count over every node (from the nodes' slot reports) and the nodes follow: role,
    up or down, availability, the leader, replicas on each. Asks the running agent when there is one; otherwise
    reads the state and the engine (and the source, when --source is given, to tell Synced from OutOfSync).
    """
    cfg = load(config_path, **opts)
    result = open_control(cfg).status()
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
    out = console()
    out.print(table)
    refused = result.source.verify.refused if result.source and result.source.verify else None
    if refused is not None:
        out.print(f"source: {refused.message}", markup=False)
    for st in result.stacks:
        for svc in st.health.services:
            for p in svc.pending:
                out.print(f"{st.stack}_{svc.service}.{p.slot}: pending: {p.reason}", markup=False)
            for warning in svc.warnings:
                out.print(f"warning: {st.stack}_{svc.service}: {warning}", markup=False)
        if st.sync.error:
            out.print(f"{st.stack}: {st.sync.error}", markup=False)
        if st.rollout.state != "idle":
            out.print(f"{st.stack}: rollout {st.rollout.state}: {st.rollout.reason}", markup=False)
        if st.pinned:
            out.print(
                f"{st.stack}: pinned to {st.pinned} (dabctl rollback --unpin {st.stack} to follow the source)",
                markup=False,
            )
    _print_cluster(result)


def _print_cluster(result: StatusOutput) -> None:
    """What `status` says of the cluster: its nodes, a leader held by a node's schema, nodes that narrow the
    cluster's policy."""
    if not result.nodes:
        return
    out = console()
    out.print(_nodes_table(result.nodes))
    for line in _cluster_lines(result):
        out.print(line, markup=False)


def _cluster_lines(result: StatusOutput) -> list[str]:
    """The lines under the nodes: a leader held by a node's schema, nodes that narrow the cluster's policy."""
    out = [f"cluster: {held.message}" for held in result.schema_held]
    for n in result.nodes:
        out += [f"node {n.name} narrows the cluster's policy: {line}" for line in n.narrows]
    return out


def _nodes_table(nodes: list[NodeSummary]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NODE", "ROLE", "STATE", "AVAILABILITY", "LEADER", "ADDRESS", "REPLICAS"):
        table.add_column(col, no_wrap=True)
    for n in nodes:
        leader = "leader" if n.leader else ""
        table.add_row(n.name, n.role, n.state, n.availability, leader, n.address or "-", str(n.replicas))
    return table


@click.command()
@click.argument("stack")
@click.argument("service")
@engine_options
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new output.")
@click.option("--tail", default="all", help="Lines from the end of each replica's log [default: all].")
def logs(stack: str, service: str, config_path: Path | None, follow: bool, tail: str, **opts: Any) -> None:
    """Output of every replica of STACK's SERVICE, each line prefixed by its slot."""
    cfg = load(config_path, **opts)
    with open_engine(cfg, read_only=True) as engine:
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
