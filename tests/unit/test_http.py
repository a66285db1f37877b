"""The agent's HTTP endpoints, served for real on loopback (port 0) and a unix socket, called with requests."""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

from agent.api.client import UnixConnection
from agent.api.server import MAX_BODY, AgentHttp, Kind, Limits, Listener, RateLimit, WebhookAuth
from agent.metrics import Metrics
from schemas.output import HealthStatus, StackStatus, StatusOutput, SyncStatus
from tests.support.polling import wait_for

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
    listener: Listener

    def url(self, path: str) -> str:
        host, port = self.listener.address
        return f"http://{host}:{port}{path}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url(path), timeout=TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url(path), timeout=TIMEOUT, **kwargs)

    def raw(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """A request exactly as given (no Content-Length added), through http.client, over TCP or the socket."""
        if self.listener.path is not None:
            conn: http.client.HTTPConnection = UnixConnection(self.listener.path, TIMEOUT)
        else:
            conn = http.client.HTTPConnection(*self.listener.address, timeout=TIMEOUT)
        try:
            conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def call(
        self, path: str, body: bytes = b"", content_type: str | None = "application/json", **headers: str
    ) -> tuple[int, Any]:
        """POST over the control socket; the status and the JSON answer."""
        head = {"Content-Length": str(len(body)), **headers}
        if content_type:
            head["Content-Type"] = content_type
        code, raw = self.raw("POST", path, body, head)
        return code, json.loads(raw)


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start AgentHttp with recording fakes on 127.0.0.1:0 (or only its control socket, or only a webhook
    listener); every server started is stopped in teardown."""
    started: list[AgentHttp] = []

    def start(
        fakes: Fakes | None = None, *, kind: Kind = Kind.HTTP, allowed_hosts: tuple[str, ...] = (), **overrides: Any
    ) -> Served:
        fakes = fakes or Fakes()
        kwargs: dict[str, Any] = {
            "status": fakes.status,
            "ready": fakes.ready,
            "metrics": fakes.metrics,
            "on_webhook": fakes.on_webhook,
            "webhook": WebhookAuth(github_secret=SECRET, gitlab_token=TOKEN),
            "api": {
                name: functools.partial(fakes.api, name) for name in ("reconcile", "rollback", "suspend", "resume")
            },
        }
        kwargs.update(overrides)
        http_ = AgentHttp(**kwargs)
        if kind is Kind.CONTROL:
            listener = http_.add_unix(tmp_path / f"agent-{len(started)}.sock")
        else:
            listener = http_.add_tcp("127.0.0.1", 0, webhook_only=kind is Kind.WEBHOOK, allowed_hosts=allowed_hosts)
        started.append(http_)
        http_.start()
        return Served(http_, fakes, listener)

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
    body = b"0\r\n\r\n" if "Transfer-Encoding" in headers else None
    code, _ = served.raw("POST", "/webhook", body, headers={"X-Hub-Signature-256": github_signature(b""), **headers})
    assert code == status
    assert served.fakes.webhooks == 0


def test_webhook_callback_failure_is_500_without_details(serve: Serve) -> None:
    served = serve(Fakes(fail={"webhook"}))
    r = served.post("/webhook", data=PUSH, headers={"X-Gitlab-Token": TOKEN})
    assert (r.status_code, r.json()) == (500, {"error": "internal error"})
    assert "hunter2" not in r.text


def test_webhook_only_listener_serves_nothing_else(serve: Serve) -> None:
    served = serve(kind=Kind.WEBHOOK)
    for path in ("/status", "/healthz", "/readyz", "/metrics"):
        assert served.get(path).status_code == 404, path
    assert served.post("/api/reconcile", json={}).status_code == 404
    r = served.post("/webhook", data=PUSH, headers={"X-Hub-Signature-256": github_signature(PUSH)})
    assert r.status_code == 202
    assert served.fakes.api_calls == []


def test_webhook_is_rate_limited_per_source_address(serve: Serve) -> None:
    served = serve(limits=Limits(webhook_per_minute=10, webhook_burst=5))
    signed = {"X-Hub-Signature-256": github_signature(PUSH)}
    codes = [served.post("/webhook", data=PUSH, headers=signed).status_code for _ in range(5)]
    assert codes == [202] * 5
    r = served.post("/webhook", data=PUSH, headers=signed)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "6")  # one token every 6 s at 10 a minute
    assert served.fakes.webhooks == 5
    assert served.get("/healthz").status_code == 200, "the limit is the webhook's only"


def test_rate_limit_refills_and_keeps_addresses_apart() -> None:
    now = [0.0]
    limit = RateLimit(per_minute=10, burst=5, clock=lambda: now[0])
    assert [limit.take("10.0.0.1") for _ in range(5)] == [0.0] * 5
    assert limit.take("10.0.0.1") == pytest.approx(6.0)
    assert limit.take("10.0.0.2") == 0.0, "another address has its own bucket"
    now[0] += 6.0
    assert limit.take("10.0.0.1") == 0.0
    assert limit.take("10.0.0.1") > 0


# --- the control socket: the CLI's API -----------------------------------------------------------------------


def test_api_passes_name_and_body_and_returns_its_reply(serve: Serve) -> None:
    served = serve(Fakes(api_reply=(409, {"error": "stack web is suspended"})), kind=Kind.CONTROL)
    assert served.call("/api/reconcile", b'{"stack": "web"}') == (409, {"error": "stack web is suspended"})
    assert served.fakes.api_calls == [("reconcile", {"stack": "web"})]


def test_api_with_an_empty_body_gets_an_empty_object(serve: Serve) -> None:
    served = serve(kind=Kind.CONTROL)
    assert served.call("/api/resume", content_type=None)[0] == 200
    assert served.fakes.api_calls == [("resume", {})]


def test_control_socket_serves_status_and_is_root_only(serve: Serve) -> None:
    served = serve(kind=Kind.CONTROL)
    code, body = served.raw("GET", "/status")
    assert code == 200 and json.loads(body)["node"] == "node-1"
    assert served.listener.path is not None
    st = served.listener.path.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    for path in ("/healthz", "/metrics", "/webhook"):
        assert served.raw("GET", path)[0] == 404, path


@pytest.mark.parametrize(
    ("body", "content_type", "headers", "status"),
    [
        (b"{not json", "application/json", {}, 400),
        (b'["a", "list"]', "application/json", {}, 400),
        (b"[" * 100_000, "application/json", {}, 400),
        (b'{"stack": "web"}', "text/plain", {}, 415),
        (b'{"stack": "web"}', "application/json", {"Origin": "http://evil.example"}, 403),
        (b"x" * (MAX_BODY + 1), "application/json", {}, 413),
    ],
    ids=["invalid-json", "not-an-object", "too-deep", "not-json-type", "browser-origin", "too-large"],
)
def test_api_rejects_bad_requests_without_calling(
    serve: Serve, body: bytes, content_type: str, headers: dict[str, str], status: int
) -> None:
    served = serve(kind=Kind.CONTROL)
    code, doc = served.call("/api/suspend", body, content_type, **headers)
    assert code == status
    assert "error" in doc
    assert served.fakes.api_calls == []


def test_the_tcp_listener_never_serves_the_api(serve: Serve) -> None:
    served = serve()
    for name in ("reconcile", "rollback", "suspend", "resume"):
        assert served.post(f"/api/{name}", json={"stack": "web"}).status_code == 404
    assert served.fakes.api_calls == []
    assert {r.path for r in served.http.routes() if r.changes} == {"/webhook"}


def test_unknown_api_calls_are_404(serve: Serve) -> None:
    served = serve(kind=Kind.CONTROL, api={})
    assert served.call("/api/reconcile", b"{}")[0] == 404


@pytest.mark.parametrize("fail", ["api", "status"])
def test_callback_errors_are_500_without_traceback_and_logged(
    serve: Serve, caplog: pytest.LogCaptureFixture, fail: str
) -> None:
    served = serve(Fakes(fail={fail}), kind=Kind.CONTROL)
    with caplog.at_level(logging.ERROR, logger="dabctl.http"):
        code, body = served.call("/api/rollback", b"{}") if fail == "api" else served.raw("GET", "/status")
    assert (code, json.loads(body) if isinstance(body, bytes) else body) == (500, {"error": "internal error"})
    assert b"Traceback" not in str(body).encode() and "exploded" not in str(body)
    assert any(rec.exc_info and "exploded" in str(rec.exc_info[1]) for rec in caplog.records)


def test_a_stale_control_socket_is_replaced_and_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    fakes = Fakes()
    http_ = AgentHttp(
        status=fakes.status, ready=fakes.ready, metrics=fakes.metrics, on_webhook=fakes.on_webhook, webhook=None
    )
    http_.add_unix(path)
    http_.start()
    try:
        assert Served(http_, fakes, http_.listeners[0]).raw("GET", "/status")[0] == 200
    finally:
        http_.stop()
    assert not path.exists(), "stop removes the socket"
    path.write_text("not a socket")
    http_ = AgentHttp(
        status=fakes.status, ready=fakes.ready, metrics=fakes.metrics, on_webhook=fakes.on_webhook, webhook=None
    )
    http_.add_unix(path)
    with pytest.raises(OSError, match="exists and is not a socket"):
        http_.start()
    assert path.read_text() == "not a socket"


# --- Host check (DNS rebinding) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost", 200),
        ("127.0.0.1:9420", 200),
        ("[::1]:9420", 200),
        ("LOCALHOST", 200),
        ("agent.internal", 200),
        ("evil.example", 403),
        ("evil.example:9420", 403),
        ("127.0.0.1.evil.example", 403),
    ],
)
def test_host_must_be_loopback_the_listen_address_or_allowed(serve: Serve, host: str, status: int) -> None:
    served = serve(allowed_hosts=("agent.internal",))
    assert served.raw("GET", "/status", headers={"Host": host})[0] == status
    assert served.raw("GET", "/healthz", headers={"Host": host})[0] == status
    r = served.post("/webhook", data=PUSH, headers={"Host": host, "X-Hub-Signature-256": github_signature(PUSH)})
    assert r.status_code == 202, "the webhook is exempt: its signature is the check"


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
    code, body = served.raw("BREW", "/healthz")  # the HTTP parser refuses methods it does not know
    assert code == 400 and b"<html" not in body.lower() and len(body) < 200
    host, port = served.listener.address
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /a b HTTP/1.1\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))
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
    host, port = served.listener.address
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
            status=fakes.status, ready=fakes.ready, metrics=fakes.metrics, on_webhook=fakes.on_webhook, webhook=None,
        )  # fmt: skip
        http_.add_tcp("127.0.0.1", port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            http_.start()


# --- bounds: connections, deadlines ------------------------------------------------------------------------


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_connections_beyond_the_cap_are_closed_and_probes_still_answer(serve: Serve) -> None:
    served = serve(limits=Limits(max_connections=8, request_deadline=30))
    host, port = served.listener.address
    idle = [socket.create_connection((host, port), timeout=TIMEOUT) for _ in range(20)]
    try:
        # The oldest idle connections make room: 12 closed at once, and /healthz gets a connection of its own.
        wait_for(lambda: sum(_closed_by_peer(s) for s in idle) >= 12, timeout=10)
        assert sum(_closed_by_peer(s) for s in idle[:12]) == 12, "the longest-waiting ones go first"
        started = time.monotonic()
        assert served.get("/healthz").status_code == 200
        assert time.monotonic() - started < 1
    finally:
        for s in idle:
            s.close()


def test_a_request_that_does_not_arrive_whole_in_time_is_closed(serve: Serve) -> None:
    served = serve(limits=Limits(request_deadline=0.5, sweep_interval=0.1))
    host, port = served.listener.address
    with (
        socket.create_connection((host, port), timeout=TIMEOUT) as slow,
        socket.create_connection((host, port)) as idle,
    ):
        slow.sendall(b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12")
        started = time.monotonic()
        wait_for(lambda: _closed_by_peer(idle), timeout=5)
        reply = slow.recv(4096)  # the webhook's body stalls: 408 at the deadline
        assert reply.startswith(b"HTTP/1.1 408 ") or reply == b""
        assert time.monotonic() - started < 3
    assert served.fakes.webhooks == 0


# --- WebhookAuth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "headers", "expected"),
    [
        (WebhookAuth(github_secret=SECRET), {"X-Hub-Signature-256": github_signature(PUSH)}, True),
        (WebhookAuth(github_secret=SECRET), {"x-hub-signature-256": github_signature(PUSH).upper()}, True),
        (WebhookAuth(github_secret=SECRET), {"X-Gitlab-Token": TOKEN}, False),
        (WebhookAuth(github_secret=SECRET), {"X-Gitlab-Token": SECRET.decode()}, False),  # never a bearer token
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
