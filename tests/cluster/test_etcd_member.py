"""The etcd that `cluster init` runs for a cluster (agent/node/etcdmember.py), on the multi-node harness: each
manager's member runs in its node's namespace on the node's address (2379/2380, TLS with client certificates),
as the product runs it. The harness's own etcd is not used here. Every member, its data and the agents are
removed afterwards, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.node.etcdmember import LocalMember
from agent.pki.ca import LocalSigner, identify, key_pem, new_ca, new_csr, new_key
from agent.pki.files import PkiPaths
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT
from agent.state.etcdcluster import EtcdMembership
from agent.state.log import StateLogError
from tests.integration.agentproc import eventually
from tests.support.cluster import Cluster, Node
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # ~40 s at low load; 300 s was hit at load 30+


@pytest.fixture
def members(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster; afterwards no agent and no etcd member of these tests runs, and their data is gone."""
    yield cluster
    for node in cluster.nodes:
        node.stop_agent()
        local = LocalMember(node.state_dir)
        local.stop(timeout=5)
        local.destroy()
        assert local.pid() is None


def _agent(node: Node, source: Path) -> Any:
    config = {
        "source": str(source),
        "cluster_listen": f"{node.address}:9421",
        "allow_empty": True,
    }
    agent = node.start_agent(config=config, ready=False)
    eventually(lambda: node.connects(node.address, 9421), agent, timeout=60)
    return agent


def _token(init_stdout: str, role: str) -> str:
    lines = init_stdout.splitlines()
    for i, line in enumerate(lines):
        if f"add a {role}" in line:
            return next(ln for ln in lines[i + 1 :] if "--token" in ln).split("--token", 1)[1].split()[0]
    raise AssertionError(f"no {role} token in:\n{init_stdout}")


def _root(node: Node, endpoints: list[str]) -> EtcdStateLog:
    """etcd's root user over TLS with the node's own certificate from the cluster CA."""
    password = json.loads((node.state_dir / "cluster-secrets.json").read_text())["etcd_root_password"]
    pki = PkiPaths.of(node.state_dir)
    return EtcdStateLog(
        endpoints, prefix="/", user=ROOT, password=password, ca_file=str(pki.ca_cert), cert_file=str(pki.node_cert),
        key_file=str(pki.node_key), timeout=3,
    )  # fmt: skip


def _stranger(directory: Path) -> tuple[Path, Path]:
    """A node certificate and key of another cluster CA."""
    ca_cert, ca_key = new_ca("x" * 25)
    key = new_key()
    nid = "y" * 25
    cert = LocalSigner(ca_cert, ca_key).sign(new_csr(key, nid), node_id=nid, role="manager", address="", days=1)
    directory.mkdir()
    (directory / "node.crt").write_bytes(cert)
    (directory / "node.key").write_bytes(key_pem(key))
    (directory / "node.key").chmod(0o600)
    return directory / "node.crt", directory / "node.key"


def _etcd_logs(cluster: Cluster) -> str:
    return "".join(f"\n--- etcd on {n.name}:\n{LocalMember(n.state_dir).log_tail(25)}" for n in cluster.nodes)


def _voters(root: EtcdStateLog) -> list[str]:
    return sorted(m.name for m in EtcdMembership(root).members() if not m.learner and m.name)


