"""The etcd state log, for several nodes: etcd's v3 JSON gateway over `requests`.

Why not etcd3gw: it takes one endpoint, and its watch iterator hangs silently when etcd restarts (no event,
no error, no end).
This client fails over between endpoints, uses TLS client certificates, bounds every call with a timeout, and
serves watches from a thread that notices a dead or silent stream and resumes from the last seen revision.

With a user and password (a cluster node's, issued at join), it authenticates (`/v3/auth/authenticate`) before its
first call and sends the token in the `Authorization` header; a token etcd no longer knows (simple tokens expire
after `--auth-token-ttl`, 5 minutes idle, and die with the member that issued them) is renewed once and the call
sent again. What the user's role does not allow is refused by etcd: `PermissionDenied`.
"""

from __future__ import annotations

import base64
import enum
import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import requests

from agent.state.log import (
    Compacted,
    Compare,
    Delete,
    Event,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    StateLogError,
    TxnResult,
    Unavailable,
    Watch,
)

_TARGET = {"value": "VALUE", "mod_revision": "MOD", "create_revision": "CREATE", "version": "VERSION"}
_RESULT = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


class PermissionDenied(StateLogError):
    """etcd refused the call: the authenticated user's role does not allow it (or the credentials are wrong)."""

    retryable = False


class Refusal(enum.Enum):
    """What an etcd refusal means. The JSON gateway answers a gRPC status whose message is etcd's own error text
    (its rpctypes, the same in 3.4 and 3.5); `refusal()` reads it once, here, and callers decide on this value."""

    LEASE_NOT_FOUND = "lease not found"
    # A token etcd will not take any more: authenticate again and send the request again (it was not applied).
    # "revision of auth store is old": an auth change (another node's user or role, made by a concurrent join)
    # landed between the token check and the apply; etcd's own client refreshes its token on it too (clientv3
    # shouldRefreshToken).
    STALE_TOKEN = "stale token"
    PERMISSION = "permission denied"
    COMPACTED = "compacted"
    FUTURE_REVISION = "future revision"
    LEARNER_NOT_IN_SYNC = "learner not in sync"  # a promotion before the learner caught up with the leader
    NOT_A_LEARNER = "not a learner"  # a promotion of a voting member
    TOO_MANY_LEARNERS = "too many learners"  # etcd takes one learner at a time
    UNHEALTHY_CLUSTER = "unhealthy cluster"  # a member change within 5 s of a voter connecting (strict reconfig)
    TIMED_OUT = "timed out"  # etcd's proposal timed out: it may or may not have been applied
    LEADER_CHANGED = "leader changed"
    OTHER = "other"


# etcd's messages, in the order they are tested (a message that contains another comes first).
_REFUSALS: tuple[tuple[str, Refusal], ...] = (
    ("lease not found", Refusal.LEASE_NOT_FOUND),
    ("invalid auth token", Refusal.STALE_TOKEN),
    ("user name is empty", Refusal.STALE_TOKEN),
    ("auth token is expired", Refusal.STALE_TOKEN),
    ("revision of auth store is old", Refusal.STALE_TOKEN),
    ("permission denied", Refusal.PERMISSION),
    ("authentication failed", Refusal.PERMISSION),
    ("compacted", Refusal.COMPACTED),
    ("future revision", Refusal.FUTURE_REVISION),
    ("can only promote a learner member which is in sync with leader", Refusal.LEARNER_NOT_IN_SYNC),
    ("not in sync", Refusal.LEARNER_NOT_IN_SYNC),
    ("can only promote a learner member", Refusal.NOT_A_LEARNER),
    ("too many learner members", Refusal.TOO_MANY_LEARNERS),
    ("unhealthy cluster", Refusal.UNHEALTHY_CLUSTER),
    ("request timed out", Refusal.TIMED_OUT),
    ("leader changed", Refusal.LEADER_CHANGED),
)


def refusal(message: str) -> Refusal:
    """The meaning of etcd's refusal `message`."""
    return next((kind for text, kind in _REFUSALS if text in message), Refusal.OTHER)


class EtcdRefused(StateLogError):
    """etcd answered with an error; `refusal` says which (the message is etcd's, for people)."""

    def __init__(self, message: str, refusal: Refusal) -> None:
        super().__init__(message)
        self.refusal = refusal


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(key: bytes) -> bytes:
    """The smallest key greater than every key starting with `key` (etcd's range_end for a prefix)."""
    b = bytearray(key)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class _StaleToken(StateLogError):
    """etcd no longer accepts the auth token sent: authenticate again."""


