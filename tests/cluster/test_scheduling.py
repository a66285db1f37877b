"""Scheduling across nodes on the harness: a cluster made with `cluster init` and `cluster join` (3 nodes, a real
3-member etcd, images pulled by digest from the bridge registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.state import STATE_SCHEMA, STATE_SCHEMA_OLDEST
from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster
from tests.support.dabcluster import ENV, formed

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
        # Operating it: `ps` on a manager shows every node's slots; changing commands on a worker point at managers.
        ps = dab.nodes[0].dabctl("ps", "shop", env=ENV)
        assert ps.returncode == 0, ps.stderr
        rows = [line.split() for line in ps.stdout.splitlines()[1:] if line.strip()]
        assert "NODE" in ps.stdout.splitlines()[0]
        assert {row_node for row in rows for row_node in row if row_node in ("n1", "n2", "n3")} == {"n1", "n2", "n3"}
        refused = dab.nodes[1].dabctl("reconcile", "--once", env=ENV)
        assert refused.returncode == 1 and "run this on a manager" in refused.stderr, refused.stderr
        assert dab.nodes[0].address in refused.stderr
        # Guards: every node records the state schemas it reads; the same config everywhere narrows nothing.
        inspect = dab.nodes[0].dabctl("node", "inspect", "n2", env=ENV)
        assert inspect.returncode == 0, inspect.stderr
        detail = json.loads(inspect.stdout)
        assert (detail["status"]["schema_oldest"], detail["status"]["schema_version"]) == (
            STATE_SCHEMA_OLDEST,
            STATE_SCHEMA,
        )
        assert detail["narrows"] == []
