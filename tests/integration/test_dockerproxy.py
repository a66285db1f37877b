"""Integration tests for the recording/fault-injecting Docker API proxy in tests/support."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import docker
import docker.errors
import pytest

from tests.support.dockerproxy import Call, DockerProxy, normalize_endpoint

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/var/run/docker.sock"), reason="needs a Docker engine"),
]

IMAGE = "dabctl/sample:1"
API_VERSION = "1.41"
TEST_LABEL = "dabctl.test=dockerproxy"


def _name() -> str:
    return f"dabctl-proxytest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def proxy() -> Iterator[DockerProxy]:
    """A started proxy; fails the test at teardown if the proxy recorded internal errors."""
    with DockerProxy() as p:
        yield p
        errors = p.errors
    assert errors == []


@pytest.fixture
def client(proxy: DockerProxy) -> Iterator[docker.APIClient]:
    c = docker.APIClient(base_url=proxy.url, version=API_VERSION, timeout=30)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def direct() -> Iterator[docker.APIClient]:
    """A client on the real socket, to check engine state and clean up behind the proxy's back."""
    c = docker.APIClient(base_url="unix:///var/run/docker.sock", version=API_VERSION, timeout=30)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def container_name(direct: docker.APIClient) -> Iterator[str]:
    """A fresh container name; whatever container ends up with it is force-removed afterwards."""
    name = _name()
    try:
        yield name
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            direct.remove_container(name, force=True)


