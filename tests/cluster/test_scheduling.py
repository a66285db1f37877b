"""Scheduling across nodes on the harness: a cluster made with `cluster init` and `cluster join` (3 nodes, a real
3-member etcd, images pulled by digest from the bridge registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster
from tests.support.dabcluster import formed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_six_replicas_run_two_per_node_and_a_global_service_one_on_every_node(cluster: Cluster, tmp_path: Path) -> None:
    with formed(cluster, tmp_path) as dab:
        dab.deploy(
            "shop",
            {
                "web": {"Image": cluster.image, "Command": SLEEPER, "Deploy": {"Replicas": 6}},
                "agent": {"Image": cluster.image, "Command": SLEEPER, "Deploy": {"Mode": "global"}},
            },
        )
        dab.wait(lambda: dab.running("shop", "web") == {"n1": 2, "n2": 2, "n3": 2}, what="web 2/2/2")
        dab.wait(lambda: dab.running("shop", "agent") == {"n1": 1, "n2": 1, "n3": 1}, what="agent on every node")
