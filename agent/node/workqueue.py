"""The work queue: de-duplicated stack keys, one pass at a time, exponential backoff per failing key.

Triggers only add keys (level-based: a pass re-reads everything). A key in backoff waits out its delay
unless it is added as urgent (a new commit or webhook); a failing key never blocks the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


class WorkQueue:
    """Keys ready now or at a time; `next_batch` hands out every ready key at once."""

    def __init__(
        self, base_delay: float = 1.0, max_delay: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._ready_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False

    def add(self, keys: Iterable[str], urgent: bool = False, after: float = 0.0) -> None:
        """Queue keys; a key already waiting keeps the earlier time, and a key in backoff keeps its delay
        unless `urgent`."""
        now = self._clock()
        with self._cond:
            for key in keys:
                at = now + after
                if not urgent and self._failures.get(key):
                    at = max(at, self._ready_at.get(key, at))
                current = self._ready_at.get(key)
                self._ready_at[key] = at if current is None or urgent else min(current, at)
            self._cond.notify_all()

    def retry(self, key: str) -> float:
        """Queue a failed key after its backoff (base * 2^(failures-1), capped); the delay."""
        with self._cond:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            delay: float = min(self.max_delay, self.base_delay * 2 ** (n - 1))
            self._ready_at[key] = self._clock() + delay
            self._cond.notify_all()
            return delay

    def forget(self, key: str) -> None:
        """The key succeeded: its backoff starts over."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        """How many times in a row `key` has failed (0 after a success)."""
        with self._cond:
            return self._failures.get(key, 0)

    def next_batch(self, timeout: float | None = None) -> set[str]:
        """Every key ready now, waiting up to `timeout` for one; empty on timeout or after close()."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._closed:
                now = self._clock()
                ready = {k for k, at in self._ready_at.items() if at <= now}
                if ready:
                    for k in ready:
                        del self._ready_at[k]
                    return ready
                waits = [at - now for at in self._ready_at.values()]
                if deadline is not None:
                    waits.append(deadline - now)
                    if deadline <= now:
                        return set()
                self._cond.wait(timeout=min(waits) if waits else None)
            return set()

    def pending(self) -> dict[str, float]:
        """Queued keys and the seconds until each is ready."""
        now = self._clock()
        with self._cond:
            return {k: max(0.0, at - now) for k, at in self._ready_at.items()}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
