"""One cluster (tests/support/cluster.py) per test session, reset before each test that asks for it.

    def test_something(cluster: Cluster) -> None:      # 3 nodes, 3-member etcd, registry; fresh state
        n1, n2, n3 = cluster.nodes

Start-up time and teardown are checked here: the session's cluster must leave nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster

_timings: dict[str, float] = {}


@pytest.fixture(scope="session")
def cluster_session() -> Iterator[Cluster]:
    """The session's cluster, started on first use and closed (everything removed, or an error) at the end."""
    with Cluster(nodes=3) as c:
        _timings["start"] = c.start_seconds or 0.0
        yield c
    left = c.leftovers()
    assert not left, f"the session's cluster left things behind: {left}"


@pytest.fixture
def cluster(cluster_session: Cluster) -> Cluster:
    """The session's cluster, reset to its state right after start-up."""
    cluster_session.reset()
    return cluster_session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "start" in _timings:
        terminalreporter.write_line(
            f"cluster harness: 3 nodes + 3-member etcd + registry started in {_timings['start']:.1f} s"
        )
