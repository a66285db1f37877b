"""The agent's HTTP endpoints, served for real on loopback (port 0) and called with requests."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

from agent.api.server import MAX_BODY, AgentHttp, WebhookAuth
from agent.metrics import Metrics
from schemas.output import HealthStatus, StackStatus, StatusOutput, SyncStatus

pytestmark = pytest.mark.timeout(30)

SECRET = b"s3cret-github-hook"
TOKEN = "gl-token-4b1d"
TIMEOUT = 5


def github_signature(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(kw_only=True)
class Fakes:
    """The callables AgentHttp is given; each records its calls, and `fail` makes one raise."""

    is_ready: bool = False
    webhooks: int = 0
    api_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    api_reply: tuple[int, dict[str, Any]] = (200, {"ok": True})
    fail: set[str] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)

    def status(self) -> StatusOutput:
        if "status" in self.fail:
            raise RuntimeError("status exploded: password=hunter2")
        return StatusOutput(
            node="node-1",
            ready=self.is_ready,
            stacks=[
                StackStatus(
                    stack="web",
                    sync=SyncStatus(status="Synced", revision="abc123"),
                    health=HealthStatus(status="Healthy"),
                )
            ],
        )

    def ready(self) -> bool:
        return self.is_ready

    def on_webhook(self) -> None:
        if "webhook" in self.fail:
            raise RuntimeError("queue closed: token=hunter2")
        self.webhooks += 1

    def api(self, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.api_calls.append((name, body))
        if "api" in self.fail:
            raise RuntimeError("api exploded: password=hunter2")
        return self.api_reply


@dataclass
class Served:
    http: AgentHttp
    fakes: Fakes

    def url(self, path: str) -> str:
        host, port = self.http.address
        return f"http://{host}:{port}{path}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url(path), timeout=TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url(path), timeout=TIMEOUT, **kwargs)

    def raw(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """A request exactly as given (no Content-Length added), through http.client."""
        host, port = self.http.address
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


Serve = Callable[..., Served]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start AgentHttp on 127.0.0.1:0 with recording fakes; every server started is stopped in teardown."""
    started: list[AgentHttp] = []

    def start(fakes: Fakes | None = None, **overrides: Any) -> Served:
        fakes = fakes or Fakes()
        kwargs: dict[str, Any] = {
            "status": fakes.status,
            "ready": fakes.ready,
            "metrics": fakes.metrics,
            "on_webhook": fakes.on_webhook,
            "webhook": WebhookAuth(github_secret=SECRET, gitlab_token=TOKEN),
            "api": fakes.api,
        }
        kwargs.update(overrides)
        http_ = AgentHttp("127.0.0.1", 0, **kwargs)
        started.append(http_)
        http_.start()
        return Served(http_, fakes)

    yield start
    for http_ in started:
        http_.stop()


# --- probes, status, metrics -------------------------------------------------------------------------------


def test_healthz_is_ok_while_the_process_lives(serve: Serve) -> None:
    served = serve()
    r = served.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok")
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["Content-Length"] == "2"


def test_readyz_is_503_until_ready_then_200(serve: Serve) -> None:
    served = serve()
    r = served.get("/readyz")
    assert (r.status_code, r.text) == (503, "not ready")
    served.fakes.is_ready = True
    r = served.get("/readyz")
    assert (r.status_code, r.text) == (200, "ready")


def test_status_is_the_status_output_model_as_json(serve: Serve) -> None:
    served = serve()
    r = served.get("/status")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert StatusOutput.model_validate_json(r.content) == served.fakes.status()
    assert r.json()["stacks"][0]["sync"] == {"status": "Synced", "revision": "abc123", "error": None, "at": None}


def test_metrics_expose_every_metric_after_observations(serve: Serve) -> None:
    served = serve()
    m = served.fakes.metrics
    m.reconcile_duration.observe(0.004)
    m.passes.labels(result="success").inc()
    m.drift_corrections.labels(stack="web").inc(2)
    m.git_fetch_failures.inc()
    m.set_stack_error("api", "bundle api.dab: services.web.Image: required")
    m.set_applied_revision("web", "abc123")
    m.set_containers({("web", "frontend", "running"): 3})

    r = served.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    text = r.text
    for line in (
        'dabctl_reconcile_duration_seconds_bucket{le="0.005"} 1.0',
        "dabctl_reconcile_duration_seconds_count 1.0",
        'dabctl_reconcile_passes_total{result="success"} 1.0',
        'dabctl_reconcile_passes_total{result="failure"} 0.0',
        'dabctl_reconcile_passes_total{result="noop"} 0.0',
        'dabctl_drift_corrections_total{stack="web"} 2.0',
        "dabctl_git_fetch_failures_total 1.0",
        'dabctl_stack_error{error="bundle api.dab: services.web.Image: required",stack="api"} 1.0',
        'dabctl_applied_revision_info{revision="abc123",stack="web"} 1.0',
        'dabctl_managed_containers{service="frontend",stack="web",state="running"} 3.0',
    ):
        assert line in text


