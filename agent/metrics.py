"""The agent's Prometheus metrics, served at /metrics.

Everything lives on the instance's own CollectorRegistry, never the process-global one, so two agents (or two
tests) in one process do not collide and nothing a library registers globally leaks into /metrics.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# A converged pass takes milliseconds (two list calls); a cold converge with pulls can take a minute.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ERROR_LABEL_MAX = 200
PASS_RESULTS = ("success", "failure", "noop")


class Metrics:
    """The agent's Prometheus metrics on its own CollectorRegistry (never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconcile_duration = Histogram(
            "dabctl_reconcile_duration_seconds",
            "Duration of one reconcile pass.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.passes = Counter(
            "dabctl_reconcile_passes_total",
            "Reconcile passes by result (success, failure, noop).",
            ["result"],
            registry=self.registry,
        )
        # Every result exists from the start, so rate() and alerts see a 0 rather than an absent series.
        for result in PASS_RESULTS:
            self.passes.labels(result=result)
        self.drift_corrections = Counter(
            "dabctl_drift_corrections_total",
            "Changes applied to make live state match the bundle, by stack.",
            ["stack"],
            registry=self.registry,
        )
        self.replans = Counter(
            "dabctl_orchestrator_replans_total",
            "Passes planned again because another writer committed to the state between their read and commit.",
            registry=self.registry,
        )
        self.fenced = Counter(
            "dabctl_orchestrator_fenced_total",
            "Commits of this node refused by the leader fence: it planned as leader and its term ended before it "
            "committed (a deposed leader's writes; it follows the new leader).",
            registry=self.registry,
        )
        self.git_fetch_failures = Counter(
            "dabctl_git_fetch_failures_total",
            "Failed fetches of the bundle repository.",
            registry=self.registry,
        )
        self.verification_refusals = Counter(
            "dabctl_source_verification_refusals_total",
            "Source revisions refused by the signature checks (verify).",
            registry=self.registry,
        )
        self.verification_refused = Gauge(
            "dabctl_source_verification_refused",
            "1 while the source's newest revision is refused by the signature checks; commit, key and rule as labels.",
            ["commit", "key", "rule"],
            registry=self.registry,
        )
        self.schema_held = Gauge(
            "dabctl_cluster_schema_held",
            "1 for each live node that cannot read the state schema this leader writes (node, what it reads, what "
            "the leader writes): while any is 1 the leader writes nothing for the cluster; upgrade that node.",
            ["node", "reads", "writes"],
            registry=self.registry,
        )
        self._schema_labels: set[tuple[str, str, str]] = set()
        self.stack_errors = Gauge(
            "dabctl_stack_error",
            "1 while the stack's last pass failed; the error (first 200 characters) is a label.",
            ["stack", "error"],
            registry=self.registry,
        )
        self.applied_revision = Gauge(
            "dabctl_applied_revision_info",
            "The revision last applied to the stack (value always 1).",
            ["stack", "revision"],
            registry=self.registry,
        )
        self.managed_containers = Gauge(
            "dabctl_managed_containers",
            "Containers the agent manages, by stack, service and state.",
            ["stack", "service", "state"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "dabctl_cluster_leader",
            "1 while this node leads the cluster (a manager that won the election), else 0.",
            registry=self.registry,
        )
        self.term = Gauge(
            "dabctl_cluster_leader_term",
            "The current leader's term as this node last saw it (the leader key's create revision; 0: none seen).",
            registry=self.registry,
        )
        self.nodes = Gauge(
            "dabctl_cluster_nodes",
            "Nodes of the cluster by state (up: its lease holds; down: it lapsed), as the leader last counted.",
            ["state"],
            registry=self.registry,
        )
        # The replace-a-series setters are read-modify-write across two calls; one lock keeps them whole.
        self._lock = threading.Lock()
        self._stack_error_labels: dict[str, str] = {}
        self._revision_labels: dict[str, str] = {}
        self._refusal_labels: tuple[str, str, str] | None = None
        self._container_keys: set[tuple[str, str, str]] = set()

    def set_stack_error(self, stack: str, error: str | None) -> None:
        """Mark `stack` failed with `error` (replacing its previous error series), or clear it with None."""
        label = None if error is None else error_label(error)
        with self._lock:
            old = self._stack_error_labels.pop(stack, None)
            if old is not None and old != label:
                self.stack_errors.remove(stack, old)
            if label is not None:
                self.stack_errors.labels(stack=stack, error=label).set(1)
                self._stack_error_labels[stack] = label

    def set_applied_revision(self, stack: str, revision: str | None) -> None:
        """Record `revision` as applied to `stack`, removing the old series; None forgets the stack."""
        with self._lock:
            old = self._revision_labels.pop(stack, None)
            if old is not None and old != revision:
                self.applied_revision.remove(stack, old)
            if revision is not None:
                self.applied_revision.labels(stack=stack, revision=revision).set(1)
                self._revision_labels[stack] = revision

    def set_refusal(self, refusal: tuple[str, str, str] | None) -> None:
        """Mark the source refused at (commit, key, rule), replacing the previous series; None clears it."""
        labels = None
        if refusal is not None:
            labels = (error_label(refusal[0]), error_label(refusal[1]), error_label(refusal[2]))
        with self._lock:
            if self._refusal_labels is not None and self._refusal_labels != labels:
                self.verification_refused.remove(*self._refusal_labels)
            if labels is not None:
                commit, key, rule = labels
                self.verification_refused.labels(commit=commit, key=key, rule=rule).set(1)
            self._refusal_labels = labels

    def set_containers(self, counts: dict[tuple[str, str, str], int]) -> None:
        """Replace every managed-container series with `counts`, keyed (stack, service, state)."""
        with self._lock:
            for key in self._container_keys - counts.keys():
                self.managed_containers.remove(*key)
            for (stack, service, state), count in counts.items():
                self.managed_containers.labels(stack=stack, service=service, state=state).set(count)
            self._container_keys = set(counts)

    def set_schema_held(self, held: Iterable[tuple[str, str, str]]) -> None:
        """Replace the schema-held series with `held`: (node name, schemas it reads, schema the leader writes)."""
        now = set(held)
        with self._lock:
            for key in self._schema_labels - now:
                self.schema_held.remove(*key)
            for node, reads, writes in now:
                self.schema_held.labels(node=node, reads=reads, writes=writes).set(1)
            self._schema_labels = now

    def set_nodes(self, up: int, down: int) -> None:
        self.nodes.labels(state="up").set(up)
        self.nodes.labels(state="down").set(down)

    def watch_certificate(self, expiry: Callable[[], datetime | None]) -> None:
        """Export `dabctl_node_certificate_expiry_seconds` (a cluster node only), read from `expiry` at each scrape:
        seconds until this node's certificate expires (negative once it has; absent without one)."""

        def seconds() -> float:
            when = expiry()
            return (when - datetime.now(UTC)).total_seconds() if when is not None else math.nan

        Gauge(
            "dabctl_node_certificate_expiry_seconds",
            "Seconds until this node's cluster certificate expires (renewed at 2/3 of its life).",
            registry=self.registry,
        ).set_function(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def error_label(error: str) -> str:
    """An error as a label value: whitespace runs (newlines too) folded to one space, at most 200 characters."""
    return " ".join(error.split())[:_ERROR_LABEL_MAX]
