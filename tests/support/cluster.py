"""A cluster on one machine for multi-node tests: N nodes with their own Docker engines, a 3-member etcd and a
registry, all on one host bridge.

    with Cluster(nodes=3) as cluster:             # about 3 s here; see "Budget" below
        n1, n2, n3 = cluster.nodes
        n1.client.create_container(cluster.image, ...)   # cluster.image: the sample image, by digest, in the registry
        n2.stop(); n2.start(); n2.cut(); n2.heal()       # engine (and agent) down/up; link down/up
        cluster.etcd.kill9(cluster.etcd.leader()); cluster.etcd.has_quorum()
        agent = n1.start_agent(config={"source": str(stacks), "state": cluster.etcd_state})
        n1.dabctl("status")                              # the CLI in the node's namespace, on its engine
        with cluster.swarm() as swarm: swarm.service("web", replicas=6)   # the same nodes as a Docker Swarm
        cluster.reset()                                  # between tests: back to a fresh cluster, nodes kept
    # closed: namespaces, links, the host rule, processes, mounts, cgroups, directories gone (cluster.leftovers())

Topology (slot s, 0-7; one slot per live harness, so two harnesses can run at once):

    host bridge dabh<s>, 10.230.<s>.1/24 (the host's address, so this process reaches every member directly)
      node i     netns dabctl-h-s<s>-n<i>   eth0 10.230.<s>.(10+i)   dockerd --bip 10.231.(16s+i).1/24,
                 --default-address-pool base=10.(240+s).(16i).0/20,size=24, --insecure-registry <registry>
      etcd j     netns dabctl-h-s<s>-e<j>   eth0 10.230.<s>.(20+j)   client :2379, peer :2380
      registry   netns dabctl-h-s<s>-reg    eth0 10.230.<s>.30       :5000
    files under /tmp/dabctl-h-s<s>/, container cgroups under /dabctl-h-s<s>-n<i>

None of these ranges meets the host engine's (10.200.0.0/16, 172.17.0.0/16) or other tests' (10.201-10.203,
10.250-10.251). Nodes have no default route: they reach each other, etcd and the registry, never the outside.

Facts this relies on: Docker's bridge-nf-call-iptables=1 and FORWARD policy DROP make the host filter frames
bridged between two namespaces, so the harness inserts one `DOCKER-USER -i dabh<s> -o dabh<s> -j ACCEPT` rule (in
FORWARD when there is no DOCKER-USER chain) and deletes it on close. A node is cut by setting its host-side veth
down: its eth0 loses carrier and keeps its address and routes, so `heal()` (link up) restores it as it was. Docker
trusts plain-HTTP registries only on 127.0.0.0/8, hence `--insecure-registry`. Nodes start with no images: the
sample image is loaded into node 1, pushed, and removed there, so every node pulls it by digest like a real one.

Ownership and leftovers: a harness holds its slot by binding the abstract Unix socket `@dabctl-h-slot-<s>`, which
the kernel releases when the process dies however it dies (nothing on disk to go stale). Every start first sweeps
each slot nobody holds: it finds what a killed run left by name and by kernel state (namespaces, links, the rule,
processes in those namespaces or cgroups or naming that directory, mounts, cgroups, the directory) and removes it.

Budget (measured on 2 CPUs, Docker 20.10): a 3-node start with etcd and registry takes 2.8-3.3 s (the engines,
etcd and registry start in parallel), `reset()` of a clean cluster 0.05 s (0.5 s after a Swarm or stopped parts),
`close()` 1.3 s; tests/cluster/test_harness.py takes about 40 s in all.
`python -m tests.support.cluster` starts one and holds it until Ctrl-C (for poking around, and for the tests that
kill a harness).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import docker
import docker.errors
import docker.types
import yaml

from agent.drivers import nftables
from tests.support.dockerd import API_VERSION, HOST_ENGINE, NetnsDockerd, alive, mounts_under, umount
from tests.support.etcd import CLIENT_PORT, EtcdCluster, EtcdMember
from tests.support.netns import run_in
from tests.support.registry import Registry, split_ref

__all__ = ["PREFIX", "SAMPLE", "Cluster", "Node", "Swarm", "sweep", "traces"]

PREFIX = "dabctl-h-"  # namespaces, directories, cgroups, the rule's comment
LINK_PREFIX = "dabh"  # links (an interface name has at most 15 characters)
SLOTS = 8
SAMPLE = "dabctl/sample:1"
REGISTRY_PORT = 5000
NETNS_DIR = Path("/var/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")


# --- names and addresses of a slot ----------------------------------------------------------------------------


def bridge_name(slot: int) -> str:
    return f"{LINK_PREFIX}{slot}"


def subnet_prefix(slot: int) -> str:
    return f"10.230.{slot}"


def root_dir(slot: int) -> Path:
    return Path(f"/tmp/{PREFIX}s{slot}")


def netns_prefix(slot: int) -> str:
    return f"{PREFIX}s{slot}-"


def rule_spec(slot: int) -> list[str]:
    bridge = bridge_name(slot)
    return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", f"{PREFIX}s{slot}", "-j", "ACCEPT"]


# --- the slot lock --------------------------------------------------------------------------------------------


def _hold(slot: int) -> socket.socket | None:
    """Bind the slot's abstract socket: held until closed or until this process dies; None when taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0{PREFIX}slot-{slot}")
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def _take_slot() -> tuple[int, socket.socket]:
    """Sweep every slot no live harness holds, and keep the first free one."""
    mine: tuple[int, socket.socket] | None = None
    for slot in range(SLOTS):
        held = _hold(slot)
        if held is None:
            continue
        sweep(slot)
        if mine is None:
            mine = (slot, held)
        else:
            held.close()
    if mine is None:
        raise RuntimeError(f"all {SLOTS} cluster slots are held by running harnesses; stop one of them")
    return mine


