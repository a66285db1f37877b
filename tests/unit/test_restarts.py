"""restarts.decide as tables: (container state, exit code, RestartPolicy, record so far, time) -> start, wait,
give up or leave; then crash loops simulated restart by restart to show the backoff and MaxAttempts."""

from __future__ import annotations

from typing import Any

import pytest

from reconcilers.restarts import Decision, RestartRecord, decide
from schemas.bundle import RestartPolicy

NOW = 100_000.0


def policy(**keys: Any) -> RestartPolicy:
    """RestartPolicy as a bundle spells it (Condition any, Delay 5s unless given)."""
    return RestartPolicy.model_validate(keys)


def ago(*seconds: float, started: float | None = None) -> RestartRecord:
    """Restarts that many seconds before NOW, oldest first; the last start is the last of them unless given."""
    attempts = tuple(NOW - s for s in seconds)
    last = NOW - started if started is not None else (attempts[-1] if attempts else None)
    return RestartRecord(attempts, last)


def started_now(*seconds: float) -> RestartRecord:
    """The record after a restart at NOW that follows restarts that many seconds before."""
    return RestartRecord((*(NOW - s for s in seconds), NOW), NOW, len(seconds) + 1)


Case = tuple[str, int | None, RestartPolicy, RestartRecord, Decision]
ANY = policy()

DECISIONS: dict[str, Case] = {
    "created-starts": ("created", None, ANY, ago(), Decision("start", RestartRecord((), NOW), reason="never started")),
    "created-starts-condition-none": (
        "created",
        None,
        policy(Condition="none"),
        ago(),
        Decision("start", RestartRecord((), NOW), reason="never started"),
    ),
    "created-starts-keeping-attempts": (
        "created",
        None,
        policy(MaxAttempts=1),
        ago(30, started=30),
        Decision("start", RestartRecord((NOW - 30,), NOW), reason="never started"),
    ),
    "running-left": ("running", None, ANY, ago(), Decision("leave")),
    "restarting-left": ("restarting", None, ANY, ago(), Decision("leave")),
    "none-exit-1-left": ("exited", 1, policy(Condition="none"), ago(), Decision("leave")),
    "none-exit-0-left": ("exited", 0, policy(Condition="none"), ago(), Decision("leave")),
    "on-failure-exit-0-left": ("exited", 0, policy(Condition="on-failure"), ago(), Decision("leave")),
    "on-failure-exit-1-starts": (
        "exited",
        1,
        policy(Condition="on-failure"),
        ago(),
        Decision("start", started_now(), reason="exited (1); restart condition on-failure"),
    ),
    "on-failure-exit-137-starts": (
        "exited",
        137,
        policy(Condition="on-failure"),
        ago(),
        Decision("start", started_now(), reason="exited (137); restart condition on-failure"),
    ),
    "any-exit-0-starts": (
        "exited",
        0,
        ANY,
        ago(),
        Decision("start", started_now(), reason="exited (0); restart condition any"),
    ),
    "first-restart-at-once": (
        "exited",
        1,
        ANY,
        ago(),
        Decision("start", started_now(), reason="exited (1); restart condition any"),
    ),
    "second-waits-delay": (
        "exited",
        1,
        ANY,
        ago(2),
        Decision("wait", seconds=3.0, reason="restart in 3.0s (backoff)"),
    ),
    "second-after-delay": (
        "exited",
        1,
        ANY,
        ago(5),
        Decision("start", started_now(5), reason="exited (1); restart condition any"),
    ),
    "third-waits-twice-delay": (
        "exited",
        1,
        ANY,
        ago(20, 1),
        Decision("wait", seconds=9.0, reason="restart in 9.0s (backoff)"),
    ),
    "fourth-waits-four-times-delay": (
        "exited",
        1,
        policy(Delay="1s"),
        ago(30, 20, 1),
        Decision("wait", seconds=3.0, reason="restart in 3.0s (backoff)"),
    ),
    "delay-capped-at-300s": (
        "exited",
        1,
        policy(Delay="1m"),
        ago(400, 399, 398, 100),
        Decision("wait", seconds=200.0, reason="restart in 200.0s (backoff)"),
    ),
    "delay-0-restarts-at-once": (
        "exited",
        1,
        policy(Delay="0s"),
        ago(0, 0, 0),
        Decision("start", started_now(0, 0, 0), reason="exited (1); restart condition any"),
    ),
    "ran-600s-starts-over": (
        "exited",
        1,
        policy(MaxAttempts=3),
        ago(1000, 800, 600),
        Decision("start", started_now(), reason="exited (1); restart condition any"),
    ),
    "ran-599s-keeps-attempts": (
        "exited",
        1,
        ANY,
        ago(1000, 800, 599),
        Decision("start", started_now(1000, 800, 599), reason="exited (1); restart condition any"),
    ),
    "max-attempts-not-reached": (
        "exited",
        1,
        policy(MaxAttempts=3),
        ago(20, 10),
        Decision("start", started_now(20, 10), reason="exited (1); restart condition any"),
    ),
    "max-attempts-0-is-unlimited": (
        "exited",
        1,
        policy(MaxAttempts=0, Delay="0s"),
        ago(*range(40, 0, -2)),
        Decision("start", started_now(*range(40, 0, -2)), reason="exited (1); restart condition any"),
    ),
    "older-than-window-not-counted": (
        "exited",
        1,
        policy(MaxAttempts=2, Window="1m"),
        ago(100, 70, 30),
        Decision("start", started_now(100, 70, 30), reason="exited (1); restart condition any"),
    ),
}


