"""The page's event streams: exempt from the request deadline, capped (oldest evicted), and never in the probes' way."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests

from agent.api.server import AgentHttp, Limits
from agent.metrics import Metrics
from schemas.output import StatusOutput
from schemas.view import FleetView, StackView
from tests.support.polling import wait_for

CAP = 32


class Page:
    def fleet(self) -> FleetView:
        return FleetView(generation=0, built_at="now", status=StatusOutput(node="n", ready=True))

    def stack(self, name: str) -> StackView | None:
        return None


@pytest.fixture
def http() -> Iterator[AgentHttp]:
    server = AgentHttp(
        status=lambda: StatusOutput(node="n", ready=True),
        ready=lambda: True,
        metrics=Metrics(),
        on_webhook=lambda: None,
        webhook=None,
        limits=Limits(event_streams=CAP, request_deadline=0.5, sweep_interval=0.1),
        page=Page(),
    )
    server.add_tcp("127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def _read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    data = b""
    sock.settimeout(timeout)
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_streams_outlive_the_deadline_are_capped_and_leave_healthz_fast(http: AgentHttp) -> None:
    url = http.listeners[0].url
    streams = [_open(url) for _ in range(CAP)]
    try:
        for s in streams:
            assert b"event: changed" in _read_until(s, b"event: changed")
        time.sleep(1.0)  # twice the request deadline: streams are exempt, their requests arrived whole
        http.changed()
        for s in streams:
            assert b"data: 1" in _read_until(s, b"data: 1")
        assert http.event_streams == CAP

        streams.append(_open(url))  # one more: the oldest is evicted, told so, and its connection closed
        assert b"event: evicted" in _read_until(streams[0], b"event: evicted")
        wait_for(lambda: http.event_streams == CAP, timeout=5)

        for _ in range(5):
            t0 = time.monotonic()
            assert requests.get(url + "/healthz", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 1.0
        assert requests.get(url + "/status", timeout=5).status_code == 200
        assert requests.get(url + "/", timeout=5).status_code == 200
    finally:
        for s in streams:
            s.close()


def test_page_routes_refuse_foreign_hosts_and_unknown_assets(http: AgentHttp) -> None:
    url = http.listeners[0].url
    assert requests.get(url + "/", headers={"Host": "evil.example"}, timeout=5).status_code == 403
    assert requests.get(url + "/events", headers={"Host": "evil.example"}, timeout=5).status_code == 403
    assert requests.get(url + "/ui/secret.txt", timeout=5).status_code == 404
    assert requests.get(url + "/stacks/nope", timeout=5).status_code == 404
    assert requests.post(url + "/", timeout=5).status_code == 405
    page = requests.get(url + "/", timeout=5)
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
