"""Run `dabctl agent` as a real process for tests: start, wait until it answers, stop with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from agent.api.client import AGENT_SOCKET, request
from tests.integration.conftest import DABCTL
from tests.support.etcd import free_port
from tests.support.polling import wait_for


class AgentProcess:
    """One agent on a free loopback port; its log goes to a file the test can show on failure."""

    def __init__(
        self,
        state: Path,
        *args: str,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.netns = netns  # run in this network namespace (a node's), and reach its loopback API from there
        self.port = free_port() if host == "127.0.0.1" else 9420
        self.url = f"http://{host}:{self.port}"  # `host`: another address of its own (a node's: public)
        self.log_path = state.parent / f"agent-{self.port}.log"
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
        self.cmd = [DABCTL, "agent", "--state-dir", str(state), "--listen", f"{host}:{self.port}", *args]
        if netns:
            self.cmd = ["nsenter", f"--net=/var/run/netns/{netns}", *self.cmd]
        self.env = {**base, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> AgentProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.healthy, timeout=30)
        if ready:
            wait_for(lambda: self.get("/readyz").status_code == 200, timeout=60)
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
        try:
            return self.get("/healthz").status_code == 200
        except requests.RequestException:
            return False

    def get(self, path: str) -> requests.Response:
        if self.netns:
            return _get_in(self.netns, self.url + path)
        return requests.get(self.url + path, timeout=10)

    def post(self, path: str, **kw: Any) -> requests.Response:
        """POST to the agent: /api/* over its control socket (as the CLI does), anything else over HTTP."""
        if path.startswith("/api/"):
            return self.control(path, kw.get("json", {}))
        return requests.post(self.url + path, timeout=60, **kw)

    def control(self, path: str, body: dict[str, Any]) -> requests.Response:
        code, doc = request(self.state / AGENT_SOCKET, "POST", path, body, timeout=60)
        response = requests.Response()
        response.status_code = code
        response._content = json.dumps(doc).encode()
        return response

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.get("/status").json()
        return doc

    def stack(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["stacks"] if s["stack"] == name), None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def eventually(condition: Any, agent: AgentProcess, timeout: float = 30) -> Any:
    """wait_for, showing the agent's log when it times out."""
    try:
        return wait_for(condition, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"condition not met within {timeout}s; agent log:\n{agent.log()[-4000:]}") from None


def since(t0: float) -> float:
    return time.monotonic() - t0


_GET = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
sys.stdout.write(str(code) + "\\n" + body.decode())
"""


def _get_in(netns: str, url: str) -> requests.Response:
    """GET from inside a network namespace (the agent's loopback listener is only there)."""
    argv = ["nsenter", f"--net=/var/run/netns/{netns}", sys.executable, "-c", _GET, url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise requests.ConnectionError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no answer")
    code, _, body = proc.stdout.partition("\n")
    response = requests.Response()
    response.status_code = int(code)
    response._content = body.encode()
    return response