def test_init_runs_a_tls_etcd_member_and_manager_joins_make_three_voting_members(
    members: Cluster, tmp_path: Path
) -> None:
    cluster = members
    n1, n2, n3 = cluster.nodes
    source = tmp_path / "stacks"
    source.mkdir()
    url = {n.name: f"https://{n.address}:2379" for n in cluster.nodes}

    t0 = time.monotonic()
    out = n1.dabctl("cluster", "init", "--node-name", "n1", "--advertise-address", n1.address)
    assert out.returncode == 0, out.stderr
    t_init = time.monotonic() - t0
    local1 = LocalMember(n1.state_dir)
    pid1 = local1.pid()
    assert pid1 is not None
    assert os.stat(f"/proc/{pid1}/ns/net").st_ino == os.stat(f"/var/run/netns/{n1.netns}").st_ino
    assert os.getsid(pid1) == pid1  # its own session
    member = json.loads((n1.state_dir / "cluster.json").read_text())
    assert member["state"] == f"etcd://{n1.address}:2379"
    root = _root(n1, [url["n1"]])
    try:
        assert len(EtcdMembership(root).members()) == 1

        agent1 = _agent(n1, source)
        t1 = time.monotonic()
        manager_token = _token(out.stdout, "manager")
        for node in (n2, n3):
            joined = node.dabctl(
                "cluster", "join", "--token", manager_token, "--node-name", node.name, "--advertise-address",
                node.address, f"{n1.address}:9421",
            )  # fmt: skip
            assert joined.returncode == 0, joined.stderr + agent1.log()[-3000:] + _etcd_logs(cluster)
            assert "as a manager" in joined.stdout
        t_joins = time.monotonic() - t1
        ids = {n.name: (n.state_dir / "node-id").read_text().strip() for n in cluster.nodes}
        assert _voters(root) == sorted(ids.values())
        t_total = time.monotonic() - t0
        print(
            f"managed etcd: init {t_init:.2f} s (1 TLS member), 2 manager joins {t_joins:.2f} s, "
            f"init to 3 voting members {t_total:.2f} s (agent start on n1 included)"
        )
        # A backup while the cluster is whole (a key to find again after the recoveries).
        root.put("/dabctl-backup-check", b"before")
        passphrase = tmp_path / "passphrase"
        passphrase.write_text("correct horse battery staple\n")
        passphrase.chmod(0o600)
        backup_file = tmp_path / "cluster.backup"
        t2 = time.monotonic()
        made = n1.dabctl("cluster", "backup", "--passphrase-file", str(passphrase), str(backup_file))
        assert made.returncode == 0, made.stderr
        print(f"cluster backup: {time.monotonic() - t2:.2f} s, {backup_file.stat().st_size} bytes")
        assert backup_file.stat().st_mode & 0o777 == 0o600
        assert b"dabctl-backup-check" not in backup_file.read_bytes()  # encrypted
        n3_state = json.loads((n3.state_dir / "cluster.json").read_text())["state"]
        assert n3_state.startswith(f"etcd://{n3.address}:2379,")

        # A client without a cluster certificate is refused: none, or one from another CA.
        stranger_cert, stranger_key = _stranger(tmp_path / "other")
        for cert_file, key_file in ((None, None), (str(stranger_cert), str(stranger_key))):
            probe = EtcdStateLog(
                [url["n1"]], prefix="/", ca_file=str(PkiPaths.of(n1.state_dir).ca_cert), cert_file=cert_file,
                key_file=key_file,
                timeout=3,
            )  # fmt: skip
            try:
                with pytest.raises(StateLogError, match="TLS with etcd"):
                    probe.revision()
            finally:
                probe.close()

        # An agent restart keeps its member running: the same process, adopted.
        agent2 = _agent(n2, source)
        pid2 = LocalMember(n2.state_dir).pid()
        assert pid2 is not None
        assert n2.stop_agent() == 0
        assert LocalMember(n2.state_dir).pid() == pid2
        agent2 = _agent(n2, source)
        eventually(lambda: "etcd member adopted" in agent2.log(), agent2, timeout=30)
        assert LocalMember(n2.state_dir).pid() == pid2
        # A killed agent too.
        n1.agent.kill()
        n1.agent = None
        assert local1.pid() == pid1
        _agent(n1, source)
        assert local1.pid() == pid1
        # ... and the restarted agent's endpoints are every voting member's, its own first.
        hosts = json.loads((n1.state_dir / "cluster.json").read_text())["state"].removeprefix("etcd://").split(",")
        assert hosts[0] == f"{n1.address}:2379" and sorted(hosts) == sorted(f"{n.address}:2379" for n in cluster.nodes)

        # One member killed: quorum kept, writes go on.
        pid3 = LocalMember(n3.state_dir).pid()
        assert pid3 is not None
        os.kill(pid3, signal.SIGKILL)
        wait_for(lambda: LocalMember(n3.state_dir).pid() is None, timeout=10)
        root.put("/dabctl-quorum-check", b"1")
        assert root.get("/dabctl-quorum-check") is not None

        # Leaving: n3 (its member down) may go, 2 voters answering stay; then n1 may not (n2 killed: no quorum).
        left = n3.dabctl("cluster", "leave")
        assert left.returncode == 0, left.stderr
        assert not (n3.state_dir / "etcd").exists()
        assert _voters(root) == sorted([ids["n1"], ids["n2"]])
        assert n2.stop_agent() == 0
        os.kill(pid2, signal.SIGKILL)
        wait_for(lambda: LocalMember(n2.state_dir).pid() is None, timeout=10)
        assert n1.stop_agent() == 0
        refused = n1.dabctl("cluster", "leave")
        assert refused.returncode == 1 and "would lose quorum" in refused.stderr, refused.stderr
        assert local1.pid() == pid1

        # Quorum lost (n3 gone, n2's member dead): recover from the survivor, n1, keeping its data.
        with pytest.raises(StateLogError):
            root.put("/dabctl-lost", b"1")
        t3 = time.monotonic()
        recovered = n1.dabctl("cluster", "recover")
        assert recovered.returncode == 0, recovered.stderr + _etcd_logs(cluster)
        print(f"cluster recover (force-new-cluster): {time.monotonic() - t3:.2f} s")
        assert _voters(root) == [ids["n1"]]
        root.put("/dabctl-after-recover", b"1")
        assert root.get("/dabctl-backup-check") is not None
        # n2 came back: its member was dropped; it leaves without asking the cluster.
        forced = n2.dabctl("cluster", "leave", "--force")
        assert forced.returncode == 0, forced.stderr
        assert not (n2.state_dir / "etcd").exists()

        # No member left at all: a backup restored on n3 (out of any cluster) makes a one-member cluster.
        wrong = tmp_path / "wrong"
        wrong.write_text("not the passphrase at all\n")
        wrong.chmod(0o600)
        refused = n3.dabctl(
            "cluster", "restore", "--passphrase-file", str(wrong), "--advertise-address", n3.address, str(backup_file),
        )  # fmt: skip
        assert refused.returncode == 1 and "wrong passphrase" in refused.stderr, refused.stderr
        t4 = time.monotonic()
        restored = n3.dabctl(
            "cluster", "restore", "--passphrase-file", str(passphrase), "--advertise-address", n3.address,
            str(backup_file),
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr + _etcd_logs(cluster)
        print(f"cluster restore from backup: {time.monotonic() - t4:.2f} s")
        assert (n3.state_dir / "node-id").read_text().strip() == ids["n1"]
        root3 = _root(n3, [url["n3"]])
        try:
            assert _voters(root3) == [ids["n1"]]
            kv = root3.get("/dabctl-backup-check")
            assert kv is not None and kv.value == b"before"
            assert root3.get("/dabctl-after-recover") is None  # written after the backup
        finally:
            root3.close()
    finally:
        root.close()


def _role(node: Node) -> str:
    pki = PkiPaths.of(node.state_dir)
    return identify(pki.node_cert.read_bytes(), pki.ca_cert.read_bytes()).role


def test_promoting_a_worker_starts_a_voting_member_and_demoting_it_retires_the_member(
    members: Cluster, tmp_path: Path
) -> None:
    """`node update --role manager` on a worker: its agent gets a manager certificate, the secrets and CA key,
    and starts its member as a learner, promoted to a voter; `--role worker`: the member is removed from etcd,
    and the node's agent stops it and deletes its data, pid file, CA key and secrets (one info line)."""
    cluster = members
    n1, n2, _ = cluster.nodes
    source = tmp_path / "stacks"
    source.mkdir()
    out = n1.dabctl("cluster", "init", "--node-name", "n1", "--advertise-address", n1.address)
    assert out.returncode == 0, out.stderr
    root = _root(n1, [f"https://{n1.address}:2379"])
    try:
        agent1 = _agent(n1, source)
        joined = n2.dabctl(
            "cluster", "join", "--token", _token(out.stdout, "worker"), "--node-name", "n2", "--advertise-address",
            n2.address, f"{n1.address}:9421",
        )  # fmt: skip
        assert joined.returncode == 0, joined.stderr
        agent2 = _agent(n2, source)
        ids = {n.name: (n.state_dir / "node-id").read_text().strip() for n in (n1, n2)}
        local2 = LocalMember(n2.state_dir)
        pki2 = PkiPaths.of(n2.state_dir)
        assert _role(n2) == "worker" and local2.spec() is None and not pki2.ca_key.exists()

        t0 = time.monotonic()
        promoted = n1.dabctl("node", "update", "--role", "manager", "n2")
        assert promoted.returncode == 0, promoted.stderr
        eventually(lambda: _voters(root) == sorted(ids.values()), agent2, timeout=150)
        print(f"worker promoted: its etcd member voting {time.monotonic() - t0:.1f} s after `node update`")
        assert local2.pid() is not None and os.getsid(local2.pid() or 0) == local2.pid()
        assert _role(n2) == "manager" and pki2.ca_key.exists() and (n2.state_dir / "cluster-secrets.json").exists()
        eventually(lambda: "promoted to manager: etcd member started and voting" in agent2.log(), agent2, timeout=60)
        root.put("/dabctl-two-voters", b"1")  # quorum of two, both answering

        t1 = time.monotonic()
        demoted = n1.dabctl("node", "update", "--role", "worker", "n2")
        assert demoted.returncode == 0, demoted.stderr + agent1.log()[-2000:]
        assert _voters(root) == [ids["n1"]]
        eventually(lambda: not local2.dir.exists(), agent2, timeout=60)
        print(f"manager demoted: its etcd member retired {time.monotonic() - t1:.1f} s after `node update`")
        assert local2.pid() is None
        assert not pki2.ca_key.exists() and not (n2.state_dir / "cluster-secrets.json").exists()
        eventually(lambda: _role(n2) == "worker", agent2, timeout=30)
        assert agent2.log().count("etcd member retired") == 1
        # Its next start neither starts a member nor logs an error about one.
        assert n2.stop_agent() == 0
        agent2 = _agent(n2, source)
        eventually(lambda: "node registered" in agent2.log(), agent2, timeout=30)
        assert "etcd member not running" not in agent2.log() and not local2.dir.exists()
        root.put("/dabctl-one-voter", b"1")
    finally:
        root.close()
