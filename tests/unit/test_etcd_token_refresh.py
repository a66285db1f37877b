"""EtcdStateLog renews its auth token when etcd says the token is stale, and sends the request again."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from agent.state.etcd import EtcdStateLog
from agent.state.log import Put


class FakeEtcd:
    """etcd's JSON gateway for one txn: refuses it `refusals` times with `message`, then applies it."""

    def __init__(self, message: str, refusals: int) -> None:
        self.message = message
        self.refusals = refusals
        self.tokens = 0
        self.calls: list[tuple[str, str]] = []

    def post(self, url: str, data: str, timeout: float, headers: dict[str, str]) -> requests.Response:
        path = url.split("/v3", 1)[1]
        self.calls.append((path, headers.get("Authorization", "")))
        if path == "/auth/authenticate":
            self.tokens += 1
            return _answer(200, {"token": f"token-{self.tokens}"})
        assert path == "/kv/txn" and json.loads(data)["success"]
        if self.refusals:
            self.refusals -= 1
            return _answer(400, {"error": self.message, "code": 9, "message": self.message})
        return _answer(200, {"succeeded": True, "header": {"revision": "7"}})


def _answer(status: int, doc: dict[str, Any]) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = json.dumps(doc).encode()
    return resp


@pytest.mark.parametrize(
    "message",
    [
        "etcdserver: revision of auth store is old",  # a concurrent join changed users or roles (two workers at once)
        "etcdserver: invalid auth token",
    ],
)
def test_a_stale_token_is_renewed_and_the_write_sent_again(message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    etcd = FakeEtcd(message, refusals=1)
    log = EtcdStateLog(["http://127.0.0.1:1"], user="node-x", password="secret")
    monkeypatch.setattr(log._session, "post", etcd.post)
    try:
        assert log.txn([], [Put("/nodes/x", b"{}")]).succeeded
    finally:
        log.close()
    assert etcd.calls == [
        ("/auth/authenticate", ""),
        ("/kv/txn", "token-1"),
        ("/auth/authenticate", ""),
        ("/kv/txn", "token-2"),
    ]
