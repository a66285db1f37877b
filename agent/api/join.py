"""The joining node's call to a manager's cluster listener: `POST /cluster/v1/join`.

Plain HTTP until the cluster has a certificate authority (then: TLS, the manager's certificate checked against the
token's CA digest before anything is sent); the cluster listener runs only with `cluster_insecure: true` meanwhile.
"""

from __future__ import annotations

import json

import requests
from pydantic import ValidationError

from schemas.errors import DabctlError
from schemas.join import JoinRequest, JoinResponse

JOIN_URL = "/cluster/v1/join"
TIMEOUT = 30.0


class JoinRefused(DabctlError):
    """A manager refused a join (bad token, a name in use, not a manager), or could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def post_join(manager: str, request: JoinRequest) -> JoinResponse:
    """Send the join to `manager` (host:port of its cluster listener); the manager's answer or JoinRefused."""
    url = f"http://{manager}{JOIN_URL}"
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must never see the token
    try:
        resp = session.post(
            url, data=request.model_dump_json(), headers={"Content-Type": "application/json"}, timeout=TIMEOUT
        )
    except requests.RequestException as exc:
        raise JoinRefused(
            0,
            f"cannot reach the manager's cluster listener at {manager}: {type(exc).__name__}; check the address "
            "(the manager's advertise address and cluster_listen port, 9421 by default) and that its agent runs",
        ) from None
    finally:
        session.close()
    try:
        doc = resp.json()
    except ValueError:
        raise JoinRefused(
            resp.status_code, f"{manager} answered {resp.status_code} without JSON: not a dabctl manager?"
        ) from None
    if resp.status_code != 200:
        message = doc.get("error") if isinstance(doc, dict) else None
        raise JoinRefused(resp.status_code, f"{manager} refused the join: {message or resp.status_code}")
    try:
        return JoinResponse.model_validate_json(json.dumps(doc))
    except ValidationError:
        raise JoinRefused(
            resp.status_code, f"{manager} answered a join with something else: not a dabctl manager?"
        ) from None
