"""A dabctl cluster on the harness, made the way an operator makes one: `cluster init` on the first node (no
`--etcd`: it runs the cluster's etcd member, TLS from the new cluster CA), `cluster join` with the printed tokens on
the others (a joining manager adds its own etcd member), then `dabctl agent` on every node — no `etcd_insecure`, no
plain HTTP anywhere: every agent presents its node certificate to etcd and on the cluster listener.

    with formed(cluster, tmp_path, managers=1) as dab:     # n1 the first manager, the other nodes workers
        dab.deploy("shop", {"web": {...}})                 # a bundle in the managers' source directory
        dab.wait(lambda: dab.running("shop", "web") == {"n1": 2, "n2": 2, "n3": 2})
        log = dab.root_log()                               # etcd's root user over TLS (closed with the cluster)

`managers=3` gives a 3-member etcd (3 voting members: losing one keeps quorum); `managers=2` two members (both
needed). Leaving the block stops the agents, SIGKILLs the etcd members (their own sessions, found by pid file) and
removes what init and join wrote in each node's state directory (node-id, cluster.json, cluster-secrets.json, pki/,
etcd/), whatever happened, so the next formed cluster starts fresh and the harness's leftover check stays clean.
The harness's own etcd is not used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from agent.node.etcdmember import LocalMember
from agent.pki.files import PkiPaths
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT
from tests.support.cluster import Cluster, Node, parallel
from tests.support.polling import wait_for

# The environment `Node.dabctl` needs for cluster commands: nothing any more (the node's cluster.json names its
# etcd and its certificate); kept so that callers written for the plain-HTTP harness etcd keep working.
ENV: dict[str, str] = {}

TTL = 6  # the lease TTL formed clusters are made with (--lease-ttl)
# What `cluster init` / `cluster join` leave in a node's state directory (etcd/ is the member's, removed apart).
CLUSTER_FILES = ("node-id", "cluster.json", "cluster-secrets.json", "pki")


class DabCluster:
    """The harness's nodes as one dabctl cluster: `managers` run the source and an etcd member, every node an
    agent."""

    def __init__(self, cluster: Cluster, root: Path, managers: int = 1, lease_ttl: int | None = TTL) -> None:
        if not 1 <= managers <= len(cluster.nodes):
            raise ValueError(f"managers={managers}: 1 to {len(cluster.nodes)}")
        self.cluster = cluster
        self.lease_ttl = lease_ttl  # None: the product's default (TTL 6 here: margin under a loaded suite)
        self.nodes = cluster.nodes
        self.managers = self.nodes[:managers]
        self.workers = self.nodes[managers:]
        self.prefix = "/dabctl"
        self.source = root / "stacks"
        self.source.mkdir(parents=True, exist_ok=True)
        self.source.chmod(0o755)
        self.tokens: dict[str, str] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self._logs: list[EtcdStateLog] = []
        self.seconds: dict[str, float] = {}  # what forming took: init (with the first agent), managers, total

    # --- forming ---

    def form(self, **agent_config: Any) -> None:
        t0 = time.monotonic()
        first = self.nodes[0]
        out = first.dabctl(
            "cluster", "init", "--node-name", first.name, "--advertise-address", first.address,
            *(["--lease-ttl", str(self.lease_ttl)] if self.lease_ttl else []),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr + self.etcd_logs()
        self.prefix = self.membership(first)["etcd_prefix"]
        for role in ("worker", "manager"):
            got = first.dabctl("cluster", "join-token", role, "-q")
            assert got.returncode == 0, got.stderr
            self.tokens[role] = got.stdout.strip()
        self.start(first, **agent_config)
        self.seconds["init"] = time.monotonic() - t0
        # Managers one at a time (etcd takes one learner at a time), then the workers and the agents together.
        for node in self.managers[1:]:
            self.join(node, "manager")
        if len(self.managers) > 1:
            # The first agent started knowing only its own member: its running client follows the members added
            # since (and keeps them in cluster.json), so it fails over to every member without a restart.
            count = len(self.managers)
            self.wait(lambda: len(self.membership(first)["state"].split(",")) == count, timeout=60, what="n1 follows")
        self.seconds["managers"] = time.monotonic() - t0 - self.seconds["init"]
        parallel([partial(self.join, n, "worker") for n in self.workers])
        parallel([partial(self.start, n, **agent_config) for n in self.nodes[1:]])
        wait_for(lambda: len(self.up()) == len(self.nodes), timeout=60)
        self.seconds["total"] = time.monotonic() - t0
        print(
            f"\nformed {len(self.managers)} manager(s) + {len(self.workers)} worker(s): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        )

    def join(self, node: Node, role: str) -> None:
        out = node.dabctl(
            "cluster", "join", "--token", self.tokens[role], "--node-name", node.name, "--advertise-address",
            node.address, f"{self.nodes[0].address}:9421",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr + self.etcd_logs()
        assert f"as a {role}" in out.stdout, out.stdout

    def start(self, node: Node, public_listen: bool = False, **agent_config: Any) -> None:
        """`dabctl agent` on `node` (managers read the source; workers converge from the state log alone);
        `public_listen`: its HTTP listener (status, the web page) on the node's address, reachable from the host."""
        if public_listen:
            agent_config = {"listen_public": True, **agent_config}
        config = {
            "source": str(self.source),
            "cluster_listen": f"{node.address}:9421",
            "advertise_address": node.address,  # the harness's nodes have no default route to take it from
            "allow_empty": True,
            "resync_interval": 5,
            **agent_config,
        }
        self.configs[node.name] = {"public_listen": public_listen, **agent_config}
        node.start_agent(config=config, ready=False, public=public_listen)
        try:
            wait_for(lambda: node.connects(node.address, 9421), timeout=60)
        except AssertionError:
            raise AssertionError(f"{node.name}'s cluster listener: {node.agent.log()[-3000:]}") from None

    def restart(self, node: Node) -> None:
        self.start(node, **self.configs[node.name])

    # --- looking ---

    def membership(self, node: Node) -> dict[str, Any]:
        """The node's cluster.json."""
        doc: dict[str, Any] = json.loads((node.state_dir / "cluster.json").read_text())
        return doc

    def node_id(self, node: Node) -> str:
        return (node.state_dir / "node-id").read_text().strip()

    @property
    def etcd_endpoints(self) -> list[str]:
        """The client URL of every manager's etcd member (TLS)."""
        return [f"https://{n.address}:2379" for n in self.managers]

    def root_log(
        self, prefix: str | None = None, timeout: float = 5, endpoints: list[str] | None = None
    ) -> EtcdStateLog:
        """etcd's root user over TLS (n1's certificate) on the cluster's prefix, at `endpoints` (default: every
        manager's member); closed when the cluster is."""
        first = self.nodes[0]
        password = json.loads((first.state_dir / "cluster-secrets.json").read_text())["etcd_root_password"]
        pki = PkiPaths.of(first.state_dir)
        log = EtcdStateLog(
            endpoints or self.etcd_endpoints, prefix=self.prefix if prefix is None else prefix, user=ROOT, password=password,
            ca_file=str(pki.ca_cert), cert_file=str(pki.node_cert), key_file=str(pki.node_key), timeout=timeout,
        )  # fmt: skip
        self._logs.append(log)
        return log

    def etcd_logs(self, lines: int = 20) -> str:
        return "".join(
            f"\n--- etcd on {n.name}:\n{LocalMember(n.state_dir).log_tail(lines)}"
            for n in self.nodes
            if (n.state_dir / "etcd").exists()
        )

    def nodes_json(self, on: Node | None = None) -> list[dict[str, Any]]:
        out = (on or self.nodes[0]).dabctl("node", "ls", "--json")
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def up(self, on: Node | None = None) -> list[str]:
        return [r["name"] for r in self.nodes_json(on) if r["state"] == "up"]

    def running(self, stack: str, service: str, nodes: list[Node] | None = None) -> dict[str, int]:
        """Running containers of a service by node name (nodes with none left out)."""
        out: dict[str, int] = {}
        for node in nodes or self.nodes:
            if not node.engine.running:
                continue
            found = node.client.containers(
                filters={"label": [f"dabctl.stack={stack}", f"dabctl.service={service}"], "status": "running"}
            )
            if found:
                out[node.name] = len(found)
        return out

    def deploy(self, stack: str, services: Mapping[str, Mapping[str, Any]]) -> None:
        """Write the stack's bundle into the managers' source directory."""
        bundle = {"Version": "0.1", "Services": {name: dict(spec) for name, spec in services.items()}}
        path = self.source / f"{stack}.dab"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(bundle))
        tmp.rename(path)

    def remove(self, stack: str) -> None:
        """Take the stack's bundle out of the source directory (the agents remove its containers)."""
        with contextlib.suppress(FileNotFoundError):
            (self.source / f"{stack}.dab").unlink()

    def wait(self, condition: Callable[[], object], timeout: float = 90, what: str = "") -> None:
        try:
            wait_for(condition, timeout=timeout, interval=0.25)
        except AssertionError:
            logs = "\n".join(
                f"--- {n.name} agent log ---\n{n.agent.log()[-3000:]}" for n in self.nodes if n.agent is not None
            )
            raise AssertionError(f"{what or 'condition'} not met within {timeout} s\n{logs}") from None

    # --- ending ---

    def close(self) -> None:
        for log in self._logs:
            with contextlib.suppress(Exception):
                log.close()
        self._logs.clear()
        parallel([partial(_stop_agent, n) for n in self.nodes])
        for node in self.nodes:
            if node.is_cut:
                node.heal()
        parallel([partial(forget, n) for n in self.nodes])