# --- what a slot leaves on the host, and its removal ------------------------------------------------------------


def _namespaces(slot: int) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(netns_prefix(slot)))
    return []


def _links(slot: int) -> list[str]:
    bridge = bridge_name(slot)
    return sorted(n for n in os.listdir("/sys/class/net") if n == bridge or n.startswith(bridge + "-"))


def _rule_chains(slot: int) -> list[str]:
    """The chains holding this slot's accept rule (`iptables -C` checks the exact rule)."""
    return [
        chain
        for chain in ("DOCKER-USER", "FORWARD")
        if subprocess.run(["iptables", "-w", "-C", chain, *rule_spec(slot)], capture_output=True).returncode == 0
    ]


def _cgroup_dirs(slot: int) -> list[Path]:
    """Top cgroup directories of the slot's engines (cgroup parents `/dabctl-h-s<s>-n<i>`), in every hierarchy."""
    dirs: list[Path] = []
    tops = [CGROUP_ROOT, *(c for c in CGROUP_ROOT.iterdir() if c.is_dir())] if CGROUP_ROOT.is_dir() else []
    for top in tops:
        with contextlib.suppress(OSError):
            dirs += [d for d in top.iterdir() if d.is_dir() and d.name.startswith(netns_prefix(slot))]
    return sorted(set(dirs))


def _pids(slot: int) -> list[int]:
    """Processes of the slot: in its namespaces (daemons, etcd, registry, agents), in its cgroups (containers), or
    naming its directory on their command line (a daemon whose namespace is already gone)."""
    ns_ids = set()
    for name in _namespaces(slot):
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            ns_ids.add((st.st_dev, st.st_ino))
    cgroup_marker = f":/{netns_prefix(slot)}"
    needle = str(root_dir(slot)).encode() + b"/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
            if (st.st_dev, st.st_ino) in ns_ids:
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/cgroup") as f:
                if any(cgroup_marker in line for line in f):
                    found.append(int(entry))
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return sorted(p for p in found if alive(p))


