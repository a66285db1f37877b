"""The etcd member a manager runs for its cluster when no etcd was given (`cluster init` without `--etcd`).

Everything lives under `<state_dir>/etcd/`: `member.json` (how to run it: `MemberSpec`), `data/` (etcd's data
directory), `etcd.pid` and `etcd.log`. The member speaks TLS only, with client certificates required on both its
client (2379) and peer (2380) ports, from the cluster CA.

It is not the agent's child in any way that matters: it runs in its own session (process group), so a Ctrl-C,
a SIGTERM or a crash of the agent leaves it running, and quorum with it. An agent that starts re-adopts it from the
pid file — only after checking in /proc that the pid is an etcd on this very data directory, never starting a
second one — and starts it again only when it is not running. Only an explicit `dabctl cluster leave` stops it
(after removing it from the cluster's membership, when that keeps quorum).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agent.private import private_dir
from agent.state.etcd import EtcdStateLog
from agent.state.etcdauth import ROOT
from agent.state.etcdcluster import EtcdMembership, TlsArgs, member_ready, member_status
from agent.state.membership import write_private
from reconcilers.etcdmembers import Member
from schemas.errors import DabctlError

log = logging.getLogger("dabctl.etcd")

ETCD_BINARY = "/usr/bin/etcd"
CLIENT_PORT = 2379
PEER_PORT = 2380
ETCD_DIR = "etcd"


class EtcdMemberError(DabctlError):
    """The local etcd member cannot be started, adopted or stopped (the message says why and what to do)."""


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The node's PEM files from the cluster CA: its certificate serves etcd's client and peer ports and is the
    agent's etcd client certificate (so it carries serverAuth and clientAuth and names the node's address)."""

    ca: str
    cert: str
    key: str

    def client(self) -> TlsArgs:
        """Keyword arguments of EtcdStateLog."""
        return {"ca_file": self.ca, "cert_file": self.cert, "key_file": self.key}


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MemberSpec(BaseModel):
    """`<state_dir>/etcd/member.json` (0600): how this node runs its etcd member."""

    model_config = ConfigDict(extra="forbid", strict=True, title="etcd member")

    name: str  # the node id
    address: str  # the advertise address: other members and nodes reach it there
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT
    ca_file: str
    cert_file: str
    key_file: str
    cluster_token: str  # the cluster id: members of two clusters never join by mistake
    initial_cluster: dict[str, str]  # node id -> peer URL, at the member's first start (etcd ignores it after)
    new_cluster: bool  # the first member; every other one joins an existing cluster as a learner

    @property
    def client_url(self) -> str:
        return f"https://{host_port(self.address, self.client_port)}"

    @property
    def peer_url(self) -> str:
        return f"https://{host_port(self.address, self.peer_port)}"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(ca=self.ca_file, cert=self.cert_file, key=self.key_file)


def member_spec(
    tls: TlsFiles, *, node_id: str, host: str, cluster_id: str, members: dict[str, str] | None = None
) -> MemberSpec:
    """The spec of this node's member at `host`: the first of a new cluster (`members` None), or one joining the
    cluster's `members` (node id -> peer URL, its own learner already added)."""
    own = {node_id: f"https://{host_port(host, PEER_PORT)}"}
    return MemberSpec(
        name=node_id,
        address=host,
        ca_file=tls.ca,
        cert_file=tls.cert,
        key_file=tls.key,
        cluster_token=cluster_id,
        initial_cluster=own if members is None else members,
        new_cluster=members is None,
    )


def endpoints_of(state: str) -> list[str]:
    """The host:port list of a state setting `etcd://h1:2379,h2:2379`."""
    return [h for h in state.removeprefix("etcd://").split(",") if h]


def root_client(tls: TlsFiles, state: str, password: str | None, timeout: float = 15) -> EtcdStateLog:
    """A client of the cluster's etcd at `state` with this node's certificate: etcd's root user with `password`,
    or no user (listing members needs none, nor quorum)."""
    return EtcdStateLog(
        [f"https://{h}" for h in endpoints_of(state)],
        prefix="/",
        user=ROOT if password else None,
        password=password,
        timeout=timeout,  # membership changes are consensus writes: a loaded member takes its time
        **tls.client(),
    )


def list_members(tls: TlsFiles, state: str, timeout: float = 15) -> list[Member]:
    """etcd's members as the cluster at `state` lists them. Listing needs no user and no quorum (each member
    answers from its own copy); StateLogError when no endpoint answers."""
    plain = root_client(tls, state, None, timeout=timeout)
    try:
        return EtcdMembership(plain).members()
    finally:
        plain.close()


def etcd_argv(spec: MemberSpec, data_dir: Path, binary: str = ETCD_BINARY) -> list[str]:
    """etcd's command line for `spec` (pure). Clients reach it on the advertise address and on loopback."""
    local = f"https://{host_port('127.0.0.1', spec.client_port)}"
    initial = ",".join(f"{name}={url}" for name, url in sorted(spec.initial_cluster.items()))
    return [
        binary,
        f"--name={spec.name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={spec.client_url},{local}",
        f"--advertise-client-urls={spec.client_url}",
        f"--listen-peer-urls={spec.peer_url}",
        f"--initial-advertise-peer-urls={spec.peer_url}",
        f"--initial-cluster={initial}",
        f"--initial-cluster-state={'new' if spec.new_cluster else 'existing'}",
        f"--initial-cluster-token={spec.cluster_token}",
        "--client-cert-auth",
        f"--trusted-ca-file={spec.ca_file}",
        f"--cert-file={spec.cert_file}",
        f"--key-file={spec.key_file}",
        "--peer-client-cert-auth",
        f"--peer-trusted-ca-file={spec.ca_file}",
        f"--peer-cert-file={spec.cert_file}",
        f"--peer-key-file={spec.key_file}",
        "--strict-reconfig-check",
        "--logger=zap",
    ]