def _stop_agent(node: Node) -> None:
    with contextlib.suppress(Exception):
        if node.agent is not None and node.agent.proc is not None:
            node.agent.kill()  # SIGKILL: the cluster is dropped anyway, and a leaving agent waits on etcd
        node.agent = None
    node._restart_agent = False  # a killed node's `start()` brings back its engine, not this cluster's agent


def forget(node: Node) -> None:
    """No etcd member of a formed cluster runs on `node` and nothing of init or join is left in its state directory
    (SIGKILL: the data goes anyway, and members stopping one by one would wait out each other's elections)."""
    member = LocalMember(node.state_dir)
    pid = member.pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: member.pid() is None, timeout=10, interval=0.05)
    shutil.rmtree(member.dir, ignore_errors=True)
    for name in CLUSTER_FILES:
        path = node.state_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def formed(
    cluster: Cluster, root: Path, managers: int = 1, lease_ttl: int | None = TTL, **agent_config: Any
) -> Iterator[DabCluster]:
    """A formed dabctl cluster for the block (`lease_ttl` None: the product's default); afterwards no agent or etcd
    member of it runs and every node's state directory holds nothing of it."""
    dab = DabCluster(cluster, root, managers, lease_ttl)
    try:
        dab.form(**agent_config)
        yield dab
    finally:
        dab.close()