def test_head_answers_headers_without_a_body(serve: Serve) -> None:
    r = requests.head(serve().url("/healthz"), timeout=TIMEOUT)
    assert (r.status_code, r.headers["Content-Length"], r.content) == (200, "2", b"")


# --- metrics, without HTTP ---------------------------------------------------------------------------------


def test_metrics_use_their_own_registry() -> None:
    Metrics()
    Metrics()  # a second instance does not collide with the first
    assert REGISTRY.get_sample_value("dabctl_git_fetch_failures_total") is None


def test_stack_error_replaces_the_previous_series_and_none_clears_it() -> None:
    m = Metrics()
    m.set_stack_error("web", "first failure")
    m.set_stack_error("api", "other stack")
    m.set_stack_error("web", "second\nfailure")
    assert stack_error_series(m) == {("web", "second failure"), ("api", "other stack")}
    m.set_stack_error("web", None)
    assert stack_error_series(m) == {("api", "other stack")}
    m.set_stack_error("api", "x" * 500)
    assert stack_error_series(m) == {("api", "x" * 200)}


def stack_error_series(m: Metrics) -> set[tuple[str, str]]:
    return {
        (s.labels["stack"], s.labels["error"])
        for metric in m.registry.collect()
        for s in metric.samples
        if s.name == "dabctl_stack_error" and s.value == 1
    }


def test_applied_revision_keeps_one_series_per_stack() -> None:
    m = Metrics()
    m.set_applied_revision("web", "aaa")
    m.set_applied_revision("web", "bbb")
    assert m.registry.get_sample_value("dabctl_applied_revision_info", {"stack": "web", "revision": "aaa"}) is None
    assert m.registry.get_sample_value("dabctl_applied_revision_info", {"stack": "web", "revision": "bbb"}) == 1


def test_set_containers_replaces_all_series() -> None:
    m = Metrics()
    m.set_containers({("web", "frontend", "running"): 3, ("web", "frontend", "exited"): 1})
    m.set_containers({("web", "frontend", "running"): 2})
    labels = {"stack": "web", "service": "frontend"}
    assert m.registry.get_sample_value("dabctl_managed_containers", {**labels, "state": "running"}) == 2
    assert m.registry.get_sample_value("dabctl_managed_containers", {**labels, "state": "exited"}) is None
    m.set_containers({})
    assert m.registry.get_sample_value("dabctl_managed_containers", {**labels, "state": "running"}) is None


# --- webhook -----------------------------------------------------------------------------------------------

PUSH = b'{"ref": "refs/heads/main"}'


def test_webhook_with_a_correct_github_signature_triggers_once(serve: Serve) -> None:
    served = serve()
    r = served.post(
        "/webhook", data=PUSH, headers={"X-Hub-Signature-256": github_signature(PUSH), "X-GitHub-Event": "push"}
    )
    assert (r.status_code, r.json()) == (202, {"accepted": True})
    assert served.fakes.webhooks == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Hub-Signature-256": github_signature(PUSH, secret=b"wrong")},
        {"X-Hub-Signature-256": github_signature(b"another body")},
        {"X-Hub-Signature-256": "sha256="},
        {"X-Hub-Signature-256": "sha1=" + hmac.new(SECRET, PUSH, hashlib.sha1).hexdigest()},
        {"X-Gitlab-Token": TOKEN + "x"},
        {"X-Gitlab-Token": ""},
    ],
    ids=["missing", "wrong-secret", "other-body", "empty-digest", "sha1", "gitlab-wrong", "gitlab-empty"],
)
def test_webhook_without_a_valid_signature_is_401_and_does_not_trigger(serve: Serve, headers: dict[str, str]) -> None:
    served = serve()
    r = served.post("/webhook", data=PUSH, headers=headers)
    assert (r.status_code, r.json()) == (401, {"error": "invalid signature"})
    assert served.fakes.webhooks == 0


def test_webhook_with_the_gitlab_token_triggers(serve: Serve) -> None:
    served = serve()
    r = served.post("/webhook", data=PUSH, headers={"X-Gitlab-Token": TOKEN, "X-Gitlab-Event": "Push Hook"})
    assert (r.status_code, r.json()) == (202, {"accepted": True})
    assert served.fakes.webhooks == 1


