"""What the web page shows, kept between passes: the last plan per stack, and a view rebuilt at most once a pass.

A page request never runs a pass; the engine's container list behind a view is taken at most once per pass that
ended (or every `max_age` seconds while nothing ends, so health changes show), however many pages and streams ask.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from agent.node.engine import PassPlan, StackPlan
from agent.state.records import Records
from reconcilers import services
from reconcilers.rollout import Rollout
from schemas.output import StatusOutput
from schemas.state import Pin
from schemas.view import AuditView, FleetView, HistoryEntry, PinView, RolloutView, SlotView, StackView

StatusOf = Callable[[Sequence[services.Replica]], StatusOutput]


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

    def __init__(
        self, records: Records, node: str, replicas: Callable[[], list[services.Replica]], status_of: StatusOf
    ) -> None:
        self.records = records
        self.node = node
        self._replicas = replicas
        self._status_of = status_of
        self.max_age = 5.0
        self._lock = threading.Lock()
        self._generation = 0
        self._plans: dict[str, tuple[list[str], str]] = {}  # stack -> (plan lines, when)
        self._cache: tuple[int, float, list[services.Replica], StatusOutput] | None = None

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

    def _observed(self) -> tuple[int, list[services.Replica], StatusOutput]:
        with self._lock:
            generation, cached = self._generation, self._cache
            if cached is not None and cached[0] == generation and time.monotonic() - cached[1] < self.max_age:
                return generation, cached[2], cached[3]
            replicas = self._replicas()
            status = self._status_of(replicas)
            self._cache = (generation, time.monotonic(), replicas, status)
            return generation, replicas, status

    def fleet(self) -> FleetView:
        generation, replicas, status = self._observed()
        rollouts: dict[str, list[RolloutView]] = {}
        for (stack, service), r in sorted(self.records.rollouts().items()):
            if r.state != "completed":
                rollouts.setdefault(stack, []).append(_rollout_view(service, r))
        return FleetView(
            generation=generation,
            built_at=_now(),
            status=status,
            slots=_slots(replicas, self.node),
            rollouts=rollouts,
            pins=[_pin_view(p) for _, p in sorted(self.records.pins().items())],
        )

    def stack(self, name: str) -> StackView | None:
        """One stack's page; None when the node knows no such stack."""
        generation, replicas, status = self._observed()
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
            slots=_slots([r for r in replicas if r.stack == name], self.node).get(name, []),
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


def _slots(replicas: Sequence[services.Replica], node: str) -> dict[str, list[SlotView]]:
    out: dict[str, list[SlotView]] = {}
    for r in sorted(replicas, key=lambda r: (r.stack, r.service, r.slot, -r.created)):
        out.setdefault(r.stack, []).append(
            SlotView(
                service=r.service,
                slot=r.slot,
                node=node,
                container=r.name,
                id=r.id[:12],
                state=r.state,
                health=r.health,
                exit_code=r.exit_code,
                spec=r.spec_hash[:12],
                image=r.image_id.removeprefix("sha256:")[:12],
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
