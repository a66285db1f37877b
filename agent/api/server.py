"""The agent's HTTP endpoints: probes, /metrics, /status, the git forge webhook, and the CLI's control calls.

Three kinds of listener, all served by one asyncio loop in one thread (aiohttp's low-level server):

- `http` (`listen`, loopback unless `listen_public`): `/healthz`, `/readyz`, `/metrics`, `/status` and `/webhook`,
  and the read-only web page: `/` (the fleet), `/stacks/<stack>`, its assets under `/ui/` and `/events` (a
  server-sent event per pass that ended, which the page follows). Nothing here changes the agent except a webhook
  with a valid signature, which only wakes the source poller.
  A request whose `Host` is not a loopback name, the listen address or one of `allowed_hosts` is refused (DNS
  rebinding); `/webhook` is exempt, its signature is the check.
- `webhook` (`webhook_listen`): `/webhook` only, because git forges cannot present client certificates.
- `cluster` (`cluster_listen`, default 0.0.0.0:9421; cluster nodes only): traffic between the nodes of a cluster,
  never on `listen`. It serves `POST /cluster/v1/<call>` for the calls the node gives it (today: `join`, which a
  manager answers, and on the leader the changing calls other managers forward: `reconcile`, `rollback`,
  `suspend`, `resume`, for managers only) and nothing else: no probe, no page, no status. TLS with the node's
  certificate from the cluster CA (`ClusterTls`): `GET /cluster/v1/ca` and the calls a node without a certificate
  must make (joining) are open; every other call requires a client certificate from the cluster CA, and calls
  for managers only a manager's (the role is read from the certificate). A plain-HTTP request fails the
  handshake. Every cluster node holds a certificate (`cluster init` / `cluster join`; the agent refuses to
  start without one), so the product always passes `tls`; `add_cluster` without it serves in-process tests.
- `control` (`<state_dir>/agent.sock`, root-owned, 0600 or 0660 with `control_group`): the CLI's changing calls
  (`POST /api/<call>`) and `/status`. The socket's mode is the check, as for dockerd's API socket.

Bounds, so that no client can starve the probes: connections per listener are capped (at the cap, a new
connection closes the longest-waiting connection that has no request in progress, or is itself closed when every
connection has one); a request must arrive whole (headers and body) within `request_deadline` of its connection
or of the previous response, or the connection is closed; the probes answer on the loop itself and never wait for
a thread; `/status` and `/metrics` share a small pool, control calls another, and calls beyond the waiting room
are answered 503. Idle connections cost no thread, which is also what the web page's event streams need: a
stream is exempt from the request deadline (its request arrived whole) but streams are capped (`event_streams`,
the oldest closed first, told so, and its page then polls) and take no thread while they wait.

Responses are JSON or plain text with a Content-Length. A failing callback is logged and answered with 500
`{"error": "internal error"}`: clients never see a traceback or an exception's text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from agent.metrics import Metrics
from agent.web import render
from schemas.output import StatusOutput
from schemas.view import FleetView, StackView

_LOG = logging.getLogger("dabctl.http")

MAX_BODY = 1 << 20  # 1 MiB, for webhook payloads and API requests alike
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_GET = ("GET", "HEAD")
_POST = ("POST",)
CLUSTER_API = "/cluster/v1/"
CLUSTER_CA = "/cluster/v1/ca"
_PROBES = ("/healthz", "/readyz", "/metrics", "/status")
_PAGES = ("/", "/stacks/{stack}", "/events", *(f"/ui/{name}" for name in render.ASSETS))

T = TypeVar("T")
ApiCall = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]
# A call on the cluster listener also gets the peer's address: until nodes present certificates (the PKI issue),
# the address a manager's status records is all that says a caller is one.
ClusterCall = Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]


class PageSource(Protocol):
    """What the web page shows; both calls run in the read pool and must never run a pass."""

    def fleet(self) -> FleetView: ...

    def stack(self, name: str) -> StackView | None: ...


class Kind(Enum):
    """What a listener serves (see the module docstring)."""

    HTTP = "http"
    WEBHOOK = "webhook"
    CONTROL = "control"
    CLUSTER = "cluster"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How much of the agent one listener's clients may take."""

    max_connections: int = 256  # per listener
    request_deadline: float = 10.0  # seconds from a connection (or the previous response) to a whole request
    backlog: int = 1024  # above the connection cap: a flood that fills the queue costs a probe a 1 s SYN retransmit
    control_threads: int = 4  # control calls run at once (each may wait for passes for minutes)
    read_threads: int = 2  # /status and /metrics
    waiting_calls: int = 16  # control calls queued for a thread before new ones are answered 503
    webhook_per_minute: float = 10.0  # per source address, after a burst of `webhook_burst`
    webhook_burst: int = 5
    sweep_interval: float = 0.5
    event_streams: int = 32  # per agent; the oldest is closed when one more opens
    event_heartbeat: float = 15.0  # seconds between keep-alive comments on an idle stream


