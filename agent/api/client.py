"""The CLI's side of "one loop": find a running agent on the same state and send it changing commands."""

from __future__ import annotations

from typing import Any

import requests

from agent.state.holder import AGENT_LOCK, HolderLock
from schemas.config import AgentConfig
from schemas.errors import DabctlError


class AgentUnreachable(DabctlError):
    """An agent holds the state but does not answer on its API."""

    retryable = True


class AgentRefused(DabctlError):
    """The agent answered and refused the call; the message is its reason."""


def running_agent(cfg: AgentConfig) -> str | None:
    """The API URL of the agent running on this state directory (any state backend), or None when none runs."""
    holder = HolderLock.holder_of(cfg.state_path / AGENT_LOCK)
    return holder.get("api") if holder else None


def call(api: str, name: str, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """POST /api/<name> and return the agent's JSON answer."""
    try:
        session = requests.Session()
        session.trust_env = False
        resp = session.post(f"{api}/api/{name}", json=body, timeout=timeout)
    except requests.RequestException as exc:
        raise AgentUnreachable(f"the agent holding this state does not answer at {api}: {type(exc).__name__}") from None
    try:
        doc: dict[str, Any] = resp.json()
    except ValueError:
        raise AgentUnreachable(f"the agent at {api} answered {resp.status_code} without JSON") from None
    if resp.status_code >= 400:
        raise AgentRefused(f"the agent at {api} refused {name}: {doc.get('error', resp.status_code)}")
    return doc


def get_status(api: str, timeout: float = 30) -> dict[str, Any]:
    try:
        session = requests.Session()
        session.trust_env = False
        resp = session.get(f"{api}/status", timeout=timeout)
        doc: dict[str, Any] = resp.json()
        return doc
    except (requests.RequestException, ValueError) as exc:
        raise AgentUnreachable(f"the agent at {api} does not answer /status: {type(exc).__name__}") from None
