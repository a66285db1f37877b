"""An etcd cluster's membership over the JSON gateway (`/v3/cluster/member/...`, `/v3/maintenance/...`).

With auth on, adding, promoting and removing members is etcd's root user's (managers hold its password); listing
members and a member's status need no user. A learner answers status only, so readiness of a joining member is its
status, and of a voting one a read (`ready`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, TypedDict

from agent.state.etcd import EtcdRefused, EtcdStateLog, Refusal
from agent.state.log import StateLogError, Unavailable
from reconcilers.etcdmembers import Member

# etcd's proposal timing out or its leader changing: the change may or may not have happened, and each call below
# checks before it is sent again (as it does when no endpoint answered at all: Unavailable, always retried here).
_NO_ANSWER = frozenset({Refusal.TIMED_OUT, Refusal.LEADER_CHANGED})
# etcd admits one learner at a time, and (--strict-reconfig-check) adds a member only when every voting member has
# been connected for its health interval (5 s): right after a promotion it answers "unhealthy cluster" for a while.
_ADD_LATER = frozenset({Refusal.TOO_MANY_LEARNERS, Refusal.UNHEALTHY_CLUSTER})


class TlsArgs(TypedDict):
    """EtcdStateLog's TLS keyword arguments."""

    ca_file: str | None
    cert_file: str | None
    key_file: str | None


class MemberChangeRefused(StateLogError):
    """etcd refused a membership change (the message says why)."""

    retryable = False


def _member(doc: dict[str, Any]) -> Member:
    return Member(
        id=str(doc.get("ID", "")),
        name=str(doc.get("name", "")),
        peer_urls=tuple(str(u) for u in doc.get("peerURLs") or []),
        client_urls=tuple(str(u) for u in doc.get("clientURLs") or []),
        learner=bool(doc.get("isLearner", False)),
    )


def follow_members(log: EtcdStateLog) -> bool:
    """Point `log` at the etcd cluster's voting members (learners answer no reads); True when that changed its
    endpoints. A client made when the cluster had one member learns of the members added since."""
    urls = [u for m in EtcdMembership(log).members() if not m.learner for u in m.client_urls]
    return log.use_endpoints(sorted(urls)) if urls else False


class EtcdMembership:
    """Members of the etcd that `log` talks to (a root client for changes)."""

    def __init__(self, log: EtcdStateLog) -> None:
        self.log = log

    def members(self) -> list[Member]:
        return [_member(m) for m in self.log._call("/cluster/member/list", {}).get("members") or []]

    def add_learner(self, peer_url: str, timeout: float = 60) -> Member:
        """Add a learner at `peer_url`; waits (backoff) while etcd cannot take one yet (see _ADD_LATER)."""
        body = {"peerURLs": [peer_url], "isLearner": True}

        def once() -> dict[str, Any]:
            for m in self.members():  # an addition whose answer was lost is not made twice
                if peer_url in m.peer_urls:
                    return {"member": {"ID": m.id, "name": m.name, "peerURLs": list(m.peer_urls), "isLearner": True}}
            return self.log._call("/cluster/member/add", body, retry_reads=False)

        doc = _retry(once, _ADD_LATER | _NO_ANSWER, timeout)
        return _member(doc["member"])

    def promote(self, member_id: str, timeout: float = 60) -> None:
        """Promote a learner once it has caught up with the leader (etcd refuses before: retried with backoff).
        A promotion whose answer was lost is sent again: etcd then says the member is no learner, which is done."""

        def once() -> dict[str, Any]:
            leader = self._leader()
            try:
                return leader._call("/cluster/member/promote", body, retry_reads=False)
            except EtcdRefused as exc:
                if exc.refusal is Refusal.NOT_A_LEARNER:  # not one any more: promoted
                    return {}
                raise
            finally:
                if leader is not self.log:
                    leader.close()

        body = {"ID": member_id}
        _retry(once, {Refusal.LEARNER_NOT_IN_SYNC} | _NO_ANSWER, timeout)

    def _leader(self) -> EtcdStateLog:
        """A client of the leader (same credentials): etcd 3.4 forwards a promotion sent to a follower over the
        peer port without the caller's user, and with auth on the leader refuses it ("auth: user name is empty"),
        which the caller sees as a timeout. `self.log` itself when the leader cannot be told."""
        status = None
        for endpoint in self.log.endpoints:
            status = member_status(endpoint, self.log_tls(), timeout=self.log.timeout)
            if status is not None:
                break
        leader_id = str((status or {}).get("leader", "0"))
        urls = next((m.client_urls for m in self.members() if m.id == leader_id), ())
        if not urls:
            return self.log
        return EtcdStateLog(
            list(urls), prefix="/", timeout=self.log.timeout, user=self.log._user, password=self.log._password,
            **self.log_tls(),
        )  # fmt: skip

    def log_tls(self) -> TlsArgs:
        tls = self.log.tls_args
        return {"ca_file": tls["ca_file"], "cert_file": tls["cert_file"], "key_file": tls["key_file"]}

    def remove(self, member_id: str, timeout: float = 30) -> None:
        """Remove a member; waits (backoff) while etcd cannot take a change yet (right after another one, see
        _ADD_LATER). A removal whose answer was lost is not sent again: the member is gone, which is done."""

        def once() -> dict[str, Any]:
            if all(m.id != member_id for m in self.members()):
                return {}
            return self.log._call("/cluster/member/remove", {"ID": member_id}, retry_reads=False)

        try:
            _retry(once, _ADD_LATER | _NO_ANSWER, timeout)
        except MemberChangeRefused as exc:
            raise MemberChangeRefused(f"etcd refused to remove member {member_id}: {exc}") from None


# How often a refused change is tried again. A joining manager waits for its promotion (the learner catching up)
# and, right after another join, for its addition (etcd's 5 s health rule): both end at a moment etcd decides, so
# a long back-off only adds its overshoot to every manager join (up to 1.9 s with the former 2 s cap: bench/init.py).
# A try is one small request to one member.
RETRY_FIRST = 0.05
RETRY_MAX = 0.25


def _retry(
    call: Callable[[], dict[str, Any]],
    transient: AbstractSet[Refusal],
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """`call` until it answers, while it fails for a `transient` refusal or no endpoint answers, for `timeout`."""
    deadline = clock() + timeout
    delay = RETRY_FIRST
    while True:
        try:
            return call()
        except StateLogError as exc:
            again = isinstance(exc, Unavailable) or (isinstance(exc, EtcdRefused) and exc.refusal in transient)
            if not again or clock() + delay > deadline:
                raise MemberChangeRefused(str(exc)) from None
        sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


def member_status(endpoint: str, tls: TlsArgs, timeout: float = 2.0) -> dict[str, Any] | None:
    """`/v3/maintenance/status` of the member at `endpoint` (learners answer it too); None when it does not answer."""
    client = EtcdStateLog([endpoint], prefix="/", timeout=timeout, **tls)
    try:
        return client._call("/maintenance/status", {})
    except (Unavailable, StateLogError):
        return None
    finally:
        client.close()


def member_ready(endpoint: str, tls: TlsArgs, timeout: float = 2.0) -> bool:
    """Whether the member at `endpoint` answers and knows a leader (a cluster with quorum)."""
    status = member_status(endpoint, tls, timeout)
    return status is not None and str(status.get("leader", "0")) != "0"
