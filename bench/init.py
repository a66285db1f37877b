"""Init-to-ready benchmark: `dabctl cluster init` + 2 joins against `docker swarm init` + 2 joins (issue 20).

On the multi-node harness (tests/support/cluster.py: 3 nodes in their own network namespaces, each with its own
dockerd), in two shapes, each for both contenders:

- "3 managers": n2 and n3 join as managers (dabctl: a 3-member etcd, the realistic HA shape; Swarm: 3 raft
  managers). Manager joins run one after the other for both contenders (dabctl's etcd admits one learner at a
  time; Swarm gets the same sequence); each node's agent starts as soon as its own join returned.
- "1 manager + 2 workers": n2 and n3 join as workers, both at once for both contenders.

dabctl, the operator's way, with the etcd `cluster init` runs for you (no `--etcd`; the harness's own etcd is not
used): `dabctl cluster init` on n1, n1's agent started, `dabctl cluster join --token ...` on n2 and n3 (tokens
from init's output), each agent started right after its join. Ready = what `dabctl node ls` on n1 shows: 3 nodes
up, each with a certificate (its expiry shown), one of them the leader; and (3 managers) etcd has 3 voting members.

Swarm: `docker swarm init` on n1, `docker swarm join-token -q ROLE`, `docker swarm join --token ...` on n2 and n3
(the docker CLI, as an operator runs it). Ready = `docker node ls` on n1: 3 nodes Ready (managers: Reachable).

Clock: starts before `cluster init` / `swarm init` is launched; stops when the ready condition, polled from outside
(every 100 ms: the same records `node ls` reads, through n1's etcd member with n1's certificate; every 50 ms: the
engine's `GET /nodes` for Swarm), first holds; a final `dabctl node ls --json` / `docker node ls` confirms it.
The dabctl breakdown comes from the same poller (files appearing in the nodes' state directories, etcd's member
list, the state log's keys), from n1's etcd log (when each peer became active, each member add/promote), and the
CPU seconds each dabctl process on the path used (wait4 for the CLI; /proc for an agent, when its node was first
seen up).

Runs alternate (dabctl first in odd runs, Swarm first in even ones), each on a freshly reset harness: agents
stopped, etcd members stopped and their data and the nodes' state directories removed, every node left the swarm
(`--force`).

    sudo .venv/bin/python bench/init.py [--runs 5] [--shapes managers,workers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DABCTL, log, machine, print_table, ratio, stats

from agent.node.etcdmember import LocalMember, TlsFiles
from agent.pki.ca import new_ca
from agent.pki.files import PkiPaths
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT
from agent.state.etcdcluster import EtcdMembership
from agent.state.nodes import Membership, NodeRecords
from tests.support.cluster import Cluster, Node

POLL = 0.05
STATE_EVERY = 2  # the etcd reads (about 8 small requests) every second poll: 0.1 s, to load the machine less
TIMEOUT = 180.0
SHAPES = {"managers": "3 managers", "workers": "1 manager + 2 workers"}


# --- the poller: first-seen times of what the operator cannot see but the breakdown needs -----------------------


class Watch:
    """Polls every 50 ms, from the bench process: files in the nodes' state directories, and (once init wrote
    them) the cluster's records and etcd's member list through n1's member as etcd's root user with n1's
    certificate. `seen[event]` is the monotonic time an event was first seen."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.seen: dict[str, float] = {}
        self.pids: dict[str, int] = {}  # node name -> its agent's pid
        self.cpu: dict[str, float] = {}  # "nX agent" -> CPU seconds its agent had used when the node was seen up
        self.ready: Callable[[Membership, list[Any]], bool] = lambda m, members: False
        self.member: Membership | None = None
        self.members: list[Any] = []
        self._stop = threading.Event()
        self._root: EtcdStateLog | None = None
        self._records: EtcdStateLog | None = None
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self, event: str, when: float | None = None) -> None:
        self.seen.setdefault(event, time.monotonic() if when is None else when)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._files(now)
                if tick % STATE_EVERY == 0:
                    self._state(now)
            except Exception as exc:  # a poll that failed: the next one tries again
                self._errors.append(str(exc))
            tick += 1
            self._stop.wait(POLL)

    def _files(self, now: float) -> None:
        for n in self.nodes:
            pki = PkiPaths.of(n.state_dir)
            if pki.ca_cert.exists() or (n.state_dir / ".pki-joining" / "ca.crt").exists():
                self.mark(f"{n.name} ca", now)
            if pki.node_cert.exists() or (n.state_dir / ".pki-joining" / "node.crt").exists():
                self.mark(f"{n.name} cert", now)
            if LocalMember(n.state_dir).pid_file.exists():
                self.mark(f"{n.name} etcd started", now)
            if (n.state_dir / "cluster.json").exists():
                self.mark(f"{n.name} cluster.json", now)

    def _state(self, now: float) -> None:
        if self._root is None and not self._open():
            return
        assert self._root is not None and self._records is not None
        members = EtcdMembership(self._root).members()
        for m in members:
            for n in self.nodes:
                if any(n.address in u for u in m.peer_urls):
                    self.mark(f"{n.name} learner added", now)
                    if not m.learner:
                        self.mark(f"{n.name} voting", now)
        membership = NodeRecords(self._records).membership()
        ids = {spec.node_id: spec.name for spec in membership.specs.values()}
        for nid, status in membership.statuses.items():
            if nid in ids:
                name = ids[nid]
                if name in self.pids and f"{name} agent" not in self.cpu:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        self.cpu[f"{name} agent"] = proc_cpu(self.pids[name])
                self.mark(f"{name} up", now)
                if status.certificate_expires_at is not None:
                    self.mark(f"{ids[nid]} up with certificate", now)
        if membership.leader is not None:
            self.mark("leader", now)
        self.member, self.members = membership, members
        if self.ready(membership, members):
            self.mark("ready", now)

    def _open(self) -> bool:
        n1 = self.nodes[0]
        try:
            secrets = json.loads((n1.state_dir / "cluster-secrets.json").read_text())
            cluster = json.loads((n1.state_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return False
        pki = PkiPaths.of(n1.state_dir)
        tls = TlsFiles(ca=str(pki.ca_cert), cert=str(pki.node_cert), key=str(pki.node_key)).client()
        endpoints = [f"https://{n1.address}:2379"]
        password = secrets["etcd_root_password"]
        self._root = EtcdStateLog(endpoints, prefix="/", user=ROOT, password=password, timeout=5, **tls)
        self._records = EtcdStateLog(
            endpoints, prefix=cluster["etcd_prefix"], user=ROOT, password=password, timeout=5, **tls
        )
        return True

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=10)
        for c in (self._root, self._records):
            if c is not None:
                c.close()
        return self._errors


# --- dabctl -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run's times (seconds from the start of the clock), by event."""

    total: float
    at: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of dabctl's processes (see `dabctl`)


def _token(init_stdout: str, role: str) -> str:
    lines = init_stdout.splitlines()
    for i, line in enumerate(lines):
        if f"add a {role}" in line:
            return next(ln for ln in lines[i + 1 :] if "--token" in ln).split("--token", 1)[1].split()[0]
    raise RuntimeError(f"no {role} token in `cluster init`'s output:\n{init_stdout}")


class Agent:
    """`dabctl agent` in a node's namespace, launched and left alone: the harness's `Node.start_agent` polls
    /healthz by starting a Python process in the namespace every 0.1 s, which on 2 CPUs slows the very start-up
    this measures. Readiness is watched from outside instead (the cluster listener, the node's status key)."""

    def __init__(self, node: Node, source: Path) -> None:
        config = {
            "node_name": node.name,
            "docker_host": node.url,
            "source": str(source),
            "cluster_listen": f"{node.address}:9421",
            "allow_empty": True,
        }
        path = node.root / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = node.root / "agent-bench.log"
        argv = [
            DABCTL,
            "agent",
            "--state-dir",
            str(node.state_dir),
            "--listen",
            "127.0.0.1:9420",
            "--config",
            str(path),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_") and k != "DOCKER_HOST"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{node.netns}", *argv], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _listening(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
        return True
    return False


def _wait(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout:.0f} s: {what}")
        time.sleep(0.02)


def dabctl(node: Node, *args: str, cpu: dict[str, float] | None = None, what: str = "") -> str:
    """The dabctl CLI in the node's namespace (as `Node.dabctl`); its stdout. `cpu[what]`: the CPU seconds it
    used (user + system, from wait4), the part of its wall time that load multiplies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_") and k != "DOCKER_HOST"}
    env.update({"DOCKER_HOST": node.url, "DABCTL_STATE_DIR": str(node.state_dir)})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{node.netns}", DABCTL, *args], env=env, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if cpu is not None:
        cpu[what] = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"dabctl {' '.join(args[:2])} on {node.name} failed ({proc.returncode}): {stderr[-2000:]}")
    return stdout


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _checked(out: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out


def join_all(join: Callable[[Node], None], nodes: tuple[Node, ...], *, one_at_a_time: bool) -> None:
    """Join `nodes`: managers one after another (each adds a voting member, as Swarm's raft does), workers at once."""
    if one_at_a_time:
        for node in nodes:
            join(node)
        return
    threads = [threading.Thread(target=join, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def dabctl_ready(managers: bool) -> Callable[[Membership, list[Any]], bool]:
    def ready(m: Membership, members: list[Any]) -> bool:
        if len(m.specs) != 3 or m.leader is None:
            return False
        if any(m.statuses.get(nid) is None or m.statuses[nid].certificate_expires_at is None for nid in m.specs):
            return False
        return not managers or sum(1 for x in members if not x.learner) == 3

    return ready


def run_dabctl(cluster: Cluster, work: Path, managers: bool, agents: list[Agent]) -> Run:
    cluster.reset()
    n1, n2, n3 = cluster.nodes
    source = work / "stacks"
    source.mkdir(parents=True, exist_ok=True)
    role = "manager" if managers else "worker"
    watch = Watch(cluster.nodes)
    watch.ready = dabctl_ready(managers)
    cpu: dict[str, float] = {}
    try:
        t0, wall0 = time.monotonic(), time.time()
        out = dabctl(
            n1, "cluster", "init", "--node-name", "n1", "--advertise-address", n1.address, cpu=cpu, what="init"
        )
        watch.mark("init exit")
        token = _token(out, role)
        watch.mark("n1 agent started")
        agents.append(Agent(n1, source))
        watch.pids["n1"] = agents[-1].proc.pid
        _wait(lambda: _listening(n1.address, 9421), "n1's cluster listener")
        watch.mark("n1 listener")

        def join(node: Node) -> None:
            watch.mark(f"{node.name} join start")
            dabctl(
                node, "cluster", "join", "--token", token, "--node-name", node.name,
                "--advertise-address", node.address, f"{n1.address}:9421", cpu=cpu, what=f"{node.name} join",
            )  # fmt: skip
            watch.mark(f"{node.name} join exit")
            watch.mark(f"{node.name} agent started")
            agents.append(Agent(node, source))
            watch.pids[node.name] = agents[-1].proc.pid

        join_all(join, (n2, n3), one_at_a_time=managers)
        _wait(lambda: "ready" in watch.seen, "ready")
        t1 = watch.seen["ready"]
        # What the operator sees: `node ls` on n1 agrees.
        rows = json.loads(dabctl(n1, "node", "ls", "--json"))
        up = [r for r in rows if r["state"] == "up" and r["certificate_expires_at"]]
        if len(up) != 3 or sum(1 for r in rows if r["leader"]) != 1:
            raise RuntimeError(f"node ls does not show 3 nodes up with certificates and a leader: {rows}")
    finally:
        errors = watch.close()
    if errors:
        log(f"dabctl poller: {len(errors)} failed polls, last: {errors[-1]}")
    run = Run(total=t1 - t0, at={k: v - t0 for k, v in watch.seen.items()}, cpu={**cpu, **watch.cpu})
    run.at.update(_etcd_events(cluster, wall0))
    run.at["last agent started"] = max(run.at[f"{n.name} agent started"] for n in (n2, n3))
    return run


def _etcd_events(cluster: Cluster, wall0: float) -> dict[str, float]:
    """From n1's etcd log (zap JSON, wall-clock `ts`): when it saw each peer become active, and when the
    membership changes were applied on it; seconds since the start of the clock."""
    out: dict[str, float] = {}
    ids: dict[str, str] = {}
    promoted = 0
    n1 = cluster.nodes[0]
    with contextlib.suppress(OSError):
        for line in LocalMember(n1.state_dir).log_file.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            msg, ts = doc.get("msg", ""), doc.get("ts")
            if not isinstance(ts, str):
                continue
            when = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() - wall0
            urls = " ".join(doc.get("added-peer-peer-urls") or [])
            for n in cluster.nodes[1:]:
                if msg == "added member" and n.address in urls:
                    ids[str(doc.get("added-peer-id"))] = n.name
                    out.setdefault(f"{n.name} etcd: added", when)
            if msg == "peer became active" and str(doc.get("peer-id")) in ids:
                out.setdefault(f"{ids[str(doc['peer-id'])]} etcd: peer active", when)
            if msg == "promote member":  # etcd 3.4 names no member here: learners are promoted in the order added
                promoted += 1
                if promoted <= len(ids):
                    out.setdefault(f"{list(ids.values())[promoted - 1]} etcd: promoted", when)
    return out


def teardown_dabctl(cluster: Cluster, agents: list[Agent], keep: Path | None = None) -> None:
    """Agents stopped, every etcd member stopped and its data gone (reset() then removes the state dirs);
    `keep`: the agents' and members' logs copied there first."""
    for agent in agents:
        agent.stop()
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for node in cluster.nodes:
            for f in [node.root / "agent-bench.log", LocalMember(node.state_dir).log_file]:
                with contextlib.suppress(OSError):
                    shutil.copy(f, keep / f"{node.name}-{f.name}")
    for node in cluster.nodes:
        with contextlib.suppress(OSError):
            (node.root / "agent-bench.log").unlink()
        local = LocalMember(node.state_dir)
        local.stop(timeout=5)
        local.destroy()
    cluster.reset()


# --- Swarm ------------------------------------------------------------------------------------------------------


def swarm_ready(n1: Node, managers: bool) -> bool:
    nodes = n1.client.nodes()
    if len(nodes) != 3 or any(n["Status"]["State"] != "ready" for n in nodes):
        return False
    if managers:
        return all((n.get("ManagerStatus") or {}).get("Reachability") == "reachable" for n in nodes)
    return True


def run_swarm(cluster: Cluster, managers: bool) -> Run:
    cluster.reset()
    n1, n2, n3 = cluster.nodes
    role = "manager" if managers else "worker"
    at: dict[str, float] = {}
    t0 = time.monotonic()
    _checked(
        n1.docker("swarm", "init", "--advertise-addr", n1.address, "--listen-addr", f"{n1.address}:2377"),
        "docker swarm init",
    )
    at["init exit"] = time.monotonic() - t0
    token = _checked(n1.docker("swarm", "join-token", "-q", role), "docker swarm join-token").stdout.strip()

    def join(node: Node) -> None:
        _checked(
            node.docker(
                "swarm", "join", "--token", token, "--advertise-addr", node.address,
                "--listen-addr", f"{node.address}:2377", f"{n1.address}:2377",
            ),
            f"docker swarm join on {node.name}",
        )  # fmt: skip
        at[f"{node.name} join exit"] = time.monotonic() - t0

    join_all(join, (n2, n3), one_at_a_time=managers)
    deadline = time.monotonic() + TIMEOUT
    while not swarm_ready(n1, managers):
        if time.monotonic() > deadline:
            raise TimeoutError("swarm: 3 nodes Ready not reached")
        time.sleep(POLL)
    total = time.monotonic() - t0
    shown = _checked(n1.docker("node", "ls", "--format", "{{.Status}} {{.ManagerStatus}}"), "docker node ls").stdout
    if shown.count("Ready") != 3 or (managers and shown.count("Reachable") + shown.count("Leader") != 3):
        raise RuntimeError(f"docker node ls does not show 3 Ready nodes:\n{shown}")
    return Run(total=total, at=at)


def teardown_swarm(cluster: Cluster) -> None:
    for node in reversed(cluster.nodes):
        node.docker("swarm", "leave", "--force")
    cluster.reset()


# --- the table --------------------------------------------------------------------------------------------------


def _span(runs: list[Run], start: str, end: str) -> str:
    xs = [r.at[end] - (r.at[start] if start else 0.0) for r in runs if end in r.at and (not start or start in r.at)]
    return stats(xs) if xs else "-"


def breakdown(runs: list[Run], managers: bool) -> list[list[str]]:
    rows = [
        ["  `cluster init` (CLI start-up, CA + n1's key and certificate, until pki/ is written)", "", "n1 ca"],
        ["  `cluster init`: -> n1's etcd member started", "n1 ca", "n1 etcd started"],
        ["  `cluster init`: -> exit (member serving, cluster record, auth, users)", "n1 etcd started", "init exit"],
        ["  n1 agent start -> its cluster listener answers", "n1 agent started", "n1 listener"],
        ["  n1 agent start -> leader elected", "n1 agent started", "leader"],
        ["  n1 agent start -> n1 up with certificate", "n1 agent started", "n1 up with certificate"],
    ]
    for n in ("n2", "n3"):
        if managers:
            rows += [
                [f"  {n} join: start -> learner added (CLI, CA check, CSR, signing, etcd user, add)",
                 f"{n} join start", f"{n} learner added"],
                [f"  {n} join: -> certificate written on {n}", f"{n} learner added", f"{n} cert"],
                [f"  {n} join: -> its etcd member started", f"{n} cert", f"{n} etcd started"],
                [f"  {n} join: -> promoted to voter (catch-up + etcd's rule)", f"{n} etcd started", f"{n} voting"],
                [f"  {n} join: -> `cluster join` exits", f"{n} voting", f"{n} join exit"],
                [f"  {n} join: start -> exit", f"{n} join start", f"{n} join exit"],
                [f"  {n} etcd (n1's log): learner added -> peer active", f"{n} etcd: added", f"{n} etcd: peer active"],
                [f"  {n} etcd (n1's log): peer active -> promoted", f"{n} etcd: peer active", f"{n} etcd: promoted"],
                [f"  {n} agent start -> {n} up with certificate", f"{n} agent started", f"{n} up with certificate"],
            ]  # fmt: skip
        else:
            rows += [
                [f"  {n} join: start -> certificate written (CLI, CA check, CSR, signing)", f"{n} join start",
                 f"{n} cert"],
                [f"  {n} join: -> `cluster join` exits", f"{n} cert", f"{n} join exit"],
                [f"  {n} agent start -> {n} up with certificate", f"{n} agent started", f"{n} up with certificate"],
            ]  # fmt: skip
    last = "last agent started"
    rows.append(["  last agent start -> ready (polled every 100 ms)", last, "ready"])
    return [["", label, _span(runs, a, b), ""] for label, a, b in rows]


def cpu_rows(runs: list[Run]) -> list[list[str]]:
    """CPU seconds of dabctl's processes on the path (what the load multiplies into wall time)."""
    names = [
        ("init", "`cluster init`"),
        ("n2 join", "`cluster join` on n2"),
        ("n3 join", "`cluster join` on n3"),
        ("n1 agent", "n1's agent, start -> up"),
        ("n2 agent", "n2's agent, start -> up"),
        ("n3 agent", "n3's agent, start -> up"),
    ]
    rows = []
    for key, label in names:
        xs = [r.cpu[key] for r in runs if key in r.cpu]
        if xs:
            rows.append(["", f"  CPU seconds: {label}", stats(xs), ""])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shapes", default="managers,workers", help="managers, workers or both (comma-separated)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy dabctl's agent and etcd logs here")
    parser.add_argument("--verbose", action="store_true", help="log every run's events")
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    load0 = os.getloadavg()
    t = time.perf_counter()
    for _ in range(20):
        new_ca("x" * 25)
    ca_ms = (time.perf_counter() - t) / 20 * 1000
    dab: dict[str, list[Run]] = {s: [] for s in shapes}
    sw: dict[str, list[Run]] = {s: [] for s in shapes}
    failed: dict[str, list[str]] = {s: [] for s in shapes}
    loads: list[float] = []
    with Cluster(nodes=3) as cluster:
        desc = machine(cluster.nodes[0].engine)
        work = Path(cluster.nodes[0].root).parent / "bench-init"  # removed with the harness
        for i in range(args.runs):
            for shape in shapes:
                managers = shape == "managers"
                order = ("dabctl", "swarm") if i % 2 == 0 else ("swarm", "dabctl")
                for who in order:
                    loads.append(os.getloadavg()[0])
                    if who == "dabctl":
                        agents: list[Agent] = []
                        try:
                            r = run_dabctl(cluster, work, managers, agents)
                        except (RuntimeError, TimeoutError) as exc:  # counted and shown; the other runs go on
                            failed[shape].append(str(exc).splitlines()[0][:300])
                            log(f"run {i + 1} {SHAPES[shape]} dabctl FAILED: {failed[shape][-1]}")
                            continue
                        finally:
                            teardown_dabctl(cluster, agents, args.keep_logs and args.keep_logs / f"run{i + 1}-{shape}")
                        dab[shape].append(r)
                    else:
                        try:
                            r = run_swarm(cluster, managers)
                        finally:
                            teardown_swarm(cluster)
                        sw[shape].append(r)
                    log(f"run {i + 1} {SHAPES[shape]} {who}: {r.total:.2f} s (load {loads[-1]:.1f})")
                    if args.verbose:
                        log("  " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.at.items(), key=lambda kv: kv[1])))
                        log("  CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items()))
    load1 = os.getloadavg()
    print(f"\n{desc}")
    print(
        f"load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start, "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end, 1-min load {min(loads):.1f}-{max(loads):.1f} "
        f"at the runs' starts; {args.runs} runs per contender and shape; creating the CA (in-process): {ca_ms:.1f} ms\n"
    )
    rows: list[list[str]] = []
    for shape in shapes:
        managers = shape == "managers"
        d, s = [r.total for r in dab[shape]], [r.total for r in sw[shape]]
        for why in failed[shape]:
            print(f"{SHAPES[shape]}: a dabctl run failed: {why}")
        if not d:
            continue
        ready = "3 up with certs, leader" + (", 3 voting etcd members" if managers else "")
        rows.append([SHAPES[shape], f"dabctl (ready: {ready})", stats(d), ratio(d, s)])
        rows += breakdown(dab[shape], managers)
        rows += cpu_rows(dab[shape])
        rows.append([SHAPES[shape], "swarm (ready: 3 Ready" + (", Reachable)" if managers else ")"), stats(s), "1.00x"])
        rows.append(["", "  `docker swarm init`", _span(sw[shape], "", "init exit"), ""])
        rows.append(["", "  `docker swarm join` n2 exits", _span(sw[shape], "", "n2 join exit"), ""])
        rows.append(["", "  `docker swarm join` n3 exits", _span(sw[shape], "", "n3 join exit"), ""])
        rows.append(["", "dabctl - swarm (medians)", f"{sorted(d)[len(d) // 2] - sorted(s)[len(s) // 2]:.3f}", ""])
    print_table(["shape", "contender / step", "seconds", "÷ swarm"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
