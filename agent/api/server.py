"""The agent's HTTP endpoints: probes, /metrics, /status, the CLI's API and the git forge webhook.

The main listener (loopback by default) serves everything. A second, public listener built with
`webhook_only=True` serves only `/webhook`, because git forges cannot present client certificates; its requests
are authenticated by the HMAC signature (GitHub) or the shared token (GitLab), and nothing else is reachable there.

Responses are always JSON or plain text with a Content-Length. A failing callback is logged and answered with
500 `{"error": "internal error"}`: clients never see a traceback or an exception's text.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from agent.metrics import Metrics
from schemas.output import StatusOutput

_LOG = logging.getLogger("dabctl.http")

MAX_BODY = 1 << 20  # 1 MiB, for webhook payloads and API requests alike
_API_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_SOCKET_TIMEOUT = 10.0  # a client that stalls mid-request loses its thread after this long
# After an error answered without reading the request body, keep reading (and discarding) for a short while
# before closing: closing a socket with unread data sends a TCP reset, which can destroy the response in flight.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 4 * MAX_BODY
_POLL_INTERVAL = 0.1  # how soon serve_forever notices stop()

ApiHandler = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class WebhookAuth:
    """How webhook requests prove they come from the forge; at least one of the two, and neither empty."""

    github_secret: bytes | None = field(default=None, repr=False)  # X-Hub-Signature-256: sha256=HMAC(body)
    gitlab_token: str | None = field(default=None, repr=False)  # X-Gitlab-Token: the token itself

    def __post_init__(self) -> None:
        # An empty secret would make every request verifiable (HMAC with an empty key, or "" == ""): refuse it.
        if self.github_secret is not None and not self.github_secret:
            raise ValueError("webhook GitHub secret is empty: set a secret or leave it unset")
        if self.gitlab_token is not None and not self.gitlab_token:
            raise ValueError("webhook GitLab token is empty: set a token or leave it unset")

    @property
    def configured(self) -> bool:
        return self.github_secret is not None or self.gitlab_token is not None

    def verify(self, headers: Mapping[str, str], body: bytes) -> bool:
        """True when the GitHub signature or the GitLab token matches; False when neither is configured.

        Header names are matched case-insensitively; comparisons are constant-time.
        """
        lowered = {name.lower(): value for name, value in headers.items()}
        ok = False
        signature = lowered.get("x-hub-signature-256")
        if self.github_secret is not None and signature is not None:
            expected = "sha256=" + hmac.new(self.github_secret, body, hashlib.sha256).hexdigest()
            ok |= hmac.compare_digest(expected.encode(), signature.strip().lower().encode("utf-8", "replace"))
        token = lowered.get("x-gitlab-token")
        if self.gitlab_token is not None and token is not None:
            ok |= hmac.compare_digest(self.gitlab_token.encode(), token.encode("utf-8", "replace"))
        return ok


class _Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, payload: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    return _Reply(status, body, "application/json", headers)


def _text(status: int, text: str) -> _Reply:
    return _Reply(status, text.encode(), "text/plain; charset=utf-8")


def _error(status: int, message: str) -> _Reply:
    return _json(status, {"error": message})


_NOT_FOUND = _error(404, "not found")
_INTERNAL = _error(500, "internal error")
_GET = ("GET", "HEAD")
_POST = ("POST",)


class AgentHttp:
    """The agent's HTTP endpoints on a ThreadingHTTPServer (stdlib http.server), in a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        status: Callable[[], StatusOutput],
        ready: Callable[[], bool],
        metrics: Metrics,
        on_webhook: Callable[[], None],
        webhook: WebhookAuth | None,
        api: ApiHandler | None = None,
        webhook_only: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self.status = status
        self.ready = ready
        self.metrics = metrics
        self.on_webhook = on_webhook
        self.webhook = webhook if webhook is not None and webhook.configured else None
        self.api = api
        self.webhook_only = webhook_only
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread; OSError (one line naming the address) when the bind fails."""
        if self._server is not None:
            raise RuntimeError("agent HTTP server already started")
        try:
            server = _Server((self._host, self._port), self)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}") from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"dabctl-http-{self.address[1]}",
            daemon=True,
        )
        self._thread.start()
        _LOG.info("listening on http://%s:%d%s", *self.address, " (webhook only)" if self.webhook_only else "")

    def stop(self) -> None:
        """Stop accepting, close the socket and join the serving thread. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): with port 0, the ephemeral port the kernel chose."""
        if self._server is None:
            raise RuntimeError("agent HTTP server not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def allowed_methods(self, path: str) -> tuple[str, ...] | None:
        """The methods `path` answers to on this listener; None when it does not exist here."""
        if path == "/webhook":
            return _POST if self.webhook is not None else None
        if self.webhook_only:
            return None
        if path in ("/healthz", "/readyz", "/metrics", "/status"):
            return _GET
        if path.startswith("/api/") and self.api is not None and _API_NAME.fullmatch(path[len("/api/") :]):
            return _POST
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: AgentHttp) -> None:
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup, slow when DNS is broken) only to
        # fill server_name, which nothing here uses.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            _LOG.debug("connection from %s ended: %s", client_address, exc)
        else:
            _LOG.exception("unhandled error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dabctl"
    sys_version = ""  # no Python version in the Server header
    timeout = _SOCKET_TIMEOUT
    # HTTP/1.0: one request per connection, so stop() leaves no idle keep-alive connection still serving.
    protocol_version = "HTTP/1.0"

    _body_pending = False

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self._body_pending = self._declares_body()
        try:
            reply = self._route(path)
        except Exception:
            _LOG.exception("%s %s failed", self.command, path)
            reply = _INTERNAL
        self._send(reply)

    def _route(self, path: str) -> _Reply:
        app = self.server.app
        allowed = app.allowed_methods(path)
        if allowed is None:
            return _NOT_FOUND
        if self.command not in allowed:
            return _json(405, {"error": "method not allowed"}, (("Allow", ", ".join(allowed)),))
        if path == "/healthz":
            return _text(200, "ok")
        if path == "/readyz":
            return _text(200, "ready") if app.ready() else _text(503, "not ready")
        if path == "/metrics":
            body, content_type = app.metrics.render()
            return _Reply(200, body, content_type)
        if path == "/status":
            return _Reply(200, app.status().model_dump_json().encode(), "application/json")
        if path == "/webhook":
            return self._webhook(app)
        return self._api(app, path[len("/api/") :])

    def _webhook(self, app: AgentHttp) -> _Reply:
        auth = app.webhook
        assert auth is not None  # allowed_methods serves /webhook only when configured
        body = self._read_body()
        if isinstance(body, _Reply):
            return body
        if not auth.verify(dict(self.headers.items()), body):
            _LOG.warning("webhook from %s rejected: invalid signature", self.client_address[0])
            return _error(401, "invalid signature")
        if self.headers.get("X-GitHub-Event") == "ping":
            # GitHub sends a signed ping when the hook is created: it proves the secret, it is not a change.
            return _json(200, {"accepted": False, "event": "ping"})
        app.on_webhook()
        return _json(202, {"accepted": True})

    def _api(self, app: AgentHttp, name: str) -> _Reply:
        assert app.api is not None  # allowed_methods serves /api/ only when there is an API
        # A browser sends Origin on every POST: refusing it keeps web pages (cross-site requests, DNS rebinding)
        # from driving the loopback API. The CLI sends none.
        if self.headers.get("Origin") is not None:
            return _error(403, "browser requests are not accepted")
        body = self._read_body()
        if isinstance(body, _Reply):
            return body
        if body and self.headers.get_content_type() != "application/json":
            return _error(415, "request body must be application/json")
        try:
            request = json.loads(body) if body else {}
        except (ValueError, RecursionError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(request, dict):
            return _error(400, "request body must be a JSON object")
        status, payload = app.api(name, request)
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"API handler for {name!r} returned status {status!r}")
        return _json(status, payload)

    def _declares_body(self) -> bool:
        length = self.headers.get("Content-Length")
        return self.headers.get("Transfer-Encoding") is not None or (length is not None and length.strip() != "0")

    def _read_body(self) -> bytes | _Reply:
        """The request body, or the error reply: 411 without a length, 413 over MAX_BODY (left unread)."""
        if self.headers.get("Transfer-Encoding") is not None:
            return _error(411, "Content-Length required")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return _error(411, "Content-Length required")
        if len({value.strip() for value in lengths}) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            return _error(400, "invalid Content-Length")
        length = int(lengths[0])
        if length > MAX_BODY:
            return _error(413, f"request body over {MAX_BODY} bytes")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return _error(408, "request body not received in time")
        if len(body) != length:
            return _error(400, "request body shorter than Content-Length")
        self._body_pending = False
        return body

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
        if self._body_pending:
            self._discard_body()

    def _discard_body(self) -> None:
        """Half-close, then drain what the client is still sending, so the reply arrives before the close."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_SECONDS)
            remaining = _LINGER_BYTES
            while remaining > 0:
                chunk = self.connection.recv(min(65536, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # the client went away or stalled: nothing more to do for it

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, unknown method) as short text, not the stdlib's HTML page."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = f"{code} {phrase}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        _LOG.debug("%s %s", self.address_string(), format % args)
