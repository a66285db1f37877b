"""Delivery on a thread of its own: a bounded queue, retries with exponential backoff, never blocking a pass."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass
class _Delivery:
    event: Event
    delivery: str
    due: float
    attempt: int = 1


class Notifier:
    """Queue events for every route that wants them; one thread delivers them, in order per sink, retrying a
    failed delivery with backoff before the sink's later events (receivers see transitions in order)."""

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
        self.capacity = capacity  # waiting deliveries per sink
        self.clock = clock
        self.sent = 0
        self.dropped = 0
        self._queues: list[collections.deque[_Delivery]] = [collections.deque() for _ in self.routes]
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
                for route, queue in zip(self.routes, self._queues, strict=True):
                    if not route.wants(event):
                        continue
                    if len(queue) >= self.capacity:
                        self.dropped += 1
                        log.warning("notification dropped: queue full", extra={"sink": route.sink.name})
                        continue
                    queue.append(_Delivery(event, new_delivery(), self.clock()))
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not any(self._queues)

    def _next(self) -> tuple[int, _Delivery] | None:
        """The sink whose first waiting delivery is due soonest, once it is due; None when stopped."""
        with self._cond:
            while not self._stopped:
                heads = [(q[0].due, i) for i, q in enumerate(self._queues) if q]
                now = self.clock()
                if heads and min(heads)[0] <= now:
                    i = min(heads)[1]
                    return i, self._queues[i][0]
                self._cond.wait(min(heads)[0] - now if heads else None)
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            i, delivery = job
            route = self.routes[i]
            try:
                route.sink.send(delivery.event, delivery.delivery)
            except DeliveryFailed as exc:
                if self._retry(route, delivery, exc):
                    continue
            except Exception:  # a sink's bug must not end deliveries to the others
                log.exception("notification sink crashed", extra={"sink": route.sink.name})
            else:
                self.sent += 1
            with self._cond:
                self._queues[i].popleft()

    def _retry(self, route: Route, job: _Delivery, exc: DeliveryFailed) -> bool:
        """Whether `job` stays first in its sink's queue for another attempt (False: given up)."""
        if not exc.retryable or job.attempt >= self.attempts:
            log.error(
                "notification not delivered; giving up",
                extra={"sink": route.sink.name, "event": job.event.event.value, "error": str(exc)},
            )
            return False
        delay = min(self.max_delay, self.first_delay * 2 ** (job.attempt - 1))
        log.warning(
            "notification not delivered; retrying",
            extra={"sink": route.sink.name, "retry_in": delay, "error": str(exc)},
        )
        with self._cond:
            job.attempt += 1
            job.due = self.clock() + delay
        return True
