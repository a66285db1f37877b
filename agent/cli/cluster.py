"""`dabctl node ls | inspect | update | rm`: the cluster's nodes, read from and written to the cluster's state log
(the one `<state_dir>/cluster.json` names). Reads work on any node; changes only on a manager."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from agent.cli.options import UserError, console, engine_options, load
from agent.node.etcdroles import set_etcd_role
from agent.node.join import remove_manager_member
from agent.node.membership import cluster_config
from agent.state.backends import open_log
from agent.state.log import StateLogError
from agent.state.membership import MEMBERSHIP_FILE
from agent.state.membership import membership as read_membership
from agent.state.nodes import Membership, NodeRecords
from agent.state.records import Records
from bundles.policy import narrowing
from schemas.output import NodeDetail, NodeRow
from schemas.state import NodeSpec

UPDATE_ATTEMPTS = 3  # another manager changed the spec between read and write: read again


@contextmanager
def _nodes(config_path: Path | None, opts: dict[str, Any], *, manager: bool) -> Iterator[NodeRecords]:
    """The cluster's node records; with `manager`, only when this node is a manager."""
    cfg = load(config_path, **opts)
    membership = read_membership(cfg.state_path)
    if membership is None:
        raise UserError(
            f"this node is in no cluster ({cfg.state_path / MEMBERSHIP_FILE} is missing): run `dabctl cluster init` "
            "or `dabctl cluster join`, or pass the --state-dir of a cluster node"
        )
    log = open_log(cluster_config(cfg, membership), writer=False)
    try:
        records = NodeRecords(log)
        if manager:
            own = records.spec(membership.node_id)
            if own is None or own.role != "manager":
                raise UserError(
                    f"this node ({membership.node_id}) is {'a worker' if own else 'not in the cluster'}: "
                    "run this on a manager"
                )
        yield records
    finally:
        log.close()


def _row(m: Membership, spec: NodeSpec) -> NodeRow:
    status = m.statuses.get(spec.node_id)
    leads = m.leader is not None and m.leader.record.node_id == spec.node_id
    return NodeRow(
        id=spec.node_id,
        name=spec.name,
        role=spec.role,
        availability=spec.availability,
        state="up" if status else "down",
        leader=leads,
        term=m.leader.term if leads and m.leader else None,
        address=status.advertise_address if status else "",
        version=status.dabctl_version if status else "",
        labels=dict(spec.labels),
        certificate_expires_at=status.certificate_expires_at if status else None,
    )


def _expires(when: datetime | None) -> str:
    """`2026-03-05 (89d)`: a certificate's expiry and the days left; blank without one."""
    if when is None:
        return ""
    days = (when - datetime.now(UTC)).days
    return f"{when:%Y-%m-%d} ({days}d)" if days >= 0 else f"{when:%Y-%m-%d} (EXPIRED)"


def output_option(f: Any) -> Any:
    f = click.option("--json", "as_json", is_flag=True, help="Same as --output json.")(f)
    return click.option("--output", "fmt", type=click.Choice(["text", "json"]), default="text", help="Output format.")(
        f
    )


@click.group()
def node() -> None:
    """The cluster's nodes: list, inspect, label, pause, drain, promote, demote, remove."""


@node.command("ls")
@engine_options
@output_option
def ls(config_path: Path | None, fmt: str, as_json: bool, **opts: Any) -> None:
    """List the nodes: id, name, role, availability, state (up while the node's lease holds; down within the
    lease TTL of losing it), the leader (*), address, dabctl version and when the node's certificate expires."""
    with _nodes(config_path, opts, manager=False) as records:
        m = records.membership()
    rows = sorted((_row(m, spec) for spec in m.specs.values()), key=lambda r: (r.name, r.id))
    if fmt == "json" or as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "NAME", "ROLE", "AVAILABILITY", "STATE", "LEADER", "ADDRESS", "VERSION", "CERT EXPIRES"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        leader = "*" if r.leader else ""
        expires = _expires(r.certificate_expires_at)
        table.add_row(r.id, r.name, r.role, r.availability, r.state, leader, r.address, r.version, expires)
    console().print(table)


@node.command()
@click.argument("ref", metavar="NODE")
@engine_options
def inspect(ref: str, config_path: Path | None, **opts: Any) -> None:
    """Show NODE (a name, an id, or a unique id prefix) as JSON: its spec, its status (with the state schemas it
    reads and its own configured policy) and whether it leads; `narrows` lists where its own policy refuses what
    the cluster's allows."""
    with _nodes(config_path, opts, manager=False) as records:
        m = records.membership()
        cluster_policy = Records(records.log).policy()
    spec = m.find(ref)
    row = _row(m, spec)
    status = m.statuses.get(spec.node_id)
    own = status.policy if status is not None else None
    detail = NodeDetail(
        id=spec.node_id,
        name=spec.name,
        state=row.state,
        leader=row.leader,
        term=row.term,
        spec=spec,
        status=status,
        narrows=narrowing(cluster_policy, own) if cluster_policy is not None and own is not None else [],
    )
    click.echo(detail.model_dump_json(indent=2))


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not key or not sep:
        raise UserError(f"--label-add {value!r}: expected KEY=VALUE")
    return key, val


