"""`dabctl agent`: keep this node converged as commits, webhooks and container events arrive.

Triggers only enqueue stack keys (every pass re-reads desired and live state): the source poller (git: one ls-remote per
poll; directory: watchdog events and a cheap fingerprint), the webhook, Docker's event stream and a periodic full
resync. One worker runs one pass at a time over the keys that are ready; a failing stack is retried with backoff and
never blocks the others. The last valid desired state keeps running when a broken bundle arrives.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.api.client import AGENT_SOCKET
from agent.api.server import AgentHttp, WebhookAuth
from agent.cluster.schema import SchemaConflict
from agent.config import ConfigError, policy_configured, policy_of
from agent.drivers.docker_engine import DockerEngine, EngineError, SdkError
from agent.metrics import Metrics
from agent.node import notices
from agent.node.control import converge, is_manager_peer, unhealthy
from agent.node.engine import Engine, PassPlan, PassReport, stack_of
from agent.node.etcdmember import EtcdMemberError, LocalMember
from agent.node.etcdroles import CERTIFICATE_PATH, EtcdRoles, certificate_call, retire_member
from agent.node.join import cluster_api, cluster_membership, cluster_tls, follow_endpoints, refresh_endpoints
from agent.node.membership import Member, cluster_config, status_source
from agent.node.page import PageData
from agent.node.rollback import pin_stack, unpin_stack
from agent.node.runtime import Runtime
from agent.node.status import Fleet, fleet, fleet_statuses
from agent.node.triggers import ExitWatch, event_trigger
from agent.node.workqueue import WorkQueue
from agent.notify.dispatch import Notifier
from agent.notify.events import Observed, changes
from agent.pki.files import PkiPaths, certificate_expiry
from agent.private import private_dir
from agent.sources.source import Source, open_source, read_secret, source_ref, watch_directory
from agent.sources.verify import VerificationRefused
from agent.state.backends import open_log
from agent.state.etcd import EtcdStateLog
from agent.state.holder import AGENT_LOCK, Held, HolderLock
from agent.state.log import StateLocked, StateLogError, Unavailable
from agent.state.membership import node_id
from agent.state.records import INTENT_KEY, NODE, NODES, STACKS, Records
from bundles import DesiredState, InvalidBundles
from bundles.desired import service_targets
from reconcilers.loadbalancer import PortRules
from reconcilers.outcome import Outcome, one_line
from reconcilers.services import Replica
from schemas.config import AgentConfig, split_listen
from schemas.control import (
    ReconcileRequest,
    ReconcileResult,
    RollbackRequest,
    RollbackResult,
    SuspendRequest,
    SuspendResult,
)
from schemas.errors import DabctlError
from schemas.output import SourceStatus, StatusOutput, VerifyRefusal, VerifyStatus

log = logging.getLogger("dabctl.agent")
EVENT_DEBOUNCE = 0.1
EXIT_FALLBACK = 5.0  # a pass after an exit event even if waiting for the exit hangs
ENDPOINTS_INTERVAL = 10.0  # how often a cluster node's etcd client follows the etcd cluster's members


API_CALLS = ("reconcile", "rollback", "suspend", "resume")  # the control calls served on the control socket


def _listed(errors: Sequence[object], limit: int = 50) -> str:
    """Up to `limit` errors on one line; how many more, and where to see them all."""
    shown = " | ".join(str(e) for e in errors[:limit])
    more = len(errors) - limit
    return shown + (f" | and {more} more: run dabctl validate --config FILE on the source" if more > 0 else "")


def _publishing(desired: DesiredState) -> set[str]:
    """The stacks of `desired` with a published port."""
    return {name for name, stack in desired.stacks.items() if any(t.service.ports for t in service_targets(stack))}


def _stack_of_file(file: str) -> str:
    return Path(file.rsplit(":", 1)[-1]).stem


class Agent:
    """The node agent: sources, triggers, the work queue and the HTTP endpoints around one Engine."""

    def __init__(self, cfg: AgentConfig, runtime: Runtime | None = None) -> None:
        """`runtime`: the container engine to converge (default: the Docker engine the config names)."""
        # A cluster node (<state_dir>/cluster.json) uses the cluster's state log, whatever `state` says.
        # (cluster_membership refuses a cluster node whose listener would run without TLS unless allowed.)
        membership = cluster_membership(cfg)
        if membership is not None:
            cfg = cluster_config(cfg, membership)
        self.cfg = cfg
        self.node = cfg.node_name or socket.gethostname()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.queue = WorkQueue(max_delay=cfg.backoff_max)
        self.metrics = Metrics()
        self.desired: DesiredState | None = None
        self.fingerprint: str | None = None
        self.load_errors: dict[str, str] = {}
        self.load_details: dict[str, tuple[str, str]] = {}  # stack -> (file, field) of its first load error
        self.pass_errors: dict[str, str] = {}
        self._held: tuple[SchemaConflict, ...] = ()  # the live nodes that held this leader at its last pass
        self.source_error: str | None = None
        self.refused: VerifyRefusal | None = None  # the source's newest revision, refused by the signature checks
        self.last_fetch_at: str | None = None
        self._wake = threading.Event()
        self._pass_lock = threading.Lock()
        self._source_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._events_stream: Any = None
        self._source_changed: set[str] = set()  # their next pass applies a change, not a drift correction

        host, port = split_listen(cfg.listen)
        self.api_url = f"http://{host}:{port}"
        self.control_socket = cfg.state_path / AGENT_SOCKET
        control_gid = _group_id(cfg.control_group)
        # apply's pool, the exit watchers (agent/node/triggers.py) and the HTTP handlers' status reads
        self.docker: Runtime = runtime or DockerEngine(
            cfg.docker_host, docker_config=cfg.docker_config, connections=cfg.parallelism + 12
        )
        try:
            self.docker.ping()
        except EngineError as exc:
            # Not fatal: passes fail and retry with backoff until the engine answers; /readyz says not ready.
            log.error("docker engine unreachable; retrying", extra={"error": str(exc)})
        # One agent per state directory, whatever the backend; the lock names its API so the CLI finds it.
        private_dir(cfg.state_path)
        # A cluster node's slots are assigned to it by node id (cluster init re-keys a single node's by name).
        self.membership = membership
        holder = {"api": self.api_url, "socket": str(self.control_socket), "command": "dabctl agent"}
        self.lock = HolderLock(cfg.state_path / AGENT_LOCK, holder)
        try:
            self.lock.acquire()
        except Held as held:
            raise StateLocked(f"another agent runs on the state directory {cfg.state_dir}: {held.holder}") from None
        if self.membership is not None:
            _ensure_etcd_member(cfg)
        try:
            self.log = open_log(cfg, writer=True, holder=holder)
            if control_gid is not None:
                _open_to_group(cfg.state_path, control_gid)
        except BaseException:
            self.lock.release()
            raise
        self.records = Records(self.log, cfg.history_limit, cfg.audit_limit)
        # In a cluster: this node under its lease and, on a manager, the election (`member.fence()` while it leads).
        self.member: Member | None = None
        if membership is None:
            self.metrics.leader.set(1)  # a single node is its own leader
        else:
            try:
                self.member = self._register(membership.node_id)
            except BaseException:
                self.log.close()
                self.lock.release()
                raise
        self.engine = Engine(
            self.docker,
            self.records,
            self.membership.node_id if self.membership is not None else self.node,
            parallelism=cfg.parallelism,
            pull_policy=cfg.pull_policy,
            balancer=cfg.loadbalancer,
            ports=PortRules(cfg.port_range, cfg.own_ports),
        )
        self.engine.policy = policy_of(cfg)
        self.engine.policy_configured = policy_configured(cfg)
        # A cluster node's passes: the orchestrator's half only while it leads (fenced), its own slots always.
        self.engine.cluster = self.member
        self.engine.hold_down_until = self.member.hold_down_until if self.member is not None else None
        self.page = PageData(self.records, self.node, self._observe)
        self.notifier = Notifier(notices.routes(cfg.notify))
        self._seen = Observed()
        self.engine.on_replan = self.metrics.replans.inc
        self.engine.on_fenced = self.metrics.fenced.inc
        self.exits = ExitWatch(self.docker.container_state, lambda stack: self.queue.add([stack]))
        self.source: Source = open_source(cfg)
        secret = read_secret(cfg.webhook_secret_file, cfg.webhook_secret_env, setting="webhook_secret_file")
        webhook = None
        if secret:  # one forge's secret, checked that forge's way only
            gitlab = cfg.webhook_forge == "gitlab"
            webhook = WebhookAuth(gitlab_token=secret) if gitlab else WebhookAuth(github_secret=secret.encode())
        self.http = AgentHttp(
            status=self.status,
            ready=self.ready.is_set,
            metrics=self.metrics,
            on_webhook=self.on_webhook,
            webhook=webhook,
            api={name: functools.partial(self.api, name) for name in API_CALLS},
            page=self.page,
            cluster_api=self._cluster_calls(),
        )
        self.listener = self.http.add_tcp(host, port, allowed_hosts=cfg.allowed_hosts)
        self.cluster_listener = None
        if self.membership is not None:
            self.cluster_listener = self.http.add_cluster(
                *split_listen(cfg.cluster_listen), tls=cluster_tls(cfg, frozenset(API_CALLS))
            )
            if certificate_expiry(cfg.state_path) is not None:
                self.metrics.watch_certificate(lambda: certificate_expiry(cfg.state_path))
        if cfg.webhook_listen:
            self.http.add_tcp(*split_listen(cfg.webhook_listen), webhook_only=True)
        self.http.add_unix(self.control_socket, group=control_gid)

    def _register(self, expected_id: str) -> Member:
        state = self.cfg.state_path
        own = node_id(state)
        if own != expected_id:
            raise ConfigError(
                f"{state / 'cluster.json'} is for node {expected_id} but {state / 'node-id'} holds {own}; "
                "join the cluster again from this state directory"
            )
        member = Member(
            self.log,
            node_id=own,
            name=self.node,
            status=status_source(self.cfg, own),
            records=self.records,
            metrics=self.metrics,
        )
        try:
            member.register()
        except Unavailable as exc:
            # Static stability: the node keeps running its containers; it registers when the state log answers.
            log.warning("state log unreachable; registering when it answers", extra={"error": str(exc)})
        return member

    def _cluster_calls(self) -> dict[str, Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]] | None:
        """The cluster listener's calls: joining, and the changing calls managers forward to the leader."""
        if self.membership is None:
            return None
        calls = cluster_api(self.cfg, self.log, self.membership)
        calls[CERTIFICATE_PATH] = certificate_call(self.cfg, self.log)
        for name in API_CALLS:
            calls[name] = functools.partial(self.from_manager, name)
        return calls

    def _reload_certificate(self) -> None:
        """The cluster listener serves the node's new certificate (a role changed) from its next connection."""
        listener = self.cluster_listener
        if listener is not None and listener.tls is not None:
            paths = PkiPaths.of(self.cfg.state_path)
            listener.tls.context.load_cert_chain(str(paths.node_cert), str(paths.node_key))

    def from_manager(self, name: str, body: dict[str, Any], peer: str) -> tuple[int, dict[str, Any]]:
        """A changing call another manager forwarded (`dabctl reconcile --once` there): run here while this node
        leads, and only for a caller at a manager's recorded address (the role check; with certificates, the
        certificate's role will be)."""
        snapshot = self.records.snapshot(restarts=False)
        if not is_manager_peer(snapshot, peer):
            return 403, {"error": f"{peer} is not the address of a manager that is up: only managers may ask this"}
        leader = snapshot.leader
        if leader is None or leader.node_id != self.engine.node:
            where = f"{leader.name} at {leader.cluster_address}" if leader is not None else "none now"
            return 409, {"error": f"this node does not lead the cluster (the leader: {where}); try again"}
        return self.api(name, body)

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; never stops workloads because it is stopping."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.shutdown())
        self.http.start()
        if self.notifier.routes:
            self._seen = notices.observe(self.records, {}, {}, None)  # what was so before this agent: no news
            self.notifier.start()
        self.api_url = self.listener.url
        self.lock.describe(api=self.api_url)  # with `listen: ...:0`, the port the kernel chose
        log.info("agent started", extra={"node": self.node, "source": self.source.location, "api": self.api_url})
        if self.member is not None:
            self.member.start()
            # The node's etcd member follows its role: started when promoted, retired when demoted or removed.
            roles = EtcdRoles(self.cfg, self.log, self.member, self._reload_certificate)
            self._spawn(functools.partial(roles.run, self.stop), "etcd roles")
            if isinstance(self.log, EtcdStateLog):
                self._spawn(functools.partial(self._follow_endpoints, self.log), "etcd endpoints")
        self._spawn(self._poll_source, "source")
        self._spawn(self._follow_events, "events")
        if self.cfg.resync_interval:
            self._spawn(self._resync, "resync")
        if self.engine.cluster is not None:  # a cluster node acts as soon as the leader commits
            for prefix in (INTENT_KEY, STACKS):
                self._spawn(functools.partial(self._follow_state, prefix), f"watch {prefix}")
            # The leader acts as soon as a node changes: a lease lapsing (its status key deleted), a node joining or
            # returning, `node update`, a report (a slot started, turned healthy, failed), not at the next resync.
            # Every node follows the reports too: where its published ports forward follows the other nodes' ready
            # replicas.
            self._spawn(functools.partial(self._follow_state, NODE), f"watch {NODE}")
            self._spawn(functools.partial(self._follow_state, NODES, self._leading), f"watch {NODES}")
        observer = self._watch_directory()
        try:
            self._work()
        finally:
            self.shutdown()
            if observer is not None:
                observer.stop()
            self._close()
        log.info("agent stopped")
        return 0

    def shutdown(self) -> None:
        self.stop.set()
        self.queue.close()
        self.exits.close()
        self._wake.set()
        stream = self._events_stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _close(self) -> None:
        self.http.stop()
        self.notifier.stop()
        for t in self._threads:
            t.join(timeout=5)
        if self.member is not None:
            self.member.close()
        self.source.close()
        self.log.close()
        self.docker.close()
        self.lock.release()

    def _follow_endpoints(self, client: EtcdStateLog) -> None:
        """Every ENDPOINTS_INTERVAL: the etcd client follows the cluster's voting members (see follow_endpoints)."""
        while not self.stop.wait(ENDPOINTS_INTERVAL):
            try:
                follow_endpoints(self.cfg, client)
            except StateLogError as exc:
                log.debug("etcd members not listed", extra={"error": str(exc)})

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # --- the source -----------------------------------------------------------------------------------------------

    def refresh_source(self) -> bool:
        """Load the source if it changed; enqueue the stacks it changed. False when the source is unreachable."""
        with self._source_lock:
            try:
                fp = self.source.fingerprint()
                if self.source_error is not None:
                    log.info("source reachable again")
                    self.source_error = None
                if fp == self.fingerprint and self.desired is not None:
                    return True
                new = self.source.load()
            except InvalidBundles as exc:
                self._broken_bundles(exc)
                self.fingerprint = fp
                self._refusal(None)
                self.pass_ended(None)  # the page and the sinks hear of it now, not at the next pass
                return True
            except VerificationRefused as exc:
                # Not remembered as loaded (fingerprint): a signed tag may yet make it acceptable, and each check
                # after the first costs one fetch negotiation (signature results are cached per commit).
                self._refusal(exc)
                return True
            except Exception as exc:
                self.source_error = one_line(exc)
                self.metrics.git_fetch_failures.inc()
                log.warning("source unreachable; workloads untouched", extra={"error": self.source_error})
                return False
            self.last_fetch_at = datetime.now(UTC).isoformat()
            self.source_error = None
            self._refusal(None)
            old = self.desired
            changed = {
                name
                for name in set(new.stacks) | set(old.stacks if old else {})
                if old is None
                or name not in old.stacks
                or name not in new.stacks
                or (old.stacks[name].revision, old.stacks[name].bundle_hash)
                != (new.stacks[name].revision, new.stacks[name].bundle_hash)
            }
            if old is None:
                changed |= set(self.records.stacks())
            changed |= set(self.load_errors)  # fixed back to what runs: a pass says so (status, page, sinks)
            self.desired, self.fingerprint = new, fp
            for stack in list(self.load_errors):
                self.metrics.set_stack_error(stack, None)
            self.load_errors, self.load_details = {}, {}
            if changed:
                log.info("source changed", extra={"stacks": ",".join(sorted(changed))})
                self._source_changed |= changed
                self.queue.add(changed, urgent=True)
            return True

    def _refusal(self, exc: VerificationRefused | None) -> None:
        """Show (or clear) a revision refused by the signature checks in status, metrics and the log."""
        if exc is None:
            if self.refused is not None:
                log.info("source revision accepted by the signature checks", extra={"commit": self.fingerprint})
                self.refused = None
                self.metrics.set_refusal(None)
            return
        self.last_fetch_at = datetime.now(UTC).isoformat()
        if self.refused is not None and self.refused.message == str(exc):
            return  # already reported: the log says it once per refused revision
        self.refused = VerifyRefusal(
            commit=exc.commit, key=exc.key, rule=exc.rule, message=str(exc), at=self.last_fetch_at
        )
        self.metrics.verification_refusals.inc()
        self.metrics.set_refusal((exc.commit, exc.key, exc.rule))
        log.error(
            "source revision refused: not applied; what runs keeps running",
            extra={"commit": exc.commit, "key": exc.key, "rule": exc.rule, "error": str(exc)},
        )

    def _broken_bundles(self, exc: InvalidBundles) -> None:
        errors: dict[str, str] = {}
        details: dict[str, tuple[str, str]] = {}
        for e in exc.errors:
            errors.setdefault(_stack_of_file(e.file), str(e))
            details.setdefault(_stack_of_file(e.file), (e.file, e.field))
        self.load_errors, self.load_details = errors, details
        for stack, error in errors.items():
            self.metrics.set_stack_error(stack, error)
        # Every refused bundle is named (with its first problem and rule): after an upgrade whose defaults refuse
        # more, the first pass says which bundles to fix or which exceptions to write, not only that it stopped.
        log.error(
            "invalid bundles: the last good state keeps running",
            extra={"bundles": ", ".join(sorted(errors)), "errors": _listed(exc.errors)},
        )

    def _poll_source(self) -> None:
        backoff = 1.0
        while not self.stop.is_set():
            ok = self.refresh_source()
            interval = self.cfg.poll_interval
            if ok:
                backoff = 1.0
                wait = interval * random.uniform(0.9, 1.1) if interval else None
            else:
                wait = min(backoff, interval) if interval else backoff
                backoff = min(backoff * 2, max(interval, 1.0) if interval else 60.0)
            self._wake.wait(wait)
            self._wake.clear()
            if self.source.kind == "directory":
                time.sleep(0.2)  # debounce editors that write a file in several steps

    def _watch_directory(self) -> Any:
        directory = getattr(self.source, "directory", None)
        if self.source.kind != "directory" or directory is None:
            return None
        return watch_directory(directory, self._wake.set)

    def on_webhook(self) -> None:
        log.info("webhook received: fetching now")
        self._wake.set()

    # --- other triggers -------------------------------------------------------------------------------------------

    def all_keys(self) -> set[str]:
        keys = set(self.desired.stacks) if self.desired else set()
        return keys | set(self.records.stacks())

    def _resync(self) -> None:
        while not self.stop.wait(self.cfg.resync_interval):
            self.queue.add(self.all_keys())

    def _leading(self) -> bool:
        return self.engine.cluster is not None and self.engine.cluster.is_leader

    def _follow_state(self, prefix: str, when: Callable[[], bool] = lambda: True) -> None:
        """On a cluster node: a change under `prefix` (the key every orchestrator commit puts, the stack records the
        leader writes, the nodes' records for the leader) queues every stack while `when()` holds; after a lost
        watch, watch again and queue them all."""
        backoff = 1.0
        while not self.stop.is_set():
            watch = None
            try:
                watch = self.log.watch(prefix, self.log.revision() + 1)
                while not self.stop.is_set() and not watch.cancelled:
                    if watch.next(timeout=1.0) is not None and when():
                        self.queue.add(self.all_keys(), after=EVENT_DEBOUNCE)
                        backoff = 1.0
            except DabctlError as exc:
                log.warning("state watch dropped; watching again", extra={"prefix": prefix, "error": one_line(exc)})
            finally:
                if watch is not None:
                    watch.cancel()
            if not self.stop.is_set():
                if when():
                    self.queue.add(self.all_keys())
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _follow_events(self) -> None:
        """Docker's event stream -> stack keys; after a dropped stream, reconnect with `since` and resync all."""
        since = int(time.time())
        first = True
        backoff = 1.0
        while not self.stop.is_set():
            try:
                stream = self.docker.events(since)
                self._events_stream = stream
                backoff = 1.0
                if not first:
                    self.queue.add(self.all_keys())
                first = False
                for ev in stream:
                    since = int(ev.get("time", since))
                    self._on_event(ev)
            except Exception as exc:
                if self.stop.is_set():
                    break
                log.warning(
                    "docker event stream dropped; reconnecting",
                    extra={"error": str(exc)[:200], "retry_in": backoff},
                )
                first = False
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        if self._events_stream is not None:
            self._events_stream.close()

    def _on_event(self, ev: dict[str, Any]) -> None:
        trigger = event_trigger(ev, self.engine.owner)
        if trigger is None or (trigger.network and trigger.stack not in self.all_keys()):
            return
        if trigger.container is None:
            self.queue.add([trigger.stack], after=EVENT_DEBOUNCE)
            return
        # Docker emits die/kill before it lists the container as exited (agent/node/triggers.py): the stack is queued
        # once the engine says the container stopped running, with a late pass in case that wait hangs.
        self.queue.add([trigger.stack], after=EXIT_FALLBACK)
        self.exits.watch(trigger.container, trigger.stack)

    # --- the worker -----------------------------------------------------------------------------------------------

    def _work(self) -> None:
        self.queue.add(self.all_keys())
        while not self.stop.is_set():
            keys = self.queue.next_batch(timeout=1.0)
            if keys and not self.stop.is_set():
                try:
                    self.run_pass(keys)
                except Exception:
                    # A bug must not stop the agent (nor, ever, the workloads): log it and retry later.
                    log.exception("pass crashed", extra={"stacks": ",".join(sorted(keys))})
                    for k in keys:
                        self.queue.retry(k)

    def run_pass(self, keys: Iterable[str]) -> PassReport | None:
        """One pass over `keys` (one at a time across the agent); failures requeue with backoff."""
        done = self._pass(set(keys), self.cfg.allow_empty)
        return done[1] if done else None

    def _pass(
        self, keys: set[str], allow_empty: bool, migrate: Sequence[str] = ()
    ) -> tuple[PassPlan, PassReport] | None:
        """The plan and report of one pass over `keys`; None when it could not run (errors in pass_errors)."""
        done = self._locked_pass(keys, allow_empty, migrate)
        self.pass_ended(done[0] if done else None)
        return done

    def pass_ended(self, plan: PassPlan | None) -> None:
        """Where a pass ends (or a control call changed the state): the page's new generation, notifications."""
        self.page.pass_ended(plan)
        self.http.changed()
        if not self.notifier.routes:
            return
        try:
            errors = {**self.pass_errors, **self.load_errors}
            seen = notices.observe(self.records, errors, self.load_details, self.desired)
        except DabctlError as exc:  # the state cannot be read now: the next pass looks again
            log.warning("notifications skipped: cannot read the state", extra={"error": one_line(exc)})
            return
        events = changes(self._seen, seen, node=self.node, at=datetime.now(UTC).isoformat(timespec="seconds"))
        self._seen = seen
        self.notifier.publish(events)

    def _locked_pass(
        self, keys: set[str], allow_empty: bool, migrate: Sequence[str]
    ) -> tuple[PassPlan, PassReport] | None:
        with self._pass_lock:
            if self.desired is None and not self._first_load(keys):
                return None
            desired = self.desired
            assert desired is not None
            started = time.monotonic()
            try:
                plan = self.engine.plan(desired, allow_empty, only=keys, migrate_volumes=migrate)
                report = self.engine.apply(plan, stop=self.stop)
                if plan.recheck_in is not None:  # a rollout, a health gate or a restart backoff is waiting
                    self.queue.add(keys, after=plan.recheck_in)
            except (DabctlError, SdkError, OSError) as exc:
                # docker-py's own errors and a lost socket are the engine's, so retryable like EngineError.
                retry = exc.retryable if isinstance(exc, DabctlError) else True
                why = one_line(exc)
                if isinstance(exc, OSError):
                    why = f"no Docker engine answers at {self.docker.url} ({type(exc).__name__}); retrying"
                for k in keys:
                    self.pass_errors[k] = why
                    if retry:
                        self.queue.retry(k)
                self.metrics.passes.labels(result="failure").inc()
                # A terminal error waits for what can change it (a commit, a restart with other settings): the
                # source poller and the resync queue the stacks again; retrying sooner would only repeat it.
                log.error(
                    "pass failed" if retry else "pass failed; not retried until the source or settings change",
                    extra={"error": why[:300], "stacks": ",".join(sorted(keys))},
                )
                return None
            self.metrics.reconcile_duration.observe(time.monotonic() - started)
            self._schema_held(plan)
            failed: dict[str, str] = {s: str(sp.error) for s, sp in plan.stacks.items() if sp.error}
            for s, sp in plan.stacks.items():  # a paused rollout or a slot given up on is reported, not retried hot
                for note in sp.notes:
                    if note.failing:
                        failed.setdefault(s, str(note))
            for r in report.results:
                if r.outcome is Outcome.FAILED:
                    stack = stack_of(r.action)
                    failed.setdefault(stack, f"{r.action}: {r.error}")
            if plan.balancer_error:  # this node's ruleset stays as it is: each stack that publishes a port says why
                for name in _publishing(plan.desired) & keys:
                    failed.setdefault(name, f"published ports: {plan.balancer_error}")
            self._settle(keys, failed, desired)
            self._count_pass(keys, plan, report, failed=bool(failed))
            if not failed and not self.load_errors:
                self.ready.set()
            return plan, report

    def _schema_held(self, plan: PassPlan) -> None:
        """The metric of live nodes holding this leader (agent.cluster.schema), and one log line when it changes."""
        self.metrics.set_schema_held((c.name, c.reads, str(c.writes)) for c in plan.schema_held)
        if plan.schema_held != self._held:
            for c in plan.schema_held:
                log.warning("leader held by a node's state schema", extra={"node": c.name, "error": str(c)})
            if not plan.schema_held:
                log.info("no live node holds the leader any more: it writes for the cluster again")
            self._held = plan.schema_held

    def _first_load(self, keys: set[str]) -> bool:
        """Load the source for a pass that has no desired state yet; False (the keys' errors set) when it cannot."""
        reachable = self.refresh_source()
        if self.desired is not None:
            return True
        for k in keys:  # unreachable (retried), or refused or invalid: terminal until the source changes
            if reachable:
                self.pass_errors[k] = self._why_not_loaded()
            else:
                self.queue.retry(k)
        return False

    def _why_not_loaded(self) -> str:
        if self.refused is not None:
            return self.refused.message
        errors = "; ".join(sorted(set(self.load_errors.values())))
        return errors or self.source_error or "the source could not be loaded"

    def _settle(self, keys: set[str], failed: dict[str, str], desired: DesiredState) -> None:
        """Each key after a pass that ran: a failed one retries with backoff, any other starts its backoff over."""
        for k in keys:
            if k in failed:
                self.pass_errors[k] = failed[k]
                self.metrics.set_stack_error(k, failed[k])
                delay = self.queue.retry(k)
                log.warning("stack failed; retrying", extra={"stack": k, "retry_in": delay, "error": failed[k][:300]})
            else:
                self.pass_errors.pop(k, None)
                if k not in self.load_errors:
                    self.metrics.set_stack_error(k, None)
                self.queue.forget(k)
                if k in desired.stacks:
                    self.metrics.set_applied_revision(k, desired.stacks[k].revision)

    def _count_pass(self, keys: set[str], plan: PassPlan, report: PassReport, failed: bool) -> None:
        """Metrics and the log line of a pass that ran."""
        for r in report.results:
            stack = stack_of(r.action)
            if r.outcome is not Outcome.FAILED and stack not in self._source_changed:
                self.metrics.drift_corrections.labels(stack=stack).inc()
        self._source_changed -= keys
        self.metrics.passes.labels(result="failure" if failed else ("success" if report.results else "noop")).inc()
        counts: dict[tuple[str, str, str], int] = {}
        for rep in plan.replicas:
            counts[(rep.stack, rep.service, rep.state)] = counts.get((rep.stack, rep.service, rep.state), 0) + 1
        self.metrics.set_containers(counts)
        if report.results or failed:
            log.info(
                "pass done",
                extra={
                    "reconcile_id": report.reconcile_id,
                    "stacks": ",".join(sorted(keys)),
                    "n_created": report.count(Outcome.CREATED),
                    "n_updated": report.count(Outcome.UPDATED),
                    "n_removed": report.count(Outcome.REMOVED),
                    "n_failed": report.count(Outcome.FAILED),
                },
            )

    # --- status and the CLI's API ---------------------------------------------------------------------------------

    def status(self) -> StatusOutput:
        return self._observe()[1]

    def _replicas(self) -> list[Replica]:
        return self.docker.list_replicas(self.engine.owner)

    def _observe(self) -> tuple[Fleet, StatusOutput]:
        """The fleet (this node's containers, one list call, and the cluster's reports, one state read) and the
        status built from it."""
        snapshot = self.records.snapshot(restarts=False)
        seen = fleet(snapshot, self.engine.node, self.node, self._replicas())
        errors = {**self.pass_errors, **self.load_errors}
        stacks = fleet_statuses(self.desired, snapshot, seen, errors=errors)
        revision = None
        if self.source.kind == "git" and self.fingerprint:
            revision = f"{self.source.ref}@sha1:{self.fingerprint}"
        source = SourceStatus(
            kind=self.source.kind,
            location=self.source.location,
            ref=self.source.ref,
            path=self.source.path,
            revision=revision,
            last_fetch_at=self.last_fetch_at,
            last_fetch_error=self.source_error,
            verify=self._verify_status(),
        )
        status = StatusOutput(
            node=self.node,
            ready=self.ready.is_set(),
            source=source,
            stacks=stacks,
            nodes=seen.nodes,
            schema_held=seen.schema_held,
        )
        return seen, status

    def _verify_status(self) -> VerifyStatus | None:
        verifier = getattr(self.source, "verification", None)
        if verifier is None:
            return None
        return VerifyStatus(mode=self.cfg.verify.mode, accepted=verifier.accepted, refused=self.refused)

    # The Control interface (agent/node/control.py): the CLI's changing commands, run through this loop.

    def reconcile(self, request: ReconcileRequest) -> ReconcileResult:
        mine = source_ref(self.cfg)
        if request.source is not None and request.source != mine:
            raise ControlRefused(
                f"the agent on this state follows {mine}, not {request.source}: run without --source, "
                "or stop the agent to reconcile another source"
            )
        self.refresh_source()
        keys = self.all_keys()
        allow_empty = self.cfg.allow_empty if request.allow_empty is None else request.allow_empty

        def step() -> tuple[PassPlan, PassReport]:
            done = self._pass(keys, allow_empty, request.migrate_volumes)
            if done is None:
                raise PassNotRun([f"{k}: {e}" for k, e in sorted(self.pass_errors.items()) if k in keys])
            return done

        def waiting_for() -> list[str]:
            return unhealthy(self.engine, self.desired) if self.desired is not None else []

        try:
            result = converge(step, waiting_for, wait=request.wait, deadline=time.monotonic() + request.timeout)
        except PassNotRun as exc:
            errors = exc.errors or ([self._why_not_loaded()] if self.desired is None else ["the pass could not run"])
            if self.refused is not None and self.refused.message not in errors:
                errors.append(self.refused.message)
            return ReconcileResult(ok=False, stacks=len(keys), errors=errors)
        load_errors = [f"{k}: {e}" for k, e in sorted(self.load_errors.items())]
        if self.refused is not None:
            load_errors.append(self.refused.message)
        return result.model_copy(update={"ok": result.ok and not load_errors, "errors": result.errors + load_errors})

    def known_stacks(self) -> set[str]:
        """Stacks a control call may name: in the source, in the state, or suspended."""
        return self.all_keys() | self.records.suspended()

    def _known(self, stack: str) -> None:
        if stack not in self.known_stacks():
            raise UnknownStack(f"no stack named {stack!r} on this node: it is neither in the source nor deployed")

    def rollback(self, request: RollbackRequest) -> RollbackResult:
        self._known(request.stack)
        with self._pass_lock:
            if request.unpin:
                lifted = unpin_stack(self.records, request.stack)
                message = f"{request.stack}: " + ("unpinned: following the source" if lifted else "was not pinned")
            else:
                pin = pin_stack(self.records, request.stack, request.to)
                message = f"{request.stack}: pinned to {pin.revision}"
        keys = {request.stack}

        def step() -> tuple[PassPlan, PassReport]:
            done = self._pass(keys, self.cfg.allow_empty)
            if done is None:
                raise PassNotRun([e for k, e in self.pass_errors.items() if k in keys])
            return done

        try:
            passes = converge(step, lambda: [], wait=False, deadline=time.monotonic() + request.timeout)
        except PassNotRun as exc:
            passes = ReconcileResult(ok=False, stacks=1, errors=exc.errors or ["the pass could not run"])
        return RollbackResult(message=message, passes=passes)

    def suspend(self, request: SuspendRequest) -> SuspendResult:
        self._known(request.stack)
        changed = self.records.set_suspended(request.stack, request.suspended)
        self.pass_ended(None)
        if not request.suspended:
            self.queue.add([request.stack], urgent=True)
        return SuspendResult(stack=request.stack, suspended=request.suspended, changed=changed)

    def api(self, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Serve one control call of the CLI: parse the request, run it here, answer its result as JSON."""
        calls: dict[str, Callable[[dict[str, Any]], BaseModel]] = {
            "reconcile": lambda b: self.reconcile(ReconcileRequest.model_validate(b)),
            "rollback": lambda b: self.rollback(RollbackRequest.model_validate(b)),
            "suspend": lambda b: self.suspend(SuspendRequest.model_validate({**b, "suspended": True})),
            "resume": lambda b: self.suspend(SuspendRequest.model_validate({**b, "suspended": False})),
        }
        handler = calls.get(name)
        if handler is None:
            return 404, {"error": f"no such API call {name!r}"}
        try:
            return 200, handler(body).model_dump(mode="json")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return 400, {"error": f"{name}: {where}: {first['msg']}"}
        except UnknownStack as exc:
            return 404, {"error": str(exc)}
        except DabctlError as exc:  # refused as asked (409), or cannot run now (503): one line either way
            return (503 if exc.retryable else 409), {"error": str(exc)}


class ControlRefused(DabctlError):
    """The agent will not run a control call as asked (another source); the message says what to do."""


class UnknownStack(ControlRefused):
    """A control call names a stack that is neither in the source nor in the state."""


class PassNotRun(DabctlError):
    """A pass of a control call could not run (source or engine unreachable); `errors` name the stacks."""

    retryable = True

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"control_group: no group named {name!r} on this host; create it (groupadd {name}) or remove the setting"
        ) from None


def _open_to_group(state: Path, gid: int) -> None:
    """With control_group: the state directory becomes 0710 root:GROUP, traversable to reach the socket only."""
    os.chown(state, -1, gid)
    os.chmod(state, 0o710)


def run_agent(cfg: AgentConfig) -> int:
    """Entry point of `dabctl agent`."""
    agent = Agent(cfg)
    log.debug("agent pid", extra={"pid": os.getpid(), "run": uuid.uuid4().hex[:8]})
    return agent.run()


def _ensure_etcd_member(cfg: AgentConfig) -> None:
    """Adopt this manager's etcd member, or start it when it does not run (it outlived the last agent otherwise).
    A member that fails to start is logged, not fatal: the agent reaches the cluster's other members. A member the
    cluster's etcd no longer lists (its node was demoted or removed while the agent was down) is retired instead."""
    try:
        if not retire_member(cfg):
            LocalMember(cfg.state_path).ensure()
    except EtcdMemberError as exc:
        log.error("etcd member not running", extra={"error": str(exc)})
    refresh_endpoints(cfg)
