"""`cluster init`, `cluster join` and who may write what, on the multi-node harness (3 nodes, a real 3-member etcd).

etcd auth is switched on for the whole (shared) etcd by `cluster init`: every test here switches it off again and
removes the users and roles it made, whatever happens (`auth_cleanup`), so the session's other tests find etcd as
it was.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT, EtcdAuth
from tests.integration.agentproc import eventually
from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster, Node
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

ENV = {"DABCTL_ETCD_INSECURE": "true"}


def _endpoints(cluster: Cluster) -> list[str]:
    return ["http://" + h for h in cluster.etcd_state.removeprefix("etcd://").split(",")]


@pytest.fixture
def auth_cleanup(cluster: Cluster) -> Iterator[list[Path]]:
    """Yields a list the test appends state directories holding cluster-secrets.json to; afterwards etcd's auth is
    off and every user and role but none is gone (as the harness started it)."""
    dirs: list[Path] = []
    yield dirs
    password = None
    for d in dirs:
        path = d / "cluster-secrets.json"
        if path.exists():
            password = json.loads(path.read_text())["etcd_root_password"]
            break
    root = EtcdStateLog(_endpoints(cluster), prefix="/", user=ROOT if password else None, password=password)
    try:
        auth = EtcdAuth(root)
        if password:
            auth.disable()
        root.close()
        root = EtcdStateLog(_endpoints(cluster), prefix="/")
        auth = EtcdAuth(root)
        for role in auth.roles():
            auth.delete_role(role)
        for user in auth.users():
            auth.delete_user(user)
    finally:
        root.close()


def _prefix() -> str:
    return f"/dabctl-join-{secrets.token_hex(4)}"


def _init(node: Node, cluster: Cluster, prefix: str, *more: str) -> dict[str, str]:
    out = node.dabctl(
        "cluster",
        "init",
        "--etcd",
        cluster.etcd_state,
        "--etcd-prefix",
        prefix,
        "--node-name",
        node.name,
        "--advertise-address",
        node.address,
        *more,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr
    tokens = {}
    for line in out.stdout.splitlines():
        if "--token" in line:
            token = line.split("--token", 1)[1].split()[0]
            tokens["manager" if "manager" in out.stdout.split(line)[0].splitlines()[-2] else "worker"] = token
    return tokens


def _start(node: Node, config: dict[str, Any]) -> Any:
    """The agent, once its cluster listener answers (an empty source never makes an agent ready: no pass runs)."""
    agent = node.start_agent(config=config, ready=False)
    eventually(lambda: node.connects(node.address, 9421), agent, timeout=60)
    return agent


def _agent_config(node: Node, source: Path, **more: Any) -> dict[str, Any]:
    return {
        "source": str(source),
        "etcd_insecure": True,
        "cluster_insecure": True,
        "cluster_listen": f"{node.address}:9421",
        "allow_empty": True,
        **more,
    }


_WRITES = r"""
import json, sys
from agent.state.etcd import EtcdStateLog
from agent.state.log import Put
member = json.load(open(sys.argv[1]))
other = sys.argv[2]
out = {}
for host in member["state"].removeprefix("etcd://").split(","):
    for creds in ("worker", "anonymous"):
        user = member["etcd_user"] if creds == "worker" else None
        password = member["etcd_password"] if creds == "worker" else None
        log = EtcdStateLog(["http://" + host], prefix=member["etcd_prefix"], user=user, password=password, timeout=3)
        for key in ("/assignments/web/app", "/stacks/web", "/leader", "/cluster", f"/nodes/{member['node_id']}",
                    f"/node/{other}/status", f"/node/{member['node_id']}/status"):
            try:
                log.txn([], [Put(key, b"{}")])
                result = "written"
            except Exception as exc:
                result = type(exc).__name__ + ": " + str(exc)[:80]
            out[f"{creds} {host} {key}"] = result
        log.close()
