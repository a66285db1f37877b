"""The work queue: de-duplicated keys, readiness times, exponential backoff per key, urgent adds."""

from __future__ import annotations

import threading

from agent.node.workqueue import WorkQueue
from tests.node.conftest import Clock


def queue(clock: Clock, max_delay: float = 8.0) -> WorkQueue:
    return WorkQueue(base_delay=1.0, max_delay=max_delay, clock=clock)


def test_keys_are_deduplicated_and_handed_out_together() -> None:
    clock = Clock()
    q = queue(clock)
    q.add(["a", "b"])
    q.add(["a"])
    assert q.next_batch(timeout=0) == {"a", "b"}
    assert q.next_batch(timeout=0) == set()


def test_a_key_added_for_later_keeps_the_earlier_time() -> None:
    clock = Clock()
    q = queue(clock)
    q.add(["a"], after=5)
    q.add(["a"], after=2)
    assert q.pending() == {"a": 2.0}
    q.add(["a"], after=9)
    assert q.pending() == {"a": 2.0}
    clock.advance(2)
    assert q.next_batch(timeout=0) == {"a"}


def test_failures_back_off_exponentially_up_to_the_cap_and_success_starts_over() -> None:
    clock = Clock()
    q = queue(clock)
    assert [q.retry("a") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert q.failures("a") == 5
    q.forget("a")
    assert q.failures("a") == 0 and q.retry("a") == 1.0


def test_a_key_in_backoff_waits_unless_added_as_urgent() -> None:
    clock = Clock()
    q = queue(clock)
    q.retry("a")
    q.retry("a")  # 2 s
    q.add(["a"])  # an event: the backoff holds
    assert q.pending() == {"a": 2.0}
    assert q.next_batch(timeout=0) == set()
    q.add(["a"], urgent=True)  # a new commit: now
    assert q.next_batch(timeout=0) == {"a"}


def test_next_batch_waits_for_the_first_key_to_be_ready_and_close_wakes_it() -> None:
    q = WorkQueue()
    q.add(["a"], after=0.05)
    assert q.next_batch(timeout=5) == {"a"}
    assert q.next_batch(timeout=0.01) == set()

    got: list[set[str]] = []
    waiter = threading.Thread(target=lambda: got.append(q.next_batch()))
    waiter.start()
    q.close()
    waiter.join(timeout=5)
    assert got == [set()]