@dataclass(frozen=True)
class WebhookAuth:
    """How webhook requests prove they come from the forge; at least one of the two, and neither empty.

    A GitHub secret is only ever used as an HMAC key and a GitLab token only compared as a token: a secret
    configured for one is never accepted as the other (a GitHub secret sent as a bearer token is refused)."""

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


@dataclass(frozen=True)
class Route:
    """One path a listener answers, with its methods; `changes` when a call may change the agent or its state."""

    kind: Kind
    path: str
    methods: tuple[str, ...]
    changes: bool


class RateLimit:
    """A token bucket per source address: `burst` at once, refilled at `per_minute`; bounded in addresses."""

    MAX_ADDRESSES = 4096

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def take(self, address: str) -> float:
        """0 when a request from `address` may go ahead (and counts it); else the seconds until one may."""
        now = self.clock()
        tokens, at = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 60.0
        if len(self._buckets) >= self.MAX_ADDRESSES and address not in self._buckets:
            # Forget the addresses whose buckets have refilled: they would start full anyway.
            self._buckets = {a: (t, s) for a, (t, s) in self._buckets.items() if t + (now - s) * self.rate < self.burst}
            if len(self._buckets) >= self.MAX_ADDRESSES:
                return 60.0  # that many distinct addresses flooding at once: refuse the newcomers
        self._buckets[address] = (tokens - 1.0, now)
        return 0.0


@dataclass(frozen=True, kw_only=True)
class ClusterTls:
    """TLS for the cluster listener: the server context (this node's certificate; client certificates asked for
    and verified against the cluster CA when given), the CA certificate served at `GET /cluster/v1/ca`, who a
    client certificate names (`role_of`: its role from the DER, raising a DabctlError for one the cluster does not
    accept), the calls open to a client without a certificate and the calls for managers only."""

    context: ssl.SSLContext
    ca_pem: bytes
    role_of: Callable[[bytes], str]
    open_calls: frozenset[str] = frozenset({"join"})
    manager_calls: frozenset[str] = frozenset()


