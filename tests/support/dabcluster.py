"""A dabctl cluster on the harness, made the way an operator makes one: `cluster init` on the first node,
`cluster join` with the printed tokens on the others, then `dabctl agent` on every node.

    with formed(cluster, tmp_path, managers=1) as dab:     # n1 the first manager, the other nodes workers
        dab.deploy("shop", {"web": {...}})                 # a bundle in the managers' source directory
        dab.wait(lambda: dab.running("shop", "web") == {"n1": 2, "n2": 2, "n3": 2})

`cluster init` turns etcd's authentication on for the shared etcd: leaving the block switches it off again and
removes the users and roles made, whatever happened, so the session's other tests find etcd as it was.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT, EtcdAuth
from tests.support.cluster import Cluster, Node
from tests.support.polling import wait_for

ENV = {"DABCTL_ETCD_INSECURE": "true"}


class DabCluster:
    """The harness's nodes as one dabctl cluster: `managers` run the source, every node an agent."""

    def __init__(self, cluster: Cluster, root: Path, managers: int = 1, lease_ttl: int | None = 6) -> None:
        self.cluster = cluster
        self.lease_ttl = lease_ttl  # None: the product's default
        self.nodes = cluster.nodes
        self.managers = self.nodes[:managers]
        self.prefix = f"/dabctl-c-{secrets.token_hex(4)}"
        self.source = root / "stacks"
        self.source.mkdir(parents=True, exist_ok=True)
        self.source.chmod(0o755)
        self.tokens: dict[str, str] = {}
        self.configs: dict[str, dict[str, Any]] = {}

    # --- forming ---

    def form(self, **agent_config: Any) -> None:
        first = self.nodes[0]
        out = first.dabctl(
            "cluster",
            "init",
            "--etcd",
            self.cluster.etcd_state,
            "--etcd-prefix",
            self.prefix,
            "--node-name",
            first.name,
            "--advertise-address",
            first.address,
            *(["--lease-ttl", str(self.lease_ttl)] if self.lease_ttl else []),
            env=ENV,
        )
        assert out.returncode == 0, out.stderr
        for role in ("worker", "manager"):
            got = first.dabctl("cluster", "join-token", role, "-q", env=ENV)
            assert got.returncode == 0, got.stderr
            self.tokens[role] = got.stdout.strip()
        self.start(first, **agent_config)
        for node in self.nodes[1:]:
            role = "manager" if node in self.managers else "worker"
            out = node.dabctl(
                "cluster",
                "join",
                "--token",
                self.tokens[role],
                "--node-name",
                node.name,
                "--advertise-address",
                node.address,
                f"{first.address}:9421",
                env=ENV,
            )
            assert out.returncode == 0, out.stderr
            self.start(node, **agent_config)
        wait_for(lambda: len(self.up()) == len(self.nodes), timeout=60)

    def start(self, node: Node, public_listen: bool = False, **agent_config: Any) -> None:
        """`dabctl agent` on `node` (managers read the source; workers converge from the state log alone);
        `public_listen`: its HTTP listener (status, the web page) on the node's address, reachable from the host."""
        if public_listen:
            agent_config = {"listen_public": True, **agent_config}
        config = {
            "source": str(self.source),
            "etcd_insecure": True,
            "cluster_insecure": True,
            "cluster_listen": f"{node.address}:9421",
            "allow_empty": True,
            "resync_interval": 5,
            **agent_config,
        }
        self.configs[node.name] = {"public_listen": public_listen, **agent_config}
        node.start_agent(config=config, ready=False, public=public_listen)
        wait_for(lambda: node.connects(node.address, 9421), timeout=60)

    def restart(self, node: Node) -> None:
        self.start(node, **self.configs[node.name])

    # --- looking ---

    def nodes_json(self, on: Node | None = None) -> list[dict[str, Any]]:
        out = (on or self.nodes[0]).dabctl("node", "ls", "--json", env=ENV)
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def up(self) -> list[str]:
        return [r["name"] for r in self.nodes_json() if r["state"] == "up"]

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
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop_agent()
        _auth_off(self.cluster, [n.state_dir for n in self.nodes])


def _auth_off(cluster: Cluster, state_dirs: list[Path]) -> None:
    """etcd as the harness started it: auth off, no users or roles."""
    endpoints = ["http://" + h for h in cluster.etcd_state.removeprefix("etcd://").split(",")]
    password = None
    for d in state_dirs:
        path = d / "cluster-secrets.json"
        if path.exists():
            password = json.loads(path.read_text())["etcd_root_password"]
            break
    root = EtcdStateLog(endpoints, prefix="/", user=ROOT if password else None, password=password)
    try:
        if password:
            with contextlib.suppress(Exception):
                EtcdAuth(root).disable()
        root.close()
        root = EtcdStateLog(endpoints, prefix="/")
        auth = EtcdAuth(root)
        for role in auth.roles():
            auth.delete_role(role)
        for user in auth.users():
            auth.delete_user(user)
    finally:
        root.close()


@contextlib.contextmanager
def formed(
    cluster: Cluster, root: Path, managers: int = 1, lease_ttl: int | None = 6, **agent_config: Any
) -> Iterator[DabCluster]:
    """A formed dabctl cluster for the block (lease TTL 6 s for margin under a loaded suite; None: the product's
    default); agents stopped and etcd's auth switched off afterwards."""
    dab = DabCluster(cluster, root, managers, lease_ttl)
    try:
        dab.form(**agent_config)
        yield dab
    finally:
        dab.close()
