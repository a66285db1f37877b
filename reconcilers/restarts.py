"""Restart policy as a pure function (Swarm's RestartPolicy, enforced by the agent rather than Docker).

The first restart of a slot happens at once, then each waits Delay * 2^(n-1), capped at 5 minutes; a replica
that ran 10 minutes starts over. With MaxAttempts, more restarts than that within Window (or ever, without a
Window) mark the slot failed instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.bundle import RestartPolicy
from schemas.durations import format_duration

MAX_DELAY = 300.0
RESET_AFTER = 600.0


@dataclass(frozen=True)
class RestartRecord:
    """When a slot was restarted (epoch seconds), kept between passes."""

    attempts: tuple[float, ...] = ()  # the most recent ones (enough for any Window and for the backoff clock)
    last_start: float | None = None
    total: int = 0  # restarts since the last reset: the backoff exponent, and the count without a Window
    # The never-started container whose start was last tried (its id). Found still never started, its start failed:
    # it is replaced rather than started again (a start the engine refuses, as containerd's "task already exists"
    # after a dockerd restart, fails the same way every time).
    tried: str = ""

    def start_failed(self, container_id: str) -> bool:
        """Whether a start was already tried on this never-started container."""
        return bool(self.tried) and self.tried == container_id


@dataclass(frozen=True)
class Decision:
    """start now (with the record to keep), wait `seconds`, give up (with the reason), or leave it down."""

    verdict: Literal["start", "wait", "give-up", "leave"]
    record: RestartRecord | None = None
    seconds: float = 0.0
    reason: str = ""


def decide(
    state: str, exit_code: int | None, policy: RestartPolicy, record: RestartRecord, now: float, *, container: str = ""
) -> Decision:
    """What to do with an exited or never-started container (id `container`) of the current spec."""
    if state == "created":
        return Decision("start", RestartRecord(record.attempts, now, tried=container), reason="never started")
    if state != "exited":
        return Decision("leave")
    if policy.condition == "none" or (policy.condition == "on-failure" and exit_code == 0):
        return Decision("leave")
    attempts, total = record.attempts, max(record.total, len(record.attempts))
    if record.last_start is not None and now - record.last_start >= RESET_AFTER:
        attempts, total = (), 0
    window = policy.window.total_seconds() if policy.window else None
    counted = total if window is None else sum(1 for a in attempts if now - a <= window)
    if policy.max_attempts and counted >= policy.max_attempts:
        within = f" within {format_duration(policy.window)}" if policy.window else ""
        return Decision("give-up", reason=f"exited ({exit_code}) after {counted} restarts{within}; not restarted")
    if attempts:
        delay = min(MAX_DELAY, policy.delay.total_seconds() * 2 ** (total - 1))
        due = attempts[-1] + delay
        if now < due:
            return Decision("wait", seconds=due - now, reason=f"restart in {due - now:.1f}s (backoff)")
    # The last 100 attempts serve any sensible MaxAttempts within a Window; `total` counts the rest.
    return Decision(
        "start",
        RestartRecord((*attempts[-99:], now), now, total + 1),
        reason=f"exited ({exit_code}); restart condition {policy.condition}",
    )