def _create(client: docker.APIClient, name: str, command: list[str] | None = None) -> str:
    labels = {"dabctl.test": "dockerproxy"}
    return str(client.create_container(IMAGE, command=command, name=name, labels=labels)["Id"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("method", "path", "endpoint"),
    [
        ("GET", "/_ping", "GET /_ping"),
        ("GET", "/containers/json", "GET /containers/json"),
        ("POST", "/containers/create", "POST /containers/create"),
        ("POST", "/containers/abc123/start", "POST /containers/{id}/start"),
        ("DELETE", "/containers/web-1", "DELETE /containers/{id}"),
        ("GET", "/networks", "GET /networks"),
        ("POST", "/networks/create", "POST /networks/create"),
        ("POST", "/networks/front/connect", "POST /networks/{id}/connect"),
        ("POST", "/images/create", "POST /images/create"),
        ("GET", "/images/dabctl/sample:1/json", "GET /images/{id}/json"),
        ("DELETE", "/images/registry:5000/a/b:1", "DELETE /images/{id}"),
        ("POST", "/exec/e1/start", "POST /exec/{id}/start"),
        ("DELETE", "/volumes/data", "DELETE /volumes/{id}"),
        ("GET", "/events", "GET /events"),
    ],
)
def test_normalize_endpoint(method: str, path: str, endpoint: str) -> None:
    assert normalize_endpoint(method, path) == endpoint


@pytest.mark.timeout(60)
def test_reads_are_recorded_and_not_mutating(proxy: DockerProxy, client: docker.APIClient) -> None:
    assert client.ping() is True
    assert client.containers(all=True, filters={"label": TEST_LABEL}) == []

    calls = proxy.calls
    assert [c.endpoint for c in calls] == ["GET /_ping", "GET /containers/json"]
    assert [c.status for c in calls] == [200, 200]
    assert calls[1].path == "/containers/json"
    assert "filters=" in calls[1].query
    assert proxy.mutating() == []

    proxy.reset()
    assert proxy.calls == []


@pytest.mark.timeout(60)
def test_create_start_remove_are_three_mutating_calls(
    proxy: DockerProxy, client: docker.APIClient, container_name: str
) -> None:
    cid = _create(client, container_name)
    client.start(cid)
    client.remove_container(cid, force=True)

    mutating = proxy.mutating()
    assert [c.endpoint for c in mutating] == [
        "POST /containers/create",
        "POST /containers/{id}/start",
        "DELETE /containers/{id}",
    ]
    assert [c.status for c in mutating] == [201, 204, 204]
    assert mutating[0].query == f"name={container_name}"
    assert mutating[1].path == f"/containers/{cid}/start"
    assert proxy.count("POST /containers/{id}/start") == 1
    assert not any(c.injected for c in proxy.calls)


@pytest.mark.timeout(60)
def test_injected_fault_is_not_forwarded(
    proxy: DockerProxy, client: docker.APIClient, direct: docker.APIClient, container_name: str
) -> None:
    client.ping()
    proxy.fail_mutating_call(2, status=500, message="boom from test")

    cid = _create(client, container_name)
    with pytest.raises(docker.errors.APIError) as excinfo:
        client.start(cid)
    assert excinfo.value.status_code == 500
    assert "boom from test" in str(excinfo.value.explanation)

    # The create went through; the start never reached the engine.
    assert direct.inspect_container(container_name)["State"]["Status"] == "created"
    assert [(c.endpoint, c.status, c.injected) for c in proxy.mutating()] == [
        ("POST /containers/create", 201, False),
        ("POST /containers/{id}/start", 500, True),
    ]

    # One-shot: the same keep-alive connection keeps working for later calls.
    client.start(cid)
    assert direct.inspect_container(cid)["State"]["Running"] is True
    assert proxy.mutating()[-1] == Call("POST", f"/containers/{cid}/start", query="", status=204)


@pytest.mark.timeout(60)
def test_fail_when_and_reset_counting(proxy: DockerProxy, client: docker.APIClient) -> None:
    proxy.fail_when(lambda c: c.endpoint == "GET /_ping", status=503, message="down", times=2)
    for _ in range(2):
        with pytest.raises(docker.errors.APIError) as excinfo:
            client.ping()
        assert excinfo.value.status_code == 503
    assert client.ping() is True

    # Counting restarts at reset: the 2nd mutating call *after the reset* is the one that fails.
    never = {"label": "dabctl.test=never-used"}  # prune nothing real
    proxy.fail_mutating_call(2, status=409)
    client.prune_networks(filters=never)
    proxy.reset()
    client.prune_networks(filters=never)
    with pytest.raises(docker.errors.APIError) as excinfo:
        client.prune_networks(filters=never)
    assert excinfo.value.status_code == 409
    assert [(c.endpoint, c.status) for c in proxy.mutating()] == [
        ("POST /networks/prune", 200),
        ("POST /networks/prune", 409),
    ]


@pytest.mark.timeout(60)
def test_streaming_responses(proxy: DockerProxy, client: docker.APIClient, container_name: str) -> None:
    since = int(time.time()) - 1
    cid = _create(client, container_name, ["sh", "-c", "echo one; sleep 0.3; echo two"])
    client.start(cid)

    # follow=True keeps the response open until the container exits: only works if the proxy
    # streams instead of buffering whole responses.
    logs = b"".join(client.logs(cid, stream=True, follow=True))
    assert logs == b"one\ntwo\n"

    events = list(client.events(since=since, until=f"{time.time():.9f}", decode=True, filters={"container": cid}))
    assert {"create", "start"} <= {e["Action"] for e in events}
    assert [c.status for c in proxy.calls if c.endpoint in ("GET /containers/{id}/logs", "GET /events")] == [
        200,
        200,
    ]


@pytest.mark.timeout(60)
def test_hijacked_exec_stream(proxy: DockerProxy, client: docker.APIClient, container_name: str) -> None:
    cid = _create(client, container_name)
    client.start(cid)
    exec_id = client.exec_create(cid, ["echo", "hi"])["Id"]
    assert client.exec_start(exec_id) == b"hi\n"
    # The upgraded connection is raw afterwards; a fresh request must still work.
    assert client.exec_inspect(exec_id)["ExitCode"] == 0
    assert proxy.endpoints(mutating_only=True)[-2:] == ["POST /containers/{id}/exec", "POST /exec/{id}/start"]
    assert proxy.mutating()[-1].status == 101


@pytest.mark.timeout(60)
def test_hook_runs_before_forwarding_and_survives_killed_client(
    proxy: DockerProxy, client: docker.APIClient, direct: docker.APIClient, container_name: str
) -> None:
    script = (
        "import os, sys, docker\n"
        "c = docker.APIClient(base_url=os.environ['DOCKER_HOST'], version='1.41')\n"
        "c.create_container(sys.argv[1], name=sys.argv[2])\n"
        "print('survived')\n"
    )
    seen_before_forward: list[bool] = []
    procs: list[subprocess.Popen[bytes]] = []

    def kill_client() -> None:
        # Runs before the engine sees the create, so the container must not exist yet.
        try:
            direct.inspect_container(container_name)
            seen_before_forward.append(True)
        except docker.errors.NotFound:
            seen_before_forward.append(False)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()

    proxy.on_mutating_call(1, kill_client)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, IMAGE, container_name],
        env={**os.environ, "DOCKER_HOST": proxy.url},
        stdout=subprocess.PIPE,
    )
    procs.append(proc)
    try:
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert b"survived" not in stdout
    assert seen_before_forward == [False]
    # The request was complete when the client died, so the engine still carries it out; waiting
    # for its answer also keeps the cleanup fixture from racing the create.
    create = proxy.wait_for(lambda c: c.endpoint == "POST /containers/create" and c.status is not None)
    assert create.status == 201
    assert direct.inspect_container(container_name)["Config"]["Image"] == IMAGE
    assert [c.endpoint for c in proxy.mutating()] == ["POST /containers/create"]
    # The proxy keeps serving other clients after the dead connection.
    assert client.ping() is True


@pytest.mark.timeout(60)
def test_stop_does_not_hang_on_open_stream() -> None:
    proxy = DockerProxy().start()
    client = docker.APIClient(base_url=proxy.url, version=API_VERSION, timeout=30)
    try:
        stream = client.events(decode=True)  # never ends on its own
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 3
        assert not os.path.exists(proxy.socket_path)
        assert not os.path.exists(os.path.dirname(proxy.socket_path))
        stream.close()
        assert proxy.errors == []
    finally:
        client.close()
        proxy.stop()
