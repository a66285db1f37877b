"""Notifications from a real agent to real HTTP servers in the test: one signed event per transition."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agentproc import AgentProcess, eventually
from tests.integration.conftest import Workspace, service

pytestmark = pytest.mark.integration

SECRET = "notify-test-secret"


class Receiver:
    """A loopback HTTP server that keeps every POST (path, headers, body); answers 500 to the first `fail` ones."""

    def __init__(self, fail: int = 0) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.fail > 0:
                    receiver.fail -= 1
                    self.send_response(500)
                else:
                    receiver.posts.append((self.path, dict(self.headers.items()), body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [json.loads(body) for p, _, body in list(self.posts) if p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail=1)  # the first delivery fails: it must be retried, not lost
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def _bundle(env: str) -> dict[str, Any]:
    update = {"Parallelism": 1, "Monitor": "0s", "Order": "stop-first"}
    return {
        "Version": "0.1",
        "Services": {"web": service(2, Env=[f"V={env}"], Deploy={"Replicas": 2, "UpdateConfig": update})},
    }


def test_one_signed_event_per_transition_none_for_a_repeat(ws: Workspace, receiver: Receiver, tmp_path: Path) -> None:
    secret = tmp_path / "hook-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)  # a secret file others can read is refused, as ssh refuses a readable key
    config = tmp_path / "agent.yaml"
    config.write_text(
        json.dumps(
            {
                "notify": [
                    {"kind": "webhook", "url": receiver.url + "/hook", "secret_file": str(secret)},
                    {"kind": "slack", "url": receiver.url + "/slack", "events": ["pass.failed", "pass.recovered"]},
                ],
            }
        )
    )
    stack = ws.stack("shop")
    ws.write("shop", _bundle("one"))
    agent = AgentProcess(
        ws.state,
        "--config",
        str(config),
        "--source",
        str(ws.source),
        "--resync-interval",
        "0",
        "--poll-interval",
        "0.5",
        env={"DABCTL_LOADBALANCER": "none"},
    )
    agent.start()
    try:
        eventually(lambda: len(ws.running("shop")) == 2, agent)
        assert receiver.events() == []  # a first deployment is no rollout

        ws.write("shop", _bundle("two"))  # a spec change: a rolling update
        eventually(lambda: [e["event"] for e in receiver.events()] == ["rollout.started", "rollout.completed"], agent)

        bad = ws.write("shop", {"Version": "0.1", "Services": {"web": {**service(2), "Replicas": "two"}}})
        eventually(lambda: len(receiver.events()) == 3, agent)
        failed = receiver.events()[2]
        assert failed["event"] == "pass.failed" and failed["stack"] == stack
        assert failed["file"].endswith(bad.name) and failed["field"], failed

        assert agent.post("/api/reconcile", json={"wait": False}).status_code == 200  # the same failure again
        agent.post("/api/reconcile", json={"wait": False})

        ws.write("shop", _bundle("two"))
        # one thread delivers to each sink in turn: the Slack post follows the webhook's
        eventually(lambda: len(receiver.events()) == 4 and len(receiver.events("/slack")) == 2, agent)
        events = receiver.events()
        assert [e["event"] for e in events] == ["rollout.started", "rollout.completed", "pass.failed", "pass.recovered"]
        for path, headers, body in receiver.posts:
            if path == "/hook":
                want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                assert headers["X-Dabctl-Signature-256"] == want
                assert headers["X-Dabctl-Event"] == json.loads(body)["event"]
        slack = [json.loads(body)["text"] for path, _, body in receiver.posts if path == "/slack"]
        assert len(slack) == 2 and "pass.failed" in slack[0] and "pass.recovered" in slack[1]
    finally:
        agent.terminate()
