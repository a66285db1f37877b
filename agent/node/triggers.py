"""Docker events as triggers: which stack an event concerns, and waiting out a container's exit.

Docker emits `die` (and `kill`, `oom`) while it still lists the container as running: it logs the event, then
tears down the container's networks and only then records it as exited. A pass started on the event alone sees
a running container and does nothing. So an exit event is not queued at once: `ExitWatch` asks the engine
about that one container (an inspect waits for the engine's lock on the container, which the exit handling
holds) and queues the stack as soon as the container is no longer running. Passes keep their contract of one
container list and one network list; the inspect happens outside them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

CONTAINER_TRIGGERS = ("die", "kill", "oom", "destroy", "stop")
EXIT_TRIGGERS = ("die", "kill", "oom")  # the engine may still list the container as running
EXIT_POLL = 0.05  # seconds between two looks at a container that still runs (a kill before its die)
EXIT_WAIT = 2.0  # after this, the stack is queued whatever the container's state


@dataclass(frozen=True)
class Trigger:
    """A stack to look at; `container` names one to wait for until it has exited first."""

    stack: str
    container: str | None = None
    network: bool = False  # from a network event: only for a stack this agent keeps


def event_trigger(ev: Mapping[str, Any], owner: str) -> Trigger | None:
    """The trigger in one Docker event, or None for events about other objects or owners (pure)."""
    action = str(ev.get("Action") or ev.get("status") or "")
    attrs = (ev.get("Actor") or {}).get("Attributes") or {}
    if ev.get("Type") == "container":
        if attrs.get("dabctl.owner") != owner:
            return None
        stack = str(attrs.get("dabctl.stack", ""))
        if action in EXIT_TRIGGERS:
            container = str((ev.get("Actor") or {}).get("ID") or ev.get("id") or "")
            return Trigger(stack, container or None)
        if action in CONTAINER_TRIGGERS or action.startswith("health_status"):
            return Trigger(stack)
        return None
    if ev.get("Type") == "network" and action == "destroy":
        return Trigger(str(attrs.get("name", "")).split("_", 1)[0], network=True)
    return None


class ExitWatch:
    """Queues a stack once the engine no longer lists a given container as running (or after `limit`)."""

    def __init__(
        self,
        state_of: Callable[[str], str],
        enqueue: Callable[[str], None],
        *,
        poll: float = EXIT_POLL,
        limit: float = EXIT_WAIT,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state_of = state_of
        self._enqueue = enqueue
        self.poll = poll
        self.limit = limit
        self._clock = clock
        self._executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="exit-watch")
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._watching: set[str] = set()

    def watch(self, container: str, stack: str) -> None:
        """Wait for `container` in the background; a container already waited for is not waited for twice."""
        with self._lock:
            if self._stopped.is_set() or container in self._watching:
                return
            self._watching.add(container)
        try:
            self._executor.submit(self.await_exit, container, stack)
        except RuntimeError:  # the executor was shut down: the agent is stopping
            with self._lock:
                self._watching.discard(container)

    def await_exit(self, container: str, stack: str) -> None:
        """Block until `container` is not running (or gone, or the engine errs, or `limit` passed); queue `stack`."""
        deadline = self._clock() + self.limit
        try:
            while True:
                try:
                    state = self._state_of(container)
                except Exception:  # engine trouble: the pass finds out and retries with backoff
                    state = "unknown"
                if state != "running" or self._clock() >= deadline:
                    break
                if self._stopped.wait(self.poll):
                    return
        finally:
            with self._lock:
                self._watching.discard(container)
        self._enqueue(stack)

    def close(self) -> None:
        self._stopped.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