@node.command()
@click.argument("ref", metavar="NODE")
@engine_options
@click.option("--label-add", multiple=True, metavar="KEY=VALUE", help="Add or change a label (repeatable).")
@click.option("--label-rm", multiple=True, metavar="KEY", help="Remove a label (repeatable).")
@click.option(
    "--availability",
    type=click.Choice(["active", "pause", "drain"]),
    help="active: takes tasks; pause: keeps its tasks, gets no new ones; drain: its tasks move elsewhere.",
)
@click.option("--role", type=click.Choice(["manager", "worker"]), help="Promote to manager or demote to worker.")
def update(
    ref: str,
    *,
    config_path: Path | None,
    label_add: tuple[str, ...],
    label_rm: tuple[str, ...],
    availability: str | None,
    role: str | None,
    **opts: Any,
) -> None:
    """Change NODE's labels, availability or role (on a manager). Placement constraints read the labels as
    node.labels.KEY. Demoting a manager of a cluster whose etcd dabctl runs first removes its etcd member (refused,
    nothing changed, when the members left would lose quorum); the node's agent then stops it and deletes its data
    and the CA key. A worker promoted gets a manager's certificate from its agent, which starts its etcd member as
    a learner, promoted to a voter once caught up."""
    added = dict(_label(v) for v in label_add)
    if not (added or label_rm or availability or role):
        raise UserError("nothing to change: give --label-add, --label-rm, --availability or --role")
    with _nodes(config_path, opts, manager=True) as records:
        for _ in range(UPDATE_ATTEMPTS):
            m = records.membership()
            before = m.find(ref)
            labels = {k: v for k, v in before.labels.items() if k not in label_rm} | added
            after = before.model_copy(
                update={
                    "labels": labels,
                    "availability": availability or before.availability,
                    "role": role or before.role,
                }
            )
            if after.role == "worker" and before.role == "manager":
                managers = [s for s in m.specs.values() if s.role == "manager" and s.node_id != before.node_id]
                if not managers:
                    raise UserError(f"node {before.name} is the last manager: promote another node first")
                _remove_etcd_member(config_path, opts, before)
            if after == before or records.update_spec(before, after):
                break
        else:
            raise UserError(f"node {ref} kept changing while this update ran; run it again")
    if role:
        # Its etcd user's rights follow at once (again when asked again); its agent then starts or retires its
        # etcd member.
        try:
            set_etcd_role(load(config_path, **opts), after.node_id, after.role)
        except StateLogError as exc:
            raise UserError(
                f"node {after.name} is a {after.role} now, but its etcd user's rights did not follow ({exc}); run "
                "the same update again"
            ) from None
    click.echo(after.node_id)


def _remove_etcd_member(config_path: Path | None, opts: dict[str, Any], spec: NodeSpec) -> None:
    """The node's etcd member leaves the cluster's etcd first (when dabctl runs it), refused when the members
    left would lose quorum (ClusterSetupError, exit 1, nothing changed)."""
    if remove_manager_member(load(config_path, **opts), spec.node_id):
        click.echo(f"node {spec.name}'s etcd member removed from the cluster's etcd", err=True)


@node.command()
@click.argument("ref", metavar="NODE")
@engine_options
@click.option("--force", is_flag=True, help="Remove the node even while it is up (its agent then stops taking part).")
def rm(ref: str, config_path: Path | None, force: bool, **opts: Any) -> None:
    """Remove NODE from the cluster (on a manager): its spec, status and reports. A node that is up is refused
    unless --force; a manager must be demoted first. Its replicated tasks are placed elsewhere."""
    with _nodes(config_path, opts, manager=True) as records:
        m = records.membership()
        spec = m.find(ref)
        if spec.role == "manager":
            raise UserError(
                f"node {spec.name} is a manager: demote it first (dabctl node update --role worker {spec.name})"
            )
        if spec.node_id in m.statuses and not force:
            raise UserError(
                f"node {spec.name} is up: stop its agent and wait for it to be down, or use --force to remove it anyway"
            )
        _remove_etcd_member(config_path, opts, spec)  # a demotion whose member removal did not finish
        records.remove_node(spec.node_id)
    click.echo(spec.node_id)