def traces(slot: int) -> list[str]:
    """Everything of `slot` that exists on this host now, found by listing (not from any harness's memory)."""
    out = [f"netns {n}" for n in _namespaces(slot)]
    out += [f"link {n}" for n in _links(slot)]
    out += [f"iptables rule in {c}" for c in _rule_chains(slot)]
    out += [f"process {p} ({_comm(p)})" for p in _pids(slot)]
    out += [f"mount {m}" for m in mounts_under(str(root_dir(slot)))]
    out += [f"cgroup {d}" for d in _cgroup_dirs(slot)]
    if root_dir(slot).exists():
        out.append(f"directory {root_dir(slot)}")
    return out


def sweep(slot: int) -> None:
    """Remove everything of `slot` (the caller holds it): processes first, then mounts, cgroups, namespaces, links,
    the rule and the directory. Raises, after trying everything, when something stays."""
    deadline = time.monotonic() + 15
    while (pids := _pids(slot)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for point in mounts_under(str(root_dir(slot))):
        with contextlib.suppress(OSError):
            umount(point)
    for top in _cgroup_dirs(slot):
        for d in [*sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)), top]:
            with contextlib.suppress(OSError):
                d.rmdir()
    for name in _namespaces(slot):
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    for link in _links(slot):  # a veth goes with its namespace; the bridge (and a stray veth) here
        subprocess.run(["ip", "link", "delete", link], capture_output=True)
    for chain in _rule_chains(slot):
        while subprocess.run(["iptables", "-w", "-D", chain, *rule_spec(slot)], capture_output=True).returncode == 0:
            pass
    if not mounts_under(str(root_dir(slot))):
        shutil.rmtree(root_dir(slot), ignore_errors=True)
    left = traces(slot)
    if left:
        raise RuntimeError(f"cluster slot {slot}: could not remove " + "; ".join(left))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _attach(slot: int, netns: str, link: str, address: str) -> None:
    """A namespace on the slot's bridge: a veth whose namespace end is eth0 with `address`/24."""
    _ip("netns", "add", netns)
    _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _ip("link", "set", link, "master", bridge_name(slot), "up")
    _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")


