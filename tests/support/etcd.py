"""A real single-member etcd (Debian's /usr/bin/etcd 3.4) on free loopback ports, for state-log tests.

    with EtcdServer(tmp_path) as etcd:          # started, ready to serve
        EtcdStateLog([etcd.url])
        etcd.kill9(); etcd.restart()            # same data directory and ports: the data survives

`EtcdServer(tmp, tls=make_tls(tmp / "tls"))` serves https and requires client certificates signed by the test CA.
Readiness is a POST to the gRPC gateway's `/v3/kv/range` (with the client certificate when TLS is on), so a
started server has elected itself leader and answers reads. etcd writes its log to `<dir>/etcd.log`; a start that
fails or times out raises with the log's tail.

`EtcdCluster` is a real 3-member cluster (each member on its own address, optionally in its own network namespace,
as tests/support/cluster.py places them on a bridge):

    etcd = EtcdCluster(directory, [EtcdMember("e1", "10.230.0.21", netns="..."), ...]).start()
    etcd.endpoints                              # ["http://10.230.0.21:2379", ...]
    etcd.kill9(etcd.leader()); etcd.has_quorum(); etcd.restart_all()
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["ETCD", "EtcdCluster", "EtcdMember", "EtcdServer", "TlsFiles", "free_port", "make_tls"]

ETCD = "/usr/bin/etcd"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost and a client certificate, both CA-signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> TlsFiles:
    """Generate a test CA and server/client certificates (EC P-256, valid for a day) into `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("dabctl test CA"))
        .issuer_name(name("dabctl test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, usages: list[x509.ObjectIdentifier], stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return write_cert(cert, directory / f"{stem}.crt"), write_key(key, directory / f"{stem}.key")

    ca_path = write_cert(ca_cert, directory / "ca.crt")
    # etcd 3.4's gRPC gateway dials etcd itself with the server certificate, so that one needs clientAuth too.
    server_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server_cert, server_key = issue("etcd-server", server_usages, "server")
    client_cert, client_key = issue("dabctl-client", [ExtendedKeyUsageOID.CLIENT_AUTH], "client")
    return TlsFiles(
        ca=ca_path, server_cert=server_cert, server_key=server_key, client_cert=client_cert, client_key=client_key
    )


class EtcdServer:
    """One etcd member whose data directory, ports and log live under `directory`."""

    def __init__(self, directory: Path, name: str = "dabctl-test", tls: TlsFiles | None = None) -> None:
        self.directory = directory
        self.name = name
        self.tls = tls
        self.data_dir = directory / "data"
        self.log_path = directory / "etcd.log"
        self.client_port = 0
        self.peer_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # --- addresses ---------------------------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """The client URL, e.g. http://127.0.0.1:23790."""
        if not self.client_port:
            raise RuntimeError("etcd has not been started")
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, timeout: float = 20) -> Self:
        """Start on fresh free ports and wait until it serves; retried if a port was taken meanwhile."""
        if self.running():
            raise RuntimeError("etcd is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for _ in range(3):
            self.client_port, self.peer_port = free_port(), free_port()
            while self.peer_port == self.client_port:
                self.peer_port = free_port()
            try:
                self._spawn(timeout)
                return self
            except _PortTaken as exc:
                last = exc
        raise RuntimeError(f"etcd could not bind loopback ports: {last}")

    def restart(self, timeout: float = 20) -> Self:
        """Start again on the same data directory and ports (after `kill9` or `stop`)."""
        if not self.client_port:
            raise RuntimeError("etcd was never started")
        if self.running():
            raise RuntimeError("etcd is still running; kill9() or stop() it first")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._spawn(max(1.0, deadline - time.monotonic()))
                return self
            except _PortTaken:
                # The killed process's sockets are gone at once; a port taken by something else will not free up.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill9(self) -> None:
        """SIGKILL etcd and reap it: no shutdown, no flush beyond what etcd already fsynced."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close_log()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- helpers -----------------------------------------------------------------------------------------------

    def client_ssl_context(self, with_client_cert: bool = True) -> ssl.SSLContext | None:
        """An SSL context trusting the test CA (and presenting the client certificate), None without TLS."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        if with_client_cert:
            ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def request(self, path: str, body: dict[str, object], timeout: float = 2) -> dict[str, object]:
        """POST a JSON body to the gRPC gateway (e.g. "/v3/kv/range") and return the decoded answer."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self.client_ssl_context()) as resp:
            answer: dict[str, object] = json.loads(resp.read())
            return answer

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _command(self) -> list[str]:
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        cmd = [
            ETCD,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"{self.name}={self.peer_url}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"dabctl-test-{self.client_port}",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--experimental-watch-progress-notify-interval",
            "1s",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        if self.tls:
            cmd += [
                "--cert-file",
                str(self.tls.server_cert),
                "--key-file",
                str(self.tls.server_key),
                "--client-cert-auth",
                "--trusted-ca-file",
                str(self.tls.ca),
            ]
        return cmd

    def _spawn(self, timeout: float) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process.wait()
                self._close_log()
                log = self.log_path.read_bytes()[log_offset:].decode(errors="replace")
                if "address already in use" in log:
                    raise _PortTaken(log[-2000:])
                raise RuntimeError(f"etcd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(f"etcd did not become ready within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            answer = self.request("/v3/kv/range", {"key": base64.b64encode(b"/health-probe").decode()}, timeout=1)
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return "header" in answer

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class _PortTaken(RuntimeError):
    """etcd could not bind a port picked as free (another process took it in between)."""


CLIENT_PORT = 2379
PEER_PORT = 2380


@dataclass
class EtcdMember:
    """One member of an `EtcdCluster`: its name, the address it serves on, and the namespace holding that address."""

    name: str
    address: str
    netns: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{PEER_PORT}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """A real multi-member etcd (plain http) whose data directories and logs live under `directory`.

    Members start together (`--initial-cluster-state new`); a killed member restarts on its own data directory
    and rejoins. Heartbeat 50 ms and election timeout 500 ms, so a killed leader is replaced within about a second.
    """

    def __init__(self, directory: Path, members: Sequence[EtcdMember], token: str = "dabctl-test") -> None:
        self.directory = directory
        self.members = list(members)
        self.token = token

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member (what an etcd client, or `dabctl --state etcd://...`, is given)."""
        return [m.url for m in self.members]

    def member(self, name: str) -> EtcdMember:
        return next(m for m in self.members if m.name == name)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, timeout: float = 20) -> Self:
        """Start every member and wait until each answers a linearizable read (so a leader is elected)."""
        for m in self.members:
            if not m.running():
                self._spawn(m)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20, members: Sequence[EtcdMember] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while not self._reads(m, timeout=1):
                if m.process is not None and m.process.poll() is not None:
                    raise RuntimeError(f"etcd member {m.name} exited {m.process.returncode}:\n{self.log_tail(m)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {m.name} not ready within {timeout:.0f}s:\n{self.log_tail(m)}")
                time.sleep(0.05)

    def kill9(self, member: EtcdMember) -> None:
        """SIGKILL one member and reap it."""
        if member.process is not None and member.process.poll() is None:
            member.process.kill()
        if member.process is not None:
            member.process.wait(timeout=10)

    def restart(self, member: EtcdMember, timeout: float = 20) -> None:
        """Start a stopped or killed member again on its data directory; wait until it serves reads (which needs a
        quorum: restart enough members first)."""
        if member.running():
            raise RuntimeError(f"etcd member {member.name} is still running")
        self._spawn(member)
        self.wait_ready(timeout, [member])

    def restart_all(self, timeout: float = 20) -> None:
        """Start every member that is down, together (one alone may lack a quorum), and wait for them."""
        down = [m for m in self.members if not m.running()]
        for m in down:
            self._spawn(m)
        self.wait_ready(timeout, down)

    def stop(self) -> None:
        """SIGTERM every member (SIGKILL after 5 s), in parallel."""

        def one(m: EtcdMember) -> None:
            if m.process is None or m.process.poll() is not None:
                return
            m.process.terminate()
            try:
                m.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                m.process.kill()
                m.process.wait(timeout=10)

        threads = [threading.Thread(target=one, args=(m,)) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # --- state -------------------------------------------------------------------------------------------------

    def request(
        self, member: EtcdMember, path: str, body: Mapping[str, object], timeout: float = 2
    ) -> dict[str, object]:
        """POST a JSON body to one member's gRPC gateway (e.g. "/v3/kv/put") and return the decoded answer."""
        req = urllib.request.Request(
            member.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer: dict[str, object] = json.loads(resp.read())
            return answer

    def put(self, key: str, value: str, timeout: float = 2) -> bool:
        """Write through any running member; False when none could commit it within `timeout` (no quorum)."""
        body = {"key": _b64(key), "value": _b64(value)}
        for m in self.members:
            if not m.running():
                continue
            try:
                return "header" in self.request(m, "/v3/kv/put", body, timeout)
            except (OSError, urllib.error.URLError, ValueError):
                continue
        return False

    def get(self, key: str, timeout: float = 2) -> str | None:
        """A linearizable read through any running member; None when the key is absent or nobody answered."""
        for m in self.members:
            if not m.running():
                continue
            try:
                answer = self.request(m, "/v3/kv/range", {"key": _b64(key)}, timeout)
            except (OSError, urllib.error.URLError, ValueError):
                continue
            kvs = answer.get("kvs")
            if isinstance(kvs, list) and kvs:
                return base64.b64decode(kvs[0]["value"]).decode()
            return None
        return None

    def has_quorum(self, timeout: float = 2) -> bool:
        """Whether a write commits within `timeout` (a majority of members is up and has a leader)."""
        return self.put("/dabctl-h/quorum-probe", str(time.monotonic()), timeout)

    def leader(self, timeout: float = 5) -> EtcdMember:
        """The member that leads now, as the running members report it."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[int, EtcdMember] = {}
            leader_id = 0
            for m in self.members:
                if not m.running():
                    continue
                try:
                    status = self.request(m, "/v3/maintenance/status", {}, timeout=1)
                except (OSError, urllib.error.URLError, ValueError):
                    continue
                header = status.get("header")
                if isinstance(header, dict):
                    ids[int(header["member_id"])] = m
                leader_id = int(str(status.get("leader", 0))) or leader_id
            if leader_id in ids:
                return ids[leader_id]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no etcd leader among the running members within {timeout:.0f}s")
            time.sleep(0.05)

    def clear(self) -> None:
        """Delete every key (a fresh keyspace for the next test; revisions keep counting)."""
        everything = {"key": _b64("\0"), "range_end": _b64("\0")}
        self.request(next(m for m in self.members if m.running()), "/v3/kv/deleterange", everything, timeout=5)

    def log_tail(self, member: EtcdMember, lines: int = 30) -> str:
        try:
            return "\n".join(self._log(member).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- internals ---------------------------------------------------------------------------------------------

    def _log(self, member: EtcdMember) -> Path:
        return self.directory / f"{member.name}.log"

    def _command(self, m: EtcdMember) -> list[str]:
        wrapper = ["nsenter", f"--net=/var/run/netns/{m.netns}"] if m.netns else []
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            *wrapper,
            ETCD,
            "--name", m.name,
            "--data-dir", str(self.directory / m.name),
            "--listen-client-urls", m.url,
            "--advertise-client-urls", m.url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def _spawn(self, m: EtcdMember) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._log(m).open("ab") as log:
            m.process = subprocess.Popen(
                self._command(m), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _reads(self, m: EtcdMember, timeout: float) -> bool:
        try:
            return "header" in self.request(m, "/v3/kv/range", {"key": _b64("/dabctl-h/ready-probe")}, timeout)
        except (OSError, urllib.error.URLError, ValueError):
            return False


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
