"""Server-rendered HTML of the fleet and of one stack; every value is escaped, the layout lives in static/."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from html import escape
from importlib import resources
from string import Template
from urllib.parse import quote

from schemas.output import StackStatus
from schemas.view import FleetView, RolloutView, SlotView, StackView

ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}


@cache
def asset(name: str) -> bytes:
    """A static asset shipped with the package (KeyError for any other name)."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files("agent.web").joinpath("static", name).read_bytes()


@cache
def _template() -> Template:
    return Template(resources.files("agent.web").joinpath("templates", "page.html").read_text(encoding="utf-8"))


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _badge(text: object, cls: str | None = None) -> str:
    return f'<span class="badge {_e(cls if cls is not None else text)}">{_e(text)}</span>'


def _short(revision: str | None) -> str:
    if not revision:
        return ""
    prefix, _, digest = revision.partition(":")
    return f"{prefix}:{digest[:12]}" if digest else revision


def _table(head: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    ths = "".join(f"<th{' class=hide-narrow' if h.startswith('~') else ''}>{_e(h.lstrip('~'))}</th>" for h in head)
    body = "".join(rows)
    return (
        f'<div class="scroll"><table class="tbl {cls}"><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def page(title: str, node: str, main: str, generation: int, fragment_url: str) -> str:
    """The whole document around a main part."""
    return _template().substitute(
        title=_e(title), node=_e(node), main=main, generation=generation, fragment=_e(fragment_url)
    )


def counts(view: FleetView) -> Mapping[str, int]:
    """Stacks, services, replicas running and desired, failing stacks, rollouts, pins: the fleet's headline."""
    services = [s for st in view.status.stacks for s in st.health.services]
    return {
        "stacks": len(view.status.stacks),
        "services": len(services),
        "running": sum(s.running for s in services),
        "desired": sum(s.desired for s in services),
        "failing": sum(st.sync.status == "Failed" for st in view.status.stacks),
        "rollouts": sum(len(r) for r in view.rollouts.values()),
        "pins": len(view.pins),
    }


def _cards(view: FleetView) -> str:
    c = counts(view)
    cards = [
        ("stacks", str(c["stacks"]), "stacks"),
        ("services", str(c["services"]), "services"),
        ("replicas", f"{c['running']}/{c['desired']}", "replicas running / desired"),
        ("failing", str(c["failing"]), "stacks failing"),
        ("rollouts", str(c["rollouts"]), "rollouts in progress"),
        ("pins", str(c["pins"]), "stacks pinned"),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card" id="count-{key}"><div class="n">{_e(n)}</div><div class="l">{_e(label)}</div></div>'
            for key, n, label in cards
        )
        + "</div>"
    )


def _stack_row(st: StackStatus, slots: list[SlotView]) -> str:
    link = f'<a href="/stacks/{quote(st.stack, safe="")}">{_e(st.stack)}</a>'
    services = "<br>".join(
        f'{_e(s.service)} <span class="mono" data-service="{_e(st.stack)}/{_e(s.service)}">'
        f"{s.running}/{s.desired}</span>"
        + (f' <span class="muted mono">{_e(", ".join(s.ports))}</span>' if s.ports else "")
        for s in st.health.services
    )
    flags = []
    if st.rollout.state != "idle":
        flags.append(_badge(st.rollout.state))
    if st.pinned:
        flags.append(_badge(f"pinned {_short(st.pinned)}", "pinned"))
    if st.suspended:
        flags.append(_badge("suspended", "paused"))
    error = f'<div class="err">{_e(st.sync.error)}</div>' if st.sync.error else ""
    running = sum(1 for s in slots if s.state == "running")
    slots = [s for s in slots if s.state != "pending"]  # a pending slot has no container anywhere
    return (
        f'<tr data-stack="{_e(st.stack)}"><td>{link}</td><td>{_badge(st.sync.status)} {_badge(st.health.status)}'
        f" {' '.join(flags)}{error}</td>"
        f'<td class="mono hide-narrow">{_e(_short(st.sync.revision))}</td><td>{services or _empty("none")}</td>'
        f'<td class="hide-narrow mono">{running}/{len(slots)}</td></tr>'
    )


def _empty(text: str) -> str:
    return f'<span class="empty">{_e(text)}</span>'


def _rollout_rows(stack: str, rollouts: Iterable[RolloutView]) -> list[str]:
    return [
        f"<tr><td>{_e(stack)}</td><td>{_e(r.service)}</td>"
        f"<td>{_badge(r.state)}{' (rollback)' if r.rollback else ''}</td>"
        f'<td class="mono">{_e(", ".join(r.batch)) or "-"}</td>'
        f'<td class="err">{_e("; ".join(r.failed))}</td><td>{_e(r.reason)}</td></tr>'
        for r in rollouts
    ]


def _node_rows(view: FleetView) -> list[str]:
    """One row per node: role, up or down, availability, the leader, address, certificate expiry, replicas."""
    return [
        f'<tr data-node="{_e(n.name)}"><td>{_e(n.name)}</td><td>{_e(n.role)}</td>'
        f"<td>{_badge(n.state, 'ok' if n.state == 'up' else 'failed')}</td><td>{_e(n.availability)}</td>"
        f"<td>{_badge('leader', 'ok') if n.leader else ''}</td>"
        f'<td class="mono hide-narrow">{_e(n.address) or "-"}</td>'
        f'<td class="hide-narrow">{_e(n.certificate_expires_at or "")}</td>'
        f'<td class="mono" data-replicas="{_e(n.name)}">{n.replicas}</td></tr>'
        for n in view.nodes
    ]


def fleet_main(view: FleetView) -> str:
    """The fleet page's main part (also what live updates fetch)."""
    st = view.status
    source = ""
    if st.source is not None:
        s = st.source
        error = f' <span class="err">{_e(s.last_fetch_error)}</span>' if s.last_fetch_error else ""
        refused = ""
        if s.verify is not None and s.verify.refused is not None:
            refused = f' <span class="err">refused: {_e(s.verify.refused.message)}</span>'
        source = (
            f'<p class="muted">source {_e(s.kind)} <span class="mono">{_e(s.location)}</span>'
            f"{' ref ' + _e(s.ref) if s.ref else ''}{' at ' + _e(_short(s.revision)) if s.revision else ''}"
            f"{error}{refused}</p>"
        )
    rows = [_stack_row(s, view.slots.get(s.stack, [])) for s in st.stacks]
    stacks = _table(["stack", "state", "~revision", "services (running/desired, ports)", "~containers"], rows)
    rollout_rows = [row for stack, rs in sorted(view.rollouts.items()) for row in _rollout_rows(stack, rs)]
    rollouts = (
        _table(["stack", "service", "state", "batch", "failures", "reason"], rollout_rows)
        if rollout_rows
        else _empty("no rollout in progress")
    )
    pin_rows = [
        f"<tr><td>{_e(p.stack)}</td><td class=mono>{_e(_short(p.revision))}</td><td>{_e(p.reason)}</td>"
        f"<td>{'automatic' if p.automatic else 'by an operator'}</td><td class=hide-narrow>{_e(p.at)}</td></tr>"
        for p in view.pins
    ]
    pins = _table(["stack", "revision", "reason", "by", "~since"], pin_rows) if pin_rows else _empty("no stack pinned")
    node_rows = _node_rows(view)
    nodes = (
        _table(
            ["node", "role", "state", "availability", "leader", "~address", "~certificate expires", "replicas"],
            node_rows,
        )
        if node_rows
        else _empty("no node")
    )
    ready = _badge("ready", "ok") if st.ready else _badge("not ready", "failed")
    return (
        f'<span hidden data-generation="{view.generation}"></span>'
        f"<h1>Fleet {ready}</h1>{source}{_cards(view)}"
        f"<h2>Stacks</h2>{stacks if rows else _empty('no stack in the source or the state')}"
        f"<h2>Nodes</h2>{nodes}"
        f"<h2>Rollouts</h2>{rollouts}<h2>Pins</h2>{pins}"
        f'<p class="foot">built {_e(view.built_at)} · generation {view.generation}</p>'
    )


def _slot_rows(slots: Iterable[SlotView]) -> list[str]:
    return [
        f'<tr data-slot="{_e(s.service)}.{_e(s.slot)}" data-container="{_e(s.id)}"><td>{_e(s.service)}</td>'
        f"<td>{_e(s.slot)}</td><td class=hide-narrow>{_e(s.node)}</td>"
        f'<td class="mono">{_e(s.container)}<br><span class="muted">{_e(s.id)}</span></td>'
        f"<td>{_badge(s.state)}{' exit ' + _e(s.exit_code) if s.exit_code else ''}"
        f"{' <span class=err>' + _e(s.error) + '</span>' if s.error else ''}</td>"
        f"<td>{_badge(s.health) if s.health else '-'}</td><td class='mono hide-narrow'>{_e(s.spec)}</td>"
        f"<td class='mono hide-narrow'>{_e(s.image)}</td></tr>"
        for s in slots
    ]


def stack_main(view: StackView) -> str:
    """One stack's page main part."""
    st = view.status.stacks[0]
    svc_rows = [
        f"<tr><td>{_e(s.service)}</td><td>{_e(s.mode)}</td><td class=mono>{s.running}/{s.desired}</td>"
        f"<td>{_badge(s.status)}</td><td class=mono>{_e(', '.join(s.ports))}</td>"
        f"<td class='mono hide-narrow'>{_e(s.image)}</td></tr>"
        for s in st.health.services
    ]
    services = _table(["service", "mode", "replicas", "health", "ports", "~image"], svc_rows)
    slots = _table(
        ["service", "slot", "~node", "container", "state", "health", "~spec", "~image"], _slot_rows(view.slots)
    )
    rollouts = (
        _table(["stack", "service", "state", "batch", "failures", "reason"], _rollout_rows(view.stack, view.rollouts))
        if view.rollouts
        else _empty("no rollout recorded")
    )
    pin = (
        f"<p>{_badge('pinned', 'pinned')} <span class=mono>{_e(_short(view.pin.revision))}</span>"
        f" — {_e(view.pin.reason)}"
        f" ({'automatic' if view.pin.automatic else 'by an operator'}, {_e(view.pin.at)})</p>"
        if view.pin
        else _empty("not pinned: following the source")
    )
    error = f'<div class="err" id="stack-error">{_e(view.error)}</div>' if view.error else _empty("no error")
    plan = (
        f'<pre class="plan" id="plan">{_e(chr(10).join(view.plan))}</pre>'
        if view.plan
        else _empty("no changes planned by the last pass" if view.plan_at else "no pass has planned this stack yet")
    )
    history = _table(
        ["revision", "applied", "outcome"],
        [
            f"<tr><td class=mono>{_e(_short(h.revision))}</td><td>{_e(h.applied_at)}</td>"
            f"<td>{_badge('ok') if h.ok else _badge('failed')}"
            f" <span class=err>{_e('; '.join(h.errors))}</span></td></tr>"
            for h in view.history
        ],
    )
    audit = _table(
        ["when", "~pass", "actions"],
        [
            f"<tr><td>{_e(a.at)}</td><td class='mono hide-narrow'>{_e(a.reconcile_id)}</td>"
            f"<td class=mono>{'<br>'.join(_e(x) for x in a.actions)}</td></tr>"
            for a in view.audit
        ],
    )
    return (
        f'<span hidden data-generation="{view.generation}"></span>'
        f'<p><a href="/">&larr; fleet</a></p>'
        f"<h1>Stack {_e(view.stack)} {_badge(st.sync.status)} {_badge(st.health.status)}"
        f"{' ' + _badge(st.rollout.state) if st.rollout.state != 'idle' else ''}</h1>"
        f'<p class="muted">revision <span class=mono>{_e(_short(st.sync.revision))}</span>'
        f"{' applied ' + _e(st.sync.at) if st.sync.at else ''}</p>"
        f"<h2>Last pass's errors</h2>{error}<h2>Services</h2>{services}<h2>Slots</h2>{slots}"
        f"<h2>Rollout</h2>{rollouts}<h2>Pin</h2>{pin}"
        f"<h2>Plan of the last pass{' (' + _e(view.plan_at) + ')' if view.plan_at else ''}</h2>{plan}"
        f"<h2>History</h2>{history if view.history else _empty('nothing applied yet')}"
        f"<h2>Audit</h2>{audit if view.audit else _empty('no pass changed this stack')}"
        f'<p class="foot">built {_e(view.built_at)} · generation {view.generation}</p>'
    )
