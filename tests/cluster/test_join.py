"""`cluster init`, `cluster join` and who may write what, on the multi-node harness (3 nodes).

The cluster listener serves mutual TLS with certificates from the cluster CA that `cluster init` makes; joining
nodes check the CA against the token's digest before they send anything. The first test's cluster is formed the
operator's way (`formed`: the etcd `cluster init` runs, TLS from the cluster CA); the move of a single-node install
uses `cluster init --etcd` on the harness's own etcd (an existing etcd: the cluster still gets its CA and
certificates), whose auth `cluster init` switches on: that test switches it off again and removes the users and
roles it made, whatever happens (`auth_cleanup`), so the session's other tests find etcd as it was.
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

from agent.pki.files import PkiPaths
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT, EtcdAuth
from tests.integration.agentproc import eventually
from tests.integration.conftest import SLEEPER
from tests.support.cluster import Cluster, Node
from tests.support.dabcluster import formed
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
pki, other, hosts = sys.argv[2], sys.argv[3], sys.argv[4].split(",")
tls = {"ca_file": pki + "/ca.crt", "cert_file": pki + "/node.crt", "key_file": pki + "/node.key"}
out = {}
for host in hosts:
    for creds in ("worker", "certificate-only"):
        user = member["etcd_user"] if creds == "worker" else None
        password = member["etcd_password"] if creds == "worker" else None
        log = EtcdStateLog(["https://" + host], prefix=member["etcd_prefix"], user=user, password=password, timeout=3,
                           **tls)
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


def test_init_and_join_give_nodes_certificates_and_each_an_etcd_user_that_writes_only_its_own_keys(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One cluster formed by `cluster init` (n1, its etcd member) and joins (n2 a manager with its own member, n3 a
    worker): what init and join leave on each node, who may write what (etcd and the cluster listener), the
    refusals (a wrong secret, another CA's digest, a namesake, a rotated token), and a node without a certificate."""
    with formed(cluster, tmp_path, managers=2) as dab:
        n1, n2, n3 = dab.nodes
        tokens = dab.tokens
        assert set(tokens) == {"worker", "manager"}, tokens
        for name in ("cluster.json", "cluster-secrets.json", "node-id"):
            assert (n1.state_dir / name).stat().st_mode & 0o777 == 0o600

        # What the worker holds: its etcd user and its certificate; no manager secret, no CA key.
        member = dab.membership(n3)
        assert member["etcd_user"] == f"dabctl-node-{member['node_id']}"
        assert member["node_id"] == dab.node_id(n3)
        assert member["etcd_tls"] is True
        assert (n3.state_dir / "cluster.json").stat().st_mode & 0o777 == 0o600
        assert not (n3.state_dir / "cluster-secrets.json").exists()
        assert not (n3.state_dir / "pki" / "ca.key").exists()
        for name in ("ca.crt", "node.crt", "node.key"):
            assert (n3.state_dir / "pki" / name).stat().st_mode & 0o777 == 0o600
        # A joined manager got the CA key and the secrets over mutual TLS.
        assert (n2.state_dir / "pki" / "ca.key").read_bytes() == (n1.state_dir / "pki" / "ca.key").read_bytes()
        assert (n2.state_dir / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
        assert (n2.state_dir / "cluster-secrets.json").exists()

        # A wrong secret is refused by the manager, another CA's digest by the joining node; nothing is written.
        elsewhere = n3.root / "elsewhere"
        wrong = tokens["worker"][:-6] + "abcdef"
        out = n3.dabctl(
            "cluster", "join", "--token", wrong, "--node-name", "n9", "--state-dir", str(elsewhere),
            f"{n1.address}:9421",
        )  # fmt: skip
        assert "refused the join" in out.stderr, out.stderr  # the manager's answer: the CA matched, not the secret
        assert out.returncode == 1 and "invalid join token" in out.stderr, out.stderr
        parts = tokens["worker"].split("-")
        parts[2] = "0" * 64  # another CA's digest, the right secret
        refused_before = n1.agent.log().count("join refused")
        out = n3.dabctl(
            "cluster", "join", "--token", "-".join(parts), "--node-name", "n9", "--state-dir", str(elsewhere),
            f"{n1.address}:9421",
        )  # fmt: skip
        assert out.returncode == 1 and "does not match the token's CA digest" in out.stderr, out.stderr
        assert n1.agent.log().count("join refused") == refused_before  # nothing but the CA fetch was sent
        assert not (elsewhere / "cluster.json").exists() and not (elsewhere / "pki").exists()

        # With everything the worker holds, from its namespace, to every manager's etcd member: only its own keys.
        n2_id = dab.node_id(n2)
        hosts = ",".join(f"{n.address}:2379" for n in dab.managers)
        probe = n3.sh(
            sys.executable, "-c", _WRITES, str(n3.state_dir / "cluster.json"), str(n3.state_dir / "pki"), n2_id, hosts,
            timeout=60,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        results = json.loads(probe.stdout)
        own = f"/node/{member['node_id']}/status"
        for what, result in results.items():
            if what.startswith("worker") and what.endswith(own):
                assert result == "written", (what, result)
            else:
                assert result.startswith("PermissionDenied"), (what, result)
        assert len(results) == len(dab.managers) * 2 * 7
        # ... and through every manager's cluster listener: no changing call answers a worker's certificate.
        pki3 = n3.state_dir / "pki"
        mine = ("--cert", str(pki3 / "node.crt"), "--key", str(pki3 / "node.key"))
        for manager in dab.managers:
            for call in ("reconcile", "rollback", "suspend", "resume", "secrets"):
                url = f"https://{manager.address}:9421/cluster/v1/{call}"
                assert _curl(n3, url, *mine) == "403", (manager.name, call)

        # The manager's user writes the prefix; the cluster listener offers joining and nothing else.
        manager = dab.membership(n2)
        pki2 = PkiPaths.of(n2.state_dir)
        mlog = EtcdStateLog(
            dab.etcd_endpoints, prefix=dab.prefix, user=manager["etcd_user"], password=manager["etcd_password"],
            ca_file=str(pki2.ca_cert), cert_file=str(pki2.node_cert), key_file=str(pki2.node_key),
        )  # fmt: skip
        try:
            mlog.put("/assignments/web/app", b"{}")
        finally:
            mlog.close()
        for path in ("/api/reconcile", "/cluster/v1/node", "/status", "/webhook"):
            assert _curl(n3, f"https://{n1.address}:9421{path}") == "404", path
        _check_listener_tls(n1, worker=n3, manager=n2)
        assert "dabctl_node_certificate_expiry_seconds" in n1.agent.get("/metrics").text

        # A second node named n3 (another id) is refused while n3 is live.
        out = n2.dabctl(
            "cluster", "join", "--token", tokens["worker"], "--node-name", "n3", "--state-dir",
            str(n2.root / "impostor"), f"{n1.address}:9421",
        )  # fmt: skip
        assert out.returncode == 1 and "belongs to live node" in out.stderr, out.stderr

        # Rotation: the old worker token admits no more nodes.
        out = n1.dabctl("cluster", "join-token", "--rotate", "-q", "worker")
        assert out.returncode == 0, out.stderr
        fresh = out.stdout.strip()
        digest = tokens["worker"].split("-")[2]
        assert len(digest) == 64 and fresh != tokens["worker"] and fresh.startswith(f"DABCTL-1-{digest}-")
        out = n2.dabctl(
            "cluster", "join", "--token", tokens["worker"], "--node-name", "n9", "--state-dir", str(n2.root / "late"),
            f"{n1.address}:9421",
        )  # fmt: skip
        assert out.returncode == 1 and "invalid join token" in out.stderr, out.stderr

        # A cluster node without a certificate does not start: its listener serves only mutual TLS.
        n3.stop_agent()
        (n3.state_dir / "pki" / "node.crt").unlink()
        out = n3.dabctl("agent", "--source", str(tmp_path))
        assert out.returncode == 1
        assert "holds no certificate" in out.stderr and "join the cluster again" in out.stderr, out.stderr


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


def _check_listener_tls(n1: Node, worker: Node, manager: Node) -> None:
    """Plain HTTP gets no answer; a client without a certificate reaches only the CA and joining; a worker's
    certificate cannot fetch the managers' secrets, a manager's can; a certificate of another CA fails."""
    base = f"{n1.address}:9421"
    assert _curl(worker, f"http://{base}/cluster/v1/join") == "000"
    ca = worker.sh("curl", "-sk", f"https://{base}/cluster/v1/ca").stdout
    assert ca.encode() == (n1.state_dir / "pki" / "ca.crt").read_bytes()
    secrets_url = f"https://{base}/cluster/v1/secrets"
    assert _curl(worker, secrets_url) == "401"
    pkiw, pkim = worker.state_dir / "pki", manager.state_dir / "pki"
    assert _curl(worker, secrets_url, "--cert", str(pkiw / "node.crt"), "--key", str(pkiw / "node.key")) == "403"
    assert _curl(manager, secrets_url, "--cert", str(pkim / "node.crt"), "--key", str(pkim / "node.key")) == "200"
    # The changing calls managers forward to the leader: a manager's certificate only.
    reconcile_url = f"https://{base}/cluster/v1/reconcile"
    assert _curl(worker, reconcile_url) == "401"
    assert _curl(worker, reconcile_url, "--cert", str(pkiw / "node.crt"), "--key", str(pkiw / "node.key")) == "403"
    # A client that checks the server against the cluster CA (as nodes do) is answered; against another CA not.
    out = worker.sh(
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        str(pkiw / "ca.crt"),
        "--cert",
        str(pkiw / "node.crt"),
        "--key",
        str(pkiw / "node.key"),
        f"https://{base}/cluster/v1/ca",
    )
    assert out.stdout == "200", out  # curl checks the host name too: the certificate's IP SAN is n1's address


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
    # A cluster on an existing etcd has its CA and certificates too: the listener serves only TLS.
    assert PkiPaths.of(n1.state_dir).has_node_certificate()
    assert _curl(n1, f"http://{n1.address}:9421/cluster/v1/join") == "000"
    mlog = EtcdStateLog(_endpoints(cluster), prefix=prefix, user=member["etcd_user"], password=member["etcd_password"])
    try:
        assignments = {kv.key: json.loads(kv.value) for kv in mlog.range("/assignments/")}
        ports = mlog.range("/ports/")
    finally:
        mlog.close()
    assert assignments["/assignments/shop/app"]["nodes"] == {member["node_id"]: ["1", "2", "3"]}
    assert len(ports) == 1
