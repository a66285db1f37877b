"""Human and JSON views of plans and results: the plan text is the actions' own text, grouped."""

from __future__ import annotations

from typing import Literal

from rich.console import Console
from rich.markup import escape

from agent.node.engine import AnyResult, PassPlan
from agent.node.page import stack_plan_lines
from reconcilers import loadbalancer, networks, services
from reconcilers.outcome import Outcome
from schemas.output import PlannedAction, PlanOutput, StackPlan

_STYLE = {"+": "green", "~": "yellow", "-": "red", "!": "bold red"}


def _styled(text: str) -> str:
    return f"[{_STYLE.get(text[:1], '')}]{escape(text)}[/]" if text[:1] in _STYLE else escape(text)


def render_plan(plan: PassPlan, out: Console) -> None:
    """Print the plan grouped by stack and service, then a one-line summary."""
    for name, sp in plan.stacks.items():
        if not sp.actions and not sp.error and not sp.notes:
            continue
        out.print(
            f"[bold]stack {escape(name)}[/]"
            + (f"  ({escape(short_revision(sp.revision))})" if sp.revision else "  (pruned)")
        )
        for line in stack_plan_lines(sp):
            out.print("  " + _styled(line))
    for name in plan.suspended:
        out.print(
            f"[bold]stack {escape(name)}[/]  [dim](suspended: left alone until `dabctl resume {escape(name)}`)[/]"
        )
    counts = {"+": 0, "~": 0, "-": 0}
    for sp in plan.stacks.values():
        for action in sp.actions:
            counts[action.kind.sign] += 1
    if plan.changes == 0 and not plan.errors:
        out.print("No changes: the node matches its bundles.")
    else:
        out.print(
            f"Plan: {counts['+']} to create, {counts['~']} to replace or start, {counts['-']} to remove"
            + (f"; {len(plan.errors)} stack(s) cannot converge." if plan.errors else ".")
        )


def short_revision(revision: str) -> str:
    """`dir@sha256:0123456789ab`: enough of the digest to tell revisions apart."""
    prefix, _, digest = revision.partition(":")
    return f"{prefix}:{digest[:12]}" if digest else revision


def _planned(action: object) -> PlannedAction:
    if isinstance(action, (loadbalancer.Publish, loadbalancer.Rebalance, loadbalancer.Unpublish)):
        f = action.frontend
        op: Literal["create", "update", "remove"] = (
            "create"
            if isinstance(action, loadbalancer.Publish)
            else "remove"
            if isinstance(action, loadbalancer.Unpublish)
            else "update"
        )
        return PlannedAction(op=op, kind="port", name=str(f), service=f.service, reason=str(action)[2:])
    if isinstance(action, networks.CreateNetwork):
        return PlannedAction(op="create", kind="network", name=action.request.name, reason=action.reason)
    if isinstance(action, networks.RemoveNetwork):
        return PlannedAction(op="remove", kind="network", name=action.network.name, reason=action.reason)
    if isinstance(action, services.CreateReplica):
        return PlannedAction(
            op="create",
            kind="container",
            name=f"{action.target.full_name}.{action.slot}",
            service=action.target.name,
            slot=action.slot,
            reason=action.reason,
        )
    if isinstance(action, services.ReplaceReplica):
        return PlannedAction(
            op="replace",
            kind="container",
            name=action.replica.name,
            service=action.replica.service,
            slot=action.slot,
            reason=str(action.image) if action.image else "spec changed",
            changes=[str(action.image)] if action.image else list(action.changes),
        )
    if isinstance(action, services.StartReplica):
        return PlannedAction(
            op="start",
            kind="container",
            name=action.replica.name,
            service=action.replica.service,
            slot=action.replica.slot,
            reason=action.reason,
        )
    assert isinstance(action, services.RemoveReplica)
    return PlannedAction(
        op="remove",
        kind="container",
        name=action.replica.name,
        service=action.replica.service,
        slot=action.replica.slot,
        reason=action.reason,
    )


def plan_output(plan: PassPlan) -> PlanOutput:
    """The plan as its JSON model."""
    return PlanOutput(
        changes=plan.changes,
        stacks=[
            StackPlan(stack=name, revision=sp.revision, error=sp.error, actions=[_planned(a) for a in sp.actions])
            for name, sp in plan.stacks.items()
        ],
    )


def result_line(result: AnyResult) -> str:
    """One plain line per applied action: outcome, the action, and the error when it failed."""
    planned = _planned(result.action)
    text = f"{result.outcome.value:<9} {planned.kind} {planned.name} ({planned.reason})"
    if result.outcome is Outcome.FAILED:
        text += f": {result.error}"
    return escape(text)
