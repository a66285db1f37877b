"""Who may control the agent: as `nobody` (uid 65534, a real setpriv'd process), every route that changes
anything is refused — the test walks the server's own route table, so a route added later is covered — except
/webhook with a valid signature; the control socket refuses the connection; root's CLI still works through the
agent; and a non-loopback `listen` without `listen_public` stops `dabctl agent` with one line."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api.client import AGENT_SOCKET
from agent.api.server import Kind
from agent.node.loop import API_CALLS, Agent
from schemas.config import AgentConfig
from tests.fakes import FakeRuntime
from tests.node.conftest import NODE, bundle, service

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
HOOK_SECRET = "hook-secret-for-tests"
DABCTL = str(Path(sys.executable).parent / "dabctl")
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody (the venv's interpreter may live under /root)
CHANGING = ("POST", "PUT", "DELETE", "PATCH")

# Runs as nobody with the system interpreter: each request given on stdin, the outcome of each on stdout.
_CLIENT = r"""
import http.client, json, socket, sys
out = []
for target, method, path, headers, body in json.load(sys.stdin):
    try:
        if target.startswith("/"):
            conn = http.client.HTTPConnection("localhost", timeout=10)
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(target)
            conn.sock = sock
        else:
            host, port = target.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request(method, path, body=body.encode() if body is not None else None, headers=headers)
        out.append({"status": conn.getresponse().status})
    except OSError as exc:
        out.append({"errno": exc.errno})
