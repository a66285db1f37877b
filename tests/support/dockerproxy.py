"""Recording, fault-injecting HTTP proxy in front of the Docker engine socket.

Tests point a Docker client at `DockerProxy.url` (as ``DOCKER_HOST`` or ``base_url``) to count the
Docker API calls the code under test makes, to make chosen calls fail with an HTTP error without
reaching the engine, and to run a hook (e.g. SIGKILL the client) right before a call is forwarded.

Contract:
- One upstream connection per client connection; requests are parsed on the client side (keep-alive,
  ``Content-Length`` and chunked bodies), responses are streamed back byte-for-byte as they arrive,
  so endless streams (events, pull progress, logs --follow) work.
- ``Connection: Upgrade`` requests (attach, exec start) switch the connection to raw two-way piping.
- All threads are daemon threads; `DockerProxy.stop` never blocks for long and closes every socket.
- Faults and hooks are evaluated when a request head has been parsed, in request order, so
  `Call.status` is always None when a predicate sees the call.
- Clients must not pipeline (docker-py and the docker CLI don't): statuses on a pipelining
  connection stay None, and an injected response could overtake a pending upstream response.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import Self

__all__ = ["Call", "DockerProxy", "normalize_endpoint"]

_BUFSIZE = 65536
# Request heads from docker-py are tiny; the cap only stops a broken client from growing memory.
_MAX_HEAD = 1 << 20
# Bodies up to this size are read completely before anything is forwarded, so a hook that kills
# the client still leaves a complete request for the engine (like a client that dies while waiting).
_MAX_BUFFERED_BODY = 16 << 20
_NON_MUTATING = frozenset({"GET", "HEAD"})
_VERSION_PREFIX = re.compile(r"^/v[0-9]+(?:\.[0-9]+)*(?=/)")

# Resources whose second path segment is an object id/name, with the words that are not ids there.
_ID_RESOURCES: dict[str, frozenset[str]] = {
    "containers": frozenset({"json", "create", "prune"}),
    "networks": frozenset({"create", "prune"}),
    "volumes": frozenset({"create", "prune"}),
    "exec": frozenset(),
    "services": frozenset({"create"}),
    "nodes": frozenset(),
    "tasks": frozenset(),
    "secrets": frozenset({"create"}),
    "configs": frozenset({"create"}),
}
# Resources whose names may contain "/" (image references, plugin names): collection words, and the
# per-object actions that may end the path.
_SLASHED_RESOURCES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "images": (
        frozenset({"json", "create", "search", "prune", "load", "get"}),
        frozenset({"json", "history", "push", "tag", "get"}),
    ),
    "plugins": (
        frozenset({"privileges", "pull", "create"}),
        frozenset({"json", "enable", "disable", "upgrade", "push", "set"}),
    ),
    "distribution": (frozenset(), frozenset({"json"})),
}


def normalize_endpoint(method: str, path: str) -> str:
    """Return ``"METHOD /path"`` with object ids/names replaced by ``{id}``.

    `path` must already have its version prefix and query string removed. Paths of resources not
    known to carry ids (``/_ping``, ``/events``, ``/swarm/init`` ...) are returned unchanged.
    """
    segments = path.strip("/").split("/")
    resource, rest = segments[0], segments[1:]
    if rest and resource in _ID_RESOURCES and rest[0] not in _ID_RESOURCES[resource]:
        rest = ["{id}", *rest[1:]]
    elif rest and resource in _SLASHED_RESOURCES:
        collection_words, actions = _SLASHED_RESOURCES[resource]
        if len(rest) == 1 and rest[0] in collection_words:
            pass
        elif len(rest) >= 2 and rest[-1] in actions:
            rest = ["{id}", rest[-1]]
        else:
            rest = ["{id}"]
    return f"{method} /{'/'.join([resource, *rest])}"


@dataclass(frozen=True)
class Call:
    """One HTTP request seen by the proxy.

    `path` is percent-decoded, without query string and without the ``/v1.xx`` prefix. `status` is
    the response status once the proxy has seen the response status line (None before that, or
    when the connection died first). `injected` is True when the proxy answered with a fault.
    """

    method: str
    path: str
    _: KW_ONLY
    query: str = ""
    status: int | None = None
    injected: bool = False

    @property
    def endpoint(self) -> str:
        """Normalized ``"METHOD /path"`` for counting, e.g. ``POST /containers/{id}/start``."""
        return normalize_endpoint(self.method, self.path)

    @property
    def mutating(self) -> bool:
        """True unless the method is GET or HEAD."""
        return self.method not in _NON_MUTATING


@dataclass
class _Rule:
    """A fault or hook that acts on matching calls after `skip` matches, `times` times (None: forever)."""

    predicate: Callable[[Call], bool]
    _: KW_ONLY
    skip: int
    times: int | None
    fault: tuple[int, str] | None = None
    callback: Callable[[], None] | None = None
    seen: int = 0
    fired: int = 0


class _ClientGone(Exception):
    """The client closed its connection in the middle of a request."""


class ProxyProtocolError(Exception):
    """The client sent something the proxy cannot parse as an HTTP/1.1 request."""


@dataclass(kw_only=True)
class _Request:
    """A parsed request head plus the framing the proxy needs to forward its body."""

    head: bytes
    call: Call
    content_length: int
    chunked: bool
    upgrade: bool
    close: bool


class _Reader:
    """Buffered reads from the client socket; returns None only on EOF at a message boundary."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self._sock.recv(_BUFSIZE)
        self.buf += data
        return bool(data)

    def read_until(self, delim: bytes, limit: int) -> bytes | None:
        """Return bytes up to and including `delim`; None on clean EOF, `_ClientGone` on EOF mid-way."""
        start = 0
        while True:
            index = self.buf.find(delim, start)
            if index >= 0:
                end = index + len(delim)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise ProxyProtocolError(f"no {delim!r} within {limit} bytes")
            start = max(0, len(self.buf) - len(delim) + 1)
            if not self._fill():
                if self.buf:
                    raise _ClientGone
                return None

    def read_exact(self, n: int) -> Iterator[bytes]:
        """Yield pieces totalling exactly `n` bytes; `_ClientGone` on early EOF."""
        while n > 0:
            if not self.buf and not self._fill():
                raise _ClientGone
            piece = bytes(self.buf[:n])
            del self.buf[: len(piece)]
            n -= len(piece)
            yield piece

    def take(self) -> bytes:
        """Return and clear whatever is buffered."""
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _parse_head(head: bytes) -> _Request:
    """Parse a request head (ending in CRLFCRLF) into a `_Request`; `ProxyProtocolError` if malformed."""
    # RFC 9112 lets a server ignore empty lines before the request line.
    lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ProxyProtocolError(f"bad request line {lines[0]!r}")
    method, target, _version = parts
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProxyProtocolError(f"bad header line {line!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())

    def tokens(name: str) -> set[str]:
        return {t.strip().lower() for v in headers.get(name, []) for t in v.split(",")}

    chunked = "chunked" in tokens("transfer-encoding")
    content_length = 0
    if not chunked and "content-length" in headers:
        try:
            content_length = int(headers["content-length"][-1])
        except ValueError as exc:
            raise ProxyProtocolError(f"bad Content-Length {headers['content-length']!r}") from exc
    raw_path, _, query = target.partition("?")
    path = _VERSION_PREFIX.sub("", urllib.parse.unquote(raw_path)) or "/"
    return _Request(
        head=head,
        call=Call(method=method.upper(), path=path, query=query),
        content_length=content_length,
        chunked=chunked,
        upgrade="upgrade" in tokens("connection") or "upgrade" in headers,
        close="close" in tokens("connection"),
    )


def _error_response(status: int, message: str) -> bytes:
    """Build a complete HTTP/1.1 JSON error response like the engine's."""
    body = json.dumps({"message": message}).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _quiet_shutdown(sock: socket.socket | None, how: int) -> None:
    """shutdown() that ignores already-closed/disconnected sockets (the peer may be gone)."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(how)


class _Connection:
    """One client connection, its upstream connection, and the two threads piping between them."""

    def __init__(self, proxy: DockerProxy, client: socket.socket, number: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.number = number
        self.threads: list[threading.Thread] = []
        # Serializes writes to the client: streamed upstream bytes vs. injected responses.
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending: Call | None = None
        self._status_buf = bytearray()
        self._track_status = True
        self._running = 0

    def start(self) -> None:
        """Start the client-side thread (which connects upstream and starts the response thread)."""
        self._spawn(self._serve_client, "requests")

    def _spawn(self, target: Callable[[], None], role: str) -> None:
        thread = threading.Thread(
            target=self._run, args=(target,), name=f"dockerproxy-{self.number}-{role}", daemon=True
        )
        with self._state_lock:
            self._running += 1
            self.threads.append(thread)
        thread.start()

    def _run(self, target: Callable[[], None]) -> None:
        # Peer disconnects surface as OSError and are normal; anything else is a proxy bug and is
        # recorded instead of raised, because pytest turns thread exceptions into test errors.
        try:
            target()
        except (OSError, _ClientGone):
            self.abort()
        except Exception as exc:
            self.proxy._record_error(exc)
            self.abort()
        finally:
            with self._state_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.close()

    def abort(self) -> None:
        """Tear both sides down so blocked threads wake up (close() alone does not wake recv)."""
        _quiet_shutdown(self.client, socket.SHUT_RDWR)
        _quiet_shutdown(self.upstream, socket.SHUT_RDWR)

    def close(self) -> None:
        """Close both sockets and forget this connection."""
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.proxy._forget(self)

    # -- client -> upstream -------------------------------------------------------------------

    def _serve_client(self) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.proxy.upstream)
        except OSError as exc:
            upstream.close()
            self.proxy._record_error(exc)
            self.client.sendall(_error_response(502, f"dockerproxy: cannot reach engine: {exc}"))
            return
        self.upstream = upstream
        if self.proxy._stopping.is_set():
            return
        self._spawn(self._serve_upstream, "responses")
        reader = _Reader(self.client)
        while True:
            try:
                head = reader.read_until(b"\r\n\r\n", _MAX_HEAD)
            except ProxyProtocolError as exc:
                self.proxy._record_error(exc)
                self._write_client(_error_response(400, f"dockerproxy: {exc}"))
                return
            if head is None:
                # Clean EOF: pass the half-close on, like the real client's close would.
                _quiet_shutdown(upstream, socket.SHUT_WR)
                return
            try:
                request = _parse_head(head)
            except ProxyProtocolError as exc:
                self.proxy._record_error(exc)
                self._write_client(_error_response(400, f"dockerproxy: {exc}"))
                return
            call, fault, callbacks = self.proxy._admit(request.call)
            if fault is not None:
                self._forward_body(reader, request, sink=None)
                self.proxy._run_callbacks(callbacks)
                self._write_client(_error_response(*fault))
                if request.close:
                    _quiet_shutdown(self.client, socket.SHUT_WR)
                    return
                continue
            streaming = request.chunked or request.content_length > _MAX_BUFFERED_BODY
            body = b"" if streaming else b"".join(reader.read_exact(request.content_length))
            self.proxy._run_callbacks(callbacks)
            with self._state_lock:
                if self._pending is not None:
                    # The previous response has not started yet, so the client pipelines: response
                    # boundaries are unknown without parsing framing, and None beats a wrong status.
                    self._track_status = False
                self._pending = call if self._track_status else None
                self._status_buf.clear()
            upstream.sendall(head + body)
            if streaming:
                self._forward_body(reader, request, sink=upstream.sendall)
            if request.upgrade:
                self._pipe_raw(reader, upstream)
                return

    def _forward_body(self, reader: _Reader, request: _Request, sink: Callable[[bytes], object] | None) -> None:
        """Read the request body from the client, passing its exact bytes to `sink` (None: discard)."""

        def emit(data: bytes) -> None:
            if sink is not None:
                sink(data)

        if not request.chunked:
            for piece in reader.read_exact(request.content_length):
                emit(piece)
            return
        while True:
            line = reader.read_until(b"\r\n", 4096)
            if line is None:
                raise _ClientGone
            emit(line)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise ProxyProtocolError(f"bad chunk size line {line!r}") from exc
            if size == 0:
                break
            for piece in reader.read_exact(size + 2):  # data + CRLF
                emit(piece)
        while True:  # trailer section ends with an empty line
            line = reader.read_until(b"\r\n", _MAX_HEAD)
            if line is None:
                raise _ClientGone
            emit(line)
            if line == b"\r\n":
                return

    def _pipe_raw(self, reader: _Reader, upstream: socket.socket) -> None:
        """After an Upgrade request, copy client bytes upstream verbatim until the client half-closes."""
        leftover = reader.take()
        if leftover:
            upstream.sendall(leftover)
        while data := self.client.recv(_BUFSIZE):
            upstream.sendall(data)
        _quiet_shutdown(upstream, socket.SHUT_WR)

    def _write_client(self, data: bytes) -> None:
        with self._write_lock:
            self.client.sendall(data)

    # -- upstream -> client -------------------------------------------------------------------

    def _serve_upstream(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        while data := upstream.recv(_BUFSIZE):
            self._note_status(data)
            try:
                self._write_client(data)
            except OSError:
                # The client is gone (e.g. killed by a hook): drop the engine side too, as its
                # own close would have done.
                self.abort()
                return
        # The engine closed: let the client see EOF once it has read everything.
        _quiet_shutdown(self.client, socket.SHUT_WR)

    def _note_status(self, data: bytes) -> None:
        """Record the status of the pending call from the start of its response."""
        # No pipelining: a new response can only start after the request that `_pending` names
        # was sent, and the client only sends that after it has read the previous response.
        with self._state_lock:
            call = self._pending
            if call is None:
                return
            self._status_buf += data
            end = self._status_buf.find(b"\r\n")
            if end < 0:
                if len(self._status_buf) > 8192:
                    self._pending = None
                return
            status_line = bytes(self._status_buf[:end])
            self._pending = None
            self._status_buf.clear()
        parts = status_line.split(b" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            self.proxy._set_status(call, int(parts[1]))


class DockerProxy:
    """A recording HTTP proxy on a Unix socket in front of the Docker engine socket.

    Use as a context manager or via `start`/`stop`. `calls` lists every request seen, in order.
    Faults (`fail_mutating_call`, `fail_when`) answer matching calls with an HTTP error without
    forwarding them; hooks (`on_mutating_call`) run in a proxy thread right before forwarding.
    Unexpected proxy-side exceptions and exceptions from predicates/hooks are collected in
    `errors` rather than raised, so tests should assert ``proxy.errors == []`` when they care.
    """

    def __init__(self, upstream: str = "/var/run/docker.sock", socket_path: str | None = None) -> None:
        self.upstream = upstream
        self._tempdir: str | None = None
        if socket_path is None:
            self._tempdir = tempfile.mkdtemp(prefix="dockerproxy-")
            socket_path = os.path.join(self._tempdir, "docker.sock")
            # sun_path is limited to 108 bytes; a long $TMPDIR would make bind() fail.
            if len(socket_path.encode()) > 100:
                os.rmdir(self._tempdir)
                self._tempdir = tempfile.mkdtemp(prefix="dockerproxy-", dir="/tmp")
                socket_path = os.path.join(self._tempdir, "docker.sock")
        self.socket_path = socket_path
        self._lock = threading.Lock()
        # Notified whenever a call is recorded or gets its status, for wait_for().
        self._changed = threading.Condition(self._lock)
        self._calls: list[Call] = []
        self._rules: list[_Rule] = []
        self._errors: list[BaseException] = []
        self._connections: set[_Connection] = set()
        self._connection_count = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``unix://<socket_path>``, usable as DOCKER_HOST or a docker-py ``base_url``."""
        return f"unix://{self.socket_path}"

    def start(self) -> Self:
        """Bind the socket and serve from a background daemon thread; return self.

        Raises RuntimeError if already started, OSError if the socket cannot be bound.
        """
        if self._listener is not None:
            raise RuntimeError("DockerProxy already started")
        with contextlib.suppress(FileNotFoundError):
            # Only replace a stale socket; never delete a regular file someone passed by mistake.
            if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._stopping.clear()
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="dockerproxy-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection, remove the socket (and the temp dir if ours).

        Idempotent. Waits at most about `timeout` seconds for proxy threads; they are daemon
        threads, so any that are still stuck cannot keep the interpreter alive.
        """
        self._stopping.set()
        deadline = time.monotonic() + timeout
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes a thread blocked in accept() on Linux; close() alone would not.
            _quiet_shutdown(listener, socket.SHUT_RDWR)
            if self._accept_thread is not None:
                self._accept_thread.join(max(0.0, deadline - time.monotonic()))
            listener.close()
        self._accept_thread = None
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.abort()
        for conn in connections:
            for thread in list(conn.threads):
                thread.join(max(0.0, deadline - time.monotonic()))
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if not self._stopping.is_set():
                    self._record_error(exc)
                return
            client.setblocking(True)
            with self._lock:
                if self._stopping.is_set():
                    client.close()
                    return
                self._connection_count += 1
                conn = _Connection(self, client, self._connection_count)
                self._connections.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    # -- recording ----------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """A snapshot of every request seen since start/the last `reset`, in arrival order."""
        with self._lock:
            return list(self._calls)

    @property
    def errors(self) -> list[BaseException]:
        """A snapshot of unexpected proxy errors and exceptions raised by predicates or hooks."""
        with self._lock:
            return list(self._errors)

    def reset(self) -> None:
        """Clear recorded calls and restart counting for pending faults/hooks from now."""
        with self._lock:
            self._calls.clear()
            for rule in self._rules:
                rule.seen = 0

    def mutating(self) -> list[Call]:
        """Recorded calls whose method is not GET or HEAD, in order."""
        return [c for c in self.calls if c.mutating]

    def endpoints(self, *, mutating_only: bool = False) -> list[str]:
        """Normalized endpoints of the recorded calls (only mutating ones if asked), in order."""
        return [c.endpoint for c in self.calls if c.mutating or not mutating_only]

    def count(self, endpoint: str) -> int:
        """How many recorded calls have this normalized endpoint, e.g. ``"POST /containers/create"``."""
        return sum(1 for c in self.calls if c.endpoint == endpoint)

    def wait_for(self, predicate: Callable[[Call], bool], timeout: float = 10.0) -> Call:
        """Block until a recorded call satisfies `predicate` and return the first one that does.

        Re-checked whenever a call is recorded or its status becomes known, so
        ``proxy.wait_for(lambda c: c.endpoint == "POST /containers/create" and c.status is not None)``
        waits for the engine's answer even if the client died. Raises TimeoutError after `timeout` s.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for call in self._calls:
                    if predicate(call):
                        return call
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching call within {timeout}s; calls: {self._calls}")
                self._changed.wait(remaining)

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _set_status(self, call: Call, status: int) -> None:
        with self._lock:
            # Search by identity from the end: the call is recent, and reset() may have dropped it.
            for index in range(len(self._calls) - 1, -1, -1):
                if self._calls[index] is call:
                    self._calls[index] = dataclasses.replace(call, status=status)
                    self._changed.notify_all()
                    return

    # -- faults and hooks ---------------------------------------------------------------------

    def fail_mutating_call(self, k: int, status: int = 500, message: str = "injected fault") -> None:
        """Answer the k-th mutating call (1-based, counted from now or the next `reset`) with an error.

        The call gets ``status`` with JSON body ``{"message": message}`` and is not forwarded.
        """
        if k < 1:
            raise ValueError("k is 1-based")
        self._add_rule(_Rule(lambda c: c.mutating, skip=k - 1, times=1, fault=(status, message)))

    def fail_when(
        self,
        predicate: Callable[[Call], bool],
        status: int = 500,
        message: str = "injected fault",
        *,
        times: int | None = None,
    ) -> None:
        """Answer calls matching `predicate` with an error instead of forwarding them.

        Applies to every matching call by default, or to the next `times` matches. The predicate
        runs in a proxy thread with the proxy lock held, so it must be quick and must not call
        back into the proxy; an exception from it is recorded in `errors` and counts as no match.
        """
        self._add_rule(_Rule(predicate, skip=0, times=times, fault=(status, message)))

    def on_mutating_call(self, k: int, callback: Callable[[], None]) -> None:
        """Run `callback` in the proxy thread right before the k-th mutating call is forwarded.

        Counted like `fail_mutating_call`. If a fault also targets that call, the callback runs right
        before the error response is written instead. The call is forwarded after the callback returns, even
        if it raised (the exception goes to `errors`) or killed the client; the proxy then just
        drops the dead connection. The request body has been fully received at that point.
        """
        if k < 1:
            raise ValueError("k is 1-based")
        self._add_rule(_Rule(lambda c: c.mutating, skip=k - 1, times=1, callback=callback))

    def clear_faults(self) -> None:
        """Remove all pending faults and hooks."""
        with self._lock:
            self._rules.clear()

    def _add_rule(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _admit(self, call: Call) -> tuple[Call, tuple[int, str] | None, list[Callable[[], None]]]:
        """Record `call` and decide its fate: (recorded call, fault or None, hooks to run)."""
        fault: tuple[int, str] | None = None
        callbacks: list[Callable[[], None]] = []
        with self._lock:
            # Every rule sees every call, so each keeps its own count even when another fires.
            for rule in list(self._rules):
                try:
                    matched = rule.predicate(call)
                except Exception as exc:
                    self._errors.append(exc)
                    matched = False
                if not matched:
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                rule.fired += 1
                if rule.times is not None and rule.fired >= rule.times:
                    self._rules.remove(rule)
                if rule.fault is not None and fault is None:
                    fault = rule.fault
                if rule.callback is not None:
                    callbacks.append(rule.callback)
            if fault is not None:
                call = dataclasses.replace(call, status=fault[0], injected=True)
            self._calls.append(call)
            self._changed.notify_all()
        return call, fault, callbacks

    def _run_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:
                self._record_error(exc)
