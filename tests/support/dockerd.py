"""A throw-away Docker engine in its own network namespace, for tests that stop, restart or break an engine.

    with NetnsDockerd() as engine:              # namespace + dockerd up, dabctl/sample:1 loaded
        engine.url                              # "unix:///tmp/dabctl-dockerd-.../docker.sock"
        engine.restart(); engine.kill9(); engine.start()
    # closed: dockerd, containerd, shims and containers gone; mounts, cgroups, namespace and temp dir removed

A second dockerd in the host's network namespace fights the first over docker0, the DOCKER chains and
the address pools, and `ip netns exec` remounts /sys (dockerd then fails with "Devices cgroup isn't mounted"); so
the daemon runs under `nsenter --net=/var/run/netns/NAME` with its own data root, exec root, pid file, socket,
config file (an empty one: the host's /etc/docker/daemon.json must not leak in) and cgroup parent. Its bridges
and iptables rules live in the namespace, so the host's rules are never touched.

Facts this harness relies on (seen on Docker 20.10 here): a fresh start answers `_ping` in about 0.3 s on
overlay2 (copying the 2 MB sample image takes another 0.2 s). After `kill -9`, containerd dies with dockerd
(parent-death signal) but the shims and containers live on; dockerd refuses to start while the pid in its pid file
exists, and waits ~20 s for a containerd whose pid file names a live pid — a zombie counts, and init here reaps
orphans late — so `start()` reaps dockerd and drops a dead containerd's pid file first. The data root stays
bind-mounted on itself after `kill -9`, and a later clean stop then leaves that mount behind: `close()` unmounts
whatever is mounted under the temp directory. Without live-restore, a stop (and a start after `kill -9`) stops
every container (10 s for one that ignores SIGTERM). `close()` finds the engine's processes by network namespace
(dockerd, containerd, shims) and by cgroup parent (containers), never by a command line that merely names the
socket.

`netns=` runs the engine in a namespace its caller made and removes (a cluster node's, tests/support/cluster.py),
`root=` puts its files in a directory of the caller's choosing. `extra_args` and `env` serve other uses, e.g. a Swarm peer: ``NetnsDockerd(env={"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE":
"1"})``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import docker
import docker.errors

__all__ = ["NetnsDockerd"]

API_VERSION = "1.41"
DEFAULT_IMAGES = ("dabctl/sample:1",)
HOST_ENGINE = "unix:///var/run/docker.sock"
_MNT_DETACH = 2


def umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2({path}): {os.strerror(err)}")


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(root: str) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == root or point.startswith(root + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def _daemon_pids(root: str, netns: tuple[int, int] | None) -> list[int]:
    """dockerd, containerd and shims of this engine: processes in its network namespace, or daemons whose command
    line names its directories (never a client that merely names the socket, like an agent under test)."""
    pids = []
    needle = root.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if netns is not None:
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) == netns:
                    pids.append(int(entry))
                    continue
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
            if comm == "dockerd" or comm.startswith("containerd"):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
        except OSError:
            continue
    return pids


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class NetnsDockerd:
    """One dockerd in a fresh network namespace, with every file under one temp directory.

    `start()` creates the namespace and directories on first use, starts dockerd, waits until `_ping` answers
    and (first start only) copies `images` from the host engine. `stop()` is SIGTERM, then SIGKILL after
    `timeout`; `kill9()` is SIGKILL at once; `restart()` is stop + start on the same directories. `close()`
    removes everything, also after a failed start or a `kill9()`. `start_seconds` is the last start's duration
    (until `_ping` answers), `load_seconds` the image copy's.
    """

    def __init__(
        self,
        *,
        images: Sequence[str] = DEFAULT_IMAGES,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        address_pool: str = "base=10.201.0.0/16,size=24",
        source: str = HOST_ENGINE,
        start_timeout: float = 30.0,
        sysctls: Mapping[str, str] | None = None,
        netns: str | None = None,
        root: Path | None = None,
    ) -> None:
        # Set in the namespace before dockerd first starts. A new namespace copies IPv4 settings from the host's
        # (net.core.devconf_inherit_init_net=0), so ip_forward is 1 there unless a test says otherwise.
        self.sysctls = dict(sysctls or {})
        self.images = tuple(images)
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.address_pool = address_pool
        self.source = source
        self.start_timeout = start_timeout
        token = secrets.token_hex(4)
        # A namespace the caller names is the caller's: it exists before start() (with its links already in
        # place) and outlives close(). Its name then also names the cgroup parent.
        self._own_netns = netns is None
        self.netns = netns or f"dabctl-{token}"
        self.cgroup_parent = f"/{netns}" if netns else f"/dabctl-dockerd-{token}"
        if root is not None:
            root.mkdir(parents=True)
            self.root = root
        else:
            # Under /tmp whatever $TMPDIR says: a Unix socket path must stay below 108 bytes.
            self.root = Path(tempfile.mkdtemp(prefix=f"dabctl-dockerd-{token}-", dir="/tmp"))
        self.socket_path = self.root / "docker.sock"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.pidfile = self.root / "dockerd.pid"
        self.log_path = self.root / "dockerd.log"
        self.config_file = self.root / "daemon.json"
        self.config_file.write_text("{}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self.load_seconds: float | None = None
        self._netns_created = False
        self._netns_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the namespace, as /proc/PID/ns/net has it
        self._images_loaded = False
        self._client: docker.APIClient | None = None
        self._closed = False

    # --- addresses --------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``unix://<socket>``: a DOCKER_HOST, ``--docker-host`` or docker-py ``base_url``."""
        return f"unix://{self.socket_path}"

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def client(self) -> docker.APIClient:
        """A docker-py client on this engine, kept across restarts (it reconnects); closed by `close()`."""
        if self._client is None:
            self._client = docker.APIClient(base_url=self.url, version=API_VERSION, timeout=60)
        return self._client

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def command(self) -> list[str]:
        return [
            "nsenter",
            f"--net={self.netns_path}",
            "dockerd",
            "--config-file",
            str(self.config_file),
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "-H",
            self.url,
            "--default-address-pool",
            self.address_pool,
            "--cgroup-parent",
            self.cgroup_parent,
            *self.extra_args,
        ]

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start dockerd (creating the namespace on first use) and wait until it answers; return self."""
        if self._closed:
            raise RuntimeError("NetnsDockerd is closed")
        if self.running:
            raise RuntimeError(f"dockerd already runs (pid {self.pid})")
        t0 = time.monotonic()
        self._ensure_netns()
        self._reap_previous()
        env = {**os.environ, **self.env}
        env.pop("DOCKER_HOST", None)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_until_answering(self.start_timeout)
        except BaseException:
            self.kill9()
            raise
        self.start_seconds = time.monotonic() - t0
        if not self._images_loaded:
            t1 = time.monotonic()
            self._load_images(self.images)
            self._images_loaded = True
            self.load_seconds = time.monotonic() - t1
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (dockerd stops its containers first); SIGKILL after `timeout`. The exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL dockerd now (containerd follows it; shims and containers live on)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop (as `stop`) and start again on the same directories; the images stay."""
        self.stop(timeout)
        return self.start()

    def close(self) -> None:
        """Remove everything this engine made: containers, processes, mounts, cgroups, namespace, directory.

        Idempotent, and safe after a failed start or a `kill9()`. Raises (after trying everything) only when
        something could not be removed.
        """
        if self._closed:
            return
        self._closed = True
        problems: list[str] = []
        if self.running:
            # Removing the containers first makes dockerd's own shutdown quick (no stop timeouts to wait out).
            with contextlib.suppress(Exception):
                for c in self.client.containers(all=True):
                    self.client.remove_container(c["Id"], force=True, v=True)
            self.stop(timeout=20)
        self._drop_client()
        self._kill_leftovers()
        for point in mounts_under(str(self.root)):
            try:
                umount(point)
            except OSError as exc:
                problems.append(str(exc))
        self._remove_cgroups()
        if self._netns_created:
            proc = subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, text=True)
            if proc.returncode != 0 and os.path.exists(self.netns_path):
                problems.append(f"ip netns delete {self.netns}: {proc.stderr.strip()}")
        if not mounts_under(str(self.root)):
            shutil.rmtree(self.root, ignore_errors=True)
        problems += self.leftovers()
        if problems:
            raise RuntimeError("NetnsDockerd.close() left things behind: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        """What of this engine still exists on the host (empty after a successful `close()`)."""
        out = [f"process {pid}" for pid in self._pids() if alive(pid)]
        out += [f"mount {m}" for m in mounts_under(str(self.root))]
        out += [f"cgroup {d}" for d in self._cgroup_dirs() if d.exists()]
        if self._own_netns and os.path.exists(self.netns_path):
            out.append(f"netns {self.netns}")
        if self.root.exists():
            out.append(f"directory {self.root}")
        return out

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dockerd log)"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------------------------

    def _ensure_netns(self) -> None:
        if self._netns_id is not None:
            return
        if self._own_netns:
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
            self._netns_created = True
        st = os.stat(self.netns_path)
        self._netns_id = (st.st_dev, st.st_ino)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, capture_output=True)
        for key, value in self.sysctls.items():
            subprocess.run(
                ["nsenter", f"--net={self.netns_path}", "sysctl", "-q", "-w", f"{key}={value}"],
                check=True,
                capture_output=True,
            )

    def _reap_previous(self) -> None:
        """dockerd refuses to start while the pid in its pid file exists, and waits for a containerd whose pid
        file names a live pid; after `kill9()` both may name zombies (init here reaps orphans late)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        containerd_pidfile = self.exec_root / "containerd" / "containerd.pid"
        try:
            pid = int(containerd_pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:  # it follows dockerd (parent-death signal)
            time.sleep(0.02)
        if not alive(pid):
            with contextlib.suppress(FileNotFoundError):
                containerd_pidfile.unlink()

    def _wait_until_answering(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode} while starting:\n{self.log_tail()}")
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not answer _ping within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        # A bare socket rather than docker-py: its Unix connection leaks the socket when connect() is refused
        # (a stale socket file after kill -9), which pytest reports as an unclosed-socket ResourceWarning.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

    def _load_images(self, images: Iterable[str]) -> None:
        source = docker.APIClient(base_url=self.source, version=API_VERSION, timeout=120)
        try:
            for image in images:
                self.client.load_image(source.get_image(image))
                self.client.inspect_image(image)
        finally:
            source.close()

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _kill_leftovers(self) -> None:
        """SIGKILL what outlived dockerd: containers (by cgroup), shims and containerd (by command line)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [p for p in self._pids() if alive(p)]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def _pids(self) -> list[int]:
        """Every process of this engine: the daemons, and the containers (by cgroup: they have their own netns)."""
        return sorted(set(self._cgroup_pids()) | set(_daemon_pids(str(self.root), self._netns_id)))

    def _cgroup_dirs(self) -> list[Path]:
        base = Path("/sys/fs/cgroup")
        relative = self.cgroup_parent.lstrip("/")
        dirs = [base / relative] if (base / "cgroup.controllers").exists() else []
        with contextlib.suppress(OSError):
            dirs += [c / relative for c in base.iterdir() if c.is_dir() and not (c / "cgroup.controllers").exists()]
        with contextlib.suppress(OSError):
            dirs += [base / "unified" / relative] if (base / "unified").is_dir() else []
        return sorted(set(dirs))

    def _cgroup_pids(self) -> list[int]:
        pids: set[int] = set()
        for top in self._cgroup_dirs():
            if not top.exists():
                continue
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        return sorted(pids)

    def _remove_cgroups(self) -> None:
        for top in self._cgroup_dirs():
            if not top.exists():
                continue
            subdirs = sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
            for d in [*subdirs, top]:
                with contextlib.suppress(OSError):
                    d.rmdir()