@pytest.mark.parametrize(
    ("state", "exit_code", "p", "record", "expected"), list(DECISIONS.values()), ids=list(DECISIONS)
)
def test_decide(state: str, exit_code: int | None, p: RestartPolicy, record: RestartRecord, expected: Decision) -> None:
    assert decide(state, exit_code, p, record, NOW) == expected


def test_a_never_started_start_names_its_container() -> None:
    d = decide("created", None, ANY, ago(), NOW, container="c1")
    assert d == Decision("start", RestartRecord((), NOW, tried="c1"), reason="never started")
    assert d.record is not None and d.record.start_failed("c1") and not d.record.start_failed("c2")
    assert not RestartRecord().start_failed("")


# More restarts than MaxAttempts within Window (ever, without one) -> give up, naming the count.
GIVE_UPS: dict[str, tuple[RestartPolicy, RestartRecord, int]] = {
    "max-attempts-ever": (policy(MaxAttempts=3), ago(3000, 200, 10), 3),
    "max-attempts-1": (policy(MaxAttempts=1), ago(10), 1),
    "within-window": (policy(MaxAttempts=2, Window="1m"), ago(100, 50, 10), 2),
    "window-edge-counted": (policy(MaxAttempts=1, Window="1m"), ago(60), 1),
    "before-backoff-runs-out": (policy(MaxAttempts=2), ago(10, 1), 2),
    "ran-599s-still-counted": (policy(MaxAttempts=3), ago(1000, 800, 599), 3),
    "on-failure": (policy(Condition="on-failure", MaxAttempts=2), ago(20, 10), 2),
}


@pytest.mark.parametrize(("p", "record", "count"), list(GIVE_UPS.values()), ids=list(GIVE_UPS))
def test_give_up(p: RestartPolicy, record: RestartRecord, count: int) -> None:
    d = decide("exited", 1, p, record, NOW)

    assert (d.verdict, d.record, d.seconds) == ("give-up", None, 0.0)
    assert f"after {count} restarts" in d.reason
    assert d.reason.startswith("exited (1)")


def crash_loop(p: RestartPolicy, crashes: int, runtime: float) -> tuple[list[float], Decision | None]:
    """Feed decide a container that exits (code 1) `runtime` after every start, waiting out each "wait";
    returns the restart times and the give-up decision, if any."""
    record, now = RestartRecord(), NOW
    restarts: list[float] = []
    for _ in range(crashes):
        now += runtime
        d = decide("exited", 1, p, record, now)
        while d.verdict == "wait":
            assert d.seconds > 0
            now += d.seconds
            d = decide("exited", 1, p, record, now)
        if d.verdict == "give-up":
            return restarts, d
        assert d.verdict == "start" and d.record is not None
        assert d.record.last_start == now
        record = d.record
        restarts.append(now)
    return restarts, None


def doubling(delay: float, n: int) -> list[float]:
    """The restart gaps of a crash loop: at once, then delay * 2^k capped at 300 s."""
    return [0.0] + [min(300.0, delay * 2**k) for k in range(n - 1)]


# (policy, crashes, seconds each run lasts) -> gaps between restarts (the first after the first crash), restarts
# before giving up (None: never).
LOOPS: dict[str, tuple[RestartPolicy, int, float, list[float], int | None]] = {
    "backoff-doubles-to-300s": (policy(Delay="5s"), 10, 1.0, [0, 5, 10, 20, 40, 80, 160, 300, 300, 300], None),
    "instant-crashes": (policy(Delay="5s"), 10, 0.0, [0, 5, 10, 20, 40, 80, 160, 300, 300, 300], None),
    "give-up-within-window": (policy(MaxAttempts=4, Window="10m"), 10, 1.0, [0, 5, 10, 20], 4),
    "give-up-without-window": (policy(MaxAttempts=4), 10, 1.0, [0, 5, 10, 20], 4),
    "on-failure-gives-up-too": (policy(Condition="on-failure", MaxAttempts=2), 10, 1.0, [0, 5], 2),
    "backoff-outgrows-window": (
        policy(MaxAttempts=3, Window="20s", Delay="10s"),
        8,
        1.0,
        [0, 10, 20, 40, 80, 160, 300, 300],
        None,
    ),
    "long-runs-start-over": (policy(MaxAttempts=2), 6, 600.0, [0, 600, 600, 600, 600, 600], None),
    "max-attempts-above-50": (policy(MaxAttempts=60, Delay="1s"), 80, 1.0, doubling(1.0, 60), 60),
}


@pytest.mark.parametrize(("p", "crashes", "runtime", "gaps", "gave_up_after"), list(LOOPS.values()), ids=list(LOOPS))
def test_crash_loop(
    p: RestartPolicy, crashes: int, runtime: float, gaps: list[float], gave_up_after: int | None
) -> None:
    restarts, gave_up = crash_loop(p, crashes, runtime)

    assert (len(restarts) if gave_up else None) == gave_up_after
    if gave_up is not None:
        assert f"after {gave_up_after} restarts" in gave_up.reason
    first_crash = NOW + runtime
    assert [b - a for a, b in zip([first_crash, *restarts], restarts, strict=False)] == gaps