class Listener:
    """One bound socket of the agent's server: a TCP address or a unix socket path."""

    def __init__(self, kind: Kind, *, tcp: tuple[str, int] | None = None, path: Path | None = None) -> None:
        self.kind = kind
        self.tcp = tcp
        self.path = path
        self.allowed_hosts: frozenset[str] = frozenset()
        self.group: int | None = None
        self.tls: ClusterTls | None = None
        self.sock: socket.socket | None = None
        self.server: _GuardedServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) of a TCP listener: with port 0, the ephemeral port the kernel chose."""
        if self.sock is None or self.tcp is None:
            raise RuntimeError("not a started TCP listener")
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "{}:{}".format(*self.address)


class AgentHttp:
    """The agent's listeners on one aiohttp server loop, in a daemon thread."""

    def __init__(
        self,
        *,
        status: Callable[[], StatusOutput],
        ready: Callable[[], bool],
        metrics: Metrics,
        on_webhook: Callable[[], None],
        webhook: WebhookAuth | None,
        api: Mapping[str, ApiCall] | None = None,
        limits: Limits | None = None,
        page: PageSource | None = None,
        cluster_api: Mapping[str, ClusterCall] | None = None,
    ) -> None:
        """`ready` and `on_webhook` run on the server loop and must not block; the others run in thread pools."""
        self.status = status
        self.ready = ready
        self.metrics = metrics
        self.on_webhook = on_webhook
        self.webhook = webhook if webhook is not None and webhook.configured else None
        self.api = dict(api or {})
        self.cluster_api = dict(cluster_api or {})
        self.limits = limits or Limits()
        self.listeners: list[Listener] = []
        self.rate = RateLimit(self.limits.webhook_per_minute, self.limits.webhook_burst)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._control_pool = ThreadPoolExecutor(self.limits.control_threads, thread_name_prefix="dabctl-control")
        self._read_pool = ThreadPoolExecutor(self.limits.read_threads, thread_name_prefix="dabctl-read")
        self._calls_in_flight = 0
        self._sweeper: asyncio.Task[None] | None = None
        self.page = page
        self._generation = 0  # of the page's data: bumped by changed()
        self._streams: collections.deque[_Stream] = collections.deque()

    # --- configuration ------------------------------------------------------------------------------------------

    def add_tcp(
        self, host: str, port: int, *, webhook_only: bool = False, allowed_hosts: Collection[str] = ()
    ) -> Listener:
        """A TCP listener (before start): probes, metrics, status and the webhook, or the webhook only."""
        listener = Listener(Kind.WEBHOOK if webhook_only else Kind.HTTP, tcp=(host, port))
        listener.allowed_hosts = frozenset(h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, host, *allowed_hosts))
        self.listeners.append(listener)
        return listener

    def add_cluster(self, host: str, port: int, tls: ClusterTls | None = None) -> Listener:
        """The cluster listener (before start): `POST /cluster/v1/<call>` for the calls in `cluster_api` only,
        and with `tls`, `GET /cluster/v1/ca`."""
        listener = Listener(Kind.CLUSTER, tcp=(host, port))
        listener.tls = tls
        self.listeners.append(listener)
        return listener

    def add_unix(self, path: Path, *, group: int | None = None) -> Listener:
        """The control socket (before start): mode 0600, or 0660 owned by `group` when one is given."""
        listener = Listener(Kind.CONTROL, path=path)
        listener.group = group
        self.listeners.append(listener)
        return listener

    def routes(self) -> list[Route]:
        """Every route of every listener: what a test walks to prove who may reach what."""
        out: list[Route] = []
        for listener in self.listeners:
            if listener.kind is Kind.CLUSTER:
                if listener.tls is not None:
                    out.append(Route(listener.kind, CLUSTER_CA, _GET, changes=False))
                out += [
                    Route(listener.kind, f"{CLUSTER_API}{n}", _POST, changes=True) for n in sorted(self.cluster_api)
                ]
                continue
            if listener.kind is not Kind.CONTROL and self.webhook is not None:
                out.append(Route(listener.kind, "/webhook", _POST, changes=True))
            if listener.kind is Kind.HTTP:
                out += [Route(listener.kind, path, _GET, changes=False) for path in _PROBES]
                if self.page is not None:
                    out += [Route(listener.kind, path, _GET, changes=False) for path in _PAGES]
            if listener.kind is Kind.CONTROL:
                out.append(Route(listener.kind, "/status", _GET, changes=False))
                out += [Route(listener.kind, f"/api/{name}", _POST, changes=True) for name in sorted(self.api)]
        return out

    def _methods(self, kind: Kind, path: str) -> tuple[str, ...] | None:
        if path.startswith("/stacks/") and path.count("/") == 2 and len(path) > len("/stacks/"):
            path = "/stacks/{stack}"
        found = [r.methods for r in self.routes() if r.kind is kind and r.path == path]
        return found[0] if found else None

    def changed(self) -> None:
        """The page's data changed (a pass ended): tell every event stream. Thread-safe, never blocks."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us: the agent is stopping
                loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        self._generation += 1
        for stream in self._streams:
            stream.wake.set()

    @property
    def event_streams(self) -> int:
        """Event streams open now."""
        return len(self._streams)

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener and serve in a daemon thread; OSError (one line naming the address) when one fails."""
        if self._thread is not None:
            raise RuntimeError("agent HTTP server already started")
        try:
            for listener in self.listeners:
                listener.sock = _bind(listener, self.limits.backlog)
        except OSError:
            self._close_sockets()
            raise
        loop = asyncio.new_event_loop()
        started: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._thread = threading.Thread(target=self._serve, args=(loop, started), name="dabctl-http", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._wait(started), loop).result(timeout=10)
        for listener in self.listeners:
            _LOG.info("listening on %s (%s)", listener.describe(), listener.kind.value)

    @staticmethod
    async def _wait(started: asyncio.Future[None]) -> None:
        await started

    def _serve(self, loop: asyncio.AbstractEventLoop, started: asyncio.Future[None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open(started))
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _open(self, started: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            server = _GuardedServer(self, listener)
            listener.server = server
            assert listener.sock is not None
            tls = listener.tls.context if listener.tls is not None else None
            await loop.create_server(
                server,
                sock=listener.sock,
                backlog=self.limits.backlog,
                ssl=tls,
                ssl_handshake_timeout=self.limits.request_deadline if tls is not None else None,
            )
        self._sweeper = asyncio.create_task(self._sweep())
        started.set_result(None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            for listener in self.listeners:
                if listener.server is not None:
                    listener.server.sweep()

    async def _shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for stream in self._streams:
            stream.close(None)
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.pre_shutdown()
                with contextlib.suppress(Exception):
                    await listener.server.shutdown(1.0)

    def stop(self) -> None:
        """Stop accepting, close every connection and socket, remove the control socket. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        self._close_sockets()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._control_pool.shutdown(wait=False, cancel_futures=True)
        self._read_pool.shutdown(wait=False, cancel_futures=True)

    def _close_sockets(self) -> None:
        for listener in self.listeners:
            sock, listener.sock = listener.sock, None
            if sock is None:
                continue
            if listener.path is not None:
                _unlink_socket(listener.path)
            sock.close()

    # --- requests -----------------------------------------------------------------------------------------------

    async def handle(self, listener: Listener, request: web.BaseRequest) -> web.StreamResponse:
        server = listener.server
        assert server is not None
        due = server.busy(request.protocol)
        try:
            try:
                reply = await self._route(listener, request, due)
                if reply is None:  # an event stream, served until it closes
                    return await self._events(request)
            except Exception:
                _LOG.exception("%s %s failed", request.method, request.path)
                reply = _INTERNAL
            _LOG.debug("%s %s %s -> %d", request.remote or "-", request.method, request.path_qs, reply.status)
            return reply.response()
        finally:
            server.idle(request.protocol)

    async def _route(self, listener: Listener, request: web.BaseRequest, due: float) -> _Reply | None:
        """The reply, or None for an event stream (checked and allowed: the caller serves it)."""
        if request.method not in _KNOWN_METHODS:
            return _Reply(501, b"501 Not Implemented\n", "text/plain; charset=utf-8")
        path = request.path
        if listener.kind is Kind.HTTP and path != "/webhook" and not _host_allowed(request, listener):
            return _error(403, "Host not allowed: add the name clients use to allowed_hosts")
        allowed = self._methods(listener.kind, path)
        if allowed is None:
            return _NOT_FOUND
        if request.method not in allowed:
            return _json(405, {"error": "method not allowed"}, (("Allow", ", ".join(allowed)),))
        if path == "/healthz":
            return _text(200, "ok")
        if path == "/readyz":
            return _text(200, "ready") if self.ready() else _text(503, "not ready")
        if path == "/metrics":
            body, content_type = await self._in(self._read_pool, self.metrics.render)
            return _Reply(200, body, content_type)
        if path == "/status":
            status = await self._in(self._read_pool, self.status)
            return _Reply(200, status.model_dump_json().encode(), "application/json")
        if path == "/webhook":
            return await self._webhook(request, due)
        if path.startswith("/api/"):
            return await self._api(request, self.api[path.removeprefix("/api/")], due)
        if path.startswith(CLUSTER_API):
            return await self._cluster(listener, request, due)
        return await self._page(request)

    async def _cluster(self, listener: Listener, request: web.BaseRequest, due: float) -> _Reply:
        tls = listener.tls
        if request.path == CLUSTER_CA and tls is not None:
            return _Reply(200, tls.ca_pem, "application/x-pem-file")
        name = request.path.removeprefix(CLUSTER_API)
        if tls is not None and name not in tls.open_calls:
            refused = _client_refused(tls, request, name)
            if refused is not None:
                _LOG.warning("cluster call %s from %s refused: %s", name, request.remote, refused.body.decode())
                return refused
        call = self.cluster_api[name]
        peer = request.remote or ""
        return await self._api(request, lambda body: call(body, peer), due)

    # --- the web page -------------------------------------------------------------------------------------------

    async def _page(self, request: web.BaseRequest) -> _Reply | None:
        page = self.page
        assert page is not None  # routes() serves these paths only with a page
        path = request.path
        if path == "/events":
            return None
        if path.startswith("/ui/"):
            name = path.removeprefix("/ui/")
            return _Reply(200, render.asset(name), render.ASSETS[name], (("Cache-Control", "max-age=300"),))
        fragment = request.query.get("fragment") == "1"
        if path == "/":
            return await self._in(self._read_pool, lambda: _fleet_page(page, fragment))
        return await self._in(self._read_pool, lambda: _stack_page(page, path.removeprefix("/stacks/"), fragment))

    async def _events(self, request: web.BaseRequest) -> web.StreamResponse:
        """`changed` events (the data is the generation) until the client leaves, the cap evicts it, or shutdown."""
        response = web.StreamResponse(headers=dict(_PAGE_HEADERS))
        response.content_type = "text/event-stream"
        response.force_close()  # an ended stream ends its connection: EventSource opens a new one
        await response.prepare(request)
        stream = _Stream()
        self._streams.append(stream)
        while len(self._streams) > self.limits.event_streams:
            self._streams.popleft().close("too many event streams: this page polls instead")
        try:
            await response.write(b"retry: 3000\n\n")
            sent = -1
            while stream.why is _OPEN:
                if self._generation != sent:
                    sent = self._generation
                    await response.write(f"event: changed\ndata: {sent}\n\n".encode())
                else:
                    await response.write(b": keep-alive\n\n")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.event_heartbeat):
                        await stream.wake.wait()
                stream.wake.clear()
            if stream.why:
                await response.write(f"event: evicted\ndata: {stream.why}\n\n".encode())
        except (ConnectionError, RuntimeError):
            pass  # the client left (aiohttp raises ConnectionResetError or, once closing, RuntimeError)
        finally:
            with contextlib.suppress(ValueError):
                self._streams.remove(stream)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def _in(self, pool: ThreadPoolExecutor, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def _webhook(self, request: web.BaseRequest, due: float) -> _Reply:
        auth = self.webhook
        assert auth is not None  # routes() serves /webhook only when configured
        wait = self.rate.take(request.remote or "-")
        if wait:
            _LOG.warning("webhook from %s refused: over the rate limit", request.remote)
            return _json(429, {"error": "too many webhook requests"}, (("Retry-After", str(max(1, round(wait)))),))
        body = await _read_body(request, due)
        if isinstance(body, _Reply):
            return body
        if not auth.verify(dict(request.headers.items()), body):
            _LOG.warning("webhook from %s rejected: invalid signature", request.remote)
            return _error(401, "invalid signature")
        if request.headers.get("X-GitHub-Event") == "ping":
            # GitHub sends a signed ping when the hook is created: it proves the secret, it is not a change.
            return _json(200, {"accepted": False, "event": "ping"})
        self.on_webhook()
        return _json(202, {"accepted": True})

    async def _api(self, request: web.BaseRequest, call: ApiCall, due: float) -> _Reply:
        # routes() lists exactly the calls given
        # A browser sends Origin on every POST; the CLI sends none. (A browser cannot reach a unix socket either.)
        if request.headers.get("Origin") is not None:
            return _error(403, "browser requests are not accepted")
        body = await _read_body(request, due)
        if isinstance(body, _Reply):
            return body
        if body and request.content_type != "application/json":
            return _error(415, "request body must be application/json")
        try:
            parsed = json.loads(body) if body else {}
        except (ValueError, RecursionError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(parsed, dict):
            return _error(400, "request body must be a JSON object")
        if self._calls_in_flight >= self.limits.control_threads + self.limits.waiting_calls:
            return _error(503, "the agent is busy with other control calls; try again")
        self._calls_in_flight += 1
        try:
            status, payload = await self._in(self._control_pool, lambda: call(parsed))
        finally:
            self._calls_in_flight -= 1
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"API handler for {request.path!r} returned status {status!r}")
        return _json(status, payload)


_OPEN = ""


class _Stream:
    """One open event stream: woken when the data changes; `why` is set (None: shutdown) when it must close."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.why: str | None = _OPEN

    def close(self, why: str | None) -> None:
        self.why = why
        self.wake.set()


_PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Server", "dabctl"),
    # Everything the page needs comes from the agent itself: no script, style, font or frame from elsewhere.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
)


def _html(status: int, text: str) -> _Reply:
    return _Reply(status, text.encode(), "text/html; charset=utf-8", _PAGE_HEADERS[3:])


def _fleet_page(page: PageSource, fragment: bool) -> _Reply:
    view = page.fleet()
    main = render.fleet_main(view)
    if fragment:
        return _html(200, main)
    return _html(200, render.page("dabctl · fleet", view.status.node, main, view.generation, "/?fragment=1"))


def _stack_page(page: PageSource, name: str, fragment: bool) -> _Reply:
    view = page.stack(name)
    if view is None:
        return _error(404, f"no stack named {name!r} on this node")
    main = render.stack_main(view)
    if fragment:
        return _html(200, main)
    url = f"/stacks/{quote(name, safe='')}?fragment=1"
    return _html(200, render.page(f"dabctl · {name}", view.node, main, view.generation, url))


class _ClientErrorsAtDebug(logging.Filter):
    """A client's malformed request is its problem, not the agent's: aiohttp logs it with a traceback at ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
            record.exc_text = None
            return _PROTOCOL_LOG.isEnabledFor(logging.DEBUG)
        return True


_PROTOCOL_LOG = logging.getLogger("dabctl.http.protocol")
_PROTOCOL_LOG.addFilter(_ClientErrorsAtDebug())


class _GuardedServer(web.Server):
    """aiohttp's low-level server for one listener, with the connection cap and the whole-request deadline."""

    def __init__(self, app: AgentHttp, listener: Listener) -> None:
        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return await app.handle(listener, request)

        super().__init__(
            handler,
            access_log=None,
            logger=_PROTOCOL_LOG,
            keepalive_timeout=app.limits.request_deadline,
            max_line_size=8190,
            max_field_size=8190,
            lingering_time=2.0,
        )
        self.limits = app.limits
        self.listener = listener
        self._due: dict[RequestHandler, float | None] = {}  # None: a request is being handled

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        loop = asyncio.get_running_loop()
        self._due[handler] = loop.time() + self.limits.request_deadline
        if len(self._due) > self.limits.max_connections:
            waiting = [(due, h) for h, due in self._due.items() if due is not None and h is not handler]
            victim = min(waiting, key=lambda pair: pair[0])[1] if waiting else handler
            del self._due[victim]  # counted out now: it closes on the next turn of the loop
            loop.call_soon(victim.force_close)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._due.pop(handler, None)

    def busy(self, handler: RequestHandler) -> float:
        """Mark a request in progress; the deadline its body must still meet."""
        due = self._due.get(handler)
        self._due[handler] = None
        return due if due is not None else asyncio.get_running_loop().time() + self.limits.request_deadline

    def idle(self, handler: RequestHandler) -> None:
        if handler in self._due:
            self._due[handler] = asyncio.get_running_loop().time() + self.limits.request_deadline

    def sweep(self) -> None:
        """Close every connection whose request has not arrived whole by its deadline."""
        now = asyncio.get_running_loop().time()
        for handler, due in list(self._due.items()):
            if due is not None and now > due:
                del self._due[handler]
                handler.force_close()


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> web.Response:
        resp = web.Response(status=self.status, body=self.body)
        resp.headers["Content-Type"] = self.content_type
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Server"] = "dabctl"
        for name, value in self.headers:
            resp.headers[name] = value
        return resp


def _json(status: int, payload: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    return _Reply(status, body, "application/json", headers)


def _text(status: int, text: str) -> _Reply:
    return _Reply(status, text.encode(), "text/plain; charset=utf-8")


def _error(status: int, message: str) -> _Reply:
    return _json(status, {"error": message})


_NOT_FOUND = _error(404, "not found")
_INTERNAL = _error(500, "internal error")


async def _read_body(request: web.BaseRequest, due: float) -> bytes | _Reply:
    """The request body by its deadline, or the error reply: 411 without a length, 413 over MAX_BODY (unread)."""
    if request.headers.get("Transfer-Encoding") is not None or request.content_length is None:
        return _error(411, "Content-Length required")
    length = request.content_length
    if length > MAX_BODY:
        return _error(413, f"request body over {MAX_BODY} bytes")
    if length == 0:
        return b""
    try:
        async with asyncio.timeout(max(0.0, due - asyncio.get_running_loop().time())):
            body = await request.content.readexactly(length)
    except TimeoutError:
        return _error(408, "request body not received in time")
    except asyncio.IncompleteReadError:
        return _error(400, "request body shorter than Content-Length")
    return body


def _client_refused(tls: ClusterTls, request: web.BaseRequest, name: str) -> _Reply | None:
    """None when the client's certificate (verified against the cluster CA in the handshake) may make call
    `name`; else the refusal: 401 without a certificate, 403 for one the cluster does not accept or a worker's
    on a call for managers."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
    if der is None:
        return _error(401, "this call needs a client certificate from the cluster's CA (a node's own)")
    try:
        role = tls.role_of(der)
    except Exception as exc:  # a DabctlError naming why; anything else is refused the same way
        return _error(403, f"client certificate refused: {exc}")
    if name in tls.manager_calls and role != "manager":
        return _error(403, f"{name} is for managers only: a {role}'s certificate may not call it")
    return None


def _host_allowed(request: web.BaseRequest, listener: Listener) -> bool:
    """No Host (not a browser), or a Host naming this listener as allowed: a rebinding page's name is not."""
    raw = request.headers.get("Host")
    if raw is None:
        return True
    host = raw.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    return host in listener.allowed_hosts


def _bind(listener: Listener, backlog: int) -> socket.socket:
    if listener.path is not None:
        return _bind_unix(listener.path, listener.group, backlog)
    assert listener.tcp is not None
    host, port = listener.tcp
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _bind_unix(path: Path, group: int | None, backlog: int) -> socket.socket:
    """A unix socket at `path`, 0600 (0660 and `group` with one) before it listens: nobody connects earlier."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"cannot listen on {path}: it exists and is not a socket; remove it")
        path.unlink()  # a socket left by an agent that died: the agent lock says this directory is ours now
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600 if group is None else 0o660)
        if group is not None:
            os.chown(path, -1, group)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _unlink_socket(path: Path) -> None:
    """Remove the control socket (the agent lock keeps any other agent from having bound one there since)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