class LocalMember:
    """This node's etcd member: its files under `<state_dir>/etcd/` and its process."""

    def __init__(self, state_dir: Path, binary: str = ETCD_BINARY) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / ETCD_DIR
        self.data_dir = self.dir / "data"
        self.pid_file = self.dir / "etcd.pid"
        self.log_file = self.dir / "etcd.log"
        self.spec_file = self.dir / "member.json"
        self.binary = binary
        self._child: subprocess.Popen[bytes] | None = None  # when this process started it: reaped by poll()

    # --- what is there --------------------------------------------------------------------------------------

    def spec(self) -> MemberSpec | None:
        if not self.spec_file.exists():
            return None
        try:
            return MemberSpec.model_validate_json(self.spec_file.read_text())
        except ValueError as exc:
            raise EtcdMemberError(
                f"{self.spec_file} cannot be read ({str(exc).splitlines()[0]}); restore it, or leave the cluster and "
                "join again"
            ) from None

    def pid(self) -> int | None:
        """The running member's pid from the pid file, if that pid is an etcd on this data directory."""
        if self._child is not None:
            self._child.poll()  # reap it if it died, so that its pid no longer shows
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(argv) and os.path.basename(argv[0]) == b"etcd" and f"--data-dir={self.data_dir}".encode() in argv

    # --- lifecycle ------------------------------------------------------------------------------------------

    def write_spec(self, spec: MemberSpec) -> None:
        private_dir(self.state_dir)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        write_private(self.spec_file, spec.model_dump_json(indent=2) + "\n")

    def ensure(self) -> int | None:
        """Adopt the running member, or start it from `member.json`; its pid (None when this node runs none)."""
        spec = self.spec()
        if spec is None:
            return None
        pid = self.pid()
        if pid is not None:
            log.info("etcd member adopted", extra={"pid": pid, "data_dir": str(self.data_dir)})
            return pid
        return self.start(spec)

    def start(self, spec: MemberSpec, *extra: str) -> int:
        """Start the member of `spec` in its own session (it outlives this process); its pid. `extra`: more flags
        for this start only (`--force-new-cluster`)."""
        if self.pid() is not None:
            raise EtcdMemberError(f"an etcd member already runs on {self.data_dir} (pid file {self.pid_file})")
        if not os.access(self.binary, os.X_OK):
            raise EtcdMemberError(
                f"{self.binary} is missing: install Debian's etcd-server (apt-get install etcd-server), or give "
                "the cluster an etcd with --etcd"
            )
        self.write_spec(spec)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self._child = subprocess.Popen(
                [*etcd_argv(spec, self.data_dir, self.binary), *extra],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: the agent's signals and exit do not reach it
                close_fds=True,
            )
        write_private(self.pid_file, f"{self._child.pid}\n")
        log.info("etcd member started", extra={"pid": self._child.pid, "data_dir": str(self.data_dir)})
        return self._child.pid

    def run(self, spec: MemberSpec, *extra: str, ready: bool = True, timeout: float = 30, keep: bool = False) -> None:
        """Start the member of `spec` (unless it runs already) and wait until it serves (`ready`: knows a leader,
        see wait_started). When it does not, it is stopped and its files are removed, unless `keep` (a member
        with data to keep: a recovery), and EtcdMemberError says why."""
        try:
            if self.pid() is None:
                self.start(spec, *extra)
            self.wait_started(timeout=timeout, ready=ready)
        except BaseException:
            if keep:
                self.stop()
            else:
                self.destroy()
            raise

    def wait_started(self, timeout: float = 30, ready: bool = True) -> None:
        """Until the member answers (`ready`: and knows a leader; a learner only answers), or EtcdMemberError."""
        spec = self.spec()
        assert spec is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.pid() is None:
                code = self._child.returncode if self._child is not None else None
                raise EtcdMemberError(
                    f"etcd exited at start-up (exit status {code}; {self._process_trace()}); its log {self.log_file} "
                    f"ends:\n{self.log_tail()}"
                )
            local = f"https://{host_port('127.0.0.1', spec.client_port)}"
            ok = (
                member_ready(local, spec.tls.client()) if ready else member_status(local, spec.tls.client()) is not None
            )
            if ok:
                return
            if time.monotonic() > deadline:
                raise EtcdMemberError(
                    f"etcd did not become ready within {timeout:.0f}s; its log {self.log_file} ends:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _process_trace(self) -> str:
        """What is known of the member's process when it is not found running: for the error that says so."""
        try:
            recorded = self.pid_file.read_text().strip()
        except OSError as exc:
            return f"no pid file: {type(exc).__name__}"
        try:
            status = Path(f"/proc/{recorded}/stat").read_text().split(") ", 1)[-1][:1]
            argv = Path(f"/proc/{recorded}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
        except OSError:
            return f"pid {recorded} gone"
        return f"pid {recorded} state {status} command {argv!r}"

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the member and wait (SIGKILL after `timeout`)."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def destroy(self) -> None:
        """Stop the member and remove its files and data (after it left the cluster)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