print(json.dumps(out))
"""


def as_nobody(requests: list[tuple[str, str, str, dict[str, str], str | None]]) -> list[dict[str, int]]:
    """Send each request as uid/gid 65534 without supplementary groups; what each got (a status or an errno)."""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON, "-c", _CLIENT]
    proc = subprocess.run(argv, input=json.dumps(requests), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, int]] = json.loads(proc.stdout)
    return result


def signed(body: str) -> dict[str, str]:
    digest = hmac.new(HOOK_SECRET.encode(), body.encode(), hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory nobody may traverse (pytest's tmp_path is root's alone): the socket's own mode is then the test."""
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail("these tests need setpriv (util-linux) and the system python3")
    path = Path(tempfile.mkdtemp(prefix="dabctl-nobody-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served_agent(world_readable_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    """An agent on the fake engine whose listeners really serve: loopback HTTP with a webhook, and the socket."""
    source = world_readable_dir / "src"
    source.mkdir()
    (source / "web.dab").write_text(json.dumps(bundle({"front": service()})))
    monkeypatch.setenv("DABCTL_TEST_HOOK", HOOK_SECRET)
    cfg = AgentConfig(
        source=str(source),
        state_dir=str(world_readable_dir / "state"),
        node_name=NODE,
        listen="127.0.0.1:0",
        loadbalancer="none",
        poll_interval=0.0,
        resync_interval=0.0,
        webhook_secret_env="DABCTL_TEST_HOOK",
    )
    agent = Agent(cfg, runtime=FakeRuntime())
    agent.refresh_source()
    agent.http.start()
    try:
        yield agent
    finally:
        agent.shutdown()
        agent._close()


def test_as_nobody_every_changing_route_and_the_socket_are_refused(served_agent: Agent) -> None:
    agent = served_agent
    routes = agent.http.routes()
    # What changes the agent is served only on the control socket, or is the signed webhook: a route added later
    # that changes anything and is served on TCP fails here first.
    assert {(r.kind, r.path) for r in routes if r.changes and r.kind is not Kind.CONTROL} == {(Kind.HTTP, "/webhook")}
    assert {r.path for r in routes if r.kind is Kind.CONTROL and r.changes} == {f"/api/{n}" for n in API_CALLS}
    tcp = "{}:{}".format(*agent.listener.address)
    socket_path = str(agent.control_socket)
    body = json.dumps({"stack": "web"})
    sent: list[tuple[str, str, str, dict[str, str], str | None]] = []
    expected: list[dict[str, int]] = []
    for route in routes:
        if route.kind is Kind.CONTROL:
            for method in route.methods:
                sent.append((socket_path, method, route.path, {"Content-Type": "application/json"}, body))
                expected.append({"errno": errno.EACCES})
        elif route.path == "/webhook":
            sent.append((tcp, "POST", "/webhook", {"Content-Type": "application/json"}, body))
            expected.append({"status": 401})
            sent.append((tcp, "POST", "/webhook", signed(body), body))
            expected.append({"status": 202})
        else:
            for method in CHANGING:
                sent.append((tcp, method, route.path, {"Content-Type": "application/json"}, body))
                expected.append({"status": 405})
    for name in API_CALLS:  # the control calls do not exist on TCP at all
        sent.append((tcp, "POST", f"/api/{name}", {"Content-Type": "application/json"}, body))
        expected.append({"status": 404})

    got = as_nobody(sent)

    assert [(s[1], s[2], g) for s, g in zip(sent, got, strict=True)] == [
        (s[1], s[2], e) for s, e in zip(sent, expected, strict=True)
    ]
    st = agent.control_socket.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    assert agent.records.suspended() == set(), "nothing nobody sent changed the state"


def test_roots_cli_works_through_the_agent_and_nobodys_is_refused(served_agent: Agent) -> None:
    agent = served_agent
    cfg = agent.cfg
    args = ["suspend", "web", "--state-dir", cfg.state_dir]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
    root = subprocess.run([DABCTL, *args], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert (root.returncode, root.stdout.strip()) == (0, "web: suspended"), root.stderr
    assert agent.records.suspended() == {"web"}, "the call ran in the agent"

    code = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON, "-c", code]
    nobody = subprocess.run([*argv, str(agent.control_socket)], capture_output=True, text=True, check=False)
    assert nobody.returncode == 1 and "PermissionError" in nobody.stderr


def test_control_group_opens_the_socket_to_that_group_only(
    world_readable_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = world_readable_dir / "src"
    source.mkdir()
    cfg = AgentConfig(
        source=str(source),
        state_dir=str(world_readable_dir / "state"),
        listen="127.0.0.1:0",
        loadbalancer="none",
        poll_interval=0.0,
        resync_interval=0.0,
        control_group="daemon",  # not nobody's own group (nogroup), so membership is the only way in
    )
    agent = Agent(cfg, runtime=FakeRuntime())
    agent.http.start()
    try:
        gid = os.stat(cfg.state_dir).st_gid
        sock = (cfg.state_path / AGENT_SOCKET).stat()
        assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, gid)
        assert stat.S_IMODE(os.stat(cfg.state_dir).st_mode) == 0o710
        code = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"
        base = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            SYSTEM_PYTHON,
            "-c",
            code,
            str(agent.control_socket),
        ]
        member = subprocess.run([*base[:3], f"--groups={gid}", *base[3:]], capture_output=True, text=True, check=False)
        assert member.stdout.strip() == "connected", member.stderr
        stranger = subprocess.run([*base[:3], "--clear-groups", *base[3:]], capture_output=True, text=True, check=False)
        assert stranger.returncode == 1 and "PermissionError" in stranger.stderr
    finally:
        agent.shutdown()
        agent._close()


@pytest.mark.parametrize(
    ("listen", "extra", "refused"),
    [
        ("0.0.0.0:9420", [], True),
        ("[::]:9420", [], True),
        ("10.1.2.3:9420", [], True),
        ("0.0.0.0:9420", ["DABCTL_LISTEN_PUBLIC=true"], False),
    ],
)
def test_a_non_loopback_listen_needs_listen_public(
    tmp_path: Path, listen: str, extra: list[str], refused: bool, run_cli: Callable[..., Any]
) -> None:
    if not refused:
        from agent.config import load_config

        env = dict(e.split("=", 1) for e in extra)
        assert load_config(None, {"listen": listen}, environ=env).listen_public
        return
    proc = run_cli("agent", "--source", str(tmp_path), "--state-dir", str(tmp_path / "s"), "--listen", listen)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a loopback address" in lines[0] and "listen_public: true" in lines[0], lines
    assert not (tmp_path / "s").exists(), "refused before anything was created"


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
        return subprocess.run([DABCTL, *args], capture_output=True, text=True, timeout=60, env=env, check=False)

    return run
