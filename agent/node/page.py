"""What the web page shows, kept between passes: the last plan per stack, and a view rebuilt at most once a pass.

A page request never runs a pass; the engine's container list behind a view is taken at most once per pass that
ended (or every `max_age` seconds while nothing ends, so health changes show), however many pages and streams ask.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from agent.node.engine import PassPlan, StackPlan
from agent.node.status import Fleet, alone
from agent.state.records import Records
from reconcilers import services
from reconcilers.rollout import Rollout
from schemas.output import StatusOutput
from schemas.state import Pin
from schemas.view import AuditView, FleetView, HistoryEntry, PinView, RolloutView, SlotView, StackView

Observe = Callable[[], tuple[Fleet, StatusOutput]]


def stack_plan_lines(sp: StackPlan) -> list[str]:
    """A stack's plan as `dabctl plan` prints it (unstyled): errors and notes, then actions by service."""
    lines = [f"! {sp.error}"] if sp.error else []
    lines += [f"! {note}" for note in sp.notes]
    lines += [str(a) for a in sp.network_actions]
    lines += [str(b) for b in sp.balancer_actions]
    by_service: dict[str, list[services.ServiceAction]] = {}
    for s in sp.service_actions:
        by_service.setdefault(s.key[1], []).append(s)
    for service, actions in sorted(by_service.items()):
        lines.append(f"service {service}")
        lines += [f"  {s}" for s in actions]
    return lines


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _rollout_view(service: str, r: Rollout) -> RolloutView:
    return RolloutView(
        service=service,
        state=r.state,
        target=r.target[:19],
        batch=list(r.batch),
        failed=[str(f) for f in r.failed],
        reason=r.reason,
        rollback=r.rollback,
    )


def _pin_view(pin: Pin) -> PinView:
    return PinView(
        stack=pin.stack, revision=pin.revision, reason=pin.reason, automatic=pin.automatic, at=pin.at.isoformat()
    )


class PageData:
    """The page's memory of the agent: plans of the last pass per stack, and the current view's generation."""

    def __init__(self, records: Records, node: str, observe: Observe) -> None:
        """`observe`: the fleet and the status built from it (one container list, one state read)."""
        self.records = records
        self.node = node
        self._observe = observe
        self.max_age = 5.0
        self._lock = threading.Lock()
        self._generation = 0
        self._plans: dict[str, tuple[list[str], str]] = {}  # stack -> (plan lines, when)
        self._cache: tuple[int, float, Fleet, StatusOutput] | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def pass_ended(self, plan: PassPlan | None) -> int:
        """Remember a pass's plan (None: the pass could not plan) and start a new generation; returns it."""
        with self._lock:
            if plan is not None:
                at = _now()
                for name, sp in plan.stacks.items():
                    self._plans[name] = (stack_plan_lines(sp), at)
            self._generation += 1
            return self._generation

    def _observed(self) -> tuple[int, Fleet, StatusOutput]:
        with self._lock:
            generation, cached = self._generation, self._cache
            if cached is not None and cached[0] == generation and time.monotonic() - cached[1] < self.max_age:
                return generation, cached[2], cached[3]
            seen, status = self._observe()
            self._cache = (generation, time.monotonic(), seen, status)
            return generation, seen, status

    def fleet(self) -> FleetView:
        generation, seen, status = self._observed()
        rollouts: dict[str, list[RolloutView]] = {}
        for (stack, service), r in sorted(self.records.rollouts().items()):
            if r.state != "completed":
                rollouts.setdefault(stack, []).append(_rollout_view(service, r))
        return FleetView(
            generation=generation,
            built_at=_now(),
            status=status,
            slots=_slots(seen),
            rollouts=rollouts,
            pins=[_pin_view(p) for _, p in sorted(self.records.pins().items())],
            nodes=seen.nodes if seen.cluster else [alone(self.node, seen.replicas)],
        )

    def stack(self, name: str) -> StackView | None:
        """One stack's page; None when the node knows no such stack."""
        generation, seen, status = self._observed()
        mine = [s for s in status.stacks if s.stack == name]
        if not mine:
            return None
        pin = self.records.pins().get(name)
        plan, plan_at = self._plans.get(name, ([], None))
        return StackView(
            generation=generation,
            built_at=_now(),
            node=self.node,
            stack=name,
            status=status.model_copy(update={"stacks": mine}),
            slots=_slots(seen, name).get(name, []),
            rollouts=[_rollout_view(svc, r) for (st, svc), r in sorted(self.records.rollouts().items()) if st == name],
            pin=_pin_view(pin) if pin else None,
            error=mine[0].sync.error,
            plan=plan,
            plan_at=plan_at,
            history=[
                HistoryEntry(
                    revision=h.revision,
                    applied_at=h.applied_at.isoformat(timespec="seconds"),
                    ok=not h.outcome.failed,
                    errors=list(h.outcome.errors),
                )
                for h in self.records.history(name)
            ],
            audit=_audit(self.records, name),
        )


def _slots(seen: Fleet, stack: str | None = None) -> dict[str, list[SlotView]]:
    """Every slot's container on every node (a down node's last reported ones marked so), and pending slots."""
    out: dict[str, list[SlotView]] = {}
    down = [(r, True) for r in seen.stale]
    ordered = sorted(
        [(r, False) for r in seen.replicas] + down, key=lambda x: (x[0].stack, x[0].service, x[0].slot, -x[0].created)
    )
    for r, stale in ordered:
        if stack is not None and r.stack != stack:
            continue
        out.setdefault(r.stack, []).append(
            SlotView(
                service=r.service,
                slot=r.slot,
                node=seen.name_of(r.node) + (" (down)" if stale else ""),
                container=r.name,
                id=r.id[:12],
                state=r.state,
                health=r.health,
                exit_code=r.exit_code,
                spec=r.spec_hash[:12],
                image=r.image_id.removeprefix("sha256:")[:12],
            )
        )
    for (st, service, slot), reason in sorted(seen.pending.items()):
        if stack is None or st == stack:
            out.setdefault(st, []).append(
                SlotView(
                    service=service,
                    slot=slot,
                    node="",
                    container="",
                    id="",
                    state="pending",
                    spec="",
                    image="",
                    error=reason,
                )
            )
    return out


def _audit(records: Records, stack: str, limit: int = 20) -> list[AuditView]:
    out = []
    for entry in records.audit():
        actions = [f"{a.outcome} {a.action}" + (f": {a.error}" if a.error else "") for a in entry.actions]
        mine = [text for a, text in zip(entry.actions, actions, strict=True) if a.stack == stack]
        if mine:
            out.append(
                AuditView(
                    reconcile_id=entry.reconcile_id,
                    at=entry.at.isoformat(timespec="seconds"),
                    node=entry.node,
                    actions=mine,
                )
            )
        if len(out) >= limit:
            break
    return out
