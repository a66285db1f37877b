"""A node's calls to another node's cluster listener (`/cluster/v1/<call>`).

With a cluster CA (the default) every call is TLS: a joining node first fetches the CA certificate without
checking it (`fetch_ca`), checks its digest against the token's, and only then sends its token and CSR over a
connection whose server certificate must be the cluster CA's and a manager's (`check_peer`). Later calls carry
the node's own certificate (mutual TLS). A token without a CA digest is refused before anything is sent
(`agent.node.join.join_cluster`): no join runs in plain HTTP.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.errors import DabctlError
from schemas.join import JoinRequest, JoinResponse

CLUSTER_PATH = "/cluster/v1/"
JOIN_URL = "/cluster/v1/join"
CA_URL = "/cluster/v1/ca"
TIMEOUT = 30.0
MAX_REPLY = 1 << 20


class JoinRefused(DabctlError):
    """A manager refused a join (bad token, a name in use, not a manager), or could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _unreachable(address: str, exc: Exception) -> JoinRefused:
    why = type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        why = f"TLS: {exc.reason or exc}"
    return JoinRefused(
        0,
        f"cannot reach the cluster listener at {address}: {why}; check the address (the node's advertise address "
        "and cluster_listen port, 9421 by default) and that its agent runs",
    )


def call(
    address: str,
    method: str,
    path: str,
    body: bytes | None,
    *,
    tls: ssl.SSLContext | None,
    check_peer: Callable[[bytes], None] | None = None,
) -> tuple[int, bytes]:
    """One request to the cluster listener at `address` (host:port): (status, body). With `tls`, `check_peer`
    sees the server's certificate (DER) before anything is sent, and may raise to stop there."""
    host, port = _split(address)
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        try:
            conn.connect()
            if tls is not None and check_peer is not None:
                sock = conn.sock
                assert isinstance(sock, ssl.SSLSocket)
                der = sock.getpeercert(binary_form=True)
                if der is None:
                    raise JoinRefused(0, f"{address} showed no certificate")
                check_peer(der)
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(MAX_REPLY)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _unreachable(address, exc) from None
    finally:
        conn.close()


def fetch_ca(address: str) -> bytes:
    """The CA certificate (PEM) the node at `address` shows, not checked: the caller compares its digest with
    the token's before it sends anything else."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is sent but this GET; what comes back is checked by its digest
    status, body = call(address, "GET", CA_URL, None, tls=ctx)
    if status != 200 or not body.startswith(b"-----BEGIN CERTIFICATE-----"):
        raise JoinRefused(status, f"{address} answered {status} without a CA certificate: not a dabctl manager?")
    return body


def post(
    address: str,
    name: str,
    message: BaseModel,
    reply: type[Any],
    *,
    tls: ssl.SSLContext | None,
    check_peer: Callable[[bytes], None] | None = None,
) -> Any:
    """POST `message` to `/cluster/v1/<name>`; the answer as `reply`, or JoinRefused with the node's error."""
    status, body = call(
        address, "POST", f"{CLUSTER_PATH}{name}", message.model_dump_json().encode(), tls=tls, check_peer=check_peer
    )
    try:
        doc = json.loads(body)
    except ValueError:
        raise JoinRefused(status, f"{address} answered {status} without JSON: not a dabctl manager?") from None
    if status != 200:
        error = doc.get("error") if isinstance(doc, dict) else None
        raise JoinRefused(status, f"{address} refused the {name}: {error or status}")
    try:
        return reply.model_validate_json(json.dumps(doc))
    except ValidationError:
        raise JoinRefused(status, f"{address} answered a {name} with something else: not a dabctl manager?") from None


def post_join(
    manager: str,
    request: JoinRequest,
    *,
    tls: ssl.SSLContext | None = None,
    check_peer: Callable[[bytes], None] | None = None,
) -> JoinResponse:
    """Send the join to `manager` (host:port of its cluster listener); the manager's answer or JoinRefused."""
    response: JoinResponse = post(manager, "join", request, JoinResponse, tls=tls, check_peer=check_peer)
    return response