class EtcdStateLog:
    """StateLog on an etcd cluster; every key lives under `prefix`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/dabctl",
        timeout: float = 5.0,
        keepalive_timeout: float = 1.5,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        watch_read_timeout: float = 10.0,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise StateLogError("no etcd endpoints given; use --state etcd://host:2379[,host2:2379]")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        # A keepalive is idempotent and its lease's TTL is a few seconds: an endpoint that does not answer within
        # this is skipped for the next one rather than waited on for `timeout` (which would cost the lease).
        self.keepalive_timeout = min(keepalive_timeout, timeout)
        self.watch_read_timeout = watch_read_timeout
        self._current = 0
        self.tls_args = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        self._tls: dict[str, Any] = {}
        if ca_file:
            self._tls["verify"] = ca_file
        if cert_file:
            self._tls["cert"] = (cert_file, key_file) if key_file else cert_file
        self._user = user
        self._password = password
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        self._session = self._new_session()
        self._closed = threading.Event()
        self._watch_sessions: list[requests.Session] = []
        self._watches: list[Watch] = []

    def _new_session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # a proxy from the environment must never see the state
        for k, v in self._tls.items():
            setattr(s, k, v)
        return s

    def close(self) -> None:
        self._closed.set()
        for w in self._watches:
            w.cancel()
        self._session.close()
        for s in list(self._watch_sessions):
            s.close()

    def use_endpoints(self, endpoints: Sequence[str]) -> bool:
        """Talk to `endpoints` from the next call on (the cluster's members changed); the endpoint in use stays
        first choice while it is listed. False when there is nothing to change."""
        fresh = [e.rstrip("/") for e in endpoints]
        old = self.endpoints
        if not fresh or set(fresh) == set(old):
            return False
        current = old[self._current % len(old)]
        self._current = fresh.index(current) if current in fresh else 0
        self.endpoints = fresh
        return True

    # --- transport --------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if self._user is None:
            return {}
        token = self._token
        if token is None:
            token = self._authenticate()
        return {"Authorization": token}

    def _authenticate(self, stale: str | None = None) -> str:
        """A fresh token (one caller at a time authenticates; others use its token unless it is `stale`)."""
        with self._auth_lock:
            if self._token is not None and self._token != stale:
                return self._token
            self._token = None
            body = {"name": self._user, "password": self._password}
            try:
                doc = self._post("/auth/authenticate", body, retry_reads=True, headers={})
            except PermissionDenied:
                raise PermissionDenied(
                    f"etcd refused the credentials of user {self._user!r}: the cluster may have removed this node; "
                    "check <state_dir>/cluster.json or join again"
                ) from None
            self._token = str(doc["token"])
            return self._token

    def _call(
        self, path: str, body: dict[str, Any], retry_reads: bool = True, timeout: float | None = None
    ) -> dict[str, Any]:
        """POST with this client's credentials; a token etcd no longer accepts is renewed once."""
        headers = self._headers()
        try:
            return self._post(path, body, retry_reads, headers, timeout)
        except _StaleToken as exc:
            if self._user is None:  # no credentials to renew: etcd wants a user (auth is on)
                raise PermissionDenied(f"etcd refused a client without a user: {exc}") from None
            headers = {"Authorization": self._authenticate(stale=headers.get("Authorization"))}
            try:
                return self._post(path, body, retry_reads, headers, timeout)
            except _StaleToken as exc:
                raise StateLogError(f"etcd refused a fresh auth token: {exc}") from None

    def _post(
        self, path: str, body: dict[str, Any], retry_reads: bool, headers: dict[str, str], timeout: float | None = None
    ) -> dict[str, Any]:
        """POST to the first endpoint that answers; a refused connection moves on to the next one."""
        timeout = timeout or self.timeout
        errors = []
        endpoints = self.endpoints  # one list for the whole call: use_endpoints may replace it meanwhile
        for i in range(len(endpoints)):
            index = (self._current + i) % len(endpoints)
            url = f"{endpoints[index]}/v3{path}"
            try:
                resp = self._session.post(url, data=json.dumps(body), timeout=timeout, headers=headers)
            except requests.exceptions.SSLError as exc:
                raise StateLogError(
                    f"TLS with etcd at {endpoints[index]} failed: {exc}; check the CA and client certificate"
                ) from None
            except requests.exceptions.ConnectionError as exc:
                errors.append(f"{endpoints[index]}: {type(exc).__name__}")
                continue
            except requests.exceptions.Timeout:
                errors.append(f"{endpoints[index]}: timed out after {timeout}s")
                if not retry_reads:  # a write may have happened: do not send it twice
                    break
                continue
            self._current = index
            return self._decode(resp)
        raise Unavailable("no etcd endpoint answers (" + "; ".join(errors) + "); check --state and that etcd runs")

    def _decode(self, resp: requests.Response) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = resp.json()
        except ValueError:
            raise StateLogError(f"etcd answered {resp.status_code} without JSON: {resp.text[:200]}") from None
        if resp.status_code >= 400 or "error" in doc:
            message = str(doc.get("message") or doc.get("error") or resp.status_code)
            kind = refusal(message)
            if kind is Refusal.LEASE_NOT_FOUND:
                raise LeaseNotFound(message)
            if kind is Refusal.STALE_TOKEN:
                raise _StaleToken(message)
            if kind is Refusal.PERMISSION:
                raise PermissionDenied(f"etcd refused the request: {message}")
            if kind is Refusal.COMPACTED:
                raise Compacted(0)
            raise EtcdRefused(f"etcd refused the request: {message}", kind)
        return doc

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _range_start(self, prefix: str) -> bytes:
        # Keys are "/..."; the bare prefix "/dabctl" would also cover another deployment's "/dabctl-staging".
        return self._key(prefix or "/")

    def _unkey(self, raw: str) -> str:
        return _unb64(raw).decode()[len(self.prefix) :]

    def _kv(self, doc: dict[str, Any]) -> KeyValue:
        return KeyValue(
            key=self._unkey(doc["key"]),
            value=_unb64(doc.get("value")),
            create_revision=int(doc.get("create_revision", 0)),
            mod_revision=int(doc.get("mod_revision", 0)),
            version=int(doc.get("version", 0)),
            lease=int(doc.get("lease", 0)),
        )

    # --- key-value ----------------------------------------------------------------------------------------------

    def revision(self) -> int:
        # A key inside the prefix ("<prefix>/"), which a node's role may read; the header carries the revision.
        doc = self._call("/kv/range", {"key": _b64(self._key("/")), "count_only": True, "limit": 1})
        return int(doc["header"]["revision"])

    def get(self, key: str) -> KeyValue | None:
        doc = self._call("/kv/range", {"key": _b64(self._key(key))})
        kvs = doc.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def range(self, prefix: str, revision: int = 0) -> list[KeyValue]:
        k = self._range_start(prefix)
        body: dict[str, Any] = {"key": _b64(k), "range_end": _b64(prefix_end(k)), "sort_target": "KEY"}
        if revision:
            body["revision"] = str(revision)
        try:
            doc = self._call("/kv/range", body)
        except EtcdRefused as exc:
            if revision and exc.refusal is Refusal.FUTURE_REVISION:
                raise StateLogError(f"cannot read revision {revision}: the log is not there yet") from None
            raise
        return [self._kv(kv) for kv in doc.get("kvs") or []]

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: str, prefix: bool = False) -> int:
        return self.txn([], [Delete(key, prefix)]).revision

    def _op(self, op: Op) -> dict[str, Any]:
        if isinstance(op, Put):
            body: dict[str, Any] = {"key": _b64(self._key(op.key)), "value": _b64(op.value)}
            if op.lease:
                body["lease"] = str(op.lease)
            return {"request_put": body}
        k = self._range_start(op.key) if op.prefix else self._key(op.key)
        body = {"key": _b64(k)}
        if op.prefix:
            body["range_end"] = _b64(prefix_end(k))
        return {"request_delete_range": body}

    def _compare(self, c: Compare) -> dict[str, Any]:
        out: dict[str, Any] = {"key": _b64(self._key(c.key)), "target": _TARGET[c.target], "result": _RESULT[c.op]}
        if c.target == "value":
            assert isinstance(c.operand, bytes)
            out["value"] = _b64(c.operand)
        else:
            out[c.target] = str(c.operand)
        return out

    def txn(
        self, compares: Sequence[Compare], then_ops: Sequence[Op], else_ops: Sequence[Op] = (), *, durable: bool = True
    ) -> TxnResult:
        # etcd fsyncs every committed entry on a quorum of members: every write is durable.
        body = {
            "compare": [self._compare(c) for c in compares],
            "success": [self._op(o) for o in then_ops],
            "failure": [self._op(o) for o in else_ops],
        }
        doc = self._call("/kv/txn", body, retry_reads=False)
        return TxnResult(bool(doc.get("succeeded", False)), int(doc["header"]["revision"]))

    def compact(self, revision: int) -> None:
        self._call("/kv/compaction", {"revision": str(revision), "physical": True}, retry_reads=False)

    # --- leases -------------------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        doc = self._call("/lease/grant", {"TTL": str(ttl)}, retry_reads=False)
        return int(doc["ID"])

    def keepalive(self, lease: int) -> int:
        doc = self._call("/lease/keepalive", {"ID": str(lease)}, timeout=self.keepalive_timeout)
        return int((doc.get("result") or {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self._call("/lease/revoke", {"ID": str(lease)}, retry_reads=False)

    # --- watches ------------------------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int = 0) -> Watch:
        """Every change under `prefix` from `start_revision` (0: from the next revision), in order, once.

        A broken or silent stream (no event and no progress notification within watch_read_timeout) is
        reopened on the next endpoint that answers, from the revision after the last one delivered.
        """
        w = Watch()
        self._watches.append(w)
        next_rev = start_revision or self.revision() + 1
        threading.Thread(target=self._serve_watch, args=(w, prefix, next_rev), name="etcd-watch", daemon=True).start()
        return w

    def _serve_watch(self, w: Watch, prefix: str, next_rev: int) -> None:
        k = self._range_start(prefix)
        delay = 0.05
        while not w.cancelled and not self._closed.is_set():
            endpoints = self.endpoints
            for index in [(self._current + i) % len(endpoints) for i in range(len(endpoints))]:
                if w.cancelled:
                    return
                try:
                    for kind, value in self._stream(w, endpoints[index], k, next_rev):
                        delay = 0.05
                        if kind == "event":
                            assert isinstance(value, Event)
                            w._deliver(value)
                            next_rev = value.revision + 1
                        elif kind == "progress":
                            assert isinstance(value, int)
                            next_rev = max(next_rev, value + 1)
                except Compacted as exc:
                    w._deliver(exc)
                    return
                except (requests.exceptions.RequestException, ValueError, OSError):
                    continue  # dead, silent or broken stream: resume from next_rev elsewhere
            if not w.cancelled:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _stream(self, w: Watch, endpoint: str, key: bytes, start: int) -> Iterator[tuple[str, Event | int]]:
        body = {
            "create_request": {
                "key": _b64(key),
                "range_end": _b64(prefix_end(key)),
                "start_revision": str(start),
                "progress_notify": True,
            }
        }
        session = self._new_session()
        self._watch_sessions.append(session)
        w.on_cancel.append(session.close)  # unblocks a read waiting on a silent stream
        try:
            headers = self._headers()
            with session.post(
                f"{endpoint}/v3/watch",
                data=json.dumps(body),
                headers=headers,
                stream=True,
                timeout=(self.timeout, self.watch_read_timeout),
            ) as resp:
                if resp.status_code >= 400:
                    if self._user is not None and refusal(resp.text) is Refusal.STALE_TOKEN:
                        self._authenticate(stale=headers.get("Authorization"))
                    raise requests.exceptions.ConnectionError(f"watch refused: {resp.status_code}")
                for line in resp.iter_lines():
                    if w.cancelled:
                        return
                    if not line:
                        continue
                    result = json.loads(line).get("result") or {}
                    if result.get("compact_revision") and result.get("canceled"):
                        raise Compacted(int(result["compact_revision"]))
                    if result.get("canceled"):
                        reason = str(result.get("cancel_reason", ""))
                        if self._user is not None and refusal(reason) is Refusal.STALE_TOKEN:
                            self._authenticate(stale=headers.get("Authorization"))
                        raise requests.exceptions.ConnectionError(f"watch canceled: {result.get('cancel_reason')}")
                    events = result.get("events") or []
                    for ev in events:
                        kv = ev["kv"]
                        yield (
                            "event",
                            Event(
                                type="delete" if ev.get("type") == "DELETE" else "put",
                                key=self._unkey(kv["key"]),
                                value=_unb64(kv.get("value")),
                                revision=int(kv["mod_revision"]),
                                create_revision=int(kv.get("create_revision", 0)),
                                version=int(kv.get("version", 0)),
                            ),
                        )
                    if not events and not result.get("created"):
                        # A progress notification: every change up to this revision has been sent.
                        yield ("progress", int(result["header"]["revision"]))
        finally:
            self._watch_sessions.remove(session)
            w.on_cancel.remove(session.close)
            session.close()