def test_github_ping_is_answered_without_triggering(serve: Serve) -> None:
    served = serve()
    ping = b'{"zen": "Keep it logically awesome."}'
    r = served.post(
        "/webhook", data=ping, headers={"X-GitHub-Event": "ping", "X-Hub-Signature-256": github_signature(ping)}
    )
    assert r.status_code == 200
    r = served.post("/webhook", data=ping, headers={"X-GitHub-Event": "ping"})
    assert r.status_code == 401  # an unsigned ping proves nothing
    assert served.fakes.webhooks == 0


@pytest.mark.parametrize("webhook", [None, WebhookAuth()], ids=["none", "neither-configured"])
def test_webhook_not_configured_is_404(serve: Serve, webhook: WebhookAuth | None) -> None:
    served = serve(webhook=webhook)
    r = served.post("/webhook", data=PUSH, headers={"X-Hub-Signature-256": github_signature(PUSH)})
    assert r.status_code == 404
    assert served.fakes.webhooks == 0


def test_webhook_body_over_1_mib_is_413_and_unread(serve: Serve) -> None:
    served = serve()
    body = b"x" * (MAX_BODY + 1)
    r = served.post("/webhook", data=body, headers={"X-Hub-Signature-256": github_signature(body)})
    assert r.status_code == 413
    assert served.fakes.webhooks == 0


def test_webhook_body_of_exactly_1_mib_is_accepted(serve: Serve) -> None:
    served = serve()
    body = b"x" * MAX_BODY
    r = served.post("/webhook", data=body, headers={"X-Hub-Signature-256": github_signature(body)})
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 411),
        ({"Transfer-Encoding": "chunked"}, 411),
        ({"Content-Length": "-1"}, 400),
        ({"Content-Length": "1_0"}, 400),
    ],
)
def test_webhook_body_length_must_be_given(serve: Serve, headers: dict[str, str], status: int) -> None:
    served = serve()
    code, body = served.raw("POST", "/webhook", headers={"X-Hub-Signature-256": github_signature(b""), **headers})
    assert code == status
    assert "error" in json.loads(body)
    assert served.fakes.webhooks == 0


def test_webhook_callback_failure_is_500_without_details(serve: Serve) -> None:
    served = serve(Fakes(fail={"webhook"}))
    r = served.post("/webhook", data=PUSH, headers={"X-Gitlab-Token": TOKEN})
    assert (r.status_code, r.json()) == (500, {"error": "internal error"})
    assert "hunter2" not in r.text


def test_webhook_only_listener_serves_nothing_else(serve: Serve) -> None:
    served = serve(webhook_only=True)
    for path in ("/status", "/healthz", "/readyz", "/metrics"):
        assert served.get(path).status_code == 404, path
    assert served.post("/api/reconcile", json={}).status_code == 404
    r = served.post("/webhook", data=PUSH, headers={"X-Hub-Signature-256": github_signature(PUSH)})
    assert r.status_code == 202
    assert served.fakes.api_calls == []


# --- the CLI's API -----------------------------------------------------------------------------------------


def test_api_passes_name_and_body_and_returns_its_reply(serve: Serve) -> None:
    served = serve(Fakes(api_reply=(409, {"error": "stack web is suspended"})))
    r = served.post("/api/reconcile", json={"stack": "web"})
    assert (r.status_code, r.json()) == (409, {"error": "stack web is suspended"})
    assert served.fakes.api_calls == [("reconcile", {"stack": "web"})]


def test_api_with_an_empty_body_gets_an_empty_object(serve: Serve) -> None:
    served = serve()
    assert served.post("/api/resume").status_code == 200
    assert served.fakes.api_calls == [("resume", {})]


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"json": ["a", "list"]}, 400),
        ({"data": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}, 400),
        ({"data": b'{"stack": "web"}', "headers": {"Content-Type": "text/plain"}}, 415),
        ({"json": {"stack": "web"}, "headers": {"Origin": "http://evil.example"}}, 403),
        ({"data": b"x" * (MAX_BODY + 1), "headers": {"Content-Type": "application/json"}}, 413),
    ],
    ids=["invalid-json", "not-an-object", "too-deep", "not-json-type", "browser-origin", "too-large"],
)
def test_api_rejects_bad_requests_without_calling(serve: Serve, kwargs: dict[str, Any], status: int) -> None:
    served = serve()
    r = served.post("/api/suspend", **kwargs)
    assert r.status_code == status
    assert "error" in r.json()
    assert served.fakes.api_calls == []


def test_api_is_404_when_there_is_none(serve: Serve) -> None:
    served = serve(api=None)
    assert served.post("/api/reconcile", json={}).status_code == 404


