"""Fixtures for the state-log contract: one real etcd per session and a fresh log of each backend per test.

Tests on the shared etcd stay independent by key prefix (`/test-<random>`); revisions are global to the etcd
server, so tests compare revisions relative to `log.revision()` read at their start, never absolute numbers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.state.log import Event, StateLog, Watch
from tests.support.etcd import EtcdServer


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd member for the whole session (started on first use)."""
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> StateLog:
    if kind == "sqlite":
        from agent.state.sqlite import SqliteStateLog

        return SqliteStateLog(tmp_path / "state.db")
    from agent.state.etcd import EtcdStateLog

    server: EtcdServer = request.getfixturevalue("etcd_server")
    return EtcdStateLog([server.url], prefix=f"/test-{secrets.token_hex(6)}")


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.integration)])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateLog]:
    """A fresh, empty state log of each backend, closed afterwards."""
    store = open_backend(request.param, request, tmp_path)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def watches() -> Iterator[Callable[[Watch], Watch]]:
    """Register a watch to be cancelled after the test, whatever happens."""
    opened: list[Watch] = []

    def track(w: Watch) -> Watch:
        opened.append(w)
        return w

    yield track
    for w in opened:
        w.cancel()


def collect(w: Watch, count: int, timeout: float = 10) -> list[Event]:
    """The next `count` events of a watch; fails with what arrived if they do not all come within `timeout`."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        event = w.next(timeout=max(left, 0.01)) if left > 0 else None
        if event is None:
            raise AssertionError(f"got {len(events)} of {count} events within {timeout}s: {events}")
        events.append(event)
    return events
