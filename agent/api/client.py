"""The CLI's side of "one loop": find the agent running on the same state and send it changing commands.

The agent holds `<state_dir>/agent.lock` (one agent per state directory, whatever the state backend) and serves
the control calls on `<state_dir>/agent.sock`, a unix socket only root (or `control_group`) may connect to.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from agent.state.holder import AGENT_LOCK, HolderLock
from schemas.config import AgentConfig
from schemas.errors import DabctlError

AGENT_SOCKET = "agent.sock"  # in the state directory: the running agent's control socket
_CONNECT_PATIENCE = 5.0  # an agent that holds the lock binds its socket within moments


class AgentUnreachable(DabctlError):
    """An agent holds the state but does not answer on its control socket."""

    retryable = True


class AgentRefused(DabctlError):
    """The agent answered and refused the call; the message is its reason."""


class ControlDenied(DabctlError):
    """This user may not control the agent: its socket (or state directory) is root's, or control_group's."""


def running_agent(cfg: AgentConfig) -> Path | None:
    """The control socket of the agent running on this state directory (any backend), or None when none runs.

    ControlDenied when this user cannot even tell: the state directory is closed to it."""
    lock = cfg.state_path / AGENT_LOCK
    sock = cfg.state_path / AGENT_SOCKET
    try:
        os.stat(lock)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise _denied(cfg.state_path) from None
    if HolderLock.holder_of(lock) is not None:
        return sock
    if not os.access(lock, os.R_OK) and os.path.exists(sock):
        return sock  # the lock is root's to read: the socket answers, or says who may use it
    return None


def _denied(where: Path) -> ControlDenied:
    return ControlDenied(
        f"permission denied on {where}: only root (or members of the agent's control_group) may control the "
        "agent; run the command as root"
    )


class UnixConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the Host header says localhost; the socket's mode is the check)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(
    path: Path, method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30
) -> tuple[int, dict[str, Any]]:
    """One HTTP request over the control socket at `path`; the status and the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    deadline = time.monotonic() + _CONNECT_PATIENCE
    while True:
        conn = UnixConnection(path, timeout)
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            break
        except PermissionError:
            raise _denied(path) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                raise AgentUnreachable(
                    f"the agent holding this state does not answer on {path}: {type(exc).__name__}"
                ) from None
            time.sleep(0.1)  # the agent took the lock and has not bound its socket yet
        except (OSError, http.client.HTTPException) as exc:
            raise AgentUnreachable(f"the agent holding this state does not answer on {path}: {exc}") from None
        finally:
            conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise AgentUnreachable(f"the agent on {path} answered {resp.status} without JSON") from None
    if not isinstance(doc, dict):
        raise AgentUnreachable(f"the agent on {path} answered {resp.status} with no JSON object")
    return resp.status, doc


def call(path: Path, name: str, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """POST /api/<name> on the control socket and return the agent's JSON answer."""
    status, doc = request(path, "POST", f"/api/{name}", body, timeout)
    if status >= 400:
        raise AgentRefused(f"the agent on {path} refused {name}: {doc.get('error', status)}")
    return doc


def get_status(path: Path, timeout: float = 30) -> dict[str, Any]:
    status, doc = request(path, "GET", "/status", None, timeout)
    if status != 200:
        raise AgentUnreachable(f"the agent on {path} answered /status with {status}")
    return doc


def call_leader(
    address: str, name: str, body: dict[str, Any], timeout: float = 900, tls: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """POST /cluster/v1/<name> on the leader's cluster listener (`address`, host:port) and return its JSON answer.

    Mutual TLS with this node's certificate (`tls`: the leader's listener requires a manager's; every cluster node
    holds one). Without `tls`, plain HTTP: only in-process tests' listeners answer it (the leader then checks that
    the caller's address is a manager's)."""
    host, _, port = address.rpartition(":")
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("POST", f"/cluster/v1/{name}", body=json.dumps(body).encode(), headers=_JSON)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AgentUnreachable(
            f"the cluster's leader does not answer at {address} ({type(exc).__name__}); `dabctl status` shows the "
            "nodes, try again once a leader is elected"
        ) from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise AgentUnreachable(f"the leader at {address} answered {resp.status} without JSON") from None
    if not isinstance(doc, dict):
        raise AgentUnreachable(f"the leader at {address} answered {resp.status} with no JSON object")
    if resp.status >= 400:
        raise AgentRefused(f"the leader at {address} refused {name}: {doc.get('error', resp.status)}")
    return doc


_JSON = {"Content-Type": "application/json"}