@pytest.mark.parametrize("fail", ["api", "status"])
def test_callback_errors_are_500_without_traceback_and_logged(
    serve: Serve, caplog: pytest.LogCaptureFixture, fail: str
) -> None:
    served = serve(Fakes(fail={fail}))
    with caplog.at_level(logging.ERROR, logger="dabctl.http"):
        r = served.post("/api/rollback", json={}) if fail == "api" else served.get("/status")
    assert (r.status_code, r.json()) == (500, {"error": "internal error"})
    assert "Traceback" not in r.text and "exploded" not in r.text
    assert any(rec.exc_info and "exploded" in str(rec.exc_info[1]) for rec in caplog.records)


# --- routing, protocol, hygiene ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/nope", 404),
        ("GET", "/api/", 404),
        ("POST", "/api/../status", 404),
        ("POST", "/healthz", 405),
        ("DELETE", "/status", 405),
        ("GET", "/webhook", 405),
        ("GET", "/api/reconcile", 405),
        ("GET", "/status?verbose=1", 200),
    ],
)
def test_routing(serve: Serve, method: str, path: str, status: int) -> None:
    served = serve()
    code, body = served.raw(method, path, headers={"Content-Length": "0"})
    assert code == status
    if status != 200:
        assert "error" in json.loads(body)


def test_405_names_the_allowed_methods(serve: Serve) -> None:
    r = serve().post("/metrics")
    assert (r.status_code, r.headers["Allow"]) == (405, "GET, HEAD")


def test_unknown_method_and_bad_request_line_get_short_text(serve: Serve) -> None:
    served = serve()
    code, body = served.raw("BREW", "/healthz")
    assert (code, body) == (501, b"501 Not Implemented\n")
    host, port = served.http.address
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /a b HTTP/1.1\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.0 400 ")
    assert b"<html" not in reply.lower() and b"Content-Length: " in reply


def test_no_per_request_stderr_and_no_secrets_in_logs(
    serve: Serve, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    served = serve()
    with caplog.at_level(logging.DEBUG, logger="dabctl.http"):
        served.get("/healthz")
        served.post("/webhook", data=PUSH, headers={"X-Gitlab-Token": TOKEN})
        served.post("/webhook", data=PUSH, headers={"X-Gitlab-Token": "guess-" + TOKEN})
    assert capfd.readouterr().err == ""
    assert any("GET /healthz" in rec.getMessage() for rec in caplog.records)  # at DEBUG, through the logger
    assert not any(TOKEN in rec.getMessage() or SECRET.decode() in rec.getMessage() for rec in caplog.records)
    assert TOKEN not in repr(WebhookAuth(github_secret=SECRET, gitlab_token=TOKEN))
    assert SECRET.decode() not in repr(WebhookAuth(github_secret=SECRET, gitlab_token=TOKEN))


def test_stop_releases_the_port_and_is_idempotent(serve: Serve) -> None:
    served = serve()
    host, port = served.http.address
    assert port != 0
    served.http.stop()
    served.http.stop()
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass


def test_start_on_a_taken_port_says_where() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fakes = Fakes()
        http_ = AgentHttp(
            "127.0.0.1", port, status=fakes.status, ready=fakes.ready, metrics=fakes.metrics,
            on_webhook=fakes.on_webhook, webhook=None,
        )  # fmt: skip
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            http_.start()


# --- WebhookAuth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "headers", "expected"),
    [
        (WebhookAuth(github_secret=SECRET), {"X-Hub-Signature-256": github_signature(PUSH)}, True),
        (WebhookAuth(github_secret=SECRET), {"x-hub-signature-256": github_signature(PUSH).upper()}, True),
        (WebhookAuth(github_secret=SECRET), {"X-Gitlab-Token": TOKEN}, False),
        (WebhookAuth(gitlab_token=TOKEN), {"X-Gitlab-Token": TOKEN}, True),
        (WebhookAuth(gitlab_token=TOKEN), {"X-Hub-Signature-256": github_signature(PUSH)}, False),
        (WebhookAuth(gitlab_token=TOKEN), {"X-Gitlab-Token": "tökén"}, False),
        (WebhookAuth(), {"X-Hub-Signature-256": github_signature(PUSH), "X-Gitlab-Token": TOKEN}, False),
    ],
)
def test_webhook_auth_verify(auth: WebhookAuth, headers: dict[str, str], expected: bool) -> None:
    assert auth.verify(headers, PUSH) is expected


@pytest.mark.parametrize("kwargs", [{"github_secret": b""}, {"gitlab_token": ""}])
def test_webhook_auth_refuses_empty_secrets(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="empty"):
        WebhookAuth(**kwargs)
