"""`cluster init`, `cluster join` and who may write what, on the multi-node harness (3 nodes, a real 3-member etcd).

The cluster listener serves mutual TLS with certificates from the cluster CA that `cluster init` makes; joining
nodes check the CA against the token's digest before they send anything.

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
    t0 = time.monotonic()
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
    print(f"cluster init took {time.monotonic() - t0:.2f} s")
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
        "cluster_listen": f"{node.address}:9421",
        "advertise_address": node.address,  # the harness's nodes have no default route to take it from
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
    assert "refused the join" in out.stderr, out.stderr  # the manager's answer: the CA matched, the secret did not
    assert out.returncode == 1 and "invalid join token" in out.stderr, out.stderr
    assert not (n2.state_dir / "cluster.json").exists()

    t0 = time.monotonic()
    out = n2.dabctl(
        "cluster",
        "join",
        "--token",
        tokens["worker"],
        "--node-name",
        "n2",
        "--advertise-address",
        n2.address,
        f"{n1.address}:9421",
    )
    joined = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "as a worker" in out.stdout
    print(f"cluster join (worker) took {joined:.2f} s")
    member = json.loads((n2.state_dir / "cluster.json").read_text())
    assert member["etcd_user"] == f"dabctl-node-{member['node_id']}"
    assert member["node_id"] == (n2.state_dir / "node-id").read_text().strip()
    assert (n2.state_dir / "cluster.json").stat().st_mode & 0o777 == 0o600
    assert not (n2.state_dir / "cluster-secrets.json").exists()  # a worker holds no manager secret
    assert not (n2.state_dir / "pki" / "ca.key").exists()  # nor the CA key
    for name in ("ca.crt", "node.crt", "node.key"):
        assert (n2.state_dir / "pki" / name).stat().st_mode & 0o777 == 0o600

    t0 = time.monotonic()
    out = n3.dabctl("cluster", "join", "--token", tokens["manager"], "--node-name", "n3", f"{n1.address}:9421")
    assert out.returncode == 0 and "as a manager" in out.stdout, out.stderr
    print(f"cluster join (manager, with the secrets and CA key over mutual TLS) took {time.monotonic() - t0:.2f} s")
    n3_id = (n3.state_dir / "node-id").read_text().strip()
    assert (n3.state_dir / "pki" / "ca.key").read_bytes() == (n1.state_dir / "pki" / "ca.key").read_bytes()
    assert (n3.state_dir / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (n3.state_dir / "cluster-secrets.json").exists()

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
    for path in ("/api/reconcile", "/cluster/v1/node", "/status", "/webhook"):
        assert _curl(n2, f"https://{n1.address}:9421{path}") == "404", path
    _check_listener_tls(n1, n2, n3)

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
    digest = tokens["worker"].split("-")[2]
    assert len(digest) == 64 and fresh != tokens["worker"] and fresh.startswith(f"DABCTL-1-{digest}-")
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


def _curl(node: Node, url: str, *opts: str) -> str:
    """The HTTP status of a POST from `node`'s namespace (000: no answer), TLS without checking the server."""
    out = node.sh(
        "curl",
        "-sk",
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
        *opts,
        url,
    )
    return out.stdout.strip()


def _check_listener_tls(n1: Node, n2: Node, n3: Node) -> None:
    """Plain HTTP gets no answer; a client without a certificate reaches only the CA and joining; a worker's
    certificate cannot fetch the managers' secrets, a manager's can; a certificate of another CA fails."""
    base = f"{n1.address}:9421"
    assert _curl(n2, f"http://{base}/cluster/v1/join") == "000"
    ca = n2.sh("curl", "-sk", f"https://{base}/cluster/v1/ca").stdout
    assert ca.encode() == (n1.state_dir / "pki" / "ca.crt").read_bytes()
    secrets_url = f"https://{base}/cluster/v1/secrets"
    assert _curl(n2, secrets_url) == "401"
    pki2, pki3 = n2.state_dir / "pki", n3.state_dir / "pki"
    assert _curl(n2, secrets_url, "--cert", str(pki2 / "node.crt"), "--key", str(pki2 / "node.key")) == "403"
    assert _curl(n3, secrets_url, "--cert", str(pki3 / "node.crt"), "--key", str(pki3 / "node.key")) == "200"
    # The changing calls managers forward to the leader: a manager's certificate only.
    reconcile_url = f"https://{base}/cluster/v1/reconcile"
    assert _curl(n2, reconcile_url) == "401"
    assert _curl(n2, reconcile_url, "--cert", str(pki2 / "node.crt"), "--key", str(pki2 / "node.key")) == "403"
    # A client that checks the server against the cluster CA (as nodes do) is answered; against another CA not.
    out = n2.sh(
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        str(pki2 / "ca.crt"),
        "--cert",
        str(pki2 / "node.crt"),
        "--key",
        str(pki2 / "node.key"),
        f"https://{base}/cluster/v1/ca",
    )
    assert out.stdout == "200", out  # curl checks the host name too: the certificate's IP SAN is n1's address


def test_a_joining_node_refuses_a_ca_that_does_not_match_its_token(
    cluster: Cluster, auth_cleanup: list[Path], tmp_path: Path
) -> None:
    n1, n2 = cluster.nodes[:2]
    auth_cleanup.append(n1.state_dir)
    tokens = _init(n1, cluster, _prefix())
    source = tmp_path / "stacks"
    source.mkdir()
    agent = _start(n1, _agent_config(n1, source))
    parts = tokens["worker"].split("-")
    parts[2] = "0" * 64  # another CA's digest, the right secret
    out = n2.dabctl("cluster", "join", "--token", "-".join(parts), "--node-name", "n2", f"{n1.address}:9421")
    assert out.returncode == 1 and "does not match the token's CA digest" in out.stderr, out.stderr
    assert not (n2.state_dir / "cluster.json").exists()
    assert not (n2.state_dir / "pki").exists()
    assert "join refused" not in agent.log() and "node joined" not in agent.log()  # nothing but the CA fetch was sent


def test_a_cluster_node_runs_its_listener_on_tls_and_refuses_to_run_plain_without_a_certificate(
    cluster: Cluster, auth_cleanup: list[Path], tmp_path: Path
) -> None:
    n1 = cluster.nodes[0]
    auth_cleanup.append(n1.state_dir)
    _init(n1, cluster, _prefix())
    source = tmp_path / "stacks"
    source.mkdir()
    agent = _start(n1, _agent_config(n1, source))  # no cluster_insecure: TLS
    assert "dabctl_node_certificate_expiry_seconds" in agent.get("/metrics").text
    n1.stop_agent()
    (n1.state_dir / "pki" / "node.crt").unlink()
    out = n1.dabctl("agent", "--source", str(tmp_path), env=ENV)
    assert out.returncode == 1
    assert "holds no certificate" in out.stderr and "join the cluster again" in out.stderr, out.stderr


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
