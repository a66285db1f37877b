"""The web page's nodes panel on a formed cluster (3 nodes, real etcd), in a real browser (Debian's chromium)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import SLEEPER
from tests.support import browser
from tests.support.cluster import Cluster
from tests.support.dabcluster import formed
from tests.support.polling import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not browser.available(), reason="needs chromium and chromium-driver (.ci/setup)"),
]


_ROWS = """
return Array.from(document.querySelectorAll('tr[data-node]')).map(
    r => [r.dataset.node, Array.from(r.querySelectorAll('td')).map(c => c.innerText.trim())]);
"""


def _nodes(driver: browser.webdriver.Chrome) -> dict[str, list[str]]:
    # Read in one script: live updates replace the panel's rows, so element handles go stale between calls.
    return {name: cells for name, cells in driver.execute_script(_ROWS)}


def test_the_nodes_panel_shows_every_node_its_replicas_and_a_lost_node_going_down_live(
    cluster: Cluster, tmp_path: Path
) -> None:
    with formed(cluster, tmp_path, public_listen=True) as dab:
        dab.deploy("shop", {"web": {"Image": cluster.image, "Command": SLEEPER, "Deploy": {"Replicas": 6}}})
        dab.wait(lambda: dab.running("shop", "web") == {"n1": 2, "n2": 2, "n3": 2}, what="web 2/2/2")
        n1 = dab.nodes[0]
        with browser.chromium() as driver:
            driver.get(f"http://{n1.address}:9420/")

            def panel() -> dict[str, list[str]]:
                return _nodes(driver)

            # Every node, its role, up, the leader marked, and the replicas it runs (from the nodes' reports).
            try:
                wait_for(lambda: [r[-1] for r in panel().values()] == ["2", "2", "2"], timeout=30, interval=0.5)
            except AssertionError:
                raise AssertionError(f"the nodes panel: {panel()}") from None
            rows = panel()
            assert sorted(rows) == ["n1", "n2", "n3"]
            assert [rows[n][1] for n in ("n1", "n2", "n3")] == ["manager", "worker", "worker"]
            assert all(rows[n][2] == "up" for n in rows)
            assert [n for n in rows if rows[n][4] == "leader"] == ["n1"]
            assert all(rows[n][5] for n in rows), "every node's address"
            assert browser.console_errors(driver) == []

            # A node lost: the open page shows it down and its replicas moving, without a reload.
            dab.nodes[2].kill()
            wait_for(lambda: panel().get("n3", ["", "", ""])[2] == "down", timeout=30, interval=0.5)
            wait_for(lambda: [panel()[n][-1] for n in ("n1", "n2")] == ["3", "3"], timeout=60, interval=0.5)
        dab.nodes[2].start()