print(json.dumps(out))
"""


def test_init_and_join_give_each_node_an_etcd_user_that_writes_only_its_own_keys(
    cluster: Cluster, auth_cleanup: list[Path], tmp_path: Path
) -> None:
    n1, n2, n3 = cluster.nodes
    auth_cleanup.append(n1.state_dir)
    prefix = _prefix()
    tokens = _init(n1, cluster, prefix)
    assert set(tokens) == {"worker", "manager"}, tokens
    for name in ("cluster.json", "cluster-secrets.json", "node-id"):
        assert (n1.state_dir / name).stat().st_mode & 0o777 == 0o600
    source = tmp_path / "stacks"
    source.mkdir()
    _start(n1, _agent_config(n1, source))

    # A wrong secret is refused by the manager; nothing is written on the node.
    wrong = tokens["worker"][:-6] + "abcdef"
    out = n2.dabctl("cluster", "join", "--token", wrong, "--node-name", "n2", f"{n1.address}:9421")
    assert out.returncode == 1 and "invalid join token" in out.stderr, out.stderr
    assert not (n2.state_dir / "cluster.json").exists()

    t0 = time.monotonic()
    out = n2.dabctl("cluster", "join", "--token", tokens["worker"], "--node-name", "n2", f"{n1.address}:9421")
    joined = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "as a worker" in out.stdout
    print(f"cluster join (worker) took {joined:.2f} s")
    member = json.loads((n2.state_dir / "cluster.json").read_text())
    assert member["etcd_user"] == f"dabctl-node-{member['node_id']}"
    assert member["node_id"] == (n2.state_dir / "node-id").read_text().strip()
    assert (n2.state_dir / "cluster.json").stat().st_mode & 0o777 == 0o600
    assert not (n2.state_dir / "cluster-secrets.json").exists()  # a worker holds no manager secret

    out = n3.dabctl("cluster", "join", "--token", tokens["manager"], "--node-name", "n3", f"{n1.address}:9421")
    assert out.returncode == 0 and "as a manager" in out.stdout, out.stderr
    n3_id = (n3.state_dir / "node-id").read_text().strip()

    # With everything the worker holds, from its namespace, to every etcd endpoint: only its own keys.
    probe = n2.sh(sys.executable, "-c", _WRITES, str(n2.state_dir / "cluster.json"), n3_id, timeout=60)
    assert probe.returncode == 0, probe.stderr
    results = json.loads(probe.stdout)
    own = f"/node/{member['node_id']}/status"
    for what, result in results.items():
        if what.startswith("worker") and what.endswith(own):
            assert result == "written", (what, result)
        else:
            assert result.startswith("PermissionDenied"), (what, result)
    assert len(results) == 3 * 2 * 7

    # The manager's user writes the prefix; the cluster listener offers joining and nothing else.
    manager = json.loads((n3.state_dir / "cluster.json").read_text())
    mlog = EtcdStateLog(
        _endpoints(cluster), prefix=prefix, user=manager["etcd_user"], password=manager["etcd_password"]
    )
    try:
        mlog.put("/assignments/web/app", b"{}")
    finally:
        mlog.close()
    for path in ("/api/reconcile", "/cluster/v1/reconcile", "/cluster/v1/node", "/status", "/webhook"):
        code = n2.sh(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            f"http://{n1.address}:9421{path}",
        ).stdout
        assert code == "404", (path, code)

    # A second node named n2 (another id) is refused while n2 is live (its status under a lease).
    wlog = EtcdStateLog(_endpoints(cluster), prefix=prefix, user=member["etcd_user"], password=member["etcd_password"])
    try:
        lease = wlog.grant(30)
        wlog.put(own, json.dumps({"node_id": member["node_id"]}).encode(), lease=lease)
        other_state = n3.root / "impostor"
        out = n3.dabctl(
            "cluster",
            "join",
            "--token",
            tokens["worker"],
            "--node-name",
            "n2",
            "--state-dir",
            str(other_state),
            f"{n1.address}:9421",
        )
        assert out.returncode == 1 and "belongs to live node" in out.stderr, out.stderr
        wlog.revoke(lease)
    finally:
        wlog.close()

    # Rotation: the old worker token admits no more nodes.
    out = n1.dabctl("cluster", "join-token", "--rotate", "-q", "worker", env=ENV)
    assert out.returncode == 0, out.stderr
    fresh = out.stdout.strip()
    assert fresh != tokens["worker"] and fresh.startswith("DABCTL-1-none-")
    out = n3.dabctl(
        "cluster",
        "join",
        "--token",
        tokens["worker"],
        "--node-name",
        "n9",
        "--state-dir",
        str(n3.root / "late"),
        f"{n1.address}:9421",
    )
    assert out.returncode == 1 and "invalid join token" in out.stderr, out.stderr


def test_a_cluster_node_refuses_to_run_its_listener_without_tls_unless_insecure(
    cluster: Cluster, auth_cleanup: list[Path], tmp_path: Path
) -> None:
    n1 = cluster.nodes[0]
    auth_cleanup.append(n1.state_dir)
    _init(n1, cluster, _prefix())
    out = n1.dabctl("agent", "--source", str(tmp_path), env=ENV)
    assert out.returncode == 1
    assert "cluster_insecure: true" in out.stderr and "certificate authority" in out.stderr, out.stderr


def test_a_running_single_node_install_moves_into_a_cluster_with_no_container_recreated(
    cluster: Cluster, auth_cleanup: list[Path], tmp_path: Path
) -> None:
    n1 = cluster.nodes[0]
    auth_cleanup.append(n1.state_dir)
    source = tmp_path / "stacks"
    source.mkdir()
    doc = {
        "Services": {
            "app": {"Image": cluster.image, "Command": SLEEPER[:2], "Args": SLEEPER[2:], "Deploy": {"Replicas": 3}},
            "web": {
                "Image": cluster.image,
                "Command": SLEEPER[:2],
                "Args": SLEEPER[2:],
                "Ports": [{"Protocol": "tcp", "Port": 8080}],
            },
        }
    }
    (source / "shop.dab").write_text(json.dumps(doc))
    agent = n1.start_agent(config={"source": str(source)})

    def containers() -> dict[str, str]:
        found = n1.client.containers(filters={"label": "dabctl.stack=shop"})
        return {
            c["Labels"]["dabctl.service"] + "." + c["Labels"]["dabctl.slot"]: c["Id"]
            for c in found
            if c["State"] == "running"
        }

    wait_for(lambda: len(containers()) == 4, timeout=90)
    before = containers()
    status = json.loads(agent.get("/status").text)
    assert status["stacks"][0]["stack"] == "shop"
    n1.stop_agent()  # the workloads keep running

    prefix = _prefix()
    _init(n1, cluster, prefix, "--from-state", str(n1.state_dir))
    member = json.loads((n1.state_dir / "cluster.json").read_text())
    t0 = time.monotonic()
    agent = _start(n1, _agent_config(n1, source))
    wait_for(lambda: agent.stack("shop") is not None, timeout=60)
    out = n1.dabctl("reconcile", "--once", env=ENV)
    assert out.returncode == 0, out.stderr + agent.log()[-3000:]
    print(f"agent start to a converged pass as a cluster node: {time.monotonic() - t0:.2f} s")
    assert containers() == before  # the same containers: none recreated
    mlog = EtcdStateLog(_endpoints(cluster), prefix=prefix, user=member["etcd_user"], password=member["etcd_password"])
    try:
        assignments = {kv.key: json.loads(kv.value) for kv in mlog.range("/assignments/")}
        ports = mlog.range("/ports/")
    finally:
        mlog.close()
    assert assignments["/assignments/shop/app"]["nodes"] == {member["node_id"]: ["1", "2", "3"]}
    assert len(ports) == 1