def parallel(calls: Sequence[Callable[[], object]]) -> None:
    """Run the calls in threads; raise the first failure after all have ended."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))"


# --- nodes ----------------------------------------------------------------------------------------------------


class Node:
    """One node: a network namespace on the bridge with its own dockerd, and optionally a dabctl agent."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        slot = cluster.slot
        self.cluster = cluster
        self.index = index
        self.name = f"n{index}"
        self.netns = f"{netns_prefix(slot)}{self.name}"
        self.link = f"{bridge_name(slot)}-{self.name}"
        self.address = f"{subnet_prefix(slot)}.{10 + index}"
        self.root = root_dir(slot) / self.name
        self.bip = f"10.231.{16 * slot + index}.1/24"
        self.address_pool = f"10.{240 + slot}.{16 * index}.0/20"
        self.engine = NetnsDockerd(
            images=(),
            netns=self.netns,
            root=self.root / "docker",
            address_pool=f"base={self.address_pool},size=24",
            extra_args=["--bip", self.bip, *cluster.engine_args],
            # Swarm tasks use a local image when there is one instead of asking a registry for its digest.
            env={"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
        )
        self.agent: Any = None  # an AgentProcess while one runs (imported lazily: it pulls in the test package)
        self._agent_args: tuple[tuple[str, ...], Mapping[str, Any] | None] | None = None
        self._restart_agent = False
        self._agent_public = False
        self.is_cut = False

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.address})"

    @property
    def url(self) -> str:
        """The engine's DOCKER_HOST (a Unix socket on the host's file system)."""
        return self.engine.url

    @property
    def client(self) -> docker.APIClient:
        return self.engine.client

    @property
    def running(self) -> bool:
        return self.engine.running

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    # --- lifecycle ---

    def stop(self) -> None:
        """Stop the agent (SIGTERM) and the engine (SIGTERM: it stops its containers); `start()` brings both back."""
        self._restart_agent = self.agent_running
        self.stop_agent()
        self.engine.stop()

    def kill(self) -> None:
        """SIGKILL the agent and the engine, as a crash would; `start()` brings both back."""
        self._restart_agent = self.agent_running
        if self.agent is not None:
            self.agent.kill()
            self.agent = None
        self.engine.kill9()

    def start(self) -> None:
        """Start the engine, and the agent if one ran when the node was stopped or killed."""
        if not self.engine.running:
            self.engine.start()
        if self._restart_agent and self._agent_args is not None:
            args, config = self._agent_args
            self.start_agent(*args, config=config, public=self._agent_public)
        self._restart_agent = False

    def cut(self) -> None:
        """Take the node off the network: its host-side link goes down (eth0 in the node loses carrier)."""
        _ip("link", "set", self.link, "down")
        self.is_cut = True

    def heal(self) -> None:
        _ip("link", "set", self.link, "up")
        self.is_cut = False

    # --- commands in the node ---

    def sh(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run a host binary in the node's network namespace."""
        return run_in(self.netns, *argv, timeout=timeout)

    def connects(self, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from the node's namespace to `address:port` succeeds within `timeout`."""
        return self.sh(sys.executable, "-c", _CONNECT, address, str(port), str(timeout)).returncode == 0

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this node's engine."""
        env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
        return subprocess.run(
            ["docker", "-H", self.url, *args], capture_output=True, text=True, timeout=timeout, env=env
        )

    def dabctl(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        """The dabctl CLI in the node's namespace, on its engine and state directory (`env` added)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_") and k != "DOCKER_HOST"}
        full = {**base, "DOCKER_HOST": self.url, "DABCTL_STATE_DIR": str(self.state_dir), **(env or {})}
        if full.get("DABCTL_STATE", "").startswith("etcd://"):
            full.setdefault("DABCTL_ETCD_INSECURE", "true")  # the harness's etcd has no TLS yet (see start_agent)
        argv = ["nsenter", f"--net={self.engine.netns_path}", _dabctl(), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full)

    # --- the agent ---

    @property
    def agent_running(self) -> bool:
        return self.agent is not None and self.agent.proc is not None and self.agent.proc.poll() is None

    def start_agent(
        self, *args: str, config: Mapping[str, Any] | None = None, ready: bool = True, public: bool = False
    ) -> Any:
        """Start `dabctl agent` in the node's namespace with its own state directory and a config file.

        The config names this node and its engine; `config` adds or overrides fields (e.g. `source`, or
        `state: cluster.etcd_state` for the shared etcd; the default is the embedded state). Returns the
        AgentProcess (tests/integration/agentproc.py): `.get("/status")`, `.log()`.
        """
        from tests.integration.agentproc import AgentProcess

        if self.agent_running:
            raise RuntimeError(f"an agent already runs on {self.name}")
        doc = {"node_name": self.name, "docker_host": self.url, **(config or {})}
        if str(doc.get("state", "")).startswith("etcd://"):
            # The harness's etcd speaks plain HTTP on the bridge until the cluster CA gives it certificates;
            # dabctl refuses that unless told, so the harness says it.
            doc.setdefault("etcd_insecure", True)
        config_path = self.root / "agent.yaml"
        config_path.write_text(yaml.safe_dump(doc))
        self._agent_args = (args, config)
        self._agent_public = public
        host = self.address if public else "127.0.0.1"  # public: `listen` on the node's address (port 9420)
        self.agent = AgentProcess(self.state_dir, "--config", str(config_path), *args, netns=self.netns, host=host)
        try:
            self.agent.start(ready=ready)
        except BaseException:
            self.agent.kill()
            raise
        return self.agent

    def stop_agent(self) -> int | None:
        """SIGTERM the agent and wait; its exit status (None when none ran)."""
        agent, self.agent = self.agent, None
        if agent is None or agent.proc is None:
            return None
        return int(agent.terminate())

    # --- reset ---

    def _unpublish(self) -> None:
        """Remove what published ports leave in the node's namespace when their agent is killed (nothing unpublishes
        them): dabctl's nft table (a later agent, of another state, would find it foreign and publish nothing), the
        route_localnet value found before it, and the DOCKER-USER accept."""
        listing = self.sh("nft", "-j", "list", "table", "ip", nftables.TABLE)
        if listing.returncode == 0:
            was = nftables.parse(json.loads(listing.stdout)).route_localnet_was
            self.sh("sysctl", "-qw", f"net.ipv4.conf.all.route_localnet={was}")
            self.sh("nft", "delete", "table", "ip", nftables.TABLE)
        while self.sh("iptables", "-w", "5", "-D", "DOCKER-USER", *nftables.FORWARD_ACCEPT).returncode == 0:
            pass

    def reset(self) -> None:
        """Back to a fresh node: linked, engine up, no agent (its state removed), no containers, networks,
        volumes or Swarm. Pulled images stay, as in a real node's cache."""
        if self.is_cut:
            self.heal()
        if self.agent is not None:
            self.agent.kill()
            self.agent = None
        self._agent_args, self._restart_agent = None, False
        if not self.engine.running:
            self.engine.start()
        self._unpublish()
        api = self.client
        if api.info()["Swarm"]["LocalNodeState"] != "inactive":
            with contextlib.suppress(docker.errors.APIError):
                api.leave_swarm(force=True)
        parallel([partial(api.remove_container, c["Id"], force=True, v=True) for c in api.containers(all=True)])
        for net in api.networks():
            if net["Name"] not in ("bridge", "host", "none"):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    api.remove_network(net["Id"])
        for vol in (api.volumes() or {}).get("Volumes") or []:
            api.remove_volume(vol["Name"], force=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        for stale in self.root.glob("agent-*.log"):
            stale.unlink()


def _dabctl() -> str:
    return str(Path(sys.executable).parent / "dabctl")


# --- the cluster ----------------------------------------------------------------------------------------------


class Cluster:
    """N nodes, a 3-member etcd (`etcd=False`: none) and a registry (`registry=False`: none) on one bridge."""

    def __init__(self, nodes: int = 3, *, etcd: bool = True, registry: bool = True) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError(f"nodes={nodes}: a cluster has 1 to 9 nodes")
        self.size = nodes
        self.with_etcd = etcd
        self.with_registry = registry
        self.slot = -1
        self.nodes: list[Node] = []
        self.etcd: EtcdCluster | None = None
        self.registry: Registry | None = None
        self.image = ""  # the sample image by digest in the registry (SAMPLE itself without a registry)
        self.start_seconds: float | None = None
        self._lock: socket.socket | None = None
        self._rule_chain = ""

    # --- addresses ---

    @property
    def bridge(self) -> str:
        return bridge_name(self.slot)

    @property
    def host_address(self) -> str:
        return f"{subnet_prefix(self.slot)}.1"

    @property
    def registry_host(self) -> str:
        return f"{subnet_prefix(self.slot)}.30:{REGISTRY_PORT}"

    @property
    def engine_args(self) -> list[str]:
        return ["--insecure-registry", self.registry_host] if self.with_registry else []

    @property
    def etcd_state(self) -> str:
        """The agent's `state` setting for this cluster's etcd: etcd://10.230.s.21:2379,..."""
        if self.etcd is None:
            raise RuntimeError("this cluster has no etcd")
        return "etcd://" + ",".join(f"{m.address}:{CLIENT_PORT}" for m in self.etcd.members)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # --- lifecycle ---

    def start(self) -> Self:
        """Sweep what killed runs left, take a slot, and bring every part up (in parallel); on any failure, or
        Ctrl-C (held until the parts in flight are up, so nothing is made after the clean-up), remove it all."""
        t0 = time.monotonic()
        try:
            with _deferred_interrupts():
                self._start()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start(self) -> None:
        self.slot, self._lock = _take_slot()
        self._make_network()
        self.nodes = [Node(self, i) for i in range(1, self.size + 1)]
        for n in self.nodes:
            _attach(self.slot, n.netns, n.link, n.address)
        calls: list[Callable[[], object]] = [n.engine.start for n in self.nodes]
        if self.with_etcd:
            calls.append(self._start_etcd)
        if self.with_registry:
            calls.append(self._start_registry)
        parallel(calls)
        self.image = self.publish(SAMPLE) if self.with_registry else SAMPLE

    def close(self) -> None:
        """Remove everything; Ctrl-C and SIGTERM wait until that is done. Raises when something stays."""
        if self._lock is None:
            return
        with _deferred_interrupts():
            try:
                calls: list[Callable[[], object]] = [n.engine.close for n in self.nodes]
                for n in self.nodes:
                    if n.agent is not None:
                        n.agent.kill()
                if self.etcd is not None:
                    # SIGKILL: the data goes anyway, and members stopping together wait out each other's
                    # leadership transfer (5 s).
                    calls += [partial(self.etcd.kill9, m) for m in self.etcd.members]
                if self.registry is not None:
                    calls.append(self.registry.stop)
                with contextlib.suppress(Exception):  # whatever one part fails to remove, the sweep takes
                    parallel(calls)
                sweep(self.slot)
            finally:
                self._lock.close()
                self._lock = None

    def leftovers(self) -> list[str]:
        """What of this cluster's slot exists on the host (empty after `close()`)."""
        return traces(self.slot)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def reset(self) -> None:
        """Back to the state right after `start()`, keeping nodes, etcd and registry: every node healed, running,
        without agent, containers, networks, volumes or Swarm; every etcd member up and the keyspace empty; the
        registry up (what was pushed stays)."""
        self.ensure_rule()
        parallel([n.reset for n in self.nodes])
        if self.etcd is not None:
            self.etcd.restart_all()
            self.etcd.clear()
        if self.registry is not None and not self.registry.running:
            self.registry.start()

    def ensure_rule(self) -> None:
        """Put the bridge's accept rule back if something (a restart of the host's engine) removed it."""
        if not _rule_chains(self.slot):
            self._insert_rule()

    # --- images ---

    def publish(self, host_image: str, repository: str | None = None) -> str:
        """Push `host_image` (from the host's engine) into the registry as `repository` (default: the same name);
        return its digest reference, `<registry>/<name>@sha256:...`.

        The image passes through node 1, which keeps neither it nor a reference: nodes pull what they run."""
        if self.registry is None:
            raise RuntimeError("this cluster has no registry")
        api = self.nodes[0].client
        source = docker.APIClient(base_url=HOST_ENGINE, version=API_VERSION, timeout=120)
        try:
            api.load_image(source.get_image(host_image))
        finally:
            source.close()
        target = f"{self.registry_host}/{repository or host_image}"
        digest = self.registry.push(api, host_image, target)
        with contextlib.suppress(docker.errors.APIError):
            api.remove_image(host_image)
        return f"{split_ref(target)[0]}@{digest}"

    # --- Swarm ---

    @contextlib.contextmanager
    def swarm(self) -> Iterator[Swarm]:
        """The nodes as one Docker Swarm (node 1 the manager) for the block; every node leaves it afterwards."""
        manager, workers = self.nodes[0], self.nodes[1:]
        manager.client.init_swarm(advertise_addr=manager.address, listen_addr=f"{manager.address}:2377")
        try:
            token = manager.client.inspect_swarm()["JoinTokens"]["Worker"]
            join = [
                partial(
                    n.client.join_swarm,
                    [f"{manager.address}:2377"],
                    token,
                    listen_addr=f"{n.address}:2377",
                    advertise_addr=n.address,
                )
                for n in workers
            ]
            parallel(join)
            swarm = Swarm(self)
            swarm.wait(lambda: len(swarm.ready_nodes()) == len(self.nodes), "every node Ready in the swarm")
            yield swarm
        finally:
            with contextlib.suppress(docker.errors.APIError):
                for svc in manager.client.services():
                    manager.client.remove_service(svc["ID"])
            calls: list[Callable[[], object]] = [partial(n.client.leave_swarm, force=True) for n in workers]
            with contextlib.suppress(docker.errors.APIError):
                parallel(calls)
            with contextlib.suppress(docker.errors.APIError):
                manager.client.leave_swarm(force=True)

    # --- internals ---

    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        root_dir(self.slot).mkdir(mode=0o755)
        self._insert_rule()

    def _insert_rule(self) -> None:
        has_docker_user = subprocess.run(["iptables", "-w", "-S", "DOCKER-USER"], capture_output=True).returncode == 0
        chain = "DOCKER-USER" if has_docker_user else "FORWARD"
        subprocess.run(["iptables", "-w", "-I", chain, *rule_spec(self.slot)], check=True, capture_output=True)

    def _start_etcd(self) -> None:
        members = []
        for j in (1, 2, 3):
            member = EtcdMember(f"e{j}", f"{subnet_prefix(self.slot)}.{20 + j}", f"{netns_prefix(self.slot)}e{j}")
            _attach(self.slot, str(member.netns), f"{self.bridge}-e{j}", member.address)
            members.append(member)
        self.etcd = EtcdCluster(root_dir(self.slot) / "etcd", members, token=f"{PREFIX}s{self.slot}")
        self.etcd.start()

    def _start_registry(self) -> None:
        netns = f"{netns_prefix(self.slot)}reg"
        _attach(self.slot, netns, f"{self.bridge}-reg", self.registry_host.partition(":")[0])
        self.registry = Registry(
            directory=root_dir(self.slot) / "registry",
            address=self.registry_host.partition(":")[0],
            port=REGISTRY_PORT,
            netns=netns,
        )
        self.registry.start()


class Swarm:
    """The cluster's nodes as a Swarm: services with `--endpoint-mode dnsrr` and no published ports (this kernel
    has no IPVS for Swarm's VIPs and ingress), on the registry's image by digest (nothing is resolved)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.manager = cluster.nodes[0]

    def ready_nodes(self) -> list[str]:
        """IDs of the swarm's nodes in state ready, as the manager sees them."""
        return [str(n["ID"]) for n in self.manager.client.nodes() if n["Status"]["State"] == "ready"]

    def service(self, name: str, replicas: int, image: str | None = None, command: Sequence[str] = ()) -> str:
        """Create a replicated service; its ID."""
        spec = docker.types.ContainerSpec(image or self.cluster.image, command=list(command) or None)
        created = self.manager.client.create_service(
            docker.types.TaskTemplate(spec, restart_policy=docker.types.RestartPolicy(condition="any")),
            name=name,
            mode=docker.types.ServiceMode("replicated", replicas=replicas),
            endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
        )
        return str(created["ID"])

    def running(self, service: str) -> dict[str, int]:
        """Running containers of `service` per node name, as each node's engine reports them."""
        label = f"com.docker.swarm.service.name={service}"
        return {
            n.name: len(n.client.containers(filters={"label": label, "status": "running"})) for n in self.cluster.nodes
        }

    @staticmethod
    def wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"swarm: not reached within {timeout:.0f}s: {what}")
            time.sleep(0.1)


# --- Ctrl-C during start-up and clean-up ----------------------------------------------------------------------


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (then re-raise the first as KeyboardInterrupt), so a
    second Ctrl-C cannot cut a clean-up short. Only the main thread can install handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]} during cluster set-up or clean-up")


# --- python -m tests.support.cluster ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start a test cluster and hold it until Ctrl-C or SIGTERM.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--no-registry", action="store_true")
    parser.add_argument("--exit", action="store_true", help="close at once after starting (a start-up check)")
    opts = parser.parse_args(argv)
    # SIGTERM ends the hold like Ctrl-C does, through the same clean-up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = Cluster(opts.nodes, etcd=not opts.no_etcd, registry=not opts.no_registry)
    with cluster:
        facts = {
            "slot": cluster.slot,
            "seconds": round(cluster.start_seconds or 0, 2),
            "nodes": {n.name: {"address": n.address, "netns": n.netns, "docker_host": n.url} for n in cluster.nodes},
            "etcd": cluster.etcd.endpoints if cluster.etcd else [],
            "image": cluster.image,
        }
        print(json.dumps(facts), flush=True)
        if not opts.exit:
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
