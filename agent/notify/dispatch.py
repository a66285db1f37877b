"""Delivery on a thread of its own: a bounded queue, retries with exponential backoff, never blocking a pass."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.notify.events import Event, EventKind
from agent.notify.sinks import DeliveryFailed, Sink, new_delivery

log = logging.getLogger("dabctl.notify")


@dataclass(frozen=True)
class Route:
    """A sink and the events it wants (empty: every event)."""

    sink: Sink
    events: frozenset[EventKind] = frozenset()

    def wants(self, event: Event) -> bool:
        return not self.events or event.event in self.events


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    route: Route = field(compare=False)
    event: Event = field(compare=False)
    delivery: str = field(compare=False)
    attempt: int = field(compare=False, default=1)


class Notifier:
    """Queue events for every route that wants them; one thread delivers, retrying failures with backoff."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        attempts: int = 6,
        first_delay: float = 1.0,
        max_delay: float = 60.0,
        capacity: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = list(routes)
        self.attempts = attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.capacity = capacity
        self.clock = clock
        self.sent = 0
        self.dropped = 0
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.routes and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def publish(self, events: Sequence[Event]) -> None:
        """Queue `events` (never blocks: past `capacity` waiting deliveries, the event is dropped and logged)."""
        if not events or not self.routes:
            return
        with self._cond:
            for event in events:
                log.info("notify", extra={"event": event.event.value, "stack": event.stack})
                for route in self.routes:
                    if not route.wants(event):
                        continue
                    if len(self._heap) >= self.capacity:
                        self.dropped += 1
                        log.warning("notification dropped: queue full", extra={"sink": route.sink.name})
                        continue
                    heapq.heappush(self._heap, _Delivery(self.clock(), next(self._seq), route, event, new_delivery()))
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._heap

    def _next(self) -> _Delivery | None:
        with self._cond:
            while not self._stopped:
                now = self.clock()
                if self._heap and self._heap[0].due <= now:
                    return heapq.heappop(self._heap)
                self._cond.wait(self._heap[0].due - now if self._heap else None)
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                job.route.sink.send(job.event, job.delivery)
            except DeliveryFailed as exc:
                self._failed(job, exc)
            except Exception:  # a sink's bug must not end deliveries to the others
                log.exception("notification sink crashed", extra={"sink": job.route.sink.name})
            else:
                self.sent += 1

    def _failed(self, job: _Delivery, exc: DeliveryFailed) -> None:
        if not exc.retryable or job.attempt >= self.attempts:
            log.error(
                "notification not delivered; giving up",
                extra={"sink": job.route.sink.name, "event": job.event.event.value, "error": str(exc)},
            )
            return
        delay = min(self.max_delay, self.first_delay * 2 ** (job.attempt - 1))
        log.warning(
            "notification not delivered; retrying",
            extra={"sink": job.route.sink.name, "retry_in": delay, "error": str(exc)},
        )
        with self._cond:
            heapq.heappush(
                self._heap,
                _Delivery(self.clock() + delay, next(self._seq), job.route, job.event, job.delivery, job.attempt + 1),
            )
            self._cond.notify_all()
