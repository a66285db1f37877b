"""The cluster listener serves the cluster calls it is given and nothing else (no probe, page, control or webhook)."""

from __future__ import annotations

from agent.api.server import AgentHttp, Kind, WebhookAuth
from agent.metrics import Metrics
from schemas.output import StatusOutput


def test_the_cluster_listener_offers_only_join() -> None:
    http = AgentHttp(
        status=lambda: StatusOutput(node="n", ready=True, source=None, stacks=[]),  # type: ignore[arg-type]
        ready=lambda: True,
        metrics=Metrics(),
        on_webhook=lambda: None,
        webhook=WebhookAuth(github_secret=b"s"),
        api={"reconcile": lambda body: (200, {})},
        cluster_api={"join": lambda body, peer: (200, {})},
    )
    http.add_tcp("127.0.0.1", 0)
    http.add_cluster("127.0.0.1", 0)
    cluster = [(r.path, r.methods) for r in http.routes() if r.kind is Kind.CLUSTER]
    assert cluster == [("/cluster/v1/join", ("POST",))]
    assert all(not r.path.startswith("/cluster/") for r in http.routes() if r.kind is not Kind.CLUSTER)
